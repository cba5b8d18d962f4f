//! When a run should start: the triggers (drift, schedule, labels), the cooldown and the
//! hours window.

use serde_json::json;

use super::{emit, now_s, Stage, State};
use crate::config::Trigger;
use crate::model::Task;
use crate::store::Store;
use crate::telemetry::events::Events;
use std::time::Instant;

/// A drift alarm raised or ended, as the loop hears of it.
pub struct Alarm {
    /// The model version whose monitor raised it, and the series.
    pub series: (u64, String),
    pub reason: String,
    /// Rows before the alarm where the change is estimated to have begun.
    pub since_change: u64,
    pub raised: bool,
    /// The store's sample count when the alarm was raised, where known; else it is read when
    /// the loop hears of the alarm.
    pub stored: Option<u64>,
}

/// The data after a drift alarm. A drift run trains, stops early and is judged on rows from
/// `from` on only, with older rows kept for the gate's forgetting check: trained on the newest
/// `rows` instead, a run soon after a change learns mostly the old regime, and its early-stopping
/// slice can lie wholly before the change while its holdout lies after it (measured: 700 new
/// rows of 5,000, best epoch 0, refused, and the next run a cooldown later).
#[derive(Debug, Clone, PartialEq)]
pub struct Regime {
    pub reason: String,
    /// The store's sequence number of the first row of the new regime.
    pub from: u64,
    /// Usable rows from `from` on that the next run waits for: `min_rows`, then more after
    /// each run (see [`regime_run_ended`]) up to `rows`. Paced by these rows, a drift run does not wait for the cooldown.
    pub need: u64,
    /// Runs on this regime so far.
    pub runs: u32,
}

/// A drift alarm raised or ended. Raised with no regime open (and no run or shadow under way;
/// a version on trial may be what alarms), it opens one starting where the change is estimated
/// to have begun; a regime whose alarms have all ended before its first run is dropped (it
/// would train on whatever came before).
pub(super) fn drift(s: &mut State, alarm: Alarm, store: &Store, events: &Events) {
    if !s.p.train.triggers.contains(&Trigger::Drift) {
        return;
    }
    // A version's monitor goes with it: alarms of a version no longer serving never end.
    // Forgetting them does not end the regime (the version a drift run made serves it now):
    // only the end of an alarm that is still counted does.
    s.alarms.retain(|(version, _)| *version == alarm.series.0);
    if alarm.raised {
        s.alarms.insert(alarm.series);
        if s.regime.is_none() && matches!(s.stage, Stage::Idle) {
            let stored = alarm.stored.unwrap_or_else(|| store.stats(&s.p.config.name).map_or(0, |st| st.stored_total));
            s.regime = Some(Regime {
                reason: alarm.reason,
                from: stored.saturating_sub(alarm.since_change),
                need: s.p.train.min_rows as u64,
                runs: 0,
            });
        }
        return;
    }
    if !s.alarms.remove(&alarm.series) || !s.alarms.is_empty() {
        return;
    }
    let Some(regime) = s.regime.take() else { return };
    let new = regime_rows(s, store, &regime);
    let message = if regime.runs == 0 {
        format!(
            "{} ended after {new} rows of the new regime, before min_rows = {}: not fine-tuning",
            regime.reason, s.p.train.min_rows
        )
    } else {
        format!("{} ended after {} runs on the new regime: no more drift runs", regime.reason, regime.runs)
    };
    emit(
        events,
        &s.p,
        "train.skipped",
        message,
        json!({"reason": regime.reason, "rows": new, "min_rows": s.p.train.min_rows}),
    );
}

/// Usable rows of `regime` in the store (counted up to `regime.need`).
pub(super) fn regime_rows(s: &State, store: &Store, regime: &Regime) -> u64 {
    let pipeline = &s.p.config.name;
    let stored = store.stats(pipeline).map_or(0, |st| st.stored_total);
    // Cheap first: the rows stored since bound the usable ones.
    let bound = stored.saturating_sub(regime.from);
    if bound < regime.need || s.p.model.load().reading.task == Task::Reconstruction {
        return bound;
    }
    store.count_since(pipeline, regime.from, regime.need, |r| r.label.is_some()).unwrap_or(0)
}

