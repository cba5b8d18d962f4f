//! The CPU backend: `matrixmultiply`'s blocked SGEMM (AVX2/FMA kernels picked at run time,
//! strides make transposes free) and plain loops for the element-wise ops, which the
//! compiler vectorizes. Single-threaded on purpose: training shares the device with inference.

use super::backend::{Activation, Backend, BackendError, Gemm, Loss, Result, Update};

pub struct Cpu;

/// Defines a kernel that runs compiled for AVX2+FMA when the CPU has them (checked at run
/// time, cached by std) and for the baseline target otherwise. The bodies are plain loops; this
/// is what lets the compiler vectorize them 8 wide instead of SSE2's 4 on x86 (on aarch64
/// NEON is the baseline already).
macro_rules! kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

kernel! {
    /// Adam/AdamW in PyTorch's order of operations, so parity holds to float rounding. Exactly
    /// one of `l2` (Adam's weight decay, added to the gradient) and `decay` (AdamW's
    /// `1 − lr·wd` applied to the weight) is active.
    fn adam(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], b1: f32, b2: f32, eps: f32, l2: f32, decay: f32, step_size: f32, bc2_sqrt: f32) {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g + l2 * *p;
            *p *= decay;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
        }
    }
}

kernel! {
    fn sgd(p: &mut [f32], g: &[f32], m: &mut [f32], lr: f32, momentum: f32, wd: f32) {
        for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
            let g = g + wd * *p;
            *m = momentum * *m + g;
            *p -= lr * if momentum != 0.0 { *m } else { g };
        }
    }
}

kernel! {
    fn forward_act(f: Activation, x: &[f32], y: &mut [f32]) {
        match f {
            Activation::Relu => y.iter_mut().zip(x).for_each(|(y, x)| *y = x.max(0.0)),
            Activation::LeakyRelu(a) => y.iter_mut().zip(x).for_each(|(y, &x)| *y = if x >= 0.0 { x } else { a * x }),
            Activation::Sigmoid => y.iter_mut().zip(x).for_each(|(y, &x)| *y = sigmoid(x)),
            Activation::Tanh => y.iter_mut().zip(x).for_each(|(y, x)| *y = x.tanh()),
            Activation::Softmax => {}
        }
    }
}

kernel! {
    fn backward_act(f: Activation, x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32]) {
        let it = dx.iter_mut().zip(x).zip(y).zip(dy);
        match f {
            Activation::Relu => it.for_each(|(((dx, &x), _), &dy)| *dx = if x > 0.0 { dy } else { 0.0 }),
            Activation::LeakyRelu(a) => it.for_each(|(((dx, &x), _), &dy)| *dx = if x > 0.0 { dy } else { a * dy }),
            Activation::Sigmoid => it.for_each(|(((dx, _), &y), &dy)| *dx = dy * y * (1.0 - y)),
            Activation::Tanh => it.for_each(|(((dx, _), &y), &dy)| *dx = dy * (1.0 - y * y)),
            Activation::Softmax => {}
        }
    }
}

kernel! {
    fn add_rows(y: &mut [f32], bias: &[f32]) {
        for row in y.chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
    }
}

