//! The CUDA backend against the CPU backend: every op, and a whole fine-tune. Run on a real GPU
//! by `tests/cuda.rs` (ignored without one) and on the CPU emulator of the driver by
//! `tests/cuda_emulated.rs`; included by both with `#[path]`.

use lathe::train::backend::{Activation, Backend, DenseGrads, Gemm, Loss, ParamSlot, Update};
use lathe::train::cpu::Cpu;
use lathe::train::cuda;
use lathe::train::graph;
use lathe::train::net::{Mode, Net};

use super::common;

/// Loads `LATHE_NVRTC` by its absolute path first, so cudarc's later `dlopen("libnvrtc.so.12")`
/// finds it; says whether NVRTC is usable.
pub fn nvrtc() -> bool {
    if let Some(path) = std::env::var_os("LATHE_NVRTC") {
        let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).unwrap();
        // SAFETY: a plain dlopen of a path; the handle is kept for the process.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        assert!(!handle.is_null(), "LATHE_NVRTC={path:?} does not load");
    }
    let ok = cuda::nvrtc_present();
    if !ok {
        assert!(
            std::env::var_os("LATHE_REQUIRE_NVRTC").is_none(),
            "LATHE_REQUIRE_NVRTC is set but libnvrtc.so.12 does not load"
        );
        eprintln!("skipped: no libnvrtc.so.12 (pip install nvidia-cuda-nvrtc-cu12; LATHE_NVRTC=…/libnvrtc.so.12)");
    }
    ok
}

pub fn close(name: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{name}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * x.abs().max(1.0), "{name}[{i}]: cpu {x} vs cuda {y}");
    }
}

pub fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32 / 1000.0 - 1.0)
        .collect()
}

/// Runs `op` on both backends from the same inputs and compares what it wrote to `out`.
fn both<F, G>(g: &cuda::Cuda, name: &str, inputs: &[Vec<f32>], out_len: usize, cpu_op: F, gpu_op: G)
where
    F: Fn(&Cpu, &[Vec<f32>], &mut Vec<f32>),
    G: Fn(&cuda::Cuda, &[cudarc::driver::CudaSlice<f32>], &mut cudarc::driver::CudaSlice<f32>),
{
    let mut c_out = values(out_len, 99);
    cpu_op(&Cpu, inputs, &mut c_out);
    let bufs: Vec<_> = inputs.iter().map(|v| g.upload(v).unwrap()).collect();
    let mut g_out = g.upload(&values(out_len, 99)).unwrap();
    gpu_op(g, &bufs, &mut g_out);
    let mut host = vec![0.0; out_len];
    g.read(&g_out, &mut host).unwrap();
    close(name, &c_out, &host, 1e-4);
}

