//! The CUDA backend (feature `cuda`, on by default).
//!
//! Without a GPU (CI): every kernel in `cuda/` compiles with NVRTC for Jetson Xavier (sm_72),
//! Orin (sm_87) and Hopper (sm_90); a broken kernel fails with NVRTC's log; the PTX cache is
//! used; with no libcuda, `auto` trains on the CPU and `cuda` is a clean error. NVRTC comes
//! from the PyPI wheel `nvidia-cuda-nvrtc-cu12`: `LATHE_NVRTC` names its `libnvrtc.so.12`
//! (`.ci/run` sets it and `LATHE_REQUIRE_NVRTC=1`).
//!
//! On a GPU (`cargo test --test cuda -- --ignored`, or `scripts/gpu-check.sh`): every op
//! against the CPU backend, PyTorch's recorded training steps, and a whole fine-tune on both.
//! The same checks run on an emulated GPU in tests/cuda_emulated.rs.
#![cfg(feature = "cuda")]

#[path = "cuda_emulator/checks.rs"]
mod checks;
mod common;

use checks::nvrtc;

use lathe::train::cuda;

#[test]
fn every_kernel_compiles_for_xavier_orin_and_hopper() {
    if !nvrtc() {
        return;
    }
    // CUDA 13 dropped Volta: there, Xavier's sm_72 must fail with a reason (CI's NVRTC is 12.9,
    // which compiles all three; a GPU machine may have 13).
    let major: u32 = cuda::nvrtc_version().split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    if major >= 13 {
        let err = cuda::compile(cuda::SOURCES[0].0, cuda::SOURCES[0].1, "sm_72").unwrap_err();
        assert!(err.contains("sm_72 needs NVRTC 12 or older"), "{err}");
    }
    for arch in ["sm_72", "sm_87", "sm_90"].into_iter().filter(|a| major < 13 || *a != "sm_72") {
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
    // What an older lathe left: the same architecture's goes, another architecture's stays.
    std::fs::write(dir.join("kernels-sm_87-0123456789abcdef.json"), "[]").unwrap();
    std::fs::write(dir.join("kernels-sm_72-0123456789abcdef.json"), "[]").unwrap();
    let first = cuda::compile_all("sm_87", Some(&dir)).unwrap();
    assert!(!dir.join("kernels-sm_87-0123456789abcdef.json").exists(), "a stale sm_87 cache is removed");
    std::fs::remove_file(dir.join("kernels-sm_72-0123456789abcdef.json")).unwrap();
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
    let run = |backend: &str| common::train_command(&dir, &data, backend).output().unwrap();
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

#[test]
#[ignore = "needs a CUDA GPU"]
fn each_kernel_matches_the_cpu_op() {
    checks::each_op_matches_the_cpu(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn training_on_the_gpu_matches_pytorch_step_by_step() {
    common::pytorch::training_matches_pytorch_step_by_step(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_net_trains_alike_on_the_gpu_in_every_mode() {
    checks::a_net_trains_alike_in_every_mode(&gpu());
}

/// The same fine-tune on the GPU and the CPU: per-epoch losses agree, and the gate decides
/// the same.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_fine_tune_on_the_gpu_matches_the_cpu() {
    checks::a_fine_tune_matches_the_cpu(&[]);
}
