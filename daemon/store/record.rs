//! One stored sample and its byte layout (little-endian, versioned by its first byte):
//!
//! ```text
//! u8 layout=1 | u64 ts_ms | u64 model version | f64 label (NaN: none yet) | f32 score
//! | u16 n_features | u16 n_output | u16 len device | u16 len key
//! | device bytes | key bytes | n_features × f32 | n_output × f32
//! ```
//! Hand-written rather than serde: fixed, small, and a damaged value is found (and skipped)
//! rather than misread.

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// When the daemon served it (Unix ms).
    pub ts_ms: u64,
    /// The model version whose prediction this was.
    pub version: u64,
    /// The ground truth, once its label has arrived.
    pub label: Option<f64>,
    /// The serving model's score for the row (class probability, anomaly score or value).
    pub score: f32,
    pub device: String,
    /// The message key as JSON text (what labels are joined by).
    pub key: String,
    pub features: Vec<f32>,
    /// The primary output as served.
    pub output: Vec<f32>,
}

/// Most feature values one record holds (a sequence model's window counts every frame).
pub const MAX_VALUES: usize = u16::MAX as usize;

const LAYOUT: u8 = 1;
const HEAD: usize = 1 + 8 + 8 + 8 + 4 + 2 * 4;

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let (device, key) = (&self.device.as_bytes()[..self.device.len().min(u16::MAX as usize)], {
            let k = self.key.as_bytes();
            &k[..k.len().min(u16::MAX as usize)]
        });
        let nf = self.features.len().min(MAX_VALUES);
        let no = self.output.len().min(u16::MAX as usize);
        let mut b = Vec::with_capacity(HEAD + device.len() + key.len() + 4 * (nf + no));
        b.push(LAYOUT);
        b.extend_from_slice(&self.ts_ms.to_le_bytes());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.label.unwrap_or(f64::NAN).to_le_bytes());
        b.extend_from_slice(&self.score.to_le_bytes());
        for n in [nf, no, device.len(), key.len()] {
            b.extend_from_slice(&(n as u16).to_le_bytes());
        }
        b.extend_from_slice(device);
        b.extend_from_slice(key);
        for v in self.features[..nf].iter().chain(&self.output[..no]) {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// `None` for a value that is not a whole record of this layout.
    pub fn decode(b: &[u8]) -> Option<Record> {
        if b.len() < HEAD || b[0] != LAYOUT {
            return None;
        }
        let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        let u16_at = |i: usize| Some(u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?) as usize);
        let ts_ms = u64_at(1)?;
        let version = u64_at(9)?;
        let label = f64::from_bits(u64_at(17)?);
        let score = f32::from_le_bytes(b.get(25..29)?.try_into().ok()?);
        let (nf, no, nd, nk) = (u16_at(29)?, u16_at(31)?, u16_at(33)?, u16_at(35)?);
        let mut at = HEAD;
        let device = String::from_utf8(b.get(at..at + nd)?.to_vec()).ok()?;
        at += nd;
        let key = String::from_utf8(b.get(at..at + nk)?.to_vec()).ok()?;
        at += nk;
        if b.len() != at + 4 * (nf + no) {
            return None;
        }
        let floats = |from: usize, n: usize| -> Vec<f32> {
            b[from..from + 4 * n].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        Some(Record {
            ts_ms,
            version,
            label: (!label.is_nan()).then_some(label),
            score,
            device,
            key,
            features: floats(at, nf),
            output: floats(at + 4 * nf, no),
        })
    }

    /// The label-join key: device and message key.
    pub fn join_key(&self) -> String {
        join_key(&self.device, &self.key)
    }
}

pub fn join_key(device: &str, key: &str) -> String {
    format!("{device}\u{1f}{key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let r = Record {
            ts_ms: 1_700_000_000_123,
            version: 3,
            label: Some(4.0),
            score: 0.25,
            device: "press-7".into(),
            key: "\"a-1\"".into(),
            features: vec![1.0, -2.5, 1e6],
            output: vec![0.1, 0.9],
        };
        let b = r.encode();
        assert_eq!(Record::decode(&b), Some(r.clone()));
        assert_eq!(Record::decode(&b[..b.len() - 1]), None, "a truncated value is refused");
        let mut unlabeled = r;
        unlabeled.label = None;
        assert_eq!(Record::decode(&unlabeled.encode()).and_then(|r| r.label), None);
    }
}
