//! Infer: runs each pipeline's model on micro-batches of rows and publishes one prediction
//! per accepted message. One task per pipeline; the model is planned per batch size.

pub mod engine;
mod ml_ops;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::AsyncClient;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::BatchConfig;
use crate::ingest::ack::AckSender;
use crate::ingest::connection::Flow;
use crate::ingest::Sample;
use crate::model::baseline::Reading;
use crate::service::events::{Counters, Event, Events};
pub use engine::{Engine, EngineError, Outputs};

/// The prediction payload (DESIGN "MQTT contract").
#[derive(Serialize)]
struct Prediction<'a> {
    device: &'a str,
    key: &'a Value,
    ts: &'a Value,
    model: &'a str,
    version: u64,
    /// The model's primary output for this row.
    output: &'a [f32],
    /// Classifiers: the predicted class.
    #[serde(skip_serializing_if = "Option::is_none")]
    class: Option<usize>,
    latency_us: u64,
}

/// Everything one pipeline's inference task needs.
pub struct Pipeline {
    pub name: String,
    pub engine: Engine,
    pub reading: Reading,
    pub primary_output: usize,
    pub model: String,
    pub version: u64,
    /// Sink topic template; `{device}` is replaced.
    pub sink: String,
    pub batch: BatchConfig,
    pub client: AsyncClient,
    pub counters: Arc<Counters>,
    pub events: Events,
    pub acks: AckSender,
    pub flow: Arc<Flow>,
}

impl Pipeline {
    /// Serves until the channel closes (ingest stopped) and every queued row is answered.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Sample>) {
        let mut batch: Vec<Sample> = Vec::with_capacity(self.batch.max);
        let mut rows: Vec<f32> = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            self.fill(&mut rx, &mut batch).await;
            self.flow.taken(batch.len());
            rows.clear();
            rows.extend(batch.iter().flat_map(|s| s.features.iter().copied()));
            match self.engine.run(&rows) {
                Ok(out) => self.publish(&batch, &out).await,
                Err(e) => {
                    self.counters.failed.fetch_add(batch.len() as u64, Relaxed);
                    self.events.emit(Event::InferenceFailed {
                        pipeline: self.name.clone(),
                        rows: batch.len(),
                        error: e.to_string(),
                    });
                }
            }
            for s in batch.drain(..) {
                if let Some(ticket) = s.ack.and_then(Arc::into_inner) {
                    self.acks.done(ticket);
                }
            }
        }
    }

    /// Takes what is already queued, then waits up to `batch.wait_us` for more.
    async fn fill(&self, rx: &mut mpsc::Receiver<Sample>, batch: &mut Vec<Sample>) {
        while batch.len() < self.batch.max {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        if self.batch.wait_us == 0 || batch.len() >= self.batch.max {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_micros(self.batch.wait_us);
        while batch.len() < self.batch.max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                _ => break,
            }
        }
    }

    async fn publish(&self, batch: &[Sample], out: &Outputs) {
        let now = Instant::now();
        for (r, s) in batch.iter().enumerate() {
            let output = out.row(self.primary_output, r);
            let prediction = Prediction {
                device: &s.device,
                key: &s.key,
                ts: &s.ts,
                model: &self.model,
                version: self.version,
                output,
                class: self.reading.class(output),
                latency_us: now.duration_since(s.received).as_micros() as u64,
            };
            let Ok(body) = serde_json::to_vec(&prediction) else {
                continue;
            };
            let topic = self.sink.replace("{device}", &s.device);
            if self.flow.publish(&self.client, topic, body).await {
                self.counters.predicted.fetch_add(1, Relaxed);
            }
        }
    }
}
