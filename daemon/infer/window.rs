//! Sequence windows (`window = { size = N }`): each device's last N accepted frames, oldest
//! first, the sample a model with input `[batch, N, features]` takes.
//!
//! A device's first N − 1 frames (after a start, a reload or a swap to a longer window) only
//! fill its window: they are acknowledged and counted (`window_filling`), not predicted. A
//! prediction made on padding would look like one made on history, and is not.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Devices whose windows are kept; past this the least recently seen is forgotten (ingest
/// interns at most 100,000 device ids; a window of 32 frames of 16 values is 2 KiB).
const MAX_DEVICES: usize = 100_000;

#[derive(Default)]
pub struct Windows {
    devices: HashMap<Arc<str>, Device>,
    /// A counter that orders devices by when they were last seen.
    clock: u64,
}

struct Device {
    frames: VecDeque<f32>,
    /// Values per frame.
    width: usize,
    seen: u64,
}

impl Windows {
    /// Appends `frame` to `device`'s window of `n` frames; when the window is full, appends it
    /// (oldest frame first) to `out` and returns true.
    pub fn push(&mut self, device: &Arc<str>, frame: &[f32], n: usize, out: &mut Vec<f32>) -> bool {
        self.clock += 1;
        if !self.devices.contains_key(device) && self.devices.len() >= MAX_DEVICES {
            if let Some(oldest) = self.devices.iter().min_by_key(|(_, d)| d.seen).map(|(k, _)| k.clone()) {
                self.devices.remove(&oldest);
            }
        }
        let d = self.devices.entry(device.clone()).or_insert_with(|| Device {
            frames: VecDeque::new(),
            width: frame.len(),
            seen: 0,
        });
        d.seen = self.clock;
        let len = n * frame.len();
        // A model with other inputs was swapped in: the old frames mean nothing to it.
        if d.width != frame.len() {
            d.frames.clear();
            d.width = frame.len();
        }
        d.frames.extend(frame.iter().copied());
        while d.frames.len() > len {
            d.frames.pop_front();
        }
        let full = d.frames.len() == len;
        if full {
            out.extend(d.frames.iter().copied());
        }
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_device_gets_its_own_last_n_frames_oldest_first() {
        let mut w = Windows::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut out = Vec::new();
        assert!(!w.push(&a, &[1.0, 10.0], 3, &mut out));
        assert!(!w.push(&b, &[7.0, 70.0], 3, &mut out));
        assert!(!w.push(&a, &[2.0, 20.0], 3, &mut out));
        assert!(w.push(&a, &[3.0, 30.0], 3, &mut out));
        assert_eq!(out, [1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
        out.clear();
        assert!(w.push(&a, &[4.0, 40.0], 3, &mut out));
        assert_eq!(out, [2.0, 20.0, 3.0, 30.0, 4.0, 40.0]);
        out.clear();
        assert!(!w.push(&b, &[8.0, 80.0], 3, &mut out), "b has two frames");
        assert!(out.is_empty());
        // A model that takes three features: the two-feature frames are dropped.
        assert!(!w.push(&a, &[5.0, 50.0, 500.0], 2, &mut out));
        assert!(w.push(&a, &[6.0, 60.0, 600.0], 2, &mut out));
        assert_eq!(out, [5.0, 50.0, 500.0, 6.0, 60.0, 600.0]);
    }
}
