//! Promotion and rollback while telemetry streams in: no message dropped, every prediction
//! names the version that computed it.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;

fn lathe(args: &[&str]) -> String {
    let out = Command::new(LATHE).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "lathe {args:?}: {text}");
    text
}

/// The sample model as `version` of shuttle-mlp, with `data` as its validation set and wide
/// ranges, so every test row passes and every answer can be checked against version 1's.
fn sample_version(out: &std::path::Path, version: u64, data: &std::path::Path) -> std::path::PathBuf {
    let ranges: Vec<String> = (1..=9).map(|i| format!("--range=f{i}=-100000:100000")).collect();
    let o = bundle_create(&sample_model().0, data, "shuttle-mlp")
        .args(["--target", "anomaly", "--version", &version.to_string(), "-o"])
        .arg(out)
        .args(&ranges)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out.to_path_buf()
}

#[test]
fn promotions_and_rollbacks_under_load_drop_no_message() {
    // The embedded broker drops a slow subscriber's messages (the collector's), so it could
    // not tell a message lathe lost from one the broker did.
    let Some(broker) = Broker::start_mosquitto("50,000 messages to a slow subscriber, none dropped") else { return };
    let dir = temp_dir("swap");
    let state = dir.join("state");
    let v2 = sample_version(&dir.join("shuttle-mlp-2.lathe"), 2, &sample_model().1);

    let daemon = Daemon::start(&dir, &config("swap", &broker, &state, &root().join("models/shuttle-mlp-1.lathe")));
    wait_online(broker.port, "swap", &daemon);
    lathe(&["models", "import", v2.to_str().unwrap(), "--state-dir", state.to_str().unwrap()]);
    let out = Collector::new(broker.port, &["plant/line1/+/prediction", "lathe/swap/events"]);

    const N: usize = 50_000;
    const SWAPS: usize = 20;
    let rows = rows(&expected());
    let port = broker.port;
    let publisher = std::thread::spawn(move || {
        let mut p = Publisher::new(port);
        for seq in 0..N {
            p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(&rows[seq % rows.len()], seq));
            if seq % 500 == 499 {
                p.flush(); // spread the load over the swaps
                std::thread::sleep(Duration::from_millis(80));
            }
        }
        p.flush();
    });
    let state_arg = state.to_str().unwrap();
    for i in 0..SWAPS {
        std::thread::sleep(Duration::from_millis(400));
        if i % 2 == 0 {
            lathe(&["models", "promote", "shuttle-mlp", "2", "--state-dir", state_arg]);
        } else {
            lathe(&["models", "rollback", "shuttle-mlp", "--state-dir", state_arg]);
        }
    }
    publisher.join().unwrap();
    assert!(
        out.wait_for("prediction", N, Duration::from_secs(60)),
        "{} of {N}; log:\n{}",
        out.count("prediction"),
        daemon.log()
    );
    std::thread::sleep(Duration::from_millis(500));

    let predictions = out.on("plant/line1/");
    assert_eq!(predictions.len(), N, "exactly one prediction per message");
    let mut by_device: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for p in &predictions {
        let (key, version) = (p["key"].as_u64().unwrap(), p["version"].as_u64().unwrap());
        assert!(version == 1 || version == 2, "{p}");
        by_device.entry(p["device"].as_str().unwrap().to_string()).or_default().push((key, version));
    }
    let versions: std::collections::BTreeSet<u64> =
        predictions.iter().map(|p| p["version"].as_u64().unwrap()).collect();
    assert_eq!(versions.len(), 2, "both versions served");
    for (device, mut seen) in by_device {
        seen.sort();
        let changes = seen.windows(2).filter(|w| w[0].1 != w[1].1).count();
        assert!(changes <= SWAPS, "{device}: the version changed {changes} times for {SWAPS} swaps");
    }
    let events = out.on("lathe/swap/events");
    let kinds = |k: &str| events.iter().filter(|e| e["event"] == k).count();
    assert!(kinds("promoted") >= 1 && kinds("rolled_back") >= 1, "{events:?}");
    let list = lathe(&["models", "list", "--state-dir", state_arg]);
    assert!(list.contains("shuttle-mlp: v1 (champion), v2"), "{list}");
}

