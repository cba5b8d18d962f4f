//! The root of trust (TUF's root role): a signed document that says which keys sign updates,
//! which keys sign the next root and how many of them must (k of n), and until when it holds.
//!
//! ```text
//! {"root": "<root JSON text>", "signatures": [{"key": "<public key hex>", "signature": "<hex>"}, …]}
//! root JSON: {"version", "expires_unix", "root_keys": [hex…], "root_threshold", "update_keys": [hex…]}
//! ```
//!
//! - A device starts from the root its installer placed (`update.root`), signed by at least
//!   `root_threshold` of its own root keys.
//! - A new root (retained on `lathe/fleet/root` or `lathe/{node}/root`, as the chain of every
//!   root after the first) is taken only version by version: v(n+1) must be signed by the
//!   threshold of v(n)'s root keys **and** of its own. So stolen update keys cannot make a root,
//!   a rotation needs the old root keys, and a device offline across several rotations walks
//!   the chain.
//! - Rotation and revocation are a new root: an update key left out of it signs nothing any
//!   more, on the device that took it.
//! - An expired root trusts nothing (a frozen device is told, not fed stale offers) until a
//!   newer root arrives.
//! - The newest root taken lives in `state_dir/update-root.json`: a restart, or an installer's
//!   older root, never goes back to keys that were revoked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    pub version: u64,
    /// After this (unix seconds) the root trusts nothing.
    pub expires_unix: u64,
    /// Public keys (hex) that sign root documents.
    pub root_keys: Vec<String>,
    /// How many distinct root keys must sign a root document.
    pub root_threshold: u32,
    /// Public keys (hex) whose signatures on offers and bundles are trusted.
    pub update_keys: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySignature {
    pub key: String,
    pub signature: String,
}

/// A root as it travels: its exact text (what is signed; no canonical JSON needed) and the
/// signatures on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRoot {
    pub root: String,
    pub signatures: Vec<KeySignature>,
}

fn public_key(hex_key: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{hex_key:?} is not 32 bytes of hex"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("{hex_key:?}: {e}"))
}

impl SignedRoot {
    /// `root` signed by each of `keys` (the central server's `lathe root create`).
    ///
    /// # Errors
    /// Never in practice (serialization of plain data).
    pub fn sign(root: &Root, keys: &[&SigningKey]) -> Result<SignedRoot, String> {
        let mut signed =
            SignedRoot { root: serde_json::to_string(root).map_err(|e| e.to_string())?, signatures: vec![] };
        for k in keys {
            signed.add_signature(k);
        }
        Ok(signed)
    }

    /// Adds `key`'s signature (each holder of a root key signs offline in turn: `lathe root
    /// sign`); a key that signed already is replaced, not counted twice.
    pub fn add_signature(&mut self, key: &SigningKey) {
        let public = hex::encode(key.verifying_key().to_bytes());
        self.signatures.retain(|s| s.key != public);
        self.signatures
            .push(KeySignature { signature: hex::encode(key.sign(self.root.as_bytes()).to_bytes()), key: public });
    }

    /// The root inside, checked for sense (keys that parse, a threshold between 1 and the
    /// number of root keys). Says nothing of who signed it.
    ///
    /// # Errors
    /// Malformed text or nonsense.
    pub fn body(&self) -> Result<Root, String> {
        let root: Root = serde_json::from_str(&self.root).map_err(|e| format!("the root is malformed: {e}"))?;
        for k in root.root_keys.iter().chain(&root.update_keys) {
            public_key(k)?;
        }
        let distinct = root.root_keys.iter().collect::<BTreeSet<_>>().len();
        if root.root_threshold == 0 || root.root_threshold as usize > distinct {
            return Err(format!(
                "root v{}: a threshold of {} of {distinct} root keys cannot be met",
                root.version, root.root_threshold
            ));
        }
        if root.update_keys.is_empty() {
            return Err(format!("root v{} names no update key", root.version));
        }
        Ok(root)
    }

    /// How many distinct keys of `keys` made a valid signature on the text.
    fn signers(&self, keys: &[String]) -> usize {
        let mut counted = BTreeSet::new();
        for s in &self.signatures {
            let known = keys.iter().any(|k| k.eq_ignore_ascii_case(&s.key));
            let valid = known
                && public_key(&s.key).is_ok_and(|k| {
                    hex::decode(&s.signature)
                        .ok()
                        .and_then(|b| Signature::from_slice(&b).ok())
                        .is_some_and(|sig| k.verify_strict(self.root.as_bytes(), &sig).is_ok())
                });
            if valid {
                counted.insert(s.key.to_ascii_lowercase());
            }
        }
        counted.len()
    }

    /// Checks that `threshold` of `keys` (those of `whose`, for the message) signed it.
    fn signed_by(&self, keys: &[String], threshold: u32, whose: &str) -> Result<(), String> {
        let got = self.signers(keys);
        match got >= threshold as usize {
            true => Ok(()),
            false => Err(format!("signed by {got} of {whose} root keys; {threshold} needed")),
        }
    }
}

