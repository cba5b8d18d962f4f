//! Training throughput of a backend: full-network Adam, softmax cross-entropy, one CPU
//! thread, on the two shapes the training issue names. `benches/train_compare.py` runs this
//! and PyTorch side by side and prints the ratio; run alone:
//!
//!     cargo bench --bench train_speed                                 # one JSON line per shape
//!     LATHE_BENCH_BACKEND=cuda cargo bench --bench train_speed        # on the GPU
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use lathe::rng::Rng;
use lathe::train::backend::{Activation, Backend, Loss, Update};
use lathe::train::cpu::Cpu;
#[cfg(feature = "cuda")]
use lathe::train::cuda;
use lathe::train::graph::{tail_of, DenseLayer};
use lathe::train::net::{Mode, Net};

/// A dense layer with PyTorch's default initialisation range, built from a one-layer template
/// (the only public way to make a `DenseLayer` is from a model file).
fn layer(template: &DenseLayer, i: usize, o: usize, act: Option<Activation>, rng: &mut Rng) -> DenseLayer {
    let bound = 1.0 / (i as f64).sqrt();
    let mut l = template.clone();
    l.in_dim = i;
    l.out_dim = o;
    l.weight = (0..i * o).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
    l.bias = Some((0..o).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect());
    l.activations = act.into_iter().collect();
    l
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let onnx = std::fs::read(root.join("tests/fixtures/train/binary-adam.onnx")).unwrap();
    let template = tail_of(&onnx, "y").unwrap().layers.remove(0);
    let seconds: f64 = std::env::var("LATHE_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    // LATHE_BENCH_SHAPE=64-256-256-10 runs one shape (for profiling).
    let only = std::env::var("LATHE_BENCH_SHAPE").ok();
    let shapes = [(vec![9, 32, 16, 2], 64usize), (vec![64, 256, 256, 10], 256)];
    let shapes = shapes.iter().filter(|(sizes, _)| only.as_ref().is_none_or(|o| *o == shape_name(sizes)));
    // LATHE_BENCH_BACKEND=cuda measures the CUDA backend instead (scripts/gpu-check.sh).
    match std::env::var("LATHE_BENCH_BACKEND").as_deref() {
        #[cfg(feature = "cuda")]
        Ok("cuda") => {
            let gpu = cuda::Cuda::new(cuda::probe().expect("a CUDA GPU"), None, 4096).expect("kernels load");
            shapes.for_each(|(sizes, batch)| measure(&gpu, "lathe-cuda", &template, sizes, *batch, seconds));
        }
        _ => shapes.for_each(|(sizes, batch)| measure(&Cpu, "lathe-cpu", &template, sizes, *batch, seconds)),
    }
}

fn shape_name(sizes: &[usize]) -> String {
    sizes.iter().map(ToString::to_string).collect::<Vec<_>>().join("-")
}

/// Steps a ReLU MLP of `sizes` for `seconds` after 50 warm-up steps; prints one JSON line.
/// Each step reads its loss back, so on a GPU the time is the work done, not the work queued.
fn measure<B: Backend>(b: &B, name: &str, template: &DenseLayer, sizes: &[usize], batch: usize, seconds: f64) {
    let mut rng = Rng::new(1);
    let n = sizes.len() - 1;
    let layers: Vec<DenseLayer> = (0..n)
        .map(|i| layer(template, sizes[i], sizes[i + 1], (i + 1 < n).then_some(Activation::Relu), &mut rng))
        .collect();
    let (d_in, classes) = (sizes[0], sizes[n]);
    let rows = batch * 64;
    let x: Vec<f32> = (0..rows * d_in).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect();
    let y: Vec<f32> = (0..rows).map(|i| (i % classes) as f32).collect();
    let mut net = Net::new(b, &layers, Mode::Full, batch, 1).unwrap();
    let adam = Update::adam(1e-3, 0.0, false);
    let mut step = |s: usize| {
        let i = s % (rows / batch);
        let xb = &x[i * batch * d_in..(i + 1) * batch * d_in];
        let yb = &y[i * batch..(i + 1) * batch];
        net.train_step(b, xb, yb, Loss::SoftmaxCrossEntropy, adam, None).unwrap()
    };
    for s in 0..50 {
        step(s);
    }
    let start = Instant::now();
    let mut steps = 0;
    let mut last = 0.0;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..20 {
            last = step(steps);
            steps += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{{\"impl\":\"{name}\",\"shape\":\"{}\",\"batch\":{batch},\"steps\":{steps},\"samples_per_s\":{:.0},\"us_per_step\":{:.2},\"loss\":{last}}}",
        shape_name(sizes),
        (steps * batch) as f64 / elapsed,
        elapsed * 1e6 / steps as f64
    );
}
