//! `[update]`: signed model updates from a central server. Parsed by `config`.

use std::path::PathBuf;

/// Signed remote updates (docs/updates.md).
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateConfig {
    /// Where the keys that sign offers and bundles come from.
    pub trust: TrustSource,
    /// Fleet groups: offers on `lathe/fleet/{group}/update` are for this device too.
    pub groups: Vec<String>,
    /// The hardware string offers must name (empty: only offers that name none).
    pub compatible: String,
    /// The device's own key, which signs the bundles it fine-tunes (made at first start).
    pub device_key: PathBuf,
    /// A download that has not completed by then is abandoned (truncated).
    pub download_timeout: std::time::Duration,
    /// Offers of larger bundles are refused before anything is downloaded.
    pub max_bundle_bytes: u64,
    /// How far past the newest version held an offer may jump. The floor only rises, so one
    /// signed offer with version 2^63 would otherwise refuse every later update for good.
    pub max_version_step: u64,
}

/// `update.trusted_keys` or `update.root` (one of them).
#[derive(Debug, Clone, PartialEq)]
pub enum TrustSource {
    /// Public keys (hex files) trusted as they are, until the files change.
    Keys(Vec<PathBuf>),
    /// A signed root document (TUF's root role): update keys with rotation, revocation, a
    /// k-of-n threshold for the root keys and an expiry (`trust::root`).
    Root(PathBuf),
}
