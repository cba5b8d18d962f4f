//! ONNX Runtime as a second engine (feature `ort`). The library is loaded at run time
//! (`load-dynamic`) from the path in `infer.ort_library`, so one binary runs where the runtime
//! is installed and still starts (with tract) where it is not.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
use prost::Message;
use tract_onnx::pb::ModelProto;

use super::{BatchOutput, EngineError};

/// ONNX Runtime allows one environment per process: the first library path wins.
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

fn environment(library: &Path) -> Result<&'static Environment, EngineError> {
    ENVIRONMENT
        .get_or_init(|| {
            // `init_from` returns an error for a missing library (the lazy ORT_DYLIB_PATH path
            // panics when the library is missing).
            ort::init_from(library)
                .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", library.display()))?
                .with_name("lathe")
                .build()
                .map_err(|e| format!("ONNX Runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| EngineError::Unsupported(e.clone()))
}

/// The execution providers to register, in order. A provider the library was not built with
/// is an error under `strict`; otherwise it is skipped with one log line and the session
/// runs on what remains (CPU last, always). Under `strict` a provider that fails to register
/// fails the session too (`error_on_failure`).
fn execution_providers(
    library: &Path,
    names: &[String],
    strict: bool,
) -> Result<Vec<ort::ep::ExecutionProviderDispatch>, EngineError> {
    use ort::ep::{ExecutionProvider, TensorRT, CUDA};
    let mut out = Vec::new();
    for name in names {
        let (available, dispatch) = match name.as_str() {
            "cuda" => (CUDA::is_available(), CUDA::default().build()),
            "tensorrt" => (TensorRT::is_available(), TensorRT::default().build()),
            other => return Err(EngineError::Unsupported(format!("unknown execution provider {other:?}"))),
        };
        match (available, strict) {
            (Ok(true), true) => out.push(dispatch.error_on_failure()),
            (Ok(true), false) => out.push(dispatch),
            (_, true) => {
                return Err(EngineError::Unsupported(format!(
                    "execution provider {name:?} is not available in {} (providers_policy = \"strict\")",
                    library.display()
                )))
            }
            (_, false) => {
                tracing::warn!(
                    "Execution provider {name:?} is not available in {}; running on the CPU",
                    library.display()
                )
            }
        }
    }
    Ok(out)
}

pub struct OrtSession {
    /// `Session::run` takes `&mut self`; only the pipeline's own task runs it.
    session: Mutex<Session>,
    input: String,
    outputs: Vec<String>,
}

impl OrtSession {
    /// # Errors
    /// The library failing to load, or ONNX Runtime refusing the model.
    pub fn new(
        library: &Path,
        proto: &ModelProto,
        providers: &[String],
        strict: bool,
    ) -> Result<OrtSession, EngineError> {
        let env = environment(library)?;
        let bytes = proto.encode_to_vec();
        let eps = execution_providers(library, providers, strict)?;
        let session = Session::builder(env)
            .and_then(|b| b.with_optimization_level(GraphOptimizationLevel::All).map_err(Into::into))
            .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
            .and_then(|b| b.with_execution_providers(eps).map_err(Into::into))
            .and_then(|mut b| b.commit_from_memory(&bytes))
            .map_err(|e| EngineError::Unsupported(format!("ONNX Runtime: {e}")))?;
        let input = session.inputs().first().map(|i| i.name().to_string()).unwrap_or_default();
        let outputs = session.outputs().iter().map(|o| o.name().to_string()).collect();
        Ok(OrtSession { session: Mutex::new(session), input, outputs })
    }

    /// # Errors
    /// ONNX Runtime failing on the batch, or an output that is not numeric.
    pub fn run(&self, padded: &[f32], shape: &[usize], f64_input: bool) -> Result<Vec<BatchOutput>, EngineError> {
        let err = |e: ort::Error| EngineError::Run(format!("ONNX Runtime: {e}"));
        let input = if f64_input {
            let v: Vec<f64> = padded.iter().map(|&x| f64::from(x)).collect();
            Tensor::from_array((shape.to_vec(), v)).map_err(err)?.into_dyn()
        } else {
            Tensor::from_array((shape.to_vec(), padded.to_vec())).map_err(err)?.into_dyn()
        };
        let mut session = self.session.lock().map_err(|_| EngineError::Run("a previous run panicked".into()))?;
        let result = session.run(ort::inputs![self.input.as_str() => input]).map_err(err)?;
        let mut out = Vec::with_capacity(self.outputs.len());
        for name in &self.outputs {
            let value = &result[name.as_str()];
            let (shape, values): (Vec<usize>, Vec<f32>) = if let Ok((s, v)) = value.try_extract_tensor::<f32>() {
                (dims(s), v.to_vec())
            } else if let Ok((s, v)) = value.try_extract_tensor::<i64>() {
                (dims(s), v.iter().map(|&x| x as f32).collect())
            } else if let Ok((s, v)) = value.try_extract_tensor::<f64>() {
                (dims(s), v.iter().map(|&x| x as f32).collect())
            } else {
                return Err(EngineError::Run(format!("output {name:?} is not a numeric tensor")));
            };
            out.push((values, shape));
        }
        Ok(out)
    }
}

fn dims(shape: &ort::value::Shape) -> Vec<usize> {
    shape.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect()
}
