//! The MQTT connection: one rumqttc event loop, polled by one task that never awaits a
//! publish (awaiting a publish in the task that polls rumqttc's event loop can freeze it under
//! load: the publish waits for room the poll would make). Incoming telemetry is routed to
//! pipelines here; predictions are published by the pipelines through the cloned client.
//!
//! Delivery: the session is persistent (`clean_start = false`, never expiring) and acks are manual. A
//! telemetry message is acknowledged to the broker only after its prediction has been handed
//! to the client (and so is written to the socket before the ack), or after it was rejected
//! and reported; acks go out in arrival order (see `ack`). If the daemon dies first, the
//! broker redelivers the message to the next session.
//!
//! Memory: rows wait in a per-pipeline queue when inference is behind. Two things bound it.
//! The broker may send at most `mqtt.receive_maximum` unacknowledged messages (MQTT 5; a
//! 3.1.1 broker keeps to its own in-flight limit);
//! and because not every broker keeps to that (mosquitto 2.0.11 was seen to over-grant it
//! once acks flow), this task also stops reading from the socket while more than that many
//! rows wait, so TCP pushes back on the broker. It keeps polling whenever a pipeline is
//! waiting to publish (see [`Flow`]), so the predictions and acks that free the queue are
//! never stuck behind the pause.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, Packet, Publish, RetainForwardRule, OVERSIZED_PUBLISH};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, WireProtocol};
use rumqttc::Outgoing;
use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};

use crate::config::{BrokerUrl, Config};
use crate::mqtt::ack::{AckMsg, AckSender, AckTicket};
use crate::mqtt::TopicFilter;
use crate::mqtt::{
    explain, first_connack, keeps_retained, protocol_name, reconnect_wait, session_options, taken_over, ConnectError,
    LoginFiles, QuickDrops, NO_QOS_1, OUTAGE_REMINDER,
};
use crate::telemetry::events::{Counters, Event, Events};

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
        source: &crate::config::SourceConfig,
        own: Option<&crate::config::SparkplugOutputConfig>,
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

