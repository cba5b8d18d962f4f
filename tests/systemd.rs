//! Playing systemd: a datagram socket as NOTIFY_SOCKET, a watchdog interval, and the
//! messages `Type=notify` units live by.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn receive_for(socket: &UnixDatagram, window: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + window;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}

#[test]
fn ready_comes_only_once_the_broker_is_up_and_the_watchdog_is_fed() {
    let mut broker = Broker::start();
    if !broker.mosquitto {
        eprintln!("skipped: needs a mosquitto process to start late");
        return;
    }
    broker.kill(); // the daemon starts while its broker is down
    let dir = temp_dir("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let config = config("notify", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"))
        .replace("key = \"/seq\" }", "key = \"/seq\", silent_after_s = 2 }");
    std::fs::write(dir.join("lathe.toml"), &config).unwrap();
    let mut child = Command::new(LATHE)
        .args(["run", "--config"])
        .arg(dir.join("lathe.toml"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("JOURNAL_STREAM")
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let before = receive_for(&socket, Duration::from_millis(1500));
    assert!(!before.iter().any(|m| m.contains("READY=1")), "READY before the broker was reachable: {before:?}");
    let pings = before.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 4, "the watchdog is fed while reconnecting: {before:?}");

    broker.restart();
    let after = receive_for(&socket, Duration::from_secs(6));
    let ready = after.iter().find(|m| m.contains("READY=1")).unwrap_or_else(|| panic!("no READY=1: {after:?}"));
    assert!(ready.contains("STATUS=Serving shuttle: shuttle-mlp v1"), "{ready}");
    let at = after.iter().position(|m| m.contains("READY=1")).unwrap();
    assert!(
        after[at..].iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2,
        "pings go on once serving: {after:?}"
    );

    // A stalled working loop stops the pings (debug builds can stall it on request), and they
    // come back when it runs again: systemd would have restarted a loop stuck for WatchdogSec.
    let listener = socket.try_clone().unwrap();
    let recorder = std::thread::spawn(move || pings_for(&listener, Duration::from_secs(4)));
    std::thread::sleep(Duration::from_millis(500));
    let mut p = Publisher::new(broker.port);
    p.publish("plant/line1/dev0/telemetry", r#"{"__lathe_debug_stall_ms": 1500}"#);
    p.flush();
    let pings = recorder.join().unwrap();
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = gaps.iter().max().copied().unwrap_or_default();
    assert!(longest >= Duration::from_millis(1200), "no pause in the pings while the loop stalled: {gaps:?}");
    let resumed =
        pings.iter().filter(|t| **t > pings[gaps.iter().position(|g| *g == longest).unwrap()] + longest).count();
    assert!(resumed >= 2, "pings resume after the stall: {gaps:?}");

    // The status line says how serving goes (refreshed every 10 s, and at once on cmd/status):
    // the stall message above had no features, and two more are not JSON.
    let rows = rows(&expected());
    for payload in [shuttle_message(&rows[0], 0), "x".into(), shuttle_message(&rows[1], 1), "y".into()] {
        p.publish("plant/line1/dev0/telemetry", payload);
    }
    let want = "STATUS=Serving shuttle: shuttle-mlp v1 (5 rows in, 2 predicted, 3 rejected, most not_json)";
    let mut seen = Vec::new();
    for _ in 0..20 {
        p.publish("lathe/notify/cmd/status", "");
        p.flush();
        seen = receive_for(&socket, Duration::from_millis(250));
        if seen.iter().any(|m| m.contains(want)) {
            break;
        }
    }
    assert!(seen.iter().any(|m| m.contains(want)), "{seen:?}");
    // dev0, the only device, then says nothing for over silent_after_s: the line says so.
    std::thread::sleep(Duration::from_millis(2500));
    p.publish("lathe/notify/cmd/status", "");
    p.flush();
    let seen = receive_for(&socket, Duration::from_millis(1500));
    assert!(seen.iter().any(|m| m.contains("most not_json); 1 of 1 devices silent")), "{seen:?}");

    // An unchanged config on SIGHUP changes nothing and must not kill it.
    let _ = Command::new("kill").args(["-HUP", &child.id().to_string()]).status();
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP killed the daemon");
    // A changed one is a reload to systemd: RELOADING=1 (with the monotonic time systemd 253
    // wants), then READY=1; STOPPING=1 would have systemd kill it after TimeoutStopSec.
    let changed = config.replace("{device}/prediction", "{device}/scored");
    std::fs::write(dir.join("lathe.toml"), changed).unwrap();
    let _ = Command::new("kill").args(["-HUP", &child.id().to_string()]).status();
    let reload = receive_for(&socket, Duration::from_secs(4));
    let begun = reload.iter().position(|m| m.contains("RELOADING=1")).unwrap_or_else(|| panic!("{reload:?}"));
    assert!(reload[begun].contains("MONOTONIC_USEC="), "{reload:?}");
    assert!(reload[begun..].iter().any(|m| m.contains("READY=1")), "the reload never ended: {reload:?}");
    assert!(!reload.iter().any(|m| m.contains("STOPPING=1")), "{reload:?}");
    assert!(child.try_wait().unwrap().is_none());

    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let stopping = receive_for(&socket, Duration::from_millis(500));
    assert!(stopping.iter().any(|m| m.contains("STOPPING=1")), "{stopping:?}");
    assert!(child.wait().unwrap().success());
}

/// The instants of the WATCHDOG=1 pings that reach `socket` within `window`.
fn pings_for(socket: &UnixDatagram, window: Duration) -> Vec<Instant> {
    let mut pings = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + window;
    socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                pings.push(Instant::now());
            }
        }
    }
    pings
}

