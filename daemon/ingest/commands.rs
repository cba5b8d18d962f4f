//! `lathe/{node}/cmd/{action}`: commands to the node, taken on ingest's session and handed to
//! the status task (`status`) or the training loop (`train`, `rollback`, …).

use std::sync::Arc;

use crate::mqtt::TopicFilter;
use crate::telemetry::events::{Event, Events};
use crate::telemetry::inbox::LoopMessage;

/// The largest `lathe/{node}/cmd/+` payload taken.
const MAX_COMMAND_BYTES: usize = 4096;

/// `lathe/{node}/cmd/+` and where its messages go.
pub struct CommandRoute {
    pub filter: TopicFilter,
    /// The training loop, where one runs: `train`, `rollback` and anything else go there
    /// (it answers each on the events topic).
    pub to_loop: Option<std::sync::mpsc::Sender<LoopMessage>>,
    /// `status`: wakes the status task, which publishes a fresh status at once.
    pub status_now: Arc<tokio::sync::Notify>,
}

impl CommandRoute {
    /// Hands on one command. Without a training loop, `train` and `rollback` are refused on
    /// the events topic, once per pipeline (`pipelines`), rather than going unanswered.
    pub fn deliver<'a>(&self, action: &str, payload: &[u8], pipelines: impl Iterator<Item = &'a str>, events: &Events) {
        // A command is a pipeline's name at most; the loop's queue is not for megabytes.
        if payload.len() > MAX_COMMAND_BYTES {
            tracing::warn!(action, bytes = payload.len(), "Command ignored: over {MAX_COMMAND_BYTES} bytes");
            return;
        }
        match (action, &self.to_loop) {
            ("status", _) => self.status_now.notify_one(),
            (_, Some(tx)) => {
                let (action, payload) = (action.to_string(), payload.to_vec());
                let _ = tx.send(LoopMessage::Command { action, payload });
            }
            (_, None) => {
                for pipeline in pipelines {
                    events.emit(Event::Step {
                        pipeline: pipeline.to_string(),
                        step: "command.refused",
                        message: format!(
                            "{action:?}: no pipeline on this node has [pipeline.train], and [update] is off"
                        ),
                        detail: serde_json::json!({"command": action}),
                    });
                }
            }
        }
    }
}
