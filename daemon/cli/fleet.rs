//! The central server's commands: `lathe keygen`, `lathe push`, `lathe fleet`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::{BrokerUrl, MqttConfig};
use crate::model::Bundle;
use crate::mqtt::{LoginFiles, Outages};
use crate::trust::signing;
use crate::update::push::{prepare, PushOptions};

#[derive(Args)]
pub struct PushArgs {
    /// The bundle to push (signed here with --key).
    bundle: PathBuf,
    /// The central server's signing key (`lathe keygen`).
    #[arg(long)]
    key: PathBuf,
    #[command(flatten)]
    broker: BrokerArgs,
    /// Offer to these nodes (`lathe/{node}/update`; repeatable).
    #[arg(long = "node")]
    nodes: Vec<String>,
    /// Offer to this fleet group (`lathe/fleet/{group}/update`).
    #[arg(long)]
    group: Option<String>,
    /// The offer is refused after this long (e.g. 30m, 24h, 7d).
    #[arg(long, default_value = "24h")]
    expires: String,
    /// Only devices whose `update.compatible` says this take it (empty: devices that name none).
    #[arg(long, default_value = "")]
    compatible: String,
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    min_daemon_version: String,
    #[arg(long, default_value_t = 64)]
    chunk_kb: usize,
    /// With --group: offer to this many of the group's nodes first (by name), and to the
    /// group only if they take it.
    #[arg(long, default_value_t = 0)]
    canary: usize,
    /// Stop the rollout when more than this share of the canaries fail.
    #[arg(long, default_value_t = 0.0)]
    max_failure_share: f64,
    /// How long to wait for the canaries to pass their trials (`trial` in their
    /// `[pipeline.train]`, 10 minutes by default).
    #[arg(long, default_value = "20m")]
    canary_wait: String,
}

/// The broker the central server's commands talk to, and how they log in: the same
/// settings as the daemon's `[mqtt]` (an ACL'd production broker needs them).
#[derive(Args, Clone)]
pub struct BrokerArgs {
    /// The broker the fleet listens to: mqtt://HOST:PORT, or mqtts://HOST:PORT.
    #[arg(long)]
    pub broker: String,
    #[command(flatten)]
    pub login: BrokerLogin,
}

