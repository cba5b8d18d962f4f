//! Turning one telemetry payload into feature rows, or reasons they cannot be rows.

use std::time::Instant;

use serde_json::Value;

use super::kepware;
use super::last_value::LastValues;
use crate::model::manifest::Input;

/// Why a message was not accepted. Each is counted, logged and reported on the events topic.
#[derive(Debug, Clone, PartialEq)]
pub enum Reject {
    TooLarge {
        bytes: usize,
        max: usize,
    },
    NotJson(String),
    MissingFeature {
        feature: String,
        pointer: String,
    },
    NonNumeric {
        feature: String,
        found: String,
    },
    NonFinite {
        feature: String,
    },
    OutOfRange {
        feature: String,
        value: f64,
        min: f64,
        max: f64,
    },
    /// Sparkplug B: not a Sparkplug payload.
    BadSparkplug(String),
    /// Sparkplug B: the edge node's state is in doubt until its rebirth.
    SparkplugStale(String),
    /// A JSON array with no rows in it.
    EmptyBatch,
    /// `format = "kepware"`: not the IoT Gateway's standard template.
    BadKepware(String),
    /// `format = "kepware"`: the gateway marked a feature's value bad (`"q": false`).
    BadQuality {
        feature: String,
        tag: String,
    },
}

impl Reject {
    /// All reasons, in the order counters are kept.
    pub const REASONS: [&'static str; 11] = crate::telemetry::events::REJECT_REASONS;

    pub fn index(&self) -> usize {
        match self {
            Reject::TooLarge { .. } => 0,
            Reject::NotJson(_) => 1,
            Reject::MissingFeature { .. } => 2,
            Reject::NonNumeric { .. } => 3,
            Reject::NonFinite { .. } => 4,
            Reject::OutOfRange { .. } => 5,
            Reject::BadSparkplug(_) => 6,
            Reject::SparkplugStale(_) => 7,
            Reject::EmptyBatch => 8,
            Reject::BadKepware(_) => 9,
            Reject::BadQuality { .. } => 10,
        }
    }

    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.index()]
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::TooLarge { bytes, max } => {
                write!(f, "payload of {bytes} bytes is over mqtt.max_payload_bytes ({max})")
            }
            Reject::NotJson(e) => write!(f, "payload is not JSON: {e}"),
            Reject::MissingFeature { feature, pointer } => {
                write!(f, "feature {feature:?} is missing (no value at {pointer})")
            }
            Reject::NonNumeric { feature, found } => {
                write!(f, "feature {feature:?} is not a number: {found}")
            }
            Reject::NonFinite { feature } => {
                write!(f, "feature {feature:?} is not finite as a 32-bit float")
            }
            Reject::OutOfRange { feature, value, min, max } => {
                write!(f, "feature {feature:?} = {value} is outside the bundle's range [{min}, {max}]")
            }
            Reject::BadSparkplug(e) => write!(f, "{e}"),
            Reject::SparkplugStale(why) => write!(f, "not scored until the edge node's rebirth: {why}"),
            Reject::EmptyBatch => write!(f, "payload is an empty JSON array: no rows in it"),
            Reject::BadKepware(e) => write!(f, "{e}"),
            Reject::BadQuality { feature, tag } => {
                write!(f, "feature {feature:?} (tag {tag}) has bad quality: the gateway marked its value \"q\": false")
            }
        }
    }
}

/// A feature row read from one message, plus what is echoed into the prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    pub features: Vec<f32>,
    pub key: Value,
    pub ts: Value,
}

/// One row of a message: its device where the payload names it (`None`: the device in the
/// topic), and its features or why it has none.
pub type Row = (Option<String>, Result<Extracted, Reject>);

/// An input as read: (its name; the JSON pointer, Sparkplug metric or Kepware tag it is read
/// from; the bundle's min and max).
type Field = (String, String, f64, f64);

/// Reads a pipeline's features out of JSON payloads: pointers and ranges fixed at start.
#[derive(Debug, Clone)]
pub struct Extractor {
    /// In model order.
    fields: Vec<Field>,
    key: Option<String>,
    timestamp: Option<String>,
    max_payload_bytes: usize,
    /// `format = "kepware"`: payloads are the IoT Gateway's standard template, and this many
    /// leading levels of a tag id are its device.
    kepware_device_levels: Option<usize>,
}

