//! Live performance from late labels. Each prediction is remembered by (device, key) for
//! `horizon`; a label on `labels.topic` with the same key is joined to it and becomes one
//! per-sample loss (0/1 error for classifiers, absolute error for regression). The losses feed
//! ADWIN and Page-Hinkley (river's definitions, `detectors.rs`) and a rolling window compared
//! with the loss the bundle's baseline implies (1 − accuracy, or MAE). A `performance` alarm
//! is raised when the rolling loss is worse than the baseline by more than sampling noise
//! explains, or when ADWIN finds a change to a mean worse than the baseline; once per episode.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::detectors::{Adwin, PageHinkley};
use super::Alarm;

/// Labels needed in the rolling window before it can raise an alarm.
const MIN_LABELS: usize = 50;
/// Most predictions remembered while waiting for their labels.
const MAX_PENDING: usize = 200_000;

/// What a prediction said, for scoring it when its label arrives.
#[derive(Debug, Clone, Copy)]
pub enum Predicted {
    Class(usize),
    Value(f64),
}

/// A prediction waiting for its label.
struct Pending {
    p: Predicted,
    version: u64,
    baseline: f64,
    at: Instant,
    /// What a shadowing challenger predicted for the same row.
    shadow: Option<Predicted>,
}

/// Champion and shadowing challenger scored on the same labels.
#[derive(Debug, Clone, Copy, Default)]
pub struct Paired {
    pub shadow_version: u64,
    pub labels: u64,
    pub champion_loss_sum: f64,
    pub shadow_loss_sum: f64,
}

/// Versions whose live loss is remembered.
const VERSIONS_KEPT: usize = 8;

pub struct Performance {
    /// The class shares of the serving model's validation targets, and which version they
    /// belong to: the reference for label shift.
    baseline_shares: Vec<f64>,
    baseline_version: u64,
    /// Classes of the labels in the rolling window (classifiers), and their counts.
    classes: VecDeque<usize>,
    class_counts: Vec<u64>,
    shift_alarm: bool,
    /// Whether the last label joined a classifier's prediction.
    last_joined: bool,
    horizon: Duration,
    window: usize,
    pending: HashMap<(Arc<str>, String), Pending>,
    /// Per model version: labels joined to its predictions, and their summed loss (the
    /// trial judges a new version on its own predictions only).
    by_version: std::collections::BTreeMap<u64, (u64, f64)>,
    /// While a challenger shadows the champion: losses of both on the same labeled rows.
    pub paired: Option<Paired>,
    order: VecDeque<((Arc<str>, String), Instant)>,
    losses: VecDeque<f64>,
    sum: f64,
    adwin: Adwin,
    ph: PageHinkley,
    alarm: bool,
    joined: u64,
    /// Labels with no prediction to join (too late, unknown key) or not a number.
    pub unmatched: u64,
}

impl Performance {
    pub fn new(horizon: Duration, window: usize) -> Performance {
        Performance {
            baseline_shares: Vec::new(),
            baseline_version: 0,
            classes: VecDeque::new(),
            class_counts: Vec::new(),
            shift_alarm: false,
            last_joined: false,
            horizon,
            window: window.max(MIN_LABELS),
            pending: HashMap::new(),
            by_version: Default::default(),
            paired: None,
            order: VecDeque::new(),
            losses: VecDeque::new(),
            sum: 0.0,
            adwin: Adwin::default(),
            ph: PageHinkley::default(),
            alarm: false,
            joined: 0,
            unmatched: 0,
        }
    }

    /// The class shares the serving model's validation set has (set when a model starts
    /// serving; classifiers only).
    pub fn set_baseline(&mut self, version: u64, shares: &[f64]) {
        if version != self.baseline_version || self.baseline_shares.len() != shares.len() {
            self.baseline_version = version;
            self.baseline_shares = shares.to_vec();
            self.class_counts = vec![0; shares.len()];
            self.classes.clear();
        }
    }

    /// PSI of the rolling window's label shares against the baseline's.
    pub fn label_shift(&self) -> f64 {
        let n = self.classes.len() as f64;
        if n == 0.0 || self.baseline_shares.is_empty() {
            return f64::NAN;
        }
        self.baseline_shares
            .iter()
            .zip(&self.class_counts)
            .map(|(&e, &c)| {
                let (e, a) = (e.max(super::stats::PSI_FLOOR), (c as f64 / n).max(super::stats::PSI_FLOOR));
                (a - e) * (a / e).ln()
            })
            .sum()
    }

