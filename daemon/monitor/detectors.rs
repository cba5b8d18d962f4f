//! Streaming change detectors on a per-sample value (the loss of each labelled prediction):
//! Page-Hinkley and ADWIN, with the definitions and defaults of `river` 0.26 so alarms can be
//! compared point for point (`tests/fixtures/make_drift_vectors.py` records river's).

/// Page-Hinkley: a CUSUM of deviations from the (all-time) mean, both directions.
#[derive(Debug, Clone)]
pub struct PageHinkley {
    pub min_instances: u64,
    pub delta: f64,
    pub threshold: f64,
    /// Fading factor of the cumulative sums.
    pub alpha: f64,
    n: u64,
    mean: f64,
    sum_up: f64,
    sum_down: f64,
    min_up: f64,
    max_down: f64,
    detected: bool,
}

impl Default for PageHinkley {
    fn default() -> Self {
        PageHinkley::new(30, 0.005, 50.0, 1.0 - 0.0001)
    }
}

impl PageHinkley {
    pub fn new(min_instances: u64, delta: f64, threshold: f64, alpha: f64) -> PageHinkley {
        PageHinkley {
            min_instances,
            delta,
            threshold,
            alpha,
            n: 0,
            mean: 0.0,
            sum_up: 0.0,
            sum_down: 0.0,
            min_up: f64::INFINITY,
            max_down: -1.0,
            detected: false,
        }
    }

    fn reset(&mut self) {
        *self = PageHinkley::new(self.min_instances, self.delta, self.threshold, self.alpha);
    }

    /// Adds one value; true when a change is detected (the detector then starts afresh).
    pub fn update(&mut self, x: f64) -> bool {
        if self.detected {
            self.reset();
        }
        self.n += 1;
        self.mean += (x - self.mean) / self.n as f64;
        let dev = x - self.mean;
        self.sum_up = self.alpha * self.sum_up + dev - self.delta;
        self.sum_down = self.alpha * self.sum_down + dev + self.delta;
        self.min_up = self.min_up.min(self.sum_up);
        self.max_down = self.max_down.max(self.sum_down);
        if self.n >= self.min_instances {
            let (up, down) = (self.sum_up - self.min_up, self.max_down - self.sum_down);
            self.detected = up > self.threshold || down > self.threshold;
        }
        self.detected
    }
}

/// ADWIN (Bifet & Gavaldà 2007): an adaptive window kept as an exponential histogram of
/// buckets; when two sub-windows' means differ by more than the Hoeffding-style bound, the
/// older part is dropped and a change is reported. river's defaults: delta 0.002, checks every
/// 32 values once the window exceeds 10, at most 5 buckets per size, sub-windows of 5 or more.
#[derive(Debug, Clone)]
pub struct Adwin {
    pub delta: f64,
    pub clock: u64,
    pub max_buckets: usize,
    pub min_window: f64,
    pub grace_period: f64,
    /// rows[r] holds buckets of 2^r values, oldest first: (total, variance).
    rows: Vec<Vec<(f64, f64)>>,
    total: f64,
    variance: f64,
    width: f64,
    tick: u64,
    detected: bool,
}

impl Default for Adwin {
    fn default() -> Self {
        Adwin::new(0.002)
    }
}

impl Adwin {
    pub fn new(delta: f64) -> Adwin {
        Adwin {
            delta,
            clock: 32,
            max_buckets: 5,
            min_window: 5.0,
            grace_period: 10.0,
            rows: vec![Vec::with_capacity(6)],
            total: 0.0,
            variance: 0.0,
            width: 0.0,
            tick: 0,
            detected: false,
        }
    }

    pub fn width(&self) -> f64 {
        self.width
    }

    /// The mean of the current window.
    pub fn mean(&self) -> f64 {
        if self.width > 0.0 {
            self.total / self.width
        } else {
            0.0
        }
    }

    /// Adds one value; true when a change is detected (the detector then starts afresh).
    pub fn update(&mut self, x: f64) -> bool {
        if self.detected {
            *self = Adwin { rows: vec![Vec::with_capacity(6)], ..Adwin::new(self.delta) };
        }
        self.insert(x);
        self.detected = self.detect();
        self.detected
    }

    fn insert(&mut self, x: f64) {
        if self.rows.is_empty() {
            self.rows.push(Vec::new());
        }
        self.rows[0].push((x, 0.0));
        self.width += 1.0;
        if self.width > 1.0 {
            let prev_mean = self.total / (self.width - 1.0);
            self.variance += (self.width - 1.0) * (x - prev_mean) * (x - prev_mean) / self.width;
        }
        self.total += x;
        // Merge the two oldest buckets of a size once there are more than max_buckets of it.
        let mut r = 0;
        while r < self.rows.len() && self.rows[r].len() > self.max_buckets {
            let size = (1u64 << r) as f64;
            let (t1, v1) = self.rows[r][0];
            let (t2, v2) = self.rows[r][1];
            let (m1, m2) = (t1 / size, t2 / size);
            let merged = (t1 + t2, v1 + v2 + size * 0.5 * (m1 - m2) * (m1 - m2));
            self.rows[r].drain(..2);
            if r + 1 == self.rows.len() {
                self.rows.push(Vec::with_capacity(6));
            }
            self.rows[r + 1].push(merged);
            r += 1;
        }
    }

    /// Drops the oldest bucket; returns how many values it held.
    fn drop_oldest(&mut self) -> f64 {
        let r = self.rows.len() - 1;
        let n = (1u64 << r) as f64;
        let (u, v) = self.rows[r][0];
        self.width -= n;
        self.total -= u;
        let (mu, mu_window) = (u / n, self.total / self.width);
        self.variance -= v + n * self.width * (mu - mu_window) * (mu - mu_window) / (n + self.width);
        self.rows[r].remove(0);
        if self.rows[r].is_empty() {
            self.rows.pop();
        }
        n
    }

    fn cut(&self, n0: f64, n1: f64, delta_mean: f64) -> bool {
        let delta_prime = (2.0 * self.width.ln() / self.delta).ln();
        let m_recip = 1.0 / (n0 - self.min_window + 1.0) + 1.0 / (n1 - self.min_window + 1.0);
        let epsilon =
            (2.0 * m_recip * (self.variance / self.width) * delta_prime).sqrt() + 2.0 / 3.0 * delta_prime * m_recip;
        delta_mean.abs() > epsilon
    }

    fn detect(&mut self) -> bool {
        self.tick += 1;
        let mut detected = false;
        if !self.tick.is_multiple_of(self.clock) || self.width <= self.grace_period {
            return false;
        }
        let mut again = true;
        while again {
            again = false;
            let (mut n0, mut n1, mut u0, mut u1) = (0.0, self.width, 0.0, self.total);
            // From the oldest buckets to the newest, each cut splits old (0) from new (1).
            'cuts: for r in (0..self.rows.len()).rev() {
                let size = (1u64 << r) as f64;
                let count = self.rows[r].len();
                for k in 0..count {
                    let u2 = self.rows[r][k].0;
                    n0 += size;
                    n1 -= size;
                    u0 += u2;
                    u1 -= u2;
                    // The newest bucket of all leaves nothing on the new side.
                    if r == 0 && k + 1 == count {
                        break 'cuts;
                    }
                    if n1 >= self.min_window && n0 >= self.min_window && self.cut(n0, n1, u0 / n0 - u1 / n1) {
                        detected = true;
                        again = true;
                        if self.width > 0.0 {
                            self.drop_oldest();
                        }
                        break 'cuts;
                    }
                }
            }
        }
        detected
    }
}
