//! Infer: runs each pipeline's model on micro-batches of rows and publishes one prediction
//! per accepted message. One task per pipeline; the model is planned per batch size.

pub mod capture;
pub mod config;
pub mod probe;
pub mod window;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::AsyncClient;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use config::{BatchConfig, LoadContext, PipelineConfig};

use arc_swap::ArcSwap;

use crate::engine::{Engine, EngineKind, Outputs};
use crate::ingest::flow::Flow;
use crate::ingest::Extractor;
use crate::ingest::Sample;
use crate::model::baseline::Reading;
use crate::model::Bundle;
use crate::monitor::performance::{Performance, Predicted, Served};
use crate::monitor::reference::Rebased;
use crate::monitor::Monitor;
use crate::mqtt::ack::AckSender;
use crate::telemetry::events::{Counters, Event, Events};

/// The prediction payload (docs/topics.md).
#[derive(Serialize)]
struct Prediction<'a> {
    device: &'a str,
    key: &'a Value,
    ts: &'a Value,
    model: &'a str,
    version: u64,
    /// The model's primary output for this row.
    output: &'a [f32],
    /// Classifiers: the predicted class.
    #[serde(skip_serializing_if = "Option::is_none")]
    class: Option<usize>,
    /// Classifiers trained on class names: the predicted class's name (`classes` in bundle.toml).
    #[serde(skip_serializing_if = "Option::is_none")]
    class_name: Option<&'a str>,
    latency_us: u64,
}

/// The model a pipeline serves right now, with everything derived from its bundle. It is
/// swapped whole (one pointer store, `arc-swap`) on promotion or rollback: a batch runs on the
/// model it loaded at its start, and every prediction names the version that computed it.
pub struct ActiveModel {
    pub engine: Engine,
    /// Reads feature rows for this model's inputs and ranges.
    pub extractor: Extractor,
    pub reading: Reading,
    pub primary_output: usize,
    pub name: String,
    pub version: u64,
    pub sha256: String,
    /// Drift against this model's own baseline; a new model starts a new monitor. It is
    /// calibrated on a thread of its own (the bootstrap takes a moment); rows served meanwhile
    /// wait in the slot. Only the pipeline's task observes (the status task reads the
    /// state), so the lock is uncontended.
    pub monitor: Option<Arc<DriftSlot>>,
    /// The per-sample loss the baseline implies (1 − accuracy, or MAE), for late labels.
    pub baseline_loss: f64,
    /// Classifiers: each class's share of the validation targets (label shift reference).
    pub label_shares: Vec<f64>,
    /// Rows in the drift reference (the validation rows that end a sample).
    pub reference_rows: usize,
    /// Where this version came from: "fine-tuned" (grown on this device), "pushed" (a
    /// signed update accepted here) or "bundle" (installed from a file).
    pub origin: &'static str,
    /// A classifier's class names, by index (empty: its classes are numbers).
    pub classes: Vec<String>,
    /// A cold-start placeholder (`train::cold_start`): its rows are stored to grow a model
    /// from, and nothing it computes is published, monitored or captured.
    pub placeholder: bool,
}

