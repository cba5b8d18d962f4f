//! The on-device registry: `state_dir/registry/NAME/NAME-VERSION.lathe` plus a `champion`
//! file naming the version that serves. Every write is atomic (temp, fsync, rename, fsync dir),
//! so a power cut leaves either the old or the new state, never a torn file.

use crate::fs::write_atomic;
use std::path::{Path, PathBuf};

use super::bundle::{Bundle, BundleError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bundle {path}: {source}")]
    Bundle { path: PathBuf, source: BundleError },
    #[error("no model {name:?} in the registry at {dir} (name a bundle file in `model` to seed it)")]
    Missing { name: String, dir: PathBuf },
    #[error("{name} version {version} is already in the registry with different contents; give the new bundle a new version")]
    Conflict { name: String, version: u64 },
    #[error("{name} has no version {version} in the registry (versions: {available:?})")]
    NoVersion { name: String, version: u64, available: Vec<u64> },
    #[error("{name} v{version} reads inputs {inputs}, the champion reads {serving}; a new version must read the same inputs")]
    Incompatible { name: String, version: u64, inputs: String, serving: String },
    #[error("{name} has no earlier champion to roll back to")]
    NothingToRollBack { name: String },
}

/// One model name in the registry.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Entry {
    pub name: String,
    pub versions: Vec<u64>,
    pub champion: Option<u64>,
    /// Earlier champions, oldest first: what `rollback` returns to.
    pub history: Vec<u64>,
}

/// Versions kept beyond the champion and its rollback history.
const KEEP_VERSIONS: usize = 5;
/// Earlier champions remembered for rollback.
const KEEP_HISTORY: usize = 10;

pub struct Registry {
    root: PathBuf,
    /// The runtime a candidate must load and validate on before it is promoted: the one
    /// that will serve it (`infer.engine`).
    engine: crate::engine::EngineKind,
}

impl Registry {
    pub fn new(state_dir: &Path) -> Registry {
        Registry { root: state_dir.join("registry"), engine: crate::engine::EngineKind::Tract }
    }

    /// The `state_dir` this registry lives in.
    pub fn state_dir(&self) -> &Path {
        self.root.parent().unwrap_or(&self.root)
    }

    /// The same registry, validating candidates on `engine` (the daemon's `infer.engine`).
    pub fn with_engine(mut self, engine: crate::engine::EngineKind) -> Registry {
        self.engine = engine;
        self
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
        move |source| RegistryError::Io { path: path.to_path_buf(), source }
    }

