//! Fine-tuning with tensor-peft adapters on burn-train: tasks ([`task`]), data ([`data`]),
//! metrics ([`metrics`]), the optimizer and schedule ([`optim`]), exact-resume checkpoints
//! ([`checkpoint`]), the training loop and `finetune` ([`trainer`]), evaluation of saved adapters
//! ([`eval`]) and training curves ([`plot`]).

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod task;
pub mod trainer;

pub use data::TaskKind;
pub use error::{Result, TrainError};
pub use trainer::{FinetuneReport, TrainConfig, finetune};