impl ActiveModel {
    /// Loads a bundle's model and checks it fits the pipeline.
    ///
    /// # Errors
    /// A model tract cannot serve, or one whose input width disagrees with its manifest.
    pub fn load(bundle: &Bundle, pipeline: &PipelineConfig, context: LoadContext) -> Result<ActiveModel, String> {
        let m = &bundle.manifest;
        probe::check(bundle, &context.infer.engine, &context.infer.load_limits)?;
        let engine = Engine::load_with(&bundle.model, &context.infer.engine).map_err(|e| e.to_string())?;
        let max_payload_bytes = context.max_payload_bytes;
        if engine.signature.features != m.inputs.len() {
            return Err(format!(
                "the model takes {} features, bundle.toml names {}",
                engine.signature.features,
                m.inputs.len()
            ));
        }
        let frames = engine.signature.frames;
        if frames != m.window {
            return Err(format!("the model takes windows of {frames} frames, bundle.toml says {}", m.window));
        }
        if frames != pipeline.window {
            return Err(match (frames, pipeline.window) {
                (n, 1) => format!(
                    "{} v{} is a sequence model taking the last {n} frames of a device; add window = {{ size = {n} }} to pipeline {:?}",
                    m.name, m.version, pipeline.name
                ),
                (1, w) => format!(
                    "pipeline {:?} has window = {{ size = {w} }} but {} v{} takes one frame per sample",
                    pipeline.name, m.name, m.version
                ),
                (n, w) => format!(
                    "pipeline {:?} has window = {{ size = {w} }} but {} v{} takes windows of {n} frames",
                    pipeline.name, m.name, m.version
                ),
            });
        }
        // A pipeline that trains stores each sample whole: a window of every frame.
        if pipeline.train.is_some() && frames * m.inputs.len() > crate::store::MAX_VALUES {
            return Err(format!(
                "{} v{} takes windows of {frames} frames of {} features, {} values: the sample store keeps at most {} \
                 per sample, so pipeline {:?} cannot fine-tune it (a shorter window, or no [pipeline.train])",
                m.name,
                m.version,
                m.inputs.len(),
                frames * m.inputs.len(),
                crate::store::MAX_VALUES,
                pipeline.name
            ));
        }
        let (rows, outputs) = bundle.validated_outputs(&engine).map_err(|e| e.to_string())?;
        let reference_rows = rows.len() / m.inputs.len().max(1);
        let placeholder = m.cold_start.is_some();
        let monitor = match &pipeline.drift {
            Some(_) if placeholder => None,
            Some(settings) => {
                Some(drift_monitor(bundle, rows, &outputs, settings.clone(), rebased(bundle, context.state_dir))?)
            }
            None => None,
        };
        let src = &pipeline.source;
        let extractor = match (&src.sparkplug, src.kepware_device_levels) {
            (Some(_), _) => Extractor::for_metrics(&m.inputs, &pipeline.features, max_payload_bytes),
            (None, Some(levels)) => {
                Extractor::for_kepware_tags(&m.inputs, &pipeline.features, levels, src.key.clone(), max_payload_bytes)
            }
            (None, None) => {
                Extractor::new(&m.inputs, &pipeline.features, src.key.clone(), src.timestamp.clone(), max_payload_bytes)
            }
        };
        Ok(ActiveModel {
            engine,
            extractor,
            reading: bundle.reading(),
            primary_output: m.primary_output,
            name: m.name.clone(),
            version: m.version,
            sha256: bundle.sha256(),
            monitor,
            label_shares: label_shares(bundle),
            reference_rows,
            origin: origin(bundle, context.state_dir),
            classes: m.classes.clone(),
            placeholder,
            baseline_loss: crate::model::baseline::implied_loss(m.task, &m.baseline.metrics),
        })
    }
}

fn origin(bundle: &Bundle, state_dir: &std::path::Path) -> &'static str {
    let m = &bundle.manifest;
    if m.lineage.fine_tune.is_some() {
        return "fine-tuned";
    }
    let floor = crate::trust::floor::Floor::new(state_dir).read().unwrap_or_default();
    match floor.get(&m.name) {
        Some(a) if a.version == m.version => "pushed",
        _ => "bundle",
    }
}

/// Each class's share of a classifier's validation targets (empty for other tasks).
fn label_shares(bundle: &Bundle) -> Vec<f64> {
    let m = &bundle.manifest;
    if !matches!(m.task, crate::model::Task::Binary | crate::model::Task::Multiclass) {
        return Vec::new();
    }
    let truth = bundle.validation_targets().unwrap_or_default();
    let classes = m.baseline.class_shares.len().max(2);
    let mut counts = vec![0usize; classes];
    for t in &truth {
        if let Some(c) = counts.get_mut(*t as usize) {
            *c += 1;
        }
    }
    counts.iter().map(|&c| c as f64 / truth.len().max(1) as f64).collect()
}

/// A model's drift monitor, set once calibrated on its own thread. The newest `window` rows
/// served while it calibrates wait here, and the calibration thread observes them before it
/// hands the monitor over (reporting their alarms itself: no later row may come to carry
/// them). A fault that begins with a new version's first rows (a promotion under the drift
/// that caused it) is seen from its first row, not from whenever calibration ended: a
/// second or more on a busy device, and the rows served meanwhile may be all there is.
pub struct DriftSlot {
    monitor: std::sync::OnceLock<std::sync::Mutex<Monitor>>,
    waiting: std::sync::Mutex<Waiting>,
    window: usize,
}

