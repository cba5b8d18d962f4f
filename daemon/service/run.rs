//! One run of the daemon, in three steps. [`build`] does everything that can fail — the
//! models, the broker's options, the topic filters, the metrics port, the updater, the
//! Sparkplug edge node, the store and the training loop — and serves nothing: when one step
//! fails, what the earlier ones started is stopped again, so a reload whose new config fails
//! here can go back to the running one. [`serve`] starts the pipelines, ingest and the status
//! and cannot fail. [`drain`] stops them, losing nothing accepted.

use std::sync::Mutex;

use rumqttc::v5::EventLoop;
use tokio::task::JoinHandle;

use super::*;
use crate::infer::window::SharedWindows;
use crate::monitor::performance::Performance;
use crate::store::writer::Writer;
use crate::store::Store;

/// A pipeline's serving state, new or kept over a reload, and what it subscribes to.
struct Parts {
    /// Kept unchanged from the run before a reload.
    kept: bool,
    model: SharedModel,
    counters: Arc<Counters>,
    performance: Option<Arc<Mutex<Performance>>>,
    source: crate::ingest::router::SourceState,
    filter: TopicFilter,
    labels: Option<TopicFilter>,
    windows: SharedWindows,
    shadow: Arc<arc_swap::ArcSwapOption<crate::infer::ActiveModel>>,
}

/// A run, built: everything that could fail has been done and nothing serves yet.
pub(super) struct Built {
    config: Config,
    prints: Vec<String>,
    kept_filters: Vec<String>,
    parts: Vec<Parts>,
    /// Pipelines whose champion could not serve: (pipeline, champion, error).
    fallbacks: Vec<(String, String, String)>,
    crashed: Vec<crash_guard::Crashed>,
    rolled_back: Option<String>,
    client: AsyncClient,
    eventloop: EventLoop,
    events: events::Events,
    acks: crate::mqtt::ack::AckSender,
    flow: Arc<crate::ingest::flow::Flow>,
    /// The store and its writer, when a pipeline trains or `[update]` is set.
    store: Option<(Arc<Store>, Writer)>,
    loop_tx: std::sync::mpsc::Sender<crate::telemetry::inbox::LoopMessage>,
    commands: TopicFilter,
    metrics: Option<tokio::net::TcpListener>,
    sparkplug: Option<crate::sparkplug::output::Output>,
    stop: (watch::Sender<bool>, watch::Receiver<bool>),
    /// The tasks and the thread started so far; stopped again if a later step fails.
    started: Started,
}

/// What [`build`] started: the events reporter, the ack releaser, the updater, the Sparkplug
/// edge node and the training loop. Dropped before [`serve`] takes them (a step failed), it
/// stops them all.
#[derive(Default)]
struct Started {
    reporter: Option<JoinHandle<()>>,
    acker: Option<JoinHandle<()>>,
    updater: Option<JoinHandle<()>>,
    sparkplug: Option<JoinHandle<()>>,
    closed_loop: Option<std::thread::JoinHandle<()>>,
    /// Tells the updater and the loop to stop.
    stop: Option<watch::Sender<bool>>,
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop {
            let _ = stop.send(true);
        }
        for task in [&self.reporter, &self.acker, &self.updater, &self.sparkplug].into_iter().flatten() {
            task.abort();
        }
        // The training loop, started last, sees `stop` within its tick (`drain` waits for it).
    }
}

