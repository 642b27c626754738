//! LoRETTA_adp (Yang et al., NAACL 2024): a bottleneck adapter `h + s·up(act(down(h)))` whose
//! down (`d → b`) and up (`b → d`) projections are tensor-train layers with biases, placed after
//! the attention output and after the feed-forward output of every block (Houlsby placement).
//!
//! The adapter is **nonlinear, so it cannot be merged** into a base weight: it has no
//! `delta_weight`/`merge`, and [`crate::ResidualAdapter::merge_supported`] says so.

use crate::adapter::DeltaInit;
use crate::error::{require_finite, require_positive};
use crate::tensor::shape::loretta_factor_shape;
use crate::tt_linear::{TtLinear, tt_linear_num_params};
use burn::config::Config;
use burn::module::Module;
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

/// Hyper-parameters of a LoRETTA_adp adapter.
#[derive(Config, Debug)]
pub struct LorettaAdpConfig {
    /// Bottleneck width `b`.
    #[config(default = 64)]
    pub bottleneck: usize,
    /// TT rank of the projections' trains.
    #[config(default = 5)]
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
}

impl LorettaAdpConfig {
    /// Checks the scalar fields.
    pub fn validate(&self) -> crate::Result<()> {
        require_positive("bottleneck", self.bottleneck)?;
        require_positive("tensor_rank", self.tensor_rank)?;
        require_finite("scaling", self.scaling)
    }

    /// TT shapes of the down and up projections for hidden size `d`.
    pub fn resolve_shapes(&self, d: usize) -> crate::Result<(Vec<usize>, Vec<usize>)> {
        let down = match &self.down_shape {
            Some(s) => s.clone(),
            None => loretta_factor_shape(d, self.bottleneck)?,
        };
        let up = match &self.up_shape {
            Some(s) => s.clone(),
            None => down.iter().rev().copied().collect(),
        };
        Ok((down, up))
    }

    /// Trainable parameters of one adapter on hidden size `d` (cores and both biases).
    pub fn num_params(&self, d: usize) -> crate::Result<usize> {
        self.validate()?;
        let (down, up) = self.resolve_shapes(d)?;
        crate::tensor::shape::validate_flat_shape(&down, d, self.bottleneck)?;
        crate::tensor::shape::validate_flat_shape(&up, self.bottleneck, d)?;
        Ok(tt_linear_num_params(&down, self.tensor_rank, self.bottleneck, true)
            + tt_linear_num_params(&up, self.tensor_rank, d, true))
    }

    /// Creates an adapter for hidden size `d`.
    pub fn init<B: Backend>(&self, d: usize, device: &B::Device) -> crate::Result<LorettaAdp<B>> {
        self.validate()?;
        require_positive("hidden size", d)?;
        let (down_shape, up_shape) = self.resolve_shapes(d)?;
        let zero = self.init == DeltaInit::Zero;
        Ok(LorettaAdp {
            down: TtLinear::new(d, self.bottleneck, &down_shape, self.tensor_rank, true, false, device)?,
            up: TtLinear::new(self.bottleneck, d, &up_shape, self.tensor_rank, true, zero, device)?,
            activation: self.activation,
            scaling: self.scaling,
        })
    }
}

/// A LoRETTA_adp bottleneck adapter on hidden states of size `d`.
#[derive(Module, Debug)]
pub struct LorettaAdp<B: Backend> {
    /// Down projection `d → b` (TT weight + bias).
    pub down: TtLinear<B>,
    /// Up projection `b → d` (TT weight + bias).
    pub up: TtLinear<B>,
    /// Bottleneck nonlinearity.
    #[module(skip)]
    pub activation: Activation,
    /// Output multiplier `s`.
    pub scaling: f64,
}

impl<B: Backend> LorettaAdp<B> {
    /// `h + s · up(act(down(h)))` for `h: [..., d]`.
    pub fn forward<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        let z = self.activation.forward(self.down.forward(h.clone()));
        h + self.up.forward_scaled(z, self.scaling)
    }

    /// Hidden size `d`.
    pub fn hidden(&self) -> usize {
        self.down.d_in
    }
}
