//! The CUDA backend, unchanged, on a stand-in for the NVIDIA driver that runs lathe's kernels
//! on the CPU (`tests/cuda_emulator/`: what it proves and what only a GPU can is in its
//! README). No GPU here, so this is how `daemon/train/cuda/` is run at all: the probe, NVRTC's
//! real PTX for the emulated Orin (sm_87), every launch shape and argument, every copy, the
//! memory bound, and a whole `lathe train --backend cuda` against the CPU.
//!
//! Needs g++ (to build the stand-in) and NVRTC (`LATHE_NVRTC`, as tests/cuda.rs); skipped
//! without them unless `LATHE_REQUIRE_NVRTC` is set (CI), where it fails instead.
//! A test binary of its own: once the stand-in is loaded this process has a "GPU".
#![cfg(feature = "cuda")]

#[path = "cuda_emulator/checks.rs"]
mod checks;
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lathe::train::backend::{Backend, Loss, Update};
use lathe::train::cuda;
use lathe::train::graph;
use lathe::train::net::{Mode, Net};

/// Builds `libcuda.so` from tests/cuda_emulator (once per run) and loads it, so cudarc's
/// `dlopen("libcuda.so")` finds it; its folder, or None where it cannot be built.
fn emulator() -> Option<&'static Path> {
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if !checks::nvrtc() {
                return None;
            }
            let src = common::root().join("tests/cuda_emulator");
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-emulator");
            std::fs::create_dir_all(&dir).unwrap();
            let lib = dir.join("libcuda.so");
            let built = std::process::Command::new("g++")
                .args(["-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas"])
                .arg("-I")
                .arg(common::root().join("cuda"))
                .arg("-Wl,-soname,libcuda.so")
                .arg("-o")
                .arg(&lib)
                .arg(src.join("libcuda.cpp"))
                .output();
            match built {
                Ok(out) if out.status.success() => {}
                Ok(out) => panic!("the CUDA emulator does not build:\n{}", String::from_utf8_lossy(&out.stderr)),
                Err(e) => {
                    assert!(
                        std::env::var_os("LATHE_REQUIRE_NVRTC").is_none(),
                        "no g++ to build the CUDA emulator: {e}"
                    );
                    eprintln!("skipped: no g++ ({e})");
                    return None;
                }
            }
            let c = std::ffi::CString::new(lib.to_string_lossy().as_bytes()).unwrap();
            // SAFETY: a plain dlopen of a path; the handle is kept for the process.
            let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            assert!(!handle.is_null(), "{lib:?} does not load");
            Some(dir)
        })
        .as_deref()
}

/// What this thread has asked of the emulated driver so far.
#[derive(Clone, Copy, Debug)]
struct Counts {
    allocations: u64,
    launches: u64,
    /// Driver calls of any kind: launches, copies, allocations, events.
    calls: u64,
}

fn counts() -> Counts {
    let name = c"lathe_emulator_counts";
    // SAFETY: the symbol is the emulator's `void(unsigned long*, unsigned long*, unsigned
    // long*)`, loaded RTLD_GLOBAL by `emulator()`.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
        assert!(!f.is_null(), "the emulator is not loaded");
        let f: extern "C" fn(*mut u64, *mut u64, *mut u64) = std::mem::transmute(f);
        let mut c = Counts { allocations: 0, launches: 0, calls: 0 };
        f(&mut c.allocations, &mut c.launches, &mut c.calls);
        c
    }
}

/// What the emulated GPU is called in run records and the status.
const EMULATED: &str = "cuda:lathe CUDA emulator (sm_87, CPU) (sm_87)";

/// The CUDA backend on the emulated GPU; None (the test skips) where it cannot be built.
fn emulated_gpu() -> Option<cuda::Cuda> {
    emulator().map(|_| backend(4096))
}

