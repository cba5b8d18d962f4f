//! `[store]` and `[pipeline.train]`: where samples are kept, and when and how the loop
//! fine-tunes, promotes and watches a new version.

use std::time::Duration;

use super::reader::Section;

/// What starts a fine-tune (the command topic always can).
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// A drift alarm (features, output, performance or label shift) was raised.
    Drift,
    /// `every 6h`: this long after the last run.
    Every(Duration),
    /// `labels 500`: this many new labeled samples since the last run.
    Labels(u64),
}

/// A daily window, in minutes of the day: `from` inclusive, `to` exclusive, wrapping midnight
/// when `from > to`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hours {
    pub from: u32,
    pub to: u32,
    /// The device's local time (its time zone, daylight saving included), not UTC.
    pub local: bool,
}

impl Hours {
    /// Whether the window holds the moment `unix_s`.
    pub fn contains(&self, unix_s: u64) -> bool {
        let minute = minute_of_day(unix_s, if self.local { utc_offset_s(unix_s) } else { 0 });
        if self.from <= self.to {
            (self.from..self.to).contains(&minute)
        } else {
            minute >= self.from || minute < self.to // wraps midnight
        }
    }
}

/// The minute of the day at `unix_s`, in a zone `offset_s` east of UTC.
fn minute_of_day(unix_s: u64, offset_s: i64) -> u32 {
    ((unix_s as i64 + offset_s).div_euclid(60).rem_euclid(1440)) as u32
}

/// How far the device's local time is east of UTC at `unix_s`, daylight saving included:
/// the zone of `TZ`, else of /etc/localtime, read once by the C library. 0 if unknown.
pub fn utc_offset_s(unix_s: u64) -> i64 {
    let t = unix_s as libc::time_t;
    // SAFETY: `tm` is plain integers and one pointer, for which all zeros is a valid value;
    // localtime_r reads `t` and writes only into `tm`, both of which outlive the call.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return 0;
        }
        #[allow(clippy::useless_conversion)] // c_long: i64 here, i32 on 32-bit ARM
        i64::from(tm.tm_gmtoff)
    }
}

/// `trigger` when the section does not set it.
pub const DEFAULT_TRIGGERS: &[&str] = &["drift"];

/// `[pipeline.train]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub triggers: Vec<Trigger>,
    /// `hours = "02:00-04:00"` (UTC) or `"02:00-04:00 local"`: runs the triggers start only
    /// inside it (a command runs at once). May wrap midnight. `None`: any time.
    pub hours: Option<Hours>,
    /// After a run (accepted or not), triggers wait this long (a command does not).
    pub cooldown: Duration,
    /// No run with fewer usable rows than this.
    pub min_rows: usize,
    /// Train on at most the newest this many rows.
    pub rows: usize,
    /// "auto", "cpu" or "cuda".
    pub backend: String,
    /// GPU memory a run may hold (the CUDA backend's buffers, allocated once per run).
    pub max_gpu_mem_mb: u64,
    pub max_seconds: u64,
    /// Abort a run whose training grows the daemon's resident memory by more than this.
    pub max_memory_mb: u64,
    /// Shadow period before promotion (0: promote once the gate accepts).
    pub shadow: Duration,
    /// Trial period after promotion.
    pub trial: Duration,
    /// Labels needed (shadow or trial) before live loss is judged.
    pub min_live_labels: usize,
    /// The trial fails when the live loss exceeds the gate's holdout loss by this much
    /// (absolute: 0.05 = 5 points of error rate) beyond sampling noise.
    pub max_loss_increase: f64,
    /// ... or the share of non-finite outputs exceeds this ...
    pub max_nonfinite: f64,
    /// ... or saturated outputs rise by more than this share over the champion's ...
    pub max_saturated_increase: f64,
    /// ... or the engine's median time per row grows by more than this fraction (and past
    /// 1 ms): the model's own speed, not queueing, which depends on the traffic.
    pub max_latency_increase: f64,
    /// Overrides of the bundle's `[training]`.
    pub overrides: Overrides,
    /// `share = true`: each accepted challenger (signed by the device key) is published,
    /// retained, on `lathe/{node}/share/{pipeline}` for federated averaging (`lathe aggregate`).
    pub share: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub trainable: Option<String>,
    pub optimizer: Option<String>,
    pub learning_rate: Option<f64>,
    pub epochs: Option<u32>,
    pub batch: Option<u32>,
    pub seed: Option<u64>,
    pub holdout: Option<f64>,
    pub class_weights: Option<String>,
    /// The gate's `max_forgetting` (e.g. after a sensor was replaced for good, the old
    /// regime's validation set matters less).
    pub max_forgetting: Option<f64>,
    /// The gate's `significance` level (default 0.05): higher promotes on weaker evidence,
    /// for pipelines whose holdout is small.
    pub significance: Option<f64>,
}

