//! The MQTT connection: one rumqttc event loop, polled by one task that never awaits a
//! publish (awaiting a publish in the task that polls rumqttc's event loop can freeze it under
//! load: the publish waits for room the poll would make). Incoming messages go to the router
//! (`router.rs`); predictions are published by the pipelines through the cloned client.
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
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, Packet, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, WireProtocol};
use rumqttc::Outgoing;
use tokio::sync::watch;

use crate::mqtt::ack::{AckMsg, AckSender};
use crate::mqtt::{
    explain, keeps_retained, protocol_name, session_options, taken_over, Broker, ConnectError, LoginFiles, Reconnects,
    OUTAGE_REMINDER,
};
use crate::telemetry::events::{Event, Events};

use super::commands::CommandRoute;
use super::flow::Flow;
use super::router::{Route, Router};

/// rumqttc options from the config: persistent session, manual acks, a receive window, last
/// will.
///
/// MQTT 5 by default because of Receive Maximum: the broker sends at most
/// `mqtt.receive_maximum` unacknowledged messages, so a burst (or a backlog redelivered after
/// an outage) waits at the broker instead of in our memory. With 3.1.1 (`mqtt.protocol`, or a
/// broker that refuses 5) only the broker's own setting bounds it, and the pause on waiting
/// rows (module docs) bounds our memory. `status_topic` carries the last will
/// (`{"state":"offline"}`, retained).
///
/// # Errors
/// Unreadable password or TLS files.
pub fn mqtt_options(broker: Broker, status_topic: String) -> Result<MqttOptions, ConnectError> {
    let m = broker.mqtt;
    let mut o = session_options(m, broker.host, broker.port, broker.client_id.to_string())?;
    // A session that never expires: what arrives while we are down waits for us.
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(u32::MAX));
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(m.receive_maximum));
    o.set_outgoing_inflight_upper_limit(m.max_inflight);
    o.set_request_channel_capacity(4096);
    o.set_last_will(LastWill::new(status_topic, r#"{"state":"offline"}"#, QoS::AtLeastOnce, true, None));
    Ok(o)
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
            login,
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
        let (mut stopping, mut disconnecting) = (false, false);
        let mut reconnects = Reconnects::new(login);
        let (broker_host, broker_port) = eventloop.options.broker_address();
        let broker = format!("{broker_host}:{broker_port}");
        // Since when the broker is out of reach, when that was last a warning, and whether
        // this run was ever connected (a failure is then "lost", else "cannot connect").
        let (mut outage_since, mut warned_at, mut ever_connected) = (None::<Instant>, Instant::now(), false);
        let mut contested_warned_at = None::<Instant>;
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
                    let attempts = reconnects.connected();
                    router.events.emit(Event::Connected { attempts, protocol: protocol_name(v311) });
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
                    let lost = reconnects.lost(std::mem::take(&mut said_taken_over), &mut eventloop.options);
                    if let Some(streak) = lost.contested {
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
                    } else if lost.attempt == 1 {
                        tracing::warn!("{what} at {broker}: {e}; trying again with backoff");
                        (warned_at, warned_reason) = (now, e.clone());
                    } else if e != warned_reason {
                        tracing::warn!("Still no connection to the broker at {broker}, now because: {e}");
                        (warned_at, warned_reason) = (now, e.clone());
                    } else if now.duration_since(warned_at) >= OUTAGE_REMINDER {
                        let minutes = now.duration_since(since).as_secs() / 60;
                        tracing::warn!(
                            "Still no broker at {broker} after {} attempts over {minutes} min: {e}",
                            lost.attempt
                        );
                        warned_at = now;
                    } else {
                        tracing::debug!(attempt = lost.attempt, "Connecting to the broker failed: {e}");
                    }
                    crate::telemetry::systemd::status(&format!("{what} at {broker} (attempt {}): {e}", lost.attempt));
                    if let Some(line) = lost.login_changed {
                        tracing::info!("{line}");
                    }
                    if disconnecting {
                        break; // stopping and the broker is gone: nothing more to send
                    }
                    let wait = tokio::time::sleep(lost.wait);
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
