//! Service: wires the stages together and runs them until told to stop.
//!
//! Start: load every pipeline's champion bundle, connect, start one inference task per
//! pipeline and the ingest loop. Stop (SIGTERM/SIGINT): ingest stops taking messages, each
//! pipeline drains what it holds and publishes, then the final status goes out and the client
//! disconnects cleanly. Nothing accepted is lost: what was not answered was not acked either.

pub(crate) mod closed_loop;
mod code_pages;
pub mod crash_guard;
pub mod metrics;
mod swap;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::config::{BrokerUrl, Config, ConfigError, ConfigErrors, ModelRef, TrainConfig};
use arc_swap::ArcSwap;

use crate::infer::{ActiveModel, Pipeline, SharedModel};
use crate::ingest::{connection, Ingest, Route, TopicFilter};
use crate::model::registry::RegistryError;
use crate::model::{Bundle, Registry};
use crate::telemetry::events::Counters;
use crate::telemetry::{events, systemd, unix_ms};

pub use crate::telemetry::STATUS_EVERY;
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

/// Checks each pipeline's champion bundle loads and fits the pipeline, without changing
/// anything (`lathe check`, a SIGHUP's new config): every problem is reported at once, like
/// config errors. Bundle files are only read, not imported, and no drift monitor is
/// calibrated (seconds of CPU for a model that is only looked at).
///
/// # Errors
/// Missing or invalid bundles, models tract cannot serve, feature names the bundle lacks.
pub fn check_models(config: &Config) -> Result<Vec<ActiveModel>, ConfigErrors> {
    let mut config = config.clone();
    config.pipelines.iter_mut().for_each(|p| p.drift = None);
    load_models_noting(&config, false, &mut Vec::new())
}

/// Loads each pipeline's champion (with `seed`, bundle files are imported into the registry
/// first), noting in `fallbacks` each pipeline whose champion could not serve and
/// the version that serves instead (never "no model" while any version loads).
fn load_models_noting(
    config: &Config,
    seed: bool,
    fallbacks: &mut Vec<(String, String, String)>,
) -> Result<Vec<ActiveModel>, ConfigErrors> {
    let registry = Registry::new(&config.state_dir).with_engine(config.infer.engine.clone());
    let mut errors = Vec::new();
    let mut loaded = Vec::new();
    for (i, p) in config.pipelines.iter().enumerate() {
        let key = format!("pipeline[{i}].model");
        let bundle = match &p.model {
            ModelRef::File(f) if seed => registry.seed(f),
            ModelRef::File(f) => Bundle::read(f).map_err(|source| RegistryError::Bundle { path: f.clone(), source }),
            ModelRef::Name(n) => registry.champion(n),
            ModelRef::ColdStart(c) => crate::train::cold_start::serving(&registry, &p.name, c),
        };
        let bundle = match bundle {
            Ok(b) => b,
            Err(e) => {
                // A champion that is missing or corrupt: serve the last good version instead.
                let name = match &p.model {
                    ModelRef::Name(n) => Some(n.clone()),
                    ModelRef::ColdStart(_) => Some(p.name.clone()),
                    ModelRef::File(f) => Bundle::read(f).ok().map(|b| b.manifest.name),
                };
                match name.filter(|_| seed).and_then(|n| fall_back(&registry, p, &n, config).map(|m| (n, m))) {
                    Some((name, model)) => {
                        fallbacks.push((p.name.clone(), format!("{name} (champion)"), e.to_string()));
                        loaded.push(model);
                    }
                    None => errors.push(ConfigError { key, message: e.to_string() }),
                }
                continue;
            }
        };
        for name in p.features.keys() {
            if !bundle.manifest.inputs.iter().any(|inp| &inp.name == name) {
                let names: Vec<&str> = bundle.manifest.inputs.iter().map(|i| i.name.as_str()).collect();
                errors.push(ConfigError {
                    key: format!("pipeline[{i}].features.{name}"),
                    message: format!(
                        "bundle {} has no input {name:?} (inputs: {})",
                        bundle.manifest.name,
                        names.join(", ")
                    ),
                });
            }
        }
        if let Some(t) = &p.train {
            if bundle.manifest.task != crate::model::Task::Reconstruction && p.labels.is_none() {
                errors.push(ConfigError {
                    key: format!("pipeline[{i}].train"),
                    message: format!(
                        "bundle {} is a {:?} model: fine-tuning it needs labels (pipeline.labels)",
                        bundle.manifest.name, bundle.manifest.task
                    ),
                });
            }
            let mut training = bundle.manifest.training.clone();
            t.overrides.apply(&mut training);
            if let Err(e) = crate::train::classes(&bundle, &training) {
                errors.push(ConfigError {
                    key: format!("pipeline[{i}].train"),
                    message: format!("bundle {} cannot be fine-tuned: {e}", bundle.manifest.name),
                });
            }
        }
        match ActiveModel::load(&bundle, p, config) {
            Ok(model) => loaded.push(model),
            Err(message) => match seed.then(|| fall_back(&registry, p, &bundle.manifest.name, config)).flatten() {
                Some(model) => {
                    fallbacks.push((
                        p.name.clone(),
                        format!("{} v{}", bundle.manifest.name, bundle.manifest.version),
                        message,
                    ));
                    loaded.push(model);
                }
                None => errors.push(ConfigError { key, message }),
            },
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors { file: config.file.clone(), errors })
    }
}

