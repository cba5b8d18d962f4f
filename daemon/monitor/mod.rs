//! Drift monitoring against the bundle's own validation baseline, at message rate.
//!
//! Each pipeline keeps the last `window` rows in a ring (features and the model's score).
//! Every `every` rows the window is compared with the reference — the bundle's validation set
//! and the model's scores on it — per feature, on the prediction, and jointly (PCA
//! reconstruction error, `pca.rs`). Per message this is a copy into the ring: no allocation;
//! the comparison (a sort and a merge walk per series) is amortized over `every` rows.
//!
//! Thresholds are calibrated when the model loads: `bootstrap` windows drawn from the
//! reference itself give each statistic's distribution when nothing has changed, and the
//! threshold is its quantile at the configured false-alarm rate (split over the series, so the
//! rate holds for the pipeline as a whole), times `margin`: bootstrap windows are independent
//! draws, real windows are consecutive rows of an autocorrelated process and spread wider
//! (by ~10 % on Shuttle), so the quantile alone would false-alarm. The quantile is also scaled
//! for the reference's own sampling error, which draws from it cannot show (`calibrate`).
//! Explicit thresholds override. An alarm is raised
//! once per episode: it clears only when the statistic falls below `clear_ratio` × threshold.

pub mod detectors;
pub mod pca;
pub mod performance;
pub mod reference;
pub mod stats;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::baseline::quantile;
use crate::rng::Rng;

/// Which two-sample statistic raises a feature or prediction alarm (all three are reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    Ks,
    Psi,
    Wasserstein,
}

impl std::str::FromStr for Statistic {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ks" => Ok(Statistic::Ks),
            "psi" => Ok(Statistic::Psi),
            "wasserstein" => Ok(Statistic::Wasserstein),
            _ => Err(format!("unknown statistic {s:?}; expected ks, psi or wasserstein")),
        }
    }
}

/// `[pipeline.drift]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub window: usize,
    pub every: usize,
    pub statistic: Statistic,
    /// Chance per evaluation that a pipeline with nothing wrong raises any alarm.
    pub false_alarm_rate: f64,
    pub bootstrap: usize,
    /// Calibrated thresholds are the bootstrap quantile times this.
    pub margin: f64,
    pub clear_ratio: f64,
    /// Explicit thresholds by series name (a feature, `prediction`, `multivariate`).
    pub thresholds: BTreeMap<String, f64>,
    pub seed: u64,
    /// After a fine-tuned version passes its trial while its monitor is in alarm, the
    /// reference is re-based on this many rows it served (`reference.rs`); 0: never.
    pub rebase_rows: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            window: 500,
            every: 250,
            statistic: Statistic::Ks,
            false_alarm_rate: 0.01,
            bootstrap: 400,
            margin: 1.25,
            clear_ratio: 0.8,
            thresholds: BTreeMap::new(),
            seed: 0,
            rebase_rows: 2000,
        }
    }
}

/// The three statistics of one series on one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Measures {
    pub ks: f64,
    pub psi: f64,
    pub wasserstein: f64,
}

impl Measures {
    fn get(&self, s: Statistic) -> f64 {
        match s {
            Statistic::Ks => self.ks,
            Statistic::Psi => self.psi,
            Statistic::Wasserstein => self.wasserstein,
        }
    }
}

/// An alarm raised or cleared: what becomes a `drift` event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alarm {
    /// A feature name, `prediction` or `multivariate`.
    pub series: String,
    pub statistic: String,
    pub value: f64,
    pub threshold: f64,
    pub window: usize,
    /// Rows the monitor had seen when it fired.
    pub row: u64,
    /// How many rows before this one the change is estimated to have begun: where a
    /// drift-triggered run's new regime starts (`closed_loop::trigger`). KS: its value times
    /// the window — a window holding a share p of rows from a new distribution is at most p
    /// from the reference, so this does not reach back past the change by more than the
    /// statistic's noise; ADWIN: its window after the cut; otherwise 0 (the alarm itself).
    pub since_change: u64,
    /// false when the episode ended.
    pub raised: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measures: Option<Measures>,
}

