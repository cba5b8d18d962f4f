//! The anti-rollback floor: per model, the highest version (and its sha256) this device has
//! accepted from a push. Its own file (`state_dir/update-floor.json`, written atomically),
//! apart from the registry, so a wiped or restored model directory does not lower it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub version: u64,
    pub sha256: String,
    /// It was promoted and failed its trial here: the same offer seen again (it is retained)
    /// must not promote it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failed_trial: bool,
    /// An operator rolled it back (`lathe models rollback`, `cmd/rollback`): its retained
    /// offer, seen again at the next start, must not install it again. A newer version may.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_back: bool,
}

pub struct Floor {
    path: PathBuf,
}

impl Floor {
    pub fn new(state_dir: &Path) -> Floor {
        Floor { path: state_dir.join("update-floor.json") }
    }

    /// Everything accepted so far.
    ///
    /// # Errors
    /// A floor file that exists but cannot be read: refusing every update is safer than
    /// forgetting the floor.
    pub fn read(&self) -> Result<BTreeMap<String, Accepted>, String> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }

    /// Why an offer of `version`/`sha256` of `name` must be refused, if it must.
    ///
    /// # Errors
    /// As [`Floor::read`].
    pub fn check(&self, name: &str, version: u64, sha256: &str) -> Result<Option<String>, String> {
        Ok(self.read()?.get(name).and_then(|a| {
            if version < a.version {
                Some(format!("v{version} is older than v{} already accepted (rollback refused)", a.version))
            } else if version == a.version && sha256 != a.sha256 {
                Some(format!(
                    "v{version} was already accepted with another sha256 ({}…)",
                    &a.sha256[..12.min(a.sha256.len())]
                ))
            } else {
                None
            }
        }))
    }

    /// Records `name` v`version` as accepted (never lowers the floor).
    ///
    /// # Errors
    /// The file cannot be written durably.
    pub fn record(&self, name: &str, version: u64, sha256: &str) -> Result<(), String> {
        let mut all = self.read()?;
        if all.get(name).is_some_and(|a| a.version > version) {
            return Ok(());
        }
        all.insert(
            name.to_string(),
            Accepted { version, sha256: sha256.to_string(), failed_trial: false, rolled_back: false },
        );
        self.write(&all)
    }

    /// Notes that `name` v`version` (accepted from a push) failed its trial and was rolled back.
    ///
    /// # Errors
    /// The file cannot be read or written durably.
    pub fn failed_trial(&self, name: &str, version: u64) -> Result<(), String> {
        self.note(name, version, |a| a.failed_trial = true)
    }

    /// Notes that an operator rolled `name` back from v`version`.
    ///
    /// # Errors
    /// The file cannot be read or written durably.
    pub fn rolled_back(&self, name: &str, version: u64) -> Result<(), String> {
        self.note(name, version, |a| a.rolled_back = true)
    }

    /// Marks the floor's entry for `name` if it is v`version` (a version accepted from a push;
    /// for any other there is nothing to note).
    fn note(&self, name: &str, version: u64, mark: impl FnOnce(&mut Accepted)) -> Result<(), String> {
        let mut all = self.read()?;
        match all.get_mut(name) {
            Some(a) if a.version == version => mark(a),
            _ => return Ok(()),
        }
        self.write(&all)
    }

    fn write(&self, all: &BTreeMap<String, Accepted>) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(all).map_err(|e| e.to_string())?;
        crate::fs::write_atomic(&self.path, &bytes).map_err(|e| format!("{}: {e}", self.path.display()))
    }
}
