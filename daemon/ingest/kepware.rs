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
//! the rest (`Temp`, or `Motor.Current` in a tag group), which is what a feature names. Ids of
//! fewer than three levels (`_System._Time`) belong to no device and are skipped.
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

use std::collections::HashMap;

use serde_json::Value;

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

/// The message's values grouped by device, in the order each device first appears, and the
/// message's own `timestamp`.
///
/// # Errors
/// A payload that is not the standard template: no `values` array, or an element without a
/// string `id`.
pub fn devices(doc: &Value) -> Result<(Vec<DeviceValues<'_>>, Option<&Value>), String> {
    let values = doc.get("values").and_then(Value::as_array).ok_or_else(|| {
        "not Kepware's IoT Gateway standard template: no \"values\" array (expected {\"timestamp\": …, \"values\": [{\"id\": \"Channel.Device.Tag\", \"v\": …, \"q\": true, \"t\": …}]})".to_string()
    })?;
    let mut devices: Vec<DeviceValues> = Vec::new();
    // Device → its place in `devices`: an agent may carry hundreds of devices in a message.
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, value) in values.iter().enumerate() {
        let id = value
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("values[{i}] has no string \"id\" (the tag's Channel.Device.Tag)"))?;
        let mut levels = id.splitn(3, '.');
        let (Some(channel), Some(device), Some(tag)) = (levels.next(), levels.next(), levels.next()) else {
            continue; // a server-wide system tag: no device
        };
        let device = &id[..channel.len() + 1 + device.len()];
        let v = value.get("v").unwrap_or(&Value::Null);
        let good = match value.get("q") {
            None => true,
            Some(Value::Bool(q)) => *q,
            // OPC DA quality as a number: good is 0b11xx_xxxx.
            Some(q) => q.as_u64().is_some_and(|q| q & 0xC0 == 0xC0),
        };
        let tag_value = TagValue { tag, v, good, t: value.get("t") };
        match index.get(device).and_then(|&at| devices.get_mut(at)) {
            Some(d) => d.values.push(tag_value),
            None => {
                index.insert(device, devices.len());
                devices.push(DeviceValues { device, values: vec![tag_value] });
            }
        }
    }
    Ok((devices, doc.get("timestamp")))
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
        let doc: Value = serde_json::from_str(
            r#"{"timestamp": 5, "values": [
                {"id": "L1.P7.Temp", "v": 1, "q": true, "t": 3},
                {"id": "_System._Time", "v": "12:00"},
                {"id": "L1.P8.Motor.Current", "v": 2, "q": false, "t": 4},
                {"id": "L1.P7.Temp", "v": 9, "q": 192},
                {"id": "L1.P7.Vib", "v": 3, "q": 0}]}"#,
        )
        .unwrap();
        let (devices, ts) = devices(&doc).unwrap();
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
    fn a_payload_of_another_shape_says_what_was_expected() {
        let err = |text: &str| devices(&serde_json::from_str(text).unwrap()).err().unwrap();
        assert!(err(r#"{"temp": 1}"#).starts_with("not Kepware's IoT Gateway standard template"));
        assert_eq!(err(r#"{"values": [{"v": 1}]}"#), "values[0] has no string \"id\" (the tag's Channel.Device.Tag)");
    }
}
