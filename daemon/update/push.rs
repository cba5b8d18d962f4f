//! The central server's side: a signed bundle, its chunks and the signed offer for them.

use ed25519_dalek::SigningKey;

use crate::model::Bundle;
use crate::trust::signing::{self, Offer};

/// What `lathe push` publishes: retained chunks, then the retained offer.
pub struct Prepared {
    pub offer: Offer,
    /// The signed offer message.
    pub message: Vec<u8>,
    /// `(topic, bytes)` for `lathe/bundles/{sha256}/{index}`.
    pub chunks: Vec<(String, Vec<u8>)>,
}

pub struct PushOptions {
    pub expires_unix: u64,
    pub compatible: String,
    pub min_daemon_version: String,
    pub chunk_bytes: usize,
    /// The offer topics the offer is signed for (see [`Offer::targets`]).
    pub targets: Vec<String>,
}

/// Signs `bundle` with `key`, cuts its file into chunks and signs the offer for them.
///
/// # Errors
/// A bundle that cannot be written.
pub fn prepare(mut bundle: Bundle, key: &SigningKey, opts: &PushOptions) -> Result<Prepared, String> {
    signing::sign_bundle(&mut bundle, key);
    let bytes = bundle.to_bytes().map_err(|e| e.to_string())?;
    let sha256 = crate::model::bundle::sha256_hex(&bytes);
    let chunks: Vec<(String, Vec<u8>)> = bytes
        .chunks(opts.chunk_bytes.max(1))
        .enumerate()
        .map(|(i, c)| (format!("lathe/bundles/{sha256}/{i}"), c.to_vec()))
        .collect();
    let offer = Offer {
        name: bundle.manifest.name.clone(),
        version: bundle.manifest.version,
        sha256,
        length: bytes.len() as u64,
        expires_unix: opts.expires_unix,
        min_daemon_version: opts.min_daemon_version.clone(),
        compatible: opts.compatible.clone(),
        chunks: chunks.len() as u32,
        targets: opts.targets.clone(),
    };
    let message = signing::sign_offer(&offer, key)?;
    Ok(Prepared { offer, message, chunks })
}
