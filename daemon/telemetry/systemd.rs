//! systemd integration (`Type=notify`): READY=1 once every pipeline's model is loaded and the
//! broker connection is up and subscribed, STATUS= lines a person reads in `systemctl status`,
//! WATCHDOG=1 from the ingest loop itself while every other stage makes progress
//! (`liveness`), RELOADING=1 on SIGHUP, and STOPPING=1. Without `NOTIFY_SOCKET` (not under
//! systemd) every call is a no-op.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use sd_notify::NotifyState;

pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// A reload begins; the next READY=1 ends it. systemd 253 and later refuse RELOADING=1
/// without the monotonic time beside it.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("Reloading the config")];
    states.extend(NotifyState::monotonic_usec_now().ok());
    let _ = sd_notify::notify(&states);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("Stopping: draining in-flight messages")]);
}

/// Pings the watchdog, unless a stage has been stuck on one piece of work for longer than
/// `WatchdogSec` (see `liveness`): then systemd restarts the daemon. Says once which stage.
pub fn watchdog() {
    static STUCK: AtomicBool = AtomicBool::new(false);
    let limit = sd_notify::watchdog_enabled().unwrap_or(Duration::from_secs(30));
    match super::liveness::stalled(limit) {
        Some((stage, busy)) => {
            if !STUCK.swap(true, Relaxed) {
                tracing::error!(
                    "The {stage} has been stuck on one piece of work for {:.1} s: the watchdog is no \
                     longer fed, and systemd will restart lathe",
                    busy.as_secs_f64()
                );
            }
        }
        None => {
            STUCK.store(false, Relaxed);
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        }
    }
}

/// How often to ping: half of `WatchdogSec`, as systemd recommends. `None` without a watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2).filter(|d| !d.is_zero())
}
