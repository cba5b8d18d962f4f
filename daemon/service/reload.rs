//! Reloading on SIGHUP: the new config checked and its models loaded while the running
//! pipelines serve (`stop_or_reload`, `prepare`), what the unchanged pipelines keep across it
//! (`Kept`, by `fingerprint`), and the rolled-back outcome when the new config cannot start
//! (`Prepared::rolled_back`: the CLI starts the previous config again).

use std::path::PathBuf;

use crate::config::{Config, ConfigErrors, ModelRef};
use crate::infer::ActiveModel;

use super::*;

/// Why the daemon's run ended.
pub enum Ending {
    Stop,
    /// SIGHUP with a valid, changed config: run again with it and the models prepared for it.
    Reload(Box<(Config, Prepared)>),
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let _ = stop_or_reload(None).await;
}

/// Resolves on SIGTERM or SIGINT (`Stop`), or on SIGHUP once the config file holds a valid
/// config — every bundle loading — that differs from the `running` one, or names a bundle
/// file that changed since its run started (`Reload`). A SIGHUP with a bad config logs every
/// error and keeps waiting: the running pipelines go on untouched.
pub async fn stop_or_reload(reload: Option<Running>) -> Ending {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
            let _ = tokio::signal::ctrl_c().await;
            return Ending::Stop;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return Ending::Stop,
                _ = tokio::signal::ctrl_c() => return Ending::Stop,
                _ = hup.recv() => {
                    let Some(running) = &reload else {
                        tracing::warn!("SIGHUP: nothing to reload in this mode");
                        continue;
                    };
                    let path = running.path.clone();
                    let checked = tokio::task::spawn_blocking(move || {
                        load_config(&path).and_then(|c| check_models(&c).map(|_| c))
                    }).await;
                    match checked {
                        Ok(Ok(new)) if format!("{new:?}") == format!("{:?}", running.config) && fingerprints(&new) == running.prints => {
                            tracing::info!("SIGHUP: the config and its bundle files are unchanged; nothing to do");
                        }
                        Ok(Ok(new)) => {
                            let running = running.clone();
                            let prepared = tokio::task::spawn_blocking(move || prepare(&new, &running).map(|p| (new, p))).await;
                            match prepared {
                                Ok(Ok(next)) => {
                                    tracing::info!("SIGHUP: the config or a bundle file changed; restarting with it (unchanged pipelines keep their model and state)");
                                    return Ending::Reload(Box::new(next));
                                }
                                Ok(Err(e)) => tracing::error!("SIGHUP: the new config's models did not load, the running config stays: {e}"),
                                Err(e) => tracing::error!("SIGHUP: loading the new config's models failed: {e}"),
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::error!("SIGHUP: the new config is refused, the running one stays: {e}");
                        }
                        Err(e) => tracing::error!("SIGHUP: checking the new config failed: {e}"),
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = reload;
        let _ = tokio::signal::ctrl_c().await;
        Ending::Stop
    }
}

/// What the pipelines whose settings did not change keep across a SIGHUP reload: the model
/// (so the drift monitor keeps its calibration and windows, and a fine-tuned champion stays
/// loaded), the counters, the late-label state, the Sparkplug namespace and the devices' last
/// values. Only the
/// connection and the tasks are made again. By pipeline name: (fingerprint, what it keeps).
/// Cloned for a reload: a new config that cannot start leaves the original to start again.
#[derive(Clone, Default)]
pub struct Kept {
    pub(super) pipelines: std::collections::HashMap<String, (String, Serving)>,
    /// The topic filters the last run subscribed to (the broker keeps them in our session).
    pub(super) filters: Vec<String>,
    /// Every pipeline's windows by name, changed settings or not: a device's frames are its
    /// frames whatever model comes next (one of another width starts its window afresh).
    pub(super) windows: std::collections::HashMap<String, crate::infer::window::SharedWindows>,
}

impl Kept {
    /// `prints`: each pipeline's fingerprint when its run started (its bundle file may have
    /// changed since).
    pub(super) fn from_serving(
        config: &Config,
        prints: Vec<String>,
        serving: &[Serving],
        filters: Vec<String>,
    ) -> Kept {
        let mut kept = std::collections::HashMap::new();
        let mut windows = std::collections::HashMap::new();
        for ((p, print), s) in config.pipelines.iter().zip(prints).zip(serving) {
            windows.insert(p.name.clone(), s.windows.clone());
            let s = Serving {
                pipeline: s.pipeline.clone(),
                model: s.model.clone(),
                counters: s.counters.clone(),
                performance: s.performance.clone(),
                store: None,
                source: s.source.clone(),
                windows: s.windows.clone(),
            };
            kept.insert(p.name.clone(), (print, s));
        }
        Kept { pipelines: kept, filters, windows }
    }

    /// What pipeline `p` of `config` keeps: only if nothing it is built from changed.
    pub(super) fn take(&mut self, config: &Config, p: &crate::config::PipelineConfig) -> Option<Serving> {
        let (print, serving) = self.pipelines.remove(&p.name)?;
        (print == fingerprint(config, p)).then_some(serving)
    }
}

/// Everything a pipeline's serving state is built from: its own settings, the engine, the
/// payload cap, the registry's place, and the bundle file itself when it names one (a new
/// bundle copied over the old path is a change).
pub(super) fn fingerprint(config: &Config, p: &crate::config::PipelineConfig) -> String {
    let file = match &p.model {
        ModelRef::File(f) => std::fs::metadata(f).ok().map(|m| (m.len(), m.modified().ok())),
        ModelRef::Name(_) | ModelRef::ColdStart(_) => None,
    };
    format!("{p:?} {:?} {} {:?} {file:?}", config.infer, config.mqtt.max_payload_bytes, config.state_dir)
}

/// Each pipeline's [`fingerprint`], in config order.
pub fn fingerprints(config: &Config) -> Vec<String> {
    config.pipelines.iter().map(|p| fingerprint(config, p)).collect()
}

/// What a SIGHUP compares the config file with: the running config, and its pipelines'
/// fingerprints from when the run started (so a bundle replaced at the same path since then
/// is a change, though the config's text is the same).
#[derive(Clone)]
pub struct Running {
    pub path: PathBuf,
    pub config: Config,
    pub prints: Vec<String>,
}

/// A new config's models for the pipelines a reload changes or adds, loaded (and imported
/// into the registry) while the running pipelines still serve: the reload then pauses them
/// only for the reconnect, not for loading.
#[derive(Default)]
pub struct Prepared {
    /// (pipeline name, its model).
    pub(super) models: Vec<(String, ActiveModel)>,
    /// Pipelines whose champion could not serve: (pipeline, champion, error).
    pub(super) fallbacks: Vec<(String, String, String)>,
    /// Versions on trial rolled back at this start for crashing the daemon (`crash_guard`).
    pub(super) crashed: Vec<crash_guard::Crashed>,
    /// Set when this run is the previous config started again, after a reload's new one could
    /// not start: why it could not (an event says so once the run is up).
    pub(super) rolled_back: Option<String>,
}

impl Prepared {
    /// A first start's: nothing loaded yet, and what `crash_guard::at_start` rolled back.
    pub fn at_start(crashed: Vec<crash_guard::Crashed>) -> Prepared {
        Prepared { crashed, ..Prepared::default() }
    }

    /// The previous config's, started again because a reload's new config failed with `error`:
    /// its pipelines come back from what they kept.
    pub fn rolled_back(error: String) -> Prepared {
        Prepared { rolled_back: Some(error), ..Prepared::default() }
    }
}

/// Loads what `new` needs beyond the pipelines of `running` it keeps unchanged. (Only a
/// head start: [`run_keeping`] decides what is kept, and loads what was not prepared.)
///
/// # Errors
/// A model that does not load (the config was checked first, so this is rare: a bundle
/// changed in between).
pub fn prepare(new: &Config, running: &Running) -> Result<Prepared, ConfigErrors> {
    let unchanged = |p: &crate::config::PipelineConfig| {
        let mut was = running.config.pipelines.iter().zip(&running.prints);
        was.any(|(r, print)| r.name == p.name && *print == fingerprint(new, p))
    };
    let mut to_load = new.clone();
    to_load.pipelines.retain(|p| !unchanged(p));
    let mut fallbacks = Vec::new();
    let models = load_models_noting(&to_load, true, &mut fallbacks)?;
    let models = to_load.pipelines.iter().map(|p| p.name.clone()).zip(models).collect();
    Ok(Prepared { models, fallbacks, ..Prepared::default() })
}
