//! Training data from a CSV: rows checked against the manifest exactly as live messages are
//! (a row the daemon would reject is not trained on), counted by reason, kept in file order —
//! which is time order — so the newest rows can be held out.
//!
//! A sequence model's sample is a window of its last N accepted frames, oldest first, as the
//! daemon serves it: the CSV lists consecutive frames, each line's target belongs to the window
//! that ends on it, and the first N − 1 accepted lines only fill the first window. With a
//! device column, each device has its own window, as in the daemon.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::model::csv::{class_indices, comma_separated, parse_csv, text_column};
use crate::model::manifest::{Manifest, Task};
use crate::train::TrainError;

pub struct Dataset {
    /// Samples in model order, row-major: a row of features, or a sequence model's window of
    /// frames (oldest first).
    pub x: Vec<f32>,
    /// Target per sample (class index or value); empty for reconstruction.
    pub y: Vec<f64>,
    pub rows: usize,
    /// Values per sample: the features, times the window for a sequence model.
    pub features: usize,
    /// Rows dropped, by reason (`non_numeric`, `non_finite`, `out_of_range`, `bad_target`).
    pub dropped: BTreeMap<String, usize>,
}

/// Why live input would reject `x` (a frame, or a window of frames), if it would.
fn input_fault(manifest: &Manifest, x: &[f64]) -> Option<&'static str> {
    let f = manifest.inputs.len();
    if f == 0 || !x.len().is_multiple_of(f) {
        return Some("width");
    }
    x.iter().zip(manifest.inputs.iter().cycle()).find_map(|(&v, input)| {
        if v.is_nan() {
            Some("non_numeric")
        } else if !v.is_finite() {
            Some("non_finite")
        } else if v < input.min || v > input.max {
            Some("out_of_range")
        } else {
            None
        }
    })
}

impl Dataset {
    /// An empty dataset of `manifest`'s samples.
    pub fn for_model(manifest: &Manifest) -> Dataset {
        let features = manifest.inputs.len() * manifest.window.max(1);
        Dataset { x: Vec::new(), y: Vec::new(), rows: 0, features, dropped: BTreeMap::new() }
    }

    /// Adds one sample checked as live input is (and its target, `None` for reconstruction),
    /// or counts why it was dropped.
    pub fn push(&mut self, manifest: &Manifest, classes: usize, x: &[f64], target: Option<f64>) {
        let reason = if x.len() != self.features { Some("width") } else { input_fault(manifest, x) };
        let reason = reason.or_else(|| {
            let bad = match (manifest.task, target) {
                (Task::Reconstruction, _) => false,
                (_, None) => true,
                (Task::Binary | Task::Multiclass, Some(t)) => {
                    !(t >= 0.0 && t.fract() == 0.0 && (t as usize) < classes.max(2))
                }
                (_, Some(t)) => !t.is_finite(),
            };
            bad.then_some("bad_target")
        });
        if let Some(reason) = reason {
            *self.dropped.entry(reason.to_string()).or_default() += 1;
            return;
        }
        self.x.extend(x.iter().map(|&v| v as f32));
        if manifest.task != Task::Reconstruction {
            self.y.extend(target);
        }
        self.rows += 1;
    }

    /// The rows dropped, by reason, as a user reads it: `None` if none were.
    pub fn dropped_note(&self) -> Option<String> {
        let total: usize = self.dropped.values().sum();
        let reasons: Vec<String> = self.dropped.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        (total > 0).then(|| {
            format!(
                "{total} rows dropped ({}): a row the daemon would reject, or one without a valid target, is not trained on (`lathe bundle inspect` shows the valid ranges)",
                reasons.join(", ")
            )
        })
    }

    /// `error` (too few rows, usually) with the note of the rows dropped, which is often why.
    pub fn with_dropped_note(&self, error: TrainError) -> TrainError {
        match (error, self.dropped_note()) {
            (TrainError::Data(e), Some(note)) => TrainError::Data(format!("{e}; {note}")),
            (e, _) => e,
        }
    }
}

