//! A drift reference re-based on rows a version served, kept beside its bundle in the registry
//! (`NAME-VERSION.reference.json`).
//!
//! A fine-tuned bundle carries its parent's validation set, the regime before the change it
//! was adapted to. Once such a version has passed its trial, and its monitor is still in alarm
//! against that set, the closed loop takes the newest `drift.rebase_rows` rows it served and
//! makes them its reference (`service::closed_loop::rebase`). The file is what the monitor is
//! rebuilt from after a restart. It names the bundle by hash: a file for other contents (a
//! re-imported version) is ignored, and the bundle's own validation set is used.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where the served rows came from: the first and last by key and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServedSpan {
    pub first_key: String,
    pub last_key: String,
    pub first_ts_ms: u64,
    pub last_ts_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rebased {
    pub model: String,
    pub version: u64,
    /// The bundle this reference belongs to.
    pub bundle_sha256: String,
    /// When it was made (Unix ms).
    pub created_ms: u64,
    /// Why: the alarms the version's monitor held against the carried reference.
    pub reason: String,
    pub served: ServedSpan,
    /// In model order; must match the bundle's inputs.
    pub features: Vec<String>,
    /// One row of features per served sample, oldest first.
    pub rows: Vec<Vec<f32>>,
    /// The score the version gave each row, as it was served.
    pub scores: Vec<f32>,
}

impl Rebased {
    /// The rows flattened, and the scores, as `Monitor::new` takes them.
    pub fn reference(&self) -> (Vec<f32>, Vec<f64>) {
        (self.rows.concat(), self.scores.iter().map(|&s| f64::from(s)).collect())
    }

    /// Writes the file atomically (temp, fsync, rename).
    ///
    /// # Errors
    /// A filesystem failure.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        crate::fs::write_atomic(path, &text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The re-based reference at `path` for the bundle with hash `sha256` and inputs
    /// `features`: `Ok(None)` when there is none (or it is another bundle's).
    ///
    /// # Errors
    /// A file that cannot be read or is not a sound reference.
    pub fn read_for(path: &Path, sha256: &str, features: &[String]) -> Result<Option<Rebased>, String> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let r: Rebased = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if r.bundle_sha256 != sha256 {
            return Ok(None);
        }
        let sound = r.features == features
            && !r.rows.is_empty()
            && r.rows.len() == r.scores.len()
            && r.rows.iter().all(|row| row.len() == features.len());
        if !sound {
            return Err(format!(
                "{}: {} rows of {} features and {} scores do not fit inputs {features:?}",
                path.display(),
                r.rows.len(),
                r.features.len(),
                r.scores.len()
            ));
        }
        Ok(Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Rebased {
        Rebased {
            model: "m".into(),
            version: 2,
            bundle_sha256: "abc".into(),
            created_ms: 1,
            reason: "test".into(),
            served: ServedSpan { first_key: "1".into(), last_key: "3".into(), first_ts_ms: 10, last_ts_ms: 30 },
            features: vec!["a".into(), "b".into()],
            rows: vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 6.0]],
            scores: vec![0.1, 0.2, 0.3],
        }
    }

    #[test]
    fn a_written_reference_reads_back_for_its_own_bundle_only() {
        let dir = std::env::temp_dir().join(format!("lathe-reference-unit-{}", std::process::id()));
        let path = dir.join("m-2.reference.json");
        let names = vec!["a".to_string(), "b".to_string()];
        assert_eq!(Rebased::read_for(&path, "abc", &names).unwrap(), None, "no file: none");
        sample().write(&path).unwrap();
        let back = Rebased::read_for(&path, "abc", &names).unwrap().unwrap();
        assert_eq!(back, sample());
        let (rows, scores) = back.reference();
        assert_eq!((rows.len(), scores.len(), rows[2]), (6, 3, 3.0));
        assert_eq!(Rebased::read_for(&path, "other", &names).unwrap(), None, "another bundle's file is ignored");
        let e = Rebased::read_for(&path, "abc", &["a".to_string()]).unwrap_err();
        assert!(e.contains("do not fit"), "{e}");
        std::fs::write(&path, b"{\"model\": 1").unwrap();
        assert!(Rebased::read_for(&path, "abc", &names).is_err(), "a torn file is an error, not a reference");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