impl Extractor {
    pub fn new(
        inputs: &[Input],
        pointers: &std::collections::BTreeMap<String, String>,
        key: Option<String>,
        timestamp: Option<String>,
        max_payload_bytes: usize,
    ) -> Extractor {
        let fields = inputs
            .iter()
            .map(|i| {
                let ptr = pointers.get(&i.name).cloned().unwrap_or_else(|| format!("/{}", escape_pointer(&i.name)));
                (i.name.clone(), ptr, i.min, i.max)
            })
            .collect();
        Extractor { fields, key, timestamp, max_payload_bytes, kepware_device_levels: None }
    }

    /// For a Sparkplug B source: input name → metric name (an input not listed reads the
    /// metric of its own name).
    pub fn for_metrics(
        inputs: &[Input],
        metrics: &std::collections::BTreeMap<String, String>,
        max_payload_bytes: usize,
    ) -> Extractor {
        let fields = inputs
            .iter()
            .map(|i| (i.name.clone(), metrics.get(&i.name).unwrap_or(&i.name).clone(), i.min, i.max))
            .collect();
        Extractor { fields, key: None, timestamp: None, max_payload_bytes, kepware_device_levels: None }
    }

    /// For a Kepware IoT Gateway source: input name → tag within the device (an input not
    /// listed reads the tag of its own name); the device is a tag id's first `device_levels`;
    /// `key_tag`, the device's tag whose value keys a row (else its newest `t`).
    pub fn for_kepware_tags(
        inputs: &[Input],
        tags: &std::collections::BTreeMap<String, String>,
        device_levels: usize,
        key_tag: Option<String>,
        max_payload_bytes: usize,
    ) -> Extractor {
        Extractor {
            kepware_device_levels: Some(device_levels),
            key: key_tag,
            ..Self::for_metrics(inputs, tags, max_payload_bytes)
        }
    }

    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// The rows of one JSON telemetry payload that came on a topic of `device`, read as the
    /// source says: whole rows, or (with `last`) each device's last values; for Kepware, a row
    /// per device the payload names. Sparkplug B is read apart, by `from_metrics`.
    pub fn read(&self, payload: &[u8], device: &str, last: Option<&mut LastValues>, now: Instant) -> Vec<Row> {
        if let Some(levels) = self.kepware_device_levels {
            return self.kepware_rows(payload, levels, last, now);
        }
        let rows = match last {
            Some(last) => self.rows_by_exception(payload, device, last, now),
            None => self.rows(payload),
        };
        rows.into_iter().map(|row| (None, row)).collect()
    }

    /// The rows of one telemetry payload, each a row or the first reason it cannot be one.
    /// A JSON object is one row; a JSON array is a gateway's batch, one row per element, each
    /// read with the same pointers (its own key and timestamp). A payload too large, not JSON
    /// or an empty array is one rejection.
    pub fn rows(&self, payload: &[u8]) -> Vec<Result<Extracted, Reject>> {
        self.each_row(payload, |doc| self.row(doc))
    }

    /// As [`Extractor::rows`], for a source that reports by exception (`rows = "last_value"`):
    /// each message holds the features that changed, and each row is `device`'s last value
    /// of every feature (see `last_value.rs`).
    pub fn rows_by_exception(
        &self,
        payload: &[u8],
        device: &str,
        last: &mut LastValues,
        now: Instant,
    ) -> Vec<Result<Extracted, Reject>> {
        self.each_row(payload, |doc| self.merged_row(doc, device, last, now))
    }

    fn each_row(
        &self,
        payload: &[u8],
        mut row: impl FnMut(&Value) -> Result<Extracted, Reject>,
    ) -> Vec<Result<Extracted, Reject>> {
        if payload.len() > self.max_payload_bytes {
            return vec![Err(Reject::TooLarge { bytes: payload.len(), max: self.max_payload_bytes })];
        }
        match serde_json::from_slice::<Value>(payload) {
            Err(e) => vec![Err(Reject::NotJson(e.to_string()))],
            Ok(Value::Array(batch)) if batch.is_empty() => vec![Err(Reject::EmptyBatch)],
            Ok(Value::Array(batch)) => batch.iter().map(row).collect(),
            Ok(doc) => vec![row(&doc)],
        }
    }

