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

pub mod device;
pub mod push;
