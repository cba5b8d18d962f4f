//! Models as bundles: the format (`bundle`, `manifest`), the baseline computed when a bundle
//! is made (`baseline`), the CSVs bundles and training read (`csv`), and the on-device registry that knows which version serves.

pub mod baseline;
pub mod bundle;
pub mod csv;
pub mod manifest;
pub mod registry;

pub use bundle::{Bundle, BundleError};
pub use manifest::{Manifest, Task};
pub use registry::Registry;
