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

mod layer;

pub use layer::{Lorta, LortaShared};

use crate::adapter::DeltaInit;
use crate::error::{AdapterError, require_rank_and_alpha};
use crate::method::{
    AdapterSet, AttentionGeometry, AttentionMatrix, Flag, FlagField, Method, ParamReport, ParamRow,
    RecommendedTraining, Sites, at_site, sets,
};
use crate::methods::{LinearAdapter, SharedFactors};
use burn::config::Config;
use burn::module::Param;
use burn::tensor::{Distribution, Tensor, backend::Backend};
use std::marker::PhantomData;

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
    /// Total parameters of the one shared CP tensor: `r·(d + d_h + H + L + 4)`, plus `r·H_kv` for
    /// grouped-query models. Adapted matrices hold no parameters of their own.
    pub fn num_params(&self, geometry: &AttentionGeometry) -> crate::Result<usize> {
        require_rank_and_alpha(self.rank, self.alpha)?;
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
        require_rank_and_alpha(self.rank, self.alpha)?;
        geometry.validate()?;
        let r = self.rank;
        let a_bound = 1.0 / (r as f64).sqrt();
        let c_bound = (6.0 / r as f64).sqrt();
        let c = |rows: usize| {
            Param::from_tensor(tensor_peft_kernels::rng::random(
                [rows, r],
                Distribution::Uniform(-c_bound, c_bound),
                device,
            ))
        };
        Ok(LortaShared {
            a: Param::from_tensor(tensor_peft_kernels::rng::random(
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

impl Method for LortaConfig {
    const NAME: &'static str = "lorta";
    const FLAGS: &'static [FlagField] =
        &[sets(Flag::Rank, "rank", "CP rank r"), sets(Flag::Alpha, "alpha", "scale α (update × α/r)")];

    /// q, k, v and o: the CP tensor spans all four.
    /// lr 1e-2: one small CP tensor serves every adapted matrix of the model, so each factor needs
    /// a large step (the VADER recipe tests 1.7 points below LoRA r=8 with it, 3.2 at 5e-3).
    fn recommended_training(&self) -> RecommendedTraining {
        RecommendedTraining { lr: 1e-2, loraplus_lr_ratio: None }
    }

    fn default_roles(&self) -> &'static [AttentionMatrix] {
        &[AttentionMatrix::Query, AttentionMatrix::Key, AttentionMatrix::Value, AttentionMatrix::Output]
    }

    /// Every site must be an attention projection shaped as the geometry says; the parameters
    /// are all in one shared row.
    fn count(&self, sites: &Sites) -> crate::Result<ParamReport> {
        let geometry = sites.geometry;
        let mut rows = Vec::new();
        for s in sites.linear {
            let Some(role) = s.role else {
                return Err(AdapterError::Unsupported {
                    method: Self::NAME,
                    target: s.name.clone(),
                    reason: "LoRTA adapts only attention projections (q, k, v, o)".into(),
                });
            };
            if geometry.matrix_dims(role) != (s.d_in, s.d_out) {
                return Err(at_site(Self::NAME, &s.name)(AdapterError::State(format!(
                    "expected {:?} for {role:?} from the attention geometry",
                    geometry.matrix_dims(role)
                ))));
            }
            rows.push(ParamRow::linear(s, 0));
        }
        rows.push(ParamRow {
            module: "shared: lorta CP factors (A, B, C_L, C_H, C_M)".into(),
            shape: format!("L={} H={} d={}", geometry.n_layers, geometry.n_heads, geometry.d_model),
            params: self.num_params(geometry)?,
            note: String::new(),
        });
        Ok(ParamReport { rows })
    }

    fn build<B: Backend>(&self, sites: &Sites, device: &B::Device) -> crate::Result<AdapterSet<B>> {
        let mut set = AdapterSet::per_linear_site(sites.linear, |s| {
            let role = s.role.expect("checked by count");
            Ok(LinearAdapter::Lorta(self.init(s.layer, role, sites.geometry)?))
        })?;
        set.shared = SharedFactors { lorta: Some(self.init_shared(sites.geometry, device)?), ..SharedFactors::empty() };
        Ok(set)
    }
}
