//! Cold start: a pipeline with no model grows one on the device, from its own rows.
//!
//! ```text
//! placeholder bundle (version 0, never published from: its rows are stored, labels join them)
//!   → min_rows usable rows (time order)
//!   → the baseline model: the MLP with its output layer at zero, so whatever the input it
//!     answers the trivial model (the majority class, the target's mean, the mean row)
//!   → the ordinary fine-tune from it, every layer training, judged by the ordinary gate
//!     against that baseline on the newest rows (the time-ordered holdout)
//!   → version 1, made by `bundle::create` on the holdout rows (its validation set, baseline,
//!     threshold); an ordinary bundle from then on
//! ```
//! Training *from* the trivial model is what gives the gate its meaning here: the champion a
//! run must beat, beyond sampling noise, is "knowing nothing but the averages".
//!
//! The graph is what PyTorch exports for `nn.Sequential(Linear, ReLU, …)`, behind a frozen
//! standardisation (`Sub`, `Div`) whose mean and spread come from the rows before the holdout:
//! `features → Sub → Div → Gemm → Relu → … → Gemm → Softmax` for classifiers; regression and
//! reconstruction end in one more `Gemm` that starts as `x · σ + μ` (the target's scale), so
//! the layers before it learn in standard units and the output is in the sensor's.

use std::collections::BTreeMap;

use prost::Message;
use tract_onnx::pb::tensor_shape_proto::{dimension::Value as Dim, Dimension};
use tract_onnx::pb::type_proto::{Tensor, Value as Type};
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

use super::backend::Backend;
use super::data::{self, Dataset};
use super::{Outcome, TrainError};
use crate::model::bundle::{self, Bundle, CreateOptions};
use crate::model::manifest::{ColdStart, Task, Training};
use crate::rng::Rng;

/// The model's input tensor.
pub const INPUT: &str = "features";
/// The target column of the validation set a grown bundle carries.
pub const TARGET: &str = "label";

const ONNX_FLOAT: i32 = 1;
const ATTR_INT: i32 = 2;

/// The hyperparameters of a run from scratch: every layer trains, at a step size and for a
/// number of epochs a network far from its optimum needs (a fine-tune's defaults nudge a
/// trained one). Early stopping ends most runs long before `epochs`.
pub fn training(seed: u64, holdout: f64) -> Training {
    Training {
        trainable: "full".into(),
        optimizer: "adam".into(),
        learning_rate: 3e-3,
        batch: 32,
        epochs: 200,
        early_stopping_patience: 15,
        seed,
        holdout,
        ..Training::default()
    }
}

/// What the grown bundle's `[training]` says for the fine-tunes after it: the ordinary
/// defaults, every layer training (a small net grown here has no pre-trained part to keep).
fn later_training(seed: u64) -> Training {
    Training { trainable: "full".into(), seed, ..Training::default() }
}

fn output_name(task: Task) -> &'static str {
    match task {
        Task::Binary | Task::Multiclass => "probabilities",
        Task::Regression => "prediction",
        Task::Reconstruction => "reconstruction",
    }
}

/// Values per row of the output: two probabilities for a binary model (as a PyTorch export
/// gives), one per class, one value, or the row again.
fn output_width(task: Task, features: usize, classes: usize) -> usize {
    match task {
        Task::Binary => 2,
        Task::Multiclass => classes,
        Task::Regression => 1,
        Task::Reconstruction => features,
    }
}

/// Where the untrained model starts: the input's standardisation and its answer.
struct Start {
    mean: Vec<f32>,
    spread: Vec<f32>,
    /// The output layer's bias: classifiers' log class shares; zero before an output scale.
    head_bias: Vec<f32>,
    /// Regression and reconstruction: each output's (σ, μ), the last layer's start.
    output_scale: Option<(Vec<f32>, Vec<f32>)>,
}

fn tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: ONNX_FLOAT,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: output.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: ATTR_INT, i, ..Default::default() }
}

