//! The closed loop: when to fine-tune, and what happens to the result.
//!
//! ```text
//! trigger (drift event | every D | N new labels | cmd/train)   cooldown, hours, one at a time
//!   → rows from the store (newest labeled, or judged normal for reconstruction; replay sample)
//!   → fine_tune_on on the "lathe-train" thread (SCHED_IDLE, time and memory limits)
//!   → gate refused: event train.refused, champion unchanged
//!   → gate accepted: challenger into the registry
//!   → shadow (optional): it scores live traffic beside the champion; compared on the labels
//!   → promote (registry champion; the swapper swaps it in) → trial
//!   → trial: live loss on its own labeled predictions, output health, median compute per row
//!   → degrade: roll back to the previous version (event trial.failed); else trial.passed
//! ```
//! Every step is an event on `lathe/{node}/events` carrying the run record. The trial is kept
//! in the store's meta, so a restart mid-trial resumes it rather than forgetting it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde_json::{json, Value};
use std::sync::mpsc;

use tokio::sync::{oneshot, watch};

use super::events::{Counters, Event, Events, COMPUTE_BUCKETS_US};
use crate::config::{Config, PipelineConfig, TrainConfig, Trigger};
use crate::infer::{ActiveModel, SharedModel};
use crate::model::{Bundle, Registry, Task};
use crate::monitor::performance::Performance;
use crate::monitor::reference::{Rebased, ServedSpan};
use crate::monitor::Monitor;
use crate::store::{Record, Store};
use crate::train::{self, data::Dataset, Outcome, Replay};

/// One training at a time in the whole process (a reload starts a new loop; a run from the
/// old one may still be finishing).
static TRAINING: AtomicBool = AtomicBool::new(false);

/// The reason a debug build's test-only command gives a run that is to panic (see `command`).
const DEBUG_PANIC: &str = "__lathe_debug_panic";
/// Counts the loops that have ended (a stop or a reload). A run started under an earlier
/// count was started by a loop that is gone, so it stops at its next epoch instead of
/// spending minutes of CPU on a result nobody will read.
static LOOPS_ENDED: AtomicU64 = AtomicU64::new(0);
/// How often the loop looks at its pipelines.
const TICK: Duration = Duration::from_millis(500);
/// Rows a trial needs before output health and latency are judged.
const MIN_TRIAL_ROWS: u64 = 200;
/// A model is not called slow below this median compute per row, whatever the ratio: under
/// CPU contention (a debug build beside other work) a tiny model's median moved 50 → 250 µs.
const MIN_SLOW_COMPUTE_US: u64 = 1_000;
/// Output health and latency are judged from this long after promotion: the swap itself
/// (loading, the drift monitor's calibration) costs a moment that is not the model's speed.
const TRIAL_WARMUP: Duration = Duration::from_secs(3);

/// What wakes the loop between its ticks. One channel for both, so a drift alarm is taken
/// at once: the rows counted "since the alarm" must start at the alarm, not a tick later
/// (CI streamed a whole test's rows in that tick and the run waited for rows never sent).
pub enum LoopMessage {
    /// A drift alarm on `series` (of the model version serving) of `pipeline` was raised, or
    /// (`raised` false) has ended.
    Drift { pipeline: String, series: (u64, String), reason: String, raised: bool },
    /// A `lathe/{node}/cmd/{action}` message.
    Command { action: String, payload: Vec<u8> },
    /// A pushed bundle that passed every check (`update::device`): promote it onto trial.
    Pushed { model: String, bundle: Box<Bundle>, record: Value },
}

/// A pipeline the loop runs.
pub struct LoopPipeline {
    pub config: PipelineConfig,
    pub train: TrainConfig,
    pub model: SharedModel,
    /// A challenger in its shadow period (the pipeline runs it beside the champion).
    pub shadow: Arc<ArcSwapOption<ActiveModel>>,
    pub counters: Arc<Counters>,
    pub performance: Option<Arc<Mutex<Performance>>>,
    /// `[update]`: the device's own key, which signs the bundles it fine-tunes.
    pub device_key: Option<Arc<ed25519_dalek::SigningKey>>,
}

/// Counters at a moment, to judge a window between two.
#[derive(Clone)]
struct Snapshot {
    predicted: u64,
    nonfinite: u64,
    saturated: u64,
    /// The per-row compute histogram's bucket counts (queueing is the traffic's, not the model's).
    compute: Vec<u64>,
}

