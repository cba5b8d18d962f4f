//! The bundle file (`NAME-VERSION.lathe`): a tar of `bundle.toml`, `model.onnx`,
//! `validation.csv` and, once signed, `bundle.sig` (ed25519 over `bundle.toml`, which holds the
//! sha256 of every other file — so one signature covers the whole bundle).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::baseline::{self, Baseline, Reading};
use super::csv::{comma_separated, parse_csv};
use super::manifest::{Gate, Input, Lineage, Manifest, Task, Training, FORMAT};
use crate::engine::{sliding_windows, Engine, EngineError, Outputs};

pub const MANIFEST: &str = "bundle.toml";
pub const MODEL: &str = "model.onnx";
pub const VALIDATION: &str = "validation.csv";
pub const SIGNATURE: &str = "bundle.sig";
/// A bundle larger than this is refused before it is unpacked.
const MAX_BUNDLE_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a valid bundle: {0}")]
    Format(String),
    #[error("{file} does not match its sha256 in bundle.toml (the bundle is corrupt or was altered)")]
    Hash { file: String },
    #[error("validation data: {0}")]
    Data(String),
    #[error("validation data: {0}")]
    Csv(#[from] super::csv::CsvError),
    #[error("model: {0}")]
    Model(#[from] EngineError),
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Debug, Clone)]
pub struct Bundle {
    pub manifest: Manifest,
    /// The exact `bundle.toml` bytes (what a signature covers).
    pub manifest_bytes: Vec<u8>,
    pub model: Vec<u8>,
    pub validation: Vec<u8>,
    pub signature: Option<Vec<u8>>,
}

impl Bundle {
    /// The bundle's identity: sha256 of `bundle.toml`, which pins every other file.
    pub fn sha256(&self) -> String {
        sha256_hex(&self.manifest_bytes)
    }

    /// The bundle with its manifest changed by `edit` (and written again).
    ///
    /// # Errors
    /// A manifest that cannot be written.
    pub fn edited(mut self, edit: impl FnOnce(&mut Manifest)) -> Result<Bundle, BundleError> {
        edit(&mut self.manifest);
        self.manifest_bytes =
            toml::to_string(&self.manifest).map_err(|e| BundleError::Format(e.to_string()))?.into_bytes();
        Ok(self)
    }

    /// The same bundle as another version (the loop numbers a challenger past every version
    /// the registry already has, e.g. one that was rolled back).
    ///
    /// # Errors
    /// A manifest that cannot be written.
    pub fn with_version(self, version: u64) -> Result<Bundle, BundleError> {
        self.edited(|m| m.version = version)
    }

    pub fn file_name(&self) -> String {
        format!("{}-{}.lathe", self.manifest.name, self.manifest.version)
    }

    /// # Errors
    /// Unreadable files, or any check of [`Bundle::from_bytes`].
    pub fn read(path: &Path) -> Result<Bundle, BundleError> {
        let io = |source| BundleError::Io { path: path.display().to_string(), source };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_BUNDLE_BYTES {
            return Err(BundleError::Format(format!("{len} bytes is over the {MAX_BUNDLE_BYTES}-byte limit")));
        }
        Bundle::from_bytes(&std::fs::read(path).map_err(io)?)
    }

