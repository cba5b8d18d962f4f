//! `lathe store`: what a pipeline's sample store holds, and its rows written out as a CSV
//! that `lathe train` and `lathe bundle create` read.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::config::{Config, ModelRef};
use crate::model::{Bundle, Registry};
use crate::store::{Record, Store};

#[derive(Args)]
pub struct StoreArgs {
    /// The daemon's config (for the store's path and the pipeline's model).
    #[arg(long, global = true, default_value = "/etc/lathe/lathe.toml")]
    config: PathBuf,
    #[arg(long, global = true)]
    pipeline: Option<String>,
    #[command(subcommand)]
    command: Option<StoreCommand>,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Write the stored rows, oldest first, as CSV: the model's input columns, its target
    /// column (the joined label; empty where none came), then `prediction` (the serving
    /// model's score), `version`, `device`, `key` (the message key as JSON) and `served_at`
    /// (Unix ms). A sequence model's row is the last frame of its window, so the rows of
    /// each device are its frames in order (`lathe train --device-column device`).
    Export {
        /// Only rows served in the last DURATION (`30m`, `12h`, `7d`).
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// Only rows whose label has arrived.
        #[arg(long)]
        labeled_only: bool,
        #[arg(short = 'o', long)]
        out: PathBuf,
    },
}

