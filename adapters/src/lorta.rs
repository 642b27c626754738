//! LoRTA (Hounie et al., 2024): one CP tensor of rank `r` for every q, k, v, o update of the model.
//!
//! Factors `A: [d, r]`, `B: [d_h, r]`, `C_L: [L, r]`, `C_H: [H, r]`, `C_M: [4, r]` (rows q, k, v, o,
//! always allocated, as in the official code). Head `h` of matrix `m` in layer `l` gets
//! `ΔW[:, h·d_h..(h+1)·d_h] = s · A · diag(C_H[h] ⊙ C_L[l] ⊙ C_M[m]) · Bᵀ` (Burn layout, heads on the
//! output axis as in the paper and the lit-gpt fork), `s = α/r`. The forward folds the head
//! weights into a small `[r, H·d_h]` output factor and applies `(x·A)·M` like LoRA; the official
//! PEFT fork instead materialises all `4L` dense matrices every step.
//! Parameters: `r·(d + d/H + H + L + 4)`.
//!
//! **Grouped-query attention** (k, v narrower than q) is outside the paper. We generalise it in
//! one documented way: key/value matrices use their own head factor `C_KV: [H_kv, r]`, adding
//! `H_kv·r` parameters; every other factor stays shared. For multi-head models nothing changes.
//!
//! Initialisation (official): `A ~ U(±1/√r)` (kaiming-uniform with `a=√5` on a `[d, r]` tensor),
//! `B = 0` (so ΔW₀ = 0 for both [`DeltaInit`] choices), `C_* ~ U(±√(6/r))` (`init_scale = 0`).

use crate::adapter::{DeltaInit, LinearDelta, LowRankUpdate, SharedFactors};
use crate::error::{AdapterError, require_finite, require_positive};
use crate::tensor::cp::cp_heads_output_factor;
use crate::tensor::low_rank_apply;
use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor, backend::Backend};
use std::marker::PhantomData;

/// Which attention projection a matrix is (the `C_M` row it uses).
#[derive(Config, Debug, Copy, PartialEq, Eq, Hash)]
pub enum AttentionMatrix {
    /// Query projection (`q_proj`, `query`).
    Query,
    /// Key projection (`k_proj`, `key`).
    Key,
    /// Value projection (`v_proj`, `value`).
    Value,
    /// Output projection (`o_proj`, `attention.output.dense`).
    Output,
}

impl AttentionMatrix {
    /// Row of `C_M`: q=0, k=1, v=2, o=3.
    pub fn index(&self) -> usize {
        match self {
            AttentionMatrix::Query => 0,
            AttentionMatrix::Key => 1,
            AttentionMatrix::Value => 2,
            AttentionMatrix::Output => 3,
        }
    }

    /// Whether the output axis holds the key/value heads.
    pub fn uses_kv_heads(&self) -> bool {
        matches!(self, AttentionMatrix::Key | AttentionMatrix::Value)
    }
}

/// Attention shape of the model LoRTA adapts.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub struct AttentionGeometry {
    /// Number of transformer layers `L`.
    pub n_layers: usize,
    /// Model width `d`.
    pub d_model: usize,
    /// Query heads `H`.
    pub n_heads: usize,
    /// Key/value heads (`H` for multi-head attention, fewer for GQA).
    pub n_kv_heads: usize,
}

impl AttentionGeometry {
    /// Head width `d_h = d / H`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Whether key/value projections are narrower than the query projection.
    pub fn is_grouped(&self) -> bool {
        self.n_kv_heads != self.n_heads
    }

