//! Errors of the training crate: every one names the file, line, field or step it is about.

use std::path::PathBuf;
use tensor_peft_models::ModelError;

/// What went wrong while preparing data, training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A data row is malformed (wrong JSON, missing field, unknown label, …).
    #[error("{path}:{line}: {reason}")]
    Row {
        /// The data file.
        path: PathBuf,
        /// 1-based line number (for CSV/TSV: the record's line).
        line: usize,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// A data file as a whole is unusable (unknown format, empty, unreadable).
    #[error("{path}: {reason}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A training option is invalid or inconsistent.
    #[error("invalid option `{option}`: {reason}")]
    Option {
        /// The option (flag or config key).
        option: &'static str,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// A data-parallel worker could not start or failed during a step.
    #[error("data-parallel training: {0}")]
    Device(String),
    /// Loading or adapting the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The loss became NaN or infinite.
    #[error(
        "the training loss is not finite ({loss}) at step {step}; training stopped, the last good checkpoint is kept (lower --lr or enable --max-grad-norm)"
    )]
    NonFiniteLoss {
        /// Optimizer step (1-based) whose batch produced the loss.
        step: usize,
        /// The loss value.
        loss: f64,
    },
    /// A checkpoint directory is incomplete or belongs to another run.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl TrainError {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| TrainError::Io { path, source }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