struct Series {
    name: String,
    /// Sorted; f32 like the features themselves (scores and errors lose nothing that matters).
    reference: Vec<f32>,
    edges: Vec<f64>,
    expected: Vec<u64>,
    threshold: f64,
    alarm: bool,
    last: Measures,
}

impl Series {
    fn new(name: &str, mut values: Vec<f64>) -> Series {
        values.retain(|v| v.is_finite());
        values.sort_by(f64::total_cmp);
        let edges = stats::psi_edges(&values, 10);
        let mut expected = vec![0; edges.len() + 1];
        stats::bin_counts(&values, &edges, &mut expected);
        Series {
            name: name.to_string(),
            reference: values.iter().map(|&v| v as f32).collect(),
            edges,
            expected,
            threshold: f64::INFINITY,
            alarm: false,
            last: Measures::default(),
        }
    }

    /// All three statistics of a sorted window; `counts` is scratch.
    fn measure(&self, sorted: &[f64], counts: &mut [u64]) -> Measures {
        let counts = &mut counts[..self.expected.len()];
        stats::bin_counts(sorted, &self.edges, counts);
        Measures {
            ks: stats::ks(&self.reference, sorted),
            psi: stats::psi(&self.expected, counts),
            wasserstein: stats::wasserstein(&self.reference, sorted),
        }
    }
}

/// The statistic that raises a series' alarms, as events name it.
fn statistic_name(stat: Statistic, multi: bool) -> String {
    if multi {
        "ks_pca_reconstruction_error".to_string()
    } else {
        format!("{stat:?}").to_lowercase()
    }
}

/// Whether a series' alarm value is a KS distance (the multivariate series always is: KS over
/// the windows' PCA reconstruction errors).
fn statistic_is_ks(stat: Statistic, multi: bool) -> bool {
    multi || stat == Statistic::Ks
}

/// Per-series state for the retained status.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesState {
    pub series: String,
    /// What `value` measures (`ks`, `psi`, `wasserstein`; `ks_pca_reconstruction_error`).
    pub statistic: String,
    pub alarm: bool,
    pub value: f64,
    pub threshold: f64,
}

/// The reference is at most this many rows: enough for KS at any window up to its size, and
/// the monitor's memory stays under ~250 KB per pipeline whatever the validation set's size
/// (on Shuttle, 1,500 rows already made the thresholds too tight: false alarms).
pub const MAX_REFERENCE_ROWS: usize = 5000;

/// The reference a monitor starts with, as its `source` names it.
pub const VALIDATION_SET: &str = "the bundle's validation set";

pub struct Monitor {
    /// Where the reference came from, as the status shows it.
    pub source: String,
    settings: Settings,
    features: usize,
    /// One per feature, then `prediction`.
    series: Vec<Series>,
    pca: pca::Pca,
    /// Over the reference's reconstruction errors; its statistic is the window's errors' KS.
    multi: Series,
    rows: Vec<f32>,
    scores: Vec<f64>,
    next: usize,
    filled: usize,
    since: usize,
    seen: u64,
    scratch: Vec<f64>,
    counts: Vec<u64>,
    z: Vec<f64>,
}

impl Monitor {
    /// Builds the reference from the validation rows (`names.len()` values each) and the
    /// model's scores on them, and calibrates the thresholds. A validation set larger than
    /// [`MAX_REFERENCE_ROWS`] is thinned evenly to that many rows.
    pub fn new(reference: &[f32], scores: &[f64], names: &[String], settings: Settings) -> Monitor {
        let f = names.len();
        let all = scores.len().min(reference.len() / f.max(1));
        let keep: Vec<usize> = if all > MAX_REFERENCE_ROWS {
            (0..MAX_REFERENCE_ROWS).map(|i| i * all / MAX_REFERENCE_ROWS).collect()
        } else {
            (0..all).collect()
        };
        let reference: Vec<f32> = keep.iter().flat_map(|&r| reference[r * f..(r + 1) * f].iter().copied()).collect();
        let scores: Vec<f64> = keep.iter().map(|&r| scores[r]).collect();
        let (reference, scores, n) = (&reference[..], &scores[..], keep.len());
        let mut series: Vec<Series> =
            (0..f).map(|c| Series::new(&names[c], (0..n).map(|r| f64::from(reference[r * f + c])).collect())).collect();
        series.push(Series::new("prediction", scores[..n].to_vec()));
        let pca = pca::Pca::fit(&reference[..n * f], f);
        let mut z = vec![0.0; f];
        let errors: Vec<f64> = (0..n).map(|r| pca.error(&reference[r * f..(r + 1) * f], &mut z)).collect();
        let window = settings.window.max(10);
        let mut m = Monitor {
            source: VALIDATION_SET.into(),
            features: f,
            series,
            pca,
            multi: Series::new("multivariate", errors),
            rows: vec![0.0; window * f],
            scores: vec![0.0; window],
            next: 0,
            filled: 0,
            since: 0,
            seen: 0,
            scratch: vec![0.0; window],
            counts: vec![0; 16],
            z,
            settings: Settings { window, every: settings.every.max(1), ..settings },
        };
        m.calibrate(reference, scores, n);
        m
    }

