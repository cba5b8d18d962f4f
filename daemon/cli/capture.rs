//! `lathe capture --broker … -o DIR`: the central side of hard-example capture. Collects what
//! every node publishes on `lathe/+/capture/+` into `DIR/{pipeline}.csv`, one row per hard
//! example: node, device, key, ts, model, version, why, hardness, the inputs by name, the
//! outputs, and an empty `label` column for the labelling tool. A label goes back to the
//! plant on the pipeline's `labels.topic` with the row's key, and joins the stored row there.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;

use super::fleet::{connect, BrokerArgs};
use crate::model::csv::push_cell;

#[derive(Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The directory the CSV files go in (made if missing; existing files are appended to).
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    seconds: Option<u64>,
}

/// One CSV per pipeline, its columns fixed by the first example it got.
struct Sheet {
    file: std::fs::File,
    inputs: Vec<String>,
    outputs: usize,
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn open(dir: &Path, pipeline: &str, example: &Value) -> Result<Sheet, String> {
    let safe: String =
        pipeline.chars().map(|c| if c.is_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let path = dir.join(format!("{safe}.csv"));
    let inputs: Vec<String> = example["inputs"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    let outputs = example["output"].as_array().map_or(0, Vec::len);
    let fresh = !path.exists();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if fresh {
        let mut header: Vec<String> = ["node", "device", "key", "ts", "model", "version", "why", "hardness"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        header.extend(inputs.iter().cloned());
        header.extend((0..outputs).map(|i| format!("output_{i}")));
        header.push("label".into());
        let mut line = String::new();
        for (i, h) in header.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            push_cell(&mut line, h, ',');
        }
        writeln!(file, "{line}").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Sheet { file, inputs, outputs })
}

fn row(sheet: &Sheet, node: &str, e: &Value) -> String {
    let mut cells: Vec<String> = vec![node.to_string()];
    cells.extend(["device", "key", "ts", "model", "version", "why", "hardness"].iter().map(|k| cell(&e[*k])));
    cells.extend(sheet.inputs.iter().map(|name| cell(&e["inputs"][name])));
    cells.extend((0..sheet.outputs).map(|i| cell(&e["output"][i])));
    cells.push(String::new());
    let mut line = String::new();
    for (i, c) in cells.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        push_cell(&mut line, c, ',');
    }
    line
}

pub fn run(a: CaptureArgs) -> Result<(), String> {
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let rt = super::runtime()?;
    rt.block_on(async {
        let (client, mut events) = connect(&a.broker, "lathe-capture").await?;
        client.subscribe("lathe/+/capture/+", QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
        let deadline = a.seconds.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
        let mut sheets: BTreeMap<String, Sheet> = BTreeMap::new();
        let mut collected = 0u64;
        loop {
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, events.recv()).await {
                    Ok(e) => e,
                    Err(_) => break,
                },
                None => tokio::select! {
                    e = events.recv() => e,
                    _ = tokio::signal::ctrl_c() => break,
                },
            };
            let Some(Packet::Publish(p)) = next else {
                if next.is_none() {
                    break;
                }
                continue;
            };
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            let parts: Vec<&str> = topic.split('/').collect();
            let (Some(node), Some(pipeline)) = (parts.get(1), parts.get(3)) else { continue };
            let Ok(example) = serde_json::from_slice::<Value>(&p.payload) else {
                eprintln!("lathe: {topic}: not a JSON hard example; skipped");
                continue;
            };
            if !sheets.contains_key(*pipeline) {
                sheets.insert(pipeline.to_string(), open(&a.out, pipeline, &example)?);
            }
            let Some(sheet) = sheets.get_mut(*pipeline) else { continue };
            let line = row(sheet, node, &example);
            writeln!(sheet.file, "{line}").map_err(|e| e.to_string())?;
            sheet.file.flush().map_err(|e| e.to_string())?;
            collected += 1;
        }
        let _ = client.disconnect().await;
        println!("collected {collected} hard example(s) into {} ({} pipeline(s))", a.out.display(), sheets.len());
        Ok(())
    })
}
