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

use ed25519_dalek::VerifyingKey;

use super::fleet::{connect, BrokerArgs, BrokerLogin};
use crate::model::Bundle;
use crate::trust::signing::{read_public_key, verify_bundle};

#[derive(Args)]
pub struct AggregateArgs {
    /// The bundle every device fine-tuned from.
    #[arg(long)]
    parent: PathBuf,
    /// A device's fine-tuned bundle (repeat); or collect them with --broker.
    #[arg(long = "child", required_unless_present = "broker")]
    children: Vec<PathBuf>,
    /// Collect what devices share on lathe/+/share/+ from this broker (mqtt://HOST:PORT or mqtts://).
    #[arg(long)]
    broker: Option<String>,
    #[command(flatten)]
    login: BrokerLogin,
    /// --broker: how long the round collects.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// --broker: no aggregate from fewer devices than this.
    #[arg(long, default_value_t = 2)]
    min_devices: usize,
    /// Only fine-tunes signed by these device keys count (repeat; a `.pub` file, or a folder
    /// of them: each device's `update.device_key` with `.pub`). Without it signatures are not
    /// checked, and the report says so.
    #[arg(long = "device-keys")]
    device_keys: Vec<PathBuf>,
    #[arg(short = 'o', long)]
    output: PathBuf,
}

/// The device public keys named by `--device-keys`: files, or every `*.pub` in a folder.
fn device_keys(paths: &[PathBuf]) -> Result<Vec<VerifyingKey>, String> {
    let mut keys = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "pub"))
                .collect();
            files.sort();
            for f in files {
                keys.push(read_public_key(&f)?);
            }
        } else {
            keys.push(read_public_key(path)?);
        }
    }
    if !paths.is_empty() && keys.is_empty() {
        return Err("--device-keys names no .pub file".to_string());
    }
    Ok(keys)
}

/// Whether `b` may join the round: signed by a listed device key (when keys are listed).
fn vouched(b: &Bundle, keys: &[VerifyingKey]) -> Result<(), String> {
    if keys.is_empty() {
        return Ok(());
    }
    verify_bundle(b, keys).map(|_| ())
}

/// The newest shared fine-tune of `parent` from each node, collected for `seconds`.
/// A fine-tune not signed by one of `keys` (when any are listed) is skipped.
fn collect(args: &BrokerArgs, parent: &Bundle, keys: &[VerifyingKey], seconds: u64) -> Result<Vec<Bundle>, String> {
    let rt = super::runtime()?;
    rt.block_on(async {
        let (client, mut events) = connect(args, "lathe-aggregate").await?;
        client.subscribe("lathe/+/share/+", QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut by_node: BTreeMap<String, Bundle> = BTreeMap::new();
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
            let Packet::Publish(p) = event else { continue };
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            let node = topic.split('/').nth(1).unwrap_or_default().to_string();
            match Bundle::from_bytes(&p.payload) {
                Ok(b) if b.manifest.parent == parent.sha256() => {
                    if let Err(e) = vouched(&b, keys) {
                        eprintln!("lathe: {node}: {}-{}: {e}; skipped", b.manifest.name, b.manifest.version);
                    } else if by_node.get(&node).is_none_or(|old| old.manifest.version < b.manifest.version) {
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
    let keys = device_keys(&a.device_keys)?;
    if keys.is_empty() {
        eprintln!("lathe: no --device-keys: the devices' signatures are not checked");
    }
    let mut children = Vec::new();
    for path in &a.children {
        let child = read(path)?;
        vouched(&child, &keys).map_err(|e| format!("{}: {e}", path.display()))?;
        children.push(child);
    }
    if let Some(broker) = &a.broker {
        let args = BrokerArgs { broker: broker.clone(), login: a.login.clone() };
        children.extend(collect(&args, &parent, &keys, a.seconds)?);
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
    crate::fs::write_atomic(&a.output, &bytes).map_err(|e| format!("{}: {e}", a.output.display()))
}
