//! `lathe demo`: the product on one machine with nothing installed. An embedded broker, the
//! sample Shuttle bundle (built into the binary), real NASA Shuttle sensor rows replayed from
//! several devices with a few faulty messages mixed in, their labels arriving late, and a live
//! one-screen summary. A third of the way in, sensor f1 starts reading 20 high; the whole loop
//! follows on its own: drift alarm, fine-tune, gate, promotion, trial, and a summary table of
//! accuracy before and after.

use std::io::{IsTerminal, Read, Write};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;

use crate::config::Config;
use crate::ingest::{embedded_broker, Reject};
use crate::service::{self, Handle};

const BUNDLE: &[u8] = include_bytes!("../../models/shuttle-mlp-1.lathe");
const SHUTTLE_CSV_GZ: &[u8] = include_bytes!("../../models/data/shuttle.csv.gz");
/// One message in this many is a deliberately broken one (a faulty sensor or gateway).
const FAULT_EVERY: u64 = 400;
/// A row's label is published this many messages after the row …
const LABEL_DELAY: u64 = 200;
/// … for one row in this many (an inspection station checks a sample of parts).
const LABEL_EVERY: u64 = 4;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// How long to replay, in seconds (0: until Ctrl-C).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Telemetry messages per second, all devices together.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Keep the run's files (config, sample store, model registry, run records) in this
    /// directory instead of removing them at the end.
    #[arg(long)]
    keep: Option<std::path::PathBuf>,
}

/// What the watching client has seen.
#[derive(Default)]
struct Seen {
    predictions: u64,
    flagged: u64,
    agree_with_label: u64,
    latencies_us: Vec<u64>,
    last_events: Vec<String>,
    /// Drift alarms, kept apart so rejections do not push them off the screen.
    drift: Vec<String>,
    /// The version the last prediction named.
    version: u64,
    /// The training loop's steps, in order.
    steps: Vec<String>,
    /// Per phase (before the fault; fault, served by v1; fault, served by v2 …): predictions
    /// and how many agreed with the label.
    phases: std::collections::BTreeMap<String, (u64, u64)>,
}

pub fn run(args: DemoArgs) -> Result<(), String> {
    let rows = shuttle_rows()?;
    let dir = match &args.keep {
        // A store or registry left by an earlier run would change this one.
        Some(dir) if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) => {
            return Err(format!("{}: not empty; --keep needs a new or empty directory", dir.display()))
        }
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("lathe-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let bundle_path = dir.join("shuttle-mlp-1.lathe");
    std::fs::write(&bundle_path, BUNDLE).map_err(|e| format!("{}: {e}", bundle_path.display()))?;
    let listen = embedded_broker::free_loopback()?;
    let config_text = format!(
        r#"node = "demo"
state_dir = "{state}"
[mqtt]
url = "embedded"
embedded_listen = "{listen}"
[[pipeline]]
name = "shuttle"
model = "{bundle}"
source = {{ topic = "plant/demo/+/telemetry", key = "/seq", timestamp = "/ts" }}
sink = {{ topic = "plant/demo/{{device}}/prediction" }}
labels = {{ topic = "plant/demo/+/label", key = "/seq", value = "/anomaly", horizon_s = 600 }}
[pipeline.train]
trigger = ["drift"]
min_rows = 1000
rows = 1000
trial = "15s"
min_live_labels = 200
# The fault is a replaced sensor that stays: the old regime matters less than usual.
max_forgetting = 0.05
"#,
        state = dir.join("state").display(),
        bundle = bundle_path.display(),
    );
    let config = Config::parse(&config_text, &dir.join("lathe.toml")).map_err(|e| e.to_string())?;
    println!(
        "lathe demo: {} devices replaying NASA Shuttle rows at {} msg/s; config:\n\n{config_text}",
        args.devices, args.rate
    );
    let rt = super::runtime()?;
    let keep = args.keep.is_some();
    let result = rt.block_on(demo(config, listen, rows, args));
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// The Shuttle rows: nine features and the anomaly label.
fn shuttle_rows() -> Result<Vec<(Vec<f64>, u8)>, String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(SHUTTLE_CSV_GZ).read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let v: Vec<f64> = l.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            (v.len() == 10).then(|| (v[..9].to_vec(), v[9] as u8))
        })
        .collect())
}

