//! Late labels: read from a pipeline's labels topic, joined to stored rows by device and key,
//! and to the predictions waiting in the pipeline's live-accuracy window.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::mqtt::ack::AckTicket;
use crate::mqtt::TopicFilter;

/// A pipeline's label topic and what to read from a label message.
pub struct LabelRoute {
    pub filter: TopicFilter,
    pub key: String,
    pub value: String,
    pub performance: Arc<std::sync::Mutex<crate::monitor::performance::Performance>>,
    /// Pipelines that train also join labels to their stored samples.
    pub store: Option<crate::store::writer::PipelineWriter>,
    /// A classifier trained on class names: a label may name its class (read as its index).
    pub classes: Vec<String>,
}

impl LabelRoute {
    /// Joins one label message (a JSON object, or an array of them: a batch); returns the
    /// alarms raised or cleared, and why each unusable label was unusable. With a store, the
    /// labels are stored too and `ack` released once they are durable. Labels obey the
    /// telemetry's `max_payload_bytes`, checked before the JSON is parsed.
    pub(super) fn take(
        &self,
        device: &str,
        payload: &[u8],
        max_payload_bytes: usize,
        ack: Option<&Arc<AckTicket>>,
    ) -> (Vec<crate::monitor::Alarm>, Vec<String>) {
        let mut alarms = Vec::new();
        if payload.len() > max_payload_bytes {
            let why = format!("label is {} bytes, over max_payload_bytes ({max_payload_bytes})", payload.len());
            return (alarms, vec![why]);
        }
        let doc: Value = match serde_json::from_slice(payload) {
            Ok(doc) => doc,
            Err(e) => return (alarms, vec![format!("label is not JSON: {e}")]),
        };
        let (labels, unusable): (Vec<_>, Vec<_>) = match &doc {
            Value::Array(batch) => batch.iter().map(|d| self.read(d)).partition(Result::is_ok),
            doc => [self.read(doc)].into_iter().partition(Result::is_ok),
        };
        let labels: Vec<(String, f64)> = labels.into_iter().flatten().collect();
        let unusable = unusable.into_iter().filter_map(Result::err).collect();
        if let Some(store) = self.store.as_ref().filter(|_| !labels.is_empty()) {
            let ts_ms = crate::telemetry::unix_ms();
            let writes = labels
                .iter()
                .map(|(key, value)| crate::store::Write::Label {
                    device: device.to_string(),
                    key: key.clone(),
                    value: *value,
                    ts_ms,
                })
                .collect();
            store.submit(writes, ack.cloned().into_iter().collect());
        }
        match self.performance.lock() {
            Ok(mut perf) => {
                for (key, value) in labels {
                    perf.label(device, key, value, Instant::now(), &mut alarms);
                }
                (alarms, unusable)
            }
            Err(_) => (alarms, vec!["performance state poisoned".to_string()]),
        }
    }

    /// One label: its key (as JSON text, as predictions are keyed) and its finite value.
    fn read(&self, doc: &Value) -> Result<(String, f64), String> {
        let key = doc.pointer(&self.key).ok_or_else(|| format!("label has no {}", self.key))?.to_string();
        let found = doc.pointer(&self.value);
        let named = found.and_then(Value::as_str).and_then(|s| self.classes.iter().position(|c| c == s));
        let value = named
            .map(|index| index as f64)
            .or_else(|| found.and_then(super::extract::number))
            .filter(|v| v.is_finite())
            .ok_or_else(|| match self.classes.as_slice() {
                [] => format!("label has no number, boolean or number as text at {}", self.value),
                classes => format!(
                    "label has no class name ({}), class index or number as text at {}",
                    classes.join(", "),
                    self.value
                ),
            })?;
        Ok((key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::mqtt::TopicFilter;

    #[test]
    fn labels_over_the_payload_cap_are_refused_before_parsing_and_a_batch_is_read_label_by_label() {
        use crate::monitor::performance::Performance;
        let route = LabelRoute {
            filter: TopicFilter::parse("t/+/label").unwrap(),
            key: "/seq".into(),
            value: "/v".into(),
            performance: Arc::new(std::sync::Mutex::new(Performance::new(Duration::from_secs(60), 100))),
            store: None,
            classes: Vec::new(),
        };
        let big = format!(r#"{{"seq": 1, "v": 1, "pad": "{}"}}"#, "x".repeat(70_000));
        let (_, unusable) = route.take("d", big.as_bytes(), 65_536, None);
        assert!(unusable[0].contains("over max_payload_bytes (65536)"), "{unusable:?}");
        assert_eq!(route.performance.lock().unwrap().waiting(), (0, 0), "nothing of it is kept");
        let (_, unusable) = route.take("d", br#"{"seq": 1, "v": 1}"#, 65_536, None);
        assert!(unusable.is_empty(), "{unusable:?}");
        assert_eq!(route.performance.lock().unwrap().waiting(), (0, 1), "a small one waits for its prediction");
        // A batch: each label on its own; the unusable ones say why.
        let (_, unusable) =
            route.take("d", br#"[{"seq": 2, "v": 1}, {"seq": 3}, {"seq": 4, "v": "0"}, 7]"#, 65_536, None);
        assert_eq!(unusable, ["label has no number, boolean or number as text at /v", "label has no /seq"]);
        assert_eq!(route.performance.lock().unwrap().waiting(), (0, 3), "two more wait for their predictions");
    }

    #[test]
    fn a_label_may_name_its_class_when_the_model_was_trained_on_names() {
        use crate::monitor::performance::Performance;
        let route = LabelRoute {
            filter: TopicFilter::parse("t/+/label").unwrap(),
            key: "/seq".into(),
            value: "/state".into(),
            performance: Arc::new(std::sync::Mutex::new(Performance::new(Duration::from_secs(60), 100))),
            store: None,
            classes: vec!["fault".into(), "ok".into()],
        };
        assert_eq!(route.read(&serde_json::json!({"seq": 1, "state": "ok"})), Ok(("1".into(), 1.0)));
        assert_eq!(route.read(&serde_json::json!({"seq": 2, "state": "fault"})), Ok(("2".into(), 0.0)));
        assert_eq!(route.read(&serde_json::json!({"seq": 3, "state": 1})), Ok(("3".into(), 1.0)));
        let err = route.read(&serde_json::json!({"seq": 4, "state": "broken"})).unwrap_err();
        assert!(err.contains("class name (fault, ok)") && err.contains("/state"), "{err}");
    }
}