impl Snapshot {
    fn take(c: &Counters) -> Snapshot {
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

enum Stage {
    Idle,
    Training {
        done: oneshot::Receiver<Result<Outcome, String>>,
        reason: String,
        before: Snapshot,
    },
    Shadow {
        challenger: Box<Bundle>,
        record: Value,
        until: Instant,
        before: Snapshot,
    },
    Trial {
        version: u64,
        previous: u64,
        until: Instant,
        record: Value,
        /// The champion's window (trigger → promotion) and the trial's start.
        reference: (Snapshot, Snapshot),
        /// Taken once the warm-up is over.
        start: Option<Snapshot>,
        promoted: Instant,
        /// The per-sample loss the gate measured for this version on the fresh holdout.
        gate_loss: f64,
    },
}

struct State {
    p: LoopPipeline,
    stage: Stage,
    /// A trigger fired and waits for the hours window, the cooldown, or (drift) enough new
    /// rows: the reason, and the count of usable rows when it fired.
    wanted: Option<(String, u64)>,
    /// Drift alarms raised and not yet ended, by model version and series. A run wanted for
    /// drift is dropped when the last one ends before enough new rows arrived: training then
    /// would learn the old regime (measured in the demo: a multivariate alarm 0.5 % over its
    /// threshold that ended 130 ms later started a run on pre-fault rows, whose cooldown then
    /// hid the real fault).
    alarms: std::collections::BTreeSet<(u64, String)>,
    /// Not before this (a skipped run waits a minute before trying again).
    retry_at: Option<Instant>,
    /// A fine-tuned version that passed its trial, waiting to have served enough rows to
    /// re-base its drift reference on (`rebase`).
    rebase: Option<Rebase>,
}

/// The version, and the store's sample count when it was promoted (its rows are counted
/// from there). Kept in the store's meta, so a restart does not forget it.
#[derive(Clone, Copy)]
struct Rebase {
    version: u64,
    from: u64,
}

/// Runs the loop until `stop`, on a thread of its own: reading the store and the registry
/// blocks, and must never hold up an async worker that serves inference. `messages` brings
/// drift alarms and `lathe/{node}/cmd/+` commands.
pub fn run(
    config: Config,
    store: Arc<Store>,
    pipelines: Vec<LoopPipeline>,
    events: Events,
    messages: mpsc::Receiver<LoopMessage>,
    stop: watch::Receiver<bool>,
) {
    let registry = Registry::new(&config.state_dir).with_engine(config.infer.engine.clone());
    let mut states: Vec<State> = pipelines
        .into_iter()
        .map(|p| State {
            p,
            stage: Stage::Idle,
            wanted: None,
            alarms: Default::default(),
            retry_at: None,
            rebase: None,
        })
        .collect();
    for s in &mut states {
        resume_trial(s, &store, &registry);
        let version = store.meta(&s.p.config.name, "rebase_version").unwrap_or(0);
        if version != 0 && version == s.p.model.load().version {
            let from = store.meta(&s.p.config.name, "rebase_from").unwrap_or(0);
            s.rebase = Some(Rebase { version, from });
        }
    }
    // A steady tick, apart from the messages: frequent commands or alarms must not starve it.
    let mut next_tick = Instant::now();
    while !*stop.borrow() {
        match messages.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(LoopMessage::Drift { pipeline, series, reason, raised }) => {
                if let Some(s) = states.iter_mut().find(|s| s.p.config.name == pipeline) {
                    drift(s, series, reason, raised, &store, &events);
                }
            }
            Ok(LoopMessage::Command { action, payload }) => {
                command(&mut states, &action, &payload, &config, &store, &registry, &events)
            }
            Ok(LoopMessage::Pushed { model, bundle, record }) => {
                for s in states.iter_mut().filter(|s| s.p.model.load().name == model) {
                    if matches!(s.stage, Stage::Training { .. }) {
                        let why = "a fine-tune is running; the offer is taken again at the next reconnect";
                        emit(&events, &s.p, "update.deferred", why.into(), json!({"run": record}));
                        continue;
                    }
                    let before = Snapshot::take(&s.p.counters);
                    promote(s, &bundle, record.clone(), before, &store, &registry, &events);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // No ingest any more (stopping): wait out the tick instead.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(next_tick.saturating_duration_since(Instant::now()))
            }
        }
        if Instant::now() >= next_tick {
            next_tick = Instant::now() + TICK;
            for s in &mut states {
                tick(s, &config, &store, &registry, &events);
            }
        }
    }
    LOOPS_ENDED.fetch_add(1, Relaxed);
}

fn now_s() -> u64 {
    crate::service::unix_ms() / 1000
}

/// `lathe/{node}/cmd/train` and `cmd/rollback`; the payload names the pipeline
/// (`{"pipeline": "x"}` or the bare name; empty: every pipeline that trains).
fn command(
    states: &mut [State],
    action: &str,
    payload: &[u8],
    config: &Config,
    store: &Arc<Store>,
    registry: &Registry,
    events: &Events,
) {
    let text = String::from_utf8_lossy(payload);
    let named = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("pipeline").and_then(Value::as_str).map(String::from))
        .or_else(|| (!text.trim().is_empty() && !text.trim_start().starts_with('{')).then(|| text.trim().to_string()));
    for s in states.iter_mut().filter(|s| named.as_deref().is_none_or(|n| n == s.p.config.name)) {
        match action {
            "train" if s.p.config.train.is_none() => {
                emit(events, &s.p, "command.refused", "this pipeline has no [pipeline.train]".into(), json!({}))
            }
            "train" if matches!(s.stage, Stage::Idle) => {
                // Debug builds only (the tests): `"__lathe_debug_panic": true` makes the run
                // panic, to show a panic fails that run and not every later one.
                let panic = cfg!(debug_assertions) && text.contains("\"__lathe_debug_panic\":true");
                start(s, if panic { DEBUG_PANIC } else { "command" }, config, store, events)
            }
            "train" => emit(events, &s.p, "train.skipped", "a run or trial is already in progress".into(), json!({})),
            "rollback" => {
                let name = s.p.model.load().name.clone();
                match registry.rollback(&name) {
                    Ok((from, to)) => {
                        s.stage = Stage::Idle;
                        clear_trial(store, &s.p.config.name);
                        emit(
                            events,
                            &s.p,
                            "rollback.commanded",
                            format!("Rolled back {name} from v{} to v{to} on command", from.unwrap_or(0)),
                            json!({"from": from, "to": to}),
                        );
                    }
                    Err(e) => emit(events, &s.p, "rollback.refused", e.to_string(), json!({})),
                }
            }
            other => emit(
                events,
                &s.p,
                "command.refused",
                format!("unknown command {other:?}; expected train or rollback"),
                json!({}),
            ),
        }
    }
}

fn emit(events: &Events, p: &LoopPipeline, step: &'static str, message: String, detail: Value) {
    events.emit(Event::Step { pipeline: p.config.name.clone(), step, message, detail });
}

fn tick(s: &mut State, config: &Config, store: &Arc<Store>, registry: &Registry, events: &Events) {
    rebase(s, store, registry, events);
    match &mut s.stage {
        Stage::Idle => {
            if let Some(reason) = due(s, store) {
                start(s, &reason, config, store, events);
            }
        }
        Stage::Training { done, .. } => match done.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => {}
            Err(oneshot::error::TryRecvError::Closed) => {
                s.stage = Stage::Idle;
                emit(events, &s.p, "train.failed", "the training thread ended without a result".into(), json!({}));
            }
            Ok(result) => {
                let Stage::Training { reason, before, .. } = std::mem::replace(&mut s.stage, Stage::Idle) else {
                    return;
                };
                finished(s, result, &reason, before, config, store, registry, events);
            }
        },
        Stage::Shadow { until, .. } => {
            let paired = s.p.performance.as_ref().and_then(|p| p.lock().ok().and_then(|p| p.paired));
            let labels = paired.map_or(0, |p| p.labels);
            if Instant::now() >= *until && labels >= s.p.train.min_live_labels as u64 {
                end_shadow(s, config, store, registry, events);
            }
        }
        Stage::Trial { .. } => watch_trial(s, store, registry, events),
    }
}

