//! The few chart shapes `lathe report` draws, as inline SVG: no library, no script, no network.
//! Each returns one `<svg>` element sized in CSS pixels.

use std::fmt::Write;

/// The reference (the bundle's validation set) and the live window, everywhere.
pub const REFERENCE: &str = "#4e79a7";
pub const LIVE: &str = "#f28e2b";
pub const THRESHOLD: &str = "#e15759";
pub const SECOND: &str = "#59a14f";

const W: f64 = 420.0;
const H: f64 = 170.0;
const LEFT: f64 = 44.0;
const RIGHT: f64 = 10.0;
const TOP: f64 = 22.0;
const BOTTOM: f64 = 26.0;

/// Text made safe for HTML and SVG.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A number short enough for an axis label.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(0.01..10_000.0).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn open(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img"><title>{t}</title><rect width="{W}" height="{H}" fill="white"/><text x="{LEFT}" y="14" font-size="12" font-weight="bold">{t}</text>"#,
        t = escape(title)
    );
}

fn legend(out: &mut String, items: &[(&str, &str)]) {
    let mut x = W - RIGHT;
    for (label, color) in items.iter().rev() {
        x -= 7.0 * label.len() as f64 + 18.0;
        let _ = write!(
            out,
            r#"<rect x="{x:.1}" y="5" width="10" height="10" fill="{color}"/><text x="{:.1}" y="14" font-size="11">{}</text>"#,
            x + 13.0,
            escape(label)
        );
    }
}

/// Two distributions over the same bins, each as shares of its rows: bars side by side.
/// `edges` has one more entry than each series.
pub fn histograms(title: &str, edges: &[f64], series: &[(&str, &[f64], &str)]) -> String {
    let mut out = String::new();
    open(&mut out, title);
    let bins = edges.len().saturating_sub(1);
    let top = series.iter().flat_map(|(_, s, _)| s.iter().copied()).fold(0.0f64, f64::max).max(1e-9);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    if bins > 0 {
        let slot = pw / bins as f64;
        let bar = slot / (series.len() as f64 + 0.5);
        for (k, (_, shares, color)) in series.iter().enumerate() {
            for (b, share) in shares.iter().enumerate().take(bins) {
                let h = ph * share / top;
                let x = LEFT + b as f64 * slot + bar * (k as f64 + 0.25);
                let _ = write!(
                    out,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{h:.1}" fill="{color}"/>"#,
                    TOP + ph - h
                );
            }
        }
        let _ = write!(
            out,
            r#"<text x="{LEFT}" y="{:.0}" font-size="10">{}</text><text x="{:.0}" y="{:.0}" font-size="10" text-anchor="end">{}</text>"#,
            H - 8.0,
            short(edges[0]),
            W - RIGHT,
            H - 8.0,
            short(edges[bins])
        );
    }
    axes(&mut out, &format!("{:.0} %", top * 100.0), "0");
    let items: Vec<(&str, &str)> = series.iter().map(|(l, _, c)| (*l, *c)).collect();
    legend(&mut out, &items);
    out.push_str("</svg>");
    out
}

fn axes(out: &mut String, top_label: &str, bottom_label: &str) {
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b:.0}" stroke="#888"/><line x1="{LEFT}" y1="{b:.0}" x2="{r:.0}" y2="{b:.0}" stroke="#888"/><text x="{l:.0}" y="{t:.0}" font-size="10" text-anchor="end">{}</text><text x="{l:.0}" y="{b:.0}" font-size="10" text-anchor="end">{}</text>"##,
        escape(top_label),
        escape(bottom_label),
        b = H - BOTTOM,
        r = W - RIGHT,
        l = LEFT - 3.0,
        t = TOP + 8.0,
    );
}

/// A named line: its label, its (x, y) points, its colour.
pub type Line<'a> = (&'a str, Vec<(f64, f64)>, &'a str);

/// A line per series over a shared x axis (`x_labels`: what the axis ends mean), a dashed
/// horizontal line per `rules` entry (a threshold), and a tick per `marks` x (an alarm).
pub struct Lines<'a> {
    pub title: &'a str,
    pub series: Vec<Line<'a>>,
    pub rules: Vec<Line<'a>>,
    pub marks: Vec<f64>,
    pub x_labels: (String, String),
}