/// Builds a run of `config`: the pipelines `kept` from the run before a reload take their
/// state where their settings are unchanged, the others the models `prepared` for them, or
/// load theirs now.
///
/// # Errors
/// Bad bundles, a broker that cannot be set up, a topic filter that does not parse, a metrics
/// port that cannot be bound, a store that cannot be opened. Nothing is left running then.
pub(super) async fn build(config: Config, mut kept: Kept, prepared: Prepared) -> Result<Built, ServiceError> {
    let prints = fingerprints(&config);
    let Prepared { models: mut ready_models, mut fallbacks, crashed, rolled_back } = prepared;
    let reused: Vec<Option<Serving>> = config.pipelines.iter().map(|p| kept.take(&config, p)).collect();
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
    let client_id = config.client_id();
    let broker = crate::mqtt::Broker { mqtt: &config.mqtt, host: &host, port, client_id: &client_id };
    let options = connection::mqtt_options(broker, config.status_topic())?;
    let device_key = match &config.update {
        Some(u) => Some(Arc::new(crate::trust::signing::device_key(&u.device_key).map_err(ServiceError::DeviceKey)?)),
        None => None,
    };
    let parse = |topic: &str| TopicFilter::parse(topic).map_err(ServiceError::Broker);
    let commands = parse(&format!("lathe/{}/cmd/+", config.node))?;

    // Each pipeline's state: kept, or new around the model prepared or loaded for it.
    let mut windows_of = std::mem::take(&mut kept.windows);
    let mut parts = Vec::new();
    for (p, reused) in config.pipelines.iter().zip(reused) {
        let kept = reused.is_some();
        let (model, counters, performance, source) = match reused {
            Some(kept) => (kept.model, kept.counters, kept.performance, kept.source),
            None => {
                let ready = ready_models.iter().position(|(name, _)| name == &p.name);
                let Some(active) = ready.map(|i| ready_models.swap_remove(i).1).or_else(|| loaded.next()) else {
                    return Err(ServiceError::NoModel(p.name.clone()));
                };
                let model: SharedModel = Arc::new(ArcSwap::from_pointee(active));
                let performance =
                    p.labels.as_ref().map(|l| Arc::new(Mutex::new(Performance::new(l.horizon, l.window))));
                let source = crate::ingest::router::SourceState::new(&p.source, config.sparkplug.as_ref());
                (model, Arc::new(Counters::default()), performance, source)
            }
        };
        parts.push(Parts {
            kept,
            filter: parse(&p.source.topic)?,
            labels: p.labels.as_ref().map(|l| parse(&l.topic)).transpose()?,
            windows: windows_of.remove(&p.name).unwrap_or_else(|| match p.window {
                1 => Arc::default(),
                _ => Arc::new(Mutex::new(resume_windows(&config, p))),
            }),
            shadow: Arc::default(),
            model,
            counters,
            performance,
            source,
        });
    }
    let metrics = match config.metrics_listen {
        Some(listen) => Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| ServiceError::Metrics(format!("metrics.listen {listen}: {e}")))?,
        ),
        None => None,
    };

    // From here on tasks start; `started` stops them if a later step fails.
    let mut started = Started::default();
    // The queue of publishes and acks waiting for the event loop. Past `mqtt.max_inflight`
    // (1000) more queued requests only hold memory (~430 bytes each), and pipelines wait for
    // room instead: 4096 cost the benchmark 1.4 MiB of peak RSS at the same throughput
    // (docs/performance.md).
    let (client, eventloop) = AsyncClient::new(options, 1024);
    let journal = config.state_dir.join(events::JOURNAL);
    let (events, reporter) = events::reporter(client.clone(), config.events_topic(), Some(journal));
    started.reporter = Some(tokio::spawn(reporter));
    let (acks, acker) = crate::mqtt::ack::acker(client.clone());
    started.acker = Some(tokio::spawn(acker));
    let (stop_tx, stop_rx) = watch::channel(false);
    started.stop = Some(stop_tx.clone());
    let (loop_tx, loop_rx) = std::sync::mpsc::channel();
    let models: Vec<(String, SharedModel)> =
        config.pipelines.iter().zip(&parts).map(|(p, part)| (p.name.clone(), part.model.clone())).collect();
    if let Some(settings) = &config.update {
        let (events, to_loop, stop) = (events.clone(), loop_tx.clone(), stop_rx.clone());
        let device = crate::update::device::Device {
            node: config.node.clone(),
            state_dir: config.state_dir.clone(),
            infer: config.infer.clone(),
        };
        let updater = crate::update::device::start(broker, device, settings, models.clone(), events, to_loop, stop);
        started.updater = Some(updater.map_err(ServiceError::Broker)?);
    }
    // `[sparkplug]`: the pipelines' handle now, the edge node's session once they exist.
    let sparkplug = match &config.sparkplug {
        Some(settings) => {
            let (output, rx) = crate::sparkplug::output::channel();
            let node =
                crate::sparkplug::output::start(broker, &config.state_dir, settings, sparkplug_models(&models), rx);
            started.sparkplug = Some(node.map_err(ServiceError::Broker)?);
            Some(output)
        }
        None => None,
    };

    // The closed loop: a sample store and its writer, drift alarms and commands as triggers.
    // Pushed updates go through the loop's trial too, so `[update]` runs the loop as well.
    let training = config.pipelines.iter().any(|p| p.train.is_some()) || config.update.is_some();
    let (events, store) = if training {
        let store = Arc::new(Store::open(config.store.clone())?);
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
            crate::store::writer::start(store.clone(), acks.clone(), events.clone()).map_err(ServiceError::Thread)?;
        let looped = loop_pipelines(&config, &parts, device_key, &client);
        let (config, loop_events, stop, loop_store) = (config.clone(), events.clone(), stop_rx.clone(), store.clone());
        let thread = std::thread::Builder::new()
            .name("lathe-loop".into())
            .spawn(move || closed_loop::run(config, loop_store, looped, loop_events, loop_rx, stop))
            .map_err(|e| ServiceError::Thread(format!("cannot start the training loop: {e}")))?;
        started.closed_loop = Some(thread);
        (events, Some((store, writer)))
    } else {
        (events, None)
    };
    Ok(Built {
        prints,
        kept_filters: kept.filters,
        parts,
        fallbacks,
        crashed,
        rolled_back,
        client,
        eventloop,
        events,
        acks,
        flow: Arc::new(crate::ingest::flow::Flow::default()),
        store,
        loop_tx,
        commands,
        metrics,
        sparkplug,
        stop: (stop_tx, stop_rx),
        started,
        config,
    })
}

