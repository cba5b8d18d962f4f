//! Two-sample drift statistics on sorted samples: Kolmogorov–Smirnov D, Wasserstein-1 and
//! PSI. Each is one merge walk over the two sorted samples, O(n + m), no allocation.
//! `tests/fixtures/make_drift_vectors.py` checks them against scipy (`ks_2samp`,
//! `wasserstein_distance`) and a plain PSI.

/// Two-sample Kolmogorov–Smirnov statistic: the largest gap between the two empirical CDFs
/// (scipy's `ks_2samp(a, b).statistic`). Both samples sorted ascending, finite; the first may
/// be stored as f32 (the monitor's reference, half the memory).
pub fn ks<A: Copy + Into<f64>>(a: &[A], b: &[f64]) -> f64 {
    let (n, m) = (a.len() as f64, b.len() as f64);
    if a.is_empty() || b.is_empty() {
        return f64::NAN;
    }
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        // Step past every copy of the smaller value in both samples, then compare the CDFs.
        let x = a[i].into().min(b[j]);
        while i < a.len() && a[i].into() <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    d
}

/// Wasserstein-1 (earth mover's) distance between the empirical distributions: the area
/// between the two CDFs (scipy's `wasserstein_distance(a, b)`). Both samples sorted.
pub fn wasserstein<A: Copy + Into<f64>>(a: &[A], b: &[f64]) -> f64 {
    let (n, m) = (a.len() as f64, b.len() as f64);
    if a.is_empty() || b.is_empty() {
        return f64::NAN;
    }
    let (mut i, mut j, mut area) = (0, 0, 0.0f64);
    let mut x = a[0].into().min(b[0]);
    while i < a.len() || j < b.len() {
        while i < a.len() && a[i].into() <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        let next = match (a.get(i), b.get(j)) {
            (Some(&p), Some(&q)) => p.into().min(q),
            (Some(&p), None) => p.into(),
            (None, Some(&q)) => q,
            (None, None) => break,
        };
        area += (i as f64 / n - j as f64 / m).abs() * (next - x);
        x = next;
    }
    area
}

/// Smallest bin share used in PSI, so an empty bin gives a large finite term, not infinity.
pub const PSI_FLOOR: f64 = 1e-4;

/// The interior bin edges for PSI: the reference's deciles, duplicates removed (a feature
/// with few distinct values gets fewer bins). Bin i holds values in `(edge[i-1], edge[i]]`.
pub fn psi_edges(reference_sorted: &[f64], bins: usize) -> Vec<f64> {
    let mut edges: Vec<f64> =
        (1..bins).map(|k| crate::model::baseline::quantile(reference_sorted, k as f64 / bins as f64)).collect();
    edges.dedup();
    edges
}

/// Counts of a sorted sample in the bins `edges` define (`edges.len() + 1` bins), written
/// into `counts`.
pub fn bin_counts(sorted: &[f64], edges: &[f64], counts: &mut [u64]) {
    counts.iter_mut().for_each(|c| *c = 0);
    let mut start = 0;
    for (k, &e) in edges.iter().enumerate() {
        let end = start + sorted[start..].partition_point(|&v| v <= e);
        counts[k] = (end - start) as u64;
        start = end;
    }
    counts[edges.len()] = (sorted.len() - start) as u64;
}

/// Population stability index Σ (aᵢ − eᵢ)·ln(aᵢ / eᵢ) of actual bin counts against expected
/// ones, shares floored at [`PSI_FLOOR`].
pub fn psi(expected: &[u64], actual: &[u64]) -> f64 {
    let (te, ta) = (expected.iter().sum::<u64>() as f64, actual.iter().sum::<u64>() as f64);
    if te == 0.0 || ta == 0.0 {
        return f64::NAN;
    }
    expected
        .iter()
        .zip(actual)
        .map(|(&e, &a)| {
            let (e, a) = ((e as f64 / te).max(PSI_FLOOR), (a as f64 / ta).max(PSI_FLOOR));
            (a - e) * (a / e).ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_samples_have_no_distance() {
        let a = [1.0, 2.0, 2.0, 3.0];
        assert_eq!(ks(&a, &a), 0.0);
        assert_eq!(wasserstein(&a, &a), 0.0);
        let edges = psi_edges(&a, 10);
        let mut c = vec![0; edges.len() + 1];
        bin_counts(&a, &edges, &mut c);
        assert_eq!(psi(&c, &c), 0.0);
    }

    #[test]
    fn a_shift_is_measured_in_the_data_units() {
        // Shifting a sample by 5 moves W1 by exactly 5 and separates the CDFs completely.
        let a: Vec<f64> = (0..100).map(f64::from).collect();
        let b: Vec<f64> = a.iter().map(|x| x + 200.0).collect();
        assert_eq!(ks(&a, &b), 1.0);
        assert!((wasserstein(&a, &b) - 200.0).abs() < 1e-9);
    }
}
