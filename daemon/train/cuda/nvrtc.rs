//! NVRTC: the kernels' sources, compiling them for an architecture, and the on-disk PTX cache.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileError, CompileOptions};

/// The kernels, each file one NVRTC program, `common.cuh` inlined.
pub const SOURCES: [(&str, &str); 5] = [
    ("gemm_f32.cu", include_str!("../../../cuda/gemm_f32.cu")),
    ("layer_f32.cu", include_str!("../../../cuda/layer_f32.cu")),
    ("loss_f32.cu", include_str!("../../../cuda/loss_f32.cu")),
    ("optim_f32.cu", include_str!("../../../cuda/optim_f32.cu")),
    ("lora_f32.cu", include_str!("../../../cuda/lora_f32.cu")),
];
const COMMON: &str = include_str!("../../../cuda/common.cuh");

/// Architectures lathe compiles for: Jetson Nano/TX2 (sm_53/62), Xavier (sm_72), Turing,
/// Ampere, Orin (sm_87), Ada, Hopper.
pub const ARCHS: [&str; 9] = ["sm_53", "sm_62", "sm_70", "sm_72", "sm_75", "sm_80", "sm_86", "sm_87", "sm_89"];
pub(super) const ARCH_90: &str = "sm_90";

/// A kernel file as NVRTC compiles it: `#include "common.cuh"` replaced by the header.
pub fn program(source: &str) -> String {
    source.replace("#include \"common.cuh\"", &COMMON.replace("#pragma once", ""))
}

/// Whether NVRTC can be loaded (cudarc panics on first use otherwise): `libnvrtc.so.12`, or
/// `libnvrtc.so`. cudarc does not look for `libnvrtc.so.13`: CUDA 13's NVRTC (which works) is
/// found through the toolkit's unversioned link.
pub fn nvrtc_present() -> bool {
    catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// Compiles one kernel file for `arch` (e.g. "sm_87"): its PTX, or the NVRTC log.
///
/// # Errors
/// No NVRTC, or the source does not compile (the error holds NVRTC's log).
pub fn compile(name: &str, source: &str, arch: &'static str) -> std::result::Result<String, String> {
    if !nvrtc_present() {
        return Err(
            "NVRTC is not loadable: no libnvrtc.so.12 (CUDA 12) or libnvrtc.so (any CUDA) on the library path \
             (install the CUDA toolkit, or the nvidia-cuda-nvrtc-cu12 wheel)"
                .into(),
        );
    }
    let opts = CompileOptions { arch: Some(arch), name: Some(name.to_string()), ..Default::default() };
    match catch_unwind(AssertUnwindSafe(|| cudarc::nvrtc::compile_ptx_with_opts(program(source), opts))) {
        Ok(Ok(ptx)) => Ok(ptx.to_src()),
        Ok(Err(CompileError::CompileError { log, .. })) => {
            let log = log.to_string_lossy();
            let hint = match (log.contains("invalid value for --gpu-architecture"), arch) {
                (true, "sm_72") => format!(
                    " (NVRTC {} has no sm_72: CUDA 13 dropped Volta, so Xavier's sm_72 needs NVRTC 12 or older)",
                    nvrtc_version()
                ),
                (true, _) => format!(" (NVRTC {} has no {arch})", nvrtc_version()),
                _ => String::new(),
            };
            Err(format!("{name} does not compile for {arch}{hint}:\n{log}"))
        }
        Ok(Err(e)) => Err(format!("{name} for {arch}: {e:?}")),
        Err(p) => Err(format!("NVRTC panicked on {name}: {}", crate::panic_message(p))),
    }
}

/// The NVRTC version ("12.9"), for the cache key and errors; empty when NVRTC is not loaded.
pub fn nvrtc_version() -> String {
    // Checked first: cudarc's panic on a missing library would reach stderr (the log) even
    // though it is caught.
    if !nvrtc_present() {
        return String::new();
    }
    catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-parameters; only called once NVRTC is known to load.
        let _ = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        format!("{major}.{minor}")
    })
    .unwrap_or_default()
}

/// Every kernel's PTX for `arch`, from `cache_dir` when this exact source, architecture and
/// NVRTC compiled it before.
///
/// # Errors
/// As [`compile`]; an unwritable cache only costs a compile.
pub fn compile_all(arch: &'static str, cache_dir: Option<&Path>) -> std::result::Result<Vec<String>, String> {
    let mut key = sha2::Sha256::new();
    use sha2::Digest;
    for (name, src) in SOURCES {
        key.update(name.as_bytes());
        key.update(program(src).as_bytes());
    }
    key.update(arch.as_bytes());
    key.update(nvrtc_version().as_bytes());
    let key = hex::encode(key.finalize());
    let cached: Option<PathBuf> = cache_dir.map(|d| d.join(format!("kernels-{arch}-{}.json", &key[..16])));
    if let Some(text) = cached.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        if let Ok(ptx) = serde_json::from_str::<Vec<String>>(&text) {
            if ptx.len() == SOURCES.len() {
                return Ok(ptx);
            }
        }
    }
    let ptx = SOURCES.iter().map(|(name, src)| compile(name, src, arch)).collect::<std::result::Result<Vec<_>, _>>()?;
    if let (Some(path), Ok(text)) = (cached, serde_json::to_string(&ptx)) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
            // The same architecture's kernels from an older lathe or NVRTC are never read
            // again: without this the cache grows by a file per upgrade.
            let stale = |p: &Path| {
                p != path
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("kernels-{arch}-")) && n.ends_with(".json"))
            };
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if stale(&entry.path()) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let _ = crate::fs::write_atomic(&path, text.as_bytes());
    }
    Ok(ptx)
}