/// Every op of the `Backend` trait on `g` against the CPU backend, on shapes that are not
/// multiples of the tile or block size.
pub fn each_op_matches_the_cpu(g: &cuda::Cuda) {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let shape = Gemm { m: 37, n: 29, k: 53, trans_a: ta, trans_b: tb, alpha: 0.5, beta: 0.25 };
        both(
            g,
            &format!("gemm {ta} {tb}"),
            &[values(37 * 53, 1), values(53 * 29, 2)],
            37 * 29,
            |b, i, o| b.gemm(shape, &i[0].clone(), &i[1].clone(), o).unwrap(),
            |b, i, o| b.gemm(shape, &i[0], &i[1], o).unwrap(),
        );
    }
    let (rows, rank, cols) = (37, 3, 29);
    both(
        g,
        "lora_merge",
        &[values(rows * cols, 40), values(rows * rank, 41), values(rank * cols, 42)],
        rows * cols,
        |b, i, o| b.lora_merge(&i[0].clone(), (&i[1].clone(), &i[2].clone()), o, (rows, rank, cols), 1.5).unwrap(),
        |b, i, o| b.lora_merge(&i[0], (&i[1], &i[2]), o, (rows, rank, cols), 1.5).unwrap(),
    );
    let (r, c) = (67, 13);
    both(
        g,
        "add_bias",
        &[values(c, 3)],
        r * c,
        |b, i, o| b.add_bias(o, &i[0].clone(), r, c).unwrap(),
        |b, i, o| b.add_bias(o, &i[0], r, c).unwrap(),
    );
    both(
        g,
        "bias_grad",
        &[values(r * c, 4)],
        c,
        |b, i, o| b.bias_grad(&i[0].clone(), r, c, o).unwrap(),
        |b, i, o| b.bias_grad(&i[0], r, c, o).unwrap(),
    );
    for f in [Activation::Relu, Activation::LeakyRelu(0.01), Activation::Sigmoid, Activation::Tanh, Activation::Softmax]
    {
        both(
            g,
            &format!("{f:?}"),
            &[values(r * c, 5)],
            r * c,
            |b, i, o| b.activation(f, &i[0].clone(), o, r, c).unwrap(),
            |b, i, o| b.activation(f, &i[0], o, r, c).unwrap(),
        );
        dense_forward_matches(g, Some(f), (r, 21, c));
        dense_backward_matches(g, Some(f), (r, 21, c));
        let x = values(r * c, 6);
        let mut y = vec![0.0; r * c];
        Cpu.activation(f, &x, &mut y, r, c).unwrap();
        both(
            g,
            &format!("{f:?} grad"),
            &[x, y, values(r * c, 7)],
            r * c,
            |b, i, o| b.activation_grad(f, &i[0].clone(), &i[1].clone(), &i[2].clone(), o, r, c).unwrap(),
            |b, i, o| b.activation_grad(f, &i[0], &i[1], &i[2], o, r, c).unwrap(),
        );
    }
    dense_forward_matches(g, None, (r, 21, c));
    dense_backward_matches(g, None, (r, 21, c));
    // A layer wider than one tile in every direction.
    dense_backward_matches(g, Some(Activation::Tanh), (40, 35, 18));
    let classes: Vec<f32> = (0..r).map(|i| (i % c) as f32).collect();
    let binary: Vec<f32> = (0..r).map(|i| (i % 2) as f32).collect();
    for (loss, cols, target, weights) in [
        (Loss::Mse, c, values(r * c, 8), None),
        (Loss::BceWithLogits, 1, binary.clone(), Some(vec![0.3, 1.7])),
        (Loss::SoftmaxCrossEntropy, c, classes.clone(), Some(values(c, 9).iter().map(|w| w.abs() + 0.1).collect())),
        (Loss::SoftmaxCrossEntropy, c, classes, None),
    ] {
        let out = values(r * cols, 10);
        let mut cg = vec![0.0; r * cols];
        let cl = Cpu.loss(loss, &out, &target, weights.as_ref(), r, cols, &mut cg).unwrap();
        let w = weights.as_ref().map(|w| g.upload(w).unwrap());
        let mut gg = g.zeros(r * cols).unwrap();
        let gl =
            g.loss(loss, &g.upload(&out).unwrap(), &g.upload(&target).unwrap(), w.as_ref(), r, cols, &mut gg).unwrap();
        let mut host = vec![0.0; r * cols];
        g.read(&gg, &mut host).unwrap();
        assert!((cl - gl).abs() <= 1e-4 * cl.abs().max(1.0), "{loss:?}: cpu {cl} vs cuda {gl}");
        close(&format!("{loss:?} grad"), &cg, &host, 1e-4);
    }
    let n = 1000;
    for u in [
        Update::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.01 },
        Update::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled: true, step: 3 },
        Update::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled: false, step: 1 },
    ] {
        let (p, gr, m, v) =
            (values(n, 11), values(n, 12), values(n, 13), values(n, 14).iter().map(|x| x.abs()).collect::<Vec<_>>());
        let (mut cp, mut cm, mut cv) = (p.clone(), m.clone(), v.clone());
        Cpu.update(u, &mut cp, &gr, &mut cm, &mut cv, n).unwrap();
        let (mut gp, mut gm, mut gv) = (g.upload(&p).unwrap(), g.upload(&m).unwrap(), g.upload(&v).unwrap());
        g.update(u, &mut gp, &g.upload(&gr).unwrap(), &mut gm, &mut gv, n).unwrap();
        // The parameters and the optimizer's state it keeps for the next step.
        for (what, c_side, g_side) in [("p", &cp, &gp), ("m", &cm, &gm), ("v", &cv, &gv)] {
            let mut host = vec![0.0; n];
            g.read(g_side, &mut host).unwrap();
            close(&format!("{u:?} {what}"), c_side, &host, 1e-5);
        }
    }
    // The step over all of a net's tensors at once (one launch each on the GPU), on tensors of
    // different lengths: clipping to a global norm, then each update rule.
    let lens = [1000usize, 37, 300];
    for u in [
        Update::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.01 },
        Update::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decoupled: true, step: 2 },
    ] {
        let host: Vec<[Vec<f32>; 4]> = lens
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                let s = 20 + 4 * t as u32;
                [values(n, s), values(n, s + 1), values(n, s + 2), values(n, s + 3).iter().map(|x| x.abs()).collect()]
            })
            .collect();
        let mut cpu: Vec<[Vec<f32>; 4]> = host.clone();
        let mut gpu: Vec<Vec<_>> = host.iter().map(|t| t.iter().map(|v| g.upload(v).unwrap()).collect()).collect();
        let mut cs: Vec<ParamSlot<'_, Vec<f32>>> = cpu
            .iter_mut()
            .map(|[value, grad, m, v]| {
                let len = value.len();
                ParamSlot { value, grad, m, v, len }
            })
            .collect();
        let mut gs: Vec<ParamSlot<'_, _>> = gpu
            .iter_mut()
            .zip(lens)
            .map(|(t, len)| {
                let [value, grad, m, v] = &mut t[..] else { unreachable!() };
                ParamSlot { value, grad, m, v, len }
            })
            .collect();
        // Once where the norm is over the bound (scaled) and once under it (unchanged).
        let norm = host.iter().map(|[_, grad, ..]| grad.iter().map(|x| x * x).sum::<f32>()).sum::<f32>().sqrt();
        for max_norm in [0.5 * norm, 2.0 * norm] {
            Cpu.clip_grad_norm(&mut cs, max_norm).unwrap();
            g.clip_grad_norm(&mut gs, max_norm).unwrap();
        }
        Cpu.update_all(u, &mut cs).unwrap();
        g.update_all(u, &mut gs).unwrap();
        drop((cs, gs));
        for (t, (c, d)) in cpu.iter().zip(&gpu).enumerate() {
            for (what, (cv, dv)) in ["value", "grad", "m", "v"].iter().zip(c.iter().zip(d)) {
                let mut back = vec![0.0; cv.len()];
                g.read(dv, &mut back).unwrap();
                close(&format!("{u:?} update_all tensor {t} {what}"), cv, &back, 1e-5);
            }
        }
    }
    let x = values(5000, 15);
    let (a, b) = (Cpu.sum_squares(&x, 5000).unwrap(), g.sum_squares(&g.upload(&x).unwrap(), 5000).unwrap());
    assert!((a - b).abs() <= 1e-3 * a, "sum_squares: {a} vs {b}");
}

