//! One session's options, its first CONNACK, and what to do when it ends.

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{ConnAck, Packet};
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, WireProtocol};

use super::{BrokerUrl, MqttConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
}

/// Whether the broker keeps retained messages: MQTT 5's CONNACK says so when it does not
/// (Retain Available 0; mosquitto's `retain_available false`). rumqttc then sends the will
/// and every publish unretained (its sixth patch); a 3.1.1 broker says nothing.
pub fn keeps_retained(ack: &ConnAck) -> bool {
    ack.properties.as_ref().and_then(|p| p.retain_available) != Some(0)
}

/// `"5"` or `"3.1.1"`, as events and `lathe check --connect` name the MQTT spoken.
pub fn protocol_name(v311: bool) -> &'static str {
    if v311 {
        "3.1.1"
    } else {
        "5"
    }
}

/// Polls a new session until the broker accepts it. For the one-shot commands (`check
/// --connect`, `push`, `fleet`): a refused login or no broker is an error at once, not a
/// silent wait. (The daemon itself retries for as long as it runs.)
///
/// # Errors
/// The first connection error ([`explain`]), or none within `timeout`.
pub async fn first_connack(eventloop: &mut EventLoop, timeout: Duration) -> Result<ConnAck, String> {
    let attempt = async {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => return Ok(ack),
                Ok(_) => {}
                Err(e) => return Err(explain(&e)),
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer in {} s", timeout.as_secs())))
}

/// TCP options with Nagle's algorithm off (the embedded broker's connections).
///
/// With Nagle on, a small write (a PUBACK) waits until the broker has acknowledged the
/// previous one at the TCP level. A broker with a backlog for us sends nothing until our
/// PUBACKs free its in-flight window, so nothing carries that acknowledgement and the kernel's
/// delayed ACK (40 ms) paces the stream: measured with the embedded broker (whose window is
/// 100), telemetry fell from 2,000 to a steady 1,680 msg/s once a backlog formed, while lathe
/// itself acked each message within 2 ms.
pub fn no_delay() -> rumqttc::NetworkOptions {
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net
}

/// The largest MQTT packet read whole: under MQTT 5 the broker is told (and drops larger
/// ones), under 3.1.1 a larger PUBLISH is skipped unread and rejected.
pub const MAX_PACKET_BYTES: u32 = 16 << 20;

/// What every session of this daemon shares (the main one, the Sparkplug edge node, the
/// updater): the broker, keep-alive, credentials and TLS. A clean session with no will.
///
/// # Errors
/// Unreadable password or TLS files.
pub fn session_options(m: &MqttConfig, host: &str, port: u16, client_id: String) -> Result<MqttOptions, ConnectError> {
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_wire_protocol(m.protocol);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    if m.tcp_nodelay {
        o.set_network_options(no_delay());
    }
    // Oversized telemetry must reach us to be rejected and reported: a v5 broker silently
    // drops messages over the client's maximum packet size. Under 3.1.1 the broker cannot be
    // told; a larger PUBLISH is skipped unread as it streams in (rumqttc patch 7) and arrives
    // as `OVERSIZED_PUBLISH`, which `route` rejects as payload_too_large.
    o.set_max_packet_size(Some(MAX_PACKET_BYTES));
    apply_login(m, &mut o)?;
    Ok(o)
}

/// Sets the credentials and the TLS trust and client certificate from the files `m` names.
/// Everything is read before anything is set, so a file that cannot be read changes nothing.
fn apply_login(m: &MqttConfig, o: &mut MqttOptions) -> Result<(), ConnectError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| ConnectError::Read { path: p.display().to_string(), source })
    };
    let credentials = match &m.username {
        Some(user) => {
            let password = match &m.password_file {
                Some(p) => String::from_utf8_lossy(&read(p)?).trim_end().to_string(),
                None => String::new(),
            };
            Some((user.clone(), password))
        }
        None => None,
    };
    #[cfg(feature = "tls")]
    let transport = if matches!(m.url, BrokerUrl::Tcp { tls: true, .. }) {
        // rumqttc builds its rustls config with the process-wide crypto provider; name ring
        // once, so no other crate's features can leave rustls to choose (it panics if two are
        // built in and none was installed). An `Err` means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client_auth = match (&m.cert_file, &m.key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Some(match &m.ca_file {
            Some(p) => rumqttc::Transport::tls(read(p)?, client_auth, None),
            // No CA file: the system's trust store.
            None => rumqttc::Transport::tls_with_default_config(),
        })
    } else {
        None
    };
    if let Some((user, password)) = credentials {
        o.set_credentials(user, password);
    }
    #[cfg(feature = "tls")]
    if let Some(t) = transport {
        o.set_transport(t);
    }
    Ok(())
}