/// The training loop's view of each pipeline that trains (or takes pushed updates).
fn loop_pipelines(
    config: &Config,
    parts: &[Parts],
    device_key: Option<Arc<ed25519_dalek::SigningKey>>,
    client: &AsyncClient,
) -> Vec<closed_loop::LoopPipeline> {
    let serve_only = || config.update.as_ref().and_then(|_| TrainConfig::serve_only());
    config
        .pipelines
        .iter()
        .zip(parts)
        .filter_map(|(p, part)| {
            let train = p.train.clone().or_else(serve_only)?;
            Some(closed_loop::LoopPipeline {
                config: p.clone(),
                share: train.share.then(|| (client.clone(), format!("lathe/{}/share/{}", config.node, p.name))),
                train,
                model: part.model.clone(),
                shadow: part.shadow.clone(),
                counters: part.counters.clone(),
                performance: part.performance.clone(),
                device_key: device_key.clone(),
            })
        })
        .collect()
}

/// A run serving: what [`drain`] stops.
pub(super) struct Serve {
    config: Config,
    prints: Vec<String>,
    filters: Vec<String>,
    serving: Arc<Vec<Serving>>,
    client: AsyncClient,
    acks: crate::mqtt::ack::AckSender,
    writer: Option<Writer>,
    pipelines: Vec<JoinHandle<()>>,
    ingest: JoinHandle<()>,
    status: JoinHandle<()>,
    swapper: JoinHandle<()>,
    started: Started,
    stop: watch::Sender<bool>,
    disconnect: watch::Sender<bool>,
}