/// `lathe/{node}/cmd/+` and where its messages go.
pub struct CommandRoute {
    pub filter: TopicFilter,
    /// The training loop, where one runs: `train`, `rollback` and anything else go there
    /// (it answers each on the events topic).
    pub to_loop: Option<std::sync::mpsc::Sender<crate::telemetry::inbox::LoopMessage>>,
    /// `status`: wakes the status task, which publishes a fresh status at once.
    pub status_now: Arc<tokio::sync::Notify>,
}

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
    fn take(
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

/// Shared between ingest and the pipelines to pace reading.
#[derive(Debug, Default)]
pub struct Flow {
    /// Rows routed to a pipeline and not yet taken by its inference task.
    pub waiting_rows: AtomicUsize,
    /// Pipelines currently waiting for room in the client's request channel, which only
    /// this task's polling makes.
    pub blocked_publishers: AtomicUsize,
    /// Wakes a paused ingest when either of the above changes in a way that matters.
    pub wake: Notify,
}

impl Flow {
    /// A pipeline took `n` rows off its channel.
    pub fn taken(&self, n: usize) {
        self.waiting_rows.fetch_sub(n, Relaxed);
        self.wake.notify_one();
    }

    /// Publishes through `client`, making sure a paused ingest keeps polling meanwhile.
    pub async fn publish(&self, client: &AsyncClient, topic: String, payload: Vec<u8>) -> bool {
        self.blocked_publishers.fetch_add(1, Relaxed);
        self.wake.notify_one();
        let ok = client.publish(topic, QoS::AtLeastOnce, false, payload).await.is_ok();
        self.blocked_publishers.fetch_sub(1, Relaxed);
        ok
    }
}

/// rumqttc options from the config: persistent session, manual acks, a receive window, last
/// will.
///
/// MQTT 5 by default because of Receive Maximum: the broker sends at most
/// `mqtt.receive_maximum` unacknowledged messages, so a burst (or a backlog redelivered after
/// an outage) waits at the broker instead of in our memory. With 3.1.1 (`mqtt.protocol`, or a
/// broker that refuses 5) only the broker's own setting bounds it, and the pause on waiting
/// rows (module docs) bounds our memory.
///
/// # Errors
/// Unreadable password or TLS files.
pub fn mqtt_options(config: &Config, host: &str, port: u16) -> Result<MqttOptions, ConnectError> {
    let m = &config.mqtt;
    let mut o = session_options(&config.mqtt, host, port, config.client_id())?;
    // A session that never expires: what arrives while we are down waits for us.
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(u32::MAX));
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(m.receive_maximum));
    o.set_outgoing_inflight_upper_limit(m.max_inflight);
    o.set_request_channel_capacity(4096);
    o.set_last_will(LastWill::new(config.status_topic(), r#"{"state":"offline"}"#, QoS::AtLeastOnce, true, None));
    Ok(o)
}

/// Connects once with the config's broker address, credentials and TLS, then disconnects:
/// what `lathe check --connect` reports. A clean session under its own client id, so the
/// daemon's session (and what the broker holds for it) is not touched.
///
/// # Errors
/// What stopped the connection, with what to check ([`explain`]).
pub async fn try_connect(config: &Config, timeout: Duration) -> Result<String, String> {
    let BrokerUrl::Tcp { host, port, .. } = &config.mqtt.url else {
        return Ok("embedded: lathe starts its own broker".to_string());
    };
    let id = format!("{}-check-{}", config.client_id(), std::process::id());
    let options = session_options(&config.mqtt, host, *port, id).map_err(|e| e.to_string())?;
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let user = config.mqtt.username.as_deref().map(|u| format!(" as {u}")).unwrap_or_default();
    let ack = first_connack(&mut eventloop, timeout)
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}{user}: {e}"))?;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    if ack.properties.as_ref().and_then(|p| p.max_qos) == Some(0) {
        return Err(format!("{host}:{port} accepted the connection but takes no QoS 1 messages: {NO_QOS_1}"));
    }
    let protocol = protocol_name(eventloop.options.wire_protocol() == WireProtocol::V311);
    let retained = if keeps_retained(&ack) { "" } else { "; it keeps no retained messages" };
    Ok(format!("connected to {host}:{port}{user} (MQTT {protocol}{retained})"))
}

pub struct Ingest {
    pub eventloop: EventLoop,
    pub client: AsyncClient,
    pub routes: Vec<Route>,
    pub events: Events,
    pub acks: AckSender,
    pub flow: Arc<Flow>,
    /// Stop reading while more rows than this wait (`mqtt.receive_maximum`).
    pub max_waiting_rows: usize,
    /// `mqtt.keep_alive_s`: a link that brings no packet for 1.5 times this is dead.
    pub keep_alive: Duration,
    /// Flips to true to stop: no new messages are taken; queued ones drain.
    pub stop: watch::Receiver<bool>,
    /// Fires once all pipelines are drained, to disconnect cleanly.
    pub disconnect: watch::Receiver<bool>,
    /// True while connected and subscribed: messages published now will reach us.
    pub ready: watch::Sender<bool>,
    /// `lathe/{node}/cmd/+`: commands for the status task and the training loop.
    pub commands: CommandRoute,
    /// Filters an earlier run subscribed to that no route uses now (after a reload): the
    /// broker kept them in our session, so they are removed once connected.
    pub unsubscribe: Vec<String>,
    /// Read again after each failed or lost connection (a rotated password or certificate).
    pub login: LoginFiles,
}

/// How many distinct device ids a route remembers.
const MAX_DEVICES: usize = 100_000;
/// The largest `lathe/{node}/cmd/+` payload taken.
const MAX_COMMAND_BYTES: usize = 4096;

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

