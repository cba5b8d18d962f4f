//! On-device fine-tuning: from a champion bundle and fresh data to a gated challenger bundle.
//!
//! ```text
//! data.csv ─ data (checked like live input, time-ordered split)
//!          ─ frozen part (inference engine) ─ frozen tail layers (once)
//!          ─ Net on a Backend (train, early stopping) ─ graph::export (same graph, new weights)
//!          ─ gate (champion vs challenger, both run by the inference engine)
//!          ─ bundle::derive (version + 1, lineage) + run record
//! ```
//! The daemon's store feeds the same `fine_tune_on`. A sequence model's samples are its windows
//! of frames (`data`), so only the frozen part sees time; the dense tail trains as for any model.

pub mod backend;
pub mod cold_start;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
mod error;
pub mod federated;
pub mod graph;
pub mod net;
pub mod significance;

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::engine::Engine;
use crate::model::bundle::{self, Bundle};
use crate::model::manifest::{FineTune, Lineage, Task, Training};
use crate::rng::Rng;
use backend::{Backend, Loss, Update};
use graph::{DenseLayer, Tail};
use net::{Mode, Net};

pub use error::TrainError;

/// What the trainable part of a bundle is: its tail, and how many of its layers train.
pub struct Plan {
    pub tail: Tail,
    pub mode: Mode,
    /// Index of the first training layer (`last:N` leaves the ones before it frozen).
    pub first_trained: usize,
    pub loss: Loss,
}

fn parse_trainable(spec: &str, layers: usize, seed: u64, lora_alpha: f64) -> Result<(Mode, usize), String> {
    let count = |s: &str| s.parse::<usize>().ok().filter(|&n| n > 0);
    match spec.split_once(':') {
        None if spec == "full" => Ok((Mode::Full, 0)),
        None if spec == "none" => Err("training.trainable = \"none\": this bundle is not to be fine-tuned".into()),
        Some(("last", n)) => match count(n) {
            Some(n) if n <= layers => Ok((Mode::Full, layers - n)),
            Some(n) => Err(format!("trainable = \"last:{n}\" but the tail has {layers} dense layer(s)")),
            None => Err(format!("trainable = {spec:?}: N must be a positive whole number")),
        },
        Some(("lora", r)) => match count(r) {
            Some(rank) => {
                let alpha = if lora_alpha > 0.0 { lora_alpha as f32 } else { rank as f32 };
                Ok((Mode::Lora { rank, alpha, seed }, 0))
            }
            None => Err(format!("trainable = {spec:?}: the rank must be a positive whole number")),
        },
        _ => Err(format!("trainable = {spec:?}; expected none, full, last:N or lora:RANK")),
    }
}

/// Decides what trains and with which loss; the check `lathe bundle create` runs too, so a
/// model that cannot be fine-tuned is refused when it is bundled, not months later.
///
/// # Errors
/// No trainable tail (naming the node that stopped it), a bad `trainable`, or a loss that
/// does not fit the model's output.
pub fn plan(onnx: &[u8], output: &str, task: Task, training: &Training) -> Result<Plan, TrainError> {
    let tail = graph::tail_of(onnx, output).map_err(TrainError::Model)?;
    let (mode, first_trained) =
        parse_trainable(&training.trainable, tail.layers.len(), training.seed, training.lora_alpha)
            .map_err(TrainError::Model)?;
    let out = tail.out_dim();
    let unfit = |why: String| Err(TrainError::Model(why));
    let loss = match (training.loss.as_str(), task) {
        ("auto", Task::Binary) if out == 1 => Loss::BceWithLogits,
        ("auto", Task::Binary | Task::Multiclass) => Loss::SoftmaxCrossEntropy,
        ("auto", Task::Regression | Task::Reconstruction) => Loss::Mse,
        ("cross_entropy", _) => Loss::SoftmaxCrossEntropy,
        ("bce_with_logits", _) => Loss::BceWithLogits,
        ("mse", _) => Loss::Mse,
        (other, _) => return unfit(format!("loss = {other:?}; expected auto, cross_entropy, bce_with_logits or mse")),
    };
    match (loss, task) {
        (Loss::BceWithLogits, _) if out != 1 => {
            return unfit(format!("bce_with_logits needs 1 output value; {out} here"))
        }
        (Loss::SoftmaxCrossEntropy, _) if out < 2 => return unfit("cross_entropy needs 2 or more classes".into()),
        (Loss::Mse, Task::Regression) if out != 1 => {
            return unfit(format!("a regression tail must give 1 value; this one gives {out}"))
        }
        (_, Task::Reconstruction) if loss != Loss::Mse => return unfit("reconstruction models train with mse".into()),
        _ => {}
    }
    Ok(Plan { tail, mode, first_trained, loss })
}

