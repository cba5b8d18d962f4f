//! The tract engine: an ONNX model with one `[batch, features]` input (or `[batch, frames,
//! features]` for a sequence model), planned once per batch size it is run at (a pinned shape
//! is ~2x faster than a symbolic batch at batch 64, measured on the sample MLP).

pub(crate) mod ml_ops;
#[cfg(feature = "ort")]
mod ort_session;
mod untrusted;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How much memory and time a model may take to load and run its validation set, in the
/// child process that tries it first (`infer::probe`; `[infer] load_memory_mb`, `load_timeout`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub memory_mb: u64,
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { memory_mb: 4096, timeout: Duration::from_secs(120) }
    }
}

use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
use tract_onnx::pb::type_proto::Value as TypeValue;
use tract_onnx::pb::{ModelProto, ValueInfoProto};
use tract_onnx::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("not a readable ONNX model: {0}")]
    Decode(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tract could not plan the model for batch {batch}: {reason}")]
    Plan { batch: usize, reason: String },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("tract panicked on this model ({0}); refusing it")]
    Panicked(String),
}

/// Largest batch a plan is made for.
const MAX_PLANNED_BATCH: usize = 64;
/// Longest window a sequence model may take (a declared 10⁹ would be a memory bomb).
pub const MAX_FRAMES: i64 = 4096;

/// What the model takes and gives, read from the ONNX graph itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub input: String,
    /// Size of the input's last dimension: one value per named feature.
    pub features: usize,
    /// Frames per sample: 1 for a `[batch, features]` input, N for a sequence model's
    /// `[batch, N, features]` (the last N frames of a device, oldest first).
    pub frames: usize,
    /// `Some(n)` when the model was exported with a fixed batch size (often 1).
    pub fixed_batch: Option<usize>,
    pub input_is_f64: bool,
    pub outputs: Vec<String>,
    /// A classifier trained on class names: the names, in the order of the class indices it
    /// now gives (`ml_ops::rewrite`). Empty for numeric classes and every other model.
    pub classes: Vec<String>,
}

/// One inference's results: for each model output, its values row-major, and how many
/// values belong to each row.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub values: Vec<Vec<f32>>,
    pub per_row: Vec<usize>,
}

impl Signature {
    /// Values one sample takes: `frames × features`.
    pub fn sample_len(&self) -> usize {
        self.frames * self.features
    }

    /// The input shape for `batch` samples.
    pub fn input_shape(&self, batch: usize) -> Vec<usize> {
        match self.frames {
            1 => vec![batch, self.features],
            n => vec![batch, n, self.features],
        }
    }
}

/// Every window of `n` consecutive frames in `frames` (`features` values each), oldest first,
/// flattened: the samples a sequence model takes from a series. Window `i` ends on frame
/// `i + n - 1`; fewer than `n` frames give none.
pub fn sliding_windows(frames: &[f32], features: usize, n: usize) -> Vec<f32> {
    let count = (frames.len() / features.max(1)).saturating_sub(n.saturating_sub(1));
    let mut out = Vec::with_capacity(count * n * features);
    for i in 0..count {
        out.extend_from_slice(&frames[i * features..(i + n) * features]);
    }
    out
}

impl Outputs {
    /// Output `o`'s values for row `r`.
    pub fn row(&self, o: usize, r: usize) -> &[f32] {
        let w = self.per_row[o];
        &self.values[o][r * w..(r + 1) * w]
    }
}

/// Which runtime executes a model (`infer.engine`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineKind {
    Tract,
    /// ONNX Runtime, loaded at run time from this `libonnxruntime.so` (feature `ort`).
    Ort {
        library: std::path::PathBuf,
        /// Execution providers to try, in order ("tensorrt", "cuda"); CPU is always last.
        providers: Vec<String>,
        /// `providers_policy = "strict"`: a provider that cannot be used is an error;
        /// otherwise ("auto") the session falls back to CPU with one log line.
        strict: bool,
    },
}

impl EngineKind {
    /// "tract" or "ort", for the status.
    pub fn name(&self) -> &'static str {
        match self {
            EngineKind::Tract => "tract",
            EngineKind::Ort { .. } => "ort",
        }
    }
}

/// Execution provider names `infer.providers` accepts.
pub const PROVIDERS: [&str; 2] = ["tensorrt", "cuda"];

pub struct Engine {
    pub signature: Signature,
    backend: Backend,
}

enum Backend {
    Tract {
        model: InferenceModel,
        /// Planned lazily per batch size. A Mutex because the active model is shared (hot
        /// swap); only the pipeline's own task runs it, so the lock is never contended.
        plans: Mutex<HashMap<usize, Arc<TypedRunnableModel>>>,
    },
    #[cfg(feature = "ort")]
    Ort(ort_session::OrtSession),
}

/// One output of one batch: its values and its shape.
pub type BatchOutput = (Vec<f32>, Vec<usize>);

/// Runs tract code that may panic on hostile models (tract #2390, #1177) as an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(EngineError::Panicked(crate::panic_message(p))))
}

