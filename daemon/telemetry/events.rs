//! Events are types: emitting one counts it, logs it and reports it on `lathe/{node}/events`
//! in one place, so logs, counters and the events topic never disagree.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Why input is rejected, in the order counters are kept (`ingest::Reject` names each).
pub const REJECT_REASONS: [&str; 11] = [
    "payload_too_large",
    "not_json",
    "missing_feature",
    "non_numeric",
    "non_finite",
    "out_of_range",
    "bad_sparkplug",
    "sparkplug_stale",
    "empty_batch",
    "bad_kepware",
    "bad_quality",
];

/// Per-pipeline counters, shared by ingest, infer and the status report.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub predicted: AtomicU64,
    pub rejected: [AtomicU64; REJECT_REASONS.len()],
    /// Rows whose inference failed (a model error, never bad input).
    pub failed: AtomicU64,
    /// Message received → prediction handed to the client, in µs.
    pub latency: Histogram<{ LATENCY_BUCKETS_US.len() }>,
    /// Rows per inference call.
    pub batch: Histogram<{ BATCH_BUCKETS.len() }>,
    /// The engine's own time per row of each batch, µs (no queueing): the model's speed, which
    /// a trial compares before and after a promotion.
    pub compute: Histogram<{ COMPUTE_BUCKETS_US.len() }>,
    /// Samples committed to the store, failed to commit (disk full), dropped because its
    /// queue was full, and evicted by its bounds; labels joined to stored samples.
    pub stored: AtomicU64,
    pub store_failed: AtomicU64,
    pub store_dropped: AtomicU64,
    pub store_evicted: AtomicU64,
    pub labels_stored: AtomicU64,
    /// Served outputs that were not finite, or saturated (a probability within 1e-6 of 0 or
    /// 1): output health for a model on trial.
    pub outputs_nonfinite: AtomicU64,
    pub outputs_saturated: AtomicU64,
    /// Sequence models: rows that only filled their device's window (its first N − 1).
    pub window_filling: AtomicU64,
    /// `[pipeline.capture]`: hard examples published for labelling.
    pub captured: AtomicU64,
}

/// Upper bounds of the latency histogram's buckets, µs.
pub const LATENCY_BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];
/// Upper bounds of the per-row compute histogram's buckets, µs.
pub const COMPUTE_BUCKETS_US: [u64; 12] = [5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000];
/// Upper bounds of the batch-size histogram's buckets, rows.
pub const BATCH_BUCKETS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// A fixed-bucket histogram of atomics (Prometheus's cumulative form is made when rendering).
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    /// Per bucket (not cumulative); the last slot counts values above every bound.
    pub buckets: [AtomicU64; N],
    pub over: AtomicU64,
    pub sum: AtomicU64,
    pub count: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            over: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    pub fn observe(&self, bounds: &[u64; N], value: u64) {
        match bounds.iter().position(|&b| value <= b) {
            Some(i) => self.buckets[i].fetch_add(1, Relaxed),
            None => self.over.fetch_add(1, Relaxed),
        };
        self.sum.fetch_add(value, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }
}

