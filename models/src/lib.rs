//! Models for tensor-peft. This crate currently holds the architecture descriptions
//! ([`arch::ArchSpec`]): presets from published HF `config.json` values, `config.json` parsing,
//! module names and shapes, and base parameter counts — everything needed to place and count
//! adapters without allocating a model. The LLaMA and BERT implementations that load real
//! checkpoints come with the models issue.

pub mod arch;
pub mod error;

pub use arch::{ArchSpec, Family};
pub use error::ModelError;
