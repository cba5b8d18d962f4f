//! The Prometheus text endpoint (`[metrics] listen`): a few lines of HTTP/1.1 on a tokio
//! listener, enough for a scraper, no web framework. Every value is read from the same atomics
//! and monitor state the status topic uses, at scrape time.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Serving;
use crate::ingest::Reject;
use crate::telemetry::events::{Histogram, BATCH_BUCKETS, COMPUTE_BUCKETS_US, LATENCY_BUCKETS_US};

/// Label values are quoted; backslash, quote and newline must be escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn histogram<const N: usize>(
    out: &mut String,
    name: &str,
    pipeline: &str,
    h: &Histogram<N>,
    bounds: &[u64; N],
    scale: f64,
) {
    let mut cumulative = 0;
    for (b, bound) in h.buckets.iter().zip(bounds) {
        cumulative += b.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{pipeline=\"{pipeline}\",le=\"{}\"}} {cumulative}", *bound as f64 * scale);
    }
    cumulative += h.over.load(Relaxed);
    let _ = writeln!(out, "{name}_bucket{{pipeline=\"{pipeline}\",le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum{{pipeline=\"{pipeline}\"}} {}", h.sum.load(Relaxed) as f64 * scale);
    let _ = writeln!(out, "{name}_count{{pipeline=\"{pipeline}\"}} {}", h.count.load(Relaxed));
}

