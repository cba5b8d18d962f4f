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
/// Memory for predictions waiting for their labels (~200 bytes each with short keys: about
/// 170,000 of them). A day's horizon at 100 messages a second is 8.6 million, so when most
/// rows never get a label this budget, not the horizon, decides how long one waits.
const PENDING_BYTES: usize = 32 << 20;
/// A label can arrive before its prediction is registered: a sensor's label is often sent
/// right behind its row, and the row still waits for its batch. Such labels wait this long
/// for their prediction, in at most `EARLY_BYTES` (~28,000 labels); then they are unmatched.
const EARLY_WAIT: Duration = Duration::from_secs(30);
const EARLY_BYTES: usize = 4 << 20;

/// What a prediction said, for scoring it when its label arrives.
#[derive(Debug, Clone, Copy)]
pub enum Predicted {
    Class(usize),
    Value(f64),
}

/// A served prediction, remembered until its label arrives.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    pub p: Predicted,
    pub version: u64,
    /// The loss per sample the serving model's validation set implies.
    pub baseline: f64,
    /// What a shadowing challenger predicted for the same row.
    pub shadow: Option<Predicted>,
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

/// (device, key): what joins a label to its prediction.
type Key = (Arc<str>, String);

/// Entries by key that leave oldest first: when they pass an age, or to stay within a memory
/// budget. Keys come from the wire (a key can be as long as a payload), so the budget counts
/// their bytes, not entries.
struct Expiring<V> {
    map: HashMap<Key, (V, Instant)>,
    /// Insertion order. An entry removed from `map` stays here until it reaches the front
    /// or a compaction drops it.
    order: VecDeque<(Key, Instant)>,
    bytes: usize,
    budget: usize,
}

impl<V> Expiring<V> {
    fn new(budget: usize) -> Expiring<V> {
        Expiring { map: HashMap::new(), order: VecDeque::new(), bytes: 0, budget }
    }

    /// What an entry holds: the key twice (map and order), the device's name (shared, but
    /// counted: a hostile stream can make every device new), and the fixed parts.
    fn cost(key: &Key) -> usize {
        2 * key.1.len() + key.0.len() + 2 * std::mem::size_of::<(Key, Instant)>() + std::mem::size_of::<V>() + 16
    }