    /// Checks that heads tile the model width.
    pub fn validate(&self) -> crate::Result<()> {
        require_positive("n_layers", self.n_layers)?;
        require_positive("n_heads", self.n_heads)?;
        require_positive("n_kv_heads", self.n_kv_heads)?;
        let err = |reason: String| AdapterError::Unsupported { method: "lorta", target: format!("{self:?}"), reason };
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(err(format!("d_model {} is not divisible by n_heads {}", self.d_model, self.n_heads)));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(err(format!("n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads)));
        }
        Ok(())
    }

    /// `(d_in, d_out)` of a projection.
    pub fn matrix_dims(&self, matrix: AttentionMatrix) -> (usize, usize) {
        if matrix.uses_kv_heads() {
            (self.d_model, self.n_kv_heads * self.head_dim())
        } else {
            (self.d_model, self.d_model)
        }
    }
}

/// Hyper-parameters of LoRTA.
#[derive(Config, Debug)]
pub struct LortaConfig {
    /// CP rank `r`.
    #[config(default = 8)]
    pub rank: usize,
    /// Scale numerator: the update is multiplied by `α/r` (official scripts: 16).
    #[config(default = 16.0)]
    pub alpha: f64,
    /// Both choices give ΔW₀ = 0 (`B = 0`).
    #[config(default = "DeltaInit::Zero")]
    pub init: DeltaInit,
}

impl LortaConfig {
    /// Checks rank and α.
    pub fn validate(&self) -> crate::Result<()> {
        require_positive("rank", self.rank)?;
        require_finite("alpha", self.alpha)
    }

    /// Total parameters of the one shared CP tensor: `r·(d + d_h + H + L + 4)`, plus `r·H_kv` for
    /// grouped-query models. Adapted matrices hold no parameters of their own.
    pub fn num_params(&self, geometry: &AttentionGeometry) -> crate::Result<usize> {
        self.validate()?;
        geometry.validate()?;
        let kv = if geometry.is_grouped() { geometry.n_kv_heads } else { 0 };
        Ok(self.rank * (geometry.d_model + geometry.head_dim() + geometry.n_heads + kv + geometry.n_layers + 4))
    }

    /// Creates the shared CP factors.
    pub fn init_shared<B: Backend>(
        &self,
        geometry: &AttentionGeometry,
        device: &B::Device,
    ) -> crate::Result<LortaShared<B>> {
        self.validate()?;
        geometry.validate()?;
        let r = self.rank;
        let a_bound = 1.0 / (r as f64).sqrt();
        let c_bound = (6.0 / r as f64).sqrt();
        let c = |rows: usize| {
            Param::from_tensor(Tensor::random([rows, r], Distribution::Uniform(-c_bound, c_bound), device))
        };
        Ok(LortaShared {
            a: Param::from_tensor(Tensor::random(
                [geometry.d_model, r],
                Distribution::Uniform(-a_bound, a_bound),
                device,
            )),
            b: Param::from_tensor(Tensor::zeros([geometry.head_dim(), r], device)),
            c_layers: c(geometry.n_layers),
            c_heads: c(geometry.n_heads),
            c_kv_heads: geometry.is_grouped().then(|| c(geometry.n_kv_heads)),
            c_matrices: c(4),
            scaling: self.alpha / r as f64,
        })
    }

    /// Creates the (parameter-free) handle of matrix `matrix` in layer `layer`.
    pub fn init<B: Backend>(
        &self,
        layer: usize,
        matrix: AttentionMatrix,
        geometry: &AttentionGeometry,
    ) -> crate::Result<Lorta<B>> {
        geometry.validate()?;
        if layer >= geometry.n_layers {
            return Err(crate::error::invalid("layer", layer, format!("the model has {} layers", geometry.n_layers)));
        }
        let (d_in, d_out) = geometry.matrix_dims(matrix);
        Ok(Lorta {
            layer,
            matrix: matrix.index(),
            kv_heads: matrix.uses_kv_heads() && geometry.is_grouped(),
            d_in,
            d_out,
            backend: PhantomData,
        })
    }
}

/// The CP factors shared by every LoRTA-adapted matrix of a model.
#[derive(Module, Debug)]
pub struct LortaShared<B: Backend> {
    /// `A: [d, r]` on the input axis.
    pub a: Param<Tensor<B, 2>>,
    /// `B: [d_h, r]` on the within-head output axis, zero at initialisation.
    pub b: Param<Tensor<B, 2>>,
    /// Layer factor `C_L: [L, r]`.
    pub c_layers: Param<Tensor<B, 2>>,
    /// Head factor `C_H: [H, r]` (query and output projections; all four for MHA models).
    pub c_heads: Param<Tensor<B, 2>>,
    /// Key/value head factor `C_KV: [H_kv, r]`, only for grouped-query models.
    pub c_kv_heads: Option<Param<Tensor<B, 2>>>,
    /// Matrix-type factor `C_M: [4, r]` (q, k, v, o).
    pub c_matrices: Param<Tensor<B, 2>>,
    /// Output scale `α/r`.
    pub scaling: f64,
}

/// One LoRTA-adapted matrix: a position `(layer, matrix type)` in the shared CP tensor.
#[derive(Module, Debug)]
pub struct Lorta<B: Backend> {
    /// Layer index `l`.
    pub layer: usize,
    /// Matrix type index `m` (q=0, k=1, v=2, o=3).
    pub matrix: usize,
    /// Whether the output axis uses the key/value head factor (GQA k and v).
    pub kv_heads: bool,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    backend: PhantomData<B>,
}

impl<B: Backend> Lorta<B> {
    fn factors<'a>(&self, shared: &'a SharedFactors<B>) -> &'a LortaShared<B> {
        shared.lorta.as_ref().expect("LoRTA factors are missing from the shared factors passed to forward")
    }

    /// Per-head weights `C_H[h] ⊙ C_L[l] ⊙ C_M[m]`: `[H, r]`.
    fn head_weights(&self, f: &LortaShared<B>) -> Tensor<B, 2> {
        let heads = match (&f.c_kv_heads, self.kv_heads) {
            (Some(kv), true) => kv.val(),
            _ => f.c_heads.val(),
        };
        let layer = f.c_layers.val().narrow(0, self.layer, 1);
        let matrix = f.c_matrices.val().narrow(0, self.matrix, 1);
        heads * (layer * matrix)
    }
}

impl<B: Backend> LinearDelta<B> for Lorta<B> {
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
        (f.a.val(), cp_heads_output_factor(self.head_weights(f), f.b.val()).mul_scalar(f.scaling))
    }
}