/// How a command logs in to the broker; apart from `BrokerArgs` for a command whose
/// `--broker` is optional (clap does not make a flattened `Option` group optional).
#[derive(Args, Clone, Default)]
pub struct BrokerLogin {
    /// Log in as this user.
    #[arg(long)]
    pub username: Option<String>,
    /// The password for --username, read from this file (not the command line, where `ps`
    /// shows it).
    #[arg(long, requires = "username")]
    pub password_file: Option<PathBuf>,
    /// mqtts://: the CA certificate that signed the broker's (default: the system's store).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// mqtts://: a client certificate, with --key-file.
    #[arg(long, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

impl BrokerArgs {
    /// As the daemon's `[mqtt]` would say it, for `crate::mqtt::session_options`.
    fn mqtt(&self) -> Result<(MqttConfig, String, u16), String> {
        let url = crate::config::parse_url(&self.broker)?;
        let (host, port) = match &url {
            BrokerUrl::Tcp { tls: true, .. } if !cfg!(feature = "tls") => {
                return Err("--broker mqtts://… needs a build with `--features tls`".into())
            }
            BrokerUrl::Tcp { host, port, .. } => (host.clone(), *port),
            BrokerUrl::Embedded => return Err("--broker must be mqtt://HOST:PORT".into()),
        };
        let mqtt = MqttConfig {
            url,
            embedded_listen: String::new(),
            client_id: None,
            username: self.login.username.clone(),
            password_file: self.login.password_file.clone(),
            ca_file: self.login.ca_file.clone(),
            cert_file: self.login.cert_file.clone(),
            key_file: self.login.key_file.clone(),
            keep_alive_s: 30,
            max_payload_bytes: 0,
            max_inflight: 100,
            receive_maximum: 1000,
            tcp_nodelay: false,
            protocol: rumqttc::v5::WireProtocol::Auto,
        };
        Ok((mqtt, host, port))
    }
}

/// One MQTT session for a command, once the broker has accepted it: the event loop polled
/// on its own task (never cancelled), reconnecting, what the broker sends forwarded.
pub(super) async fn connect(broker: &BrokerArgs, id: &str) -> Result<(AsyncClient, mpsc::Receiver<Packet>), String> {
    let (mqtt, host, port) = broker.mqtt()?;
    let options = crate::mqtt::session_options(&mqtt, &host, port, format!("{id}-{}", std::process::id()))
        .map_err(|e| e.to_string())?;
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let user = broker.login.username.as_deref().map(|u| format!(" as {u}")).unwrap_or_default();
    let ack = crate::mqtt::first_connack(&mut eventloop, Duration::from_secs(10))
        .await
        .map_err(|e| format!("cannot connect to {}{user}: {e}", broker.broker))?;
    if !crate::mqtt::keeps_retained(&ack) {
        return Err(format!(
            "the broker at {} keeps no retained messages, which push and fleet need: an offer and its chunks \
             wait there for each device, and each node's status waits there to be read",
            broker.broker
        ));
    }
    let rx = crate::mqtt::spawn_polling("broker session", eventloop, LoginFiles::new(&mqtt), Outages::Warn);
    Ok((client, rx))
}

/// `lathe keygen -o OUT`: OUT.key and OUT.pub, or `lathe.key` and `lathe.pub` in OUT when it
/// is a directory.
pub fn keygen(out: &std::path::Path) -> Result<(), String> {
    let key = signing::generate()?;
    let prefix = if out.is_dir() { out.join("lathe") } else { out.to_path_buf() };
    let out = prefix.as_path();
    signing::write_keypair(out, &key)?;
    println!(
        "wrote {} (secret, keep it on the central server) and {} (key id {}): list it in the devices' update.trusted_keys, or as an --update-key of a root (`lathe root create`)",
        out.with_extension("key").display(),
        out.with_extension("pub").display(),
        signing::key_id(&key.verifying_key())
    );
    Ok(())
}

pub fn push(a: PushArgs) -> Result<(), String> {
    if a.nodes.is_empty() && a.group.is_none() {
        return Err("name --node NODE (repeatable) or --group GROUP".into());
    }
    let key = signing::read_signing_key(&a.key)?;
    let bundle = Bundle::read(&a.bundle).map_err(|e| format!("{}: {e}", a.bundle.display()))?;
    let expires = crate::config::parse_duration(&a.expires).ok_or("--expires: expected e.g. 30m, 24h, 7d")?;
    let now = crate::telemetry::unix_ms() / 1000;
    let opts = PushOptions {
        expires_unix: now + expires.as_secs(),
        compatible: a.compatible.clone(),
        min_daemon_version: a.min_daemon_version.clone(),
        chunk_bytes: a.chunk_kb.max(1) << 10,
        targets: Vec::new(), // signed below, for the topics it goes to
    };
    let prepared = prepare(bundle, &key, &opts)?;
    let o = &prepared.offer;
    let rt = super::runtime()?;
    rt.block_on(async {
        let (client, mut events) = connect(&a.broker, "lathe-push").await?;
        // The bytes first, retained, so a device that takes the offer finds them.
        let mut messages: Vec<(String, Vec<u8>)> = prepared.chunks.clone();
        let mut offer_topics: Vec<String> = a.nodes.iter().map(|n| format!("lathe/{n}/update")).collect();
        let mut staged = None;
        if let Some(g) = &a.group {
            if a.canary > 0 {
                let canaries = group_nodes(&a.broker, g).await?.into_iter().take(a.canary).collect::<Vec<_>>();
                if canaries.is_empty() {
                    return Err(format!("no node of group {g} reports a status; nothing to canary"));
                }
                offer_topics.extend(canaries.iter().map(|n| format!("lathe/{n}/update")));
                // Listening before the offer goes out: a quick refusal is not missed.
                let watcher = connect(&a.broker, "lathe-rollout").await?;
                for n in &canaries {
                    let events = format!("lathe/{n}/events");
                    watcher.0.subscribe(events, QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
                }
                staged = Some((g.clone(), canaries, watcher));
            } else {
                offer_topics.push(format!("lathe/fleet/{g}/update"));
            }
        }
        // One signed offer for the topics it goes to now; the group, after its canaries, gets
        // its own (an offer is refused on a topic it was not signed for).
        let signed_for = |targets: Vec<String>| signing::sign_offer(&signing::Offer { targets, ..o.clone() }, &key);
        let message = signed_for(offer_topics.clone())?;
        messages.extend(offer_topics.iter().map(|t| (t.clone(), message.clone())));
        publish_all(&client, &mut events, messages).await?;
        println!(
            "offered {} v{} ({} bytes, {} chunks, sha256 {}) on {}",
            o.name,
            o.version,
            o.length,
            o.chunks,
            o.sha256,
            offer_topics.join(", ")
        );
        if let Some((group, canaries, watcher)) = staged {
            let wait = crate::config::parse_duration(&a.canary_wait).ok_or("--canary-wait: expected e.g. 10m")?;
            let (ok, failed) = watch_canaries(watcher, &canaries, &o.name, o.version, wait).await;
            let share = failed.len() as f64 / canaries.len() as f64;
            println!("canaries: {} took v{} ({}), {} failed ({})", ok.len(), o.version, ok.join(", "), failed.len(), failed.join("; "));
            if share > a.max_failure_share {
                let _ = client.disconnect().await;
                return Err(format!(
                    "rollout stopped: {:.0} % of the canaries failed (more than --max-failure-share {:.0} %); group {group} not offered",
                    share * 100.0,
                    a.max_failure_share * 100.0
                ));
            }
            let topic = format!("lathe/fleet/{group}/update");
            let message = signed_for(vec![topic.clone()])?;
            publish_all(&client, &mut events, vec![(topic, message)]).await?;
            println!("offered to group {group}");
        }
        let _ = client.disconnect().await;
        Ok(())
    })
}

/// Publishes every message retained at QoS 1 and waits for the broker to acknowledge them all.
pub(super) async fn publish_all(
    client: &AsyncClient,
    events: &mut mpsc::Receiver<Packet>,
    messages: Vec<(String, Vec<u8>)>,
) -> Result<(), String> {
    let n = messages.len();
    for (topic, bytes) in messages {
        client.publish(topic, QoS::AtLeastOnce, true, bytes).await.map_err(|e| e.to_string())?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Packet::PubAck(_))) => acked += 1,
            Ok(Some(_)) => {}
            _ => return Err(format!("the broker acknowledged {acked} of {n} messages")),
        }
    }
    Ok(())
}

