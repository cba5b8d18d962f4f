//! Ingest: MQTT in. Owns the broker connection, matches topics to pipelines, reads feature
//! rows out of JSON payloads and rejects (with a reason) what cannot be one.

pub mod activity;
pub mod commands;
pub mod config;
pub mod connection;
#[cfg(feature = "embedded-broker")]
pub mod embedded_broker;
pub mod extract;
pub mod flow;
pub mod kepware;
pub mod labels;
pub mod last_value;
pub mod router;

pub use crate::mqtt::TopicFilter;
pub use commands::CommandRoute;
pub use connection::Ingest;
pub use extract::{Extracted, Extractor, Reject, Row};
pub use flow::Flow;
pub use labels::LabelRoute;
pub use router::{Route, Sample, SourceState};

/// What ingest needs of the model a pipeline serves right now: how to read its rows, and its
/// name and version for the drift events it reports. The pipelines' swappable model
/// (`infer::SharedModel`) is one, so a promotion changes how the very next message is read.
pub trait ServedModel: Send + Sync {
    fn current(&self) -> std::sync::Arc<dyn ReadsRows>;
}

/// One model version, as ingest reads rows for it.
pub trait ReadsRows: Send + Sync {
    fn extractor(&self) -> &Extractor;
    fn name(&self) -> &str;
    fn version(&self) -> u64;
}
