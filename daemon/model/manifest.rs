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
    /// A classifier trained on class names: the names, in the order of its class indices
    /// (the `label` it gives, the columns of its probabilities, the targets lathe stores).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// Which output is "the prediction" (index into `outputs`).
    pub primary_output: usize,
    pub model_input: String,
    /// Frames per sample: 1, or N for a sequence model fed the last N frames of a device
    /// (`[batch, N, features]`); the pipeline's `window = { size = N }` must match it.
    #[serde(default = "one_frame", skip_serializing_if = "is_one_frame")]
    pub window: usize,
    pub inputs: Vec<Input>,
    pub outputs: Vec<String>,
    pub training: Training,
    pub gate: Gate,
    pub baseline: crate::model::baseline::Baseline,
    pub lineage: Lineage,
    /// sha256 (hex) of every other file in the bundle.
    pub files: BTreeMap<String, String>,
    /// Set only on the placeholder a cold-start pipeline runs before it has grown a model
    /// (`train::cold_start`): it is never published from, and never written to the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start: Option<ColdStart>,
}

/// A model grown on the device from scratch: `model = { cold_start = { … } }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColdStart {
    /// Hidden layer widths of the MLP (ReLU between them).
    pub hidden: Vec<usize>,
    /// Usable rows (labelled; any row for `reconstruction`) before the first run.
    pub min_rows: usize,
    /// Classes of a multiclass model (2 for binary, unused otherwise).
    pub classes: usize,
}

fn one_frame() -> usize {
    1
}

fn is_one_frame(n: &usize) -> bool {
    *n == 1
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

/// How the model may be fine-tuned, and with what: never implicit. A fine-tuned bundle
/// carries the values its run actually used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// "none", "full", "last:N" (the last N dense layers) or "lora:RANK" (every dense layer
    /// of the tail, merged into the weights on export).
    pub trainable: String,
    /// "sgd" (with `momentum`), "adam" or "adamw".
    pub optimizer: String,
    pub learning_rate: f64,
    pub batch: u32,
    pub epochs: u32,
    /// Stop after this many epochs without improvement on the early-stopping slice.
    pub early_stopping_patience: u32,
    pub seed: u64,
    /// "auto" (from the task: softmax cross-entropy, BCE with logits, MSE, reconstruction
    /// MSE), or one of "cross_entropy", "bce_with_logits", "mse".
    #[serde(default = "defaults::auto")]
    pub loss: String,
    /// L2 for sgd/adam, decoupled for adamw.
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "defaults::momentum")]
    pub momentum: f64,
    /// Clip the global gradient norm to this; 0 = no clipping.
    #[serde(default)]
    pub grad_clip: f64,
    /// "none", "balanced" (n / (classes · count)) or explicit weights "w0,w1,…".
    #[serde(default = "defaults::none")]
    pub class_weights: String,
    /// The newest fraction of the data kept as the fresh holdout the gate judges on.
    #[serde(default = "defaults::holdout")]
    pub holdout: f64,
    /// LoRA scale numerator (scale = alpha / rank); 0 = the rank (scale 1).
    #[serde(default)]
    pub lora_alpha: f64,
}

mod defaults {
    pub fn auto() -> String {
        "auto".into()
    }
    pub fn none() -> String {
        "none".into()
    }
    pub fn momentum() -> f64 {
        0.9
    }
    pub fn holdout() -> f64 {
        0.2
    }
    pub fn max_forgetting() -> f64 {
        0.02
    }
    pub fn significance() -> f64 {
        super::SIGNIFICANCE_LEVEL
    }
}

/// The significance level the gate tests at unless the bundle's gate says otherwise.
pub const SIGNIFICANCE_LEVEL: f64 = 0.05;

impl Default for Training {
    /// Conservative fine-tuning defaults for small tabular models: the last layer only,
    /// Adam at a small learning rate, a fixed seed so a run can be repeated, the newest 20 %
    /// held out for the gate.
    fn default() -> Self {
        Training {
            trainable: "last:1".into(),
            optimizer: "adam".into(),
            learning_rate: 1e-3,
            batch: 64,
            epochs: 20,
            early_stopping_patience: 3,
            seed: 0,
            loss: defaults::auto(),
            weight_decay: 0.0,
            momentum: defaults::momentum(),
            grad_clip: 0.0,
            class_weights: defaults::none(),
            holdout: defaults::holdout(),
            lora_alpha: 0.0,
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
    /// The challenger must beat the champion by more than this on the fresh holdout.
    pub min_improvement: f64,
    /// ...and may be worse than the champion on the bundle's own validation set by at most
    /// this fraction of the champion's value (so it cannot forget what it knew).
    #[serde(default = "defaults::max_forgetting")]
    pub max_forgetting: f64,
    /// ...and the gain on the holdout must be beyond sampling noise: the gate's tests must
    /// give p below this (`train::significance`). 1 turns the tests off.
    #[serde(default = "defaults::significance")]
    pub significance: f64,
}

impl Gate {
    pub fn for_task(task: Task) -> Gate {
        let (metric, higher_is_better) = match task {
            Task::Binary => ("f1", true),
            Task::Multiclass => ("accuracy", true),
            Task::Regression => ("rmse", false),
            Task::Reconstruction => ("error_p95", false),
        };
        Gate {
            metric: metric.into(),
            higher_is_better,
            min_improvement: 0.0,
            max_forgetting: defaults::max_forgetting(),
            significance: defaults::significance(),
        }
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
    /// Set on bundles the device fine-tuned: the run that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune: Option<FineTune>,
}

/// The short form of a run record, kept in the bundle it produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FineTune {
    pub run_id: String,
    pub backend: String,
    pub wall_seconds: f64,
    pub rows_trained: usize,
    pub holdout_rows: usize,
    /// Gate metric on the fresh holdout / validation set: champion, then this model.
    pub holdout_before: f64,
    pub holdout_after: f64,
    pub validation_before: f64,
    pub validation_after: f64,
}