/// Starts serving what `built` holds: a task per pipeline, ingest, the model swapper, the
/// metrics endpoint and the status. Cannot fail.
pub(super) fn serve(built: Built, on_start: impl FnOnce(Handle)) -> Serve {
    let Built {
        config,
        prints,
        kept_filters,
        parts,
        fallbacks,
        crashed,
        rolled_back,
        client,
        eventloop,
        events,
        acks,
        flow,
        store,
        loop_tx,
        commands,
        metrics,
        sparkplug,
        stop: (stop_tx, stop_rx),
        started,
    } = built;
    if let Some(error) = rolled_back {
        events.emit(events::Event::ReloadRolledBack { error });
    }
    for (pipeline, champion, error) in fallbacks {
        let serving = config.pipelines.iter().zip(&parts).find(|(p, _)| p.name == pipeline);
        let version = serving.map_or(0, |(_, part)| part.model.load().version);
        events.emit(events::Event::FellBack { pipeline, champion, version, error });
    }
    let (disconnect_tx, disconnect_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);
    let (mut routes, mut pipelines, mut serving) = (Vec::new(), Vec::new(), Vec::new());
    for (p, part) in config.pipelines.iter().zip(parts) {
        let m = part.model.load();
        let how = if part.kept { "Serving (unchanged: kept its model and state)" } else { "Serving" };
        tracing::info!(pipeline = p.name, model = m.name, version = m.version, "{how}");
        for c in crashed.iter().filter(|c| c.model == m.name) {
            events.emit(events::Event::Step {
                pipeline: p.name.clone(),
                step: "trial.failed",
                message: c.message(),
                detail: serde_json::json!({"name": c.model, "version": c.version, "to": c.to,
                    "unclean_starts": c.starts, "why": "it crashed the daemon during its trial"}),
            });
        }
        let trains = p.train.is_some();
        let writer = store.as_ref().filter(|_| trains).map(|(_, w)| w.for_pipeline(&p.name, part.counters.clone()));
        let labels = match (&p.labels, part.labels, &part.performance) {
            (Some(l), Some(filter), Some(perf)) => Some(crate::ingest::labels::LabelRoute {
                filter,
                key: l.key.clone(),
                value: l.value.clone(),
                performance: perf.clone(),
                store: writer.clone(),
                classes: m.engine.signature.classes.clone(),
            }),
            _ => None,
        };
        // Rows wait here rather than in ingest's overflow queue: the channel stores them in
        // small blocks, without a VecDeque's doubling. See ingest::connection on what bounds it.
        let (tx, rx) = mpsc::channel(1 << 16);
        routes.push(Route {
            pipeline: p.name.clone(),
            devices: Default::default(),
            filter: part.filter,
            model: part.model.clone(),
            tx: Some(tx),
            counters: part.counters.clone(),
            labels,
            source: part.source.clone(),
        });
        let pipeline = Pipeline {
            name: p.name.clone(),
            model: part.model.clone(),
            sink: p.sink.topic.clone(),
            batch: p.batch,
            client: client.clone(),
            counters: part.counters.clone(),
            events: events.clone(),
            acks: acks.clone(),
            flow: flow.clone(),
            performance: part.performance.clone(),
            store: writer,
            shadow: part.shadow,
            sparkplug: sparkplug.clone(),
            windows: part.windows.clone(),
            capture: p.capture.clone().map(|c| {
                let topic = format!("lathe/{}/capture/{}", config.node, p.name);
                (Mutex::new(crate::infer::capture::Capture::new(c)), topic)
            }),
        };
        pipelines.push(tokio::spawn(pipeline.run(rx)));
        let store = store.as_ref().filter(|_| trains).map(|(s, _)| s.clone());
        serving.push(Serving {
            pipeline: p.name.clone(),
            model: part.model,
            counters: part.counters,
            performance: part.performance,
            store,
            source: part.source,
            windows: part.windows,
        });
    }
    let serving = Arc::new(serving);
    let swapper = tokio::spawn(swap::watch(config.clone(), serving.clone(), events.clone(), stop_rx.clone()));
    if let (Some(listener), Some(listen)) = (metrics, config.metrics_listen) {
        tracing::info!("Metrics on http://{listen}/metrics");
        tokio::spawn(metrics::serve(listener, serving.clone(), ready_rx.clone(), stop_rx.clone()));
    }
    let status_now = Arc::new(tokio::sync::Notify::new());
    let training = store.is_some();
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
        commands: crate::ingest::CommandRoute {
            filter: commands,
            to_loop: training.then_some(loop_tx),
            status_now: status_now.clone(),
        },
        unsubscribe: Vec::new(),
        login: crate::mqtt::LoginFiles::new(&config.mqtt),
    };
    let filters = ingest.filters();
    let ingest = Ingest { unsubscribe: kept_filters.into_iter().filter(|f| !filters.contains(f)).collect(), ..ingest };
    let ingest = tokio::spawn(ingest.run());
    on_start(Handle {
        ready: ready_rx.clone(),
        counters: serving.iter().map(|s| (s.pipeline.clone(), s.counters.clone())).collect(),
    });
    let status = tokio::spawn(status_task(
        (client.clone(), config.clone(), serving.clone(), events),
        status_now,
        stop_rx,
        ready_rx,
    ));
    Serve {
        config,
        prints,
        filters,
        serving,
        client,
        acks,
        writer: store.map(|(_, w)| w),
        pipelines,
        ingest,
        status,
        swapper,
        started,
        stop: stop_tx,
        disconnect: disconnect_tx,
    }
}

