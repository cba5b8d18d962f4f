//! `[sparkplug]`: lathe as an edge node of its own. Parsed by `config`.

/// lathe as a Sparkplug B edge node: its models in the NBIRTH, predictions as DDATA.
#[derive(Debug, Clone, PartialEq)]
pub struct SparkplugOutputConfig {
    pub group: String,
    /// Default: the node name.
    pub edge_node: String,
}
