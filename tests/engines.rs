//! tract and ONNX Runtime agree (feature `ort`; the library comes from `LATHE_ORT_LIBRARY`,
//! which `.ci/run` sets from the PyPI onnxruntime wheel).
#![cfg(feature = "ort")]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use lathe::engine::{Engine, EngineKind};

fn ort_library() -> PathBuf {
    PathBuf::from(std::env::var("LATHE_ORT_LIBRARY").expect("LATHE_ORT_LIBRARY: the path of libonnxruntime.so"))
}

#[test]
fn tract_and_onnx_runtime_agree_on_every_batch_size() {
    let expected = expected();
    let rows: Vec<f32> = rows(&expected).iter().flatten().map(|&x| x as f32).collect();
    let models = [
        ("shuttle-mlp", root().join("models/shuttle-mlp.onnx")),
        ("sklearn-mlp", root().join("tests/fixtures/sklearn-mlp.onnx")),
    ];
    for (name, path) in models {
        let bytes = std::fs::read(&path).unwrap();
        let tract = Engine::load(&bytes).unwrap();
        let ort =
            Engine::load_with(&bytes, &EngineKind::Ort { library: ort_library(), providers: vec![], strict: false })
                .unwrap();
        for batch in [1usize, 7, 64, 400] {
            let n = batch * 9;
            let (a, b) = (tract.run(&rows[..n]).unwrap(), ort.run(&rows[..n]).unwrap());
            assert_eq!(a.per_row, b.per_row, "{name}");
            for (o, (x, y)) in a.values.iter().zip(&b.values).enumerate() {
                for (i, (p, q)) in x.iter().zip(y).enumerate() {
                    assert!((p - q).abs() <= 1e-4, "{name} batch {batch} output {o}[{i}]: tract {p} vs ort {q}");
                }
            }
        }
    }
}

/// The conformance zoo (tests/fixtures/zoo): PyTorch (MLP, Conv1d, GRU, LSTM over windows),
/// scikit-learn, XGBoost, LightGBM and onnx.helper models, on both runtimes in this process,
/// at every batch size. Tree ensembles reach tract rewritten (`engine::ml_ops::trees_for_tract`)
/// and onnxruntime as exported.
#[test]
fn tract_and_onnx_runtime_agree_on_every_zoo_model() {
    for (name, z) in zoo() {
        let bytes = std::fs::read(root().join(format!("tests/fixtures/zoo/{name}.onnx"))).unwrap();
        let tract = Engine::load(&bytes).unwrap();
        let ort =
            Engine::load_with(&bytes, &EngineKind::Ort { library: ort_library(), providers: vec![], strict: false })
                .unwrap();
        assert_eq!(tract.signature, ort.signature, "{name}");
        let frames: Vec<f32> = z["frames"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
            .collect();
        let samples = lathe::engine::sliding_windows(&frames, tract.signature.features, tract.signature.frames);
        let len = tract.signature.sample_len();
        for batch in [1usize, 7, 64, samples.len() / len] {
            let input = &samples[..batch * len];
            let (a, b) = (tract.run(input).unwrap(), ort.run(input).unwrap());
            assert_eq!(a.per_row, b.per_row, "{name}");
            for (o, (x, y)) in a.values.iter().zip(&b.values).enumerate() {
                for (i, (p, q)) in x.iter().zip(y).enumerate() {
                    let tolerance = 1e-4 * p.abs().max(1.0);
                    assert!((p - q).abs() <= tolerance, "{name} batch {batch} output {o}[{i}]: tract {p} vs ort {q}");
                }
            }
        }
    }
}

#[test]
fn the_daemon_serves_through_onnx_runtime_when_configured() {
    let broker = Broker::start();
    let dir = temp_dir("ort-serve");
    let config = config("ortd", &broker, &dir.join("state"), &root().join("models/shuttle-mlp-1.lathe")).replace(
        "[[pipeline]]",
        &format!("[infer]\nengine = \"ort\"\nort_library = \"{}\"\n[[pipeline]]", ort_library().display()),
    );
    let daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "ortd", &daemon);
    let out = Collector::new(broker.port, &["plant/line1/+/prediction"]);
    let expected = expected();
    let want = expected["shuttle-mlp"].as_array().unwrap();
    let mut p = Publisher::new(broker.port);
    for (seq, row) in rows(&expected).iter().enumerate() {
        p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), shuttle_message(row, seq));
    }
    p.flush();
    assert!(out.wait_for("prediction", want.len(), Duration::from_secs(30)), "log:\n{}", daemon.log());
    for pred in out.on("plant/line1/") {
        let seq = pred["key"].as_u64().unwrap() as usize;
        for (a, b) in pred["output"].as_array().unwrap().iter().zip(want[seq].as_array().unwrap()) {
            assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-5, "row {seq}: {pred}");
        }
    }
}

