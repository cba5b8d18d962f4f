//! The command line as a user meets it: config errors, bundle checks.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn lathe(args: &[&str]) -> Output {
    Command::new(LATHE).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn config_errors_are_all_reported_together_and_nothing_starts() {
    let dir = temp_dir("config-errors");
    let path = dir.join("lathe.toml");
    std::fs::write(
        &path,
        r#"node = "edge"
state_dir = "state"
colour = "blue"
[mqtt]
url = "mqtt://127.0.0.1:1883"
keep_alive_s = "thirty"
[[pipeline]]
name = "p"
model = "missing/pump-7.lathe"
source = { topic = "plant/+/telemetry" }
sink = { topic = "plant/{device}/out" }
"#,
    )
    .unwrap();
    let path = path.to_str().unwrap();
    for cmd in ["check", "run"] {
        let out = lathe(&[cmd, "--config", path]);
        assert!(!out.status.success(), "{cmd} must fail");
        let t = text(&out);
        assert!(t.contains(&format!("{path}: colour: unknown key")), "{cmd}: {t}");
        assert!(t.contains(&format!("{path}: mqtt.keep_alive_s: expected an integer, found a string")), "{cmd}: {t}");
        assert!(
            t.contains(&format!("{path}: pipeline[0].model: bundle file")) && t.contains("not found"),
            "{cmd}: {t}"
        );
        assert!(t.contains("3 errors"), "{cmd}: {t}");
    }
    let json = lathe(&["check", "--json", "--config", path]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"].as_array().unwrap().len(), 3);
}

/// `lathe check` on a config serving the sample bundle with the given `features` table, and
/// `extra` (e.g. a `[pipeline.drift]` table) after it.
fn check_sample_config(name: &str, features: &str, extra: &str) -> (std::path::PathBuf, Output) {
    let dir = temp_dir(name);
    let model = root().join("models/shuttle-mlp-1.lathe");
    let config = format!(
        "node = \"edge\"\nstate_dir = \"state\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n[[pipeline]]\nname = \"p\"\n\
         model = \"{}\"\nsource = {{ topic = \"plant/+/t\", key = \"/seq\" }}\nfeatures = {features}\n\
         sink = {{ topic = \"plant/{{device}}/out\" }}\n{extra}",
        model.display()
    );
    std::fs::write(dir.join("lathe.toml"), config).unwrap();
    let out = lathe(&["check", "--config", dir.join("lathe.toml").to_str().unwrap()]);
    (dir, out)
}

#[test]
fn check_accepts_a_good_config_and_names_the_model_it_would_serve() {
    let (dir, out) = check_sample_config("config-ok", "{ f1 = \"/a/b\" }", "");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("shuttle-mlp v1"));
    assert!(!dir.join("state").exists(), "check changes nothing on disk");
}

/// A training window written in UTC on a device whose clock is not: `check` names the
/// offset and the fix, and says nothing for a "local" window or on a UTC device.
#[test]
fn check_warns_when_training_hours_are_utc_on_a_device_that_is_not() {
    let train = |hours: &str| {
        format!("labels = {{ topic = \"plant/+/label\", key = \"/seq\", value = \"/v\" }}\n[pipeline.train]\nhours = \"{hours}\"\n")
    };
    let check_in = |dir: &std::path::Path, zone: &str| {
        let config = dir.join("lathe.toml");
        text(
            &Command::new(LATHE)
                .args(["check", "--config", config.to_str().unwrap()])
                .env("TZ", zone)
                .output()
                .unwrap(),
        )
    };
    let (utc, out) = check_sample_config("config-hours-utc", "{ f1 = \"/a/b\" }", &train("02:00-04:00"));
    assert!(out.status.success(), "{}", text(&out));
    let warned = check_in(&utc, "IST-5:30");
    assert!(
        warned.contains(
            "warning: train.hours in pipeline p is UTC, and this device's time is UTC+5:30: end it with \" local\""
        ),
        "{warned}"
    );
    assert!(!check_in(&utc, "UTC0").contains("warning"), "a UTC device: nothing to say");
    let (local, _) = check_sample_config("config-hours-local", "{ f1 = \"/a/b\" }", &train("02:00-04:00 local"));
    let quiet = check_in(&local, "IST-5:30");
    assert!(quiet.contains("ok (1 pipeline(s))") && !quiet.contains("warning"), "{quiet}");
}