/// What a [`DriftSlot`] holds until its monitor is ready.
#[derive(Default)]
struct Waiting {
    /// (row, score) served before the monitor was ready, the newest `window`.
    rows: std::collections::VecDeque<(Vec<f32>, f64)>,
    /// Where the alarms those rows raise go (the serving pipeline's events).
    report: Option<AlarmReport>,
}

/// Reports drift alarms as events of the pipeline and model version that served the rows.
pub type AlarmReport = Box<dyn FnOnce(Vec<crate::monitor::Alarm>) + Send>;

impl DriftSlot {
    fn new(window: usize) -> DriftSlot {
        DriftSlot { monitor: std::sync::OnceLock::new(), waiting: Default::default(), window }
    }

    /// The monitor, once calibrated.
    pub fn get(&self) -> Option<&std::sync::Mutex<Monitor>> {
        self.monitor.get()
    }

    /// Feeds served rows with their scores to the monitor, appending its alarms to `alarms`;
    /// until it is ready they wait (the newest `window`), with `report` for their alarms.
    pub fn observe<'a>(
        &self,
        rows: impl Iterator<Item = (&'a [f32], f64)>,
        alarms: &mut Vec<crate::monitor::Alarm>,
        report: impl FnOnce() -> AlarmReport,
    ) {
        // The wait's lock is held while the monitor is looked at: `ready` sets the monitor
        // under it, so each row is observed exactly once.
        let Ok(mut waiting) = self.waiting.lock() else { return };
        match self.monitor.get().and_then(|m| m.lock().ok()) {
            Some(mut monitor) => {
                for (row, score) in rows {
                    monitor.observe(row, score, alarms);
                }
            }
            None => {
                waiting.rows.extend(rows.map(|(row, score)| (row.to_vec(), score)));
                let extra = waiting.rows.len().saturating_sub(self.window);
                waiting.rows.drain(..extra);
                if waiting.report.is_none() {
                    waiting.report = Some(report());
                }
            }
        }
    }

    /// Called by the calibration thread: observes the rows that waited, hands the monitor
    /// over and reports their alarms.
    fn ready(&self, mut monitor: Monitor) {
        let Ok(mut waiting) = self.waiting.lock() else { return };
        let mut alarms = Vec::new();
        for (row, score) in waiting.rows.drain(..) {
            monitor.observe(&row, score, &mut alarms);
        }
        let report = waiting.report.take();
        let _ = self.monitor.set(std::sync::Mutex::new(monitor));
        drop(waiting);
        if let Some(report) = report.filter(|_| !alarms.is_empty()) {
            report(alarms);
        }
    }
}

/// A reference smaller than this many windows is warned about: on Shuttle, 1,500 rows for a
/// window of 500 ran clean and 1,000 did not (`tests/drift.rs`), so four leaves a margin.
pub const SMALL_REFERENCE_WINDOWS: usize = 4;

/// The warning for a drift reference of `rows` rows watched with windows of `window` rows,
/// when it is too small (logged at load, printed by `lathe check`).
pub fn small_reference(model: &str, rows: usize, window: usize) -> Option<String> {
    let enough = SMALL_REFERENCE_WINDOWS * window;
    (rows < enough).then(|| {
        format!(
            "the drift reference of {model} has {rows} rows for a window of {window}: with fewer than {enough} its \
             own sampling error can raise false alarms (give the bundle a larger validation set, or a smaller \
             drift window)"
        )
    })
}

/// The drift reference re-based on rows this version served, if it has one
/// (`monitor::reference`). A damaged file is logged and the validation set used instead.
fn rebased(bundle: &Bundle, state_dir: &std::path::Path) -> Option<Rebased> {
    let m = &bundle.manifest;
    let path = crate::model::Registry::new(state_dir).reference_path(&m.name, m.version);
    let names: Vec<String> = m.inputs.iter().map(|i| i.name.clone()).collect();
    Rebased::read_for(&path, &bundle.sha256(), &names)
        .map_err(|e| tracing::warn!("Ignoring the re-based drift reference of {} v{}: {e}", m.name, m.version))
        .ok()
        .flatten()
}

