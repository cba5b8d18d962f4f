//! Federated averaging over a real broker: four daemons, each fine-tuning the sample model on
//! its own slice of a fleet-wide sensor fault, share what they accepted; `lathe aggregate
//! --broker` collects the round, leaves out a compromised device's poisoned delta and an
//! impostor's unsigned one, and writes one model at least as good as each, pushed canary first.

mod common;

use std::process::Command;
use std::time::Duration;

use serde_json::json;

#[test]
fn four_devices_share_and_the_aggregate_beats_each_leaving_out_a_poisoned_and_an_unsigned_one() {
    let Some(broker) = common::Broker::start_mosquitto("the devices share over a broker's retained messages") else {
        return;
    };
    let dir = common::temp_dir("federated");
    let rows = common::faulty(&common::unseen());
    let model = common::root().join("models/shuttle-mlp-1.lathe");
    let central = dir.join("central");
    let made = Command::new(env!("CARGO_BIN_EXE_lathe")).arg("keygen").arg("-o").arg(&central).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let mut daemons = Vec::new();
    for d in 0..4usize {
        let node = format!("fed{d}");
        let config = common::config(&node, &broker, &dir.join(&node), &model).replace("line1", &format!("line{d}"))
            + &format!("labels = {{ topic = \"plant/line{d}/+/label\", key = \"/seq\", value = \"/anomaly\" }}\n")
            + "[pipeline.train]\ntrigger = []\nmin_rows = 500\nshare = true\ntrial = \"3s\"\n"
            + &format!(
                "[update]\ntrusted_keys = [\"{}\"]\ngroups = [\"fleet\"]\ncompatible = \"x86-test\"\n",
                central.with_extension("pub").display()
            );
        let run = dir.join(format!("run{d}"));
        std::fs::create_dir_all(&run).unwrap();
        let daemon = common::Daemon::start(&run, &config);
        common::wait_online(broker.port, &node, &daemon);
        daemons.push(daemon);
    }
    let events = common::Collector::new(broker.port, &["lathe/+/events", "lathe/+/status"]);
    let mut publisher = common::Publisher::new(broker.port);
    // Each device sees its own 700 rows of the fault, then is told to fine-tune.
    for d in 0..4usize {
        let slice = &rows[d * 700..(d + 1) * 700];
        for (i, (row, _)) in slice.iter().enumerate() {
            publisher.publish(&format!("plant/line{d}/dev{}/telemetry", i % 3), common::shuttle_message(row, i));
        }
        publisher.flush();
        std::thread::sleep(Duration::from_millis(700));
        for (i, (_, y)) in slice.iter().enumerate() {
            publisher
                .publish(&format!("plant/line{d}/dev{}/label", i % 3), json!({"seq": i, "anomaly": y}).to_string());
        }
        publisher.flush();
    }
    std::thread::sleep(Duration::from_secs(1));
    for d in 0..4 {
        publisher.publish(&format!("lathe/fed{d}/cmd/train"), json!({"pipeline": "shuttle"}).to_string());
    }
    publisher.flush();
    let accepted = || events.on("lathe/").iter().filter(|e| e["event"] == "train.accepted").count();
    assert!(
        common::wait_until(Duration::from_secs(120), || accepted() == 4),
        "{} of 4 accepted; events {:?}",
        accepted(),
        events.on("lathe/").iter().map(|e| (e["event"].clone(), e["message"].clone())).collect::<Vec<_>>()
    );

    // An impostor shares a copy of fed0's fine-tune as its own, signed by a key no device holds.
    let fed0 = lathe::model::Bundle::read(&dir.join("fed0/registry/shuttle-mlp/shuttle-mlp-2.lathe")).unwrap();
    let mut forged = fed0.clone().edited(|m| m.version = 7).unwrap();
    let rogue = lathe::trust::signing::generate().unwrap();
    lathe::trust::signing::sign_bundle(&mut forged, &rogue);
    publisher.publish_retained("lathe/rogue/share/shuttle", forged.to_bytes().unwrap());
    publisher.flush();
    // The centre knows its devices' keys (each device's update.device_key, here state_dir/device.key).
    let keys = dir.join("device-keys");
    std::fs::create_dir_all(&keys).unwrap();
    for d in 0..4 {
        std::fs::copy(dir.join(format!("fed{d}/device.pub")), keys.join(format!("fed{d}.pub"))).unwrap();
    }
    // A fifth device, known to the centre but compromised, shares a poisoned fine-tune: the last
    // layer inverted and tripled, claiming more rows than all the others together.
    let parent = lathe::model::Bundle::read(&model).unwrap();
    let output = &parent.manifest.outputs[parent.manifest.primary_output];
    let mut layers = lathe::train::graph::tail_of(&parent.model, output).unwrap().layers;
    let last = layers.len() - 1;
    layers[last].weight.iter_mut().for_each(|w| *w *= -3.0);
    let mut lineage = fed0.manifest.lineage.clone();
    lineage.fine_tune.iter_mut().for_each(|f| f.rows_trained = 5_000);
    let poisoned = lathe::train::graph::export(&parent.model, &layers).unwrap();
    let mut poisoned =
        lathe::model::bundle::derive(&parent, poisoned, parent.manifest.training.clone(), lineage).unwrap();
    let compromised = dir.join("device-keys/fed4");
    let made = Command::new(env!("CARGO_BIN_EXE_lathe")).arg("keygen").arg("-o").arg(&compromised).output().unwrap();
    assert!(made.status.success());
    let key = lathe::trust::signing::read_signing_key(&compromised.with_extension("key")).unwrap();
    std::fs::remove_file(compromised.with_extension("key")).unwrap(); // the device keeps its secret
    lathe::trust::signing::sign_bundle(&mut poisoned, &key);
    publisher.publish_retained("lathe/fed4/share/shuttle", poisoned.to_bytes().unwrap());
    publisher.flush();

    let out = dir.join("aggregate.lathe");
    let run = Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(["aggregate", "--broker", &broker.url(), "--seconds", "3", "--min-devices", "4", "--parent"])
        .arg(&model)
        .arg("--device-keys")
        .arg(&keys)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap_or_default();
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{said}\n{report:#}");
    let included: Vec<bool> =
        report["children"].as_array().unwrap().iter().map(|c| c["included"].as_bool().unwrap()).collect();
    assert_eq!(included, [true, true, true, true, false], "fed0..fed3 in, fed4's poison out: {report:#}");
    assert!(said.contains("rogue: shuttle-mlp-7: bundle.sig was not made by a trusted key; skipped"), "{said}");
    let aggregate = lathe::model::Bundle::read(&out).unwrap();
    assert_eq!(aggregate.manifest.parent, parent.sha256());

    // On the fault rows no device saw: the aggregate against each device's own model.
    let unseen = &rows[2800..];
    let accuracy = |b: &lathe::model::Bundle| {
        let x: Vec<f32> = unseen.iter().flat_map(|(r, _)| r.iter().map(|&v| v as f32)).collect();
        let o = lathe::engine::Engine::load(&b.model).unwrap().run(&x).unwrap();
        (0..unseen.len()).filter(|&i| (o.row(0, i)[1] >= 0.5) == (unseen[i].1 == 1)).count() as f64
            / unseen.len() as f64
    };
    let each: Vec<f64> = (0..4)
        .map(|d| {
            let path = dir.join(format!("fed{d}/registry/shuttle-mlp/shuttle-mlp-2.lathe"));
            accuracy(&lathe::model::Bundle::read(&path).unwrap())
        })
        .collect();
    let ours = accuracy(&aggregate);
    eprintln!(
        "on {} unseen faulty rows: parent {:.4}, devices {each:?}, aggregate {ours:.4}",
        unseen.len(),
        accuracy(&parent)
    );
    assert!(each.iter().all(|&a| ours >= a), "{ours} vs {each:?}");

    // It reaches the fleet as any update does: signed, one canary first, then the group.
    std::thread::sleep(Duration::from_secs(4)); // the devices' own versions pass their trials
    let key = central.with_extension("key");
    let pushed = Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(["push", out.to_str().unwrap(), "--key", key.to_str().unwrap(), "--broker", &broker.url()])
        .args(["--group", "fleet", "--compatible", "x86-test", "--canary", "1", "--canary-wait", "40s"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&pushed.stdout);
    assert!(pushed.status.success(), "{said}{}", String::from_utf8_lossy(&pushed.stderr));
    assert!(said.contains("offered to group fleet"), "{said}");
    let version = aggregate.manifest.version;
    let serving = |d: usize| {
        events.on(&format!("lathe/fed{d}/status")).last().and_then(|s| s["pipelines"][0]["version"].as_u64())
    };
    assert!(
        common::wait_until(Duration::from_secs(60), || (0..4).all(|d| serving(d) == Some(version))),
        "not every device serves v{version}: {:?}",
        (0..4).map(serving).collect::<Vec<_>>()
    );
    for mut d in daemons {
        assert!(d.stop());
    }
}
