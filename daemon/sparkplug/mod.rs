//! Sparkplug B (Eclipse Sparkplug 3.0): reading plant data the way factories publish it, and
//! (`output.rs`) appearing as an edge node of our own.
//!
//! Topics are `spBv1.0/{group}/{NBIRTH|NDATA|NDEATH|DBIRTH|DDATA|DDEATH|NCMD|DCMD}/{edge_node}[/{device}]`.
//! A BIRTH names every metric (with its alias and current value); DATA sends only what
//! changed, often by alias alone. So a source keeps, per edge node and device, the alias table
//! and the last value of every metric, and a row is a device's values after a DATA message.
//!
//! State rules (spec §7, "Sequence numbers" and "Rebirth"): every message of an edge node
//! carries `seq`, 0–255, one more than the last. DATA before a BIRTH, a sequence gap or an
//! unknown alias leaves the node's state in doubt: it is marked stale, its data is not scored
//! (rejected as `sparkplug_stale`) and a rebirth is asked for with `NCMD` `Node Control/Rebirth`
//! (at most every `REBIRTH_EVERY`). The NBIRTH that answers makes it fresh again. A DEATH marks
//! the node or device offline.

pub mod config;
pub mod output;
pub mod proto;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prost::Message;
use serde_json::{json, Value};

/// A rebirth is asked of one edge node at most this often.
const REBIRTH_EVERY: Duration = Duration::from_secs(5);
/// Edge nodes and devices one source keeps state for (a flood of made-up ids stops here).
const MAX_NODES: usize = 10_000;
const MAX_DEVICES_PER_NODE: usize = 10_000;
/// The metric an NBIRTH and NDEATH carry to pair a death with its birth.
pub const BD_SEQ: &str = "bdSeq";
pub const REBIRTH: &str = "Node Control/Rebirth";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NBirth,
    NDeath,
    DBirth,
    DDeath,
    NData,
    DData,
    NCmd,
    DCmd,
}

/// A Sparkplug topic, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic<'a> {
    pub group: &'a str,
    pub kind: Kind,
    pub edge_node: &'a str,
    pub device: Option<&'a str>,
}

pub fn parse_topic(topic: &str) -> Option<Topic<'_>> {
    let mut parts = topic.split('/');
    if parts.next()? != "spBv1.0" {
        return None;
    }
    let group = parts.next()?;
    let kind = match parts.next()? {
        "NBIRTH" => Kind::NBirth,
        "NDEATH" => Kind::NDeath,
        "DBIRTH" => Kind::DBirth,
        "DDEATH" => Kind::DDeath,
        "NDATA" => Kind::NData,
        "DDATA" => Kind::DData,
        "NCMD" => Kind::NCmd,
        "DCMD" => Kind::DCmd,
        _ => return None,
    };
    let edge_node = parts.next()?;
    let device = parts.next();
    let device_kind = matches!(kind, Kind::DBirth | Kind::DDeath | Kind::DData | Kind::DCmd);
    if parts.next().is_some() || device.is_some() != device_kind {
        return None;
    }
    Some(Topic { group, kind, edge_node, device })
}

/// What one message amounts to for a pipeline.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// A DATA message was applied: score the device's values now.
    Row { device: String, key: u64, ts: u64 },
    /// A BIRTH, a DEATH or a command: state only.
    State,
    /// Not scored: the node's state is in doubt (why), and a rebirth is asked of `rebirth`
    /// unless one was asked for lately.
    Stale { why: String, rebirth: Option<String> },
    /// Not a Sparkplug B payload.
    Invalid(String),
}

#[derive(Default)]
struct Metrics {
    aliases: HashMap<u64, String>,
    /// Every metric name the BIRTH declared.
    names: std::collections::HashSet<String>,
    /// Each metric's data type from the BIRTH: DATA messages may leave it out.
    types: HashMap<String, u32>,
    values: HashMap<String, f64>,
}