    /// Unpacks and checks a bundle: known file names only, a manifest of this format, and
    /// every file matching its sha256.
    ///
    /// # Errors
    /// Any of those checks failing.
    pub fn from_bytes(bytes: &[u8]) -> Result<Bundle, BundleError> {
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut archive = tar::Archive::new(bytes);
        let entries = archive.entries().map_err(|e| BundleError::Format(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| BundleError::Format(e.to_string()))?;
            let name = entry.path().map_err(|e| BundleError::Format(e.to_string()))?.to_string_lossy().into_owned();
            // Plain files only: a GNU sparse entry expands to a size of its own choosing, a
            // link or a device names something outside the bundle, and none is ever written
            // by `bundle create`. (PAX and GNU long-name headers are read by `tar` itself.)
            let kind = entry.header().entry_type();
            if kind != tar::EntryType::Regular {
                return Err(BundleError::Format(format!(
                    "{name} is a {kind:?} entry; a bundle holds plain files only"
                )));
            }
            if ![MANIFEST, MODEL, VALIDATION, SIGNATURE].contains(&name.as_str()) {
                return Err(BundleError::Format(format!("unexpected file {name:?}")));
            }
            if files.contains_key(&name) {
                return Err(BundleError::Format(format!("{name} appears twice")));
            }
            let mut data = Vec::new();
            entry.read_to_end(&mut data).map_err(|e| BundleError::Format(e.to_string()))?;
            files.insert(name, data);
        }
        let mut take = |name: &str| files.remove(name).ok_or_else(|| BundleError::Format(format!("{name} is missing")));
        let manifest_bytes = take(MANIFEST)?;
        let model = take(MODEL)?;
        let validation = take(VALIDATION)?;
        let signature = files.remove(SIGNATURE);
        let text =
            std::str::from_utf8(&manifest_bytes).map_err(|_| BundleError::Format("bundle.toml is not UTF-8".into()))?;
        let format: toml::Table = toml::from_str(text).map_err(|e| BundleError::Format(format!("bundle.toml: {e}")))?;
        match format.get("format").and_then(toml::Value::as_integer) {
            Some(f) if f == i64::from(FORMAT) => {}
            other => {
                return Err(BundleError::Format(format!("bundle format {other:?}; this build reads format {FORMAT}")))
            }
        }
        let manifest: Manifest = toml::from_str(text).map_err(|e| BundleError::Format(format!("bundle.toml: {e}")))?;
        for (name, data) in [(MODEL, &model), (VALIDATION, &validation)] {
            if manifest.files.get(name) != Some(&sha256_hex(data)) {
                return Err(BundleError::Hash { file: name.into() });
            }
        }
        if manifest.files.len() != 2 {
            return Err(BundleError::Format("bundle.toml lists files the bundle does not hold".into()));
        }
        if manifest.primary_output >= manifest.outputs.len() || manifest.inputs.is_empty() {
            return Err(BundleError::Format("bundle.toml: primary_output or inputs out of range".into()));
        }
        Ok(Bundle { manifest, manifest_bytes, model, validation, signature })
    }

