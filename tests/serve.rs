//! Serving end to end: telemetry in through a real broker, predictions out, numbers checked
//! against onnxruntime's.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// How a test gateway sends the fixture rows.
#[derive(Clone, Copy, PartialEq)]
enum Gateway {
    /// JSON objects, this many rows to a message (1: an object; more: an array of them).
    Rows(usize),
    /// Report by exception: each message holds only the features whose value changed since
    /// the device's previous row (the source has `rows = "last_value"`).
    OnChange,
    /// Kepware's IoT Gateway, standard template, as it publishes by default: one message per
    /// scan holding the changed tags of every device (`line1.dev0.Sensors.F1`, …, and its part
    /// counter `Counters.Part`, the rows' key) with a conveyor's and a system tag beside them
    /// (`format = "kepware"`, `rows = "last_value"`, `key = "Counters.Part"`).
    Kepware,
}

/// Kepware's `t` of row `seq` is this + `seq` (milliseconds since 1970): the row's `ts`.
const KEPWARE_T0: u64 = 1_764_745_200_000;

/// The tags whose values changed since each device's previous row (a heartbeat of the first
/// when none did), as `(feature index, value)`.
fn changed(row: &[f64], previous: Option<&[f64]>) -> Vec<(usize, f64)> {
    let mut changed: Vec<(usize, f64)> =
        row.iter().enumerate().filter(|(i, x)| previous.is_none_or(|p| p[*i] != **x)).map(|(i, x)| (i, *x)).collect();
    if changed.is_empty() {
        changed.push((0, row[0]));
    }
    changed
}

