//! lathe as a Sparkplug B edge node (`[sparkplug] group, edge_node`), so SCADA and historian
//! tools that read Sparkplug see predictions and model versions without new integration.
//!
//! - Its own MQTT session (client id `{client_id}-sparkplug`), because the NDEATH must be that
//!   session's last will, and the main session's will is the retained status.
//! - `NBIRTH` (seq 0): `bdSeq`, `Node Control/Rebirth`, and per pipeline `{pipeline}/Model`,
//!   `{pipeline}/Version`, `{pipeline}/SHA256`. A swap is reported as `NDATA` of those.
//! - Each device lathe predicts for is born (`DBIRTH`) with its metrics the first time, and
//!   again when a new metric appears (another pipeline); each prediction is `DDATA`:
//!   `{pipeline}/Output/{i}` (Float), `{pipeline}/Class` (Int64, classifiers),
//!   `{pipeline}/ClassName` (String, classifiers trained on class names),
//!   `{pipeline}/Version` (UInt64). Sparkplug ids cannot hold `/`: it becomes `.`.
//! - `bdSeq` counts sessions across restarts (`state_dir/sparkplug-bdseq`); an `NCMD`
//!   `Node Control/Rebirth`, and every new session, make lathe publish its NBIRTH and then a
//!   DBIRTH for every device it has predicted for, with their last values.
//! - BIRTH and DATA go at QoS 0 and the NDEATH will at QoS 1, as the spec says.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc;

use super::config::SparkplugOutputConfig;
use super::proto::{datatype, Metric, Payload, Value};
use super::{BD_SEQ, REBIRTH};
use crate::mqtt::{spawn_polling, Broker, Outages};

/// What a pipeline serves now, as the NBIRTH and NDATA name it.
pub struct Serving {
    pub name: String,
    pub version: u64,
    pub sha256: String,
}

/// Per pipeline: a look at the model it serves right now (the service hands in its
/// swappable model, so a promotion shows in the next NDATA).
pub type ServingNow = std::sync::Arc<dyn Fn() -> Serving + Send + Sync>;

/// Predictions waiting for the Sparkplug session; past this they are dropped (and counted):
/// the JSON predictions are the contract, this is a view of them.
const QUEUE: usize = 4096;

/// One served prediction, as the pipeline hands it over.
pub struct Report {
    pub pipeline: Arc<str>,
    pub device: Arc<str>,
    pub version: u64,
    pub output: Vec<f32>,
    pub class: Option<usize>,
    pub class_name: Option<String>,
}