/// How the status names a re-based reference.
pub fn rebased_source(r: &Rebased) -> String {
    format!("{} rows v{} served (keys {} to {})", r.rows.len(), r.version, r.served.first_key, r.served.last_key)
}

/// A drift monitor whose reference is the bundle's validation `rows` and the model's outputs
/// `out` on them (from validation, not run again), or the rows the version served when it
/// was re-based; calibrated on its own thread; the slot is filled when it is ready.
fn drift_monitor(
    bundle: &Bundle,
    rows: Vec<f32>,
    out: &Outputs,
    settings: crate::monitor::Settings,
    rebased: Option<Rebased>,
) -> Result<Arc<DriftSlot>, String> {
    let (f, p, reading) = (bundle.manifest.inputs.len(), bundle.manifest.primary_output, bundle.reading());
    let (rows, scores, source) = match rebased {
        Some(r) => {
            let (rows, scores) = r.reference();
            (rows, scores, rebased_source(&r))
        }
        None => {
            let scores = (0..rows.len() / f).map(|r| reading.score(out.row(p, r), &rows[r * f..(r + 1) * f])).collect();
            (rows, scores, crate::monitor::VALIDATION_SET.to_string())
        }
    };
    let names: Vec<String> = bundle.manifest.inputs.iter().map(|i| i.name.clone()).collect();
    let slot = Arc::new(DriftSlot::new(settings.window));
    let fill = slot.clone();
    let model = format!("{} v{}", bundle.manifest.name, bundle.manifest.version);
    std::thread::Builder::new()
        .name("lathe-drift-calibrate".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let started = Instant::now();
            if let Some(warning) = small_reference(&model, scores.len(), settings.window) {
                tracing::warn!("{warning}");
            }
            let mut monitor = Monitor::new(&rows, &scores, &names, settings);
            tracing::info!(
                "Drift monitor ready for {model} ({} reference rows from {source}, {} PCA components, calibrated in {} ms)",
                scores.len(),
                monitor.components_kept(),
                started.elapsed().as_millis()
            );
            monitor.source = source;
            fill.ready(monitor);
        })
        .map_err(|e| format!("cannot start the drift calibration thread: {e}"))?;
    Ok(slot)
}

/// What a served output row says, as the late label will judge it.
fn predicted(model: &ActiveModel, output: &[f32]) -> Predicted {
    match model.reading.class(output) {
        Some(c) => Predicted::Class(c),
        None => Predicted::Value(f64::from(output.first().copied().unwrap_or(f32::NAN))),
    }
}

/// Shared by ingest (the extractor), the pipeline's task (the engine) and the swapper.
pub type SharedModel = Arc<ArcSwap<ActiveModel>>;

impl crate::ingest::ServedModel for ArcSwap<ActiveModel> {
    fn current(&self) -> Arc<dyn crate::ingest::ReadsRows> {
        self.load_full()
    }
}