fn value_info(name: &str, width: usize) -> ValueInfoProto {
    let dims = vec![
        Dimension { value: Some(Dim::DimParam("batch".into())), ..Default::default() },
        Dimension { value: Some(Dim::DimValue(width as i64)), ..Default::default() },
    ];
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(Type::TensorType(Tensor {
                elem_type: ONNX_FLOAT,
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A `Gemm` as PyTorch exports `nn.Linear`: weight `[out, in]`, `transB = 1`.
fn dense(
    nodes: &mut Vec<NodeProto>,
    init: &mut Vec<TensorProto>,
    name: &str,
    input: &str,
    (k, n): (usize, usize),
    weight: &[f32],
    bias: &[f32],
) -> String {
    let (w, b) = (format!("{name}.weight"), format!("{name}.bias"));
    init.push(tensor(&w, &[n, k], weight));
    init.push(tensor(&b, &[n], bias));
    nodes.push(node("Gemm", &[input, &w, &b], name, vec![int_attr("transB", 1)]));
    name.to_string()
}

/// The ONNX model: hidden layers He-initialised from `seed`, the output layer at zero weights
/// and `start.head_bias`, so it answers the trivial model until trained.
fn mlp(task: Task, features: usize, hidden: &[usize], out: usize, start: &Start, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let (mut nodes, mut init) = (Vec::new(), Vec::new());
    init.push(tensor("scale.mean", &[features], &start.mean));
    init.push(tensor("scale.spread", &[features], &start.spread));
    nodes.push(node("Sub", &[INPUT, "scale.mean"], "centred", Vec::new()));
    nodes.push(node("Div", &["centred", "scale.spread"], "standardised", Vec::new()));
    let mut x = "standardised".to_string();
    let mut width = features;
    for (i, &h) in hidden.iter().enumerate() {
        // He uniform: keeps the variance of ReLU activations through the layers.
        let limit = (6.0 / width as f64).sqrt();
        let w: Vec<f32> = (0..width * h).map(|_| ((2.0 * rng.uniform() - 1.0) * limit) as f32).collect();
        let name = format!("hidden{}", i + 1);
        let z = dense(&mut nodes, &mut init, &name, &x, (width, h), &w, &vec![0.0; h]);
        x = format!("{name}.relu");
        nodes.push(node("Relu", &[&z], &x, Vec::new()));
        width = h;
    }
    let output = output_name(task);
    match &start.output_scale {
        None => {
            let logits =
                dense(&mut nodes, &mut init, "logits", &x, (width, out), &vec![0.0; width * out], &start.head_bias);
            nodes.push(node("Softmax", &[&logits], output, vec![int_attr("axis", 1)]));
        }
        Some((sigma, mu)) => {
            let head =
                dense(&mut nodes, &mut init, "head", &x, (width, out), &vec![0.0; width * out], &start.head_bias);
            let mut diagonal = vec![0.0; out * out];
            for (i, s) in sigma.iter().enumerate() {
                diagonal[i * out + i] = *s;
            }
            dense(&mut nodes, &mut init, output, &head, (out, out), &diagonal, mu);
        }
    }
    let graph = GraphProto {
        name: "lathe-cold-start".into(),
        node: nodes,
        initializer: init,
        input: vec![value_info(INPUT, features)],
        output: vec![value_info(output, out)],
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        producer_name: "lathe".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Per column of a row-major matrix (`w` values per row): mean and spread (σ, 1 where a
/// column is constant, so a stuck sensor divides by 1, not 0).
fn column_scale(m: &[f32], w: usize) -> (Vec<f32>, Vec<f32>) {
    let n = (m.len() / w.max(1)).max(1) as f64;
    let mut mean = vec![0.0f64; w];
    for row in m.chunks_exact(w) {
        row.iter().zip(&mut mean).for_each(|(v, s)| *s += f64::from(*v) / n);
    }
    let mut var = vec![0.0f64; w];
    for row in m.chunks_exact(w) {
        row.iter().zip(&mean).zip(&mut var).for_each(|((v, mu), s)| *s += (f64::from(*v) - mu).powi(2) / n);
    }
    let spread = var.iter().map(|v| if v.sqrt() > 1e-6 { v.sqrt() as f32 } else { 1.0 }).collect();
    (mean.iter().map(|&v| v as f32).collect(), spread)
}

/// A CSV of `rows` of `data`: the features, then the target (none for reconstruction).
fn csv(names: &[String], task: Task, data: &Dataset, rows: std::ops::Range<usize>) -> String {
    let f = data.features;
    let mut out = String::new();
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        crate::model::csv::push_cell(&mut out, name, ',');
    }
    if task != Task::Reconstruction {
        out.push(',');
        out.push_str(TARGET);
    }
    out.push('\n');
    for r in rows {
        let cells: Vec<String> = data.x[r * f..(r + 1) * f].iter().map(f32::to_string).collect();
        out.push_str(&cells.join(","));
        if let Some(y) = data.y.get(r).filter(|_| task != Task::Reconstruction) {
            out.push(',');
            out.push_str(&y.to_string());
        }
        out.push('\n');
    }
    out
}

fn options(
    name: &str,
    version: u64,
    task: Task,
    names: &[String],
    ranges: BTreeMap<String, (f64, f64)>,
) -> CreateOptions {
    CreateOptions {
        name: name.to_string(),
        version,
        task,
        target: (task != Task::Reconstruction).then(|| TARGET.to_string()),
        features: Some(names.to_vec()),
        ranges,
        units: BTreeMap::new(),
        source_model: String::new(),
        data_name: String::new(),
        trainable: "full".into(),
    }
}

/// Valid ranges that reject no finite reading.
fn unbounded(names: &[String]) -> BTreeMap<String, (f64, f64)> {
    names.iter().map(|n| (n.clone(), (f64::MIN, f64::MAX))).collect()
}

/// "MLP 9 → 32 → 16 → 7"
fn shape(features: usize, hidden: &[usize], out: usize) -> String {
    let widths: Vec<String> = std::iter::once(features)
        .chain(hidden.iter().copied())
        .chain(std::iter::once(out))
        .map(|w| w.to_string())
        .collect();
    format!("MLP {}", widths.join(" → "))
}

/// The bundle a cold-start pipeline runs before it has a model: the MLP's shape with nothing
/// learnt, two rows of zeros as its validation set (the engine's checks need rows; nobody
/// reads their baseline), ranges that reject nothing finite, and `cold_start` set, which
/// keeps every prediction it makes from being published.
///
/// # Errors
/// A spec the engine cannot build (no features, a class count below 2).
pub fn placeholder(name: &str, task: Task, features: &[String], cold: &ColdStart, seed: u64) -> Result<Bundle, String> {
    let f = features.len();
    let out = output_width(task, f, cold.classes);
    if f == 0 || out == 0 || (task == Task::Multiclass && cold.classes < 2) {
        return Err("a cold start needs features, and a multiclass one `classes` of 2 or more".into());
    }
    let scaled = matches!(task, Task::Regression | Task::Reconstruction);
    let start = Start {
        mean: vec![0.0; f],
        spread: vec![1.0; f],
        head_bias: vec![0.0; out],
        output_scale: scaled.then(|| (vec![1.0; out], vec![0.0; out])),
    };
    let model = mlp(task, f, &cold.hidden, out, &start, seed);
    let zeros = Dataset { x: vec![0.0; 2 * f], y: vec![0.0; 2], rows: 2, features: f, dropped: BTreeMap::new() };
    let mut opts = options(name, 0, task, features, unbounded(features));
    opts.source_model = format!("cold start: {} until it has grown one", shape(f, &cold.hidden, out));
    opts.data_name = "none yet".into();
    bundle::create(model, &csv(features, task, &zeros, 0..2), &opts)
        .and_then(|b| b.edited(|m| m.cold_start = Some(cold.clone())))
        .map_err(|e| e.to_string())
}

/// What a cold-start pipeline serves: the model it grew (the registry's champion under the
/// pipeline's name), else its placeholder.
///
/// # Errors
/// A registry that cannot be read.
pub fn serving(
    registry: &crate::model::Registry,
    pipeline: &str,
    cold: &super::config::ColdStartModel,
) -> Result<Bundle, crate::model::registry::RegistryError> {
    match registry.champion_version(pipeline)? {
        Some(_) => registry.champion(pipeline),
        None => placeholder(pipeline, cold.task, &cold.features, &cold.spec, 0).map_err(|e| {
            crate::model::registry::RegistryError::Bundle {
                path: registry.state_dir().join("registry").join(pipeline),
                source: crate::model::BundleError::Format(e),
            }
        }),
    }
}

/// Grows the first model of a cold-start pipeline from `data` (its rows in time order, read
/// against the placeholder): the baseline model from the rows before the holdout, the
/// fine-tune from it with [`training`]'s settings, and, accepted, version 1 made by
/// `bundle::create` on the holdout rows.
///
/// # Errors
/// Too few rows, or a model or backend failure. A refused run is not an error.
pub fn grow<B: Backend>(
    backend: &B,
    placeholder: &Bundle,
    data: Dataset,
    data_name: &str,
    training: &Training,
    check: &dyn Fn() -> Result<(), String>,
) -> Result<Outcome, TrainError> {
    let m = &placeholder.manifest;
    let cold = m.cold_start.as_ref().ok_or_else(|| TrainError::Model("not a cold-start placeholder".into()))?;
    let names: Vec<String> = m.inputs.iter().map(|i| i.name.clone()).collect();
    let (f, task) = (data.features, m.task);
    let out = output_width(task, f, cold.classes);
    let split = data::split(data.rows, training.holdout).map_err(|e| data.with_dropped_note(e))?;
    // The baseline looks only at the rows before the holdout, as the training does.
    let seen = split.holdout.start;
    let (mean, spread) = column_scale(&data.x[..seen * f], f);
    let (head_bias, output_scale, trivial) = match task {
        Task::Binary | Task::Multiclass => {
            let mut counts = vec![0usize; out];
            data.y[..seen].iter().for_each(|&y| counts[(y as usize).min(out - 1)] += 1);
            let total = (seen + out) as f64;
            let bias = counts.iter().map(|&c| ((c as f64 + 1.0) / total).ln() as f32).collect();
            let majority = counts.iter().enumerate().max_by_key(|(_, c)| **c).map_or(0, |(i, _)| i);
            (bias, None, format!("the majority class, {majority}"))
        }
        Task::Regression => {
            let y: Vec<f32> = data.y[..seen].iter().map(|&v| v as f32).collect();
            let (mu, sigma) = column_scale(&y, 1);
            let trivial = format!("the mean, {}", mu[0]);
            (vec![0.0], Some((sigma, mu)), trivial)
        }
        Task::Reconstruction => {
            (vec![0.0; f], Some((spread.clone(), mean.clone())), "each feature's mean (constant reconstruction)".into())
        }
    };
    let start = Start { mean, spread, head_bias, output_scale };
    let model = mlp(task, f, &cold.hidden, out, &start, training.seed);
    let validation = csv(&names, task, &data, split.holdout.clone());
    // A few hundred rows are not the plant's envelope: ranges from them would reject real
    // readings (measured: 1 of the next 1,000 Shuttle rows). A grown model rejects only
    // what is not a number; the drift monitor reports what it has not seen.
    let ranges = unbounded(&names);
    let described = shape(f, &cold.hidden, out);
    let mut opts = options(&m.name, 0, task, &names, ranges);
    opts.source_model = format!("grown on the device from scratch (cold start): {described}");
    opts.data_name = format!("{data_name}: the newest {} of {} rows", split.holdout.len(), data.rows);
    let trivial_bundle = bundle::create(model, &validation, &opts).map_err(|e| TrainError::Gate(e.to_string()))?;
    let mut outcome = super::fine_tune_on(backend, &trivial_bundle, data, data_name, training, None, check)?;
    outcome.record.outcome = format!("{} (cold start: the champion to beat was {trivial})", outcome.record.outcome);
    let Some(grown) = outcome.challenger.take() else { return Ok(outcome) };
    // Version 1 measured afresh on its validation set: a reconstruction model's threshold
    // is its own errors' 99th percentile, not the trivial model's.
    opts.version = 1;
    let lineage = grown.manifest.lineage.clone();
    let b = bundle::create(grown.model, &validation, &opts)
        .and_then(|b| {
            b.edited(|n| {
                n.training = later_training(training.seed);
                n.lineage = crate::model::manifest::Lineage {
                    created_by: format!(
                        "lathe cold start {} (run {})",
                        env!("CARGO_PKG_VERSION"),
                        outcome.record.run_id
                    ),
                    ..lineage
                };
            })
        })
        .map_err(|e| TrainError::Gate(e.to_string()))?;
    outcome.record.output_version = Some(1);
    outcome.record.output_sha256 = Some(b.sha256());
    outcome.challenger = Some(b);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::train::cpu::Cpu;

    fn root(path: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    /// The first `n` rows of the NASA Shuttle data (9 sensors, `anomaly`), in file order.
    fn shuttle(n: usize) -> String {
        use std::io::Read;
        let mut text = String::new();
        let file = std::fs::File::open(root("models/data/shuttle.csv.gz")).unwrap();
        flate2::read::GzDecoder::new(file).read_to_string(&mut text).unwrap();
        text.lines().take(n + 1).map(|l| format!("{l}\n")).collect::<String>().replace("anomaly", TARGET)
    }

    /// The office occupancy rows (temperature, humidity, light, CO2), time-ordered, with
    /// `target` as the name of column `target_of` (none: every column is a feature).
    fn occupancy(target_of: Option<&str>) -> (Vec<String>, String) {
        let text = std::fs::read_to_string(root("tests/fixtures/occupancy.csv")).unwrap();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').skip(1).collect();
        let header: Vec<String> =
            header.iter().map(|h| if Some(*h) == target_of { TARGET.into() } else { h.to_string() }).collect();
        let body: String = lines.map(|l| l.split_once(',').unwrap().1.to_string() + "\n").collect();
        (header.iter().filter(|h| *h != TARGET).cloned().collect(), format!("{}\n{body}", header.join(",")))
    }

    fn grow_on(task: Task, features: &[String], hidden: &[usize], csv: &str) -> (Bundle, Outcome) {
        let cold = ColdStart { hidden: hidden.to_vec(), min_rows: 100, classes: 2 };
        let placeholder = placeholder("grown", task, features, &cold, 7).unwrap();
        let classes = crate::train::classes(&placeholder, &placeholder.manifest.training).unwrap();
        let data = data::load(&placeholder.manifest, csv, classes).unwrap();
        let outcome =
            crate::train::fine_tune_on(&Cpu, &placeholder, data, "test rows", &training(7, 0.2), None, &|| Ok(()))
                .unwrap();
        (placeholder, outcome)
    }

    /// The placeholder answers the same for every row (it knows nothing), and its ranges
    /// reject no finite reading.
    #[test]
    fn the_placeholder_serves_nothing_it_could_have_learnt_and_refuses_no_reading() {
        let names: Vec<String> = (1..=9).map(|i| format!("f{i}")).collect();
        let cold = ColdStart { hidden: vec![32, 16], min_rows: 500, classes: 2 };
        let p = placeholder("line3", Task::Binary, &names, &cold, 1).unwrap();
        assert_eq!((p.manifest.version, p.manifest.cold_start.as_ref()), (0, Some(&cold)));
        assert!(p.manifest.inputs.iter().all(|i| i.min == f64::MIN && i.max == f64::MAX));
        let again = Bundle::from_bytes(&p.to_bytes().unwrap()).unwrap();
        assert_eq!(
            (again.sha256(), again.manifest.cold_start),
            (p.sha256(), Some(cold.clone())),
            "it survives its own format"
        );
        let out =
            Engine::load(&p.model).unwrap().run(&[0.0, 5.0, -3.0, 1e6, 2.0, 0.0, 1.0, 1.0, 9.0].repeat(2)).unwrap();
        assert_eq!(out.values[0], [0.5, 0.5, 0.5, 0.5]);
    }

    /// From the first 4,000 Shuttle rows alone, the grown model beats the majority class beyond
    /// noise, and on the same newest rows comes within 2 points of accuracy of the sample model
    /// trained offline (numpy, on 34,000 rows).
    #[test]
    fn a_binary_model_grown_from_4000_shuttle_rows_beats_the_majority_and_nears_the_offline_model() {
        let names: Vec<String> = (1..=9).map(|i| format!("f{i}")).collect();
        let csv = shuttle(4000);
        let (_, outcome) = grow_on(Task::Binary, &names, &[32, 16], &csv);
        let grown = outcome.challenger.expect(&outcome.record.outcome);
        let gate = outcome.record.gate.unwrap();
        assert!(gate.champion_holdout["f1"] < 0.01, "the trivial model finds no anomaly: {gate:?}");
        assert!(gate.challenger_holdout["f1"] > 0.9, "{gate:?}");
        assert!(outcome.record.outcome.contains("the majority class, 0"), "{}", outcome.record.outcome);
        let m = &grown.manifest;
        assert_eq!((m.version, m.parent.as_str(), m.cold_start.as_ref()), (1, "", None));
        assert_eq!((m.training.trainable.as_str(), m.baseline.rows), ("full", 800));
        assert!(m.lineage.created_by.starts_with("lathe cold start"), "{:?}", m.lineage);
        // Its validation set is the holdout: the offline model on the very same rows.
        let offline = Bundle::read(&root("models/shuttle-mlp-1.lathe")).unwrap();
        let (x, y) = (grown.validation_rows().unwrap(), grown.validation_targets().unwrap());
        let accuracy = |b: &Bundle| {
            let out = Engine::load(&b.model).unwrap().run(&x).unwrap();
            let right = (0..y.len())
                .filter(|&r| b.reading().class(out.row(b.manifest.primary_output, r)) == Some(y[r] as usize));
            right.count() as f64 / y.len() as f64
        };
        let (ours, theirs) = (accuracy(&grown), accuracy(&offline));
        eprintln!("accuracy on the newest 800 rows: grown {ours:.4}, offline {theirs:.4}");
        assert!(ours >= theirs - 0.02, "grown {ours} vs offline {theirs}");
        // An ordinary bundle from here: it reads back, and the fine-tune finds its tail.
        let again = Bundle::from_bytes(&grown.to_bytes().unwrap()).unwrap();
        let plan = crate::train::plan(&again.model, INPUT_OUTPUT, m.task, &m.training);
        assert_eq!(plan.map(|p| p.tail.layers.len()).ok(), Some(3));
    }
    const INPUT_OUTPUT: &str = "probabilities";

    /// Labels that are noise (each row's label drawn at random, 7 % ones as in the real data):
    /// nothing beats the majority class beyond sampling noise, and no model is grown.
    #[test]
    fn labels_that_are_noise_grow_no_model() {
        let names: Vec<String> = (1..=9).map(|i| format!("f{i}")).collect();
        let mut rng = Rng::new(5);
        let csv: String = shuttle(3000)
            .lines()
            .enumerate()
            .map(|(i, l)| match (i, l.rsplit_once(',')) {
                (0, _) | (_, None) => format!("{l}\n"),
                (_, Some((x, _))) => format!("{x},{}\n", u8::from(rng.uniform() < 0.07)),
            })
            .collect();
        let (_, outcome) = grow_on(Task::Binary, &names, &[32, 16], &csv);
        assert!(outcome.challenger.is_none(), "{}", outcome.record.outcome);
        assert!(outcome.record.outcome.starts_with("refused"), "{}", outcome.record.outcome);
    }

    /// An autoencoder of the office's four sensors: its 95th-percentile error beats the
    /// constant (mean) reconstruction's, and its threshold is its own.
    #[test]
    fn a_reconstruction_model_grown_from_occupancy_rows_beats_the_mean_row() {
        let (names, csv) = occupancy(None);
        let (_, outcome) = grow_on(Task::Reconstruction, &names, &[16, 8], &csv);
        let gate = outcome.record.gate.clone().unwrap();
        let grown = outcome.challenger.expect(&outcome.record.outcome);
        assert!(gate.challenger_holdout["error_p95"] < 0.5 * gate.champion_holdout["error_p95"], "{gate:?}");
        let threshold = grown.manifest.baseline.threshold.unwrap();
        assert!(threshold < gate.champion_holdout["error_p95"], "{threshold} {gate:?}");
    }

    /// Regression: CO2 from temperature, humidity and light beats predicting its mean.
    #[test]
    fn a_regression_model_grown_from_occupancy_rows_beats_the_mean() {
        let (names, csv) = occupancy(Some("V4"));
        let (_, outcome) = grow_on(Task::Regression, &names, &[16], &csv);
        let gate = outcome.record.gate.clone().unwrap();
        eprintln!("{}", outcome.record.outcome);
        assert!(outcome.challenger.is_some(), "{}", outcome.record.outcome);
        assert!(gate.challenger_holdout["rmse"] < gate.champion_holdout["rmse"], "{gate:?}");
    }
}
