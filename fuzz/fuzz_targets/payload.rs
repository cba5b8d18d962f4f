//! A telemetry payload (JSON) as the daemon reads it: size cap, parse, pointers, ranges;
//! and as a Kepware IoT Gateway message, whole and by exception.
#![no_main]
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

use lathe::ingest::last_value::LastValues;
use lathe::ingest::Extractor;
use lathe::model::manifest::Input;
use libfuzzer_sys::fuzz_target;

fn inputs() -> [Input; 3] {
    let input = |name: &str| Input { name: name.into(), unit: String::new(), min: -1e6, max: 1e6 };
    [input("temperature"), input("co2"), input("a/b~c")]
}

fn extractor() -> &'static Extractor {
    static E: OnceLock<Extractor> = OnceLock::new();
    E.get_or_init(|| {
        // One input read from a nested pointer, one by its own name, one needing escapes.
        let pointers = BTreeMap::from([("co2".to_string(), "/readings/0/co2".to_string())]);
        Extractor::new(&inputs(), &pointers, Some("/seq".into()), Some("/ts".into()), 64 * 1024)
    })
}

fn kepware() -> &'static Extractor {
    static E: OnceLock<Extractor> = OnceLock::new();
    E.get_or_init(|| {
        let tags = BTreeMap::from([("co2".to_string(), "Air.CO2".to_string())]);
        Extractor::for_kepware_tags(&inputs(), &tags, 2, Some("Part".into()), 64 * 1024)
    })
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut last = LastValues::new(None);
    let rows = extractor().rows(data).into_iter();
    let whole = kepware().read(data, "d", None, now).into_iter().map(|(_, row)| row);
    let by_exception = kepware().read(data, "d", Some(&mut last), now).into_iter().map(|(_, row)| row);
    for row in rows.chain(whole).chain(by_exception).flatten() {
        // What a caller relies on: one finite, in-range value per input.
        assert_eq!(row.features.len(), 3);
        assert!(row.features.iter().all(|x| x.is_finite() && x.abs() <= 1e6));
    }
});