    /// The tar bytes. Entries carry fixed metadata so the same bundle always packs the same.
    ///
    /// # Errors
    /// Only on an internal tar failure.
    pub fn to_bytes(&self) -> Result<Vec<u8>, BundleError> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut files = vec![(MANIFEST, &self.manifest_bytes), (MODEL, &self.model), (VALIDATION, &self.validation)];
        if let Some(sig) = &self.signature {
            files.push((SIGNATURE, sig));
        }
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_cksum();
            builder.append_data(&mut header, name, data.as_slice()).map_err(|e| BundleError::Format(e.to_string()))?;
        }
        builder.into_inner().map_err(|e| BundleError::Format(e.to_string()))
    }

    /// The validation set's feature rows (frames), in model order, flattened. A sequence
    /// model's samples are the windows over them ([`Bundle::validation_samples`]).
    ///
    /// # Errors
    /// A validation CSV that lacks an input column or holds non-numbers in one.
    pub fn validation_rows(&self) -> Result<Vec<f32>, BundleError> {
        let text = std::str::from_utf8(&self.validation)
            .map_err(|_| BundleError::Data("validation.csv is not UTF-8".into()))?;
        let table = parse_csv(text)?;
        let cols: Vec<usize> = self
            .manifest
            .inputs
            .iter()
            .map(|i| table.numeric_column(&i.name).map_err(BundleError::from))
            .collect::<Result<_, _>>()?;
        Ok(table.rows.iter().flat_map(|r| cols.iter().map(move |&c| r[c] as f32)).collect())
    }

    /// What the model takes on its validation set: the rows, or for a sequence model every
    /// window of `window` consecutive rows (window `i` ends on row `i + window - 1`).
    ///
    /// # Errors
    /// As [`Bundle::validation_rows`].
    pub fn validation_samples(&self) -> Result<Vec<f32>, BundleError> {
        let rows = self.validation_rows()?;
        Ok(match self.manifest.window {
            0 | 1 => rows,
            n => sliding_windows(&rows, self.manifest.inputs.len(), n),
        })
    }

    /// The validation set's target column (empty for `reconstruction`), one per sample: a
    /// sequence model's first `window - 1` rows end no window, and their targets are skipped.
    ///
    /// # Errors
    /// A missing or non-numeric target column.
    pub fn validation_targets(&self) -> Result<Vec<f64>, BundleError> {
        if self.manifest.task == Task::Reconstruction {
            return Ok(Vec::new());
        }
        let text = std::str::from_utf8(&self.validation)
            .map_err(|_| BundleError::Data("validation.csv is not UTF-8".into()))?;
        let table = parse_csv(text)?;
        let c = table.numeric_column(&self.manifest.target)?;
        Ok(table.rows.iter().skip(self.manifest.window.saturating_sub(1)).map(|r| r[c]).collect())
    }

    /// Runs the model on its own validation set: what it outputs there must be finite.
    ///
    /// # Errors
    /// The model failing on its data, or giving NaN or infinity.
    pub fn validate(&self, engine: &Engine) -> Result<(), BundleError> {
        self.validated_outputs(engine).map(|_| ())
    }

    /// Like [`Bundle::validate`], returning the validation rows and the model's outputs on
    /// them, so a caller that needs both (the drift monitor's reference) runs the set once.
    /// For a sequence model the rows are those that end a window, one per output row.
    ///
    /// # Errors
    /// As [`Bundle::validate`].
    pub fn validated_outputs(&self, engine: &Engine) -> Result<(Vec<f32>, Outputs), BundleError> {
        let mut rows = self.validation_rows()?;
        let outputs = engine.run(&self.validation_samples()?)?;
        check_finite(&outputs, &self.manifest.outputs)?;
        let skipped = self.manifest.window.saturating_sub(1) * self.manifest.inputs.len();
        rows.drain(..skipped.min(rows.len()));
        Ok((rows, outputs))
    }

    pub fn reading(&self) -> Reading {
        Reading { task: self.manifest.task, threshold: self.manifest.baseline.threshold }
    }
}

/// What `lathe bundle create` needs.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub name: String,
    pub version: u64,
    pub task: Task,
    /// Required except for `reconstruction`.
    pub target: Option<String>,
    /// Feature columns in model order; default: every column but the target.
    pub features: Option<Vec<String>>,
    /// Explicit valid ranges; the rest come from the data.
    pub ranges: BTreeMap<String, (f64, f64)>,
    pub units: BTreeMap<String, String>,
    pub source_model: String,
    pub data_name: String,
    /// `training.trainable`: "none", "full", "last:N" or "lora:RANK".
    pub trainable: String,
}

/// Valid range of a feature from data: the observed span widened by the span again on each side,
/// so healthy readings slightly beyond the validation set pass while a stuck-at-9999 sensor
/// or a unit mix-up does not.
pub fn range_from_data(stats: &baseline::Stats) -> (f64, f64) {
    let span = stats.max - stats.min;
    let margin = if span > 0.0 { span } else { stats.max.abs().max(1.0) };
    (stats.min - margin, stats.max + margin)
}

/// Refuses a model whose outputs are NaN or infinite: nothing downstream can use them.
fn check_finite(outputs: &Outputs, names: &[String]) -> Result<(), BundleError> {
    for (o, values) in outputs.values.iter().enumerate() {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let name = names.get(o).map(String::as_str).unwrap_or("?");
            let row = i / outputs.per_row[o].max(1) + 1;
            return Err(BundleError::Model(EngineError::Run(format!(
                "output {name:?} is not finite ({}) on validation row {row}",
                values[i]
            ))));
        }
    }
    Ok(())
}