/// `check --connect` logs in to the broker as the daemon would, and says what to fix.
#[test]
fn check_connect_tries_the_brokers_login() {
    let acl = "user lathe\ntopic read #\n";
    let Some(broker) = Broker::start_with_accounts(&[("lathe", "right")], acl) else {
        return;
    };
    let dir = temp_dir("check-connect");
    let base = config("c1", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"));
    let check = |password: Option<&str>| {
        let text = match password {
            Some(p) => {
                std::fs::write(dir.join("password"), format!("{p}\n")).unwrap();
                let login =
                    format!("[mqtt]\nusername = \"lathe\"\npassword_file = \"{}\"\n", dir.join("password").display());
                base.replace("[mqtt]\n", &login)
            }
            None => base.clone(),
        };
        std::fs::write(dir.join("lathe.toml"), text).unwrap();
        lathe(&["check", "--connect", "--config", dir.join("lathe.toml").to_str().unwrap()])
    };
    let out = check(Some("right"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("broker: connected to 127.0.0.1:{} as lathe", broker.port)), "{}", text(&out));
    for wrong in [Some("wrong"), None] {
        let out = check(wrong);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(
            text(&out)
                .contains("refused our credentials: check the user and password (mqtt.username and mqtt.password_file"),
            "{wrong:?}: {}",
            text(&out)
        );
    }
    // Nothing listening: says so, after the config itself checked out.
    drop(broker);
    let out = check(Some("right"));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("ok (1 pipeline(s))") && text(&out).contains("is the broker running"),
        "{}",
        text(&out)
    );
}