impl Engine {
    /// Parses an ONNX model and checks it has the one `[batch, features]` input lathe feeds.
    ///
    /// # Errors
    /// Unreadable or unsupported models, or tract failing (or panicking) on them.
    pub fn load(onnx: &[u8]) -> Result<Engine, EngineError> {
        Engine::load_with(onnx, &EngineKind::Tract)
    }

    /// Like [`Engine::load`], on the runtime `kind` names. The same checks and rewrites run
    /// first whatever the runtime, so both see the same graph.
    ///
    /// # Errors
    /// Unreadable or unsupported models, a runtime failing (or panicking) on them, or a
    /// runtime this build does not have.
    pub fn load_with(onnx: &[u8], kind: &EngineKind) -> Result<Engine, EngineError> {
        guarded(|| {
            let mut proto = tract_onnx::onnx()
                .proto_model_for_read(&mut &*onnx)
                .map_err(|e| EngineError::Decode(format!("{e:#}")))?;
            let graph = proto.graph.as_mut().ok_or_else(|| EngineError::Decode("no graph".into()))?;
            untrusted::check(graph).map_err(EngineError::Unsupported)?;
            let classes = ml_ops::rewrite(graph);
            if matches!(kind, EngineKind::Tract) {
                ml_ops::trees_for_tract(graph).map_err(EngineError::Unsupported)?;
            }
            let signature = Signature { classes, ..signature(&proto)? };
            let backend = match kind {
                EngineKind::Tract => Backend::Tract {
                    model: {
                        standard_operators_only(graph_of(&proto)?)?;
                        tract_onnx::onnx()
                            .model_for_proto_model(&proto)
                            .map_err(|e| EngineError::Unsupported(format!("{e:#}")))?
                    },
                    plans: Mutex::new(HashMap::new()),
                },
                #[cfg(feature = "ort")]
                EngineKind::Ort { library, providers, strict } => {
                    Backend::Ort(ort_session::OrtSession::new(library, &proto, providers, *strict)?)
                }
                #[cfg(not(feature = "ort"))]
                EngineKind::Ort { .. } => {
                    return Err(EngineError::Unsupported("this build has no ONNX Runtime (feature `ort`)".into()))
                }
            };
            let engine = Engine { signature, backend };
            // Run one row now, so a model the runtime cannot run fails at load, not at the first message.
            engine.run(&vec![0.0; engine.signature.sample_len()])?;
            Ok(engine)
        })
    }

    /// The batch size a run of `n` rows is padded to: the fixed batch, or the next power of
    /// two up to `MAX_PLANNED_BATCH` (larger runs go in chunks), so at most 7 plans exist and
    /// a long run (the validation set) does not leave a huge plan behind.
    pub fn batch_for(&self, n: usize) -> usize {
        self.signature.fixed_batch.unwrap_or_else(|| n.clamp(1, MAX_PLANNED_BATCH).next_power_of_two())
    }

    fn plan(
        &self,
        model: &InferenceModel,
        plans: &Mutex<HashMap<usize, Arc<TypedRunnableModel>>>,
        batch: usize,
    ) -> Result<Arc<TypedRunnableModel>, EngineError> {
        let mut plans = plans.lock().map_err(|_| EngineError::Run("a previous plan panicked".into()))?;
        if let Some(p) = plans.get(&batch) {
            return Ok(p.clone());
        }
        let dt = if self.signature.input_is_f64 { f64::datum_type() } else { f32::datum_type() };
        let fact = InferenceFact::dt_shape(dt, self.signature.input_shape(batch));
        let model = model.clone();
        let plan = guarded(|| {
            model
                .with_input_fact(0, fact)
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable())
                .map_err(|e| EngineError::Plan { batch, reason: format!("{e:#}") })
        })?;
        plans.insert(batch, plan.clone());
        Ok(plan)
    }

    /// Runs `rows` (row-major samples of `sample_len()` values: one frame of `features`, or a
    /// sequence model's window of frames).
    ///
    /// # Errors
    /// A wrong row width, or tract failing on the batch.
    pub fn run(&self, rows: &[f32]) -> Result<Outputs, EngineError> {
        let f = self.signature.sample_len();
        if f == 0 || !rows.len().is_multiple_of(f) {
            return Err(EngineError::Run(format!("{} values is not a whole number of {f}-value samples", rows.len())));
        }
        let n = rows.len() / f;
        let mut outputs = Outputs {
            values: vec![Vec::with_capacity(n); self.signature.outputs.len()],
            per_row: vec![0; self.signature.outputs.len()],
        };
        let batch = self.batch_for(n);
        for chunk in rows.chunks(batch * f) {
            let rows_here = chunk.len() / f;
            let mut padded = chunk.to_vec();
            padded.resize(batch * f, 0.0);
            let result = self.run_batch(&padded, batch)?;
            for (o, (values, shape)) in result.into_iter().enumerate().take(outputs.values.len()) {
                let leading = shape.first().copied().unwrap_or(1);
                if leading != batch || values.len() % batch != 0 {
                    return Err(EngineError::Run(format!(
                        "output {:?} has shape {shape:?}; expected the batch ({batch}) first",
                        self.signature.outputs[o],
                    )));
                }
                let w = values.len() / batch;
                outputs.per_row[o] = w;
                outputs.values[o].extend(values.into_iter().take(rows_here * w));
            }
        }
        Ok(outputs)
    }

    /// One padded batch through the runtime: every output as f32 values and a shape.
    fn run_batch(&self, padded: &[f32], batch: usize) -> Result<Vec<BatchOutput>, EngineError> {
        let shape = self.signature.input_shape(batch);
        match &self.backend {
            Backend::Tract { model, plans } => {
                let plan = self.plan(model, plans, batch)?;
                let input = if self.signature.input_is_f64 {
                    let v: Vec<f64> = padded.iter().map(|&x| x as f64).collect();
                    Tensor::from_shape(&shape, &v)
                } else {
                    Tensor::from_shape(&shape, padded)
                }
                .map_err(|e| EngineError::Run(format!("{e:#}")))?;
                let result = guarded(|| plan.run(tvec!(input.into())).map_err(|e| EngineError::Run(format!("{e:#}"))))?;
                result
                    .iter()
                    .enumerate()
                    .map(|(o, value)| {
                        let t = value.cast_to::<f32>().map_err(|e| EngineError::Run(format!("output {o}: {e:#}")))?;
                        let view = t.to_plain_array_view::<f32>().map_err(|e| EngineError::Run(format!("{e:#}")))?;
                        Ok((view.iter().copied().collect(), view.shape().to_vec()))
                    })
                    .collect()
            }
            #[cfg(feature = "ort")]
            Backend::Ort(session) => session.run(padded, &shape, self.signature.input_is_f64),
        }
    }
}

