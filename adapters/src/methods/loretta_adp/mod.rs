//! LoRETTA_adp (Yang et al., NAACL 2024): a bottleneck adapter `h + s·up(act(down(h)))` whose
//! down (`d → b`) and up (`b → d`) projections are tensor-train layers with biases, placed where
//! the official code places them ([`AdpPlacement`]): on LLaMA before `gate_proj` and `up_proj` and
//! after `down_proj` (three per block), on BERT-family encoders after the attention output and
//! the feed-forward output (two per block).
//!
//! The adapter is **nonlinear, so it cannot be merged** into a base weight: it has no
//! `delta_weight`, and [`crate::ResidualAdapter::merge_supported`] says so.

mod layer;

pub use layer::LorettaAdp;

use crate::adapter::DeltaInit;
use crate::error::{require_finite, require_positive};
use crate::method::{
    AdapterSet, Flag, FlagField, Method, ParamReport, ParamRow, RecommendedTraining, ResidualPosition, ResidualSite,
    Sites, at_site, sets,
};
use crate::methods::{ResidualAdapter, SharedFactors};
use crate::tensor::shape::loretta_factor_shape;
use crate::tensor::tt_linear::TtLinearPair;
use burn::config::Config;
use burn::tensor::{Tensor, activation, backend::Backend};

/// The bottleneck nonlinearity.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `max(0, x)` (the official scripts).
    Relu,
    /// `tanh(x)` (the official dataclass default).
    Tanh,
    /// Exact GELU.
    Gelu,
    /// `x·σ(x)`.
    Silu,
    /// No nonlinearity (the adapter becomes linear; still kept unmerged).
    Identity,
}

impl Activation {
    /// Applies the activation.
    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Activation::Relu => activation::relu(x),
            Activation::Tanh => activation::tanh(x),
            Activation::Gelu => activation::gelu(x),
            Activation::Silu => activation::silu(x),
            Activation::Identity => x,
        }
    }
}

/// Where LoRETTA_adp's adapters go in each block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdpPlacement {
    /// As the official code places them: the input adapter (`W·(h + f(h))`) before a gated
    /// feed-forward's gate and up projections and the output adapter after its down projection
    /// (three per LLaMA block); after the attention output and the feed-forward output on models
    /// without a gated feed-forward (the official `.*\.output\.dense` targets on BERT).
    #[default]
    Official,
    /// After the attention output and after the feed-forward output of every block (Houlsby et
    /// al.; two per block on every model).
    Houlsby,
}

impl AdpPlacement {
    /// The sites of `available` (every position a model offers) this placement uses.
    pub fn select<'a>(&self, available: &'a [ResidualSite]) -> Vec<&'a ResidualSite> {
        use ResidualPosition::*;
        let gated = available.iter().any(|s| matches!(s.position, GateInput | UpInput));
        let keep: &[ResidualPosition] = match self {
            AdpPlacement::Official if gated => &[GateInput, UpInput, FeedForward],
            AdpPlacement::Official | AdpPlacement::Houlsby => &[Attention, FeedForward],
        };
        available.iter().filter(|s| keep.contains(&s.position)).collect()
    }
}

/// Hyper-parameters of a LoRETTA_adp adapter.
#[derive(Config, Debug)]
pub struct LorettaAdpConfig {
    /// Bottleneck width `b`. Default 8 (the low end of the paper's grid of 8 and 64): with
    /// tensor rank 2 the adapters stay under a tenth of LoRA r=8's parameters on 384-wide models,
    /// where the biases (`b + d` per adapter) are most of them.
    #[config(default = 8)]
    pub bottleneck: usize,
    /// TT rank of the projections' trains. Default 2 (the paper's grid: 2, 4, 8, 16, 32).
    #[config(default = 2)]
    pub tensor_rank: usize,
    /// Plain output multiplier `s` (official `scaling = 1.0`).
    #[config(default = 1.0)]
    pub scaling: f64,
    /// Bottleneck nonlinearity.
    #[config(default = "Activation::Relu")]
    pub activation: Activation,
    /// TT shape of the down projection (product `d·b`); published table or planner when `None`.
    pub down_shape: Option<Vec<usize>>,
    /// TT shape of the up projection (product `b·d`); the reverse of the down shape when `None`.
    pub up_shape: Option<Vec<usize>>,
    /// `Zero` (default): up projection's last core and bias are zero, so the block output is
    /// unchanged at step 0. `Paper`: Gaussian cores and uniform biases as in the official code.
    #[config(default = "DeltaInit::Zero")]
    pub init: DeltaInit,
    /// Which block positions get an adapter. `None` only in adapter files written before
    /// placements could be chosen, which used [`AdpPlacement::Houlsby`].
    #[config(default = "Some(AdpPlacement::Official)")]
    pub placement: Option<AdpPlacement>,
}