impl crate::ingest::ReadsRows for ActiveModel {
    fn extractor(&self) -> &Extractor {
        &self.extractor
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn version(&self) -> u64 {
        self.version
    }
}

/// Everything one pipeline's inference task needs.
pub struct Pipeline {
    pub name: String,
    pub model: SharedModel,
    /// Sink topic template; `{device}` is replaced.
    pub sink: String,
    pub batch: BatchConfig,
    pub client: AsyncClient,
    pub counters: Arc<Counters>,
    pub events: Events,
    pub acks: AckSender,
    pub flow: Arc<Flow>,
    /// Late-label performance, when the pipeline has `labels`.
    pub performance: Option<Arc<std::sync::Mutex<Performance>>>,
    /// The sample store's writer, when the pipeline trains: served rows are stored and their
    /// messages acknowledged once stored.
    pub store: Option<crate::store::writer::PipelineWriter>,
    /// A challenger in its shadow period: it scores the same rows, its outputs only compared
    /// with the labels that arrive (never published).
    pub shadow: Arc<arc_swap::ArcSwapOption<ActiveModel>>,
    /// `[sparkplug]`: predictions also go out as Sparkplug B DDATA.
    pub sparkplug: Option<crate::sparkplug::output::Output>,
    /// Sequence models: each device's last frames, kept across reloads and clean restarts.
    pub windows: window::SharedWindows,
    /// `[pipeline.capture]`: the window of hard examples being filled, and where they go.
    pub capture: Option<(std::sync::Mutex<capture::Capture>, String)>,
}

impl Pipeline {
    /// Serves until the channel closes (ingest stopped) and every queued row is answered.
    pub async fn run(self, mut rx: mpsc::Receiver<Sample>) {
        let mut batch: Vec<Sample> = Vec::with_capacity(self.batch.max);
        // The served rows (one frame each), and what the model takes: the same rows, or for a
        // sequence model each row's window.
        let mut rows: Vec<f32> = Vec::new();
        let mut samples: Vec<f32> = Vec::new();
        let heartbeat = crate::telemetry::liveness::register(&format!("inference of pipeline {}", self.name));
        while let Some(first) = rx.recv().await {
            batch.push(first);
            self.fill(&mut rx, &mut batch).await;
            self.flow.taken(batch.len());
            let model = self.model.load_full();
            let frames = model.engine.signature.frames;
            if frames > 1 {
                samples.clear();
                self.fill_windows(frames, &mut batch, &mut samples);
                if batch.is_empty() {
                    continue;
                }
            }
            self.counters.batch.observe(&crate::telemetry::events::BATCH_BUCKETS, batch.len() as u64);
            rows.clear();
            rows.extend(batch.iter().flat_map(|s| s.features.iter().copied()));
            let input = if frames > 1 { &samples } else { &rows };
            let started = Instant::now();
            let result = {
                let _busy = heartbeat.busy();
                model.engine.run(input)
            };
            match result {
                // Nothing learnt yet: the rows are kept (labels join them there), nothing else.
                Ok(out) if model.placeholder => self.keep(&model, &mut batch, &rows, input, &out),
                Ok(out) => {
                    let per_row = started.elapsed().as_micros() as u64 / batch.len().max(1) as u64;
                    self.counters.compute.observe(&crate::telemetry::events::COMPUTE_BUCKETS_US, per_row);
                    self.publish(&model, &batch, &out).await;
                    self.check_health(&model, batch.len(), &out);
                    self.watch(&model, &rows, &out);
                    let shadow = self.shadow(input);
                    self.capture(&model, &batch, &rows, &out, shadow.as_ref()).await;
                    self.remember(&model, &batch, &out, &shadow);
                    self.keep(&model, &mut batch, &rows, input, &out);
                }
                Err(e) => {
                    self.counters.failed.fetch_add(batch.len() as u64, Relaxed);
                    self.events.emit(Event::InferenceFailed {
                        pipeline: self.name.clone(),
                        rows: batch.len(),
                        error: e.to_string(),
                    });
                }
            }
            for s in batch.drain(..) {
                if let Some(ticket) = s.ack.and_then(Arc::into_inner) {
                    self.acks.done(ticket);
                }
            }
        }
    }

    /// Sequence models: adds each row to its device's window; rows whose window is full stay
    /// in `batch` with their window appended to `samples`, the others (still filling) are
    /// counted and acknowledged here.
    fn fill_windows(&self, n: usize, batch: &mut Vec<Sample>, samples: &mut Vec<f32>) {
        // Only this task takes the lock while it runs (the service reads it once it has ended).
        let mut windows = self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut filling = 0u64;
        batch.retain_mut(|s| {
            if windows.push(&s.device, &s.features, n, samples) {
                return true;
            }
            filling += 1;
            if let Some(ticket) = s.ack.take().and_then(Arc::into_inner) {
                self.acks.done(ticket);
            }
            false
        });
        self.counters.window_filling.fetch_add(filling, Relaxed);
    }

    /// Takes what is already queued, then waits up to `batch.wait_us` for more.
    async fn fill(&self, rx: &mut mpsc::Receiver<Sample>, batch: &mut Vec<Sample>) {
        while batch.len() < self.batch.max {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        if self.batch.wait_us == 0 || batch.len() >= self.batch.max {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_micros(self.batch.wait_us);
        while batch.len() < self.batch.max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                _ => break,
            }
        }
    }

