//! Is the challenger better beyond sampling noise? The gate's metric is compared on the same
//! holdout rows for both models, and a gain of one row in 1,600 is what chance gives: with 40 %
//! of the labels flipped, a challenger that learned nothing still "won" by 0.0006.
//!
//! The test is a paired bootstrap of the gate metric itself: the holdout's rows are drawn with
//! replacement [`RESAMPLES`] times, the *same* draw scores both models, and the p-value is the
//! share of draws in which the challenger is not better (one-sided, with the usual +1 so it is
//! never 0). A draw on which the metric is not defined (F1 of a draw with no row of the
//! positive class: every model scores 0 there, whatever it predicts) tells the models nothing
//! and is left out; at least half the draws must be defined. (Counted against, such draws once
//! refused a challenger that fixed 424 of 426 false alarms after a sensor fault: the holdout
//! held 2 anomalies, 13.7 % of draws held none, and the F1 test said p = 0.137 while McNemar
//! said p < 0.001.) The challenger must be better at the [`SIGNIFICANCE_LEVEL`](crate::model::manifest::SIGNIFICANCE_LEVEL) (p < 0.05). One test serves every
//! task and metric (F1, accuracy, RMSE, a reconstruction-error quantile), and the pairing keeps
//! the power that comparing two independent estimates would lose.
//!
//! A classifier must also pass McNemar's exact test: of the rows only one model gets right,
//! the challenger's share must be beyond a fair coin's. The bootstrap alone is too generous
//! where the models differ on a handful of rows (3 rows against 1 moved F1 by 0.009 at
//! p = 0.057 on 20 %-flipped Shuttle labels; McNemar says p = 0.31), and a real fine-tune
//! after drift changes hundreds. Both at the same level: a challenger that only trades false
//! positives for true ones at equal accuracy is not promoted, which is the safe side.

use serde::Serialize;

use crate::rng::Rng;

/// Draws of the holdout; the p-value's resolution is 1 / (RESAMPLES + 1).
pub const RESAMPLES: usize = 1000;

/// What the run record shows of the test.
#[derive(Debug, Clone, Serialize)]
pub struct Significance {
    pub test: String,
    pub level: f64,
    pub resamples: usize,
    /// Of the resamples, those on which the metric was defined (the p-value's denominator).
    pub defined: usize,
    pub rows: usize,
    /// One-sided: the chance of a gain at least this large if the challenger were no better.
    pub p_value: f64,
    /// The gain's 95 % interval over the draws (positive = better, whichever direction is).
    pub gain_low: f64,
    pub gain_high: f64,
    /// Classifiers: McNemar's exact test on the rows only one model classifies right.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcnemar: Option<McNemar>,
    /// Every test below the level.
    pub significant: bool,
}

impl Significance {
    /// Adds McNemar's test (classifiers), which must pass too.
    pub fn and_mcnemar(mut self, m: McNemar) -> Significance {
        self.significant &= m.p_value < self.level;
        self.mcnemar = Some(m);
        self
    }

