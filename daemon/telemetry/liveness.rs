//! What systemd's watchdog is fed on: every stage that has work in hand must be making
//! progress. The ingest loop sends WATCHDOG=1 (a stalled ingest loop stops the pings by
//! itself); the stages on other threads and tasks — each pipeline's inference, the store
//! writer, the closed loop — hold a [`Heartbeat`] and mark each unit of work (a batch, a
//! commit, a message or tick) busy while they do it. One that stays busy past `WatchdogSec`
//! is stuck: the pings stop, and systemd restarts the daemon.
//!
//! Waiting is not work: an idle stage, inference awaiting broker back-pressure, or the loop
//! waiting on a fine-tune (its own thread, bounded by `train.max_minutes`) never counts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// One stage's progress.
pub struct Heartbeat {
    name: String,
    /// Milliseconds since [`epoch`] (plus one) when the work in hand began; 0 when idle.
    busy_since: AtomicU64,
}

/// Every live heartbeat (a reload drops the old pipelines' and registers new ones).
static HEARTBEATS: Mutex<Vec<Weak<Heartbeat>>> = Mutex::new(Vec::new());

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// A heartbeat for the stage `name` ("inference of pipeline shuttle", "store writer"),
/// watched while the returned handle lives.
pub fn register(name: &str) -> Arc<Heartbeat> {
    let beat = Arc::new(Heartbeat { name: name.to_string(), busy_since: AtomicU64::new(0) });
    let mut all = HEARTBEATS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(&beat));
    beat
}

/// Marks a unit of work; it is done when this is dropped.
pub struct Busy<'a>(&'a Heartbeat);

impl Heartbeat {
    pub fn busy(&self) -> Busy<'_> {
        self.busy_since.store(now_ms(), Relaxed);
        #[cfg(debug_assertions)]
        debug::stall_if_asked(&self.name);
        Busy(self)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy_since.store(0, Relaxed);
    }
}

/// The first stage busy with one unit of work for longer than `limit`, and for how long.
pub fn stalled(limit: Duration) -> Option<(String, Duration)> {
    let now = now_ms();
    let all = HEARTBEATS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    all.iter().filter_map(Weak::upgrade).find_map(|b| {
        let since = b.busy_since.load(Relaxed);
        let busy = Duration::from_millis(now.saturating_sub(since));
        (since != 0 && busy > limit).then(|| (b.name.clone(), busy))
    })
}

/// Debug builds only (the tests): `{"__lathe_debug_stall": "store", "ms": N}` on a pipeline's
/// source topic makes the next unit of work of the first stage whose name starts with
/// "store" take N ms longer, so a test can watch the pings stop while it is stuck.
#[cfg(debug_assertions)]
pub mod debug {
    use std::sync::Mutex;
    use std::time::Duration;

    static ASKED: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

    pub fn ask(stage: &str, ms: u64) {
        ASKED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((stage.to_string(), ms.min(10_000)));
    }

    pub(super) fn stall_if_asked(name: &str) {
        let ms = {
            let mut asked = ASKED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(i) = asked.iter().position(|(stage, _)| name.starts_with(stage.as_str())) else { return };
            asked.remove(i).1
        };
        std::thread::sleep(Duration::from_millis(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_work_in_hand_past_the_limit_is_a_stall() {
        let beat = register("test stage");
        assert!(stalled(Duration::from_millis(20)).is_none_or(|(n, _)| n != "test stage"), "idle is not stalled");
        {
            let _busy = beat.busy();
            std::thread::sleep(Duration::from_millis(40));
            let (name, busy) = stalled(Duration::from_millis(20)).expect("busy past the limit");
            assert_eq!(name, "test stage");
            assert!(busy >= Duration::from_millis(40), "{busy:?}");
            assert!(stalled(Duration::from_secs(5)).is_none(), "within the limit");
        }
        assert!(stalled(Duration::from_millis(20)).is_none(), "done: no longer stalled");
        drop(beat);
        assert!(HEARTBEATS.lock().unwrap().iter().all(|w| w.upgrade().is_none_or(|b| b.name != "test stage")));
    }
}
