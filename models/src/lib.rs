//! Models for tensor-peft: architecture descriptions ([`arch::ArchSpec`]: presets, `config.json`,
//! module names and shapes, parameter counts), HF checkpoint reading ([`weights`]) and the LLaMA
//! decoder ([`llama::Llama`]) whose projections accept any adapter method by module name.

pub mod arch;
pub mod error;
pub mod gguf;
pub mod llama;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use arch::{ArchSpec, Family};
pub use error::ModelError;
pub use llama::Llama;
pub use weights::Weights;