impl Metrics {
    /// A BIRTH: every metric by name, its alias, its current value.
    fn birth(payload: &proto::Payload) -> Metrics {
        let mut m = Metrics::default();
        for metric in &payload.metrics {
            let Some(name) = &metric.name else { continue };
            m.names.insert(name.clone());
            if let Some(alias) = metric.alias {
                m.aliases.insert(alias, name.clone());
            }
            if let Some(dt) = metric.datatype {
                m.types.insert(name.clone(), dt);
            }
            if let Some(v) = metric.number() {
                m.values.insert(name.clone(), v);
            }
        }
        m
    }

    /// A DATA message: applies each metric by its alias where it has one, else by name.
    /// Returns which metric the BIRTH did not declare, if any (nothing is applied then).
    ///
    /// The alias decides: an edge-node library that sends the alias *and* a bare name (`f1`
    /// for the birth's `DATA/f1`) names a metric the birth never declared, and read by name
    /// its values went nowhere while the model was served the birth's value for ever.
    fn apply(&mut self, payload: &proto::Payload) -> Result<(), String> {
        let mut updates = Vec::with_capacity(payload.metrics.len());
        for metric in &payload.metrics {
            let name = match (metric.alias, &metric.name) {
                (Some(a), name) => match self.aliases.get(&a) {
                    Some(n) => n.clone(),
                    None => {
                        let named = name.as_ref().map(|n| format!(" (named {n:?})")).unwrap_or_default();
                        return Err(format!("unknown alias {a}{named}"));
                    }
                },
                (None, Some(n)) if self.names.contains(n) => n.clone(),
                (None, Some(n)) => return Err(format!("metric {n:?} is not in the BIRTH")),
                (None, None) => continue,
            };
            let dt = metric.datatype.or_else(|| self.types.get(&name).copied()).unwrap_or(0);
            updates.push((name, metric.number_as(dt)));
        }
        for (name, value) in updates {
            match value {
                Some(v) => self.values.insert(name, v),
                None => self.values.remove(&name),
            };
        }
        Ok(())
    }
}

#[derive(Default)]
struct Device {
    metrics: Metrics,
    online: bool,
}

#[derive(Default)]
struct Node {
    /// The last `seq` seen; `None` before the NBIRTH.
    seq: Option<u8>,
    bd_seq: Option<u64>,
    online: bool,
    /// Set by a gap, DATA before BIRTH or an unknown alias; cleared by the next NBIRTH.
    stale: Option<String>,
    metrics: Metrics,
    devices: HashMap<String, Device>,
    rebirth_asked: Option<Instant>,
}

/// One pipeline's view of a Sparkplug namespace: `group` and `edge_node` may be `+`.
pub struct Source {
    group: String,
    edge_node: String,
    nodes: HashMap<String, Node>,
    pub rebirths_requested: u64,
    pub sequence_gaps: u64,
    /// lathe's own edge node (group, name), never read.
    own: Option<(String, String)>,
}

impl Source {
    pub fn new(group: &str, edge_node: &str) -> Source {
        Source {
            group: group.into(),
            edge_node: edge_node.into(),
            nodes: HashMap::new(),
            rebirths_requested: 0,
            sequence_gaps: 0,
            own: None,
        }
    }

    /// Leaves out lathe's own edge node (`[sparkplug] group, edge_node`), which a source
    /// taking every edge node of its group would otherwise read: its predictions taken for
    /// input, a `missing_feature` for each, and rebirth requests sent to itself.
    #[must_use]
    pub fn ignoring(mut self, own: Option<(&str, &str)>) -> Source {
        self.own = own.map(|(group, node)| (group.to_string(), node.to_string()));
        self
    }

    /// The MQTT filter that brings this source's messages.
    pub fn filter(group: &str, edge_node: &str) -> String {
        crate::mqtt::topic::sparkplug_filter(group, edge_node)
    }

    fn matches(&self, t: &Topic) -> bool {
        (self.group == "+" || self.group == t.group)
            && (self.edge_node == "+" || self.edge_node == t.edge_node)
            && self.own.as_ref().is_none_or(|(group, node)| group != t.group || node != t.edge_node)
    }