impl Ingest {
    /// The topic filters this ingest subscribes to: telemetry, labels, commands.
    pub fn filters(&self) -> Vec<String> {
        let routes = &self.routes;
        routes
            .iter()
            .map(|r| r.filter.as_str().to_string())
            .chain(routes.iter().filter_map(|r| r.labels.as_ref().map(|l| l.filter.as_str().to_string())))
            .chain(std::iter::once(self.commands.filter.as_str().to_string()))
            .collect()
    }

    /// Polls the connection until a clean disconnect after stop (or a stop while the broker
    /// is unreachable).
    ///
    /// rumqttc's `poll()` is not cancel-safe: a request it has taken from the channel is lost
    /// if the future is dropped while writing it (an ack or a prediction, silently). So one
    /// `poll()` future lives until it completes; the other branches run beside it without
    /// dropping it.
    pub async fn run(self) {
        let filters = self.filters();
        let Ingest {
            mut eventloop,
            client,
            routes,
            events,
            acks,
            flow,
            max_waiting_rows,
            keep_alive,
            mut stop,
            mut disconnect,
            ready,
            commands,
            unsubscribe,
            mut login,
        } = self;
        let mut router = Router {
            pending: routes.iter().map(|_| VecDeque::new()).collect(),
            routes,
            events,
            acks,
            next_seq: 0,
            commands,
            client: client.clone(),
        };
        let (mut stopping, mut disconnecting, mut failures) = (false, false, 0u32);
        let (broker_host, broker_port) = eventloop.options.broker_address();
        let broker = format!("{broker_host}:{broker_port}");
        // Since when the broker is out of reach, when that was last a warning, and whether
        // this run was ever connected (a failure is then "lost", else "cannot connect").
        let (mut outage_since, mut warned_at, mut ever_connected) = (None::<Instant>, Instant::now(), false);
        let (mut quick_drops, mut contested_warned_at) = (QuickDrops::default(), None::<Instant>);
        // The reason last warned of: a new one (the broker is back but refuses our login) is
        // worth a warning at once, not at the next reminder.
        let mut warned_reason = String::new();
        let client_id = eventloop.options.client_id();
        let configured = eventloop.options.wire_protocol();
        // Whether the broker still holds this run's subscriptions (see the CONNACK below),
        // and whether the 3.1.1 fallback has been logged.
        let (mut subscribed, mut said_311, mut said_no_retain) = (false, false, false);
        // Set once our DISCONNECT is written: we then read until the broker closes the
        // connection. Closing it ourselves with telemetry still unread would make the kernel
        // send a reset, and the broker could drop the acks it had not processed yet.
        let mut closing: Option<tokio::time::Instant> = None;
        // systemd's watchdog is fed from this loop: if it stalls, the pings stop.
        let watchdog_every = crate::telemetry::systemd::watchdog_interval();
        let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        // A half-open link (the broker host lost power, a NAT forgot us) brings no error, only
        // silence. rumqttc pings every keep-alive and notices a missing answer only at the next
        // ping (up to 2x); the broker answers each ping at once, so silence for 1.5x the
        // keep-alive while connected and reading means the link is dead. Time spent paused
        // (not reading) does not count.
        let dead_after = keep_alive.mul_f32(1.5);
        let mut last_heard: Option<tokio::time::Instant> = None;
        // Whether the broker said so when it last ended the session (see `taken_over`).
        let mut said_taken_over = false;
        loop {
            let event = {
                // Dropped at the end of this block, so a dead link can be cleaned up below.
                let poll = eventloop.poll();
                tokio::pin!(poll);
                loop {
                    router.flush();
                    if stopping && !router.backlog() {
                        router.close();
                    }
                    let paused = flow.waiting_rows.load(Relaxed) > max_waiting_rows
                        && flow.blocked_publishers.load(Relaxed) == 0;
                    if paused {
                        last_heard = last_heard.map(|_| tokio::time::Instant::now());
                    }
                    let silent_until = last_heard.map(|t| t + dead_after);
                    tokio::select! {
                        event = &mut poll, if !paused => break event.map_err(|e| {
                            said_taken_over = taken_over(&e);
                            (explain(&e), false)
                        }),
                        _ = tokio::time::sleep_until(silent_until.unwrap_or_else(tokio::time::Instant::now)),
                            if silent_until.is_some() && !paused && closing.is_none() => {
                            let silent = last_heard.map(|t| t.elapsed()).unwrap_or_default();
                            let why = format!(
                                "no packet from the broker for {:.1} s (keep-alive {} s): the link is dead",
                                silent.as_secs_f32(),
                                keep_alive.as_secs()
                            );
                            break Err((why, true));
                        }
                        _ = tokio::time::sleep(Duration::from_millis(1)), if router.backlog() => {}
                        _ = flow.wake.notified(), if paused => {}
                        _ = watchdog.tick(), if watchdog_every.is_some() => crate::telemetry::systemd::watchdog(),
                        _ = stop.changed(), if !stopping => stopping = true,
                        _ = disconnect.changed(), if !disconnecting => {
                            disconnecting = true;
                            let client = client.clone();
                            tokio::spawn(async move { client.disconnect().await });
                        }
                        _ = tokio::time::sleep_until(closing.unwrap_or_else(tokio::time::Instant::now)), if closing.is_some() => {
                            let _ = ready.send(false);
                            return;
                        }
                    }
                }
            };
            if matches!(event, Ok(MqttEvent::Incoming(_))) {
                last_heard = Some(tokio::time::Instant::now());
            }
            if let Err((_, true)) = &event {
                // Drop the socket and requeue unacknowledged publishes, as rumqttc does on an
                // error; acks still queued are dropped and the broker redelivers those messages.
                eventloop.clean();
            }
            match event {
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    if !stopping {
                        router.route(p, &flow); // once stopping: unacked, redelivered to our next session
                    }
                }
                Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                    let v311 = eventloop.options.wire_protocol() == WireProtocol::V311;
                    router.events.emit(Event::Connected { attempts: failures + 1, protocol: protocol_name(v311) });
                    if v311 && !std::mem::replace(&mut said_311, true) {
                        tracing::info!(
                            "Speaking MQTT 3.1.1 to the broker at {broker} ({}). The broker's own in-flight limit \
                             bounds the telemetry it sends before lathe acknowledges it (MQTT 5's Receive Maximum, \
                             mqtt.receive_maximum, is not there to ask for less)",
                            if configured == WireProtocol::Auto {
                                "it refused MQTT 5; set mqtt.protocol = \"3.1.1\" to skip asking at each start"
                            } else {
                                "mqtt.protocol"
                            }
                        );
                    }
                    if !keeps_retained(&ack) && !std::mem::replace(&mut said_no_retain, true) {
                        tracing::warn!(
                            "The broker at {broker} keeps no retained messages: lathe's status and its last will \
                             go unretained, so a dashboard sees the status at its next refresh (every {} s) \
                             rather than when it subscribes, and remote updates (whose chunks wait on the broker \
                             as retained messages) cannot reach this device through it",
                            crate::telemetry::STATUS_EVERY.as_secs()
                        );
                    }
                    quick_drops.connected(Instant::now());
                    failures = 0;
                    (outage_since, ever_connected) = (None, true);
                    router.acks.send(AckMsg::Reset { next_seq: router.next_seq });
                    // MQTT 3.1.1 sends the retained messages again at every subscribe, even
                    // for a subscription the session kept (5 sends them only for new ones,
                    // below), so a retained reading would be scored again at each reconnect.
                    // A 3.1.1 session that kept this run's subscriptions keeps them.
                    subscribed &= ack.session_present;
                    if v311 && subscribed {
                        let _ = ready.send(true);
                        continue;
                    }
                    // Subscribe at every connect, from another task so this one never waits
                    // on the request channel: a new session has no subscriptions, and a kept
                    // one lacks those a reload added. Retained messages come again only for
                    // subscriptions that are new to the broker.
                    let client = client.clone();
                    let subs: Vec<_> = filters
                        .iter()
                        .map(|f| Filter {
                            retain_forward_rule: RetainForwardRule::OnNewSubscribe,
                            ..Filter::new(f.clone(), QoS::AtLeastOnce)
                        })
                        .collect();
                    let stale = unsubscribe.clone();
                    tokio::spawn(async move {
                        let _ = client.subscribe_many(subs).await;
                        for f in stale {
                            let _ = client.unsubscribe(f).await;
                        }
                    });
                    // Ready (online) comes at the SUBACK, even with a kept session: only then
                    // is every topic of this run's pipelines subscribed.
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    subscribed = true;
                    let _ = ready.send(true);
                }
                Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) => {
                    closing = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                }
                Ok(_) => {}
                Err(_) if closing.is_some() => break, // the broker closed after our DISCONNECT
                Err((e, _)) => {
                    last_heard = None;
                    let _ = ready.send(false);
                    // Acks due from now on are for the lost connection: rumqttc dropped the
                    // queued ones, and the broker redelivers every unacked message. One sent on
                    // the next connection could free a packet id the broker then gives a new
                    // message, and the redelivered copy's ack would acknowledge that message
                    // before lathe has answered it.
                    router.acks.send(AckMsg::Reset { next_seq: router.next_seq });
                    let now = Instant::now();
                    let since = *outage_since.get_or_insert(now);
                    let what = if ever_connected { "Broker connection lost" } else { "Cannot connect to the broker" };
                    let contested = quick_drops.ended(now, std::mem::take(&mut said_taken_over));
                    if let Some(streak) = contested {
                        if contested_warned_at.is_none_or(|t| now.duration_since(t) >= OUTAGE_REMINDER) {
                            tracing::warn!(
                                "The broker at {broker} closed {streak} connections in a row right after accepting them: \
                                 another client is probably using client id `{client_id}` (two daemons with the same `node` \
                                 or `mqtt.client_id`, e.g. a cloned device image), and each takes the session from the other. \
                                 Waiting longer before each reconnect; last error: {e}"
                            );
                            contested_warned_at = Some(now);
                        } else {
                            tracing::debug!(streak, "Connection closed again just after it was made: {e}");
                        }
                    } else if failures == 0 {
                        tracing::warn!("{what} at {broker}: {e}; trying again with backoff");
                        (warned_at, warned_reason) = (now, e.clone());
                    } else if e != warned_reason {
                        tracing::warn!("Still no connection to the broker at {broker}, now because: {e}");
                        (warned_at, warned_reason) = (now, e.clone());
                    } else if now.duration_since(warned_at) >= OUTAGE_REMINDER {
                        let minutes = now.duration_since(since).as_secs() / 60;
                        tracing::warn!(
                            "Still no broker at {broker} after {} attempts over {minutes} min: {e}",
                            failures + 1
                        );
                        warned_at = now;
                    } else {
                        tracing::debug!(attempt = failures + 1, "Connecting to the broker failed: {e}");
                    }
                    crate::telemetry::systemd::status(&format!("{what} at {broker} (attempt {}): {e}", failures + 1));
                    if let Some(line) = login.refresh(&mut eventloop.options) {
                        tracing::info!("{line}");
                    }
                    if disconnecting {
                        break; // stopping and the broker is gone: nothing more to send
                    }
                    let wait = reconnect_wait(failures, contested);
                    failures = failures.saturating_add(1);
                    let wait = tokio::time::sleep(wait);
                    tokio::pin!(wait);
                    loop {
                        tokio::select! {
                            _ = &mut wait => break,
                            // Told to disconnect while the broker is unreachable: nothing to send.
                            _ = disconnect.changed(), if !disconnecting => {
                                let _ = ready.send(false);
                                return;
                            }
                            _ = watchdog.tick(), if watchdog_every.is_some() => crate::telemetry::systemd::watchdog(),
                        }
                    }
                }
            }
        }
        let _ = ready.send(false);
    }
}

