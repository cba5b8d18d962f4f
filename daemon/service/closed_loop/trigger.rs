//! When a run should start: the triggers (drift, schedule, labels), the cooldown and the
//! hours window.

use serde_json::json;

use super::{emit, now_s, Stage, State};
use crate::config::Trigger;
use crate::model::Task;
use crate::service::events::Events;
use crate::store::Store;
use std::time::Instant;

/// A drift alarm raised or ended: a run is wanted once `min_rows` new rows have arrived, as
/// long as some alarm is still raised then.
pub(super) fn drift(
    s: &mut State,
    series: (u64, String),
    reason: String,
    raised: bool,
    store: &Store,
    events: &Events,
) {
    if !s.p.train.triggers.contains(&Trigger::Drift) {
        return;
    }
    // A version's monitor goes with it: alarms of a version no longer serving never end.
    s.alarms.retain(|(version, _)| *version == series.0);
    if raised {
        s.alarms.insert(series);
        if s.wanted.is_none() && matches!(s.stage, Stage::Idle) {
            s.wanted = Some((reason, usable_rows(s, store)));
        }
        return;
    }
    s.alarms.remove(&series);
    let Some((why, at)) = s.wanted.as_ref().filter(|(why, _)| why.starts_with("drift") && s.alarms.is_empty()) else {
        return;
    };
    let new = usable_rows(s, store).saturating_sub(*at);
    if new >= s.p.train.min_rows as u64 {
        return; // due already; waits only for a free slot or the hours window
    }
    let message =
        format!("{why} ended after {new} new rows, before min_rows = {}: not fine-tuning", s.p.train.min_rows);
    emit(events, &s.p, "train.skipped", message, json!({"reason": why, "rows": new, "min_rows": s.p.train.min_rows}));
    s.wanted = None;
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

/// How far in the future a stored date may lie before the clock is taken to have gone back.
const CLOCK_SLACK_S: u64 = 60;

/// Why a run should start now, if it should.
pub(super) fn due(s: &mut State, store: &Store) -> Option<String> {
    let t = &s.p.train;
    let now = Instant::now();
    if s.retry_at.is_some_and(|at| now < at) {
        return None;
    }
    let wall = now_s();
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
    let in_cooldown = last > 0 && wall.saturating_sub(last) < t.cooldown.as_secs();
    if in_cooldown || t.hours.is_some_and(|h| !h.contains(wall)) {
        return None;
    }
    // After a drift alarm the loop waits for `min_rows` new rows, so it trains on the new
    // regime rather than on what came before the change.
    if let Some((reason, at)) = &s.wanted {
        let new = usable_rows(s, store).saturating_sub(*at);
        if new >= t.min_rows as u64 {
            let reason = format!("{reason}; {new} new rows since");
            s.wanted = None;
            return Some(reason);
        }
        return None;
    }
    for trigger in &t.triggers {
        match trigger {
            Trigger::Every(d) if wall.saturating_sub(last) >= d.as_secs() => {
                return Some(format!("schedule (every {} s)", d.as_secs()))
            }
            Trigger::Labels(n) => {
                let labeled = store.stats(&s.p.config.name).map_or(0, |st| st.labeled_total);
                let at_last = store.meta(&s.p.config.name, "labeled_at_train").unwrap_or(0);
                if labeled.saturating_sub(at_last) >= *n {
                    return Some(format!("{} new labeled samples", labeled - at_last));
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
    use crate::service::closed_loop::test_support::{events, label, sample, state};

    #[test]
    fn the_schedule_waits_for_its_period_and_the_cooldown() {
        let (mut s, store) = state("every", "trigger = [\"every 2h\"]\ncooldown = \"1h\"\n");
        assert!(due(&mut s, &store).is_some_and(|r| r.starts_with("schedule")), "never trained: due now");
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
        assert!(due(&mut s, &store).is_some_and(|r| r.starts_with("schedule")), "two hours on it is due");
    }

    #[test]
    fn the_labels_trigger_counts_labels_joined_since_the_last_run() {
        let (mut s, store) = state("labels", "trigger = [\"labels 3\"]\ncooldown = \"0s\"\n");
        store.apply(&[("p", &[sample(1), sample(2), sample(3), label(1), label(2)])], now_s() * 1000).unwrap();
        assert_eq!(due(&mut s, &store), None, "2 labels");
        store.apply(&[("p", &[label(3)])], now_s() * 1000).unwrap();
        assert_eq!(due(&mut s, &store).as_deref(), Some("3 new labeled samples"));
        store.set_meta("p", "labeled_at_train", 3).unwrap();
        assert_eq!(due(&mut s, &store), None, "none new since the last run");
    }

    /// A drift alarm that ends before `min_rows` new rows arrived wants no run (it would train
    /// on the regime before the alarm); one still raised when they are in starts it, and an
    /// alarm left by a version no longer serving does not keep the wait alive.
    #[test]
    fn a_drift_alarm_that_ends_before_enough_new_rows_starts_no_run() {
        let (mut s, store) = state("drift-ends", "trigger = [\"drift\"]\nmin_rows = 50\ncooldown = \"0s\"\n");
        let (events, _reporter) = events();
        let labeled = |from: u64| {
            let writes: Vec<_> = (from..from + 50).flat_map(|i| [sample(i), label(i)]).collect();
            store.apply(&[("p", &writes)], now_s() * 1000).unwrap();
        };
        let alarm = |s: &mut State, version: u64, series: &str, raised: bool| {
            drift(s, (version, series.into()), format!("drift on {series} (ks)"), raised, &store, &events)
        };
        // Raised and ended at once (a flicker at the threshold): nothing is wanted any more.
        alarm(&mut s, 1, "multivariate", true);
        assert!(s.wanted.is_some());
        alarm(&mut s, 1, "multivariate", false);
        assert!(s.wanted.is_none(), "the alarm ended before any new row");
        labeled(0);
        assert_eq!(due(&mut s, &store), None);
        // Two alarms; one ends, the other holds: the run starts once the rows are in.
        alarm(&mut s, 1, "f1", true);
        alarm(&mut s, 1, "prediction", true);
        alarm(&mut s, 1, "prediction", false);
        assert_eq!(due(&mut s, &store), None, "no new rows yet");
        labeled(100);
        assert!(due(&mut s, &store).is_some_and(|r| r.starts_with("drift on f1")));
        // v1's f1 alarm never ends (v2 serves now); v2's own alarm ending drops the wait.
        alarm(&mut s, 2, "f3", true);
        alarm(&mut s, 2, "f3", false);
        assert!(s.wanted.is_none());
    }
}
