//! scikit-learn exports (skl2onnx) use a few `ai.onnx.ml` operators that tract does not
//! implement. They are simple enough to rewrite into standard ONNX before tract sees the
//! graph, so models "exported by a different tool" load as they are:
//! - `Scaler` (y = (x - offset) * scale) becomes `Sub` + `Mul`;
//! - `ArrayFeatureExtractor` (pick along the last axis) becomes `Gather(axis = -1)`;
//! - `ZipMap` (probability tensor -> list of maps, which no tensor runtime serves) is cut
//!   off, and the graph output of that name becomes the probability tensor itself.
//!
//! Tree ensembles (random forests and gradient boosting from scikit-learn, XGBoost and
//! LightGBM) need more, and only for tract ([`trees_for_tract`]); onnxruntime runs them as
//! they are.

use std::collections::BTreeSet;
use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, TensorProto};

const FLOAT: i32 = 1;
const INT64: i32 = 7;
const STRING: i32 = 8;
const ATTR_INT: i32 = 2;
const ATTR_FLOATS: i32 = 6;
const ATTR_INTS: i32 = 7;

///
/// A classifier trained on class names (`"normal"`, `"fault"`) declares them as
/// `classlabels_strings` and gives its label as a string, which no f32 output can carry.
/// Its labels become the class indices 0..n in the same order, and the names are returned
/// (empty for a model with numeric classes), so the bundle can say which index is which.
pub fn rewrite(graph: &mut GraphProto) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for node in graph.node.iter_mut().filter(|n| n.op_type.ends_with("Classifier")) {
        let Some(at) = node.attribute.iter().position(|a| a.name == "classlabels_strings") else { continue };
        let labels: Vec<String> =
            node.attribute[at].strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect();
        // The ONNX spec names the integer labels `classlabels_int64s` for tree ensembles and
        // `classlabels_ints` for the linear and SVM classifiers.
        let ints = if node.op_type == "TreeEnsembleClassifier" { "classlabels_int64s" } else { "classlabels_ints" };
        node.attribute[at] = ints_attribute(ints, (0..labels.len() as i64).collect());
        names = labels;
    }
    if !names.is_empty() {
        // The label output's declared type was a string; tract infers the new one.
        for out in graph.output.iter_mut().filter(|o| declared_type(o) == Some(STRING)) {
            out.r#type = None;
        }
    }
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut zipmaps = Vec::new();
    for node in std::mem::take(&mut graph.node) {
        match node.op_type.as_str() {
            "Scaler" => nodes.extend(scaler(&node, &mut graph.initializer)),
            "ArrayFeatureExtractor" => nodes.push(NodeProto {
                op_type: "Gather".into(),
                domain: String::new(),
                attribute: vec![AttributeProto { name: "axis".into(), r#type: ATTR_INT, i: -1, ..Default::default() }],
                ..node
            }),
            "ZipMap" => {
                if let (Some(tensor), Some(out)) = (node.input.first(), node.output.first()) {
                    zipmaps.push((tensor.clone(), out.clone()));
                }
            }
            _ => nodes.push(node),
        }
    }
    graph.node = nodes;
    for (tensor, map_output) in zipmaps {
        // Rename the probability tensor to the ZipMap's output name everywhere, so the graph
        // output keeps the name the exporter gave it.
        for node in graph.node.iter_mut() {
            for name in node.output.iter_mut().chain(node.input.iter_mut()).filter(|n| **n == tensor) {
                name.clone_from(&map_output);
            }
        }
        for out in graph.output.iter_mut().filter(|o| o.name == map_output) {
            out.r#type = None;
        }
    }
    names
}

/// The element type a graph output declares, if it declares a tensor.
fn declared_type(value: &tract_onnx::pb::ValueInfoProto) -> Option<i32> {
    match value.r#type.as_ref()?.value.as_ref()? {
        tract_onnx::pb::type_proto::Value::TensorType(t) => Some(t.elem_type),
    }
}

fn floats(node: &NodeProto, name: &str) -> Vec<f32> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.floats.clone()).unwrap_or_default()
}

fn constant(name: String, values: Vec<f32>) -> TensorProto {
    TensorProto { dims: vec![values.len() as i64], data_type: FLOAT, float_data: values, name, ..Default::default() }
}