    /// Label shift: the share of each class among the labels moved away from the validation
    /// set's (PSI above 0.1, the usual "moderate shift" line, and above what (k − 1) / n, PSI's
    /// expectation for n labels drawn from the baseline, times four allows). Once per episode.
    fn watch_shift(&mut self, class: usize, alarms: &mut Vec<Alarm>) {
        if class >= self.class_counts.len() {
            return;
        }
        self.classes.push_back(class);
        self.class_counts[class] += 1;
        if self.classes.len() > self.window {
            if let Some(old) = self.classes.pop_front() {
                self.class_counts[old] -= 1;
            }
        }
        if self.classes.len() < MIN_LABELS {
            return;
        }
        let psi = self.label_shift();
        let k = self.baseline_shares.len().max(2) as f64;
        let threshold = (4.0 * (k - 1.0) / self.classes.len() as f64).max(0.1);
        let raise = !self.shift_alarm && psi > threshold;
        let end = self.shift_alarm && psi < 0.8 * threshold;
        if raise || end {
            self.shift_alarm = raise;
            alarms.push(Alarm {
                series: "labels".into(),
                statistic: "psi_class_shares".into(),
                value: psi,
                threshold,
                window: self.classes.len(),
                row: self.joined,
                raised: raise,
                measures: None,
            });
        }
    }

    /// Remembers a served prediction; `baseline_loss` is what the serving model's validation
    /// set implies per sample.
    pub fn predicted(
        &mut self,
        device: Arc<str>,
        key: String,
        p: Predicted,
        version: u64,
        baseline_loss: f64,
        now: Instant,
    ) {
        self.expire(now);
        // `order` keeps an entry for each prediction until its horizon passes (a day by
        // default), labeled or not. Labels usually come within seconds, so without this it
        // grew by one entry per message for a day (~70 bytes each: the soak found it). Drop
        // the labeled ones once they are most of it: amortized O(1) per prediction.
        if self.order.len() > 2 * self.pending.len() + 1024 {
            let pending = &self.pending;
            self.order.retain(|(k, t)| pending.get(k).is_some_and(|p| p.at == *t));
        }
        if self.pending.len() >= MAX_PENDING {
            if let Some((old, t)) = self.order.pop_front() {
                if self.pending.get(&old).is_some_and(|p| p.at == t) {
                    self.pending.remove(&old);
                }
            }
        }
        self.order.push_back(((device.clone(), key.clone()), now));
        self.pending.insert((device, key), Pending { p, version, baseline: baseline_loss, at: now, shadow: None });
    }

    /// A shadowing challenger's prediction for a row the champion just served.
    pub fn shadow_predicted(&mut self, device: &Arc<str>, key: String, p: Predicted) {
        if let Some(pending) = self.pending.get_mut(&(device.clone(), key)) {
            pending.shadow = Some(p);
        }
    }

    /// Labels joined to `version`'s own predictions, and their mean loss.
    pub fn live_loss(&self, version: u64) -> (u64, f64) {
        self.by_version.get(&version).map_or((0, f64::NAN), |&(n, sum)| (n, sum / n.max(1) as f64))
    }

    fn expire(&mut self, now: Instant) {
        while let Some((k, t)) = self.order.front() {
            if now.duration_since(*t) <= self.horizon {
                break;
            }
            if self.pending.get(k).is_some_and(|p| p.at == *t) {
                self.pending.remove(k);
            }
            self.order.pop_front();
        }
    }

    pub fn joined(&self) -> u64 {
        self.joined
    }

    /// The rolling per-sample loss over the last `window` labels.
    pub fn rolling_loss(&self) -> f64 {
        if self.losses.is_empty() {
            f64::NAN
        } else {
            self.sum / self.losses.len() as f64
        }
    }

    /// Joins a label; appends the alarms raised or cleared (performance, label shift).
    pub fn label(&mut self, device: &str, key: String, truth: f64, now: Instant, alarms: &mut Vec<Alarm>) {
        if let Some(a) = self.join(device, key, truth, now) {
            alarms.push(a);
        }
        if self.joined > 0 && truth >= 0.0 && truth.fract() == 0.0 && self.last_joined {
            self.watch_shift(truth as usize, alarms);
        }
    }

