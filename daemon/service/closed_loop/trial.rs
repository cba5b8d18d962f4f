//! After the gate accepted a challenger: the shadow period, the promotion, the trial on live
//! traffic, and the rollback when the version degrades.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{emit, now_s, Rebase, Stage, State};

/// A promoted version on trial: watched on live traffic until `until`, rolled back to
/// `previous` on a clear degradation.
pub(super) struct Trial {
    pub version: u64,
    pub previous: u64,
    pub until: Instant,
    pub record: Value,
    /// The champion's window (trigger → promotion) and the trial's start.
    pub reference: (Snapshot, Snapshot),
    /// Taken once the warm-up is over.
    pub start: Option<Snapshot>,
    pub promoted: Instant,
    /// The per-sample loss the gate measured for this version on the fresh holdout.
    pub gate_loss: f64,
}
use crate::model::{Bundle, Registry};
use crate::store::Store;
use crate::telemetry::events::{Counters, Events, COMPUTE_BUCKETS_US};

/// Rows a trial needs before output health and latency are judged.
const MIN_TRIAL_ROWS: u64 = 200;
/// A model is not called slow below this median compute per row, whatever the ratio: under
/// CPU contention (a debug build beside other work) a tiny model's median moved 50 → 250 µs.
const MIN_SLOW_COMPUTE_US: u64 = 1_000;
/// Output health and latency are judged from this long after promotion: the swap itself
/// (loading, the drift monitor's calibration) costs a moment that is not the model's speed.
const TRIAL_WARMUP: Duration = Duration::from_secs(3);

/// Counters at a moment, to judge a window between two.
#[derive(Clone)]
pub(super) struct Snapshot {
    predicted: u64,
    nonfinite: u64,
    saturated: u64,
    /// The per-row compute histogram's bucket counts (queueing is the traffic's, not the model's).
    compute: Vec<u64>,
}

impl Snapshot {
    pub(super) fn take(c: &Counters) -> Snapshot {
        let mut compute: Vec<u64> = c.compute.buckets.iter().map(|b| b.load(Relaxed)).collect();
        compute.push(c.compute.over.load(Relaxed));
        Snapshot {
            predicted: c.predicted.load(Relaxed),
            nonfinite: c.outputs_nonfinite.load(Relaxed),
            saturated: c.outputs_saturated.load(Relaxed),
            compute,
        }
    }

    /// (rows, non-finite share, saturated share, median compute µs per row) from `self` to
    /// `later`. The median, not a tail: on a busy machine the tail is the scheduler's.
    fn window(&self, later: &Snapshot) -> (u64, f64, f64, u64) {
        let rows = later.predicted.saturating_sub(self.predicted);
        let share = |a: u64, b: u64| b.saturating_sub(a) as f64 / rows.max(1) as f64;
        let counts: Vec<u64> = later.compute.iter().zip(&self.compute).map(|(l, e)| l.saturating_sub(*e)).collect();
        let total: u64 = counts.iter().sum();
        let mut seen = 0;
        let mut p50 = u64::MAX;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if total > 0 && seen * 2 >= total {
                p50 = COMPUTE_BUCKETS_US.get(i).copied().unwrap_or(u64::MAX);
                break;
            }
        }
        (rows, share(self.nonfinite, later.nonfinite), share(self.saturated, later.saturated), p50)
    }
}

/// The shadow period is over: promote if the challenger did at least as well as the champion
/// on the same labeled rows.
pub(super) fn end_shadow(s: &mut State, store: &Store, registry: &Registry, events: &Events) {
    let Stage::Shadow { challenger, record, before, .. } = std::mem::replace(&mut s.stage, Stage::Idle) else {
        return;
    };
    s.p.shadow.store(None);
    let paired = s.p.performance.as_ref().and_then(|p| p.lock().ok().and_then(|mut p| p.paired.take()));
    let Some(pair) = paired else { return };
    let n = pair.labels.max(1) as f64;
    let (champion, shadow) = (pair.champion_loss_sum / n, pair.shadow_loss_sum / n);
    let detail =
        json!({"run": record, "labels": pair.labels, "champion_live_loss": champion, "challenger_live_loss": shadow});
    if shadow > champion {
        emit(
            events,
            &s.p,
            "shadow.refused",
            format!(
                "Challenger v{} did worse than the champion live ({shadow:.4} vs {champion:.4} loss on {} labels); not promoted",
                challenger.manifest.version, pair.labels
            ),
            detail,
        );
        return;
    }
    emit(
        events,
        &s.p,
        "shadow.passed",
        format!("Challenger live loss {shadow:.4} vs champion {champion:.4} on {} labels", pair.labels),
        detail,
    );
    promote(s, &challenger, record, before, store, registry, events);
}

