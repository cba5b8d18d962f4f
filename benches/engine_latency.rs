//! In-process inference latency, tract vs ONNX Runtime, on the committed models at batch 1
//! and 64 (the median of many runs after a warm-up). Needs feature `ort` and the library:
//!
//!     LATHE_ORT_LIBRARY=/path/libonnxruntime.so.1.x cargo bench --features ort --bench engine_latency
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use lathe::engine::{Engine, EngineKind};

fn median_us(engine: &Engine, rows: &[f32]) -> f64 {
    for _ in 0..200 {
        engine.run(rows).unwrap();
    }
    let mut times: Vec<f64> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            engine.run(rows).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let library = std::env::var("LATHE_ORT_LIBRARY").expect("LATHE_ORT_LIBRARY: the path of libonnxruntime.so");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = [
        ("Shuttle MLP 9-32-16-2 (onnx.helper, MatMul+Add, Softmax)", "models/shuttle-mlp.onnx"),
        ("scikit-learn MLPClassifier (skl2onnx, Scaler, ZipMap)", "tests/fixtures/sklearn-mlp.onnx"),
        ("PyTorch MLP 9-16-8-3 (Gemm transB, Tanh)", "tests/fixtures/train/multiclass-adam.onnx"),
        ("PyTorch autoencoder 9-4-9", "tests/fixtures/train/reconstruction-adam.onnx"),
        ("scikit-learn LogisticRegression (LinearClassifier)", "tests/fixtures/zoo/sklearn-logistic.onnx"),
        ("PyTorch Conv1d over 16 frames × 4", "tests/fixtures/zoo/torch-conv1d-w16.onnx"),
        ("PyTorch GRU(8) over 16 frames × 4", "tests/fixtures/zoo/torch-gru-w16.onnx"),
        ("PyTorch LSTM(8) over 16 frames × 4", "tests/fixtures/zoo/torch-lstm-w16.onnx"),
        ("scikit-learn RandomForestClassifier, 20 trees of depth 6", "tests/fixtures/zoo/sklearn-forest.onnx"),
        ("XGBClassifier, 20 trees of depth 4", "tests/fixtures/zoo/xgboost-classifier.onnx"),
        ("LGBMRegressor, 30 trees of 31 leaves", "tests/fixtures/zoo/lightgbm-regressor.onnx"),
        ("scikit-learn RandomForestRegressor, 20 trees of depth 6", "tests/fixtures/zoo/sklearn-forest-regressor.onnx"),
    ];
    println!("| model | batch | tract µs | ort µs | tract / ort |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, path) in models {
        let bytes = std::fs::read(root.join(path)).unwrap();
        let tract = Engine::load(&bytes).unwrap();
        let ort = Engine::load_with(
            &bytes,
            &EngineKind::Ort { library: library.clone().into(), providers: vec![], strict: false },
        )
        .unwrap();
        for batch in [1usize, 64] {
            let len = tract.signature.sample_len();
            let rows: Vec<f32> = (0..batch * len).map(|i| ((i * 37 % 101) as f32) / 10.0 + 20.0).collect();
            let (t, o) = (median_us(&tract, &rows), median_us(&ort, &rows));
            println!("| {name} | {batch} | {t:.1} | {o:.1} | {:.2} |", t / o);
        }
    }
}