/// The first earlier version that loads becomes champion again (the registry is repointed,
/// so `lathe models list` says what serves).
fn fall_back(
    registry: &Registry,
    p: &crate::config::PipelineConfig,
    name: &str,
    config: &Config,
) -> Option<ActiveModel> {
    for version in registry.fallbacks(name).ok()? {
        let Ok(bundle) = Bundle::read(&registry.bundle_path(name, version)) else { continue };
        if let Ok(model) = ActiveModel::load(&bundle, p, config) {
            registry.set_champion(name, version).ok()?;
            return Some(model);
        }
    }
    None
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

/// What the pipelines whose settings did not change keep across a SIGHUP reload: the model
/// (so the drift monitor keeps its calibration and windows, and a fine-tuned champion stays
/// loaded), the counters, the late-label state, the Sparkplug namespace and the devices' last
/// values. Only the
/// connection and the tasks are made again. By pipeline name: (fingerprint, what it keeps).
#[derive(Default)]
pub struct Kept {
    pipelines: std::collections::HashMap<String, (String, Serving)>,
    /// The topic filters the last run subscribed to (the broker keeps them in our session).
    filters: Vec<String>,
    /// Every pipeline's windows by name, changed settings or not: a device's frames are its
    /// frames whatever model comes next (one of another width starts its window afresh).
    windows: std::collections::HashMap<String, crate::infer::window::SharedWindows>,
}

impl Kept {
    /// `prints`: each pipeline's fingerprint when its run started (its bundle file may have
    /// changed since).
    fn from_serving(config: &Config, prints: Vec<String>, serving: &[Serving], filters: Vec<String>) -> Kept {
        let mut kept = std::collections::HashMap::new();
        let mut windows = std::collections::HashMap::new();
        for ((p, print), s) in config.pipelines.iter().zip(prints).zip(serving) {
            windows.insert(p.name.clone(), s.windows.clone());
            let s = Serving {
                pipeline: s.pipeline.clone(),
                model: s.model.clone(),
                counters: s.counters.clone(),
                performance: s.performance.clone(),
                store: None,
                source: s.source.clone(),
                windows: s.windows.clone(),
            };
            kept.insert(p.name.clone(), (print, s));
        }
        Kept { pipelines: kept, filters, windows }
    }

    /// What pipeline `p` of `config` keeps: only if nothing it is built from changed.
    fn take(&mut self, config: &Config, p: &crate::config::PipelineConfig) -> Option<Serving> {
        let (print, serving) = self.pipelines.remove(&p.name)?;
        (print == fingerprint(config, p)).then_some(serving)
    }
}

/// A clean stop saves each sequence pipeline's windows (the pipelines have drained: their
/// windows hold every frame they served).
fn save_windows(config: &Config, serving: &[Serving]) {
    for (p, s) in config.pipelines.iter().zip(serving) {
        if p.window == 1 || p.resume_within.is_zero() {
            continue;
        }
        let windows = s.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = windows_path(config, &p.name);
        match windows.save(&path, unix_ms()) {
            Ok(()) => tracing::info!(pipeline = p.name, devices = windows.devices(), "Saved the windows"),
            Err(e) => tracing::warn!(pipeline = p.name, "The windows were not saved in {}: {e}", path.display()),
        }
    }
}

/// Where a clean stop saves a sequence pipeline's windows. A pipeline name is free text; one
/// that could not be a file name (`line/1`, `..`) is written as hex.
fn windows_path(config: &Config, pipeline: &str) -> PathBuf {
    let file = match crate::model::bundle::valid_name(pipeline) {
        true => pipeline.to_string(),
        false => pipeline.bytes().map(|b| format!("{b:02x}")).collect(),
    };
    config.state_dir.join("windows").join(format!("{file}.bin"))
}

/// A sequence pipeline's windows at a start: those a clean stop saved, if within
/// `window.resume_within`. The file is read once and removed, so a later crash cannot bring
/// back frames older than the ones served since.
fn resume_windows(config: &Config, p: &crate::config::PipelineConfig) -> crate::infer::window::Windows {
    use crate::infer::window::Windows;
    let path = windows_path(config, &p.name);
    let Ok(bytes) = std::fs::read(&path) else { return Windows::default() };
    let _ = std::fs::remove_file(&path);
    let max_age_ms = u64::try_from(p.resume_within.as_millis()).unwrap_or(u64::MAX);
    match Windows::read(&bytes, unix_ms(), max_age_ms) {
        Ok(Some((windows, age_ms))) => {
            let (devices, age_s) = (windows.devices(), age_ms as f64 / 1000.0);
            tracing::info!(pipeline = p.name, devices, "Resumed the windows saved {age_s:.0} s ago");
            windows
        }
        Ok(None) => {
            let within = p.resume_within.as_secs();
            tracing::info!(
                pipeline = p.name,
                "The saved windows are older than window.resume_within ({within} s): every device fills its window again"
            );
            Windows::default()
        }
        Err(e) => {
            tracing::warn!(pipeline = p.name, "The saved windows in {} are not used: {e}", path.display());
            Windows::default()
        }
    }
}

/// Everything a pipeline's serving state is built from: its own settings, the engine, the
/// payload cap, the registry's place, and the bundle file itself when it names one (a new
/// bundle copied over the old path is a change).
fn fingerprint(config: &Config, p: &crate::config::PipelineConfig) -> String {
    let file = match &p.model {
        ModelRef::File(f) => std::fs::metadata(f).ok().map(|m| (m.len(), m.modified().ok())),
        ModelRef::Name(_) | ModelRef::ColdStart(_) => None,
    };
    format!("{p:?} {:?} {} {:?} {file:?}", config.infer, config.mqtt.max_payload_bytes, config.state_dir)
}

/// Each pipeline's [`fingerprint`], in config order.
pub fn fingerprints(config: &Config) -> Vec<String> {
    config.pipelines.iter().map(|p| fingerprint(config, p)).collect()
}

/// What a SIGHUP compares the config file with: the running config, and its pipelines'
/// fingerprints from when the run started (so a bundle replaced at the same path since then
/// is a change, though the config's text is the same).
#[derive(Clone)]
pub struct Running {
    pub path: PathBuf,
    pub config: Config,
    pub prints: Vec<String>,
}

/// A new config's models for the pipelines a reload changes or adds, loaded (and imported
/// into the registry) while the running pipelines still serve: the reload then pauses them
/// only for the reconnect, not for loading.
#[derive(Default)]
pub struct Prepared {
    /// (pipeline name, its model).
    models: Vec<(String, ActiveModel)>,
    /// Pipelines whose champion could not serve: (pipeline, champion, error).
    fallbacks: Vec<(String, String, String)>,
    /// Versions on trial rolled back at this start for crashing the daemon (`crash_guard`).
    crashed: Vec<crash_guard::Crashed>,
}

impl Prepared {
    /// A first start's: nothing loaded yet, and what `crash_guard::at_start` rolled back.
    pub fn at_start(crashed: Vec<crash_guard::Crashed>) -> Prepared {
        Prepared { crashed, ..Prepared::default() }
    }
}

/// Loads what `new` needs beyond the pipelines of `running` it keeps unchanged. (Only a
/// head start: [`run_keeping`] decides what is kept, and loads what was not prepared.)
///
/// # Errors
/// A model that does not load (the config was checked first, so this is rare: a bundle
/// changed in between).
pub fn prepare(new: &Config, running: &Running) -> Result<Prepared, ConfigErrors> {
    let unchanged = |p: &crate::config::PipelineConfig| {
        let mut was = running.config.pipelines.iter().zip(&running.prints);
        was.any(|(r, print)| r.name == p.name && *print == fingerprint(new, p))
    };
    let mut to_load = new.clone();
    to_load.pipelines.retain(|p| !unchanged(p));
    let mut fallbacks = Vec::new();
    let models = load_models_noting(&to_load, true, &mut fallbacks)?;
    let models = to_load.pipelines.iter().map(|p| p.name.clone()).zip(models).collect();
    Ok(Prepared { models, fallbacks, crashed: Vec::new() })
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

fn status(config: &Config, state: &str, serving: &[Serving]) -> Value {
    let pipelines: Vec<Value> = serving
        .iter()
        .map(|s| {
            let m = s.model.load();
            let performance = s.performance.as_ref().and_then(|p| p.lock().ok()).map(|p| {
                let (predictions_waiting, labels_waiting) = p.waiting();
                json!({"alarm": p.in_alarm(), "labels_joined": p.joined(), "labels_unmatched": p.unmatched,
                       "predictions_waiting": predictions_waiting, "labels_waiting": labels_waiting,
                       "rolling_loss": p.rolling_loss(), "baseline_loss": m.baseline_loss,
                       "label_shift_psi": p.label_shift(), "label_shift_alarm": p.shift_in_alarm()})
            });
            let monitor = m.monitor.as_ref().and_then(|d| d.get()).and_then(|d| d.lock().ok());
            let drift = match monitor.map(|d| (d.state(), json!({"rows": d.reference_rows(), "source": d.source}))) {
                Some((series, reference)) => {
                    let mut alarms: Vec<&str> = series.iter().filter(|s| s.alarm).map(|s| s.series.as_str()).collect();
                    if performance.as_ref().is_some_and(|p| p["alarm"] == true) {
                        alarms.push("performance");
                    }
                    if performance.as_ref().is_some_and(|p| p["label_shift_alarm"] == true) {
                        alarms.push("labels");
                    }
                    json!({"alarms": alarms, "series": series, "reference": reference, "performance": performance})
                }
                None => json!({"performance": performance}),
            };
            let store = s.store.as_ref().and_then(|st| st.stats(&s.pipeline).ok());
            let sparkplug = s.source.sparkplug.as_ref().and_then(|sp| sp.lock().ok().map(|sp| sp.status()));
            let devices = s.source.activity.as_ref().and_then(|a| a.lock().ok().map(|a| a.status(50)));
            // The training backend this pipeline's runs use (none: it does not train).
            let backend = config
                .pipelines
                .iter()
                .find(|p| p.name == s.pipeline)
                .and_then(|p| p.train.as_ref())
                .map(|t| crate::train::resolved_backend(&t.backend));
            json!({
                "name": s.pipeline, "model": m.name, "version": m.version, "sha256": m.sha256,
                "origin": m.origin, "engine": config.infer.engine.name(), "backend": backend, "drift": drift, "counters": s.counters.snapshot(),
                "store": store, "sparkplug": sparkplug, "devices": devices,
            })
        })
        .collect();
    json!({
        "state": state, "node": config.node, "daemon_version": env!("CARGO_PKG_VERSION"),
        "ts": unix_ms(), "pipelines": pipelines,
        "groups": config.update.as_ref().map(|u| u.groups.clone()).unwrap_or_default(),
    })
}

/// `device.silent` for each device that has now gone quiet for its source's `silent_after_s`
/// (once; `device.back` comes from ingest when it speaks again).
fn report_silent_devices(serving: &[Serving], events: &events::Events) {
    let now = std::time::Instant::now();
    for s in serving {
        let Some(activity) = &s.source.activity else { continue };
        let silent = activity.lock().map(|mut a| a.newly_silent(now)).unwrap_or_default();
        for (device, quiet) in silent {
            events.emit(events::Event::Step {
                pipeline: s.pipeline.clone(),
                step: "device.silent",
                message: format!("Device {device} has not been heard for {} s", quiet.as_secs()),
                detail: json!({"device": device, "silent_s": quiet.as_secs()}),
            });
        }
    }
}

/// Unmaps the code pages that loading models (or training) ran once; see `code_pages`.
pub(crate) fn release_code_pages(after: &str) {
    let released = code_pages::release();
    tracing::debug!(after, released_kib = released / 1024, "Released resident code pages");
}

/// One line for `systemctl status`: what each pipeline serves and how that goes, e.g.
/// `Serving pump: pump-anomaly v3 (5120 rows in, 5001 predicted, 119 rejected, most
/// missing_feature; drift alarm on temp)`.
fn status_line(serving: &[Serving]) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let parts: Vec<String> = serving
        .iter()
        .map(|s| {
            let m = s.model.load();
            let c = &s.counters;
            let mut line = format!(
                "{}: {} v{} ({} rows in, {} predicted",
                s.pipeline,
                m.name,
                m.version,
                c.received.load(Relaxed),
                c.predicted.load(Relaxed)
            );
            let rejected: Vec<u64> = c.rejected.iter().map(|n| n.load(Relaxed)).collect();
            let most = rejected.iter().zip(crate::ingest::Reject::REASONS).max_by_key(|(n, _)| **n);
            if let Some((_, reason)) = most.filter(|(n, _)| **n > 0) {
                line += &format!(", {} rejected, most {reason}", rejected.iter().sum::<u64>());
            }
            line.push(')');
            let monitor = m.monitor.as_ref().and_then(|d| d.get()).and_then(|d| d.lock().ok());
            let alarms: Vec<String> = monitor
                .map(|d| d.state())
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s.alarm)
                .map(|s| s.series)
                .collect();
            if !alarms.is_empty() {
                line += &format!("; drift alarm on {}", alarms.join(", "));
            }
            let activity = s.source.activity.as_ref().and_then(|a| a.lock().ok().map(|a| a.counts()));
            if let Some((heard, silent)) = activity.filter(|(_, silent)| *silent > 0) {
                line += &format!("; {silent} of {heard} devices silent");
            }
            line
        })
        .collect();
    format!("Serving {}", parts.join("; "))
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
        let to_loop = loop_tx.clone();
        let events = events.with_triggers(Arc::new(move |t: events::DriftTrigger| {
            let _ = to_loop.send(closed_loop::LoopMessage::Drift(t));
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
