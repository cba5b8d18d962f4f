//! `lathe report`: what the loop did, as one self-contained HTML file (inline SVG, no script,
//! nothing fetched). Everything comes from the state folder:
//!
//! ```text
//! registry/NAME/        the versions and their bundles: reference histograms, lineage
//! samples.redb          the rows each version served  → replayed through the drift monitor
//! runs/*.json           every training run            → loss curves, the gate's table
//! events.jsonl          what the daemon said          → the timeline
//! ```
//!
//! The drift charts are the monitor itself run again over the stored rows (the same
//! statistics, calibration and thresholds as the daemon's, with the config's `[pipeline.drift]`
//! when `--config` is given), so they need a pipeline that stores its rows (one with
//! `[pipeline.train]`); the rest needs only the registry, the runs and the journal.

mod svg;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use serde_json::Value;

use crate::config::{Config, ModelRef};
use crate::engine::Engine;
use crate::model::manifest::Task;
use crate::model::{Bundle, Registry};
use crate::monitor::reference::Rebased;
use crate::monitor::{Monitor, Settings};
use crate::store::Record;
use svg::{escape, short, Lines, LIVE, REFERENCE, SECOND, THRESHOLD};

/// The newest stored rows replayed through the monitor (about 2 s each 10,000 in a release build).
pub const MAX_REPLAY_ROWS: usize = 50_000;
/// The newest journal events listed in the table (the timeline draws them all).
const MAX_LISTED_EVENTS: usize = 300;

/// One pipeline to report on: its name, its model's name in the registry, its drift settings.
struct Subject {
    pipeline: String,
    model: Option<String>,
    drift: Settings,
}

/// The report for `state_dir` (a config gives pipelines, models and drift settings; without
/// one they are read from the store, the journal and the registry), on `only` if named.
///
/// # Errors
/// A state folder that holds nothing to report on, or a pipeline it does not know.
pub fn render(state_dir: &Path, config: Option<&Config>, only: Option<&str>) -> Result<String, String> {
    let registry = Registry::new(state_dir);
    let journal = read_journal(state_dir);
    let runs = read_runs(state_dir);
    let store_settings = config.map_or_else(|| crate::store::Settings::defaults(state_dir), |c| c.store.clone());
    let (rows_by_pipeline, store_note) = read_store(&store_settings);
    let mut subjects = subjects(config, &registry, &journal, &rows_by_pipeline)?;
    if let Some(name) = only {
        subjects.retain(|s| s.pipeline == name);
        if subjects.is_empty() {
            return Err(format!("no pipeline {name:?} in {}", state_dir.display()));
        }
    }
    if subjects.is_empty() {
        return Err(format!(
            "{}: no pipeline to report on (no sample store, events journal or registry here)",
            state_dir.display()
        ));
    }
    let mut body = String::new();
    for s in &subjects {
        let rows = rows_by_pipeline.get(&s.pipeline).map_or(&[][..], Vec::as_slice);
        section(&mut body, s, &registry, rows, &runs, &journal, &store_note);
    }
    let node = config.map(|c| c.node.clone()).unwrap_or_default();
    let title = format!("lathe report{}", if node.is_empty() { String::new() } else { format!(" — {node}") });
    Ok(format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head><body><h1>{t}</h1><p class=\"note\">{} · state folder {} · made {}</p>{body}</body></html>\n",
        escape(&subjects.iter().map(|s| s.pipeline.as_str()).collect::<Vec<_>>().join(", ")),
        escape(&state_dir.display().to_string()),
        when(crate::telemetry::unix_ms() as f64),
        t = escape(&title),
    ))
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}\
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}h3{font-size:15px}\
.charts{display:flex;flex-wrap:wrap;gap:8px}svg{border:1px solid #eee}\
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}\
td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:13px}.ok{color:#2a7d2a}.no{color:#b22}";

/// The pipelines to report on, and the model each serves.
fn subjects(
    config: Option<&Config>,
    registry: &Registry,
    journal: &[Value],
    rows: &BTreeMap<String, Vec<Record>>,
) -> Result<Vec<Subject>, String> {
    if let Some(c) = config {
        return Ok(c
            .pipelines
            .iter()
            .map(|p| Subject {
                pipeline: p.name.clone(),
                model: match &p.model {
                    ModelRef::Name(n) => Some(n.clone()),
                    ModelRef::File(f) => Bundle::read(f).ok().map(|b| b.manifest.name),
                    ModelRef::ColdStart(_) => Some(p.name.clone()),
                },
                drift: p.drift.clone().unwrap_or_default(),
            })
            .collect());
    }
    let models: Vec<String> = registry.list().map_err(|e| e.to_string())?.into_iter().map(|e| e.name).collect();
    let mut names: Vec<String> = rows.keys().cloned().collect();
    for e in journal {
        if let Some(p) = e["pipeline"].as_str().filter(|p| !p.is_empty()) {
            if !names.iter().any(|n| n == p) {
                names.push(p.to_string());
            }
        }
    }
    Ok(names
        .into_iter()
        .map(|pipeline| {
            // The journal names the model a pipeline served; else the one model there is.
            let said = journal.iter().find_map(|e| {
                (e["pipeline"] == pipeline.as_str()).then(|| e["model"].as_str().map(str::to_string)).flatten()
            });
            let model = said.or_else(|| (models.len() == 1).then(|| models[0].clone()));
            Subject { pipeline, model, drift: Settings::default() }
        })
        .collect())
}

fn read_journal(state_dir: &Path) -> Vec<Value> {
    let mut events = Vec::new();
    for name in ["events.1.jsonl", crate::telemetry::events::JOURNAL] {
        let text = std::fs::read_to_string(state_dir.join(name)).unwrap_or_default();
        events.extend(text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()));
    }
    events
}

