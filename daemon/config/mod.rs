//! The daemon's configuration: `/etc/lathe/lathe.toml`, typed.
//!
//! Parsing only: the text in, the sections out, each typed by the stage that owns it (this
//! module composes them). Reading the file and checking the files it names (a bundle, the
//! update keys) is `service::load_config`'s.
//!
//! Parsing is hand-rolled over `toml::Table` instead of serde-derive so that *every* problem in
//! a file is reported at once (serde stops at the first), each naming the file, the key and what
//! was expected. Unknown keys are errors: a typo must never silently fall back to a default.

mod reader;
mod train;
pub use train::parse_duration;

// The sections, each owned by the stage that reads it; this module parses and composes them.
pub use crate::infer::config::{
    BatchConfig, CaptureConfig, InferConfig, LoadContext, ModelRef, PipelineConfig, SinkConfig,
};
pub use crate::ingest::config::{LabelsConfig, LastValueConfig, SourceConfig};
pub use crate::sparkplug::config::SparkplugOutputConfig;
pub use crate::train::config::{utc_offset_s, ColdStartModel, Hours, Overrides, TrainConfig, Trigger};
pub use crate::update::config::{TrustSource, UpdateConfig};

use std::fmt;
use std::path::{Path, PathBuf};

use reader::Section;

pub use crate::mqtt::{parse_url, BrokerUrl, MqttConfig};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `pipeline[0].batch.max`.
    pub key: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(f, "{}: {} error{}", self.file.display(), n, if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            write!(f, "\n  {}: {}: {}", self.file.display(), e.key, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (for messages).
    pub file: PathBuf,
    /// This device's name; appears in every `lathe/{node}/…` topic.
    pub node: String,
    /// Registry, sample store and run records live here.
    pub state_dir: PathBuf,
    pub mqtt: MqttConfig,
    pub infer: InferConfig,
    /// `[metrics] listen`: where the Prometheus text endpoint listens (off when absent).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `[store]`: the sample store the training loop keeps (used by pipelines with `train`).
    pub store: crate::store::Settings,
    /// `[sparkplug] group, edge_node`: lathe also appears as a Sparkplug B edge node.
    pub sparkplug: Option<SparkplugOutputConfig>,
    /// `[update]`: signed model updates from a central server.
    pub update: Option<UpdateConfig>,
    pub pipelines: Vec<PipelineConfig>,
}

/// How long after a clean stop a start resumes the sequence windows it saved: a restart or
/// an upgrade takes seconds; after longer, the saved frames and the next ones would make a
/// window with a gap no model was trained on.
const DEFAULT_RESUME_WITHIN: &str = "10m";

/// A file a config names that must be there before anything starts. Parsing reads no file: it
/// only notes these, and `service::load_config` checks them, reporting what it finds with the
/// text's own problems.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedFile {
    /// The key that names it, as errors say it (`pipeline[0].model`).
    pub key: String,
    pub path: PathBuf,
    pub kind: FileKind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FileKind {
    /// A bundle a pipeline serves (`model = "….lathe"`).
    Bundle,
    /// A public key that signs updates (`update.trusted_keys`).
    PublicKey,
    /// A signed root document (`update.root`).
    Root,
}

impl Config {
    /// Parses config text; `path` is used for messages and to resolve relative paths.
    ///
    /// # Errors
    /// Every problem found.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        Config::parse_noting_files(text, path).0
    }

    /// [`Config::parse`], and the files the text names, even when it has errors (so a loader
    /// reports every problem at once).
    pub fn parse_noting_files(text: &str, path: &Path) -> (Result<Config, ConfigErrors>, Vec<NamedFile>) {
        let (mut errors, mut files) = (Vec::new(), Vec::new());
        let config = match text.parse::<toml::Table>() {
            Ok(table) => parse_root(table, path, &mut errors, &mut files),
            Err(e) => {
                errors.push(ConfigError { key: "(syntax)".into(), message: e.to_string().trim().replace('\n', " ") });
                None
            }
        };
        let parsed = match config {
            Some(c) if errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors { file: path.to_path_buf(), errors }),
        };
        (parsed, files)
    }

    pub fn status_topic(&self) -> String {
        format!("lathe/{}/status", self.node)
    }

    pub fn events_topic(&self) -> String {
        format!("lathe/{}/events", self.node)
    }

    /// What loading a model for one of this config's pipelines needs beyond the pipeline.
    pub fn load_context(&self) -> LoadContext<'_> {
        LoadContext { infer: &self.infer, state_dir: &self.state_dir, max_payload_bytes: self.mqtt.max_payload_bytes }
    }

    pub fn client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("lathe-{}", self.node))
    }
}

/// Top-level sections people reach for that live elsewhere in this build. Naming one is an
/// error with a clear message rather than a silent no-op.
const NOT_YET: &[(&str, &str)] = &[("train", "training is set per pipeline: [pipeline.train]")];

