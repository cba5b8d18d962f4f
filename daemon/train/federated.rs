//! Federated averaging: several devices fine-tuned the same parent on their own data; the
//! centre combines what each learned into one model without seeing any device's rows.
//!
//! ```text
//! children (bundles whose `parent` is the parent's sha256, each with its rows trained)
//!   → deltas: each child's trainable tail minus the parent's
//!   → clip: a delta longer than CLIP_FACTOR × the median length is scaled down to it
//!     (FedProx-style: one device cannot pull the aggregate arbitrarily far)
//!   → FedAvg: parent + Σ rowsᵢ·δᵢ / Σ rowsᵢ
//!   → leave-one-out: while leaving a delta out makes the aggregate better on the parent's
//!     validation set, the one whose absence helps most is left out (a poisoned or broken
//!     device)
//!   → gate: no worse than the parent on its validation set beyond `max_forgetting`
//!   → bundle::derive: version + 1, lineage naming every child and why any was left out
//! ```

use std::collections::BTreeMap;

use serde::Serialize;

use super::graph::{self, DenseLayer};
use crate::engine::Engine;
use crate::model::bundle::{self, Bundle};
use crate::model::manifest::Lineage;

/// A delta longer than this many times the median delta's length is scaled down to it.
pub const CLIP_FACTOR: f64 = 3.0;

/// What an aggregation did, for its record.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub parent: String,
    /// Per child: name-version, rows trained, delta length, clipped, included (or why not).
    pub children: Vec<ChildReport>,
    pub metric: String,
    pub parent_validation: f64,
    pub aggregate_validation: f64,
    pub accepted: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChildReport {
    pub child: String,
    pub rows: usize,
    pub delta_norm: f64,
    pub clipped: bool,
    pub included: bool,
    pub note: String,
}

fn flat(layers: &[DenseLayer]) -> Vec<f32> {
    layers.iter().flat_map(|l| l.weight.iter().chain(l.bias.iter().flatten()).copied()).collect()
}

fn unflat(template: &[DenseLayer], values: &[f32]) -> Vec<DenseLayer> {
    let mut at = 0;
    template
        .iter()
        .map(|l| {
            let mut l = l.clone();
            let n = l.weight.len();
            l.weight.copy_from_slice(&values[at..at + n]);
            at += n;
            if let Some(b) = l.bias.as_mut() {
                let n = b.len();
                b.copy_from_slice(&values[at..at + n]);
                at += n;
            }
            l
        })
        .collect()
}

/// The parent's gate metric of `model` on the parent's validation set.
fn validation_metric(parent: &Bundle, model: &[u8]) -> Result<f64, String> {
    let m = &parent.manifest;
    let (x, y) = (
        parent.validation_samples().map_err(|e| e.to_string())?,
        parent.validation_targets().map_err(|e| e.to_string())?,
    );
    let out = Engine::load(model).and_then(|e| e.run(&x)).map_err(|e| e.to_string())?;
    let f = m.inputs.len() * m.window.max(1);
    let measured =
        bundle::measure(m.task, m.baseline.threshold, &out, m.primary_output, &x, f, &y).map_err(|e| e.to_string())?;
    measured.metrics.get(&m.gate.metric).copied().ok_or_else(|| format!("no {} on this task", m.gate.metric))
}

