//! Telemetry: what lathe says about itself, below every stage so each can speak — events
//! (counted, logged, published and journaled in one place), liveness marks for the watchdog,
//! systemd's notify protocol, and the wall clock events are stamped with.

pub mod events;
pub mod liveness;
pub mod systemd;

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
