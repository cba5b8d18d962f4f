//! Keys, signed bundles and signed offers (ed25519).
//!
//! Keys are files of hex text: `NAME.key` (the 32-byte secret, mode 0600) and `NAME.pub` (the
//! 32-byte public key). A key's id is the first 16 hex digits of its public key.
//!
//! A bundle is signed over its exact `bundle.toml` bytes (`bundle.sig`); the manifest holds the
//! sha256 of every other file, so the signature covers the model and the validation set.
//! An offer travels as `{"offer": "<offer JSON text>", "key": "<public key hex>", "signature":
//! "<hex>"}`: the signature covers the offer's exact text, so no canonical JSON is needed.

use std::io::Read;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::model::Bundle;

/// A new key from the kernel's random source.
///
/// # Errors
/// `/dev/urandom` unreadable.
pub fn generate() -> Result<SigningKey, String> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes `PREFIX.key` (0600) and `PREFIX.pub`.
///
/// # Errors
/// Files that cannot be written (an existing key is never overwritten).
pub fn write_keypair(prefix: &Path, key: &SigningKey) -> Result<(), String> {
    let secret = prefix.with_extension("key");
    if secret.exists() {
        return Err(format!("{} exists; not overwriting a key", secret.display()));
    }
    // Whole or not at all: a power cut during the first start must not leave a torn key that
    // fails every later start. The key is written to a temporary file (0600, synced), then
    // linked into place; the link fails if a key appeared meanwhile, so none is overwritten.
    let dir = secret.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", secret.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let _ = std::fs::remove_file(&tmp); // left by an interrupted start
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(at(&tmp))?;
    std::io::Write::write_all(&mut f, format!("{}\n", hex::encode(key.to_bytes())).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(at(&tmp))?;
    drop(f);
    let linked = std::fs::hard_link(&tmp, &secret);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(format!("{} exists; not overwriting a key", secret.display()))
        }
        Err(e) => return Err(at(&secret)(e)),
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))?;
    write_public(prefix, key)
}

/// An io error as "PATH: error".
fn at(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

/// `PREFIX.pub`, written whole.
fn write_public(prefix: &Path, key: &SigningKey) -> Result<(), String> {
    let public = prefix.with_extension("pub");
    crate::fs::write_atomic(&public, format!("{}\n", hex::encode(key.verifying_key().to_bytes())).as_bytes())
        .map_err(at(&public))
}

/// The device's own key at `path` (`….key`, with its `.pub` beside it), made on first use.
/// A `.pub` that is missing (a start cut short after the key was made) is written again.
///
/// # Errors
/// A key file that cannot be read or written.
pub fn device_key(path: &Path) -> Result<SigningKey, String> {
    let prefix = path.with_extension("");
    if !path.exists() {
        write_keypair(&prefix, &generate()?)?;
    }
    let key = read_signing_key(path)?;
    if !prefix.with_extension("pub").exists() {
        write_public(&prefix, &key)?;
    }
    Ok(key)
}

fn read_32(path: &Path) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bytes = hex::decode(text.trim()).map_err(|e| format!("{}: not a hex key: {e}", path.display()))?;
    bytes.try_into().map_err(|_| format!("{}: expected 32 bytes of hex", path.display()))
}

/// # Errors
/// Unreadable or malformed key files.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, String> {
    read_32(path).map(|b| SigningKey::from_bytes(&b))
}

/// # Errors
/// Unreadable or malformed key files, or bytes that are no ed25519 point.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, String> {
    VerifyingKey::from_bytes(&read_32(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&key.to_bytes()[..8])
}

/// Signs `bundle.toml` as it stands.
pub fn sign_bundle(bundle: &mut Bundle, key: &SigningKey) {
    bundle.signature = Some(key.sign(&bundle.manifest_bytes).to_bytes().to_vec());
}

/// The id of the trusted key that signed this bundle.
///
/// # Errors
/// No signature, or none of `trusted` made it.
pub fn verify_bundle(bundle: &Bundle, trusted: &[VerifyingKey]) -> Result<String, String> {
    let sig = bundle.signature.as_deref().ok_or("the bundle is not signed (no bundle.sig)")?;
    let sig = Signature::from_slice(sig).map_err(|e| format!("bundle.sig: {e}"))?;
    trusted
        .iter()
        .find(|k| k.verify_strict(&bundle.manifest_bytes, &sig).is_ok())
        .map(key_id)
        .ok_or_else(|| "bundle.sig was not made by a trusted key".to_string())
}

/// What a central server offers a device (docs/updates.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    pub name: String,
    pub version: u64,
    /// sha256 (hex) of the bundle file's bytes.
    pub sha256: String,
    /// The bundle file's length: a hard cap on what is downloaded.
    pub length: u64,
    /// After this (unix seconds) the offer is refused (a frozen or replayed offer).
    pub expires_unix: u64,
    /// The oldest lathe that may run it (`x.y.z`).
    pub min_daemon_version: String,
    /// Must equal the device's `update.compatible` (empty: any device).
    pub compatible: String,
    /// The bytes: `chunks` retained messages under `lathe/bundles/{sha256}/{index}`.
    pub chunks: u32,
    /// The offer topics it is for (`lathe/{node}/update`, `lathe/fleet/{group}/update`): a
    /// device refuses it on any other, so an offer signed for one canary cannot be replayed
    /// to its whole group by whoever may write the group's topic.
    #[serde(default)]
    pub targets: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedOffer {
    pub offer: String,
    pub key: String,
    pub signature: String,
}

