//! `[infer]` and `[[pipeline]]`: how models are loaded and run, and what one pipeline reads,
//! serves and publishes. Parsed (with every other section) by `config`, which composes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::ingest::config::{LabelsConfig, SourceConfig};
use crate::train::config::{ColdStartModel, TrainConfig};

#[derive(Debug, Clone)]
pub struct InferConfig {
    /// `engine = "tract"` (default) or `"ort"` with `ort_library = "/path/libonnxruntime.so.1.x"`.
    pub engine: crate::engine::EngineKind,
    /// `load_memory_mb`, `load_timeout`: what a model's load and first inference may take
    /// (tried in a child process first; `infer::probe`).
    pub load_limits: crate::engine::Limits,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelRef {
    /// A bundle name in the registry (`state_dir/registry/NAME`).
    Name(String),
    /// A bundle file; seeds the registry at start.
    File(PathBuf),
    /// `model = { cold_start = { … } }`: no model yet; the pipeline grows one from its own
    /// rows (`train::cold_start`), named after the pipeline in the registry.
    ColdStart(ColdStartModel),
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub name: String,
    pub model: ModelRef,
    pub source: SourceConfig,
    /// Bundle input name -> JSON pointer. Inputs not listed read `/<name>`.
    pub features: BTreeMap<String, String>,
    pub sink: SinkConfig,
    pub batch: BatchConfig,
    /// `window = { size = N }`: a sequence model is fed each device's last N frames
    /// (`[batch, N, features]`); 1 when absent.
    pub window: usize,
    /// `window.resume_within`: windows saved at a clean stop are resumed by a start this soon
    /// after it (older ones are dropped and every device fills its window again).
    pub resume_within: std::time::Duration,
    /// `[pipeline.drift]`; `None` when `enabled = false`.
    pub drift: Option<crate::monitor::Settings>,
    /// `labels = { topic, key, value, horizon_s, window }`: late ground truth.
    pub labels: Option<LabelsConfig>,
    /// `[pipeline.train]`: the closed loop (its samples are stored, it fine-tunes itself).
    pub train: Option<TrainConfig>,
    /// `[pipeline.capture]`: hard examples sent for labelling (`infer::capture`).
    pub capture: Option<CaptureConfig>,
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Topic template; `{device}` is replaced by the device id.
    pub topic: String,
}

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most rows in one inference call.
    pub max: usize,
    /// How long to wait for more rows once one arrived. 0 (the default) batches only what
    /// is already queued: no added latency when idle, large batches under load.
    pub wait_us: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { max: 64, wait_us: 0 }
    }
}

/// `[pipeline.capture]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureConfig {
    pub every: std::time::Duration,
    pub rows: usize,
    pub max_margin: f64,
    pub min_error_ratio: f64,
    /// Only rows served while a drift alarm is raised.
    pub drift_only: bool,
}

impl Default for CaptureConfig {
    fn default() -> CaptureConfig {
        CaptureConfig {
            every: std::time::Duration::from_secs(60),
            rows: 10,
            max_margin: 0.2,
            min_error_ratio: 1.0,
            drift_only: false,
        }
    }
}

/// What loading a model for a pipeline needs beyond the pipeline's own section: the
/// `[infer]` settings, the state folder (the trust floor, a model's re-based reference) and
/// the payload cap its extractor keeps to.
#[derive(Debug, Clone, Copy)]
pub struct LoadContext<'a> {
    pub infer: &'a InferConfig,
    pub state_dir: &'a Path,
    pub max_payload_bytes: usize,
}