/// Makes `challenger` the champion (the swapper serves it) and starts its trial; `before` is
/// the counters when its run began, the champion's reference window.
pub(super) fn promote(
    s: &mut State,
    challenger: &Bundle,
    record: Value,
    before: Snapshot,
    store: &Store,
    registry: &Registry,
    events: &Events,
) {
    let m = &challenger.manifest;
    let previous = s.p.model.load().version;
    if let Err(e) = registry.promote(&m.name, m.version) {
        emit(events, &s.p, "promote.failed", format!("cannot promote v{}: {e}", m.version), json!({"run": record}));
        return;
    }
    // The loss the gate measured for it on the fresh holdout (its validation baseline if none).
    let holdout: std::collections::BTreeMap<String, f64> =
        serde_json::from_value(record["gate"]["challenger_holdout"].clone()).unwrap_or_default();
    let implied = |metrics| crate::model::baseline::implied_loss(m.task, metrics);
    let gate_loss = Some(implied(&holdout)).filter(|l| l.is_finite()).unwrap_or_else(|| implied(&m.baseline.metrics));
    let trial = s.p.train.trial;
    let name = s.p.config.name.clone();
    let _ = store.set_meta(&name, "trial_version", m.version);
    let _ = store.set_meta(&name, "trial_previous", previous);
    let _ = store.set_meta(&name, "trial_until_s", now_s() + trial.as_secs());
    let _ = store.set_meta(&name, "trial_pushed", u64::from(record["origin"] == "pushed"));
    crate::service::crash_guard::on_trial(
        registry.state_dir(),
        &m.name,
        m.version,
        previous,
        record["origin"] == "pushed",
    );
    let _ = store.set_meta(&name, "rebase_from", store.stats(&name).map_or(0, |st| st.stored_total));
    emit(
        events,
        &s.p,
        "trial.started",
        format!("Promoted {} v{} (was v{previous}); on trial for {} s", m.name, m.version, trial.as_secs()),
        json!({"run": record, "version": m.version, "previous": previous, "trial_s": trial.as_secs(), "gate_loss": gate_loss}),
    );
    let now = Snapshot::take(&s.p.counters);
    // A challenger still in its shadow was made from the version this one replaces.
    s.p.shadow.store(None);
    s.stage = Stage::Idle;
    s.trial = Some(Trial {
        version: m.version,
        previous,
        until: Instant::now() + trial,
        record,
        reference: (before, now),
        start: None,
        promoted: Instant::now(),
        gate_loss,
    });
}

/// Ends the kept trial, so a restart does not resume it (nor counts against it).
pub(super) fn clear_trial(store: &Store, registry: &Registry, pipeline: &str, model: &str) {
    let _ = store.set_meta(pipeline, "trial_version", 0);
    crate::service::crash_guard::trial_over(registry.state_dir(), model);
}

/// After a restart mid-trial: the trial goes on for the time it had left.
pub(super) fn resume_trial(s: &mut State, store: &Store, registry: &Registry) {
    let name = &s.p.config.name;
    let version = store.meta(name, "trial_version").unwrap_or(0);
    let previous = store.meta(name, "trial_previous").unwrap_or(0);
    let until_s = store.meta(name, "trial_until_s").unwrap_or(0);
    let serving = s.p.model.load();
    // Never longer than a whole trial: a clock set back since the promotion would stretch it,
    // and the loop trains nothing while a trial runs.
    let left = until_s.saturating_sub(now_s()).min(s.p.train.trial.as_secs());
    if version == 0 || serving.version != version || left == 0 {
        return;
    }
    let gate_loss = registry
        .champion(&serving.name)
        .ok()
        .map_or(f64::NAN, |b| crate::model::baseline::implied_loss(b.manifest.task, &b.manifest.baseline.metrics));
    let now = Snapshot::take(&s.p.counters);
    tracing::info!(pipeline = name, "Resuming the trial of v{version} ({left} s left)");
    s.trial = Some(Trial {
        version,
        previous,
        until: Instant::now() + Duration::from_secs(left),
        record: match store.meta(name, "trial_pushed").unwrap_or(0) {
            1 => json!({"resumed": true, "origin": "pushed"}),
            _ => json!({"resumed": true}),
        },
        reference: (now.clone(), now),
        start: None,
        promoted: Instant::now(),
        gate_loss,
    });
}