fn scaler(node: &NodeProto, initializers: &mut Vec<TensorProto>) -> Vec<NodeProto> {
    let (Some(input), Some(output)) = (node.input.first(), node.output.first()) else {
        return vec![node.clone()];
    };
    let (offset_name, scale_name, centered) =
        (format!("{output}__offset"), format!("{output}__scale"), format!("{output}__centered"));
    initializers.push(constant(offset_name.clone(), floats(node, "offset")));
    initializers.push(constant(scale_name.clone(), floats(node, "scale")));
    let op = |op: &str, inputs: [&String; 2], out: &String| NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![out.clone()],
        name: format!("{}_{op}", node.name),
        ..Default::default()
    };
    vec![op("Sub", [input, &offset_name], &centered), op("Mul", [&centered, &scale_name], output)]
}

/// Rewrites the tree ensembles tract misreads or lacks into the `TreeEnsembleClassifier` it
/// runs, so they compute what onnxruntime computes (`tests/zoo.rs` checks both on the
/// exporters' own models):
/// - `TreeEnsembleRegressor`, which tract does not implement (every exported regression
///   forest), becomes a classifier whose scores are the targets ([`tree_regressor`]);
/// - a binary classifier that votes for one class only (scikit-learn's forests, and gradient
///   boosting, XGBoost and LightGBM with a logistic link) gets both classes' votes
///   ([`one_class_votes`]): tract took a single base value for an error, or picked the
///   wrong label.
///
/// A tree ensemble of another shape is left as it is: tract runs it or names what it cannot.
/// Only for tract: onnxruntime has its own reading of these operators, which the rewritten
/// graph would not match (it assumes a binary model's two base values are equal).
///
/// # Errors
/// A `TreeEnsembleRegressor` of a shape tract cannot be given, with the reason.
pub fn trees_for_tract(graph: &mut GraphProto) -> Result<(), String> {
    let mut nodes = Vec::with_capacity(graph.node.len());
    for node in std::mem::take(&mut graph.node) {
        match node.op_type.as_str() {
            "TreeEnsembleRegressor" => nodes.extend(tree_regressor(&node, &mut graph.initializer).map_err(|why| {
                let name =
                    if node.name.is_empty() { node.output.first().map_or("", String::as_str) } else { &node.name };
                format!("node {name:?} (TreeEnsembleRegressor): {why}")
            })?),
            "TreeEnsembleClassifier" => nodes.push(one_class_votes(&node).unwrap_or(node)),
            _ => nodes.push(node),
        }
    }
    graph.node = nodes;
    Ok(())
}

fn attribute<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn ints(node: &NodeProto, name: &str) -> Vec<i64> {
    attribute(node, name).map(|a| a.ints.clone()).unwrap_or_default()
}

fn text(node: &NodeProto, name: &str) -> Option<String> {
    attribute(node, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

fn floats_attribute(name: &str, floats: Vec<f32>) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: ATTR_FLOATS, floats, ..Default::default() }
}

fn ints_attribute(name: &str, ints: Vec<i64>) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: ATTR_INTS, ints, ..Default::default() }
}