    /// The device id a pipeline sees: the Sparkplug device, prefixed by its edge node when
    /// the source takes every edge node; an edge node's own metrics (NDATA) are the node's.
    fn device_id(&self, edge_node: &str, device: Option<&str>) -> String {
        match (device, self.edge_node == "+") {
            (Some(d), false) => d.to_string(),
            (Some(d), true) => format!("{edge_node}/{d}"),
            (None, _) => edge_node.to_string(),
        }
    }

    /// The names of the metrics the births seen so far declared (at most `n`), as a hint next
    /// to a metric a pipeline did not find.
    pub fn metric_names(&self, n: usize) -> Vec<String> {
        let mut names = std::collections::BTreeSet::new();
        for node in self.nodes.values() {
            for m in std::iter::once(&node.metrics).chain(node.devices.values().map(|d| &d.metrics)) {
                names.extend(m.aliases.values().chain(m.types.keys()).chain(m.values.keys()).cloned());
            }
        }
        names.into_iter().take(n).collect()
    }

    /// A metric's current value for the device a `Row` named.
    pub fn value(&self, topic: &Topic, metric: &str) -> Option<f64> {
        let node = self.nodes.get(topic.edge_node)?;
        match topic.device {
            Some(d) => node.devices.get(d)?.metrics.values.get(metric).copied(),
            None => node.metrics.values.get(metric).copied(),
        }
    }

    /// Applies one message (`topic` already parsed and matched by the caller's filter).
    pub fn handle(&mut self, topic: &Topic, payload: &[u8]) -> Outcome {
        if !self.matches(topic) || matches!(topic.kind, Kind::NCmd | Kind::DCmd) {
            return Outcome::State;
        }
        let payload = match proto::Payload::decode(payload) {
            Ok(p) => p,
            Err(e) => return Outcome::Invalid(format!("not a Sparkplug B payload: {e}")),
        };
        if !self.nodes.contains_key(topic.edge_node) && self.nodes.len() >= MAX_NODES {
            return Outcome::Invalid(format!("more than {MAX_NODES} edge nodes; {} ignored", topic.edge_node));
        }
        let node = self.nodes.entry(topic.edge_node.to_string()).or_default();
        if topic.kind == Kind::NBirth {
            *node = Node {
                seq: Some(payload.seq.unwrap_or(0) as u8),
                bd_seq: bd_seq(&payload),
                online: true,
                stale: None,
                metrics: Metrics::birth(&payload),
                // Devices are born again after their node.
                devices: HashMap::new(),
                rebirth_asked: None,
            };
            return Outcome::State;
        }
        if topic.kind == Kind::NDeath {
            // A death from an older session (its bdSeq) is not this session's.
            if node.bd_seq.is_none() || bd_seq(&payload).is_none() || node.bd_seq == bd_seq(&payload) {
                node.online = false;
                node.seq = None;
                for d in node.devices.values_mut() {
                    d.online = false;
                }
            }
            return Outcome::State;
        }
        // Everything else is sequenced and needs the node's birth.
        let problem = match (node.seq, payload.seq) {
            (None, _) => Some("data before the edge node's NBIRTH".to_string()),
            (Some(last), Some(seq)) if seq != u64::from(last.wrapping_add(1)) => {
                self.sequence_gaps += 1;
                Some(format!("sequence gap: seq {seq} after {last}"))
            }
            (Some(_), None) => Some("a message without seq".to_string()),
            _ => None,
        };
        if let Some(seq) = payload.seq {
            if node.seq.is_some() {
                node.seq = Some(seq as u8);
            }
        }
        if let Some(why) = problem {
            node.stale.get_or_insert(why); // the first cause is the one to report
        }
        let problem = match topic.kind {
            Kind::DBirth => {
                let d = topic.device.unwrap_or_default();
                if node.devices.len() >= MAX_DEVICES_PER_NODE && !node.devices.contains_key(d) {
                    return Outcome::Invalid(format!(
                        "more than {MAX_DEVICES_PER_NODE} devices on {}",
                        topic.edge_node
                    ));
                }
                node.devices.insert(d.to_string(), Device { metrics: Metrics::birth(&payload), online: true });
                None
            }
            Kind::DDeath => {
                if let Some(d) = node.devices.get_mut(topic.device.unwrap_or_default()) {
                    d.online = false;
                }
                None
            }
            Kind::NData => node.metrics.apply(&payload).err(),
            Kind::DData => match node.devices.get_mut(topic.device.unwrap_or_default()) {
                Some(d) if d.online => d.metrics.apply(&payload).err(),
                _ => Some(format!("data before device {:?}'s DBIRTH", topic.device.unwrap_or_default())),
            },
            _ => None,
        };
        if let Some(why) = problem {
            node.stale.get_or_insert(why); // the first cause is the one to report
        }
        if let Some(why) = node.stale.clone() {
            if !matches!(topic.kind, Kind::NData | Kind::DData) {
                return Outcome::State;
            }
            let due = node.rebirth_asked.is_none_or(|at| at.elapsed() >= REBIRTH_EVERY);
            let rebirth = due.then(|| {
                node.rebirth_asked = Some(Instant::now());
                self.rebirths_requested += 1;
                topic.edge_node.to_string()
            });
            return Outcome::Stale { why, rebirth };
        }
        match topic.kind {
            Kind::NData | Kind::DData => {
                let key = payload.timestamp.unwrap_or(0);
                let ts = payload.metrics.iter().filter_map(|m| m.timestamp).max().unwrap_or(key);
                Outcome::Row { device: self.device_id(topic.edge_node, topic.device), key, ts }
            }
            _ => Outcome::State,
        }
    }

