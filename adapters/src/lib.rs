#![warn(missing_docs)]
//! Tensorized parameter-efficient fine-tuning adapters as generic Burn modules.
//!
//! | method | file | update |
//! |---|---|---|
//! | LoRA | [`lora`] | `s·x·A·B` |
//! | TT-LoRA | [`tt_lora`] | ΔW as a tensor train, `α·x·left·right` |
//! | LoRETTA_rep | [`loretta_rep`] | LoRA with TT-compressed `A` and `B` |
//! | LoRETTA_adp | [`loretta_adp`] | TT bottleneck adapter `h + s·up(act(down(h)))` |
//! | LoTR | [`lotr`] | Tucker-2 `A·G_l·Bᵀ`, `A`, `B` shared |
//! | LoRTA | [`lorta`] | one CP tensor over layers × heads × {q,k,v,o} |
//!
//! Every linear method implements [`LinearDelta`] and is held by models as a [`LinearAdapter`]
//! inside an [`AdaptedLinear`]; factors shared across layers live once in [`SharedFactors`].
//! The tensor-format math is in [`tensor`]; [`MethodConfig`] counts and builds adapters for a
//! model's sites.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::nn::LinearConfig;
//! use burn::tensor::{Distribution, Tensor};
//! use tensor_peft_adapters::{AdaptedLinear, LinearAdapter, LinearDelta, SharedFactors, TtLoraConfig};
//!
//! let device = Default::default();
//! let base = LinearConfig::new(64, 32).init::<NdArray>(&device);
//! let tt = TtLoraConfig::new().with_tt_shape(Some(vec![8, 8, 4, 8])).init(64, 32, &device).unwrap();
//! let layer = AdaptedLinear::new(base, Some(LinearAdapter::TtLora(tt))).unwrap();
//! let x = Tensor::<NdArray, 3>::random([2, 5, 64], Distribution::Default, &device);
//! let shared = SharedFactors::empty();
//! let y = layer.forward(x, &shared); // base(x) + α·(x·A)·B, ΔW never formed
//! assert_eq!(y.dims(), [2, 5, 32]);
//! let merged = layer.merge(&shared).unwrap(); // zero-overhead inference
//! assert!(merged.merged);
//! ```

pub mod adapter;
pub mod error;
pub mod lora;
pub mod loretta_adp;
pub mod loretta_rep;
pub mod lorta;
pub mod lotr;
pub mod method;
pub mod tensor;
pub mod tt_linear;
pub mod tt_lora;

pub use adapter::{
    AdaptedLinear, DeltaInit, LinearAdapter, LinearDelta, LowRankUpdate, ResidualAdapter, SharedFactors,
    prefer_dense_delta,
};
pub use error::{AdapterError, Result};
pub use lora::{Lora, LoraConfig};
pub use loretta_adp::{Activation, LorettaAdp, LorettaAdpConfig};
pub use loretta_rep::{LorettaRep, LorettaRepConfig};
pub use lorta::{AttentionGeometry, AttentionMatrix, Lorta, LortaConfig, LortaShared};
pub use lotr::{Lotr, LotrConfig, LotrShared};
pub use method::{
    AdapterSet, LinearSite, METHOD_NAMES, MethodConfig, ParamReport, ParamRow, ResidualPosition, ResidualSite,
};
pub use tt_linear::TtLinear;
pub use tt_lora::{TtLora, TtLoraConfig};