impl Counters {
    pub fn snapshot(&self) -> Value {
        let rejected: serde_json::Map<String, Value> =
            REJECT_REASONS.iter().zip(&self.rejected).map(|(r, c)| (r.to_string(), c.load(Relaxed).into())).collect();
        json!({
            "received": self.received.load(Relaxed),
            "predicted": self.predicted.load(Relaxed),
            "rejected": self.rejected.iter().map(|c| c.load(Relaxed)).sum::<u64>(),
            "rejected_by_reason": rejected,
            "failed": self.failed.load(Relaxed),
            "stored": self.stored.load(Relaxed),
            "store_failed": self.store_failed.load(Relaxed),
            "store_dropped": self.store_dropped.load(Relaxed),
            "store_evicted": self.store_evicted.load(Relaxed),
            "labels_stored": self.labels_stored.load(Relaxed),
            "outputs_nonfinite": self.outputs_nonfinite.load(Relaxed),
            "outputs_saturated": self.outputs_saturated.load(Relaxed),
            "window_filling": self.window_filling.load(Relaxed),
            "captured": self.captured.load(Relaxed),
        })
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    InputRejected {
        pipeline: String,
        device: String,
        topic: String,
        reason: &'static str,
        detail: String,
    },
    InferenceFailed {
        pipeline: String,
        rows: usize,
        error: String,
    },
    Connected {
        attempts: u32,
        /// The MQTT version spoken: `"5"` or `"3.1.1"`.
        protocol: &'static str,
    },
    /// A pipeline now serves another version (`promoted` when newer, `rolled_back` when older).
    Swapped {
        pipeline: String,
        model: String,
        from: u64,
        to: u64,
    },
    /// At start the champion could not serve; `version` (an earlier one) serves instead.
    FellBack {
        pipeline: String,
        champion: String,
        version: u64,
        error: String,
    },
    /// The registry named a version that could not be loaded; the current one keeps serving.
    SwapRefused {
        pipeline: String,
        model: String,
        version: u64,
        error: String,
    },
    /// A drift alarm raised (`drift`) or its episode ended (`drift.cleared`).
    Drift {
        pipeline: String,
        model: String,
        version: u64,
        alarm: crate::monitor::Alarm,
    },
    /// A batch of samples could not be written to the store (a full disk); inference goes on.
    StoreFailed {
        pipeline: String,
        rows: u64,
        error: String,
    },
    /// The store writes again after failing.
    StoreRecovered {
        path: String,
    },
    /// A reload's new config could not start (a port in use, an unreadable file): the daemon
    /// went back to the config it ran before, which serves again.
    ReloadRolledBack {
        error: String,
    },
    /// A step of the training loop (`train.started`, `train.refused`, `train.accepted`,
    /// `shadow.*`, `trial.*`, …; `detail` carries the run record and the step's numbers) or of
    /// a Sparkplug source or output (`sparkplug.rebirth_requested`, …).
    Step {
        pipeline: String,
        step: &'static str,
        message: String,
        detail: Value,
    },
}

/// Every event emitted so far, by (pipeline, event name): the metrics page's outcome counters
/// (training runs, swaps, updates). Counted when emitted, so the events' rate limit does
/// not hide any from a scraper.
static OUTCOMES: std::sync::Mutex<std::collections::BTreeMap<(String, &'static str), u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// A copy of the counts of [`OUTCOMES`].
pub fn outcomes() -> Vec<((String, &'static str), u64)> {
    OUTCOMES.lock().map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect()).unwrap_or_default()
}

impl Event {
    /// The pipeline the event is about (empty for the daemon's own).
    fn pipeline(&self) -> &str {
        match self {
            Event::InputRejected { pipeline, .. }
            | Event::InferenceFailed { pipeline, .. }
            | Event::Swapped { pipeline, .. }
            | Event::SwapRefused { pipeline, .. }
            | Event::FellBack { pipeline, .. }
            | Event::Drift { pipeline, .. }
            | Event::StoreFailed { pipeline, .. }
            | Event::Step { pipeline, .. } => pipeline,
            Event::Connected { .. } | Event::StoreRecovered { .. } | Event::ReloadRolledBack { .. } => "",
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Event::InputRejected { .. } => "input.rejected",
            Event::InferenceFailed { .. } => "inference.failed",
            Event::Connected { .. } => "broker.connected",
            Event::Swapped { from, to, .. } if to > from => "promoted",
            Event::Swapped { .. } => "rolled_back",
            Event::SwapRefused { .. } => "model.refused",
            Event::FellBack { .. } => "model.fallback",
            Event::Drift { alarm, .. } if alarm.raised => "drift",
            Event::Drift { .. } => "drift.cleared",
            Event::StoreFailed { .. } => "store.failed",
            Event::StoreRecovered { .. } => "store.recovered",
            Event::ReloadRolledBack { .. } => "reload.rolled_back",
            Event::Step { step, .. } => step,
        }
    }

    fn payload(&self, suppressed: u64) -> Value {
        let mut v = match self {
            Event::InputRejected { pipeline, device, topic, reason, detail } => {
                json!({"pipeline": pipeline, "device": device, "topic": topic, "reason": reason, "detail": detail})
            }
            Event::InferenceFailed { pipeline, rows, error } => {
                json!({"pipeline": pipeline, "rows": rows, "error": error})
            }
            Event::Connected { attempts, protocol } => json!({"attempts": attempts, "protocol": protocol}),
            Event::Swapped { pipeline, model, from, to } => {
                json!({"pipeline": pipeline, "model": model, "from": from, "to": to})
            }
            Event::SwapRefused { pipeline, model, version, error } => {
                json!({"pipeline": pipeline, "model": model, "version": version, "error": error})
            }
            Event::FellBack { pipeline, champion, version, error } => {
                json!({"pipeline": pipeline, "champion": champion, "version": version, "error": error})
            }
            Event::Drift { pipeline, model, version, alarm } => {
                let mut v = serde_json::to_value(alarm).unwrap_or(Value::Null);
                v["pipeline"] = pipeline.as_str().into();
                v["model"] = model.as_str().into();
                v["version"] = (*version).into();
                v
            }
            Event::StoreFailed { pipeline, rows, error } => {
                json!({"pipeline": pipeline, "rows": rows, "error": error})
            }
            Event::StoreRecovered { path } => json!({"path": path}),
            Event::ReloadRolledBack { error } => json!({"error": error}),
            Event::Step { pipeline, message, detail, .. } => {
                let mut v = detail.clone();
                if !v.is_object() {
                    v = json!({});
                }
                v["pipeline"] = pipeline.as_str().into();
                v["message"] = message.as_str().into();
                v
            }
        };
        v["event"] = self.name().into();
        v["ts"] = crate::telemetry::unix_ms().into();
        if suppressed > 0 {
            v["suppressed"] = suppressed.into();
        }
        v
    }

    /// One log line per event. Its fields (pipeline, device, model_version, event, …) become
    /// journald fields under systemd (`cli::init_logging`).
    fn log(&self, suppressed: u64) {
        let event = self.name();
        match self {
            Event::InputRejected { pipeline, device, topic, detail, reason } => {
                tracing::warn!(event, pipeline, device, topic, reason, suppressed, "Rejected a message: {detail}")
            }
            Event::InferenceFailed { pipeline, rows, error } => {
                tracing::error!(event, pipeline, rows, "Inference failed: {error}")
            }
            Event::Connected { attempts, protocol } => {
                tracing::info!(event, attempts, protocol, "Connected to the broker")
            }
            Event::Swapped { pipeline, model, from, to } => tracing::info!(
                event,
                pipeline,
                model,
                model_version = to,
                from,
                "Now serving {model} v{to} (was v{from})"
            ),
            Event::SwapRefused { pipeline, model, version, error } => tracing::error!(
                event,
                pipeline,
                model,
                model_version = version,
                "Refused to serve {model} v{version}: {error}"
            ),
            Event::FellBack { pipeline, champion, version, error } => tracing::error!(
                event,
                pipeline,
                model_version = version,
                "Champion {champion} cannot serve ({error}); serving v{version} instead"
            ),
            Event::Drift { pipeline, model, version, alarm } if alarm.raised => tracing::warn!(
                event,
                pipeline,
                model,
                model_version = version,
                series = alarm.series,
                "Drift on {} of {model} v{version}: {} {:.4} > threshold {:.4} over the last {} rows",
                alarm.series,
                alarm.statistic,
                alarm.value,
                alarm.threshold,
                alarm.window
            ),
            Event::Drift { pipeline, model, version, alarm } => tracing::info!(
                event,
                pipeline,
                model,
                model_version = version,
                series = alarm.series,
                "Drift on {} has ended",
                alarm.series
            ),
            Event::StoreFailed { pipeline, rows, error } => {
                tracing::error!(event, pipeline, rows, "{rows} sample(s) not stored: {error}")
            }
            Event::StoreRecovered { path } => tracing::info!(event, "The sample store {path} writes again"),
            Event::ReloadRolledBack { error } => {
                tracing::error!(event, "The reloaded config could not start, the previous one serves again: {error}")
            }
            Event::Step { pipeline, step, message, .. }
                if step.ends_with("failed") || step.ends_with("refused") || step.ends_with("requested") =>
            {
                tracing::warn!(event, pipeline, "{message}")
            }
            Event::Step { pipeline, message, .. } => tracing::info!(event, pipeline, "{message}"),
        }
    }
}

/// A raised or ended drift alarm, as the training loop hears of it (`Events::with_triggers`).
#[derive(Debug, Clone)]
pub struct DriftTrigger {
    pub pipeline: String,
    /// The serving version and the alarm's series.
    pub series: (u64, String),
    pub reason: String,
    /// Rows since the change is estimated to have begun.
    pub since_change: u64,
    pub raised: bool,
    /// The pipeline's stored sample count when the alarm was raised, filled in by a sink that
    /// has the store (`service`): the loop hears of the alarm later, maybe much later on a busy
    /// device, and counted then the change would seem to begin after rows it already has.
    pub stored: Option<u64>,
}

/// Where drift alarms go besides the events topic: the training loop (`service::closed_loop`
/// wires it to its channel, so an alarm is taken at once).
pub type TriggerSink = Arc<dyn Fn(DriftTrigger) + Send + Sync>;

/// Cheap handle to report events from any task; never blocks (a full queue drops the event,
/// its counter has already counted it).
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Event>,
    /// The training loop hears of drift alarms here.
    triggers: Option<TriggerSink>,
}

impl Events {
    pub fn emit(&self, event: Event) {
        if let Ok(mut counts) = OUTCOMES.lock() {
            *counts.entry((event.pipeline().to_string(), event.name())).or_default() += 1;
        }
        let _ = self.tx.try_send(event);
    }

