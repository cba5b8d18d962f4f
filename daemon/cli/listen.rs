//! `lathe check --listen SECONDS`: before the daemon runs, listen to each pipeline's source
//! topic for a while and read what arrives exactly as the daemon would, so a feature pointer
//! that does not match the gateway's JSON shows up at install, with the keys the messages do
//! hold, instead of as a daemon that rejects every row.
//!
//! It connects under its own client id with a clean session (the daemon's persistent session
//! and the messages queued in it are left alone) and subscribes at QoS 0: it only looks. So
//! for Sparkplug B it never asks for a rebirth: data whose births came before it listened is
//! not decodable, and it says so rather than failing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use serde_json::{json, Value};

use crate::config::{BrokerUrl, Config};
use crate::infer::ActiveModel;
use crate::ingest::last_value::LastValues;
use crate::mqtt::TopicFilter;
use crate::sparkplug::{parse_topic, Kind, Source};

/// What one pipeline heard.
#[derive(Default)]
pub struct Heard {
    pub pipeline: String,
    pub topic: String,
    /// Why nothing could be heard (a refused subscription).
    pub skipped: Option<String>,
    /// Sparkplug B: the births (NBIRTH, DBIRTH) heard; `None` for other sources.
    pub births: Option<u64>,
    pub messages: u64,
    pub devices: BTreeSet<String>,
    pub rows: u64,
    /// Rejections by reason, with the first one's detail.
    pub rejected: BTreeMap<&'static str, (u64, String)>,
    /// The top-level keys of the first message (of its first element, for a batch; the tag
    /// ids it holds, for Kepware; the metrics the births declared, for Sparkplug B).
    pub keys: Vec<String>,
}

impl Heard {
    fn tally(&mut self, row: &Result<crate::ingest::Extracted, crate::ingest::Reject>) {
        match row {
            Ok(_) => self.rows += 1,
            Err(r) => self.rejected.entry(r.reason()).or_insert((0, r.to_string())).0 += 1,
        }
    }

    /// Messages came, and not one of them made a row: the pipeline is misconfigured. (Not
    /// when Sparkplug data came without a birth: that says nothing of the config.)
    pub fn failed(&self) -> bool {
        self.messages > 0 && self.rows == 0 && self.births != Some(0)
    }

    pub fn line(&self, seconds: u64) -> String {
        if let Some(why) = &self.skipped {
            return format!("{}: not listened: {why}", self.pipeline);
        }
        if self.messages == 0 {
            return format!(
                "{}: no message on {} in {seconds} s (is the gateway publishing there, and may this user read it?)",
                self.pipeline, self.topic
            );
        }
        let mut line = format!(
            "{}: {} message(s) from {} device(s) on {} in {seconds} s: {} row(s) ok",
            self.pipeline,
            self.messages,
            self.devices.len(),
            self.topic,
            self.rows
        );
        for (reason, (n, first)) in &self.rejected {
            line += &format!("; {n} {reason} (first: {first})");
        }
        if (self.rows == 0 || self.rejected.contains_key("missing_feature")) && !self.keys.is_empty() {
            line += &format!("; the messages hold {}", self.keys.join(", "));
        }
        if self.births == Some(0) {
            line += "; no birth heard, so no metric could be named: an edge node sends its births when it \
                     connects, and the daemon asks for them; --listen only looks (listen while one reconnects)";
        }
        line
    }

    pub fn json(&self) -> Value {
        let rejected: BTreeMap<_, _> =
            self.rejected.iter().map(|(r, (n, first))| (*r, json!({"count": n, "first": first}))).collect();
        json!({"pipeline": self.pipeline, "topic": self.topic, "skipped": self.skipped, "messages": self.messages,
               "devices": self.devices.len(), "rows": self.rows, "rejected": rejected, "keys": self.keys,
               "births": self.births, "ok": !self.failed()})
    }
}

/// Listens for `seconds` and reads every message on each pipeline's source topic with its
/// model's extractor (`models` in config order).
///
/// # Errors
/// No connection to the broker.
pub fn listen(config: &Config, models: &[ActiveModel], seconds: u64) -> Result<Vec<Heard>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(listen_async(config, models, Duration::from_secs(seconds)))
}

