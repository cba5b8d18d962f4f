//! Telemetry: what lathe says about itself, below every stage so each can speak — events
//! (counted, logged, published and journaled in one place), liveness marks for the watchdog,
//! systemd's notify protocol, and the wall clock events are stamped with.

pub mod events;
pub mod inbox;
pub mod liveness;
pub mod systemd;

/// How often the retained status is refreshed (and the ingest loop's outage reminders count in).
pub const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
