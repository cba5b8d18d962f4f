//! The TOML config: every key checked, every error collected, nothing panics.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match lathe::config::Config::parse(text, Path::new("/etc/lathe/lathe.toml")) {
        Ok(config) => {
            let _ = (config.status_topic(), config.events_topic(), config.client_id());
        }
        // A refused config always says why.
        Err(errors) => assert!(!errors.errors.is_empty()),
    }
});