/// The root a device trusts now.
#[derive(Debug, Clone)]
pub struct Trust {
    pub root: Root,
    signed: SignedRoot,
    update_keys: Vec<VerifyingKey>,
}

/// What a root message did to the trust.
#[derive(Debug, PartialEq)]
pub enum Advance {
    /// Nothing newer than the root held (a retained chain seen again).
    Unchanged,
    /// Trusted from now on: the versions it went through.
    To { from: u64, to: u64 },
}

impl Trust {
    /// A root trusted on its own signatures (the installer's, or the one stored).
    ///
    /// # Errors
    /// A root that is malformed or not signed by the threshold of its own root keys.
    pub fn from_signed(signed: SignedRoot) -> Result<Trust, String> {
        let root = signed.body()?;
        signed.signed_by(&root.root_keys, root.root_threshold, &format!("its own {}", root.root_keys.len()))?;
        let update_keys = root.update_keys.iter().map(|k| public_key(k)).collect::<Result<_, _>>()?;
        Ok(Trust { root, signed, update_keys })
    }

    /// The file `update.root` names (as the configuration check reads it).
    ///
    /// # Errors
    /// Unreadable, malformed, or not signed by its own threshold.
    pub fn read(path: &Path) -> Result<Trust, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let signed: SignedRoot =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a signed root: {e}", path.display()))?;
        Trust::from_signed(signed).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// What the device trusts at start: the newer of the installer's root and the one it took
    /// last (stored in `state_dir`).
    ///
    /// # Errors
    /// The installer's root does not hold, or the stored one is unreadable.
    pub fn load(configured: &Path, state_dir: &Path) -> Result<Trust, String> {
        let installed = Trust::read(configured)?;
        let stored = stored_path(state_dir);
        if !stored.exists() {
            return Ok(installed);
        }
        let taken = Trust::read(&stored)?;
        Ok(if taken.root.version >= installed.root.version { taken } else { installed })
    }

    pub fn update_keys(&self) -> &[VerifyingKey] {
        &self.update_keys
    }

    /// Why nothing may be trusted now, if the root has expired.
    pub fn expired(&self, now_unix: u64) -> Option<String> {
        (now_unix > self.root.expires_unix).then(|| {
            format!(
                "trusted root v{} expired at {} (now {now_unix}); the central server must publish a newer root",
                self.root.version, self.root.expires_unix
            )
        })
    }