    /// The NCMD that asks `edge_node` of `group` for a rebirth: (topic, payload).
    pub fn rebirth_request(group: &str, edge_node: &str, now_ms: u64) -> (String, Vec<u8>) {
        let payload = proto::Payload {
            timestamp: Some(now_ms),
            metrics: vec![proto::Metric::new(REBIRTH, proto::datatype::BOOLEAN, proto::Value::Boolean(true), now_ms)],
            seq: None,
            uuid: None,
            body: None,
        };
        (format!("spBv1.0/{group}/NCMD/{edge_node}"), payload.encode_to_vec())
    }

    /// For the status: each edge node and device, online, offline or stale (and why).
    pub fn status(&self) -> Value {
        let nodes: serde_json::Map<String, Value> = self
            .nodes
            .iter()
            .map(|(name, n)| {
                let state = |online: bool| match (&n.stale, online) {
                    (Some(_), true) => "stale",
                    (None, true) => "online",
                    (_, false) => "offline",
                };
                let devices: serde_json::Map<String, Value> =
                    n.devices.iter().map(|(d, dev)| (d.clone(), state(n.online && dev.online).into())).collect();
                (name.clone(), json!({"state": state(n.online), "stale_because": n.stale, "devices": devices}))
            })
            .collect();
        json!({"edge_nodes": nodes, "rebirths_requested": self.rebirths_requested, "sequence_gaps": self.sequence_gaps})
    }
}

