#![warn(missing_docs)]
//! Models for tensor-peft: architecture descriptions ([`arch::ArchSpec`]: presets, `config.json`,
//! GGUF, module names and shapes, parameter counts), checkpoint reading ([`weights`], [`gguf`]),
//! tokenizers and chat templates ([`tokenizer`]), sampling ([`sampling`]), the LLaMA decoder
//! ([`llama::Llama`]) and the BERT-family encoder ([`bert::Bert`]; DeBERTa's disentangled
//! attention in [`deberta`]; the block-wise view of their forward in [`stack`]), whose projections accept any adapter method by module name. Each family lists its projections once, in a layout table ([`layout`]);
//! named tensors are read and written in one place ([`tensor_io`]).

pub mod adapter_file;
pub mod adapter_set;
pub mod arch;
pub mod bert;
pub mod deberta;
pub mod error;
pub mod export;
pub mod gguf;
pub mod heads;
pub mod inject;
pub mod layout;
pub mod llama;
pub mod precision;
pub mod sampling;
pub mod stack;
pub mod tensor_io;
pub mod tokenizer;
pub mod weights;

pub use adapter_set::{Combination, MultiAdapterModel, put_adapters, strip_adapters, take_adapters};
pub use arch::{ArchSpec, Family};
pub use bert::Bert;
pub use error::ModelError;
pub use heads::{HEAD_INIT_STD, SequenceClassifier};
pub use inject::{AdapterSlots, ResidualPosition, Targets, inject, update_ratios, zero_init_factors};
pub use llama::Llama;
pub use precision::BaseDType;
pub use stack::{BlockStack, StackInput};

/// The fused ops the blocks call (from `tensor-peft-kernels`).
pub use tensor_peft_kernels::fused;
/// A LLaMA-family model's rotary embedding (base θ and scaling), from `tensor-peft-kernels`.
pub use tensor_peft_kernels::rope::{RopeConfig, RopeScaling};
pub use weights::Weights;