/// Message `seq`: a real row, or now and then a broken one. `drifted`: sensor f1 reads 20
/// units high from then on (a miscalibrated replacement): the drift monitor names it and the
/// model's accuracy falls until the loop fine-tunes it.
fn telemetry(seq: u64, row: &[f64], drifted: bool) -> Vec<u8> {
    let mut doc = serde_json::Map::new();
    for (i, x) in row.iter().enumerate() {
        let x = if drifted && i == 0 { x + 20.0 } else { *x };
        doc.insert(format!("f{}", i + 1), x.into());
    }
    doc.insert("seq".into(), seq.into());
    doc.insert("ts".into(), crate::telemetry::unix_ms().into());
    if seq % FAULT_EVERY == FAULT_EVERY - 1 {
        match (seq / FAULT_EVERY) % 4 {
            0 => return b"\x00\x13garbled frame".to_vec(),
            1 => doc.insert("f3".into(), 99_999.0.into()), // stuck-high sensor
            2 => doc.remove("f5"),                         // a gateway dropped a field
            _ => doc.insert("f1".into(), "ERR".into()),    // a PLC error string
        };
    }
    Value::Object(doc).to_string().into_bytes()
}

async fn demo(config: Config, listen: String, rows: Vec<(Vec<f64>, u8)>, args: DemoArgs) -> Result<(), String> {
    let (handle_tx, handle_rx) = tokio::sync::oneshot::channel::<Handle>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(service::run(
        config,
        async {
            let _ = stop_rx.await;
        },
        move |h| {
            let _ = handle_tx.send(h);
        },
    ));
    let handle = handle_rx.await.map_err(|_| "the daemon did not start".to_string())?;
    // Telemetry published before lathe has subscribed reaches nobody: wait for it.
    let mut ready = handle.ready.clone();
    if tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r)).await.is_err() {
        return Err("lathe did not connect to the embedded broker within 30 s".into());
    }
    let (host, port) = listen
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or("bad address")?;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let labels: Arc<Vec<u8>> = Arc::new(rows.iter().map(|r| r.1).collect());
    // A third of the way through (or after 10 s when running until Ctrl-C) sensor f1 drifts.
    let drift_after = args.rate * if args.seconds > 0 { args.seconds / 3 } else { 10 };
    let watcher = tokio::spawn(watch(host.clone(), port, seen.clone(), labels, drift_after));
    let sent = Arc::new(AtomicU64::new(0));
    let quiet = Arc::new(AtomicBool::new(false));
    let sensors =
        tokio::spawn(replay(host, port, rows, (args.rate, args.devices, drift_after), sent.clone(), quiet.clone()));

    let started = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let mut last_print = Instant::now();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = &mut ctrl_c => break,
        }
        if args.seconds > 0 && started.elapsed() >= Duration::from_secs(args.seconds) {
            break;
        }
        if tty {
            print!("\x1b[H\x1b[2J{}", screen(&handle, &seen, started));
            let _ = std::io::stdout().flush();
        } else if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!("{}", screen(&handle, &seen, started).lines().nth(2).unwrap_or_default());
        }
    }
    // The sensors stop publishing but keep their client, which still sends what it holds
    // (dropping it would drop its unacknowledged messages). Let those reach lathe and their
    // predictions come back, then stop the daemon the way systemd would: a stop leaves unread
    // telemetry at the broker for the next run, which would read as lost here.
    quiet.store(true, Relaxed);
    let received = |h: &Handle| h.counters.first().map_or(0, |(_, c)| c.received.load(Relaxed));
    let drained = Instant::now();
    while received(&handle) < sent.load(Relaxed) && drained.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(());
    let _ = daemon.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    sensors.abort();
    watcher.abort();
    println!("{}", screen(&handle, &seen, started));
    println!("{}", summary(&seen));
    let (_, c) = handle.counters.first().ok_or("no pipeline")?;
    let accepted = c.received.load(Relaxed) - c.rejected.iter().map(|r| r.load(Relaxed)).sum::<u64>();
    let predicted = c.predicted.load(Relaxed);
    println!(
        "sample store: {} samples kept, {} labels joined to them (acknowledged once stored); {} not stored (queue full), {} failed",
        c.stored.load(Relaxed),
        c.labels_stored.load(Relaxed),
        c.store_dropped.load(Relaxed),
        c.store_failed.load(Relaxed)
    );
    // Counted end to end: a broker that drops messages (one whose buffer overflows while the
    // daemon is behind) shows here, not only in its log.
    let (sent, received) = (sent.load(Relaxed), c.received.load(Relaxed));
    println!(
        "every message sent reached lathe: {} ({received} of {sent}); every accepted message answered: {} ({predicted} of {accepted})",
        if received == sent { "yes" } else { "NO" },
        if predicted == accepted { "yes" } else { "NO" }
    );
    // The promise is that nothing is lost: a run that lost messages is not a success.
    if received != sent || predicted != accepted {
        return Err(format!(
            "messages were lost: {received} of {sent} reached lathe, {predicted} of {accepted} answered"
        ));
    }
    Ok(())
}

