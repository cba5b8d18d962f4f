//! `lathe train`: the on-device fine-tune, offline — the same code the daemon runs.

use std::path::PathBuf;

use clap::Args;

use crate::fs::write_atomic;
use crate::model::bundle::Bundle;
use crate::train;

#[derive(Args)]
pub struct TrainArgs {
    /// The champion bundle to start from.
    #[arg(long, required_unless_present = "cold_start", conflicts_with = "cold_start")]
    bundle: Option<PathBuf>,
    /// No bundle: grow a model of this task (binary, multiclass, regression, reconstruction)
    /// from scratch, as a cold-start pipeline does; the features are the CSV's columns but
    /// the target (and the served columns of `lathe store export`).
    #[arg(long)]
    cold_start: Option<String>,
    /// --cold-start: the target column (not for reconstruction).
    #[arg(long, default_value = "label")]
    target: String,
    /// --cold-start: hidden layer widths.
    #[arg(long, default_value = "32,16")]
    hidden: String,
    /// --cold-start: the number of classes of a multiclass model.
    #[arg(long, default_value_t = 2)]
    classes: usize,
    /// --cold-start: the bundle's name.
    #[arg(long, default_value = "grown")]
    name: String,
    /// Fresh labelled data: a CSV with the bundle's feature columns and target, oldest row first
    /// (a sequence model's: consecutive frames, each line's target that of the window ending on
    /// it).
    #[arg(long)]
    data: PathBuf,
    /// Sequence models: the CSV column naming each frame's device; each device gets its own
    /// window, as in the daemon (without it, every line is one device's).
    #[arg(long)]
    device_column: Option<String>,
    /// Where the challenger bundle goes if the gate accepts it.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// The run record is kept in STATE_DIR/runs/.
    #[arg(long, default_value = "/var/lib/lathe")]
    state_dir: PathBuf,
    /// auto | cpu | cuda: auto takes the GPU when there is a usable one, else the CPU; cuda
    /// fails with the reason when there is none.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Print the run record as JSON.
    #[arg(long)]
    json: bool,
    // Overrides of the bundle's `[training]` (each written into the run record). Without one,
    // the bundle's own value holds: `lathe bundle inspect` shows them.
    /// none | full | last:N | lora:RANK (default: the bundle's)
    #[arg(long)]
    trainable: Option<String>,
    /// sgd | adam | adamw (default: the bundle's)
    #[arg(long)]
    optimizer: Option<String>,
    /// The optimizer's step size (default: the bundle's)
    #[arg(long)]
    learning_rate: Option<f64>,
    /// The most passes over the training rows; early stopping may end sooner (default: the bundle's)
    #[arg(long)]
    epochs: Option<u32>,
    /// Rows per optimizer step (default: the bundle's)
    #[arg(long)]
    batch: Option<u32>,
    /// Seeds the shuffle and any initialisation: the same seed and data give the same run (default: the bundle's)
    #[arg(long)]
    seed: Option<u64>,
    /// auto | cross_entropy | bce_with_logits | mse
    #[arg(long)]
    loss: Option<String>,
    /// L2 for sgd and adam, decoupled for adamw (default: the bundle's)
    #[arg(long)]
    weight_decay: Option<f64>,
    /// sgd's momentum (default: the bundle's)
    #[arg(long)]
    momentum: Option<f64>,
    /// Clip the global gradient norm (0: off).
    #[arg(long)]
    grad_clip: Option<f64>,
    /// none | balanced | w0,w1,…
    #[arg(long)]
    class_weights: Option<String>,
    /// The newest fraction of rows held out for the gate.
    #[arg(long)]
    holdout: Option<f64>,
    /// Stop after this many epochs without improvement on the early-stopping rows (default: the bundle's)
    #[arg(long)]
    patience: Option<u32>,
    /// The gate's significance level: the gain on the holdout must have p below it (default:
    /// the bundle's, 0.05; 1 turns the test off)
    #[arg(long)]
    significance: Option<f64>,
}