async fn listen_async(config: &Config, models: &[ActiveModel], window: Duration) -> Result<Vec<Heard>, String> {
    let BrokerUrl::Tcp { host, port, .. } = &config.mqtt.url else {
        return Err("mqtt.url is \"embedded\": there is no broker to listen to before lathe runs".into());
    };
    let id = format!("{}-listen-{}", config.client_id(), std::process::id());
    let mut options = crate::mqtt::session_options(&config.mqtt, host, *port, id).map_err(|e| e.to_string())?;
    options.set_clean_start(true);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    crate::mqtt::first_connack(&mut eventloop, Duration::from_secs(10))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;

    let mut heard: Vec<Heard> = Vec::new();
    let mut filters = Vec::new();
    for p in &config.pipelines {
        let mut h = Heard { pipeline: p.name.clone(), topic: p.source.topic.clone(), ..Heard::default() };
        h.births = p.source.sparkplug.as_ref().map(|_| 0);
        if client.subscribe(&p.source.topic, QoS::AtMostOnce).await.is_err() {
            h.skipped = Some("could not subscribe".into());
        }
        // A skipped pipeline reads nothing, even what another pipeline's filter brings in.
        filters.push(h.skipped.is_none().then(|| TopicFilter::parse(&p.source.topic).ok()).flatten());
        heard.push(h);
    }
    // One LastValues per pipeline that reports by exception, and one Sparkplug state (births,
    // aliases, sequence) per Sparkplug pipeline, as the daemon keeps.
    let mut last: Vec<Option<LastValues>> =
        config.pipelines.iter().map(|p| p.source.last_value.map(|l| LastValues::new(l.max_age))).collect();
    let sparkplug: Vec<Option<Mutex<Source>>> = config
        .pipelines
        .iter()
        .map(|p| p.source.sparkplug.as_ref().map(|(group, edge_node)| Mutex::new(Source::new(group, edge_node))))
        .collect();
    // SubAcks come in subscription order, one per pipeline that subscribed.
    let mut subscribed =
        heard.iter().enumerate().filter(|(_, h)| h.skipped.is_none()).map(|(i, _)| i).collect::<Vec<_>>();
    subscribed.reverse();

    let until = Instant::now() + window;
    while let Ok(event) = tokio::time::timeout_at(until.into(), eventloop.poll()).await {
        let packet = match event {
            Ok(Event::Incoming(p)) => p,
            Ok(_) => continue,
            Err(e) => return Err(format!("the connection to {host}:{port} failed: {}", crate::mqtt::explain(&e))),
        };
        match packet {
            Packet::SubAck(ack) => {
                let Some(i) = subscribed.pop() else { continue };
                if let Some(code) = ack.return_codes.iter().find(|c| !matches!(c, SubscribeReasonCode::Success(_))) {
                    heard[i].skipped = Some(format!("the broker refused the subscription ({code:?}): check the ACL"));
                }
            }
            Packet::Publish(p) => {
                let topic = String::from_utf8_lossy(&p.topic);
                for (i, filter) in filters.iter().enumerate() {
                    let Some(device) = filter.as_ref().and_then(|f| f.matches(&topic)) else { continue };
                    if let Some(source) = &sparkplug[i] {
                        heard_sparkplug(&mut heard[i], source, &models[i], &topic, &p.payload);
                        continue;
                    }
                    let kepware = config.pipelines[i].source.kepware_device_levels.is_some();
                    let rows = models[i].extractor.read(&p.payload, device, last[i].as_mut(), Instant::now());
                    let h = &mut heard[i];
                    h.messages += 1;
                    if !kepware {
                        h.devices.insert(device.to_string());
                    }
                    if h.keys.is_empty() {
                        h.keys = keys_held(&p.payload, kepware);
                    }
                    for (named, row) in rows {
                        h.devices.extend(named);
                        h.tally(&row);
                    }
                }
            }
            _ => {}
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    for (h, source) in heard.iter_mut().zip(&sparkplug) {
        if let Some(source) = source.as_ref().and_then(|s| s.lock().ok()) {
            h.keys = source.metric_names(30);
        }
    }
    Ok(heard)
}

/// One Sparkplug B message, read as the daemon reads it (but no rebirth is asked for).
fn heard_sparkplug(h: &mut Heard, source: &Mutex<Source>, model: &ActiveModel, topic: &str, payload: &[u8]) {
    h.messages += 1;
    let max = model.extractor.max_payload_bytes();
    match crate::ingest::router::sparkplug_row(source, model, topic, payload, max) {
        Some(step) => {
            h.devices.insert(step.device);
            h.tally(&step.row);
        }
        None => {
            let birth = parse_topic(topic).is_some_and(|t| matches!(t.kind, Kind::NBirth | Kind::DBirth));
            *h.births.get_or_insert(0) += u64::from(birth);
        }
    }
}

/// The keys of a JSON object payload (of its first element, for an array), or for Kepware
/// the ids of the tags it holds, as a hint next to a `missing_feature` or no row at all.
fn keys_held(payload: &[u8], kepware: bool) -> Vec<String> {
    let doc: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    if kepware {
        let values = doc.get("values").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        return values.iter().filter_map(|v| v.get("id")?.as_str().map(str::to_string)).take(30).collect();
    }
    let object = match &doc {
        Value::Array(batch) => batch.first(),
        other => Some(other),
    };
    object.and_then(Value::as_object).map(|o| o.keys().take(30).cloned().collect()).unwrap_or_default()
}
