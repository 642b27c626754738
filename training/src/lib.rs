#![warn(missing_docs)]
//! Fine-tuning with tensor-peft adapters on burn-train: tasks ([`task`]), data ([`data`]),
//! metrics ([`metrics`]), preference optimisation ([`dpo`]), the causal-LM loss fused with the output head ([`loss`]), the optimizer and schedule ([`optim`]), exact-resume checkpoints
//! ([`checkpoint`]), the run configuration ([`config`]), the data loader ([`loader`]), the
//! burn-train strategy ([`strategy`]), gradient checkpointing ([`recompute`]), `finetune` ([`trainer`]), evaluation of saved adapters
//! ([`eval`]), text generation with a saved adapter ([`mod@generate`]), several adapters on one base
//! and their weighted combinations ([`multi_adapter`]) and training curves ([`plot`]).

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dpo;
pub mod error;
pub mod eval;
pub mod generate;
pub mod loader;
pub mod loss;
pub mod metrics;
pub mod multi_adapter;
pub mod optim;
mod parallel;
pub mod plan;
pub mod plot;
pub mod recompute;
pub mod strategy;
pub mod task;
pub mod trainer;

pub use config::{HeadKind, TrainConfig};
pub use data::TaskKind;
pub use error::{Result, TrainError};
pub use generate::{GenerateOptions, generate};
pub use multi_adapter::AdapterSelection;
pub use trainer::{FinetuneReport, finetune, finetune_on};