/// The placeholder `--cold-start` grows from: the CSV's columns as features.
fn placeholder(a: &TrainArgs, csv: &str) -> Result<Bundle, String> {
    let task: crate::model::Task = a.cold_start.as_deref().unwrap_or_default().parse()?;
    let header = crate::model::csv::parse_csv(csv).map_err(|e| e.to_string())?.header;
    let supervised = task != crate::model::Task::Reconstruction;
    let features: Vec<String> = header
        .into_iter()
        .filter(|h| {
            let target = supervised && *h == a.target;
            !target && !super::store::SERVED_COLUMNS.contains(&h.as_str())
        })
        .collect();
    let hidden: Vec<usize> = a
        .hidden
        .split(',')
        .map(|w| w.trim().parse().ok().filter(|&w| w > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("--hidden {:?}: expected widths such as 32,16", a.hidden))?;
    let cold = crate::model::manifest::ColdStart { hidden, min_rows: 0, classes: a.classes };
    let seed = a.seed.unwrap_or(0);
    let p = train::cold_start::placeholder(&a.name, task, &features, &cold, seed)?;
    p.edited(|m| m.target = a.target.clone()).map_err(|e| e.to_string())
}

pub fn run(a: TrainArgs) -> Result<(), String> {
    let csv = crate::model::csv::read_file(&a.data).map_err(|e| e.to_string())?;
    let mut champion = match &a.bundle {
        Some(path) => Bundle::read(path).map_err(|e| format!("{}: {e}", path.display()))?,
        None => placeholder(&a, &csv)?,
    };
    match a.significance {
        Some(level) if !(level > 0.0 && level <= 1.0) => {
            return Err(format!("--significance {level}: expected a level above 0 and at most 1"))
        }
        Some(level) => champion.manifest.gate.significance = level,
        None => {}
    }
    let mut t = champion.manifest.training.clone();
    macro_rules! set {
        ($($field:ident = $value:expr),*) => { $( if let Some(v) = $value { t.$field = v; } )* };
    }
    set!(
        trainable = a.trainable,
        optimizer = a.optimizer,
        learning_rate = a.learning_rate,
        epochs = a.epochs,
        batch = a.batch,
        seed = a.seed,
        loss = a.loss,
        weight_decay = a.weight_decay,
        momentum = a.momentum,
        grad_clip = a.grad_clip,
        class_weights = a.class_weights,
        holdout = a.holdout,
        early_stopping_patience = a.patience
    );
    if !matches!(a.backend.as_str(), "auto" | "cpu" | "cuda") {
        return Err(format!("--backend {:?}: expected auto, cpu or cuda", a.backend));
    }
    let name = a.data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let classes = train::classes(&champion, &t).map_err(|e| e.to_string())?;
    let data = train::data::load_by_device(&champion.manifest, &csv, classes, a.device_column.as_deref())
        .map_err(|e| e.to_string())?;
    let gpu = train::GpuSettings { cache_dir: Some(a.state_dir.join("cache")), max_gpu_mem_mb: 1024 };
    let outcome = train::fine_tune_with(&a.backend, &gpu, &champion, data, &name, &t, None, &|| Ok(()))
        .map_err(|e| e.to_string())?;
    let record = &outcome.record;
    let json = match train::keep_record(&a.state_dir, record) {
        Ok(json) => json,
        Err(e) => {
            eprintln!("lathe: warning: {e}");
            serde_json::to_string_pretty(record).map_err(|e| e.to_string())?
        }
    };
    if let Some(b) = &outcome.challenger {
        let bytes = b.to_bytes().map_err(|e| e.to_string())?;
        write_atomic(&a.output, &bytes).map_err(|e| format!("{}: {e}", a.output.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print_summary(record, &a.output);
    }
    match &outcome.challenger {
        Some(_) => Ok(()),
        None => Err(format!("no new bundle: {}", record.outcome)),
    }
}

fn print_summary(r: &train::RunRecord, output: &std::path::Path) {
    let h = &r.hyperparameters;
    println!("run {} on {} ({:.2} s)", r.run_id, r.backend, r.wall_seconds);
    let dropped: usize = r.rows_dropped.values().sum();
    println!(
        "  data: {} rows used ({dropped} dropped {:?}); train {}, early stopping {}, holdout {} (newest)",
        r.rows_used, r.rows_dropped, r.train_rows, r.early_stop_rows, r.holdout_rows
    );
    let trains: Vec<&str> = r.layers.iter().filter(|l| l.trains).map(|l| l.node.as_str()).collect();
    println!("  trains {} ({} values, {:?} loss): {}", h.trainable, r.trainable_values, r.loss, trains.join(", "));
    println!(
        "  {} lr {} batch {} epochs {} (best {}{}), seed {}",
        h.optimizer,
        h.learning_rate,
        h.batch,
        r.epochs.len(),
        r.best_epoch,
        if r.stopped_early { ", stopped early" } else { "" },
        h.seed
    );
    if let Some(g) = &r.gate {
        let m = |map: &std::collections::BTreeMap<String, f64>| map.get(&g.metric).copied().unwrap_or(f64::NAN);
        println!(
            "  gate ({}): holdout {:.4} -> {:.4}, validation {:.4} -> {:.4}",
            g.metric,
            m(&g.champion_holdout),
            m(&g.challenger_holdout),
            m(&g.champion_validation),
            m(&g.challenger_validation)
        );
        println!(
            "  beyond sampling noise: {} ({})",
            if g.significance.significant { "yes" } else { "no" },
            g.significance.summary()
        );
    }
    println!("  {}", r.outcome);
    if let Some(v) = r.output_version {
        println!("  wrote {} (version {v})", output.display());
    }
}
