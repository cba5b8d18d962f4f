//! Fleet learning on Shuttle: what a fleet learns about a fault (sensor f1 reading 20 high on
//! every device) by each device alone, by federated averaging of those fine-tunes, and by one
//! central fine-tune on all their rows pooled — the upper bound FedAvg approaches without
//! any row leaving its device. Also a cold start (no model at all) on the pooled rows.
//!
//!     cargo bench --bench fleet_learning      # one table; accuracy on 3,000 fault rows no one trained on
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;

use lathe::engine::Engine;
use lathe::model::Bundle;
use lathe::train::cpu::Cpu;

fn faulty() -> Vec<String> {
    let mut text = String::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = std::fs::File::open(root.join("tests/fixtures/shuttle-unseen.csv.gz")).unwrap();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let (f1, rest) = l.split_once(',').unwrap();
            let f1 = f1.parse::<f64>().unwrap() + 20.0;
            (f1 <= 126.0).then(|| format!("{f1},{rest}"))
        })
        .collect()
}

fn accuracy(model: &[u8], rows: &[String]) -> f64 {
    let x: Vec<f32> = rows.iter().flat_map(|r| r.split(',').take(9).map(|v| v.parse::<f32>().unwrap())).collect();
    let out = Engine::load(model).unwrap().run(&x).unwrap();
    let positive = |i: usize| out.row(0, i)[1] >= 0.5;
    rows.iter().enumerate().filter(|(i, r)| positive(*i) == r.ends_with(",1")).count() as f64 / rows.len() as f64
}

const HEADER: &str = "f1,f2,f3,f4,f5,f6,f7,f8,f9,anomaly\n";

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let parent = Bundle::read(&root.join("models/shuttle-mlp-1.lathe")).unwrap();
    let rows = faulty();
    let test = &rows[rows.len() - 3000..];
    println!("accuracy on {} fault rows no one trained on; parent {:.4}", test.len(), accuracy(&parent.model, test));
    println!("| devices | rows each | local (mean, min) | FedAvg | central, pooled | cold start, pooled | seconds |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for devices in [2usize, 4, 8] {
        for each in [300usize, 700] {
            let started = std::time::Instant::now();
            let slices: Vec<&[String]> = (0..devices).map(|d| &rows[d * each..(d + 1) * each]).collect();
            let csv = |r: &[String]| HEADER.to_string() + &r.join("\n") + "\n";
            let t = &parent.manifest.training;
            let children: Vec<Bundle> = slices
                .iter()
                .filter_map(|s| lathe::train::fine_tune(&Cpu, &parent, &csv(s), "device", t).unwrap().challenger)
                .collect();
            let local: Vec<f64> = children.iter().map(|c| accuracy(&c.model, test)).collect();
            let fedavg = lathe::train::federated::aggregate(&parent, &children)
                .ok()
                .and_then(|(b, _)| b)
                .map_or("refused".to_string(), |b| format!("{:.4}", accuracy(&b.model, test)));
            let pooled = csv(&rows[..devices * each]);
            let central = lathe::train::fine_tune(&Cpu, &parent, &pooled, "pooled", t).unwrap();
            // A refusal here is the forgetting check: the pooled run drifts furthest from the parent.
            let refused =
                if central.record.outcome.contains("validation set fell") { "refused (forgetting)" } else { "refused" };
            let central =
                central.challenger.map_or(refused.to_string(), |b| format!("{:.4}", accuracy(&b.model, test)));
            let names: Vec<String> = (1..=9).map(|i| format!("f{i}")).collect();
            let cold = lathe::model::manifest::ColdStart { hidden: vec![32, 16], min_rows: 0, classes: 2 };
            let placeholder =
                lathe::train::cold_start::placeholder("grown", lathe::model::Task::Binary, &names, &cold, 0).unwrap();
            let placeholder = placeholder.edited(|m| m.target = "anomaly".into()).unwrap();
            let data = lathe::train::data::load(&placeholder.manifest, &pooled, 2).unwrap();
            let grown = lathe::train::fine_tune_on(&Cpu, &placeholder, data, "pooled", t, None, &|| Ok(())).unwrap();
            let grown = grown.challenger.map_or("refused".to_string(), |b| format!("{:.4}", accuracy(&b.model, test)));
            let mean = local.iter().sum::<f64>() / local.len().max(1) as f64;
            let min = local.iter().copied().fold(f64::INFINITY, f64::min);
            println!(
                "| {devices} | {each} | {mean:.4}, {min:.4} ({} of {devices} accepted) | {fedavg} | {central} | {grown} | {:.1} |",
                local.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
}
