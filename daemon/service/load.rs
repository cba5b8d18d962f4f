//! Loading the pipelines' models: at start, at `lathe check`, and at a reload, where each
//! pipeline whose settings did not change keeps its model and state (`Kept`).

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, ConfigErrors, FileKind, ModelRef};

use crate::infer::ActiveModel;
use crate::model::registry::RegistryError;
use crate::model::{Bundle, Registry};

use super::*;

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a config file, parses it (`Config::parse`, every problem of the text at once), then
/// checks the files it names that must be there before anything starts: a pipeline's bundle
/// file, the update keys or root. A start, `lathe check` and a SIGHUP reload all load here,
/// so a config naming a missing file is refused before the running daemon drains for it.
///
/// # Errors
/// The file cannot be read, or every problem found in it.
pub fn load_config(path: &Path) -> Result<Config, ConfigErrors> {
    let refuse = |key: &str, message: String| ConfigErrors {
        file: path.to_path_buf(),
        errors: vec![ConfigError { key: key.into(), message }],
    };
    // Checked before reading: a config is never megabytes, and a wrong path (a device, a
    // log) must not be read whole.
    let len = std::fs::metadata(path).map_err(|e| refuse("(file)", format!("cannot read: {e}")))?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(refuse("(file)", format!("{len} bytes; a config is at most {MAX_CONFIG_BYTES}")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| refuse("(file)", format!("cannot read: {e}")))?;
    let (parsed, files) = Config::parse_noting_files(&text, path);
    let mut errors = parsed.as_ref().err().map(|e| e.errors.clone()).unwrap_or_default();
    for f in files {
        let problem = match f.kind {
            FileKind::Bundle => (!f.path.is_file()).then(|| format!("bundle file {} not found", f.path.display())),
            FileKind::PublicKey => crate::trust::signing::read_public_key(&f.path).err(),
            FileKind::Root => crate::trust::root::Trust::read(&f.path).err(),
        };
        errors.extend(problem.map(|message| ConfigError { key: f.key, message }));
    }
    match errors.is_empty() {
        true => parsed,
        false => Err(ConfigErrors { file: path.to_path_buf(), errors }),
    }
}

/// Checks each pipeline's champion bundle loads and fits the pipeline, without changing
/// anything (`lathe check`, a SIGHUP's new config): every problem is reported at once, like
/// config errors. Bundle files are only read, not imported, and no drift monitor is
/// calibrated (seconds of CPU for a model that is only looked at).
///
/// # Errors
/// Missing or invalid bundles, models tract cannot serve, feature names the bundle lacks.
pub fn check_models(config: &Config) -> Result<Vec<ActiveModel>, ConfigErrors> {
    let mut config = config.clone();
    config.pipelines.iter_mut().for_each(|p| p.drift = None);
    load_models_noting(&config, false, &mut Vec::new())
}

/// Loads each pipeline's champion (with `seed`, bundle files are imported into the registry
/// first), noting in `fallbacks` each pipeline whose champion could not serve and
/// the version that serves instead (never "no model" while any version loads).
pub(super) fn load_models_noting(
    config: &Config,
    seed: bool,
    fallbacks: &mut Vec<(String, String, String)>,
) -> Result<Vec<ActiveModel>, ConfigErrors> {
    let registry = Registry::new(&config.state_dir).with_engine(config.infer.engine.clone());
    let mut errors = Vec::new();
    let mut loaded = Vec::new();
    for (i, p) in config.pipelines.iter().enumerate() {
        let key = format!("pipeline[{i}].model");
        let bundle = match &p.model {
            ModelRef::File(f) if seed => registry.seed(f),
            ModelRef::File(f) => Bundle::read(f).map_err(|source| RegistryError::Bundle { path: f.clone(), source }),
            ModelRef::Name(n) => registry.champion(n),
            ModelRef::ColdStart(c) => crate::train::cold_start::serving(&registry, &p.name, c),
        };
        let bundle = match bundle {
            Ok(b) => b,
            Err(e) => {
                // A champion that is missing or corrupt: serve the last good version instead.
                let name = match &p.model {
                    ModelRef::Name(n) => Some(n.clone()),
                    ModelRef::ColdStart(_) => Some(p.name.clone()),
                    ModelRef::File(f) => Bundle::read(f).ok().map(|b| b.manifest.name),
                };
                match name.filter(|_| seed).and_then(|n| fall_back(&registry, p, &n, config).map(|m| (n, m))) {
                    Some((name, model)) => {
                        fallbacks.push((p.name.clone(), format!("{name} (champion)"), e.to_string()));
                        loaded.push(model);
                    }
                    None => errors.push(ConfigError { key, message: e.to_string() }),
                }
                continue;
            }
        };
        for name in p.features.keys() {
            if !bundle.manifest.inputs.iter().any(|inp| &inp.name == name) {
                let names: Vec<&str> = bundle.manifest.inputs.iter().map(|i| i.name.as_str()).collect();
                errors.push(ConfigError {
                    key: format!("pipeline[{i}].features.{name}"),
                    message: format!(
                        "bundle {} has no input {name:?} (inputs: {})",
                        bundle.manifest.name,
                        names.join(", ")
                    ),
                });
            }
        }
        if let Some(t) = &p.train {
            if bundle.manifest.task != crate::model::Task::Reconstruction && p.labels.is_none() {
                errors.push(ConfigError {
                    key: format!("pipeline[{i}].train"),
                    message: format!(
                        "bundle {} is a {:?} model: fine-tuning it needs labels (pipeline.labels)",
                        bundle.manifest.name, bundle.manifest.task
                    ),
                });
            }
            let mut training = bundle.manifest.training.clone();
            t.overrides.apply(&mut training);
            if let Err(e) = crate::train::classes(&bundle, &training) {
                errors.push(ConfigError {
                    key: format!("pipeline[{i}].train"),
                    message: format!("bundle {} cannot be fine-tuned: {e}", bundle.manifest.name),
                });
            }
        }
        match ActiveModel::load(&bundle, p, config.load_context()) {
            Ok(model) => loaded.push(model),
            Err(message) => match seed.then(|| fall_back(&registry, p, &bundle.manifest.name, config)).flatten() {
                Some(model) => {
                    fallbacks.push((
                        p.name.clone(),
                        format!("{} v{}", bundle.manifest.name, bundle.manifest.version),
                        message,
                    ));
                    loaded.push(model);
                }
                None => errors.push(ConfigError { key, message }),
            },
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors { file: config.file.clone(), errors })
    }
}

/// The first earlier version that loads becomes champion again (the registry is repointed,
/// so `lathe models list` says what serves).
pub(super) fn fall_back(
    registry: &Registry,
    p: &crate::config::PipelineConfig,
    name: &str,
    config: &Config,
) -> Option<ActiveModel> {
    for version in registry.fallbacks(name).ok()? {
        let Ok(bundle) = Bundle::read(&registry.bundle_path(name, version)) else { continue };
        if let Ok(model) = ActiveModel::load(&bundle, p, config.load_context()) {
            registry.set_champion(name, version).ok()?;
            return Some(model);
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of its own holding `lathe.toml` with `extra` appended to a one-pipeline config.
    fn config_file(name: &str, model: &str, extra: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lathe-load-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            "node = \"n1\"\nstate_dir = \"state\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1884\"\n\
             [[pipeline]]\nname = \"pump\"\nmodel = \"{model}\"\nsource = {{ topic = \"p/+/t\", key = \"/seq\" }}\n\
             sink = {{ topic = \"p/{{device}}/pred\" }}\n{extra}"
        );
        std::fs::write(dir.join("lathe.toml"), text).unwrap();
        dir.join("lathe.toml")
    }

    #[test]
    fn a_named_bundle_file_must_exist_beside_the_config() {
        let path = config_file("bundle", "models/pump-1.lathe", "");
        let dir = path.parent().unwrap().to_path_buf();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(Config::parse(&text, &path).is_ok(), "parsing alone reads no file");
        let errs = load_config(&path).unwrap_err();
        assert_eq!(errs.errors[0].key, "pipeline[0].model");
        assert_eq!(errs.errors[0].message, format!("bundle file {}/models/pump-1.lathe not found", dir.display()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_update_keys_or_root_must_be_readable_and_hold_on_their_own_signatures() {
        let path = config_file("keys", "pump-anomaly", "[update]\ntrusted_keys = [\"/nonexistent.pub\"]\n");
        let errs = load_config(&path).unwrap_err().to_string();
        assert!(errs.contains("update.trusted_keys: ") && errs.contains("/nonexistent.pub"), "{errs}");
        let dir = path.parent().unwrap().to_path_buf();
        let (signer, update) = (crate::trust::signing::generate().unwrap(), crate::trust::signing::generate().unwrap());
        let hex_of = |k: &ed25519_dalek::SigningKey| hex::encode(k.verifying_key().to_bytes());
        let body = crate::trust::root::Root {
            version: 1,
            expires_unix: 4_000_000_000,
            root_keys: vec![hex_of(&signer), hex_of(&update)],
            root_threshold: 2,
            update_keys: vec![hex_of(&update)],
        };
        let short = crate::trust::root::SignedRoot::sign(&body, &[&signer]).unwrap();
        std::fs::write(dir.join("root.json"), serde_json::to_vec(&short).unwrap()).unwrap();
        let path = config_file("keys", "pump-anomaly", "[update]\nroot = \"root.json\"\n");
        let errs = load_config(&path).unwrap_err().to_string();
        assert!(
            errs.contains("update.root: ") && errs.contains("signed by 1 of its own 2 root keys; 2 needed"),
            "{errs}"
        );
        let full = crate::trust::root::SignedRoot::sign(&body, &[&signer, &update]).unwrap();
        std::fs::write(dir.join("root.json"), serde_json::to_vec(&full).unwrap()).unwrap();
        let loaded = load_config(&path).unwrap();
        assert_eq!(loaded.update.unwrap().trust, crate::config::TrustSource::Root(dir.join("root.json")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