/// A regime run ended; `unseen` is the store's first sample it could not see.
///
/// Refused (or failed): the next waits for twice the rows. It had too few to beat the
/// champion, and doubling keeps a regime with nothing to learn (label noise, a harmless shift)
/// to a handful of runs, each one more chance for the gate to be fooled. Once a refused run
/// has had `rows` of them the regime is as learned as this pipeline's settings allow, and the
/// other triggers (and the cooldown) take over.
///
/// Accepted: the regime goes on from `unseen`, at `min_rows` again. The new version may have
/// learned only the start of a change that goes on (a gradual drift), and what it has not
/// learned is in the rows it never saw. Measured on a ramp: the version that learned its first
/// 2,000 rows served the rest at F1 0.72; a next run on all of the regime's rows (at 1.5× or 2×
/// the rows) mostly repeated what it had learned, stopped at epoch 0 and was refused, or came
/// too late. The rows before `unseen` then serve the forgetting check, like the old regime's.
pub(super) fn regime_run_ended(s: &mut State, accepted: bool, unseen: u64) -> Option<String> {
    let (rows, min_rows) = (s.p.train.rows as u64, s.p.train.min_rows as u64);
    let regime = s.regime.as_mut()?;
    regime.runs += 1;
    if accepted {
        regime.from = regime.from.max(unseen);
        regime.need = min_rows;
        return Some(format!(
            "the next run waits for {min_rows} rows the new version never saw (from sample {})",
            regime.from
        ));
    }
    if regime.need >= rows {
        s.regime = None;
        return Some(format!("{rows} rows of the new regime made no better model: the champion stays"));
    }
    regime.need = (regime.need * 2).min(rows);
    Some(format!("the next run waits for {} rows of the new regime", regime.need))
}

/// Rows the pipeline could train on, ever: labels joined (supervised) or samples stored
/// (reconstruction).
pub(super) fn usable_rows(s: &State, store: &Store) -> u64 {
    let stats = store.stats(&s.p.config.name).unwrap_or_default();
    match s.p.model.load().reading.task {
        Task::Reconstruction => stats.stored_total,
        _ => stats.labeled_total,
    }
}

/// Usable rows a cold-start pipeline waits for before its next run: `min_rows`, doubled
/// after each refused run (kept in the store's meta, so a restart does not forget it).
pub(super) fn cold_start_need(s: &State, store: &Store) -> u64 {
    let min_rows = match &s.p.config.model {
        crate::config::ModelRef::ColdStart(c) => c.spec.min_rows,
        _ => s.p.train.min_rows,
    };
    store.meta(&s.p.config.name, "cold_start_need").ok().filter(|&n| n > 0).unwrap_or(min_rows as u64)
}

/// A pipeline still on its cold-start placeholder runs as soon as it has the rows it waits
/// for, whatever the cooldown and the other triggers: until then it serves nothing.
fn cold_start(s: &State, store: &Store) -> Option<Due> {
    let (usable, need) = (usable_rows(s, store), cold_start_need(s, store));
    (usable >= need).then(|| Due { reason: format!("cold start: {usable} usable rows (waits for {need})"), from: None })
}

/// How far in the future a stored date may lie before the clock is taken to have gone back.
const CLOCK_SLACK_S: u64 = 60;

/// A run to start now: why, and (a drift run) where its new regime begins.
#[derive(Debug, PartialEq)]
pub(super) struct Due {
    pub reason: String,
    pub from: Option<u64>,
}

impl Due {
    fn because(reason: String) -> Option<Due> {
        Some(Due { reason, from: None })
    }
}

