//! The trainer against PyTorch, step by step: `tests/fixtures/train/vectors.json`
//! (made by `tests/fixtures/make_training_vectors.py`) holds PyTorch's losses and final weights for every
//! optimizer and loss. Run on the CPU backend by tests/train.rs and on CUDA by tests/cuda.rs
//! (a GPU) and tests/cuda_emulated.rs.

use std::collections::BTreeMap;

use lathe::train::backend::{Backend, Loss, Update};
use lathe::train::graph;
use lathe::train::net::{Mode, Net};
use serde_json::Value;

use super::fixture;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

pub fn initializers(onnx: &[u8]) -> BTreeMap<String, Vec<f32>> {
    use prost::Message;
    let proto = tract_onnx::pb::ModelProto::decode(onnx).unwrap();
    proto.graph.unwrap().initializer.iter().map(|t| (t.name.clone(), graph::floats(t).unwrap().0)).collect()
}

/// Same initial weights (the exported ONNX), same batches in the same order, same
/// hyperparameters as PyTorch: per-step loss within 1e-4 relative, final weights within 1e-3.
pub fn training_matches_pytorch_step_by_step<B: Backend>(b: &B) {
    let vectors: Value = serde_json::from_slice(&std::fs::read(fixture("train/vectors.json")).unwrap()).unwrap();
    let x = floats(&vectors["x"]);
    let f = vectors["features"].as_u64().unwrap() as usize;
    let batches: Vec<Vec<usize>> = vectors["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect())
        .collect();
    let cases = vectors["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let onnx = std::fs::read(fixture(&format!("train/{}", case["model"].as_str().unwrap()))).unwrap();
        let tail = graph::tail_of(&onnx, "y").unwrap();
        assert!(tail.starts_at_model_input, "{name}: the whole PyTorch model is a dense tail");
        let loss = match case["loss"].as_str().unwrap() {
            "cross_entropy" => Loss::SoftmaxCrossEntropy,
            "bce_with_logits" => Loss::BceWithLogits,
            _ => Loss::Mse,
        };
        let tw = case["target_width"].as_u64().unwrap() as usize;
        let target = floats(&case["target"]);
        let (lr, wd) = (case["lr"].as_f64().unwrap() as f32, case["weight_decay"].as_f64().unwrap() as f32);
        let update = match case["optimizer"].as_str().unwrap() {
            "sgd" => Update::Sgd { lr, momentum: case["momentum"].as_f64().unwrap() as f32, weight_decay: wd },
            opt => Update::adam(lr, wd, opt == "adamw"),
        };
        let clip = case["grad_clip"].as_f64().unwrap() as f32;
        let mut net = Net::new(b, &tail.layers, Mode::Full, 32, tw).unwrap();
        let weights = floats(&case["class_weights"]);
        if !weights.is_empty() {
            net.set_class_weights(b, &weights).unwrap();
        }
        let expected = floats(&case["losses"]);
        let (mut xb, mut yb) = (Vec::new(), Vec::new());
        for (step, idx) in batches.iter().enumerate() {
            xb.clear();
            yb.clear();
            for &i in idx {
                xb.extend_from_slice(&x[i * f..(i + 1) * f]);
                yb.extend_from_slice(&target[i * tw..(i + 1) * tw]);
            }
            let got = net.train_step(b, &xb, &yb, loss, update, (clip > 0.0).then_some(clip)).unwrap();
            let want = expected[step];
            assert!(((got - want) / want).abs() < 1e-4, "{name} step {step}: loss {got} vs PyTorch {want}");
        }
        let trained = net.weights(b, &tail.layers).unwrap();
        let exported = initializers(&graph::export(&onnx, &trained).unwrap());
        for (param, want) in case["final"].as_object().unwrap() {
            let want = floats(want);
            let got = &exported[param];
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-3, "{name}: {param} differs from PyTorch by {worst}");
        }
    }
}
