#![warn(missing_docs)]
//! Tensorized parameter-efficient fine-tuning adapters as generic Burn modules.
//!
//! | method | folder | update |
//! |---|---|---|
//! | LoRA | [`methods::lora`] | `s·x·A·B` |
//! | TT-LoRA | [`methods::tt_lora`] | ΔW as a tensor train, `α·x·left·right` |
//! | LoRETTA_rep | [`methods::loretta_rep`] | LoRA with TT-compressed `A` and `B` |
//! | LoRETTA_adp | [`methods::loretta_adp`] | TT bottleneck adapter `h + s·up(act(down(h)))` |
//! | LoTR | [`methods::lotr`] | Tucker-2 `A·G_l·Bᵀ`, `A`, `B` shared |
//! | LoRTA | [`methods::lorta`] | one CP tensor over layers × heads × {q,k,v,o} |
//!
//! Each method is a folder of [`methods`] whose configuration implements [`Method`] (name, flags,
//! default targets, counting, building, file names) and one line of the registry there, which
//! generates [`MethodConfig`], [`LinearAdapter`], [`ResidualAdapter`] and [`SharedFactors`].
//! Linear methods implement [`LinearDelta`] and are held by models inside an [`AdaptedLinear`];
//! factors shared across layers live once in [`SharedFactors`]. The tensor-format math is in
//! [`tensor`].
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
pub mod frozen;
pub mod method;
pub mod methods;
mod registry;
pub mod tensor;

pub use adapter::{AdaptedLinear, DeltaInit, LinearDelta, LowRankUpdate, ResidualLayer, prefer_dense_delta};
pub use error::{AdapterError, Result};
pub use frozen::{BlockFormat, FrozenLinear, FrozenWeight, QuantizedWeight};
pub use method::{
    AdapterLayer, AdapterSet, AttentionGeometry, AttentionMatrix, FileParam, FileTensor, Flag, FlagField, LinearSite,
    Method, MethodFlags, ParamReport, ParamRow, RecommendedTraining, ResidualPosition, ResidualSite, Sites,
    TENSOR_NAMES_VERSION,
};
pub use methods::loretta_adp::{Activation, AdpPlacement};
pub use methods::{
    LinearAdapter, Lora, LoraConfig, LorettaAdp, LorettaAdpConfig, LorettaRep, LorettaRepConfig, Lorta, LortaConfig,
    LortaShared, Lotr, LotrConfig, LotrShared, METHOD_NAMES, MethodConfig, ResidualAdapter, SharedFactors, TtLora,
    TtLoraConfig,
};
pub use tensor::tt_linear::TtLinear;