    /// Output health, watched while a new version is on trial: non-finite values, and
    /// probabilities pinned at 0 or 1.
    fn check_health(&self, model: &ActiveModel, rows: usize, out: &Outputs) {
        let (mut nonfinite, mut saturated) = (0u64, 0u64);
        let probabilities = matches!(model.reading.task, crate::model::Task::Binary | crate::model::Task::Multiclass);
        for r in 0..rows {
            let o = out.row(model.primary_output, r);
            if o.iter().any(|v| !v.is_finite()) {
                nonfinite += 1;
            } else if probabilities && o.iter().any(|&v| !(1e-6..=1.0 - 1e-6).contains(&v)) {
                saturated += 1;
            }
        }
        self.counters.outputs_nonfinite.fetch_add(nonfinite, Relaxed);
        self.counters.outputs_saturated.fetch_add(saturated, Relaxed);
    }

    /// Hands the served rows to the store (pipelines that train); their acks go with them and
    /// are sent once the rows are durable. Each record keeps what the model took, so it can be
    /// trained on: the row, or a sequence model's whole window (`input`).
    fn keep(&self, model: &ActiveModel, batch: &mut [Sample], rows: &[f32], input: &[f32], out: &Outputs) {
        let Some(store) = &self.store else { return };
        let f = model.engine.signature.features;
        let width = f * model.engine.signature.frames;
        let ts_ms = crate::telemetry::unix_ms();
        let mut writes = Vec::with_capacity(batch.len());
        let mut tickets = Vec::with_capacity(batch.len());
        for (r, s) in batch.iter_mut().enumerate() {
            let output = out.row(model.primary_output, r);
            writes.push(crate::store::Write::Sample(crate::store::Record {
                ts_ms,
                version: model.version,
                label: None,
                score: model.reading.score(output, &rows[r * f..(r + 1) * f]) as f32,
                device: s.device.to_string(),
                key: s.key.to_string(),
                features: input[r * width..(r + 1) * width].to_vec(),
                output: output.to_vec(),
            }));
            tickets.extend(s.ack.take());
        }
        store.submit(writes, tickets);
    }

    /// Offers the batch to hard-example capture; publishes a window's rows once it ended.
    async fn capture(
        &self,
        model: &ActiveModel,
        batch: &[Sample],
        rows: &[f32],
        out: &Outputs,
        shadow: Option<&(Arc<ActiveModel>, Outputs)>,
    ) {
        let Some((capture, topic)) = &self.capture else { return };
        let drifting = model
            .monitor
            .as_ref()
            .and_then(|slot| slot.get())
            .and_then(|m| m.lock().ok().map(|m| m.state().iter().any(|s| s.alarm)))
            .unwrap_or(false);
        let ready = match capture.lock() {
            Ok(mut c) => c.offer(&self.name, model, batch, rows, out, shadow, drifting),
            Err(_) => return,
        };
        for message in ready {
            let Ok(body) = serde_json::to_vec(&message) else { continue };
            // QoS 1, never retained; a full queue drops it (a hard example is not telemetry).
            if self.client.try_publish(topic.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, body).is_ok() {
                self.counters.captured.fetch_add(1, Relaxed);
            }
        }
    }

    /// What a shadowing challenger predicts for the batch (pipelines with `labels`, during a
    /// trial): scored beside the champion's predictions when the labels come.
    fn shadow(&self, rows: &[f32]) -> Option<(Arc<ActiveModel>, Outputs)> {
        self.performance.as_ref()?;
        let shadow = self.shadow.load_full()?;
        let out = shadow.engine.run(rows).ok()?;
        Some((shadow, out))
    }

    /// Keeps what each prediction said until its label arrives (pipelines with `labels`);
    /// labels that came first are scored now.
    fn remember(
        &self,
        model: &ActiveModel,
        batch: &[Sample],
        out: &Outputs,
        shadow: &Option<(Arc<ActiveModel>, Outputs)>,
    ) {
        let Some(perf) = &self.performance else { return };
        let Ok(mut perf) = perf.lock() else { return };
        perf.set_baseline(model.version, &model.label_shares);
        let now = Instant::now();
        let mut alarms = Vec::new();
        for (r, s) in batch.iter().enumerate() {
            let served = Served {
                p: predicted(model, out.row(model.primary_output, r)),
                version: model.version,
                baseline: model.baseline_loss,
                shadow: shadow.as_ref().map(|(m, o)| predicted(m, o.row(m.primary_output, r))),
            };
            perf.predicted(s.device.clone(), s.key.to_string(), served, now, &mut alarms);
        }
        drop(perf);
        self.events.drift(&self.name, &model.name, model.version, alarms);
    }