/// Judges the version on trial; rolls back on the first clear degradation.
pub(super) fn watch_trial(s: &mut State, store: &Store, registry: &Registry, events: &Events) {
    let Some(Trial { version, previous, until, record, reference, start, promoted, gate_loss }) = &mut s.trial else {
        return;
    };
    if start.is_none() && promoted.elapsed() >= TRIAL_WARMUP {
        *start = Some(Snapshot::take(&s.p.counters));
    }
    let gate_loss = *gate_loss;
    let t = &s.p.train;
    let serving = s.p.model.load();
    if serving.version != *version && registry.champion_version(&serving.name).ok().flatten() != Some(*version) {
        // Someone else (a person, an update) changed the champion: the trial is theirs to end.
        clear_trial(store, registry, &s.p.config.name, &serving.name);
        s.trial = None;
        return;
    }
    let now = Snapshot::take(&s.p.counters);
    let (rows, nonfinite, saturated, p50) = start.as_ref().map_or((0, 0.0, 0.0, 0), |s| s.window(&now));
    let (ref_rows, _, ref_saturated, ref_p50) = reference.0.window(&reference.1);
    let (labels, live_loss) =
        s.p.performance.as_ref().and_then(|p| p.lock().ok().map(|p| p.live_loss(*version))).unwrap_or((0, f64::NAN));
    // The labels are the most direct evidence, so they are judged first.
    let mut failure = None;
    if labels >= t.min_live_labels as u64 && gate_loss.is_finite() {
        // Sampling noise of a mean of n 0/1 losses (or absolute errors) around the gate's number.
        let spread = (gate_loss.max(1e-3) * (1.0 - gate_loss).max(1e-3) / labels as f64).sqrt();
        let limit = gate_loss + t.max_loss_increase + 3.0 * spread;
        if live_loss > limit {
            failure = Some(format!(
                "live loss {live_loss:.4} on {labels} labels vs {gate_loss:.4} on the gate's holdout (limit {limit:.4})"
            ));
        }
    }
    if failure.is_none() && rows >= MIN_TRIAL_ROWS {
        if nonfinite > t.max_nonfinite {
            failure = Some(format!(
                "{:.2} % of outputs are not finite (at most {:.2} %)",
                nonfinite * 100.0,
                t.max_nonfinite * 100.0
            ));
        } else if ref_rows >= MIN_TRIAL_ROWS && saturated > ref_saturated + t.max_saturated_increase {
            failure = Some(format!(
                "{:.1} % of outputs are saturated (the champion had {:.1} %)",
                saturated * 100.0,
                ref_saturated * 100.0
            ));
        } else if ref_rows >= MIN_TRIAL_ROWS
            && p50 > MIN_SLOW_COMPUTE_US
            && p50 != u64::MAX
            && p50 as f64 > ref_p50 as f64 * (1.0 + t.max_latency_increase)
        {
            failure = Some(format!("median compute {p50} µs per row vs {ref_p50} µs before promotion"));
        }
    }
    let detail = json!({
        "run": record, "name": serving.name, "version": version, "rows": rows, "labels": labels, "live_loss": live_loss,
        "gate_loss": gate_loss, "nonfinite_share": nonfinite, "saturated_share": saturated, "compute_p50_us": p50,
    });
    let name = serving.name.clone();
    let pipeline = s.p.config.name.clone();
    if let Some(why) = failure {
        let (version, previous) = (*version, *previous);
        let back = registry.rollback(&name);
        clear_trial(store, registry, &pipeline, &name);
        s.trial = None;
        // A pushed version stays offered (retained): remember that it failed here.
        if detail["run"]["origin"] == "pushed" {
            let _ = crate::trust::floor::Floor::new(registry.state_dir()).failed_trial(&name, version);
        }
        match back {
            Ok((_, to)) if to == previous => emit(
                events,
                &s.p,
                "trial.failed",
                format!("{name} v{version} degraded on trial: {why}; rolled back to v{previous}"),
                detail,
            ),
            Ok((_, to)) => emit(
                events,
                &s.p,
                "trial.failed",
                format!("{name} v{version} degraded on trial: {why}; rolled back to v{to} (the registry's previous)"),
                detail,
            ),
            Err(e) => emit(
                events,
                &s.p,
                "trial.failed",
                format!("v{version} degraded ({why}) but rollback failed: {e}"),
                detail,
            ),
        }
    } else if Instant::now() >= *until {
        let version = *version;
        clear_trial(store, registry, &pipeline, &name);
        s.trial = None;
        emit(events, &s.p, "trial.passed", format!("{name} v{version} passed its trial"), detail);
        // Only a fine-tuned version carries a reference that is not its own (its parent's
        // validation set); a pushed one brings the validation set it was made with.
        if serving.origin == "fine-tuned" && s.p.config.drift.as_ref().is_some_and(|d| d.rebase_rows > 0) {
            let _ = store.set_meta(&pipeline, "rebase_version", version);
            s.rebase = Some(Rebase { version, from: store.meta(&pipeline, "rebase_from").unwrap_or(0) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::closed_loop::test_support::{events, state};

    /// A trial fed `degrade` after a healthy champion window; returns whether it rolled back.
    fn trial_rolls_back(name: &str, degrade: impl Fn(&Counters)) -> bool {
        let (mut s, store) = state(name, "trigger = []\n");
        let dir = store.settings().path.parent().unwrap().to_path_buf();
        let registry = Registry::new(&dir);
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shuttle-mlp-1.lathe");
        let v1 = registry.seed(&model).unwrap();
        registry.add(&v1.clone().with_version(2).unwrap()).unwrap();
        registry.promote("shuttle-mlp", 2).unwrap();
        let (events, _reporter) = events();
        let c = s.p.counters.clone();
        let before = Snapshot::take(&c);
        // The champion's window: 1,000 rows, healthy, 50 µs per row.
        c.predicted.fetch_add(1_000, Relaxed);
        for _ in 0..100 {
            c.compute.observe(&COMPUTE_BUCKETS_US, 50);
        }
        s.trial = Some(Trial {
            version: 2,
            previous: 1,
            until: Instant::now() + Duration::from_secs(600),
            record: json!({}),
            reference: (before, Snapshot::take(&c)),
            start: None,
            promoted: Instant::now() - Duration::from_secs(10),
            gate_loss: 0.01,
        });
        watch_trial(&mut s, &store, &registry, &events);
        assert!(s.trial.is_some(), "nothing served on trial yet");
        c.predicted.fetch_add(500, Relaxed);
        degrade(&c);
        watch_trial(&mut s, &store, &registry, &events);
        let rolled_back = s.trial.is_none();
        if rolled_back {
            assert_eq!(registry.champion_version("shuttle-mlp").unwrap(), Some(1));
            assert_eq!(store.meta("p", "trial_version").unwrap(), 0, "the trial is over");
        }
        rolled_back
    }

    #[test]
    fn a_version_on_trial_is_rolled_back_on_bad_outputs_or_slowness_and_kept_otherwise() {
        // 1 % non-finite (0.1 % allowed); 60 % saturated (the champion had none).
        assert!(trial_rolls_back("nonfinite", |c| {
            c.outputs_nonfinite.fetch_add(5, Relaxed);
        }));
        assert!(trial_rolls_back("saturated", |c| {
            c.outputs_saturated.fetch_add(300, Relaxed);
        }));
        // 5 ms per row against 50 µs.
        assert!(trial_rolls_back("slow", |c| (0..100).for_each(|_| c.compute.observe(&COMPUTE_BUCKETS_US, 5_000))));
        // Healthy, as fast as before: kept on trial.
        assert!(!trial_rolls_back("healthy", |c| (0..100).for_each(|_| c.compute.observe(&COMPUTE_BUCKETS_US, 50))));
        // Slower but under 1 ms per row (a busy machine): kept.
        assert!(!trial_rolls_back("busy", |c| (0..100).for_each(|_| c.compute.observe(&COMPUTE_BUCKETS_US, 400))));
    }

    /// A trial resumed after a restart goes on for the time it had left, and never for longer
    /// than a whole trial, even when the clock went back since the promotion.
    #[test]
    fn a_resumed_trial_keeps_its_time_left_and_never_outlasts_its_length() {
        let resumed_for = |name: &str, until_s: u64| {
            let (mut s, store) = state(name, "trigger = []\ntrial = \"10m\"\n");
            let registry = Registry::new(store.settings().path.parent().unwrap());
            let version = s.p.model.load().version;
            store.set_meta("p", "trial_version", version).unwrap();
            store.set_meta("p", "trial_until_s", until_s).unwrap();
            resume_trial(&mut s, &store, &registry);
            s.trial.map(|t| t.until.saturating_duration_since(Instant::now()).as_secs())
        };
        let left = resumed_for("resume-left", now_s() + 100).unwrap();
        assert!((95..=100).contains(&left), "{left} s");
        let left = resumed_for("resume-clock", now_s() + 365 * 86_400).unwrap();
        assert!((595..=600).contains(&left), "a year ahead: the trial's 600 s, not {left} s");
        assert_eq!(resumed_for("resume-over", now_s().saturating_sub(1)), None, "over: not resumed");
    }
}
