//! TT-LoRA (Anjum et al., 2024): the update ΔW itself is a tensor train, scaled by a plain `α`.
//!
//! Layout: `tt_shape = input_factors ++ reversed(output_factors)`, TT ranks `[1, r, …, r, 1]`;
//! ΔW (Burn layout `[d_in, d_out]`) is the row-major reshape of the train, rows from the input
//! modes. The cut between input and output modes has rank ≤ r, so the forward contracts the two
//! half-trains `A = left: [d_in, r]` and `B = right: [r, d_out]` (cost `r²·(d_in+d_out)`) and applies
//! them as two thin GEMMs, exactly like LoRA; the dense ΔW is never formed during training.
//! For very few rows (e.g. one decoded token) contracting core by core is cheaper; the forward
//! picks the path with [`plan_tt_path`]'s cost formulas.
//!
//! Index order: LANL's reference reads the input index with the input modes reversed
//! (`x.view(m_factors[::-1])`); we read both halves in shape order. The two differ by a fixed
//! permutation of the input features, so parameter counts and expressivity are identical.

use crate::adapter::{DeltaInit, LinearDelta, LowRankUpdate, SharedFactors};
use crate::error::{require_finite, require_positive};
use crate::tensor::low_rank_apply;
use crate::tensor::shape::{plan_tt_lora_shape, validate_split_shape};
use crate::tensor::tt::{CoreInit, TensorTrain, TtPath, apply_core_by_core, plan_tt_path, tt_num_params};
use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

/// Hyper-parameters of a TT-LoRA adapter.
#[derive(Config, Debug)]
pub struct TtLoraConfig {
    /// TT rank `r` of every inner bond (the paper's best LLaMA setting uses 5).
    #[config(default = 5)]
    pub rank: usize,
    /// Plain output multiplier `α` (not divided by the rank).
    #[config(default = 8.0)]
    pub alpha: f64,
    /// Explicit `input_factors ++ reversed(output_factors)`; planned from the layer size when `None`.
    pub tt_shape: Option<Vec<usize>>,
    /// `Zero` (default): last core zero, ΔW₀ = 0. `Paper`: LANL's `direct_init`, every core uniform
    /// with unit Frobenius norm, ΔW₀ ≠ 0.
    #[config(default = "DeltaInit::Zero")]
    pub init: DeltaInit,
}

impl TtLoraConfig {
    /// The shape used for a `d_in × d_out` layer (explicit or planned), validated; returns it with
    /// the number of input cores.
    pub fn resolve_shape(&self, d_in: usize, d_out: usize) -> crate::Result<(Vec<usize>, usize)> {
        let shape = match &self.tt_shape {
            Some(shape) => shape.clone(),
            None => plan_tt_lora_shape(d_in, d_out)?,
        };
        let split = validate_split_shape(&shape, d_in, d_out)?;
        Ok((shape, split))
    }

    /// Checks rank and α.
    pub fn validate(&self) -> crate::Result<()> {
        require_positive("rank", self.rank)?;
        require_finite("alpha", self.alpha)
    }

    /// Trainable parameters for one `d_in × d_out` matrix.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> crate::Result<usize> {
        self.validate()?;
        let (shape, _) = self.resolve_shape(d_in, d_out)?;
        Ok(tt_num_params(&shape, self.rank))
    }

    /// Creates the adapter for a `d_in × d_out` linear layer.
    pub fn init<B: Backend>(&self, d_in: usize, d_out: usize, device: &B::Device) -> crate::Result<TtLora<B>> {
        self.validate()?;
        let (shape, split) = self.resolve_shape(d_in, d_out)?;
        let zero = self.init == DeltaInit::Zero;
        Ok(TtLora {
            tt: TensorTrain::new(&shape, self.rank, CoreInit::UnitFrobenius, zero, device),
            split,
            alpha: self.alpha,
        })
    }
}

/// A TT-LoRA update for one linear layer.
#[derive(Module, Debug)]
pub struct TtLora<B: Backend> {
    /// The cores of ΔW over `input_factors ++ reversed(output_factors)`.
    pub tt: TensorTrain<B>,
    /// Number of input cores (the cut with rank ≤ r).
    pub split: usize,
    /// Output multiplier `α`.
    pub alpha: f64,
}

impl<B: Backend> TtLora<B> {
    /// The two half-trains `(A: [d_in, r], α·B: [r, d_out])` with `ΔW = A·(α·B)`: `α` goes on the
    /// small right half-train, not on the layer's output.
    pub fn scaled_half_trains(&self) -> (Tensor<B, 2>, Tensor<B, 2>) {
        (self.tt.left(self.split), self.tt.right(self.split).mul_scalar(self.alpha))
    }
}

impl<B: Backend> TtLora<B> {
    /// TT rank of the inner bonds.
    pub fn rank(&self) -> usize {
        self.tt.cores.first().map_or(1, |c| c.dims()[2])
    }

    /// The update along an explicit contraction path (the planner picks the cheaper one in
    /// [`LinearDelta::delta`]).
    pub fn delta_with<const D: usize>(&self, x: Tensor<B, D>, path: TtPath) -> Tensor<B, D> {
        match path {
            TtPath::HalfTrains => {
                let (a, b) = self.scaled_half_trains();
                low_rank_apply(x, a, b)
            }
            TtPath::CoreByCore => {
                let mut dims = x.dims();
                let (d_in, d_out) = self.dims();
                let x2 = x.reshape([dims[..D - 1].iter().product(), d_in]);
                dims[D - 1] = d_out;
                apply_core_by_core(x2, &self.tt.core_values(), self.split).reshape(dims).mul_scalar(self.alpha)
            }
        }
    }
}

impl<B: Backend> LinearDelta<B> for TtLora<B> {
    fn dims(&self) -> (usize, usize) {
        let shape = self.tt.shape();
        (shape[..self.split].iter().product(), shape[self.split..].iter().product())
    }

    fn delta<const D: usize>(&self, x: Tensor<B, D>, _shared: &SharedFactors<B>) -> Tensor<B, D> {
        let tokens = x.dims()[..D - 1].iter().product();
        self.delta_with(x, plan_tt_path(&self.tt.shape(), self.split, self.rank(), tokens))
    }

    fn low_rank_factors(&self, _shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        self.scaled_half_trains()
    }

    fn low_rank_update(&self, tokens: usize, _shared: &SharedFactors<B>) -> Option<LowRankUpdate<B>> {
        let path = plan_tt_path(&self.tt.shape(), self.split, self.rank(), tokens);
        (path == TtPath::HalfTrains).then(|| LowRankUpdate::plain(self.scaled_half_trains()))
    }
}
