//! `[store]` and `[pipeline.train]`: where samples are kept, and when and how the loop
//! fine-tunes, promotes and watches a new version.

use std::time::Duration;

use super::reader::Section;
use crate::train::config::{Hours, Overrides, TrainConfig, Trigger};

/// `trigger` when the section does not set it.
pub const DEFAULT_TRIGGERS: &[&str] = &["drift"];

/// The longest duration any setting takes: ten years. Past it a typo ("1000000000000d") would
/// overflow the clock arithmetic of trials and timeouts.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// `30s`, `15m`, `6h`, `2d` (a bare number is seconds), at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let (n, unit) = t.find(|c: char| !c.is_ascii_digit()).map_or((t, ""), |i| t.split_at(i));
    let n: u64 = n.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "m" | "min" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs)).filter(|d| *d <= MAX_DURATION)
}

fn parse_clock(text: &str) -> Option<u32> {
    let (h, m) = text.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

pub(super) fn duration(s: &mut Section, key: &str, default: &str) -> Option<Duration> {
    let text = s.string(key, Some(default))?;
    let d = parse_duration(&text);
    if d.is_none() {
        s.error(
            key,
            &format!("expected a duration like \"30s\", \"15m\", \"6h\" or \"2d\" (at most 3650d), found {text:?}"),
        );
    }
    d
}

pub(super) fn parse_train(s: &mut Section) -> Option<Option<TrainConfig>> {
    if !s.has("train") {
        return Some(None);
    }
    let mut t = s.section("train", false)?;
    let mut triggers = Vec::new();
    // Absent, the default; present, what it says (`[]`: only the command topic starts runs).
    // (`strings` reads an absent key as empty: the default never took effect before.)
    let specs = if t.has("trigger") {
        t.strings("trigger").unwrap_or_default()
    } else {
        DEFAULT_TRIGGERS.iter().map(|t| t.to_string()).collect()
    };
    for (i, spec) in specs.iter().enumerate() {
        let words: Vec<&str> = spec.split_whitespace().collect();
        let trigger = match words.as_slice() {
            ["drift"] => Some(Trigger::Drift),
            ["every", d] => parse_duration(d).filter(|d| d.as_secs() >= 60).map(Trigger::Every),
            ["labels", n] => n.parse::<u64>().ok().filter(|&n| n > 0).map(Trigger::Labels),
            _ => None,
        };
        match trigger {
            Some(tr) => triggers.push(tr),
            None => t.error(
                &format!("trigger[{i}]"),
                &format!("expected \"drift\", \"every DURATION\" (≥ 1m) or \"labels N\", found {spec:?}"),
            ),
        }
    }
    let hours = t.opt_string("hours").and_then(|h| {
        let (window, local) = match h.trim().rsplit_once(' ') {
            Some((w, "local")) => (w, true),
            Some((w, "UTC" | "utc")) => (w, false),
            _ => (h.as_str(), false),
        };
        let parsed =
            window.split_once('-').and_then(|(a, b)| Some(Hours { from: parse_clock(a)?, to: parse_clock(b)?, local }));
        if parsed.is_none() {
            t.error("hours", &format!("expected \"HH:MM-HH:MM\" (UTC) or \"HH:MM-HH:MM local\", found {h:?}"));
        }
        parsed
    });
    let backend = t.string("backend", Some("auto"));
    if let Some(b) = &backend {
        if !matches!(b.as_str(), "auto" | "cpu" | "cuda") {
            t.error("backend", &format!("expected \"auto\", \"cpu\" or \"cuda\", found {b:?}"));
        }
    }
    let overrides = Overrides {
        trainable: t.opt_string("trainable"),
        optimizer: t.opt_string("optimizer"),
        learning_rate: t.has("learning_rate").then(|| t.number("learning_rate", 0.0, 1e-9, 10.0)).flatten(),
        epochs: t.has("epochs").then(|| t.integer("epochs", 1, 1, 100_000)).flatten().map(|v| v as u32),
        batch: t.has("batch").then(|| t.integer("batch", 1, 1, 65_536)).flatten().map(|v| v as u32),
        seed: t.has("seed").then(|| t.integer("seed", 0, 0, u64::MAX >> 1)).flatten(),
        holdout: t.has("holdout").then(|| t.number("holdout", 0.2, 0.05, 0.5)).flatten(),
        class_weights: t.opt_string("class_weights"),
        max_forgetting: t.has("max_forgetting").then(|| t.number("max_forgetting", 0.02, 0.0, 1.0)).flatten(),
        significance: t.has("significance").then(|| t.number("significance", 0.05, 0.001, 1.0)).flatten(),
    };
    let c = TrainConfig {
        triggers,
        hours,
        cooldown: duration(&mut t, "cooldown", "1h")?,
        min_rows: t.integer("min_rows", 500, 50, 10_000_000)? as usize,
        rows: t.integer("rows", 5_000, 50, 10_000_000)? as usize,
        backend: backend?,
        max_seconds: t.integer("max_seconds", 600, 1, 86_400)?,
        max_memory_mb: t.integer("max_memory_mb", 512, 16, 1 << 20)?,
        max_gpu_mem_mb: t.integer("max_gpu_mem_mb", 1024, 16, 1 << 20)?,
        shadow: duration(&mut t, "shadow", "0s")?,
        trial: duration(&mut t, "trial", "10m")?,
        min_live_labels: t.integer("min_live_labels", 100, 10, 1_000_000)? as usize,
        max_loss_increase: t.number("max_loss_increase", 0.05, 0.0, 1e9)?,
        max_nonfinite: t.number("max_nonfinite", 0.001, 0.0, 1.0)?,
        max_saturated_increase: t.number("max_saturated_increase", 0.5, 0.0, 1.0)?,
        max_latency_increase: t.number("max_latency_increase", 1.0, 0.0, 1e6)?,
        overrides,
        share: t.boolean("share", false)?,
    };
    if c.rows < c.min_rows {
        t.error("rows", &format!("is {} but min_rows is {}: no run could start", c.rows, c.min_rows));
    }
    let ok = t.finish();
    Some(ok.then_some(c))
}

impl TrainConfig {
    /// For a pipeline without `[pipeline.train]` that the loop still watches (a pushed
    /// update's trial): no triggers, every other setting at its default.
    pub fn serve_only() -> Option<TrainConfig> {
        let mut table = toml::Table::new();
        let mut train = toml::Table::new();
        train.insert("trigger".into(), toml::Value::Array(Vec::new()));
        table.insert("train".into(), toml::Value::Table(train));
        let mut errors = Vec::new();
        let mut s = Section::new(table, String::new(), &mut errors);
        parse_train(&mut s).flatten()
    }
}

/// `[store]` (optional: defaults from [`crate::store::Settings::defaults`]).
pub(super) fn parse_store(root: &mut Section, state_dir: Option<&std::path::Path>) -> Option<crate::store::Settings> {
    let dir = state_dir?;
    let d = crate::store::Settings::defaults(dir);
    let Some(mut s) = root.section("store", true) else {
        return Some(d);
    };
    let path = s.opt_string("path").map_or(d.path.clone(), |p| dir.join(p));
    let settings = crate::store::Settings {
        path,
        max_rows: s.integer("max_rows", d.max_rows, 100, 1 << 40)?,
        max_bytes: s.integer("max_mb", d.max_bytes >> 20, 1, 1 << 20)? << 20,
        max_age: duration(&mut s, "max_age", "30d")?,
        replay_rows: s.integer("replay_rows", d.replay_rows, 0, 1_000_000)?,
        orphan_horizon: duration(&mut s, "orphan_horizon", "1h")?,
    };
    s.finish().then_some(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("6h"), Some(Duration::from_secs(21_600)));
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("6 weeks"), None);
        assert_eq!(parse_duration("3650d"), Some(MAX_DURATION));
        assert_eq!(parse_duration("3651d"), None, "past ten years: refused, not an overflow later");
        assert_eq!(parse_duration("200000000000000d"), None);
        assert_eq!(parse_clock("02:30"), Some(150));
        assert_eq!(parse_clock("24:00"), None);
    }
}
