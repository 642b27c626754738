#![warn(missing_docs)]
//! tensor-peft: tensorized parameter-efficient fine-tuning on Burn.
//!
//! This root crate re-exports the workspace crates and holds what the `tpeft` CLI needs:
//! backend selection ([`backend`]), the parameter report ([`params`]), the demo ([`demo`]) and the
//! micro-benchmarks ([`mod@bench`]).

pub mod allocator;
pub mod backend;
pub mod bench;
pub mod compare;
pub mod demo;
pub mod embed;
pub mod finetune;
pub mod generate;
pub mod merge;
pub mod params;

pub use tensor_peft_adapters as adapters;
pub use tensor_peft_models as models;
pub use tensor_peft_training as training;

/// A CLI-level error: usage errors (bad flags) exit with 2, runtime errors with 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line asks for something impossible (bad flag value, backend not compiled in).
    #[error("{0}")]
    Usage(String),
    /// The command failed while running (unreadable file, invalid model config).
    #[error("{0}")]
    Runtime(String),
}

impl CliError {
    /// Process exit code: 2 for usage errors, 1 for runtime errors.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }
}
