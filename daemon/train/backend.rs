//! The `Backend` trait: the whole op set fine-tuning needs, on buffers the backend owns.
//!
//! The trainer (`net.rs`) only ever talks to this trait, so the CPU backend (`cpu.rs`) and the
//! CUDA backend (its own issue) run the same training code. Buffers are opaque (`Self::Buf`):
//! host memory on the CPU, device memory on a GPU. Matrices are row-major f32; every op takes
//! its sizes explicitly, so a buffer allocated for the largest batch serves a smaller last batch.
//! Only `loss` and `sum_squares` bring a number back to the host (once per step).

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub struct BackendError(pub String);

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BackendError {}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Element-wise (or row-wise, for softmax) activations a dense tail uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Relu,
    LeakyRelu(f32),
    Sigmoid,
    Tanh,
    /// Along each row (the last axis).
    Softmax,
}

/// `c = alpha · op(a) · op(b) + beta · c` with `op(a)` m×k and `op(b)` k×n; `trans_a` means `a`
/// is stored k×m (and is used transposed), likewise `trans_b` (n×k).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Mean over every element of (output − target)²; also the reconstruction loss.
    Mse,
    /// Binary cross-entropy on logits (one output column, targets 0/1), weighted mean.
    BceWithLogits,
    /// Softmax cross-entropy on logits, target = class index, weighted mean (PyTorch's
    /// `CrossEntropyLoss(weight=…)`: Σ wᵧ·lossᵢ / Σ wᵧ).
    SoftmaxCrossEntropy,
}

/// One optimizer update, PyTorch's definitions (`torch.optim.SGD/Adam/AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Update {
    /// `g += wd·p; buf = momentum·buf + g; p -= lr·buf`.
    Sgd { lr: f32, momentum: f32, weight_decay: f32 },
    /// Adam with L2 (`g += wd·p`) when `decoupled` is false; AdamW (`p *= 1 − lr·wd`) when true.
    /// `step` counts from 1 (bias correction).
    Adam { lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32, decoupled: bool, step: u32 },
}

impl Update {
    /// Adam (or AdamW when `decoupled`) with PyTorch's defaults: betas (0.9, 0.999), eps 1e-8.
    pub fn adam(lr: f32, weight_decay: f32, decoupled: bool) -> Update {
        Update::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, decoupled, step: 0 }
    }
}

pub trait Backend {
    type Buf;

