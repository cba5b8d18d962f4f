//! Cold start over a real broker: a pipeline with no model publishes nothing while it stores
//! rows and their labels, grows version 1 from scratch once it has `min_rows`, and from then
//! on serves it like any bundle.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

const FEATURES: &str = r#"["f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9"]"#;

fn accuracy_of(predictions: &[Value], truth: &std::collections::HashMap<u64, u8>) -> f64 {
    let right = predictions
        .iter()
        .filter(|p| {
            let key = p["key"].as_u64().or_else(|| p["key"].as_str().and_then(|k| k.parse().ok()));
            p["class"].as_u64().map(|c| c as u8) == key.and_then(|k| truth.get(&k)).copied()
        })
        .count();
    right as f64 / predictions.len() as f64
}

/// 1,200 Shuttle rows with their labels reach a pipeline with `model = { cold_start = … }`:
/// nothing is published for them; version 1 is grown, gated against the majority class, and
/// promoted; the next 1,000 rows are answered by it, within 2 points of the accuracy of the
/// sample model trained offline on 34,000 rows.
#[test]
fn a_pipeline_with_no_model_grows_one_from_its_labelled_rows_and_then_serves_it() {
    let broker = common::Broker::start();
    let dir = common::temp_dir("coldstart");
    let node = "coldstart";
    let config = common::config(node, &broker, &dir.join("state"), std::path::Path::new("unused.lathe"))
        .replace(
            "model = \"unused.lathe\"",
            &format!("model = {{ cold_start = {{ task = \"binary\", features = {FEATURES}, hidden = [32, 16], min_rows = 1000 }} }}"),
        )
        + "labels = { topic = \"plant/line1/+/label\", key = \"/seq\", value = \"/anomaly\", window = 200 }\n"
        + "[pipeline.train]\ntrigger = []\ntrial = \"5s\"\n";
    let daemon = common::Daemon::start(&dir, &config);
    common::wait_online(broker.port, node, &daemon);
    let events = format!("lathe/{node}/events");
    let out = common::Collector::new(broker.port, &["plant/line1/+/prediction", &events]);
    let mut publisher = common::Publisher::new(broker.port);
    let rows = common::unseen();
    let truth: std::collections::HashMap<u64, u8> = rows.iter().enumerate().map(|(i, (_, y))| (i as u64, *y)).collect();
    let send = |publisher: &mut common::Publisher, from: usize, to: usize, labels: bool| {
        for (seq, (row, _)) in rows.iter().enumerate().take(to).skip(from) {
            publisher.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), common::shuttle_message(row, seq));
        }
        publisher.flush();
        if labels {
            std::thread::sleep(Duration::from_millis(500)); // the samples reach the store
            for (seq, (_, y)) in rows.iter().enumerate().take(to).skip(from) {
                publisher.publish(
                    &format!("plant/line1/dev{}/label", seq % 4),
                    json!({"seq": seq, "anomaly": y}).to_string(),
                );
            }
            publisher.flush();
        }
    };
    let named = |step: &str| -> Vec<Value> { out.on(&events).into_iter().filter(|e| e["event"] == step).collect() };

    // 600 labelled rows: stored, not answered, no run yet.
    send(&mut publisher, 0, 600, true);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(out.count("prediction"), 0, "the placeholder published; log:\n{}", daemon.log());
    assert!(named("train.started").is_empty(), "a run before min_rows; log:\n{}", daemon.log());

    // 600 more: past min_rows, the run grows version 1 and promotes it.
    send(&mut publisher, 600, 1200, true);
    assert!(
        common::wait_until(Duration::from_secs(90), || !named("trial.started").is_empty()),
        "no promotion; events {:?}\nlog:\n{}",
        out.on(&events).iter().map(|e| (e["event"].clone(), e["message"].clone())).collect::<Vec<_>>(),
        daemon.log()
    );
    assert_eq!(out.count("prediction"), 0, "nothing was answered before version 1");
    let accepted = named("train.accepted").remove(0);
    let run = &accepted["run"];
    eprintln!("{}", run["outcome"]);
    assert_eq!((run["version"].as_u64(), run["output_version"].as_u64()), (Some(0), Some(1)), "{run:#}");
    assert!(run["outcome"].as_str().unwrap().contains("the champion to beat was the majority class"), "{run:#}");
    assert_eq!(run["hyperparameters"]["trainable"], "full");
    assert!(run["gate"]["challenger_holdout"]["f1"].as_f64().unwrap() > 0.8, "{run:#}");
    let grown = lathe::model::Bundle::read(&dir.join("state/registry/shuttle/shuttle-1.lathe")).unwrap();
    assert_eq!((grown.manifest.cold_start.as_ref(), grown.manifest.baseline.rows), (None, 240));

    // Version 1 answers new rows, as well as the model trained offline on far more data.
    std::thread::sleep(Duration::from_secs(2)); // the swapper loads it (it polls every 250 ms)
    send(&mut publisher, 1200, 2200, false);
    assert!(out.wait_for("prediction", 1000, Duration::from_secs(30)), "log:\n{}", daemon.log());
    let predictions = out.on("plant/line1/");
    assert!(predictions.iter().all(|p| p["version"] == 1), "{:?}", predictions.first());
    let ours = accuracy_of(&predictions, &truth);
    let offline = {
        let bundle = lathe::model::Bundle::read(&common::root().join("models/shuttle-mlp-1.lathe")).unwrap();
        let engine = lathe::engine::Engine::load(&bundle.model).unwrap();
        let x: Vec<f32> = rows[1200..2200].iter().flat_map(|(r, _)| r.iter().map(|&v| v as f32)).collect();
        let out = engine.run(&x).unwrap();
        (0..1000).filter(|&i| (out.row(0, i)[1] >= 0.5) == (rows[1200 + i].1 == 1)).count() as f64 / 1000.0
    };
    eprintln!("accuracy on rows 1200..2200: grown on the device {ours:.4}, trained offline {offline:.4}");
    assert!(ours >= offline - 0.02, "grown {ours} vs offline {offline}");
    let mut daemon = daemon;
    assert!(daemon.stop());
}
