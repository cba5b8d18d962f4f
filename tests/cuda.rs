//! The CUDA backend (feature `cuda`, on by default).
//!
//! Without a GPU (CI): every kernel in `cuda/` compiles with NVRTC for Jetson Xavier (sm_72),
//! Orin (sm_87) and Hopper (sm_90); a broken kernel fails with NVRTC's log; the PTX cache is
//! used; with no libcuda, `auto` trains on the CPU and `cuda` is a clean error. NVRTC comes
//! from the PyPI wheel `nvidia-cuda-nvrtc-cu12`: `LATHE_NVRTC` names its `libnvrtc.so.12`
//! (`.ci/run` sets it and `LATHE_REQUIRE_NVRTC=1`).
//!
//! On a GPU (`cargo test --test cuda -- --ignored`, or `scripts/gpu-check.sh`): every op
//! against the CPU backend, and a whole fine-tune on both.
#![cfg(feature = "cuda")]

mod common;

use lathe::train::backend::{Activation, Backend, Gemm, Loss, Update};
use lathe::train::cpu::Cpu;
use lathe::train::cuda;

/// Loads `LATHE_NVRTC` by its absolute path first, so cudarc's later `dlopen("libnvrtc.so.12")`
/// finds it; says whether NVRTC is usable.
fn nvrtc() -> bool {
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

#[test]
fn every_kernel_compiles_for_xavier_orin_and_hopper() {
    if !nvrtc() {
        return;
    }
    for arch in ["sm_72", "sm_87", "sm_90"] {
        for (name, src) in cuda::SOURCES {
            let ptx = cuda::compile(name, src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(ptx.contains(&format!(".target {arch}")), "{name} {arch}");
            // Every kernel the file declares is in its PTX.
            for kernel in src.split("extern \"C\" __global__ void ").skip(1) {
                let kernel = kernel.split('(').next().unwrap();
                assert!(ptx.contains(&format!(".entry {kernel}(")), "{name}: {kernel} missing for {arch}");
            }
        }
    }
}

#[test]
fn a_broken_kernel_fails_with_the_nvrtc_log() {
    if !nvrtc() {
        return;
    }
    let broken =
        "#include \"common.cuh\"\nextern \"C\" __global__ void broken_f32(float* x) { x[0] = lathe_undefined(x); }\n";
    let err = cuda::compile("broken_f32.cu", broken, "sm_87").unwrap_err();
    assert!(err.contains("broken_f32.cu does not compile for sm_87") && err.contains("lathe_undefined"), "{err}");
}

#[test]
fn compiled_kernels_are_cached_by_source_arch_and_nvrtc_version() {
    if !nvrtc() {
        return;
    }
    let dir = common::temp_dir("nvrtc-cache");
    let first = cuda::compile_all("sm_87", Some(&dir)).unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    // A cached copy is what the next start uses: alter it and see it come back.
    let mut cached: Vec<String> = serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    cached[0].push_str("\n// from the cache\n");
    std::fs::write(&files[0], serde_json::to_string(&cached).unwrap()).unwrap();
    let second = cuda::compile_all("sm_87", Some(&dir)).unwrap();
    assert!(second[0].ends_with("// from the cache\n") && second[1..] == first[1..]);
}

/// Without libcuda (this machine, CI): auto falls back to the CPU and says why; cuda refuses.
#[test]
fn without_a_gpu_auto_trains_on_the_cpu_and_cuda_is_a_clean_error() {
    if cuda::probe().is_ok() {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    match cuda::choose("auto", None, 1024).unwrap() {
        cuda::Chosen::Cpu { why } => {
            assert!(why.contains("auto: training on the CPU") && why.contains("libcuda"), "{why}")
        }
        cuda::Chosen::Cuda(_) => panic!("no GPU here"),
    }
    let err = match cuda::choose("cuda", None, 1024) {
        Err(e) => e,
        Ok(_) => panic!("cuda chosen without a GPU"),
    };
    assert!(err.contains("train.backend = \"cuda\" but libcuda.so.1 is not loadable"), "{err}");
    // The same through `lathe train`: auto trains (on the CPU), cuda exits with the reason.
    let dir = common::temp_dir("cuda-fallback");
    let data = common::unseen_csv(&dir, 0.0);
    let run = |backend: &str| {
        std::process::Command::new(common::LATHE)
            .args(["train", "--bundle"])
            .arg(common::root().join("models/shuttle-mlp-1.lathe"))
            .arg("--data")
            .arg(&data)
            .args(["-o"])
            .arg(dir.join(format!("{backend}.lathe")))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--backend", backend, "--json"])
            .output()
            .unwrap()
    };
    let auto = run("auto");
    let record: serde_json::Value = serde_json::from_slice(&auto.stdout).unwrap();
    assert_eq!(record["backend"], "cpu", "{record}");
    let cuda = run("cuda");
    let err = String::from_utf8_lossy(&cuda.stderr);
    assert!(!cuda.status.success() && err.contains("train.backend = \"cuda\" but"), "{err}");
}

// --- On a GPU only -----------------------------------------------------------------------

fn gpu() -> cuda::Cuda {
    let device = cuda::probe().expect("a CUDA GPU");
    cuda::Cuda::new(device, None, 4096).expect("kernels load")
}

fn close(name: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{name}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * x.abs().max(1.0), "{name}[{i}]: cpu {x} vs cuda {y}");
    }
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32 / 1000.0 - 1.0)
        .collect()
}

