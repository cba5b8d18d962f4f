//! A fine-tuned version that passed its trial while in drift alarm gets a new drift
//! reference: the rows it served.

use std::time::Instant;

use serde_json::json;

use super::{emit, State};
use crate::model::Registry;
use crate::monitor::reference::{Rebased, ServedSpan};
use crate::monitor::Monitor;
use crate::store::Store;
use crate::telemetry::events::{Event, Events};

/// Re-bases the drift reference of a fine-tuned version that passed its trial, once it has
/// served `drift.rebase_rows` rows since its promotion. Only while its monitor is in alarm
/// against the reference it carries (its parent's validation set, the regime before the
/// change it was adapted to): without an alarm that set still describes the data, and a
/// longer one than a few thousand recent rows, so it stays. The rows are the newest the
/// version served, those of its trial included; the trial's labels vouched for them.
pub(super) fn rebase(s: &mut State, store: &Store, registry: &Registry, events: &Events) {
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
    // A record holds what the model took; the monitor watches each message's own frame, the
    // last of a sequence model's window.
    let f = features.len();
    let width = f * serving.engine.signature.frames;
    let rows = match store.newest(&pipeline, n, |rec| rec.version == v && rec.features.len() == width) {
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
        created_ms: crate::telemetry::unix_ms(),
        reason: format!("v{v} passed its trial in drift alarm on {} against {source}", series.join(", ")),
        served: ServedSpan {
            first_key: first.key.clone(),
            last_key: last.key.clone(),
            first_ts_ms: first.ts_ms,
            last_ts_ms: last.ts_ms,
        },
        features,
        rows: rows.iter().map(|r| r.features[width - f..].to_vec()).collect(),
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
    if let Some(regime) = s.regime.take() {
        let why = regime.reason;
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
    use crate::model::Bundle;
    use crate::service::closed_loop::test_support::{events, served, state_for, state_with_drift};
    use crate::service::closed_loop::{now_s, Rebase};
    use std::time::Duration;

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
        let (events, _reporter) = events();
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
            let writes: Vec<_> = rows.iter().enumerate().map(|(i, r)| served((from + i) as u64, r.clone())).collect();
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
        s.regime = Some(crate::service::closed_loop::trigger::Regime {
            reason: "drift on f1 (ks)".into(),
            from: 0,
            need: 50,
            runs: 0,
        });
        let from = store.stats("p").unwrap().stored_total;
        s.rebase = Some(Rebase { version: 1, from });
        store_rows(1000, &faulty[..400]);
        rebase(&mut s, &store, &registry, &events);
        assert!(s.rebase.is_none() && s.alarms.is_empty() && s.regime.is_none(), "the episode and its run are over");
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

    /// A sequence pipeline stores each prediction's whole window; its re-based reference is
    /// the frame that ended each window (the message's own, what the monitor watches).
    #[test]
    fn a_sequence_model_is_re_based_on_the_frames_that_ended_its_windows() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::temp_dir().join(format!("lathe-rebase-seq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let validation = std::fs::read_to_string(root.join("tests/fixtures/zoo/gru-head-w16.csv")).unwrap();
        let opts = crate::model::bundle::CreateOptions {
            name: "co2".into(),
            version: 1,
            task: crate::model::Task::Regression,
            target: Some("next_co2".into()),
            features: None,
            ranges: [("co2".to_string(), (0.0, 5000.0))].into(),
            units: Default::default(),
            source_model: "gru-head-w16.onnx".into(),
            data_name: "gru-head-w16.csv".into(),
            trainable: "full".into(),
        };
        let onnx = std::fs::read(root.join("tests/fixtures/zoo/gru-head-w16.onnx")).unwrap();
        let bundle = crate::model::bundle::create(onnx, &validation, &opts).unwrap();
        let model = dir.join("co2.lathe");
        std::fs::write(&model, bundle.to_bytes().unwrap()).unwrap();
        let (mut s, store) = state_for(
            "rebase-seq",
            &model,
            "window = { size = 16 }\n",
            "window = 20\nevery = 10\nbootstrap = 100\nrebase_rows = 40",
            "trigger = []\n",
        );
        let registry = Registry::new(store.settings().path.parent().unwrap());
        let (events, _reporter) = events();
        let slot = s.p.model.load_full().monitor.clone().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while slot.get().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let monitor = slot.get().unwrap();
        // The room's CO2 sensor now reads 2,000 ppm high.
        let frames: Vec<f32> = bundle
            .validation_rows()
            .unwrap()
            .chunks_exact(4)
            .map(|f| [&f[..3], &[f[3] + 2000.0]].concat())
            .collect::<Vec<_>>()
            .concat();
        let windows = crate::engine::sliding_windows(&frames, 4, 16);
        let mut alarms = Vec::new();
        for frame in frames.chunks_exact(4).skip(15) {
            monitor.lock().unwrap().observe(frame, 0.5, &mut alarms);
        }
        assert!(alarms.iter().any(|a| a.series == "co2" && a.raised), "{alarms:?}");
        s.alarms.insert((1, "co2".into()));
        s.rebase = Some(Rebase { version: 1, from: 0 });
        let writes: Vec<_> = windows.chunks_exact(64).enumerate().map(|(i, w)| served(i as u64, w.to_vec())).collect();
        store.apply(&[("p", &writes)], now_s() * 1000).unwrap();
        rebase(&mut s, &store, &registry, &events);
        let m = monitor.lock().unwrap();
        assert_eq!(m.reference_rows(), 40, "{}", m.source);
        drop(m);
        let path = registry.reference_path("co2", 1);
        let kept =
            Rebased::read_for(&path, &s.p.model.load().sha256, &monitor.lock().unwrap().features()).unwrap().unwrap();
        // The newest 40 windows, each by its own (last) frame.
        let newest: Vec<Vec<f32>> = windows.chunks_exact(64).rev().take(40).rev().map(|w| w[60..].to_vec()).collect();
        assert_eq!(kept.rows, newest);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