/// A drift alarm raised or ended: a run is wanted once `min_rows` new rows have arrived, as
/// long as some alarm is still raised then.
fn drift(s: &mut State, series: (u64, String), reason: String, raised: bool, store: &Store, events: &Events) {
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
fn usable_rows(s: &State, store: &Store) -> u64 {
    let stats = store.stats(&s.p.config.name).unwrap_or_default();
    match s.p.model.load().reading.task {
        Task::Reconstruction => stats.stored_total,
        _ => stats.labeled_total,
    }
}

/// Why a run should start now, if it should.
fn due(s: &mut State, store: &Store) -> Option<String> {
    let t = &s.p.train;
    let now = Instant::now();
    if s.retry_at.is_some_and(|at| now < at) {
        return None;
    }
    let last = store.meta(&s.p.config.name, "last_train_s").unwrap_or(0);
    let in_cooldown = last > 0 && now_s().saturating_sub(last) < t.cooldown.as_secs();
    if in_cooldown || !in_hours(t.hours) {
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
            Trigger::Every(d) if now_s().saturating_sub(last) >= d.as_secs() => {
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

fn in_hours(hours: Option<(u32, u32)>) -> bool {
    in_hours_at(hours, ((now_s() / 60) % 1440) as u32)
}

/// Whether `minute` (of the UTC day) is inside the `hours` window.
fn in_hours_at(hours: Option<(u32, u32)>, minute: u32) -> bool {
    let Some((from, to)) = hours else { return true };
    if from <= to {
        (from..to).contains(&minute)
    } else {
        minute >= from || minute < to // wraps midnight
    }
}

/// Gathers the rows and starts the run on its own thread.
fn start(s: &mut State, reason: &str, config: &Config, store: &Arc<Store>, events: &Events) {
    let p = &s.p;
    let name = p.config.name.clone();
    let champion = match Registry::new(&config.state_dir)
        .with_engine(config.infer.engine.clone())
        .champion(&p.model.load().name)
    {
        Ok(b) => b,
        Err(e) => {
            emit(events, p, "train.failed", format!("cannot read the champion: {e}"), json!({}));
            return;
        }
    };
    // A cheap count first; the rows themselves are read on the training thread.
    let usable = usable_rows(s, store);
    if usable < p.train.min_rows as u64 {
        s.retry_at = Some(Instant::now() + Duration::from_secs(60));
        emit(
            events,
            p,
            "train.skipped",
            format!("{reason}: only {usable} usable rows in the store (min_rows = {})", p.train.min_rows),
            json!({"reason": reason, "rows": usable, "min_rows": p.train.min_rows}),
        );
        return;
    }
    if TRAINING.swap(true, Relaxed) {
        s.wanted = Some((reason.to_string(), 0));
        s.retry_at = Some(Instant::now() + Duration::from_secs(5));
        return;
    }
    let mut champion = champion;
    let mut training = champion.manifest.training.clone();
    p.train.overrides.apply(&mut training);
    if let Some(f) = p.train.overrides.max_forgetting {
        champion.manifest.gate.max_forgetting = f;
    }
    let limits = (Duration::from_secs(p.train.max_seconds), p.train.max_memory_mb);
    let backend = p.train.backend.clone();
    let gpu = train::GpuSettings {
        cache_dir: Some(
            std::env::var_os("CACHE_DIRECTORY")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| config.state_dir.join("cache")),
        ),
        max_gpu_mem_mb: p.train.max_gpu_mem_mb,
    };
    let data_name = format!("store {name} ({reason})");
    let name_for_run = name.clone();
    let (tx, rx) = oneshot::channel();
    let (store_for_run, rows_wanted, min_rows) = (store.clone(), p.train.rows, p.train.min_rows);
    let generation = LOOPS_ENDED.load(Relaxed);
    let spawned = std::thread::Builder::new().name("lathe-train".into()).spawn(move || {
        lower_priority();
        // A panic inside a dependency (cudarc asserts, tract) fails this run, not every later
        // one: TRAINING is cleared and the loop gets the reason.
        let run = std::panic::AssertUnwindSafe(|| {
            #[cfg(debug_assertions)]
            #[allow(clippy::panic)]
            if data_name.ends_with(&format!("({DEBUG_PANIC})")) {
                panic!("{DEBUG_PANIC} asked for by the command");
            }
            read_rows(&store_for_run, &name_for_run, &champion, rows_wanted, min_rows).and_then(|rows| {
                let data_name = format!("{data_name}: {}", describe_rows(&rows.recent, crate::service::unix_ms()));
                train_on_rows(&champion, rows, &data_name, &training, limits, (&backend, &gpu), generation)
            })
        });
        let result = std::panic::catch_unwind(run)
            .unwrap_or_else(|p| Err(format!("the training run panicked: {}", crate::panic_message(p))));
        TRAINING.store(false, Relaxed);
        crate::service::release_code_pages("training run ended");
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        TRAINING.store(false, Relaxed);
        emit(events, p, "train.failed", format!("cannot start the training thread: {e}"), json!({}));
        return;
    }
    let labeled = store.stats(&name).map_or(0, |st| st.labeled_total);
    let _ = store.set_meta(&name, "last_train_s", now_s());
    let _ = store.set_meta(&name, "labeled_at_train", labeled);
    emit(
        events,
        p,
        "train.started",
        format!("Fine-tuning {} ({}): {reason}", p.model.load().name, train::resolved_backend(&p.train.backend)),
        json!({"reason": reason, "backend": train::resolved_backend(&p.train.backend)}),
    );
    s.stage = Stage::Training { done: rx, reason: reason.to_string(), before: Snapshot::take(&p.counters) };
}

/// Scheduling is per thread on Linux: SCHED_IDLE runs this one only on CPU time inference
/// leaves over (nice 19 where SCHED_IDLE is refused).
fn lower_priority() {
    // SAFETY: both calls act on the calling thread (pid 0) and read only `param`.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        }
    }
}

/// The run's rows from the store: the newest labeled ones (reconstruction: those the serving
/// model judged normal), and the older labeled ones for the gate's replay check.
fn read_rows(
    store: &Store,
    pipeline: &str,
    champion: &Bundle,
    rows: usize,
    min_rows: usize,
) -> Result<crate::store::TrainingRows, String> {
    let (task, threshold) = (champion.manifest.task, champion.manifest.baseline.threshold);
    let rows = store
        .training_rows(pipeline, rows, |r: &Record| match task {
            Task::Reconstruction => threshold.is_none_or(|t| f64::from(r.score) < t),
            _ => r.label.is_some(),
        })
        .map_err(|e| e.to_string())?;
    if rows.recent.len() < min_rows {
        return Err(format!("only {} usable rows in the store (min_rows = {min_rows})", rows.recent.len()));
    }
    Ok(rows)
}

/// Which rows a run trained on, for its record: the keys of the oldest and newest, and when
/// they were served, so "did it learn the new regime?" can be answered from the record.
fn describe_rows(rows: &[Record], now_ms: u64) -> String {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return "no rows".into();
    };
    format!(
        "{} rows served {:.0} s to {:.0} s ago, keys {} ({}) to {} ({})",
        rows.len(),
        now_ms.saturating_sub(first.ts_ms) as f64 / 1000.0,
        now_ms.saturating_sub(last.ts_ms) as f64 / 1000.0,
        first.key,
        first.device,
        last.key,
        last.device
    )
}

/// Resident memory of this process, bytes.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

/// The same fine-tune as `lathe train`, on rows from the store.
fn train_on_rows(
    champion: &Bundle,
    rows: crate::store::TrainingRows,
    data_name: &str,
    training: &crate::model::manifest::Training,
    (max_time, max_memory_mb): (Duration, u64),
    (backend, gpu): (&str, &train::GpuSettings),
    generation: u64,
) -> Result<Outcome, String> {
    let m = &champion.manifest;
    let classes = train::classes(champion, training)?;
    let supervised = m.task != Task::Reconstruction;
    let mut data = Dataset::new(m.inputs.len());
    let mut x = Vec::with_capacity(m.inputs.len());
    for r in &rows.recent {
        x.clear();
        x.extend(r.features.iter().map(|&v| f64::from(v)));
        data.push(m, classes, &x, r.label);
    }
    // The replay sample goes through the same checks (its dropped rows are not reported).
    let replay = supervised.then(|| {
        let mut older = Dataset::new(m.inputs.len());
        for r in &rows.older {
            x.clear();
            x.extend(r.features.iter().map(|&v| f64::from(v)));
            older.push(m, classes, &x, r.label);
        }
        Replay { x: older.x, y: older.y }
    });
    let started = Instant::now();
    let rss_at_start = rss_bytes();
    let check = || {
        if LOOPS_ENDED.load(Relaxed) != generation {
            return Err("stopped: the daemon is stopping or reloading".to_string());
        }
        if started.elapsed() > max_time {
            return Err(format!("stopped: over the time limit (max_seconds = {})", max_time.as_secs()));
        }
        let grown = rss_bytes().saturating_sub(rss_at_start) >> 20;
        if grown > max_memory_mb {
            return Err(format!("stopped: resident memory grew {grown} MiB (max_memory_mb = {max_memory_mb})"));
        }
        Ok(())
    };
    train::fine_tune_with(backend, gpu, champion, data, data_name, training, replay.as_ref(), &check)
}

/// A run ended: keep its record, then refuse, shadow or promote.
#[allow(clippy::too_many_arguments)]
fn finished(
    s: &mut State,
    result: Result<Outcome, String>,
    reason: &str,
    before: Snapshot,
    config: &Config,
    store: &Store,
    registry: &Registry,
    events: &Events,
) {
    let p = &s.p;
    let mut outcome = match result {
        Ok(o) => o,
        Err(e) => {
            emit(events, p, "train.failed", format!("Fine-tune failed: {e}"), json!({"reason": reason}));
            return;
        }
    };
    // Number the challenger past every version the registry has (one may have been rolled back).
    if let Some(b) = outcome.challenger.take() {
        let next = registry.versions(&b.manifest.name).unwrap_or_default().into_iter().max().unwrap_or(0) + 1;
        let version = next.max(b.manifest.version);
        match b.with_version(version) {
            Ok(b) => {
                outcome.record.output_version = Some(version);
                outcome.record.output_sha256 = Some(b.sha256());
                outcome.challenger = Some(b);
            }
            Err(e) => outcome.record.outcome = format!("refused: {e}"),
        }
    }
    let record = serde_json::to_value(&outcome.record).unwrap_or(Value::Null);
    if let Err(e) = train::keep_record(&config.state_dir, &outcome.record) {
        tracing::warn!(pipeline = p.config.name, "{e}");
    }
    let gate = outcome.record.gate.as_ref();
    let Some(mut challenger) = outcome.challenger else {
        emit(
            events,
            p,
            "train.refused",
            format!("Challenger refused, champion unchanged: {}", outcome.record.outcome),
            json!({"reason": reason, "run": record}),
        );
        return;
    };
    let gate_line = gate.map(|g| g.reason.clone()).unwrap_or_default();
    // Grown here, signed here: the central server tells it from a pushed bundle by the key.
    if let Some(key) = &p.device_key {
        crate::update::signing::sign_bundle(&mut challenger, key);
    }
    if let Err(e) = registry.add(&challenger) {
        emit(
            events,
            p,
            "train.failed",
            format!("cannot add the challenger to the registry: {e}"),
            json!({"run": record}),
        );
        return;
    }
    emit(
        events,
        p,
        "train.accepted",
        format!("Challenger v{} passed the gate ({gate_line})", challenger.manifest.version),
        json!({"reason": reason, "run": record}),
    );
    if !p.train.shadow.is_zero() && p.performance.is_some() {
        let mut quiet = p.config.clone();
        quiet.drift = None;
        match ActiveModel::load(&challenger, &quiet, config) {
            Ok(model) => {
                if let Some(perf) = &p.performance {
                    if let Ok(mut perf) = perf.lock() {
                        perf.paired = Some(crate::monitor::performance::Paired {
                            shadow_version: model.version,
                            ..Default::default()
                        });
                    }
                }
                p.shadow.store(Some(Arc::new(model)));
                emit(
                    events,
                    p,
                    "shadow.started",
                    format!(
                        "Challenger v{} shadows the champion for {} s",
                        challenger.manifest.version,
                        p.train.shadow.as_secs()
                    ),
                    json!({"run": record}),
                );
                s.stage = Stage::Shadow {
                    challenger: Box::new(challenger),
                    record,
                    until: Instant::now() + p.train.shadow,
                    before,
                };
            }
            Err(e) => {
                emit(events, p, "shadow.failed", format!("the challenger cannot serve: {e}"), json!({"run": record}))
            }
        }
        return;
    }
    promote(s, &challenger, record, before, store, registry, events);
}

/// The shadow period is over: promote if the challenger did at least as well as the champion
/// on the same labeled rows.
fn end_shadow(s: &mut State, _config: &Config, store: &Store, registry: &Registry, events: &Events) {
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

fn promote(
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
    let _ = store.set_meta(&name, "rebase_from", store.stats(&name).map_or(0, |st| st.stored_total));
    emit(
        events,
        &s.p,
        "trial.started",
        format!("Promoted {} v{} (was v{previous}); on trial for {} s", m.name, m.version, trial.as_secs()),
        json!({"run": record, "version": m.version, "previous": previous, "trial_s": trial.as_secs(), "gate_loss": gate_loss}),
    );
    let now = Snapshot::take(&s.p.counters);
    s.stage = Stage::Trial {
        version: m.version,
        previous,
        until: Instant::now() + trial,
        record,
        reference: (before, now),
        start: None,
        promoted: Instant::now(),
        gate_loss,
    };
}

fn clear_trial(store: &Store, pipeline: &str) {
    let _ = store.set_meta(pipeline, "trial_version", 0);
}

/// After a restart mid-trial: the trial goes on for the time it had left.
fn resume_trial(s: &mut State, store: &Store, registry: &Registry) {
    let name = &s.p.config.name;
    let version = store.meta(name, "trial_version").unwrap_or(0);
    let previous = store.meta(name, "trial_previous").unwrap_or(0);
    let until_s = store.meta(name, "trial_until_s").unwrap_or(0);
    let serving = s.p.model.load();
    if version == 0 || serving.version != version || until_s <= now_s() {
        return;
    }
    let gate_loss = registry
        .champion(&serving.name)
        .ok()
        .map_or(f64::NAN, |b| crate::model::baseline::implied_loss(b.manifest.task, &b.manifest.baseline.metrics));
    let now = Snapshot::take(&s.p.counters);
    tracing::info!(pipeline = name, "Resuming the trial of v{version} ({} s left)", until_s - now_s());
    s.stage = Stage::Trial {
        version,
        previous,
        until: Instant::now() + Duration::from_secs(until_s - now_s()),
        record: match store.meta(name, "trial_pushed").unwrap_or(0) {
            1 => json!({"resumed": true, "origin": "pushed"}),
            _ => json!({"resumed": true}),
        },
        reference: (now.clone(), now),
        start: None,
        promoted: Instant::now(),
        gate_loss,
    };
}

/// Judges the version on trial; rolls back on the first clear degradation.
fn watch_trial(s: &mut State, store: &Store, registry: &Registry, events: &Events) {
    let Stage::Trial { version, previous, until, record, reference, start, promoted, gate_loss } = &mut s.stage else {
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
        clear_trial(store, &s.p.config.name);
        s.stage = Stage::Idle;
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
        "run": record, "version": version, "rows": rows, "labels": labels, "live_loss": live_loss,
        "gate_loss": gate_loss, "nonfinite_share": nonfinite, "saturated_share": saturated, "compute_p50_us": p50,
    });
    let name = serving.name.clone();
    let pipeline = s.p.config.name.clone();
    if let Some(why) = failure {
        let (version, previous) = (*version, *previous);
        let back = registry.rollback(&name);
        clear_trial(store, &pipeline);
        s.stage = Stage::Idle;
        // A pushed version stays offered (retained): remember that it failed here.
        if detail["run"]["origin"] == "pushed" {
            let _ = crate::update::floor::Floor::new(registry.state_dir()).failed_trial(&name, version);
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
        clear_trial(store, &pipeline);
        s.stage = Stage::Idle;
        emit(events, &s.p, "trial.passed", format!("{name} v{version} passed its trial"), detail);
        // Only a fine-tuned version carries a reference that is not its own (its parent's
        // validation set); a pushed one brings the validation set it was made with.
        if serving.origin == "fine-tuned" && s.p.config.drift.as_ref().is_some_and(|d| d.rebase_rows > 0) {
            let _ = store.set_meta(&pipeline, "rebase_version", version);
            s.rebase = Some(Rebase { version, from: store.meta(&pipeline, "rebase_from").unwrap_or(0) });
        }
    }
}

/// Re-bases the drift reference of a fine-tuned version that passed its trial, once it has
/// served `drift.rebase_rows` rows since its promotion. Only while its monitor is in alarm
/// against the reference it carries (its parent's validation set, the regime before the
/// change it was adapted to): without an alarm that set still describes the data, and a
/// longer one than a few thousand recent rows, so it stays. The rows are the newest the
/// version served, those of its trial included; the trial's labels vouched for them.
fn rebase(s: &mut State, store: &Store, registry: &Registry, events: &Events) {
    let Some(r) = s.rebase else { return };
    let pipeline = s.p.config.name.clone();
    let serving = s.p.model.load_full();
    let (Some(settings), Some(slot)) = (s.p.config.drift.clone(), serving.monitor.clone()) else {
        return end_rebase(s, store);
    };
    if serving.version != r.version {
        return end_rebase(s, store); // rolled back or replaced: that version's reference no longer matters
    }
    let n = settings.rebase_rows;
    let stored = store.stats(&pipeline).map_or(0, |st| st.stored_total);
    let Some(monitor) = slot.get().filter(|_| stored.saturating_sub(r.from) >= n as u64) else { return };
    // Once, whatever follows: a failure is reported, not retried every tick.
    end_rebase(s, store);
    let (v, model) = (r.version, serving.name.clone());
    let Some((ended, features, source)) = monitor.lock().ok().map(|m| (m.end_alarms(), m.features(), m.source.clone()))
    else {
        return;
    };
    let kept = |why: String| emit(events, &s.p, "drift.kept", why, json!({"version": v, "rows": n}));
    if ended.is_empty() {
        return kept(format!(
            "{model} v{v} served {n} rows with no drift alarm against {source}: that reference is kept"
        ));
    }
    let rows = match store.newest(&pipeline, n, |rec| rec.version == v && rec.features.len() == features.len()) {
        Ok(rows) if rows.len() == n => rows,
        Ok(rows) => {
            return kept(format!(
                "only {} of the {n} rows {model} v{v} served are still in the store: drift reference not re-based",
                rows.len()
            ))
        }
        Err(e) => return kept(format!("cannot read the rows {model} v{v} served: {e}; drift reference not re-based")),
    };
    let series: Vec<String> = ended.iter().map(|a| a.series.clone()).collect();
    let (first, last) = (&rows[0], &rows[rows.len() - 1]);
    let reference = Rebased {
        model: model.clone(),
        version: v,
        bundle_sha256: serving.sha256.clone(),
        created_ms: crate::service::unix_ms(),
        reason: format!("v{v} passed its trial in drift alarm on {} against {source}", series.join(", ")),
        served: ServedSpan {
            first_key: first.key.clone(),
            last_key: last.key.clone(),
            first_ts_ms: first.ts_ms,
            last_ts_ms: last.ts_ms,
        },
        features,
        rows: rows.iter().map(|r| r.features.clone()).collect(),
        scores: rows.iter().map(|r| r.score).collect(),
    };
    // The file first: a restart rebuilds the monitor from it.
    let path = registry.reference_path(&model, v);
    if let Err(e) = reference.write(&path) {
        return kept(format!("cannot keep the re-based drift reference: {e}; not re-based"));
    }
    let started = Instant::now();
    let (flat, scores) = reference.reference();
    let mut rebased = Monitor::new(&flat, &scores, &reference.features, settings);
    rebased.source = crate::infer::rebased_source(&reference);
    if let Ok(mut m) = monitor.lock() {
        *m = rebased;
    }
    // The episodes end with the reference they were raised against, and so does a run they
    // still wanted: the version serving was fine-tuned for this data and vouched for on it.
    for alarm in ended {
        events.emit(Event::Drift { pipeline: pipeline.clone(), model: model.clone(), version: v, alarm });
    }
    s.alarms.retain(|(version, _)| *version != v);
    if let Some((why, _)) = s.wanted.take_if(|(why, _)| why.starts_with("drift")) {
        let message = format!("{why}: the drift reference of v{v} was re-based on the rows it served; not fine-tuning");
        emit(events, &s.p, "train.skipped", message, json!({"reason": why}));
    }
    emit(
        events,
        &s.p,
        "drift.rebased",
        format!(
            "Re-based the drift reference of {model} v{v} on the {n} rows it served (keys {} to {}): it passed its trial in alarm on {} against {source}",
            reference.served.first_key,
            reference.served.last_key,
            series.join(", ")
        ),
        json!({"version": v, "rows": n, "ended": series, "served": reference.served, "replaced": source,
               "path": path, "calibrated_ms": started.elapsed().as_millis() as u64}),
    );
}

fn end_rebase(s: &mut State, store: &Store) {
    s.rebase = None;
    let _ = store.set_meta(&s.p.config.name, "rebase_version", 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop state for the sample model with `train` as its `[pipeline.train]`, and its store.
    fn state(name: &str, train: &str) -> (State, Arc<Store>) {
        state_with_drift(name, "enabled = false", train)
    }

    /// The same with `drift` as its `[pipeline.drift]`.
    fn state_with_drift(name: &str, drift: &str, train: &str) -> (State, Arc<Store>) {
        let dir = std::env::temp_dir().join(format!("lathe-loop-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shuttle-mlp-1.lathe");
        let text = format!(
            "node = \"n\"\nstate_dir = \"{}\"\n[mqtt]\n[[pipeline]]\nname = \"p\"\nmodel = \"{}\"\n\
             source = {{ topic = \"t/+/x\", key = \"/seq\" }}\nsink = {{ topic = \"t/{{device}}/y\" }}\n\
             labels = {{ topic = \"t/+/l\", key = \"/seq\", value = \"/v\" }}\n\
             [pipeline.drift]\n{drift}\n[pipeline.train]\n{train}",
            dir.display(),
            model.display()
        );
        let config = Config::parse(&text, &dir.join("lathe.toml")).unwrap();
        let p = config.pipelines[0].clone();
        let bundle = Bundle::read(&model).unwrap();
        let active = ActiveModel::load(&bundle, &p, &config).unwrap();
        let store = Arc::new(Store::open(config.store.clone()).unwrap());
        let lp = LoopPipeline {
            train: p.train.clone().unwrap(),
            config: p,
            model: Arc::new(arc_swap::ArcSwap::from_pointee(active)),
            shadow: Arc::default(),
            counters: Arc::default(),
            performance: None,
            device_key: None,
        };
        (
            State { p: lp, stage: Stage::Idle, wanted: None, alarms: Default::default(), retry_at: None, rebase: None },
            store,
        )
    }

    #[test]
    fn the_hours_window_may_wrap_midnight() {
        assert!(in_hours_at(None, 0));
        assert!(in_hours_at(Some((120, 240)), 120) && !in_hours_at(Some((120, 240)), 240));
        assert!(!in_hours_at(Some((120, 240)), 60));
        let night = Some((22 * 60, 4 * 60));
        assert!(in_hours_at(night, 23 * 60) && in_hours_at(night, 60) && !in_hours_at(night, 12 * 60));
    }

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
        s.p.train.hours = Some(((minute + 60) % 1440, (minute + 120) % 1440));
        assert_eq!(due(&mut s, &store), None);
    }

    /// A served row of device "d" with key `i`, and its label.
    fn sample(i: u64) -> crate::store::Write {
        crate::store::Write::Sample(Record {
            ts_ms: now_s() * 1000,
            version: 1,
            label: None,
            score: 0.0,
            device: "d".into(),
            key: i.to_string(),
            features: vec![50.0; 9],
            output: vec![1.0, 0.0],
        })
    }
    fn label(i: u64) -> crate::store::Write {
        crate::store::Write::Label { device: "d".into(), key: i.to_string(), value: 0.0, ts_ms: 0 }
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
        let client = rumqttc::v5::AsyncClient::new(rumqttc::v5::MqttOptions::new("t", "127.0.0.1", 1), 10).0;
        let (events, _reporter) = crate::service::events::reporter(client, "e".into());
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

    /// A trial fed `degrade` after a healthy champion window; returns whether it rolled back.
    fn trial_rolls_back(name: &str, degrade: impl Fn(&Counters)) -> bool {
        let (mut s, store) = state(name, "trigger = []\n");
        let dir = store.settings().path.parent().unwrap().to_path_buf();
        let registry = Registry::new(&dir);
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shuttle-mlp-1.lathe");
        let v1 = registry.seed(&model).unwrap();
        registry.add(&v1.clone().with_version(2).unwrap()).unwrap();
        registry.promote("shuttle-mlp", 2).unwrap();
        let client = rumqttc::v5::AsyncClient::new(rumqttc::v5::MqttOptions::new("t", "127.0.0.1", 1), 10).0;
        let (events, _reporter) = crate::service::events::reporter(client, "e".into());
        let c = s.p.counters.clone();
        let before = Snapshot::take(&c);
        // The champion's window: 1,000 rows, healthy, 50 µs per row.
        c.predicted.fetch_add(1_000, Relaxed);
        for _ in 0..100 {
            c.compute.observe(&COMPUTE_BUCKETS_US, 50);
        }
        s.stage = Stage::Trial {
            version: 2,
            previous: 1,
            until: Instant::now() + Duration::from_secs(600),
            record: json!({}),
            reference: (before, Snapshot::take(&c)),
            start: None,
            promoted: Instant::now() - Duration::from_secs(10),
            gate_loss: 0.01,
        };
        watch_trial(&mut s, &store, &registry, &events);
        assert!(matches!(s.stage, Stage::Trial { .. }), "nothing served on trial yet");
        c.predicted.fetch_add(500, Relaxed);
        degrade(&c);
        watch_trial(&mut s, &store, &registry, &events);
        let rolled_back = matches!(s.stage, Stage::Idle);
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

    /// A version whose monitor is in alarm against the reference it carries has that
    /// reference replaced by the rows it served, once it has served `rebase_rows`; one that is
    /// not in alarm keeps it. Either way the pending re-base is over.
    #[test]
    fn a_version_in_drift_alarm_is_re_based_on_the_rows_it_served_and_one_without_keeps_its_reference() {
        let (mut s, store) = state_with_drift(
            "rebase",
            "window = 100\nevery = 50\nbootstrap = 100\nrebase_rows = 400",
            "trigger = []\n",
        );
        let registry = Registry::new(store.settings().path.parent().unwrap());
        let client = rumqttc::v5::AsyncClient::new(rumqttc::v5::MqttOptions::new("t", "127.0.0.1", 1), 10).0;
        let (events, _reporter) = crate::service::events::reporter(client, "e".into());
        let serving = s.p.model.load_full();
        let slot = serving.monitor.clone().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while slot.get().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let monitor = slot.get().unwrap();
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shuttle-mlp-1.lathe");
        let validation = Bundle::read(&model).unwrap().validation_rows().unwrap();
        let store_rows = |from: usize, rows: &[Vec<f32>]| {
            let writes: Vec<crate::store::Write> = rows
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    crate::store::Write::Sample(Record {
                        ts_ms: now_s() * 1000,
                        version: 1,
                        label: None,
                        score: 0.5,
                        device: "d".into(),
                        key: (from + i).to_string(),
                        features: r.clone(),
                        output: vec![0.5, 0.5],
                    })
                })
                .collect();
            store.apply(&[("p", &writes)], now_s() * 1000).unwrap();
        };
        let clean: Vec<Vec<f32>> = validation.chunks_exact(9).take(800).map(<[f32]>::to_vec).collect();
        let faulty: Vec<Vec<f32>> = clean.iter().map(|r| [&[r[0] + 20.0], &r[1..]].concat()).collect();
        let source = |m: &Monitor| m.source.clone();
        let path = registry.reference_path("shuttle-mlp", 1);

        // Clean rows: no alarm, so the validation set stays.
        s.rebase = Some(Rebase { version: 1, from: 0 });
        store_rows(0, &clean[..300]);
        rebase(&mut s, &store, &registry, &events);
        assert!(s.rebase.is_some(), "300 of 400 rows served: still waiting");
        store_rows(300, &clean[300..400]);
        rebase(&mut s, &store, &registry, &events);
        assert!(s.rebase.is_none() && !path.exists());
        assert_eq!(source(&monitor.lock().unwrap()), crate::monitor::VALIDATION_SET);

        // The f1 fault: the monitor alarms on f1, then the 400 faulty rows become its reference.
        let mut alarms = Vec::new();
        for r in &faulty[..200] {
            monitor.lock().unwrap().observe(r, 0.5, &mut alarms);
        }
        assert!(alarms.iter().any(|a| a.series == "f1" && a.raised), "{alarms:?}");
        s.alarms.insert((1, "f1".into()));
        s.wanted = Some(("drift on f1 (ks)".into(), 0));
        let from = store.stats("p").unwrap().stored_total;
        s.rebase = Some(Rebase { version: 1, from });
        store_rows(1000, &faulty[..400]);
        rebase(&mut s, &store, &registry, &events);
        assert!(s.rebase.is_none() && s.alarms.is_empty() && s.wanted.is_none(), "the episode and its run are over");
        let m = monitor.lock().unwrap();
        assert_eq!((m.reference_rows(), source(&m)), (400, "400 rows v1 served (keys 1000 to 1399)".to_string()));
        assert!(m.state().iter().all(|x| !x.alarm));
        drop(m);
        let kept = Rebased::read_for(&path, &serving.sha256, &monitor.lock().unwrap().features()).unwrap().unwrap();
        assert!(kept.rows.iter().all(|r| r[0] >= 20.0) && kept.rows.len() == 400, "the faulty rows it served");
        // The same fault no longer alarms against the new reference.
        alarms.clear();
        for r in faulty[400..].iter().chain(&faulty[..200]) {
            monitor.lock().unwrap().observe(r, 0.5, &mut alarms);
        }
        assert!(alarms.iter().all(|a| a.series != "f1"), "{alarms:?}");
    }

    /// A fine-tune whose loop has ended (a stop or a reload) stops at its next epoch, and
    /// frees the one training slot, instead of running on for a result nobody reads.
    #[test]
    fn a_run_started_by_a_loop_that_has_ended_stops_at_its_next_epoch() {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shuttle-mlp-1.lathe");
        let bundle = Bundle::read(&model).unwrap();
        let f = bundle.manifest.inputs.len();
        let (x, y) = (bundle.validation_rows().unwrap(), bundle.validation_targets().unwrap());
        let rows = || crate::store::TrainingRows {
            recent: x
                .chunks_exact(f)
                .zip(&y)
                .map(|(row, &label)| Record {
                    ts_ms: 0,
                    version: 1,
                    label: Some(label),
                    score: 0.0,
                    device: "d".into(),
                    key: "k".into(),
                    features: row.to_vec(),
                    output: vec![0.0],
                })
                .collect(),
            older: Vec::new(),
        };
        let training = bundle.manifest.training.clone();
        let gpu = train::GpuSettings { cache_dir: None, max_gpu_mem_mb: 0 };
        let limits = (Duration::from_secs(600), 1 << 20);
        let now = LOOPS_ENDED.load(Relaxed);
        let stale = train_on_rows(&bundle, rows(), "t", &training, limits, ("cpu", &gpu), now.wrapping_sub(1));
        assert_eq!(stale.err().as_deref(), Some("stopped: the daemon is stopping or reloading"));
        assert!(train_on_rows(&bundle, rows(), "t", &training, limits, ("cpu", &gpu), now).is_ok());
    }
}
