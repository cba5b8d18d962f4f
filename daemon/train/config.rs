//! `[pipeline.train]`: when and how the loop fine-tunes, promotes and watches a new version,
//! and `model = { cold_start = … }`, a model grown from the pipeline's own rows. Parsed by
//! `config`.

use std::time::Duration;

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

#[derive(Debug, Clone, PartialEq)]
pub struct ColdStartModel {
    pub task: crate::model::Task,
    /// The model's inputs, in order (each read as `features` says, else from `/<name>`).
    pub features: Vec<String>,
    pub spec: crate::model::manifest::ColdStart,
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
                .args(["--exact", "train::config::tests::local_hours_follow_the_zone_and_its_daylight_saving"])
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
}