/// Picks the output that is "the prediction": for classifiers the class-score tensor (not
/// an integer label output), for regression the one-value output, for reconstruction the one
/// as wide as the input.
fn primary_output(task: Task, outputs: &Outputs, features: usize) -> usize {
    let w = &outputs.per_row;
    let first = |f: &dyn Fn(usize) -> bool| w.iter().position(|&x| f(x));
    let pick = match task {
        Task::Binary => first(&|x| x == 2).or_else(|| first(&|x| x == 1)),
        Task::Multiclass => w.iter().enumerate().max_by_key(|(i, &x)| (x, usize::MAX - i)).map(|(i, _)| i),
        Task::Regression => first(&|x| x == 1),
        Task::Reconstruction => first(&|x| x == features),
    };
    pick.unwrap_or(0)
}

/// What a model's outputs on labelled rows amount to.
pub struct Measured {
    pub metrics: BTreeMap<String, f64>,
    /// Classification: the share of each predicted class.
    pub class_shares: Vec<f64>,
    /// One score per row (see [`Reading::score`]).
    pub scores: Vec<f64>,
    /// Classification: each row's predicted class, and how many classes there are.
    pub predicted: Vec<usize>,
    pub classes: usize,
}

impl Measured {
    /// The task's metric `name` on some of the rows (`rows` may repeat one: a bootstrap draw),
    /// with the true values `truth` of all of them. None: not a metric of this task, or (F1 of
    /// a binary model) not defined on these rows, which hold no row of the positive class.
    pub fn metric_on(&self, task: Task, truth: &[f64], rows: &[usize], name: &str) -> Option<f64> {
        let pick = |v: &[f64]| rows.iter().map(|&r| v[r]).collect::<Vec<f64>>();
        let all = match task {
            Task::Binary | Task::Multiclass => {
                let predicted: Vec<usize> = rows.iter().map(|&r| self.predicted[r]).collect();
                let labels: Vec<usize> = rows.iter().map(|&r| truth[r] as usize).collect();
                // The gate asks this 2,000 times a run: spare it the ROC AUC's sort.
                match name {
                    "accuracy" => return Some(baseline::accuracy(&predicted, &labels)),
                    "f1" if task == Task::Binary => {
                        return labels.contains(&1).then(|| baseline::f1(&predicted, &labels, 1))
                    }
                    _ => baseline::classification_metrics(task, &predicted, &labels, &pick(&self.scores), self.classes),
                }
            }
            Task::Regression => baseline::regression_metrics(&pick(&self.scores), &pick(truth)),
            Task::Reconstruction => baseline::reconstruction_metrics(&pick(&self.scores)),
        };
        all.get(name).copied()
    }
}

/// The task's metrics for `outputs` (primary output `p`) on rows `x` (`f` features each)
/// with true values `truth` (ignored for reconstruction). The baseline, the gate and the
/// trainer's records all measure with this one function.
///
/// # Errors
/// A classification target that is not a class index.
pub fn measure(
    task: Task,
    threshold: Option<f64>,
    outputs: &Outputs,
    p: usize,
    x: &[f32],
    f: usize,
    truth: &[f64],
) -> Result<Measured, BundleError> {
    let n = x.len() / f.max(1);
    let reading = Reading { task, threshold };
    let scores: Vec<f64> = (0..n).map(|r| reading.score(outputs.row(p, r), &x[r * f..(r + 1) * f])).collect();
    let (mut predicted, mut classes) = (Vec::new(), 0);
    let (metrics, class_shares) = match task {
        Task::Binary | Task::Multiclass => {
            let labels: Vec<usize> = truth
                .iter()
                .map(|&t| {
                    if t >= 0.0 && t.fract() == 0.0 {
                        Ok(t as usize)
                    } else {
                        Err(BundleError::Data(format!("target value {t} is not a class index")))
                    }
                })
                .collect::<Result<_, _>>()?;
            predicted = (0..n).map(|r| reading.class(outputs.row(p, r)).unwrap_or(0)).collect();
            classes = outputs.per_row[p].max(2).max(labels.iter().max().map_or(0, |m| m + 1));
            let shares =
                (0..classes).map(|c| predicted.iter().filter(|&&x| x == c).count() as f64 / n.max(1) as f64).collect();
            (baseline::classification_metrics(task, &predicted, &labels, &scores, classes), shares)
        }
        Task::Regression => (baseline::regression_metrics(&scores, truth), Vec::new()),
        Task::Reconstruction => (baseline::reconstruction_metrics(&scores), Vec::new()),
    };
    Ok(Measured { metrics, class_shares, scores, predicted, classes })
}

