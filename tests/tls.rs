//! `mqtts://` end to end (the `tls` feature is in the default build): mosquitto with a TLS
//! listener that requires a client certificate, and certificates made here with openssl. Test
//! clients use a second, plain listener.

#![cfg(feature = "tls")]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// A CA and, signed by it, a certificate for the broker (for 127.0.0.1) and one for lathe,
/// written as `{name}-ca.pem`, `{name}-server.pem/.key` and `{name}-client.pem/.key`.
fn make_certificates(dir: &Path, name: &str) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ca = format!("{name}-ca");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
        "-keyout",
        &format!("{ca}.key"),
        "-out",
        &format!("{ca}.pem"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    for (who, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let base = format!("{name}-{who}");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=lathe-test-{who}"),
            "-keyout",
            &format!("{base}.key"),
            "-out",
            &format!("{base}.csr"),
        ]);
        let ext = format!("{base}.ext");
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"),
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{base}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &format!("{base}.pem"),
        ]);
    }
    // mosquitto started as root drops to its own user, which must be able to read them.
    use std::os::unix::fs::PermissionsExt;
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// mosquitto with a plain listener (`port`, for the test's clients) and a TLS one
/// (`tls_port`) that trusts `{name}-ca.pem`, presents `{name}-server.pem` and requires a
/// client certificate.
struct TlsBroker {
    port: u16,
    tls_port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl TlsBroker {
    fn start(dir: &Path, name: &str) -> TlsBroker {
        let mut b = TlsBroker { port: free_port(), tls_port: free_port(), dir: dir.to_path_buf(), child: None };
        b.restart(name);
        b
    }

    fn restart(&mut self, name: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let d = self.dir.display();
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\nlistener {} 127.0.0.1\nlistener {} 127.0.0.1\n\
                 cafile {d}/{name}-ca.pem\ncertfile {d}/{name}-server.pem\nkeyfile {d}/{name}-server.key\n\
                 require_certificate true\n",
                self.port, self.tls_port
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.join(format!("mosquitto-{name}.log"))).unwrap();
        self.child =
            Some(Command::new("mosquitto").arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log).spawn().unwrap());
        let port = self.tls_port;
        assert!(
            wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "mosquitto did not start with TLS; log:\n{}",
            std::fs::read_to_string(self.dir.join(format!("mosquitto-{name}.log"))).unwrap_or_default()
        );
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// lathe serves over mutual TLS; then the plant replaces the broker's CA and certificates
/// (a rotation, or a CA that expired) and puts the new CA and client certificate in the
/// files lathe's config names. lathe reads them again after the failed handshake and is
/// back without a restart.
#[test]
fn lathe_serves_over_mutual_tls_and_takes_rotated_certificates_without_a_restart() {
    if !mosquitto_or_say("a TLS listener that requires a client certificate") {
        return;
    }
    let dir = temp_dir("tls");
    make_certificates(&dir, "first");
    make_certificates(&dir, "second");
    // lathe's files: the first CA and client certificate.
    let (ca, cert, key) = (dir.join("lathe-ca.pem"), dir.join("lathe-client.pem"), dir.join("lathe-client.key"));
    let install = |name: &str| {
        std::fs::copy(dir.join(format!("{name}-ca.pem")), &ca).unwrap();
        std::fs::copy(dir.join(format!("{name}-client.pem")), &cert).unwrap();
        std::fs::copy(dir.join(format!("{name}-client.key")), &key).unwrap();
    };
    install("first");
    let mut broker = TlsBroker::start(&dir, "first");
    let config = format!(
        r#"node = "tls"
state_dir = "{state}"
[mqtt]
url = "mqtts://127.0.0.1:{port}"
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
[[pipeline]]
name = "shuttle"
model = "{model}"
source = {{ topic = "plant/line1/+/telemetry", key = "/seq" }}
sink = {{ topic = "plant/line1/{{device}}/prediction" }}
"#,
        state = dir.join("state").display(),
        port = broker.tls_port,
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
        model = root().join("models/shuttle-mlp-1.lathe").display(),
    );
    std::fs::write(dir.join("check.toml"), &config).unwrap();
    let check =
        Command::new(LATHE).args(["check", "--connect", "--config"]).arg(dir.join("check.toml")).output().unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && said.contains("connected to 127.0.0.1"),
        "{said}{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let daemon = Daemon::start(&dir, &config);
    let rows = rows(&expected());
    let serve = |seqs: std::ops::Range<usize>, port: u16| {
        let out = Collector::new(port, &["plant/line1/+/prediction", "lathe/tls/status"]);
        assert!(
            wait_until(Duration::from_secs(40), || out.on("lathe/tls/status").iter().any(|s| s["state"] == "online")),
            "not online over TLS; log:\n{}",
            daemon.log()
        );
        let mut publisher = Publisher::new(port);
        let n = seqs.len();
        for seq in seqs {
            publisher.publish("plant/line1/dev0/telemetry", shuttle_message(&rows[seq], seq));
        }
        publisher.flush();
        assert!(out.wait_for("prediction", n, Duration::from_secs(10)), "log:\n{}", daemon.log());
    };
    serve(0..10, broker.port);

    // The broker moves to the second CA; lathe, still trusting the first, fails the handshake.
    broker.restart("second");
    assert!(
        wait_until(Duration::from_secs(15), || daemon.log().contains("Broker connection lost")),
        "log:\n{}",
        daemon.log()
    );
    install("second");
    serve(10..20, broker.port);
    assert!(daemon.log().contains("the broker login files changed"), "{}", daemon.log());
}
