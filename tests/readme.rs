//! The README's "Serve your own model", as a newcomer follows it: its scikit-learn snippet, its
//! `lathe bundle create` line and its minimal config, each read from README.md itself and run
//! as written (only the broker's address and the state folder changed), then its example
//! message answered as the README says.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

/// The fenced block of `lang` that follows `marker` in the README.
fn block(readme: &str, marker: &str, lang: &str) -> String {
    let at = readme.find(marker).unwrap_or_else(|| panic!("README has no {marker:?}"));
    let fence = format!("```{lang}\n");
    let start = at + readme[at..].find(&fence).unwrap_or_else(|| panic!("no ```{lang} after {marker:?}")) + fence.len();
    let end = start + readme[start..].find("```").unwrap();
    readme[start..end].to_string()
}

/// Python with scikit-learn and skl2onnx; CI installs them and requires them.
fn sklearn_available() -> bool {
    let ok = Command::new("python3").args(["-c", "import sklearn, skl2onnx"]).status().is_ok_and(|s| s.success());
    if !ok && std::env::var_os("LATHE_REQUIRE_MOSQUITTO").is_some() {
        panic!("python3 with scikit-learn and skl2onnx is required (pip install scikit-learn skl2onnx)");
    }
    if !ok {
        eprintln!(
            "skipped: python3 with scikit-learn and skl2onnx is not installed (pip install scikit-learn skl2onnx)"
        );
    }
    ok
}

#[test]
fn a_scikit_learn_model_served_by_following_the_readme() {
    if !sklearn_available() {
        return;
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let dir = temp_dir("readme");
    // "run from the repository's root": the snippet reads models/data/.
    std::os::unix::fs::symlink(root().join("models"), dir.join("models")).unwrap();

    let snippet = block(&readme, "### From scikit-learn", "python");
    let made = Command::new("python3").arg("-c").arg(&snippet).current_dir(&dir).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));

    // The `lathe bundle create` line (with its continuation), word by word.
    let commands = block(&readme, "### Bundle, configure, run", "sh");
    let create = commands.split("\nlathe ").next().unwrap().replace("\\\n", " ");
    let words: Vec<&str> = create.split_whitespace().collect();
    assert_eq!(words[..3], ["lathe", "bundle", "create"], "{create}");
    let created = Command::new(LATHE).args(&words[1..]).current_dir(&dir).output().unwrap();
    assert!(created.status.success(), "{create}\n{}", String::from_utf8_lossy(&created.stderr));

    let broker = Broker::start();
    let config = block(&readme, "A minimal `lathe.toml`", "toml")
        .replace("/var/lib/lathe", &dir.join("state").display().to_string())
        .replace("mqtt://127.0.0.1:1883", &broker.url());
    std::fs::write(dir.join("lathe.toml"), &config).unwrap();
    let checked = Command::new(LATHE).args(["check", "--config", "lathe.toml"]).current_dir(&dir).output().unwrap();
    assert!(checked.status.success(), "lathe check: {}", String::from_utf8_lossy(&checked.stderr));
    let daemon = Daemon::start(&dir, &config);
    wait_online(broker.port, "line3-edge01", &daemon);
    let answers = Collector::new(broker.port, &["plant/line3/+/anomaly"]);

    // The README's example message: the first row of the data, an anomaly.
    let mut p = Publisher::new(broker.port);
    let example =
        json!({"f1": 50, "f2": 21, "f3": 77, "f4": 0, "f5": 28, "f6": 0, "f7": 27, "f8": 48, "f9": 22, "seq": 7});
    p.publish("plant/line3/pump7/telemetry", example.to_string());
    // And 300 rows the forest never saw, against their labels.
    let validation = std::fs::read_to_string(dir.join("validation.csv")).unwrap();
    let rows: Vec<Vec<f64>> =
        validation.lines().skip(1).take(300).map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
    for (i, r) in rows.iter().enumerate() {
        p.publish("plant/line3/pump1/telemetry", shuttle_message(&r[..9], 1000 + i));
    }
    p.flush();
    assert!(answers.wait_for("/anomaly", 301, Duration::from_secs(20)), "log:\n{}", daemon.log());

    let first = answers.on("plant/line3/pump7/anomaly")[0].clone();
    eprintln!("the example's answer: {first}");
    assert_eq!((first["device"].as_str(), first["key"].as_u64()), (Some("pump7"), Some(7)), "{first}");
    assert_eq!((first["model"].as_str(), first["version"].as_u64()), (Some("pump-anomaly"), Some(1)), "{first}");
    assert_eq!(first["class"], 1, "the example row is an anomaly: {first}");
    assert!(first["output"][1].as_f64().unwrap() > 0.5, "{first}");
    let served = answers.on("plant/line3/pump1/anomaly");
    let right = served
        .iter()
        .filter(|a| a["class"].as_u64() == Some(rows[a["key"].as_u64().unwrap() as usize - 1000][9] as u64))
        .count();
    eprintln!("{right} of {} validation rows right", served.len());
    assert!(right as f64 >= 0.98 * served.len() as f64, "{right} of {}", served.len());
}
