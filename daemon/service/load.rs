//! Loading the config file and the pipelines' models: at start, at `lathe check`, and for a
//! reload (`reload.rs`).

use std::path::Path;

use crate::config::{Config, ConfigError, ConfigErrors, FileKind, ModelRef};
use crate::infer::ActiveModel;
use crate::model::registry::RegistryError;
use crate::model::{Bundle, Registry};

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
    let refuse = |message: String| ConfigErrors {
        file: path.to_path_buf(),
        errors: vec![ConfigError { key: "(file)".into(), message }],
    };
    // Checked before reading: a config is never megabytes, and a wrong path (a device, a
    // log) must not be read whole.
    let len = std::fs::metadata(path).map_err(|e| refuse(format!("cannot read: {e}")))?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(refuse(format!("{len} bytes; a config is at most {MAX_CONFIG_BYTES}")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| refuse(format!("cannot read: {e}")))?;
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

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
