//! The trainable part of a bundle's ONNX graph: the dense tail that real exporters produce.
//!
//! Walking back from the primary output, every node that is a dense layer or an activation
//! joins the tail — `Gemm` (any transB/alpha/beta), `MatMul`+`Add`, `MatMul`, `Relu`,
//! `LeakyRelu`, `Sigmoid`, `Tanh`, `Softmax`, and the no-ops `Identity`, `Flatten`, `Dropout`
//! (inference form). The first node that is none of these ends the walk: it and everything
//! before it are frozen and computed by the inference engine. That covers PyTorch
//! (`nn.Linear` → `Gemm transB=1`), scikit-learn (`MatMul`+`Add`, after the `Scaler`) and Keras
//! via tf2onnx (`MatMul`+`Add`). Training changes only the initializers the tail reads, so the
//! exported graph is the original graph, node for node.

use std::collections::HashMap;

use prost::Message;
use tract_onnx::pb::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};

use super::backend::Activation;

const ONNX_FLOAT: i32 = 1;

/// One dense layer of the tail: `y = act(x · weight + bias)`, canonical whatever the exporter wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLayer {
    /// The ONNX node (or `MatMul+Add` pair) it came from, for records and messages.
    pub node: String,
    pub in_dim: usize,
    pub out_dim: usize,
    /// `[in_dim, out_dim]` row-major, Gemm's alpha folded in.
    pub weight: Vec<f32>,
    /// Gemm's beta folded in.
    pub bias: Option<Vec<f32>>,
    pub activations: Vec<Activation>,
    source: Source,
}

/// Where a layer's numbers live in the ONNX file and in which layout.
#[derive(Debug, Clone, PartialEq)]
struct Source {
    weight: String,
    /// The initializer is `[out, in]` (Gemm transB = 1).
    transposed: bool,
    alpha: f32,
    bias: Option<String>,
    beta: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tail {
    /// The tensor the tail reads: the model input, or the frozen part's output.
    pub input: String,
    /// True when `input` is the model's own input (nothing frozen before the tail).
    pub starts_at_model_input: bool,
    pub layers: Vec<DenseLayer>,
    /// Why the walk stopped where it did.
    pub stopped_by: String,
}

impl Tail {
    /// The number of values per row the tail reads.
    pub fn in_dim(&self) -> usize {
        self.layers.first().map_or(0, |l| l.in_dim)
    }

    pub fn out_dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out_dim)
    }
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_f(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map_or(default, |a| a.f)
}

fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

fn node_label(node: &NodeProto) -> String {
    let name = if node.name.is_empty() { node.output.first().map_or("?", String::as_str) } else { &node.name };
    format!("node {name:?} ({})", node.op_type)
}

/// The f32 values and dims of an initializer.
pub fn floats(t: &TensorProto) -> Result<(Vec<f32>, Vec<usize>), String> {
    if t.data_type != ONNX_FLOAT {
        return Err(format!("initializer {:?} is not float32 (type {})", t.name, t.data_type));
    }
    let dims: Vec<usize> = t.dims.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
    let count: usize = dims.iter().product();
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    } else {
        t.float_data.clone()
    };
    if values.len() != count {
        return Err(format!("initializer {:?} holds {} values for dims {:?}", t.name, values.len(), dims));
    }
    Ok((values, dims))
}

struct Walk<'a> {
    producer: HashMap<&'a str, &'a NodeProto>,
    initializer: HashMap<&'a str, &'a TensorProto>,
    consumers: HashMap<&'a str, usize>,
}

enum Step {
    Dense(DenseLayer, String),
    Act(Activation, String),
    Skip(String),
    Stop(String),
}