#[test]
fn a_missing_onnx_runtime_library_is_a_clear_error() {
    let dir = temp_dir("ort-missing");
    let config = format!(
        "node = \"x\"\nstate_dir = \"state\"\n[infer]\nengine = \"ort\"\nort_library = \"/nonexistent/libonnxruntime.so\"\n\
         [[pipeline]]\nname = \"p\"\nmodel = \"{}\"\nsource = {{ topic = \"t/+\" }}\nsink = {{ topic = \"o/{{device}}\" }}\n",
        root().join("models/shuttle-mlp-1.lathe").display()
    );
    std::fs::write(dir.join("lathe.toml"), config).unwrap();
    let out = std::process::Command::new(LATHE)
        .args(["check", "--config", dir.join("lathe.toml").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot load ONNX Runtime from /nonexistent/libonnxruntime.so"), "{err}");
}

/// A fine-tuned bundle's model (full network, and LoRA merged into the weights) is still one
/// both runtimes serve identically.
#[test]
fn fine_tuned_models_give_the_same_outputs_in_tract_and_onnx_runtime() {
    use lathe::model::bundle::Bundle;
    use lathe::train::{cpu::Cpu, fine_tune, graph, net};
    let dir = temp_dir("ort-finetuned");
    let champion = Bundle::read(&root().join("models/shuttle-mlp-1.lathe")).unwrap();
    let csv = std::fs::read_to_string(faulty_csv(&dir)).unwrap();
    let outcome = fine_tune(&Cpu, &champion, &csv, "faulty.csv", &champion.manifest.training).unwrap();
    let full = outcome.challenger.expect("the full fine-tune is accepted").model;

    let onnx = std::fs::read(root().join("tests/fixtures/train/multiclass-adam.onnx")).unwrap();
    let tail = graph::tail_of(&onnx, "y").unwrap();
    let mut lora = net::Net::new(&Cpu, &tail.layers, net::Mode::Lora { rank: 2, alpha: 4.0, seed: 3 }, 16, 1).unwrap();
    let x: Vec<f32> = (0..16 * 9).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
    let y: Vec<f32> = (0..16).map(|i| (i % 3) as f32).collect();
    let adam = lathe::train::backend::Update::adam(0.05, 0.0, false);
    for _ in 0..20 {
        lora.train_step(&Cpu, &x, &y, lathe::train::backend::Loss::SoftmaxCrossEntropy, adam, None).unwrap();
    }
    let merged = graph::export(&onnx, &lora.weights(&Cpu, &tail.layers).unwrap()).unwrap();

    // The GRU forecaster's head, fine-tuned on windows; both engines run the GRU as exported.
    let gru = Bundle::read(&sequence_bundle(&dir)).unwrap();
    let late = std::fs::read_to_string(fixture("zoo/gru-head-w16-late.csv")).unwrap();
    let mut training = gru.manifest.training.clone();
    (training.learning_rate, training.batch, training.holdout) = (0.003, 16, 0.3);
    let mut gru = gru;
    gru.manifest.gate.significance = 0.2; // common::SEQUENCE_RUN says why
    let sequence = fine_tune(&Cpu, &gru, &late, "late", &training).unwrap();
    let sequence = sequence.challenger.expect("the sequence fine-tune is accepted").model;
    let windows = gru.validation_samples().unwrap();

    // A model grown from scratch (cold start): its own graph, standardisation and all.
    let names: Vec<String> = (1..=9).map(|i| format!("f{i}")).collect();
    let cold = lathe::model::manifest::ColdStart { hidden: vec![32, 16], min_rows: 0, classes: 2 };
    let placeholder =
        lathe::train::cold_start::placeholder("grown", lathe::model::Task::Binary, &names, &cold, 3).unwrap();
    let placeholder = placeholder.edited(|m| m.target = "anomaly".into()).unwrap();
    let validation = std::fs::read_to_string(root().join("models/shuttle-validation.csv")).unwrap();
    let data = lathe::train::data::load(&placeholder.manifest, &validation, 2).unwrap();
    let grown = lathe::train::fine_tune_on(
        &Cpu,
        &placeholder,
        data,
        "validation",
        &placeholder.manifest.training,
        None,
        &|| Ok(()),
    )
    .unwrap();
    let grown = grown.challenger.expect("the grown model beats the majority class").model;

    let rows = champion.validation_rows().unwrap();
    for (name, model, input) in [
        ("full", &full, &rows[..9 * 500]),
        ("lora", &merged, &x[..]),
        ("sequence", &sequence, &windows[..]),
        ("cold start", &grown, &rows[..]),
    ] {
        let tract = Engine::load(model).unwrap();
        let ort =
            Engine::load_with(model, &EngineKind::Ort { library: ort_library(), providers: vec![], strict: false })
                .unwrap();
        let (a, b) = (tract.run(input).unwrap(), ort.run(input).unwrap());
        assert_eq!(a.values[0].len(), b.values[0].len(), "{name}");
        for (p, q) in a.values[0].iter().zip(&b.values[0]) {
            // Relative above 1: the forecaster's outputs are hundreds of ppm.
            assert!((p - q).abs() <= 1e-4 * q.abs().max(1.0), "{name}: tract {p} vs ort {q}");
        }
    }
}

/// Execution providers: with the CPU-only library from the PyPI wheel, asking for CUDA under
/// `providers_policy = "strict"` is an error that names it; under "auto" the model loads on the
/// CPU and answers exactly as without providers.
#[test]
fn a_provider_the_library_lacks_is_an_error_when_strict_and_a_cpu_fallback_when_auto() {
    let bytes = std::fs::read(root().join("models/shuttle-mlp.onnx")).unwrap();
    let kind = |strict| EngineKind::Ort { library: ort_library(), providers: vec!["cuda".into()], strict };
    let err = Engine::load_with(&bytes, &kind(true)).err().expect("strict CUDA on a CPU-only library must fail");
    assert!(err.to_string().contains("\"cuda\" is not available"), "{err}");
    let auto = Engine::load_with(&bytes, &kind(false)).unwrap();
    let plain =
        Engine::load_with(&bytes, &EngineKind::Ort { library: ort_library(), providers: vec![], strict: false })
            .unwrap();
    let rows: Vec<f32> = rows(&expected()).iter().take(64).flatten().map(|&x| x as f32).collect();
    assert_eq!(auto.run(&rows).unwrap().values, plain.run(&rows).unwrap().values);
}

/// `lathe models promote --config` validates the candidate on the daemon's own engine: with
/// `engine = "ort"` and a file that is no ONNX Runtime, the promotion is refused (tract alone
/// would have passed it); with the real library it goes through.
#[test]
fn a_promotion_is_validated_on_the_configured_engine() {
    let dir = temp_dir("ort-promote");
    let state = dir.join("state");
    let lathe = |args: &[&str]| std::process::Command::new(LATHE).args(args).output().unwrap();
    let v2 = dir.join("shuttle-mlp-2.lathe");
    let made = bundle_create(&sample_model().0, &sample_model().1, "shuttle-mlp")
        .args(["--target", "anomaly", "--version", "2", "-o"])
        .arg(&v2)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let s = state.to_str().unwrap();
    for file in [root().join("models/shuttle-mlp-1.lathe"), v2] {
        assert!(lathe(&["models", "import", file.to_str().unwrap(), "--state-dir", s]).status.success());
    }
    let config = |library: &std::path::Path| {
        let path = dir.join("lathe.toml");
        let text = format!(
            "node = \"p\"\nstate_dir = \"{s}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n[infer]\nengine = \"ort\"\nort_library = \"{}\"\n\
             [[pipeline]]\nname = \"shuttle\"\nmodel = \"shuttle-mlp\"\nsource = {{ topic = \"a/+/t\" }}\nsink = {{ topic = \"a/p\" }}\n",
            library.display()
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let not_a_library = config(&root().join("models/shuttle-mlp.onnx"));
    let refused = lathe(&["models", "promote", "shuttle-mlp", "2", "--config", not_a_library.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("ONNX Runtime"), "{err}");
    let listed = String::from_utf8_lossy(&lathe(&["models", "list", "--state-dir", s]).stdout).to_string();
    assert!(listed.contains("v1 (champion)"), "{listed}");
    let real = config(&ort_library());
    let promoted = lathe(&["models", "promote", "shuttle-mlp", "2", "--config", real.to_str().unwrap()]);
    assert!(promoted.status.success(), "{}", String::from_utf8_lossy(&promoted.stderr));
    let listed = String::from_utf8_lossy(&lathe(&["models", "list", "--state-dir", s]).stdout).to_string();
    assert!(listed.contains("v2 (champion)"), "{listed}");
}