    /// The champion's version, if the registry knows the name.
    ///
    /// # Errors
    /// An unreadable or garbled champion file.
    pub fn champion_version(&self, name: &str) -> Result<Option<u64>, RegistryError> {
        let path = self.root.join(name).join("champion");
        match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse().map(Some).map_err(|_| RegistryError::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "expected a version number"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RegistryError::Io { path, source: e }),
        }
    }

    pub fn bundle_path(&self, name: &str, version: u64) -> PathBuf {
        self.root.join(name).join(format!("{name}-{version}.lathe"))
    }

    /// Where a version's re-based drift reference is kept (`monitor::reference`).
    pub fn reference_path(&self, name: &str, version: u64) -> PathBuf {
        self.root.join(name).join(format!("{name}-{version}.reference.json"))
    }

    /// Loads the champion bundle of `name`.
    ///
    /// # Errors
    /// Unknown name, or a bundle that fails its checks.
    pub fn champion(&self, name: &str) -> Result<Bundle, RegistryError> {
        let version = self
            .champion_version(name)?
            .ok_or_else(|| RegistryError::Missing { name: name.into(), dir: self.root.clone() })?;
        let path = self.bundle_path(name, version);
        Bundle::read(&path).map_err(|source| RegistryError::Bundle { path, source })
    }

    /// Versions to try when the champion cannot serve: earlier champions, most recent first,
    /// then every other version, newest first.
    ///
    /// # Errors
    /// An unreadable registry.
    pub fn fallbacks(&self, name: &str) -> Result<Vec<u64>, RegistryError> {
        let champion = self.champion_version(name).ok().flatten();
        let mut order: Vec<u64> = self.history(name)?.into_iter().rev().collect();
        order.extend(self.versions(name)?.into_iter().rev());
        let mut seen = std::collections::HashSet::new();
        Ok(order.into_iter().filter(|v| Some(*v) != champion && seen.insert(*v)).collect())
    }

    /// Points the champion at `version` without touching history (a fallback, not a decision).
    ///
    /// # Errors
    /// A filesystem failure.
    pub fn set_champion(&self, name: &str, version: u64) -> Result<(), RegistryError> {
        self.write(name, "champion", &version.to_string())
    }

    /// Deletes versions nobody can return to: keeps the champion, the rollback history and the
    /// newest `KEEP_VERSIONS`.
    fn prune(&self, name: &str) -> Result<(), RegistryError> {
        let mut keep: std::collections::HashSet<u64> = self.history(name)?.into_iter().collect();
        keep.extend(self.champion_version(name)?);
        let versions = self.versions(name)?;
        keep.extend(versions.iter().rev().take(KEEP_VERSIONS));
        for v in versions.into_iter().filter(|v| !keep.contains(v)) {
            let path = self.bundle_path(name, v);
            std::fs::remove_file(&path).map_err(Self::io(&path))?;
            let _ = std::fs::remove_file(self.reference_path(name, v));
        }
        Ok(())
    }

    /// Every model name with its versions, champion and history.
    ///
    /// # Errors
    /// An unreadable registry.
    pub fn list(&self) -> Result<Vec<Entry>, RegistryError> {
        let mut out = Vec::new();
        let dir = match std::fs::read_dir(&self.root) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(RegistryError::Io { path: self.root.clone(), source: e }),
        };
        let mut names: Vec<String> = dir
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in names {
            out.push(Entry {
                versions: self.versions(&name)?,
                champion: self.champion_version(&name)?,
                history: self.history(&name)?,
                name,
            });
        }
        Ok(out)
    }

    /// The versions of `name` held, ascending.
    ///
    /// # Errors
    /// An unreadable directory.
    pub fn versions(&self, name: &str) -> Result<Vec<u64>, RegistryError> {
        let dir = self.root.join(name);
        let prefix = format!("{name}-");
        let mut v: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(Self::io(&dir))?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|f| f.strip_prefix(&prefix)?.strip_suffix(".lathe")?.parse().ok())
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    fn history(&self, name: &str) -> Result<Vec<u64>, RegistryError> {
        let path = self.root.join(name).join("history");
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(s.split_whitespace().filter_map(|v| v.parse().ok()).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(RegistryError::Io { path, source: e }),
        }
    }

    /// Points the champion at `version` (which must load and pass its checks), remembering
    /// the previous champion for `rollback`. Returns (previous, new).
    ///
    /// # Errors
    /// An unknown version, a bundle failing its checks, or a filesystem failure.
    pub fn promote(&self, name: &str, version: u64) -> Result<(Option<u64>, u64), RegistryError> {
        let path = self.bundle_path(name, version);
        if !path.is_file() {
            let available = self.versions(name).unwrap_or_default();
            return Err(RegistryError::NoVersion { name: name.into(), version, available });
        }
        let candidate = Bundle::read(&path).map_err(|source| RegistryError::Bundle { path: path.clone(), source })?;
        // It must load and give finite outputs on its own validation set, on the runtime that
        // will serve it, before it may serve.
        crate::engine::Engine::load_with(&candidate.model, &self.engine)
            .map_err(BundleError::from)
            .and_then(|engine| candidate.validate(&engine))
            .map_err(|source| RegistryError::Bundle { path, source })?;
        let previous = self.champion_version(name)?;
        // Telemetry does not change with a model version: a new one must read the same inputs.
        if let Some(current) = previous.and_then(|_| self.champion(name).ok()) {
            let names = |b: &Bundle| b.manifest.inputs.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
            if names(&candidate) != names(&current) {
                return Err(RegistryError::Incompatible {
                    name: name.into(),
                    version,
                    inputs: names(&candidate).join(","),
                    serving: names(&current).join(","),
                });
            }
        }
        if let Some(p) = previous.filter(|&p| p != version) {
            let mut history = self.history(name)?;
            history.push(p);
            let excess = history.len().saturating_sub(KEEP_HISTORY);
            history.drain(..excess);
            self.write(name, "history", &history.iter().map(u64::to_string).collect::<Vec<_>>().join("\n"))?;
        }
        self.write(name, "champion", &version.to_string())?;
        self.prune(name)?;
        Ok((previous, version))
    }

    /// Returns the champion to the one before it. Returns (previous, new).
    ///
    /// # Errors
    /// No earlier champion, or a filesystem failure.
    pub fn rollback(&self, name: &str) -> Result<(Option<u64>, u64), RegistryError> {
        let mut history = self.history(name)?;
        let to = history.pop().ok_or_else(|| RegistryError::NothingToRollBack { name: name.into() })?;
        let previous = self.champion_version(name)?;
        // Champion first: a crash between the two writes leaves an extra history entry, never
        // a champion that history no longer knows how to leave.
        self.write(name, "champion", &to.to_string())?;
        self.write(name, "history", &history.iter().map(u64::to_string).collect::<Vec<_>>().join("\n"))?;
        Ok((previous, to))
    }

    fn write(&self, name: &str, file: &str, text: &str) -> Result<(), RegistryError> {
        let path = self.root.join(name).join(file);
        write_atomic(&path, text.as_bytes()).map_err(Self::io(&path))
    }

    /// Adds a bundle file without changing the champion (unless there is none yet).
    ///
    /// # Errors
    /// An invalid bundle, a same-version conflict, or a filesystem failure.
    pub fn import(&self, file: &Path) -> Result<Bundle, RegistryError> {
        let bundle = Bundle::read(file).map_err(|source| RegistryError::Bundle { path: file.to_path_buf(), source })?;
        self.store(&bundle, file)?;
        if self.champion_version(&bundle.manifest.name)?.is_none() {
            self.write(&bundle.manifest.name, "champion", &bundle.manifest.version.to_string())?;
        }
        self.prune(&bundle.manifest.name)?;
        Ok(bundle)
    }

    /// Adds a bundle made on the device (a fine-tuned challenger) without promoting it.
    ///
    /// # Errors
    /// A same-version conflict or a filesystem failure.
    pub fn add(&self, bundle: &Bundle) -> Result<(), RegistryError> {
        let dest = self.bundle_path(&bundle.manifest.name, bundle.manifest.version);
        self.store(bundle, &dest)?;
        self.prune(&bundle.manifest.name)
    }

    /// Writes `bundle` into the registry unless that version is already there (identical).
    fn store(&self, bundle: &Bundle, file: &Path) -> Result<(), RegistryError> {
        let m = &bundle.manifest;
        let dest = self.bundle_path(&m.name, m.version);
        if dest.exists() {
            let existing =
                Bundle::read(&dest).map_err(|source| RegistryError::Bundle { path: dest.clone(), source })?;
            if existing.sha256() != bundle.sha256() {
                return Err(RegistryError::Conflict { name: m.name.clone(), version: m.version });
            }
            return Ok(());
        }
        let bytes = bundle.to_bytes().map_err(|source| RegistryError::Bundle { path: file.to_path_buf(), source })?;
        write_atomic(&dest, &bytes).map_err(Self::io(&dest))
    }

    /// Imports a bundle file. It becomes champion when the registry has none for its name
    /// or only an older version: pointing the config at a newer file upgrades, while a model
    /// the device fine-tuned since (a higher version) is not undone by a restart.
    ///
    /// # Errors
    /// An invalid bundle, a same-version conflict, or a filesystem failure.
    pub fn seed(&self, file: &Path) -> Result<Bundle, RegistryError> {
        let bundle = Bundle::read(file).map_err(|source| RegistryError::Bundle { path: file.to_path_buf(), source })?;
        self.store(&bundle, file)?;
        let m = &bundle.manifest;
        if self.champion_version(&m.name)?.is_none_or(|v| v < m.version) {
            self.promote(&m.name, m.version)?;
        }
        self.champion(&m.name)
    }
}