fn parse_root(
    table: toml::Table,
    path: &Path,
    errors: &mut Vec<ConfigError>,
    files: &mut Vec<NamedFile>,
) -> Option<Config> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut root = Section::new(table, String::new(), errors);
    let node = root.string("node", None);
    if let Some(n) = &node {
        if n.is_empty() || n.contains(['/', '+', '#']) {
            root.error("node", "expected a non-empty name without '/', '+' or '#'");
        }
    }
    let state_dir = root.string("state_dir", Some("/var/lib/lathe")).map(|s| base.join(s));
    for (key, why) in NOT_YET {
        if root.has(key) {
            root.take(key);
            root.error(key, why);
        }
    }
    let store = train::parse_store(&mut root, state_dir.as_deref());
    let mqtt_section = root.section("mqtt", true);
    let payload_cap_set = mqtt_section.as_ref().is_some_and(|m| m.has("max_payload_bytes"));
    let mqtt = parse_mqtt(mqtt_section, base);
    let infer = parse_infer(root.section("infer", true), base);
    let metrics_listen = match root.section("metrics", true) {
        Some(mut m) => {
            let listen = m.opt_string("listen").and_then(|l| match l.parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    m.error("listen", &format!("expected ADDRESS:PORT (e.g. \"127.0.0.1:9464\"), found {l:?}"));
                    None
                }
            });
            m.finish();
            listen
        }
        None => None,
    };
    let sparkplug = match root.has("sparkplug").then(|| root.section("sparkplug", false)).flatten() {
        Some(mut sp) => {
            let mut id = |key: &str, default: Option<&str>| {
                let v = sp.string(key, default);
                if v.as_deref().is_some_and(|v| v.is_empty() || v.contains(['/', '+', '#'])) {
                    sp.error(key, "expected a Sparkplug id: not empty, no '/', '+' or '#'");
                }
                v
            };
            let group = id("group", None);
            let edge_node = id("edge_node", node.as_deref());
            let ok = sp.finish();
            match (group, edge_node, ok) {
                (Some(group), Some(edge_node), true) => Some(SparkplugOutputConfig { group, edge_node }),
                _ => None,
            }
        }
        None => None,
    };
    let update = match root.has("update").then(|| root.section("update", false)).flatten() {
        Some(mut u) => {
            let trusted: Vec<PathBuf> =
                u.strings("trusted_keys").unwrap_or_default().iter().map(|k| base.join(k)).collect();
            let root_file = u.opt_string("root").map(|r| base.join(r));
            let key = u.key("trusted_keys");
            files.extend(trusted.iter().map(|k| NamedFile {
                key: key.clone(),
                path: k.clone(),
                kind: FileKind::PublicKey,
            }));
            if let Some(r) = &root_file {
                files.push(NamedFile { key: u.key("root"), path: r.clone(), kind: FileKind::Root });
            }
            let trust = match (trusted.is_empty(), root_file) {
                (false, None) => TrustSource::Keys(trusted),
                (true, Some(r)) => TrustSource::Root(r),
                (false, Some(r)) => {
                    u.error("root", "give either trusted_keys or root, not both (the root names the update keys)");
                    TrustSource::Root(r)
                }
                (true, None) => {
                    u.error(
                        "trusted_keys",
                        "expected at least one public key file (made by `lathe keygen`), or a signed root document in update.root (made by `lathe root create`)",
                    );
                    TrustSource::Keys(vec![])
                }
            };
            let groups = u.strings("groups").unwrap_or_default();
            for g in &groups {
                if g.is_empty() || g.contains(['/', '+', '#']) {
                    u.error("groups", &format!("{g:?}: expected a name without '/', '+' or '#'"));
                }
            }
            let compatible = u.string("compatible", Some("")).unwrap_or_default();
            let device_key = u
                .opt_string("device_key")
                .and_then(|k| login_file(base, &k).map_err(|e| u.error("device_key", &e)).ok());
            let download_timeout = train::duration(&mut u, "download_timeout", "2m");
            let max_mb = u.integer("max_bundle_mb", 256, 1, 1 << 20);
            let max_step = u.integer("max_version_step", 1000, 1, 1 << 40);
            let ok = u.finish();
            match (state_dir.as_ref(), download_timeout, max_mb, max_step, ok) {
                (Some(dir), Some(download_timeout), Some(max_mb), Some(max_version_step), true) => Some(UpdateConfig {
                    trust,
                    groups,
                    compatible,
                    device_key: device_key.unwrap_or_else(|| dir.join("device.key")),
                    download_timeout,
                    max_bundle_bytes: max_mb << 20,
                    max_version_step,
                }),
                _ => None,
            }
        }
        None => None,
    };
    let pipelines = root.array_of_tables("pipeline").map(|tables| {
        if tables.is_empty() {
            root.error("pipeline", "expected at least one [[pipeline]]");
        }
        let mut names = Vec::new();
        let mut out = Vec::new();
        for (i, t) in tables.into_iter().enumerate() {
            let mut section = root.child(t, format!("pipeline[{i}]"));
            if let Some(p) = parse_pipeline(&mut section, base, files) {
                if names.contains(&p.name) {
                    section.error("name", &format!("duplicate pipeline name {:?}", p.name));
                }
                names.push(p.name.clone());
                out.push(p);
            }
            section.finish();
        }
        out
    });
    root.finish();
    let (mut mqtt, pipelines) = (mqtt?, pipelines?);
    // A Kepware agent's publish holds the tags of many devices (~70 bytes each, up to its
    // "max events per publish"): the default cap would refuse a whole scan of a large agent.
    if !payload_cap_set && pipelines.iter().any(|p| p.source.kepware_device_levels.is_some()) {
        mqtt.max_payload_bytes = KEPWARE_MAX_PAYLOAD_BYTES;
    }
    Some(Config {
        file: path.to_path_buf(),
        node: node?,
        state_dir: state_dir?,
        mqtt,
        infer: infer?,
        metrics_listen,
        store: store?,
        sparkplug,
        update,
        pipelines,
    })
}

/// Where the packaged units keep secrets, root-only: systemd copies each file into the
/// service's `$CREDENTIALS_DIRECTORY` (`LoadCredential=lathe:/etc/lathe/credentials`).
pub const CREDENTIALS_FOLDER: &str = "/etc/lathe/credentials";

/// A secret file's path from the config: relative to the config's folder, or
/// `credential:NAME`, a file systemd passed the service with `LoadCredential=` (it names the
/// copy `lathe_NAME` in `$CREDENTIALS_DIRECTORY`). Outside systemd (an operator's `lathe
/// check` as root) `credential:NAME` is `/etc/lathe/credentials/NAME` itself.
pub fn login_file(base: &Path, value: &str) -> Result<PathBuf, String> {
    let Some(name) = value.strip_prefix("credential:") else {
        return Ok(base.join(value));
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!("{value:?}: expected credential:NAME, a file name in {CREDENTIALS_FOLDER}"));
    }
    Ok(match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) => PathBuf::from(dir).join(format!("lathe_{name}")),
        None => Path::new(CREDENTIALS_FOLDER).join(name),
    })
}

/// `mqtt.max_payload_bytes` unless set, where a pipeline reads Kepware's IoT Gateway.
pub const KEPWARE_MAX_PAYLOAD_BYTES: usize = 1 << 20;