/// The files `[mqtt]` logs in with (password, CA, client certificate and key), read again
/// after each failed or lost connection. A plant that rotates a password or a certificate
/// replaces the file; the daemon logs in with the new one at its next attempt instead of
/// being refused until someone restarts it.
pub struct LoginFiles {
    mqtt: MqttConfig,
    /// A hash of the files' contents when last applied.
    loaded: u64,
}

impl LoginFiles {
    pub fn new(mqtt: &MqttConfig) -> LoginFiles {
        LoginFiles { mqtt: mqtt.clone(), loaded: Self::contents(mqtt) }
    }

    fn contents(m: &MqttConfig) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in [&m.password_file, &m.ca_file, &m.cert_file, &m.key_file].into_iter().flatten() {
            std::fs::read(p).ok().hash(&mut h);
        }
        h.finish()
    }

    /// If a file changed since it was applied, `options` logs in with what the files hold
    /// now. Returns what to log when a file changed.
    pub fn refresh(&mut self, options: &mut MqttOptions) -> Option<String> {
        let now = Self::contents(&self.mqtt);
        if now == self.loaded {
            return None;
        }
        self.loaded = now;
        Some(match apply_login(&self.mqtt, options) {
            Ok(()) => "the broker login files changed (mqtt.password_file, ca_file, cert_file or key_file): \
                       the next connection uses what they hold now"
                .to_string(),
            Err(e) => format!("the broker login files changed but cannot be read ({e}): keeping the ones read before"),
        })
    }
}

/// Reconnect delay while the broker is away: 100, 200, 400 ms, then 500 ms for the first ten
/// seconds or so of an outage, then doubling to 30 s; ±25 % jitter so a fleet does not
/// reconnect in lockstep. A broker restart takes seconds, and each second waited past its
/// return is a second of telemetry queued at the broker (or redelivered): a plain doubling
/// from 100 ms waited up to 6 s after a crash loop's restarts.
pub fn backoff(attempt: u32) -> Duration {
    let base = match attempt {
        0..=2 => 100u64 << attempt,
        3..=22 => 500,
        n => (500u64 << (n - 22).min(6)).min(30_000),
    };
    jittered(base)
}

/// The wait while another client holds our client id (see [`QuickDrops`]): doubling from
/// 100 ms with the streak, to 30 s, so one of the twins holds the session for longer and
/// longer spells.
fn contested_backoff(streak: u32) -> Duration {
    jittered(100u64.saturating_mul(1u64 << streak.min(9)).min(30_000))
}

/// The wait before the next attempt after `failures` failed ones, the last connection's end
/// being `contested` (the streak [`QuickDrops::ended`] gave) or not.
pub fn reconnect_wait(failures: u32, contested: Option<u32>) -> Duration {
    match contested {
        Some(streak) => contested_backoff(streak.max(failures)),
        None => backoff(failures),
    }
}

fn jittered(base_ms: u64) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let jitter = (nanos % 500) as f64 / 1000.0 - 0.25; // -0.25 .. +0.25
    Duration::from_millis((base_ms as f64 * (1.0 + jitter)) as u64)
}

/// How often a broker outage is logged again as a warning while it lasts (the attempts in
/// between are debug lines): a plant engineer reading the journal hours later sees it is
/// still down, and the journal is not flooded.
pub const OUTAGE_REMINDER: Duration = Duration::from_secs(600);

/// Connections the broker closes right after accepting them (within 400 ms), in a row: what another
/// client with the same client id looks like (two daemons with one `node`, often a cloned
/// device image). Each takes the session from the other; reconnecting at once, they traded
/// it about five times a second each, with a warning per trade. A growing wait (the streak
/// as the backoff's attempt count) lets one hold the session for longer and longer spells.
/// Used by every session of the daemon (the Sparkplug and updater sessions share the client
/// id's prefix, so twins contest those too).
#[derive(Debug, Default)]
pub struct QuickDrops {
    connected_at: Option<Instant>,
    streak: u32,
}

