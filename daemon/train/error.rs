//! Why a fine-tune did not reach the gate. A run the gate refuses is not an error: its record
//! says why.

use super::backend::BackendError;
use crate::model::csv::CsvError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The bundle cannot be fine-tuned as its `[training]` says: no trainable tail, a loss
    /// that does not fit its output, an unknown optimizer, a frozen part that will not run.
    #[error("{0}")]
    Model(String),
    /// The rows: a CSV that does not read, too few rows to train, stop and judge on.
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Csv(#[from] CsvError),
    /// No backend to run on: `cuda` asked for where CUDA cannot run.
    #[error("{0}")]
    NoBackend(String),
    /// A backend operation failed during the run.
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// The run's own check stopped it: the daemon stopping, or its time or memory limit.
    #[error("{0}")]
    Stopped(String),
    /// The champion or the challenger could not be measured for the gate, or the challenger
    /// could not be made into a bundle.
    #[error("{0}")]
    Gate(String),
    /// A dependency panicked inside the run (cudarc asserts, tract): that run fails, not the
    /// daemon.
    #[error("the training run panicked: {0}")]
    Panicked(String),
}
