//! `lathe aggregate`: federated averaging on the central side (`train::federated`). The
//! devices' fine-tunes of one parent come as files (`--child`) or from the broker, where each
//! device with `[pipeline.train] share = true` keeps its newest accepted one retained on
//! `lathe/{node}/share/{pipeline}`. The aggregate is written only if the gate accepts it;
//! it reaches the fleet with `lathe push`, canaries first, like any bundle.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;

use super::fleet::{connect, BrokerArgs};
use crate::model::Bundle;

#[derive(Args)]
pub struct AggregateArgs {
    /// The bundle every device fine-tuned from.
    #[arg(long)]
    parent: PathBuf,
    /// A device's fine-tuned bundle (repeat); or collect them with --broker.
    #[arg(long = "child", required_unless_present = "broker")]
    children: Vec<PathBuf>,
    /// Collect what devices share on lathe/+/share/+ from this broker (mqtt://HOST:PORT).
    #[arg(long)]
    broker: Option<String>,
    /// --broker: how long the round collects.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// --broker: no aggregate from fewer devices than this.
    #[arg(long, default_value_t = 2)]
    min_devices: usize,
    #[arg(short = 'o', long)]
    output: PathBuf,
}

/// The newest shared fine-tune of `parent` from each node, collected for `seconds`.
fn collect(broker: &str, parent: &Bundle, seconds: u64) -> Result<Vec<Bundle>, String> {
    let args = BrokerArgs {
        broker: broker.to_string(),
        username: None,
        password_file: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
    };
    let rt = super::runtime()?;
    rt.block_on(async {
        let (client, mut events) = connect(&args, "lathe-aggregate").await?;
        client.subscribe("lathe/+/share/+", QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut by_node: BTreeMap<String, Bundle> = BTreeMap::new();
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
            let Event::Incoming(Packet::Publish(p)) = event else { continue };
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            let node = topic.split('/').nth(1).unwrap_or_default().to_string();
            match Bundle::from_bytes(&p.payload) {
                Ok(b) if b.manifest.parent == parent.sha256() => {
                    if by_node.get(&node).is_none_or(|old| old.manifest.version < b.manifest.version) {
                        by_node.insert(node, b);
                    }
                }
                Ok(b) => eprintln!(
                    "lathe: {node}: {}-{} is not a fine-tune of this parent; skipped",
                    b.manifest.name, b.manifest.version
                ),
                Err(e) => eprintln!("lathe: {topic}: not a bundle ({e}); skipped"),
            }
        }
        let _ = client.disconnect().await;
        eprintln!(
            "lathe: collected fine-tunes from {} node(s): {}",
            by_node.len(),
            by_node.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        Ok(by_node.into_values().collect())
    })
}

pub fn run(a: AggregateArgs) -> Result<(), String> {
    let read = |p: &PathBuf| Bundle::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let parent = read(&a.parent)?;
    let mut children = a.children.iter().map(read).collect::<Result<Vec<_>, _>>()?;
    if let Some(broker) = &a.broker {
        children.extend(collect(broker, &parent, a.seconds)?);
    }
    if children.len() < a.min_devices {
        return Err(format!(
            "{} device(s) shared a fine-tune of this parent; --min-devices is {}",
            children.len(),
            a.min_devices
        ));
    }
    let (aggregate, report) = crate::train::federated::aggregate(&parent, &children)?;
    println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    let b = aggregate.ok_or_else(|| format!("no aggregate: {}", report.reason))?;
    let bytes = b.to_bytes().map_err(|e| e.to_string())?;
    crate::model::registry::write_atomic(&a.output, &bytes).map_err(|e| format!("{}: {e}", a.output.display()))
}