    /// Feeds the served rows to the drift monitor; alarms become `drift` events.
    fn watch(&self, model: &ActiveModel, rows: &[f32], out: &Outputs) {
        let Some(slot) = model.monitor.as_ref() else { return };
        let f = model.engine.signature.features;
        let scored = rows
            .chunks_exact(f)
            .enumerate()
            .map(|(r, row)| (row, model.reading.score(out.row(model.primary_output, r), row)));
        let mut alarms = Vec::new();
        let report = || -> AlarmReport {
            let (events, pipeline, name, version) =
                (self.events.clone(), self.name.clone(), model.name.clone(), model.version);
            Box::new(move |alarms| events.drift(&pipeline, &name, version, alarms))
        };
        slot.observe(scored, &mut alarms, report);
        self.events.drift(&self.name, &model.name, model.version, alarms);
    }

    async fn publish(&self, model: &ActiveModel, batch: &[Sample], out: &Outputs) {
        let now = Instant::now();
        for (r, s) in batch.iter().enumerate() {
            let output = out.row(model.primary_output, r);
            let latency_us = now.duration_since(s.received).as_micros() as u64;
            self.counters.latency.observe(&crate::telemetry::events::LATENCY_BUCKETS_US, latency_us);
            let class = model.reading.class(output);
            let prediction = Prediction {
                device: &s.device,
                key: &s.key,
                ts: &s.ts,
                model: &model.name,
                version: model.version,
                output,
                class,
                class_name: class.and_then(|c| model.classes.get(c)).map(String::as_str),
                latency_us,
            };
            let Ok(body) = serde_json::to_vec(&prediction) else {
                continue;
            };
            let topic = self.sink.replace("{device}", &s.device);
            if self.flow.publish(&self.client, topic, body).await {
                self.counters.predicted.fetch_add(1, Relaxed);
            }
            if let Some(out) = &self.sparkplug {
                out.report(crate::sparkplug::output::Report {
                    pipeline: self.name.as_str().into(),
                    device: s.device.clone(),
                    version: model.version,
                    output: output.to_vec(),
                    class: prediction.class,
                    class_name: prediction.class_name.map(str::to_string),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A promotion under drift: the new version's first rows are the fault, and may be all
    /// it serves for a while. They reach its monitor even though it was still calibrating,
    /// and their alarms are reported when it is ready, with no further row to carry them.
    #[test]
    fn rows_served_while_the_monitor_calibrates_are_observed_once_it_is_ready() {
        let settings = crate::monitor::Settings { window: 10, every: 5, bootstrap: 20, ..Default::default() };
        let reference: Vec<f32> = (0..400).map(|i| (i % 17) as f32).collect();
        let scores: Vec<f64> = (0..200).map(|i| f64::from(i % 5) / 5.0).collect();
        let names = vec!["a".to_string(), "b".to_string()];
        let slot = DriftSlot::new(settings.window);
        let (tx, reported) = std::sync::mpsc::channel();
        let report = || -> AlarmReport { Box::new(move |alarms| tx.send(alarms).unwrap_or(())) };
        // Far outside the reference on both features: an alarm once a window is full.
        let row = [300.0f32, -50.0];
        let mut alarms = Vec::new();
        slot.observe(std::iter::repeat_n((&row[..], 0.5), 25), &mut alarms, report);
        assert!(slot.get().is_none() && alarms.is_empty());
        slot.ready(Monitor::new(&reference, &scores, &names, settings));
        let seen = slot.get().map(|m| m.lock().map(|m| m.rows_seen()).unwrap_or(0));
        assert_eq!(seen, Some(10), "the newest window of the rows that waited");
        let raised = reported.try_recv().unwrap_or_default();
        assert!(raised.iter().any(|a| a.series == "a" && a.raised), "{raised:?}");
        slot.observe(std::iter::once((&row[..], 0.5)), &mut alarms, || Box::new(|_| ()));
        let seen = slot.get().map(|m| m.lock().map(|m| m.rows_seen()).unwrap_or(0));
        assert_eq!(seen, Some(11), "then each new row once");
    }
}