impl LorettaAdpConfig {
    /// Checks the scalar fields.
    pub fn validate(&self) -> crate::Result<()> {
        require_positive("bottleneck", self.bottleneck)?;
        require_positive("tensor_rank", self.tensor_rank)?;
        require_finite("scaling", self.scaling)
    }

    /// The down (`d → b`) and up (`b → d`) projections for hidden size `d`, with TT shapes from
    /// the config, the published table or the planner (not yet validated).
    pub fn projections(&self, d: usize) -> crate::Result<TtLinearPair> {
        let down = match &self.down_shape {
            Some(s) => s.clone(),
            None => loretta_factor_shape(d, self.bottleneck)?,
        };
        let up = self.up_shape.clone().unwrap_or_else(|| down.iter().rev().copied().collect());
        Ok(TtLinearPair { dims: (d, self.bottleneck, d), shapes: (down, up), rank: self.tensor_rank, bias: true })
    }

    /// Where the adapters go (see [`LorettaAdpConfig::placement`]).
    pub fn placement(&self) -> AdpPlacement {
        self.placement.unwrap_or(AdpPlacement::Houlsby)
    }

    /// Trainable parameters of one adapter on hidden size `d` (cores and both biases).
    pub fn num_params(&self, d: usize) -> crate::Result<usize> {
        self.validate()?;
        self.projections(d)?.num_params()
    }

    /// Creates an adapter for hidden size `d`.
    pub fn init<B: Backend>(&self, d: usize, device: &B::Device) -> crate::Result<LorettaAdp<B>> {
        self.validate()?;
        require_positive("hidden size", d)?;
        let (down, up) = self.projections(d)?.init(self.init == DeltaInit::Zero, device)?;
        Ok(LorettaAdp { down, up, activation: self.activation, scaling: self.scaling })
    }
}

impl Method for LorettaAdpConfig {
    const NAME: &'static str = "loretta-adp";
    const RESIDUAL: bool = true;
    const FLAGS: &'static [FlagField] = &[
        sets(Flag::Bottleneck, "bottleneck", "bottleneck width"),
        sets(Flag::TensorRank, "tensor_rank", "TT rank of the projections' trains"),
        sets(Flag::TtShape, "down_shape", "TT shape of the down projection (up uses its reverse)"),
        sets(Flag::Placement, "placement", "official (LLaMA: before gate/up, after down) or houlsby"),
    ];

    /// None: it goes at the block positions its [`AdpPlacement`] names instead.
    /// lr 1e-2: the bottleneck's rank-2 trains need a far larger step than LoRA's matrices (on
    /// the VADER recipe it validates above 5e-3 and tests 1.0 point below LoRA r=8 over three
    /// seeds).
    fn recommended_training(&self) -> RecommendedTraining {
        RecommendedTraining { lr: 1e-2, loraplus_lr_ratio: None }
    }

    fn default_roles(&self) -> &'static [crate::AttentionMatrix] {
        &[]
    }

    fn count(&self, sites: &Sites) -> crate::Result<ParamReport> {
        let rows = self.placement().select(sites.residual).into_iter().map(|s| {
            let params = self.num_params(s.hidden).map_err(at_site(Self::NAME, &s.name))?;
            Ok(ParamRow { module: s.name.clone(), shape: format!("{}", s.hidden), params, note: String::new() })
        });
        Ok(ParamReport { rows: rows.collect::<crate::Result<_>>()? })
    }

    fn build<B: Backend>(&self, sites: &Sites, device: &B::Device) -> crate::Result<AdapterSet<B>> {
        let residual = (self.placement().select(sites.residual).into_iter())
            .map(|s| Ok((s.clone(), ResidualAdapter::LorettaAdp(self.init(s.hidden, device)?))))
            .collect::<crate::Result<_>>()?;
        Ok(AdapterSet { shared: SharedFactors::empty(), linear: Vec::new(), residual })
    }
}