fn parse_mqtt(section: Option<Section>, base: &Path) -> Option<MqttConfig> {
    let mut s = section?;
    let url = s.string("url", Some("mqtt://127.0.0.1:1883")).and_then(|u| match parse_url(&u) {
        Ok(url) => Some(url),
        Err(e) => {
            s.error("url", &e);
            None
        }
    });
    let mut path = |key: &str| {
        let value = s.opt_string(key)?;
        login_file(base, &value).map_err(|e| s.error(key, &e)).ok()
    };
    let (password_file, ca_file, cert_file, key_file) =
        (path("password_file"), path("ca_file"), path("cert_file"), path("key_file"));
    let c = MqttConfig {
        url: url.clone().unwrap_or(BrokerUrl::Embedded),
        embedded_listen: s.string("embedded_listen", Some("127.0.0.1:1883")).unwrap_or_default(),
        client_id: s.opt_string("client_id"),
        username: s.opt_string("username"),
        password_file,
        ca_file,
        cert_file,
        key_file,
        keep_alive_s: s.integer("keep_alive_s", 30, 5, 3600).unwrap_or(30),
        max_payload_bytes: s.integer("max_payload_bytes", 65_536, 64, 16 << 20).unwrap_or(0) as usize,
        max_inflight: s.integer("max_inflight", 1000, 1, 65_535).unwrap_or(1) as u16,
        receive_maximum: s.integer("receive_maximum", 1000, 1, 65_535).unwrap_or(1) as u16,
        // On for the embedded broker only by default: docs/decisions/026-tcp-nodelay-towards-the-embedded-broker-mqtt-tcp.md.
        tcp_nodelay: s.boolean("tcp_nodelay", matches!(url, Some(BrokerUrl::Embedded))).unwrap_or(false),
        protocol: match s.string("protocol", Some("auto")).as_deref() {
            Some("5") => rumqttc::v5::WireProtocol::V5,
            Some("3.1.1") => rumqttc::v5::WireProtocol::V311,
            Some("auto") | None => rumqttc::v5::WireProtocol::Auto,
            Some(other) => {
                s.error("protocol", &format!("expected \"auto\", \"5\" or \"3.1.1\", found {other:?}"));
                rumqttc::v5::WireProtocol::Auto
            }
        },
    };
    if c.cert_file.is_some() != c.key_file.is_some() {
        s.error("cert_file", "expected `cert_file` and `key_file` together (a client certificate and its key)");
    }
    let tls = matches!(c.url, BrokerUrl::Tcp { tls: true, .. });
    if !tls && (c.ca_file.is_some() || c.cert_file.is_some()) {
        s.error("url", "ca_file/cert_file are set but the url is not mqtts://");
    }
    if tls && c.cert_file.is_some() && c.ca_file.is_none() {
        s.error("ca_file", "a client certificate needs `ca_file` too (the broker's CA)");
    }
    if c.password_file.is_some() && c.username.is_none() {
        s.error("password_file", "expected `username` too");
    }
    if matches!(c.url, BrokerUrl::Tcp { tls: true, .. }) && !cfg!(feature = "tls") {
        s.error("url", "mqtts:// needs a build with `--features tls`");
    }
    if c.url == BrokerUrl::Embedded && c.protocol == rumqttc::v5::WireProtocol::V311 {
        s.error("protocol", "the embedded broker speaks MQTT 5: expected \"auto\" or \"5\" with url = \"embedded\"");
    }
    if c.url == BrokerUrl::Embedded && !cfg!(feature = "embedded-broker") {
        s.error("url", "\"embedded\" needs a build with the `embedded-broker` feature");
    }
    let ok = s.finish();
    (ok && url.is_some()).then_some(c)
}

fn parse_infer(section: Option<Section>, base: &Path) -> Option<InferConfig> {
    use crate::engine::EngineKind;
    let mut s = section?;
    let engine = s.string("engine", Some("tract"));
    let library = s.opt_string("ort_library").map(|p| base.join(p));
    let providers = s.strings("providers").unwrap_or_default();
    for (i, p) in providers.iter().enumerate() {
        if !crate::engine::PROVIDERS.contains(&p.as_str()) {
            s.error(&format!("providers[{i}]"), &format!("expected \"tensorrt\" or \"cuda\", found {p:?}"));
        }
    }
    let strict = match s.string("providers_policy", Some("auto")).as_deref() {
        Some("auto") => false,
        Some("strict") => true,
        Some(other) => {
            s.error("providers_policy", &format!("expected \"auto\" or \"strict\", found {other:?}"));
            false
        }
        None => false,
    };
    if !providers.is_empty() && engine.as_deref() != Some("ort") {
        s.error("providers", "execution providers need engine = \"ort\"");
    }
    let engine = match (engine.as_deref(), library) {
        (Some("tract"), None) => Some(EngineKind::Tract),
        (Some("tract"), Some(_)) => {
            s.error("ort_library", "only used with engine = \"ort\"");
            None
        }
        (Some("ort"), _) if !cfg!(feature = "ort") => {
            s.error("engine", "\"ort\" needs a build with `--features ort`");
            None
        }
        (Some("ort"), Some(library)) => Some(EngineKind::Ort { library, providers, strict }),
        (Some("ort"), None) => {
            s.error("ort_library", "missing: the path of libonnxruntime.so (e.g. from the onnxruntime wheel)");
            None
        }
        (Some(other), _) => {
            s.error("engine", &format!("expected \"tract\" or \"ort\", found {other:?}"));
            None
        }
        (None, _) => None,
    };
    let memory_mb = s.integer("load_memory_mb", 4096, 0, 1 << 20);
    let timeout = train::duration(&mut s, "load_timeout", "2m");
    let ok = s.finish();
    if ok {
        let load_limits = crate::engine::Limits { memory_mb: memory_mb?, timeout: timeout? };
        Some(InferConfig { engine: engine?, load_limits })
    } else {
        None
    }
}

