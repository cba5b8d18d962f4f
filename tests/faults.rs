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

/// SIGHUP: a broken config is refused (its errors logged) and serving goes on; a valid,
/// changed one (a new sink topic) takes effect; nothing published across both is lost.
#[test]
fn reload_refuses_a_bad_config_and_applies_a_good_one_without_loss() {
    let broker = Broker::start();
    let dir = temp_dir("reload");
    let good = config("reloadd", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"));
    let mut daemon = Daemon::start(&dir, &good);
    wait_online(broker.port, "reloadd", &daemon);
    let old = Collector::new(broker.port, &["plant/line1/+/prediction"]);
    let new = Collector::new(broker.port, &["plant/line1/+/scored"]);
    let expected = expected();
    let rows = rows(&expected);
    let mut p = Publisher::new(broker.port);
    let send = |p: &mut Publisher, range: std::ops::Range<usize>| {
        for seq in range {
            p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(&rows[seq], seq));
        }
        p.flush();
    };
    send(&mut p, 0..100);
    assert!(old.wait_for("prediction", 100, Duration::from_secs(20)));

    std::fs::write(dir.join("lathe.toml"), good.replace("[mqtt]", "[mqtt\nbroken")).unwrap();
    daemon.hangup();
    assert!(
        wait_until(Duration::from_secs(10), || daemon.log().contains("the new config is refused")),
        "{}",
        daemon.log()
    );
    send(&mut p, 100..200);
    assert!(old.wait_for("prediction", 200, Duration::from_secs(20)), "still serving after a bad reload");
    assert!(daemon.running());

    std::fs::write(dir.join("lathe.toml"), good.replace("{device}/prediction", "{device}/scored")).unwrap();
    daemon.hangup();
    assert!(wait_until(Duration::from_secs(15), || daemon.log().contains("Reloaded")), "{}", daemon.log());
    // Published while the pipelines restart: the broker holds them for our session.
    send(&mut p, 200..300);
    assert!(new.wait_for("scored", 100, Duration::from_secs(20)), "log:\n{}", daemon.log());
    let keys = |c: &Collector, s: &str| {
        c.on(s).iter().map(|m| m["key"].as_u64().unwrap()).collect::<std::collections::BTreeSet<_>>()
    };
    let mut all = keys(&old, "prediction");
    all.extend(keys(&new, "scored"));
    assert_eq!(all.len(), 300, "every message answered once across the reloads");
    assert!(daemon.stop());
}