    fn row(&self, doc: &Value) -> Result<Extracted, Reject> {
        let features = self.features(|name, ptr| read_number(doc, name, ptr))?;
        Ok(self.echo(doc, features))
    }

    fn merged_row(&self, doc: &Value, device: &str, last: &mut LastValues, now: Instant) -> Result<Extracted, Reject> {
        // The values this message holds, each checked: one bad value rejects it whole.
        let mut fresh = Vec::new();
        for (name, ptr, min, max) in &self.fields {
            if doc.pointer(ptr).is_some() {
                fresh.push((name.as_str(), check(name, read_number(doc, name, ptr)?, *min, *max)?));
            }
        }
        if fresh.is_empty() {
            let (feature, pointer) = self.fields.first().map(|f| (f.0.clone(), f.1.clone())).unwrap_or_default();
            return Err(Reject::MissingFeature { feature, pointer });
        }
        let features = self.merge(device, fresh, last, now, str::to_string)?;
        Ok(self.echo(doc, features))
    }

    /// Records `fresh` (input, checked value) as `device`'s last values and returns its last
    /// value of every input; an input it has none of (or, with `max_age_s`, none recent) is
    /// missing, where `describe(source)` says where it was looked for.
    fn merge(
        &self,
        device: &str,
        fresh: Vec<(&str, f64)>,
        last: &mut LastValues,
        now: Instant,
        describe: impl Fn(&str) -> String,
    ) -> Result<Vec<f32>, Reject> {
        let max_age = last.max_age();
        let mut values = last.update(device, fresh, self.names(), now).into_iter();
        self.features(|name, source| {
            values.next().flatten().ok_or_else(|| {
                let earlier = match max_age {
                    Some(age) => format!(" in this message or one of the device's in the last {} s", age.as_secs()),
                    None => " in this or an earlier message of the device".to_string(),
                };
                Reject::MissingFeature { feature: name.to_string(), pointer: format!("{}{earlier}", describe(source)) }
            })
        })
    }

    /// A Kepware message: a row for each device it holds a feature of (see `kepware.rs`).
    fn kepware_rows(&self, payload: &[u8], levels: usize, mut last: Option<&mut LastValues>, now: Instant) -> Vec<Row> {
        if payload.len() > self.max_payload_bytes {
            return vec![(None, Err(Reject::TooLarge { bytes: payload.len(), max: self.max_payload_bytes }))];
        }
        let message = match kepware::parse(payload) {
            Ok(message) => message,
            Err(reject) => return vec![(None, Err(reject))],
        };
        let (devices, stamp) = (kepware::devices(&message, levels), message.timestamp());
        let mut rows = Vec::new();
        for d in &devices {
            // The device's values of this pipeline's features; none: another pipeline's device.
            let ours: Vec<_> = self.fields.iter().filter_map(|f| d.get(&f.1).map(|v| (f, v))).collect();
            if ours.is_empty() {
                continue;
            }
            // The device names the sink topic's `{device}` level, where a wildcard is refused
            // by the broker and a '/' would move the prediction to another topic.
            if d.device.is_empty() || d.device.contains(['/', '+', '#']) {
                let why = format!("device {:?} cannot be a topic level (empty, or holds '/', '+' or '#')", d.device);
                rows.push((Some(d.device.to_string()), Err(Reject::BadKepware(why))));
                continue;
            }
            let ts = kepware::newest(ours.iter().map(|(_, v)| v.t), stamp);
            // A key tag's value in this message (null when it holds none), else the time.
            let key = match &self.key {
                Some(tag) => d.get(tag).map_or(Value::Null, |k| k.v.clone()),
                None => ts.clone(),
            };
            let features = self.kepware_row(d, &ours, last.as_deref_mut(), now);
            let row = features.map(|features| Extracted { features, key, ts });
            rows.push((Some(d.device.to_string()), row));
        }
        rows
    }