fn parse_pipeline(s: &mut Section, base: &Path, files: &mut Vec<NamedFile>) -> Option<PipelineConfig> {
    let name = s.string("name", None);
    let model = if matches!(s.peek("model"), Some(toml::Value::Table(_))) {
        parse_cold_start(s)
    } else {
        s.string("model", None).map(|m| {
            if m.ends_with(".lathe") || m.contains('/') {
                ModelRef::File(base.join(m))
            } else {
                ModelRef::Name(m)
            }
        })
    };
    if let Some(ModelRef::File(f)) = &model {
        files.push(NamedFile { key: s.key("model"), path: f.clone(), kind: FileKind::Bundle });
    }
    // What features name, by the source's format (known even when the source has an error):
    // `None`, JSON pointers; else names, each one of these.
    let mut feature_names = None;
    let source = s.section("source", false).and_then(|mut src| {
        let format = src.string("format", Some("json"));
        feature_names = match format.as_deref() {
            Some("sparkplug-b") => Some("a metric name"),
            Some("kepware") => Some("a tag name (the tag's id less Channel.Device.)"),
            _ => None,
        };
        let kepware = format.as_deref() == Some("kepware");
        let kepware_device_levels = match (kepware, src.has("device_levels")) {
            (true, _) => src.integer("device_levels", 2, 1, 16).map(|n| n as usize),
            (false, true) => {
                src.error("device_levels", "only used with format = \"kepware\"");
                None
            }
            (false, false) => None,
        };
        let sparkplug = match format.as_deref() {
            Some("json" | "kepware") | None => None,
            Some("sparkplug-b") => {
                let mut level = |key: &str| {
                    let v = src.string(key, Some("+"));
                    if v.as_deref().is_some_and(|v| v.is_empty() || (v != "+" && v.contains(['/', '+', '#']))) {
                        src.error(key, "expected a Sparkplug id (no '/', '+' or '#') or \"+\" for any");
                    }
                    v.unwrap_or_default()
                };
                let (group, edge_node) = (level("group"), level("edge_node"));
                Some((group, edge_node))
            }
            Some(other) => {
                src.error("format", &format!("expected \"json\", \"sparkplug-b\" or \"kepware\", found {other:?}"));
                None
            }
        };
        if kepware && src.has("timestamp") {
            src.error("timestamp", "not used with format = \"kepware\": a row's timestamp is the newest \"t\" of its values");
        }
        let topic = match &sparkplug {
            Some((group, edge_node)) => {
                if src.has("topic") {
                    src.error("topic", "not used with format = \"sparkplug-b\" (the topics follow from group and edge_node)");
                }
                for key in ["key", "timestamp"] {
                    if src.has(key) {
                        src.error(key, "not used with format = \"sparkplug-b\": the key is the DATA message's timestamp, the time the metrics' own");
                    }
                }
                Some(crate::mqtt::topic::sparkplug_filter(group, edge_node))
            }
            None => src.string("topic", None),
        };
        if let Some(t) = &topic {
            if let Err(e) = crate::mqtt::TopicFilter::parse(t) {
                src.error("topic", &e);
            }
        }
        // Kepware: the key is a tag of the device (a part or cycle counter), not a pointer.
        let key = if kepware { src.opt_string("key") } else { src.opt_pointer("key") };
        let timestamp = src.opt_pointer("timestamp");
        let rows_given = src.has("rows");
        let last_value = match src.string("rows", Some("whole")).as_deref() {
            _ if sparkplug.is_some() && rows_given => {
                src.error("rows", "not used with format = \"sparkplug-b\" (a DATA message always updates the device's last values)");
                None
            }
            Some("last_value") => {
                let max_age_s = src.has("max_age_s").then(|| src.integer("max_age_s", 0, 1, 30 * 86_400)).flatten();
                Some(LastValueConfig { max_age: max_age_s.map(std::time::Duration::from_secs) })
            }
            Some("whole") | None => None,
            Some(other) => {
                src.error("rows", &format!("expected \"whole\" or \"last_value\", found {other:?}"));
                None
            }
        };
        if last_value.is_none() && src.take("max_age_s").is_some() {
            src.error("max_age_s", "only used with rows = \"last_value\"");
        }
        let silent_after = src
            .has("silent_after_s")
            .then(|| src.integer("silent_after_s", 0, 1, 30 * 86_400))
            .flatten()
            .map(std::time::Duration::from_secs);
        let ok = src.finish();
        ok.then_some(SourceConfig { topic: topic?, key, timestamp, sparkplug, kepware_device_levels, last_value, silent_after })
    });
    // JSON: input name = JSON pointer; Sparkplug B: a metric name; Kepware: a tag in the device.
    let features = match feature_names {
        None => s.table_of_pointers("features"),
        Some(names) => s.table_of_strings("features", names),
    };
    let sink = s.section("sink", false).and_then(|mut snk| {
        let topic = snk.string("topic", None);
        if let Some(t) = &topic {
            if t.is_empty() || t.contains(['+', '#']) {
                snk.error("topic", "expected a topic without wildcards ({device} is replaced by the device id)");
            }
        }
        let ok = snk.finish();
        ok.then_some(SinkConfig { topic: topic? })
    });
    let batch = match s.section("batch", true) {
        Some(mut b) => {
            let max = b.integer("max", 64, 1, 4096);
            let wait_us = b.integer("wait_us", 0, 0, 1_000_000);
            let ok = b.finish();
            if ok {
                BatchConfig { max: max.unwrap_or(64) as usize, wait_us: wait_us.unwrap_or(0) }
            } else {
                BatchConfig::default()
            }
        }
        None => BatchConfig::default(),
    };
    let (window, resume_within) = match s.has("window").then(|| s.section("window", false)).flatten() {
        Some(mut w) => {
            if !w.has("size") {
                w.error("size", "missing (expected the number of frames the sequence model takes)");
            }
            let size = w.integer("size", 1, 2, crate::engine::MAX_FRAMES as u64);
            let resume_within = train::duration(&mut w, "resume_within", DEFAULT_RESUME_WITHIN);
            w.finish();
            (size.unwrap_or(1) as usize, resume_within.unwrap_or_default())
        }
        None => (1, std::time::Duration::ZERO),
    };
    if let (Some(src), Some(snk)) = (&source, &sink) {
        // Sparkplug B and Kepware name the device in the payload.
        if snk.topic.contains("{device}")
            && !src.topic.contains('+')
            && src.sparkplug.is_none()
            && src.kepware_device_levels.is_none()
        {
            s.error("sink.topic", "uses {device} but source.topic has no '+' to capture it");
        }
    }
    let drift = parse_drift(s)?;
    let labels = if s.has("labels") {
        let mut l = s.section("labels", false)?;
        let topic = l.string("topic", None);
        if let Some(t) = &topic {
            if let Err(e) = crate::mqtt::TopicFilter::parse(t) {
                l.error("topic", &e);
            }
        }
        let key = l.opt_pointer("key");
        if key.is_none() {
            l.error("key", "missing (expected a JSON pointer to the key the prediction echoed)");
        }
        let value = l.opt_pointer("value");
        if value.is_none() {
            l.error("value", "missing (expected a JSON pointer to the true value)");
        }
        let horizon = l.integer("horizon_s", 86_400, 1, 365 * 86_400);
        let window = l.integer("window", 500, 50, 1_000_000);
        let ok = l.finish();
        if ok {
            Some(LabelsConfig {
                topic: topic?,
                key: key?,
                value: value?,
                horizon: std::time::Duration::from_secs(horizon?),
                window: window? as usize,
            })
        } else {
            None
        }
    } else {
        None
    };
    if labels.is_some() && source.as_ref().is_some_and(|s| s.key.is_none()) {
        s.error("labels", "needs source.key: labels are joined to predictions by key");
    }
    let train = train::parse_train(s)?;
    if train.is_some() && source.as_ref().is_some_and(|s| s.key.is_none()) {
        s.error("train", "needs source.key: stored samples are joined to their labels by key");
    }
    let capture = match s.has("capture").then(|| s.section("capture", false)).flatten() {
        Some(mut c) => {
            let d = CaptureConfig::default();
            let every = train::duration(&mut c, "every", "1m");
            let rows = c.integer("rows", d.rows as u64, 1, 1000);
            let max_margin = c.number("max_margin", d.max_margin, 0.0, 1.0);
            let min_error_ratio = c.number("min_error_ratio", d.min_error_ratio, 0.0, 1e6);
            let drift_only = c.boolean("drift", false);
            let ok = c.finish();
            match (every, rows, max_margin, min_error_ratio, drift_only, ok) {
                (Some(every), Some(rows), Some(max_margin), Some(min_error_ratio), Some(drift_only), true) => {
                    Some(CaptureConfig { every, rows: rows as usize, max_margin, min_error_ratio, drift_only })
                }
                _ => None,
            }
        }
        None => None,
    };
    if let Some(ModelRef::ColdStart(_)) = &model {
        if train.is_none() {
            s.error("model.cold_start", "grows its model from stored rows: add [pipeline.train]");
        }
        if window > 1 {
            s.error("model.cold_start", "grows a model of one frame per sample: remove window");
        }
    }
    Some(PipelineConfig {
        train,
        capture,
        name: name?,
        model: model?,
        source: source?,
        features: features?,
        sink: sink?,
        batch,
        window,
        resume_within,
        drift,
        labels,
    })
}