/// The offer message for `offer`, signed by `key`.
///
/// # Errors
/// Never in practice (serialization of plain data).
pub fn sign_offer(offer: &Offer, key: &SigningKey) -> Result<Vec<u8>, String> {
    let text = serde_json::to_string(offer).map_err(|e| e.to_string())?;
    let signed = SignedOffer {
        signature: hex::encode(key.sign(text.as_bytes()).to_bytes()),
        key: hex::encode(key.verifying_key().to_bytes()),
        offer: text,
    };
    serde_json::to_vec(&signed).map_err(|e| e.to_string())
}

/// Opens an offer message: its signature must be a trusted key's. Returns the offer and the
/// signer's key id.
///
/// # Errors
/// Not an offer, unsigned, or signed by a key that is not trusted.
pub fn open_offer(bytes: &[u8], trusted: &[VerifyingKey]) -> Result<(Offer, String), String> {
    let signed: SignedOffer = serde_json::from_slice(bytes).map_err(|e| format!("not a signed offer: {e}"))?;
    let key_bytes: [u8; 32] = hex::decode(&signed.key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("the offer's key is not 32 bytes of hex")?;
    let key = trusted.iter().find(|k| k.to_bytes() == key_bytes).ok_or_else(|| {
        format!("the offer is signed by key {}, which is not trusted", &signed.key[..16.min(signed.key.len())])
    })?;
    let sig = hex::decode(&signed.signature)
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or("the offer's signature is malformed")?;
    key.verify_strict(signed.offer.as_bytes(), &sig).map_err(|_| "the offer's signature does not verify")?;
    let offer: Offer =
        serde_json::from_str(&signed.offer).map_err(|e| format!("the signed offer is malformed: {e}"))?;
    Ok((offer, key_id(key)))
}

/// The model name and version an offer claims, read without trusting it (for the event that
/// refuses an offer that does not open): empty and `None` where it does not even say.
pub fn offer_claims(bytes: &[u8]) -> (String, Option<u64>) {
    // A signed offer holds the offer as a string; an unsigned one is the offer itself.
    let offer = serde_json::from_slice::<serde_json::Value>(bytes).ok().map(|v| match v["offer"].as_str() {
        Some(inner) => serde_json::from_str(inner).unwrap_or_default(),
        None => v,
    });
    let field = |f: &str| offer.as_ref().map(|o| o[f].clone()).unwrap_or_default();
    (field("name").as_str().unwrap_or_default().to_string(), field("version").as_u64())
}

/// `a` ≥ `b` for `x.y.z` versions (missing parts are 0; a non-number is 0).
pub fn version_at_least(a: &str, b: &str) -> bool {
    let parts = |v: &str| -> Vec<u64> { v.split('.').map(|p| p.trim().parse().unwrap_or(0)).collect() };
    let (a, b) = (parts(a), parts(b));
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i).copied().unwrap_or(0), b.get(i).copied().unwrap_or(0));
        if x != y {
            return x > y;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_opens_only_with_the_key_that_signed_it_and_untouched() {
        let (central, other) = (generate().unwrap(), generate().unwrap());
        let offer = Offer {
            name: "m".into(),
            version: 2,
            sha256: "ab".into(),
            length: 10,
            expires_unix: 1,
            min_daemon_version: "0.1.0".into(),
            compatible: String::new(),
            chunks: 1,
            targets: vec!["lathe/n1/update".into()],
        };
        let msg = sign_offer(&offer, &central).unwrap();
        let trusted = [central.verifying_key()];
        assert_eq!(open_offer(&msg, &trusted).unwrap().0, offer);
        let err = open_offer(&sign_offer(&offer, &other).unwrap(), &trusted).unwrap_err();
        assert!(err.contains("not trusted"), "{err}");
        let tampered = String::from_utf8(msg).unwrap().replace("\\\"version\\\":2", "\\\"version\\\":3");
        assert!(open_offer(tampered.as_bytes(), &trusted).unwrap_err().contains("does not verify"));
        // Nor can its target be changed: the targets are signed.
        let retargeted = String::from_utf8(sign_offer(&offer, &central).unwrap()).unwrap().replace("n1", "fleet/all");
        assert!(open_offer(retargeted.as_bytes(), &trusted).unwrap_err().contains("does not verify"));
        assert!(open_offer(b"{\"name\":\"m\"}", &trusted).unwrap_err().contains("not a signed offer"));
    }

    /// The device key is made whole or not at all: what an interrupted first start left (a
    /// temporary file, no `.pub`) does not stop the next, and an existing key is never replaced.
    #[test]
    fn the_device_key_survives_an_interrupted_first_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("lathe-device-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("device.key");
        std::fs::write(dir.join(".device.key.tmp"), "3f").unwrap(); // cut short while writing
        let key = device_key(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.join(".device.key.tmp").exists());
        let public = read_public_key(&dir.join("device.pub")).unwrap();
        assert_eq!(public, key.verifying_key());
        // Cut short after the key, before its .pub: the same key, and the .pub comes back.
        std::fs::remove_file(dir.join("device.pub")).unwrap();
        assert_eq!(device_key(&path).unwrap().to_bytes(), key.to_bytes());
        assert_eq!(read_public_key(&dir.join("device.pub")).unwrap(), key.verifying_key());
        let err = write_keypair(&dir.join("device"), &generate().unwrap()).unwrap_err();
        assert!(err.contains("not overwriting"), "{err}");
        assert_eq!(read_signing_key(&path).unwrap().to_bytes(), key.to_bytes());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn versions_compare_by_number() {
        assert!(version_at_least("0.10.0", "0.9.9"));
        assert!(version_at_least("1.0", "1.0.0"));
        assert!(!version_at_least("0.1.0", "0.2.0"));
    }
}
