//! The training operations on the GPU: the `Backend` trait over the loaded kernels, on one
//! low-priority stream, within a memory budget.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::device::Device;
use super::nvrtc::compile_all;
use crate::train::backend::{
    dense_backward_unfused, dense_forward_unfused, Activation, Backend, BackendError, DenseGrads, Gemm, Loss,
    ParamSlot, Result, Update,
};

/// The CUDA backend: one context, a low-priority stream (inference and the rest of the GPU's
/// work go first), the kernels loaded once.
pub struct Cuda {
    name: String,
    stream: Arc<CudaStream>,
    f: Kernels,
    /// Device memory this backend may hold (`train.max_gpu_mem_mb`), and what it holds.
    budget: u64,
    held: std::sync::atomic::AtomicU64,
    /// Scratch for the loss's per-row parts.
    parts: std::sync::Mutex<Option<CudaSlice<f32>>>,
    /// Where the reductions (the loss and its weight, Σ x²) land: allocated once, so a
    /// training step allocates nothing.
    sums: std::sync::Mutex<CudaSlice<f32>>,
    /// The multi-tensor kernels' tables: [0] (param, grad, m, v, len) per tensor for a net's
    /// update, [1] (grad, len) for clipping, [2] a single tensor's update.
    tables: std::sync::Mutex<[Table; 3]>,
}

/// A table of u64s (device pointers and lengths) on the device, uploaded again only when it
/// changes: a net's buffers live as long as its run, so after the first step nothing is copied.
#[derive(Default)]
struct Table {
    host: Vec<u64>,
    dev: Option<CudaSlice<u64>>,
}

struct Kernels {
    gemm: CudaFunction,
    add_bias: CudaFunction,
    dense: CudaFunction,
    dense_backward: CudaFunction,
    lora_merge: CudaFunction,
    activation: CudaFunction,
    activation_grad: CudaFunction,
    softmax_rows: CudaFunction,
    softmax_grad: CudaFunction,
    bias_grad: CudaFunction,
    mse: CudaFunction,
    bce: CudaFunction,
    xent: CudaFunction,
    reduce_pairs: CudaFunction,
    scale: CudaFunction,
    sum_squares: CudaFunction,
    sgd_all: CudaFunction,
    adam_all: CudaFunction,
    clip_all: CudaFunction,
    sum_squares_all: CudaFunction,
}

fn err(e: impl std::fmt::Debug) -> BackendError {
    BackendError(format!("CUDA: {e:?}"))
}

const BLOCK: u32 = 256;

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(BLOCK).max(1), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The multi-tensor kernels: a row of blocks per tensor (blockIdx.y), enough for the longest.
fn multi_tensor(longest: usize, tensors: usize) -> LaunchConfig {
    let blocks = (longest as u32).div_ceil(BLOCK).max(1);
    LaunchConfig { grid_dim: (blocks, tensors.max(1) as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// gemm_f32 and dense_f32: a 16×16 block per 16×16 tile of the rows×cols output.
fn tiles(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((cols as u32).div_ceil(16).max(1), (rows as u32).div_ceil(16).max(1), 1),
        block_dim: (16, 16, 1),
        shared_mem_bytes: 0,
    }
}

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 }
}

fn act_code(f: Activation) -> (i32, f32) {
    match f {
        Activation::Relu => (0, 0.0),
        Activation::LeakyRelu(a) => (1, a),
        Activation::Sigmoid => (2, 0.0),
        Activation::Tanh | Activation::Softmax => (3, 0.0),
    }
}