kernel! {
    fn sum_rows(dy: &[f32], db: &mut [f32]) {
        db.fill(0.0);
        for row in dy.chunks_exact(db.len()) {
            db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
    }
}

fn check(what: &str, buf: &[f32], need: usize) -> Result<()> {
    if buf.len() < need {
        return Err(BackendError(format!("{what}: buffer of {} values, the op needs {need}", buf.len())));
    }
    Ok(())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Backend for Cpu {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn write(&self, dst: &mut Vec<f32>, host: &[f32]) -> Result<()> {
        check("write", dst, host.len())?;
        dst[..host.len()].copy_from_slice(host);
        Ok(())
    }

    fn read(&self, src: &Vec<f32>, host: &mut [f32]) -> Result<()> {
        check("read", src, host.len())?;
        host.copy_from_slice(&src[..host.len()]);
        Ok(())
    }

    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>, len: usize) -> Result<()> {
        check("copy", src, len)?;
        check("copy", dst, len)?;
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }

    fn gemm(&self, g: Gemm, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>) -> Result<()> {
        check("gemm a", a, g.m * g.k)?;
        check("gemm b", b, g.k * g.n)?;
        check("gemm c", c, g.m * g.n)?;
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        // Row-major strides; a transposed operand is the same memory read with swapped strides.
        let (rsa, csa) = if g.trans_a { (1, g.m as isize) } else { (g.k as isize, 1) };
        let (rsb, csb) = if g.trans_b { (1, g.k as isize) } else { (g.n as isize, 1) };
        // SAFETY: the checks above guarantee a holds m·k, b k·n and c m·n values, which is
        // exactly the extent these strides address; c is a distinct &mut borrow.
        unsafe {
            matrixmultiply::sgemm(
                g.m,
                g.k,
                g.n,
                g.alpha,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                g.beta,
                c.as_mut_ptr(),
                g.n as isize,
                1,
            );
        }
        Ok(())
    }

    fn add_bias(&self, y: &mut Vec<f32>, bias: &Vec<f32>, rows: usize, cols: usize) -> Result<()> {
        check("add_bias y", y, rows * cols)?;
        check("add_bias bias", bias, cols)?;
        add_rows(&mut y[..rows * cols], &bias[..cols]);
        Ok(())
    }

    fn bias_grad(&self, dy: &Vec<f32>, rows: usize, cols: usize, db: &mut Vec<f32>) -> Result<()> {
        check("bias_grad dy", dy, rows * cols)?;
        check("bias_grad db", db, cols)?;
        if cols > 0 {
            sum_rows(&dy[..rows * cols], &mut db[..cols]);
        }
        Ok(())
    }

    fn activation(&self, f: Activation, x: &Vec<f32>, y: &mut Vec<f32>, rows: usize, cols: usize) -> Result<()> {
        let n = rows * cols;
        check("activation x", x, n)?;
        check("activation y", y, n)?;
        let (x, y) = (&x[..n], &mut y[..n]);
        match f {
            Activation::Relu | Activation::LeakyRelu(_) | Activation::Sigmoid | Activation::Tanh => {
                forward_act(f, x, y)
            }
            Activation::Softmax => {
                for (yr, xr) in y.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
                    let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for (y, x) in yr.iter_mut().zip(xr) {
                        *y = (x - max).exp();
                        sum += *y;
                    }
                    yr.iter_mut().for_each(|y| *y /= sum);
                }
            }
        }
        Ok(())
    }

    fn activation_grad(
        &self,
        f: Activation,
        x: &Vec<f32>,
        y: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = rows * cols;
        for (what, b) in [("x", x), ("y", y), ("dy", dy)] {
            check(what, b, n)?;
        }
        check("dx", dx, n)?;
        let (x, y, dy, dx) = (&x[..n], &y[..n], &dy[..n], &mut dx[..n]);
        match f {
            Activation::Relu | Activation::LeakyRelu(_) | Activation::Sigmoid | Activation::Tanh => {
                backward_act(f, x, y, dy, dx);
            }
            Activation::Softmax => {
                for ((dxr, yr), dyr) in dx.chunks_exact_mut(cols).zip(y.chunks_exact(cols)).zip(dy.chunks_exact(cols)) {
                    let dot: f32 = yr.iter().zip(dyr).map(|(y, d)| y * d).sum();
                    for c in 0..cols {
                        dxr[c] = yr[c] * (dyr[c] - dot);
                    }
                }
            }
        }
        Ok(())
    }

    fn loss(
        &self,
        loss: Loss,
        out: &Vec<f32>,
        target: &Vec<f32>,
        class_weights: Option<&Vec<f32>>,
        rows: usize,
        cols: usize,
        grad: &mut Vec<f32>,
    ) -> Result<f32> {
        let n = rows * cols;
        check("loss out", out, n)?;
        check("loss grad", grad, n)?;
        let weight = |class: usize| -> Result<f32> {
            match class_weights {
                None => Ok(1.0),
                Some(w) => {
                    w.get(class).copied().ok_or_else(|| BackendError(format!("class {class} has no class weight")))
                }
            }
        };
        let class_of = |t: f32, classes: usize| -> Result<usize> {
            if t >= 0.0 && t.fract() == 0.0 && (t as usize) < classes {
                Ok(t as usize)
            } else {
                Err(BackendError(format!("target {t} is not a class index below {classes}")))
            }
        };
        match loss {
            Loss::Mse => {
                check("loss target", target, n)?;
                let scale = 2.0 / n as f32;
                let mut sum = 0.0f64;
                for i in 0..n {
                    let d = out[i] - target[i];
                    sum += f64::from(d * d);
                    grad[i] = scale * d;
                }
                Ok((sum / n as f64) as f32)
            }
            Loss::BceWithLogits => {
                check("loss target", target, n)?;
                let mut total_w = 0.0f64;
                let mut sum = 0.0f64;
                for i in 0..n {
                    let w = weight(class_of(target[i], 2)?)?;
                    total_w += f64::from(w);
                    let (x, t) = (out[i], target[i]);
                    // max(x, 0) − x·t + log(1 + e^−|x|): stable for any x.
                    sum += f64::from(w * (x.max(0.0) - x * t + (-x.abs()).exp().ln_1p()));
                    grad[i] = w * (sigmoid(x) - t);
                }
                let inv = if total_w > 0.0 { (1.0 / total_w) as f32 } else { 0.0 };
                grad[..n].iter_mut().for_each(|g| *g *= inv);
                Ok((sum * f64::from(inv)) as f32)
            }
            Loss::SoftmaxCrossEntropy => {
                check("loss target", target, rows)?;
                let mut total_w = 0.0f64;
                let mut sum = 0.0f64;
                for r in 0..rows {
                    let class = class_of(target[r], cols)?;
                    let w = weight(class)?;
                    total_w += f64::from(w);
                    let (xr, gr) = (&out[r * cols..(r + 1) * cols], &mut grad[r * cols..(r + 1) * cols]);
                    let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut z = 0.0f32;
                    for (g, x) in gr.iter_mut().zip(xr) {
                        *g = (x - max).exp();
                        z += *g;
                    }
                    sum += f64::from(w * (z.ln() + max - xr[class]));
                    for (c, g) in gr.iter_mut().enumerate() {
                        *g = w * (*g / z - if c == class { 1.0 } else { 0.0 });
                    }
                }
                let inv = if total_w > 0.0 { (1.0 / total_w) as f32 } else { 0.0 };
                grad[..n].iter_mut().for_each(|g| *g *= inv);
                Ok((sum * f64::from(inv)) as f32)
            }
        }
    }

    fn sum_squares(&self, x: &Vec<f32>, len: usize) -> Result<f32> {
        check("sum_squares", x, len)?;
        Ok(x[..len].iter().map(|v| v * v).sum())
    }

    fn scale(&self, x: &mut Vec<f32>, len: usize, factor: f32) -> Result<()> {
        check("scale", x, len)?;
        x[..len].iter_mut().for_each(|v| *v *= factor);
        Ok(())
    }

    fn update(
        &self,
        u: Update,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        len: usize,
    ) -> Result<()> {
        check("update param", param, len)?;
        check("update grad", grad, len)?;
        check("update m", m, len)?;
        let (p, g, m) = (&mut param[..len], &grad[..len], &mut m[..len]);
        match u {
            Update::Sgd { lr, momentum, weight_decay } => sgd(p, g, m, lr, momentum, weight_decay),
            Update::Adam { lr, beta1, beta2, eps, weight_decay, decoupled, step } => {
                check("update v", v, len)?;
                let bc1 = 1.0 - beta1.powi(step as i32);
                let bc2_sqrt = (1.0 - beta2.powi(step as i32)).sqrt();
                let (l2, decay) = if decoupled { (0.0, 1.0 - lr * weight_decay) } else { (weight_decay, 1.0) };
                adam(p, g, m, &mut v[..len], beta1, beta2, eps, l2, decay, lr / bc1, bc2_sqrt);
            }
        }
        Ok(())
    }
}