/// Publishes telemetry (and, later, labels) at `rate` until `quiet`, then holds its client
/// until aborted; `sent` counts the telemetry published.
async fn replay(
    host: String,
    port: u16,
    rows: Vec<(Vec<f64>, u8)>,
    (rate, devices, drift_after): (u64, usize, u64),
    sent: Arc<AtomicU64>,
    quiet: Arc<AtomicBool>,
) {
    let mut o = MqttOptions::new("lathe-demo-sensors", host, port);
    o.set_network_options(crate::mqtt::no_delay());
    o.set_outgoing_inflight_upper_limit(1000);
    let (client, mut eventloop) = AsyncClient::new(o, 1024);
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut interval = tokio::time::interval(tick);
    let mut seq = 0u64;
    loop {
        interval.tick().await;
        if quiet.load(Relaxed) {
            return std::future::pending().await;
        }
        for _ in 0..per_tick {
            let row = &rows[seq as usize % rows.len()].0;
            let device = seq as usize % devices.max(1);
            let body = telemetry(seq, row, seq >= drift_after);
            if client.publish(format!("plant/demo/dev{device}/telemetry"), QoS::AtLeastOnce, false, body).await.is_err()
            {
                return;
            }
            sent.fetch_add(1, Relaxed);
            // The inspection station's verdict arrives a while later (LABEL_DELAY messages).
            if let Some(late) = seq.checked_sub(LABEL_DELAY).filter(|l| l % LABEL_EVERY == 0) {
                let label = rows[late as usize % rows.len()].1;
                let topic = format!("plant/demo/dev{}/label", late as usize % devices.max(1));
                let body = format!("{{\"seq\":{late},\"anomaly\":{label}}}");
                if client.publish(topic, QoS::AtLeastOnce, false, body).await.is_err() {
                    return;
                }
            }
            seq += 1;
        }
    }
}

async fn watch(host: String, port: u16, seen: Arc<Mutex<Seen>>, labels: Arc<Vec<u8>>, drift_after: u64) {
    let mut o = MqttOptions::new("lathe-demo-watcher", host, port);
    o.set_network_options(crate::mqtt::no_delay());
    let (client, mut eventloop) = AsyncClient::new(o, 1024);
    let _ = client.subscribe("plant/demo/+/prediction", QoS::AtMostOnce).await;
    let _ = client.subscribe("lathe/demo/events", QoS::AtMostOnce).await;
    loop {
        let Ok(ev) = eventloop.poll().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Event::Incoming(Packet::Publish(p)) = ev else {
            continue;
        };
        let Ok(doc) = serde_json::from_slice::<Value>(&p.payload) else {
            continue;
        };
        let Ok(mut s) = seen.lock() else { return };
        if p.topic.ends_with(b"/events") {
            let event = doc["event"].as_str().unwrap_or("?");
            if event == "drift" || event == "drift.cleared" {
                s.drift.push(format!(
                    "{event} on {} of v{}: {} {:.3} (threshold {:.3}) over the last {} rows",
                    doc["series"].as_str().unwrap_or("?"),
                    doc["version"],
                    doc["statistic"].as_str().unwrap_or("?"),
                    doc["value"].as_f64().unwrap_or(f64::NAN),
                    doc["threshold"].as_f64().unwrap_or(f64::NAN),
                    doc["window"]
                ));
                let n = s.drift.len();
                if n > 8 {
                    s.drift.drain(..n - 8);
                }
                continue;
            }
            if let Some(step) = loop_step(event, &doc) {
                s.steps.push(step);
                continue;
            }
            s.last_events.push(format!("{event} {}", doc["detail"].as_str().unwrap_or("")));
            let n = s.last_events.len();
            if n > 4 {
                s.last_events.drain(..n - 4);
            }
            continue;
        }
        s.predictions += 1;
        let class = doc["class"].as_u64();
        if class == Some(1) {
            s.flagged += 1;
        }
        let label = doc["key"].as_u64().and_then(|k| labels.get(k as usize % labels.len().max(1))).copied();
        let right = class.is_some() && class == label.map(u64::from);
        if right {
            s.agree_with_label += 1;
        }
        let version = doc["version"].as_u64().unwrap_or(0);
        s.version = version;
        let phase = match doc["key"].as_u64() {
            Some(k) if k < drift_after => format!("before the fault, v{version}"),
            _ => format!("f1 reads 20 high, v{version}"),
        };
        let entry = s.phases.entry(phase).or_default();
        entry.0 += 1;
        entry.1 += u64::from(right);
        if let Some(l) = doc["latency_us"].as_u64() {
            s.latencies_us.push(l);
        }
    }
}

