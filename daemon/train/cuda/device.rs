//! Finding the GPU, and `train.backend`'s choice between it and the CPU.

use std::panic::catch_unwind;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::CudaContext;

use super::nvrtc::{ARCHS, ARCH_90};
use super::ops::Cuda;

/// The GPU found, or why there is none.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub name: String,
    pub arch: &'static str,
}

/// Looks for a CUDA GPU without letting cudarc panic the process.
///
/// # Errors
/// No driver library, no device, or a driver too old for what cudarc calls.
pub fn probe() -> std::result::Result<Device, String> {
    let present = catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err("libcuda.so.1 is not loadable (no NVIDIA driver)".into());
    }
    let found = catch_unwind(|| -> std::result::Result<Device, String> {
        let ctx = CudaContext::new(0).map_err(|e| format!("no usable CUDA device: {e}"))?;
        // SAFETY: cudarc's event tracking orders a buffer's uses across streams. lathe uses one
        // stream: every buffer is allocated, used and freed on it, in stream order. Without
        // tracking, a launch is one driver call instead of ~20 (counted on the emulator).
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        use cudarc::driver::sys::CUdevice_attribute as A;
        let major = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(0);
        let minor = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).unwrap_or(0);
        let wanted = format!("sm_{major}{minor}");
        let arch = ARCHS
            .iter()
            .chain(std::iter::once(&ARCH_90))
            .copied()
            .find(|a| *a == wanted)
            // A newer GPU runs the newest PTX we make (the driver JIT-compiles it).
            .or_else(|| (major * 10 + minor > 90).then_some(ARCH_90))
            .ok_or_else(|| format!("{name} is {wanted}, older than lathe's kernels support"))?;
        Ok(Device { ctx, name, arch })
    });
    found.unwrap_or_else(|p| Err(format!("the CUDA driver failed: {}", crate::panic_message(p))))
}

/// `train.backend`: which backend a run uses, and why.
pub enum Chosen {
    Cpu { why: String },
    Cuda(Box<Cuda>),
}

/// `"cpu"`: the CPU. `"cuda"`: the GPU, or an error saying why not. `"auto"`: the GPU when
/// there is one whose kernels compile, else the CPU (the caller logs `why` once).
///
/// # Errors
/// `"cuda"` where CUDA cannot run.
pub fn choose(requested: &str, cache_dir: Option<&Path>, max_gpu_mem_mb: u64) -> std::result::Result<Chosen, String> {
    if requested == "cpu" {
        return Ok(Chosen::Cpu { why: "train.backend = \"cpu\"".into() });
    }
    let cuda = probe().and_then(|d| Cuda::new(d, cache_dir, max_gpu_mem_mb));
    match (requested, cuda) {
        (_, Ok(c)) => Ok(Chosen::Cuda(Box::new(c))),
        ("cuda", Err(e)) => Err(format!("train.backend = \"cuda\" but {e}")),
        (_, Err(e)) => Ok(Chosen::Cpu { why: format!("auto: training on the CPU ({e})") }),
    }
}