/// Routes incoming telemetry to the pipelines' channels.
struct Router {
    routes: Vec<Route>,
    /// Per route, rows waiting for room in its channel.
    pending: Vec<VecDeque<Sample>>,
    events: Events,
    acks: AckSender,
    next_seq: u64,
    commands: CommandRoute,
    /// Sends Sparkplug rebirth requests (never waits: `try_publish`).
    client: AsyncClient,
}

impl Router {
    /// A `lathe/{node}/cmd/{action}` message. Without a training loop, `train` and `rollback`
    /// are refused on the events topic, once per pipeline, rather than going unanswered.
    fn command(&self, action: &str, payload: &[u8]) {
        // A command is a pipeline's name at most; the loop's queue is not for megabytes.
        if payload.len() > MAX_COMMAND_BYTES {
            tracing::warn!(action, bytes = payload.len(), "Command ignored: over {MAX_COMMAND_BYTES} bytes");
            return;
        }
        match (action, &self.commands.to_loop) {
            ("status", _) => self.commands.status_now.notify_one(),
            (_, Some(tx)) => {
                let (action, payload) = (action.to_string(), payload.to_vec());
                let _ = tx.send(crate::telemetry::inbox::LoopMessage::Command { action, payload });
            }
            (_, None) => {
                for route in &self.routes {
                    self.events.emit(crate::telemetry::events::Event::Step {
                        pipeline: route.pipeline.clone(),
                        step: "command.refused",
                        message: format!(
                            "{action:?}: no pipeline on this node has [pipeline.train], and [update] is off"
                        ),
                        detail: serde_json::json!({"command": action}),
                    });
                }
            }
        }
    }

