//! Service: wires the stages together and runs them until told to stop.
//!
//! Start: load every pipeline's champion bundle, connect, start one inference task per
//! pipeline and the ingest loop. Stop (SIGTERM/SIGINT): ingest stops taking messages, each
//! pipeline drains what it holds and publishes, then the final status goes out and the client
//! disconnects cleanly. Nothing accepted is lost: what was not answered was not acked either.

pub(crate) mod closed_loop;
mod code_pages;
pub mod crash_guard;
mod load;
pub mod metrics;
mod status;
mod swap;
mod windows;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::{mpsc, watch};

use crate::config::{BrokerUrl, Config, ConfigErrors, TrainConfig};
use arc_swap::ArcSwap;

use crate::infer::{Pipeline, SharedModel};
use crate::ingest::{connection, Ingest, Route, TopicFilter};
use crate::telemetry::events::Counters;
use crate::telemetry::{events, systemd};

use crate::telemetry::STATUS_EVERY;
use load::load_models_noting;
pub use load::{check_models, fingerprints, prepare, Kept, Prepared, Running};
use status::{report_silent_devices, status, status_line};
use windows::{resume_windows, save_windows};
/// How long a stop may take to drain and disconnect before giving up.
const DRAIN_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Broker(String),
    #[error("{0}")]
    Connect(#[from] crate::mqtt::ConnectError),
    #[error("cannot serve metrics: {0}")]
    Metrics(String),
    #[error("{0}")]
    Store(String),
}

/// One running pipeline as the status report sees it.
pub struct Serving {
    pub pipeline: String,
    pub model: SharedModel,
    pub counters: Arc<Counters>,
    pub performance: Option<Arc<std::sync::Mutex<crate::monitor::performance::Performance>>>,
    /// The sample store, for pipelines that train.
    pub store: Option<Arc<crate::store::Store>>,
    /// What the source remembers: a Sparkplug namespace, devices' last values, when each
    /// device was last heard.
    pub source: crate::ingest::router::SourceState,
    /// A sequence model's windows, each device's last frames.
    pub windows: crate::infer::window::SharedWindows,
}

/// Each pipeline's model as the Sparkplug edge node reports it, read at each report.
fn sparkplug_models(models: &[(String, SharedModel)]) -> Vec<(String, crate::sparkplug::output::ServingNow)> {
    models
        .iter()
        .map(|(pipeline, model)| {
            let model = model.clone();
            let now: crate::sparkplug::output::ServingNow = Arc::new(move || {
                let m = model.load();
                crate::sparkplug::output::Serving { name: m.name.clone(), version: m.version, sha256: m.sha256.clone() }
            });
            (pipeline.clone(), now)
        })
        .collect()
}

/// Unmaps the code pages that loading models (or training) ran once; see `code_pages`.
pub(crate) fn release_code_pages(after: &str) {
    let released = code_pages::release();
    tracing::debug!(after, released_kib = released / 1024, "Released resident code pages");
}

/// What a running daemon exposes to its embedder (the demo, tests).
#[derive(Clone)]
pub struct Handle {
    /// True while connected to the broker and subscribed.
    pub ready: watch::Receiver<bool>,
    pub counters: Vec<(String, Arc<Counters>)>,
}

/// Runs the daemon until `shutdown` resolves, then drains and disconnects.
///
/// # Errors
/// Bad config or bundles, or a broker that cannot be set up. Once running, broker outages
/// are retried forever and bad input is reported, never returned.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_start: impl FnOnce(Handle),
) -> Result<(), ServiceError> {
    let shutdown = async {
        shutdown.await;
        false
    };
    run_keeping(config, Kept::default(), Prepared::default(), shutdown, on_start).await.map(|_| ())
}

