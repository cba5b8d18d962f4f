//! The broker dying, the daemon being stopped mid-stream: nothing accepted is lost.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

fn keys(c: &Collector) -> BTreeSet<u64> {
    c.on("prediction").iter().filter_map(|p| p["key"].as_u64()).collect()
}

#[test]
fn the_daemon_reconnects_and_carries_on_after_the_broker_is_killed_and_restarted() {
    let mut broker = Broker::start();
    if !broker.mosquitto {
        eprintln!("skipped: needs a mosquitto process to kill");
        return;
    }
    let dir = temp_dir("restart");
    let rows = rows(&expected());
    let daemon = Daemon::start(
        &dir,
        &config("restart", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe")),
    );
    wait_online(broker.port, "restart", &daemon);
    {
        let out = Collector::new(broker.port, &["plant/line1/+/prediction"]);
        let mut p = Publisher::new(broker.port);
        for (seq, row) in rows.iter().enumerate().take(100) {
            p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(row, seq));
        }
        p.flush();
        assert!(out.wait_for("prediction", 100, Duration::from_secs(20)), "log:\n{}", daemon.log());
    }

    broker.kill();
    std::thread::sleep(Duration::from_millis(1500));
    broker.restart();
    // The restarted broker has no session for us: the daemon must subscribe again.
    wait_online(broker.port, "restart", &daemon);
    let out = Collector::new(broker.port, &["plant/line1/+/prediction"]);
    let mut p = Publisher::new(broker.port);
    for (seq, row) in rows.iter().enumerate().take(300).skip(100) {
        p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(row, seq));
    }
    p.flush();
    assert!(out.wait_for("prediction", 200, Duration::from_secs(20)), "log:\n{}", daemon.log());
    assert_eq!(keys(&out), (100..300).collect(), "every message after the restart answered");
    assert!(daemon.log().contains("Broker connection lost"), "the outage was logged");
}

#[test]
fn sigterm_mid_stream_loses_no_accepted_message() {
    let broker = Broker::start();
    if !broker.mosquitto {
        eprintln!("skipped: needs mosquitto's persistent sessions");
        return;
    }
    let dir = temp_dir("drain");
    let rows = rows(&expected());
    let config = config("drain", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"));
    let out = Collector::new(broker.port, &["plant/line1/+/prediction"]);
    let mut daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "drain", &daemon);
    const N: usize = 3000;
    let mut p = Publisher::new(broker.port);
    for seq in 0..N {
        p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(&rows[seq % rows.len()], seq));
        if seq == N / 3 {
            // Stop while messages are streaming in.
            assert!(daemon.stop(), "clean exit on SIGTERM; log:\n{}", daemon.log());
        }
    }
    p.flush();
    let before = keys(&out).len();
    assert!(before < N, "the stop happened mid-stream ({before} answered)");
    // Whatever the first daemon did not answer, it did not acknowledge either: the broker
    // kept it in our persistent session and hands it to the next run.
    let mut second = Daemon::start(&dir, &config);
    assert!(
        wait_until(Duration::from_secs(30), || keys(&out).len() == N),
        "{} of {N} answered after restart; log:\n{}",
        keys(&out).len(),
        second.log()
    );
    assert!(second.stop());
    // A clean stop acknowledges what it answered, so nothing is answered twice either.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(out.count("prediction"), N, "no duplicate predictions across a clean stop");
}

#[test]
fn sigterm_while_the_broker_is_down_exits_promptly() {
    let mut broker = Broker::start();
    if !broker.mosquitto {
        eprintln!("skipped: needs a mosquitto process to kill");
        return;
    }
    let dir = temp_dir("stop-offline");
    let mut daemon = Daemon::start(
        &dir,
        &config("offline", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe")),
    );
    wait_online(broker.port, "offline", &daemon);
    broker.kill();
    std::thread::sleep(Duration::from_millis(500));
    let started = std::time::Instant::now();
    assert!(daemon.stop(), "clean exit; log:\n{}", daemon.log());
    assert!(started.elapsed() < Duration::from_secs(8), "stopped in {:?}", started.elapsed());
}
