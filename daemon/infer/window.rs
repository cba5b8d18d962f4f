//! Sequence windows (`window = { size = N }`): each device's last N accepted frames, oldest
//! first, the sample a model with input `[batch, N, features]` takes.
//!
//! A device's first N − 1 frames (on a first start, or after a swap to a longer window) only
//! fill its window: they are acknowledged and counted (`window_filling`), not predicted. A
//! prediction made on padding would look like one made on history, and is not.
//!
//! The windows outlive the pipeline's task: a reload hands them to the next run, and a clean
//! stop saves them (`state_dir/windows/{pipeline}.bin`) for the next start to resume within
//! `window.resume_within`. Without that, a window of 60 one-minute frames would leave every
//! device unpredicted for an hour after each restart or upgrade.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Devices whose windows are kept; past this the least recently seen is forgotten (ingest
/// interns at most 100,000 device ids; a window of 32 frames of 16 values is 2 KiB).
const MAX_DEVICES: usize = 100_000;

#[derive(Default)]
pub struct Windows {
    devices: HashMap<Arc<str>, Device>,
    /// A counter that orders devices by when they were last seen.
    clock: u64,
}

/// A pipeline's windows, shared by its task and the service that keeps them across runs.
pub type SharedWindows = Arc<Mutex<Windows>>;

/// The first bytes of a saved windows file.
const MAGIC: &[u8] = b"lathe-windows 1\n";

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

    /// Devices with a window (full or filling).
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Writes the windows to `path` (atomically), stamped `now_ms`:
    /// `MAGIC | u64 saved_ms | u32 devices | per device: u16 name length, name, u32 width,
    /// u32 values, values as f32`, little-endian, least recently seen first.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, path: &Path, now_ms: u64) -> std::io::Result<()> {
        let mut devices: Vec<(&Arc<str>, &Device)> = self.devices.iter().collect();
        devices.sort_by_key(|(_, d)| d.seen);
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&now_ms.to_le_bytes());
        b.extend_from_slice(&(devices.len() as u32).to_le_bytes());
        for (name, d) in devices {
            let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
            b.extend_from_slice(&(name.len() as u16).to_le_bytes());
            b.extend_from_slice(name);
            b.extend_from_slice(&(d.width as u32).to_le_bytes());
            b.extend_from_slice(&(d.frames.len() as u32).to_le_bytes());
            for v in &d.frames {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        crate::fs::write_atomic(path, &b)
    }

    /// Reads windows saved by [`Windows::save`]: `Ok(None)` when they were saved more than
    /// `max_age_ms` before `now_ms` (or after it: a clock that went back cannot vouch for them).
    ///
    /// # Errors
    /// A file that is not whole windows of this layout.
    pub fn read(bytes: &[u8], now_ms: u64, max_age_ms: u64) -> Result<Option<(Windows, u64)>, String> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let part = bytes.get(at..at + n).ok_or("cut short")?;
            at += n;
            Ok(part)
        };
        if take(MAGIC.len())? != MAGIC {
            return Err("not a windows file".into());
        }
        let u32_of = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let saved_ms = u64::from_le_bytes(take(8)?.try_into().map_err(|_| "cut short")?);
        let age_ms = now_ms.checked_sub(saved_ms).filter(|&age| age <= max_age_ms);
        let Some(age_ms) = age_ms else { return Ok(None) };
        let count = u32_of(take(4)?);
        if count > MAX_DEVICES {
            return Err(format!("{count} devices, more than the {MAX_DEVICES} kept"));
        }
        let mut windows = Windows::default();
        for _ in 0..count {
            let len = take(2)?;
            let len = u16::from_le_bytes([len[0], len[1]]) as usize;
            let name = std::str::from_utf8(take(len)?).map_err(|_| "a device name is not UTF-8")?;
            let name: Arc<str> = name.into();
            let width = u32_of(take(4)?);
            let values = u32_of(take(4)?);
            let longest = width.saturating_mul(crate::engine::MAX_FRAMES as usize);
            if width == 0 || !values.is_multiple_of(width) || values > longest {
                return Err(format!("device {name:?}: {values} values is not a window of {width}-value frames"));
            }
            let raw = take(values.checked_mul(4).ok_or("cut short")?)?;
            let frames = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            windows.clock += 1;
            windows.devices.insert(name, Device { frames, width, seen: windows.clock });
        }
        if at != bytes.len() {
            return Err("bytes after the last window".into());
        }
        Ok(Some((windows, age_ms)))
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

    /// Saved windows resume where they were, least recently seen first; saved too long ago,
    /// or "later" than now (a clock that went back), they do not; a damaged file is an error.
    #[test]
    fn saved_windows_resume_within_their_age_and_a_damaged_file_is_refused() {
        let mut w = Windows::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut out = Vec::new();
        for i in 0..3 {
            w.push(&a, &[i as f32, 10.0 * i as f32], 3, &mut out);
        }
        w.push(&b, &[7.0, 70.0], 3, &mut out);
        let path = std::env::temp_dir().join(format!("lathe-windows-{}.bin", std::process::id()));
        w.save(&path, 1_000_000).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (mut back, age) = Windows::read(&bytes, 1_060_000, 300_000).unwrap().unwrap();
        assert_eq!((back.devices(), age), (2, 60_000));
        assert!(back.devices[&a].seen < back.devices[&b].seen, "b was seen last");
        // a's window was full: its next frame is answered at once, after its saved frames.
        out.clear();
        assert!(back.push(&a, &[3.0, 30.0], 3, &mut out));
        assert_eq!(out, [1.0, 10.0, 2.0, 20.0, 3.0, 30.0]);
        out.clear();
        assert!(!back.push(&b, &[8.0, 80.0], 3, &mut out));
        assert!(back.push(&b, &[9.0, 90.0], 3, &mut out));
        assert_eq!(out, [7.0, 70.0, 8.0, 80.0, 9.0, 90.0]);
        assert!(Windows::read(&bytes, 1_400_000, 300_000).unwrap().is_none(), "saved too long ago");
        assert!(Windows::read(&bytes, 999_000, 300_000).unwrap().is_none(), "saved after now");
        assert!(Windows::read(&bytes[..bytes.len() - 1], 1_060_000, 300_000).is_err());
        let longer = [bytes.as_slice(), &[0]].concat();
        assert!(Windows::read(&longer, 1_060_000, 300_000).is_err());
        assert!(Windows::read(b"lathe-windows 9\nxxxxxxxx", 1_060_000, 300_000).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
