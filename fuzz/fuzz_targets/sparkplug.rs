//! A stream of Sparkplug B messages into one source: each message is a topic byte and a
//! protobuf payload, split on the 4-byte separator `SPB|`. Exercises the decoder and the
//! state machine (births, deaths, aliases, sequence numbers) together.
#![no_main]
use lathe::sparkplug::{parse_topic, Outcome, Source};
use libfuzzer_sys::fuzz_target;

const TOPICS: [&str; 8] = [
    "spBv1.0/plant/NBIRTH/edge1",
    "spBv1.0/plant/NDATA/edge1",
    "spBv1.0/plant/NDEATH/edge1",
    "spBv1.0/plant/DBIRTH/edge1/pump7",
    "spBv1.0/plant/DDATA/edge1/pump7",
    "spBv1.0/plant/DDEATH/edge1/pump7",
    "spBv1.0/plant/DDATA/edge2/pump9",
    "spBv1.0/plant/NCMD/edge1",
];

fuzz_target!(|data: &[u8]| {
    let mut source = Source::new("plant", "+");
    let mut rest = data;
    let mut messages = 0;
    while let Some((&first, tail)) = rest.split_first() {
        let end = tail.windows(4).position(|w| w == b"SPB|").unwrap_or(tail.len());
        let Some(topic) = parse_topic(TOPICS[first as usize % TOPICS.len()]) else { return };
        if let Outcome::Row { device, .. } = source.handle(&topic, &tail[..end]) {
            // A row is only ever scored for a device the source knows a value of.
            assert!(!device.is_empty());
            let _ = source.value(&topic, "temperature");
        }
        let _ = source.status();
        rest = tail.get(end + 4..).unwrap_or(&[]);
        messages += 1;
        if messages > 64 {
            break;
        }
    }
});