    fn flush(&mut self) {
        for (queue, route) in self.pending.iter_mut().zip(&self.routes) {
            flush(queue, route.tx.as_ref());
        }
    }

    fn backlog(&self) -> bool {
        self.pending.iter().any(|q| !q.is_empty())
    }

    /// Closes the pipelines' channels, so each drains what it holds and finishes.
    fn close(&mut self) {
        self.routes.iter_mut().for_each(|r| r.tx = None);
    }

    fn route(&mut self, p: Publish, flow: &Flow) {
        let received = Instant::now();
        // Debug builds only (the tests): a payload `{"__lathe_debug_stall_ms": N}` blocks this
        // loop for N ms, so a test can see the watchdog pings stop when the loop stalls.
        #[cfg(debug_assertions)]
        if let Some(ms) = p.payload.strip_prefix(b"{\"__lathe_debug_stall_ms\":".as_slice()) {
            let ms = std::str::from_utf8(ms).ok().and_then(|t| t.trim_end_matches('}').trim().parse::<u64>().ok());
            std::thread::sleep(Duration::from_millis(ms.unwrap_or(0).min(10_000)));
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
            self.command(action, &p.payload);
        }
        for route in self.routes.iter().filter(|_| oversized.is_none()) {
            let Some(labels) = &route.labels else { continue };
            let Some(device) = labels.filter.matches(topic) else { continue };
            let max_payload_bytes = route.model.current().extractor().max_payload_bytes();
            let (alarms, unusable) = labels.take(device, &p.payload, max_payload_bytes, ack.as_ref());
            if !alarms.is_empty() {
                let model = route.model.current();
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
            let rows: Vec<super::Row> = match &route.source.sparkplug {
                _ if oversized.is_some() => {
                    let (bytes, max) =
                        (oversized.unwrap_or_default(), route.model.current().extractor().max_payload_bytes());
                    vec![(None, Err(super::extract::Reject::TooLarge { bytes, max }))]
                }
                None => {
                    let mut last =
                        route.source.last_values.as_ref().map(|l| l.lock().unwrap_or_else(PoisonError::into_inner));
                    route.model.current().extractor().read(&p.payload, device, last.as_deref_mut(), received)
                }
                Some(source) => {
                    let max = route.model.current().extractor().max_payload_bytes();
                    let Some(step) = sparkplug_row(source, route.model.current().as_ref(), topic, &p.payload, max)
                    else {
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

#[cfg(test)]
mod tests {
    use super::*;

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
