//! Ingest: MQTT in. Owns the broker connection, matches topics to pipelines, reads feature
//! rows out of JSON payloads and rejects (with a reason) what cannot be one.

pub mod activity;
pub mod connection;
#[cfg(feature = "embedded-broker")]
pub mod embedded_broker;
pub mod extract;
pub mod kepware;
pub mod last_value;
pub mod topic;

pub use connection::{Ingest, Route, Sample};
pub use extract::{Extracted, Extractor, Reject, Row};
pub use topic::TopicFilter;