/// Runs `op` on both backends from the same inputs and compares what it wrote to `out`.
fn both<F, G>(name: &str, inputs: &[Vec<f32>], out_len: usize, cpu_op: F, gpu_op: G)
where
    F: Fn(&Cpu, &[Vec<f32>], &mut Vec<f32>),
    G: Fn(&cuda::Cuda, &[cudarc::driver::CudaSlice<f32>], &mut cudarc::driver::CudaSlice<f32>),
{
    let g = gpu();
    let mut c_out = values(out_len, 99);
    cpu_op(&Cpu, inputs, &mut c_out);
    let bufs: Vec<_> = inputs.iter().map(|v| g.upload(v).unwrap()).collect();
    let mut g_out = g.upload(&values(out_len, 99)).unwrap();
    gpu_op(&g, &bufs, &mut g_out);
    let mut host = vec![0.0; out_len];
    g.read(&g_out, &mut host).unwrap();
    close(name, &c_out, &host, 1e-4);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn each_kernel_matches_the_cpu_op() {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let g = Gemm { m: 37, n: 29, k: 53, trans_a: ta, trans_b: tb, alpha: 0.5, beta: 0.25 };
        both(
            &format!("gemm {ta} {tb}"),
            &[values(37 * 53, 1), values(53 * 29, 2)],
            37 * 29,
            |b, i, o| b.gemm(g, &i[0].clone(), &i[1].clone(), o).unwrap(),
            |b, i, o| b.gemm(g, &i[0], &i[1], o).unwrap(),
        );
    }
    let (r, c) = (67, 13);
    both(
        "add_bias",
        &[values(c, 3)],
        r * c,
        |b, i, o| b.add_bias(o, &i[0].clone(), r, c).unwrap(),
        |b, i, o| b.add_bias(o, &i[0], r, c).unwrap(),
    );
    both(
        "bias_grad",
        &[values(r * c, 4)],
        c,
        |b, i, o| b.bias_grad(&i[0].clone(), r, c, o).unwrap(),
        |b, i, o| b.bias_grad(&i[0], r, c, o).unwrap(),
    );
    for f in [Activation::Relu, Activation::LeakyRelu(0.01), Activation::Sigmoid, Activation::Tanh, Activation::Softmax]
    {
        both(
            &format!("{f:?}"),
            &[values(r * c, 5)],
            r * c,
            |b, i, o| b.activation(f, &i[0].clone(), o, r, c).unwrap(),
            |b, i, o| b.activation(f, &i[0], o, r, c).unwrap(),
        );
        let x = values(r * c, 6);
        let mut y = vec![0.0; r * c];
        Cpu.activation(f, &x, &mut y, r, c).unwrap();
        both(
            &format!("{f:?} grad"),
            &[x, y, values(r * c, 7)],
            r * c,
            |b, i, o| b.activation_grad(f, &i[0].clone(), &i[1].clone(), &i[2].clone(), o, r, c).unwrap(),
            |b, i, o| b.activation_grad(f, &i[0], &i[1], &i[2], o, r, c).unwrap(),
        );
    }
    let classes: Vec<f32> = (0..r).map(|i| (i % c) as f32).collect();
    let binary: Vec<f32> = (0..r).map(|i| (i % 2) as f32).collect();
    for (loss, cols, target, weights) in [
        (Loss::Mse, c, values(r * c, 8), None),
        (Loss::BceWithLogits, 1, binary.clone(), Some(vec![0.3, 1.7])),
        (Loss::SoftmaxCrossEntropy, c, classes.clone(), Some(values(c, 9).iter().map(|w| w.abs() + 0.1).collect())),
        (Loss::SoftmaxCrossEntropy, c, classes, None),
    ] {
        let out = values(r * cols, 10);
        let g = gpu();
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
        let g = gpu();
        let (mut gp, mut gm, mut gv) = (g.upload(&p).unwrap(), g.upload(&m).unwrap(), g.upload(&v).unwrap());
        g.update(u, &mut gp, &g.upload(&gr).unwrap(), &mut gm, &mut gv, n).unwrap();
        let mut host = vec![0.0; n];
        g.read(&gp, &mut host).unwrap();
        close(&format!("{u:?}"), &cp, &host, 1e-5);
    }
    let x = values(5000, 15);
    let g = gpu();
    let (a, b) = (Cpu.sum_squares(&x, 5000).unwrap(), g.sum_squares(&g.upload(&x).unwrap(), 5000).unwrap());
    assert!((a - b).abs() <= 1e-3 * a, "sum_squares: {a} vs {b}");
}

/// The same fine-tune on the GPU and the CPU: per-epoch losses agree, and the gate decides
/// the same.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_fine_tune_on_the_gpu_matches_the_cpu() {
    let dir = common::temp_dir("cuda-finetune");
    let data = common::unseen_csv(&dir, 0.0);
    let run = |backend: &str| -> serde_json::Value {
        let out = std::process::Command::new(common::LATHE)
            .args(["train", "--bundle"])
            .arg(common::root().join("models/shuttle-mlp-1.lathe"))
            .arg("--data")
            .arg(&data)
            .arg("-o")
            .arg(dir.join(format!("{backend}.lathe")))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--backend", backend, "--json"])
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
