//! Routing: each incoming message to the pipelines whose topics it matches (telemetry, labels,
//! Sparkplug B, commands: `commands.rs`), rows handed on in order, rejections reported.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use rumqttc::v5::mqttbytes::v5::{Publish, OVERSIZED_PUBLISH};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::mqtt::ack::{AckMsg, AckSender, AckTicket};
use crate::mqtt::TopicFilter;
use crate::telemetry::events::{Counters, Event, Events};

use super::*;

/// A row on its way to inference.
#[derive(Debug)]
pub struct Sample {
    /// Interned per route: a plant has a fixed set of devices, so no allocation per message.
    pub device: Arc<str>,
    pub key: Value,
    pub ts: Value,
    pub features: Box<[f32]>,
    pub received: Instant,
    /// Shared by every pipeline the message went to; the last one done reports it.
    pub ack: Option<Arc<AckTicket>>,
}

/// One pipeline as ingest sees it.
pub struct Route {
    pub pipeline: String,
    /// Device ids seen so far (bounded: past MAX_DEVICES, ids are no longer interned).
    pub devices: std::collections::HashMap<String, Arc<str>>,
    pub filter: TopicFilter,
    /// The pipeline's active model: its extractor knows the inputs and their ranges.
    pub model: Arc<dyn super::ServedModel>,
    /// `None` once stopping: closing the channel lets the pipeline drain and finish.
    pub tx: Option<mpsc::Sender<Sample>>,
    pub counters: Arc<Counters>,
    /// Where this pipeline's late labels arrive, when it has `labels`.
    pub labels: Option<LabelRoute>,
    /// What the source remembers between messages.
    pub source: SourceState,
}

/// What a pipeline's source remembers between messages: shared with the status, kept over a
/// reload.
#[derive(Clone, Default)]
pub struct SourceState {
    /// `format = "sparkplug-b"`: the namespace's state (aliases, values, sequence).
    pub sparkplug: Option<Arc<Mutex<crate::sparkplug::Source>>>,
    /// `rows = "last_value"`: each device's last value of each feature.
    pub last_values: Option<Arc<Mutex<super::last_value::LastValues>>>,
    /// `silent_after_s`: when each device was last heard.
    pub activity: Option<Arc<Mutex<super::activity::Activity>>>,
}

impl SourceState {
    /// `own`: lathe's own Sparkplug edge node, which a Sparkplug source never reads.
    pub fn new(
        source: &super::config::SourceConfig,
        own: Option<&crate::sparkplug::config::SparkplugOutputConfig>,
    ) -> SourceState {
        let (sparkplug, last_value) = (source.sparkplug.as_ref(), source.last_value);
        let own = own.map(|o| (o.group.as_str(), o.edge_node.as_str()));
        SourceState {
            sparkplug: sparkplug
                .map(|(group, node)| Arc::new(Mutex::new(crate::sparkplug::Source::new(group, node).ignoring(own)))),
            last_values: last_value.map(|l| Arc::new(Mutex::new(super::last_value::LastValues::new(l.max_age)))),
            activity: source.silent_after.map(|after| Arc::new(Mutex::new(super::activity::Activity::new(after)))),
        }
    }
}

/// How many distinct device ids a route remembers.
const MAX_DEVICES: usize = 100_000;

impl Route {
    fn device(&mut self, id: &str) -> Arc<str> {
        if let Some(d) = self.devices.get(id) {
            return d.clone();
        }
        let d: Arc<str> = Arc::from(id);
        if self.devices.len() < MAX_DEVICES {
            self.devices.insert(id.to_string(), d.clone());
        }
        d
    }
}

/// Routes incoming telemetry to the pipelines' channels.
pub(super) struct Router {
    pub(super) routes: Vec<Route>,
    /// Per route, rows waiting for room in its channel.
    pub(super) pending: Vec<VecDeque<Sample>>,
    pub(super) events: Events,
    pub(super) acks: AckSender,
    pub(super) next_seq: u64,
    pub(super) commands: CommandRoute,
    /// Sends Sparkplug rebirth requests (never waits: `try_publish`).
    pub(super) client: AsyncClient,
}

impl Router {
    pub(super) fn flush(&mut self) {
        for (queue, route) in self.pending.iter_mut().zip(&self.routes) {
            flush(queue, route.tx.as_ref());
        }
    }

    pub(super) fn backlog(&self) -> bool {
        self.pending.iter().any(|q| !q.is_empty())
    }

    /// Closes the pipelines' channels, so each drains what it holds and finishes.
    pub(super) fn close(&mut self) {
        self.routes.iter_mut().for_each(|r| r.tx = None);
    }