    /// The same handle, also telling `triggers` of drift alarms.
    pub fn with_triggers(mut self, triggers: TriggerSink) -> Events {
        self.triggers = Some(triggers);
        self
    }

    /// One `drift` / `drift.cleared` event per alarm, naming the model that was serving.
    pub fn drift(&self, pipeline: &str, model: &str, version: u64, alarms: Vec<crate::monitor::Alarm>) {
        for alarm in alarms {
            if let Some(triggers) = &self.triggers {
                triggers(DriftTrigger {
                    pipeline: pipeline.to_string(),
                    series: (version, alarm.series.clone()),
                    reason: format!("drift on {} ({})", alarm.series, alarm.statistic),
                    since_change: alarm.since_change,
                    raised: alarm.raised,
                    stored: None,
                });
            }
            self.emit(Event::Drift { pipeline: pipeline.to_string(), model: model.to_string(), version, alarm });
        }
    }
}

/// At most this many events of one kind per pipeline per second reach the log and the
/// events topic; the rest are summed into the next one's `suppressed`.
const EVENTS_PER_SECOND: u32 = 5;

struct Limit {
    window: Instant,
    sent: u32,
    suppressed: u64,
}

/// The events file in `state_dir` (`lathe report` draws the loop's timeline from it).
pub const JOURNAL: &str = "events.jsonl";
/// The journal is rotated past this size: `events.jsonl` and one older `events.1.jsonl`, at
/// most twice this on disk (about 20,000 events of the loop: months of a busy device).
pub const JOURNAL_BYTES: u64 = 4 << 20;

/// Keeps what the loop did on disk, one JSON event a line, for `lathe report`. Rejected input
/// is left out (a flood of it would push out the loop's history; the counters keep its
/// totals), and so is a run record an event carries (it is in `state_dir/runs/`). A journal
/// that cannot be written is said once in the log and given up: it is a view, not a duty.
struct Journal {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    bytes: u64,
}

impl Journal {
    fn open(path: std::path::PathBuf) -> Journal {
        let opened = std::fs::OpenOptions::new().create(true).append(true).open(&path);
        let (file, bytes) = match opened {
            Ok(f) => {
                let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
                (Some(f), bytes)
            }
            Err(e) => {
                tracing::warn!(
                    "cannot write the events journal {}: {e}; lathe report will lack a timeline",
                    path.display()
                );
                (None, 0)
            }
        };
        Journal { path, file, bytes }
    }

