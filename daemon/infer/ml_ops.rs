//! scikit-learn exports (skl2onnx) use a few `ai.onnx.ml` operators that tract does not
//! implement. They are simple enough to rewrite into standard ONNX before tract sees the
//! graph, so models "exported by a different tool" load as they are:
//! - `Scaler` (y = (x - offset) * scale) becomes `Sub` + `Mul`;
//! - `ArrayFeatureExtractor` (pick along the last axis) becomes `Gather(axis = -1)`;
//! - `ZipMap` (probability tensor -> list of maps, which no tensor runtime serves) is cut
//!   off, and the graph output of that name becomes the probability tensor itself.

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, TensorProto};

const FLOAT: i32 = 1;
const ATTR_INT: i32 = 2;

pub fn rewrite(graph: &mut GraphProto) {
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
