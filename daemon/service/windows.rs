//! A sequence pipeline's windows (each device's last frames), saved at a clean stop and
//! resumed by a start soon after.

use std::path::PathBuf;

use crate::config::Config;

use crate::telemetry::unix_ms;

use super::*;

/// A clean stop saves each sequence pipeline's windows (the pipelines have drained: their
/// windows hold every frame they served).
pub(super) fn save_windows(config: &Config, serving: &[Serving]) {
    for (p, s) in config.pipelines.iter().zip(serving) {
        if p.window == 1 || p.resume_within.is_zero() {
            continue;
        }
        let windows = s.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = windows_path(config, &p.name);
        match windows.save(&path, unix_ms()) {
            Ok(()) => tracing::info!(pipeline = p.name, devices = windows.devices(), "Saved the windows"),
            Err(e) => tracing::warn!(pipeline = p.name, "The windows were not saved in {}: {e}", path.display()),
        }
    }
}

/// Where a clean stop saves a sequence pipeline's windows. A pipeline name is free text; one
/// that could not be a file name (`line/1`, `..`) is written as hex.
pub(super) fn windows_path(config: &Config, pipeline: &str) -> PathBuf {
    let file = match crate::model::bundle::valid_name(pipeline) {
        true => pipeline.to_string(),
        false => pipeline.bytes().map(|b| format!("{b:02x}")).collect(),
    };
    config.state_dir.join("windows").join(format!("{file}.bin"))
}

/// A sequence pipeline's windows at a start: those a clean stop saved, if within
/// `window.resume_within`. The file is read once and removed, so a later crash cannot bring
/// back frames older than the ones served since.
pub(super) fn resume_windows(config: &Config, p: &crate::config::PipelineConfig) -> crate::infer::window::Windows {
    use crate::infer::window::Windows;
    let path = windows_path(config, &p.name);
    let Ok(bytes) = std::fs::read(&path) else { return Windows::default() };
    let _ = std::fs::remove_file(&path);
    let max_age_ms = u64::try_from(p.resume_within.as_millis()).unwrap_or(u64::MAX);
    match Windows::read(&bytes, unix_ms(), max_age_ms) {
        Ok(Some((windows, age_ms))) => {
            let (devices, age_s) = (windows.devices(), age_ms as f64 / 1000.0);
            tracing::info!(pipeline = p.name, devices, "Resumed the windows saved {age_s:.0} s ago");
            windows
        }
        Ok(None) => {
            let within = p.resume_within.as_secs();
            tracing::info!(
                pipeline = p.name,
                "The saved windows are older than window.resume_within ({within} s): every device fills its window again"
            );
            Windows::default()
        }
        Err(e) => {
            tracing::warn!(pipeline = p.name, "The saved windows in {} are not used: {e}", path.display());
            Windows::default()
        }
    }
}
