//! # lathe
//!
//! Closes the model loop on factory edge hardware. This build: MQTT telemetry in, ONNX
//! inference, predictions out, with bundles that carry their own validation baseline.
//!
//! # Layout
//! One folder per pipeline stage (see `ARCHITECTURE.md` for what flows between them):
//! - [`config`]: the TOML config parsed, every error reported at once; it composes the
//!   sections each stage types in its own `config.rs`.
//! - [`ingest`]: the MQTT connection, topic routing, JSON → feature rows, rejections.
//! - [`infer`]: the tract engine and the per-pipeline micro-batching task.
//! - [`model`]: the bundle format, its baseline, and the on-device registry.
//! - [`monitor`]: drift against the bundle's baseline, late-label performance.
//! - [`train`]: on-device fine-tuning (the `Backend` trait, CPU backend, gate, run records).
//! - [`store`]: the crash-safe sample store (redb) the loop trains from.
//! - [`sparkplug`]: Sparkplug B in (alias tables, sequence, rebirth) and out (lathe as an edge node).
//! - [`service`]: wiring, start and graceful stop, status and events.
//! - [`update`]: signed remote updates: keys, offers, the anti-rollback floor, the download.
//! - [`cli`]: the `lathe` command line, including `lathe demo`.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::await_holding_lock)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod cli;
pub mod config;
pub mod engine;
pub mod fs;
pub mod infer;
pub mod ingest;
pub mod model;
pub mod monitor;
pub mod mqtt;
pub mod report;
pub mod rng;
pub mod service;
pub mod sparkplug;
pub mod store;
pub mod telemetry;
pub mod train;
pub mod trust;
pub mod update;

/// What a caught panic said (the text of `panic!`/`assert!`), for an error message. Used where
/// a dependency panics instead of returning an error (tract on some malformed models, cudarc
/// where libcuda or a symbol is missing).
pub fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