    fn kepware_row(
        &self,
        d: &kepware::DeviceValues,
        ours: &[(&Field, &kepware::TagValue)],
        last: Option<&mut LastValues>,
        now: Instant,
    ) -> Result<Vec<f32>, Reject> {
        let tag = |tag: &str| format!("tag {}.{tag}", d.device);
        if let Some(((feature, bad, ..), _)) = ours.iter().find(|(_, v)| !v.good) {
            // Forgotten, so no later row is scored on a value from before the fault.
            if let Some(last) = last {
                ours.iter().filter(|(_, v)| !v.good).for_each(|((name, ..), _)| last.forget(d.device, name));
            }
            return Err(Reject::BadQuality { feature: feature.clone(), tag: format!("{}.{bad}", d.device) });
        }
        let Some(last) = last else {
            return self.features(|name, source| match d.get(source) {
                Some(value) => to_number(name, value.v),
                None => Err(Reject::MissingFeature { feature: name.to_string(), pointer: tag(source) }),
            });
        };
        let mut fresh = Vec::with_capacity(ours.len());
        for ((name, _, min, max), value) in ours {
            fresh.push((name.as_str(), check(name, to_number(name, value.v)?, *min, *max)?));
        }
        self.merge(d.device, fresh, last, now, tag)
    }

    /// The row, with the message's key and timestamp (null where it has none).
    fn echo(&self, doc: &Value, features: Vec<f32>) -> Extracted {
        let echo = |p: &Option<String>| p.as_deref().and_then(|p| doc.pointer(p)).cloned().unwrap_or(Value::Null);
        Extracted { features, key: echo(&self.key), ts: echo(&self.timestamp) }
    }

    /// A Sparkplug B row: each input's metric (its `features` name, by default the input's
    /// own) from `value`, the device's current values.
    ///
    /// # Errors
    /// A metric the device has no value for, or a value that is not finite or out of range.
    pub fn from_metrics(&self, value: impl Fn(&str) -> Option<f64>) -> Result<Vec<f32>, Reject> {
        self.features(|name, metric| {
            value(metric).ok_or_else(|| Reject::MissingFeature {
                feature: name.to_string(),
                pointer: format!("metric {metric:?}"),
            })
        })
    }

    /// Reads every input with `read(name, source)` and checks it against the bundle's range.
    fn features(&self, mut read: impl FnMut(&str, &str) -> Result<f64, Reject>) -> Result<Vec<f32>, Reject> {
        let mut features = Vec::with_capacity(self.fields.len());
        for (name, source, min, max) in &self.fields {
            features.push(check(name, read(name, source)?, *min, *max)? as f32);
        }
        Ok(features)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|f| f.0.as_str())
    }
}

/// The number at `ptr` in `doc`, or why there is none.
fn read_number(doc: &Value, name: &str, ptr: &str) -> Result<f64, Reject> {
    let v = doc
        .pointer(ptr)
        .ok_or_else(|| Reject::MissingFeature { feature: name.to_string(), pointer: ptr.to_string() })?;
    to_number(name, v)
}

/// Input `name`'s value `v` as a number, or why it is not one.
fn to_number(name: &str, v: &Value) -> Result<f64, Reject> {
    number(v).ok_or_else(|| Reject::NonNumeric { feature: name.to_string(), found: truncate(&v.to_string(), 40) })
}

/// `x` if it is finite as an f32 and within the bundle's range for input `name`.
fn check(name: &str, x: f64, min: f64, max: f64) -> Result<f64, Reject> {
    if !(x as f32).is_finite() {
        return Err(Reject::NonFinite { feature: name.to_string() });
    }
    if x < min || x > max {
        return Err(Reject::OutOfRange { feature: name.to_string(), value: x, min, max });
    }
    Ok(x)
}