/// The whole exposition, in Prometheus text format 0.0.4.
pub fn render(serving: &[Serving], connected: bool) -> String {
    let mut out = String::with_capacity(4096);
    let help = |out: &mut String, name: &str, kind: &str, text: &str| {
        let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
    };
    help(&mut out, "lathe_build_info", "gauge", "The running lathe's version (value 1).");
    let _ = writeln!(out, "lathe_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    help(&mut out, "lathe_broker_connected", "gauge", "1 while connected to the broker and subscribed.");
    let _ = writeln!(out, "lathe_broker_connected {}", u8::from(connected));
    help(&mut out, "lathe_model_info", "gauge", "The model each pipeline serves (value 1).");
    for s in serving {
        let m = s.model.load();
        let _ = writeln!(
            out,
            "lathe_model_info{{pipeline=\"{}\",model=\"{}\",version=\"{}\",sha256=\"{}\"}} 1",
            label(&s.pipeline),
            label(&m.name),
            m.version,
            m.sha256
        );
    }
    type Read = fn(&crate::telemetry::events::Counters) -> u64;
    let counters: [(&str, &str, Read); 5] = [
        ("lathe_messages_received_total", "Telemetry messages received.", |c| c.received.load(Relaxed)),
        ("lathe_predictions_total", "Predictions published.", |c| c.predicted.load(Relaxed)),
        ("lathe_inference_failures_total", "Rows whose inference failed.", |c| c.failed.load(Relaxed)),
        ("lathe_window_filling_total", "Rows that only filled a sequence model's window.", |c| {
            c.window_filling.load(Relaxed)
        }),
        ("lathe_captured_total", "Hard examples published for labelling ([pipeline.capture]).", |c| {
            c.captured.load(Relaxed)
        }),
    ];
    for (name, text, get) in counters {
        help(&mut out, name, "counter", text);
        for s in serving {
            let _ = writeln!(out, "{name}{{pipeline=\"{}\"}} {}", label(&s.pipeline), get(&s.counters));
        }
    }
    // Sources with `silent_after_s`: how many devices were heard, and how many went quiet.
    let activity: Vec<(String, (usize, usize))> = serving
        .iter()
        .filter_map(|s| Some((label(&s.pipeline), s.source.activity.as_ref()?.lock().ok()?.counts())))
        .collect();
    if !activity.is_empty() {
        help(
            &mut out,
            "lathe_devices",
            "gauge",
            "Devices heard since the start, and those silent now (silent_after_s).",
        );
        for (pipeline, (heard, silent)) in &activity {
            let _ = writeln!(out, "lathe_devices{{pipeline=\"{pipeline}\",state=\"heard\"}} {heard}");
            let _ = writeln!(out, "lathe_devices{{pipeline=\"{pipeline}\",state=\"silent\"}} {silent}");
        }
    }
    help(&mut out, "lathe_messages_rejected_total", "counter", "Telemetry messages rejected, by reason.");
    for s in serving {
        for (reason, c) in Reject::REASONS.iter().zip(&s.counters.rejected) {
            let _ = writeln!(
                out,
                "lathe_messages_rejected_total{{pipeline=\"{}\",reason=\"{reason}\"}} {}",
                label(&s.pipeline),
                c.load(Relaxed)
            );
        }
    }
    help(&mut out, "lathe_prediction_latency_seconds", "histogram", "Message received to prediction published.");
    for s in serving {
        histogram(
            &mut out,
            "lathe_prediction_latency_seconds",
            &label(&s.pipeline),
            &s.counters.latency,
            &LATENCY_BUCKETS_US,
            1e-6,
        );
    }
    help(&mut out, "lathe_batch_rows", "histogram", "Rows per inference call.");
    for s in serving {
        histogram(&mut out, "lathe_batch_rows", &label(&s.pipeline), &s.counters.batch, &BATCH_BUCKETS, 1.0);
    }
    help(
        &mut out,
        "lathe_inference_seconds_per_row",
        "histogram",
        "The engine's time per row of each batch (no queueing).",
    );
    for s in serving {
        let c = &s.counters.compute;
        histogram(&mut out, "lathe_inference_seconds_per_row", &label(&s.pipeline), c, &COMPUTE_BUCKETS_US, 1e-6);
    }
    help(
        &mut out,
        "lathe_sample_store_rows_total",
        "counter",
        "Samples committed to the store / failed to commit / not queued.",
    );
    for s in serving.iter().filter(|s| s.store.is_some()) {
        let c = &s.counters;
        for (result, n) in [("stored", &c.stored), ("failed", &c.store_failed), ("dropped", &c.store_dropped)] {
            let (pipeline, n) = (label(&s.pipeline), n.load(Relaxed));
            let _ = writeln!(out, "lathe_sample_store_rows_total{{pipeline=\"{pipeline}\",result=\"{result}\"}} {n}");
        }
    }
    help(
        &mut out,
        "lathe_drift_statistic",
        "gauge",
        "Each drift series' last value, of the statistic its label names.",
    );
    let mut thresholds = String::new();
    let mut alarms = String::new();
    for s in serving {
        let m = s.model.load();
        let Some(state) = m.monitor.as_ref().and_then(|d| d.get()).and_then(|d| d.lock().ok().map(|d| d.state()))
        else {
            continue;
        };
        for st in state {
            let labels = format!("pipeline=\"{}\",series=\"{}\"", label(&s.pipeline), label(&st.series));
            if st.value.is_finite() {
                let stat = label(&st.statistic);
                let _ = writeln!(out, "lathe_drift_statistic{{{labels},statistic=\"{stat}\"}} {}", st.value);
            }
            let _ = writeln!(thresholds, "lathe_drift_threshold{{{labels}}} {}", st.threshold);
            let _ = writeln!(alarms, "lathe_drift_alarm{{{labels}}} {}", u8::from(st.alarm));
        }
    }
    help(&mut out, "lathe_drift_threshold", "gauge", "Each drift series' alarm threshold.");
    out.push_str(&thresholds);
    help(&mut out, "lathe_drift_alarm", "gauge", "1 while a drift series is in alarm.");
    out.push_str(&alarms);
    help(&mut out, "lathe_labels_joined_total", "counter", "Late labels joined to a prediction.");
    let mut loss = String::new();
    for s in serving {
        if let Some(p) = s.performance.as_ref().and_then(|p| p.lock().ok()) {
            let _ = writeln!(out, "lathe_labels_joined_total{{pipeline=\"{}\"}} {}", label(&s.pipeline), p.joined());
            if p.rolling_loss().is_finite() {
                let _ =
                    writeln!(loss, "lathe_rolling_loss{{pipeline=\"{}\"}} {}", label(&s.pipeline), p.rolling_loss());
            }
        }
    }
    help(&mut out, "lathe_rolling_loss", "gauge", "Mean per-sample loss over the last labels.");
    out.push_str(&loss);
    outcome_counters(&mut out);
    process_metrics(&mut out);
    out
}

/// A counter family made of events: its name, help, label, and (event, label value) pairs.
type OutcomeFamily = (&'static str, &'static str, &'static str, &'static [(&'static str, &'static str)]);

/// What the loop and the updater did, by outcome, from the events emitted (`events::outcomes`).
fn outcome_counters(out: &mut String) {
    let counts = crate::telemetry::events::outcomes();
    let families: [OutcomeFamily; 3] = [
        (
            "lathe_training_runs_total",
            "Training runs by how they ended.",
            "outcome",
            &[
                ("train.accepted", "accepted"),
                ("train.refused", "refused"),
                ("train.failed", "failed"),
                ("train.skipped", "skipped"),
            ],
        ),
        (
            "lathe_model_swaps_total",
            "Models swapped in (a promotion or a rollback) or refused by the swapper, and trials ended.",
            "kind",
            &[
                ("promoted", "promoted"),
                ("rolled_back", "rolled_back"),
                ("model.refused", "refused"),
                ("trial.passed", "trial_passed"),
                ("trial.failed", "trial_failed"),
            ],
        ),
        (
            "lathe_updates_total",
            "Signed updates by outcome (and roots of trust taken or refused).",
            "outcome",
            &[
                ("update.verified", "verified"),
                ("update.refused", "refused"),
                ("update.failed", "failed"),
                ("update.root", "root_taken"),
                ("update.root_refused", "root_refused"),
            ],
        ),
    ];
    for (name, text, key, kinds) in families {
        let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} counter");
        for ((pipeline, event), n) in &counts {
            if let Some((_, value)) = kinds.iter().find(|(e, _)| e == event) {
                let _ = writeln!(out, "{name}{{pipeline=\"{}\",{key}=\"{value}\"}} {n}", label(pipeline));
            }
        }
    }
}

