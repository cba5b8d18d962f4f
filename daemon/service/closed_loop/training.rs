//! A training run: the rows from the store, the fine-tune on its own thread (SCHED_IDLE,
//! time and memory limits, a panic caught), and its result: refused, shadowed or promoted.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::trial::{promote, Snapshot};
use super::trigger::usable_rows;
use super::{emit, now_s, Stage, State, LOOPS_ENDED, TRAINING};
use crate::config::Config;
use crate::infer::ActiveModel;
use crate::model::{Bundle, Registry, Task};
use crate::store::{Record, Store};
use crate::telemetry::events::Events;
use crate::train::{self, data::Dataset, Outcome, Replay, TrainError};

/// Gathers the rows and starts the run on its own thread: the newest `rows`, or (a drift run,
/// `from`) the newest of those stored from sample `from` on, the new regime.
pub(super) fn start(
    s: &mut State,
    reason: &str,
    from: Option<u64>,
    config: &Config,
    store: &Arc<Store>,
    events: &Events,
) {
    let p = &s.p;
    let name = p.config.name.clone();
    let registry = Registry::new(&config.state_dir).with_engine(config.infer.engine.clone());
    let placeholder = p.model.load().placeholder;
    let champion = match &p.config.model {
        crate::config::ModelRef::ColdStart(c) if placeholder => {
            train::cold_start::serving(&registry, &p.config.name, c)
        }
        _ => registry.champion(&p.model.load().name),
    };
    let champion = match champion {
        Ok(b) => b,
        Err(e) => {
            emit(events, p, "train.failed", format!("cannot read the champion: {e}"), json!({}));
            return;
        }
    };
    // A cheap count first; the rows themselves are read on the training thread.
    let usable = usable_rows(s, store);
    let min_rows = if placeholder { super::trigger::cold_start_need(s, store) as usize } else { p.train.min_rows };
    if usable < min_rows as u64 {
        s.retry_at = Some(Instant::now() + Duration::from_secs(60));
        emit(
            events,
            p,
            "train.skipped",
            format!("{reason}: only {usable} usable rows in the store (min_rows = {min_rows})"),
            json!({"reason": reason, "rows": usable, "min_rows": min_rows}),
        );
        return;
    }
    if TRAINING.swap(true, Relaxed) {
        if from.is_none() {
            s.wanted = Some(reason.to_string()); // a drift run is wanted by its regime still
        }
        s.retry_at = Some(Instant::now() + Duration::from_secs(5));
        return;
    }
    let mut champion = champion;
    let parent = champion.manifest.version;
    let mut training = champion.manifest.training.clone();
    p.train.overrides.apply(&mut training);
    p.train.overrides.apply_gate(&mut champion.manifest.gate);
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
    let (store_for_run, rows_wanted) = (store.clone(), p.train.rows);
    let generation = LOOPS_ENDED.load(Relaxed);
    let spawned = std::thread::Builder::new().name("lathe-train".into()).spawn(move || {
        lower_priority();
        // A panic inside a dependency (cudarc asserts, tract) fails this run, not every later
        // one: TRAINING is cleared and the loop gets the reason.
        let run = std::panic::AssertUnwindSafe(|| {
            #[cfg(debug_assertions)]
            #[allow(clippy::panic)]
            if data_name.ends_with(&format!("({})", super::DEBUG_PANIC)) {
                panic!("{} asked for by the command", super::DEBUG_PANIC);
            }
            let rows = read_rows(&store_for_run, &name_for_run, &champion, (rows_wanted, from.unwrap_or(0)), min_rows);
            rows.map_err(TrainError::Data).and_then(|rows| {
                let data_name = format!("{data_name}: {}", describe_rows(&rows.recent, crate::telemetry::unix_ms()));
                train_on_rows(&champion, rows, &data_name, &training, limits, (&backend, &gpu), generation)
            })
        });
        let result =
            std::panic::catch_unwind(run).unwrap_or_else(|p| Err(TrainError::Panicked(crate::panic_message(p))));
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
    // A regime run: the first sample it could not see (where its successor's own rows begin).
    let regime = from.map(|_| store.stats(&name).map_or(0, |st| st.stored_total));
    let reason = reason.to_string();
    s.stage = Stage::Training { done: rx, reason, regime, parent, before: Snapshot::take(&p.counters) };
}

/// `share = true`: the accepted challenger, retained at QoS 1 on `lathe/{node}/share/{pipeline}`
/// (the newest replaces the one before), for `lathe aggregate` to average with other devices'.
fn share(p: &super::LoopPipeline, challenger: &Bundle, events: &Events) {
    let Some((client, topic)) = &p.share else { return };
    let sent = challenger.to_bytes().map_err(|e| e.to_string()).and_then(|bytes| {
        client
            .try_publish(topic.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce, true, bytes)
            .map_err(|e| e.to_string())
    });
    if let Err(e) = sent {
        emit(events, p, "share.failed", format!("v{} not shared: {e}", challenger.manifest.version), json!({}));
    }
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

/// The run's rows from the store: the newest `rows` labeled ones from sample `from` on
/// (reconstruction: those the serving model judged normal), and the older labeled ones for
/// the gate's replay check.
fn read_rows(
    store: &Store,
    pipeline: &str,
    champion: &Bundle,
    (rows, from): (usize, u64),
    min_rows: usize,
) -> Result<crate::store::TrainingRows, String> {
    let (task, threshold) = (champion.manifest.task, champion.manifest.baseline.threshold);
    // A placeholder judged nothing normal: an autoencoder grows from every row.
    let threshold = threshold.filter(|_| champion.manifest.cold_start.is_none());
    let rows = store
        .training_rows(pipeline, rows, from, |r: &Record| match task {
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
) -> Result<Outcome, TrainError> {
    let m = &champion.manifest;
    let classes = train::classes(champion, training)?;
    let supervised = m.task != Task::Reconstruction;
    let mut data = Dataset::for_model(m);
    let mut x = Vec::with_capacity(m.inputs.len());
    for r in &rows.recent {
        x.clear();
        x.extend(r.features.iter().map(|&v| f64::from(v)));
        data.push(m, classes, &x, r.label);
    }
    // The replay sample goes through the same checks (its dropped rows are not reported).
    let replay = supervised.then(|| {
        let mut older = Dataset::for_model(m);
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
pub(super) fn finished(
    s: &mut State,
    result: Result<Outcome, TrainError>,
    (reason, regime, parent): (&str, Option<u64>, u64),
    before: Snapshot,
    config: &Config,
    store: &Store,
    registry: &Registry,
    events: &Events,
) {
    // A drift run, accepted or not: the next waits for more rows of the regime.
    let next_run = |s: &mut State, accepted| {
        let next = regime.and_then(|unseen| super::trigger::regime_run_ended(s, accepted, unseen));
        next.map(|n| format!("; {n}")).unwrap_or_default()
    };
    let mut outcome = match result {
        Ok(o) => o,
        Err(e) => {
            let next = next_run(s, false);
            emit(events, &s.p, "train.failed", format!("Fine-tune failed: {e}{next}"), json!({"reason": reason}));
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
        tracing::warn!(pipeline = s.p.config.name, "{e}");
    }
    // A cold-start placeholder is version 0 and never in the registry.
    let serving = registry.champion_version(&s.p.model.load().name).ok().flatten().unwrap_or(0);
    if outcome.challenger.is_some() && serving != parent {
        let why = format!(
            "Challenger dropped: v{parent}, which it fine-tuned, is no longer the champion (rolled back or replaced)"
        );
        emit(events, &s.p, "train.refused", why, json!({"reason": reason, "run": record}));
        return;
    }
    let next = next_run(s, outcome.challenger.is_some());
    let p = &s.p;
    let gate = outcome.record.gate.as_ref();
    if outcome.challenger.is_none() && s.p.model.load().placeholder {
        let need = super::trigger::cold_start_need(s, store) * 2;
        let _ = store.set_meta(&s.p.config.name, "cold_start_need", need);
        outcome.record.outcome =
            format!("{}; the next cold-start run waits for {need} usable rows", outcome.record.outcome);
    }
    let Some(mut challenger) = outcome.challenger else {
        emit(
            events,
            &s.p,
            "train.refused",
            format!("Challenger refused, champion unchanged: {}{next}", outcome.record.outcome),
            json!({"reason": reason, "run": record}),
        );
        return;
    };
    let gate_line = gate.map(|g| g.reason.clone()).unwrap_or_default();
    // Grown here, signed here: the central server tells it from a pushed bundle by the key.
    if let Some(key) = &p.device_key {
        crate::trust::signing::sign_bundle(&mut challenger, key);
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
    share(p, &challenger, events);
    emit(
        events,
        p,
        "train.accepted",
        format!("Challenger v{} passed the gate ({gate_line}){next}", challenger.manifest.version),
        json!({"reason": reason, "run": record}),
    );
    if !p.train.shadow.is_zero() && p.performance.is_some() {
        let mut quiet = p.config.clone();
        quiet.drift = None;
        match ActiveModel::load(&challenger, &quiet, config.load_context()) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let stopped = stale.err().map(|e| (matches!(e, TrainError::Stopped(_)), e.to_string()));
        assert_eq!(stopped, Some((true, "stopped: the daemon is stopping or reloading".to_string())));
        assert!(train_on_rows(&bundle, rows(), "t", &training, limits, ("cpu", &gpu), now).is_ok());
    }
}