    /// The tests and their p-values, for a reason line.
    pub fn summary(&self) -> String {
        let mut s = format!("paired bootstrap p = {:.3}", self.p_value);
        if self.defined * 2 < self.resamples {
            s += &format!(" (the metric is defined on only {} of {} draws)", self.defined, self.resamples);
        }
        if let Some(m) = &self.mcnemar {
            s += &format!(
                ", McNemar p = {:.3} ({} rows only the challenger gets right, {} only the champion)",
                m.p_value, m.challenger_only, m.champion_only
            );
        }
        s + &format!("; each must be below {}", self.level)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct McNemar {
    /// Rows only the champion gets right, and only the challenger.
    pub champion_only: usize,
    pub challenger_only: usize,
    pub p_value: f64,
}

/// The paired bootstrap over `rows` rows. `gain(draw)` is the challenger's gain on the rows
/// `draw` names (positive = better); `seed` makes it repeatable (the run's seed).
pub fn paired_bootstrap(rows: usize, seed: u64, level: f64, mut gain: impl FnMut(&[usize]) -> f64) -> Significance {
    let mut rng = Rng::new(seed ^ 0x5157_4e49_4649_4341);
    let mut draw = vec![0usize; rows];
    let mut gains = Vec::with_capacity(RESAMPLES);
    let (mut not_better, mut defined) = (0usize, 0usize);
    for _ in 0..RESAMPLES {
        for d in draw.iter_mut() {
            *d = (rng.next_u64() % rows.max(1) as u64) as usize;
        }
        let g = gain(&draw);
        if g.is_nan() {
            continue; // the metric is not defined on this draw: it tells the models nothing
        }
        defined += 1;
        if g <= 0.0 {
            not_better += 1;
        }
        gains.push(if g.is_finite() { g } else { 0.0 });
    }
    gains.sort_by(f64::total_cmp);
    let at = |q: f64| gains.get(((gains.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    let p_value = (not_better + 1) as f64 / (defined + 1) as f64;
    Significance {
        test: "paired bootstrap of the gate metric on the holdout".into(),
        level,
        resamples: RESAMPLES,
        defined,
        rows,
        p_value,
        gain_low: at(0.025),
        gain_high: at(0.975),
        mcnemar: None,
        significant: rows > 0 && defined * 2 >= RESAMPLES && p_value < level,
    }
}

/// McNemar's exact test: of the `champion_only + challenger_only` rows the models disagree on
/// rightness, the chance that the challenger gets at least `challenger_only` if each were a
/// fair coin.
pub fn mcnemar(champion_only: usize, challenger_only: usize) -> McNemar {
    let n = champion_only + challenger_only;
    // P(X >= c) for X ~ Binomial(n, 1/2), summed in logs to stay finite for large n.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0f64; // ln C(n, 0)
    let mut p = 0.0;
    for k in 0..=n {
        if k > 0 {
            ln_choose += ((n - k + 1) as f64).ln() - (k as f64).ln();
        }
        if k >= challenger_only {
            p += (ln_choose + ln_half_n).exp();
        }
    }
    McNemar { champion_only, challenger_only, p_value: p.min(1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::SIGNIFICANCE_LEVEL as LEVEL;

    #[test]
    fn a_consistent_gain_is_significant_and_noise_is_not() {
        // 400 rows; the challenger is right on 40 rows the champion misses, and wrong on 10.
        let better: Vec<f64> = (0..400)
            .map(|i| {
                if i < 40 {
                    1.0
                } else if i < 50 {
                    -1.0
                } else {
                    0.0
                }
            })
            .collect();
        let mean = |d: &[usize], v: &[f64]| d.iter().map(|&i| v[i]).sum::<f64>() / d.len() as f64;
        let s = paired_bootstrap(400, 7, LEVEL, |d| mean(d, &better));
        assert!(s.significant && s.p_value < 0.01, "{s:?}");
        assert!(s.gain_low > 0.0 && s.gain_high > s.gain_low, "{s:?}");
        // One row in 400 better, the rest the same: chance.
        let one: Vec<f64> = (0..400).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
        let s = paired_bootstrap(400, 7, LEVEL, |d| mean(d, &one));
        assert!(!s.significant && s.p_value > 0.3, "{s:?}");
        // McNemar must pass too: a bootstrap-significant gain on 3 rows against 1 is refused.
        let s = paired_bootstrap(400, 7, LEVEL, |d| mean(d, &better)).and_mcnemar(mcnemar(1, 3));
        assert!(!s.significant && s.summary().contains("McNemar p = 0.312"), "{}", s.summary());
        // Draws where the metric is undefined are left out, not counted against: 40 % of them
        // undefined, the gain on the rest still decides; 60 % undefined, too few to decide.
        let s = paired_bootstrap(400, 7, LEVEL, |d| if d[0] % 5 < 2 { f64::NAN } else { mean(d, &better) });
        assert!(s.significant && (350..450).contains(&(RESAMPLES - s.defined)), "{s:?}");
        let s = paired_bootstrap(400, 7, LEVEL, |d| if d[0] % 5 < 3 { f64::NAN } else { mean(d, &better) });
        assert!(!s.significant && s.p_value < 0.01, "{s:?}");
        // The same seed gives the same answer.
        assert_eq!(
            paired_bootstrap(400, 7, LEVEL, |d| mean(d, &better)).p_value,
            paired_bootstrap(400, 7, LEVEL, |d| mean(d, &better)).p_value
        );
    }

    #[test]
    fn mcnemar_matches_the_binomial_tail() {
        // 10 discordant rows, 9 for the challenger: P(X >= 9) = (C(10,9) + C(10,10)) / 1024.
        assert!((mcnemar(1, 9).p_value - 11.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar(5, 5).p_value - 638.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar(0, 0).p_value, 1.0);
        assert!(mcnemar(600, 700).p_value < 0.01 && mcnemar(700, 600).p_value > 0.99);
    }
}