    pub(super) fn route(&mut self, p: Publish, flow: &Flow) {
        let received = Instant::now();
        // Debug builds only (the tests): a payload `{"__lathe_debug_stall_ms": N}` blocks this
        // loop for N ms, so a test can see the watchdog pings stop when the loop stalls.
        #[cfg(debug_assertions)]
        if let Some(ms) = p.payload.strip_prefix(b"{\"__lathe_debug_stall_ms\":".as_slice()) {
            let ms = std::str::from_utf8(ms).ok().and_then(|t| t.trim_end_matches('}').trim().parse::<u64>().ok());
            std::thread::sleep(std::time::Duration::from_millis(ms.unwrap_or(0).min(10_000)));
        }
        // … and `{"__lathe_debug_stall": "store", "ms": N}` the next piece of work of another
        // stage (service::liveness), so a test can see the pings stop while that one is stuck.
        #[cfg(debug_assertions)]
        if p.payload.starts_with(b"{\"__lathe_debug_stall\":") {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                let stage = v["__lathe_debug_stall"].as_str().unwrap_or_default();
                crate::telemetry::liveness::debug::ask(stage, v["ms"].as_u64().unwrap_or(0));
            }
        }
        let ack = (p.qos != QoS::AtMostOnce).then(|| {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.acks.send(AckMsg::Received { seq, pkid: p.pkid, qos: p.qos });
            Arc::new(AckTicket { seq })
        });
        // MQTT topics are UTF-8 by the spec; anything else matches no pipeline.
        let topic = std::str::from_utf8(&p.topic).unwrap_or("");
        // A 3.1.1 message past MAX_PACKET_BYTES, skipped unread: its size, no payload.
        let oversized: Option<usize> = p
            .properties
            .as_ref()
            .and_then(|pp| pp.user_properties.iter().find(|(k, _)| k == OVERSIZED_PUBLISH))
            .and_then(|(_, bytes)| bytes.parse().ok());
        if let Some(action) = self.commands.filter.matches(topic) {
            let pipelines = self.routes.iter().map(|r| r.pipeline.as_str());
            self.commands.deliver(action, &p.payload, pipelines, &self.events);
        }
        for route in self.routes.iter().filter(|_| oversized.is_none()) {
            let Some(labels) = &route.labels else { continue };
            let Some(device) = labels.filter.matches(topic) else { continue };
            let model = route.model.current();
            let max_payload_bytes = model.extractor().max_payload_bytes();
            let (alarms, unusable) = labels.take(device, &p.payload, max_payload_bytes, ack.as_ref());
            if !alarms.is_empty() {
                self.events.drift(&route.pipeline, model.name(), model.version(), alarms)
            }
            if !unusable.is_empty() {
                if let Ok(mut perf) = labels.performance.lock() {
                    perf.unmatched += unusable.len() as u64;
                }
                tracing::debug!(pipeline = route.pipeline, "{} unusable label(s): {}", unusable.len(), unusable[0]);
            }
        }
        for (i, route) in self.routes.iter_mut().enumerate() {
            let Some(device) = route.filter.matches(topic) else {
                continue;
            };
            // One look at the serving model per message: a promotion takes effect between two.
            let model = route.model.current();
            let rows: Vec<super::Row> = match &route.source.sparkplug {
                _ if oversized.is_some() => {
                    let (bytes, max) = (oversized.unwrap_or_default(), model.extractor().max_payload_bytes());
                    vec![(None, Err(super::extract::Reject::TooLarge { bytes, max }))]
                }
                None => {
                    let mut last =
                        route.source.last_values.as_ref().map(|l| l.lock().unwrap_or_else(PoisonError::into_inner));
                    model.extractor().read(&p.payload, device, last.as_deref_mut(), received)
                }
                Some(source) => {
                    let max = model.extractor().max_payload_bytes();
                    let Some(step) = sparkplug_row(source, model.as_ref(), topic, &p.payload, max) else {
                        continue; // a birth, a death, a command: state only
                    };
                    if let Some((group, edge_node, why)) = step.rebirth {
                        ask_rebirth(&self.client, &self.events, &route.pipeline, &group, &edge_node, &why);
                    }
                    vec![(Some(step.device), step.row)]
                }
            };
            let batch = rows.len();
            route.counters.received.fetch_add(batch as u64, Relaxed);
            for (n, (named, row)) in rows.into_iter().enumerate() {
                // The payload's device (Kepware, Sparkplug B), else the topic's.
                let device = named.as_deref().unwrap_or(device);
                if let Some(activity) = &route.source.activity {
                    let back = activity.lock().unwrap_or_else(PoisonError::into_inner).heard(device, received);
                    if let Some(quiet) = back {
                        self.events.emit(Event::Step {
                            pipeline: route.pipeline.clone(),
                            step: "device.back",
                            message: format!("Device {device} is heard again after {} s", quiet.as_secs()),
                            detail: serde_json::json!({"device": device, "silent_s": quiet.as_secs()}),
                        });
                    }
                }
                match row {
                    Ok(x) => {
                        let sample = Sample {
                            device: route.device(device),
                            key: x.key,
                            ts: x.ts,
                            features: x.features.into_boxed_slice(),
                            received,
                            ack: ack.clone(),
                        };
                        self.pending[i].push_back(sample);
                        flow.waiting_rows.fetch_add(1, Relaxed);
                        flush(&mut self.pending[i], route.tx.as_ref());
                    }
                    Err(reject) => {
                        route.counters.rejected[reject.index()].fetch_add(1, Relaxed);
                        let detail = match batch {
                            1 => reject.to_string(),
                            _ => format!("row {} of the {batch} in the message: {reject}", n + 1),
                        };
                        self.events.emit(Event::InputRejected {
                            pipeline: route.pipeline.clone(),
                            device: device.to_string(),
                            topic: topic.to_string(),
                            reason: reject.reason(),
                            detail,
                        });
                    }
                }
            }
        }
        // Rejected or unrouted: handled now. Routed: the last pipeline to publish acks.
        if let Some(ticket) = ack.and_then(Arc::into_inner) {
            self.acks.done(ticket);
        }
    }
}