/// `model = { cold_start = { task, features, hidden = [32, 16], min_rows = 500, classes } }`.
fn parse_cold_start(s: &mut Section) -> Option<ModelRef> {
    let mut m = s.section("model", false)?;
    let mut c = m.section("cold_start", false)?;
    let task = c.string("task", None).and_then(|t| match t.parse::<crate::model::Task>() {
        Ok(t) => Some(t),
        Err(e) => {
            c.error("task", &e);
            None
        }
    });
    let features = c.strings("features");
    if features.as_ref().is_some_and(Vec::is_empty) {
        c.error("features", "missing (expected the model's input names, in order)");
    }
    let hidden = match c.take("hidden") {
        None => Some(vec![32, 16]),
        Some(toml::Value::Array(widths)) => {
            let widths: Option<Vec<usize>> =
                widths.iter().map(|w| w.as_integer().filter(|w| (1..=4096).contains(w)).map(|w| w as usize)).collect();
            if widths.is_none() {
                c.error("hidden", "expected layer widths from 1 to 4096, e.g. [32, 16]");
            }
            widths
        }
        Some(_) => {
            c.error("hidden", "expected an array of layer widths, e.g. [32, 16]");
            None
        }
    };
    let min_rows = c.integer("min_rows", 500, 50, 10_000_000);
    let has_classes = c.has("classes");
    let classes = c.integer("classes", 2, 2, 4096);
    if task == Some(crate::model::Task::Multiclass) && !has_classes {
        c.error("classes", "missing (a multiclass model needs its number of classes)");
    }
    let ok = c.finish();
    m.finish();
    if !ok {
        return None;
    }
    let spec =
        crate::model::manifest::ColdStart { hidden: hidden?, min_rows: min_rows? as usize, classes: classes? as usize };
    Some(ModelRef::ColdStart(ColdStartModel { task: task?, features: features?, spec }))
}

