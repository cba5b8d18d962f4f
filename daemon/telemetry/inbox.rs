//! The closed loop's inbox, here below the stages that write to it (drift alarms from the
//! pipelines, `cmd/+` from ingest, pushed bundles from the updater) so none of them reaches up
//! into the service for it.

use serde_json::Value;

use super::events::DriftTrigger;
use crate::model::Bundle;

/// What wakes the loop between its ticks. One channel for both, so a drift alarm is taken
/// at once: the rows counted "since the alarm" must start at the alarm, not a tick later
/// (CI streamed a whole test's rows in that tick and the run waited for rows never sent).
pub enum LoopMessage {
    /// A drift alarm on a series (of the model version serving) of a pipeline was raised, or
    /// has ended; the change is estimated to have begun `since_change` rows before it.
    Drift(DriftTrigger),
    /// A `lathe/{node}/cmd/{action}` message.
    Command { action: String, payload: Vec<u8> },
    /// A pushed bundle that passed every check (`update::device`): promote it onto trial.
    Pushed { model: String, bundle: Box<Bundle>, record: Value },
}
