//! The baseline a bundle carries: how the model did on its own validation set, what the
//! features looked like, and what the model predicted. Drift and the gate compare against it.
//! Pure functions, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::manifest::Task;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    pub rows: usize,
    /// accuracy, f1, roc_auc (binary); accuracy, f1_macro (multiclass); mae, rmse
    /// (regression); error_p50 … error_max (reconstruction).
    pub metrics: BTreeMap<String, f64>,
    /// Binary models with one output: the score at or above which the class is 1
    /// (0.5 for probabilities, 0 for logits). Reconstruction models: the anomaly line, the
    /// validation set's 99th-percentile reconstruction error (the loop trains below it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Per input, in model order.
    pub features: Vec<Stats>,
    /// The distribution of the model's score (positive-class score, predicted value or
    /// reconstruction error).
    pub predictions: Stats,
    /// Classification: the share of each predicted class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_shares: Vec<f64>,
}

/// Reference statistics of one column: enough for PSI/KS-style drift tests later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    pub name: String,
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// The 0, 5, 10, …, 100th percentiles (21 values).
    pub quantiles: Vec<f64>,
    /// 20 equal-width bins from min to max.
    pub histogram_edges: Vec<f64>,
    pub histogram_counts: Vec<u64>,
}

/// Linear-interpolated quantile of sorted data (numpy's default), `q` in [0, 1].
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

pub fn stats(name: &str, values: &[f64]) -> Stats {
    let s = sorted(values);
    let n = s.len();
    let mean = if n == 0 { f64::NAN } else { s.iter().sum::<f64>() / n as f64 };
    let var = if n == 0 { f64::NAN } else { s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64 };
    let (min, max) = (s.first().copied().unwrap_or(f64::NAN), s.last().copied().unwrap_or(f64::NAN));
    const BINS: usize = 20;
    let width = (max - min) / BINS as f64;
    let edges: Vec<f64> = (0..=BINS).map(|i| min + width * i as f64).collect();
    let mut counts = vec![0u64; BINS];
    for x in &s {
        let bin = if width > 0.0 { (((x - min) / width) as usize).min(BINS - 1) } else { 0 };
        counts[bin] += 1;
    }
    Stats {
        name: name.to_string(),
        count: n,
        mean,
        std: var.sqrt(),
        min,
        max,
        quantiles: (0..=20).map(|i| quantile(&s, i as f64 / 20.0)).collect(),
        histogram_edges: edges,
        histogram_counts: counts,
    }
}

/// How to turn one row of the primary output into a score and (for classifiers) a class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub task: Task,
    pub threshold: Option<f64>,
}

impl Reading {
    /// The class a classifier's output row stands for.
    pub fn class(&self, row: &[f32]) -> Option<usize> {
        match self.task {
            Task::Binary if row.len() == 1 => Some(usize::from(f64::from(row[0]) >= self.threshold.unwrap_or(0.5))),
            Task::Binary | Task::Multiclass => argmax(row),
            Task::Regression | Task::Reconstruction => None,
        }
    }

    /// One number per row: positive-class score, top-class score, value, or reconstruction
    /// error (mean squared difference from the input row).
    pub fn score(&self, row: &[f32], input: &[f32]) -> f64 {
        match self.task {
            Task::Binary => f64::from(*row.get(1).or(row.first()).unwrap_or(&f32::NAN)),
            Task::Multiclass => row.iter().copied().fold(f32::NAN, f32::max).into(),
            Task::Regression => f64::from(*row.first().unwrap_or(&f32::NAN)),
            Task::Reconstruction => reconstruction_error(row, input),
        }
    }
}

/// The per-sample loss that a model's metrics imply, as late labels measure it: 1 − accuracy
/// for classifiers, MAE for regression; NaN where labels do not apply (reconstruction).
pub fn implied_loss(task: Task, metrics: &BTreeMap<String, f64>) -> f64 {
    match task {
        Task::Regression => metrics.get("mae").copied().unwrap_or(f64::NAN),
        Task::Reconstruction => f64::NAN,
        Task::Binary | Task::Multiclass => 1.0 - metrics.get("accuracy").copied().unwrap_or(f64::NAN),
    }
}

pub fn reconstruction_error(output: &[f32], input: &[f32]) -> f64 {
    if output.len() != input.len() || input.is_empty() {
        return f64::NAN;
    }
    output.iter().zip(input).map(|(o, i)| f64::from(o - i).powi(2)).sum::<f64>() / input.len() as f64
}

fn argmax(row: &[f32]) -> Option<usize> {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i)
}