/// `[pipeline.drift]`: on by default, every key optional (see `monitor::Settings`).
fn parse_drift(s: &mut Section) -> Option<Option<crate::monitor::Settings>> {
    let d = crate::monitor::Settings::default();
    let mut t = s.section("drift", true)?;
    let enabled = t.boolean("enabled", true);
    let window = t.integer("window", d.window as u64, 20, 100_000);
    let every = t.integer("every", d.every as u64, 1, 100_000);
    let statistic = match t.string("statistic", Some("ks")).map(|v| v.parse::<crate::monitor::Statistic>()) {
        Some(Ok(st)) => Some(st),
        Some(Err(e)) => {
            t.error("statistic", &e);
            None
        }
        None => None,
    };
    let false_alarm_rate = t.number("false_alarm_rate", d.false_alarm_rate, 1e-9, 0.5);
    let bootstrap = t.integer("bootstrap", d.bootstrap as u64, 20, 100_000);
    let margin = t.number("margin", d.margin, 0.1, 100.0);
    let clear_ratio = t.number("clear_ratio", d.clear_ratio, 0.0, 1.0);
    let thresholds = t.table_of_numbers("thresholds");
    let seed = t.integer("seed", 0, 0, u64::MAX >> 1);
    // Four windows by default: a smaller reference false-alarms (`infer::small_reference`).
    let default_rebase = 4 * window.unwrap_or(d.window as u64);
    let rebase_rows = t.integer("rebase_rows", default_rebase, 0, 1_000_000);
    if let (Some(r), Some(w)) = (rebase_rows, window) {
        if r > 0 && r < w {
            t.error("rebase_rows", &format!("{r} is less than one window ({w}); 0 turns re-basing off"));
        }
    }
    let ok = t.finish();
    if !ok {
        return Some(None);
    }
    Some(enabled?.then(|| crate::monitor::Settings {
        window: window.unwrap_or(500) as usize,
        every: every.unwrap_or(d.every as u64) as usize,
        statistic: statistic.unwrap_or(crate::monitor::Statistic::Ks),
        false_alarm_rate: false_alarm_rate.unwrap_or(d.false_alarm_rate),
        bootstrap: bootstrap.unwrap_or(400) as usize,
        margin: margin.unwrap_or(d.margin),
        clear_ratio: clear_ratio.unwrap_or(d.clear_ratio),
        thresholds,
        seed: seed.unwrap_or(0),
        rebase_rows: rebase_rows.unwrap_or(default_rebase) as usize,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, Path::new("/etc/lathe/lathe.toml"))
    }

    const GOOD: &str = r#"
node = "line3-edge01"
state_dir = "/var/lib/lathe"
[mqtt]
url = "mqtt://127.0.0.1:1884"
[[pipeline]]
name = "pump"
model = "pump-anomaly"
source = { topic = "plant/line3/+/telemetry", key = "/seq" }
features = { temp = "/temp_c" }
sink = { topic = "plant/line3/{device}/pump" }
batch = { max = 32 }
"#;

    #[test]
    fn a_cold_start_model_names_its_task_features_and_shape_and_needs_a_train_section() {
        let cold = |spec: &str| {
            GOOD.replace(r#"model = "pump-anomaly""#, &format!("model = {{ cold_start = {{ {spec} }} }}"))
                + "[pipeline.train]\n"
        };
        let c = parse(&cold(r#"task = "multiclass", features = ["temp", "flow"], classes = 4"#)).unwrap();
        let ModelRef::ColdStart(m) = &c.pipelines[0].model else { panic!("{:?}", c.pipelines[0].model) };
        assert_eq!(
            (m.task, m.features.as_slice()),
            (crate::model::Task::Multiclass, &["temp".into(), "flow".into()][..])
        );
        assert_eq!(m.spec, crate::model::manifest::ColdStart { hidden: vec![32, 16], min_rows: 500, classes: 4 });
        for (spec, error) in [
            (r#"task = "multiclass", features = ["t"]"#, "model.cold_start.classes: missing"),
            (r#"task = "binary", features = []"#, "model.cold_start.features: missing"),
            (r#"task = "binary", features = ["t"], hidden = [0]"#, "model.cold_start.hidden: expected layer widths"),
            (r#"task = "ranking", features = ["t"]"#, "model.cold_start.task: unknown task"),
            (
                r#"task = "binary", features = ["t"], min_rows = 5"#,
                "model.cold_start.min_rows: expected an integer in 50",
            ),
        ] {
            let errs = parse(&cold(spec)).unwrap_err().to_string();
            assert!(errs.contains(error), "{spec}: {errs}");
        }
        let without_train = cold(r#"task = "binary", features = ["t"]"#).replace("[pipeline.train]\n", "");
        let errs = parse(&without_train).unwrap_err().to_string();
        assert!(errs.contains("add [pipeline.train]"), "{errs}");
    }

    #[test]
    fn a_sparkplug_source_names_metrics_and_derives_its_topics() {
        let text = GOOD
            .replace(r#"topic = "plant/line3/+/telemetry", key = "/seq""#, r#"format = "sparkplug-b", group = "line3""#)
            .replace(r#""/temp_c""#, r#""Pump/Temperature""#)
            + "[sparkplug]\ngroup = \"line3\"\n";
        let c = parse(&text).unwrap();
        let p = &c.pipelines[0];
        assert_eq!(p.source.sparkplug, Some(("line3".into(), "+".into())));
        assert_eq!(p.source.topic, "spBv1.0/line3/+/+/#");
        assert_eq!(p.features["temp"], "Pump/Temperature");
        let out = c.sparkplug.unwrap();
        assert_eq!((out.group.as_str(), out.edge_node.as_str()), ("line3", "line3-edge01"));
        // A topic, a key pointer, an id with '/', a [sparkplug] without group: each named.
        let bad = text
            .replace(
                r#"group = "line3" }"#,
                r#"group = "line3", edge_node = "a/b", topic = "x", key = "/seq", rows = "whole" }"#,
            )
            .replace("[sparkplug]\ngroup = \"line3\"\n", "[sparkplug]\nedge_node = \"n\"\n");
        let errs = parse(&bad).unwrap_err().to_string();
        for key in ["source.edge_node", "source.topic", "source.key", "source.rows", "sparkplug.group"] {
            assert!(errs.contains(key), "{key}: {errs}");
        }
    }

    #[test]
    fn a_kepware_source_names_tags_and_takes_the_device_from_them() {
        let text = GOOD
            .replace(
                r#"topic = "plant/line3/+/telemetry", key = "/seq""#,
                r#"topic = "iotgateway", format = "kepware", rows = "last_value""#,
            )
            .replace(r#""/temp_c""#, r#""Motor.Temp""#);
        let c = parse(&text).unwrap();
        let p = &c.pipelines[0];
        assert_eq!((p.source.kepware_device_levels, &p.source.sparkplug), (Some(2), &None));
        let plc = parse(&text.replace(r#"rows = "last_value""#, "device_levels = 3")).unwrap();
        assert_eq!(plc.pipelines[0].source.kepware_device_levels, Some(3), "a PLC's tag groups as the machines");
        assert_eq!(p.features["temp"], "Motor.Temp");
        assert!(p.source.last_value.is_some());
        assert_eq!(c.mqtt.max_payload_bytes, KEPWARE_MAX_PAYLOAD_BYTES, "an agent's publish is large");
        let capped = text.replace("[mqtt]\n", "[mqtt]\nmax_payload_bytes = 100000\n");
        assert_eq!(parse(&capped).unwrap().mqtt.max_payload_bytes, 100_000, "a cap set is kept");
        // The sink's {device} needs no '+' (the device is in the tag id); the key is a tag.
        let keyed = parse(&text.replace(r#"format = "kepware""#, r#"format = "kepware", key = "Counters.Part""#));
        assert_eq!(keyed.unwrap().pipelines[0].source.key.as_deref(), Some("Counters.Part"));
        let bad = text
            .replace(r#"format = "kepware""#, r#"format = "kepware", timestamp = "/t""#)
            .replace(r#""Motor.Temp""#, "7");
        let errs = parse(&bad).unwrap_err().to_string();
        assert!(errs.contains("source.timestamp: not used with format = \"kepware\""), "{errs}");
        assert!(errs.contains("features.temp: expected a tag name"), "{errs}");
        assert!(!errs.contains("sink.topic"), "{errs}");
        let errs = parse(&text.replace(r#"rows = "last_value""#, "device_levels = 0")).unwrap_err().to_string();
        assert!(errs.contains("source.device_levels: expected an integer in 1..=16, found 0"), "{errs}");
        let errs = parse(&GOOD.replace(r#"key = "/seq""#, r#"key = "/seq", device_levels = 3"#)).unwrap_err();
        assert!(errs.to_string().contains("source.device_levels: only used with format = \"kepware\""), "{errs}");
        let errs = parse(&text.replace("kepware", "opc")).unwrap_err().to_string();
        assert!(errs.contains(r#"expected "json", "sparkplug-b" or "kepware", found "opc""#), "{errs}");
    }

    #[test]
    fn silent_after_s_watches_for_devices_that_go_quiet() {
        let source = r#"topic = "plant/line3/+/telemetry", key = "/seq""#;
        assert_eq!(parse(GOOD).unwrap().pipelines[0].source.silent_after, None, "off unless set");
        let c = parse(&GOOD.replace(source, &format!("{source}, silent_after_s = 300"))).unwrap();
        assert_eq!(c.pipelines[0].source.silent_after, Some(std::time::Duration::from_secs(300)));
        let errs = parse(&GOOD.replace(source, &format!("{source}, silent_after_s = 0"))).unwrap_err().to_string();
        assert!(errs.contains("source.silent_after_s: expected an integer in 1..=2592000, found 0"), "{errs}");
    }

    #[test]
    fn a_source_that_reports_by_exception_keeps_last_values_and_says_how_long() {
        let source = r#"topic = "plant/line3/+/telemetry", key = "/seq""#;
        let with = |extra: &str| GOOD.replace(source, &format!("{source}, {extra}"));
        assert_eq!(parse(GOOD).unwrap().pipelines[0].source.last_value, None, "whole rows by default");
        let c = parse(&with(r#"rows = "last_value""#)).unwrap();
        assert_eq!(c.pipelines[0].source.last_value, Some(LastValueConfig { max_age: None }));
        let c = parse(&with(r#"rows = "last_value", max_age_s = 300"#)).unwrap();
        assert_eq!(c.pipelines[0].source.last_value.unwrap().max_age, Some(std::time::Duration::from_secs(300)));
        for (extra, error) in [
            (r#"rows = "changes""#, r#"source.rows: expected "whole" or "last_value", found "changes""#),
            ("max_age_s = 300", r#"source.max_age_s: only used with rows = "last_value""#),
            (r#"rows = "last_value", max_age_s = 0"#, "source.max_age_s: expected an integer in 1..=2592000, found 0"),
        ] {
            let errs = parse(&with(extra)).unwrap_err().to_string();
            assert!(errs.contains(error), "{extra}: {errs}");
        }
    }

    #[test]
    fn a_complete_config_parses_with_defaults_filled_in() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node, "line3-edge01");
        assert_eq!(c.mqtt.url, BrokerUrl::Tcp { host: "127.0.0.1".into(), port: 1884, tls: false });
        assert_eq!(c.mqtt.max_payload_bytes, 65_536);
        let p = &c.pipelines[0];
        assert_eq!(p.model, ModelRef::Name("pump-anomaly".into()));
        assert_eq!(p.batch.max, 32);
        assert_eq!(p.batch.wait_us, 0);
        assert_eq!(p.features["temp"], "/temp_c");
        assert_eq!(p.source.key.as_deref(), Some("/seq"));
        assert_eq!(c.client_id(), "lathe-line3-edge01");
    }

    #[test]
    fn every_error_is_reported_at_once_with_its_key() {
        let text = GOOD
            .replace("node = \"line3-edge01\"", "node = 7\nnodee = \"x\"")
            .replace("max = 32", "max = \"lots\"")
            .replace("url = \"mqtt://127.0.0.1:1884\"", "url = \"http://x\"");
        let errs = parse(&text).unwrap_err();
        let keys: Vec<_> = errs.errors.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"node"), "{errs}");
        assert!(keys.contains(&"nodee"), "{errs}");
        assert!(keys.contains(&"pipeline[0].batch.max"), "{errs}");
        assert!(keys.contains(&"mqtt.url"), "{errs}");
        let text = errs.to_string();
        assert!(text.contains("/etc/lathe/lathe.toml: nodee: unknown key"), "{text}");
        assert!(text.contains("expected an integer"), "{text}");
    }

    #[test]
    fn device_placeholder_needs_a_wildcard_in_the_source_topic() {
        let errs = parse(&GOOD.replace("plant/line3/+/telemetry", "plant/line3/a/telemetry")).unwrap_err();
        assert_eq!(errs.errors[0].key, "pipeline[0].sink.topic");
    }

    #[test]
    fn features_must_be_json_pointers() {
        let errs = parse(&GOOD.replace("\"/temp_c\"", "\"temp_c\"")).unwrap_err();
        assert_eq!(errs.errors[0].key, "pipeline[0].features.temp");
        assert!(errs.errors[0].message.contains("JSON pointer"));
    }

    #[test]
    fn broker_urls_parse() {
        assert_eq!(parse_url("embedded"), Ok(BrokerUrl::Embedded));
        assert_eq!(parse_url("mqtt://broker"), Ok(BrokerUrl::Tcp { host: "broker".into(), port: 1883, tls: false }));
        assert_eq!(parse_url("mqtts://b:1"), Ok(BrokerUrl::Tcp { host: "b".into(), port: 1, tls: true }));
        assert!(parse_url("mqtt://b:notaport").is_err());
        assert!(parse_url("broker:1883").is_err());
    }

    #[test]
    fn a_bundle_path_is_resolved_relative_to_the_config_file() {
        // Whether it exists is `service::load_config`'s to check: parsing reads no file.
        let c = parse(&GOOD.replace("\"pump-anomaly\"", "\"models/pump-1.lathe\"")).unwrap();
        assert_eq!(c.pipelines[0].model, ModelRef::File("/etc/lathe/models/pump-1.lathe".into()));
    }

    #[test]
    fn an_update_section_needs_trusted_keys_or_a_root_and_a_root_train_is_refused() {
        let errs = parse(&format!("{GOOD}\n[update]\nserver = \"x\"\n")).unwrap_err().to_string();
        assert!(errs.contains("update.trusted_keys: expected at least one public key"), "{errs}");
        assert!(errs.contains("update.server: unknown key"), "{errs}");
        let errs = parse(&format!("{GOOD}\n[train]\nbackend = \"cpu\"\n")).unwrap_err();
        assert!(errs.errors[0].message.contains("[pipeline.train]"), "{errs}");
        // A root document instead of keys, not both (what the files hold: `service::load_config`).
        let errs = parse(&format!("{GOOD}\n[update]\nroot = \"root.json\"\ntrusted_keys = [\"k.pub\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(errs.contains("either trusted_keys or root"), "{errs}");
    }

    #[test]
    fn the_training_loop_section_parses_and_names_bad_triggers() {
        let text = format!(
            "{GOOD}[pipeline.train]\ntrigger = [\"drift\", \"every 6h\", \"labels 500\"]\nhours = \"22:00-04:00\"\nepochs = 5\n"
        );
        let c = parse(&text).unwrap();
        let t = c.pipelines[0].train.as_ref().unwrap();
        assert_eq!(
            t.triggers,
            vec![Trigger::Drift, Trigger::Every(std::time::Duration::from_secs(21_600)), Trigger::Labels(500)]
        );
        assert_eq!(t.hours, Some(Hours { from: 22 * 60, to: 4 * 60, local: false }));
        // An empty section: every setting at its default, the drift trigger among them.
        let defaults = parse(&format!("{GOOD}[pipeline.train]\n")).unwrap();
        assert_eq!(defaults.pipelines[0].train.as_ref().unwrap().triggers, vec![Trigger::Drift]);
        let local = parse(&text.replace("22:00-04:00", "01:30-05:00 local")).unwrap();
        let hours = local.pipelines[0].train.as_ref().unwrap().hours;
        assert_eq!(hours, Some(Hours { from: 90, to: 300, local: true }));
        assert_eq!(t.overrides.epochs, Some(5));
        assert_eq!(t.trial, std::time::Duration::from_secs(600));
        assert_eq!(c.store.path, Path::new("/var/lib/lathe/samples.redb"));
        let bad = format!("{GOOD}[pipeline.train]\ntrigger = [\"when it rains\"]\nhours = \"late\"\n");
        let errs = parse(&bad).unwrap_err();
        let keys: Vec<&str> = errs.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["pipeline[0].train.trigger[0]", "pipeline[0].train.hours"], "{errs}");
        // A duration past ten years is a typo, refused here rather than overflowing a timer.
        let long = format!("{GOOD}[pipeline.train]\ntrial = \"200000000000000d\"\ntrigger = [\"every 99999d\"]\n");
        let errs = parse(&long).unwrap_err();
        let keys: Vec<&str> = errs.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["pipeline[0].train.trigger[0]", "pipeline[0].train.trial"], "{errs}");
        assert!(errs.errors[1].message.contains("at most 3650d"), "{errs}");
    }

    #[test]
    fn execution_providers_need_the_ort_engine_and_known_names() {
        let text = GOOD.replace(
            "[[pipeline]]",
            "[infer]\nproviders = [\"cuda\", \"npu\"]\nproviders_policy = \"sometimes\"\n[[pipeline]]",
        );
        let errs = parse(&text).err().unwrap();
        let keys: Vec<&str> = errs.errors.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"infer.providers[1]"), "{errs}");
        assert!(keys.contains(&"infer.providers_policy"), "{errs}");
        assert!(keys.contains(&"infer.providers"), "providers without engine = \"ort\": {errs}");
    }

    /// MQTT 5 first, 3.1.1 when a broker refuses it, unless one is named; the embedded broker
    /// speaks only 5.
    #[test]
    fn the_mqtt_protocol_is_auto_unless_named() {
        use rumqttc::v5::WireProtocol;
        assert_eq!(parse(GOOD).unwrap().mqtt.protocol, WireProtocol::Auto);
        let with = |p: &str| {
            GOOD.replace("url = \"mqtt://127.0.0.1:1884\"", &format!("url = \"mqtt://127.0.0.1:1884\"\nprotocol = {p}"))
        };
        assert_eq!(parse(&with("\"3.1.1\"")).unwrap().mqtt.protocol, WireProtocol::V311);
        assert_eq!(parse(&with("\"5\"")).unwrap().mqtt.protocol, WireProtocol::V5);
        let errs = parse(&with("\"3.1\"")).unwrap_err();
        assert!(
            errs.to_string().contains("mqtt.protocol: expected \"auto\", \"5\" or \"3.1.1\", found \"3.1\""),
            "{errs}"
        );
        let errs = parse(&with("5")).unwrap_err();
        assert!(errs.to_string().contains("mqtt.protocol"), "{errs}");
        let embedded = with("\"3.1.1\"").replace("url = \"mqtt://127.0.0.1:1884\"", "url = \"embedded\"");
        assert!(parse(&embedded).unwrap_err().to_string().contains("the embedded broker speaks MQTT 5"));
    }

    /// Nagle's algorithm stays on towards an external broker unless asked (a broker crash
    /// loses less), and is off towards the embedded one.
    #[test]
    fn tcp_nodelay_is_on_only_for_the_embedded_broker_unless_set() {
        assert!(!parse(GOOD).unwrap().mqtt.tcp_nodelay);
        let on = GOOD.replace("url = \"mqtt://127.0.0.1:1884\"", "url = \"mqtt://127.0.0.1:1884\"\ntcp_nodelay = true");
        assert!(parse(&on).unwrap().mqtt.tcp_nodelay);
        let embedded = GOOD.replace("url = \"mqtt://127.0.0.1:1884\"", "url = \"embedded\"");
        assert!(parse(&embedded).unwrap().mqtt.tcp_nodelay);
    }

    #[test]
    fn drift_and_labels_and_metrics_are_read_and_checked() {
        let text = GOOD.replace("[[pipeline]]", "[metrics]\nlisten = \"127.0.0.1:9464\"\n[[pipeline]]")
            + "labels = { topic = \"plant/line3/+/inspection\", key = \"/seq\", value = \"/failed\" }\n"
            + "[pipeline.drift]\nwindow = 300\nstatistic = \"psi\"\nthresholds = { temp = 0.2 }\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        let d = c.pipelines[0].drift.as_ref().unwrap();
        assert_eq!((d.window, d.statistic), (300, crate::monitor::Statistic::Psi));
        assert_eq!(d.thresholds["temp"], 0.2);
        assert_eq!(c.pipelines[0].labels.as_ref().unwrap().value, "/failed");
        assert_eq!(d.rebase_rows, 1200, "four windows unless set");
        let bad = GOOD.to_string() + "[pipeline.drift]\nwindow = 5\nstatistic = \"t-test\"\n";
        let errs = parse(&bad).err().unwrap();
        let keys: Vec<&str> = errs.errors.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"pipeline[0].drift.window") && keys.contains(&"pipeline[0].drift.statistic"), "{errs}");
        let short = GOOD.to_string() + "[pipeline.drift]\nwindow = 300\nrebase_rows = 100\n";
        let errs = parse(&short).err().unwrap();
        assert_eq!(errs.errors[0].key, "pipeline[0].drift.rebase_rows", "{errs}");
        let never = GOOD.to_string() + "[pipeline.drift]\nrebase_rows = 0\n";
        assert_eq!(parse(&never).unwrap().pipelines[0].drift.as_ref().unwrap().rebase_rows, 0);
        let off = GOOD.to_string() + "[pipeline.drift]\nenabled = false\n";
        assert!(parse(&off).unwrap().pipelines[0].drift.is_none());
    }
}