    fn write(&mut self, name: &str, payload: &Value) {
        if name == "input.rejected" {
            return;
        }
        let Some(file) = self.file.as_mut() else { return };
        let mut text = match payload.get("run").and_then(|r| r.get("run_id")) {
            Some(id) => {
                let mut line = payload.clone();
                line["run"] = id.clone();
                line.to_string()
            }
            None => payload.to_string(),
        };
        text.push('\n');
        use std::io::Write;
        if let Err(e) = file.write_all(text.as_bytes()) {
            tracing::warn!("cannot write the events journal {}: {e}; stopped writing it", self.path.display());
            self.file = None;
            return;
        }
        self.bytes += text.len() as u64;
        if self.bytes > JOURNAL_BYTES {
            let older = self.path.with_extension("1.jsonl");
            let _ = std::fs::rename(&self.path, older);
            *self = Journal::open(self.path.clone());
        }
    }
}

/// Publishes events on the events topic, rate-limited per (event, pipeline), and keeps them
/// in `journal` (a path in the state folder) when given.
pub fn reporter(
    client: rumqttc::v5::AsyncClient,
    topic: String,
    journal: Option<std::path::PathBuf>,
) -> (Events, impl std::future::Future<Output = ()>) {
    let (tx, mut rx) = mpsc::channel::<Event>(1024);
    let mut journal = journal.map(Journal::open);
    let task = async move {
        let mut limits: std::collections::HashMap<(&'static str, String), Limit> = Default::default();
        while let Some(event) = rx.recv().await {
            let pipeline = event.pipeline().to_string();
            let now = Instant::now();
            let l = limits.entry((event.name(), pipeline)).or_insert(Limit { window: now, sent: 0, suppressed: 0 });
            if now.duration_since(l.window) >= Duration::from_secs(1) {
                l.window = now;
                l.sent = 0;
            }
            if l.sent >= EVENTS_PER_SECOND {
                l.suppressed += 1;
                continue;
            }
            l.sent += 1;
            let suppressed = std::mem::take(&mut l.suppressed);
            event.log(suppressed);
            let payload = event.payload(suppressed);
            if let Some(j) = journal.as_mut() {
                j.write(event.name(), &payload);
            }
            let body = payload.to_string();
            if client.publish(topic.as_str(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, body).await.is_err() {
                break;
            }
        }
    };
    (Events { tx, triggers: None }, task)
}

/// Counters for every pipeline, by name.
pub type PipelineCounters = Vec<(String, Arc<Counters>)>;