impl QuickDrops {
    /// Up for less than this and closed: quick. A twin takes the session back as soon as its
    /// own short backoff ends (connections of 100–250 ms, measured); a broker in a crash loop
    /// that is back within the first attempt still keeps each connection for as long as it
    /// stays up (0.5 s and more in the crash-loop test, where a 1 s bound took it for a twin).
    const QUICK: Duration = Duration::from_millis(400);
    /// Quick drops in a row before they are taken for a contested session (a broker in a
    /// crash loop that is back before the first reconnect makes a few).
    const SUSPECT: u32 = 5;

    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// A connection ended, or an attempt failed: the streak of drops when this one makes the
    /// session look contested. A drop counts when it came within [`Self::QUICK`] of the
    /// connection, or when the broker said another client took the session (`taken_over`, see
    /// [`taken_over`]; mosquitto 2 says nothing, it closes the socket).
    ///
    /// A broker killed and restarted every 0.5–1.3 s also drops every connection quickly: on
    /// timing alone, three in a row looked like a twin, and each reconnect waited 4–6 s. So a
    /// failed attempt ends the streak (a crashed broker refuses the first reconnect unless it
    /// is back within ~100 ms; a twin's broker accepts every one), and it takes five drops in
    /// a row: measured with 20 immediate restarts, about one in twenty was back that fast.
    pub fn ended(&mut self, now: Instant, taken_over: bool) -> Option<u32> {
        let Some(at) = self.connected_at.take() else {
            self.streak = 0;
            return None;
        };
        if !taken_over && now.duration_since(at) >= Self::QUICK {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        (self.streak >= Self::SUSPECT).then_some(self.streak)
    }
}

/// What a session keeps from one connection to the next: the attempts that failed in a row,
/// the connections the broker closed right after accepting them ([`QuickDrops`]), and the
/// login files, read again after each failure. Every session reconnects through one: the
/// polling task ([`super::spawn_polling`]) and ingest's own loop, which paces its reads
/// itself; so all of them back off, re-read a rotated password and tell a twin the same way.
pub struct Reconnects {
    failures: u32,
    quick_drops: QuickDrops,
    login: LoginFiles,
}

/// A connection that ended or an attempt that failed, as [`Reconnects::lost`] judged it.
pub struct Lost {
    /// 1 for the first failure in a row.
    pub attempt: u32,
    /// The streak of quick drops, when the session looks contested by a twin.
    pub contested: Option<u32>,
    /// How long to wait before the next attempt.
    pub wait: Duration,
    /// What to log when a login file changed (the next attempt uses what it holds now).
    pub login_changed: Option<String>,
}

impl Reconnects {
    pub fn new(login: LoginFiles) -> Reconnects {
        Reconnects { failures: 0, quick_drops: QuickDrops::default(), login }
    }

    /// Connected (a CONNACK): the attempts this took, counting this one.
    pub fn connected(&mut self) -> u32 {
        let attempts = self.failures + 1;
        self.failures = 0;
        self.quick_drops.connected(Instant::now());
        attempts
    }

    /// The connection ended or the attempt failed (`taken_over`: the broker said another client
    /// took the session, see [`taken_over`]). `options` log in with the login files as they
    /// are now.
    pub fn lost(&mut self, taken_over: bool, options: &mut MqttOptions) -> Lost {
        let contested = self.quick_drops.ended(Instant::now(), taken_over);
        let login_changed = self.login.refresh(options);
        let lost = Lost {
            attempt: self.failures + 1,
            contested,
            wait: reconnect_wait(self.failures, contested),
            login_changed,
        };
        self.failures = self.failures.saturating_add(1);
        lost
    }
}

/// Whether the broker said it ended the session because another client connected with our
/// client id: MQTT 5 brokers may send `SessionTakenOver` (mosquitto 2 does not), a crashed
/// broker sends nothing, and MQTT 3.1.1 has no server DISCONNECT to say it with.
pub fn taken_over(e: &rumqttc::v5::ConnectionError) -> bool {
    use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
    use rumqttc::v5::{ConnectionError, StateError};
    matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            ..
        })
    )
}

