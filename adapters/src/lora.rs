//! LoRA (Hu et al., 2021) with HF PEFT semantics: the baseline every tensorized method is
//! compared against.
//!
//! `Δ(x) = s · dropout(x) · A · B` with `A: [d_in, r]` (kaiming-uniform, `U(±1/√d_in)`, as PEFT's
//! `kaiming_uniform_(a=√5)`), `B: [r, d_out] = 0`, and `s = α/r` (or `α/√r` with rsLoRA).
//! PEFT stores `lora_A.weight` as `[r, d_in]` and `lora_B.weight` as `[d_out, r]`: transpose on
//! import and export.

use crate::adapter::{LinearDelta, LowRankUpdate, SharedFactors};
use crate::error::{invalid, require_finite, require_positive};
use crate::tensor::low_rank_apply;
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{Distribution, Tensor, backend::Backend};
use tensor_peft_kernels::fused;

/// Hyper-parameters of a LoRA adapter.
#[derive(Config, Debug)]
pub struct LoraConfig {
    /// Rank `r` of the update.
    #[config(default = 8)]
    pub rank: usize,
    /// Scale numerator `α` (PEFT's `lora_alpha`, default 8).
    #[config(default = 8.0)]
    pub alpha: f64,
    /// Use rsLoRA scaling `α/√r` instead of `α/r`.
    #[config(default = false)]
    pub use_rslora: bool,
    /// Dropout probability on the adapter input (active only on autodiff backends).
    #[config(default = 0.0)]
    pub dropout: f64,
}

impl LoraConfig {
    /// Checks every field (rank ≥ 1, finite α, dropout in `[0, 1)`).
    pub fn validate(&self) -> crate::Result<()> {
        require_positive("rank", self.rank)?;
        require_finite("alpha", self.alpha)?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("dropout", self.dropout, "must be in [0, 1)"));
        }
        Ok(())
    }

    /// The output scale `α/r` (or `α/√r`).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.rank as f64).sqrt() } else { self.alpha / self.rank as f64 }
    }

    /// Trainable parameters for one `d_in × d_out` matrix: `r·(d_in + d_out)`.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> usize {
        self.rank * (d_in + d_out)
    }

    /// Creates the adapter for a `d_in × d_out` linear layer (ΔW = 0 at initialisation).
    pub fn init<B: Backend>(&self, d_in: usize, d_out: usize, device: &B::Device) -> crate::Result<Lora<B>> {
        self.validate()?;
        require_positive("d_in", d_in)?;
        require_positive("d_out", d_out)?;
        let bound = 1.0 / (d_in as f64).sqrt();
        Ok(Lora {
            a: Param::from_tensor(Tensor::random([d_in, self.rank], Distribution::Uniform(-bound, bound), device)),
            b: Param::from_tensor(Tensor::zeros([self.rank, d_out], device)),
            dropout: DropoutConfig::new(self.dropout).init(),
            scaling: self.scaling(),
        })
    }
}

/// A LoRA update `s · x·A·B` for one linear layer.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// Down projection `A: [d_in, r]`, kaiming-uniform.
    pub a: Param<Tensor<B, 2>>,
    /// Up projection `B: [r, d_out]`, zero at initialisation.
    pub b: Param<Tensor<B, 2>>,
    /// Dropout on the adapter input.
    pub dropout: Dropout,
    /// Output scale `α/r` (or `α/√r`).
    pub scaling: f64,
}

impl<B: Backend> LinearDelta<B> for Lora<B> {
    fn dims(&self) -> (usize, usize) {
        (self.a.dims()[0], self.b.dims()[1])
    }

    fn delta<const D: usize>(&self, x: Tensor<B, D>, shared: &SharedFactors<B>) -> Tensor<B, D> {
        let (a, b) = self.low_rank_factors(shared);
        low_rank_apply(fused::dropout(x, self.dropout.prob), a, b)
    }

    fn low_rank_update(&self, _tokens: usize, shared: &SharedFactors<B>) -> Option<LowRankUpdate<B>> {
        let (a, b) = self.low_rank_factors(shared);
        Some(LowRankUpdate { a, b, dropout: self.dropout.prob })
    }

    fn low_rank_factors(&self, _shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        (self.a.val(), self.b.val().mul_scalar(self.scaling))
    }
}
