//! The conformance zoo (tests/fixtures/zoo, made by `make_zoo.py` with PyTorch, scikit-learn
//! and onnx.helper, and by `make_trees.py` with scikit-learn, XGBoost and LightGBM): tract
//! computes what onnxruntime computed on every model, at every batch size, windows included;
//! each model becomes a bundle.

mod common;

use common::zoo;
use lathe::engine::sliding_windows;
use lathe::engine::Engine;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
        .collect()
}

#[test]
fn tract_matches_onnx_runtime_on_every_zoo_model_and_batch_size() {
    let models = zoo();
    assert!(models.len() >= 19, "the zoo has {} models", models.len());
    for (name, z) in models {
        let bytes = std::fs::read(common::root().join(format!("tests/fixtures/zoo/{name}.onnx"))).unwrap();
        let engine = Engine::load(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let window = z["window"].as_u64().unwrap() as usize;
        let f = z["features"].as_array().unwrap().len();
        assert_eq!((engine.signature.frames, engine.signature.features), (window, f), "{name}");
        let samples = sliding_windows(&floats(&z["frames"]), f, window);
        let n = samples.len() / (window * f);
        let expected: Vec<Vec<f32>> = z["outputs"].as_array().unwrap().iter().map(floats).collect();
        assert_eq!(expected[0].len() / expected[0].len().max(1) * n, n);
        let mut worst = 0f32;
        for batch in [1usize, 7, 64, n] {
            let mut got: Vec<Vec<f32>> = vec![Vec::new(); expected.len()];
            for chunk in samples.chunks(batch * window * f) {
                let out = engine.run(chunk).unwrap_or_else(|e| panic!("{name} batch {batch}: {e}"));
                for (o, values) in got.iter_mut().enumerate() {
                    values.extend_from_slice(&out.values[o]);
                }
            }
            for (o, (want, got)) in expected.iter().zip(&got).enumerate() {
                assert_eq!(want.len(), got.len(), "{name} output {o}");
                for (i, (p, q)) in want.iter().zip(got).enumerate() {
                    // 1e-4, relative above 1 (a CO2 forecast of 700 ppm is exact to ~1e-4 in f32).
                    let tolerance = 1e-4 * p.abs().max(1.0);
                    worst = worst.max((p - q).abs() / p.abs().max(1.0));
                    assert!((p - q).abs() <= tolerance, "{name} batch {batch} output {o}[{i}]: ort {p} vs tract {q}");
                }
            }
        }
        eprintln!("{name}: {n} samples agree at batch 1, 7, 64 and {n}; largest difference {worst:.1e}");
    }
}

/// A zoo model's validation frame `i` as a gateway would send it: each feature by name, and
/// `seq` (the source's key) = `i`.
fn message(z: &Value, i: usize) -> String {
    let mut doc: serde_json::Map<String, Value> = z["features"]
        .as_array()
        .unwrap()
        .iter()
        .zip(z["frames"][i].as_array().unwrap())
        .map(|(name, v)| (name.as_str().unwrap().to_string(), v.clone()))
        .collect();
    doc.insert("seq".into(), i.into());
    Value::Object(doc).to_string()
}

/// `lathe bundle create` for a zoo model with its own validation CSV, written to `dir`.
fn bundle(dir: &std::path::Path, name: &str, z: &Value) -> std::path::PathBuf {
    let out = dir.join(format!("{name}.lathe"));
    let zoo = common::root().join("tests/fixtures/zoo");
    let made = std::process::Command::new(common::LATHE)
        .args(["bundle", "create", "--json", "--trainable", "none", "--name", name])
        .args(["--task", z["task"].as_str().unwrap(), "--target", z["target"].as_str().unwrap(), "--model"])
        .arg(zoo.join(format!("{name}.onnx")))
        .arg("--data")
        .arg(zoo.join(format!("{name}.csv")))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(made.status.success(), "{name}: {}", String::from_utf8_lossy(&made.stderr));
    out
}

#[test]
fn every_zoo_model_becomes_a_bundle_judged_on_its_own_windows() {
    let dir = common::temp_dir("zoo-bundles");
    for (name, z) in zoo() {
        let path = bundle(&dir, &name, &z);
        let b = lathe::model::Bundle::read(&path).unwrap();
        let window = z["window"].as_u64().unwrap() as usize;
        let frames = z["frames"].as_array().unwrap().len();
        assert_eq!(b.manifest.window, window, "{name}");
        // A classifier trained on class names keeps them, in the order of its indices.
        let classes: Vec<&str> =
            z["classes"].as_array().map(|c| c.iter().map(|v| v.as_str().unwrap()).collect()).unwrap_or_default();
        assert_eq!(b.manifest.classes, classes, "{name}");
        // One baseline row per sample: a window of 16 needs 15 rows before its first.
        assert_eq!(b.manifest.baseline.rows, frames - (window - 1), "{name}");
        let metric = match z["task"].as_str().unwrap() {
            "regression" => "mae",
            _ => "accuracy",
        };
        let value = b.manifest.baseline.metrics[metric];
        eprintln!("{name}: window {window}, {metric} {value:.4} on {} samples", b.manifest.baseline.rows);
        match metric {
            // CO2 forecasts one step ahead (ppm): persistence scores 23.8 on these rows.
            "mae" => assert!(value < 60.0, "{name}: mae {value}"),
            _ => assert!(value > 0.6, "{name}: accuracy {value}"),
        }
    }
}

#[test]
fn a_sequence_model_must_be_served_with_its_window() {
    let dir = common::temp_dir("zoo-window-config");
    let z = &zoo().into_iter().find(|(n, _)| n == "torch-gru-w16").unwrap().1;
    let model = bundle(&dir, "torch-gru-w16", z);
    let check = |extra: &str| {
        let broker_url = "mqtt://127.0.0.1:1";
        let config = format!(
            "node = \"w\"\nstate_dir = \"{}\"\n[mqtt]\nurl = \"{broker_url}\"\n[[pipeline]]\nname = \"co2\"\nmodel = \"{}\"\n\
             source = {{ topic = \"plant/+/occupancy\", key = \"/seq\" }}\nsink = {{ topic = \"plant/{{device}}/co2\" }}\n{extra}",
            dir.join("state").display(),
            model.display()
        );
        let path = dir.join("lathe.toml");
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(common::LATHE).arg("check").arg("--config").arg(&path).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, text) = check("window = { size = 16 }\n");
    assert!(ok, "{text}");
    let (ok, text) = check("");
    assert!(!ok && text.contains("add window = { size = 16 }"), "{text}");
    let (ok, text) = check("window = { size = 8 }\n");
    assert!(!ok && text.contains("takes windows of 16 frames"), "{text}");
    // PyTorch's GRU forecaster ends in a residual Add (last reading + the head's change): no
    // dense tail to fine-tune, and both `lathe check` and `bundle create` name that node.
    let (ok, text) = check("window = { size = 16 }\n[pipeline.train]\ntrigger = []\n");
    assert!(!ok && text.contains("node \"/Add\" (Add)"), "{text}");
    let refused = std::process::Command::new(common::LATHE)
        .args(["bundle", "create", "--task", "regression", "--target", "next_co2", "--name", "g", "--model"])
        .arg(common::root().join("tests/fixtures/zoo/torch-gru-w16.onnx"))
        .arg("--data")
        .arg(common::root().join("tests/fixtures/zoo/torch-gru-w16.csv"))
        .arg("-o")
        .arg(dir.join("g.lathe"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("\"/Add\"") && err.contains("--trainable none"), "{err}");
}

/// Two devices stream occupancy frames, interleaved, to each sequence model's pipeline (GRU,
/// LSTM, Conv1d, the GRU with a dense head): each device's first 15 frames only fill its
/// window; every later frame gets the prediction onnxruntime computed for the window ending
/// on it.
#[test]
fn sequence_models_serve_each_devices_last_frames_as_onnx_runtime_computes_them() {
    let broker = common::Broker::start();
    let dir = common::temp_dir("zoo-window-serve");
    let models: Vec<(String, Value)> = zoo().into_iter().filter(|(_, z)| z["window"] != 1).collect();
    assert_eq!(models.len(), 4);
    let mut config = format!(
        "node = \"seq\"\nstate_dir = \"{}\"\n[mqtt]\nurl = \"{}\"\n",
        dir.join("state").display(),
        broker.url()
    );
    for (name, z) in &models {
        let model = bundle(&dir, name, z);
        config += &format!(
            "[[pipeline]]\nname = \"{name}\"\nmodel = \"{}\"\nwindow = {{ size = 16 }}\n\
             source = {{ topic = \"plant/+/occupancy-{name}\", key = \"/seq\" }}\nsink = {{ topic = \"plant/{{device}}/{name}\" }}\n",
            model.display()
        );
    }
    let mut daemon = common::Daemon::start(&dir, &config);
    common::wait_online(broker.port, "seq", &daemon);
    let sinks: Vec<String> = models.iter().map(|(name, _)| format!("plant/+/{name}")).collect();
    let topics: Vec<&str> = sinks.iter().map(String::as_str).chain(["lathe/seq/status"]).collect();
    let out = common::Collector::new(broker.port, &topics);
    // Device a streams each model's validation frames; device b the same, interleaved with a.
    let mut p = common::Publisher::new(broker.port);
    for (name, z) in &models {
        for i in 0..z["frames"].as_array().unwrap().len() {
            for device in ["a", "b"] {
                p.publish(&format!("plant/{device}/occupancy-{name}"), message(z, i));
            }
        }
    }
    p.flush();
    for (name, z) in &models {
        let frames = z["frames"].as_array().unwrap();
        let per_model = 2 * (frames.len() - 15);
        assert!(
            out.wait_for(name, per_model, std::time::Duration::from_secs(60)),
            "{name}: {} of {per_model} predictions; log:\n{}",
            out.count(name),
            daemon.log()
        );
        let expected: Vec<f64> = z["outputs"][0].as_array().unwrap().iter().map(|r| r[0].as_f64().unwrap()).collect();
        for device in ["a", "b"] {
            let got: Vec<Value> = out.on(&format!("plant/{device}/{name}"));
            assert_eq!(got.len(), frames.len() - 15, "{name} {device}");
            for prediction in got {
                let key = prediction["key"].as_u64().unwrap() as usize;
                assert!(key >= 15, "{name}: frame {key} cannot end a window of 16");
                let (got, want) = (prediction["output"][0].as_f64().unwrap(), expected[key - 15]);
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{name} {device} frame {key}: {got} vs ort {want}"
                );
            }
        }
    }
    assert!(
        common::wait_until(std::time::Duration::from_secs(15), || {
            out.on("lathe/seq/status").last().is_some_and(|s| {
                s["pipelines"].as_array().unwrap().iter().all(|p| p["counters"]["window_filling"] == 30)
            })
        }),
        "{:?}",
        out.on("lathe/seq/status").last()
    );
    assert!(daemon.stop());
}

#[test]
fn a_model_with_an_operator_only_onnx_runtime_knows_is_refused_when_bundled() {
    let dir = common::temp_dir("zoo-contrib");
    let (_, data) = common::sample_model();
    let out = common::bundle_create(&common::root().join("tests/fixtures/zoo/unsupported-contrib-op.onnx"), &data, "c")
        .args(["--target", "anomaly", "-o"])
        .arg(dir.join("c.lathe"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("com.microsoft.FusedMatMul"), "{err}");
    assert!(!dir.join("c.lathe").exists());
}

/// Tree ensembles served by the daemon: an XGBoost classifier reads Shuttle's sensors and a
/// LightGBM regressor forecasts a room's CO2, each device's message answered with what
/// onnxruntime computes on the exporter's own graph (tract runs it rewritten).
#[test]
fn tree_ensembles_are_served_as_onnx_runtime_computes_them() {
    let broker = common::Broker::start();
    let dir = common::temp_dir("zoo-trees-serve");
    let models: Vec<(String, Value)> =
        zoo().into_iter().filter(|(n, _)| n == "xgboost-classifier" || n == "lightgbm-regressor").collect();
    assert_eq!(models.len(), 2);
    let mut config = format!(
        "node = \"trees\"\nstate_dir = \"{}\"\n[mqtt]\nurl = \"{}\"\n",
        dir.join("state").display(),
        broker.url()
    );
    for (name, z) in &models {
        config += &format!(
            "[[pipeline]]\nname = \"{name}\"\nmodel = \"{}\"\n\
             source = {{ topic = \"plant/+/{name}/in\", key = \"/seq\" }}\nsink = {{ topic = \"plant/{{device}}/{name}/out\" }}\n",
            bundle(&dir, name, z).display()
        );
    }
    let mut daemon = common::Daemon::start(&dir, &config);
    common::wait_online(broker.port, "trees", &daemon);
    let out = common::Collector::new(broker.port, &["plant/+/+/out"]);
    let mut p = common::Publisher::new(broker.port);
    for (name, z) in &models {
        for i in 0..z["frames"].as_array().unwrap().len() {
            p.publish(&format!("plant/dev{}/{name}/in", i % 3), message(z, i));
        }
    }
    p.flush();
    for (name, z) in &models {
        let frames = z["frames"].as_array().unwrap().len();
        assert!(
            out.wait_for(&format!("/{name}/out"), frames, std::time::Duration::from_secs(60)),
            "{name}: {} of {frames} predictions; log:\n{}",
            out.count(&format!("/{name}/out")),
            daemon.log()
        );
        // The served output: the class probabilities of a classifier, the forecast of a regressor.
        let served = if z["task"] == "binary" { &z["outputs"][1] } else { &z["outputs"][0] };
        for prediction in out.on(&format!("/{name}/out")) {
            let key = prediction["key"].as_u64().unwrap() as usize;
            let want = served[key].as_array().unwrap();
            let got = prediction["output"].as_array().unwrap();
            assert_eq!(got.len(), want.len(), "{name} {prediction}");
            for (g, w) in got.iter().zip(want) {
                let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{name} message {key}: {g} vs ort {w}");
            }
        }
    }
    assert!(daemon.stop());
}

/// A tree regressor lathe cannot hand to tract is refused with the reason, not tract's
/// "Unimplemented": here the zoo's forest with a `MAX` aggregate, and with a post transform.
#[test]
fn a_tree_regressor_of_a_shape_lathe_cannot_read_is_refused_with_the_reason() {
    use prost::Message;
    let bytes = std::fs::read(common::root().join("tests/fixtures/zoo/sklearn-forest-regressor.onnx")).unwrap();
    for (name, value, reason) in [
        ("aggregate_function", "MAX", "aggregate_function MAX is not read"),
        ("post_transform", "PROBIT", "post_transform PROBIT is not read"),
    ] {
        let mut model = tract_onnx::pb::ModelProto::decode(bytes.as_slice()).unwrap();
        let node = &mut model.graph.as_mut().unwrap().node[0];
        assert_eq!(node.op_type, "TreeEnsembleRegressor");
        node.attribute.retain(|a| a.name != name);
        node.attribute.push(tract_onnx::pb::AttributeProto {
            name: name.into(),
            r#type: 3,
            s: value.as_bytes().to_vec(),
            ..Default::default()
        });
        let err = Engine::load(&model.encode_to_vec()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("TreeEnsembleRegressor") && err.contains(reason), "{value}: {err:?}");
    }
}

/// A classifier trained on class names, end to end: the daemon serves it (predictions carry
/// the class index, in the order of the bundle's `classes`), and late labels that name the
/// class are joined to those predictions; a name the model does not have is counted as
/// unusable.
#[test]
fn a_classifier_trained_on_class_names_is_served_and_labelled_by_name() {
    let broker = common::Broker::start();
    let dir = common::temp_dir("zoo-names");
    let name = "sklearn-logistic-names";
    let z = zoo().into_iter().find(|(n, _)| n == name).unwrap().1;
    let bundle = bundle(&dir, name, &z);
    let classes: Vec<String> = lathe::model::Bundle::read(&bundle).unwrap().manifest.classes;
    assert_eq!(classes, ["fault", "ok"]);
    let config = format!(
        "node = \"names\"\nstate_dir = \"{}\"\n[mqtt]\nurl = \"{}\"\n[[pipeline]]\nname = \"p\"\nmodel = \"{}\"\n\
         source = {{ topic = \"plant/+/in\", key = \"/seq\" }}\nsink = {{ topic = \"plant/{{device}}/out\" }}\n\
         labels = {{ topic = \"plant/+/label\", key = \"/seq\", value = \"/state\" }}\n",
        dir.join("state").display(),
        broker.url(),
        bundle.display()
    );
    let mut daemon = common::Daemon::start(&dir, &config);
    common::wait_online(broker.port, "names", &daemon);
    let out = common::Collector::new(broker.port, &["plant/+/out", "lathe/names/status"]);
    // The validation CSV holds each row's class by name.
    let csv = std::fs::read_to_string(common::root().join(format!("tests/fixtures/zoo/{name}.csv"))).unwrap();
    let truth: Vec<String> = csv.lines().skip(1).map(|l| l.rsplit(',').next().unwrap().to_string()).collect();
    let frames = z["frames"].as_array().unwrap();
    let mut p = common::Publisher::new(broker.port);
    for i in 0..frames.len() {
        p.publish(&format!("plant/dev{}/in", i % 2), message(&z, i));
    }
    p.flush();
    assert!(out.wait_for("/out", frames.len(), std::time::Duration::from_secs(60)), "log:\n{}", daemon.log());
    // onnxruntime's probabilities, columns in the order of `classes`, and its label by index
    // and by name.
    for prediction in out.on("/out") {
        let key = prediction["key"].as_u64().unwrap() as usize;
        let (got, want) = (&prediction["output"], &z["outputs"][1][key]);
        for c in 0..2 {
            let (g, w) = (got[c].as_f64().unwrap(), want[c].as_f64().unwrap());
            assert!((g - w).abs() <= 1e-4, "message {key}: {got} vs ort {want}");
        }
        let label = z["outputs"][0][key][0].as_f64().unwrap() as usize;
        assert_eq!((&prediction["class"], &prediction["class_name"]), (&label.into(), &classes[label].as_str().into()));
    }
    for (i, state) in truth.iter().enumerate() {
        p.publish(&format!("plant/dev{}/label", i % 2), serde_json::json!({"seq": i, "state": state}).to_string());
    }
    p.publish("plant/dev0/label", serde_json::json!({"seq": 0, "state": "broken"}).to_string());
    p.flush();
    let joined = |s: &Value| s["pipelines"][0]["drift"]["performance"].clone();
    assert!(
        common::wait_until(std::time::Duration::from_secs(30), || {
            out.on("lathe/names/status")
                .last()
                .is_some_and(|s| joined(s)["labels_joined"] == truth.len() && joined(s)["labels_unmatched"] == 1)
        }),
        "{:?}\nlog:\n{}",
        out.on("lathe/names/status").last().map(joined),
        daemon.log()
    );
    assert!(daemon.stop());
}

/// A device's window outlives the daemon: a reload hands it to the next run, and a clean stop
/// saves it for a start within `window.resume_within`, so the first frames after either are
/// answered at once, with the history before them. Saved windows older than that are dropped,
/// and each device fills its window again.
#[test]
fn a_restart_or_a_reload_resumes_each_devices_window() {
    let broker = common::Broker::start();
    let dir = common::temp_dir("zoo-window-resume");
    let name = "gru-head-w16";
    let z = zoo().into_iter().find(|(n, _)| n == name).unwrap().1;
    let model = bundle(&dir, name, &z);
    let config = |resume: &str| {
        format!(
            "node = \"resume\"\nstate_dir = \"{}\"\n[mqtt]\nurl = \"{}\"\n[[pipeline]]\nname = \"co2\"\nmodel = \"{}\"\n\
             window = {{ size = 16, resume_within = \"{resume}\" }}\n\
             source = {{ topic = \"plant/+/occupancy\", key = \"/seq\" }}\nsink = {{ topic = \"plant/{{device}}/co2\" }}\n",
            dir.join("state").display(),
            broker.url(),
            model.display()
        )
    };
    let out = common::Collector::new(broker.port, &["plant/+/co2"]);
    let mut p = common::Publisher::new(broker.port);
    let mut send = |frames: std::ops::Range<usize>| {
        for i in frames {
            p.publish("plant/a/occupancy", message(&z, i));
        }
        p.flush();
    };
    // Each prediction is onnxruntime's for the window of the 16 frames ending on its key.
    let check = |n: usize, daemon: &common::Daemon| {
        assert!(out.wait_for("co2", n, std::time::Duration::from_secs(30)), "{}\n{}", out.count("co2"), daemon.log());
        for prediction in out.on("co2") {
            let key = prediction["key"].as_u64().unwrap() as usize;
            let (got, want) =
                (prediction["output"][0].as_f64().unwrap(), z["outputs"][0][key - 15][0].as_f64().unwrap());
            assert!((got - want).abs() <= 1e-4 * want.abs(), "frame {key}: {got} vs ort {want}");
        }
    };
    let saved = dir.join("state/windows/co2.bin");

    let mut daemon = common::Daemon::start(&dir, &config("10m"));
    common::wait_online(broker.port, "resume", &daemon);
    send(0..20);
    check(5, &daemon);
    assert!(daemon.stop());
    assert!(saved.exists(), "a clean stop saves the windows");

    let mut daemon = common::Daemon::start(&dir, &config("10m"));
    common::wait_online(broker.port, "resume", &daemon);
    assert!(!saved.exists(), "read once, then removed");
    send(20..25);
    check(10, &daemon);
    assert!(daemon.log().contains("Resumed the windows saved"), "{}", daemon.log());

    // A reload that changes the pipeline's settings rebuilds it; its windows go with it.
    let path = dir.join("lathe.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace("resume_within = \"10m\"", "resume_within = \"11m\"");
    std::fs::write(&path, text).unwrap();
    daemon.hangup();
    assert!(
        common::wait_until(std::time::Duration::from_secs(15), || daemon.log().contains("Reloaded")),
        "{}",
        daemon.log()
    );
    send(25..30);
    check(15, &daemon);
    assert!(daemon.stop());

    // Saved longer ago than resume_within: the next 15 frames only fill the window again.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut daemon = common::Daemon::start(&dir, &config("1s"));
    common::wait_online(broker.port, "resume", &daemon);
    send(30..46);
    check(16, &daemon);
    let keys: Vec<u64> = out.on("co2").iter().map(|p| p["key"].as_u64().unwrap()).collect();
    assert_eq!(keys.iter().filter(|&&k| k >= 30).collect::<Vec<_>>(), [&45], "only frame 45 ends a full window");
    assert!(daemon.log().contains("older than window.resume_within"), "{}", daemon.log());
    assert!(daemon.stop());
}