/// The ingest loop sends the pings, but the work happens elsewhere too: a pipeline's
/// inference, the store's writing thread, the closed loop's thread. Each one stuck on a piece
/// of work for longer than WatchdogSec stops the pings (systemd then restarts the daemon),
/// says which stage in the log, and the pings come back once it moves again. Debug builds
/// stall a stage's next piece of work on request.
#[test]
fn a_stalled_inference_store_writer_or_loop_stops_the_watchdog() {
    let Some(broker) = Broker::start_mosquitto("a stage stalled under a running daemon") else { return };
    let dir = temp_dir("liveness");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let config = config("liveness", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"))
        + "labels = { topic = \"plant/line1/+/label\", key = \"/seq\", value = \"/anomaly\" }\n"
        + "[pipeline.train]\ntrigger = []\n";
    let daemon = Daemon::start_with(&dir, &config, |c| {
        c.env("NOTIFY_SOCKET", &socket_path).env("WATCHDOG_USEC", "400000");
    });
    wait_online(broker.port, "liveness", &daemon);
    let rows = rows(&expected());
    let mut p = Publisher::new(broker.port);
    for (i, stage) in ["inference", "store", "closed loop"].into_iter().enumerate() {
        let steady = pings_for(&socket, Duration::from_millis(600));
        assert!(steady.len() >= 2, "pings before stalling the {stage}: {steady:?}\n{}", daemon.log());
        p.publish("plant/line1/dev0/telemetry", format!(r#"{{"__lathe_debug_stall": "{stage}", "ms": 2000}}"#));
        // The next row is the inference's and the store's next piece of work (the loop ticks
        // twice a second by itself).
        p.publish("plant/line1/dev0/telemetry", shuttle_message(&rows[i], i));
        p.flush();
        let pings = pings_for(&socket, Duration::from_millis(4000));
        let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
        let longest = gaps.iter().max().copied().unwrap_or_default();
        assert!(longest >= Duration::from_millis(1300), "no pause in the pings while the {stage} stalled: {gaps:?}");
        let resumed_at = pings[gaps.iter().position(|g| *g == longest).unwrap() + 1];
        assert!(
            pings.iter().filter(|t| **t > resumed_at).count() >= 2,
            "pings resume after the {stage} stall: {gaps:?}"
        );
        assert!(
            daemon
                .log()
                .lines()
                .any(|l| l.contains(&format!("The {stage}")) && l.contains("the watchdog is no longer fed")),
            "the log names the stuck {stage}:\n{}",
            daemon.log()
        );
    }
}

/// The fields of one journal native-protocol datagram: `NAME=value` lines, or `NAME`, a
/// little-endian u64 length and the value (for values with newlines).
fn journal_fields(mut d: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            d = &d[nl + 1..];
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let rest = &d[nl + 1..];
            if rest.len() < 8 {
                break;
            }
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.insert(name, String::from_utf8_lossy(&rest[8..8 + len]).into_owned());
            d = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    out
}

/// Under systemd (JOURNAL_STREAM set, the journal socket answering) log lines go to journald
/// with structured fields: PIPELINE, DEVICE, EVENT, MODEL_VERSION. Plays journald by binding
/// its socket; where a real journald owns it, the test cannot listen and says so.
#[test]
fn under_systemd_log_lines_reach_journald_with_structured_fields() {
    let path = std::path::Path::new("/run/systemd/journal/socket");
    if path.exists() {
        eprintln!("skipped: a real journald owns {}", path.display());
        return;
    }
    if std::fs::create_dir_all("/run/systemd/journal").is_err() {
        eprintln!("skipped: cannot create /run/systemd/journal (not root)");
        return;
    }
    let journal = UnixDatagram::bind(path).unwrap();
    let broker = Broker::start();
    let dir = temp_dir("journald");
    std::fs::write(
        dir.join("lathe.toml"),
        config("journald", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe")),
    )
    .unwrap();
    let mut child = Command::new(LATHE)
        .args(["run", "--config"])
        .arg(dir.join("lathe.toml"))
        .env("JOURNAL_STREAM", "8:12345")
        .env("LATHE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let collector = Collector::new(broker.port, &["lathe/journald/status"]);
    assert!(wait_until(Duration::from_secs(15), || collector
        .on("lathe/journald/status")
        .iter()
        .any(|s| s["state"] == "online")));
    let mut p = Publisher::new(broker.port);
    p.publish("plant/line1/dev7/telemetry", "not json");
    p.flush();
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 65536];
    journal.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && !entries
            .iter()
            .any(|e: &std::collections::BTreeMap<String, String>| e.get("EVENT").is_some_and(|v| v == "input.rejected"))
    {
        if let Ok(n) = journal.recv(&mut buf) {
            entries.push(journal_fields(&buf[..n]));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(path);
    let rejected = entries
        .iter()
        .find(|e| e.get("EVENT").is_some_and(|v| v == "input.rejected"))
        .unwrap_or_else(|| panic!("no input.rejected entry in {entries:#?}"));
    assert_eq!(rejected["PIPELINE"], "shuttle");
    assert_eq!(rejected["DEVICE"], "dev7");
    assert_eq!(rejected["REASON"], "not_json");
    assert_eq!(rejected["SYSLOG_IDENTIFIER"], "lathe");
    assert_eq!(rejected["PRIORITY"], "4", "a warning");
    assert!(rejected["MESSAGE"].starts_with("Rejected a message"));
    assert!(entries.iter().any(|e| e.get("MESSAGE").is_some_and(|m| m.contains("Serving"))), "{entries:#?}");
}
