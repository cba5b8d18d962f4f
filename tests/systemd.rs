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
    let config = config("notify", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"));
    std::fs::write(dir.join("lathe.toml"), config).unwrap();
    let mut child = Command::new(LATHE)
        .args(["run", "--config"])
        .arg(dir.join("lathe.toml"))
        .env("NOTIFY_SOCKET", &socket_path)
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

    // A reload request must not kill it (reloading itself is not built yet).
    let _ = Command::new("kill").args(["-HUP", &child.id().to_string()]).status();
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP killed the daemon");

    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let stopping = receive_for(&socket, Duration::from_millis(500));
    assert!(stopping.iter().any(|m| m.contains("STOPPING=1")), "{stopping:?}");
    assert!(child.wait().unwrap().success());
}