impl<'a> Walk<'a> {
    fn new(graph: &'a GraphProto) -> Walk<'a> {
        let mut consumers: HashMap<&str, usize> = HashMap::new();
        for n in &graph.node {
            for i in &n.input {
                *consumers.entry(i.as_str()).or_default() += 1;
            }
        }
        Walk {
            producer: graph.node.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect(),
            initializer: graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect(),
            consumers,
        }
    }

    /// An initializer only this node reads (a shared weight would change elsewhere too).
    fn own_weight(&self, name: &str, node: &NodeProto) -> Result<(Vec<f32>, Vec<usize>), String> {
        let t = self
            .initializer
            .get(name)
            .ok_or_else(|| format!("{}: {name:?} is not a stored weight", node_label(node)))?;
        if self.consumers.get(name).copied().unwrap_or(0) > 1 {
            return Err(format!("{}: weight {name:?} is shared with other nodes", node_label(node)));
        }
        floats(t).map_err(|e| format!("{}: {e}", node_label(node)))
    }

    fn bias(&self, name: &str, node: &NodeProto, n: usize) -> Result<Vec<f32>, String> {
        let (values, dims) = self.own_weight(name, node)?;
        match dims.as_slice() {
            [d] | [1, d] if *d == n => Ok(values),
            _ => Err(format!("{}: bias {name:?} has dims {dims:?}; a trainable bias has {n} values", node_label(node))),
        }
    }

    fn matmul(&self, node: &NodeProto, label: String) -> Result<DenseLayer, String> {
        let [x, w] = node.input.as_slice() else { return Err(format!("{label}: expected 2 inputs")) };
        let _ = x;
        let (weight, dims) = self.own_weight(w, node)?;
        let [k, n] = dims.as_slice() else { return Err(format!("{label}: weight {w:?} is not a matrix ({dims:?})")) };
        let source = Source { weight: w.clone(), transposed: false, alpha: 1.0, bias: None, beta: 1.0 };
        Ok(DenseLayer { node: label, in_dim: *k, out_dim: *n, weight, bias: None, activations: vec![], source })
    }

    /// A `Gemm` and the tensor its rows come from. `transA = 1` reads its input transposed,
    /// which in a row-batched model means the input is `Transpose(x)`: the pair is a plain dense
    /// layer on `x`.
    fn gemm(&self, node: &NodeProto) -> Result<(DenseLayer, String), String> {
        let label = node_label(node);
        let a = node.input.first().cloned().unwrap_or_default();
        let input = if attr_i(node, "transA", 0) == 0 {
            a
        } else {
            let t = self.producer.get(a.as_str()).filter(|t| {
                let perm = attr(t, "perm").map(|p| p.ints.clone()).unwrap_or_else(|| vec![1, 0]);
                t.op_type == "Transpose" && perm == [1, 0]
            });
            match t {
                Some(t) => t.input.first().cloned().unwrap_or_default(),
                None => {
                    return Err(format!(
                        "{label}: transA = 1 on a tensor that is not a transposed row batch; \
                         lathe trains row-batched tails"
                    ))
                }
            }
        };
        let (alpha, beta) = (attr_f(node, "alpha", 1.0), attr_f(node, "beta", 1.0));

        if alpha == 0.0 {
            return Err(format!("{label}: alpha = 0 leaves nothing to train"));
        }
        let transposed = attr_i(node, "transB", 0) != 0;
        let w = node.input.get(1).ok_or_else(|| format!("{label}: no weight input"))?;
        let (raw, dims) = self.own_weight(w, node)?;
        let [d0, d1] = dims.as_slice() else { return Err(format!("{label}: weight {w:?} is not a matrix ({dims:?})")) };
        let (k, n) = if transposed { (*d1, *d0) } else { (*d0, *d1) };
        let mut weight = vec![0.0; k * n];
        for i in 0..k {
            for j in 0..n {
                weight[i * n + j] = alpha * if transposed { raw[j * k + i] } else { raw[i * n + j] };
            }
        }
        let bias_name = node.input.get(2).filter(|b| !b.is_empty() && beta != 0.0);
        let bias = match bias_name {
            Some(b) => Some(self.bias(b, node, n)?.into_iter().map(|v| v * beta).collect()),
            None => None,
        };
        let source = Source { weight: w.clone(), transposed, alpha, bias: bias_name.cloned(), beta };
        Ok((DenseLayer { node: label, in_dim: k, out_dim: n, weight, bias, activations: vec![], source }, input))
    }

    /// `Add(MatMul(x, W), b)` in either operand order.
    fn matmul_add(&self, add: &NodeProto) -> Result<(DenseLayer, String), String> {
        let label = node_label(add);
        let [a, b] = add.input.as_slice() else { return Err(format!("{label}: expected 2 inputs")) };
        let (data, bias) = if self.initializer.contains_key(b.as_str()) { (a, b) } else { (b, a) };
        let mm = self
            .producer
            .get(data.as_str())
            .filter(|n| n.op_type == "MatMul")
            .ok_or_else(|| format!("{label} does not add a bias to a MatMul"))?;
        let mut layer = self.matmul(mm, format!("{} + {label}", node_label(mm)))?;
        layer.bias = Some(self.bias(bias, add, layer.out_dim)?);
        layer.source.bias = Some(bias.clone());
        Ok((layer, mm.input[0].clone()))
    }

    /// What the node producing `tensor` contributes to the tail.
    fn step(&self, tensor: &str) -> Step {
        let Some(node) = self.producer.get(tensor) else {
            return Step::Stop(format!("{tensor:?} is not computed by a node"));
        };
        let first = || node.input.first().cloned().unwrap_or_default();
        let act = |a| Step::Act(a, first());
        match node.op_type.as_str() {
            "Relu" => act(Activation::Relu),
            "LeakyRelu" => act(Activation::LeakyRelu(attr_f(node, "alpha", 0.01))),
            "Sigmoid" => act(Activation::Sigmoid),
            "Tanh" => act(Activation::Tanh),
            "Softmax" => match attr_i(node, "axis", -1) {
                1 | -1 => act(Activation::Softmax),
                axis => Step::Stop(format!("{}: softmax over axis {axis}, not the feature axis", node_label(node))),
            },
            "Flatten" if attr_i(node, "axis", 1) == 1 => Step::Skip(first()),
            "Identity" | "Dropout" => Step::Skip(first()),
            "Gemm" => match self.gemm(node) {
                Ok((l, input)) => Step::Dense(l, input),
                Err(e) => Step::Stop(e),
            },
            "MatMul" => match self.matmul(node, node_label(node)) {
                Ok(l) => Step::Dense(l, first()),
                Err(e) => Step::Stop(e),
            },
            "Add" => match self.matmul_add(node) {
                Ok((l, input)) => Step::Dense(l, input),
                Err(e) => Step::Stop(e),
            },
            "TreeEnsembleClassifier" | "TreeEnsembleRegressor" | "TreeEnsemble" => Step::Stop(format!(
                "{} is a tree ensemble: lathe serves and monitors it but fine-tunes only dense layers \
                 (retrain the trees where they were made and send a new bundle)",
                node_label(node)
            )),
            _ => Step::Stop(format!("{} is not an op lathe trains", node_label(node))),
        }
    }
}

/// scikit-learn's binary classifiers end in `Concat(1 − p, p)` with `p = Sigmoid(logit)`: the
/// pair is one probability written twice, so the tail really ends at `p` (one output, trained
/// with BCE on the logit). Returns `p`'s tensor for such a head.
fn probability_pair(walk: &Walk, output: &str) -> Option<String> {
    let concat = walk.producer.get(output).filter(|n| n.op_type == "Concat")?;
    let [neg, p] = concat.input.as_slice() else { return None };
    let sub = walk.producer.get(neg.as_str()).filter(|n| n.op_type == "Sub")?;
    let [one, q] = sub.input.as_slice() else { return None };
    let ones = floats(walk.initializer.get(one.as_str())?).ok()?.0;
    let is_sigmoid = walk.producer.get(p.as_str()).is_some_and(|n| n.op_type == "Sigmoid");
    (q == p && is_sigmoid && ones.iter().all(|&v| v == 1.0) && matches!(attr_i(concat, "axis", 1), 1 | -1))
        .then(|| p.clone())
}

/// Finds the dense tail ending at `output`. `graph` should already have had the ML-operator
/// rewrite (`engine::ml_ops`), as the engine sees it.
///
/// # Errors
/// A tail with no dense layer (the message names the node that stopped it), or one whose
/// layer sizes do not chain.
pub fn tail(graph: &GraphProto, output: &str) -> Result<Tail, String> {
    let walk = Walk::new(graph);
    let model_inputs: Vec<&str> =
        graph.input.iter().map(|i| i.name.as_str()).filter(|n| !walk.initializer.contains_key(n)).collect();
    let mut tensor = probability_pair(&walk, output).unwrap_or_else(|| output.to_string());
    let mut layers: Vec<DenseLayer> = Vec::new();
    // Activations met since the last dense layer (walking backwards, so they follow it).
    let mut pending: Vec<Activation> = Vec::new();
    let mut tail_input = String::new();
    let stopped_by = loop {
        if model_inputs.contains(&tensor.as_str()) {
            break "the model input".to_string();
        }
        match walk.step(&tensor) {
            Step::Dense(mut layer, input) => {
                pending.reverse();
                layer.activations = std::mem::take(&mut pending);
                layers.push(layer);
                tail_input.clone_from(&input);
                tensor = input;
            }
            Step::Act(a, input) => {
                pending.push(a);
                tensor = input;
            }
            Step::Skip(input) => tensor = input,
            Step::Stop(reason) => break reason,
        }
    };
    layers.reverse();
    if layers.is_empty() {
        return Err(format!("no trainable dense layer before output {output:?}: {stopped_by}"));
    }
    for pair in layers.windows(2) {
        if pair[0].out_dim != pair[1].in_dim {
            return Err(format!(
                "{} gives {} values but {} takes {}",
                pair[0].node, pair[0].out_dim, pair[1].node, pair[1].in_dim
            ));
        }
    }
    Ok(Tail {
        starts_at_model_input: model_inputs.contains(&tail_input.as_str()),
        input: tail_input,
        layers,
        stopped_by,
    })
}

/// Decodes a model and applies the same ML-operator rewrite the engine does.
///
/// # Errors
/// Bytes that are not an ONNX model.
pub fn decode(onnx: &[u8]) -> Result<ModelProto, String> {
    let mut proto = ModelProto::decode(onnx).map_err(|e| format!("not a readable ONNX model: {e}"))?;
    let graph = proto.graph.as_mut().ok_or("the model has no graph")?;
    crate::engine::ml_ops::rewrite(graph);
    Ok(proto)
}

/// The tail of a model file, ending at its output named `output`.
///
/// # Errors
/// See [`tail`] and [`decode`].
pub fn tail_of(onnx: &[u8], output: &str) -> Result<Tail, String> {
    let proto = decode(onnx)?;
    let graph = proto.graph.as_ref().ok_or("the model has no graph")?;
    tail(graph, output)
}

/// A model computing only the frozen part: the original graph with `tensor` as its one output.
///
/// # Errors
/// Bytes that are not an ONNX model.
pub fn frozen_part(onnx: &[u8], tensor: &str) -> Result<Vec<u8>, String> {
    let mut proto = ModelProto::decode(onnx).map_err(|e| format!("not a readable ONNX model: {e}"))?;
    let graph = proto.graph.as_mut().ok_or("the model has no graph")?;
    graph.output = vec![tract_onnx::pb::ValueInfoProto { name: tensor.to_string(), ..Default::default() }];
    Ok(proto.encode_to_vec())
}

fn store(t: &mut TensorProto, values: &[f32]) {
    t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    t.float_data.clear();
}

/// The original model with the tail's initializers replaced by `layers`' weights (in the
/// exporter's layout: transposes and alpha/beta undone). Nothing else changes.
///
/// # Errors
/// A model that is not the one the tail came from.
pub fn export(onnx: &[u8], layers: &[DenseLayer]) -> Result<Vec<u8>, String> {
    let mut proto = ModelProto::decode(onnx).map_err(|e| format!("not a readable ONNX model: {e}"))?;
    let graph = proto.graph.as_mut().ok_or("the model has no graph")?;
    for layer in layers {
        let s = &layer.source;
        let (k, n) = (layer.in_dim, layer.out_dim);
        let mut raw = vec![0.0; k * n];
        for i in 0..k {
            for j in 0..n {
                let v = layer.weight[i * n + j] / s.alpha;
                if s.transposed {
                    raw[j * k + i] = v;
                } else {
                    raw[i * n + j] = v;
                }
            }
        }
        let mut tensors = vec![(&s.weight, raw)];
        if let (Some(name), Some(bias)) = (&s.bias, &layer.bias) {
            tensors.push((name, bias.iter().map(|b| b / s.beta).collect()));
        }
        for (name, values) in tensors {
            let t = graph
                .initializer
                .iter_mut()
                .find(|t| &t.name == name)
                .ok_or_else(|| format!("initializer {name:?} is not in the model"))?;
            if t.dims.iter().product::<i64>() != values.len() as i64 {
                return Err(format!("initializer {name:?} does not have {} values", values.len()));
            }
            store(t, &values);
        }
    }
    Ok(proto.encode_to_vec())
}