/// A JSON value as a number: a number; a boolean as 1 or 0 (a PLC's digital input); or a
/// string that holds a decimal number (`"23.5"`, as gateways that forward text write it).
/// A string holding anything else (`"hot"`, `"23,5"`, `"NaN"`, `"inf"`) is not a number.
pub fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::String(s) => {
            let s = s.trim();
            let decimal = s.bytes().any(|b| b.is_ascii_digit())
                && s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
            decimal.then(|| s.parse().ok()).flatten()
        }
        _ => None,
    }
}

/// RFC 6901: `~` and `/` in a name are escaped in a pointer.
fn escape_pointer(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let cut = (0..=n).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        format!("{}…", &s[..cut])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payload's only row.
    fn one(e: &Extractor, payload: &[u8]) -> Result<Extracted, Reject> {
        let mut rows = e.rows(payload);
        assert_eq!(rows.len(), 1, "{}", String::from_utf8_lossy(payload));
        rows.remove(0)
    }

    fn extractor() -> Extractor {
        let inputs = vec![
            Input { name: "temp".into(), unit: "C".into(), min: -40.0, max: 150.0 },
            Input { name: "vib".into(), unit: String::new(), min: 0.0, max: 10.0 },
        ];
        let pointers = [("vib".to_string(), "/vibration/rms".to_string())].into();
        Extractor::new(&inputs, &pointers, Some("/seq".into()), None, 256)
    }

    #[test]
    fn features_are_read_in_model_order_by_pointer() {
        let got = one(&extractor(), br#"{"vibration":{"rms":2.5},"temp":20,"seq":7}"#).unwrap();
        assert_eq!(got.features, vec![20.0, 2.5]);
        assert_eq!(got.key, serde_json::json!(7));
        assert_eq!(got.ts, Value::Null);
    }

    #[test]
    fn each_bad_payload_gets_its_own_reason() {
        let e = extractor();
        let reason = |p: &[u8]| one(&e, p).unwrap_err().reason();
        assert_eq!(reason(b"{not json"), "not_json");
        assert_eq!(reason(br#"{"temp":20}"#), "missing_feature");
        assert_eq!(reason(br#"{"temp":"hot","vibration":{"rms":1}}"#), "non_numeric");
        assert_eq!(reason(br#"{"temp":1e300,"vibration":{"rms":1}}"#), "non_finite");
        assert_eq!(reason(br#"{"temp":999,"vibration":{"rms":1}}"#), "out_of_range");
        assert_eq!(reason(&[b' '; 300]), "payload_too_large");
        assert_eq!(reason(b" [ ] "), "empty_batch");
    }

    #[test]
    fn an_array_is_a_batch_of_rows_each_with_its_own_key() {
        let e = extractor();
        let rows = e.rows(
            br#"[{"temp":1,"vibration":{"rms":1},"seq":1}, {"temp":999,"seq":2}, 5,
                              {"temp":3,"vibration":{"rms":2},"seq":3}]"#,
        );
        let got: Vec<_> = rows.iter().map(|r| r.as_ref().map(|x| (x.features.clone(), x.key.clone()))).collect();
        assert_eq!(got[0], Ok((vec![1.0, 1.0], serde_json::json!(1))));
        assert_eq!(got[1].as_ref().unwrap_err().reason(), "out_of_range", "each element is checked alone");
        assert_eq!(got[2].as_ref().unwrap_err().reason(), "missing_feature");
        assert_eq!(got[3], Ok((vec![3.0, 2.0], serde_json::json!(3))));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn booleans_and_numbers_sent_as_text_are_numbers() {
        let e = extractor();
        let row = |p: &[u8]| one(&e, p).map(|x| x.features);
        assert_eq!(row(br#"{"temp":" 21.5 ","vibration":{"rms":true}}"#), Ok(vec![21.5, 1.0]));
        assert_eq!(row(br#"{"temp":"-4e1","vibration":{"rms":false}}"#), Ok(vec![-40.0, 0.0]));
        for text in [r#""21,5""#, r#""NaN""#, r#""inf""#, r#""""#, r#""-""#, r#""0x10""#, "null", "[1]"] {
            let payload = format!(r#"{{"temp":{text},"vibration":{{"rms":1}}}}"#);
            assert_eq!(one(&e, payload.as_bytes()).unwrap_err().reason(), "non_numeric", "{text}");
        }
        assert_eq!(row(br#"{"temp":"1e400","vibration":{"rms":1}}"#).unwrap_err().reason(), "non_finite");
        assert_eq!(row(br#"{"temp":"999","vibration":{"rms":1}}"#).unwrap_err().reason(), "out_of_range");
    }

    #[test]
    fn reported_by_exception_a_row_is_the_devices_last_value_of_each_feature() {
        let e = extractor();
        let mut last = LastValues::new(None);
        let now = Instant::now();
        let mut row = |device: &str, p: &[u8]| e.rows_by_exception(p, device, &mut last, now).remove(0);
        let missing = row("a", br#"{"temp":20,"seq":1}"#).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "feature \"vib\" is missing (no value at /vibration/rms in this or an earlier message of the device)"
        );
        let got = row("a", br#"{"vibration":{"rms":2},"seq":2}"#).unwrap();
        assert_eq!((got.features, got.key), (vec![20.0, 2.0], serde_json::json!(2)), "temp from message 1");
        assert_eq!(row("a", br#"{"temp":21}"#).unwrap().features, vec![21.0, 2.0]);
        assert_eq!(row("b", br#"{"temp":5}"#).unwrap_err().reason(), "missing_feature", "devices apart");
        // A bad value rejects the message and changes nothing; one with no feature is no row.
        assert_eq!(row("a", br#"{"temp":22,"vibration":{"rms":99}}"#).unwrap_err().reason(), "out_of_range");
        assert_eq!(row("a", br#"{"vibration":{"rms":3}}"#).unwrap().features, vec![21.0, 3.0]);
        assert_eq!(row("a", br#"{"seq":9}"#).unwrap_err().reason(), "missing_feature");

        let mut aged = LastValues::new(Some(std::time::Duration::from_secs(60)));
        e.rows_by_exception(br#"{"temp":20}"#, "a", &mut aged, now);
        let later = now + std::time::Duration::from_secs(61);
        let stale = e.rows_by_exception(br#"{"vibration":{"rms":2}}"#, "a", &mut aged, later).remove(0);
        assert_eq!(
            stale.unwrap_err().to_string(),
            "feature \"temp\" is missing (no value at /temp in this message or one of the device's in the last 60 s)"
        );
    }

    #[test]
    fn a_kepware_message_is_a_row_per_device_keyed_by_its_newest_value_time() {
        let inputs = &extractor().fields;
        let inputs: Vec<Input> =
            inputs.iter().map(|f| Input { name: f.0.clone(), unit: String::new(), min: f.2, max: f.3 }).collect();
        let tags = [("vib".to_string(), "Motor.Vib".to_string())].into();
        let e = Extractor::for_kepware_tags(&inputs, &tags, 2, None, 4096);
        let now = Instant::now();
        let payload = br#"{"timestamp": 900, "values": [
            {"id": "L1.P7.temp", "v": 20, "q": true, "t": 100},
            {"id": "L1.P8.temp", "v": "21.5", "q": true, "t": 101},
            {"id": "L1.Conveyor.Speed", "v": 3, "q": true, "t": 102},
            {"id": "_System._Time", "v": "12:00:00"},
            {"id": "L1.P7.Motor.Vib", "v": 2, "q": true, "t": 105},
            {"id": "L1.P8.Motor.Vib", "v": 4, "q": false, "t": 106}]}"#;
        let rows = e.read(payload, "ignored", None, now);
        let devices: Vec<_> = rows.iter().map(|r| r.0.as_deref().unwrap()).collect();
        assert_eq!(devices, ["L1.P7", "L1.P8"], "the conveyor has no feature of this pipeline: no row");
        let p7 = rows[0].1.as_ref().unwrap();
        assert_eq!((p7.features.clone(), p7.key.clone(), p7.ts.clone()), (vec![20.0, 2.0], 105.into(), 105.into()));
        let p8 = rows[1].1.as_ref().unwrap_err();
        assert_eq!(p8.reason(), "bad_quality");
        assert_eq!(
            p8.to_string(),
            "feature \"vib\" (tag L1.P8.Motor.Vib) has bad quality: the gateway marked its value \"q\": false"
        );

        // Whole rows: a device's message must hold every feature.
        let partial = e.read(br#"{"values": [{"id": "L1.P7.temp", "v": 20}]}"#, "x", None, now);
        assert_eq!(
            partial[0].1.as_ref().unwrap_err().to_string(),
            "feature \"vib\" is missing (no value at tag L1.P7.Motor.Vib)"
        );
        let reason = |payload: &[u8]| e.read(payload, "x", None, now)[0].1.as_ref().unwrap_err().reason();
        assert_eq!(reason(br#"{"temp": 20}"#), "bad_kepware");
        assert_eq!(reason(br#"{"values": [{"v": 20}]}"#), "bad_kepware");
        assert_eq!(
            reason(br#"{"values": [{"id": "L1.P7.temp", "v": "hot"}, {"id": "L1.P7.Motor.Vib", "v": 1}]}"#),
            "non_numeric"
        );
        assert_eq!(
            reason(br#"{"values": [{"id": "L1.P7.temp", "v": 999}, {"id": "L1.P7.Motor.Vib", "v": 1}]}"#),
            "out_of_range"
        );
        assert!(e.read(br#"{"values": []}"#, "x", None, now).is_empty(), "an empty publish: no row");
        // Keyed by a part counter, as an MES names the part its label is for.
        let by_part = Extractor::for_kepware_tags(&inputs, &tags, 2, Some("Part".into()), 4096);
        let part = br#"{"values": [{"id": "L1.P7.temp", "v": 20, "t": 5}, {"id": "L1.P7.Motor.Vib", "v": 2, "t": 5},
                                  {"id": "L1.P7.Part", "v": "SN-0042", "t": 4}]}"#;
        let row = by_part.read(part, "x", None, now).remove(0).1.unwrap();
        assert_eq!((row.key, row.ts), ("SN-0042".into(), 5.into()));
        let wildcard = br#"{"values": [{"id": "L1.P+.temp", "v": 1}, {"id": "L1.P7.temp", "v": 1}]}"#;
        let rows = e.read(wildcard, "x", None, now);
        assert_eq!(
            rows[0].1.as_ref().unwrap_err().to_string(),
            "device \"L1.P+\" cannot be a topic level (empty, or holds '/', '+' or '#')"
        );
        assert_eq!(rows[1].1.as_ref().unwrap_err().reason(), "missing_feature", "its neighbour is read on its own");

        // Only what changed (Kepware's default): each device's last values; a bad value is forgotten.
        let mut last = LastValues::new(None);
        let mut read = |payload: &[u8]| e.read(payload, "x", Some(&mut last), now).remove(0).1;
        assert_eq!(
            read(br#"{"values": [{"id": "L1.P7.temp", "v": 20, "t": 1}]}"#).unwrap_err().reason(),
            "missing_feature"
        );
        let row = read(br#"{"values": [{"id": "L1.P7.Motor.Vib", "v": 2, "t": 2}]}"#).unwrap();
        assert_eq!((row.features, row.key), (vec![20.0, 2.0], 2.into()));
        assert_eq!(
            read(br#"{"values": [{"id": "L1.P7.temp", "v": 25, "q": false}]}"#).unwrap_err().reason(),
            "bad_quality"
        );
        let after = read(br#"{"values": [{"id": "L1.P7.Motor.Vib", "v": 3}]}"#).unwrap_err();
        assert_eq!(
            after.to_string(),
            "feature \"temp\" is missing (no value at tag L1.P7.temp in this or an earlier message of the device)",
            "the value from before the fault is not used"
        );
        assert_eq!(
            read(br#"{"values": [{"id": "L1.P7.temp", "v": 26, "q": true}]}"#).unwrap().features,
            vec![26.0, 3.0]
        );
    }

    #[test]
    fn a_rejection_says_what_was_wrong() {
        let r = one(&extractor(), br#"{"temp":999,"vibration":{"rms":1}}"#).unwrap_err();
        assert_eq!(r.to_string(), "feature \"temp\" = 999 is outside the bundle's range [-40, 150]");
    }
}