/// A `TreeEnsembleRegressor` is a classifier's score path: the same trees, a leaf's target
/// weights its class weights, the base values added, no class picked. So it becomes a
/// classifier with one class per target, whose score output, cut to the targets by a
/// `Gather`, is the regressor's output. `AVERAGE` (a random forest) divides every leaf weight
/// by the number of trees, as onnxruntime divides the sum. `MIN`, `MAX`, a post transform,
/// and weights held as double tensors (`*_as_tensor`) are refused with the reason.
fn tree_regressor(node: &NodeProto, initializers: &mut Vec<TensorProto>) -> Result<Vec<NodeProto>, String> {
    let output = node.output.first().ok_or("no output")?;
    let targets = attribute(node, "n_targets").map_or(1, |a| a.i);
    let mut weights = floats(node, "target_weights");
    let base = floats(node, "base_values");
    if targets < 1 || !(base.is_empty() || base.len() == targets as usize) {
        return Err(format!("{} base values for {targets} targets", base.len()));
    }
    if weights.is_empty() {
        return Err(
            "no float target_weights (weights held as double tensors are not read; export with float32 inputs)".into(),
        );
    }
    if let Some(transform) = text(node, "post_transform").filter(|t| t != "NONE") {
        return Err(format!("post_transform {transform} is not read; export the regressor without one"));
    }
    match text(node, "aggregate_function").as_deref() {
        None | Some("SUM") => {}
        Some("AVERAGE") => {
            let trees = ints(node, "nodes_treeids").into_iter().collect::<BTreeSet<_>>().len().max(1);
            weights.iter_mut().for_each(|w| *w /= trees as f32);
        }
        Some(other) => return Err(format!("aggregate_function {other} is not read (SUM and AVERAGE are)")),
    }
    // tract lays out the scores of fewer than three classes as a binary classifier's
    // [1 - p, p]; three columns at least keep them as they are summed.
    let columns = targets.max(3);
    let mut attributes: Vec<AttributeProto> =
        node.attribute.iter().filter(|a| a.name.starts_with("nodes_")).cloned().collect();
    for (from, to) in
        [("target_ids", "class_ids"), ("target_nodeids", "class_nodeids"), ("target_treeids", "class_treeids")]
    {
        let votes = attribute(node, from).ok_or_else(|| format!("no {from}"))?;
        attributes.push(AttributeProto { name: to.into(), ..votes.clone() });
    }
    attributes.push(floats_attribute("class_weights", weights));
    attributes.push(ints_attribute("classlabels_int64s", (0..columns).collect()));
    if !base.is_empty() {
        let mut base = base;
        base.resize(columns as usize, 0.0);
        attributes.push(floats_attribute("base_values", base));
    }
    let (scores, picked) = (format!("{output}__scores"), format!("{output}__targets"));
    initializers.push(TensorProto {
        dims: vec![targets],
        data_type: INT64,
        int64_data: (0..targets).collect(),
        name: picked.clone(),
        ..Default::default()
    });
    let classifier = NodeProto {
        op_type: "TreeEnsembleClassifier".into(),
        domain: node.domain.clone(),
        input: node.input.clone(),
        output: vec![format!("{output}__label"), scores.clone()],
        name: node.name.clone(),
        attribute: attributes,
        ..Default::default()
    };
    let gather = NodeProto {
        op_type: "Gather".into(),
        input: vec![scores, picked],
        output: vec![output.clone()],
        name: format!("{}_targets", node.name),
        attribute: vec![AttributeProto { name: "axis".into(), r#type: ATTR_INT, i: 1, ..Default::default() }],
        ..Default::default()
    };
    Ok(vec![classifier, gather])
}

/// A binary classifier whose leaves all vote for class 0 (one score s = sum + base) is read
/// by onnxruntime as:
/// - weights all positive, no post transform (a scikit-learn random forest): probabilities
///   [1 − s, s], label 1 when s > 0.5;
/// - some weight negative, a logistic link (gradient boosting, XGBoost, LightGBM):
///   probabilities [σ(−s), σ(s)], label 1 when s > 0;
/// - some weight negative, no post transform: scores [−s, s], label 1 when s > 0.
///
/// tract computes the same probabilities but picks its label from [s, 0] (from [σ(s), σ(0)]
/// with the link), which names the wrong class, and it takes a single base value for an
/// error. Voting −w for class 0 and w for class 1 at every leaf, from base values [1 − b, b]
/// (all positive) or [−b, b], gives tract onnxruntime's scores and label. Other shapes
/// (a logistic link over positive weights) are left as they are.
fn one_class_votes(node: &NodeProto) -> Option<NodeProto> {
    let labels =
        ints(node, "classlabels_int64s").len() + attribute(node, "classlabels_strings").map_or(0, |a| a.strings.len());
    let (ids, weights, base) = (ints(node, "class_ids"), floats(node, "class_weights"), floats(node, "base_values"));
    let binary = labels == 2 && !ids.is_empty() && ids.iter().all(|&c| c == 0) && weights.len() == ids.len();
    let positive = weights.iter().all(|&w| w >= 0.0);
    let b = base.first().copied().unwrap_or(0.0);
    let class_0_base = match text(node, "post_transform").as_deref() {
        None | Some("NONE") if positive => 1.0 - b,
        None | Some("NONE") | Some("LOGISTIC") if !positive => -b,
        _ => return None,
    };
    if !binary || base.len() > 1 {
        return None;
    }
    // Each leaf's two votes side by side: tract wants the leaves in their trees' order.
    let pairs = |name: &str| ints(node, name).iter().flat_map(|&v| [v, v]).collect::<Vec<_>>();
    let mut rewritten = node.clone();
    rewritten.attribute.retain(|a| {
        !matches!(a.name.as_str(), "class_ids" | "class_nodeids" | "class_treeids" | "class_weights" | "base_values")
    });
    rewritten.attribute.extend([
        ints_attribute("class_ids", ids.iter().flat_map(|_| [0, 1]).collect()),
        ints_attribute("class_nodeids", pairs("class_nodeids")),
        ints_attribute("class_treeids", pairs("class_treeids")),
        floats_attribute("class_weights", weights.iter().flat_map(|&w| [-w, w]).collect()),
        floats_attribute("base_values", vec![class_0_base, b]),
    ]);
    Some(rewritten)
}