/// "online" goes out once subscribed (so it means "messages sent now are served"), again
/// after every reconnect (a restarted broker may have lost it), every STATUS_EVERY with
/// fresh counters, and at once on `cmd/status`.
async fn status_task(
    (client, config, serving, events): (AsyncClient, Config, Arc<Vec<Serving>>, events::Events),
    status_now: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
    mut ready: watch::Receiver<bool>,
) {
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
}

/// Stops a run: ingest takes no new messages, each pipeline drains what it holds and
/// publishes, the store commits and acks, the final status goes out (not for a reload: the
/// next run follows at once) and the client disconnects. Returns what the pipelines keep.
pub(super) async fn drain(run: Serve, reloading: bool) -> Kept {
    let Serve {
        config,
        prints,
        filters,
        serving,
        client,
        acks,
        writer,
        pipelines,
        ingest,
        status: status_task,
        swapper,
        mut started,
        stop,
        disconnect,
    } = run;
    if reloading {
        // STOPPING=1 would make systemd treat the service as stopping, and kill it after
        // TimeoutStopSec; the next run's READY=1 ends the reload.
        tracing::info!("Reloading: draining in-flight messages");
        systemd::reloading();
    } else {
        tracing::info!("Stopping: draining in-flight messages");
        systemd::stopping();
    }
    let _ = stop.send(true);
    let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
        for t in pipelines {
            let _ = t.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("Pipelines did not drain in {DRAIN_DEADLINE:?}; unanswered messages stay unacknowledged and will be redelivered");
    }
    // The pipelines are done: the Sparkplug edge node sends what is left and its NDEATH.
    if let Some(t) = started.sparkplug.take() {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
    let _ = status_task.await;
    let _ = swapper.await;
    if let Some(u) = started.updater.take() {
        let _ = tokio::time::timeout(Duration::from_secs(3), u).await;
    }
    if let Some(l) = started.closed_loop.take() {
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
    let _ = disconnect.send(true);
    if tokio::time::timeout(Duration::from_secs(5), ingest).await.is_err() {
        tracing::warn!("The broker did not confirm the disconnect in time");
    }
    // Dropping `started` aborts the events reporter and the ack releaser.
    drop(started);
    tracing::info!("Stopped");
    Kept::from_serving(&config, prints, &serving, filters)
}
