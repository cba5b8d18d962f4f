//! Report by exception (`source.rows = "last_value"`): gateways that publish a tag only when
//! it changes send messages holding some of the features. Each such message updates its
//! device's last value of the features it holds, and the row scored is the device's last
//! value of every feature, as a Sparkplug B DDATA is.
//!
//! A feature no message of the device has held yet (or, with `max_age_s`, none recently) is
//! missing, and the row is rejected as `missing_feature` saying so: a model is not run on a
//! value lathe never saw. A message with a bad value is rejected whole and changes nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Devices whose values are kept; past this the least recently seen is forgotten, as for
/// sequence windows.
const MAX_DEVICES: usize = 100_000;

pub struct LastValues {
    /// A value older than this is missing; `None`: a value stands until replaced.
    max_age: Option<Duration>,
    devices: HashMap<String, Device>,
}

#[derive(Default)]
struct Device {
    /// Feature (input name) → value and when it came.
    values: HashMap<String, (f64, Instant)>,
    seen: Option<Instant>,
}

impl LastValues {
    pub fn new(max_age: Option<Duration>) -> LastValues {
        LastValues { max_age, devices: HashMap::new() }
    }

    /// Records `fresh` (feature, value) for `device`, received `now`, and returns its last
    /// value of each of `features` (`None` for one it has no value for, or only a stale one).
    pub fn update<'a>(
        &mut self,
        device: &str,
        fresh: impl IntoIterator<Item = (&'a str, f64)>,
        features: impl Iterator<Item = &'a str>,
        now: Instant,
    ) -> Vec<Option<f64>> {
        if !self.devices.contains_key(device) && self.devices.len() >= MAX_DEVICES {
            if let Some(oldest) = self.devices.iter().min_by_key(|(_, d)| d.seen).map(|(k, _)| k.clone()) {
                self.devices.remove(&oldest);
            }
        }
        // Looked up before inserting: the device's id is copied once, not per message.
        if !self.devices.contains_key(device) {
            self.devices.insert(device.to_string(), Device::default());
        }
        let Some(d) = self.devices.get_mut(device) else { return Vec::new() };
        d.seen = Some(now);
        for (name, x) in fresh {
            // Replaced in place: a feature's name is copied once, when the device first sends it.
            match d.values.get_mut(name) {
                Some(value) => *value = (x, now),
                None => {
                    d.values.insert(name.to_string(), (x, now));
                }
            }
        }
        let max_age = self.max_age;
        features
            .map(|name| {
                let (x, at) = d.values.get(name)?;
                max_age.is_none_or(|max| now.duration_since(*at) <= max).then_some(*x)
            })
            .collect()
    }

    /// Drops `device`'s last value of `feature` (the gateway said it is bad).
    pub fn forget(&mut self, device: &str, feature: &str) {
        if let Some(d) = self.devices.get_mut(device) {
            d.values.remove(feature);
        }
    }

    pub fn max_age(&self) -> Option<Duration> {
        self.max_age
    }

    /// How many devices have values kept.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_device_keeps_the_last_value_of_each_feature_until_it_is_too_old() {
        let mut v = LastValues::new(Some(Duration::from_secs(60)));
        let t0 = Instant::now();
        let names = || ["temp", "vib"].into_iter();
        assert_eq!(v.update("a", [("temp", 20.0)], names(), t0), [Some(20.0), None]);
        assert_eq!(v.update("b", [("vib", 1.0)], names(), t0), [None, Some(1.0)], "devices apart");
        assert_eq!(v.update("a", [("vib", 2.0)], names(), t0), [Some(20.0), Some(2.0)]);
        let later = t0 + Duration::from_secs(45);
        assert_eq!(v.update("a", [("temp", 21.0)], names(), later), [Some(21.0), Some(2.0)]);
        let much_later = t0 + Duration::from_secs(90);
        assert_eq!(v.update("a", [], names(), much_later), [Some(21.0), None], "vib is 90 s old");
        assert_eq!(v.devices(), 2);
    }
}