/// Every retained status (`lathe/+/status`) the broker holds, by node.
async fn statuses(broker: &BrokerArgs) -> Result<BTreeMap<String, Value>, String> {
    let (client, mut events) = connect(broker, "lathe-fleet").await?;
    client.subscribe("lathe/+/status", QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    // Retained messages arrive right after the subscription; a quiet second means all are in.
    let mut quiet_until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(e)) = tokio::time::timeout_at(quiet_until, events.recv()).await {
        if let Packet::Publish(p) = e {
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            if let (Some(node), Ok(v)) = (topic.split('/').nth(1), serde_json::from_slice::<Value>(&p.payload)) {
                out.insert(node.to_string(), v);
            }
            quiet_until = tokio::time::Instant::now() + Duration::from_secs(1);
        }
    }
    let _ = client.disconnect().await;
    Ok(out)
}

async fn group_nodes(broker: &BrokerArgs, group: &str) -> Result<Vec<String>, String> {
    Ok(statuses(broker)
        .await?
        .into_iter()
        .filter(|(_, s)| s["groups"].as_array().is_some_and(|g| g.iter().any(|x| x == group)))
        .map(|(n, _)| n)
        .collect())
}

/// Each canary either passes its trial of `name` v`version` (`trial.passed`) or reports the
/// update or its trial failing (its events). Returns (passed, failed with why); silence past
/// `wait` fails. Serving the version is not enough: a canary that took it and then failed its
/// trial was counted a success before the trial could say so.
async fn watch_canaries(
    (client, mut events): (AsyncClient, mpsc::Receiver<Packet>),
    canaries: &[String],
    name: &str,
    version: u64,
    wait: Duration,
) -> (Vec<String>, Vec<String>) {
    let (mut ok, mut failed): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + wait;
    let decided = |n: &String, ok: &Vec<String>, failed: &Vec<String>| {
        ok.contains(n) || failed.iter().any(|f| f.starts_with(&format!("{n}:")))
    };
    while canaries.iter().any(|n| !decided(n, &ok, &failed)) && Instant::now() < deadline {
        let Ok(Some(Packet::Publish(p))) = tokio::time::timeout(Duration::from_millis(500), events.recv()).await else {
            continue;
        };
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let Some(node) = topic.split('/').nth(1).map(String::from) else { continue };
        let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else { continue };
        if decided(&node, &ok, &failed) {
            continue;
        }
        if v["event"] == "trial.passed" && v["name"] == name && v["version"] == version {
            ok.push(node);
        } else if matches!(v["event"].as_str(), Some("update.failed" | "update.refused" | "trial.failed"))
            && v["name"].as_str().is_none_or(|n| n == name)
        {
            failed.push(format!("{node}: {}", v["message"].as_str().unwrap_or("failed")));
        }
    }
    for n in canaries.iter().filter(|n| !decided(n, &ok, &failed)).cloned().collect::<Vec<_>>() {
        failed.push(format!("{n}: no answer within {} s", wait.as_secs()));
    }
    let _ = client.disconnect().await;
    (ok, failed)
}

/// `lathe fleet`: every node's retained status as a table (or JSON).
pub fn fleet(broker: &BrokerArgs, json: bool) -> Result<(), String> {
    let all = super::runtime()?.block_on(statuses(broker))?;
    if json {
        println!("{}", serde_json::to_string(&all).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!(
        "{:<20} {:<8} {:<16} {:<20} {:>7}  {:<10} {:<8} drift",
        "node", "state", "pipeline", "model", "version", "origin", "backend"
    );
    for (node, s) in &all {
        let state = s["state"].as_str().unwrap_or("?");
        let pipelines = s["pipelines"].as_array().cloned().unwrap_or_default();
        if pipelines.is_empty() {
            println!("{node:<20} {state:<8}");
        }
        for p in pipelines {
            let alarms: Vec<String> = p["drift"]["alarms"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
                .unwrap_or_default();
            println!(
                "{node:<20} {state:<8} {:<16} {:<20} {:>7}  {:<10} {:<8} {}",
                p["name"].as_str().unwrap_or("?"),
                p["model"].as_str().unwrap_or("?"),
                p["version"],
                p["origin"].as_str().unwrap_or("?"),
                p["backend"].as_str().unwrap_or("?"),
                if alarms.is_empty() { "ok".to_string() } else { alarms.join(",") }
            );
        }
    }
    Ok(())
}
