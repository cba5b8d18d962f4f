//! The multivariate statistic: PCA reconstruction error, as NannyML does it. Features are
//! standardised with the reference's mean and deviation, the reference's principal components
//! that explain 65 % of the variance are kept, and each row's error is the distance between it
//! and its projection onto them. A change in how features move together (a sensor that stops
//! tracking its neighbours) raises the error even when every feature's own distribution is
//! unchanged.

pub struct Pca {
    mean: Vec<f64>,
    scale: Vec<f64>,
    /// Kept components, each `features` long (unit vectors).
    components: Vec<Vec<f64>>,
}

/// Share of the reference's variance the kept components explain (NannyML's default).
const VARIANCE_KEPT: f64 = 0.65;

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations: (values, vectors as
/// columns of `v`). Feature counts are small (tens), so this is exact enough and simple.
fn jacobi(mut a: Vec<Vec<f64>>) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let mut v: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect()).collect();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j].powi(2))
            .sum();
        if off < 1e-18 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for row in a.iter_mut() {
                    let (akp, akq) = (row[p], row[q]);
                    row[p] = c * akp - s * akq;
                    row[q] = s * akp + c * akq;
                }
                let (rp, rq) = (a[p].clone(), a[q].clone());
                for k in 0..n {
                    a[p][k] = c * rp[k] - s * rq[k];
                    a[q][k] = s * rp[k] + c * rq[k];
                }
                for row in v.iter_mut() {
                    let (vkp, vkq) = (row[p], row[q]);
                    row[p] = c * vkp - s * vkq;
                    row[q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i][i]).collect(), v)
}

impl Pca {
    /// Fits on reference rows (row-major, `f` values each).
    pub fn fit(rows: &[f32], f: usize) -> Pca {
        let n = (rows.len() / f.max(1)).max(1) as f64;
        let mut mean = vec![0.0; f];
        for row in rows.chunks_exact(f) {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += f64::from(x) / n;
            }
        }
        let mut scale = vec![0.0; f];
        for row in rows.chunks_exact(f) {
            for ((s, m), &x) in scale.iter_mut().zip(&mean).zip(row) {
                *s += (f64::from(x) - m).powi(2) / n;
            }
        }
        // A constant feature carries no relation to the others: scale 1 keeps it at 0.
        scale.iter_mut().for_each(|s| *s = if *s > 1e-12 { s.sqrt() } else { 1.0 });
        let mut cov = vec![vec![0.0; f]; f];
        for row in rows.chunks_exact(f) {
            let z: Vec<f64> = row.iter().zip(&mean).zip(&scale).map(|((&x, m), s)| (f64::from(x) - m) / s).collect();
            for i in 0..f {
                for j in 0..f {
                    cov[i][j] += z[i] * z[j] / n;
                }
            }
        }
        let (values, vectors) = jacobi(cov);
        let mut order: Vec<usize> = (0..f).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        let total: f64 = values.iter().map(|v| v.max(0.0)).sum();
        let mut components = Vec::new();
        let mut explained = 0.0;
        for &i in &order {
            if total <= 0.0 || explained / total >= VARIANCE_KEPT {
                break;
            }
            explained += values[i].max(0.0);
            components.push((0..f).map(|k| vectors[k][i]).collect());
        }
        Pca { mean, scale, components }
    }

    pub fn kept(&self) -> usize {
        self.components.len()
    }

    /// One row's reconstruction error. `z` is scratch of the feature count.
    pub fn error(&self, row: &[f32], z: &mut [f64]) -> f64 {
        for (((z, &x), m), s) in z.iter_mut().zip(row).zip(&self.mean).zip(&self.scale) {
            *z = (f64::from(x) - m) / s;
        }
        let norm2: f64 = z.iter().map(|v| v * v).sum();
        let projected2: f64 =
            self.components.iter().map(|c| c.iter().zip(z.iter()).map(|(a, b)| a * b).sum::<f64>().powi(2)).sum();
        (norm2 - projected2).max(0.0).sqrt()
    }
}
