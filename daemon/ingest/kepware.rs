//! Kepware KEPServerEX's IoT Gateway, standard template (`format = "kepware"`). An MQTT
//! agent publishes the tags of many devices in one message:
//!
//! ```json
//! {"timestamp": 1764745200000,
//!  "values": [{"id": "Line1.Pump7.Temp", "v": 71.5, "q": true, "t": 1764745199000},
//!             {"id": "Line1.Pump7.Motor.Current", "v": 12.1, "q": true, "t": 1764745199000}]}
//! ```
//!
//! A tag id is `channel.device.tag`, where Kepware does not allow a `.` in a channel's or a
//! device's name; so the device is the id's first two levels (`Line1.Pump7`) and the tag is
//! the rest (`Temp`, or `Motor.Current` in a tag group), which is what a feature names. Where
//! one PLC runs several machines, each a tag group, `device_levels = 3` makes the group the
//! device (`Line1.PLC1.Pump7`, tag `Temp`). An id with no tag after its device
//! (`_System._Time`) belongs to no device and is skipped.
//!
//! Each device the message holds a feature of is one row: every feature from this message
//! (`rows = "whole"`: an agent whose tags "Send Every Scan"), or the device's last value of
//! each (`rows = "last_value"`: Kepware's default, only the tags that changed). A device
//! whose tags in the message are none of the pipeline's features is not this pipeline's and
//! makes no row. A value whose quality is bad (`"q": false`) is not scored: the row is
//! rejected as `bad_quality`, and the device's last value of that feature is forgotten, so
//! no later row uses a value from before the fault. A row's key and timestamp are the
//! newest `t` among its values in the message (the message's `timestamp` where none has
//! one): a label names a row by that number, as it names a Sparkplug B row.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::Reject;

/// A message in the standard template. Read into these types rather than a `Value` tree: a
/// map per tag object (and its keys) made serving a Kepware agent's rows about 20% slower end
/// to end (`benches/e2e_bench.py --kepware`, 3 runs each: median 18.5k vs 22.3k rows/s).
#[derive(Deserialize)]
pub struct Message<'a> {
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(borrow)]
    values: Vec<Tag<'a>>,
}

#[derive(Deserialize)]
struct Tag<'a> {
    /// Borrowed from the payload unless it holds an escape.
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(default)]
    v: Value,
    #[serde(default)]
    q: Option<Value>,
    #[serde(default)]
    t: Option<Value>,
}

/// The payload as the standard template.
///
/// # Errors
/// `not_json`, or `bad_kepware` for JSON of another shape (no `values` array, a value
/// without a string `id`), saying what was expected.
pub fn parse(payload: &[u8]) -> Result<Message<'_>, Reject> {
    serde_json::from_slice(payload).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Reject::BadKepware(format!(
            "not Kepware's IoT Gateway standard template ({e}); expected {{\"timestamp\": …, \"values\": [{{\"id\": \"Channel.Device.Tag\", \"v\": …, \"q\": true, \"t\": …}}]}}"
        )),
        _ => Reject::NotJson(e.to_string()),
    })
}

impl Message<'_> {
    /// The message's own `timestamp`, where it has one.
    pub fn timestamp(&self) -> Option<&Value> {
        self.timestamp.as_ref()
    }
}

/// One tag value from a message.
pub struct TagValue<'a> {
    /// The id less its device: what a feature names.
    pub tag: &'a str,
    pub v: &'a Value,
    /// `q` is true (or absent, as a custom template may leave it out).
    pub good: bool,
    pub t: Option<&'a Value>,
}

/// The values a message holds for one device, in the message's order (a tag sent twice,
/// as an agent buffering changes does, is read at its last value).
pub struct DeviceValues<'a> {
    pub device: &'a str,
    pub values: Vec<TagValue<'a>>,
}

impl DeviceValues<'_> {
    /// The last value the message holds for `tag`.
    pub fn get(&self, tag: &str) -> Option<&TagValue<'_>> {
        self.values.iter().rev().find(|v| v.tag == tag)
    }
}

