//! LoRETTA_rep (Yang et al., NAACL 2024): LoRA whose two factors are tensor trains.
//!
//! `Δ(x) = (α/r) · dropout(x) · A · B` with `A: [d_in, r]` and `B: [r, d_out]` each a flat TT
//! ([`TtLinear`](crate::TtLinear) without bias) of tensor rank `k` (default 5). Shapes follow LoRETTA's published
//! table (e.g. `[16,16,8,4,4]` for a 4096×8 factor) or the planner; `B` uses the reverse of the
//! `[d_out, r]` shape. Each step rebuilds the two small factors (≈ `k²·r·d` flops) and applies
//! them like LoRA; the dense ΔW is never formed during training.

mod layer;

pub use layer::LorettaRep;

use crate::adapter::DeltaInit;
use crate::error::{require_dropout, require_positive, require_rank_and_alpha};
use crate::method::{AdapterSet, Flag, FlagField, Method, ParamReport, RecommendedTraining, Sites, sets};
use crate::methods::LinearAdapter;
use crate::tensor::shape::loretta_factor_shape;
use crate::tensor::tt_linear::TtLinearPair;
use burn::config::Config;
use burn::nn::DropoutConfig;
use burn::tensor::backend::Backend;

/// Hyper-parameters of a LoRETTA_rep adapter.
#[derive(Config, Debug)]
pub struct LorettaRepConfig {
    /// LoRA rank `r` (inner dimension of `A·B`). Default 2, chosen on the README's VADER recipe
    /// (validation data) to train at most a tenth of LoRA r=8; the paper and its official code use 8.
    #[config(default = 2)]
    pub rank: usize,
    /// Scale numerator: the output is scaled by `α/r`. Default 4 keeps the official `α/r = 2`
    /// (r=8, α=16).
    #[config(default = 4.0)]
    pub alpha: f64,
    /// TT rank of the factors' trains (the paper's default 5; the official scripts use 8).
    #[config(default = 5)]
    pub tensor_rank: usize,
    /// TT shape of `A` (product `d_in·r`); from the published table or planned when `None`.
    pub a_shape: Option<Vec<usize>>,
    /// TT shape of `B` (product `r·d_out`); the reverse of `A`'s shape for square layers,
    /// else the reverse of the `[d_out, r]` shape.
    pub b_shape: Option<Vec<usize>>,
    /// Dropout on the adapter input (official default 0.05; active on autodiff backends only).
    #[config(default = 0.05)]
    pub dropout: f64,
    /// `Zero` (default): `B`'s last core is zero, ΔW₀ = 0. `Paper`: both trains Gaussian as in the
    /// official code (`reset_parameters` is a no-op there), ΔW₀ ≠ 0.
    #[config(default = "DeltaInit::Zero")]
    pub init: DeltaInit,
}

impl LorettaRepConfig {
    /// Checks the scalar fields.
    pub fn validate(&self) -> crate::Result<()> {
        require_rank_and_alpha(self.rank, self.alpha)?;
        require_positive("tensor_rank", self.tensor_rank)?;
        require_dropout("dropout", self.dropout)
    }

    /// The two trains of `A: [d_in, r]` and `B: [r, d_out]` for a `d_in × d_out` layer, with TT
    /// shapes from the config, the published table or the planner (not yet validated).
    pub fn factors(&self, d_in: usize, d_out: usize) -> crate::Result<TtLinearPair> {
        let a = match &self.a_shape {
            Some(s) => s.clone(),
            None => loretta_factor_shape(d_in, self.rank)?,
        };
        let b = match (&self.b_shape, &self.a_shape) {
            (Some(s), _) => s.clone(),
            (None, Some(a)) if d_in == d_out => a.iter().rev().copied().collect(),
            _ => loretta_factor_shape(d_out, self.rank)?.into_iter().rev().collect(),
        };
        Ok(TtLinearPair { dims: (d_in, self.rank, d_out), shapes: (a, b), rank: self.tensor_rank, bias: false })
    }

    /// Trainable parameters for one `d_in × d_out` matrix.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> crate::Result<usize> {
        self.validate()?;
        self.factors(d_in, d_out)?.num_params()
    }

    /// Creates the adapter for a `d_in × d_out` linear layer.
    pub fn init<B: Backend>(&self, d_in: usize, d_out: usize, device: &B::Device) -> crate::Result<LorettaRep<B>> {
        self.validate()?;
        let (a, b) = self.factors(d_in, d_out)?.init(self.init == DeltaInit::Zero, device)?;
        let (dropout, scaling) = (DropoutConfig::new(self.dropout).init(), self.alpha / self.rank as f64);
        Ok(LorettaRep { a, b, dropout, scaling })
    }
}

impl Method for LorettaRepConfig {
    const NAME: &'static str = "loretta-rep";
    const FLAGS: &'static [FlagField] = &[
        sets(Flag::Rank, "rank", "LoRA rank r"),
        sets(Flag::Alpha, "alpha", "scale α (update × α/r)"),
        sets(Flag::TensorRank, "tensor_rank", "TT rank of the factors' trains"),
        sets(Flag::TtShape, "a_shape", "TT shape of A (B uses its reverse)"),
        sets(Flag::Dropout, "dropout", "dropout on the adapter's input (default 0.05)"),
    ];

    /// `B`'s last core starts at zero with the zero initialisation.
    fn has_zero_init_factor(&self) -> bool {
        self.init == DeltaInit::Zero
    }

    /// lr 5e-3: the factors' small trains need a larger step than LoRA's matrices (with the
    /// default r=2, α=4, tensor rank 5 the VADER recipe tests within 2 points of LoRA r=8).
    fn recommended_training(&self) -> RecommendedTraining {
        RecommendedTraining { lr: 5e-3, loraplus_lr_ratio: None }
    }

    fn count(&self, sites: &Sites) -> crate::Result<ParamReport> {
        ParamReport::per_linear_site(Self::NAME, sites.linear, |s| self.num_params(s.d_in, s.d_out))
    }

    fn build<B: Backend>(&self, sites: &Sites, device: &B::Device) -> crate::Result<AdapterSet<B>> {
        AdapterSet::per_linear_site(sites.linear, |s| {
            Ok(LinearAdapter::LorettaRep(self.init(s.d_in, s.d_out, device)?))
        })
    }
}
