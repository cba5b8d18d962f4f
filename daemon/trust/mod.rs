//! Trust: the keys that sign bundles and offers, the root of trust that says which keys count
//! (k of n, rotation, expiry), and the anti-rollback floor. Below the stages that use them: the
//! config checks key files, the pipelines read the floor, the updater verifies offers.

pub mod floor;
pub mod root;
pub mod signing;
