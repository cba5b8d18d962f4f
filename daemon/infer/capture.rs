//! Hard-example capture (`[pipeline.capture]`): the rows a person should label, sent where a
//! labelling tool can take them. Every `every` (1 minute by default) the pipeline publishes,
//! at QoS 1 on `lathe/{node}/capture/{pipeline}`, the `rows` (10) hardest rows it served in
//! that window, hardest first:
//!
//! - a classifier's rows with the smallest margin (top probability minus the next; for one
//!   output, twice its distance from the threshold), under `max_margin` (0.2);
//! - an autoencoder's rows with the largest reconstruction error, at least `min_error_ratio`
//!   (1.0) times its threshold;
//! - any row on which a shadowing challenger predicts another class than the champion
//!   (ranked above every margin: the two models disagree about it);
//! - with `drift = true`, only rows served while a drift alarm is raised.
//!
//! So at most `rows` per window leave the device, whatever the traffic, and they are the
//! hardest of the window rather than the first that qualified. The label a tool sends back
//! on the pipeline's `labels.topic` (with the row's key) joins the stored row as any label
//! does, and the next fine-tune learns from it. A window's rows go out with the first batch
//! served after it ends.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};

use super::config::CaptureConfig;
use super::{ActiveModel, Outputs, Sample};
use crate::model::Task;

/// One candidate: how hard (lower is harder) and the message that would carry it.
struct Candidate {
    hardness: f64,
    message: Value,
}

/// The window being filled.
pub struct Capture {
    config: CaptureConfig,
    started: Option<Instant>,
    best: Vec<Candidate>,
    /// Rows judged and rows sent, for the status.
    pub seen: u64,
    pub sent: u64,
}

/// How hard a row is, and why, when it qualifies (lower is harder).
fn hardness(model: &ActiveModel, output: &[f32], input: &[f32], config: &CaptureConfig) -> Option<(f64, String)> {
    match model.reading.task {
        Task::Binary | Task::Multiclass => {
            let margin = if output.len() == 1 {
                2.0 * (f64::from(output[0]) - model.reading.threshold.unwrap_or(0.5)).abs()
            } else {
                let mut sorted: Vec<f64> = output.iter().map(|&v| f64::from(v)).collect();
                sorted.sort_by(|a, b| b.total_cmp(a));
                sorted[0] - sorted.get(1).copied().unwrap_or(0.0)
            };
            (margin.is_finite() && margin <= config.max_margin).then(|| (margin, format!("margin {margin:.4}")))
        }
        Task::Reconstruction => {
            let error = model.reading.score(output, input);
            let threshold = model.reading.threshold.filter(|t| *t > 0.0)?;
            let ratio = error / threshold;
            (ratio.is_finite() && ratio >= config.min_error_ratio).then(|| {
                (-ratio, format!("reconstruction error {error:.4} ({ratio:.2}× the threshold {threshold:.4})"))
            })
        }
        Task::Regression => None,
    }
}

impl Capture {
    pub fn new(config: CaptureConfig) -> Capture {
        Capture { config, started: None, best: Vec::new(), seen: 0, sent: 0 }
    }

    /// Judges a served batch; returns the window's messages once it has ended.
    #[allow(clippy::too_many_arguments)]
    pub fn offer(
        &mut self,
        pipeline: &str,
        model: &ActiveModel,
        batch: &[Sample],
        rows: &[f32],
        out: &Outputs,
        shadow: Option<&(std::sync::Arc<ActiveModel>, Outputs)>,
        drifting: bool,
    ) -> Vec<Value> {
        let now = Instant::now();
        let ended = self.started.is_some_and(|s| now.duration_since(s) >= self.config.every);
        let done = if ended { self.take() } else { Vec::new() };
        if self.started.is_none() || ended {
            self.started = Some(now);
        }
        if self.config.drift_only && !drifting {
            return done;
        }
        let f = model.engine.signature.features;
        for (r, s) in batch.iter().enumerate() {
            self.seen += 1;
            let output = out.row(model.primary_output, r);
            let input = &rows[r * f..(r + 1) * f];
            let disagreement = shadow.and_then(|(m, o)| {
                let theirs = m.reading.class(o.row(m.primary_output, r))?;
                let ours = model.reading.class(output)?;
                (theirs != ours)
                    .then(|| (-1e9, format!("the shadow v{} says class {theirs}, the champion {ours}", m.version)))
            });
            let Some((hard, why)) = disagreement.or_else(|| hardness(model, output, input, &self.config)) else {
                continue;
            };
            if self.best.len() >= self.config.rows && self.best.last().is_some_and(|w| w.hardness <= hard) {
                continue;
            }
            let features: BTreeMap<&str, f32> = model.extractor.names().zip(input.iter().copied()).collect();
            let message = json!({
                "pipeline": pipeline, "device": &*s.device, "key": s.key, "ts": s.ts,
                "model": model.name, "version": model.version, "inputs": features, "output": output,
                "why": why, "hardness": hard,
            });
            let at = self.best.partition_point(|c| c.hardness <= hard);
            self.best.insert(at, Candidate { hardness: hard, message });
            self.best.truncate(self.config.rows);
        }
        done
    }

    fn take(&mut self) -> Vec<Value> {
        let out: Vec<Value> = self.best.drain(..).map(|c| c.message).collect();
        self.sent += out.len() as u64;
        out
    }
}