fn read_runs(state_dir: &Path) -> Vec<Value> {
    let mut runs: Vec<Value> = std::fs::read_dir(state_dir.join("runs"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
                .collect()
        })
        .unwrap_or_default();
    runs.sort_by_key(|r: &Value| r["started_unix"].as_u64().unwrap_or(0));
    runs
}

/// Every pipeline's newest rows, read from a copy of the store: a running daemon holds the
/// file's lock, and a report must never touch the live file.
fn read_store(settings: &crate::store::Settings) -> (BTreeMap<String, Vec<Record>>, String) {
    if !settings.path.exists() {
        return (BTreeMap::new(), "no sample store (only pipelines with [pipeline.train] keep their rows)".into());
    }
    let copy = std::env::temp_dir().join(format!("lathe-report-{}.redb", std::process::id()));
    let read = || -> Result<BTreeMap<String, Vec<Record>>, String> {
        std::fs::copy(&settings.path, &copy).map_err(|e| format!("{}: {e}", settings.path.display()))?;
        let store = crate::store::Store::open(crate::store::Settings { path: copy.clone(), ..settings.clone() })
            .map_err(|e| e.to_string())?;
        let mut all = BTreeMap::new();
        for p in store.pipelines().map_err(|e| e.to_string())? {
            let mut rows = store.samples(&p).map_err(|e| e.to_string())?;
            let cut = rows.len().saturating_sub(MAX_REPLAY_ROWS);
            rows.drain(..cut);
            all.insert(p, rows);
        }
        Ok(all)
    };
    let result = read();
    let _ = std::fs::remove_file(&copy);
    match result {
        Ok(all) => (all, String::new()),
        Err(e) => (BTreeMap::new(), format!("the sample store could not be read: {e}")),
    }
}