#[test]
fn a_broken_version_is_refused_and_the_champion_keeps_serving() {
    let broker = Broker::start();
    let dir = temp_dir("refuse");
    let state = dir.join("state");
    let daemon = Daemon::start(&dir, &config("refuse", &broker, &state, &root().join("models/shuttle-mlp-1.lathe")));
    wait_online(broker.port, "refuse", &daemon);
    let out = Collector::new(broker.port, &["plant/line1/+/prediction", "lathe/refuse/events"]);
    // A bundle of another model with other inputs, dropped into the registry as version 5.
    let csv = dir.join("v.csv");
    let mut text = String::from("a,b,c,d,e,f,g,h,i,anomaly\n");
    let source = std::fs::read_to_string(root().join("models/shuttle-validation.csv")).unwrap();
    for line in source.lines().skip(1) {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(&csv, text).unwrap();
    let other = state.join("registry/shuttle-mlp/shuttle-mlp-5.lathe");
    let o = bundle_create(&sample_model().0, &csv, "shuttle-mlp")
        .args(["--target", "anomaly", "--version", "5", "-o"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // `lathe models promote` refuses it ...
    let out_promote = Command::new(LATHE)
        .args(["models", "promote", "shuttle-mlp", "5", "--state-dir", state.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out_promote.status.success());
    assert!(String::from_utf8_lossy(&out_promote.stderr).contains("must read the same inputs"));
    // ... so point the champion at it behind the registry's back, as a broken tool might.
    std::fs::write(state.join("registry/shuttle-mlp/champion"), "5").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || out
            .on("lathe/refuse/events")
            .iter()
            .any(|e| e["event"] == "model.refused")),
        "log:\n{}",
        daemon.log()
    );
    let refused = out.on("lathe/refuse/events").into_iter().find(|e| e["event"] == "model.refused").unwrap();
    assert!(refused["error"].as_str().unwrap().contains("inputs (a,b,c"), "{refused}");
    let rows = rows(&expected());
    let mut p = Publisher::new(broker.port);
    p.publish("plant/line1/dev0/telemetry", shuttle_message(&rows[0], 0));
    p.flush();
    assert!(out.wait_for("prediction", 1, Duration::from_secs(10)));
    assert_eq!(out.on("plant/line1/")[0]["version"], 1, "the champion that loads keeps serving");
}

/// A state dir holding v1 and v2 (the same model under a second version), v2 champion.
fn registry_with_two_versions(dir: &std::path::Path) -> std::path::PathBuf {
    let state = dir.join("state");
    let v2 = sample_version(&dir.join("shuttle-mlp-2.lathe"), 2, &sample_model().1);
    let s = state.to_str().unwrap();
    lathe(&["models", "import", root().join("models/shuttle-mlp-1.lathe").to_str().unwrap(), "--state-dir", s]);
    lathe(&["models", "import", v2.to_str().unwrap(), "--state-dir", s]);
    lathe(&["models", "promote", "shuttle-mlp", "2", "--state-dir", s]);
    state
}

fn name_config(node: &str, broker: &Broker, state: &std::path::Path) -> String {
    config(node, broker, state, std::path::Path::new("x")).replace("model = \"x\"", "model = \"shuttle-mlp\"")
}

#[test]
fn a_corrupt_champion_falls_back_to_the_last_good_version_at_start() {
    let broker = Broker::start();
    let dir = temp_dir("fallback");
    let state = registry_with_two_versions(&dir);
    // Damage v2 on disk, as a failing flash card might.
    let v2 = state.join("registry/shuttle-mlp/shuttle-mlp-2.lathe");
    let mut bytes = std::fs::read(&v2).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&v2, bytes).unwrap();

    let daemon = Daemon::start(&dir, &name_config("fallback", &broker, &state));
    wait_online(broker.port, "fallback", &daemon);
    let status = Collector::new(broker.port, &["lathe/fallback/status"]);
    assert!(wait_until(Duration::from_secs(5), || !status.on("lathe/fallback/status").is_empty()));
    assert_eq!(status.on("lathe/fallback/status")[0]["pipelines"][0]["version"], 1, "v1 serves");
    assert!(daemon.log().contains("serving v1 instead"), "{}", daemon.log());
    let list = lathe(&["models", "list", "--state-dir", state.to_str().unwrap()]);
    assert!(list.contains("v1 (champion)"), "the registry says what serves: {list}");
}

#[test]
fn killing_promote_and_rollback_at_random_points_leaves_a_registry_that_serves() {
    let broker = Broker::start();
    let dir = temp_dir("kill-promote");
    let state = registry_with_two_versions(&dir);
    let s = state.to_str().unwrap();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..200 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let args: Vec<&str> = if i % 2 == 0 {
            vec!["models", "promote", "shuttle-mlp", "1", "--state-dir", s]
        } else {
            vec!["models", "promote", "shuttle-mlp", "2", "--state-dir", s]
        };
        let mut child = Command::new(LATHE).args(&args).spawn().unwrap();
        std::thread::sleep(Duration::from_micros(seed % 60_000));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let entries: serde_json::Value =
            serde_json::from_str(&lathe(&["models", "list", "--json", "--state-dir", s])).unwrap();
        let e = &entries[0];
        let champion = e["champion"].as_u64().expect("a champion after every kill");
        assert!(e["versions"].as_array().unwrap().iter().any(|v| v.as_u64() == Some(champion)), "{e}");
    }
    let list: serde_json::Value =
        serde_json::from_str(&lathe(&["models", "list", "--json", "--state-dir", s])).unwrap();
    let champion = list[0]["champion"].as_u64().unwrap();
    let daemon = Daemon::start(&dir, &name_config("killed", &broker, &state));
    wait_online(broker.port, "killed", &daemon);
    let status = Collector::new(broker.port, &["lathe/killed/status"]);
    assert!(wait_until(Duration::from_secs(5), || !status.on("lathe/killed/status").is_empty()));
    assert_eq!(status.on("lathe/killed/status")[0]["pipelines"][0]["version"], champion, "serves what the list says");
}