impl Lines<'_> {
    pub fn svg(&self) -> String {
        let mut out = String::new();
        open(&mut out, self.title);
        let all = || self.series.iter().chain(&self.rules).flat_map(|(_, p, _)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, 0.0f64, f64::MIN);
        for &(x, y) in all() {
            if x.is_finite() && y.is_finite() {
                (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            }
        }
        for &m in &self.marks {
            (x0, x1) = (x0.min(m), x1.max(m));
        }
        if x0 > x1 {
            (x0, x1, y1) = (0.0, 1.0, 1.0);
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        if y1 - y0 < 1e-12 {
            y1 = y0 + 1.0;
        }
        y1 *= 1.05;
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let px = |x: f64| LEFT + pw * (x - x0) / (x1 - x0);
        let py = |y: f64| TOP + ph - ph * (y - y0) / (y1 - y0);
        for &m in &self.marks {
            let _ = write!(
                out,
                r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.0}" stroke="{THRESHOLD}" stroke-opacity="0.25" stroke-width="3"/>"#,
                H - BOTTOM,
                x = px(m)
            );
        }
        for (dashed, list) in [(false, &self.series), (true, &self.rules)] {
            for (_, points, color) in list {
                let path: Vec<String> = points
                    .iter()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                    .collect();
                if path.is_empty() {
                    continue;
                }
                let dash = if dashed { r#" stroke-dasharray="5 3""# } else { "" };
                let _ = write!(
                    out,
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.6"{dash}/>"#,
                    path.join(" ")
                );
                if path.len() == 1 {
                    let (x, y) = points[0];
                    let _ = write!(out, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"#, px(x), py(y));
                }
            }
        }
        axes(&mut out, &short(y1), &short(y0));
        let _ = write!(
            out,
            r#"<text x="{LEFT}" y="{:.0}" font-size="10">{}</text><text x="{:.0}" y="{:.0}" font-size="10" text-anchor="end">{}</text>"#,
            H - 8.0,
            escape(&self.x_labels.0),
            W - RIGHT,
            H - 8.0,
            escape(&self.x_labels.1)
        );
        let items: Vec<(&str, &str)> = self.series.iter().chain(&self.rules).map(|(l, _, c)| (*l, *c)).collect();
        legend(&mut out, &items);
        out.push_str("</svg>");
        out
    }
}

/// One row per kind of event, a mark per event at its time: what the loop did, when.
pub fn timeline(rows: &[(&str, &str, Vec<f64>)], t0: f64, t1: f64, labels: (String, String)) -> String {
    let width = 2.0 * W;
    let height = TOP + 18.0 * rows.len() as f64 + BOTTOM;
    let label_w = 110.0;
    let pw = width - label_w - RIGHT;
    let span = (t1 - t0).max(1.0);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img"><title>timeline</title><rect width="{width}" height="{height}" fill="white"/><text x="4" y="14" font-size="12" font-weight="bold">timeline</text>"#
    );
    for (i, (name, color, times)) in rows.iter().enumerate() {
        let y = TOP + 18.0 * i as f64 + 9.0;
        let _ = write!(
            out,
            r##"<text x="4" y="{:.1}" font-size="11">{}</text><line x1="{label_w}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            y + 4.0,
            escape(name),
            width - RIGHT
        );
        for t in times {
            let x = label_w + pw * (t - t0) / span;
            let _ = write!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="4" height="12" fill="{color}"><title>{}</title></rect>"#,
                x - 2.0,
                y - 6.0,
                escape(name)
            );
        }
    }
    let _ = write!(
        out,
        r#"<text x="{label_w}" y="{:.0}" font-size="10">{}</text><text x="{:.0}" y="{:.0}" font-size="10" text-anchor="end">{}</text></svg>"#,
        height - 6.0,
        escape(&labels.0),
        width - RIGHT,
        height - 6.0,
        escape(&labels.1)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_and_escape_text() {
        let h = histograms(
            "f1 <live>",
            &[0.0, 1.0, 2.0],
            &[("reference", &[0.5, 0.5], REFERENCE), ("live", &[0.1, 0.9], LIVE)],
        );
        assert!(h.starts_with("<svg") && h.ends_with("</svg>") && h.contains("f1 &lt;live&gt;"));
        assert_eq!(h.matches("<rect").count(), 1 + 4 + 2, "background, four bars, two legend keys");
        let l = Lines {
            title: "ks",
            series: vec![("ks", vec![(0.0, 0.1), (1.0, 0.4)], LIVE)],
            rules: vec![("threshold", vec![(0.0, 0.2), (1.0, 0.2)], THRESHOLD)],
            marks: vec![1.0],
            x_labels: ("a".into(), "b".into()),
        }
        .svg();
        assert_eq!(l.matches("<polyline").count(), 2);
        assert!(l.contains("stroke-dasharray"));
        let t = timeline(&[("drift", THRESHOLD, vec![5.0, 6.0])], 0.0, 10.0, ("0".into(), "10".into()));
        assert_eq!(t.matches("<title>drift</title>").count(), 2);
    }
}