/// For a binary model with one output column: probabilities (all in [0, 1]) are cut at 0.5,
/// anything else is taken as a logit and cut at 0.
pub fn binary_threshold(scores: &[f64]) -> f64 {
    if scores.iter().all(|s| (0.0..=1.0).contains(s)) {
        0.5
    } else {
        0.0
    }
}

/// Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties averaged.
pub fn roc_auc(scores: &[f64], labels: &[usize]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = rank;
        }
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&l| l == 1).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    let rank_sum: f64 = labels.iter().zip(&ranks).filter(|(&l, _)| l == 1).map(|(_, r)| r).sum();
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// F1 of class `positive`.
pub fn f1(predicted: &[usize], truth: &[usize], positive: usize) -> f64 {
    let tp = predicted.iter().zip(truth).filter(|(p, t)| **p == positive && **t == positive).count() as f64;
    let fp = predicted.iter().zip(truth).filter(|(p, t)| **p == positive && **t != positive).count() as f64;
    let fnn = predicted.iter().zip(truth).filter(|(p, t)| **p != positive && **t == positive).count() as f64;
    if tp == 0.0 {
        return 0.0;
    }
    2.0 * tp / (2.0 * tp + fp + fnn)
}

/// Metrics of a classifier: `classes` counts output classes (2 for binary).
pub fn accuracy(predicted: &[usize], truth: &[usize]) -> f64 {
    predicted.iter().zip(truth).filter(|(p, t)| p == t).count() as f64 / truth.len().max(1) as f64
}

pub fn classification_metrics(
    task: Task,
    predicted: &[usize],
    truth: &[usize],
    scores: &[f64],
    classes: usize,
) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::from([("accuracy".to_string(), accuracy(predicted, truth))]);
    if task == Task::Binary {
        m.insert("f1".into(), f1(predicted, truth, 1));
        m.insert("roc_auc".into(), roc_auc(scores, truth));
    } else {
        let macro_f1 = (0..classes).map(|c| f1(predicted, truth, c)).sum::<f64>() / classes.max(1) as f64;
        m.insert("f1_macro".into(), macro_f1);
    }
    m
}

pub fn regression_metrics(predicted: &[f64], truth: &[f64]) -> BTreeMap<String, f64> {
    let n = truth.len().max(1) as f64;
    let mae = predicted.iter().zip(truth).map(|(p, t)| (p - t).abs()).sum::<f64>() / n;
    let mse = predicted.iter().zip(truth).map(|(p, t)| (p - t).powi(2)).sum::<f64>() / n;
    BTreeMap::from([("mae".to_string(), mae), ("rmse".to_string(), mse.sqrt())])
}

pub fn reconstruction_metrics(errors: &[f64]) -> BTreeMap<String, f64> {
    let s = sorted(errors);
    [("error_p50", 0.5), ("error_p90", 0.9), ("error_p95", 0.95), ("error_p99", 0.99), ("error_max", 1.0)]
        .into_iter()
        .map(|(k, q)| (k.to_string(), quantile(&s, q)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_match_numpy_linear_interpolation() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&s, 0.5), 2.5);
        assert_eq!(quantile(&s, 0.25), 1.75);
        assert_eq!(quantile(&s, 1.0), 4.0);
    }

    #[test]
    fn roc_auc_matches_sklearn_on_a_small_case() {
        // sklearn.metrics.roc_auc_score([0,0,1,1], [0.1,0.4,0.35,0.8]) == 0.75
        assert_eq!(roc_auc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]), 0.75);
        // ties count half
        assert_eq!(roc_auc(&[0.5, 0.5], &[0, 1]), 0.5);
    }

    #[test]
    fn f1_counts_the_positive_class() {
        // tp=1, fp=1, fn=1 -> 2/(2+1+1)
        assert_eq!(f1(&[1, 1, 0, 0], &[1, 0, 1, 0], 1), 0.5);
    }

    #[test]
    fn stats_histogram_covers_every_value() {
        let v: Vec<f64> = (0..100).map(f64::from).collect();
        let s = stats("x", &v);
        assert_eq!(s.histogram_counts.iter().sum::<u64>(), 100);
        assert_eq!(s.quantiles.len(), 21);
        assert_eq!((s.min, s.max), (0.0, 99.0));
        assert!((s.mean - 49.5).abs() < 1e-12);
    }

    #[test]
    fn single_column_binary_reading_uses_the_threshold() {
        let r = Reading { task: Task::Binary, threshold: Some(0.0) };
        assert_eq!(r.class(&[-0.2]), Some(0));
        assert_eq!(r.class(&[0.3]), Some(1));
        let r2 = Reading { task: Task::Binary, threshold: None };
        assert_eq!(r2.class(&[0.1, 0.9]), Some(1));
        assert_eq!(r2.score(&[0.1, 0.9], &[]), 0.9f32 as f64);
    }
}