/// Combines `children` (fine-tuned from `parent`) by FedAvg. Returns the aggregate bundle
/// when the gate accepts it, and the report either way.
///
/// # Errors
/// A child of another parent or with another graph, or a model that cannot run.
pub fn aggregate(parent: &Bundle, children: &[Bundle]) -> Result<(Option<Bundle>, Report), String> {
    let m = &parent.manifest;
    let output = m.outputs.get(m.primary_output).ok_or("primary_output out of range")?;
    let base_layers = graph::tail_of(&parent.model, output)?.layers;
    let base = flat(&base_layers);
    let mut deltas = Vec::new();
    let mut reports = Vec::new();
    for c in children {
        let name = format!("{}-{}", c.manifest.name, c.manifest.version);
        if c.manifest.parent != parent.sha256() {
            return Err(format!("{name} was not fine-tuned from {}-{}", m.name, m.version));
        }
        let layers = graph::tail_of(&c.model, output).map_err(|e| format!("{name}: {e}"))?.layers;
        let values = flat(&layers);
        if values.len() != base.len() {
            return Err(format!("{name}: its trainable tail differs from the parent's"));
        }
        let delta: Vec<f64> = values.iter().zip(&base).map(|(a, b)| f64::from(*a) - f64::from(*b)).collect();
        let norm = delta.iter().map(|d| d * d).sum::<f64>().sqrt();
        let rows = c.manifest.lineage.fine_tune.as_ref().map_or(1, |f| f.rows_trained.max(1));
        reports.push(ChildReport {
            child: name,
            rows,
            delta_norm: norm,
            clipped: false,
            included: true,
            note: String::new(),
        });
        deltas.push(delta);
    }
    if deltas.is_empty() {
        return Err("no children to aggregate".into());
    }
    let mut norms: Vec<f64> = reports.iter().map(|r| r.delta_norm).collect();
    norms.sort_by(f64::total_cmp);
    let limit = CLIP_FACTOR * norms[norms.len() / 2];
    for (d, r) in deltas.iter_mut().zip(&mut reports) {
        if r.delta_norm > limit && r.delta_norm > 0.0 {
            let scale = limit / r.delta_norm;
            d.iter_mut().for_each(|v| *v *= scale);
            r.clipped = true;
            r.note = format!("delta {:.3} clipped to {limit:.3} ({CLIP_FACTOR} × the median)", r.delta_norm);
        }
    }
    let rows: Vec<f64> = reports.iter().map(|r| r.rows as f64).collect();
    let model_of = |included: &[bool]| -> Result<Vec<u8>, String> {
        let total: f64 = rows.iter().zip(included).filter(|(_, &i)| i).map(|(r, _)| r).sum();
        let mut values = base.clone();
        for ((d, r), _) in deltas.iter().zip(&rows).zip(included).filter(|(_, &i)| i) {
            let w = r / total.max(1.0);
            values.iter_mut().zip(d).for_each(|(v, dv)| *v += (w * dv) as f32);
        }
        graph::export(&parent.model, &unflat(&base_layers, &values))
    };
    let sign = if m.gate.higher_is_better { 1.0 } else { -1.0 };
    let mut included = vec![true; deltas.len()];
    let mut current = validation_metric(parent, &model_of(&included)?)?;
    // Leave-one-out, the most harmful first: while leaving one delta out makes the aggregate
    // better on the parent's validation set, the one whose absence helps most is left out.
    while included.iter().filter(|&&x| x).count() > 1 {
        let mut best: Option<(usize, f64)> = None;
        for i in 0..deltas.len() {
            if !included[i] {
                continue;
            }
            included[i] = false;
            let without = validation_metric(parent, &model_of(&included)?)?;
            included[i] = true;
            if sign * (without - current) > 0.0 && best.is_none_or(|(_, b)| sign * (without - b) > 0.0) {
                best = Some((i, without));
            }
        }
        let Some((i, without)) = best else { break };
        included[i] = false;
        reports[i].included = false;
        reports[i].note = format!(
            "left out: without it {} on the parent's validation set is {without:.4}, with it {current:.4}",
            m.gate.metric
        );
        current = without;
    }
    let model = model_of(&included)?;
    let before = validation_metric(parent, &parent.model)?;
    let forgetting = sign * (before - current) / before.abs().max(1e-12);
    let accepted = forgetting <= m.gate.max_forgetting && current.is_finite();
    let reason = format!(
        "{} on the parent's validation set {before:.4} -> {current:.4} ({} of {} devices){}",
        m.gate.metric,
        included.iter().filter(|&&x| x).count(),
        included.len(),
        if accepted { String::new() } else { format!(": more than {:.1} % worse", m.gate.max_forgetting * 100.0) }
    );
    let report = Report {
        parent: format!("{}-{}", m.name, m.version),
        children: reports,
        metric: m.gate.metric.clone(),
        parent_validation: before,
        aggregate_validation: current,
        accepted,
        reason,
    };
    if !accepted {
        return Ok((None, report));
    }
    let names: Vec<&str> = report.children.iter().filter(|c| c.included).map(|c| c.child.as_str()).collect::<Vec<_>>();
    let lineage = Lineage {
        created_by: format!("lathe aggregate {} (FedAvg)", env!("CARGO_PKG_VERSION")),
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        source_model: m.lineage.source_model.clone(),
        data: format!("FedAvg of {} weighted by rows trained", names.join(", ")),
        fine_tune: None,
    };
    let child_versions: BTreeMap<_, _> = children.iter().map(|c| (c.manifest.version, ())).collect();
    let next = child_versions.keys().max().copied().unwrap_or(m.version).max(m.version) + 1;
    let b = bundle::derive(parent, model, m.training.clone(), lineage)
        .and_then(|b| b.with_version(next))
        .map_err(|e| e.to_string())?;
    Ok((Some(b), report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::cpu::Cpu;

    fn root(path: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    /// Shuttle rows the sample model never saw, with sensor f1 reading 20 high (a
    /// miscalibrated replacement across the fleet): the parent's accuracy on them is ~0.73.
    fn faulty() -> Vec<String> {
        use std::io::Read;
        let mut text = String::new();
        let file = std::fs::File::open(root("tests/fixtures/shuttle-unseen.csv.gz")).unwrap();
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
        let right = rows.iter().enumerate().filter(|(i, r)| (out.row(0, *i)[1] >= 0.5) == r.ends_with(",1")).count();
        right as f64 / rows.len() as f64
    }

    /// Four devices fine-tune the sample model on 700 rows each of their own; a fifth sends a
    /// poisoned delta (its last layer's weights inverted and tripled). The aggregate leaves the
    /// poisoned one out, and on the rows no device trained on it is at least as accurate as
    /// the worst device alone and far better than the parent.
    #[test]
    fn fedavg_of_four_devices_leaves_a_poisoned_delta_out_and_learns_the_fault() {
        let parent = Bundle::read(&root("models/shuttle-mlp-1.lathe")).unwrap();
        let rows = faulty();
        let header = "f1,f2,f3,f4,f5,f6,f7,f8,f9,anomaly\n";
        let mut children = Vec::new();
        for d in 0..4 {
            let csv = header.to_string() + &rows[d * 700..(d + 1) * 700].join("\n") + "\n";
            let outcome =
                crate::train::fine_tune(&Cpu, &parent, &csv, &format!("device {d}"), &parent.manifest.training)
                    .unwrap();
            children.push(outcome.challenger.unwrap_or_else(|| panic!("device {d}: {}", outcome.record.outcome)));
        }
        let output = &parent.manifest.outputs[parent.manifest.primary_output];
        let mut poisoned = graph::tail_of(&parent.model, output).unwrap().layers;
        let last = poisoned.len() - 1;
        poisoned[last].weight.iter_mut().for_each(|w| *w *= -3.0);
        let model = graph::export(&parent.model, &poisoned).unwrap();
        // ...claiming more rows than all the others together, to weigh the most.
        let mut claimed = children[0].manifest.lineage.fine_tune.clone();
        claimed.iter_mut().for_each(|f| f.rows_trained = 5_000);
        let lineage = Lineage {
            created_by: "a compromised device".into(),
            fine_tune: claimed,
            ..parent.manifest.lineage.clone()
        };
        children.push(bundle::derive(&parent, model, parent.manifest.training.clone(), lineage).unwrap());

        let (aggregate, report) = aggregate(&parent, &children).unwrap();
        eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
        let aggregate = aggregate.expect(&report.reason);
        assert_eq!(report.children.iter().map(|c| c.included).collect::<Vec<_>>(), [true, true, true, true, false]);
        let unseen = &rows[2800..];
        let ours = accuracy(&aggregate.model, unseen);
        let each: Vec<f64> = children[..4].iter().map(|c| accuracy(&c.model, unseen)).collect();
        let parent_accuracy = accuracy(&parent.model, unseen);
        eprintln!(
            "on {} unseen faulty rows: parent {parent_accuracy:.4}, devices {each:?}, aggregate {ours:.4}",
            unseen.len()
        );
        assert!(ours > parent_accuracy + 0.1, "{ours} vs parent {parent_accuracy}");
        assert!(each.iter().all(|&a| ours >= a - 0.001), "{ours} vs {each:?}");
        assert_eq!(aggregate.manifest.parent, parent.sha256());
        assert!(aggregate.manifest.lineage.data.starts_with("FedAvg of"), "{:?}", aggregate.manifest.lineage);
    }
}
