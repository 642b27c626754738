#![warn(missing_docs)]
//! tensor-peft: tensorized parameter-efficient fine-tuning on Burn.
//!
//! This root crate re-exports the workspace crates: the adapters ([`adapters`]), the models they
//! are injected into ([`models`]), fine-tuning, evaluation and generation ([`training`]) and the
//! fused kernels and the run's seeded generator ([`kernels`], [`kernels::rng`]). The
//! `tpeft` command-line application lives in `src/bin/tpeft/`; only the counting allocator
//! ([`allocator`]) stays here, because the CLI's tests and the examples install it too.

pub mod allocator;

pub use tensor_peft_adapters as adapters;
pub use tensor_peft_kernels as kernels;
pub use tensor_peft_models as models;
pub use tensor_peft_training as training;