/// `NCMD` `Node Control/Rebirth` to an edge node whose state is in doubt.
fn ask_rebirth(client: &AsyncClient, events: &Events, pipeline: &str, group: &str, edge_node: &str, why: &str) {
    let (topic, payload) = crate::sparkplug::Source::rebirth_request(group, edge_node, crate::telemetry::unix_ms());
    // QoS 0, as the spec has every NCMD: a rebirth asked again later beats one queued.
    let sent = client.try_publish(topic, QoS::AtMostOnce, false, payload).is_ok();
    events.emit(Event::Step {
        pipeline: pipeline.to_string(),
        step: "sparkplug.rebirth_requested",
        message: format!("Asked edge node {group}/{edge_node} for a rebirth: {why}"),
        detail: serde_json::json!({"group": group, "edge_node": edge_node, "why": why, "sent": sent}),
    });
}

/// What a Sparkplug message is for a pipeline: a row (or why not), for which device, and a
/// rebirth to ask for (group, edge node, why).
pub(crate) struct SparkplugStep {
    pub device: String,
    pub row: Result<super::extract::Extracted, super::Reject>,
    pub rebirth: Option<(String, String, String)>,
}

/// `None` for messages that only change state (births, deaths, commands) or are not
/// Sparkplug topics at all.
pub(crate) fn sparkplug_row(
    source: &std::sync::Mutex<crate::sparkplug::Source>,
    model: &dyn super::ReadsRows,
    topic: &str,
    payload: &[u8],
    max_payload_bytes: usize,
) -> Option<SparkplugStep> {
    use crate::sparkplug::Outcome;
    let t = crate::sparkplug::parse_topic(topic)?;
    let device = t.device.unwrap_or(t.edge_node).to_string();
    if payload.len() > max_payload_bytes {
        let row = Err(super::Reject::TooLarge { bytes: payload.len(), max: max_payload_bytes });
        return Some(SparkplugStep { device, row, rebirth: None });
    }
    let mut source = source.lock().ok()?;
    let step = match source.handle(&t, payload) {
        Outcome::State => return None,
        Outcome::Row { device, key, ts } => SparkplugStep {
            device,
            row: model.extractor().from_metrics(|m| source.value(&t, m)).map(|features| super::extract::Extracted {
                features,
                key: key.into(),
                ts: ts.into(),
            }),
            rebirth: None,
        },
        Outcome::Stale { why, rebirth } => SparkplugStep {
            device,
            rebirth: rebirth.map(|node| (t.group.to_string(), node, why.clone())),
            row: Err(super::Reject::SparkplugStale(why)),
        },
        Outcome::Invalid(e) => SparkplugStep { device, row: Err(super::Reject::BadSparkplug(e)), rebirth: None },
    };
    Some(step)
}

fn flush(queue: &mut VecDeque<Sample>, tx: Option<&mpsc::Sender<Sample>>) {
    let Some(tx) = tx else { return };
    while let Some(s) = queue.pop_front() {
        match tx.try_send(s) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(s)) => {
                queue.push_front(s);
                return;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