    fn join(&mut self, device: &str, key: String, truth: f64, now: Instant) -> Option<Alarm> {
        self.expire(now);
        self.last_joined = false;
        let Some(pending) = self.pending.remove(&(Arc::from(device), key)) else {
            self.unmatched += 1;
            return None;
        };
        let (p, baseline) = (pending.p, pending.baseline);
        let loss = loss_of(p, truth);
        if !loss.is_finite() {
            self.unmatched += 1;
            return None;
        }
        let v = self.by_version.entry(pending.version).or_default();
        v.0 += 1;
        v.1 += loss;
        while self.by_version.len() > VERSIONS_KEPT {
            self.by_version.pop_first();
        }
        if let (Some(pair), Some(shadow)) = (self.paired.as_mut(), pending.shadow) {
            let shadow_loss = loss_of(shadow, truth);
            if shadow_loss.is_finite() {
                pair.labels += 1;
                pair.champion_loss_sum += loss;
                pair.shadow_loss_sum += shadow_loss;
            }
        }
        self.joined += 1;
        self.last_joined = matches!(p, Predicted::Class(_));
        self.losses.push_back(loss);
        self.sum += loss;
        if self.losses.len() > self.window {
            self.sum -= self.losses.pop_front().unwrap_or(0.0);
        }
        let adwin_change = self.adwin.update(loss) && self.adwin.mean() > baseline;
        let ph_change = self.ph.update(loss) && self.rolling_loss() > baseline;
        let n = self.losses.len() as f64;
        let rolling = self.rolling_loss();
        // Sampling noise of a mean of n losses around the baseline: binomial for 0/1 errors;
        // for absolute errors, the baseline itself as a scale (|e| has sd ≈ its mean).
        let spread = match p {
            Predicted::Class(_) => (baseline.max(1e-3) * (1.0 - baseline).max(1e-3) / n).sqrt(),
            Predicted::Value(_) => baseline.max(1e-9) / n.sqrt(),
        };
        let threshold = baseline + 4.0 * spread;
        let worse = self.losses.len() >= MIN_LABELS && rolling > threshold;
        if !self.alarm && (worse || adwin_change || ph_change) && self.losses.len() >= MIN_LABELS {
            self.alarm = true;
            let detector = if worse {
                "rolling"
            } else if adwin_change {
                "adwin"
            } else {
                "page_hinkley"
            };
            return Some(Alarm {
                series: "performance".into(),
                statistic: format!("loss ({detector})"),
                value: rolling,
                threshold,
                window: self.losses.len(),
                row: self.joined,
                raised: true,
                measures: None,
            });
        }
        if self.alarm && rolling < baseline + 0.8 * (threshold - baseline) {
            self.alarm = false;
            return Some(Alarm {
                series: "performance".into(),
                statistic: "loss".into(),
                value: rolling,
                threshold,
                window: self.losses.len(),
                row: self.joined,
                raised: false,
                measures: None,
            });
        }
        None
    }

    pub fn in_alarm(&self) -> bool {
        self.alarm
    }

    pub fn shift_in_alarm(&self) -> bool {
        self.shift_alarm
    }
}

/// Per-sample loss: 0/1 error for a class, absolute error for a value.
fn loss_of(p: Predicted, truth: f64) -> f64 {
    match p {
        Predicted::Class(c) => f64::from(u8::from(truth < 0.0 || (truth.round() as usize) != c)),
        Predicted::Value(v) => (v - truth).abs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_labeled_at_once_leave_no_trail_behind() {
        let mut perf = Performance::new(Duration::from_secs(86_400), 200);
        let device: Arc<str> = Arc::from("dev1");
        let now = Instant::now();
        let mut alarms = Vec::new();
        for i in 0..100_000u64 {
            perf.predicted(device.clone(), i.to_string(), Predicted::Class(1), 1, 0.1, now);
            perf.label("dev1", i.to_string(), 1.0, now, &mut alarms);
        }
        assert_eq!(perf.pending.len(), 0);
        assert!(perf.order.len() <= 1025, "{} entries kept for labeled predictions", perf.order.len());
        assert_eq!(perf.joined(), 100_000);
        // Unlabeled predictions are still remembered until their horizon.
        perf.predicted(device.clone(), "late".into(), Predicted::Class(0), 1, 0.1, now);
        for i in 0..5_000u64 {
            perf.predicted(device.clone(), format!("x{i}"), Predicted::Class(1), 1, 0.1, now);
            perf.label("dev1", format!("x{i}"), 1.0, now, &mut alarms);
        }
        perf.label("dev1", "late".into(), 0.0, now, &mut alarms);
        assert_eq!(perf.joined(), 105_001, "the late label still joined its prediction");
    }
}