fn bd_seq(payload: &proto::Payload) -> Option<u64> {
    payload.metrics.iter().find(|m| m.name.as_deref() == Some(BD_SEQ)).and_then(|m| m.number()).map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::proto::{datatype, Metric, Payload, Value as V};
    use super::*;

    fn payload(seq: Option<u64>, metrics: Vec<Metric>) -> Vec<u8> {
        Payload { timestamp: Some(1000), metrics, seq, uuid: None, body: None }.encode_to_vec()
    }

    fn metric(name: Option<&str>, alias: Option<u64>, dt: u32, v: V) -> Metric {
        Metric { alias, name: name.map(String::from), ..Metric::new("", dt, v, 1000) }
    }

    fn topic(s: &str) -> Topic<'_> {
        parse_topic(s).unwrap()
    }

    #[test]
    fn topics_parse_and_malformed_ones_do_not() {
        let t = topic("spBv1.0/plant/DDATA/edge1/pump7");
        assert_eq!((t.group, t.kind, t.edge_node, t.device), ("plant", Kind::DData, "edge1", Some("pump7")));
        assert_eq!(topic("spBv1.0/plant/NBIRTH/edge1").device, None);
        for bad in
            ["spBv1.0/plant/NDATA/edge1/dev", "spBv1.0/plant/DDATA/edge1", "spAv1.0/p/NDATA/e", "spBv1.0/p/XDATA/e"]
        {
            assert!(parse_topic(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn values_are_read_through_aliases_and_kept_between_data_messages() {
        let mut s = Source::new("plant", "edge1");
        let nbirth = payload(Some(0), vec![metric(Some(BD_SEQ), None, datatype::INT64, V::Long(3))]);
        assert_eq!(s.handle(&topic("spBv1.0/plant/NBIRTH/edge1"), &nbirth), Outcome::State);
        let dbirth = payload(
            Some(1),
            vec![
                metric(Some("Pump/Temperature"), Some(1), datatype::FLOAT, V::Float(20.5)),
                metric(Some("Pump/Offset"), Some(2), datatype::INT32, V::Int((-7i32) as u32)),
            ],
        );
        let t = topic("spBv1.0/plant/DBIRTH/edge1/pump7");
        assert_eq!(s.handle(&t, &dbirth), Outcome::State);
        // Only the temperature changes, by alias.
        let ddata = payload(Some(2), vec![metric(None, Some(1), datatype::FLOAT, V::Float(21.25))]);
        let t = topic("spBv1.0/plant/DDATA/edge1/pump7");
        assert_eq!(s.handle(&t, &ddata), Outcome::Row { device: "pump7".into(), key: 1000, ts: 1000 });
        assert_eq!(s.value(&t, "Pump/Temperature"), Some(21.25));
        assert_eq!(s.value(&t, "Pump/Offset"), Some(-7.0));
    }

    /// An edge-node library declares `DATA/f1` with alias 1, then sends DDATA with alias 1
    /// and the bare name `f1`: the alias decides, so the value lands on `DATA/f1`. A name the
    /// birth never declared, sent without an alias, makes the node stale and names the metric.
    #[test]
    fn the_alias_decides_over_a_bare_name_and_an_undeclared_name_makes_the_node_stale() {
        let mut s = Source::new("plant", "edge1");
        s.handle(&topic("spBv1.0/plant/NBIRTH/edge1"), &payload(Some(0), vec![]));
        let dbirth = payload(Some(1), vec![metric(Some("DATA/f1"), Some(1), datatype::DOUBLE, V::Double(5.0))]);
        s.handle(&topic("spBv1.0/plant/DBIRTH/edge1/press"), &dbirth);
        let t = topic("spBv1.0/plant/DDATA/edge1/press");
        let both = payload(Some(2), vec![metric(Some("f1"), Some(1), datatype::DOUBLE, V::Double(42.0))]);
        assert!(matches!(s.handle(&t, &both), Outcome::Row { .. }));
        assert_eq!(s.value(&t, "DATA/f1"), Some(42.0));
        assert_eq!(s.value(&t, "f1"), None);
        let undeclared = payload(Some(3), vec![metric(Some("f2"), None, datatype::DOUBLE, V::Double(1.0))]);
        let Outcome::Stale { why, rebirth } = s.handle(&t, &undeclared) else { panic!() };
        assert!(why.contains("metric \"f2\" is not in the BIRTH"), "{why}");
        assert_eq!(rebirth.as_deref(), Some("edge1"));
    }

    /// A source taking every edge node of the group lathe itself publishes to never reads
    /// lathe's own edge node, nor asks it for a rebirth.
    #[test]
    fn lathes_own_edge_node_is_never_read() {
        let mut s = Source::new("+", "+").ignoring(Some(("plant", "lathe-1")));
        let ddata = payload(Some(3), vec![metric(Some("p/Output/0"), None, datatype::FLOAT, V::Float(0.5))]);
        assert_eq!(s.handle(&topic("spBv1.0/plant/DDATA/lathe-1/press"), &ddata), Outcome::State);
        assert_eq!(s.rebirths_requested, 0);
        assert!(matches!(s.handle(&topic("spBv1.0/plant/DDATA/edge1/press"), &ddata), Outcome::Stale { .. }));
        assert!(matches!(s.handle(&topic("spBv1.0/other/DDATA/lathe-1/press"), &ddata), Outcome::Stale { .. }));
    }

    #[test]
    fn a_gap_data_before_birth_or_an_unknown_alias_make_the_node_stale_until_its_rebirth() {
        let mut s = Source::new("plant", "+");
        let ddata = |seq| payload(Some(seq), vec![metric(None, Some(1), datatype::DOUBLE, V::Double(1.0))]);
        let t = topic("spBv1.0/plant/DDATA/edge1/pump7");
        // Before any birth.
        let Outcome::Stale { why, rebirth } = s.handle(&t, &ddata(5)) else { panic!() };
        assert!(why.contains("before the edge node's NBIRTH"), "{why}");
        assert_eq!(rebirth.as_deref(), Some("edge1"));
        // Asked for lately: not again.
        assert!(matches!(s.handle(&t, &ddata(6)), Outcome::Stale { rebirth: None, .. }));
        // The rebirth.
        s.handle(&topic("spBv1.0/plant/NBIRTH/edge1"), &payload(Some(0), vec![]));
        let dbirth = payload(Some(1), vec![metric(Some("x"), Some(1), datatype::DOUBLE, V::Double(0.0))]);
        s.handle(&topic("spBv1.0/plant/DBIRTH/edge1/pump7"), &dbirth);
        assert!(matches!(s.handle(&t, &ddata(2)), Outcome::Row { ref device, .. } if device == "edge1/pump7"));
        // seq 4 after 2: a gap.
        s.nodes.get_mut("edge1").unwrap().rebirth_asked = None;
        let Outcome::Stale { why, rebirth } = s.handle(&t, &ddata(4)) else { panic!() };
        assert!(why.contains("sequence gap"), "{why}");
        assert!(rebirth.is_some());
        assert_eq!(s.sequence_gaps, 1);
        // Still stale for the next in sequence, until an NBIRTH.
        assert!(matches!(s.handle(&t, &ddata(5)), Outcome::Stale { .. }));
        s.handle(&topic("spBv1.0/plant/NBIRTH/edge1"), &payload(Some(0), vec![]));
        s.handle(&topic("spBv1.0/plant/DBIRTH/edge1/pump7"), &dbirth);
        let unknown = payload(Some(2), vec![metric(None, Some(9), datatype::DOUBLE, V::Double(1.0))]);
        let Outcome::Stale { why, .. } = s.handle(&t, &unknown) else { panic!() };
        assert!(why.contains("unknown alias 9"), "{why}");
        assert_eq!(s.handle(&t, b"\xff\xff\xff"), Outcome::Invalid(s_invalid(b"\xff\xff\xff")));
    }

    fn s_invalid(bytes: &[u8]) -> String {
        format!("not a Sparkplug B payload: {}", Payload::decode(bytes).unwrap_err())
    }

    #[test]
    fn a_death_marks_the_node_and_its_devices_offline() {
        let mut s = Source::new("plant", "edge1");
        let bd = |v| vec![metric(Some(BD_SEQ), None, datatype::INT64, V::Long(v))];
        s.handle(&topic("spBv1.0/plant/NBIRTH/edge1"), &payload(Some(0), bd(4)));
        s.handle(&topic("spBv1.0/plant/DBIRTH/edge1/pump7"), &payload(Some(1), vec![]));
        assert_eq!(s.status()["edge_nodes"]["edge1"]["devices"]["pump7"], "online");
        // An NDEATH of an older session (bdSeq 3) changes nothing.
        s.handle(&topic("spBv1.0/plant/NDEATH/edge1"), &payload(None, bd(3)));
        assert_eq!(s.status()["edge_nodes"]["edge1"]["state"], "online");
        s.handle(&topic("spBv1.0/plant/NDEATH/edge1"), &payload(None, bd(4)));
        assert_eq!(s.status()["edge_nodes"]["edge1"]["state"], "offline");
        assert_eq!(s.status()["edge_nodes"]["edge1"]["devices"]["pump7"], "offline");
    }
}
