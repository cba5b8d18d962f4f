//! The soak: the daemon at a steady rate for a long time, with drift episodes that set off
//! fine-tunes, while its memory, descriptors and threads are sampled. CI runs 120 s
//! (`LATHE_SOAK_SECONDS` sets it; the figures in docs/reliability.md are from a one-hour run).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// The daemon's heap (anonymous resident memory, kB), open descriptors and threads, and its
/// whole resident memory (kB), from /proc. Growth is judged on the heap: file-backed pages are
/// the binary's code, mapped in as code paths first run (training, promotion), not a leak.
fn sample(pid: u32) -> (u64, usize, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    (field("RssAnon:"), fds, field("Threads:"), field("VmRSS:"))
}

#[test]
fn a_steady_stream_with_drift_and_training_episodes_leaks_nothing() {
    let seconds: u64 = std::env::var("LATHE_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let broker = Broker::start();
    let dir = temp_dir("soak");
    let node = "soak";
    let config = config(node, &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"))
        + "labels = { topic = \"plant/line1/+/label\", key = \"/seq\", value = \"/anomaly\", window = 200 }\n"
        + "[pipeline.train]\ntrigger = [\"drift\"]\nmin_rows = 300\nrows = 600\ntrial = \"10s\"\n"
        + "min_live_labels = 50\nmax_forgetting = 0.05\ncooldown = \"30s\"\n"
        // A store that reaches its cap during the warm-up, so what follows is steady state.
        + "[store]\nmax_rows = 5000\n";
    let daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, node, &daemon);
    assert!(wait_until(Duration::from_secs(20), || daemon.log().contains("Drift monitor ready")));
    let pid = daemon.pid().unwrap();
    let events = format!("lathe/{node}/events");
    let status = format!("lathe/{node}/status");
    let out = Collector::new(broker.port, &["plant/line1/+/prediction", &events, &status]);

    // Episodes of 20 s: clean rows, then rows from a sensor reading 20 high (the drift), and
    // so on; labels follow each row. 100 rows a second.
    let clean = unseen();
    let shifted = faulty(&clean);
    let mut publisher = Publisher::new(broker.port);
    let started = Instant::now();
    // Warm-up: the first third, and at least until a fine-tune has run (its buffers, the new
    // version's engine and drift monitor are steady state, not growth).
    let warm_up = Duration::from_secs(seconds / 3);
    let trained = || {
        out.on(&events)
            .iter()
            .any(|e| ["train.accepted", "train.refused", "train.failed"].contains(&e["event"].as_str().unwrap_or("")))
    };
    let mut warming = true;
    let (mut warm, mut after) = (Vec::new(), Vec::new());
    let mut next_sample = Instant::now();
    let mut seq = 0usize;
    while started.elapsed() < Duration::from_secs(seconds) {
        let episode = (started.elapsed().as_secs() / 20) as usize;
        let rows = if episode.is_multiple_of(2) { &clean } else { &shifted };
        for _ in 0..10 {
            let (row, label) = &rows[seq % rows.len()];
            publisher.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(row, seq));
            publisher.publish(
                &format!("plant/line1/dev{}/label", seq % 4),
                json!({"seq": seq, "anomaly": label}).to_string(),
            );
            seq += 1;
        }
        publisher.flush();
        std::thread::sleep(Duration::from_millis(100));
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(2);
            let s = sample(pid);
            if (warm.len() + after.len()) % 30 == 0 {
                eprintln!(
                    "  {:>5} s: heap {} kB, RSS {} kB, {} descriptors, {} threads",
                    started.elapsed().as_secs(),
                    s.0,
                    s.3,
                    s.1,
                    s.2
                );
            }
            warming = warming && (started.elapsed() < warm_up || !trained());
            if warming {
                warm.push(s);
            } else {
                after.push(s);
            }
        }
    }
    let answered = wait_until(Duration::from_secs(60), || {
        out.on("prediction").iter().filter_map(|p| p["key"].as_u64()).collect::<BTreeSet<_>>().len() == seq
    });
    // Each label is sent right behind its row, so most reach the daemon before their
    // prediction is registered; they must still be joined, not left unmatched.
    let performance =
        || out.on(&status).last().map(|s| s["pipelines"][0]["drift"]["performance"].clone()).unwrap_or_default();
    let joined_all =
        wait_until(Duration::from_secs(15), || performance()["labels_joined"].as_u64() == Some(seq as u64));
    eprintln!("labels: {}", performance());
    let count = |step: &str| out.on(&events).iter().filter(|e| e["event"] == step).count();
    let (drifts, trainings) = (count("drift"), count("train.started"));
    assert!(after.len() >= 5, "no fine-tune finished in the first two thirds; log:\n{}", daemon.log());
    let warm_rss = warm.iter().map(|s| s.0).max().unwrap();
    let mut late_rss: Vec<u64> = after.iter().rev().take(5).map(|s| s.0).collect();
    late_rss.sort_unstable();
    let end_rss = late_rss[late_rss.len() / 2];
    let (warm_fds, end_fds) = (warm.iter().map(|s| s.1).max().unwrap(), after.last().unwrap().1);
    let (warm_threads, end_threads) = (warm.iter().map(|s| s.2).max().unwrap(), after.last().unwrap().2);
    let (warm_total, end_total) = (warm.iter().map(|s| s.3).max().unwrap(), after.last().unwrap().3);
    let growth = end_rss as f64 / warm_rss as f64 - 1.0;
    let total_growth = end_total as f64 / warm_total as f64 - 1.0;
    eprintln!(
        "soak {seconds} s: {seq} messages, {drifts} drift alarms, {trainings} fine-tunes; heap {warm_rss} kB after \
         warm-up -> {end_rss} kB at the end ({:+.1} %); RSS {warm_total} -> {end_total} kB ({:+.1} %); \
         descriptors {warm_fds} -> {end_fds}; threads {warm_threads} -> {end_threads}",
        growth * 100.0,
        total_growth * 100.0
    );
    assert!(answered, "every message answered; log:\n{}", daemon.log());
    assert!(joined_all, "every label joined its prediction: {}", performance());
    assert!(trainings >= 1, "the drift episodes set off a fine-tune; log:\n{}", daemon.log());
    // The target is < 5 % RSS growth over an hour (the one-hour run: -0.2 %, see
    // docs/reliability.md). This short run guards against gross leaks (10 %): its end is still
    // close to the warm-up, where the allocator's pools are filling.
    assert!(total_growth < 0.10, "RSS grew {:.1} % after warm-up", total_growth * 100.0);
    assert!(end_fds <= warm_fds + 2, "descriptors {warm_fds} -> {end_fds}");
    assert!(end_threads <= warm_threads + 2, "threads {warm_threads} -> {end_threads}");
}