impl Cuda {
    /// # Errors
    /// Kernels that do not compile or load, or a stream that cannot be made.
    pub fn new(device: Device, cache_dir: Option<&Path>, max_gpu_mem_mb: u64) -> std::result::Result<Cuda, String> {
        let ptx = compile_all(device.arch, cache_dir)?;
        type Loaded = (Arc<CudaStream>, Kernels, CudaSlice<f32>);
        let loaded = catch_unwind(AssertUnwindSafe(|| -> std::result::Result<Loaded, String> {
            let ctx = &device.ctx;
            // The lowest priority the device offers (the numerically greatest, "least"; 0 on
            // today's GPUs, but the driver is the one to ask): inference and the rest of the
            // GPU's work go first.
            ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
            let (least, _greatest) = cudarc::driver::result::stream::get_priority_range()
                .map_err(|e| format!("stream priorities: {e:?}"))?;
            let stream = ctx.new_stream_with_priority(least).map_err(|e| format!("{e:?}"))?;
            let modules = ptx
                .into_iter()
                .map(|p| ctx.load_module(Ptx::from_src(p)).map_err(|e| format!("{e:?}")))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let f = |m: usize, name: &str| modules[m].load_function(name).map_err(|e| format!("{name}: {e:?}"));
            let kernels = Kernels {
                gemm: f(0, "gemm_f32")?,
                add_bias: f(1, "add_bias_f32")?,
                dense: f(0, "dense_f32")?,
                dense_backward: f(0, "dense_backward_f32")?,
                lora_merge: f(4, "lora_merge_f32")?,
                activation: f(1, "activation_f32")?,
                activation_grad: f(1, "activation_grad_f32")?,
                softmax_rows: f(1, "softmax_rows_f32")?,
                softmax_grad: f(1, "softmax_grad_f32")?,
                bias_grad: f(1, "bias_grad_f32")?,
                mse: f(2, "mse_f32")?,
                bce: f(2, "bce_logits_f32")?,
                xent: f(2, "softmax_xent_f32")?,
                reduce_pairs: f(2, "reduce_pairs_f32")?,
                scale: f(3, "scale_f32")?,
                sum_squares: f(3, "sum_squares_f32")?,
                sgd_all: f(3, "sgd_all_f32")?,
                adam_all: f(3, "adam_all_f32")?,
                clip_all: f(3, "clip_all_f32")?,
                sum_squares_all: f(3, "sum_squares_all_f32")?,
            };
            let sums = stream.alloc_zeros::<f32>(2).map_err(|e| format!("{e:?}"))?;
            Ok((stream, kernels, sums))
        }))
        .unwrap_or_else(|p| Err(crate::panic_message(p)))?;
        let (stream, f, sums) = loaded;
        Ok(Cuda {
            name: format!("cuda:{} ({})", device.name, device.arch),
            stream,
            f,
            budget: max_gpu_mem_mb << 20,
            held: Default::default(),
            parts: std::sync::Mutex::new(None),
            sums: std::sync::Mutex::new(sums),
            tables: Default::default(),
        })
    }

    fn reserve(&self, len: usize) -> Result<()> {
        let bytes = (len * 4) as u64;
        let held = self.held.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
        if held > self.budget {
            self.held.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
            return Err(BackendError(format!(
                "the run needs more than train.max_gpu_mem_mb = {} MiB of GPU memory",
                self.budget >> 20
            )));
        }
        Ok(())
    }

