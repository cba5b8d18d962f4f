//! Signed remote model updates (docs/updates.md; the bar is TUF's and Uptane's list
//! of attacks): a device never runs a model its owners did not sign, never goes backwards,
//! and is never left without a working model.
//!
//! ```text
//! offer on lathe/{node}/update | lathe/fleet/{group}/update (retained, signed)
//!   → signature by a trusted key, expiry, compatible string, daemon version, size cap,
//!     newer than every version held and than the floor
//!   → chunks from lathe/bundles/{sha256}/{index} (retained): the declared length is a hard
//!     cap, the sha256 is computed as the bytes arrive, a cut resumes by subscribing again
//!   → the bundle's own signature, its name and version, load + validation set on the
//!     serving engine, the gate rule against the champion on the bundle's validation set
//!   → registry (file), then the floor (trust), then the loop promotes it onto trial
//!   → a failing trial rolls back (the loop's own trial and rollback)
//! ```
//! Every step is an `update.*` event. Nothing touches the running model until the loop
//! promotes a bundle that passed every check.

pub mod config;
pub mod device;
pub mod push;

/// Why a downloaded bundle is not taken: each is an `update.failed` event, and the champion
/// serves on.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("not a valid bundle: {0}")]
    NotABundle(#[source] crate::model::BundleError),
    /// No trusted key signed it, or the trust itself has expired.
    #[error("{0}")]
    Untrusted(String),
    #[error("the bundle is {got}, the offer said {offered}")]
    NotTheOffer { got: String, offered: String },
    /// It does not load, or gives outputs that are not finite, on the serving engine; or
    /// the champion cannot be run to compare it with.
    #[error("{0}")]
    Model(String),
    #[error("its inputs ({theirs}) differ from the champion's ({champion})")]
    Inputs { theirs: String, champion: String },
    /// Worse than the champion on its own validation set, by the gate's rule.
    #[error("gate: {metric} {value:.4} on its validation set vs the champion's {champion:.4} (max_forgetting {max_forgetting})")]
    Gate { metric: String, value: f64, champion: f64, max_forgetting: f64 },
    /// Verified, but the registry or the anti-rollback floor could not record it.
    #[error("{0}")]
    Store(String),
}