    /// Named in run records ("cpu", "cuda:Orin").
    fn name(&self) -> String;
    /// A zeroed buffer of `len` values.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// Overwrites the first `host.len()` values of `dst`.
    fn write(&self, dst: &mut Self::Buf, host: &[f32]) -> Result<()>;
    /// Reads the first `host.len()` values of `src`.
    fn read(&self, src: &Self::Buf, host: &mut [f32]) -> Result<()>;
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf, len: usize) -> Result<()>;

    fn gemm(&self, g: Gemm, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf) -> Result<()>;
    /// `y[r, c] += bias[c]`.
    fn add_bias(&self, y: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize) -> Result<()>;
    /// `db[c] = Σ_r dy[r, c]`.
    fn bias_grad(&self, dy: &Self::Buf, rows: usize, cols: usize, db: &mut Self::Buf) -> Result<()>;
    /// `y = f(x)`.
    fn activation(&self, f: Activation, x: &Self::Buf, y: &mut Self::Buf, rows: usize, cols: usize) -> Result<()>;
    /// A dense layer's forward: `z = x · w + bias` (`x` rows×k, `w` k×cols, the bias
    /// optional), then `y = f(z)` for the layer's first activation `(f, y)` if it has one, `z`
    /// keeping the pre-activation for the backward. One kernel on a GPU (a small MLP's step is
    /// launch-bound there); a GEMM and the ops above by default.
    fn dense_forward(
        &self,
        (x, w): (&Self::Buf, &Self::Buf),
        bias: Option<&Self::Buf>,
        z: &mut Self::Buf,
        act: Option<(Activation, &mut Self::Buf)>,
        (rows, k, cols): (usize, usize, usize),
    ) -> Result<()> {
        dense_forward_unfused(self, (x, w), bias, z, act, (rows, k, cols))
    }
    /// LoRA's merged weight: `out = w + scale · a · b` (`w`, `out` rows×cols, `a` rows×rank,
    /// `b` rank×cols). One kernel on a GPU; a copy and a GEMM by default.
    fn lora_merge(
        &self,
        w: &Self::Buf,
        (a, b): (&Self::Buf, &Self::Buf),
        out: &mut Self::Buf,
        (rows, rank, cols): (usize, usize, usize),
        scale: f32,
    ) -> Result<()> {
        self.copy(w, out, rows * cols)?;
        let g = Gemm { m: rows, n: cols, k: rank, trans_a: false, trans_b: false, alpha: scale, beta: 1.0 };
        self.gemm(g, a, b, out)
    }
    /// A dense layer's backward, from `dy`, the gradient at the output of its first activation
    /// `f` (at `z` itself when `f` is `None`): `dz = dy · f'(z)` (`z` the pre-activation, `y`
    /// the activation's output), then `dw = xᵀ · dz`, `db = Σ_r dz[r, :]` and `dx = dz · wᵀ`,
    /// each only where `grads` asks for it (`x` rows×k, `w` k×cols). One kernel on a GPU; by
    /// default `activation_grad` into the scratch `dz`, two GEMMs and `bias_grad`.
    #[allow(clippy::too_many_arguments)]
    fn dense_backward(
        &self,
        f: Option<Activation>,
        (x, w): (&Self::Buf, &Self::Buf),
        (z, y, dy): (&Self::Buf, &Self::Buf, &Self::Buf),
        dz: &mut Self::Buf,
        grads: DenseGrads<'_, Self::Buf>,
        (rows, k, cols): (usize, usize, usize),
    ) -> Result<()> {
        dense_backward_unfused(self, f, (x, w), (z, y, dy), dz, grads, (rows, k, cols))
    }
    /// `dx = dy · f'(x)`, given the forward pass's input `x` and output `y`.
    #[allow(clippy::too_many_arguments)]
    fn activation_grad(
        &self,
        f: Activation,
        x: &Self::Buf,
        y: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// The loss of `out` (rows×cols) against `target` (rows×cols, or rows class indices for
    /// softmax cross-entropy) and its gradient with respect to `out`. `class_weights` (one per
    /// class; for BCE `[w0, w1]`) weight the mean.
    #[allow(clippy::too_many_arguments)]
    fn loss(
        &self,
        loss: Loss,
        out: &Self::Buf,
        target: &Self::Buf,
        class_weights: Option<&Self::Buf>,
        rows: usize,
        cols: usize,
        grad: &mut Self::Buf,
    ) -> Result<f32>;
    /// Σ x² over the first `len` values (for gradient clipping by global norm).
    fn sum_squares(&self, x: &Self::Buf, len: usize) -> Result<f32>;
    fn scale(&self, x: &mut Self::Buf, len: usize, factor: f32) -> Result<()>;
    /// Applies one update to `param` from `grad`, with its state buffers (`m`: momentum or
    /// first moment, `v`: second moment; unused by SGD).
    fn update(
        &self,
        u: Update,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        len: usize,
    ) -> Result<()>;

    // The optimizer step over every parameter tensor of a net. One launch each on a GPU (a
    // small MLP's step is launch-bound); by default the per-tensor ops above, in order.

    /// `torch.nn.utils.clip_grad_norm_`: scales every tensor's gradient by
    /// `max_norm / (‖g‖ + 1e-6)` when that is below 1, ‖g‖ taken over all tensors together.
    /// On a GPU the norm never leaves the device (no blocking read).
    fn clip_grad_norm(&self, params: &mut [ParamSlot<'_, Self::Buf>], max_norm: f32) -> Result<()> {
        let total = params.iter().map(|p| self.sum_squares(p.grad, p.len)).sum::<Result<f32>>()?.sqrt();
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            params.iter_mut().try_for_each(|p| self.scale(p.grad, p.len, coef))?;
        }
        Ok(())
    }
    /// `update` on every tensor.
    fn update_all(&self, u: Update, params: &mut [ParamSlot<'_, Self::Buf>]) -> Result<()> {
        params.iter_mut().try_for_each(|p| self.update(u, p.value, p.grad, p.m, p.v, p.len))
    }
}

/// One parameter tensor's buffers, for the step over all of a net's parameters.
pub struct ParamSlot<'a, Buf> {
    pub value: &'a mut Buf,
    pub grad: &'a mut Buf,
    /// Momentum or first moment.
    pub m: &'a mut Buf,
    /// Second moment (Adam).
    pub v: &'a mut Buf,
    pub len: usize,
}

/// Where `Backend::dense_backward` writes: the weight's gradient, the bias's and the layer
/// input's (the layer below's upstream gradient); `None` for what is not needed (a frozen
/// weight, no bias, the first layer).
pub struct DenseGrads<'a, Buf> {
    pub dw: Option<&'a mut Buf>,
    pub db: Option<&'a mut Buf>,
    pub dx: Option<&'a mut Buf>,
}

/// `Backend::dense_backward` as separate ops: the activation's gradient, the two GEMMs and the
/// bias gradient.
#[allow(clippy::too_many_arguments)]
pub fn dense_backward_unfused<B: Backend + ?Sized>(
    b: &B,
    f: Option<Activation>,
    (x, w): (&B::Buf, &B::Buf),
    (z, y, dy): (&B::Buf, &B::Buf, &B::Buf),
    scratch: &mut B::Buf,
    grads: DenseGrads<'_, B::Buf>,
    (rows, k, cols): (usize, usize, usize),
) -> Result<()> {
    let dz = match f {
        Some(f) => {
            b.activation_grad(f, z, y, dy, scratch, rows, cols)?;
            &*scratch
        }
        None => dy,
    };
    if let Some(dw) = grads.dw {
        b.gemm(Gemm { m: k, n: cols, k: rows, trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 }, x, dz, dw)?;
    }
    if let Some(db) = grads.db {
        b.bias_grad(dz, rows, cols, db)?;
    }
    if let Some(dx) = grads.dx {
        b.gemm(Gemm { m: rows, n: k, k: cols, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 }, dz, w, dx)?;
    }
    Ok(())
}

/// `Backend::dense_forward` as three ops: the GEMM, the bias, the activation.
pub fn dense_forward_unfused<B: Backend + ?Sized>(
    b: &B,
    (x, w): (&B::Buf, &B::Buf),
    bias: Option<&B::Buf>,
    z: &mut B::Buf,
    act: Option<(Activation, &mut B::Buf)>,
    (rows, k, cols): (usize, usize, usize),
) -> Result<()> {
    let g = Gemm { m: rows, n: cols, k, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
    b.gemm(g, x, w, z)?;
    if let Some(bias) = bias {
        b.add_bias(z, bias, rows, cols)?;
    }
    match act {
        Some((f, y)) => b.activation(f, z, y, rows, cols),
        None => Ok(()),
    }
}