impl Overrides {
    pub fn apply(&self, t: &mut crate::model::manifest::Training) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { t.$f = v.clone(); } )* };
        }
        set!(trainable, optimizer, learning_rate, epochs, batch, seed, holdout, class_weights);
    }

    /// The gate's settings this pipeline overrides.
    pub fn apply_gate(&self, g: &mut crate::model::manifest::Gate) {
        if let Some(f) = self.max_forgetting {
            g.max_forgetting = f;
        }
        if let Some(level) = self.significance {
            g.significance = level;
        }
    }
}

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
    fn the_hours_window_may_wrap_midnight() {
        const DAY2: u64 = 86_400;
        let window = |from, to| Hours { from, to, local: false };
        let at = |minute: u64| DAY2 + minute * 60;
        assert!(window(120, 240).contains(at(120)) && !window(120, 240).contains(at(240)));
        assert!(!window(120, 240).contains(at(60)));
        let night = window(22 * 60, 4 * 60);
        assert!(night.contains(at(23 * 60)) && night.contains(at(60)) && !night.contains(at(12 * 60)));
        assert_eq!(minute_of_day(at(90), 0), 90);
        assert_eq!(minute_of_day(at(90), -2 * 3600), 23 * 60 + 30, "west of UTC: the day before");
    }

    /// `"… local"` windows follow the device's zone, daylight saving included. The zone is the
    /// process's (`TZ`), so the checks run in a child process of this test binary, with POSIX
    /// zone strings that need no tzdata: India (+5:30) and central Europe (+1, +2 in summer).
    #[test]
    fn local_hours_follow_the_zone_and_its_daylight_saving() {
        const JAN_15: u64 = 1_768_435_200; // 2026-01-15 00:00 UTC
        const JUL_15: u64 = 1_784_073_600; // 2026-07-15 00:00 UTC
        let (local, utc) = (Hours { from: 90, to: 300, local: true }, Hours { from: 90, to: 300, local: false });
        if let Ok(zone) = std::env::var("LATHE_TEST_ZONE") {
            let offsets = (utc_offset_s(JAN_15), utc_offset_s(JUL_15));
            let expected = if zone.starts_with("IST") { (19_800, 19_800) } else { (3_600, 7_200) };
            assert_eq!(offsets, expected, "TZ={zone}");
            // 00:00 UTC is 05:30 in India, 01:00 in a Berlin winter and 02:00 in its summer.
            let inside = (local.contains(JAN_15), local.contains(JUL_15));
            let expected = if zone.starts_with("IST") { (false, false) } else { (false, true) };
            assert_eq!(inside, expected, "01:30-05:00 local, TZ={zone}");
            assert!(!utc.contains(JAN_15) && !utc.contains(JUL_15), "in UTC both are 00:00");
            return;
        }
        for zone in ["IST-5:30", "CET-1CEST,M3.5.0,M10.5.0/3"] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "config::train::tests::local_hours_follow_the_zone_and_its_daylight_saving"])
                .env("TZ", zone)
                .env("LATHE_TEST_ZONE", zone)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("1 passed"),
                "TZ={zone}:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

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