/// The gate's verdict and the numbers behind it.
#[derive(Debug, Clone, Serialize)]
pub struct GateReport {
    pub metric: String,
    /// The metric the holdout was judged on: `metric`, or accuracy where `metric` is F1 and the
    /// holdout holds too few rows of the positive class to measure it (see [`MIN_F1_POSITIVES`]).
    pub holdout_metric: String,
    pub higher_is_better: bool,
    pub min_improvement: f64,
    pub max_forgetting: f64,
    pub champion_holdout: BTreeMap<String, f64>,
    pub challenger_holdout: BTreeMap<String, f64>,
    pub champion_validation: BTreeMap<String, f64>,
    pub challenger_validation: BTreeMap<String, f64>,
    /// On the replay sample of older live data (daemon runs; empty when there is none).
    pub champion_replay: BTreeMap<String, f64>,
    pub challenger_replay: BTreeMap<String, f64>,
    /// Gate metric gain on the holdout (positive = better, whichever direction is better).
    pub improvement: f64,
    /// How much worse on the validation set or the replay sample (the worse), as a fraction
    /// of the champion's value.
    pub forgetting: f64,
    /// Whether the gain on the holdout is beyond sampling noise.
    pub significance: significance::Significance,
    pub accepted: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochRecord {
    pub epoch: u32,
    pub train_loss: f64,
    pub early_stop_loss: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerRecord {
    pub node: String,
    pub inputs: usize,
    pub outputs: usize,
    pub trains: bool,
}

/// Everything a run used and decided; printed by `lathe train`, kept in `state_dir/runs/`.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub run_id: String,
    pub bundle: String,
    pub version: u64,
    pub sha256: String,
    pub started_unix: u64,
    pub wall_seconds: f64,
    pub backend: String,
    pub data: String,
    pub rows_used: usize,
    pub rows_dropped: BTreeMap<String, usize>,
    pub train_rows: usize,
    pub early_stop_rows: usize,
    pub holdout_rows: usize,
    pub hyperparameters: Training,
    pub loss: Loss,
    pub class_weights: Vec<f32>,
    pub tail_input: String,
    pub tail_stopped_by: String,
    pub layers: Vec<LayerRecord>,
    pub trainable_values: usize,
    pub epochs: Vec<EpochRecord>,
    pub best_epoch: u32,
    pub stopped_early: bool,
    pub gate: Option<GateReport>,
    /// The challenger bundle's version and sha256 when the gate accepted it.
    pub output_version: Option<u64>,
    pub output_sha256: Option<String>,
    pub outcome: String,
}

/// How many run records `state_dir/runs/` keeps: about 6 MB, and 83 days of runs at the
/// default one-hour cooldown. An accepted run's record also lives on in its bundle's lineage.
pub const MAX_RUN_RECORDS: usize = 2000;

/// Keeps `record` as `state_dir/runs/RUN_ID.json`, deleting the oldest records beyond
/// [`MAX_RUN_RECORDS`] (a daemon left alone for months must not fill its disk with them);
/// returns the JSON.
///
/// # Errors
/// The record cannot be written (callers warn and go on: a run is not undone for its record).
pub fn keep_record(state_dir: &std::path::Path, record: &RunRecord) -> Result<String, String> {
    let json = serde_json::to_string_pretty(record).map_err(|e| e.to_string())?;
    let runs = state_dir.join("runs");
    std::fs::create_dir_all(&runs)
        .and_then(|()| crate::fs::write_atomic(&runs.join(format!("{}.json", record.run_id)), json.as_bytes()))
        .map_err(|e| format!("the run record was not kept in {}: {e}", runs.display()))?;
    if let Err(e) = keep_newest_records(&runs, MAX_RUN_RECORDS) {
        tracing::warn!("old run records in {} were not deleted: {e}", runs.display());
    }
    Ok(json)
}

/// Deletes all but the newest `keep` `*.json` files in `runs` (by modification time, then name).
fn keep_newest_records(runs: &std::path::Path, keep: usize) -> std::io::Result<()> {
    let mut records = Vec::new();
    for entry in std::fs::read_dir(runs)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            records.push((std::fs::metadata(&path)?.modified()?, path));
        }
    }
    if records.len() > keep {
        records.sort();
        for (_, path) in &records[..records.len() - keep] {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

pub struct Outcome {
    pub record: RunRecord,
    /// The new bundle, when the gate accepted it.
    pub challenger: Option<Bundle>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn class_weights(spec: &str, y: &[f64], classes: usize) -> Result<Vec<f32>, String> {
    match spec {
        "none" | "" => Ok(Vec::new()),
        "balanced" => {
            // scikit-learn's "balanced": n / (classes · count_c); a class absent from the data gets 1.
            let mut counts = vec![0usize; classes];
            for &t in y {
                if let Some(c) = counts.get_mut(t as usize) {
                    *c += 1;
                }
            }
            let n = y.len() as f64;
            Ok(counts.iter().map(|&c| if c == 0 { 1.0 } else { (n / (classes as f64 * c as f64)) as f32 }).collect())
        }
        list => {
            let w: Vec<f32> = list
                .split(',')
                .map(|s| s.trim().parse::<f32>().ok().filter(|w| w.is_finite() && *w >= 0.0))
                .collect::<Option<_>>()
                .ok_or_else(|| format!("class_weights = {list:?}; expected none, balanced or w0,w1,…"))?;
            if w.len() != classes {
                return Err(format!("class_weights gives {} weights for {classes} classes", w.len()));
            }
            Ok(w)
        }
    }
}

fn update_rule(t: &Training) -> Result<Update, String> {
    let (lr, wd) = (t.learning_rate as f32, t.weight_decay as f32);
    if !(lr.is_finite() && lr > 0.0) {
        return Err(format!("learning_rate = {}; expected a positive number", t.learning_rate));
    }
    match t.optimizer.as_str() {
        "sgd" => Ok(Update::Sgd { lr, momentum: t.momentum as f32, weight_decay: wd }),
        "adam" => Ok(Update::adam(lr, wd, false)),
        "adamw" => Ok(Update::adam(lr, wd, true)),
        other => Err(format!("optimizer = {other:?}; expected sgd, adam or adamw")),
    }
}

/// Runs the frozen part of the model (everything before the tail) on raw rows.
fn frozen_features(model: &[u8], tail: &Tail, x: &[f32]) -> Result<Vec<f32>, String> {
    if tail.starts_at_model_input {
        return Ok(x.to_vec());
    }
    let frozen = graph::frozen_part(model, &tail.input)?;
    let engine = Engine::load(&frozen).map_err(|e| format!("the frozen part of the model: {e}"))?;
    let out = engine.run(x).map_err(|e| format!("the frozen part of the model: {e}"))?;
    let (values, width) =
        (out.values.into_iter().next().unwrap_or_default(), out.per_row.first().copied().unwrap_or(0));
    if width != tail.in_dim() {
        return Err(format!("the frozen part gives {width} values per row; the tail takes {}", tail.in_dim()));
    }
    Ok(values)
}

fn gate_metric(metrics: &BTreeMap<String, f64>, name: &str) -> Result<f64, String> {
    metrics.get(name).copied().ok_or_else(|| format!("gate metric {name:?} is not measured for this task"))
}

/// Judges champion against challenger, both run by the inference engine from their ONNX bytes.
fn judge(
    champion: &Bundle,
    challenger: &[u8],
    holdout_x: &[f32],
    holdout_y: &[f64],
    replay: Option<&Replay>,
    seed: u64,
) -> Result<GateReport, String> {
    let m = &champion.manifest;
    let gate = &m.gate;
    // Values per sample: a sequence model's are windows (the validation rows are too).
    let f = m.inputs.len() * m.window.max(1);
    let (vx, vy) = (
        champion.validation_samples().map_err(|e| e.to_string())?,
        champion.validation_targets().map_err(|e| e.to_string())?,
    );
    let measure = |model: &[u8], x: &[f32], y: &[f64]| -> Result<bundle::Measured, String> {
        let engine = Engine::load(model).map_err(|e| e.to_string())?;
        let out = engine.run(x).map_err(|e| e.to_string())?;
        bundle::measure(m.task, m.baseline.threshold, &out, m.primary_output, x, f, y).map_err(|e| e.to_string())
    };
    let score = |model: &[u8], x: &[f32], y: &[f64]| measure(model, x, y).map(|m| m.metrics);
    let (champion_on_holdout, challenger_on_holdout) =
        (measure(&champion.model, holdout_x, holdout_y)?, measure(challenger, holdout_x, holdout_y)?);
    let (ch, nh) = (champion_on_holdout.metrics.clone(), challenger_on_holdout.metrics.clone());
    let (cv, nv) = (score(&champion.model, &vx, &vy)?, score(challenger, &vx, &vy)?);
    let sign = if gate.higher_is_better { 1.0 } else { -1.0 };
    // Rows, not targets: a reconstruction holdout has none.
    let (rows, task) = (holdout_x.len() / f.max(1), m.task);
    let positives = holdout_y.iter().filter(|&&y| y == 1.0).count();
    let f1_unmeasurable = task == Task::Binary && gate.metric == "f1" && positives < MIN_F1_POSITIVES;
    let holdout_metric = if f1_unmeasurable { "accuracy" } else { gate.metric.as_str() };
    let mut significance = significance::paired_bootstrap(rows, seed, gate.significance, |draw| {
        let on = |m: &bundle::Measured| m.metric_on(task, holdout_y, draw, holdout_metric);
        match (on(&champion_on_holdout), on(&challenger_on_holdout)) {
            (Some(a), Some(b)) => sign * (b - a),
            _ => f64::NAN,
        }
    });
    if matches!(m.task, Task::Binary | Task::Multiclass) {
        let right = |m: &bundle::Measured, r: usize| m.predicted[r] as f64 == holdout_y[r];
        let only =
            |a: &bundle::Measured, b: &bundle::Measured| (0..rows).filter(|&r| right(a, r) && !right(b, r)).count();
        significance = significance.and_mcnemar(significance::mcnemar(
            only(&champion_on_holdout, &challenger_on_holdout),
            only(&challenger_on_holdout, &champion_on_holdout),
        ));
    }
    let (before, after) = (gate_metric(&ch, holdout_metric)?, gate_metric(&nh, holdout_metric)?);
    let (mut kept, mut now) = (gate_metric(&cv, &gate.metric)?, gate_metric(&nv, &gate.metric)?);
    let improvement = sign * (after - before);
    let mut forgetting = sign * (kept - now) / kept.abs().max(1e-12);
    let mut forgot_on = "the validation set";
    // The replay sample (older live data) is judged like the validation set: the worse of
    // the two decides.
    let (mut cr, mut nr) = (BTreeMap::new(), BTreeMap::new());
    if let Some(r) = replay.filter(|r| r.y.len() >= MIN_REPLAY_ROWS) {
        cr = score(&champion.model, &r.x, &r.y)?;
        nr = score(challenger, &r.x, &r.y)?;
        let (k, n) = (gate_metric(&cr, &gate.metric)?, gate_metric(&nr, &gate.metric)?);
        let f = sign * (k - n) / k.abs().max(1e-12);
        if f > forgetting || !f.is_finite() {
            (kept, now, forgetting, forgot_on) = (k, n, f, "the replay sample of older data");
        }
    }
    // F1 of a holdout with (almost) no anomalies scores every model 0: it cannot see a
    // challenger that ends a storm of false alarms, the commonest harm a sensor fault does.
    let judged = if f1_unmeasurable {
        format!("accuracy (f1 is not measurable on {positives} rows of class 1; {MIN_F1_POSITIVES} needed)")
    } else {
        gate.metric.clone()
    };
    let (accepted, reason) = if !(improvement.is_finite() && forgetting.is_finite()) {
        (false, format!("{judged} is not a number on this data"))
    } else if improvement <= gate.min_improvement {
        (
            false,
            format!(
                "{judged} on the fresh holdout {after:.4} vs the champion's {before:.4}: not better by more than {}",
                gate.min_improvement
            ),
        )
    } else if !significance.significant {
        (
            false,
            format!(
                "{judged} on the fresh holdout {after:.4} vs the champion's {before:.4}: within sampling noise on \
                 {rows} rows ({})",
                significance.summary()
            ),
        )
    } else if forgetting > gate.max_forgetting {
        (
            false,
            format!(
                "{} on {forgot_on} fell from {kept:.4} to {now:.4} ({:.1} % worse; at most {:.1} % allowed)",
                gate.metric,
                forgetting * 100.0,
                gate.max_forgetting * 100.0
            ),
        )
    } else {
        (
            true,
            format!(
                "{judged} on the fresh holdout {before:.4} -> {after:.4}; {} on {forgot_on} {kept:.4} -> {now:.4}",
                gate.metric
            ),
        )
    };
    Ok(GateReport {
        metric: gate.metric.clone(),
        holdout_metric: holdout_metric.to_string(),
        higher_is_better: gate.higher_is_better,
        min_improvement: gate.min_improvement,
        max_forgetting: gate.max_forgetting,
        champion_holdout: ch,
        challenger_holdout: nh,
        champion_validation: cv,
        challenger_validation: nv,
        champion_replay: cr,
        challenger_replay: nr,
        improvement,
        forgetting,
        significance,
        accepted,
        reason,
    })
}

/// Gathers rows `idx` of a row-major matrix `m` (`w` values per row) into `out`.
fn gather(m: &[f32], w: usize, idx: &[usize], out: &mut Vec<f32>) {
    out.clear();
    for &i in idx {
        out.extend_from_slice(&m[i * w..(i + 1) * w]);
    }
}

/// Older labeled rows the gate's forgetting check also judges on (daemon runs).
pub struct Replay {
    pub x: Vec<f32>,
    pub y: Vec<f64>,
}

/// A binary holdout with fewer rows of class 1 than this is judged on accuracy, not F1.
pub const MIN_F1_POSITIVES: usize = 10;

/// Fewer replay rows than this are not judged on (too noisy to refuse a model over).
const MIN_REPLAY_ROWS: usize = 50;

/// How many classes the loss of `champion`'s trainable tail has (0: regression or
/// reconstruction); what [`data::load`] checks targets against.
///
/// # Errors
/// A bundle that cannot be fine-tuned with `training`.
pub fn classes(champion: &Bundle, training: &Training) -> Result<usize, TrainError> {
    let m = &champion.manifest;
    let output = primary_output(m)?;
    let plan = plan(&champion.model, output, m.task, training)?;
    Ok(match plan.loss {
        Loss::BceWithLogits => 2,
        Loss::SoftmaxCrossEntropy => plan.tail.out_dim(),
        Loss::Mse => 0,
    })
}

/// The name of the model output the fine-tune trains.
fn primary_output(m: &crate::model::manifest::Manifest) -> Result<&String, TrainError> {
    m.outputs.get(m.primary_output).ok_or_else(|| TrainError::Model("primary_output out of range".into()))
}

/// Fine-tunes `champion` on `csv` (named `data_name` in records) with `training`.
///
/// # Errors
/// Anything that stops a run from reaching the gate: data, model or backend. A run the gate
/// refuses is not an error: its record says why.
pub fn fine_tune<B: Backend>(
    backend: &B,
    champion: &Bundle,
    csv: &str,
    data_name: &str,
    training: &Training,
) -> Result<Outcome, TrainError> {
    let data = data::load(&champion.manifest, csv, classes(champion, training)?)?;
    fine_tune_on(backend, champion, data, data_name, training, None, &|| Ok(()))
}

/// Where the CUDA backend may keep compiled kernels, and how much GPU memory a run may hold.
#[derive(Debug, Clone)]
pub struct GpuSettings {
    /// systemd's `CacheDirectory` (`$CACHE_DIRECTORY`), else `state_dir/cache`.
    pub cache_dir: Option<std::path::PathBuf>,
    pub max_gpu_mem_mb: u64,
}

/// The backend `requested` ("auto", "cpu", "cuda") resolves to on this machine, for the
/// status: probed once per process (a probe loads the driver).
pub fn resolved_backend(requested: &str) -> String {
    static PROBED: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    if requested == "cpu" {
        return "cpu".into();
    }
    #[cfg(feature = "cuda")]
    let probed = PROBED.get_or_init(|| cuda::probe().map(|d| format!("cuda:{} ({})", d.name, d.arch)));
    #[cfg(not(feature = "cuda"))]
    let probed = PROBED.get_or_init(|| Err("this build has no CUDA backend".into()));
    match probed {
        Ok(name) => name.clone(),
        Err(why) if requested == "cuda" => format!("unavailable: {why}"),
        Err(_) => "cpu".into(),
    }
}

/// [`fine_tune_on`] on the backend `requested` names: `cpu`; `cuda` (an error saying why
/// when there is no usable GPU); `auto` (the GPU when there is one, else the CPU, with one
/// log line saying why). The run record's `backend` names the one that ran.
///
/// # Errors
/// As [`fine_tune_on`], and `cuda` requested where CUDA cannot run.
#[allow(clippy::too_many_arguments)]
pub fn fine_tune_with(
    requested: &str,
    gpu: &GpuSettings,
    champion: &Bundle,
    data: data::Dataset,
    data_name: &str,
    training: &Training,
    replay: Option<&Replay>,
    check: &dyn Fn() -> Result<(), String>,
) -> Result<Outcome, TrainError> {
    #[cfg(feature = "cuda")]
    match cuda::choose(requested, gpu.cache_dir.as_deref(), gpu.max_gpu_mem_mb).map_err(TrainError::NoBackend)? {
        cuda::Chosen::Cuda(backend) => {
            return fine_tune_on(&*backend, champion, data, data_name, training, replay, check)
        }
        cuda::Chosen::Cpu { why } if requested != "cpu" => tracing::info!("{why}"),
        cuda::Chosen::Cpu { .. } => {}
    }
    #[cfg(not(feature = "cuda"))]
    if requested == "cuda" {
        let _ = gpu;
        let why = "train.backend = \"cuda\" but this build has no CUDA backend (feature `cuda`)";
        return Err(TrainError::NoBackend(why.into()));
    }
    fine_tune_on(&cpu::Cpu, champion, data, data_name, training, replay, check)
}

/// [`fine_tune`] on rows already checked, with an optional replay sample for the gate and a
/// `check` run after every epoch that may stop the run (the daemon's time and memory limits).
///
/// # Errors
/// As [`fine_tune`], and whatever `check` returns.
pub fn fine_tune_on<B: Backend>(
    backend: &B,
    champion: &Bundle,
    data: data::Dataset,
    data_name: &str,
    training: &Training,
    replay: Option<&Replay>,
    check: &dyn Fn() -> Result<(), String>,
) -> Result<Outcome, TrainError> {
    // A cold-start placeholder has nothing to fine-tune: the first model grows from scratch,
    // with settings made for that (its own `[training]` is for the fine-tunes after).
    if champion.manifest.cold_start.is_some() {
        let from_scratch = cold_start::training(training.seed, training.holdout);
        return cold_start::grow(backend, champion, data, data_name, &from_scratch, check);
    }
    let started = Instant::now();
    let started_unix = now_unix();
    let m = &champion.manifest;
    let plan = plan(&champion.model, primary_output(m)?, m.task, training)?;
    let classes = match plan.loss {
        Loss::BceWithLogits => 2,
        Loss::SoftmaxCrossEntropy => plan.tail.out_dim(),
        Loss::Mse => 0,
    };
    let split = data::split(data.rows, training.holdout).map_err(|e| data.with_dropped_note(e))?;
    let f = data.features;

    // Everything that does not train is computed once, up front.
    let mut z = frozen_features(&champion.model, &plan.tail, &data.x).map_err(TrainError::Model)?;
    let frozen_layers = &plan.tail.layers[..plan.first_trained];
    let mut trained: Vec<DenseLayer> = plan.tail.layers[plan.first_trained..].to_vec();
    if !frozen_layers.is_empty() {
        let mut frozen = Net::new(backend, frozen_layers, Mode::Frozen, 1024, 1)?;
        z = frozen.predict(backend, &z)?;
    }
    // Softmax/sigmoid at the very end belong to the loss (it works on logits).
    if let Some(last) = trained.last_mut() {
        let head = match plan.loss {
            Loss::SoftmaxCrossEntropy => Some(backend::Activation::Softmax),
            Loss::BceWithLogits => Some(backend::Activation::Sigmoid),
            Loss::Mse => None,
        };
        if head.is_some() && last.activations.last().copied() == head {
            last.activations.pop();
        }
    }
    let d_in = trained.first().map_or(0, |l| l.in_dim);
    let (target, tw): (Vec<f32>, usize) = match m.task {
        Task::Reconstruction => (data.x.clone(), f),
        _ => (data.y.iter().map(|&v| v as f32).collect(), 1),
    };
    // Reconstruction data has no targets: `get` gives an empty slice there, not a panic.
    let train_y = data.y.get(split.train.clone()).unwrap_or_default();
    let weights = class_weights(&training.class_weights, train_y, classes.max(1)).map_err(TrainError::Model)?;
    let update = update_rule(training).map_err(TrainError::Model)?;
    let batch = (training.batch as usize).max(1);
    let mut net = Net::new(backend, &trained, plan.mode, batch, tw)?;
    if !weights.is_empty() {
        net.set_class_weights(backend, &weights)?;
    }
    let clip = (training.grad_clip > 0.0).then_some(training.grad_clip as f32);
    let es = split.early_stop.clone();
    let es_x = &z[es.start * d_in..es.end * d_in];
    let es_y = &target[es.start * tw..es.end * tw];

    let mut best = net.evaluate(backend, plan.loss, es_x, es_y, tw)?;
    let mut best_snapshot = net.snapshot(backend)?;
    let (mut best_epoch, mut stopped_early, mut diverged) = (0u32, false, false);
    let mut epochs = Vec::new();
    let mut rng = Rng::new(training.seed);
    let mut order: Vec<usize> = split.train.clone().collect();
    let (mut xb, mut yb) = (Vec::with_capacity(batch * d_in), Vec::with_capacity(batch * tw));
    for epoch in 1..=training.epochs {
        rng.shuffle(&mut order);
        let (mut sum, mut seen) = (0.0f64, 0usize);
        for idx in order.chunks(batch) {
            gather(&z, d_in, idx, &mut xb);
            gather(&target, tw, idx, &mut yb);
            let l = net.train_step(backend, &xb, &yb, plan.loss, update, clip)?;
            sum += f64::from(l) * idx.len() as f64;
            seen += idx.len();
        }
        check().map_err(TrainError::Stopped)?;
        let es_loss = net.evaluate(backend, plan.loss, es_x, es_y, tw)?;
        let train_loss = sum / seen.max(1) as f64;
        epochs.push(EpochRecord { epoch, train_loss, early_stop_loss: es_loss });
        if !train_loss.is_finite() || !es_loss.is_finite() {
            diverged = true;
            break;
        }
        if es_loss < best {
            best = es_loss;
            best_epoch = epoch;
            best_snapshot = net.snapshot(backend)?;
        } else if epoch - best_epoch >= training.early_stopping_patience.max(1) {
            stopped_early = epoch < training.epochs;
            break;
        }
    }
    net.restore(backend, &best_snapshot)?;

    // The whole tail, trained layers with their new weights (activations as in the graph).
    let mut layers = plan.tail.layers.clone();
    let new = net.weights(backend, &plan.tail.layers[plan.first_trained..])?;
    layers.splice(plan.first_trained.., new);
    let model = graph::export(&champion.model, &layers).map_err(TrainError::Model)?;

    let hx = &data.x[split.holdout.start * f..split.holdout.end * f];
    let hy: &[f64] = data.y.get(split.holdout.clone()).unwrap_or_default();
    let gate = if diverged {
        None
    } else {
        Some(judge(champion, &model, hx, hy, replay, training.seed).map_err(TrainError::Gate)?)
    };
    let run_id = format!("{}-v{}-{}", m.name, m.version, started_unix);
    let mut record = RunRecord {
        run_id: run_id.clone(),
        bundle: m.name.clone(),
        version: m.version,
        sha256: champion.sha256(),
        started_unix,
        wall_seconds: 0.0,
        backend: backend.name(),
        data: data_name.to_string(),
        rows_used: data.rows,
        rows_dropped: data.dropped.clone(),
        train_rows: split.train.len(),
        early_stop_rows: split.early_stop.len(),
        holdout_rows: split.holdout.len(),
        hyperparameters: training.clone(),
        loss: plan.loss,
        class_weights: weights,
        tail_input: plan.tail.input.clone(),
        tail_stopped_by: plan.tail.stopped_by.clone(),
        layers: plan
            .tail
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| LayerRecord {
                node: l.node.clone(),
                inputs: l.in_dim,
                outputs: l.out_dim,
                trains: i >= plan.first_trained,
            })
            .collect(),
        trainable_values: net.trainable_values(),
        epochs,
        best_epoch,
        stopped_early,
        gate: gate.clone(),
        output_version: None,
        output_sha256: None,
        outcome: String::new(),
    };
    let challenger = match &gate {
        None => {
            record.outcome = "refused: the loss diverged (not finite)".into();
            None
        }
        Some(g) if !g.accepted => {
            record.outcome = format!("refused: {}", g.reason);
            None
        }
        Some(g) => {
            let metric = |map: &BTreeMap<String, f64>| map.get(&g.metric).copied().unwrap_or(f64::NAN);
            let lineage = Lineage {
                created_by: format!("lathe train {} (run {run_id})", env!("CARGO_PKG_VERSION")),
                created_unix: now_unix(),
                source_model: m.lineage.source_model.clone(),
                data: format!("{data_name} ({} rows, newest {} held out)", data.rows, split.holdout.len()),
                fine_tune: Some(FineTune {
                    run_id: run_id.clone(),
                    backend: backend.name(),
                    wall_seconds: started.elapsed().as_secs_f64(),
                    rows_trained: split.train.len(),
                    holdout_rows: split.holdout.len(),
                    holdout_before: metric(&g.champion_holdout),
                    holdout_after: metric(&g.challenger_holdout),
                    validation_before: metric(&g.champion_validation),
                    validation_after: metric(&g.challenger_validation),
                }),
            };
            let b = bundle::derive(champion, model, training.clone(), lineage)
                .map_err(|e| TrainError::Gate(e.to_string()))?;
            record.output_version = Some(b.manifest.version);
            record.output_sha256 = Some(b.sha256());
            record.outcome = format!("accepted: {}", g.reason);
            Some(b)
        }
    };
    record.wall_seconds = started.elapsed().as_secs_f64();
    Ok(Outcome { record, challenger })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_run_records_are_kept() {
        let runs = std::env::temp_dir().join(format!("lathe-runs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&runs);
        std::fs::create_dir_all(&runs).unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        for i in 0..5u64 {
            let path = runs.join(format!("run-{i}.json"));
            std::fs::write(&path, "{}").unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(i)).unwrap();
        }
        std::fs::write(runs.join("notes.txt"), "not a record").unwrap();
        keep_newest_records(&runs, 3).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&runs).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["notes.txt", "run-2.json", "run-3.json", "run-4.json"]);
        std::fs::remove_dir_all(&runs).unwrap();
    }
}