/// Whether a run should start now, and why.
pub(super) fn due(s: &mut State, store: &Store) -> Option<Due> {
    let t = &s.p.train;
    let now = Instant::now();
    if s.retry_at.is_some_and(|at| now < at) {
        return None;
    }
    let wall = now_s();
    if t.hours.is_some_and(|h| !h.contains(wall)) {
        return None;
    }
    if let Some(reason) = s.wanted.take() {
        return Due::because(reason); // it was due, and waited only for the training slot
    }
    if s.p.model.load().placeholder {
        return cold_start(s, store);
    }
    // A drift regime decides alone while it is open: its rows pace it, not the cooldown.
    if let Some(regime) = &s.regime {
        let new = regime_rows(s, store, regime);
        if new < regime.need {
            return None;
        }
        let reason = format!("{}; {new} rows since the change (from sample {})", regime.reason, regime.from);
        return Some(Due { reason, from: Some(regime.from) });
    }
    if s.trial.is_some() {
        return None; // the other triggers wait for the version on trial to be judged
    }
    let mut last = store.meta(&s.p.config.name, "last_train_s").unwrap_or(0);
    if last > wall + CLOCK_SLACK_S {
        // The wall clock went back since the last run (an RTC that ran fast, put right by
        // NTP). Counted from a date in the future, the cooldown and the schedule would wait
        // for the clock to catch up, months perhaps; counted from now they restart.
        tracing::warn!(
            pipeline = s.p.config.name,
            "the last run is dated {} s in the future: the clock went back; the cooldown and schedule count from now",
            last - wall
        );
        let _ = store.set_meta(&s.p.config.name, "last_train_s", wall);
        last = wall;
    }
    if last > 0 && wall.saturating_sub(last) < t.cooldown.as_secs() {
        return None;
    }
    for trigger in &t.triggers {
        match trigger {
            Trigger::Every(d) if wall.saturating_sub(last) >= d.as_secs() => {
                return Due::because(format!("schedule (every {} s)", d.as_secs()))
            }
            Trigger::Labels(n) => {
                let labeled = store.stats(&s.p.config.name).map_or(0, |st| st.labeled_total);
                let at_last = store.meta(&s.p.config.name, "labeled_at_train").unwrap_or(0);
                if labeled.saturating_sub(at_last) >= *n {
                    return Due::because(format!("{} new labeled samples", labeled - at_last));
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Hours;
    use crate::service::closed_loop::test_support::{events, label, on_trial, sample, state};

    #[test]
    fn the_schedule_waits_for_its_period_and_the_cooldown() {
        let (mut s, store) = state("every", "trigger = [\"every 2h\"]\ncooldown = \"1h\"\n");
        assert!(due(&mut s, &store).is_some_and(|d| d.reason.starts_with("schedule")), "never trained: due now");
        store.set_meta("p", "last_train_s", now_s() - 1_800).unwrap();
        assert_eq!(due(&mut s, &store), None, "30 min ago: in the cooldown");
        store.set_meta("p", "last_train_s", now_s() - 5_400).unwrap();
        assert_eq!(due(&mut s, &store), None, "90 min ago: past the cooldown, not the period");
        store.set_meta("p", "last_train_s", now_s() - 7_300).unwrap();
        assert!(due(&mut s, &store).is_some());
        // Outside its hours window nothing starts, however due.
        let minute = ((now_s() / 60) % 1440) as u32;
        s.p.train.hours = Some(Hours { from: (minute + 60) % 1440, to: (minute + 120) % 1440, local: false });
        assert_eq!(due(&mut s, &store), None);
    }

    /// The clock went back after a run (an RTC that ran fast, put right by NTP): the schedule
    /// counts from now instead of waiting a year for the clock to reach the run's date.
    #[test]
    fn a_clock_set_back_after_a_run_does_not_hold_the_schedule_until_it_catches_up() {
        let (mut s, store) = state("clock", "trigger = [\"every 2h\"]\ncooldown = \"1h\"\n");
        store.set_meta("p", "last_train_s", now_s() + 365 * 86_400).unwrap();
        assert_eq!(due(&mut s, &store), None, "as far as anyone can tell, the last run was just now");
        let last = store.meta("p", "last_train_s").unwrap();
        assert!(last <= now_s(), "the last run is dated now, not {} s ahead", last.saturating_sub(now_s()));
        store.set_meta("p", "last_train_s", last - 7_300).unwrap();
        assert!(due(&mut s, &store).is_some_and(|d| d.reason.starts_with("schedule")), "two hours on it is due");
    }

    #[test]
    fn the_labels_trigger_counts_labels_joined_since_the_last_run() {
        let (mut s, store) = state("labels", "trigger = [\"labels 3\"]\ncooldown = \"0s\"\n");
        store.apply(&[("p", &[sample(1), sample(2), sample(3), label(1), label(2)])], now_s() * 1000).unwrap();
        assert_eq!(due(&mut s, &store), None, "2 labels");
        store.apply(&[("p", &[label(3)])], now_s() * 1000).unwrap();
        assert_eq!(due(&mut s, &store).map(|d| d.reason).as_deref(), Some("3 new labeled samples"));
        store.set_meta("p", "labeled_at_train", 3).unwrap();
        assert_eq!(due(&mut s, &store), None, "none new since the last run");
    }

    fn alarm(series: (u64, &str), since_change: u64, raised: bool) -> Alarm {
        let reason = format!("drift on {} (ks)", series.1);
        Alarm { series: (series.0, series.1.into()), reason, since_change, raised, stored: None }
    }

    /// Rows `from..from + n` served and labeled.
    fn labeled(store: &Store, from: u64, n: u64) {
        let writes: Vec<_> = (from..from + n).flat_map(|i| [sample(i), label(i)]).collect();
        store.apply(&[("p", &writes)], now_s() * 1000).unwrap();
    }

    /// A drift alarm that ends before `min_rows` rows of the new regime arrived wants no run
    /// (it would train on the regime before the alarm); one still raised when they are in
    /// starts it, and an alarm left by a version no longer serving does not keep the wait alive.
    #[test]
    fn a_drift_alarm_that_ends_before_enough_new_rows_starts_no_run() {
        let (mut s, store) = state("drift-ends", "trigger = [\"drift\"]\nmin_rows = 50\ncooldown = \"0s\"\n");
        let (events, _reporter) = events();
        // Raised and ended at once (a flicker at the threshold): nothing is wanted any more.
        drift(&mut s, alarm((1, "multivariate"), 0, true), &store, &events);
        assert!(s.regime.is_some());
        drift(&mut s, alarm((1, "multivariate"), 0, false), &store, &events);
        assert!(s.regime.is_none(), "the alarm ended before any new row");
        labeled(&store, 0, 50);
        assert_eq!(due(&mut s, &store), None);
        // Two alarms; one ends, the other holds: the run starts once the rows are in.
        drift(&mut s, alarm((1, "f1"), 0, true), &store, &events);
        drift(&mut s, alarm((1, "prediction"), 0, true), &store, &events);
        drift(&mut s, alarm((1, "prediction"), 0, false), &store, &events);
        assert_eq!(due(&mut s, &store), None, "no new rows yet");
        labeled(&store, 100, 50);
        let d = due(&mut s, &store).unwrap();
        assert!(d.reason.starts_with("drift on f1") && d.from == Some(50), "{d:?}");
        // v1's f1 alarm never ends (v2 serves now); v2's own alarm ending drops the wait.
        s.regime = None;
        drift(&mut s, alarm((2, "f3"), 0, true), &store, &events);
        drift(&mut s, alarm((2, "f3"), 0, false), &store, &events);
        assert!(s.regime.is_none());
    }

    /// The loop heard of the alarm late (busy, or a starved CPU): 300 more rows were stored
    /// meanwhile. The regime still starts where the change began, counted when the alarm was
    /// raised, and the rows stored while the loop was busy count towards its first run.
    #[test]
    fn a_drift_alarm_heard_late_starts_its_regime_where_the_change_began() {
        let (mut s, store) = state("late", "trigger = [\"drift\"]\nmin_rows = 100\ncooldown = \"1h\"\n");
        let (events, _reporter) = events();
        labeled(&store, 0, 1300);
        let late = Alarm { stored: Some(1000), ..alarm((1, "f1"), 60, true) };
        drift(&mut s, late, &store, &events);
        assert_eq!(
            s.regime.as_ref().map(|r| r.from),
            Some(940),
            "not 1240: the rows after the alarm were stored later"
        );
        assert_eq!(due(&mut s, &store).and_then(|d| d.from), Some(940), "360 rows of the new regime are in already");
    }

    /// A drift run trains on the rows from the estimated change on, and is paced by them:
    /// not by the cooldown (nor by a trial); after a refusal the next comes at twice the rows,
    /// up to `rows`; after an acceptance at `min_rows` of those the new version never saw; after which the regime is closed and the other
    /// triggers take over once the trial is over.
    #[test]
    fn a_drift_regime_starts_at_the_change_and_paces_its_runs_by_its_rows() {
        let train = "trigger = [\"drift\", \"labels 1000\"]\nmin_rows = 100\nrows = 400\ncooldown = \"1h\"\n";
        let (mut s, store) = state("regime", train);
        let (events, _reporter) = events();
        labeled(&store, 0, 1000);
        store.set_meta("p", "last_train_s", now_s() - 10).unwrap(); // in the cooldown
                                                                    // The alarm estimates the change began 60 rows back: sample 940.
        drift(&mut s, alarm((1, "f1"), 60, true), &store, &events);
        assert_eq!(s.regime.as_ref().map(|r| (r.from, r.need)), Some((940, 100)));
        assert_eq!(due(&mut s, &store), None, "60 rows of the new regime, 100 needed");
        // Stored but not yet labeled rows do not count.
        let unlabeled: Vec<_> = (1000..1040).map(sample).collect();
        store.apply(&[("p", &unlabeled)], now_s() * 1000).unwrap();
        assert_eq!(due(&mut s, &store), None, "40 of them have no label yet");
        let labels: Vec<_> = (1000..1040).map(label).collect();
        store.apply(&[("p", &labels)], now_s() * 1000).unwrap();
        let d = due(&mut s, &store).expect("due at 100 rows, cooldown or not");
        assert_eq!(d.from, Some(940));
        assert!(d.reason.contains("100 rows since the change (from sample 940)"), "{}", d.reason);
        // Refused: the next run waits for twice the rows.
        assert_eq!(
            regime_run_ended(&mut s, false, 1040).as_deref(),
            Some("the next run waits for 200 rows of the new regime")
        );
        assert_eq!(due(&mut s, &store), None);
        labeled(&store, 1040, 100);
        assert_eq!(due(&mut s, &store).and_then(|d| d.from), Some(940));
        // Accepted, and its version on trial: the regime goes on (a gradual drift may too) from
        // the first row that run could not see, at min_rows again, and during the trial.
        assert_eq!(
            regime_run_ended(&mut s, true, 1140).as_deref(),
            Some("the next run waits for 100 rows the new version never saw (from sample 1140)")
        );
        s.trial = Some(on_trial(&s));
        // v1's alarms went with it; one of v2's ending that was never raised keeps the regime.
        drift(&mut s, alarm((2, "performance"), 0, false), &store, &events);
        assert!(s.regime.is_some(), "the regime outlives the version it replaced");
        labeled(&store, 1140, 50);
        assert_eq!(due(&mut s, &store), None, "50 rows of 100");
        labeled(&store, 1190, 50);
        assert_eq!(due(&mut s, &store).and_then(|d| d.from), Some(1140), "a regime run during the trial");
        // Refused at 100, 200 and 400 (= rows): closed.
        for (need, end) in [(200, 1240), (400, 1340)] {
            assert_eq!(
                regime_run_ended(&mut s, false, end).as_deref(),
                Some(format!("the next run waits for {need} rows of the new regime").as_str())
            );
            assert_eq!(due(&mut s, &store), None);
            labeled(&store, end, need - (end - 1140));
            assert_eq!(due(&mut s, &store).and_then(|d| d.from), Some(1140));
        }
        assert_eq!(
            regime_run_ended(&mut s, false, 1540).as_deref(),
            Some("400 rows of the new regime made no better model: the champion stays")
        );
        assert!(s.regime.is_none());
        assert_eq!(due(&mut s, &store), None, "back to the triggers, and in the cooldown");
        store.set_meta("p", "last_train_s", now_s() - 7_200).unwrap();
        assert_eq!(due(&mut s, &store), None, "past the cooldown, but the other triggers wait for the trial");
        s.trial = None;
        assert!(due(&mut s, &store).is_some_and(|d| d.reason == "1540 new labeled samples" && d.from.is_none()));
    }
}