fn backend(max_gpu_mem_mb: u64) -> cuda::Cuda {
    match cuda::choose("cuda", None, max_gpu_mem_mb) {
        Ok(cuda::Chosen::Cuda(c)) => *c,
        Ok(cuda::Chosen::Cpu { why }) => panic!("the CPU was chosen: {why}"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_probe_finds_the_emulated_orin_and_every_kernel_loads() {
    if emulator().is_none() {
        return;
    }
    let device = cuda::probe().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(device.arch, "sm_87");
    assert!(device.name.contains("emulator"), "{}", device.name);
    // `auto` takes the GPU when there is one; the backend names it, for the run's record.
    match cuda::choose("auto", None, 64).unwrap() {
        cuda::Chosen::Cuda(c) => assert_eq!(c.name(), EMULATED),
        cuda::Chosen::Cpu { why } => panic!("auto chose the CPU: {why}"),
    }
    // What the daemon's status and `train.started` say runs.
    assert_eq!(lathe::train::resolved_backend("auto"), EMULATED);
    assert_eq!(lathe::train::resolved_backend("cpu"), "cpu");
}

/// Training gets the lowest stream priority the driver reports, so inference (and whatever
/// else the GPU runs) goes first. The emulator's range is 2 (lowest) to -3.
#[test]
fn the_training_stream_has_the_lowest_priority_the_driver_reports() {
    if emulated_gpu().is_none() {
        return;
    }
    // SAFETY: the emulator's `int(void)`, loaded RTLD_GLOBAL by `emulator()`.
    let priority = unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, c"lathe_emulator_stream_priority".as_ptr());
        assert!(!f.is_null(), "the emulator is not loaded");
        let f: extern "C" fn() -> i32 = std::mem::transmute(f);
        f()
    };
    assert_eq!(priority, 2);
}

#[test]
fn each_op_matches_the_cpu_on_the_emulator() {
    let Some(g) = emulated_gpu() else { return };
    checks::each_op_matches_the_cpu(&g);
}

#[test]
fn training_on_the_emulator_matches_pytorch_step_by_step() {
    let Some(g) = emulated_gpu() else { return };
    common::pytorch::training_matches_pytorch_step_by_step(&g);
}

#[test]
fn a_net_trains_alike_on_the_emulator_in_every_mode() {
    let Some(g) = emulated_gpu() else { return };
    checks::a_net_trains_alike_in_every_mode(&g);
}

/// Buffers are allocated once per run: a training step (forward, loss, backward, clipping,
/// Adam) allocates nothing on the GPU, and costs a fixed, small number of launches.
#[test]
fn a_training_step_allocates_nothing_on_the_gpu() {
    let Some(g) = emulated_gpu() else { return };
    let onnx = std::fs::read(common::fixture("train/multiclass-adam.onnx")).unwrap();
    let tail = graph::tail_of(&onnx, "y").unwrap();
    let (rows, classes) = (32, tail.out_dim());
    let mut net = Net::new(&g, &tail.layers, Mode::Full, rows, 1).unwrap();
    let x = checks::values(rows * tail.in_dim(), 1);
    let y: Vec<f32> = (0..rows).map(|i| (i % classes) as f32).collect();
    let mut step = || net.train_step(&g, &x, &y, Loss::SoftmaxCrossEntropy, Update::adam(0.01, 0.0, false), Some(0.5));
    step().unwrap();
    let (mut launches, mut calls) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let before = counts();
        step().unwrap();
        let after = counts();
        assert_eq!(after.allocations - before.allocations, 0, "GPU allocations in a training step");
        launches.push(after.launches - before.launches);
        calls.push(after.calls - before.calls);
    }
    eprintln!("{} layers, per training step: {launches:?} kernel launches, {calls:?} driver calls", tail.layers.len());
    let per_step = launches;
    assert!(per_step[0] > 0 && per_step.iter().all(|&n| n == per_step[0]), "{per_step:?}");
    // The host's cost per launch: with cudarc's event tracking (for multi-stream use, off
    // here: one stream) each launch was ~20 driver calls (448 per step).
    assert!(calls[0] <= 2 * per_step[0], "{} driver calls for {} launches", calls[0], per_step[0]);
    // Launch-bound on a GPU, so counted: per layer one forward kernel and one backward (each
    // was up to four); the loss, its reduction and the weighted mean's scale; and one launch
    // each for clipping's norm, its scale and the update over all parameters (per-tensor ones
    // would be 3 × 5 more here).
    let layers = tail.layers.len() as u64;
    assert!(per_step[0] <= 2 * layers + 6, "{} launches per step for {layers} layers", per_step[0]);
}

/// `train.max_gpu_mem_mb` bounds what a run may hold on the GPU: past it, a clean error.
#[test]
fn a_run_past_max_gpu_mem_mb_is_refused_with_the_reason() {
    if emulator().is_none() {
        return;
    }
    let g = backend(1);
    let quarter = vec![0.5f32; 1 << 16]; // 256 KiB
    let held: Vec<_> = (0..4).map(|_| g.upload(&quarter).unwrap()).collect();
    let Err(err) = g.zeros(1) else { panic!("1 MiB is held; one more float is over the bound") };
    assert!(err.0.contains("more than train.max_gpu_mem_mb = 1 MiB"), "{}", err.0);
    let mut back = vec![0.0f32; 1 << 16];
    g.read(&held[3], &mut back).unwrap();
    assert_eq!(back, quarter, "what was uploaded before the refusal is intact");
}

/// The whole of `lathe train --backend cuda` (a child process that finds the stand-in on its
/// library path) against `--backend cpu`: the same per-epoch losses and gate decision.
#[test]
fn a_fine_tune_on_the_emulator_matches_the_cpu() {
    let Some(dir) = emulator() else {
        return;
    };
    let nvrtc_dir = std::env::var_os("LATHE_NVRTC").map(|p| PathBuf::from(p).parent().unwrap().to_path_buf());
    let path = std::env::join_paths(std::iter::once(dir.to_path_buf()).chain(nvrtc_dir)).unwrap();
    checks::a_fine_tune_matches_the_cpu(&[("LD_LIBRARY_PATH", path)]);
}

/// A machine with the driver but without NVRTC (no CUDA toolkit): `auto` trains on the CPU and
/// says why, and `cuda` fails with the reason, both without cudarc's panic text in the log.
#[test]
fn with_a_driver_but_no_nvrtc_auto_trains_on_the_cpu_and_says_why() {
    let Some(dir) = emulator() else {
        return;
    };
    let work = common::temp_dir("no-nvrtc");
    let data = common::unseen_csv(&work, 0.0);
    let run =
        |backend: &str| common::train_command(&work, &data, backend).env("LD_LIBRARY_PATH", dir).output().unwrap();
    let auto = run("auto");
    let log = String::from_utf8_lossy(&auto.stderr);
    let record: serde_json::Value = serde_json::from_slice(&auto.stdout).unwrap_or_else(|_| panic!("{log}"));
    if record["backend"] != "cpu" {
        eprintln!("skipped: this machine has NVRTC on its default library path ({})", record["backend"]);
        return;
    }
    assert!(log.contains("NVRTC is not loadable"), "{log}");
    let cuda = run("cuda");
    let err = String::from_utf8_lossy(&cuda.stderr);
    assert!(!cuda.status.success() && err.contains("NVRTC is not loadable"), "{err}");
    for log in [&log, &err] {
        assert!(!log.contains("panicked"), "cudarc's panic reached the log:\n{log}");
    }
}
