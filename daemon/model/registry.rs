//! The on-device registry: `state_dir/registry/NAME/NAME-VERSION.lathe` plus a `champion`
//! file naming the version that serves. Every write is atomic (temp, fsync, rename, fsync dir),
//! so a power cut leaves either the old or the new state, never a torn file.

use std::io::Write;
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
}

/// Writes `data` to `path` atomically.
///
/// # Errors
/// Any filesystem failure.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    // `Path::new("x.lathe").parent()` is `Some("")`, which names no directory.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

pub struct Registry {
    root: PathBuf,
}

impl Registry {
    pub fn new(state_dir: &Path) -> Registry {
        Registry { root: state_dir.join("registry") }
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

    /// Imports a bundle file. It becomes champion when the registry has none for its name
    /// or only an older version: pointing the config at a newer file upgrades, while a model
    /// the device fine-tuned since (a higher version) is not undone by a restart.
    ///
    /// # Errors
    /// An invalid bundle, a same-version conflict, or a filesystem failure.
    pub fn seed(&self, file: &Path) -> Result<Bundle, RegistryError> {
        let bundle = Bundle::read(file).map_err(|source| RegistryError::Bundle { path: file.to_path_buf(), source })?;
        let m = &bundle.manifest;
        let dest = self.bundle_path(&m.name, m.version);
        if dest.exists() {
            let existing =
                Bundle::read(&dest).map_err(|source| RegistryError::Bundle { path: dest.clone(), source })?;
            if existing.sha256() != bundle.sha256() {
                return Err(RegistryError::Conflict { name: m.name.clone(), version: m.version });
            }
        } else {
            let bytes =
                bundle.to_bytes().map_err(|source| RegistryError::Bundle { path: file.to_path_buf(), source })?;
            write_atomic(&dest, &bytes).map_err(Self::io(&dest))?;
        }
        if self.champion_version(&m.name)?.is_none_or(|v| v < m.version) {
            let path = self.root.join(&m.name).join("champion");
            write_atomic(&path, m.version.to_string().as_bytes()).map_err(Self::io(&path))?;
        }
        self.champion(&m.name)
    }
}