fn screen(handle: &Handle, seen: &Mutex<Seen>, started: Instant) -> String {
    let secs = started.elapsed().as_secs_f64().max(0.001);
    let Some((name, c)) = handle.counters.first() else {
        return String::new();
    };
    let Ok(mut s) = seen.lock() else { return String::new() };
    s.latencies_us.sort_unstable();
    let q = |p: f64| s.latencies_us.get(((s.latencies_us.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0);
    let received = c.received.load(Relaxed);
    let rejected: Vec<String> = Reject::REASONS
        .iter()
        .zip(&c.rejected)
        .filter(|(_, n)| n.load(Relaxed) > 0)
        .map(|(r, n)| format!("{r} {}", n.load(Relaxed)))
        .collect();
    let mut out = format!(
        "lathe demo — pipeline {name}, model shuttle-mlp v{} (tract), broker: embedded\n\n\
         {secs:6.1} s   in {received} ({:.0}/s)   predictions {} ({:.0}/s)   latency p50 {} µs  p99 {} µs\n\
         flagged anomalous: {} ({:.2} %)   agree with the Shuttle labels: {:.2} %\n\
         rejected: {}\n\ndrift (sensor f1 reads 20 high from a third of the way): {}\n{}\nthe loop:\n{}\nlast events:\n",
        s.version,
        received as f64 / secs,
        s.predictions,
        s.predictions as f64 / secs,
        q(0.5),
        q(0.99),
        s.flagged,
        100.0 * s.flagged as f64 / s.predictions.max(1) as f64,
        100.0 * s.agree_with_label as f64 / s.predictions.max(1) as f64,
        if rejected.is_empty() { "none".to_string() } else { rejected.join(", ") },
        if s.drift.is_empty() { "no alarm" } else { "" },
        s.drift.iter().map(|d| format!("  {d}\n")).collect::<String>(),
        if s.steps.is_empty() { "  (waiting for a trigger)\n".to_string() } else { s.steps.iter().map(|d| format!("  {d}\n")).collect() },
    );
    for e in &s.last_events {
        out.push_str(&format!("  {e}\n"));
    }
    out
}

/// One line for a training-loop event (None for other events).
fn loop_step(event: &str, doc: &Value) -> Option<String> {
    let message = doc["message"].as_str().unwrap_or("");
    let line = match event {
        "train.started" => format!("fine-tune started ({})", message.trim_start_matches("Fine-tuning ")),
        "train.accepted" | "train.refused" => {
            let run = &doc["run"];
            let gate = &run["gate"];
            let metric = gate["metric"].as_str().unwrap_or("?");
            let at = |k: &str| gate[k][metric].as_f64().unwrap_or(f64::NAN);
            format!(
                "{event}: backend {}, {} rows in {:.1} s; gate {metric}: fresh holdout {:.3} -> {:.3}, validation {:.3} -> {:.3}, replay {:.3} -> {:.3}\n    data: {}",
                run["backend"].as_str().unwrap_or("?"),
                run["rows_used"],
                run["wall_seconds"].as_f64().unwrap_or(0.0),
                at("champion_holdout"),
                at("challenger_holdout"),
                at("champion_validation"),
                at("challenger_validation"),
                at("champion_replay"),
                at("challenger_replay"),
                run["data"].as_str().unwrap_or("?"),
            )
        }
        "trial.started" | "trial.passed" | "trial.failed" | "train.failed" | "train.skipped" | "drift.rebased"
        | "drift.kept" => {
            format!("{event}: {message}")
        }
        "promoted" | "rolled_back" => format!("{event}: now serving v{}", doc["to"]),
        _ => return None,
    };
    Some(line)
}

/// The closing table: accuracy against the labels in each phase of the run.
fn summary(seen: &Mutex<Seen>) -> String {
    let Ok(s) = seen.lock() else { return String::new() };
    let mut out = String::from("accuracy against the Shuttle labels, by phase:\n");
    out.push_str(&format!("  {:<32} {:>12} {:>10}\n", "phase, serving version", "predictions", "accuracy"));
    for (phase, (n, right)) in &s.phases {
        out.push_str(&format!("  {phase:<32} {n:>12} {:>9.2} %\n", 100.0 * *right as f64 / (*n).max(1) as f64));
    }
    out
}
