//! What a pipeline reads (`[pipeline.source]`) and the late ground truth it joins
//! (`[pipeline.labels]`). Parsed by `config`.

#[derive(Debug, Clone)]
pub struct LabelsConfig {
    /// MQTT filter; its first `+` is the device, as in `source.topic`.
    pub topic: String,
    /// JSON pointer to the key that names the prediction (same values as `source.key`).
    pub key: String,
    /// JSON pointer to the true value (class index, 0/1, true/false, or a number).
    pub value: String,
    /// How long a prediction waits for its label.
    pub horizon: std::time::Duration,
    /// Labels in the rolling performance window.
    pub window: usize,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// MQTT filter; the level matched by its first `+` is the device id. For Sparkplug B,
    /// the namespace's filter (`spBv1.0/{group}/+/{edge_node}/#`).
    pub topic: String,
    /// `format = "sparkplug-b"`: (group, edge_node), either may be `+`. Features then name
    /// metrics, and the device comes from the Sparkplug topic.
    pub sparkplug: Option<(String, String)>,
    /// `format = "kepware"`: Kepware's IoT Gateway standard template, and how many leading
    /// levels of a tag id are the device (`device_levels`, 2 unless set: `Channel.Device`).
    /// Features then name tags within the device (see `ingest/kepware.rs`).
    pub kepware_device_levels: Option<usize>,
    /// JSON pointer to the message key echoed in predictions (e.g. `/seq`); for Kepware, a
    /// tag of the device (a part or cycle counter).
    pub key: Option<String>,
    /// JSON pointer to the message timestamp echoed in predictions.
    pub timestamp: Option<String>,
    /// `rows = "last_value"`: the source reports by exception (a message holds the features
    /// that changed; a row is the device's last value of each). `None`: `rows = "whole"`,
    /// every message holds every feature.
    pub last_value: Option<LastValueConfig>,
    /// `silent_after_s`: a device not heard for this long is reported (`device.silent`).
    pub silent_after: Option<std::time::Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastValueConfig {
    /// `max_age_s`: a value older than this is missing; `None`, it stands until replaced.
    pub max_age: Option<std::time::Duration>,
}