/// A dense layer's forward (one kernel on the GPU: the GEMM with the bias and activation),
/// with and without a bias: the pre-activation z and the output y.
fn dense_forward_matches(g: &cuda::Cuda, f: Option<Activation>, (r, k, c): (usize, usize, usize)) {
    let (x, w, bias) = (values(r * k, 16), values(k * c, 17), values(c, 18));
    let up = |v: &[f32]| g.upload(v).unwrap();
    for with_bias in [true, false] {
        let (mut cz, mut cy) = (values(r * c, 19), values(r * c, 20));
        let (mut gz, mut gy) = (up(&cz), up(&cy));
        let cpu_act = f.map(|f| (f, &mut cy));
        Cpu.dense_forward((&x, &w), with_bias.then_some(&bias), &mut cz, cpu_act, (r, k, c)).unwrap();
        let gb = up(&bias);
        let gpu_act = f.map(|f| (f, &mut gy));
        g.dense_forward((&up(&x), &up(&w)), with_bias.then_some(&gb), &mut gz, gpu_act, (r, k, c)).unwrap();
        // Without an activation, y is not the layer's and stays as it was.
        for (what, cpu, gpu) in [("z", &cz, &gz), ("y", &cy, &gy)] {
            let mut back = vec![0.0; r * c];
            g.read(gpu, &mut back).unwrap();
            close(&format!("{f:?} dense_forward bias {with_bias} {what}"), cpu, &back, 1e-4);
        }
    }
}

/// A dense layer's backward (one kernel on the GPU) against the CPU's separate ops, for each set
/// of gradients a layer may ask for. What is not asked for must stay as it was.
fn dense_backward_matches(g: &cuda::Cuda, f: Option<Activation>, (r, k, c): (usize, usize, usize)) {
    let (x, w, z, dy) = (values(r * k, 30), values(k * c, 31), values(r * c, 32), values(r * c, 33));
    let mut y = z.clone();
    if let Some(f) = f {
        Cpu.activation(f, &z, &mut y, r, c).unwrap();
    }
    let before = [values(k * c, 34), values(c, 35), values(r * k, 36)];
    for want in
        [[true, true, true], [true, false, true], [false, true, false], [false, false, true], [true, true, false]]
    {
        let mut cpu = before.clone();
        let [dw, db, dx] = &mut cpu;
        let grads = DenseGrads { dw: want[0].then_some(dw), db: want[1].then_some(db), dx: want[2].then_some(dx) };
        Cpu.dense_backward(f, (&x, &w), (&z, &y, &dy), &mut vec![0.0; r * c], grads, (r, k, c)).unwrap();
        let up = |v: &[f32]| g.upload(v).unwrap();
        let mut gpu: Vec<_> = before.iter().map(|v| up(v)).collect();
        let [dw, db, dx] = &mut gpu[..] else { unreachable!() };
        let grads = DenseGrads { dw: want[0].then_some(dw), db: want[1].then_some(db), dx: want[2].then_some(dx) };
        let mut scratch = g.zeros(r * c).unwrap();
        g.dense_backward(f, (&up(&x), &up(&w)), (&up(&z), &up(&y), &up(&dy)), &mut scratch, grads, (r, k, c)).unwrap();
        for ((what, cpu), gpu) in ["dw", "db", "dx"].iter().zip(&cpu).zip(&gpu) {
            let mut back = vec![0.0; cpu.len()];
            g.read(gpu, &mut back).unwrap();
            close(&format!("{f:?} dense_backward {r}x{k}x{c} wanting {want:?}: {what}"), cpu, &back, 1e-4);
        }
    }
}