/// Publishes every fixture row from 4 devices as `gateway` sends them, and checks each
/// prediction against the onnxruntime output for that row.
fn serve_and_compare(model_bundle: &Path, expected_key: &str, gateway: Gateway) {
    let broker = Broker::start();
    let dir = temp_dir(expected_key);
    let expected = expected();
    let rows = rows(&expected);
    let want = expected[expected_key].as_array().unwrap();
    let mut config = config("serve", &broker, &dir.join("state"), model_bundle);
    if gateway == Gateway::OnChange {
        config = config.replace("key = \"/seq\" }", "key = \"/seq\", rows = \"last_value\" }");
    }
    if gateway == Gateway::Kepware {
        let tags: Vec<String> = (1..=9).map(|i| format!("f{i} = \"Sensors.F{i}\"")).collect();
        config = config.replace(
            "source = { topic = \"plant/line1/+/telemetry\", key = \"/seq\" }",
            &format!(
                "source = {{ topic = \"kepware/iotgateway\", format = \"kepware\", rows = \"last_value\", key = \"Counters.Part\" }}\nfeatures = {{ {} }}",
                tags.join(", ")
            ),
        );
    }
    let mut daemon = Daemon::start(&dir, &config);
    let predictions = Collector::new(broker.port, &["plant/line1/+/prediction"]);
    let status = Collector::new(broker.port, &["lathe/serve/status"]);
    wait_online(broker.port, "serve", &daemon);

    let mut publisher = Publisher::new(broker.port);
    if gateway == Gateway::Kepware {
        for start in (0..rows.len()).step_by(4) {
            let scan = start..rows.len().min(start + 4);
            let mut values = vec![serde_json::json!({"id": "_System._Time", "v": "12:00:00", "q": true})];
            for seq in scan.clone() {
                let previous = seq.checked_sub(4).map(|p| rows[p].as_slice());
                let t = KEPWARE_T0 + seq as u64;
                for (i, x) in changed(&rows[seq], previous) {
                    let id = format!("line1.dev{}.Sensors.F{}", seq % 4, i + 1);
                    values.push(serde_json::json!({"id": id, "v": x, "q": true, "t": t}));
                }
                let part = format!("line1.dev{}.Counters.Part", seq % 4);
                values.push(serde_json::json!({"id": part, "v": seq, "q": true, "t": t}));
            }
            values.push(serde_json::json!({"id": "line1.conveyor.Speed", "v": 1.5, "q": true, "t": KEPWARE_T0}));
            let message = serde_json::json!({"timestamp": KEPWARE_T0 + scan.end as u64, "values": values});
            publisher.publish("kepware/iotgateway", message.to_string());
        }
    }
    for device in (0..4).filter(|_| gateway != Gateway::Kepware) {
        let topic = format!("plant/line1/dev{device}/telemetry");
        let seqs: Vec<usize> = (device..rows.len()).step_by(4).collect();
        match gateway {
            Gateway::Rows(1) => {
                seqs.iter().for_each(|&seq| publisher.publish(&topic, shuttle_message(&rows[seq], seq)))
            }
            Gateway::Rows(batch) => {
                for chunk in seqs.chunks(batch) {
                    let messages: Vec<String> = chunk.iter().map(|&seq| shuttle_message(&rows[seq], seq)).collect();
                    publisher.publish(&topic, format!("[{}]", messages.join(",")));
                }
            }
            Gateway::OnChange => {
                let mut previous: Option<&[f64]> = None;
                for &seq in &seqs {
                    let mut message = serde_json::json!({"seq": seq});
                    for (i, x) in changed(&rows[seq], previous) {
                        message[format!("f{}", i + 1)] = x.into();
                    }
                    publisher.publish(&topic, message.to_string());
                    previous = Some(&rows[seq]);
                }
            }
            Gateway::Kepware => unreachable!("published above, a message per scan"),
        }
    }
    publisher.flush();
    assert!(
        predictions.wait_for("prediction", rows.len(), Duration::from_secs(30)),
        "got {} of {} predictions; log:\n{}",
        predictions.count("prediction"),
        rows.len(),
        daemon.log()
    );
    std::thread::sleep(Duration::from_millis(500)); // anything extra would be a duplicate
    let got = predictions.on("plant/line1/");
    assert_eq!(got.len(), rows.len(), "exactly one prediction per row");

    // Kepware names the device in its tag ids, and stamps each row with its values' time.
    let device_prefix = if gateway == Gateway::Kepware { "line1." } else { "" };
    let mut by_key: BTreeMap<u64, &Value> = BTreeMap::new();
    for p in &got {
        by_key.insert(p["key"].as_u64().unwrap(), p);
    }
    assert_eq!(by_key.len(), rows.len(), "every key answered once");
    for (seq, want_row) in want.iter().enumerate() {
        let p = by_key[&(seq as u64)];
        assert_eq!(p["device"], format!("{device_prefix}dev{}", seq % 4));
        if gateway == Gateway::Kepware {
            assert_eq!(p["ts"], KEPWARE_T0 + seq as u64);
        }
        assert_eq!(p["version"], 1);
        assert!(p["latency_us"].as_u64().is_some());
        let out: Vec<f64> = p["output"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let want_row: Vec<f64> = want_row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(out.len(), want_row.len(), "row {seq}");
        for (a, b) in out.iter().zip(&want_row) {
            assert!((a - b).abs() <= 1e-5, "row {seq}: lathe {out:?} vs onnxruntime {want_row:?}");
        }
        let class = if want_row.len() == 2 { usize::from(want_row[1] > want_row[0]) } else { 0 };
        assert_eq!(p["class"], class, "row {seq}");
        assert!(p.get("class_name").is_none(), "the sample model's classes are numbers: {p}");
    }
    assert!(daemon.stop(), "clean exit on SIGTERM; log:\n{}", daemon.log());
    let last = status.on("lathe/serve/status").last().cloned().unwrap();
    assert_eq!(last["state"], "offline");
    let counters = &last["pipelines"][0]["counters"];
    assert_eq!(counters["predicted"], rows.len());
    // Nothing else read as a row: not the conveyor's or the system's tags, nor a duplicate.
    assert_eq!(counters["received"], rows.len(), "{counters}");
}

#[test]
fn every_message_gets_one_prediction_equal_to_onnxruntimes() {
    serve_and_compare(&root().join("models/shuttle-mlp-1.lathe"), "shuttle-mlp", Gateway::Rows(1));
}

#[test]
fn a_gateways_batch_of_rows_in_one_message_gets_one_prediction_per_row() {
    serve_and_compare(&root().join("models/shuttle-mlp-1.lathe"), "shuttle-mlp", Gateway::Rows(16));
}

#[test]
fn a_gateway_that_sends_only_what_changed_is_scored_on_each_devices_last_values() {
    serve_and_compare(&root().join("models/shuttle-mlp-1.lathe"), "shuttle-mlp", Gateway::OnChange);
}

#[test]
fn kepwares_iot_gateway_is_read_a_row_per_device_from_its_standard_template() {
    serve_and_compare(&root().join("models/shuttle-mlp-1.lathe"), "shuttle-mlp", Gateway::Kepware);
}

#[test]
fn a_scikit_learn_export_is_bundled_and_served_with_onnxruntimes_numbers() {
    let dir = temp_dir("sklearn-bundle");
    let bundle = dir.join("sk.lathe");
    let out = bundle_create(&root().join("tests/fixtures/sklearn-mlp.onnx"), &sample_model().1, "sklearn-mlp")
        .args(["--target", "anomaly", "-o"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let inspect = Command::new(LATHE).args(["bundle", "inspect", "--json"]).arg(&bundle).output().unwrap();
    let manifest: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let m = &manifest["manifest"];
    assert_eq!(m["outputs"][m["primary_output"].as_u64().unwrap() as usize], "output_probability");
    assert!(m["baseline"]["metrics"]["roc_auc"].as_f64().unwrap() > 0.9);
    assert_eq!(m["baseline"]["rows"], 3000);
    serve_and_compare(&bundle, "sklearn-mlp", Gateway::Rows(1));
}

#[test]
fn bad_messages_are_rejected_with_a_reason_and_their_neighbours_still_served() {
    let broker = Broker::start();
    let dir = temp_dir("reject");
    let expected = expected();
    let rows = rows(&expected);
    let mut daemon =
        Daemon::start(&dir, &config("rej", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe")));
    let out = Collector::new(broker.port, &["plant/line1/+/prediction", "lathe/rej/events"]);
    wait_online(broker.port, "rej", &daemon);
    let mut publisher = Publisher::new(broker.port);
    let mut f1_missing = shuttle_message(&rows[3], 3).replace("\"f1\"", "\"nope\"");
    f1_missing.push(' ');
    let bad: Vec<(String, &str)> = vec![
        ("{\"f1\": 1, oops".into(), "not_json"),
        (f1_missing, "missing_feature"),
        (shuttle_message(&rows[5], 5).replace("\"f2\":", "\"f2\":\"high\",\"x\":"), "non_numeric"),
        (shuttle_message(&rows[7], 7).replace("\"f3\":", "\"f3\":1e39,\"x\":"), "non_finite"),
        (shuttle_message(&rows[9], 9).replace("\"f4\":", "\"f4\":-99999,\"x\":"), "out_of_range"),
        ("x".repeat(70_000), "payload_too_large"),
    ];
    let mut good = 0;
    for (i, (payload, _)) in bad.iter().enumerate() {
        if i == 5 {
            // Events are rate-limited to 5 a second per pipeline; let the window pass.
            publisher.flush();
            std::thread::sleep(Duration::from_millis(1100));
        }
        publisher.publish("plant/line1/dev0/telemetry", shuttle_message(&rows[100 + i], 100 + i));
        publisher.publish("plant/line1/dev0/telemetry", payload.clone());
        good += 1;
    }
    publisher.publish("plant/line1/dev0/telemetry", shuttle_message(&rows[200], 200));
    // The same row as a gateway that forwards text sends it: numbers in strings.
    let mut as_text = serde_json::Map::new();
    for (i, x) in rows[200].iter().enumerate() {
        as_text.insert(format!("f{}", i + 1), x.to_string().into());
    }
    as_text.insert("seq".into(), 201.into());
    publisher.publish("plant/line1/dev0/telemetry", Value::Object(as_text).to_string());
    good += 2;
    // A gateway's batch: each row is checked alone; an empty batch is refused.
    let bad_row = shuttle_message(&rows[301], 301).replace("\"f4\":", "\"f4\":-99999,\"x\":");
    let batch = format!("[{},{bad_row},{}]", shuttle_message(&rows[300], 300), shuttle_message(&rows[302], 302));
    publisher.publish("plant/line1/dev0/telemetry", batch);
    publisher.publish("plant/line1/dev0/telemetry", "[]");
    good += 2;
    let bad_reasons: Vec<&str> = bad.iter().map(|b| b.1).chain(["out_of_range", "empty_batch"]).collect();
    publisher.flush();
    assert!(out.wait_for("prediction", good, Duration::from_secs(20)), "log:\n{}", daemon.log());
    assert!(out.wait_for("events", bad_reasons.len(), Duration::from_secs(10)), "log:\n{}", daemon.log());
    std::thread::sleep(Duration::from_millis(300));
    let keys: Vec<u64> = out.on("prediction").iter().map(|p| p["key"].as_u64().unwrap()).collect();
    assert_eq!(keys, vec![100, 101, 102, 103, 104, 105, 200, 201, 300, 302], "the valid rows, in order, once each");
    let output = |key: u64| -> Vec<f64> {
        let p = out.on("prediction").into_iter().find(|p| p["key"] == key).unwrap();
        p["output"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    // Equal up to float rounding: the two rows may be scored in micro-batches of different
    // sizes, which sum in a different order.
    let (text, number) = (output(201), output(200));
    assert!(
        text.iter().zip(&number).all(|(a, b)| (a - b).abs() <= 1e-6),
        "numbers sent as text: {text:?} vs {number:?}"
    );
    let reasons: Vec<String> = out
        .on("lathe/rej/events")
        .iter()
        .filter(|e| e["event"] == "input.rejected")
        .map(|e| e["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons, bad_reasons);
    let details: Vec<String> = out
        .on("lathe/rej/events")
        .iter()
        .filter(|e| e["reason"] == "out_of_range")
        .map(|e| e["detail"].as_str().unwrap().to_string())
        .collect();
    assert!(details[0].starts_with("feature \"f4\" = -99999"), "{details:?}");
    assert!(details[1].starts_with("row 2 of the 3 in the message: feature \"f4\" = -99999"), "{details:?}");
    assert!(daemon.running(), "bad input must not stop the daemon");

    // A flood of garbage is counted in full but reported at a bounded rate.
    for _ in 0..50 {
        publisher.publish("plant/line1/dev1/telemetry", "garbage");
    }
    publisher.flush();
    let status = Collector::new(broker.port, &["lathe/rej/status"]);
    assert!(daemon.stop());
    assert!(wait_until(Duration::from_secs(5), || status
        .on("lathe/rej/status")
        .last()
        .is_some_and(|s| s["state"] == "offline")));
    let counters = status.on("lathe/rej/status").last().unwrap()["pipelines"][0]["counters"].clone();
    assert_eq!(counters["rejected"], 58, "{counters}");
    assert_eq!(counters["rejected_by_reason"]["not_json"], 51, "{counters}");
    assert_eq!(counters["rejected_by_reason"]["empty_batch"], 1, "{counters}");
    assert_eq!(counters["predicted"], 10, "{counters}");
    assert_eq!(counters["received"], 68, "a batch's rows are counted one by one: {counters}");
    let events = out.on("lathe/rej/events").iter().filter(|e| e["event"] == "input.rejected").count();
    assert!(events < 6 + 20, "the flood was rate-limited: {events} events");
}

#[test]
fn a_killed_daemon_is_reported_offline_by_its_last_will() {
    let broker = Broker::start();
    let dir = temp_dir("will");
    let mut daemon =
        Daemon::start(&dir, &config("will", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe")));
    let status = Collector::new(broker.port, &["lathe/will/status"]);
    assert!(wait_until(Duration::from_secs(10), || status
        .on("lathe/will/status")
        .iter()
        .any(|s| s["state"] == "online")));
    daemon.kill();
    assert!(
        wait_until(Duration::from_secs(60), || status
            .on("lathe/will/status")
            .last()
            .is_some_and(|s| s["state"] == "offline")),
        "the broker publishes the last will once the keep-alive lapses"
    );
}

/// `cmd/status` publishes a fresh status at once (not at the next 10 s refresh), and on a
/// node whose pipelines do not train, `cmd/train` is refused on the events topic rather than
/// going unanswered.
#[test]
fn cmd_status_refreshes_the_status_and_a_node_without_training_refuses_cmd_train() {
    let broker = Broker::start();
    let dir = temp_dir("cmd-status");
    let mut daemon =
        Daemon::start(&dir, &config("cmds", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe")));
    let out = Collector::new(broker.port, &["lathe/cmds/status", "lathe/cmds/events"]);
    wait_online(broker.port, "cmds", &daemon);
    let statuses = || out.on("lathe/cmds/status").len();
    let mut publisher = Publisher::new(broker.port);
    for round in 0..3 {
        let before = statuses();
        let asked = std::time::Instant::now();
        publisher.publish("lathe/cmds/cmd/status", "");
        publisher.flush();
        assert!(wait_until(Duration::from_secs(10), || statuses() > before), "round {round}: no status");
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(3), "round {round}: the status came {took:?} after the command");
        std::thread::sleep(Duration::from_millis(200));
    }
    let latest = out.on("lathe/cmds/status").last().unwrap().clone();
    assert_eq!(latest["state"], "online");
    assert_eq!(latest["pipelines"][0]["model"], "shuttle-mlp");

    publisher.publish("lathe/cmds/cmd/train", "");
    publisher.flush();
    let refused = || out.on("lathe/cmds/events").into_iter().find(|e| e["event"] == "command.refused");
    assert!(wait_until(Duration::from_secs(10), || refused().is_some()), "log:\n{}", daemon.log());
    let refused = refused().unwrap();
    assert_eq!(refused["command"], "train");
    assert!(
        refused["message"].as_str().unwrap().contains("no pipeline on this node has [pipeline.train]"),
        "{refused}"
    );
    assert!(daemon.running());
}

/// A device that stops sending is reported once as `device.silent` and listed in the status;
/// when it speaks again, `device.back`. Its neighbour, still sending, is not.
#[test]
fn a_device_that_goes_quiet_is_reported_and_so_is_its_return() {
    let broker = Broker::start();
    let dir = temp_dir("silent");
    let config = config("quiet", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"))
        .replace("key = \"/seq\" }", "key = \"/seq\", silent_after_s = 2 }");
    let mut daemon = Daemon::start(&dir, &config);
    let out = Collector::new(broker.port, &["lathe/quiet/status", "lathe/quiet/events"]);
    wait_online(broker.port, "quiet", &daemon);
    let rows = rows(&expected());
    let send = |p: &mut Publisher, device: usize, seq: usize| {
        p.publish(&format!("plant/line1/dev{device}/telemetry"), shuttle_message(&rows[seq], seq));
        p.flush();
    };
    let mut publisher = Publisher::new(broker.port);
    send(&mut publisher, 0, 0);
    // dev1 keeps sending every 300 ms to the end; dev0 says nothing more for 3 s.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dev1 = {
        let (stop, rows, port) = (stop.clone(), rows.clone(), broker.port);
        std::thread::spawn(move || {
            let mut p = Publisher::new(port);
            for seq in (1..).take_while(|_| !stop.load(std::sync::atomic::Ordering::Relaxed)) {
                p.publish("plant/line1/dev1/telemetry", shuttle_message(&rows[seq % rows.len()], seq));
                p.flush();
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    publisher.publish("lathe/quiet/cmd/status", "");
    publisher.flush();
    let events =
        |name: &str| out.on("lathe/quiet/events").into_iter().filter(|e| e["event"] == name).collect::<Vec<_>>();
    assert!(wait_until(Duration::from_secs(15), || !events("device.silent").is_empty()), "log:\n{}", daemon.log());
    let silent = events("device.silent");
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!((&silent[0]["device"], &silent[0]["pipeline"]), (&"dev0".into(), &"shuttle".into()));
    assert!(silent[0]["silent_s"].as_u64().unwrap() >= 2);
    let status = || out.on("lathe/quiet/status").last().cloned().unwrap_or_default();
    assert!(wait_until(Duration::from_secs(10), || status()["pipelines"][0]["devices"]["silent"]
        == serde_json::json!(["dev0"])));
    assert_eq!(status()["pipelines"][0]["devices"]["heard"], 2);

    send(&mut publisher, 0, 9);
    assert!(wait_until(Duration::from_secs(10), || !events("device.back").is_empty()), "log:\n{}", daemon.log());
    assert_eq!(events("device.back")[0]["device"], "dev0");
    assert_eq!(events("device.silent").len(), 1, "reported once, not at every status");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    dev1.join().unwrap();
    assert!(daemon.running());
}

/// The documented mosquitto ACL ("Who may publish what"), read from docs/topics.md itself: lathe
/// without its password is refused with a hint; with it, lathe serves the PLC gateway's
/// telemetry but not the operator's, and takes the operator's commands but not the gateway's.
#[test]
fn the_documented_broker_acl_lets_each_account_do_only_its_part() {
    let readme = std::fs::read_to_string(root().join("docs/topics.md")).unwrap();
    let start = readme.find("# /etc/mosquitto/acl").expect("the ACL example in docs/topics.md");
    let acl = &readme[start..start + readme[start..].find("```").unwrap()];
    // A test account that reads everything, to watch.
    let acl = format!("{acl}user observer\ntopic read #\n");
    let accounts = [("lathe-edge-7", "l"), ("plc-gateway", "g"), ("operator", "o"), ("observer", "w")];
    let Some(broker) = Broker::start_with_accounts(&accounts, &acl) else { return };
    let dir = temp_dir("acl");
    let base = config("edge-7", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"));

    let mut refused = Daemon::start(&dir, &base);
    assert!(
        wait_until(Duration::from_secs(10), || refused.log().contains("the broker refused our credentials")),
        "log:\n{}",
        refused.log()
    );
    refused.stop();

    std::fs::write(dir.join("password"), "l\n").unwrap();
    let with_login =
        format!("[mqtt]\nusername = \"lathe-edge-7\"\npassword_file = \"{}\"\n", dir.join("password").display());
    let daemon = Daemon::start(&dir, &base.replace("[mqtt]\n", &with_login));
    let out = Collector::new_as(broker.port, &["plant/#", "lathe/edge-7/#"], Some(("observer", "w")));
    assert!(
        wait_until(Duration::from_secs(10), || out.on("lathe/edge-7/status").iter().any(|s| s["state"] == "online")),
        "log:\n{}",
        daemon.log()
    );
    let rows = rows(&expected());
    let mut gateway = Publisher::new_as(broker.port, Some(("plc-gateway", "g")));
    let mut operator = Publisher::new_as(broker.port, Some(("operator", "o")));
    gateway.publish("plant/line1/dev0/telemetry", shuttle_message(&rows[0], 1));
    gateway.flush();
    operator.publish("plant/line1/dev0/telemetry", shuttle_message(&rows[1], 2));
    operator.flush();
    gateway.publish("plant/line1/dev0/telemetry", shuttle_message(&rows[2], 3));
    gateway.flush();
    assert!(out.wait_for("prediction", 2, Duration::from_secs(10)), "log:\n{}", daemon.log());
    // A command lathe takes is answered on its events topic (here: nothing trains, so refused).
    gateway.publish("lathe/edge-7/cmd/train", "");
    gateway.flush();
    operator.publish("lathe/edge-7/cmd/train", "{\"from\": \"operator\"}");
    operator.flush();
    let answered = || out.on("lathe/edge-7/events").into_iter().filter(|e| e["event"] == "command.refused").count();
    assert!(wait_until(Duration::from_secs(10), || answered() >= 1), "log:\n{}", daemon.log());
    std::thread::sleep(Duration::from_millis(500));
    let keys: Vec<u64> = out.on("prediction").iter().map(|p| p["key"].as_u64().unwrap()).collect();
    assert_eq!(keys, vec![1, 3], "the gateway's telemetry is served, the operator's is not");
    assert_eq!(answered(), 1, "the operator's command is taken, the gateway's is not");
    assert_eq!(out.on("plant/line1/dev0/telemetry").len(), 2, "the broker dropped the operator's telemetry");
}

/// Clients that connect to the metrics port and say nothing (a port scan, a slow-loris) hold
/// at most `MAX_CONNECTIONS` of the daemon's descriptors, which the store and the broker
/// connection need; predictions go on, and once they are gone a scrape works again.
#[test]
fn idle_clients_on_the_metrics_port_hold_few_descriptors_and_serving_goes_on() {
    let broker = Broker::start();
    let dir = temp_dir("metrics-idle");
    let port = free_port();
    let daemon = Daemon::start(&dir, &config_with_metrics("metricsidle", &broker, &dir, port));
    wait_online(broker.port, "metricsidle", &daemon);
    assert!(scrape(port, "/metrics").unwrap().starts_with("HTTP/1.1 200 OK"));
    let pid = daemon.pid().unwrap();
    let descriptors = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = descriptors();
    let idle: Vec<std::net::TcpStream> =
        (0..300).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    assert!(idle.len() >= 200, "only {} connections were made", idle.len());
    std::thread::sleep(Duration::from_secs(1)); // the daemon has accepted them all
    let held = descriptors().saturating_sub(before);
    let limit = lathe::service::metrics::MAX_CONNECTIONS + 4;
    assert!(held <= limit, "{} idle clients hold {held} of the daemon's descriptors (at most {limit})", idle.len());

    let out = Collector::new(broker.port, &["plant/line1/+/prediction"]);
    let rows = rows(&expected());
    let mut p = Publisher::new(broker.port);
    for (seq, row) in rows.iter().take(40).enumerate() {
        p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(row, seq));
    }
    p.flush();
    assert!(out.wait_for("prediction", 40, Duration::from_secs(20)), "serving goes on meanwhile");
    drop(idle);
    let scraped = wait_until(Duration::from_secs(15), || {
        scrape(port, "/metrics").is_ok_and(|m| m.contains("lathe_predictions_total{pipeline=\"shuttle\"} 40"))
    });
    assert!(scraped, "once the idle clients are gone a scrape works: {:?}", scrape(port, "/metrics"));
}

/// `[metrics] listen`: the Prometheus endpoint, scraped during an end-to-end run, counts what
/// was sent — predictions, rejections by reason, the latency histogram — and names the model.
#[test]
fn the_metrics_endpoint_counts_what_was_sent() {
    let broker = Broker::start();
    let dir = temp_dir("metrics");
    let port = free_port();
    let config = config_with_metrics("metricsd", &broker, &dir, port)
        .replace("key = \"/seq\" }", "key = \"/seq\", silent_after_s = 3600 }");
    let daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "metricsd", &daemon);
    let out = Collector::new(broker.port, &["plant/line1/+/prediction"]);
    let expected = expected();
    let rows = rows(&expected);
    let mut p = Publisher::new(broker.port);
    for (seq, row) in rows.iter().take(120).enumerate() {
        p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(row, seq));
    }
    p.publish("plant/line1/dev0/telemetry", "not json");
    p.publish("plant/line1/dev0/telemetry", r#"{"f1": 50}"#);
    p.flush();
    assert!(out.wait_for("prediction", 120, Duration::from_secs(20)));
    let scrape = |path: &str| scrape(port, path).unwrap();
    let value =
        |text: &str, series: &str| -> f64 { metric(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}")) };
    let ok = wait_until(Duration::from_secs(10), || {
        let m = scrape("/metrics");
        m.contains("lathe_messages_received_total{pipeline=\"shuttle\"} 122")
    });
    let m = scrape("/metrics");
    assert!(ok, "{m}");
    assert!(m.starts_with("HTTP/1.1 200 OK"));
    assert_eq!(value(&m, "lathe_predictions_total{pipeline=\"shuttle\"}"), 120.0);
    assert_eq!(value(&m, "lathe_messages_rejected_total{pipeline=\"shuttle\",reason=\"not_json\"}"), 1.0);
    assert_eq!(value(&m, "lathe_messages_rejected_total{pipeline=\"shuttle\",reason=\"missing_feature\"}"), 1.0);
    assert_eq!(value(&m, "lathe_prediction_latency_seconds_count{pipeline=\"shuttle\"}"), 120.0);
    assert_eq!(value(&m, "lathe_prediction_latency_seconds_bucket{pipeline=\"shuttle\",le=\"+Inf\"}"), 120.0);
    assert_eq!(value(&m, "lathe_broker_connected"), 1.0);
    assert_eq!(value(&m, &format!("lathe_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))), 1.0);
    assert!(m.contains("lathe_model_info{pipeline=\"shuttle\",model=\"shuttle-mlp\",version=\"1\""), "{m}");
    assert_eq!(value(&m, "lathe_devices{pipeline=\"shuttle\",state=\"heard\"}"), 4.0);
    assert_eq!(value(&m, "lathe_devices{pipeline=\"shuttle\",state=\"silent\"}"), 0.0);
    assert!(value(&m, "process_resident_memory_bytes") > 1e6 && value(&m, "process_open_fds") >= 3.0, "{m}");
    assert!(value(&m, "process_cpu_seconds_total") > 0.0 && value(&m, "process_start_time_seconds") > 1.7e9, "{m}");
    for family in ["lathe_training_runs_total", "lathe_model_swaps_total", "lathe_updates_total"] {
        assert!(m.contains(&format!("# TYPE {family} counter")), "{family}: {m}");
    }
    // Every metric the packaged Grafana dashboard queries is one the daemon exports.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("packaging/grafana-dashboard.json")).unwrap())
            .unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("lathe_") || word.starts_with("process_") {
                    queried.insert(word.trim_end_matches("_bucket").to_string());
                }
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    for family in &queried {
        assert!(
            m.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {family}, which is not exported:\n{m}"
        );
    }
    assert!(scrape("/other").starts_with("HTTP/1.1 404"));
    assert!(scrape("/healthz").starts_with("HTTP/1.1 200 OK"));
    assert!(scrape("/ready").starts_with("HTTP/1.1 200 OK"), "connected to the broker: ready");
}

/// A broker that speaks only MQTT 3.1.1, made of mosquitto and a front that refuses a v5
/// CONNECT as such a broker does (CONNACK return code 1 and close, MQTT 3.1.1 §3.1.2.2) and
/// relays the rest. It records the protocol level of each CONNECT; `cut` closes every
/// connection open, as a network drop would.
struct Mqtt311Only {
    port: u16,
    levels: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Mqtt311Only {
    fn start(to: u16) -> Mqtt311Only {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (levels, open) = (
            std::sync::Arc::<std::sync::Mutex<Vec<u8>>>::default(),
            std::sync::Arc::<std::sync::Mutex<Vec<TcpStream>>>::default(),
        );
        let (seen, conns) = (levels.clone(), open.clone());
        std::thread::spawn(move || {
            for mut client in listener.incoming().flatten() {
                // The CONNECT: type byte, remaining length (7 bits a byte), then the body,
                // whose 7th byte is the protocol level (after the length-prefixed "MQTT").
                let mut connect = vec![0u8; 1];
                if client.read_exact(&mut connect).is_err() {
                    continue;
                }
                let (mut remaining, mut shift) = (0usize, 0);
                loop {
                    let mut b = [0u8; 1];
                    if client.read_exact(&mut b).is_err() {
                        break;
                    }
                    connect.push(b[0]);
                    remaining |= usize::from(b[0] & 0x7f) << shift;
                    shift += 7;
                    if b[0] & 0x80 == 0 {
                        break;
                    }
                }
                let mut body = vec![0u8; remaining];
                if remaining < 7 || client.read_exact(&mut body).is_err() {
                    continue;
                }
                seen.lock().unwrap().push(body[6]);
                if body[6] != 4 {
                    let _ = client.write_all(&[0x20, 2, 0, 1]);
                    continue;
                }
                connect.extend_from_slice(&body);
                let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", to)) else { continue };
                if upstream.write_all(&connect).is_err() {
                    continue;
                }
                conns.lock().unwrap().extend([client.try_clone().unwrap(), upstream.try_clone().unwrap()]);
                for (mut from, mut to) in
                    [(client.try_clone().unwrap(), upstream.try_clone().unwrap()), (upstream, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Mqtt311Only { port, levels, open }
    }

    fn cut(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Brokers that speak only MQTT 3.1.1 are still found in plants (Ignition's MQTT
/// Distributor, Azure IoT Hub, old mosquitto). With the default `mqtt.protocol = "auto"`
/// lathe asks for MQTT 5, is refused, and serves over 3.1.1: the same predictions, and a
/// reconnect does not score a retained reading again (3.1.1 re-sends retained messages at
/// every subscribe, so a kept session is not subscribed again).
#[test]
fn a_broker_that_speaks_only_mqtt_3_1_1_is_served_over_3_1_1() {
    // The embedded broker answers the front's 3.1.1 retained-message replay differently.
    let Some(broker) = Broker::start_mosquitto("a retained reading replayed over MQTT 3.1.1") else { return };
    let front = Mqtt311Only::start(broker.port);
    let dir = temp_dir("mqtt311");
    let expected = expected();
    let rows = rows(&expected);
    let want = expected["shuttle-mlp"].as_array().unwrap();
    let config = config("v311", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"))
        .replace(&broker.url(), &format!("mqtt://127.0.0.1:{}", front.port))
        .replace("[mqtt]\n", "[mqtt]\nprotocol = \"auto\"\n"); // the default, named: a test run on 3.1.1 keeps it
                                                               // A gateway that publishes retained: the device's last reading waits on the broker.
    let mut publisher = Publisher::new(broker.port);
    publisher.publish_retained("plant/line1/dev9/telemetry", shuttle_message(&rows[0], 1000));
    publisher.flush();
    let predictions = Collector::new(broker.port, &["plant/line1/+/prediction"]);
    let events = Collector::new(broker.port, &["lathe/v311/events"]);
    let daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "v311", &daemon);

    let half = rows.len() / 2;
    let send = |publisher: &mut Publisher, seqs: std::ops::Range<usize>| {
        for seq in seqs {
            publisher.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(&rows[seq], seq));
        }
        publisher.flush();
    };
    send(&mut publisher, 0..half);
    // At least once: a message whose ack the cut lost is redelivered and answered again.
    let keys = || {
        predictions
            .on("plant/line1/")
            .iter()
            .filter_map(|p| p["key"].as_u64())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let answered = |n: usize| wait_until(Duration::from_secs(30), || keys().len() >= n);
    assert!(answered(half + 1), "{} of {}; log:\n{}", keys().len(), half + 1, daemon.log());

    // The link drops; lathe reconnects to the session the broker kept.
    front.cut();
    let connected = || events.on("lathe/v311/events").into_iter().filter(|e| e["event"] == "broker.connected").count();
    assert!(wait_until(Duration::from_secs(15), || connected() >= 2), "no reconnect; log:\n{}", daemon.log());
    send(&mut publisher, half..rows.len());
    assert!(answered(rows.len() + 1), "{} of {}; log:\n{}", keys().len(), rows.len() + 1, daemon.log());
    std::thread::sleep(Duration::from_millis(500)); // a second answer to the retained reading would be here

    let got = predictions.on("plant/line1/");
    let retained = got.iter().filter(|p| p["key"] == 1000).count();
    assert_eq!(retained, 1, "the retained reading is scored once, not again at the reconnect");
    // One cut: what was in flight then comes again once, nothing more.
    let mut times: BTreeMap<u64, usize> = BTreeMap::new();
    got.iter().filter_map(|p| p["key"].as_u64()).for_each(|k| *times.entry(k).or_default() += 1);
    assert!(
        times.values().all(|&n| n <= 2),
        "{} duplicates; answered 3 times or more: {:?}",
        got.len() - times.len(),
        times.iter().filter(|(_, &n)| n > 2).collect::<Vec<_>>()
    );
    for p in got.iter().filter(|p| p["key"] != 1000) {
        let seq = p["key"].as_u64().unwrap() as usize;
        let out: Vec<f64> = p["output"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        for (a, b) in out.iter().zip(want[seq].as_array().unwrap()) {
            assert!((a - b.as_f64().unwrap()).abs() <= 1e-5, "row {seq}: lathe {out:?} vs onnxruntime {:?}", want[seq]);
        }
    }
    // Asked for 5 first, then spoke 3.1.1, and said so.
    let levels = front.levels.lock().unwrap().clone();
    assert_eq!(levels.first(), Some(&5), "{levels:?}");
    assert!(levels.iter().filter(|&&l| l == 4).count() >= 2, "{levels:?}");
    assert!(
        events
            .on("lathe/v311/events")
            .iter()
            .filter(|e| e["event"] == "broker.connected")
            .all(|e| e["protocol"] == "3.1.1"),
        "{:?}",
        events.on("lathe/v311/events")
    );
    assert!(daemon.log().contains("Speaking MQTT 3.1.1 to the broker"), "{}", daemon.log());
}

/// A broker set up to keep no retained messages (mosquitto's `retain_available false`, as
/// some shared plant brokers are) refuses a retained last will at CONNECT and drops a client
/// that publishes retained. Before, lathe was refused for ever. Now it sends its will and its
/// status unretained and says so: it serves, a subscriber still hears "online" and, after a
/// kill -9, the will's "offline"; and `lathe push`, whose chunks must wait on the broker,
/// refuses with the reason.
#[test]
fn a_broker_that_keeps_no_retained_messages_is_served_and_push_says_why_it_cannot_be() {
    let Some(broker) = Broker::start_without_retained() else { return };
    let dir = temp_dir("noretain");
    let config = config("noretain", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe"))
        .replace("[mqtt]\n", "[mqtt]\nprotocol = \"auto\"\n"); // a 3.1.1 broker would not say why
    let status = Collector::new(broker.port, &["lathe/noretain/status"]);
    let predictions = Collector::new(broker.port, &["plant/line1/+/prediction"]);
    let mut daemon = Daemon::start(&dir, &config);
    let last_state = || status.on("lathe/noretain/status").last().map(|s| s["state"].clone());
    assert!(wait_until(Duration::from_secs(15), || last_state().is_some_and(|s| s == "online")), "{}", daemon.log());

    let expected = expected();
    let rows = rows(&expected);
    let mut publisher = Publisher::new(broker.port);
    for (seq, row) in rows.iter().enumerate().take(40) {
        publisher.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(row, seq));
    }
    publisher.flush();
    assert!(predictions.wait_for("prediction", 40, Duration::from_secs(20)), "log:\n{}", daemon.log());
    assert!(daemon.log().contains("keeps no retained messages"), "{}", daemon.log());
    daemon.kill();
    assert!(
        wait_until(Duration::from_secs(10), || last_state().is_some_and(|s| s == "offline")),
        "the will, unretained: {:?}",
        status.on("lathe/noretain/status")
    );

    let made = Command::new(LATHE).args(["keygen", "-o"]).arg(&dir).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let push = Command::new(LATHE)
        .arg("push")
        .arg(root().join("models/shuttle-mlp-1.lathe"))
        .arg("--key")
        .arg(dir.join("lathe.key"))
        .args(["--broker", &broker.url(), "--node", "noretain"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&push.stderr);
    assert!(!push.status.success() && stderr.contains("keeps no retained messages"), "{stderr}");
}
