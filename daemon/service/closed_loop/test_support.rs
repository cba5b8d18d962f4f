//! What the loop's unit tests share: a loop state over the sample model, its store, rows and
//! labels to put in it, and an events handle.

use std::sync::Arc;

use super::now_s;
use super::{LoopPipeline, State};
use crate::config::Config;
use crate::infer::ActiveModel;
use crate::model::Bundle;
use crate::store::{Record, Store};
use crate::telemetry::events::Events;

/// A loop state for the sample model with `train` as its `[pipeline.train]`, and its store.
pub(super) fn state(name: &str, train: &str) -> (State, Arc<Store>) {
    state_with_drift(name, "enabled = false", train)
}

/// The same with `drift` as its `[pipeline.drift]`.
pub(super) fn state_with_drift(name: &str, drift: &str, train: &str) -> (State, Arc<Store>) {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shuttle-mlp-1.lathe");
    state_for(name, &model, "", drift, train)
}

/// The same for the bundle at `model`, with `pipeline` added to its `[[pipeline]]` (a
/// sequence model's `window`).
pub(super) fn state_for(
    name: &str,
    model: &std::path::Path,
    pipeline: &str,
    drift: &str,
    train: &str,
) -> (State, Arc<Store>) {
    let dir = std::env::temp_dir().join(format!("lathe-loop-unit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "node = \"n\"\nstate_dir = \"{}\"\n[mqtt]\n[[pipeline]]\nname = \"p\"\nmodel = \"{}\"\n{pipeline}\
         source = {{ topic = \"t/+/x\", key = \"/seq\" }}\nsink = {{ topic = \"t/{{device}}/y\" }}\n\
         labels = {{ topic = \"t/+/l\", key = \"/seq\", value = \"/v\" }}\n\
         [pipeline.drift]\n{drift}\n[pipeline.train]\n{train}",
        dir.display(),
        model.display()
    );
    let config = Config::parse(&text, &dir.join("lathe.toml")).unwrap();
    let p = config.pipelines[0].clone();
    let bundle = Bundle::read(model).unwrap();
    let active = ActiveModel::load(&bundle, &p, config.load_context()).unwrap();
    let store = Arc::new(Store::open(config.store.clone()).unwrap());
    let lp = LoopPipeline {
        train: p.train.clone().unwrap(),
        config: p,
        model: Arc::new(arc_swap::ArcSwap::from_pointee(active)),
        shadow: Arc::default(),
        counters: Arc::default(),
        performance: None,
        device_key: None,
        share: None,
    };
    (State::new(lp), store)
}

/// A row v1 served to device "d" under key `i` (features all 50), and its label.
pub(super) fn sample(i: u64) -> crate::store::Write {
    served(i, vec![50.0; 9])
}

/// A row v1 served to device "d" under key `i`, with these features.
pub(super) fn served(i: u64, features: Vec<f32>) -> crate::store::Write {
    crate::store::Write::Sample(Record {
        ts_ms: now_s() * 1000,
        version: 1,
        label: None,
        score: 0.5,
        device: "d".into(),
        key: i.to_string(),
        features,
        output: vec![0.5, 0.5],
    })
}

pub(super) fn label(i: u64) -> crate::store::Write {
    crate::store::Write::Label { device: "d".into(), key: i.to_string(), value: 0.0, ts_ms: 0 }
}

/// An events handle (and the task that would publish them, held so the channel stays open).
pub(super) fn events() -> (Events, impl std::future::Future<Output = ()>) {
    let client = rumqttc::v5::AsyncClient::new(rumqttc::v5::MqttOptions::new("t", "127.0.0.1", 1), 10).0;
    crate::telemetry::events::reporter(client, "e".into(), None)
}

/// Version 2 on trial, promoted from 1 a moment ago.
pub(super) fn on_trial(s: &State) -> super::Trial {
    let now = super::Snapshot::take(&s.p.counters);
    super::Trial {
        version: 2,
        previous: 1,
        until: std::time::Instant::now() + std::time::Duration::from_secs(600),
        record: serde_json::json!({}),
        reference: (now.clone(), now),
        start: None,
        promoted: std::time::Instant::now(),
        gate_loss: 0.01,
    }
}
