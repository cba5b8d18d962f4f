//! MQTT, as every session of lathe speaks it (the daemon's main one, the Sparkplug edge node,
//! the updater, and the central commands): `[mqtt]` and the broker's address and login, one
//! way to build a session's options (`Broker` for the sessions beside the main one), reading
//! the first CONNACK, what a session keeps between connections (`Reconnects`: back-off, the
//! login files read again, telling a twin that holds our client id from a crashing broker),
//! errors an operator can act on, a reconnecting session's polling (`polling`), and acks
//! released in arrival order.

pub mod ack;
mod polling;
mod session;
pub mod topic;

use std::path::PathBuf;

pub use polling::{spawn_polling, Outages};
pub use session::*;
pub use topic::TopicFilter;

#[derive(Debug, Clone, PartialEq)]
pub enum BrokerUrl {
    /// Start the in-process broker (feature `embedded-broker`) and connect to it.
    Embedded,
    Tcp {
        host: String,
        port: u16,
        tls: bool,
    },
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub url: BrokerUrl,
    /// Where the embedded broker listens (only with `url = "embedded"`).
    pub embedded_listen: String,
    /// Default `lathe-{node}`. Stable across restarts so the broker keeps our session (and the
    /// QoS 1 messages that arrived while we were down).
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub keep_alive_s: u64,
    /// Telemetry payloads larger than this are rejected (`payload_too_large`).
    pub max_payload_bytes: usize,
    /// QoS 1 predictions in flight (sent, not yet acknowledged by the broker).
    pub max_inflight: u16,
    /// MQTT 5 Receive Maximum: telemetry messages the broker may have in flight to us (a
    /// 3.1.1 broker has its own limit); also the waiting rows that pause reading.
    /// Bounds the memory a burst or a redelivered backlog can take.
    pub receive_maximum: u16,
    /// Nagle's algorithm off on the connection to the broker (`crate::mqtt::no_delay`).
    pub tcp_nodelay: bool,
    /// `"auto"` (MQTT 5, or 3.1.1 once a broker refuses 5), `"5"` or `"3.1.1"`.
    pub protocol: rumqttc::v5::WireProtocol,
}

/// `mqtt://host[:port]`, `mqtts://host[:port]`, `tcp://…`, or `embedded`.
pub fn parse_url(url: &str) -> Result<BrokerUrl, String> {
    if url == "embedded" {
        return Ok(BrokerUrl::Embedded);
    }
    let expected =
        || format!("expected \"mqtt://HOST[:PORT]\", \"mqtts://HOST[:PORT]\" or \"embedded\", found {url:?}");
    let (scheme, rest) = url.split_once("://").ok_or_else(expected)?;
    let (tls, default_port) = match scheme {
        "mqtt" | "tcp" => (false, 1883),
        "mqtts" | "ssl" => (true, 8883),
        _ => return Err(expected()),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h.trim_matches(['[', ']']).to_string(), p.parse::<u16>().map_err(|_| expected())?)
        }
        _ => (rest.to_string(), default_port),
    };
    if host.is_empty() || host.contains('/') {
        return Err(expected());
    }
    Ok(BrokerUrl::Tcp { host, port, tls })
}