/// The message's values grouped by device (a tag id's first `levels` levels), in the order
/// each device first appears.
pub fn devices<'a>(message: &'a Message<'_>, levels: usize) -> Vec<DeviceValues<'a>> {
    let mut devices: Vec<DeviceValues> = Vec::new();
    // Device → its place in `devices`: an agent may carry hundreds of devices in a message.
    let mut index: HashMap<&str, usize> = HashMap::new();
    for value in &message.values {
        let id: &str = &value.id;
        let Some(end) = levels.checked_sub(1).and_then(|n| id.match_indices('.').nth(n)).map(|(at, _)| at) else {
            continue; // a server-wide system tag: no device
        };
        let (device, tag) = (&id[..end], &id[end + 1..]);
        let good = match &value.q {
            None => true,
            Some(Value::Bool(q)) => *q,
            // OPC DA quality as a number: good is 0b11xx_xxxx.
            Some(q) => q.as_u64().is_some_and(|q| q & 0xC0 == 0xC0),
        };
        let tag_value = TagValue { tag, v: &value.v, good, t: value.t.as_ref() };
        match index.get(device).and_then(|&at| devices.get_mut(at)) {
            Some(d) => d.values.push(tag_value),
            None => {
                index.insert(device, devices.len());
                devices.push(DeviceValues { device, values: vec![tag_value] });
            }
        }
    }
    devices
}

/// The newest of the `t`s (numbers, as Kepware sends milliseconds since 1970), or `fallback`.
pub fn newest<'a>(ts: impl Iterator<Item = Option<&'a Value>>, fallback: Option<&'a Value>) -> Value {
    ts.flatten()
        .filter(|t| t.as_f64().is_some())
        .max_by(|a, b| a.as_f64().unwrap_or(0.0).total_cmp(&b.as_f64().unwrap_or(0.0)))
        .or(fallback)
        .cloned()
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_is_the_ids_first_two_levels_and_the_tag_the_rest() {
        let message = parse(
            br#"{"timestamp": 5, "values": [
                {"id": "L1.P7.Temp", "v": 1, "q": true, "t": 3},
                {"id": "_System._Time", "v": "12:00"},
                {"id": "L1.P8.Motor.Current", "v": 2, "q": false, "t": 4},
                {"id": "L1.P7.Temp", "v": 9, "q": 192},
                {"id": "L1.P7.Vib", "v": 3, "q": 0}]}"#,
        )
        .unwrap();
        let (devices, ts) = (devices(&message, 2), message.timestamp());
        assert_eq!(ts, Some(&Value::from(5)));
        let names: Vec<_> = devices.iter().map(|d| d.device).collect();
        assert_eq!(names, ["L1.P7", "L1.P8"], "the system tag belongs to no device");
        assert_eq!(devices[0].get("Temp").unwrap().v, &Value::from(9), "the last value sent wins");
        assert!(devices[0].get("Temp").unwrap().good, "OPC quality 192 is good");
        assert!(!devices[0].get("Vib").unwrap().good, "OPC quality 0 is bad");
        let current = devices[1].get("Motor.Current").unwrap();
        assert_eq!((current.v, current.good), (&Value::from(2), false));
        assert_eq!(newest(devices[0].values.iter().map(|v| v.t), ts), Value::from(3));
        assert_eq!(newest([None].into_iter(), ts), Value::from(5), "no t: the message's timestamp");
    }

    #[test]
    fn with_three_device_levels_a_plcs_tag_groups_are_the_devices() {
        let message = parse(
            br#"{"values": [{"id": "L1.PLC1.Pump7.Temp", "v": 1}, {"id": "L1.PLC1.Pump8.Temp", "v": 2},
                            {"id": "L1.PLC1.Mode", "v": 3}]}"#,
        )
        .unwrap();
        let devices = devices(&message, 3);
        let found: Vec<_> = devices.iter().map(|d| (d.device, d.values[0].tag)).collect();
        assert_eq!(found, [("L1.PLC1.Pump7", "Temp"), ("L1.PLC1.Pump8", "Temp")], "the PLC's own tag: no device");
    }

    #[test]
    fn a_payload_of_another_shape_says_what_was_expected() {
        let err = |text: &str| parse(text.as_bytes()).err().unwrap();
        assert_eq!(err("{\"values\": [").reason(), "not_json");
        let other = err(r#"{"temp": 1}"#);
        assert_eq!(other.reason(), "bad_kepware");
        assert!(
            other.to_string().starts_with("not Kepware's IoT Gateway standard template (missing field `values`"),
            "{other}"
        );
        assert!(err(r#"{"values": [{"v": 1}]}"#).to_string().contains("missing field `id`"));
        assert!(err(r#"{"values": [{"id": 7}]}"#).to_string().contains("invalid type: integer `7`, expected a string"));
    }
}
