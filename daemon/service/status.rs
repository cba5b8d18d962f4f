//! The retained status, devices gone silent, and the one-line summary in the log.

use serde_json::{json, Value};

use crate::config::Config;

use crate::telemetry::{events, unix_ms};

use super::*;

pub(super) fn status(config: &Config, state: &str, serving: &[Serving]) -> Value {
    let pipelines: Vec<Value> = serving
        .iter()
        .map(|s| {
            let m = s.model.load();
            let performance = s.performance.as_ref().and_then(|p| p.lock().ok()).map(|p| {
                let (predictions_waiting, labels_waiting) = p.waiting();
                json!({"alarm": p.in_alarm(), "labels_joined": p.joined(), "labels_unmatched": p.unmatched,
                       "predictions_waiting": predictions_waiting, "labels_waiting": labels_waiting,
                       "rolling_loss": p.rolling_loss(), "baseline_loss": m.baseline_loss,
                       "label_shift_psi": p.label_shift(), "label_shift_alarm": p.shift_in_alarm()})
            });
            let monitor = m.monitor.as_ref().and_then(|d| d.get()).and_then(|d| d.lock().ok());
            let drift = match monitor.map(|d| (d.state(), json!({"rows": d.reference_rows(), "source": d.source}))) {
                Some((series, reference)) => {
                    let mut alarms: Vec<&str> = series.iter().filter(|s| s.alarm).map(|s| s.series.as_str()).collect();
                    if performance.as_ref().is_some_and(|p| p["alarm"] == true) {
                        alarms.push("performance");
                    }
                    if performance.as_ref().is_some_and(|p| p["label_shift_alarm"] == true) {
                        alarms.push("labels");
                    }
                    json!({"alarms": alarms, "series": series, "reference": reference, "performance": performance})
                }
                None => json!({"performance": performance}),
            };
            let store = s.store.as_ref().and_then(|st| st.stats(&s.pipeline).ok());
            let sparkplug = s.source.sparkplug.as_ref().and_then(|sp| sp.lock().ok().map(|sp| sp.status()));
            let devices = s.source.activity.as_ref().and_then(|a| a.lock().ok().map(|a| a.status(50)));
            // The training backend this pipeline's runs use (none: it does not train).
            let backend = config
                .pipelines
                .iter()
                .find(|p| p.name == s.pipeline)
                .and_then(|p| p.train.as_ref())
                .map(|t| crate::train::resolved_backend(&t.backend));
            json!({
                "name": s.pipeline, "model": m.name, "version": m.version, "sha256": m.sha256,
                "origin": m.origin, "engine": config.infer.engine.name(), "backend": backend, "drift": drift, "counters": s.counters.snapshot(),
                "store": store, "sparkplug": sparkplug, "devices": devices,
            })
        })
        .collect();
    json!({
        "state": state, "node": config.node, "daemon_version": env!("CARGO_PKG_VERSION"),
        "ts": unix_ms(), "pipelines": pipelines,
        "groups": config.update.as_ref().map(|u| u.groups.clone()).unwrap_or_default(),
    })
}

/// `device.silent` for each device that has now gone quiet for its source's `silent_after_s`
/// (once; `device.back` comes from ingest when it speaks again).
pub(super) fn report_silent_devices(serving: &[Serving], events: &events::Events) {
    let now = std::time::Instant::now();
    for s in serving {
        let Some(activity) = &s.source.activity else { continue };
        let silent = activity.lock().map(|mut a| a.newly_silent(now)).unwrap_or_default();
        for (device, quiet) in silent {
            events.emit(events::Event::Step {
                pipeline: s.pipeline.clone(),
                step: "device.silent",
                message: format!("Device {device} has not been heard for {} s", quiet.as_secs()),
                detail: json!({"device": device, "silent_s": quiet.as_secs()}),
            });
        }
    }
}

/// One line for `systemctl status`: what each pipeline serves and how that goes, e.g.
/// `Serving pump: pump-anomaly v3 (5120 rows in, 5001 predicted, 119 rejected, most
/// missing_feature; drift alarm on temp)`.
pub(super) fn status_line(serving: &[Serving]) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let parts: Vec<String> = serving
        .iter()
        .map(|s| {
            let m = s.model.load();
            let c = &s.counters;
            let mut line = format!(
                "{}: {} v{} ({} rows in, {} predicted",
                s.pipeline,
                m.name,
                m.version,
                c.received.load(Relaxed),
                c.predicted.load(Relaxed)
            );
            let rejected: Vec<u64> = c.rejected.iter().map(|n| n.load(Relaxed)).collect();
            let most = rejected.iter().zip(crate::ingest::Reject::REASONS).max_by_key(|(n, _)| **n);
            if let Some((_, reason)) = most.filter(|(n, _)| **n > 0) {
                line += &format!(", {} rejected, most {reason}", rejected.iter().sum::<u64>());
            }
            line.push(')');
            let monitor = m.monitor.as_ref().and_then(|d| d.get()).and_then(|d| d.lock().ok());
            let alarms: Vec<String> = monitor
                .map(|d| d.state())
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s.alarm)
                .map(|s| s.series)
                .collect();
            if !alarms.is_empty() {
                line += &format!("; drift alarm on {}", alarms.join(", "));
            }
            let activity = s.source.activity.as_ref().and_then(|a| a.lock().ok().map(|a| a.counts()));
            if let Some((heard, silent)) = activity.filter(|(_, silent)| *silent > 0) {
                line += &format!("; {silent} of {heard} devices silent");
            }
            line
        })
        .collect();
    format!("Serving {}", parts.join("; "))
}
