//! Drift monitoring: the statistics against scipy, the detectors against river, and the
//! monitor on real Shuttle rows — clean (no alarm) and with sensor faults (an alarm naming the
//! faulty feature, and how long it took).

mod common;

use lathe::engine::Engine;
use lathe::model::bundle::Bundle;
use lathe::monitor::detectors::{Adwin, PageHinkley};
use lathe::monitor::{stats, Alarm, Monitor, Settings};
use serde_json::Value;

fn vectors() -> Value {
    serde_json::from_slice(&std::fs::read(common::root().join("tests/fixtures/drift_vectors.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

#[test]
fn ks_wasserstein_and_psi_match_scipy_and_the_plain_definition() {
    let v = vectors();
    let cases = v["stats"].as_array().unwrap();
    assert_eq!(cases.len(), 20);
    for case in cases {
        let col = case["column"].as_u64().unwrap().to_string();
        let reference = sorted(floats(&v["references"][&col]));
        let window = sorted(floats(&case["window"]));
        let what = format!("column {col} {}", case["case"]);
        let ks = stats::ks(&reference, &window);
        assert!((ks - case["ks"].as_f64().unwrap()).abs() < 1e-12, "{what}: ks {ks} vs scipy {}", case["ks"]);
        let w = stats::wasserstein(&reference, &window);
        let want = case["wasserstein"].as_f64().unwrap();
        assert!((w - want).abs() <= 1e-9 * want.max(1.0), "{what}: wasserstein {w} vs scipy {want}");
        let edges = stats::psi_edges(&reference, 10);
        let (mut e, mut a) = (vec![0; edges.len() + 1], vec![0; edges.len() + 1]);
        stats::bin_counts(&reference, &edges, &mut e);
        stats::bin_counts(&window, &edges, &mut a);
        let psi = stats::psi(&e, &a);
        let want = case["psi"].as_f64().unwrap();
        assert!((psi - want).abs() < 1e-9 * want.max(1.0), "{what}: psi {psi} vs {want}");
    }
}

#[test]
fn adwin_and_page_hinkley_flag_the_same_points_as_river() {
    let v = vectors();
    for stream in v["detectors"].as_array().unwrap() {
        let values = floats(&stream["values"]);
        let (mut adwin, mut ph) = (Adwin::default(), PageHinkley::default());
        let (mut a, mut p) = (Vec::new(), Vec::new());
        for (i, &x) in values.iter().enumerate() {
            if adwin.update(x) {
                a.push(i as u64);
            }
            if ph.update(x) {
                p.push(i as u64);
            }
        }
        let want = |k: &str| stream[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect::<Vec<_>>();
        assert_eq!(a, want("adwin"), "ADWIN on {}", stream["stream"]);
        assert_eq!(p, want("page_hinkley"), "Page-Hinkley on {}", stream["stream"]);
    }
}

/// The sample bundle's reference and a monitor on it, plus Shuttle rows and their scores.
struct Shuttle {
    bundle: Bundle,
    engine: Engine,
    rows: Vec<f32>,
    /// The anomaly label of each row.
    labels: Vec<u8>,
}

impl Shuttle {
    fn load() -> Shuttle {
        use std::io::Read;
        let bundle = Bundle::read(&common::root().join("models/shuttle-mlp-1.lathe")).unwrap();
        let engine = Engine::load(&bundle.model).unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(common::root().join("models/data/shuttle.csv.gz")).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let rows = text
            .lines()
            .skip(1)
            .flat_map(|l| l.split(',').take(9).map(|v| v.parse::<f32>().unwrap()).collect::<Vec<_>>())
            .collect();
        let labels = text.lines().skip(1).map(|l| l.rsplit(',').next().unwrap().parse().unwrap()).collect();
        Shuttle { bundle, engine, rows, labels }
    }

    fn row(&self, i: usize) -> Vec<f64> {
        self.rows[i * 9..(i + 1) * 9].iter().map(|&x| f64::from(x)).collect()
    }

    fn scores(&self, rows: &[f32]) -> Vec<f64> {
        let out = self.engine.run(rows).unwrap();
        let reading = self.bundle.reading();
        (0..rows.len() / 9).map(|r| reading.score(out.row(0, r), &rows[r * 9..(r + 1) * 9])).collect()
    }

    fn monitor(&self) -> Monitor {
        let reference = self.bundle.validation_rows().unwrap();
        let scores = self.scores(&reference);
        let names: Vec<String> = self.bundle.manifest.inputs.iter().map(|i| i.name.clone()).collect();
        Monitor::new(&reference, &scores, &names, Settings::default())
    }

    /// Streams `rows` through a fresh monitor; every alarm raised.
    fn stream(&self, rows: &[f32]) -> Vec<Alarm> {
        let mut m = self.monitor();
        let scores = self.scores(rows);
        let mut alarms = Vec::new();
        for (r, s) in scores.iter().enumerate() {
            m.observe(&rows[r * 9..(r + 1) * 9], *s, &mut alarms);
        }
        alarms.retain(|a| a.raised);
        alarms
    }
}

#[test]
fn clean_shuttle_rows_raise_no_alarm_over_all_49k_rows() {
    let s = Shuttle::load();
    let alarms = s.stream(&s.rows);
    for a in &alarms {
        eprintln!("{} {} {:.4} / {:.4} = {:.2}", a.row, a.series, a.value, a.threshold, a.value / a.threshold);
    }
    assert!(alarms.is_empty(), "false alarms on clean data");
}

/// A reference only three windows long (a small validation set) is itself a sample, so live
/// windows differ from it more than windows drawn from it do. The calibration allows for that
/// (without the allowance: 3 false alarms here): 1,500 clean rows as the reference, and the
/// other 47,600 clean rows stream past without an alarm.
#[test]
fn a_reference_of_1500_rows_raises_no_alarm_on_the_other_clean_rows() {
    const REF: usize = 1500;
    let s = Shuttle::load();
    let all = s.rows.len() / 9;
    let picked: Vec<usize> = (0..REF).map(|i| i * all / REF).collect();
    let reference: Vec<f32> = picked.iter().flat_map(|&r| s.rows[r * 9..(r + 1) * 9].iter().copied()).collect();
    let names: Vec<String> = s.bundle.manifest.inputs.iter().map(|i| i.name.clone()).collect();
    let mut m = Monitor::new(&reference, &s.scores(&reference), &names, Settings::default());
    let rest: Vec<f32> = (0..all)
        .filter(|r| picked.binary_search(r).is_err())
        .flat_map(|r| s.rows[r * 9..(r + 1) * 9].iter().copied())
        .collect();
    let scores = s.scores(&rest);
    let mut alarms = Vec::new();
    for (r, score) in scores.iter().enumerate() {
        m.observe(&rest[r * 9..(r + 1) * 9], *score, &mut alarms);
    }
    alarms.retain(|a| a.raised);
    for a in &alarms {
        eprintln!("{} {} {:.4} / {:.4} = {:.2}", a.row, a.series, a.value, a.threshold, a.value / a.threshold);
    }
    assert!(alarms.is_empty(), "{} false alarms over {} clean rows", alarms.len(), scores.len());
}

/// Sensor faults on one feature from row 10,000 of a clean stream: each raises an alarm that
/// names that feature. Prints the delay of each (the table in docs/drift.md).
#[test]
fn injected_sensor_faults_raise_an_alarm_naming_the_feature() {
    let s = Shuttle::load();
    let start = 10_000usize;
    let n = 16_000usize;
    let feature = 4usize; // f5
    type Fault = fn(usize, f32) -> f32;
    let faults: [(&str, Fault); 4] = [
        ("offset +20", |_, x| x + 20.0),
        ("gain drift to 1.5x over 2000 rows", |i, x| x * (1.0 + 0.5 * (i as f32 / 2000.0).min(1.0))),
        ("stuck at 46", |_, _| 46.0),
        ("noise burst (sd 30)", |i, x| x + 30.0 * (((i * 7919) % 1000) as f32 / 500.0 - 1.0) * 1.7),
    ];
    for (name, fault) in faults {
        let mut rows = s.rows[..n * 9].to_vec();
        for i in start..n {
            rows[i * 9 + feature] = fault(i - start, rows[i * 9 + feature]);
        }
        let alarms = s.stream(&rows);
        let first = alarms.first().unwrap_or_else(|| panic!("{name}: no alarm"));
        assert!(first.row as usize > start, "{name}: alarm before the fault: {first:?}");
        assert!(
            alarms.iter().filter(|a| (a.row as usize) < start + 3000).any(|a| a.series == "f5"),
            "{name}: no f5 alarm within 3000 rows: {alarms:#?}"
        );
        let f5 = alarms.iter().find(|a| a.series == "f5").unwrap();
        let delay = f5.row as usize - start;
        // Where a drift run's new regime will start: never before the change by more than
        // the statistic's noise; for a step change, in the first half of the rows since it
        // (KS is the share of shifted rows only where the shift separates them fully).
        let estimate = f5.row as i64 - f5.since_change as i64 - start as i64;
        eprintln!(
            "fault {name:<36} first f5 alarm after {delay:>5} rows, change estimated at {estimate:+} rows ({} alarms: {:?})",
            alarms.len(),
            alarms.iter().map(|a| a.series.as_str()).collect::<Vec<_>>()
        );
        assert!(estimate >= -25 && estimate <= delay as i64, "{name}: change estimated at {estimate:+}");
        if name.starts_with("offset") || name.starts_with("stuck") {
            assert!(estimate <= delay as i64 / 2, "{name}: a step change estimated at {estimate:+} rows");
        }
    }
}

/// A cross-wired sensor: from row 10,000 feature f8 reports the value of another moment.
/// Its own distribution is unchanged (no f8 alarm), but it no longer moves against f5 and with
/// f9 (correlations −0.9 and 0.83): only the multivariate statistic can see that.
#[test]
fn a_broken_relation_between_features_raises_the_multivariate_alarm() {
    let s = Shuttle::load();
    let (start, n) = (10_000usize, 14_000usize);
    let mut rows = s.rows[..n * 9].to_vec();
    for i in start..n {
        let other = start + (i - start + 997) % (n - start);
        rows[i * 9 + 7] = s.rows[other * 9 + 7];
    }
    let alarms = s.stream(&rows);
    let multi = alarms
        .iter()
        .find(|a| a.series == "multivariate")
        .unwrap_or_else(|| panic!("no multivariate alarm: {alarms:#?}"));
    assert!(multi.row as usize > start);
    assert!(!alarms.iter().any(|a| a.series == "f8"), "f8's own distribution did not change: {alarms:#?}");
    eprintln!(
        "cross-wired f8: multivariate alarm after {} rows; all alarms {:?}",
        multi.row as usize - start,
        alarms.iter().map(|a| a.series.as_str()).collect::<Vec<_>>()
    );
}

/// End to end over mosquitto: clean Shuttle rows, then the same sensor 20 units high. The
/// daemon publishes one `drift` event naming f5 (not one per evaluation), and the retained
/// status shows the alarm.
#[test]
fn the_daemon_reports_drift_once_per_episode_in_events_and_status() {
    use std::time::Duration;
    let broker = common::Broker::start();
    let dir = common::temp_dir("drift-daemon");
    let config =
        common::config("driftd", &broker, &dir.join("state"), &common::root().join("models/shuttle-mlp-1.lathe"))
            + "[pipeline.drift]\nwindow = 300\nevery = 50\n";
    let daemon = common::Daemon::start(&dir, &config);
    common::wait_online(broker.port, "driftd", &daemon);
    assert!(common::wait_until(Duration::from_secs(30), || daemon.log().contains("Drift monitor ready")));
    let events = common::Collector::new(broker.port, &["lathe/driftd/events", "lathe/driftd/status"]);
    let s = Shuttle::load();
    let mut p = common::Publisher::new(broker.port);
    let (clean, faulty) = (1500usize, 1500usize);
    for seq in 0..clean + faulty {
        let mut row: Vec<f64> = s.rows[seq * 9..(seq + 1) * 9].iter().map(|&x| f64::from(x)).collect();
        if seq >= clean {
            row[4] += 20.0;
        }
        p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), common::shuttle_message(&row, seq));
    }
    p.flush();
    let drift = |events: &common::Collector| {
        events.on("lathe/driftd/events").into_iter().filter(|e| e["event"] == "drift").collect::<Vec<_>>()
    };
    assert!(
        common::wait_until(Duration::from_secs(30), || drift(&events).iter().any(|e| e["series"] == "f5")),
        "no drift event for f5; events: {:?}\nlog:\n{}",
        events.on("lathe/driftd/events"),
        daemon.log()
    );
    let all = drift(&events);
    assert!(all.iter().all(|e| e["row"].as_u64().unwrap() > clean as u64), "alarm before the fault: {all:?}");
    assert_eq!(all.iter().filter(|e| e["series"] == "f5").count(), 1, "one alarm per episode: {all:?}");
    let f5 = all.iter().find(|e| e["series"] == "f5").unwrap();
    assert_eq!(f5["statistic"], "ks");
    assert!(f5["value"].as_f64().unwrap() > f5["threshold"].as_f64().unwrap());
    assert_eq!(f5["window"], 300);
    assert_eq!(f5["model"], "shuttle-mlp");
    assert!(common::wait_until(Duration::from_secs(15), || {
        events
            .on("lathe/driftd/status")
            .iter()
            .any(|st| st["pipelines"][0]["drift"]["alarms"].as_array().is_some_and(|a| a.iter().any(|x| x == "f5")))
    }));
}

/// A daemon on the sample model whose pipeline takes late labels on `plant/line1/+/label`,
/// and a collector of its predictions and events.
fn labelled_daemon(node: &str) -> (common::Broker, common::Daemon, common::Collector) {
    let broker = common::Broker::start();
    let dir = common::temp_dir(node);
    let model = common::root().join("models/shuttle-mlp-1.lathe");
    let config = common::config(node, &broker, &dir.join("state"), &model)
        + "labels = { topic = \"plant/line1/+/label\", key = \"/seq\", value = \"/anomaly\", window = 200 }\n";
    let daemon = common::Daemon::start(&dir, &config);
    common::wait_online(broker.port, node, &daemon);
    let events = format!("lathe/{node}/events");
    let out = common::Collector::new(broker.port, &["plant/line1/+/prediction", &events]);
    (broker, daemon, out)
}

/// Publishes `rows` as telemetry, waits for every prediction, then publishes their labels:
/// one label a message, or (`batched`) each device's labels as JSON arrays of up to 25, as a
/// gateway or a MES export sends them.
fn stream_then_label(
    broker: &common::Broker,
    out: &common::Collector,
    rows: &[(Vec<f64>, u8)],
    daemon: &common::Daemon,
    batched: bool,
) {
    use std::time::Duration;
    let mut p = common::Publisher::new(broker.port);
    for (seq, (row, _)) in rows.iter().enumerate() {
        p.publish(&format!("plant/line1/dev{}/telemetry", seq % 4), common::shuttle_message(row, seq));
    }
    p.flush();
    assert!(out.wait_for("prediction", rows.len(), Duration::from_secs(30)), "log:\n{}", daemon.log());
    let label = |seq: usize| serde_json::json!({"seq": seq, "anomaly": rows[seq].1});
    if batched {
        // In order of arrival: a batch holds the next 25 rows of one device, so the devices
        // take turns as their batches fill.
        for first in (0..rows.len()).step_by(100) {
            for device in 0..4 {
                let batch: Vec<Value> = (first + device..rows.len().min(first + 100)).step_by(4).map(label).collect();
                p.publish(&format!("plant/line1/dev{device}/label"), Value::Array(batch).to_string());
            }
        }
    } else {
        for seq in 0..rows.len() {
            p.publish(&format!("plant/line1/dev{}/label", seq % 4), label(seq).to_string());
        }
    }
    p.flush();
}

fn drift_events(out: &common::Collector, node: &str, series: &str) -> Vec<Value> {
    out.on(&format!("lathe/{node}/events"))
        .into_iter()
        .filter(|e| e["event"] == "drift" && e["series"] == series)
        .collect()
}

/// Late labels over mosquitto: predictions are joined to labels by key; while the labels agree
/// with the model nothing happens, and when a third of them start to disagree (the concept
/// changed) one `performance` alarm is raised.
#[test]
fn late_labels_that_start_to_disagree_raise_a_performance_alarm() {
    use std::time::Duration;
    let (broker, daemon, out) = labelled_daemon("labeld");
    let s = Shuttle::load();
    let rows: Vec<(Vec<f64>, u8)> =
        (0..2000).map(|i| (s.row(i), if i >= 1000 && i % 3 == 0 { 1 - s.labels[i] } else { s.labels[i] })).collect();
    stream_then_label(&broker, &out, &rows, &daemon, false);
    assert!(
        common::wait_until(Duration::from_secs(20), || !drift_events(&out, "labeld", "performance").is_empty()),
        "no performance alarm; events {:?}\nlog:\n{}",
        out.on("lathe/labeld/events"),
        daemon.log()
    );
    let alarms = drift_events(&out, "labeld", "performance");
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    let row = alarms[0]["row"].as_u64().unwrap();
    assert!(row > 1000 && row < 1300, "raised at label {row}: {alarms:?}");
    eprintln!("performance alarm after {} disagreeing-era labels: {}", row - 1000, alarms[0]);
}

/// The office-occupancy sensors (tests/fixtures/occupancy.csv, from river; five annotators
/// marked its change points). lathe compares against a baseline, so the reference is the first
/// 50 rows — before the first annotated change at row 52–53 — and each sensor's first alarm is
/// compared with the annotations. Printed for docs/drift.md; asserted: nothing before the first
/// change, and the first alarm within 40 rows of an annotated change.
#[test]
fn occupancy_alarms_line_up_with_the_annotated_change_points() {
    let text = std::fs::read_to_string(common::root().join("tests/fixtures/occupancy.csv")).unwrap();
    let names: Vec<String> = ["V1", "V2", "V3", "V4"].map(String::from).to_vec();
    let rows: Vec<f32> = text
        .lines()
        .skip(1)
        .flat_map(|l| l.split(',').skip(1).map(|v| v.parse::<f32>().unwrap()).collect::<Vec<_>>())
        .collect();
    let n = rows.len() / 4;
    let notes: Value = serde_json::from_slice(
        &std::fs::read(common::root().join("tests/fixtures/occupancy.annotations.json")).unwrap(),
    )
    .unwrap();
    let mut marks: Vec<u64> = notes["annotations"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|v| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()))
        .collect();
    marks.sort_unstable();
    let reference = &rows[..50 * 4];
    let settings = Settings { window: 30, every: 5, ..Settings::default() };
    let mut m = Monitor::new(reference, &[0.0; 50], &names, settings);
    let mut alarms = Vec::new();
    for r in 0..n {
        m.observe(&rows[r * 4..(r + 1) * 4], 0.0, &mut alarms);
    }
    alarms.retain(|a| a.raised);
    assert!(!alarms.is_empty());
    for a in &alarms {
        let nearest = marks.iter().filter(|&&c| c <= a.row).max().copied();
        eprintln!("occupancy: {} alarm at row {} (latest annotated change before it: {nearest:?})", a.series, a.row);
    }
    let first = alarms.iter().map(|a| a.row).min().unwrap();
    assert!(first > 52, "alarm before the first annotated change: {first}");
    assert!(
        marks.iter().any(|&c| c <= first && first - c <= 40),
        "first alarm {first} is not within 40 rows of a change"
    );
    // ADWIN on each standardised sensor finds change points between regimes (no baseline).
    for (c, name) in names.iter().enumerate() {
        let mut adwin = Adwin::default();
        let (mean, sd) = {
            let v: Vec<f64> = (0..n).map(|r| f64::from(rows[r * 4 + c])).collect();
            let mean = v.iter().sum::<f64>() / n as f64;
            (mean, (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64).sqrt())
        };
        let hits: Vec<usize> = (0..n).filter(|&r| adwin.update((f64::from(rows[r * 4 + c]) - mean) / sd)).collect();
        eprintln!("occupancy: ADWIN on {name} flags rows {hits:?}");
    }
    eprintln!("occupancy: annotated change points (all annotators) {marks:?}");
}

/// Label shift: from message 1,000 half of the rows are anomalies (7 % before, as in the
/// validation set). The class balance of the arriving labels moved, and a `labels` alarm says
/// so once labels arrive — before the loss, which rises more slowly (the model misses a few
/// per cent of anomalies, so more anomalies means more errors), raises its own.
#[test]
fn a_change_in_class_balance_raises_a_label_shift_alarm_once_labels_arrive() {
    use std::time::Duration;
    // The alarm's row depends on the labels arriving in publish order across the devices'
    // topics. MQTT orders messages per topic only; mosquitto keeps one publisher's order, the
    // embedded broker does not (2 runs in 3 failed on it, before and after this session).
    if !common::mosquitto_or_say("labels in publish order across topics") {
        return;
    }
    let (broker, daemon, out) = labelled_daemon("shiftd");
    let s = Shuttle::load();
    let (anomalous, normal): (Vec<usize>, Vec<usize>) = (0..s.labels.len()).partition(|&i| s.labels[i] == 1);
    let mut rows: Vec<(Vec<f64>, u8)> = (0..1000).map(|i| (s.row(i), s.labels[i])).collect();
    for i in 0..1000 {
        let r = if i % 2 == 0 { anomalous[i / 2] } else { normal[5000 + i] };
        rows.push((s.row(r), s.labels[r]));
    }
    stream_then_label(&broker, &out, &rows, &daemon, true);
    assert!(
        common::wait_until(Duration::from_secs(20), || !drift_events(&out, "shiftd", "labels").is_empty()),
        "no label-shift alarm; events {:?}",
        out.on("lathe/shiftd/events")
    );
    let shift = drift_events(&out, "shiftd", "labels");
    assert_eq!(shift.len(), 1, "{shift:?}");
    let row = shift[0]["row"].as_u64().unwrap();
    assert!(row > 1000 && row < 1200, "label shift raised at label {row}");
    let perf = drift_events(&out, "shiftd", "performance");
    assert!(perf.iter().all(|a| a["row"].as_u64().unwrap() > row), "label shift first: {perf:?}");
    eprintln!("label shift alarm after {} shifted labels: {}; performance alarms {perf:?}", row - 1000, shift[0]);
}
