//! The closed loop: when to fine-tune, and what happens to the result.
//!
//! ```text
//! trigger (drift event | every D | N new labels | cmd/train)   cooldown, hours, one at a time
//!   → rows from the store (newest labeled, or judged normal for reconstruction; replay sample)
//!   → `train::fine_tune_with` on the "lathe-train" thread (SCHED_IDLE, time and memory limits)
//!   → gate refused: event train.refused, champion unchanged
//!   → gate accepted: challenger into the registry
//!   → shadow (optional): it scores live traffic beside the champion; compared on the labels
//!   → promote (registry champion; the swapper swaps it in) → trial
//!   → trial: live loss on its own labeled predictions, output health, median compute per row
//!   → degrade: roll back to the previous version (event trial.failed); else trial.passed
//! ```
//! Every step is an event on `lathe/{node}/events` carrying the run record. The trial is kept
//! in the store's meta, so a restart mid-trial resumes it rather than forgetting it.
//!
//! This file holds the loop itself: its state, its messages, its tick. The steps are one file
//! each, in the order above: `trigger` (when to run), `training` (the run and its result),
//! `trial` (shadow, promotion, trial, rollback) and `rebase` (a trial passed in drift alarm).

mod rebase;
mod training;
mod trial;
mod trigger;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use crate::config::{Config, PipelineConfig, TrainConfig};
use crate::infer::{ActiveModel, SharedModel};
use crate::model::{Bundle, Registry};
use crate::monitor::performance::Performance;
use crate::store::Store;
use crate::telemetry::events::DriftTrigger;
use crate::telemetry::events::{Counters, Event, Events};
use crate::train::Outcome;
use trial::{Snapshot, Trial};

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

use crate::telemetry::inbox::LoopMessage;

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
    /// `share = true`: where accepted challengers go for federated averaging.
    pub share: Option<(rumqttc::v5::AsyncClient, String)>,
}

enum Stage {
    Idle,
    Training {
        done: oneshot::Receiver<Result<Outcome, crate::train::TrainError>>,
        reason: String,
        /// A drift run on the regime's rows: the store's sample count when it started (the
        /// first sample it could not see). The next run waits for more of them.
        regime: Option<u64>,
        /// The champion's version it fine-tunes: rolled back or replaced meanwhile, the result
        /// is dropped (it would undo the rollback).
        parent: u64,
        before: Snapshot,
    },
    Shadow {
        challenger: Box<Bundle>,
        record: Value,
        until: Instant,
        before: Snapshot,
    },
}

struct State {
    p: LoopPipeline,
    stage: Stage,
    /// A promoted version being watched on live traffic. Beside the stage, not one of its
    /// steps: a drift regime that goes on changing (a gradual drift) trains again while the
    /// version it made is on trial, rather than waiting out the trial on a model falling behind.
    trial: Option<Trial>,
    /// A run that found the one training slot taken (another pipeline trains): its reason.
    wanted: Option<String>,
    /// The new regime after a drift alarm: drift runs train on its rows only (`trigger`).
    regime: Option<trigger::Regime>,
    /// Drift alarms raised and not yet ended, by model version and series. A regime is
    /// dropped when the last one ends before its first run: training then would learn the
    /// old regime (measured in the demo: a multivariate alarm 0.5 % over its threshold that
    /// ended 130 ms later started a run on pre-fault rows, whose cooldown then hid the real
    /// fault).
    alarms: std::collections::BTreeSet<(u64, String)>,
    /// Not before this (a skipped run waits a minute before trying again).
    retry_at: Option<Instant>,
    /// A fine-tuned version that passed its trial, waiting to have served enough rows to
    /// re-base its drift reference on (`rebase`).
    rebase: Option<Rebase>,
}

