//! LoTR (Bershatsky et al., 2024): Tucker-2 over a family of equally shaped matrices,
//! `ΔW_l = L · M_l · Rᵀ`, with `L` and `R` shared by the whole family (default: q and v of every
//! layer) and one `r × r` core `M_l` per adapted matrix.
//!
//! Burn layout (`ΔW: [d_in, d_out]`): `ΔW_l = A · G_l · Bᵀ` where `A: [d_in, r]` plays the paper's
//! `R`, `Bᵀ: [r, d_out]` its `Lᵀ`, and `G_l = M_lᵀ`. The forward is `s · x·A·(G_l·Bᵀ)` with
//! `s = α/r` (the official code divides its scale by the rank). Paper initialisation:
//! `A, B ~ N(0, 1)`, `G = 0`, so ΔW₀ = 0 for both [`DeltaInit`] choices.
//!
//! The shared factors live once, in [`crate::SharedFactors::lotr`]; every [`Lotr`] holds the index
//! of its family and receives the shared factors at forward time, so an optimizer updates them
//! exactly once per step.

use crate::adapter::{DeltaInit, LinearDelta, LowRankUpdate, SharedFactors};
use crate::error::{AdapterError, require_finite, require_positive};
use crate::tensor::low_rank_apply;
use crate::tensor::tucker::tucker2_factors;
use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor, backend::Backend};

/// Hyper-parameters of LoTR.
#[derive(Config, Debug)]
pub struct LotrConfig {
    /// Tucker rank `r`.
    #[config(default = 8)]
    pub rank: usize,
    /// Scale numerator: the update is multiplied by `α/r`.
    #[config(default = 8.0)]
    pub alpha: f64,
    /// Both choices give ΔW₀ = 0 (cores start at zero, as in the paper).
    #[config(default = "DeltaInit::Zero")]
    pub init: DeltaInit,
}

impl LotrConfig {
    /// Checks rank and α.
    pub fn validate(&self) -> crate::Result<()> {
        require_positive("rank", self.rank)?;
        require_finite("alpha", self.alpha)
    }

    /// Parameters of one family's shared factors: `r·(d_in + d_out)`.
    pub fn shared_num_params(&self, d_in: usize, d_out: usize) -> usize {
        self.rank * (d_in + d_out)
    }

    /// Parameters private to one adapted matrix: `r²`.
    pub fn num_params(&self) -> usize {
        self.rank * self.rank
    }

    /// Creates the shared outer factors of a family of `d_in × d_out` matrices.
    pub fn init_shared<B: Backend>(
        &self,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> crate::Result<LotrShared<B>> {
        self.validate()?;
        require_positive("d_in", d_in)?;
        require_positive("d_out", d_out)?;
        Ok(LotrShared {
            a: Param::from_tensor(Tensor::random([d_in, self.rank], Distribution::Normal(0.0, 1.0), device)),
            bt: Param::from_tensor(Tensor::random([self.rank, d_out], Distribution::Normal(0.0, 1.0), device)),
        })
    }

    /// Creates the per-matrix core for a member of family `family` (an index into
    /// [`SharedFactors::lotr`]).
    pub fn init<B: Backend>(
        &self,
        family: usize,
        shared: &SharedFactors<B>,
        device: &B::Device,
    ) -> crate::Result<Lotr<B>> {
        self.validate()?;
        let factors = shared.lotr.get(family).ok_or_else(|| {
            AdapterError::State(format!(
                "LoTR family {family} does not exist ({} families are initialised)",
                shared.lotr.len()
            ))
        })?;
        if factors.rank() != self.rank {
            return Err(crate::error::invalid(
                "rank",
                self.rank,
                format!("family {family} was created with rank {}", factors.rank()),
            ));
        }
        Ok(Lotr {
            core: Param::from_tensor(Tensor::zeros([self.rank, self.rank], device)),
            family,
            scaling: self.alpha / self.rank as f64,
            d_in: factors.a.dims()[0],
            d_out: factors.bt.dims()[1],
        })
    }
}

/// The outer factors shared by one LoTR family.
#[derive(Module, Debug)]
pub struct LotrShared<B: Backend> {
    /// `A: [d_in, r]` (the paper's `R`), `N(0, 1)`.
    pub a: Param<Tensor<B, 2>>,
    /// `Bᵀ: [r, d_out]` (the paper's `Lᵀ`), `N(0, 1)`.
    pub bt: Param<Tensor<B, 2>>,
}

impl<B: Backend> LotrShared<B> {
    /// Tucker rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }
}

/// The private part of one LoTR-adapted matrix.
#[derive(Module, Debug)]
pub struct Lotr<B: Backend> {
    /// Core `G_l: [r, r]`, zero at initialisation.
    pub core: Param<Tensor<B, 2>>,
    /// Index of the family whose shared factors this matrix uses.
    pub family: usize,
    /// Output scale `α/r`.
    pub scaling: f64,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

impl<B: Backend> Lotr<B> {
    fn factors<'a>(&self, shared: &'a SharedFactors<B>) -> &'a LotrShared<B> {
        shared.lotr.get(self.family).unwrap_or_else(|| {
            panic!("LoTR family {} is missing from the shared factors passed to forward", self.family)
        })
    }
}

impl<B: Backend> LinearDelta<B> for Lotr<B> {
    fn dims(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    fn delta<const D: usize>(&self, x: Tensor<B, D>, shared: &SharedFactors<B>) -> Tensor<B, D> {
        let (a, b) = self.low_rank_factors(shared);
        low_rank_apply(x, a, b)
    }

    fn low_rank_update(&self, _tokens: usize, shared: &SharedFactors<B>) -> Option<LowRankUpdate<B>> {
        Some(LowRankUpdate::plain(self.low_rank_factors(shared)))
    }

    fn low_rank_factors(&self, shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let f = self.factors(shared);
        let (a, b) = tucker2_factors(f.a.val(), self.core.val(), f.bt.val());
        (a, b.mul_scalar(self.scaling))
    }
}
