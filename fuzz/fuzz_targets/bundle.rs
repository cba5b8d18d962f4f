//! A bundle file (tar: bundle.toml, model.onnx, validation.csv, bundle.sig) as `lathe`
//! reads it before anything is trusted: the tar, the manifest, the hashes, the CSV.
#![no_main]
use lathe::model::{csv, Bundle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Bundle::from_bytes(data) {
        let _ = b.validation_rows();
        let _ = b.validation_targets();
        let _ = b.reading();
        let _ = b.sha256();
    }
    // The CSV reader on its own too (the hashes stop most mutations above before it), and
    // the rewrite of a semicolon or tab export into the plain CSV a bundle keeps.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = csv::parse_csv(text);
        let _ = csv::comma_separated(text);
    }
});