/// [`run`] after a reload: the pipelines `kept` from the earlier run start from its state
/// where their settings are unchanged, the others from the models `prepared` for them (or
/// load them now); returns what the pipelines keep for the next run. `shutdown` resolves to
/// true when the run ends for a reload (systemd hears RELOADING=1, not STOPPING=1, and no
/// "offline" status goes out).
///
/// # Errors
/// As [`run`].
pub async fn run_keeping(
    config: Config,
    mut kept: Kept,
    prepared: Prepared,
    shutdown: impl Future<Output = bool>,
    on_start: impl FnOnce(Handle),
) -> Result<Kept, ServiceError> {
    // Unchanged pipelines keep what they had; the others take the model prepared for them
    // or load their champion.
    let reused: Vec<Option<Serving>> = config.pipelines.iter().map(|p| kept.take(&config, p)).collect();
    let prints = fingerprints(&config);
    let Prepared { models: mut ready_models, mut fallbacks, crashed } = prepared;
    let mut to_load = config.clone();
    to_load.pipelines = config
        .pipelines
        .iter()
        .zip(&reused)
        .filter(|(p, r)| r.is_none() && !ready_models.iter().any(|(name, _)| name == &p.name))
        .map(|(p, _)| p.clone())
        .collect();
    let mut loaded = load_models_noting(&to_load, true, &mut fallbacks)?.into_iter();
    let (host, port) = match &config.mqtt.url {
        BrokerUrl::Tcp { host, port, .. } => (host.clone(), *port),
        BrokerUrl::Embedded => embedded(&config.mqtt.embedded_listen)?,
    };
    let options = connection::mqtt_options(&config, &host, port)?;
    // The queue of publishes and acks waiting for the event loop. Past `mqtt.max_inflight`
    // (1000) more queued requests only hold memory (~430 bytes each), and pipelines wait for
    // room instead: 4096 cost the benchmark 1.4 MiB of peak RSS at the same throughput
    // (docs/performance.md).
    let (client, eventloop) = AsyncClient::new(options, 1024);
    let journal = config.state_dir.join(events::JOURNAL);
    let (events, reporter) = events::reporter(client.clone(), config.events_topic(), Some(journal));
    let reporter = tokio::spawn(reporter);
    for (pipeline, champion, error) in fallbacks {
        let serving = match to_load.pipelines.iter().position(|p| p.name == pipeline) {
            Some(i) => loaded.as_slice().get(i),
            None => ready_models.iter().find(|(name, _)| name == &pipeline).map(|(_, m)| m),
        };
        let version = serving.map(|m| m.version).unwrap_or(0);
        events.emit(events::Event::FellBack { pipeline, champion, version, error });
    }
    let (acks, acker) = crate::mqtt::ack::acker(client.clone());
    let flow = Arc::new(crate::ingest::flow::Flow::default());
    let acker = tokio::spawn(acker);

    // The closed loop: a sample store and its writer, drift alarms and commands as triggers.
    // Pushed updates go through the loop's trial too, so `[update]` runs the loop as well.
    let training = config.pipelines.iter().any(|p| p.train.is_some()) || config.update.is_some();
    let (loop_tx, loop_rx) = std::sync::mpsc::channel();
    let (events, store) = if training {
        let store = crate::store::Store::open(config.store.clone()).map_err(|e| ServiceError::Store(e.to_string()))?;
        let store = Arc::new(store);
        let (to_loop, counted) = (loop_tx.clone(), store.clone());
        let events = events.with_triggers(Arc::new(move |mut t: events::DriftTrigger| {
            // Where the new regime begins is counted now, on the serving path, not when the
            // loop gets to the alarm (alarms are rare: one read transaction each).
            if t.raised {
                t.stored = counted.stats(&t.pipeline).ok().map(|s| s.stored_total);
            }
            let _ = to_loop.send(crate::telemetry::inbox::LoopMessage::Drift(t));
        }));
        let writer =
            crate::store::writer::start(store.clone(), acks.clone(), events.clone()).map_err(ServiceError::Store)?;
        (events, Some((store, writer)))
    } else {
        (events, None)
    };
    let mut looped = Vec::new();
    // `[sparkplug]`: the pipelines' handle now, the edge node's session once they exist.
    let sparkplug_out = config.sparkplug.as_ref().map(|_| crate::sparkplug::output::channel());
    let mut models = Vec::new();
    let device_key = match &config.update {
        Some(u) => Some(Arc::new(crate::trust::signing::device_key(&u.device_key).map_err(ServiceError::Store)?)),
        None => None,
    };

    let mut windows_of = std::mem::take(&mut kept.windows);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (disconnect_tx, disconnect_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);
    let mut routes = Vec::new();
    let mut tasks = Vec::new();
    let mut serving = Vec::new();
    for (p, reused) in config.pipelines.iter().zip(reused) {
        // Rows wait here rather than in ingest's overflow queue: the channel stores them in
        // small blocks, without a VecDeque's doubling. See ingest::connection on what bounds it.
        let (tx, rx) = mpsc::channel(1 << 16);
        let (model, counters, performance, source) = match reused {
            Some(kept) => {
                let m = kept.model.load();
                tracing::info!(
                    pipeline = p.name,
                    model = m.name,
                    version = m.version,
                    "Serving (unchanged: kept its model and state)"
                );
                (kept.model, kept.counters, kept.performance, kept.source)
            }
            None => {
                let ready = ready_models.iter().position(|(name, _)| name == &p.name);
                let Some(active) = ready.map(|i| ready_models.swap_remove(i).1).or_else(|| loaded.next()) else {
                    return Err(ServiceError::Store(format!("pipeline {}: its model did not load", p.name)));
                };
                tracing::info!(pipeline = p.name, model = active.name, version = active.version, "Serving");
                let model: SharedModel = Arc::new(ArcSwap::from_pointee(active));
                let performance = p.labels.as_ref().map(|l| {
                    Arc::new(std::sync::Mutex::new(crate::monitor::performance::Performance::new(l.horizon, l.window)))
                });
                let source = crate::ingest::router::SourceState::new(&p.source, config.sparkplug.as_ref());
                (model, Arc::new(Counters::default()), performance, source)
            }
        };
        let writer =
            store.as_ref().filter(|_| p.train.is_some()).map(|(_, w)| w.for_pipeline(&p.name, counters.clone()));
        let labels = match (&p.labels, &performance) {
            (Some(l), Some(perf)) => Some(crate::ingest::labels::LabelRoute {
                filter: TopicFilter::parse(&l.topic).map_err(|e| ServiceError::Broker(e.to_string()))?,
                key: l.key.clone(),
                value: l.value.clone(),
                performance: perf.clone(),
                store: writer.clone(),
                classes: model.load().engine.signature.classes.clone(),
            }),
            _ => None,
        };
        routes.push(Route {
            pipeline: p.name.clone(),
            devices: Default::default(),
            filter: TopicFilter::parse(&p.source.topic).map_err(|e| ServiceError::Broker(e.to_string()))?,
            model: model.clone(),
            tx: Some(tx),
            counters: counters.clone(),
            labels,
            source: source.clone(),
        });
        let pipeline = Pipeline {
            name: p.name.clone(),
            model: model.clone(),
            sink: p.sink.topic.clone(),
            batch: p.batch,
            client: client.clone(),
            counters: counters.clone(),
            events: events.clone(),
            acks: acks.clone(),
            flow: flow.clone(),
            performance: performance.clone(),
            store: writer,
            shadow: Arc::default(),
            sparkplug: sparkplug_out.as_ref().map(|(o, _)| o.clone()),
            windows: windows_of.remove(&p.name).unwrap_or_else(|| match p.window {
                1 => Arc::default(),
                _ => Arc::new(std::sync::Mutex::new(resume_windows(&config, p))),
            }),
            capture: p.capture.clone().map(|c| {
                let topic = format!("lathe/{}/capture/{}", config.node, p.name);
                (std::sync::Mutex::new(crate::infer::capture::Capture::new(c)), topic)
            }),
        };
        models.push((p.name.clone(), model.clone()));
        for c in crashed.iter().filter(|c| c.model == model.load().name) {
            events.emit(events::Event::Step {
                pipeline: p.name.clone(),
                step: "trial.failed",
                message: c.message(),
                detail: serde_json::json!({"name": c.model, "version": c.version, "to": c.to,
                    "unclean_starts": c.starts, "why": "it crashed the daemon during its trial"}),
            });
        }
        if let Some(train) = p.train.clone().or_else(|| config.update.as_ref().and_then(|_| TrainConfig::serve_only()))
        {
            let train_share = train.share;
            looped.push(closed_loop::LoopPipeline {
                config: p.clone(),
                train,
                model: model.clone(),
                shadow: pipeline.shadow.clone(),
                counters: counters.clone(),
                performance: performance.clone(),
                device_key: device_key.clone(),
                share: train_share.then(|| (client.clone(), format!("lathe/{}/share/{}", config.node, p.name))),
            });
        }
        let windows = pipeline.windows.clone();
        tasks.push(tokio::spawn(pipeline.run(rx)));
        let store = store.as_ref().filter(|_| p.train.is_some()).map(|(s, _)| s.clone());
        serving.push(Serving { pipeline: p.name.clone(), model, counters, performance, store, source, windows });
    }
    let writer = store.as_ref().map(|(_, w)| w.clone());
    let sparkplug_task = match (&config.sparkplug, sparkplug_out) {
        (Some(settings), Some((_, rx))) => Some(
            crate::sparkplug::output::start(&config, settings, (&host, port), sparkplug_models(&models), rx)
                .map_err(ServiceError::Broker)?,
        ),
        _ => None,
    };
    let updater = match &config.update {
        Some(settings) => Some(
            crate::update::device::start(
                &config,
                settings,
                (&host, port),
                models,
                events.clone(),
                loop_tx.clone(),
                stop_rx.clone(),
            )
            .map_err(ServiceError::Broker)?,
        ),
        None => None,
    };
    let closed_loop = match store {
        Some((store, _)) => {
            let (config, events, stop) = (config.clone(), events.clone(), stop_rx.clone());
            let thread = std::thread::Builder::new()
                .name("lathe-loop".into())
                .spawn(move || closed_loop::run(config, store, looped, events, loop_rx, stop))
                .map_err(|e| ServiceError::Store(format!("cannot start the training loop: {e}")))?;
            Some(thread)
        }
        None => None,
    };
    let serving = Arc::new(serving);
    let swapper = tokio::spawn(swap::watch(config.clone(), serving.clone(), events.clone(), stop_rx.clone()));
    if let Some(listen) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| ServiceError::Metrics(format!("metrics.listen {listen}: {e}")))?;
        tracing::info!("Metrics on http://{listen}/metrics");
        tokio::spawn(metrics::serve(listener, serving.clone(), ready_rx.clone(), stop_rx.clone()));
    }
    let status_now = Arc::new(tokio::sync::Notify::new());
    let ingest = Ingest {
        eventloop,
        client: client.clone(),
        routes,
        events: events.clone(),
        acks: acks.clone(),
        flow,
        max_waiting_rows: usize::from(config.mqtt.receive_maximum),
        keep_alive: Duration::from_secs(config.mqtt.keep_alive_s),
        stop: stop_rx.clone(),
        disconnect: disconnect_rx,
        ready: ready_tx,
        commands: crate::ingest::router::CommandRoute {
            filter: TopicFilter::parse(&format!("lathe/{}/cmd/+", config.node)).map_err(ServiceError::Broker)?,
            to_loop: training.then(|| loop_tx.clone()),
            status_now: status_now.clone(),
        },
        unsubscribe: Vec::new(),
        login: crate::mqtt::LoginFiles::new(&config.mqtt),
    };
    let filters = ingest.filters();
    let ingest = Ingest { unsubscribe: kept.filters.into_iter().filter(|f| !filters.contains(f)).collect(), ..ingest };
    let ingest = tokio::spawn(ingest.run());
    on_start(Handle {
        ready: ready_rx.clone(),
        counters: serving.iter().map(|s| (s.pipeline.clone(), s.counters.clone())).collect(),
    });

    let status_task = {
        let (client, config, serving, events, mut stop, mut ready) =
            (client.clone(), config.clone(), serving.clone(), events.clone(), stop_rx, ready_rx);
        // "online" goes out once subscribed (so it means "messages sent now are served"),
        // again after every reconnect (a restarted broker may have lost it), every
        // STATUS_EVERY with fresh counters, and at once on `cmd/status`.
        tokio::spawn(async move {
            let mut was_ready = false;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(STATUS_EVERY) => {}
                    _ = status_now.notified() => {}
                    _ = ready.changed() => {}
                    _ = stop.changed() => break,
                }
                let is_ready = *ready.borrow_and_update();
                if is_ready != was_ready {
                    // Not ready: the ingest loop says why in the systemd status.
                    if is_ready {
                        systemd::ready(&status_line(&serving));
                        release_code_pages("serving started");
                    }
                    was_ready = is_ready;
                }
                if is_ready {
                    // Only while connected: a lost broker silences every device at once.
                    report_silent_devices(&serving, &events);
                    systemd::status(&status_line(&serving));
                    let body = status(&config, "online", &serving).to_string();
                    let _ = client.publish(config.status_topic(), QoS::AtLeastOnce, true, body).await;
                }
            }
        })
    };

    let reloading = shutdown.await;
    if reloading {
        // STOPPING=1 would make systemd treat the service as stopping, and kill it after
        // TimeoutStopSec; the next run's READY=1 ends the reload.
        tracing::info!("Reloading: draining in-flight messages");
        systemd::reloading();
    } else {
        tracing::info!("Stopping: draining in-flight messages");
        systemd::stopping();
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("Pipelines did not drain in {DRAIN_DEADLINE:?}; unanswered messages stay unacknowledged and will be redelivered");
    }
    // The pipelines are done: the Sparkplug edge node sends what is left and its NDEATH.
    if let Some(t) = sparkplug_task {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
    let _ = status_task.await;
    let _ = swapper.await;
    if let Some(u) = updater {
        let _ = tokio::time::timeout(Duration::from_secs(3), u).await;
    }
    if let Some(l) = closed_loop {
        let _ = tokio::task::spawn_blocking(move || l.join()).await;
    }
    // Rows drained above are acked by the store's writer once committed: wait for it.
    if let Some(w) = writer {
        let _ = tokio::task::spawn_blocking(move || w.flush()).await;
    }
    // The drained messages' acks must reach the client before the disconnect does.
    let _ = tokio::time::timeout(Duration::from_secs(2), acks.flush()).await;
    if !reloading {
        save_windows(&config, &serving);
        let body = status(&config, "offline", &serving).to_string();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            client.publish(config.status_topic(), QoS::AtLeastOnce, true, body),
        )
        .await;
    }
    let _ = disconnect_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(5), ingest).await.is_err() {
        tracing::warn!("The broker did not confirm the disconnect in time");
    }
    reporter.abort();
    acker.abort();
    tracing::info!("Stopped");
    Ok(Kept::from_serving(&config, prints, &serving, filters))
}

