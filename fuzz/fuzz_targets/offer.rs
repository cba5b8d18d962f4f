//! An update offer: the signed envelope as it arrives, and (signed here with the trusted
//! key, so the fuzzer gets past the signature) the offer inside it.
#![no_main]
use std::sync::OnceLock;

use ed25519_dalek::{Signer, SigningKey};
use lathe::trust::signing::{open_offer, version_at_least};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static SigningKey {
    static K: OnceLock<SigningKey> = OnceLock::new();
    K.get_or_init(|| SigningKey::from_bytes(&[7; 32]))
}

fuzz_target!(|data: &[u8]| {
    let trusted = [key().verifying_key()];
    let _ = open_offer(data, &trusted);
    let Ok(text) = std::str::from_utf8(data) else { return };
    let envelope = serde_json::json!({
        "offer": text,
        "key": hex::encode(key().verifying_key().to_bytes()),
        "signature": hex::encode(key().sign(text.as_bytes()).to_bytes()),
    });
    if let Ok((offer, _signer)) = open_offer(envelope.to_string().as_bytes(), &trusted) {
        let _ = version_at_least(env!("CARGO_PKG_VERSION"), &offer.min_daemon_version);
    }
});