/// A net trained for 20 steps on the CPU and on `g` from the same weights and batches, in each
/// mode (every weight; LoRA adapters on frozen weights) with each loss: the same losses and the
/// same exported weights.
pub fn a_net_trains_alike_in_every_mode(g: &cuda::Cuda) {
    let onnx = std::fs::read(common::fixture("train/multiclass-adam.onnx")).unwrap();
    let tail = graph::tail_of(&onnx, "y").unwrap();
    let (rows, classes) = (24, tail.out_dim());
    let x = values(rows * tail.in_dim(), 30);
    for mode in [Mode::Full, Mode::Lora { rank: 2, alpha: 4.0, seed: 3 }] {
        for (loss, target, width) in [
            (Loss::SoftmaxCrossEntropy, (0..rows).map(|i| (i % classes) as f32).collect::<Vec<_>>(), 1),
            (Loss::Mse, values(rows * classes, 31), classes),
        ] {
            let name = format!("{mode:?} {loss:?}");
            let mut c = Net::new(&Cpu, &tail.layers, mode, rows, width).unwrap();
            let mut n = Net::new(g, &tail.layers, mode, rows, width).unwrap();
            let adam = Update::adam(0.05, 0.01, true);
            for step in 0..20 {
                let a = c.train_step(&Cpu, &x, &target, loss, adam, Some(1.0)).unwrap();
                let b = n.train_step(g, &x, &target, loss, adam, Some(1.0)).unwrap();
                assert!((a - b).abs() <= 1e-4 * a.abs().max(1e-3), "{name} step {step}: cpu {a} vs cuda {b}");
            }
            let (cw, gw) = (c.weights(&Cpu, &tail.layers).unwrap(), n.weights(g, &tail.layers).unwrap());
            for (l, (a, b)) in cw.iter().zip(&gw).enumerate() {
                close(&format!("{name} layer {l} weight"), &a.weight, &b.weight, 1e-4);
                close(
                    &format!("{name} layer {l} bias"),
                    a.bias.as_deref().unwrap_or(&[]),
                    b.bias.as_deref().unwrap_or(&[]),
                    1e-4,
                );
            }
        }
    }
}

/// The same fine-tune (`lathe train`) with `--backend cpu` and `--backend cuda`, the latter with
/// `env` added (where the emulator is): per-epoch losses agree, and the gate decides the same.
pub fn a_fine_tune_matches_the_cpu(env: &[(&str, std::ffi::OsString)]) {
    let dir = common::temp_dir("cuda-finetune");
    let data = common::unseen_csv(&dir, 0.0);
    let run = |backend: &str| -> serde_json::Value {
        let out = common::train_command(&dir, &data, backend)
            .envs(env.iter().map(|(k, v)| (k, v)).filter(|_| backend == "cuda"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
    };
    let (c, g) = (run("cpu"), run("cuda"));
    assert!(g["backend"].as_str().unwrap().starts_with("cuda:"), "{g}");
    let losses = |r: &serde_json::Value| -> Vec<f64> {
        r["epochs"].as_array().unwrap().iter().map(|e| e["train_loss"].as_f64().unwrap()).collect()
    };
    for (e, (a, b)) in losses(&c).iter().zip(losses(&g)).enumerate() {
        assert!((a - b).abs() <= 1e-3 * a.abs().max(1e-3), "epoch {}: cpu {a} vs cuda {b}", e + 1);
    }
    assert_eq!(c["gate"]["accepted"], g["gate"]["accepted"]);
    eprintln!("cpu {} s, cuda {} s", c["wall_seconds"], g["wall_seconds"]);
}
