//! A version that crashes the daemon during its trial is rolled back after at most two
//! restarts. The loop's trial judges a model on live traffic; a model that takes the whole
//! process down (a runtime abort on some input, the OOM killer) never lets it judge. So:
//!
//! - a promotion onto trial is noted in `state_dir/trials.json` (model → version, previous,
//!   pushed, unclean starts), and the note goes when the trial ends, however it ends;
//! - `lathe run` keeps a marker (`state_dir/lathe.running`) from start to clean stop: found at
//!   a start, the previous process died;
//! - each such start while a noted version is still champion counts one; at the second the
//!   registry rolls back to the version before it (before any pipeline loads it), a pushed
//!   version is marked failed in the anti-rollback floor (its retained offer is refused from
//!   then on), and a `trial.failed` event says why.
//!
//! One unclean start is forgiven: a power cut during a trial is not the model's fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::Registry;

/// Unclean starts during a trial after which the version is rolled back.
pub const MAX_UNCLEAN_STARTS: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OnTrial {
    version: u64,
    previous: u64,
    pushed: bool,
    unclean_starts: u32,
}

/// A version rolled back at this start.
#[derive(Debug, Clone, PartialEq)]
pub struct Crashed {
    pub model: String,
    pub version: u64,
    /// The version serving instead.
    pub to: u64,
    pub starts: u32,
}

impl Crashed {
    pub fn message(&self) -> String {
        format!(
            "{} v{} was serving at {} unclean restarts of the daemon during its trial (it crashed it); rolled back to v{}",
            self.model, self.version, self.starts, self.to
        )
    }
}

fn trials_path(state_dir: &Path) -> PathBuf {
    state_dir.join("trials.json")
}

fn marker_path(state_dir: &Path) -> PathBuf {
    state_dir.join("lathe.running")
}

fn read(state_dir: &Path) -> BTreeMap<String, OnTrial> {
    std::fs::read(trials_path(state_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn write(state_dir: &Path, all: &BTreeMap<String, OnTrial>) {
    let path = trials_path(state_dir);
    let written = serde_json::to_vec_pretty(all)
        .map_err(|e| e.to_string())
        .and_then(|b| crate::fs::write_atomic(&path, &b).map_err(|e| e.to_string()));
    if let Err(e) = written {
        tracing::warn!("{}: {e}", path.display());
    }
}

/// `model` v`version` (replacing v`previous`) starts its trial.
pub fn on_trial(state_dir: &Path, model: &str, version: u64, previous: u64, pushed: bool) {
    let mut all = read(state_dir);
    all.insert(model.to_string(), OnTrial { version, previous, pushed, unclean_starts: 0 });
    write(state_dir, &all);
}

/// The trial of `model` ended (passed, failed, rolled back, replaced).
pub fn trial_over(state_dir: &Path, model: &str) {
    let mut all = read(state_dir);
    if all.remove(model).is_some() {
        write(state_dir, &all);
    }
}

/// At `lathe run`'s start, before any model loads: counts this start against every version
/// still on trial if the previous process died, rolls back those at the limit, and sets the
/// marker. Returns what was rolled back, for the events.
pub fn at_start(state_dir: &Path) -> Vec<Crashed> {
    let marker = marker_path(state_dir);
    let unclean = marker.exists();
    if let Err(e) =
        std::fs::create_dir_all(state_dir).and_then(|()| std::fs::write(&marker, std::process::id().to_string()))
    {
        tracing::warn!("{}: {e}", marker.display());
    }
    let mut all = read(state_dir);
    if all.is_empty() {
        return Vec::new();
    }
    let registry = Registry::new(state_dir);
    let mut crashed = Vec::new();
    all.retain(|model, t| {
        // Someone else changed the champion since: not this trial's to count.
        if registry.champion_version(model).ok().flatten() != Some(t.version) {
            return false;
        }
        if !unclean {
            return true;
        }
        t.unclean_starts += 1;
        if t.unclean_starts < MAX_UNCLEAN_STARTS {
            tracing::warn!(
                model,
                "v{} was on trial when the daemon last stopped uncleanly ({} of {MAX_UNCLEAN_STARTS} before it is rolled back)",
                t.version,
                t.unclean_starts
            );
            return true;
        }
        let to = match registry.rollback(model) {
            Ok((_, to)) => to,
            Err(e) => {
                tracing::error!(model, "cannot roll back v{} to v{}: {e}", t.version, t.previous);
                return true;
            }
        };
        if t.pushed {
            let floor = crate::trust::floor::Floor::new(state_dir);
            if let Err(e) = floor.failed_trial(model, t.version) {
                tracing::warn!(model, "{e}");
            }
        }
        crashed.push(Crashed { model: model.clone(), version: t.version, to, starts: t.unclean_starts });
        false
    });
    write(state_dir, &all);
    crashed
}

/// A clean stop: the next start is not counted against a version on trial.
pub fn clean_stop(state_dir: &Path) {
    let _ = std::fs::remove_file(marker_path(state_dir));
}
