//! The trainable network on a [`Backend`]: forward, backward and one optimizer step, with every
//! buffer allocated once for the largest batch (no allocation per step).
//!
//! Each layer is `y = act(x · W + b)` with `W` `[in, out]`. In LoRA mode `W` stays frozen and
//! two small matrices train instead: `W_eff = W + scale · A · B` (`A` `[in, r]`, `B` `[r, out]`,
//! `B` starting at zero so step 0 is the champion); the delta is merged into `W` on export, so
//! the graph never changes shape.

use super::backend::{Activation, Backend, BackendError, DenseGrads, Gemm, Loss, ParamSlot, Result, Update};
use super::graph::DenseLayer;
use crate::rng::Rng;

/// One tensor that may train, with its gradient and optimizer state.
pub struct Param<B: Backend> {
    pub value: B::Buf,
    pub len: usize,
    pub trainable: bool,
    grad: B::Buf,
    m: B::Buf,
    v: B::Buf,
}

impl<B: Backend> Param<B> {
    fn slot(&mut self) -> ParamSlot<'_, B::Buf> {
        ParamSlot { value: &mut self.value, grad: &mut self.grad, m: &mut self.m, v: &mut self.v, len: self.len }
    }

    fn new(b: &B, host: &[f32], trainable: bool) -> Result<Param<B>> {
        let n = if trainable { host.len() } else { 0 };
        Ok(Param {
            value: b.upload(host)?,
            len: host.len(),
            trainable,
            grad: b.zeros(n)?,
            m: b.zeros(n)?,
            v: b.zeros(n)?,
        })
    }
}

struct Lora<B: Backend> {
    a: Param<B>,
    b: Param<B>,
    rank: usize,
    scale: f32,
    /// `W + scale·A·B`, recomputed each forward.
    merged: B::Buf,
    /// dL/dW_eff, from which A's and B's gradients follow.
    merged_grad: B::Buf,
}

struct Layer<B: Backend> {
    in_dim: usize,
    out_dim: usize,
    w: Param<B>,
    b: Option<Param<B>>,
    lora: Option<Lora<B>>,
    activations: Vec<Activation>,
    /// `outs[0]` = x·W + b, `outs[i]` = after activation i; the layer's output is the last.
    outs: Vec<B::Buf>,
    /// Gradient scratch, rows×out each.
    d1: B::Buf,
    d2: B::Buf,
    /// dL/dx for the layer below, rows×in.
    dx: B::Buf,
}

/// How the layers train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Every weight and bias.
    Full,
    /// Low-rank adapters of this rank on every weight, scaled by `alpha / rank`; biases frozen.
    Lora { rank: usize, alpha: f32, seed: u64 },
    /// Nothing (forward only: the frozen part of a last-N tail).
    Frozen,
}

pub struct Net<B: Backend> {
    layers: Vec<Layer<B>>,
    capacity: usize,
    input: B::Buf,
    target: B::Buf,
    class_weights: Option<B::Buf>,
    loss_grad: B::Buf,
    step: u32,
}

impl<B: Backend> Net<B> {
    /// Uploads `layers` and allocates every buffer for batches of up to `capacity` rows.
    ///
    /// # Errors
    /// The backend failing to allocate.
    pub fn new(backend: &B, layers: &[DenseLayer], mode: Mode, capacity: usize, target_width: usize) -> Result<Net<B>> {
        let mut rng = match mode {
            Mode::Lora { seed, .. } => Rng::new(seed),
            _ => Rng::new(0),
        };
        let mut built = Vec::with_capacity(layers.len());
        for l in layers {
            let full = mode == Mode::Full;
            let lora = match mode {
                Mode::Lora { rank, alpha, .. } => {
                    // PEFT's initialisation: A ~ U(±1/√in) (Kaiming-uniform, a = √5), B = 0.
                    let bound = 1.0 / (l.in_dim as f64).sqrt();
                    let a: Vec<f32> =
                        (0..l.in_dim * rank).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
                    Some(Lora {
                        a: Param::new(backend, &a, true)?,
                        b: Param::new(backend, &vec![0.0; rank * l.out_dim], true)?,
                        rank,
                        scale: alpha / rank as f32,
                        merged: backend.zeros(l.in_dim * l.out_dim)?,
                        merged_grad: backend.zeros(l.in_dim * l.out_dim)?,
                    })
                }
                _ => None,
            };
            let mut outs = Vec::with_capacity(l.activations.len() + 1);
            for _ in 0..=l.activations.len() {
                outs.push(backend.zeros(capacity * l.out_dim)?);
            }
            built.push(Layer {
                in_dim: l.in_dim,
                out_dim: l.out_dim,
                w: Param::new(backend, &l.weight, full)?,
                b: l.bias.as_ref().map(|b| Param::new(backend, b, full)).transpose()?,
                lora,
                activations: l.activations.clone(),
                outs,
                d1: backend.zeros(capacity * l.out_dim)?,
                d2: backend.zeros(capacity * l.out_dim)?,
                dx: backend.zeros(capacity * l.in_dim)?,
            });
        }
        let (in_dim, out_dim) = (layers.first().map_or(0, |l| l.in_dim), layers.last().map_or(0, |l| l.out_dim));
        Ok(Net {
            layers: built,
            capacity,
            input: backend.zeros(capacity * in_dim)?,
            target: backend.zeros(capacity * target_width.max(1))?,
            class_weights: None,
            loss_grad: backend.zeros(capacity * out_dim)?,
            step: 0,
        })
    }