/// Makes a bundle from any ONNX model and its held-out validation data: runs the model on
/// every row and writes the baseline.
///
/// # Errors
/// A model lathe cannot serve, data that does not fit it, or a task the outputs do not fit.
pub fn create(model: Vec<u8>, data: &str, opts: &CreateOptions) -> Result<Bundle, BundleError> {
    let engine = Engine::load(&model)?;
    let data = comma_separated(data)?;
    // A classifier trained on class names is judged, and kept, with their indices.
    let classes = match opts.task {
        Task::Binary | Task::Multiclass => engine.signature.classes.clone(),
        Task::Regression | Task::Reconstruction => Vec::new(),
    };
    let data = match &opts.target {
        Some(t) if !classes.is_empty() => {
            std::borrow::Cow::Owned(crate::model::csv::class_indices(&data, t, &classes)?)
        }
        _ => data,
    };
    let table = parse_csv(&data)?;
    let col = |name: &str| table.numeric_column(name).map_err(BundleError::from);
    let target = match (&opts.target, opts.task) {
        (Some(t), _) => Some(col(t)?),
        (None, Task::Reconstruction) => None,
        (None, _) => return Err(BundleError::Data("--target is required for this task".into())),
    };
    let names: Vec<String> = match &opts.features {
        Some(f) => f.clone(),
        None => table.header.iter().enumerate().filter(|(i, _)| Some(*i) != target).map(|(_, h)| h.clone()).collect(),
    };
    let cols: Vec<usize> = names.iter().map(|n| col(n)).collect::<Result<_, _>>()?;
    let f = engine.signature.features;
    if cols.len() != f {
        return Err(BundleError::Data(format!(
            "the model's input {:?} takes {f} features; the CSV gives {} ({})",
            engine.signature.input,
            cols.len(),
            names.join(",")
        )));
    }
    let mut x: Vec<f32> = table.rows.iter().flat_map(|r| cols.iter().map(move |&c| r[c] as f32)).collect();
    // A sequence model is judged on every window of consecutive rows, each with the target on
    // its last row; from here on `x` holds the rows that end a window.
    let window = engine.signature.frames;
    if window > 1 && opts.task == Task::Reconstruction {
        return Err(BundleError::Data("a sequence model (input [batch, frames, features]) cannot be a reconstruction model: lathe scores reconstruction against one row".into()));
    }
    if table.rows.len() < window + 1 {
        return Err(BundleError::Data(format!(
            "the model takes windows of {window} rows; the CSV has {} rows, too few to validate it",
            table.rows.len()
        )));
    }
    let outputs = match window {
        1 => engine.run(&x)?,
        n => engine.run(&sliding_windows(&x, f, n))?,
    };
    x.drain(..(window - 1) * f);
    check_finite(&outputs, &engine.signature.outputs)?;
    let p = primary_output(opts.task, &outputs, f);
    let n = table.rows.len() - (window - 1);
    let truth: Vec<f64> =
        target.map(|t| table.rows.iter().skip(window - 1).map(|r| r[t]).collect()).unwrap_or_default();

    let threshold = match opts.task {
        Task::Binary if outputs.per_row[p] == 1 => {
            let scores: Vec<f64> = (0..n).map(|r| f64::from(outputs.row(p, r)[0])).collect();
            Some(baseline::binary_threshold(&scores))
        }
        // The anomaly line of an autoencoder: the 99th percentile of its reconstruction error
        // on the validation data (which is normal). The loop fine-tunes on rows below it.
        Task::Reconstruction => {
            let mut errors: Vec<f64> =
                (0..n).map(|r| baseline::reconstruction_error(outputs.row(p, r), &x[r * f..(r + 1) * f])).collect();
            errors.sort_by(f64::total_cmp);
            errors.get((errors.len() * 99 / 100).min(errors.len().saturating_sub(1))).copied()
        }
        _ => None,
    };
    let measured = measure(opts.task, threshold, &outputs, p, &x, f, &truth)?;
    let features: Vec<baseline::Stats> = names
        .iter()
        .zip(&cols)
        .map(|(name, &c)| baseline::stats(name, &table.rows.iter().map(|r| r[c]).collect::<Vec<_>>()))
        .collect();
    let inputs = names
        .iter()
        .zip(&features)
        .map(|(name, st)| {
            let (min, max) = opts.ranges.get(name).copied().unwrap_or_else(|| range_from_data(st));
            Input { name: name.clone(), unit: opts.units.get(name).cloned().unwrap_or_default(), min, max }
        })
        .collect();
    for name in opts.ranges.keys().chain(opts.units.keys()) {
        if !names.contains(name) {
            return Err(BundleError::Data(format!("--range/--unit names {name:?}, which is not a feature")));
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let manifest = Manifest {
        format: FORMAT,
        name: opts.name.clone(),
        version: opts.version,
        parent: String::new(),
        task: opts.task,
        target: opts.target.clone().unwrap_or_default(),
        classes,
        primary_output: p,
        model_input: engine.signature.input.clone(),
        window,
        inputs,
        outputs: engine.signature.outputs.clone(),
        training: Training { trainable: opts.trainable.clone(), ..Training::default() },
        gate: Gate::for_task(opts.task),
        baseline: Baseline {
            rows: n,
            metrics: measured.metrics,
            threshold,
            features,
            predictions: baseline::stats("score", &measured.scores),
            class_shares: measured.class_shares,
        },
        lineage: Lineage {
            created_by: format!("lathe bundle create {}", env!("CARGO_PKG_VERSION")),
            created_unix: now,
            source_model: opts.source_model.clone(),
            data: format!("{} ({n} rows)", opts.data_name),
            fine_tune: None,
        },
        files: BTreeMap::from([
            (MODEL.to_string(), sha256_hex(&model)),
            (VALIDATION.to_string(), sha256_hex(data.as_bytes())),
        ]),
        cold_start: None,
    };
    let text = toml::to_string(&manifest).map_err(|e| BundleError::Format(e.to_string()))?;
    Ok(Bundle {
        manifest,
        manifest_bytes: text.into_bytes(),
        model,
        validation: data.as_bytes().to_vec(),
        signature: None,
    })
}

/// A fine-tuned child of `parent`: the same inputs, ranges, validation set, gate and reading;
/// a new model; version + 1; `parent` = the parent's sha256; the baseline's metrics and
/// prediction distribution measured again on the validation set with the new model (the
/// feature statistics describe the same data, so they stay).
///
/// # Errors
/// A model that fails or gives non-finite outputs on the validation set.
pub fn derive(parent: &Bundle, model: Vec<u8>, training: Training, lineage: Lineage) -> Result<Bundle, BundleError> {
    let engine = Engine::load(&model)?;
    let m = &parent.manifest;
    let s = &engine.signature;
    if s.outputs != m.outputs || s.features != m.inputs.len() || s.frames != m.window {
        return Err(BundleError::Format("the new model's inputs or outputs differ from its parent's".into()));
    }
    let (x, outputs) = parent.validated_outputs(&engine)?;
    let measured = measure(
        m.task,
        m.baseline.threshold,
        &outputs,
        m.primary_output,
        &x,
        m.inputs.len(),
        &parent.validation_targets()?,
    )?;
    let mut manifest = m.clone();
    manifest.version = m.version + 1;
    manifest.parent = parent.sha256();
    manifest.training = training;
    manifest.lineage = lineage;
    manifest.baseline.metrics = measured.metrics;
    manifest.baseline.predictions = baseline::stats("score", &measured.scores);
    manifest.baseline.class_shares = measured.class_shares;
    manifest.files.insert(MODEL.to_string(), sha256_hex(&model));
    let text = toml::to_string(&manifest).map_err(|e| BundleError::Format(e.to_string()))?;
    Ok(Bundle {
        manifest,
        manifest_bytes: text.into_bytes(),
        model,
        validation: parent.validation.clone(),
        signature: None,
    })
}

/// A valid bundle name: it becomes a directory and part of a file name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !name.starts_with('.')
}
