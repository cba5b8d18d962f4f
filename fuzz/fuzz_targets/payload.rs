//! A telemetry payload (JSON) as the daemon reads it: size cap, parse, pointers, ranges.
#![no_main]
use std::collections::BTreeMap;
use std::sync::OnceLock;

use lathe::ingest::Extractor;
use lathe::model::manifest::Input;
use libfuzzer_sys::fuzz_target;

fn extractor() -> &'static Extractor {
    static E: OnceLock<Extractor> = OnceLock::new();
    E.get_or_init(|| {
        let input = |name: &str| Input { name: name.into(), unit: String::new(), min: -1e6, max: 1e6 };
        let inputs = [input("temperature"), input("co2"), input("a/b~c")];
        // One input read from a nested pointer, one by its own name, one needing escapes.
        let pointers = BTreeMap::from([("co2".to_string(), "/readings/0/co2".to_string())]);
        Extractor::new(&inputs, &pointers, Some("/seq".into()), Some("/ts".into()), 64 * 1024)
    })
}

fuzz_target!(|data: &[u8]| {
    for row in extractor().rows(data).into_iter().flatten() {
        // What a caller relies on: one finite, in-range value per input.
        assert_eq!(row.features.len(), 3);
        assert!(row.features.iter().all(|x| x.is_finite() && x.abs() <= 1e6));
    }
});