/// Runs `lathe store` (the store's numbers, as JSON) or `lathe store export`.
pub fn run(args: StoreArgs) -> Result<(), String> {
    let pipeline = args.pipeline.ok_or("--pipeline is required: the pipeline whose store to read")?;
    let config = crate::service::load_config(&args.config).map_err(|e| e.to_string())?;
    let store = Store::open(config.store.clone()).map_err(|e| e.to_string())?;
    match args.command {
        None => stats(&store, &pipeline),
        Some(StoreCommand::Export { since, labeled_only, out }) => {
            let since_ms = match since {
                None => 0,
                Some(text) => {
                    let d = crate::config::parse_duration(&text)
                        .ok_or_else(|| format!("--since {text:?}: expected a duration such as 30m, 12h or 7d"))?;
                    crate::telemetry::unix_ms().saturating_sub(d.as_millis() as u64)
                }
            };
            let bundle = pipeline_bundle(&config, &pipeline)?;
            let rows = store.samples(&pipeline).map_err(|e| e.to_string())?;
            let rows: Vec<&Record> =
                rows.iter().filter(|r| r.ts_ms >= since_ms && (!labeled_only || r.label.is_some())).collect();
            let csv = export_csv(&bundle.manifest, &rows)?;
            crate::fs::write_atomic(&out, csv.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
            eprintln!("{} rows of {pipeline} written to {}", rows.len(), out.display());
            Ok(())
        }
    }
}

/// The store's numbers and how many distinct messages it holds, JSON.
fn stats(store: &Store, pipeline: &str) -> Result<(), String> {
    let stats = store.stats(pipeline).map_err(|e| e.to_string())?;
    let samples = store.samples(pipeline).map_err(|e| e.to_string())?;
    let keys: std::collections::HashSet<String> = samples.iter().map(Record::join_key).collect();
    let versions: std::collections::BTreeMap<u64, usize> = samples.iter().fold(Default::default(), |mut m, r| {
        *m.entry(r.version).or_default() += 1;
        m
    });
    let mut out = serde_json::to_value(stats).map_err(|e| e.to_string())?;
    out["distinct_keys"] = keys.len().into();
    out["rows_by_version"] = serde_json::to_value(versions).map_err(|e| e.to_string())?;
    println!("{out}");
    Ok(())
}

/// The bundle the pipeline serves: the registry's champion, else the file the config names.
fn pipeline_bundle(config: &Config, pipeline: &str) -> Result<Bundle, String> {
    let p = config
        .pipelines
        .iter()
        .find(|p| p.name == pipeline)
        .ok_or_else(|| format!("the config has no pipeline {pipeline:?}"))?;
    let registry = Registry::new(&config.state_dir);
    match &p.model {
        ModelRef::Name(name) => registry.champion(name).map_err(|e| e.to_string()),
        ModelRef::File(file) => {
            let from_file = Bundle::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
            Ok(registry.champion(&from_file.manifest.name).unwrap_or(from_file))
        }
        ModelRef::ColdStart(c) => crate::train::cold_start::serving(&registry, &p.name, c).map_err(|e| e.to_string()),
    }
}

pub(super) const SERVED_COLUMNS: [&str; 5] = ["prediction", "version", "device", "key", "served_at"];

/// The rows as CSV (see [`StoreCommand::Export`]).
fn export_csv(manifest: &crate::model::Manifest, rows: &[&Record]) -> Result<String, String> {
    let mut header: Vec<&str> = manifest.inputs.iter().map(|i| i.name.as_str()).collect();
    // A reconstruction model has no target; its column still says which rows were labeled.
    let target = if manifest.target.is_empty() { "label" } else { manifest.target.as_str() };
    header.push(target);
    header.extend(SERVED_COLUMNS);
    if let Some(twice) = header.iter().enumerate().find(|(i, h)| header[..*i].contains(h)).map(|(_, h)| h) {
        return Err(format!(
            "the model has a column named {twice:?}, which the export also writes ({}): rename the input",
            SERVED_COLUMNS.join(", ")
        ));
    }
    let frame = manifest.inputs.len();
    let mut out = String::new();
    push_line(&mut out, header.iter().map(|h| h.to_string()));
    for r in rows {
        // A sequence model stores the whole window: its last frame is the row served.
        let Some(values) = r.features.len().checked_sub(frame).map(|start| &r.features[start..]) else {
            continue;
        };
        let cells = values
            .iter()
            .map(|v| v.to_string())
            .chain([r.label.map(|l| l.to_string()).unwrap_or_default()])
            .chain([r.score.to_string(), r.version.to_string(), r.device.clone(), r.key.clone(), r.ts_ms.to_string()]);
        push_line(&mut out, cells);
    }
    Ok(out)
}

fn push_line(out: &mut String, cells: impl Iterator<Item = String>) {
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            out.push(',');
        }
        crate::model::csv::push_cell(out, &cell, ',');
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(window: usize) -> crate::model::Manifest {
        let b =
            Bundle::read(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shuttle-mlp-1.lathe")).unwrap();
        crate::model::Manifest { window, ..b.manifest }
    }

    fn record(features: Vec<f32>, label: Option<f64>, key: &str) -> Record {
        Record {
            ts_ms: 1_700_000_000_000,
            version: 2,
            label,
            score: 0.25,
            device: "press-1".into(),
            key: key.into(),
            features,
            output: vec![0.25],
        }
    }

    /// Each row is the model's inputs, its label (empty until it came), then what was served;
    /// a key holding commas and quotes is quoted, and the table reads back as a CSV.
    #[test]
    fn rows_are_written_in_the_models_columns_with_what_was_served() {
        let m = manifest(1);
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let (a, b) = (record(x.clone(), Some(1.0), "{\"seq\":1,\"line\":\"a\"}"), record(x, None, "7"));
        let csv = export_csv(&m, &[&a, &b]).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "f1,f2,f3,f4,f5,f6,f7,f8,f9,anomaly,prediction,version,device,key,served_at");
        assert_eq!(
            lines[1],
            "1,2,3,4,5,6,7,8,9,1,0.25,2,press-1,\"{\"\"seq\"\":1,\"\"line\"\":\"\"a\"\"}\",1700000000000"
        );
        assert_eq!(lines[2], "1,2,3,4,5,6,7,8,9,,0.25,2,press-1,7,1700000000000");
        let table = crate::model::csv::parse_csv(&csv).unwrap();
        assert_eq!(table.rows.len(), 2);
        assert_eq!(table.rows[0][9], 1.0);
    }

    /// A sequence model's stored window is written as its last frame.
    #[test]
    fn a_window_is_written_as_its_last_frame() {
        let m = manifest(3);
        let window: Vec<f32> = (0..27).map(|v| v as f32).collect();
        let csv = export_csv(&m, &[&record(window, Some(0.0), "1")]).unwrap();
        assert!(csv.lines().nth(1).unwrap().starts_with("18,19,20,21,22,23,24,25,26,0,"), "{csv}");
    }
}