    /// Inserts (or replaces); returns how many older entries were dropped to make room.
    fn insert(&mut self, key: Key, value: V, now: Instant) -> u64 {
        let cost = Self::cost(&key);
        if cost > self.budget {
            return 1;
        }
        self.remove(&key);
        let mut dropped = 0;
        while self.bytes + cost > self.budget && self.pop_oldest() {
            dropped += 1;
        }
        // Removed entries leave their place in `order` behind (a label usually comes within
        // seconds, the horizon is a day): drop them once they are most of it, amortized O(1).
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|(k, t)| map.get(k).is_some_and(|(_, at)| at == t));
        }
        self.order.push_back((key.clone(), now));
        self.map.insert(key, (value, now));
        self.bytes += cost;
        dropped
    }

    fn remove(&mut self, key: &Key) -> Option<V> {
        let (value, _) = self.map.remove(key)?;
        self.bytes -= Self::cost(key);
        Some(value)
    }

    /// Drops the oldest live entry; false when there is none.
    fn pop_oldest(&mut self) -> bool {
        while let Some((k, t)) = self.order.pop_front() {
            if self.map.get(&k).is_some_and(|(_, at)| *at == t) {
                self.remove(&k);
                return true;
            }
        }
        false
    }

    /// Drops entries older than `age`; returns how many.
    fn expire(&mut self, now: Instant, age: Duration) -> u64 {
        let mut dropped = 0;
        while let Some((k, t)) = self.order.front() {
            if now.duration_since(*t) <= age {
                break;
            }
            if self.map.get(k).is_some_and(|(_, at)| at == t) {
                let k = k.clone();
                self.remove(&k);
                dropped += 1;
            }
            self.order.pop_front();
        }
        dropped
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

pub struct Performance {
    /// The class shares of the serving model's validation targets, and which version they
    /// belong to: the reference for label shift.
    baseline_shares: Vec<f64>,
    baseline_version: u64,
    /// Classes of the labels in the rolling window (classifiers), and their counts.
    classes: VecDeque<usize>,
    class_counts: Vec<u64>,
    shift_alarm: bool,
    horizon: Duration,
    window: usize,
    /// Predictions waiting for their labels, for up to `horizon`.
    pending: Expiring<Served>,
    /// Labels waiting for their predictions (the truth), for up to `EARLY_WAIT`.
    early: Expiring<f64>,
    /// Per model version: labels joined to its predictions, and their summed loss (the
    /// trial judges a new version on its own predictions only).
    by_version: std::collections::BTreeMap<u64, (u64, f64)>,
    /// While a challenger shadows the champion: losses of both on the same labeled rows.
    pub paired: Option<Paired>,
    losses: VecDeque<f64>,
    sum: f64,
    adwin: Adwin,
    ph: PageHinkley,
    alarm: bool,
    joined: u64,
    /// Labels with no prediction to join (too late, unknown key, none within `EARLY_WAIT`)
    /// or not a number.
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
            horizon,
            window: window.max(MIN_LABELS),
            pending: Expiring::new(PENDING_BYTES),
            early: Expiring::new(EARLY_BYTES),
            by_version: Default::default(),
            paired: None,
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
                since_change: 0,
                raised: raise,
                measures: None,
            });
        }
    }

    /// Remembers a served prediction, or scores it at once when its label came first;
    /// appends the alarms that raises or clears.
    pub fn predicted(&mut self, device: Arc<str>, key: String, served: Served, now: Instant, alarms: &mut Vec<Alarm>) {
        self.expire(now);
        let key = (device, key);
        match self.early.remove(&key) {
            Some(truth) => self.score(served, truth, alarms),
            None => {
                self.pending.insert(key, served, now);
            }
        }
    }

    /// Joins a label to its prediction, or keeps it briefly when the prediction is not
    /// registered yet; appends the alarms raised or cleared (performance, label shift).
    pub fn label(&mut self, device: &str, key: String, truth: f64, now: Instant, alarms: &mut Vec<Alarm>) {
        self.expire(now);
        let key = (Arc::from(device), key);
        match self.pending.remove(&key) {
            Some(prediction) => self.score(prediction, truth, alarms),
            None => self.unmatched += self.early.insert(key, truth, now),
        }
    }

    /// Labels joined to `version`'s own predictions, and their mean loss.
    pub fn live_loss(&self, version: u64) -> (u64, f64) {
        self.by_version.get(&version).map_or((0, f64::NAN), |&(n, sum)| (n, sum / n.max(1) as f64))
    }

    fn expire(&mut self, now: Instant) {
        self.pending.expire(now, self.horizon);
        self.unmatched += self.early.expire(now, EARLY_WAIT);
    }

    pub fn joined(&self) -> u64 {
        self.joined
    }

    /// Predictions waiting for a label, and labels waiting for a prediction.
    pub fn waiting(&self) -> (usize, usize) {
        (self.pending.len(), self.early.len())
    }

    /// The rolling per-sample loss over the last `window` labels.
    pub fn rolling_loss(&self) -> f64 {
        if self.losses.is_empty() {
            f64::NAN
        } else {
            self.sum / self.losses.len() as f64
        }
    }

    /// Scores one labeled prediction: live loss per version, the champion/challenger pair,
    /// the detectors, and label shift.
    fn score(&mut self, served: Served, truth: f64, alarms: &mut Vec<Alarm>) {
        let Served { p, version, baseline, shadow } = served;
        let loss = loss_of(p, truth);
        if !loss.is_finite() {
            self.unmatched += 1;
            return;
        }
        let v = self.by_version.entry(version).or_default();
        v.0 += 1;
        v.1 += loss;
        while self.by_version.len() > VERSIONS_KEPT {
            self.by_version.pop_first();
        }
        if let (Some(pair), Some(shadow)) = (self.paired.as_mut(), shadow) {
            let shadow_loss = loss_of(shadow, truth);
            if shadow_loss.is_finite() {
                pair.labels += 1;
                pair.champion_loss_sum += loss;
                pair.shadow_loss_sum += shadow_loss;
            }
        }
        self.joined += 1;
        if let Some(alarm) = self.watch_loss(p, baseline, loss) {
            alarms.push(alarm);
        }
        if matches!(p, Predicted::Class(_)) && truth >= 0.0 && truth.fract() == 0.0 {
            self.watch_shift(truth as usize, alarms);
        }
    }

    /// The performance alarm: raised once per episode, cleared when the loss is back.
    fn watch_loss(&mut self, p: Predicted, baseline: f64, loss: f64) -> Option<Alarm> {
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
        let statistic = if !self.alarm && (worse || adwin_change || ph_change) && self.losses.len() >= MIN_LABELS {
            let detector = match (worse, adwin_change) {
                (true, _) => "rolling",
                (false, true) => "adwin",
                (false, false) => "page_hinkley",
            };
            format!("loss ({detector})")
        } else if self.alarm && rolling < baseline + 0.8 * (threshold - baseline) {
            "loss".to_string()
        } else {
            return None;
        };
        self.alarm = !self.alarm;
        // ADWIN's window after its cut holds the rows since the change; a rolling mean
        // over threshold or Page-Hinkley does not say where it began.
        let since_change = if self.alarm && statistic == "loss (adwin)" { self.adwin.width() as u64 } else { 0 };
        Some(Alarm {
            series: "performance".into(),
            statistic,
            value: rolling,
            threshold,
            window: self.losses.len(),
            row: self.joined,
            since_change,
            raised: self.alarm,
            measures: None,
        })
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

    fn class(c: usize) -> Served {
        Served { p: Predicted::Class(c), version: 1, baseline: 0.1, shadow: None }
    }

    #[test]
    fn predictions_labeled_at_once_leave_no_trail_behind() {
        let mut perf = Performance::new(Duration::from_secs(86_400), 200);
        let device: Arc<str> = Arc::from("dev1");
        let now = Instant::now();
        let mut alarms = Vec::new();
        for i in 0..100_000u64 {
            perf.predicted(device.clone(), i.to_string(), class(1), now, &mut alarms);
            perf.label("dev1", i.to_string(), 1.0, now, &mut alarms);
        }
        assert_eq!(perf.waiting(), (0, 0));
        assert!(perf.pending.order.len() <= 1025, "{} entries kept for labeled predictions", perf.pending.order.len());
        assert_eq!(perf.joined(), 100_000);
        // Unlabeled predictions are still remembered until their horizon.
        perf.predicted(device.clone(), "late".into(), class(0), now, &mut alarms);
        for i in 0..5_000u64 {
            perf.predicted(device.clone(), format!("x{i}"), class(1), now, &mut alarms);
            perf.label("dev1", format!("x{i}"), 1.0, now, &mut alarms);
        }
        perf.label("dev1", "late".into(), 0.0, now, &mut alarms);
        assert_eq!(perf.joined(), 105_001, "the late label still joined its prediction");
        assert_eq!(perf.unmatched, 0);
    }

    #[test]
    fn a_label_that_comes_before_its_prediction_is_joined_when_the_prediction_arrives() {
        let mut perf = Performance::new(Duration::from_secs(86_400), 200);
        let device: Arc<str> = Arc::from("dev1");
        let t0 = Instant::now();
        let mut alarms = Vec::new();
        // Labels just ahead of their rows, as a sensor that publishes both at once causes.
        for i in 0..10_000u64 {
            perf.label("dev1", i.to_string(), 1.0, t0, &mut alarms);
            perf.predicted(device.clone(), i.to_string(), class(1), t0, &mut alarms);
        }
        assert_eq!(perf.joined(), 10_000);
        assert_eq!(perf.waiting(), (0, 0), "nothing left waiting");
        assert_eq!(perf.live_loss(1), (10_000, 0.0));
        // A label nobody predicts for waits EARLY_WAIT, then counts as unmatched.
        perf.label("dev1", "nobody".into(), 1.0, t0, &mut alarms);
        assert_eq!((perf.unmatched, perf.waiting()), (0, (0, 1)));
        let later = t0 + EARLY_WAIT + Duration::from_secs(1);
        perf.predicted(device.clone(), "nobody".into(), class(1), later, &mut alarms);
        assert_eq!(perf.unmatched, 1, "the early label expired before its prediction came");
        assert_eq!(perf.joined(), 10_000);
        assert_eq!(perf.waiting(), (1, 0));
    }

    fn big_key(i: u64) -> String {
        format!("{i}{}", "k".repeat(65_536))
    }

    #[test]
    fn long_keys_cannot_make_the_wait_outgrow_its_memory_budget() {
        let mut perf = Performance::new(Duration::from_secs(86_400), 200);
        let device: Arc<str> = Arc::from("dev1");
        let now = Instant::now();
        let mut alarms = Vec::new();
        // 64 KiB keys, never labeled: 2,000 of them would be 256 MiB.
        for i in 0..2_000u64 {
            let key = big_key(i);
            perf.predicted(device.clone(), key.clone(), class(1), now, &mut alarms);
            perf.label("dev2", key, 1.0, now, &mut alarms);
        }
        assert!(perf.pending.bytes <= PENDING_BYTES && perf.early.bytes <= EARLY_BYTES);
        let (pending, early) = perf.waiting();
        assert!((200..=256).contains(&pending), "{pending} predictions kept");
        assert!((20..=32).contains(&early), "{early} labels kept");
        assert_eq!(perf.unmatched, 2_000 - early as u64, "labels pushed out are counted");
        // The newest are the ones kept.
        perf.label("dev1", big_key(1_999), 0.0, now, &mut alarms);
        assert_eq!(perf.joined(), 1);
    }
}
