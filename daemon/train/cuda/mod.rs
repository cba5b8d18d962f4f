//! The CUDA backend: the kernels in `cuda/*.cu`, compiled at run time by NVRTC for the GPU
//! present, behind the same `Backend` trait as the CPU.
//!
//! One binary runs with and without CUDA: cudarc loads `libcuda` and `libnvrtc` at run time,
//! and panics where a library or symbol is missing (`CudaContext::new` without libcuda; a
//! symbol an old driver lacks, at its first call), so every call that may load one
//! is probed first (`is_culib_present`) and runs under `catch_unwind`. Compiled PTX is cached
//! on disk, keyed by the sources' sha256, the architecture and the NVRTC version.
//!
//! `nvrtc` compiles and caches the kernels, `device` finds the GPU and chooses the backend,
//! `ops` runs the training operations on it.

mod device;
mod nvrtc;
mod ops;

pub use device::{choose, probe, Chosen, Device};
pub use nvrtc::{compile, compile_all, nvrtc_present, nvrtc_version, program, ARCHS, SOURCES};
pub use ops::Cuda;