    /// Scratch of at least `len` floats, zeroed, kept between calls.
    fn scratch(&self, len: usize) -> Result<std::sync::MutexGuard<'_, Option<CudaSlice<f32>>>> {
        let mut guard = self.parts.lock().map_err(|_| BackendError("CUDA scratch poisoned".into()))?;
        if guard.as_ref().is_none_or(|s| s.len() < len) {
            self.reserve(len)?;
            *guard = Some(self.stream.alloc_zeros::<f32>(len).map_err(err)?);
        }
        Ok(guard)
    }

    /// The two-float sums, zeroed.
    fn sums(&self) -> Result<std::sync::MutexGuard<'_, CudaSlice<f32>>> {
        let mut sums = self.sums.lock().map_err(|_| BackendError("CUDA sums poisoned".into()))?;
        self.stream.memset_zeros(&mut *sums).map_err(err)?;
        Ok(sums)
    }

    /// Reads the two sums back to the host.
    fn read_sums(&self, sums: &CudaSlice<f32>) -> Result<[f32; 2]> {
        let mut host = [0.0f32; 2];
        self.stream.memcpy_dtoh(sums, &mut host[..]).map_err(err)?;
        Ok(host)
    }

    fn ptr(&self, buf: &CudaSlice<f32>) -> u64 {
        buf.device_ptr(&self.stream).0
    }

    /// Runs `launch` with table `which` holding `entries` on the device.
    fn with_table<R>(
        &self,
        which: usize,
        entries: Vec<u64>,
        launch: impl FnOnce(&CudaSlice<u64>) -> Result<R>,
    ) -> Result<R> {
        let mut tables = self.tables.lock().map_err(|_| BackendError("CUDA tables poisoned".into()))?;
        let table = &mut tables[which];
        if table.dev.is_none() || table.host != entries {
            if table.dev.as_ref().is_none_or(|d| d.len() < entries.len()) {
                self.reserve(2 * entries.len())?;
                table.dev = Some(self.stream.alloc_zeros::<u64>(entries.len()).map_err(err)?);
            }
            let dev = table.dev.as_mut().ok_or_else(|| BackendError("CUDA table missing".into()))?;
            self.stream.memcpy_htod(&entries, &mut dev.slice_mut(..entries.len())).map_err(err)?;
            table.host = entries;
        }
        launch(table.dev.as_ref().ok_or_else(|| BackendError("CUDA table missing".into()))?)
    }

    /// Launch shape of a multi-tensor kernel: a row of blocks per tensor, long enough for the
    /// longest.
    fn per_tensor(params: &[ParamSlot<'_, CudaSlice<f32>>]) -> LaunchConfig {
        multi_tensor(params.iter().map(|p| p.len).max().unwrap_or(0), params.len())
    }

    /// The optimizer's kernel over the tensors in `entries` (param, grad, m, v, len each), from
    /// table `which`: 0 a whole net's step, 2 a single tensor's.
    fn launch_update(&self, u: Update, which: usize, entries: Vec<u64>, longest: usize) -> Result<()> {
        let tensors = entries.len() / 5;
        let (cfg, count) = (multi_tensor(longest, tensors), tensors as i32);
        self.with_table(which, entries, |table| {
            let launched = match u {
                Update::Sgd { lr, momentum, weight_decay } => unsafe {
                    self.stream
                        .launch_builder(&self.f.sgd_all)
                        .arg(table)
                        .arg(&count)
                        .arg(&lr)
                        .arg(&momentum)
                        .arg(&weight_decay)
                        .launch(cfg)
                },
                Update::Adam { lr, beta1, beta2, eps, weight_decay, decoupled, step } => {
                    let a = adam_terms(lr, beta1, beta2, weight_decay, decoupled, step);
                    unsafe {
                        self.stream
                            .launch_builder(&self.f.adam_all)
                            .arg(table)
                            .arg(&count)
                            .arg(&beta1)
                            .arg(&beta2)
                            .arg(&eps)
                            .arg(&a.l2)
                            .arg(&a.decay)
                            .arg(&a.step_size)
                            .arg(&a.bc2_sqrt)
                            .launch(cfg)
                    }
                }
            };
            launched.map(|_| ()).map_err(err)
        })
    }

    fn grad_table(&self, params: &[ParamSlot<'_, CudaSlice<f32>>]) -> Vec<u64> {
        params.iter().flat_map(|p| [self.ptr(p.grad), p.len as u64]).collect()
    }

    /// Sums `n` (value, weight) pairs in `parts` into two floats on the host.
    fn reduce_pairs(&self, parts: &CudaSlice<f32>, n: usize) -> Result<(f32, f32)> {
        let mut out = self.sums()?;
        let n32 = n as i32;
        unsafe {
            self.stream.launch_builder(&self.f.reduce_pairs).arg(parts).arg(&mut *out).arg(&n32).launch(elementwise(n))
        }
        .map_err(err)?;
        let [sum, weight] = self.read_sums(&out)?;
        Ok((sum, weight))
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn zeros(&self, len: usize) -> Result<Self::Buf> {
        self.reserve(len)?;
        self.stream.alloc_zeros::<f32>(len.max(1)).map_err(err)
    }

    fn upload(&self, host: &[f32]) -> Result<Self::Buf> {
        self.reserve(host.len())?;
        self.stream.clone_htod(host).map_err(err)
    }

    fn write(&self, dst: &mut Self::Buf, host: &[f32]) -> Result<()> {
        let mut view = dst.slice_mut(..host.len());
        self.stream.memcpy_htod(host, &mut view).map_err(err)
    }

    fn read(&self, src: &Self::Buf, host: &mut [f32]) -> Result<()> {
        let n = host.len();
        self.stream.memcpy_dtoh(&src.slice(..n), host).map_err(err)
    }

    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf, len: usize) -> Result<()> {
        let mut view = dst.slice_mut(..len);
        self.stream.memcpy_dtod(&src.slice(..len), &mut view).map_err(err)
    }

    fn gemm(&self, g: Gemm, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf) -> Result<()> {
        let (m, n, k) = (g.m as i32, g.n as i32, g.k as i32);
        let (ta, tb) = (i32::from(g.trans_a), i32::from(g.trans_b));
        let cfg = tiles(g.m, g.n);
        unsafe {
            self.stream
                .launch_builder(&self.f.gemm)
                .arg(a)
                .arg(b)
                .arg(c)
                .arg(&m)
                .arg(&n)
                .arg(&k)
                .arg(&ta)
                .arg(&tb)
                .arg(&g.alpha)
                .arg(&g.beta)
                .launch(cfg)
        }
        .map(|_| ())
        .map_err(err)
    }

    fn add_bias(&self, y: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize) -> Result<()> {
        let (r, c) = (rows as i32, cols as i32);
        unsafe {
            self.stream
                .launch_builder(&self.f.add_bias)
                .arg(y)
                .arg(bias)
                .arg(&r)
                .arg(&c)
                .launch(elementwise(rows * cols))
        }
        .map(|_| ())
        .map_err(err)
    }

    fn bias_grad(&self, dy: &Self::Buf, rows: usize, cols: usize, db: &mut Self::Buf) -> Result<()> {
        let (r, c) = (rows as i32, cols as i32);
        let cfg = LaunchConfig { grid_dim: (cols.max(1) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        unsafe { self.stream.launch_builder(&self.f.bias_grad).arg(dy).arg(db).arg(&r).arg(&c).launch(cfg) }
            .map(|_| ())
            .map_err(err)
    }

    fn activation(&self, f: Activation, x: &Self::Buf, y: &mut Self::Buf, rows: usize, cols: usize) -> Result<()> {
        let (r, c, n) = (rows as i32, cols as i32, (rows * cols) as i32);
        let launched = if f == Activation::Softmax {
            unsafe {
                self.stream.launch_builder(&self.f.softmax_rows).arg(x).arg(y).arg(&r).arg(&c).launch(per_row(rows))
            }
        } else {
            let (code, slope) = act_code(f);
            unsafe {
                self.stream
                    .launch_builder(&self.f.activation)
                    .arg(x)
                    .arg(y)
                    .arg(&n)
                    .arg(&code)
                    .arg(&slope)
                    .launch(elementwise(rows * cols))
            }
        };
        launched.map(|_| ()).map_err(err)
    }

    fn dense_forward(
        &self,
        (x, w): (&Self::Buf, &Self::Buf),
        bias: Option<&Self::Buf>,
        z: &mut Self::Buf,
        act: Option<(Activation, &mut Self::Buf)>,
        (rows, k, cols): (usize, usize, usize),
    ) -> Result<()> {
        if matches!(act, Some((Activation::Softmax, _))) {
            // Softmax works on whole rows: the GEMM and bias first, then the row kernel.
            return dense_forward_unfused(self, (x, w), bias, z, act, (rows, k, cols));
        }
        let (m, n, k32) = (rows as i32, cols as i32, k as i32);
        let (code, slope) = act.as_ref().map_or((-1, 0.0), |(f, _)| act_code(*f));
        let has_bias = i32::from(bias.is_some());
        let mut launch = self.stream.launch_builder(&self.f.dense);
        // Without a bias or an activation the kernel never touches those: `x` serves as the
        // pointer.
        launch.arg(x).arg(w).arg(bias.unwrap_or(x)).arg(&has_bias).arg(z);
        match act {
            Some((_, y)) => launch.arg(y),
            None => launch.arg(x),
        };
        launch.arg(&m).arg(&n).arg(&k32).arg(&code).arg(&slope);
        unsafe { launch.launch(tiles(rows, cols)) }.map(|_| ()).map_err(err)
    }

    fn dense_backward(
        &self,
        f: Option<Activation>,
        (x, w): (&Self::Buf, &Self::Buf),
        (z, y, dy): (&Self::Buf, &Self::Buf, &Self::Buf),
        dz: &mut Self::Buf,
        grads: DenseGrads<'_, Self::Buf>,
        (rows, k, cols): (usize, usize, usize),
    ) -> Result<()> {
        if f == Some(Activation::Softmax) {
            // Softmax's gradient needs whole rows: its row kernel first, then the GEMMs.
            return dense_backward_unfused(self, f, (x, w), (z, y, dy), dz, grads, (rows, k, cols));
        }
        let DenseGrads { dw, db, dx } = grads;
        let tiles_in = |len: usize| len.div_ceil(16);
        // dw's tile rows; one row of tiles when only the bias gradient is wanted.
        let dw_rows = if dw.is_some() { tiles_in(k) } else { usize::from(db.is_some()) };
        let dx_tiles = if dx.is_some() { tiles_in(rows) * tiles_in(k) } else { 0 };
        let blocks = dw_rows * tiles_in(cols) + dx_tiles;
        if blocks == 0 {
            return Ok(());
        }
        let (code, slope) = f.map_or((-1, 0.0), act_code);
        let (m, n, k32, dw_rows32) = (rows as i32, cols as i32, k as i32, dw_rows as i32);
        let flags = [i32::from(dw.is_some()), i32::from(db.is_some()), i32::from(dx.is_some())];
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (16, 16, 1), shared_mem_bytes: 0 };
        let mut launch = self.stream.launch_builder(&self.f.dense_backward);
        launch.arg(x).arg(w).arg(z).arg(y).arg(dy);
        // What is not asked for is never written: `x` serves as its pointer.
        for out in [dw, db, dx] {
            match out {
                Some(buf) => launch.arg(buf),
                None => launch.arg(x),
            };
        }
        launch.arg(&m).arg(&n).arg(&k32).arg(&code).arg(&slope).arg(&dw_rows32);
        launch.arg(&flags[0]).arg(&flags[1]).arg(&flags[2]);
        unsafe { launch.launch(cfg) }.map(|_| ()).map_err(err)
    }

    fn lora_merge(
        &self,
        w: &Self::Buf,
        (a, b): (&Self::Buf, &Self::Buf),
        out: &mut Self::Buf,
        (rows, rank, cols): (usize, usize, usize),
        scale: f32,
    ) -> Result<()> {
        let (r, c, k) = (rows as i32, cols as i32, rank as i32);
        unsafe {
            self.stream
                .launch_builder(&self.f.lora_merge)
                .arg(w)
                .arg(a)
                .arg(b)
                .arg(out)
                .arg(&r)
                .arg(&c)
                .arg(&k)
                .arg(&scale)
                .launch(elementwise(rows * cols))
        }
        .map(|_| ())
        .map_err(err)
    }

    fn activation_grad(
        &self,
        f: Activation,
        x: &Self::Buf,
        y: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (r, c, n) = (rows as i32, cols as i32, (rows * cols) as i32);
        let launched = if f == Activation::Softmax {
            unsafe {
                self.stream
                    .launch_builder(&self.f.softmax_grad)
                    .arg(y)
                    .arg(dy)
                    .arg(dx)
                    .arg(&r)
                    .arg(&c)
                    .launch(per_row(rows))
            }
        } else {
            let (code, slope) = act_code(f);
            unsafe {
                self.stream
                    .launch_builder(&self.f.activation_grad)
                    .arg(x)
                    .arg(y)
                    .arg(dy)
                    .arg(dx)
                    .arg(&n)
                    .arg(&code)
                    .arg(&slope)
                    .launch(elementwise(rows * cols))
            }
        };
        launched.map(|_| ()).map_err(err)
    }

    fn loss(
        &self,
        loss: Loss,
        out: &Self::Buf,
        target: &Self::Buf,
        class_weights: Option<&Self::Buf>,
        rows: usize,
        cols: usize,
        grad: &mut Self::Buf,
    ) -> Result<f32> {
        let n = rows * cols;
        let items = if loss == Loss::SoftmaxCrossEntropy { rows } else { n };
        let mut guard = self.scratch(2 * items)?;
        let parts = guard.as_mut().ok_or_else(|| BackendError("CUDA scratch missing".into()))?;
        let weighted = i32::from(class_weights.is_some());
        // Kernels that ignore the weights still take a pointer: the target serves.
        let w = class_weights.unwrap_or(target);
        let (r, c, n32) = (rows as i32, cols as i32, n as i32);
        let launched = unsafe {
            match loss {
                Loss::Mse => self
                    .stream
                    .launch_builder(&self.f.mse)
                    .arg(out)
                    .arg(target)
                    .arg(&mut *grad)
                    .arg(&mut *parts)
                    .arg(&n32)
                    .launch(elementwise(n)),
                Loss::BceWithLogits => self
                    .stream
                    .launch_builder(&self.f.bce)
                    .arg(out)
                    .arg(target)
                    .arg(w)
                    .arg(&weighted)
                    .arg(&mut *grad)
                    .arg(&mut *parts)
                    .arg(&n32)
                    .launch(elementwise(n)),
                Loss::SoftmaxCrossEntropy => self
                    .stream
                    .launch_builder(&self.f.xent)
                    .arg(out)
                    .arg(target)
                    .arg(w)
                    .arg(&weighted)
                    .arg(&mut *grad)
                    .arg(&mut *parts)
                    .arg(&r)
                    .arg(&c)
                    .launch(per_row(rows)),
            }
        };
        launched.map_err(err)?;
        let (sum, total_w) = self.reduce_pairs(parts, items)?;
        if loss == Loss::Mse {
            return Ok(sum / n.max(1) as f32);
        }
        let inv = if total_w > 0.0 { 1.0 / total_w } else { 0.0 };
        self.scale(grad, n, inv)?;
        Ok(sum * inv)
    }

    fn sum_squares(&self, x: &Self::Buf, len: usize) -> Result<f32> {
        let mut out = self.sums()?;
        let n = len as i32;
        unsafe {
            self.stream.launch_builder(&self.f.sum_squares).arg(x).arg(&mut *out).arg(&n).launch(elementwise(len))
        }
        .map_err(err)?;
        Ok(self.read_sums(&out)?[0])
    }

    fn scale(&self, x: &mut Self::Buf, len: usize, factor: f32) -> Result<()> {
        let n = len as i32;
        unsafe { self.stream.launch_builder(&self.f.scale).arg(x).arg(&n).arg(&factor).launch(elementwise(len)) }
            .map(|_| ())
            .map_err(err)
    }

    fn update(
        &self,
        u: Update,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        len: usize,
    ) -> Result<()> {
        let entry = vec![self.ptr(param), self.ptr(grad), self.ptr(m), self.ptr(v), len as u64];
        self.launch_update(u, 2, entry, len)
    }

    fn clip_grad_norm(&self, params: &mut [ParamSlot<'_, Self::Buf>], max_norm: f32) -> Result<()> {
        if params.is_empty() {
            return Ok(());
        }
        let (cfg, tensors) = (Self::per_tensor(params), params.len() as i32);
        let mut sum_sq = self.sums()?;
        self.with_table(1, self.grad_table(params), |table| {
            unsafe {
                self.stream
                    .launch_builder(&self.f.sum_squares_all)
                    .arg(table)
                    .arg(&tensors)
                    .arg(&mut *sum_sq)
                    .launch(cfg)
            }
            .map_err(err)?;
            unsafe {
                self.stream
                    .launch_builder(&self.f.clip_all)
                    .arg(table)
                    .arg(&tensors)
                    .arg(&*sum_sq)
                    .arg(&max_norm)
                    .launch(cfg)
            }
            .map(|_| ())
            .map_err(err)
        })
    }

    fn update_all(&self, u: Update, params: &mut [ParamSlot<'_, Self::Buf>]) -> Result<()> {
        if params.is_empty() {
            return Ok(());
        }
        let entries = params
            .iter()
            .flat_map(|p| [self.ptr(p.value), self.ptr(p.grad), self.ptr(p.m), self.ptr(p.v), p.len as u64]);
        let longest = params.iter().map(|p| p.len).max().unwrap_or(0);
        self.launch_update(u, 0, entries.collect(), longest)
    }
}

/// Adam's per-step scalars, as the kernels take them (PyTorch's definitions).
struct AdamTerms {
    l2: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

fn adam_terms(lr: f32, beta1: f32, beta2: f32, weight_decay: f32, decoupled: bool, step: u32) -> AdamTerms {
    let bc1 = 1.0 - beta1.powi(step as i32);
    let bc2_sqrt = (1.0 - beta2.powi(step as i32)).sqrt();
    // Adam: L2 added to the gradient; AdamW: the weights decay by lr·wd.
    let (l2, decay) = if decoupled { (0.0f32, 1.0 - lr * weight_decay) } else { (weight_decay, 1.0f32) };
    AdamTerms { l2, decay, step_size: lr / bc1, bc2_sqrt }
}
