//! `bundle.toml`: everything a device needs to know about a model, written down.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The bundle format this build writes and reads.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Binary,
    Multiclass,
    Regression,
    /// Unsupervised anomaly models that reproduce their input; the score is the error.
    Reconstruction,
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "binary" => Ok(Task::Binary),
            "multiclass" => Ok(Task::Multiclass),
            "regression" => Ok(Task::Regression),
            "reconstruction" => Ok(Task::Reconstruction),
            _ => Err(format!("unknown task {s:?}; expected binary, multiclass, regression or reconstruction")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    /// Monotonic per name; the registry and the update floor compare these.
    pub version: u64,
    /// sha256 of the parent bundle's `bundle.toml` ("" for a bundle made from scratch).
    #[serde(default)]
    pub parent: String,
    pub task: Task,
    /// The validation CSV's target column (empty for `reconstruction`).
    #[serde(default)]
    pub target: String,
    /// Which output is "the prediction" (index into `outputs`).
    pub primary_output: usize,
    pub model_input: String,
    pub inputs: Vec<Input>,
    pub outputs: Vec<String>,
    pub training: Training,
    pub gate: Gate,
    pub baseline: crate::model::baseline::Baseline,
    pub lineage: Lineage,
    /// sha256 (hex) of every other file in the bundle.
    pub files: BTreeMap<String, String>,
}

/// One named feature, in model order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub name: String,
    #[serde(default)]
    pub unit: String,
    /// Values outside `[min, max]` are rejected as `out_of_range` before inference.
    pub min: f64,
    pub max: f64,
}

/// How the model may be fine-tuned, and with what: never implicit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// "none", "full", "last:N" (the last N layers) or "lora:RANK".
    pub trainable: String,
    pub optimizer: String,
    pub learning_rate: f64,
    pub batch: u32,
    pub epochs: u32,
    /// Stop after this many epochs without validation improvement.
    pub early_stopping_patience: u32,
    pub seed: u64,
}

impl Default for Training {
    /// Conservative fine-tuning defaults for small tabular models: the last layer only,
    /// Adam at a small learning rate, a fixed seed so a run can be repeated.
    fn default() -> Self {
        Training {
            trainable: "last:1".into(),
            optimizer: "adam".into(),
            learning_rate: 1e-3,
            batch: 64,
            epochs: 20,
            early_stopping_patience: 3,
            seed: 0,
        }
    }
}

/// When a challenger may replace the champion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// A key of `baseline.metrics`.
    pub metric: String,
    pub higher_is_better: bool,
    /// The challenger must beat the champion by at least this much on held-out data.
    pub min_improvement: f64,
}

impl Gate {
    pub fn for_task(task: Task) -> Gate {
        let (metric, higher_is_better) = match task {
            Task::Binary => ("f1", true),
            Task::Multiclass => ("accuracy", true),
            Task::Regression => ("rmse", false),
            Task::Reconstruction => ("error_p95", false),
        };
        Gate { metric: metric.into(), higher_is_better, min_improvement: 0.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// Who or what made this bundle (`lathe bundle create 0.1.0`, or a run id).
    pub created_by: String,
    pub created_unix: u64,
    /// Where the model came from, and which data the baseline was computed on.
    pub source_model: String,
    pub data: String,
}
