//! The adapter interfaces models call: [`LinearDelta`] (implemented by every linear method and by
//! the registry's [`LinearAdapter`] that dispatches to them), [`AdaptedLinear`] (a frozen base
//! layer plus an optional update, with merge/unmerge) and [`ResidualLayer`] for block-output
//! adapters.

use crate::error::AdapterError;
use crate::frozen::FrozenLinear;
use crate::methods::{LinearAdapter, SharedFactors};
use crate::tensor::{low_rank_apply, low_rank_dense, low_rank_frobenius_sq};
use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};
use tensor_peft_kernels::fused;

/// How an adapter's update starts.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum DeltaInit {
    /// ΔW₀ = 0: the adapted model equals the base model at step 0 (the default for every method;
    /// for TT methods the last core of the output-side train is zero).
    Zero,
    /// The initialisation of the method's official code: ΔW₀ ≠ 0 for the TT methods, the same
    /// zero-delta initialisation for the others (each method's config says which).
    Paper,
}

/// A linear update `Δ(x) = x · ΔW` applied next to a frozen base layer.
///
/// Implementations contract the input with their small factors and never form the dense ΔW in
/// [`delta`](LinearDelta::delta); [`delta_weight`](LinearDelta::delta_weight) builds it only for
/// merging and checks. Every method's ΔW is a product of two thin matrices
/// ([`low_rank_factors`](LinearDelta::low_rank_factors)), which also gives its norm cheaply.
pub trait LinearDelta<B: Backend> {
    /// `(d_in, d_out)` of the adapted layer.
    fn dims(&self) -> (usize, usize);

    /// Drop probability on the update's input (as [`fused::dropout`]: applied only under
    /// autodiff); none by default.
    fn dropout(&self) -> f64 {
        0.0
    }

    /// The update for `x: [..., d_in]` → `[..., d_out]`; by default `dropout(x)·a·b` from
    /// [`low_rank_factors`](Self::low_rank_factors), as two thin products.
    ///
    /// The method's scaling belongs on the small `[k, d_out]` factor, not on the result: scaling
    /// the `[..., d_out]` output costs a full elementwise pass forward and another backward.
    fn delta<const D: usize>(&self, x: Tensor<B, D>, shared: &SharedFactors<B>) -> Tensor<B, D> {
        let (a, b) = self.low_rank_factors(shared);
        low_rank_apply(fused::dropout(x, self.dropout()), a, b)
    }

    /// `(a, b)` with `ΔW = a · b`, `a: [d_in, k]`, `b: [k, d_out]` and the method's scaling folded
    /// into `b` (`k` is the method's rank; for a tensor train, the rank at its input/output cut).
    fn low_rank_factors(&self, shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>);

    /// The update as `dropout(x)·a·b` when that is exactly what [`delta`](Self::delta) computes on
    /// `tokens` rows (by default always; TT-LoRA overrides it where it plans its core-by-core
    /// path): [`AdaptedLinear`] then adds it inside the frozen layer's product
    /// ([`fused::low_rank_linear`]) instead of summing a separate `[tokens, d_out]` result. `None`
    /// makes it call `delta`.
    fn low_rank_update(&self, tokens: usize, shared: &SharedFactors<B>) -> Option<LowRankUpdate<B>> {
        let _ = tokens;
        let (a, b) = self.low_rank_factors(shared);
        Some(LowRankUpdate { a, b, dropout: self.dropout() })
    }

    /// The dense update `ΔW: [d_in, d_out]` (Burn layout).
    fn delta_weight(&self, shared: &SharedFactors<B>) -> Tensor<B, 2> {
        let (a, b) = self.low_rank_factors(shared);
        low_rank_dense(a, b)
    }

    /// `‖ΔW‖_F²` from the factors' Gram matrices, without forming ΔW.
    fn delta_frobenius_sq(&self, shared: &SharedFactors<B>) -> Tensor<B, 1> {
        let (a, b) = self.low_rank_factors(shared);
        low_rank_frobenius_sq(a, b)
    }
}

/// Whether to apply an update densely (`x·(W+ΔW)`) rather than factored.
///
/// Only for forward passes without gradients: building ΔW costs `d_in·d_out·r`, contracting
/// `N·r·(d_in+d_out)`, so dense pays when `N > d_in·d_out/(d_in+d_out)` (≈ d/2 for square layers).
/// With gradients the dense path adds a weight-sized gradient GEMM and never pays.
pub fn prefer_dense_delta(d_in: usize, d_out: usize, tokens: usize, needs_grad: bool) -> bool {
    !needs_grad && tokens.saturating_mul(d_in + d_out) > d_in.saturating_mul(d_out)
}

/// A linear update in the form `dropout(x)·a·b` ([`LinearDelta::low_rank_update`]).
#[derive(Debug, Clone)]
pub struct LowRankUpdate<B: Backend> {
    /// `[d_in, k]`.
    pub a: Tensor<B, 2>,
    /// `[k, d_out]`, the method's scaling folded in.
    pub b: Tensor<B, 2>,
    /// Drop probability on the update's input (as [`fused::dropout`]: applied only under autodiff).
    pub dropout: f64,
}

impl<B: Backend> LowRankUpdate<B> {
    /// `x·a·b` with no dropout, from factors as [`LinearDelta::low_rank_factors`] returns them.
    pub fn plain((a, b): (Tensor<B, 2>, Tensor<B, 2>)) -> Self {
        Self { a, b, dropout: 0.0 }
    }
}