    /// Takes the roots of a message (one signed root, or the chain as a JSON array) newer
    /// than this one, version by version. On an error nothing changes.
    ///
    /// # Errors
    /// Not a root message, a gap in the versions, a root the previous one's keys did not sign
    /// (or its own did not), two different roots with the same version.
    pub fn advance(&mut self, message: &[u8]) -> Result<Advance, String> {
        let chain: Vec<SignedRoot> = match serde_json::from_slice::<serde_json::Value>(message) {
            Ok(serde_json::Value::Array(items)) => items
                .into_iter()
                .map(serde_json::from_value)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("not a chain of signed roots: {e}"))?,
            Ok(one) => vec![serde_json::from_value(one).map_err(|e| format!("not a signed root: {e}"))?],
            Err(e) => return Err(format!("not JSON: {e}")),
        };
        let from = self.root.version;
        let mut next = self.clone();
        for signed in chain {
            let root = signed.body()?;
            if root.version < next.root.version {
                continue;
            }
            if root.version == next.root.version {
                if signed.root != next.signed.root {
                    return Err(format!("another root claims v{}, which is already trusted", root.version));
                }
                continue;
            }
            if root.version != next.root.version + 1 {
                return Err(format!(
                    "root v{} does not follow v{} (every version in between must come first)",
                    root.version, next.root.version
                ));
            }
            let previous = &next.root;
            signed
                .signed_by(
                    &previous.root_keys,
                    previous.root_threshold,
                    &format!("v{}'s {}", previous.version, previous.root_keys.len()),
                )
                .map_err(|e| format!("root v{}: {e}", root.version))?;
            next = Trust::from_signed(signed).map_err(|e| format!("root v{}: {e}", root.version))?;
        }
        if next.root.version == from {
            return Ok(Advance::Unchanged);
        }
        let to = next.root.version;
        *self = next;
        Ok(Advance::To { from, to })
    }

    /// Stores this root as the one taken (atomically), so a restart starts from it.
    ///
    /// # Errors
    /// The file cannot be written durably.
    pub fn store(&self, state_dir: &Path) -> Result<(), String> {
        let path = stored_path(state_dir);
        let bytes = serde_json::to_vec_pretty(&self.signed).map_err(|e| e.to_string())?;
        crate::fs::write_atomic(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Ids of the keys that sign updates (for events).
    pub fn update_key_ids(&self) -> Vec<String> {
        self.update_keys.iter().map(super::signing::key_id).collect()
    }
}

pub fn stored_path(state_dir: &Path) -> PathBuf {
    state_dir.join("update-root.json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::signing::generate;

    fn hex_of(k: &SigningKey) -> String {
        hex::encode(k.verifying_key().to_bytes())
    }

    fn root(version: u64, root_keys: &[&SigningKey], threshold: u32, update: &[&SigningKey]) -> Root {
        Root {
            version,
            expires_unix: 4_000_000_000,
            root_keys: root_keys.iter().map(|k| hex_of(k)).collect(),
            root_threshold: threshold,
            update_keys: update.iter().map(|k| hex_of(k)).collect(),
        }
    }

    fn bytes(s: &SignedRoot) -> Vec<u8> {
        serde_json::to_vec(s).unwrap()
    }

    #[test]
    fn a_root_needs_k_of_its_n_keys_and_a_copied_signature_counts_once() {
        let (a, b, c, u) = (generate().unwrap(), generate().unwrap(), generate().unwrap(), generate().unwrap());
        let r = root(1, &[&a, &b, &c], 2, &[&u]);
        let one = SignedRoot::sign(&r, &[&a]).unwrap();
        let err = Trust::from_signed(one.clone()).unwrap_err();
        assert!(err.contains("signed by 1 of its own 3 root keys; 2 needed"), "{err}");
        let mut doubled = one.clone();
        doubled.signatures.push(doubled.signatures[0].clone());
        assert!(Trust::from_signed(doubled).is_err(), "one key's signature twice is still one");
        // An update key signs nothing at the root level.
        let mut with_update = one;
        with_update.add_signature(&u);
        assert!(Trust::from_signed(with_update).is_err());
        let two = SignedRoot::sign(&r, &[&a, &c]).unwrap();
        let trust = Trust::from_signed(two).unwrap();
        assert_eq!(trust.update_keys(), &[u.verifying_key()]);
        let nonsense = SignedRoot::sign(&root(1, &[&b], 2, &[&u]), &[&b]).unwrap();
        assert!(Trust::from_signed(nonsense).unwrap_err().contains("cannot be met"));
    }

    #[test]
    fn a_rotation_needs_the_old_root_keys_and_the_chain_is_walked_version_by_version() {
        let (a, b, c, u1, u2) =
            (generate().unwrap(), generate().unwrap(), generate().unwrap(), generate().unwrap(), generate().unwrap());
        let v1 = SignedRoot::sign(&root(1, &[&a, &b], 2, &[&u1]), &[&a, &b]).unwrap();
        let mut trust = Trust::from_signed(v1.clone()).unwrap();
        // v2 rotates root key b out for c and the update key u1 for u2: signed by v1's a and b
        // and by its own a and c.
        let v2 = SignedRoot::sign(&root(2, &[&a, &c], 2, &[&u2]), &[&a, &b, &c]).unwrap();
        // v3 only by v2's keys.
        let v3 = SignedRoot::sign(&root(3, &[&a, &c], 2, &[&u2]), &[&a, &c]).unwrap();
        // Skipping v2 fails: b never signed v3, v1 does not know c.
        let err = trust.advance(&bytes(&v3)).unwrap_err();
        assert!(err.contains("does not follow v1"), "{err}");
        // Made by the new keys alone (the thief of c): refused.
        let forged = SignedRoot::sign(&root(2, &[&c], 1, &[&c]), &[&c]).unwrap();
        let err = trust.advance(&bytes(&forged)).unwrap_err();
        assert!(err.contains("signed by 0 of v1's 2 root keys"), "{err}");
        assert_eq!(trust.root.version, 1);
        let chain = serde_json::to_vec(&[&v1, &v2, &v3]).unwrap();
        assert_eq!(trust.advance(&chain).unwrap(), Advance::To { from: 1, to: 3 });
        assert_eq!(trust.update_keys(), &[u2.verifying_key()], "u1 is revoked");
        assert_eq!(trust.advance(&chain).unwrap(), Advance::Unchanged);
        // Another v3 (a replayed fork) is refused.
        let fork = SignedRoot::sign(&root(3, &[&a, &c], 1, &[&u1]), &[&a, &c]).unwrap();
        assert!(trust.advance(&bytes(&fork)).unwrap_err().contains("already trusted"));
        assert_eq!(trust.root.version, 3);
    }

    #[test]
    fn the_root_taken_survives_a_restart_and_an_older_installed_root() {
        let dir = std::env::temp_dir().join(format!("lathe-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, u1, u2) = (generate().unwrap(), generate().unwrap(), generate().unwrap());
        let v1 = SignedRoot::sign(&root(1, &[&a], 1, &[&u1]), &[&a]).unwrap();
        let installed = dir.join("root.json");
        std::fs::write(&installed, bytes(&v1)).unwrap();
        let mut trust = Trust::load(&installed, &dir).unwrap();
        let mut r2 = root(2, &[&a], 1, &[&u2]);
        r2.expires_unix = 100;
        trust.advance(&bytes(&SignedRoot::sign(&r2, &[&a]).unwrap())).unwrap();
        trust.store(&dir).unwrap();
        let again = Trust::load(&installed, &dir).unwrap();
        assert_eq!(again.root.version, 2);
        assert_eq!(again.update_keys(), &[u2.verifying_key()]);
        assert!(again.expired(101).unwrap().contains("expired at 100"));
        assert!(again.expired(100).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