fn graph_of(proto: &ModelProto) -> Result<&tract_onnx::pb::GraphProto, EngineError> {
    proto.graph.as_ref().ok_or_else(|| EngineError::Decode("no graph".into()))
}

/// tract runs the standard operator sets (and the `ai.onnx.ml` operators it or `ml_ops`
/// handles). A runtime's private operators (`com.microsoft.*`, written by onnxruntime's graph
/// optimizer) are named here, rather than failing deep inside tract's planner.
fn standard_operators_only(graph: &tract_onnx::pb::GraphProto) -> Result<(), EngineError> {
    match graph.node.iter().find(|n| !matches!(n.domain.as_str(), "" | "ai.onnx" | "ai.onnx.ml")) {
        Some(n) => Err(EngineError::Unsupported(format!(
            "node {:?} uses operator {}.{}, which only the runtime that defines it can run; \
             export the model without runtime-specific optimizations",
            if n.name.is_empty() { n.output.first().map_or("", String::as_str) } else { &n.name },
            n.domain,
            n.op_type
        ))),
        None => Ok(()),
    }
}

fn dims(v: &ValueInfoProto) -> Option<(i32, Vec<Option<i64>>)> {
    let TypeValue::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
    let dims = t
        .shape
        .as_ref()?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(Dim::DimValue(n)) if n > 0 => Some(n),
            _ => None,
        })
        .collect();
    Some((t.elem_type, dims))
}

const ONNX_FLOAT: i32 = 1;
const ONNX_DOUBLE: i32 = 11;

fn signature(proto: &ModelProto) -> Result<Signature, EngineError> {
    let graph = proto.graph.as_ref().ok_or_else(|| EngineError::Decode("no graph".into()))?;
    // Old exporters list initializers among the inputs too; those are not fed.
    let inputs: Vec<&ValueInfoProto> =
        graph.input.iter().filter(|i| !graph.initializer.iter().any(|t| t.name == i.name)).collect();
    let [input] = inputs.as_slice() else {
        return Err(EngineError::Unsupported(format!(
            "expected exactly one input tensor [batch, features], found {}",
            inputs.len()
        )));
    };
    let (elem, shape) =
        dims(input).ok_or_else(|| EngineError::Unsupported(format!("input {:?} has no tensor shape", input.name)))?;
    let input_is_f64 = match elem {
        ONNX_FLOAT => false,
        ONNX_DOUBLE => true,
        other => {
            return Err(EngineError::Unsupported(format!(
                "input {:?} has element type {other}; expected float",
                input.name
            )))
        }
    };
    let (fixed_batch, frames, features) = match shape.as_slice() {
        [batch, Some(f)] => (batch.map(|b| b as usize), 1, *f as usize),
        [batch, Some(n), Some(f)] if *n <= MAX_FRAMES => (batch.map(|b| b as usize), *n as usize, *f as usize),
        _ => {
            return Err(EngineError::Unsupported(format!(
                "input {:?} has shape {:?}; expected [batch, features] or, for a sequence model, \
                 [batch, frames, features] (at most {MAX_FRAMES} frames), with fixed frame and feature counts",
                input.name, shape
            )))
        }
    };
    if graph.output.is_empty() {
        return Err(EngineError::Unsupported("the model has no outputs".into()));
    }
    Ok(Signature {
        input: input.name.clone(),
        features,
        frames,
        fixed_batch,
        input_is_f64,
        outputs: graph.output.iter().map(|o| o.name.clone()).collect(),
        classes: Vec::new(),
    })
}
