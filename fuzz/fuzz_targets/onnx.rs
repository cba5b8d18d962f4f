//! An ONNX model as `Engine::load` takes it: protobuf, the untrusted-graph checks, tract's
//! planning and one run. tract panics on some graphs; the engine catches those (a refused
//! model, not a crash), so panics caught inside it are not findings here and are silenced.
#![no_main]
use lathe::engine::Engine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static QUIET: std::sync::Once = std::sync::Once::new();
    // A panic that escapes the engine still aborts: libfuzzer-sys catches it around this closure.
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    if let Ok(engine) = Engine::load(data) {
        let rows = vec![0.5; engine.signature.sample_len() * 3];
        let _ = engine.run(&rows);
    }
});
