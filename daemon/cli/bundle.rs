//! `lathe bundle create | inspect`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Subcommand;

use crate::model::bundle::{self, Bundle, CreateOptions};
use crate::model::Task;

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum BundleCommand {
    /// Make a bundle from any ONNX model with one [batch, features] input and its held-out
    /// validation CSV; runs the model on every row to record the baseline.
    Create {
        /// The ONNX model (PyTorch, scikit-learn, Keras … exports).
        #[arg(long)]
        model: PathBuf,
        /// Held-out validation data: a numeric CSV with a header.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        name: String,
        /// binary | multiclass | regression | reconstruction
        #[arg(long)]
        task: Task,
        /// The target column (not needed for reconstruction).
        #[arg(long)]
        target: Option<String>,
        /// Feature columns in model order (default: every column but the target).
        #[arg(long, value_delimiter = ',')]
        features: Option<Vec<String>>,
        #[arg(long, default_value_t = 1)]
        version: u64,
        /// A feature's valid range, NAME=MIN:MAX (repeatable); default: the data's range
        /// widened by its span on each side.
        #[arg(long = "range", value_parser = parse_range)]
        ranges: Vec<(String, (f64, f64))>,
        /// A feature's unit, NAME=UNIT (repeatable).
        #[arg(long = "unit", value_parser = parse_unit)]
        units: Vec<(String, String)>,
        /// What may fine-tune on the device: none | full | last:N | lora:RANK. Anything but
        /// `none` is checked now: a model whose tail cannot train is refused here.
        #[arg(long, default_value = "last:1")]
        trainable: String,
        /// Output file (default: NAME-VERSION.lathe).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show a bundle's manifest after checking every file's hash.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn parse_range(s: &str) -> Result<(String, (f64, f64)), String> {
    let bad = || format!("expected NAME=MIN:MAX, found {s:?}");
    let (name, range) = s.split_once('=').ok_or_else(bad)?;
    let (lo, hi) = range.split_once(':').ok_or_else(bad)?;
    let (lo, hi) = (lo.parse::<f64>().map_err(|_| bad())?, hi.parse::<f64>().map_err(|_| bad())?);
    if lo.is_nan() || hi.is_nan() || lo > hi {
        return Err(bad());
    }
    Ok((name.to_string(), (lo, hi)))
}

fn parse_unit(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .ok_or_else(|| format!("expected NAME=UNIT, found {s:?}"))
}

pub fn run(cmd: BundleCommand) -> Result<(), String> {
    match cmd {
        BundleCommand::Create {
            model,
            data,
            name,
            task,
            target,
            features,
            version,
            ranges,
            units,
            trainable,
            output,
            json,
        } => {
            if !bundle::valid_name(&name) {
                return Err(format!("bundle name {name:?}: use letters, digits, '.', '_' and '-'"));
            }
            let model_bytes = std::fs::read(&model).map_err(|e| format!("{}: {e}", model.display()))?;
            let text = crate::model::csv::read_file(&data).map_err(|e| e.to_string())?;
            let file_name = |p: &PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let opts = CreateOptions {
                name,
                version,
                task,
                target,
                features,
                ranges: ranges.into_iter().collect::<BTreeMap<_, _>>(),
                units: units.into_iter().collect(),
                source_model: file_name(&model),
                data_name: file_name(&data),
                trainable,
            };
            let b = bundle::create(model_bytes, &text, &opts).map_err(|e| e.to_string())?;
            let m = &b.manifest;
            if m.training.trainable != "none" {
                crate::train::plan(&b.model, &m.outputs[m.primary_output], m.task, &m.training).map_err(|e| {
                    format!(
                        "this model cannot be fine-tuned as trainable = {:?}: {e} \
                         (bundle it with --trainable none to serve it without fine-tuning)",
                        m.training.trainable
                    )
                })?;
            }
            let out = output.unwrap_or_else(|| PathBuf::from(b.file_name()));
            let bytes = b.to_bytes().map_err(|e| e.to_string())?;
            crate::fs::write_atomic(&out, &bytes).map_err(|e| format!("{}: {e}", out.display()))?;
            if json {
                println!("{}", serde_json::json!({"file": out, "sha256": b.sha256(), "manifest": b.manifest}));
            } else {
                println!("wrote {} ({} bytes, sha256 {})", out.display(), bytes.len(), b.sha256());
                print_summary(&b);
            }
            Ok(())
        }
        BundleCommand::Inspect { file, json } => {
            let b = Bundle::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"file": file, "sha256": b.sha256(), "signed": b.signature.is_some(), "manifest": b.manifest})
                );
            } else {
                println!(
                    "{}: sha256 {} ({})",
                    file.display(),
                    b.sha256(),
                    if b.signature.is_some() { "signed" } else { "unsigned" }
                );
                print!("{}", String::from_utf8_lossy(&b.manifest_bytes));
            }
            Ok(())
        }
    }
}

fn print_summary(b: &Bundle) {
    let m = &b.manifest;
    println!(
        "  {} v{} ({:?}), {} inputs, primary output {:?}",
        m.name,
        m.version,
        m.task,
        m.inputs.len(),
        m.outputs[m.primary_output]
    );
    let metrics: Vec<String> = m.baseline.metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
    println!("  baseline on {} validation rows: {}", m.baseline.rows, metrics.join(", "));
}
