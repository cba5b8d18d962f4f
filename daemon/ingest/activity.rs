//! Devices that went quiet (`source.silent_after_s`). A gateway that loses a PLC, or a
//! machine switched off at the panel, simply stops sending, and a pipeline that predicts
//! nothing for it looks the same as one with nothing to say. So each pipeline notes when it
//! last heard each device (any message for it, accepted or not), and a device not heard for
//! `silent_after` is reported once as `device.silent`, and as `device.back` when it speaks
//! again; the status lists the silent ones. Sparkplug B says the same with its deaths.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Devices remembered; past this the least recently heard is forgotten.
const MAX_DEVICES: usize = 100_000;

pub struct Activity {
    silent_after: Duration,
    devices: HashMap<String, Heard>,
}

struct Heard {
    last: Instant,
    /// Reported silent, and not heard since.
    silent: bool,
}

impl Activity {
    pub fn new(silent_after: Duration) -> Activity {
        Activity { silent_after, devices: HashMap::new() }
    }

    /// `device` was heard `now`. Returns how long it had been quiet if it was reported
    /// silent (it is back).
    pub fn heard(&mut self, device: &str, now: Instant) -> Option<Duration> {
        if let Some(h) = self.devices.get_mut(device) {
            let back = h.silent.then(|| now.saturating_duration_since(h.last));
            *h = Heard { last: now, silent: false };
            return back;
        }
        if self.devices.len() >= MAX_DEVICES {
            if let Some(oldest) = self.devices.iter().min_by_key(|(_, h)| h.last).map(|(d, _)| d.clone()) {
                self.devices.remove(&oldest);
            }
        }
        self.devices.insert(device.to_string(), Heard { last: now, silent: false });
        None
    }

    /// The devices that have now been quiet for `silent_after` and were not reported yet,
    /// each with how long it has been quiet; they are reported from here on.
    pub fn newly_silent(&mut self, now: Instant) -> Vec<(String, Duration)> {
        let mut silent: Vec<(String, Duration)> = Vec::new();
        for (device, h) in &mut self.devices {
            let quiet = now.saturating_duration_since(h.last);
            if !h.silent && quiet >= self.silent_after {
                h.silent = true;
                silent.push((device.clone(), quiet));
            }
        }
        silent.sort();
        silent
    }

    /// What the status shows: devices heard, and the silent ones (at most `n`, sorted).
    pub fn status(&self, n: usize) -> serde_json::Value {
        let mut silent: Vec<&str> = self.devices.iter().filter(|(_, h)| h.silent).map(|(d, _)| d.as_str()).collect();
        silent.sort_unstable();
        let count = silent.len();
        silent.truncate(n);
        serde_json::json!({"heard": self.devices.len(), "silent_count": count, "silent": silent,
                           "silent_after_s": self.silent_after.as_secs()})
    }

    /// (devices heard, devices silent now), for the metrics.
    pub fn counts(&self) -> (usize, usize) {
        (self.devices.len(), self.devices.values().filter(|h| h.silent).count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_quiet_for_the_limit_is_reported_once_and_again_when_it_is_back() {
        let mut a = Activity::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(a.heard("pump7", t0), None);
        a.heard("pump8", t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        a.heard("pump8", at(50));
        assert!(a.newly_silent(at(59)).is_empty());
        assert_eq!(a.newly_silent(at(61)), [("pump7".to_string(), Duration::from_secs(61))]);
        assert!(a.newly_silent(at(70)).is_empty(), "reported once");
        assert_eq!(a.status(10)["silent"], serde_json::json!(["pump7"]));
        assert_eq!(a.heard("pump7", at(100)), Some(Duration::from_secs(100)), "back after 100 s");
        assert_eq!(a.heard("pump7", at(101)), None);
        assert_eq!(a.newly_silent(at(111)), [("pump8".to_string(), Duration::from_secs(61))]);
        assert_eq!(a.status(10)["heard"], 2);
        assert_eq!(a.counts(), (2, 1));
    }
}