/// A connection error as an operator reads it: rumqttc's words, then what to check.
/// Why a broker limited to QoS 0 (mosquitto's `max_qos 0`) cannot serve lathe.
pub const NO_QOS_1: &str = "lathe needs QoS 1 (its last will, telemetry and predictions are QoS 1, so nothing accepted is lost): allow it on the broker (mosquitto: max_qos)";

pub fn explain(e: &rumqttc::v5::ConnectionError) -> String {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code;
    use rumqttc::v5::ConnectionError as E;
    let hint = match e {
        E::ConnectionRefused(Code::NotAuthorized | Code::BadUserNamePassword | Code::BadAuthenticationMethod) => {
            "the broker refused our credentials: check the user and password (mqtt.username and mqtt.password_file; for push and fleet, --username and --password-file) against the broker's users"
        }
        E::ConnectionRefused(Code::ClientIdentifierNotValid | Code::BadClientId) => {
            "the broker refused the client id: check mqtt.client_id"
        }
        E::ConnectionRefused(Code::RefusedProtocolVersion | Code::UnsupportedProtocolVersion) => {
            "the broker refused this MQTT version: mqtt.protocol = \"auto\" speaks 5, or 3.1.1 to a broker that refuses 5"
        }
        E::ConnectionRefused(Code::QoSNotSupported) => NO_QOS_1,
        E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "nothing accepts connections there: is the broker running, and is the port in mqtt.url right?"
        }
        E::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            "the connection was not allowed: under systemd, IPAddressAllow= may not include the broker's address"
        }
        E::Timeout(_) => "no answer in time: is the host reachable (network, firewall)?",
        E::MqttState(rumqttc::v5::StateError::ServerDisconnect {
            reason_code: rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::SessionTakenOver,
            ..
        }) => "another client connected with this client id: two daemons with the same node or mqtt.client_id?",
        _ if e.to_string().contains("invalid peer certificate") => {
            "the broker's certificate was not accepted: mqtt.ca_file must hold the CA that signed it, and it must name the host in mqtt.url"
        }
        _ => "",
    };
    match hint {
        "" => e.to_string(),
        hint => format!("{e} ({hint})"),
    }
}

/// Where and as whom this daemon connects: the broker's settings, its address (the embedded
/// broker's once started) and the daemon's client id. The sessions beside the main one (the
/// Sparkplug edge node, the updater) log in the same way under the id with a suffix, so none
/// takes another's session.
#[derive(Debug, Clone, Copy)]
pub struct Broker<'a> {
    pub mqtt: &'a MqttConfig,
    pub host: &'a str,
    pub port: u16,
    pub client_id: &'a str,
}

impl Broker<'_> {
    /// Options for the session `{client_id}-{suffix}`.
    ///
    /// # Errors
    /// Unreadable password or TLS files.
    pub fn side_session(&self, suffix: &str) -> Result<MqttOptions, ConnectError> {
        session_options(self.mqtt, self.host, self.port, format!("{}-{suffix}", self.client_id))
    }

    /// The login files, read again after each failed connection.
    pub fn login(&self) -> LoginFiles {
        LoginFiles::new(self.mqtt)
    }
}