/// The standard `process_*` metrics, from `/proc/self` (Linux).
fn process_metrics(out: &mut String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |field: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|v| v * 1024.0)
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces) in parentheses: utime is the 14th
    // field of the line, stime the 15th, starttime the 22nd (in clock ticks).
    let after: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = 100.0; // USER_HZ, 100 on every Linux ABI lathe runs on
    let field = |n: usize| after.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("btime")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
    });
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as f64).ok();
    let metrics = [
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", kb("VmRSS:")),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", kb("VmSize:")),
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            field(14).zip(field(15)).map(|(u, s)| (u + s) / ticks),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            field(22).zip(boot).map(|(start, boot)| boot + start / ticks),
        ),
        ("process_open_fds", "gauge", "Number of open file descriptors.", fds),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            status.lines().find(|l| l.starts_with("Threads:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()),
        ),
    ];
    for (name, kind, text, value) in metrics {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}\n{name} {v}");
        }
    }
}

/// Connections served at once. A scraper opens one at a time. Past this a new connection is
/// closed as soon as it is accepted, so idle or slow clients cannot take the descriptors the
/// store and the broker connection need, or the daemon's memory: while they hold every slot a
/// scrape fails, and serving goes on.
pub const MAX_CONNECTIONS: usize = 8;

/// Serves `GET /metrics`, `/healthz` and `/ready` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    serving: Arc<Vec<Serving>>,
    ready: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let mut socket = match accepted {
            Ok((socket, _)) => socket,
            Err(_) => {
                // Out of descriptors, most likely: accepting again at once would fail again
                // and spin a core.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(socket);
            continue;
        };
        let (serving, ready) = (serving.clone(), ready.clone());
        tokio::spawn(async move {
            let _slot = slot;
            // One request per connection; a slow or silent client is dropped after 5 s.
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
            // /healthz: the daemon answers (liveness). /ready: it is connected to the broker and
            // serving what it receives (readiness), 503 while not, so an orchestrator or a
            // load-balancer health check needs no metrics parser.
            let (status, body) = if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ") {
                ("200 OK", render(&serving, *ready.borrow()))
            } else if line.starts_with(b"GET /healthz ") {
                ("200 OK", "ok\n".to_string())
            } else if line.starts_with(b"GET /ready ") {
                match *ready.borrow() {
                    true => ("200 OK", "ready\n".to_string()),
                    false => ("503 Service Unavailable", "not ready: no broker connection\n".to_string()),
                }
            } else {
                ("404 Not Found", "not found: GET /metrics, /healthz or /ready\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