/// Unix ms as UTC `YYYY-MM-DD HH:MM:SS`.
fn when(ms: f64) -> String {
    let secs = (ms / 1000.0) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

fn section(
    out: &mut String,
    s: &Subject,
    registry: &Registry,
    rows: &[Record],
    runs: &[Value],
    journal: &[Value],
    store_note: &str,
) {
    let _ = write!(out, "<h2>Pipeline {}</h2>", escape(&s.pipeline));
    let Some(model) = &s.model else {
        let _ = write!(out, "<p class=\"note\">Which model this pipeline serves is not known here.</p>");
        timeline(out, &s.pipeline, None, runs, journal);
        return;
    };
    let champion = registry.champion_version(model).ok().flatten();
    let versions = registry.versions(model).unwrap_or_default();
    let bundles: BTreeMap<u64, Bundle> =
        versions.iter().filter_map(|&v| Bundle::read(&registry.bundle_path(model, v)).ok().map(|b| (v, b))).collect();
    let _ = write!(
        out,
        "<p>Model <b>{}</b>, champion {}. {} stored rows read (the newest, at most 50,000){}.</p>",
        escape(model),
        champion.map_or("none".to_string(), |v| format!("v{v}")),
        rows.len(),
        if store_note.is_empty() { String::new() } else { format!(" ({})", escape(store_note)) }
    );
    versions_table(out, &bundles, champion);
    if let Some(b) = champion.and_then(|v| bundles.get(&v)).or_else(|| bundles.values().last()) {
        drift(out, s, registry, b, &bundles, rows);
        confusion(out, b, rows);
    }
    training(out, model, runs);
    timeline(out, &s.pipeline, Some(model), runs, journal);
}

fn versions_table(out: &mut String, bundles: &BTreeMap<u64, Bundle>, champion: Option<u64>) {
    out.push_str(
        "<h3>Versions</h3><table><tr><th>version</th><th>made</th><th>by</th><th>baseline</th><th>run</th></tr>",
    );
    for (v, b) in bundles {
        let l = &b.manifest.lineage;
        let metrics: Vec<String> = b.manifest.baseline.metrics.iter().map(|(k, x)| format!("{k} {x:.4}")).collect();
        let _ = write!(
            out,
            "<tr><td>v{v}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if Some(*v) == champion { " (champion)" } else { "" },
            when(l.created_unix as f64 * 1000.0),
            escape(&l.created_by),
            escape(&metrics.join(", ")),
            escape(l.fine_tune.as_ref().map_or("", |f| f.run_id.as_str()))
        );
    }
    out.push_str("</table>");
}

/// The monitor replayed over the stored rows, version by version as they were served.
struct Replay {
    /// Per series: (time ms, statistic, threshold) at each evaluation.
    series: BTreeMap<String, Vec<(f64, f64, f64)>>,
    /// Per series: the statistic that raises its alarms.
    statistic: BTreeMap<String, String>,
    /// Per series: when an alarm was raised.
    alarms: BTreeMap<String, Vec<f64>>,
}

/// A version's re-based drift reference (the rows it served), as the daemon keeps it.
fn rebased(registry: &Registry, b: &Bundle) -> Option<Rebased> {
    let m = &b.manifest;
    let names: Vec<String> = m.inputs.iter().map(|i| i.name.clone()).collect();
    Rebased::read_for(&registry.reference_path(&m.name, m.version), &b.sha256(), &names).ok().flatten()
}

fn replay(
    s: &Subject,
    registry: &Registry,
    bundles: &BTreeMap<u64, Bundle>,
    rows: &[Record],
) -> Result<Replay, String> {
    let mut r = Replay { series: BTreeMap::new(), statistic: BTreeMap::new(), alarms: BTreeMap::new() };
    // (version, monitor, features per frame, the re-based reference still to switch to)
    let mut current: Option<(u64, Monitor, usize, Option<Rebased>)> = None;
    for row in rows {
        if current.as_ref().is_none_or(|c| c.0 != row.version) {
            let Some(b) = bundles.get(&row.version) else {
                current = None;
                continue;
            };
            let (reference, scores) = validation_reference(b)?;
            let monitor = monitor_on(b, &reference, &scores, s.drift.clone());
            current = Some((row.version, monitor, b.manifest.inputs.len(), rebased(registry, b)));
        }
        let Some((_, monitor, width, later)) = current.as_mut() else { continue };
        // From the moment the daemon re-based this version's reference, so does the replay.
        if later.as_ref().is_some_and(|l| row.ts_ms >= l.created_ms) {
            if let Some(l) = later.take() {
                let (reference, scores) = l.reference();
                *monitor = Monitor::new(&reference, &scores, &l.features, s.drift.clone());
            }
        }
        // A sequence model's record holds its window; the monitor watches the newest frame.
        let frame = &row.features[row.features.len().saturating_sub(*width)..];
        let mut raised = Vec::new();
        monitor.observe(frame, f64::from(row.score), &mut raised);
        for a in raised.iter().filter(|a| a.raised) {
            r.alarms.entry(a.series.clone()).or_default().push(row.ts_ms as f64);
        }
        let every = monitor.settings().every.max(1) as u64;
        if monitor.rows_seen() % every == 0 && monitor.rows_seen() >= monitor.settings().window as u64 {
            for st in monitor.state() {
                r.statistic.insert(st.series.clone(), st.statistic.clone());
                r.series.entry(st.series.clone()).or_default().push((row.ts_ms as f64, st.value, st.threshold));
            }
        }
    }
    Ok(r)
}

/// The bundle's validation rows and the model's scores on them: the monitor's first reference.
fn validation_reference(b: &Bundle) -> Result<(Vec<f32>, Vec<f64>), String> {
    let engine = Engine::load(&b.model).map_err(|e| e.to_string())?;
    let (rows, out) = b.validated_outputs(&engine).map_err(|e| e.to_string())?;
    let (f, p, reading) = (b.manifest.inputs.len(), b.manifest.primary_output, b.reading());
    let scores = (0..rows.len() / f.max(1)).map(|r| reading.score(out.row(p, r), &rows[r * f..(r + 1) * f])).collect();
    Ok((rows, scores))
}

fn monitor_on(b: &Bundle, reference: &[f32], scores: &[f64], settings: Settings) -> Monitor {
    let names: Vec<String> = b.manifest.inputs.iter().map(|i| i.name.clone()).collect();
    Monitor::new(reference, scores, &names, settings)
}

/// Shares of `values` in the bins `edges` makes (the ends take what falls outside).
fn shares(edges: &[f64], values: impl Iterator<Item = f64>) -> Vec<f64> {
    let bins = edges.len().saturating_sub(1);
    let mut counts = vec![0.0; bins];
    let mut n = 0.0;
    for v in values.filter(|v| v.is_finite()) {
        if bins == 0 {
            break;
        }
        let b = edges[1..bins].partition_point(|e| *e <= v);
        counts[b] += 1.0;
        n += 1.0;
    }
    counts.iter().map(|c| if n > 0.0 { c / n } else { 0.0 }).collect()
}

fn drift(
    out: &mut String,
    s: &Subject,
    registry: &Registry,
    champion: &Bundle,
    bundles: &BTreeMap<u64, Bundle>,
    rows: &[Record],
) {
    out.push_str("<h3>Drift: the reference against the live window</h3>");
    if rows.is_empty() {
        out.push_str("<p class=\"note\">No stored rows: the drift charts need a pipeline that keeps its rows ([pipeline.train]).</p>");
        return;
    }
    let replay = match replay(s, registry, bundles, rows) {
        Ok(r) => r,
        Err(e) => {
            let _ = write!(out, "<p class=\"note\">The monitor could not be run again: {}</p>", escape(&e));
            return;
        }
    };
    let live: Vec<&Record> = rows.iter().rev().take(s.drift.window).collect();
    // The champion's reference as the daemon holds it now: re-based on rows it served, or
    // its validation set (drawn from the bundle's own histograms).
    let rebased = rebased(registry, champion);
    let source = rebased
        .as_ref()
        .map_or("validation set".to_string(), |r| format!("re-based reference ({} rows it served)", r.rows.len()));
    let _ = write!(
        out,
        "<p class=\"note\">Left: the champion v{}'s {} against the newest {} rows served. Right: each series' statistic against its calibrated threshold at each evaluation (every {} rows, over the last {}), the monitor run again over the stored rows; raised alarms are shaded.</p>",
        champion.manifest.version,
        escape(&source),
        live.len(),
        s.drift.every,
        s.drift.window
    );
    let (t0, t1) = (rows[0].ts_ms as f64, rows[rows.len() - 1].ts_ms as f64);
    let base = &champion.manifest.baseline;
    let width = champion.manifest.inputs.len();
    let column =
        |r: &Record, i: usize| r.features.get(r.features.len().saturating_sub(width) + i).map(|v| f64::from(*v));
    let mut charts: Vec<(String, String)> = Vec::new();
    for (i, stats) in base.features.iter().enumerate() {
        let edges = &stats.histogram_edges;
        let reference = match &rebased {
            Some(r) => shares(edges, r.rows.iter().filter_map(|row| row.get(i).map(|v| f64::from(*v)))),
            None => counted_shares(stats),
        };
        let now = shares(edges, live.iter().filter_map(|r| column(r, i)));
        charts.push((stats.name.clone(), histogram_pair(&stats.name, edges, &reference, &now)));
    }
    let p = &base.predictions;
    let reference = match &rebased {
        Some(r) => shares(&p.histogram_edges, r.scores.iter().map(|v| f64::from(*v))),
        None => counted_shares(p),
    };
    let now = shares(&p.histogram_edges, live.iter().map(|r| f64::from(r.score)));
    charts.push(("prediction".into(), histogram_pair("prediction", &p.histogram_edges, &reference, &now)));
    for (series, hist) in charts {
        out.push_str("<div class=\"charts\">");
        out.push_str(&hist);
        out.push_str(&statistic_chart(&replay, &series, t0, t1));
        out.push_str("</div>");
    }
    for series in replay.series.keys().filter(|k| *k == "multivariate" || *k == "performance") {
        out.push_str("<div class=\"charts\">");
        out.push_str(&statistic_chart(&replay, series, t0, t1));
        out.push_str("</div>");
    }
}

fn counted_shares(stats: &crate::model::baseline::Stats) -> Vec<f64> {
    let total: f64 = stats.histogram_counts.iter().map(|c| *c as f64).sum::<f64>().max(1.0);
    stats.histogram_counts.iter().map(|c| *c as f64 / total).collect()
}

fn histogram_pair(name: &str, edges: &[f64], reference: &[f64], live: &[f64]) -> String {
    svg::histograms(name, edges, &[("reference", reference, REFERENCE), ("live", live, LIVE)])
}

fn statistic_chart(replay: &Replay, series: &str, t0: f64, t1: f64) -> String {
    let points = replay.series.get(series).map_or(&[][..], Vec::as_slice);
    let statistic = replay.statistic.get(series).map_or("statistic", String::as_str);
    Lines {
        title: series,
        series: vec![(statistic, points.iter().map(|p| (p.0, p.1)).collect(), LIVE)],
        rules: vec![("threshold", points.iter().map(|p| (p.0, p.2)).collect(), THRESHOLD)],
        marks: replay.alarms.get(series).cloned().unwrap_or_default(),
        x_labels: (when(t0), when(t1)),
    }
    .svg()
}

/// A classifier's labeled live rows: what the champion said against what was so.
fn confusion(out: &mut String, b: &Bundle, rows: &[Record]) {
    let m = &b.manifest;
    if !matches!(m.task, Task::Binary | Task::Multiclass) {
        return;
    }
    let reading = b.reading();
    let labeled: Vec<(usize, usize)> = rows
        .iter()
        .filter(|r| r.version == m.version)
        .filter_map(|r| Some((r.label? as usize, reading.class(&r.output)?)))
        .collect();
    let classes = labeled.iter().map(|(a, b)| a.max(b) + 1).max().unwrap_or(0).max(m.classes.len()).max(2);
    let _ = write!(out, "<h3>Confusion matrix: v{} on {} labeled live rows</h3>", m.version, labeled.len());
    if labeled.is_empty() {
        out.push_str("<p class=\"note\">No labels have joined rows this version served.</p>");
        return;
    }
    let name = |i: usize| m.classes.get(i).cloned().unwrap_or_else(|| i.to_string());
    out.push_str("<table><tr><th>label \\ predicted</th>");
    for c in 0..classes {
        let _ = write!(out, "<th>{}</th>", escape(&name(c)));
    }
    out.push_str("</tr>");
    for truth in 0..classes {
        let _ = write!(out, "<tr><td>{}</td>", escape(&name(truth)));
        for said in 0..classes {
            let n = labeled.iter().filter(|&&(a, b)| a == truth && b == said).count();
            let _ = write!(out, "<td>{n}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

fn training(out: &mut String, model: &str, runs: &[Value]) {
    let mine: Vec<&Value> = runs.iter().filter(|r| r["bundle"] == model).collect();
    let _ = write!(out, "<h3>Training runs ({})</h3>", mine.len());
    for r in mine {
        let accepted = r["outcome"].as_str().unwrap_or_default().starts_with("accepted");
        let _ = write!(
            out,
            "<p><b>{}</b> · {} · {} · {} rows ({} train, {} early stop, {} holdout) · {:.1} s · <span class=\"{}\">{}</span></p>",
            escape(r["run_id"].as_str().unwrap_or_default()),
            when(r["started_unix"].as_f64().unwrap_or(0.0) * 1000.0),
            escape(r["backend"].as_str().unwrap_or_default()),
            r["rows_used"],
            r["train_rows"],
            r["early_stop_rows"],
            r["holdout_rows"],
            r["wall_seconds"].as_f64().unwrap_or(0.0),
            if accepted { "ok" } else { "no" },
            escape(r["outcome"].as_str().unwrap_or_default())
        );
        out.push_str("<div class=\"charts\">");
        let epochs = r["epochs"].as_array().map_or(&[][..], Vec::as_slice);
        let curve = |key: &str| -> Vec<(f64, f64)> {
            epochs.iter().map(|e| (e["epoch"].as_f64().unwrap_or(0.0), e[key].as_f64().unwrap_or(f64::NAN))).collect()
        };
        let best = r["best_epoch"].as_f64();
        out.push_str(
            &Lines {
                title: "loss by epoch",
                series: vec![
                    ("train", curve("train_loss"), REFERENCE),
                    ("early stop", curve("early_stop_loss"), SECOND),
                ],
                rules: vec![],
                marks: best.into_iter().collect(),
                x_labels: ("epoch 1".into(), format!("epoch {} (best {})", epochs.len(), best.unwrap_or(0.0))),
            }
            .svg(),
        );
        out.push_str("</div>");
        gate_table(out, &r["gate"]);
    }
}

fn gate_table(out: &mut String, gate: &Value) {
    if !gate.is_object() {
        return;
    }
    out.push_str("<table><tr><th>on</th><th>metric</th><th>champion</th><th>challenger</th></tr>");
    for (on, a, b) in [
        ("fresh holdout", "champion_holdout", "challenger_holdout"),
        ("validation set", "champion_validation", "challenger_validation"),
        ("replay of older live rows", "champion_replay", "challenger_replay"),
    ] {
        let Some(metrics) = gate[a].as_object() else { continue };
        for (metric, x) in metrics {
            let y = &gate[b][metric];
            let _ = write!(
                out,
                "<tr><td>{on}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(metric),
                x.as_f64().map_or("-".into(), |v| format!("{v:.4}")),
                y.as_f64().map_or("-".into(), |v| format!("{v:.4}"))
            );
        }
    }
    out.push_str("</table>");
    let sig = &gate["significance"];
    if sig.is_object() {
        let _ = write!(
            out,
            "<p class=\"note\">Significance: {} (p = {}); McNemar p = {}. Gate: at least {} better on the holdout, at most {} worse on the validation set.</p>",
            escape(sig["test"].as_str().unwrap_or_default()),
            sig["p_value"].as_f64().map_or("-".into(), short),
            sig["mcnemar"]["p_value"].as_f64().map_or("-".into(), short),
            gate["min_improvement"],
            gate["max_forgetting"]
        );
    }
}

/// The kinds of events the timeline draws, in rows, and the colour of each; an event name
/// ending in `.` stands for every event it begins.
const KINDS: &[(&str, &str, &[&str])] = &[
    ("drift alarm", THRESHOLD, &["drift"]),
    ("run started", "#76b7b2", &["train.started"]),
    ("run accepted", SECOND, &["train.accepted"]),
    ("run refused", "#9c755f", &["train.refused", "train.failed"]),
    ("shadow, trial", "#edc948", &["shadow.", "trial.started", "trial.passed"]),
    ("promotion", "#4e79a7", &["promoted"]),
    ("rollback", "#b07aa1", &["rolled_back", "trial.failed", "rollback."]),
    ("update", "#ff9da7", &["update."]),
];

fn kind_of(event: &str, names: &[&str]) -> bool {
    names.iter().any(|n| if n.ends_with('.') { event.starts_with(n) } else { event == *n })
}

fn timeline(out: &mut String, pipeline: &str, model: Option<&str>, runs: &[Value], journal: &[Value]) {
    let mine: Vec<&Value> = journal.iter().filter(|e| e["pipeline"] == pipeline).collect();
    let mut rows: Vec<(&str, &str, Vec<f64>)> = KINDS
        .iter()
        .map(|(label, color, names)| {
            let times = mine
                .iter()
                .filter(|e| e["event"].as_str().is_some_and(|n| kind_of(n, names)))
                .filter_map(|e| e["ts"].as_f64())
                .collect();
            (*label, *color, times)
        })
        .collect();
    if mine.is_empty() {
        // No journal (a daemon older than it): the runs' own start times.
        let starts = runs
            .iter()
            .filter(|r| model.is_some_and(|m| r["bundle"] == m))
            .filter_map(|r| r["started_unix"].as_f64().map(|s| s * 1000.0))
            .collect();
        rows[1].2 = starts;
    }
    let times: Vec<f64> = rows.iter().flat_map(|r| r.2.iter().copied()).collect();
    out.push_str("<h3>What the loop did</h3>");
    if times.is_empty() {
        out.push_str("<p class=\"note\">No events recorded for this pipeline (the daemon writes them to events.jsonl in its state folder).</p>");
        return;
    }
    let (t0, t1) = times.iter().fold((f64::MAX, f64::MIN), |(a, b), &t| (a.min(t), b.max(t)));
    out.push_str(&svg::timeline(&rows, t0, t1, (when(t0), when(t1))));
    let listed: Vec<&&Value> = mine.iter().filter(|e| e["event"] != "broker.connected").collect();
    let from = listed.len().saturating_sub(MAX_LISTED_EVENTS);
    out.push_str("<table><tr><th>time (UTC)</th><th>event</th><th>what</th></tr>");
    for e in &listed[from..] {
        let what = e["message"].as_str().map(str::to_string).unwrap_or_else(|| match e["event"].as_str() {
            Some("drift") | Some("drift.cleared") => format!(
                "{} {} {} (threshold {}) on v{}",
                e["series"].as_str().unwrap_or_default(),
                e["statistic"].as_str().unwrap_or_default(),
                e["value"].as_f64().map_or("-".into(), short),
                e["threshold"].as_f64().map_or("-".into(), short),
                e["version"]
            ),
            Some("promoted") | Some("rolled_back") => format!("v{} → v{}", e["from"], e["to"]),
            _ => String::new(),
        });
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            when(e["ts"].as_f64().unwrap_or(0.0)),
            escape(e["event"].as_str().unwrap_or_default()),
            escape(&what)
        );
    }
    out.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(when(0.0), "1970-01-01 00:00:00");
        assert_eq!(when(1_796_586_497_000.0), "2026-12-06 19:48:17");
        assert_eq!(when(951_782_400_000.0), "2000-02-29 00:00:00");
    }

    #[test]
    fn values_fall_in_their_bins_and_the_ends_take_the_rest() {
        let s = shares(&[0.0, 1.0, 2.0, 3.0], [0.5, 1.5, 1.7, 2.5, -9.0, 99.0, f64::NAN].into_iter());
        assert_eq!(s, vec![2.0 / 6.0, 2.0 / 6.0, 2.0 / 6.0]);
    }
}