/// Under the packaged unit the password stays root-only in /etc/lathe/credentials/ and systemd
/// hands the service a copy (`LoadCredential=lathe:/etc/lathe/credentials`, named
/// `lathe_FILE` in `$CREDENTIALS_DIRECTORY`); the config names it `credential:FILE`.
#[test]
fn a_password_passed_as_a_systemd_credential_logs_in() {
    let acl = "user lathe\ntopic read #\n";
    let Some(broker) = Broker::start_with_accounts(&[("lathe", "right")], acl) else {
        return;
    };
    let dir = temp_dir("credential");
    let credentials = dir.join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::write(credentials.join("lathe_mqtt.password"), "right\n").unwrap();
    let login = "[mqtt]\nusername = \"lathe\"\npassword_file = \"credential:mqtt.password\"\n";
    let text_config = config("c2", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"))
        .replace("[mqtt]\n", login);
    std::fs::write(dir.join("lathe.toml"), text_config).unwrap();
    let check = |credentials: Option<&std::path::Path>| {
        let mut c = Command::new(LATHE);
        c.args(["check", "--connect", "--config", dir.join("lathe.toml").to_str().unwrap()]);
        match credentials {
            Some(d) => c.env("CREDENTIALS_DIRECTORY", d),
            None => c.env_remove("CREDENTIALS_DIRECTORY"),
        };
        c.output().unwrap()
    };
    let out = check(Some(&credentials));
    assert!(text(&out).contains(&format!("connected to 127.0.0.1:{} as lathe", broker.port)), "{}", text(&out));
    // Outside systemd (an operator's `lathe check`) the name is the file in /etc/lathe/credentials.
    if !std::path::Path::new("/etc/lathe/credentials/mqtt.password").exists() {
        let out = check(None);
        assert!(!out.status.success());
        assert!(text(&out).contains("/etc/lathe/credentials/mqtt.password"), "{}", text(&out));
    }
    std::fs::write(
        dir.join("bad.toml"),
        "node = \"x\"\n[mqtt]\nusername = \"u\"\npassword_file = \"credential:../shadow\"\n",
    )
    .unwrap();
    let out = lathe(&["check", "--config", dir.join("bad.toml").to_str().unwrap()]);
    assert!(text(&out).contains("expected credential:NAME"), "{}", text(&out));
}

/// `sudo lathe models import …` on a device: what root writes into the service's state folder
/// goes to the folder's owner (the service user), so the daemon can replace it later.
#[test]
fn models_run_as_root_leave_the_state_folder_to_its_owner() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (to run as an operator's sudo does)");
        return;
    }
    let state = temp_dir("models-owner").join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(4242), Some(4243)).unwrap();
    let out = lathe(&[
        "models",
        "import",
        root().join("models/shuttle-mlp-1.lathe").to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mut entries = 0;
    let mut folders = vec![state.clone()];
    while let Some(f) = folders.pop() {
        for e in std::fs::read_dir(f).unwrap() {
            let path = e.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!((m.uid(), m.gid()), (4242, 4243), "{} is not the state folder owner's", path.display());
            entries += 1;
            if m.is_dir() {
                folders.push(path);
            }
        }
    }
    assert!(entries >= 2, "the import wrote into the folder");
}

/// The central server's commands log in like the daemon; a refused login is an error at
/// once, not an empty fleet.
#[test]
fn fleet_logs_in_and_a_refused_login_is_an_error() {
    let acl = "user central\ntopic readwrite lathe/#\nuser plant\ntopic write lathe/+/status\n";
    let Some(broker) = Broker::start_with_accounts(&[("central", "c"), ("plant", "p")], acl) else {
        return;
    };
    let mut node = Publisher::new_as(broker.port, Some(("plant", "p")));
    node.publish_retained("lathe/edge-9/status", r#"{"state":"online","pipelines":[]}"#);
    node.flush();
    let dir = temp_dir("fleet-login");
    std::fs::write(dir.join("password"), "c\n").unwrap();
    let url = broker.url();
    let password = dir.join("password");
    let out = lathe(&[
        "fleet",
        "--json",
        "--broker",
        &url,
        "--username",
        "central",
        "--password-file",
        password.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let fleet: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fleet["edge-9"]["state"], "online", "{fleet}");

    let started = std::time::Instant::now();
    let out = lathe(&["fleet", "--broker", &url]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out)
            .contains("refused our credentials: check the user and password (mqtt.username and mqtt.password_file"),
        "{}",
        text(&out)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "refused at once");
}

/// `check --listen` reads what the gateway sends as the daemon would: with the right
/// pointers every message is a row; with a wrong one it fails, naming the pointer and the
/// keys the messages hold.
#[test]
fn check_listen_reads_the_gateways_messages_as_the_daemon_would() {
    let broker = Broker::start();
    if !broker.mosquitto {
        eprintln!("skipped: --listen needs an external broker");
        return;
    }
    let dir = temp_dir("check-listen");
    let config = config("cl", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"));
    let wrong = config.replace("sink =", "features = { f5 = \"/F5\" }\nsink =");
    let rows = rows(&expected());
    let listen = |text: &str, name: &str, json: bool| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        // The gateway: 3 devices, a message every 20 ms while lathe listens (and a bit longer).
        let port = broker.port;
        let rows = rows.clone();
        let gateway = std::thread::spawn(move || {
            let mut p = Publisher::new(port);
            for (seq, row) in rows.iter().take(150).enumerate() {
                p.publish(&format!("plant/line1/dev{}/telemetry", seq % 3), shuttle_message(row, seq));
                p.flush();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut args = vec!["check", "--listen", "2", "--config", path.to_str().unwrap()];
        args.extend(json.then_some("--json"));
        let out = lathe(&args);
        gateway.join().unwrap();
        out
    };
    let out = listen(&config, "good.toml", false);
    assert!(out.status.success(), "{}", text(&out));
    let line = text(&out).lines().find(|l| l.contains("listen shuttle:")).unwrap_or_default().to_string();
    let n: u64 =
        line.split("shuttle: ").nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(n >= 20, "{}", text(&out));
    assert!(line.ends_with(&format!("from 3 device(s) on plant/line1/+/telemetry in 2 s: {n} row(s) ok")), "{line}");

    let out = listen(&wrong, "wrong.toml", false);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(" row(s) ok; "), "{}", text(&out));
    assert!(text(&out).contains("0 row(s) ok"), "{}", text(&out));
    assert!(
        text(&out).contains("missing_feature (first: feature \"f5\" is missing (no value at /F5)); the messages hold f1, f2, f3, f4, f5, f6, f7, f8, f9, seq"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("no message made a row for pipeline(s) shuttle"), "{}", text(&out));
    let out = listen(&wrong, "wrong.toml", true);
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let heard = &report["listen"][0];
    assert_eq!(
        (heard["ok"].as_bool(), heard["rows"].as_u64(), heard["devices"].as_u64()),
        (Some(false), Some(0), Some(3))
    );
    assert_eq!(heard["rejected"]["missing_feature"]["count"], heard["messages"], "{heard}");
    assert_eq!(heard["keys"][4], "f5", "{heard}");
}

#[test]
fn check_listen_shows_the_tag_ids_a_kepware_gateway_sends_when_no_row_is_read() {
    let broker = Broker::start();
    if !broker.mosquitto {
        eprintln!("skipped: --listen needs an external broker");
        return;
    }
    let dir = temp_dir("check-listen-kepware");
    let config = config("ck", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"))
        .replace("topic = \"plant/line1/+/telemetry\", key = \"/seq\"", "topic = \"iotgateway\", format = \"kepware\"");
    let tags: Vec<String> = (1..=9).map(|i| format!("f{i} = \"Sensors.F{i}\"")).collect();
    let good = config.replace("sink =", &format!("features = {{ {} }}\nsink =", tags.join(", ")));
    let rows = rows(&expected());
    let listen = |text: &str, name: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        // The agent: every 20 ms, a message with all tags of 2 devices (each sends every scan).
        let (port, rows) = (broker.port, rows.clone());
        let gateway = std::thread::spawn(move || {
            let mut p = Publisher::new(port);
            for (scan, pair) in rows.chunks(2).take(100).enumerate() {
                let values: Vec<serde_json::Value> = (0..2)
                    .flat_map(|d| pair[d].iter().enumerate().map(move |(i, x)| (d, i, *x)))
                    .map(|(d, i, x)| serde_json::json!({"id": format!("L1.Pump{d}.Sensors.F{}", i + 1), "v": x, "q": true, "t": scan}))
                    .collect();
                p.publish("iotgateway", serde_json::json!({"timestamp": scan, "values": values}).to_string());
                p.flush();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let out = lathe(&["check", "--listen", "2", "--config", path.to_str().unwrap()]);
        gateway.join().unwrap();
        out
    };
    let out = listen(&good, "good.toml");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("from 2 device(s) on iotgateway in 2 s: "), "{}", text(&out));

    // Features named without the tag group: no device holds them, so no row and no rejection.
    let out = listen(&config, "wrong.toml");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(" 0 row(s) ok; the messages hold L1.Pump0.Sensors.F1, L1.Pump0.Sensors.F2,"),
        "{}",
        text(&out)
    );
}

/// The sample bundle's 3,000 validation rows are enough for the default drift window (500)
/// but not for one of 1,000: `check` says so, and still passes.
#[test]
fn check_warns_when_the_drift_reference_is_small_for_the_window() {
    let (_, out) = check_sample_config("config-small-ref", "{ f1 = \"/a/b\" }", "");
    assert!(out.status.success() && !text(&out).contains("warning"), "{}", text(&out));
    let (_, out) = check_sample_config("config-small-ref-2", "{ f1 = \"/a/b\" }", "[pipeline.drift]\nwindow = 1000\n");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out)
            .contains("warning: the drift reference of shuttle-mlp v1 (pipeline p) has 3000 rows for a window of 1000"),
        "{}",
        text(&out)
    );
    // A pipeline that trains (late labels) re-bases fine-tuned versions' references.
    let (_, out) = check_sample_config(
        "config-small-rebase",
        "{ f1 = \"/a/b\" }\nlabels = { topic = \"plant/+/l\", key = \"/seq\", value = \"/y\" }",
        "[pipeline.drift]\nrebase_rows = 1000\n[pipeline.train]\n",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("warning: drift.rebase_rows = 1000 in pipeline p is under 2000"), "{}", text(&out));
}

#[test]
fn a_feature_the_bundle_does_not_have_is_an_error_naming_the_inputs() {
    let (_, out) = check_sample_config("config-feature", "{ temp = \"/t\" }", "");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("pipeline[0].features.temp: bundle shuttle-mlp has no input \"temp\" (inputs: f1, f2"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_tampered_bundle_is_refused() {
    let dir = temp_dir("tamper");
    let mut bytes = std::fs::read(root().join("models/shuttle-mlp-1.lathe")).unwrap();
    // Flip one byte inside the model (the second tar entry) but not its header.
    let header = (0..bytes.len()).step_by(512).find(|&i| bytes[i..].starts_with(b"model.onnx\0")).unwrap();
    let model_at = header + 512 + 100;
    bytes[model_at] ^= 0xff;
    let path = dir.join("tampered.lathe");
    std::fs::write(&path, bytes).unwrap();
    let out = lathe(&["bundle", "inspect", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("model.onnx does not match its sha256"), "{}", text(&out));
}

#[test]
fn bundle_create_explains_a_feature_count_mismatch() {
    let dir = temp_dir("mismatch");
    let csv = dir.join("v.csv");
    std::fs::write(&csv, "a,b,y\n1,2,0\n3,4,1\n").unwrap();
    let out = bundle_create(&sample_model().0, &csv, "x")
        .args(["--target", "y", "-o"])
        .arg(dir.join("x.lathe"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("the model's input \"x\" takes 9 features; the CSV gives 2 (a,b)"), "{}", text(&out));
}

#[test]
fn bundle_create_records_the_baseline_and_the_given_ranges() {
    let dir = temp_dir("create");
    let out_path = dir.join("s.lathe");
    let (model, data) = sample_model();
    let out = bundle_create(&model, &data, "s")
        .args(["--json", "--target", "anomaly", "--range", "f1=0:200", "--unit", "f1=degC", "-o"])
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &v["manifest"];
    assert_eq!(m["inputs"][0]["min"], 0.0);
    assert_eq!(m["inputs"][0]["max"], 200.0);
    assert_eq!(m["inputs"][0]["unit"], "degC");
    assert_eq!(m["baseline"]["features"].as_array().unwrap().len(), 9);
    assert!(m["baseline"]["metrics"]["accuracy"].as_f64().unwrap() > 0.99);
    assert_eq!(m["training"]["optimizer"], "adam");
    // Same inputs, same bytes apart from the creation time: the tar is deterministic.
    let inspect = lathe(&["bundle", "inspect", out_path.to_str().unwrap()]);
    assert!(text(&inspect).contains("name = \"s\""));
}

#[test]
fn a_csv_with_an_id_column_works_once_the_features_are_named() {
    let dir = temp_dir("id-column");
    let csv = dir.join("v.csv");
    let source = std::fs::read_to_string(root().join("models/shuttle-validation.csv")).unwrap();
    let mut csv_text = String::from("\u{feff}row_id,");
    for (i, line) in source.lines().enumerate() {
        if i > 0 {
            csv_text.push_str(&format!("r{i},"));
        }
        csv_text.push_str(line);
        csv_text.push('\n');
    }
    std::fs::write(&csv, csv_text).unwrap();
    let create = |extra: &[&str]| {
        bundle_create(&sample_model().0, &csv, "s")
            .args(["--target", "anomaly", "-o"])
            .arg(dir.join("s.lathe"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = create(&[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("line 2: column \"row_id\" holds \"r1\", not a number"), "{}", text(&out));
    let out = create(&["--features", "f1,f2,f3,f4,f5,f6,f7,f8,f9"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A European spreadsheet's export (semicolons, decimal commas, CRLF) makes the same bundle
/// as the plain CSV, and the bundle keeps its validation set as plain CSV.
#[test]
fn bundle_create_reads_a_semicolon_export_and_keeps_plain_csv() {
    let dir = temp_dir("semicolon");
    let (model, plain) = sample_model();
    let european: String = std::fs::read_to_string(&plain)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let cells: Vec<String> =
                line.split(',').map(|c| if i == 0 { c.to_string() } else { format!("{c},0") }).collect();
            cells.join(";") + "\r\n"
        })
        .collect();
    std::fs::write(dir.join("european.csv"), european).unwrap();
    let manifest = |data: &std::path::Path, name: &str| {
        let out = bundle_create(&model, data, "s")
            .args(["--json", "--target", "anomaly", "-o"])
            .arg(dir.join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["manifest"].clone()
    };
    let (a, b) = (manifest(&plain, "plain.lathe"), manifest(&dir.join("european.csv"), "european.lathe"));
    assert_eq!(a["inputs"], b["inputs"]);
    assert_eq!(a["baseline"], b["baseline"]);
    let kept = lathe::model::bundle::Bundle::read(&dir.join("european.lathe")).unwrap().validation;
    let kept = String::from_utf8(kept).unwrap();
    assert!(kept.starts_with("f1,f2,f3,f4,f5,f6,f7,f8,f9,anomaly\n37.0,0.0,"), "{}", &kept[..60]);
}

#[test]
fn bundle_create_writes_to_a_bare_file_name_in_the_current_directory() {
    let dir = temp_dir("bare-output");
    let (model, data) = sample_model();
    let out = bundle_create(&model, &data, "s")
        .current_dir(&dir)
        .args(["--target", "anomaly", "-o", "s.lathe"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(dir.join("s.lathe").is_file());
    // Without -o: NAME-VERSION.lathe, also in the current directory.
    let out = bundle_create(&model, &data, "t")
        .current_dir(&dir)
        .args(["--target", "anomaly", "--version", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(dir.join("t-3.lathe").is_file());
}

/// The README's first command, shortened: the embedded broker, the faulty messages, the drift
/// and the closing count of messages sent against messages received and answered.
#[test]
fn the_demo_loses_nothing_and_reports_the_faults_and_the_drift() {
    let out = lathe(&["demo", "--seconds", "9", "--rate", "600", "--devices", "3"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("every message sent reached lathe: yes"), "{t}");
    assert!(t.contains("every accepted message answered: yes"), "{t}");
    // One message in 400 is broken, cycling through four faults.
    for reason in ["not_json", "out_of_range", "missing_feature", "non_numeric"] {
        assert!(t.contains(reason), "{reason} not reported: {t}");
    }
    assert!(t.contains("drift on f1"), "the drifted sensor is named: {t}");
    assert!(t.contains("before the fault, v1"), "{t}");
}