/// Connects once with the config's broker address, credentials and TLS, then disconnects:
/// what `lathe check --connect` reports. A clean session under its own client id, so the
/// daemon's session (and what the broker holds for it) is not touched.
///
/// # Errors
/// What stopped the connection, with what to check ([`explain`]).
pub async fn try_connect(m: &MqttConfig, client_id: &str, timeout: Duration) -> Result<String, String> {
    let BrokerUrl::Tcp { host, port, .. } = &m.url else {
        return Ok("embedded: lathe starts its own broker".to_string());
    };
    let id = format!("{client_id}-check-{}", std::process::id());
    let options = session_options(m, host, *port, id).map_err(|e| e.to_string())?;
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let user = m.username.as_deref().map(|u| format!(" as {u}")).unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_errors_say_what_to_check() {
        use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
        use rumqttc::v5::ConnectionError;
        let refused = ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(explain(&refused).ends_with(
            "(nothing accepts connections there: is the broker running, and is the port in mqtt.url right?)"
        ));
        let login = ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword);
        assert!(explain(&login).contains("(mqtt.username and mqtt.password_file;"), "{}", explain(&login));
        let qos0 = ConnectionError::ConnectionRefused(ConnectReturnCode::QoSNotSupported);
        assert!(explain(&qos0).contains("lathe needs QoS 1"), "{}", explain(&qos0));
        let v311 = ConnectionError::ConnectionRefused(ConnectReturnCode::RefusedProtocolVersion);
        assert!(explain(&v311).contains("mqtt.protocol"), "{}", explain(&v311));
        // Nothing to add: rumqttc's words alone.
        assert_eq!(explain(&ConnectionError::RequestsDone), "Requests done");
    }

    #[test]
    fn five_quick_drops_in_a_row_look_contested_and_a_lasting_connection_clears_them() {
        let mut drops = QuickDrops::default();
        let t = Instant::now();
        let quick = |drops: &mut QuickDrops, at: Duration| {
            drops.connected(t + at);
            drops.ended(t + at + Duration::from_millis(150), false)
        };
        for second in 0..4 {
            assert_eq!(quick(&mut drops, Duration::from_secs(second)), None);
        }
        assert_eq!(quick(&mut drops, Duration::from_secs(4)), Some(5));
        assert_eq!(quick(&mut drops, Duration::from_secs(5)), Some(6));
        drops.connected(t + Duration::from_secs(5));
        assert_eq!(drops.ended(t + Duration::from_secs(65), false), None, "up a minute: not contested");
        assert_eq!(quick(&mut drops, Duration::from_secs(70)), None, "the streak starts again");
        // A broker in a crash loop, back before the first attempt: each connection lasts as
        // long as the broker stays up (half a second and more), and none of them is quick.
        let mut crashing = QuickDrops::default();
        for round in 0..20u64 {
            let at = t + Duration::from_millis(700 * round);
            crashing.connected(at);
            assert_eq!(crashing.ended(at + Duration::from_millis(500), false), None, "round {round}");
        }
    }

    /// A broker killed and restarted again and again: each drop is quick, but the attempt
    /// after it is refused (the broker is down), so the drops never look like a twin's.
    #[test]
    fn quick_drops_with_refused_attempts_between_them_are_a_crashing_broker_not_a_twin() {
        let mut drops = QuickDrops::default();
        let t = Instant::now();
        for round in 0..20u64 {
            let at = t + Duration::from_millis(800 * round);
            drops.connected(at);
            assert_eq!(drops.ended(at + Duration::from_millis(600), false), None, "round {round}");
            assert_eq!(drops.ended(at + Duration::from_millis(700), false), None, "the refused attempt");
        }
        assert!(reconnect_wait(0, None) <= Duration::from_millis(125));
        // A broker that says another client took the session: a drop long into it counts too.
        let mut twin = QuickDrops::default();
        let contested: Vec<Option<u32>> = (0..6u64)
            .map(|round| {
                twin.connected(t + Duration::from_secs(10 * round));
                twin.ended(t + Duration::from_secs(10 * round + 5), true)
            })
            .collect();
        assert_eq!(contested, [None, None, None, None, Some(5), Some(6)]);
    }

    #[test]
    fn backoff_stays_short_early_in_an_outage_then_grows_to_a_cap_with_jitter() {
        assert!(backoff(0) <= Duration::from_millis(125));
        // The first ~10 s of attempts wait at most 625 ms: a restarted broker is back in use
        // within about half a second.
        let early: Duration = (0..23).map(backoff).sum();
        assert!(early >= Duration::from_secs(7) && early <= Duration::from_secs(14), "{early:?}");
        assert!((0..23).all(|a| backoff(a) <= Duration::from_millis(625)));
        assert!(backoff(24) >= Duration::from_millis(1500));
        for attempt in [30, 60, u32::MAX] {
            let d = backoff(attempt);
            assert!(d >= Duration::from_millis(22_500) && d <= Duration::from_millis(37_500), "{d:?}");
        }
        // A contested id waits longer and longer with its streak.
        assert!(reconnect_wait(0, Some(3)) >= Duration::from_millis(600));
        assert!(reconnect_wait(0, Some(9)) >= Duration::from_millis(22_500));
    }
}