/// Cheap handle for the pipelines: never waits.
#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<Report>,
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Output {
    pub fn report(&self, report: Report) {
        if self.tx.try_send(report).is_err() {
            self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The pipelines' handle, and the receiver [`start`] takes.
pub fn channel() -> (Output, mpsc::Receiver<Report>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (Output { tx, dropped: Arc::default() }, rx)
}

/// Starts the edge node's session; it ends (with an NDEATH) once every pipeline has finished
/// (the last `Output` is dropped), so the final predictions go out too.
///
/// # Errors
/// Unreadable credentials or TLS files, as for the main session.
pub fn start(
    broker: Broker,
    state_dir: &std::path::Path,
    settings: &SparkplugOutputConfig,
    models: Vec<(String, ServingNow)>,
    rx: mpsc::Receiver<Report>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let bd_seq_file = state_dir.join("sparkplug-bdseq");
    let bd_seq = std::fs::read_to_string(&bd_seq_file)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |b| (b + 1) % 256);
    let _ = crate::fs::write_atomic(&bd_seq_file, bd_seq.to_string().as_bytes());
    let mut options = broker.side_session("sparkplug").map_err(|e| e.to_string())?;
    let node = Node { group: settings.group.clone(), edge_node: settings.edge_node.clone(), bd_seq, seq: 0 };
    let death = node.death();
    options.set_last_will(LastWill::new(node.topic("NDEATH", None), death, QoS::AtLeastOnce, false, None));
    let (client, eventloop) = AsyncClient::new(options, 1024);
    let session = spawn_polling("Sparkplug session", eventloop, broker.login(), Outages::Warn);
    Ok(tokio::spawn(run(node, client, session, models, rx)))
}

struct Node {
    group: String,
    edge_node: String,
    bd_seq: u64,
    /// The next message's `seq` (0–255, NBIRTH resets it).
    seq: u64,
}

impl Node {
    fn topic(&self, kind: &str, device: Option<&str>) -> String {
        match device {
            Some(d) => format!("spBv1.0/{}/{kind}/{}/{d}", self.group, self.edge_node),
            None => format!("spBv1.0/{}/{kind}/{}", self.group, self.edge_node),
        }
    }

    fn death(&self) -> Vec<u8> {
        let now = crate::telemetry::unix_ms();
        let bd = Metric::new(BD_SEQ, datatype::INT64, Value::Long(self.bd_seq), now);
        Payload { timestamp: Some(now), metrics: vec![bd], seq: None, uuid: None, body: None }.encode_to_vec()
    }

    /// A sequenced payload: `seq` goes 0–255 over every message after (and with) the NBIRTH.
    fn payload(&mut self, metrics: Vec<Metric>) -> Vec<u8> {
        let seq = self.seq;
        self.seq = (self.seq + 1) % 256;
        Payload { timestamp: Some(crate::telemetry::unix_ms()), metrics, seq: Some(seq), uuid: None, body: None }
            .encode_to_vec()
    }
}

/// Per pipeline, what the NBIRTH and NDATA say about its model.
fn model_metrics(models: &[(String, ServingNow)], now: u64) -> Vec<Metric> {
    let mut metrics = Vec::new();
    for (pipeline, model) in models {
        let m = model();
        metrics.push(Metric::new(&format!("{pipeline}/Model"), datatype::STRING, Value::String(m.name.clone()), now));
        metrics.push(Metric::new(&format!("{pipeline}/Version"), datatype::UINT64, Value::Long(m.version), now));
        metrics.push(Metric::new(
            &format!("{pipeline}/SHA256"),
            datatype::STRING,
            Value::String(m.sha256.clone()),
            now,
        ));
    }
    metrics
}

/// A device's metrics from one report.
fn device_metrics(r: &Report, now: u64) -> Vec<Metric> {
    let mut metrics: Vec<Metric> = r
        .output
        .iter()
        .enumerate()
        .map(|(i, v)| Metric::new(&format!("{}/Output/{i}", r.pipeline), datatype::FLOAT, Value::Float(*v), now))
        .collect();
    if let Some(c) = r.class {
        metrics.push(Metric::new(&format!("{}/Class", r.pipeline), datatype::INT64, Value::Long(c as u64), now));
    }
    if let Some(name) = &r.class_name {
        let metric = format!("{}/ClassName", r.pipeline);
        metrics.push(Metric::new(&metric, datatype::STRING, Value::String(name.clone()), now));
    }
    metrics.push(Metric::new(&format!("{}/Version", r.pipeline), datatype::UINT64, Value::Long(r.version), now));
    metrics
}

/// Whether `packet` is an NCMD on `ncmd` asking for a rebirth.
fn asks_rebirth(packet: &Packet, ncmd: &str) -> bool {
    let Packet::Publish(p) = packet else { return false };
    p.topic.as_ref() == ncmd.as_bytes()
        && Payload::decode(p.payload.as_ref()).is_ok_and(|pl| {
            pl.metrics.iter().any(|m| m.name.as_deref() == Some(REBIRTH) && m.value == Some(Value::Boolean(true)))
        })
}

async fn run(
    mut node: Node,
    client: AsyncClient,
    mut session: mpsc::Receiver<Packet>,
    models: Vec<(String, ServingNow)>,
    mut rx: mpsc::Receiver<Report>,
) {
    let ncmd = node.topic("NCMD", None);
    // Per device: the metrics its last DBIRTH named, with their last values.
    let mut devices: HashMap<String, BTreeMap<String, Metric>> = HashMap::new();
    let mut born = false;
    let mut versions: Vec<u64> = models.iter().map(|(_, m)| m().version).collect();
    let mut check_models = tokio::time::interval(Duration::from_millis(500));
    let publish = |topic: String, payload: Vec<u8>, qos: QoS| {
        // A full request queue drops the message: Sparkplug data is QoS 0 anyway.
        let _ = client.try_publish(topic, qos, false, payload);
    };
    loop {
        tokio::select! {
            packet = session.recv() => match packet {
                Some(packet) if matches!(packet, Packet::ConnAck(_)) || asks_rebirth(&packet, &ncmd) => {
                    if matches!(packet, Packet::ConnAck(_)) {
                        let _ = client.try_subscribe(ncmd.clone(), QoS::AtLeastOnce);
                    }
                    // The NBIRTH, then every device lathe has predicted for, born again with
                    // its metrics' last values: a host that asked for a rebirth (or lost the
                    // session) must not wait for each device's next prediction to know it.
                    born = birth(&mut node, &models, &publish);
                    for (device, metrics) in &devices {
                        let payload = node.payload(metrics.values().cloned().collect());
                        publish(node.topic("DBIRTH", Some(device)), payload, QoS::AtMostOnce);
                    }
                }
                Some(_) => {}
                None => break,
            },
            report = rx.recv() => {
                let Some(report) = report else { break };
                if !born {
                    continue;
                }
                let now = crate::telemetry::unix_ms();
                let device = report.device.replace('/', ".");
                let metrics = device_metrics(&report, now);
                let known = devices.entry(device.clone()).or_default();
                let new_metric = metrics.iter().any(|m| !known.contains_key(m.name.as_deref().unwrap_or_default()));
                for m in &metrics {
                    known.insert(m.name.clone().unwrap_or_default(), m.clone());
                }
                // A device is born with every metric it will report; a new one means a new birth.
                let (kind, metrics) = match new_metric {
                    true => ("DBIRTH", known.values().cloned().collect()),
                    false => ("DDATA", metrics),
                };
                let payload = node.payload(metrics);
                publish(node.topic(kind, Some(&device)), payload, QoS::AtMostOnce);
            }
            _ = check_models.tick() => {
                let now_versions: Vec<u64> = models.iter().map(|(_, m)| m().version).collect();
                if born && now_versions != versions {
                    let payload = node.payload(model_metrics(&models, crate::telemetry::unix_ms()));
                    publish(node.topic("NDATA", None), payload, QoS::AtMostOnce);
                }
                versions = now_versions;
            }
        }
    }
    // A clean stop says so itself rather than leaving it to the broker's will.
    publish(node.topic("NDEATH", None), node.death(), QoS::AtLeastOnce);
    let _ = client.try_disconnect();
    // The session's task ends once the DISCONNECT is out, closing the channel.
    let _ = tokio::time::timeout(Duration::from_secs(2), async { while session.recv().await.is_some() {} }).await;
}

/// The NBIRTH: seq 0, bdSeq, the rebirth control, every pipeline's model.
fn birth(node: &mut Node, models: &[(String, ServingNow)], publish: &impl Fn(String, Vec<u8>, QoS)) -> bool {
    let now = crate::telemetry::unix_ms();
    node.seq = 0;
    let mut metrics = vec![
        Metric::new(BD_SEQ, datatype::INT64, Value::Long(node.bd_seq), now),
        Metric::new(REBIRTH, datatype::BOOLEAN, Value::Boolean(false), now),
    ];
    metrics.extend(model_metrics(models, now));
    let payload = node.payload(metrics);
    publish(node.topic("NBIRTH", None), payload, QoS::AtMostOnce);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classifier trained on class names reports the name beside the index; one whose
    /// classes are numbers reports the index alone.
    #[test]
    fn a_named_class_is_a_string_metric_beside_the_index() {
        let report = |class_name: Option<&str>| Report {
            pipeline: "p".into(),
            device: "d".into(),
            version: 3,
            output: vec![0.2, 0.8],
            class: Some(1),
            class_name: class_name.map(str::to_string),
        };
        let names = |metrics: &[Metric]| -> Vec<String> { metrics.iter().filter_map(|m| m.name.clone()).collect() };
        let named = device_metrics(&report(Some("ok")), 7);
        assert_eq!(names(&named), ["p/Output/0", "p/Output/1", "p/Class", "p/ClassName", "p/Version"]);
        let class_name = named.iter().find(|m| m.name.as_deref() == Some("p/ClassName")).unwrap();
        assert_eq!(
            (class_name.datatype, &class_name.value),
            (Some(datatype::STRING), &Some(Value::String("ok".into())))
        );
        assert_eq!(names(&device_metrics(&report(None), 7)), ["p/Output/0", "p/Output/1", "p/Class", "p/Version"]);
    }
}