/// Reads `csv` for a model with `classes` output classes (0 for regression/reconstruction).
///
/// # Errors
/// A CSV that cannot be parsed or lacks a feature or target column.
pub fn load(manifest: &Manifest, csv: &str, classes: usize) -> Result<Dataset, TrainError> {
    load_by_device(manifest, csv, classes, None)
}

/// [`load`], with a sequence model's windows kept per value of `device_column` (frames of
/// several devices, interleaved in time order).
///
/// # Errors
/// As [`load`], a missing device column, or one given for a model that takes single frames.
pub fn load_by_device(
    manifest: &Manifest,
    csv: &str,
    classes: usize,
    device_column: Option<&str>,
) -> Result<Dataset, TrainError> {
    let devices = match device_column {
        Some(name) if manifest.window > 1 => Some(text_column(&comma_separated(csv)?, name)?),
        Some(name) => {
            return Err(TrainError::Data(format!(
                "a device column ({name:?}) is for sequence models; {} takes one frame per sample",
                manifest.name
            )))
        }
        None => None,
    };
    // A classifier trained on class names reads them as their indices, as `bundle create` did.
    let named;
    let csv = if manifest.classes.is_empty() {
        csv
    } else {
        named = class_indices(&comma_separated(csv)?, &manifest.target, &manifest.classes)?;
        named.as_str()
    };
    let table = parse_csv(csv)?;
    let cols: Vec<usize> = manifest.inputs.iter().map(|i| table.column(&i.name)).collect::<Result<_, _>>()?;
    let target = match manifest.task {
        Task::Reconstruction => None,
        _ => Some(table.column(&manifest.target)?),
    };
    let mut data = Dataset::for_model(manifest);
    let mut x = Vec::with_capacity(cols.len());
    // A sequence model's last accepted frames, per device, as the daemon keeps them.
    let mut windows: HashMap<&str, VecDeque<f64>> = HashMap::new();
    let mut sample = Vec::with_capacity(data.features);
    for (i, row) in table.rows.iter().enumerate() {
        x.clear();
        x.extend(cols.iter().map(|&c| row[c]));
        let target = target.map(|t| row[t]);
        if manifest.window <= 1 {
            data.push(manifest, classes, &x, target);
            continue;
        }
        // A frame live input would reject never enters a window; one with a bad target does
        // (the daemon serves it), it only ends no sample.
        if let Some(reason) = input_fault(manifest, &x) {
            *data.dropped.entry(reason.to_string()).or_default() += 1;
            continue;
        }
        let device = devices.as_ref().and_then(|d| d.get(i)).map_or("", String::as_str);
        let window = windows.entry(device).or_default();
        window.extend(&x);
        while window.len() > data.features {
            window.pop_front();
        }
        if window.len() == data.features {
            sample.clear();
            sample.extend(&*window);
            data.push(manifest, classes, &sample, target);
        }
    }
    Ok(data)
}

/// Row ranges of a time-ordered split: `[train | early stopping | holdout]`. The newest
/// `holdout` fraction is the gate's fresh holdout; the 10 % before it decides early stopping,
/// so the gate judges on rows no training decision has seen.
pub struct Split {
    pub train: std::ops::Range<usize>,
    pub early_stop: std::ops::Range<usize>,
    pub holdout: std::ops::Range<usize>,
}

/// # Errors
/// Too few rows to train, stop and judge on.
pub fn split(rows: usize, holdout: f64) -> Result<Split, TrainError> {
    if !(0.05..=0.5).contains(&holdout) {
        return Err(TrainError::Model(format!("holdout = {holdout}; expected a fraction from 0.05 to 0.5")));
    }
    let h = ((rows as f64) * holdout).ceil() as usize;
    let rest = rows.saturating_sub(h);
    let e = (rest / 10).max(1);
    let t = rest.saturating_sub(e);
    if t < 20 || h < 10 {
        return Err(TrainError::Data(format!(
            "{rows} usable rows is too few: need at least 20 to train on and 10 to hold out (holdout = {holdout})"
        )));
    }
    Ok(Split { train: 0..t, early_stop: t..t + e, holdout: t + e..rows })
}