    pub fn set_class_weights(&mut self, backend: &B, weights: &[f32]) -> Result<()> {
        self.class_weights = Some(backend.upload(weights)?);
        Ok(())
    }

    pub fn in_dim(&self) -> usize {
        self.layers.first().map_or(0, |l| l.in_dim)
    }

    pub fn out_dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out_dim)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Values that train (for the run record).
    pub fn trainable_values(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let own = [Some(&l.w), l.b.as_ref()].into_iter().flatten().filter(|p| p.trainable).map(|p| p.len);
                own.sum::<usize>() + l.lora.as_ref().map_or(0, |r| r.a.len + r.b.len)
            })
            .sum()
    }

    fn check_rows(&self, rows: usize) -> Result<()> {
        if rows == 0 || rows > self.capacity {
            return Err(BackendError(format!("batch of {rows} rows; this net holds 1..={}", self.capacity)));
        }
        Ok(())
    }

    /// Forward pass of `rows` rows already in `self.input`.
    fn forward(&mut self, b: &B, rows: usize) -> Result<()> {
        for i in 0..self.layers.len() {
            let (below, rest) = self.layers.split_at_mut(i);
            let layer = &mut rest[0];
            let x = match below.last() {
                Some(prev) => prev.outs.last().ok_or_else(|| BackendError("layer without output".into()))?,
                None => &self.input,
            };
            let (k, n) = (layer.in_dim, layer.out_dim);
            let weight = match &mut layer.lora {
                Some(lora) => {
                    let adapter = (&lora.a.value, &lora.b.value);
                    b.lora_merge(&layer.w.value, adapter, &mut lora.merged, (k, lora.rank, n), lora.scale)?;
                    &lora.merged
                }
                None => &layer.w.value,
            };
            let (z, acts) = layer.outs.split_at_mut(1);
            let z = &mut z[0];
            let bias = layer.b.as_ref().map(|p| &p.value);
            // The GEMM, the bias and the first activation in one op (one kernel on a GPU).
            let mut pairs = layer.activations.iter().zip(acts.iter_mut());
            let first = pairs.next().map(|(act, out)| (*act, out));
            let shape = (rows, k, n);
            let mut prev: &B::Buf = match first {
                Some((act, out)) => {
                    b.dense_forward((x, weight), bias, z, Some((act, &mut *out)), shape)?;
                    out
                }
                None => {
                    b.dense_forward((x, weight), bias, z, None, shape)?;
                    z
                }
            };
            for (act, out) in pairs {
                b.activation(*act, prev, out, rows, n)?;
                prev = out;
            }
        }
        Ok(())
    }

    fn output(&self) -> Result<&B::Buf> {
        self.layers.last().and_then(|l| l.outs.last()).ok_or_else(|| BackendError("the net has no layers".into()))
    }

    /// Runs `x` (rows × in_dim, any number of rows) through the net and returns the outputs.
    ///
    /// # Errors
    /// A backend failure.
    pub fn predict(&mut self, b: &B, x: &[f32]) -> Result<Vec<f32>> {
        let (d_in, d_out) = (self.in_dim(), self.out_dim());
        let rows = x.len() / d_in.max(1);
        let mut out = vec![0.0; rows * d_out];
        for (start, chunk) in (0..rows).step_by(self.capacity).zip(x.chunks(self.capacity * d_in)) {
            let r = chunk.len() / d_in;
            b.write(&mut self.input, chunk)?;
            self.forward(b, r)?;
            b.read(self.output()?, &mut out[start * d_out..(start + r) * d_out])?;
        }
        Ok(out)
    }

    /// The mean loss over `x`/`target` without training (early stopping).
    ///
    /// # Errors
    /// A backend failure or bad targets.
    pub fn evaluate(&mut self, b: &B, loss: Loss, x: &[f32], target: &[f32], target_width: usize) -> Result<f64> {
        let d_in = self.in_dim();
        let rows = x.len() / d_in.max(1);
        let (mut sum, mut count) = (0.0f64, 0usize);
        for start in (0..rows).step_by(self.capacity) {
            let r = (rows - start).min(self.capacity);
            b.write(&mut self.input, &x[start * d_in..(start + r) * d_in])?;
            b.write(&mut self.target, &target[start * target_width..(start + r) * target_width])?;
            self.forward(b, r)?;
            let l = self.loss_only(b, loss, r)?;
            sum += f64::from(l) * r as f64;
            count += r;
        }
        Ok(if count == 0 { f64::NAN } else { sum / count as f64 })
    }

    fn loss_only(&mut self, b: &B, loss: Loss, rows: usize) -> Result<f32> {
        let n = self.out_dim();
        let out = self.layers.last().and_then(|l| l.outs.last()).ok_or_else(|| BackendError("no layers".into()))?;
        b.loss(loss, out, &self.target, self.class_weights.as_ref(), rows, n, &mut self.loss_grad)
    }

    /// One training step on a batch: forward, loss, backward, optional clipping to a global
    /// gradient norm, optimizer update. Returns the batch loss (before the update).
    ///
    /// # Errors
    /// A backend failure or bad targets.
    pub fn train_step(
        &mut self,
        b: &B,
        x: &[f32],
        target: &[f32],
        loss: Loss,
        update: Update,
        clip_norm: Option<f32>,
    ) -> Result<f32> {
        let rows = x.len() / self.in_dim().max(1);
        self.check_rows(rows)?;
        b.write(&mut self.input, x)?;
        b.write(&mut self.target, target)?;
        self.forward(b, rows)?;
        let value = self.loss_only(b, loss, rows)?;
        self.backward(b, rows)?;
        self.step += 1;
        let step = self.step;
        let mut params: Vec<ParamSlot<'_, B::Buf>> = self.params_mut().map(Param::slot).collect();
        if let Some(max) = clip_norm {
            b.clip_grad_norm(&mut params, max)?;
        }
        let u = match update {
            Update::Adam { lr, beta1, beta2, eps, weight_decay, decoupled, .. } => {
                Update::Adam { lr, beta1, beta2, eps, weight_decay, decoupled, step }
            }
            sgd => sgd,
        };
        b.update_all(u, &mut params)?;
        Ok(value)
    }

    fn params(&self) -> impl Iterator<Item = &Param<B>> {
        self.layers.iter().flat_map(|l| {
            let lora = l.lora.as_ref().map(|r| [&r.a, &r.b]).into_iter().flatten();
            [Some(&l.w), l.b.as_ref()].into_iter().flatten().chain(lora).filter(|p| p.trainable)
        })
    }

    fn params_mut(&mut self) -> impl Iterator<Item = &mut Param<B>> {
        self.layers.iter_mut().flat_map(|l| {
            let lora = l.lora.as_mut().map(|r| [&mut r.a, &mut r.b]).into_iter().flatten();
            [Some(&mut l.w), l.b.as_mut()].into_iter().flatten().chain(lora).filter(|p| p.trainable)
        })
    }

    fn backward(&mut self, b: &B, rows: usize) -> Result<()> {
        let last = self.layers.len();
        for i in (0..last).rev() {
            let (below, rest) = self.layers.split_at_mut(i);
            let (layer, above) = rest.split_at_mut(1);
            let Layer { in_dim: k, out_dim: n, w, b: bias, lora, activations, outs, d1, d2, dx, .. } = &mut layer[0];
            let (k, n) = (*k, *n);
            // dL/d(layer output): the loss gradient, or the layer above's dx.
            let upstream = match above.first() {
                Some(up) => &up.dx,
                None => &self.loss_grad,
            };
            // Back through the activations after the first: the first reads the upstream
            // gradient where it lies, the rest ping-pong between d1 and d2 (no copies). The
            // first activation goes with the layer's own backward below.
            let mut at: Option<bool> = None; // None: upstream, Some(true): d1, Some(false): d2
            for j in (1..activations.len()).rev() {
                let (act, x, y) = (activations[j], &outs[j], &outs[j + 1]);
                at = Some(match at {
                    None => {
                        b.activation_grad(act, x, y, upstream, d1, rows, n)?;
                        true
                    }
                    Some(true) => {
                        b.activation_grad(act, x, y, d1, d2, rows, n)?;
                        false
                    }
                    Some(false) => {
                        b.activation_grad(act, x, y, d2, d1, rows, n)?;
                        true
                    }
                });
            }
            // The gradient at the first activation's output, and a free buffer for dz.
            let (dy, scratch) = match at {
                None => (upstream, d1),
                Some(true) => (&*d1, d2),
                Some(false) => (&*d2, d1),
            };
            let x = match below.last() {
                Some(prev) => prev.outs.last().ok_or_else(|| BackendError("layer without output".into()))?,
                None => &self.input,
            };
            let (weight, dw) = match lora {
                Some(l) => (&l.merged, Some(&mut l.merged_grad)),
                None => (&w.value, Some(&mut w.grad).filter(|_| w.trainable)),
            };
            let grads = DenseGrads {
                dw,
                db: bias.as_mut().filter(|p| p.trainable).map(|p| &mut p.grad),
                // The first layer's input is data: no gradient.
                dx: (i > 0).then_some(dx),
            };
            let (z, y) = (&outs[0], outs.get(1).unwrap_or(&outs[0]));
            b.dense_backward(activations.first().copied(), (x, weight), (z, y, dy), scratch, grads, (rows, k, n))?;
            if let Some(lora) = lora {
                // dA = s · dW · Bᵀ, dB = s · Aᵀ · dW
                let (r, s) = (lora.rank, lora.scale);
                let ga = Gemm { m: k, n: r, k: n, trans_a: false, trans_b: true, alpha: s, beta: 0.0 };
                b.gemm(ga, &lora.merged_grad, &lora.b.value, &mut lora.a.grad)?;
                let gb = Gemm { m: r, n, k, trans_a: true, trans_b: false, alpha: s, beta: 0.0 };
                b.gemm(gb, &lora.a.value, &lora.merged_grad, &mut lora.b.grad)?;
            }
        }
        Ok(())
    }

    /// The current weights as dense layers (LoRA merged), in the shape `graph::export` takes.
    ///
    /// # Errors
    /// A backend failure.
    pub fn weights(&self, b: &B, template: &[DenseLayer]) -> Result<Vec<DenseLayer>> {
        let mut out = template.to_vec();
        for (dst, l) in out.iter_mut().zip(&self.layers) {
            let source = match &l.lora {
                Some(lora) => {
                    // The merged weight as of the current A and B (forward recomputes it too).
                    let mut merged = b.zeros(l.in_dim * l.out_dim)?;
                    let shape = (l.in_dim, lora.rank, l.out_dim);
                    b.lora_merge(&l.w.value, (&lora.a.value, &lora.b.value), &mut merged, shape, lora.scale)?;
                    merged
                }
                None => b.upload(&[])?,
            };
            let w = if l.lora.is_some() { &source } else { &l.w.value };
            b.read(w, &mut dst.weight)?;
            if let (Some(bias), Some(p)) = (dst.bias.as_mut(), &l.b) {
                b.read(&p.value, bias)?;
            }
        }
        Ok(out)
    }

    /// Every trainable value, to keep the best epoch's weights on the host.
    ///
    /// # Errors
    /// A backend failure.
    pub fn snapshot(&self, b: &B) -> Result<Vec<Vec<f32>>> {
        self.params()
            .map(|p| {
                let mut host = vec![0.0; p.len];
                b.read(&p.value, &mut host)?;
                Ok(host)
            })
            .collect()
    }

    /// Puts back what [`Net::snapshot`] took.
    ///
    /// # Errors
    /// A backend failure, or a snapshot of another net.
    pub fn restore(&mut self, b: &B, snapshot: &[Vec<f32>]) -> Result<()> {
        let params: Vec<&mut Param<B>> = self.params_mut().collect();
        if params.len() != snapshot.len() {
            return Err(BackendError("snapshot of a different net".into()));
        }
        for (p, host) in params.into_iter().zip(snapshot) {
            b.write(&mut p.value, host)?;
        }
        Ok(())
    }
}