    /// Thresholds from windows drawn (with replacement) from the reference itself.
    fn calibrate(&mut self, reference: &[f32], scores: &[f64], n: usize) {
        let (f, w) = (self.features, self.settings.window);
        let stat = self.settings.statistic;
        let mut rng = Rng::new(self.settings.seed);
        // Only the statistic that raises alarms is kept per draw.
        let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(self.settings.bootstrap); self.series.len() + 1];
        let multi = self.series.len();
        for _ in 0..self.settings.bootstrap {
            for i in 0..w {
                let r = (rng.next_u64() % n.max(1) as u64) as usize;
                self.rows[i * f..(i + 1) * f].copy_from_slice(&reference[r * f..(r + 1) * f]);
                self.scores[i] = scores[r];
            }
            self.filled = w;
            for (s, m) in self.measure_all().into_iter().enumerate() {
                samples[s].push(if s == multi { m.ks } else { m.get(stat) });
            }
        }
        // Bonferroni: the rate is for the pipeline, so each series gets its share.
        let q = 1.0 - self.settings.false_alarm_rate / samples.len() as f64;
        // A window drawn from the reference is compared with the sample it came from; a live
        // window is independent of it, and the reference's own sampling error adds to the
        // difference. Under no change the two-sample statistics scale with 1/w + 1/n (PSI) or
        // its square root (KS, Wasserstein), the draws with 1/w alone: so the quantile is
        // scaled up by that ratio. It matters for a small reference: 8 % for 3,000 rows and a
        // window of 500, 33 % for 1,500, which without it raised 3 false alarms over the other
        // 47,600 clean Shuttle rows (`tests/drift.rs`). Smaller still, the reference's fixed
        // sampling error wins anyway (1,000 rows: 8 alarms without, 1 with), hence the warning
        // for references under four windows (`infer::small_reference`).
        let finite = 1.0 + w as f64 / n.max(1) as f64;
        let series = self.series.len();
        let scale = |k: usize| if k < series && stat == Statistic::Psi { finite } else { finite.sqrt() };
        let threshold = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            quantile(&v, q)
        };
        let names: Vec<String> =
            self.series.iter().map(|s| s.name.clone()).chain(["multivariate".to_string()]).collect();
        for (k, values) in samples.into_iter().enumerate() {
            let t = self
                .settings
                .thresholds
                .get(&names[k])
                .copied()
                .unwrap_or_else(|| threshold(values) * scale(k) * self.settings.margin);
            if k < self.series.len() {
                self.series[k].threshold = t;
            } else {
                self.multi.threshold = t;
            }
        }
        self.filled = 0;
        self.next = 0;
    }

    /// The statistics of the current window for every series, the multivariate one (over the
    /// rows' PCA reconstruction errors) last.
    fn measure_all(&mut self) -> Vec<Measures> {
        let (f, n) = (self.features, self.filled);
        let mut out = Vec::with_capacity(self.series.len() + 1);
        for s in 0..self.series.len() {
            let sorted = &mut self.scratch[..n];
            for (i, v) in sorted.iter_mut().enumerate() {
                *v = if s < f { f64::from(self.rows[i * f + s]) } else { self.scores[i] };
            }
            sorted.sort_unstable_by(f64::total_cmp);
            out.push(self.series[s].measure(sorted, &mut self.counts));
        }
        let sorted = &mut self.scratch[..n];
        for (i, v) in sorted.iter_mut().enumerate() {
            *v = self.pca.error(&self.rows[i * f..(i + 1) * f], &mut self.z);
        }
        sorted.sort_unstable_by(f64::total_cmp);
        out.push(self.multi.measure(sorted, &mut self.counts));
        out
    }

    /// Takes one served row and its score; appends any alarm raised or cleared to `alarms`.
    pub fn observe(&mut self, row: &[f32], score: f64, alarms: &mut Vec<Alarm>) {
        let (f, w) = (self.features, self.settings.window);
        if row.len() != f || !score.is_finite() {
            return;
        }
        self.rows[self.next * f..(self.next + 1) * f].copy_from_slice(row);
        self.scores[self.next] = score;
        self.next = (self.next + 1) % w;
        self.filled = (self.filled + 1).min(w);
        self.seen += 1;
        self.since += 1;
        if self.filled < w || self.since < self.settings.every {
            return;
        }
        self.since = 0;
        let measures = self.measure_all();
        let stat = self.settings.statistic;
        let (clear, seen) = (self.settings.clear_ratio, self.seen);
        for (k, m) in measures.into_iter().enumerate() {
            let multi = k == self.series.len();
            let s = if multi { &mut self.multi } else { &mut self.series[k] };
            let value = if multi { m.ks } else { m.get(stat) };
            s.last = m;
            let raise = !s.alarm && value > s.threshold;
            let end = s.alarm && value < clear * s.threshold;
            if raise || end {
                s.alarm = raise;
                alarms.push(Alarm {
                    series: s.name.clone(),
                    statistic: statistic_name(stat, multi),
                    value,
                    threshold: s.threshold,
                    window: w,
                    row: seen,
                    since_change: if raise && statistic_is_ks(stat, multi) {
                        ((value.clamp(0.0, 1.0)) * w as f64) as u64
                    } else {
                        0
                    },
                    raised: raise,
                    measures: Some(m),
                });
            }
        }
    }

    /// The alarms raised and not yet ended, as ended: for a monitor being replaced (its
    /// reference re-based), whose episodes end with it.
    pub fn end_alarms(&self) -> Vec<Alarm> {
        let stat = self.settings.statistic;
        let multi = std::iter::once((&self.multi, true));
        self.series
            .iter()
            .map(|s| (s, false))
            .chain(multi)
            .filter(|(s, _)| s.alarm)
            .map(|(s, multi)| Alarm {
                series: s.name.clone(),
                statistic: statistic_name(stat, multi),
                value: if multi { s.last.ks } else { s.last.get(stat) },
                threshold: s.threshold,
                window: self.settings.window,
                row: self.seen,
                since_change: 0,
                raised: false,
                measures: Some(s.last),
            })
            .collect()
    }

    /// Every series: in alarm or not, its last value and threshold.
    pub fn state(&self) -> Vec<SeriesState> {
        let stat = self.settings.statistic;
        self.series
            .iter()
            .map(|s| SeriesState {
                series: s.name.clone(),
                statistic: statistic_name(stat, false),
                alarm: s.alarm,
                value: s.last.get(stat),
                threshold: s.threshold,
            })
            .chain([SeriesState {
                series: "multivariate".into(),
                statistic: statistic_name(stat, true),
                alarm: self.multi.alarm,
                value: self.multi.last.ks,
                threshold: self.multi.threshold,
            }])
            .collect()
    }

    /// The calibrated (or configured) threshold of a series.
    pub fn threshold(&self, series: &str) -> Option<f64> {
        self.state().into_iter().find(|s| s.series == series).map(|s| s.threshold)
    }

    pub fn components_kept(&self) -> usize {
        self.pca.kept()
    }

    /// The feature names, in model order.
    pub fn features(&self) -> Vec<String> {
        self.series[..self.features].iter().map(|s| s.name.clone()).collect()
    }

    /// Rows in the reference (after thinning to [`MAX_REFERENCE_ROWS`]).
    /// Rows observed since the monitor started.
    pub fn rows_seen(&self) -> u64 {
        self.seen
    }

    pub fn reference_rows(&self) -> usize {
        self.multi.reference.len()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }
}
