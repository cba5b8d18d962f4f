//! Service: wires the stages together and runs them until told to stop.
//!
//! Start: load every pipeline's champion bundle, connect, start one inference task per
//! pipeline and the ingest loop. Stop (SIGTERM/SIGINT): ingest stops taking messages, each
//! pipeline drains what it holds and publishes, then the final status goes out and the client
//! disconnects cleanly. Nothing accepted is lost: what was not answered was not acked either.

pub(crate) mod closed_loop;
mod code_pages;
pub mod crash_guard;
mod load;
pub mod metrics;
mod reload;
mod run;
mod status;
mod swap;
mod windows;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::{mpsc, watch};

use crate::config::{BrokerUrl, Config, ConfigErrors, TrainConfig};
use arc_swap::ArcSwap;

use crate::infer::{Pipeline, SharedModel};
use crate::ingest::{connection, Ingest, Route, TopicFilter};
use crate::telemetry::events::Counters;
use crate::telemetry::{events, systemd};

use crate::telemetry::STATUS_EVERY;
use load::load_models_noting;
pub use load::{check_models, load_config};
pub use reload::{fingerprints, prepare, shutdown_signal, stop_or_reload, Ending, Kept, Prepared, Running};
use status::{report_silent_devices, status, status_line};
use windows::{resume_windows, save_windows};
/// How long a stop may take to drain and disconnect before giving up.
const DRAIN_DEADLINE: Duration = Duration::from_secs(15);

/// Why a run could not start. Nothing is left running (see `run::build`), so a reload that
/// fails with one of these rolls back to the config that ran before.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// The broker's settings, a topic filter, the embedded broker, or a session of the
    /// updater or the Sparkplug edge node that cannot be set up.
    #[error("{0}")]
    Broker(String),
    #[error("{0}")]
    Connect(#[from] crate::mqtt::ConnectError),
    #[error("cannot serve metrics: {0}")]
    Metrics(String),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    /// `[update] device_key`, which signs the device's own fine-tunes.
    #[error("update.device_key: {0}")]
    DeviceKey(String),
    /// A pipeline whose model was neither kept, prepared nor loaded (a bundle changed while
    /// the reload prepared it).
    #[error("pipeline {0}: its model did not load")]
    NoModel(String),
    /// A thread of the daemon (the store's writer, the training loop) did not start.
    #[error("{0}")]
    Thread(String),
}

/// One running pipeline as the status report sees it (its parts are shared handles).
#[derive(Clone)]
pub struct Serving {
    pub pipeline: String,
    pub model: SharedModel,
    pub counters: Arc<Counters>,
    pub performance: Option<Arc<std::sync::Mutex<crate::monitor::performance::Performance>>>,
    /// The sample store, for pipelines that train.
    pub store: Option<Arc<crate::store::Store>>,
    /// What the source remembers: a Sparkplug namespace, devices' last values, when each
    /// device was last heard.
    pub source: crate::ingest::router::SourceState,
    /// A sequence model's windows, each device's last frames.
    pub windows: crate::infer::window::SharedWindows,
}

/// Each pipeline's model as the Sparkplug edge node reports it, read at each report.
fn sparkplug_models(models: &[(String, SharedModel)]) -> Vec<(String, crate::sparkplug::output::ServingNow)> {
    models
        .iter()
        .map(|(pipeline, model)| {
            let model = model.clone();
            let now: crate::sparkplug::output::ServingNow = Arc::new(move || {
                let m = model.load();
                crate::sparkplug::output::Serving { name: m.name.clone(), version: m.version, sha256: m.sha256.clone() }
            });
            (pipeline.clone(), now)
        })
        .collect()
}

/// Unmaps the code pages that loading models (or training) ran once; see `code_pages`.
pub(crate) fn release_code_pages(after: &str) {
    let released = code_pages::release();
    tracing::debug!(after, released_kib = released / 1024, "Released resident code pages");
}

/// What a running daemon exposes to its embedder (the demo, tests).
#[derive(Clone)]
pub struct Handle {
    /// True while connected to the broker and subscribed.
    pub ready: watch::Receiver<bool>,
    pub counters: Vec<(String, Arc<Counters>)>,
}

/// Runs the daemon until `shutdown` resolves, then drains and disconnects.
///
/// # Errors
/// Bad config or bundles, or a broker that cannot be set up. Once running, broker outages
/// are retried forever and bad input is reported, never returned.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_start: impl FnOnce(Handle),
) -> Result<(), ServiceError> {
    let shutdown = async {
        shutdown.await;
        false
    };
    run_keeping(config, Kept::default(), Prepared::default(), shutdown, on_start).await.map(|_| ())
}

/// [`run`] after a reload: the pipelines `kept` from the earlier run start from its state
/// where their settings are unchanged, the others from the models `prepared` for them (or
/// load them now); returns what the pipelines keep for the next run. `shutdown` resolves to
/// true when the run ends for a reload (systemd hears RELOADING=1, not STOPPING=1, and no
/// "offline" status goes out).
///
/// # Errors
/// As [`run`].
pub async fn run_keeping(
    config: Config,
    kept: Kept,
    prepared: Prepared,
    shutdown: impl Future<Output = bool>,
    on_start: impl FnOnce(Handle),
) -> Result<Kept, ServiceError> {
    let built = run::build(config, kept, prepared).await?;
    let serving = run::serve(built, on_start);
    let reloading = shutdown.await;
    Ok(run::drain(serving, reloading).await)
}

#[cfg(feature = "embedded-broker")]
fn embedded(listen: &str) -> Result<(String, u16), ServiceError> {
    let addr = crate::ingest::embedded_broker::start(listen).map_err(ServiceError::Broker)?;
    tracing::info!(%addr, "Embedded broker listening");
    Ok((addr.ip().to_string(), addr.port()))
}

#[cfg(not(feature = "embedded-broker"))]
fn embedded(_listen: &str) -> Result<(String, u16), ServiceError> {
    Err(ServiceError::Broker("this build has no embedded broker (feature `embedded-broker`)".into()))
}