impl State {
    /// A pipeline's loop, idle, before anything happened.
    fn new(p: LoopPipeline) -> State {
        State {
            p,
            stage: Stage::Idle,
            trial: None,
            wanted: None,
            regime: None,
            alarms: Default::default(),
            retry_at: None,
            rebase: None,
        }
    }
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
    let mut states: Vec<State> = pipelines.into_iter().map(State::new).collect();
    for s in &mut states {
        trial::resume_trial(s, &store, &registry);
        let version = store.meta(&s.p.config.name, "rebase_version").unwrap_or(0);
        if version != 0 && version == s.p.model.load().version {
            let from = store.meta(&s.p.config.name, "rebase_from").unwrap_or(0);
            s.rebase = Some(Rebase { version, from });
        }
    }
    // A steady tick, apart from the messages: frequent commands or alarms must not starve it.
    let mut next_tick = Instant::now();
    let heartbeat = crate::telemetry::liveness::register("closed loop");
    while !*stop.borrow() {
        let message = messages.recv_timeout(next_tick.saturating_duration_since(Instant::now()));
        let busy = heartbeat.busy();
        match message {
            Ok(LoopMessage::Drift(DriftTrigger { pipeline, series, reason, since_change, raised, stored })) => {
                if let Some(s) = states.iter_mut().find(|s| s.p.config.name == pipeline) {
                    let alarm = trigger::Alarm { series, reason, since_change, raised, stored };
                    trigger::drift(s, alarm, &store, &events);
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
                    trial::promote(s, &bundle, record.clone(), before, &store, &registry, &events);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // No ingest any more (stopping): wait out the tick instead.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                drop(busy); // waiting is not work
                std::thread::sleep(next_tick.saturating_duration_since(Instant::now()));
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
    crate::telemetry::unix_ms() / 1000
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
            "train" if s.p.config.train.is_none() => emit(
                events,
                &s.p,
                "command.refused",
                "this pipeline has no [pipeline.train]".into(),
                json!({"command": "train"}),
            ),
            "train" if matches!(s.stage, Stage::Idle) && s.trial.is_none() => {
                // Debug builds only (the tests): `"__lathe_debug_panic": true` makes the run
                // panic, to show a panic fails that run and not every later one.
                let panic = cfg!(debug_assertions) && text.contains("\"__lathe_debug_panic\":true");
                training::start(s, if panic { DEBUG_PANIC } else { "command" }, None, config, store, events)
            }
            "train" => emit(events, &s.p, "train.skipped", "a run or trial is already in progress".into(), json!({})),
            "rollback" => {
                let name = s.p.model.load().name.clone();
                match registry.rollback(&name) {
                    Ok((from, to)) => {
                        // A pushed version rolled back stays rolled back (see trust::floor).
                        let floor = crate::trust::floor::Floor::new(registry.state_dir());
                        if let Err(e) = from.map_or(Ok(()), |v| floor.rolled_back(&name, v)) {
                            tracing::warn!(pipeline = s.p.config.name, "{e}");
                        }
                        s.stage = Stage::Idle;
                        s.trial = None;
                        trial::clear_trial(store, registry, &s.p.config.name, &name);
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
                format!("unknown command {other:?}; expected train, rollback or status"),
                json!({"command": other}),
            ),
        }
    }
}

fn emit(events: &Events, p: &LoopPipeline, step: &'static str, message: String, detail: Value) {
    events.emit(Event::Step { pipeline: p.config.name.clone(), step, message, detail });
}

fn tick(s: &mut State, config: &Config, store: &Arc<Store>, registry: &Registry, events: &Events) {
    rebase::rebase(s, store, registry, events);
    if s.trial.is_some() {
        trial::watch_trial(s, store, registry, events);
    }
    match &mut s.stage {
        Stage::Idle => {
            if let Some(due) = trigger::due(s, store) {
                training::start(s, &due.reason, due.from, config, store, events);
            }
        }
        Stage::Training { done, .. } => {
            let result = match done.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return,
                Err(oneshot::error::TryRecvError::Closed) => {
                    Err(crate::train::TrainError::Panicked("the training thread ended without a result".into()))
                }
                Ok(result) => result,
            };
            let Stage::Training { reason, regime, parent, before, .. } = std::mem::replace(&mut s.stage, Stage::Idle)
            else {
                return;
            };
            training::finished(s, result, (&reason, regime, parent), before, config, store, registry, events);
        }
        Stage::Shadow { until, .. } => {
            let paired = s.p.performance.as_ref().and_then(|p| p.lock().ok().and_then(|p| p.paired));
            let labels = paired.map_or(0, |p| p.labels);
            if Instant::now() >= *until && labels >= s.p.train.min_live_labels as u64 {
                trial::end_shadow(s, store, registry, events);
            }
        }
    }
}

#[cfg(test)]
mod test_support;
