//! The stages' import graph, drawn from the sources: every arrow points down. A module may use
//! only the modules in layers below its own, so no stage reaches up into one that depends on
//! it and no circle can form. Adding a module means placing it here; an upward import fails
//! this test with the file that made it. (Test code is exempt: it may use anything.)

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first. The leaves have no crate dependency at all.
const LAYERS: &[&[&str]] = &[
    &["fs", "rng", "engine", "mqtt"],
    &["model"],
    &["monitor", "trust"],
    &["telemetry"],
    &["store"],
    &["train", "sparkplug"],
    &["ingest"],
    &["infer"],
    &["update"],
    // Each stage owns its section's types; config parses the file and composes them.
    &["config"],
    &["service"],
    &["report"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `crate::NAME` in a file's code, before its test module.
fn uses(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let before = &code[..i];
        let line_start = before.rfind('\n').map_or(0, |n| n + 1);
        if code[line_start..i].trim_start().starts_with("//") {
            continue; // a comment naming a path
        }
        let name: String = code[i + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_import_between_stages_points_down() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("daemon");
    let mut upward: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unplaced = Vec::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let Some(module) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(own) = layer_of(&module) else {
            unplaced.push(module);
            continue;
        };
        let mut files = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else {
            files.push(path.clone());
        }
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for used in uses(&text) {
                if used == module {
                    continue;
                }
                checked += 1;
                match layer_of(&used) {
                    Some(l) if l < own => {}
                    Some(_) => upward
                        .entry(format!("{module} -> {used}"))
                        .or_default()
                        .push(file.strip_prefix(&root).unwrap().display().to_string()),
                    None => {} // a crate-level item of lib.rs (`panic_message`)
                }
            }
        }
    }
    assert!(unplaced.is_empty(), "modules with no layer in tests/layers.rs: {unplaced:?}");
    assert!(checked > 100, "only {checked} imports seen: the scan is broken");
    assert!(upward.is_empty(), "imports that point up or sideways: {upward:#?}");
}

#[test]
fn the_scan_sees_what_it_must() {
    let text = "use crate::model::Bundle;\n// crate::service in a comment\nfn f() { crate::fs::write_atomic(); }\n#[cfg(test)]\nmod tests { use crate::cli; }";
    assert_eq!(uses(text), ["model", "fs"]);
}