#[cfg(feature = "embedded-broker")]
fn embedded(listen: &str) -> Result<(String, u16), ServiceError> {
    let addr = crate::ingest::embedded_broker::start(listen).map_err(ServiceError::Broker)?;
    tracing::info!(%addr, "Embedded broker listening");
    Ok((addr.ip().to_string(), addr.port()))
}

#[cfg(not(feature = "embedded-broker"))]
fn embedded(_listen: &str) -> Result<(String, u16), ServiceError> {
    Err(ServiceError::Broker("this build has no embedded broker (feature `embedded-broker`)".into()))
}

/// Why the daemon's run ended.
pub enum Ending {
    Stop,
    /// SIGHUP with a valid, changed config: run again with it and the models prepared for it.
    Reload(Box<(Config, Prepared)>),
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let _ = stop_or_reload(None).await;
}

/// Resolves on SIGTERM or SIGINT (`Stop`), or on SIGHUP once the config file holds a valid
/// config — every bundle loading — that differs from the `running` one, or names a bundle
/// file that changed since its run started (`Reload`). A SIGHUP with a bad config logs every
/// error and keeps waiting: the running pipelines go on untouched.
pub async fn stop_or_reload(reload: Option<Running>) -> Ending {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
            let _ = tokio::signal::ctrl_c().await;
            return Ending::Stop;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return Ending::Stop,
                _ = tokio::signal::ctrl_c() => return Ending::Stop,
                _ = hup.recv() => {
                    let Some(running) = &reload else {
                        tracing::warn!("SIGHUP: nothing to reload in this mode");
                        continue;
                    };
                    let path = running.path.clone();
                    let checked = tokio::task::spawn_blocking(move || {
                        Config::load(&path).and_then(|c| check_models(&c).map(|_| c))
                    }).await;
                    match checked {
                        Ok(Ok(new)) if format!("{new:?}") == format!("{:?}", running.config) && fingerprints(&new) == running.prints => {
                            tracing::info!("SIGHUP: the config and its bundle files are unchanged; nothing to do");
                        }
                        Ok(Ok(new)) => {
                            let running = running.clone();
                            let prepared = tokio::task::spawn_blocking(move || prepare(&new, &running).map(|p| (new, p))).await;
                            match prepared {
                                Ok(Ok(next)) => {
                                    tracing::info!("SIGHUP: the config or a bundle file changed; restarting with it (unchanged pipelines keep their model and state)");
                                    return Ending::Reload(Box::new(next));
                                }
                                Ok(Err(e)) => tracing::error!("SIGHUP: the new config's models did not load, the running config stays: {e}"),
                                Err(e) => tracing::error!("SIGHUP: loading the new config's models failed: {e}"),
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::error!("SIGHUP: the new config is refused, the running one stays: {e}");
                        }
                        Err(e) => tracing::error!("SIGHUP: checking the new config failed: {e}"),
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = reload;
        let _ = tokio::signal::ctrl_c().await;
        Ending::Stop
    }
}
