//! Signed remote updates through mosquitto: a push reaches every targeted daemon and is
//! served after its checks; each attack on TUF's and Uptane's list ends with the champion
//! unchanged and a clear event; kill -9 mid-update leaves the old or the new model, never
//! something in between; a pushed model that fails its trial is rolled back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use lathe::model::Bundle;
use lathe::trust::signing;
use lathe::update::push::{prepare, Prepared, PushOptions};
use serde_json::Value;

fn keys(dir: &Path, name: &str) -> PathBuf {
    let prefix = dir.join(name);
    signing::write_keypair(&prefix, &signing::generate().unwrap()).unwrap();
    prefix.with_extension("key")
}

/// The sample model as version `version`, from `data` (another CSV gives other bytes).
fn sample_version(dir: &Path, version: u64, data: &Path) -> PathBuf {
    let out = dir.join(format!("shuttle-mlp-{version}-{}.lathe", data.file_stem().unwrap().to_string_lossy()));
    let o = bundle_create(&sample_model().0, data, "shuttle-mlp")
        .args(["--target", "anomaly", "--version", &version.to_string(), "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn daemon_config(node: &str, broker: &Broker, dir: &Path, central_pub: &Path, extra: &str) -> String {
    config(node, broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"))
        + extra
        + &format!(
            "[update]\ntrusted_keys = [\"{}\"]\ngroups = [\"line1\"]\ncompatible = \"x86-test\"\ndownload_timeout = \"3s\"\n",
            central_pub.display()
        )
}

fn options() -> PushOptions {
    PushOptions {
        expires_unix: lathe::telemetry::unix_ms() / 1000 + 3600,
        compatible: "x86-test".into(),
        min_daemon_version: "0.1.0".into(),
        chunk_bytes: 8 << 10,
        // The offer topics these tests publish to.
        targets: ["upd-x", "upd-k", "upd-t", "upd-r", "upd-c"].iter().map(|n| format!("lathe/{n}/update")).collect(),
    }
}

fn publish(p: &mut Publisher, prepared: &Prepared, offer_topic: &str) {
    for (t, c) in &prepared.chunks {
        p.publish_retained(t, c.clone());
    }
    p.publish(offer_topic, prepared.message.clone());
    p.flush();
}

fn status_of(out: &Collector, node: &str) -> Option<Value> {
    out.on(&format!("lathe/{node}/status")).last().cloned()
}

fn wait_version(out: &Collector, node: &str, version: u64, daemon: &Daemon) {
    assert!(
        wait_until(Duration::from_secs(30), || status_of(out, node)
            .is_some_and(|s| s["pipelines"][0]["version"] == version)),
        "{node} does not serve v{version}: {:?}\nlog:\n{}",
        status_of(out, node),
        daemon.log()
    );
}

/// The events a node emitted for `step`.
fn events(out: &Collector, node: &str, step: &str) -> Vec<Value> {
    out.on(&format!("lathe/{node}/events")).into_iter().filter(|e| e["event"] == step).collect()
}

fn lathe(args: &[&str]) -> std::process::Output {
    Command::new(LATHE).args(args).output().unwrap()
}

#[test]
fn a_push_to_a_group_is_verified_and_served_by_every_node_and_shown_in_the_fleet() {
    let broker = Broker::start();
    let dir = temp_dir("update-push");
    let key = keys(&dir, "central");
    let mut daemons = Vec::new();
    for node in ["upd-a", "upd-b"] {
        let d = dir.join(node);
        std::fs::create_dir_all(&d).unwrap();
        let daemon = Daemon::start(&d, &daemon_config(node, &broker, &d, &key.with_extension("pub"), ""));
        wait_online(broker.port, node, &daemon);
        daemons.push((node, d, daemon));
    }
    let out = Collector::new(broker.port, &["lathe/+/status", "lathe/+/events"]);
    let v2 = sample_version(&dir, 2, &sample_model().1);
    let url = broker.url();
    let pushed = lathe(&[
        "push",
        v2.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--broker",
        &url,
        "--group",
        "line1",
        "--compatible",
        "x86-test",
        "--chunk-kb",
        "8",
    ]);
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    for (node, _, daemon) in &daemons {
        wait_version(&out, node, 2, daemon);
        let verified = events(&out, node, "update.verified");
        assert_eq!(verified.len(), 1, "{verified:?}");
        assert_eq!(verified[0]["version"], 2);
        let started = events(&out, node, "trial.started");
        assert_eq!(started[0]["run"]["origin"], "pushed", "{started:?}");
    }
    assert!(wait_until(Duration::from_secs(15), || status_of(&out, "upd-a")
        .is_some_and(|s| s["pipelines"][0]["origin"] == "pushed")));
    // The fleet as the central server sees it.
    let fleet = lathe(&["fleet", "--broker", &url, "--json"]);
    let fleet: Value = serde_json::from_slice(&fleet.stdout).unwrap();
    for node in ["upd-a", "upd-b"] {
        assert_eq!(fleet[node]["pipelines"][0]["version"], 2, "{fleet}");
    }
    let table = String::from_utf8(lathe(&["fleet", "--broker", &url]).stdout).unwrap();
    assert!(table.lines().filter(|l| l.contains("shuttle-mlp") && l.contains("pushed")).count() == 2, "{table}");
    // The floor survives a wiped registry: a restored v1 does not invite v2's replacement by v1.
    let floor: Value =
        serde_json::from_str(&std::fs::read_to_string(daemons[0].1.join("state/update-floor.json")).unwrap()).unwrap();
    assert_eq!(floor["shuttle-mlp"]["version"], 2);
    for (_, _, d) in &mut daemons {
        assert!(d.stop());
    }
    // An operator rolls upd-a back to v1 while it is stopped. At the next start the retained
    // offer of v2 is seen again, and refused: the rollback is remembered.
    let (_, a_dir, _) = &daemons[0];
    let state = a_dir.join("state");
    let rolled = lathe(&["models", "rollback", "shuttle-mlp", "--state-dir", state.to_str().unwrap()]);
    assert!(rolled.status.success(), "{}", String::from_utf8_lossy(&rolled.stderr));
    let again = Daemon::start(a_dir, &daemon_config("upd-a", &broker, a_dir, &key.with_extension("pub"), ""));
    wait_online(broker.port, "upd-a", &again);
    assert!(
        wait_until(Duration::from_secs(15), || events(&out, "upd-a", "update.refused").iter().any(|e| e["why"]
            .as_str()
            .unwrap()
            .contains("rolled back here by an operator")
            && e["version"] == 2)),
        "{:?}\nlog:\n{}",
        events(&out, "upd-a", "update.refused"),
        again.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(events(&out, "upd-a", "update.verified").len(), 1, "v2 was not installed again");
    assert_eq!(lathe::model::Registry::new(&state).champion_version("shuttle-mlp").unwrap(), Some(1));
}

/// Publishes one attack, and waits for its `step` event, which must say `says`.
fn expect(
    out: &Collector,
    daemon: &Daemon,
    p: &mut Publisher,
    name: &str,
    step: &str,
    says: &str,
    publish_it: impl FnOnce(&mut Publisher),
) {
    // Events are limited to 5 a second per kind and pipeline: one attack at a time.
    std::thread::sleep(Duration::from_millis(250));
    let before = events(out, "upd-x", step).len();
    publish_it(p);
    assert!(
        wait_until(Duration::from_secs(15), || events(out, "upd-x", step).len() > before),
        "{name}: no {step} event; log:\n{}",
        daemon.log()
    );
    let e = events(out, "upd-x", step).pop().unwrap();
    assert!(e["message"].as_str().unwrap().contains(says), "{name}: {e}");
    // Every update event says which model and version, and why.
    assert!(e["name"].as_str().is_some_and(|n| !n.is_empty()) && e["version"].is_u64(), "{name}: {e}");
    assert!(e["why"].as_str().is_some_and(|w| !w.is_empty()), "{name}: {e}");
    eprintln!("{name}: {}", e["message"]);
}

/// Each attack against one running daemon: a clear event, the champion unchanged.
#[test]
fn every_attack_on_the_update_path_is_refused_and_the_champion_stays() {
    let broker = Broker::start();
    let dir = temp_dir("update-attacks");
    let key = keys(&dir, "central");
    let rogue = keys(&dir, "rogue");
    let central = signing::read_signing_key(&key).unwrap();
    let daemon = Daemon::start(&dir, &daemon_config("upd-x", &broker, &dir, &key.with_extension("pub"), ""));
    wait_online(broker.port, "upd-x", &daemon);
    let out = Collector::new(broker.port, &["lathe/upd-x/status", "lathe/upd-x/events"]);
    let mut p = Publisher::new(broker.port);
    let topic = "lathe/upd-x/update";
    let v2 = Bundle::read(&sample_version(&dir, 2, &sample_model().1)).unwrap();
    let unseen = unseen_csv(&dir, 0.0);
    let v2_other = Bundle::read(&sample_version(&dir, 2, &unseen)).unwrap();

    let good = prepare(v2.clone(), &central, &options()).unwrap();
    expect(&out, &daemon, &mut p, "unsigned offer", "update.refused", "not a signed offer", |p| {
        p.publish(topic, serde_json::to_vec(&good.offer).unwrap());
        p.flush();
    });
    expect(&out, &daemon, &mut p, "wrong key", "update.refused", "not trusted", |p| {
        let forged = prepare(v2.clone(), &signing::read_signing_key(&rogue).unwrap(), &options()).unwrap();
        publish(p, &forged, topic);
    });
    expect(&out, &daemon, &mut p, "expired offer", "update.refused", "expired", |p| {
        let old = prepare(v2.clone(), &central, &PushOptions { expires_unix: 1_000_000, ..options() }).unwrap();
        publish(p, &old, topic);
    });
    expect(&out, &daemon, &mut p, "incompatible hardware", "update.refused", "hardware", |p| {
        let other =
            prepare(v2.clone(), &central, &PushOptions { compatible: "jetson-orin".into(), ..options() }).unwrap();
        publish(p, &other, topic);
    });
    expect(&out, &daemon, &mut p, "a newer daemon needed", "update.refused", "needs lathe 99.0.0", |p| {
        let other = prepare(v2.clone(), &central, &PushOptions { min_daemon_version: "99.0.0".into(), ..options() });
        publish(p, &other.unwrap(), topic);
    });
    expect(&out, &daemon, &mut p, "same version as held, another hash", "update.refused", "not newer than v1", |p| {
        let v1 = Bundle::read(&root().join("models/shuttle-mlp-1.lathe")).unwrap();
        let mut again = prepare(v1.with_version(1).unwrap(), &central, &options()).unwrap();
        again.chunks.truncate(again.chunks.len());
        publish(p, &again, topic);
    });
    expect(
        &out,
        &daemon,
        &mut p,
        "replayed to another target",
        "update.refused",
        "signed for lathe/upd-y/update",
        |p| {
            let elsewhere = PushOptions { targets: vec!["lathe/upd-y/update".into()], ..options() };
            publish(p, &prepare(v2.clone(), &central, &elsewhere).unwrap(), topic);
        },
    );
    expect(
        &out,
        &daemon,
        &mut p,
        "fast-forward: v5000 would raise the floor for good",
        "update.refused",
        "4999 versions past v1",
        |p| {
            let far = Bundle::read(&sample_version(&dir, 5000, &sample_model().1)).unwrap();
            publish(p, &prepare(far, &central, &options()).unwrap(), topic);
        },
    );
    expect(&out, &daemon, &mut p, "tampered chunk (mix and match)", "update.failed", "tampered", |p| {
        let mut mixed = prepare(v2.clone(), &central, &options()).unwrap();
        let other = prepare(v2_other.clone(), &central, &options()).unwrap();
        mixed.chunks[0].1 = other.chunks[0].1.clone();
        publish(p, &mixed, topic);
    });
    expect(&out, &daemon, &mut p, "more bytes than declared (endless data)", "update.failed", "more than the", |p| {
        let mut endless = prepare(v2.clone(), &central, &PushOptions { chunk_bytes: 4 << 10, ..options() }).unwrap();
        // The offer claims 100 bytes fewer: the same chunks overrun it.
        endless.offer.length -= 100;
        endless.offer.sha256 = format!("{}0", &endless.offer.sha256[..63]);
        let sha = endless.offer.sha256.clone();
        for (t, _) in endless.chunks.iter_mut() {
            *t = format!("lathe/bundles/{sha}/{}", t.rsplit('/').next().unwrap());
        }
        endless.message = signing::sign_offer(&endless.offer, &central).unwrap();
        publish(p, &endless, topic);
    });
    expect(&out, &daemon, &mut p, "truncated download", "update.failed", "truncated download", |p| {
        let mut cut = prepare(v2_other.clone(), &central, &PushOptions { chunk_bytes: 4 << 10, ..options() }).unwrap();
        cut.chunks.pop(); // the last chunk never comes
        publish(p, &cut, topic);
    });
    expect(&out, &daemon, &mut p, "an unsigned bundle behind a signed offer", "update.failed", "not signed", |p| {
        let mut unsigned =
            prepare(v2_other.clone(), &central, &PushOptions { chunk_bytes: 7 << 10, ..options() }).unwrap();
        let mut bare = v2_other.clone();
        bare.signature = None;
        let bytes = bare.to_bytes().unwrap();
        let sha = lathe::model::bundle::sha256_hex(&bytes);
        unsigned.chunks =
            bytes.chunks(7 << 10).enumerate().map(|(i, c)| (format!("lathe/bundles/{sha}/{i}"), c.to_vec())).collect();
        unsigned.offer.sha256 = sha;
        unsigned.offer.length = bytes.len() as u64;
        unsigned.offer.chunks = unsigned.chunks.len() as u32;
        unsigned.message = signing::sign_offer(&unsigned.offer, &central).unwrap();
        publish(p, &unsigned, topic);
    });
    // Nothing above touched the champion.
    std::thread::sleep(Duration::from_millis(300));
    assert!(events(&out, "upd-x", "update.verified").is_empty());
    wait_version(&out, "upd-x", 1, &daemon);

    // A genuine v3 is taken; then v2 (older) and another v3 (same version, other hash) are not.
    let v3 = sample_version(&dir, 3, &sample_model().1);
    publish(&mut p, &prepare(Bundle::read(&v3).unwrap(), &central, &options()).unwrap(), topic);
    wait_version(&out, "upd-x", 3, &daemon);
    expect(
        &out,
        &daemon,
        &mut p,
        "older version (rollback)",
        "update.refused",
        "older than v3 already accepted",
        |p| {
            publish(p, &good, topic);
        },
    );
    expect(&out, &daemon, &mut p, "same version, another hash", "update.refused", "another sha256", |p| {
        let other3 = Bundle::read(&sample_version(&dir, 3, &unseen)).unwrap();
        publish(p, &prepare(other3, &central, &options()).unwrap(), topic);
    });
    wait_version(&out, "upd-x", 3, &daemon);
}

/// kill -9 at random points while updates are downloaded, verified, recorded and promoted
/// (a new version each round, retained): after each kill the registry's champion is a
/// version that was offered, never older than before, and a complete bundle signed by the
/// central key; the last restart completes the last update. 6 rounds here;
/// `LATHE_KILL_ROUNDS=100` for the long run docs/reliability.md quotes.
#[test]
fn kill_9_during_an_update_leaves_the_old_or_the_new_model_never_between() {
    let rounds: u64 = std::env::var("LATHE_KILL_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(6);
    let broker = Broker::start();
    let dir = temp_dir("update-kill");
    let key = keys(&dir, "central");
    let central = signing::read_signing_key(&key).unwrap();
    let trusted = [central.verifying_key()];
    let config = daemon_config("upd-k", &broker, &dir, &key.with_extension("pub"), "");
    let mut p = Publisher::new(broker.port);
    let mut state = 5u64;
    let mut champion = 1;
    let mut outcomes = Vec::new();
    for version in 2..=rounds + 1 {
        let bundle = Bundle::read(&sample_version(&dir, version, &sample_model().1)).unwrap();
        let prepared = prepare(bundle, &central, &options()).unwrap();
        let mut daemon = Daemon::start(&dir, &config);
        wait_online(broker.port, "upd-k", &daemon);
        for (t, c) in &prepared.chunks {
            p.publish_retained(t, c.clone());
        }
        p.publish_retained("lathe/upd-k/update", prepared.message.clone());
        p.flush();
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis((state >> 33) % 2500));
        daemon.kill();
        let listed = lathe(&["models", "list", "--state-dir", dir.join("state").to_str().unwrap(), "--json"]);
        let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
        let now = listed[0]["champion"].as_u64().unwrap();
        // An offer a kill interrupted after its trust was recorded completes at the next start
        // (its retained offer is still there until the next one replaces it). A version on
        // trial at two kills in a row is rolled back as one that crashed the daemon
        // (`crash_guard`): to an older version, still a whole, signed one.
        assert!((1..=version).contains(&now), "v{version}: champion v{now}, before it v{champion}");
        if now > 1 {
            let served =
                Bundle::read(&dir.join(format!("state/registry/shuttle-mlp/shuttle-mlp-{now}.lathe"))).unwrap();
            signing::verify_bundle(&served, &trusted).unwrap();
        }
        outcomes.push((version, now));
        champion = now;
    }
    eprintln!("(offered, champion after kill -9): {outcomes:?}");
    let mut daemon = Daemon::start(&dir, &config);
    let out = Collector::new(broker.port, &["lathe/upd-k/status"]);
    wait_online(broker.port, "upd-k", &daemon);
    wait_version(&out, "upd-k", rounds + 1, &daemon);
    let floor: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state/update-floor.json")).unwrap()).unwrap();
    assert_eq!(floor["shuttle-mlp"]["version"], rounds + 1);
    assert!(daemon.stop());
}

/// A pushed model passes every check, is promoted, and the plant's labels then disagree with
/// it: its trial fails and the device rolls back to v1 by itself.
#[test]
fn a_pushed_model_that_fails_its_trial_is_rolled_back() {
    let broker = Broker::start();
    let dir = temp_dir("update-trial");
    let key = keys(&dir, "central");
    let central = signing::read_signing_key(&key).unwrap();
    let labels = "labels = { topic = \"plant/line1/+/label\", key = \"/seq\", value = \"/anomaly\", window = 100 }\n";
    let daemon = Daemon::start(&dir, &daemon_config("upd-t", &broker, &dir, &key.with_extension("pub"), labels));
    wait_online(broker.port, "upd-t", &daemon);
    let out = Collector::new(broker.port, &["lathe/upd-t/status", "lathe/upd-t/events", "plant/line1/+/prediction"]);
    let mut p = Publisher::new(broker.port);
    let v2 = Bundle::read(&sample_version(&dir, 2, &sample_model().1)).unwrap();
    let offer = prepare(v2, &central, &options()).unwrap();
    publish(&mut p, &offer, "lathe/upd-t/update");
    wait_version(&out, "upd-t", 2, &daemon);
    // Rows, then labels that say the opposite of the truth.
    let expected = expected();
    let rows = rows(&expected);
    for (seq, row) in rows.iter().enumerate() {
        p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(row, seq));
    }
    p.flush();
    assert!(out.wait_for("prediction", rows.len(), Duration::from_secs(30)));
    for (seq, prediction) in expected["shuttle-mlp"].as_array().unwrap().iter().enumerate() {
        let predicted = u8::from(prediction[1].as_f64().unwrap() >= 0.5);
        let label = serde_json::json!({"seq": seq, "anomaly": 1 - predicted});
        p.publish(&format!("plant/line1/dev{}/label", seq % 4), label.to_string());
    }
    p.flush();
    assert!(
        wait_until(Duration::from_secs(30), || !events(&out, "upd-t", "trial.failed").is_empty()),
        "log:\n{}",
        daemon.log()
    );
    let failed = events(&out, "upd-t", "trial.failed").pop().unwrap();
    assert!(failed["message"].as_str().unwrap().contains("rolled back to v1"), "{failed}");
    wait_version(&out, "upd-t", 1, &daemon);
    // The same offer again (a retained offer is, at every reconnect): not promoted again.
    p.publish("lathe/upd-t/update", offer.message.clone());
    p.flush();
    assert!(
        wait_until(Duration::from_secs(15), || events(&out, "upd-t", "update.refused")
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains("failed its trial here"))),
        "log:\n{}",
        daemon.log()
    );
    assert_eq!(events(&out, "upd-t", "update.verified").len(), 1);
}

/// A staged rollout: canaries first (by node name), the group only if few enough fail.
/// upd-c1 runs other hardware and refuses the offer: with one canary and no failure allowed
/// the rollout stops there; with two canaries and half allowed it goes on to the group.
#[test]
fn a_staged_rollout_stops_when_its_canaries_fail_and_goes_on_when_they_do_not() {
    let broker = Broker::start();
    let dir = temp_dir("update-canary");
    let key = keys(&dir, "central");
    let mut daemons = Vec::new();
    for node in ["upd-c1", "upd-c2", "upd-c3"] {
        let d = dir.join(node);
        std::fs::create_dir_all(&d).unwrap();
        // A canary passes when its trial does: a short one here.
        let trial = "labels = { topic = \"plant/line1/+/label\", key = \"/seq\", value = \"/anomaly\" }\n\
                     [pipeline.train]\ntrigger = []\ntrial = \"3s\"\n";
        let mut config = daemon_config(node, &broker, &d, &key.with_extension("pub"), trial);
        if node == "upd-c1" {
            config = config.replace("compatible = \"x86-test\"", "compatible = \"jetson-orin\"");
        }
        let daemon = Daemon::start(&d, &config);
        wait_online(broker.port, node, &daemon);
        daemons.push((node, daemon));
    }
    let out = Collector::new(broker.port, &["lathe/+/status"]);
    let v2 = sample_version(&dir, 2, &sample_model().1);
    let url = broker.url();
    let push = |canary: &str, share: &str| {
        lathe(&[
            "push",
            v2.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--broker",
            &url,
            "--group",
            "line1",
            "--compatible",
            "x86-test",
            "--canary",
            canary,
            "--max-failure-share",
            share,
            "--canary-wait",
            "40s",
        ])
    };
    let stopped = push("1", "0");
    let err = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success() && err.contains("rollout stopped"), "{err}");
    std::thread::sleep(Duration::from_secs(2));
    for node in ["upd-c2", "upd-c3"] {
        assert!(status_of(&out, node).is_some_and(|s| s["pipelines"][0]["version"] == 1), "{node} stays on v1");
    }
    let went_on = push("2", "0.5");
    let text = String::from_utf8_lossy(&went_on.stdout);
    assert!(went_on.status.success(), "{text}{}", String::from_utf8_lossy(&went_on.stderr));
    assert!(text.contains("1 took v2 (upd-c2)") && text.contains("offered to group line1"), "{text}");
    let (_, c3) = &daemons[2];
    wait_version(&out, "upd-c3", 2, c3);
    assert!(status_of(&out, "upd-c1").is_some_and(|s| s["pipelines"][0]["version"] == 1));
}

#[test]
fn keygen_writes_a_private_secret_and_never_overwrites_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("update-keygen");
    let made = lathe(&["keygen", "-o", dir.to_str().unwrap()]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let secret = dir.join("lathe.key");
    assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600);
    let key = signing::read_signing_key(&secret).unwrap();
    assert_eq!(signing::read_public_key(&dir.join("lathe.pub")).unwrap(), key.verifying_key());
    let again = lathe(&["keygen", "-o", dir.to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not overwriting"));
    assert_eq!(signing::read_signing_key(&secret).unwrap().to_bytes(), key.to_bytes());
}

/// The broker dies half-way through a download: the device keeps the chunks it has, subscribes
/// again when the broker is back, and completes with only the rest (which is all the new
/// broker holds).
#[test]
fn a_download_cut_by_a_broker_restart_resumes_where_it_was() {
    let mut broker = Broker::start();
    if !broker.mosquitto {
        return; // the embedded broker cannot be restarted
    }
    let dir = temp_dir("update-resume");
    let key = keys(&dir, "central");
    let central = signing::read_signing_key(&key).unwrap();
    let config = daemon_config("upd-r", &broker, &dir, &key.with_extension("pub"), "")
        .replace("download_timeout = \"3s\"", "download_timeout = \"60s\"");
    let daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "upd-r", &daemon);
    let v2 = Bundle::read(&sample_version(&dir, 2, &sample_model().1)).unwrap();
    let prepared = prepare(v2, &central, &PushOptions { chunk_bytes: 4 << 10, ..options() }).unwrap();
    let half = prepared.chunks.len() / 2;
    {
        let mut p = Publisher::new(broker.port);
        for (t, c) in &prepared.chunks[..half] {
            p.publish_retained(t, c.clone());
        }
        p.publish("lathe/upd-r/update", prepared.message.clone());
        p.flush();
    }
    std::thread::sleep(Duration::from_millis(1500));
    broker.kill();
    std::thread::sleep(Duration::from_millis(500));
    broker.restart();
    let out = Collector::new(broker.port, &["lathe/upd-r/status", "lathe/upd-r/events"]);
    let mut p = Publisher::new(broker.port);
    for (t, c) in &prepared.chunks[half..] {
        p.publish_retained(t, c.clone());
    }
    p.flush();
    wait_version(&out, "upd-r", 2, &daemon);
    assert!(events(&out, "upd-r", "update.failed").is_empty(), "log:\n{}", daemon.log());
}

/// Trust from a signed root (TUF's root role): an update key the root does not name is not
/// trusted; a new root signed by too few of the old root keys is refused; one signed by the
/// old and the new keys rotates the update key (the offer refused before is then taken, and
/// the old key is revoked); a restart keeps the newest root; an expired root trusts nothing.
#[test]
fn a_signed_root_rotates_and_revokes_update_keys_and_an_expired_root_trusts_nothing() {
    let broker = Broker::start();
    let dir = temp_dir("update-root");
    let (r1, r2, r3, r4) = (keys(&dir, "r1"), keys(&dir, "r2"), keys(&dir, "r3"), keys(&dir, "r4"));
    let (u1, u2) = (keys(&dir, "u1"), keys(&dir, "u2"));
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let public = |p: &PathBuf| s(&p.with_extension("pub"));
    let root_create = |version: &str, root_keys: &[String], threshold: &str, update: &PathBuf, expires: &str| {
        let out = dir.join(format!("root-v{version}.json"));
        let mut args = vec!["root", "create", "--version", version, "--threshold", threshold, "--expires", expires];
        for k in root_keys {
            args.extend(["--root-key", k.as_str()]);
        }
        let update = public(update);
        let out_s = s(&out);
        args.extend(["--update-key", update.as_str(), "-o", out_s.as_str()]);
        let o = lathe(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    // v1: 2 of r1, r2, r3 sign roots; u1 signs updates.
    let v1 = root_create("1", &[s(&r1), s(&r2), public(&r3)], "2", &u1, "365d");
    let config = config("upd-root", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"))
        + &format!("[update]\nroot = \"{}\"\ncompatible = \"x86-test\"\n", v1.display());
    let mut daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "upd-root", &daemon);
    let out = Collector::new(broker.port, &["lathe/upd-root/status", "lathe/upd-root/events"]);
    let url = broker.url();
    let push = |bundle: &PathBuf, key: &PathBuf| {
        let o = lathe(&[
            "push",
            bundle.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--broker",
            &url,
            "--node",
            "upd-root",
            "--compatible",
            "x86-test",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let wait_event = |daemon: &Daemon, step: &str, n: usize| {
        assert!(
            wait_until(Duration::from_secs(20), || events(&out, "upd-root", step).len() >= n),
            "no {step} #{n}; log:\n{}",
            daemon.log()
        );
        let e = events(&out, "upd-root", step).remove(n - 1);
        eprintln!("{step}: {}", e["message"]);
        e
    };
    // The refusal of an offer of `version` (other refusals come as retained offers are read
    // again).
    let refused_offer = |daemon: &Daemon, version: u64, says: &str| {
        let find = || {
            events(&out, "upd-root", "update.refused")
                .into_iter()
                .find(|e| e["version"] == version && e["why"].as_str().is_some_and(|w| w.contains(says)))
        };
        assert!(
            wait_until(Duration::from_secs(20), || find().is_some()),
            "v{version} not refused; log:\n{}",
            daemon.log()
        );
        eprintln!("refused: {}", find().unwrap()["message"]);
    };
    // Signed by u2, which the root does not name yet: refused.
    let v2 = sample_version(&dir, 2, &sample_model().1);
    push(&v2, &u2);
    refused_offer(&daemon, 2, "not trusted");
    let root_push = |files: &[&PathBuf]| {
        let mut args = vec!["root".to_string(), "push".into()];
        args.extend(files.iter().map(|f| s(f)));
        args.extend(["--broker".into(), url.clone()]);
        lathe(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Root v2 rotates r2 and r3 out for r4, and u1 out for u2. Signed by r1 and r4 (its own
    // threshold) but by only one of v1's root keys: `push` refuses the chain, and a device
    // that is sent it anyway refuses it too.
    let root_v2 = root_create("2", &[s(&r1), s(&r4)], "2", &u2, "365d");
    let o = root_push(&[&v1, &root_v2]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("signed by 1 of v1's 3 root keys; 2 needed"));
    let mut p = Publisher::new(broker.port);
    let chain = |files: &[&PathBuf]| {
        let docs: Vec<Value> =
            files.iter().map(|f| serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap()).collect();
        serde_json::to_vec(&docs).unwrap()
    };
    p.publish_retained("lathe/fleet/root", chain(&[&v1, &root_v2]));
    p.flush();
    let root_refused = wait_event(&daemon, "update.root_refused", 1);
    assert!(root_refused["why"].as_str().unwrap().contains("2 needed"), "{root_refused}");
    assert_eq!(root_refused["version"], 1, "the root held");
    // r2 (of v1) signs too: the chain holds, the device takes v2, and the offer it refused
    // (still retained) is read again and served.
    let o = lathe(&["root", "sign", root_v2.to_str().unwrap(), "--key", &s(&r2)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = root_push(&[&v1, &root_v2]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let taken = wait_event(&daemon, "update.root", 1);
    assert_eq!((taken["version"].as_u64(), taken["from"].as_u64()), (Some(2), Some(1)), "{taken}");
    wait_version(&out, "upd-root", 2, &daemon);
    // u1 is revoked: its v3 is refused.
    let v3 = sample_version(&dir, 3, &sample_model().1);
    push(&v3, &u1);
    refused_offer(&daemon, 3, "not trusted");
    // A restart starts from the root taken, not the installer's v1 (which trusts u1).
    assert!(daemon.stop());
    daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "upd-root", &daemon);
    std::thread::sleep(Duration::from_secs(2)); // the retained offer of v3 is read again
    assert!(events(&out, "upd-root", "update.verified").iter().all(|e| e["version"] != 3));
    // Root v3 expires a second after it is made: from then on nothing is trusted.
    let root_v3 = root_create("3", &[s(&r1), s(&r4)], "2", &u2, "1s");
    assert!(lathe(&["root", "sign", root_v3.to_str().unwrap(), "--key", &s(&r4)]).status.success());
    p.publish_retained("lathe/fleet/root", chain(&[&v1, &root_v2, &root_v3]));
    p.flush();
    let taken = wait_event(&daemon, "update.root", 2);
    assert_eq!(taken["version"], 3, "{taken}");
    std::thread::sleep(Duration::from_secs(2));
    let v4 = sample_version(&dir, 4, &sample_model().1);
    push(&v4, &u2);
    refused_offer(&daemon, 4, "root v3 expired");
    wait_version(&out, "upd-root", 2, &daemon);
    assert!(daemon.stop());
}

/// A pushed version that crashes the daemon during its trial (here: the daemon is SIGKILLed
/// while it serves it, as the OOM killer or an abort would end it) is served again after
/// the first unclean restart, and rolled back at the second, before it is loaded: a
/// `trial.failed` event says why, and its retained offer is refused from then on.
#[test]
fn a_version_on_trial_at_two_unclean_restarts_is_rolled_back_with_an_event() {
    let broker = Broker::start();
    let dir = temp_dir("update-crash");
    let key = keys(&dir, "central");
    let central = signing::read_signing_key(&key).unwrap();
    let config = daemon_config("upd-c", &broker, &dir, &key.with_extension("pub"), "");
    let out = Collector::new(broker.port, &["lathe/upd-c/status", "lathe/upd-c/events"]);
    let mut daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "upd-c", &daemon);
    let mut p = Publisher::new(broker.port);
    let v2 = Bundle::read(&sample_version(&dir, 2, &sample_model().1)).unwrap();
    let offer = prepare(v2, &central, &options()).unwrap();
    publish(&mut p, &offer, "lathe/upd-c/update");
    wait_version(&out, "upd-c", 2, &daemon);
    assert!(wait_until(Duration::from_secs(10), || !events(&out, "upd-c", "trial.started").is_empty()));
    // The first crash is forgiven (a power cut is not the model's fault): v2 serves again.
    daemon.kill();
    daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "upd-c", &daemon);
    std::thread::sleep(Duration::from_millis(500));
    wait_version(&out, "upd-c", 2, &daemon);
    assert!(daemon.log().contains("1 of 2 before it is rolled back"), "{}", daemon.log());
    // The second: rolled back before v2 is loaded.
    daemon.kill();
    daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "upd-c", &daemon);
    assert!(
        wait_until(Duration::from_secs(15), || !events(&out, "upd-c", "trial.failed").is_empty()),
        "no trial.failed; log:\n{}",
        daemon.log()
    );
    let failed = events(&out, "upd-c", "trial.failed").remove(0);
    eprintln!("{}", failed["message"]);
    assert!(failed["message"].as_str().unwrap().contains("2 unclean restarts"), "{failed}");
    assert_eq!(
        (failed["name"].as_str(), failed["version"].as_u64(), failed["to"].as_u64()),
        (Some("shuttle-mlp"), Some(2), Some(1))
    );
    let log = daemon.log();
    assert!(log.contains("Serving pipeline=\"shuttle\" model=\"shuttle-mlp\" version=1"), "{log}");
    assert!(!log.lines().any(|l| l.contains("Serving") && l.contains("version=2")), "v2 is not loaded again: {log}");
    wait_version(&out, "upd-c", 1, &daemon);
    // Its offer, seen again (a retained one is, at every start), is refused.
    p.publish("lathe/upd-c/update", offer.message.clone());
    p.flush();
    assert!(
        wait_until(Duration::from_secs(15), || events(&out, "upd-c", "update.refused")
            .iter()
            .any(|e| e["why"].as_str().is_some_and(|w| w.contains("failed its trial here")))),
        "log:\n{}",
        daemon.log()
    );
    // A clean stop and start counts nothing.
    assert!(daemon.stop());
    let daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "upd-c", &daemon);
    assert!(!std::fs::read_to_string(dir.join("state/trials.json")).unwrap_or_default().contains("shuttle-mlp"));
}