/// A base linear layer (frozen by [`AdaptedLinear::new`]) with an optional adapter.
#[derive(Module, Debug)]
pub struct AdaptedLinear<B: Backend> {
    /// The pretrained layer; its parameters do not require gradients.
    pub base: FrozenLinear<B>,
    /// The update, if this layer is adapted.
    pub adapter: Option<LinearAdapter<B>>,
    /// Whether ΔW is currently folded into `base`.
    pub merged: bool,
}

impl<B: Backend> AdaptedLinear<B> {
    /// Wraps `base`, freezing it. Fails if the adapter's shape does not match the layer.
    pub fn new(base: impl Into<FrozenLinear<B>>, adapter: Option<LinearAdapter<B>>) -> crate::Result<Self> {
        let base = base.into();
        let (d_in, d_out) = base.dims();
        if let Some(a) = &adapter
            && a.dims() != (d_in, d_out)
        {
            return Err(AdapterError::State(format!(
                "adapter is {}x{} but the base layer is {d_in}x{d_out}",
                a.dims().0,
                a.dims().1
            )));
        }
        Ok(Self { base: base.no_grad(), adapter, merged: false })
    }

    /// `base(x) + Δ(x)` (just `base(x)` when merged or unadapted).
    ///
    /// Without gradients (an inference backend) and with many rows, adding ΔW to the weight once
    /// is cheaper than contracting every row ([`prefer_dense_delta`]); otherwise the update is
    /// applied factored.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, shared: &SharedFactors<B>) -> Tensor<B, D> {
        // Work on `[tokens, d_in]` rows. Burn's `linear` brings a 2-D weight to a 3-D input's rank
        // with a reshape, and its backward does the same to the *transposed* weight, which the CPU
        // backends copy: a full weight copy per layer per step (5 % of a SmolLM2 training step on
        // flex). On rows no reshape is needed, and the adapter's weight gradients are one GEMM
        // instead of a batched one plus a sum.
        let dims = x.dims();
        let tokens = dims[..D - 1].iter().product();
        let x = x.reshape([tokens, dims[D - 1]]);
        let bias = || self.base.bias();
        // The frozen layer through `fused::linear`: on flex, `gemm` straight into the output.
        let y = match self.adapter.as_ref().filter(|_| !self.merged) {
            None => fused::linear(x, self.base.matrix(), bias()),
            Some(adapter) => {
                let (d_in, d_out) = adapter.dims();
                if prefer_dense_delta(d_in, d_out, tokens, B::ad_enabled(&x.device())) {
                    let delta = adapter.delta_weight(shared);
                    let weight = self.base.weight_f32() + delta;
                    fused::linear(x, weight, bias())
                } else if let Some(update) = adapter.low_rank_update(tokens, shared) {
                    fused::low_rank_linear(x, self.base.matrix(), bias(), update.a, update.b, update.dropout)
                } else {
                    fused::linear(x.clone(), self.base.matrix(), bias()) + adapter.delta(x, shared)
                }
            }
        };
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }

    /// `‖ΔW‖_F / ‖W‖_F`: how large the update has grown relative to the frozen weight it modifies
    /// (`None` when unadapted or merged). Healthy fine-tuning keeps it well below 1; far above 1
    /// the update swamps the pretrained layer, the usual sign of a learning rate that is too high.
    pub fn update_ratio(&self, shared: &SharedFactors<B>) -> Option<f64> {
        let adapter = self.adapter.as_ref().filter(|_| !self.merged)?;
        let sqrt = |sq: Tensor<B, 1>| -> Option<f64> {
            sq.into_data().convert::<f64>().to_vec::<f64>().ok()?.first().map(|v| v.max(0.0).sqrt())
        };
        // ΔW's norm from its factors: no d_in × d_out matrix per layer per evaluation.
        let delta = sqrt(adapter.delta_frobenius_sq(shared))?;
        let weight = self.base.weight_f32();
        let weight = sqrt((weight.clone() * weight).sum())?;
        Some(delta / weight.max(f64::MIN_POSITIVE))
    }

    /// Folds the update into the base weight. Errors if already merged or unadapted.
    pub fn merge(mut self, shared: &SharedFactors<B>) -> crate::Result<Self> {
        let adapter =
            self.adapter.as_ref().ok_or_else(|| AdapterError::State("cannot merge: layer has no adapter".into()))?;
        if self.merged {
            return Err(AdapterError::State("cannot merge: adapter is already merged".into()));
        }
        self.base = self.base.add_delta(adapter.delta_weight(shared))?;
        self.merged = true;
        Ok(self)
    }

    /// Undoes [`merge`](Self::merge). Errors if not merged.
    pub fn unmerge(mut self, shared: &SharedFactors<B>) -> crate::Result<Self> {
        let adapter =
            self.adapter.as_ref().ok_or_else(|| AdapterError::State("cannot unmerge: layer has no adapter".into()))?;
        if !self.merged {
            return Err(AdapterError::State("cannot unmerge: adapter is not merged".into()));
        }
        self.base = self.base.add_delta(adapter.delta_weight(shared).neg())?;
        self.merged = false;
        Ok(self)
    }
}

/// An adapter on a block's output hidden states (`h → h + f(h)`), held by models at the Houlsby
/// positions after attention and after the feed-forward network (through the registry's
/// [`ResidualAdapter`](crate::ResidualAdapter)).
pub trait ResidualLayer<B: Backend> {
    /// `h + f(h)` for `h: [..., d]`.
    fn forward<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D>;

    /// The same map with every tensor-format factor reconstructed densely by another contraction
    /// than the forward's: the reference `tpeft selfcheck` compares [`ResidualLayer::forward`] with.
    fn dense_reference<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D>;

    /// Folds the adapter into the base weights, or says why it cannot be.
    fn merge(&self) -> crate::Result<()>;
}
