//! The LoRETTA_adp layer and its adapter-file names.

use super::Activation;
use crate::adapter::ResidualLayer;
use crate::error::AdapterError;
use crate::method::{AdapterLayer, FileParam, FileTensor};
use crate::tensor::tt_linear::TtLinear;
use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

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

impl<B: Backend> ResidualLayer<B> for LorettaAdp<B> {
    /// `h + s · up(act(down(h)))` for `h: [..., d]`.
    fn forward<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        let z = self.activation.forward(self.down.forward(h.clone()));
        h + self.up.forward_scaled(z, self.scaling)
    }

    /// The projections' weights contracted right to left (the forward contracts left to right).
    fn dense_reference<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        let dense = |p: &crate::tensor::tt_linear::TtLinear<B>, x: Tensor<B, D>| {
            burn::tensor::module::linear(x, p.weight_right_to_left(), p.bias.as_ref().map(|b| b.val()))
        };
        let z = self.activation.forward(dense(&self.down, h.clone()));
        h + dense(&self.up, z).mul_scalar(self.scaling)
    }

    fn merge(&self) -> crate::Result<()> {
        Err(AdapterError::Unsupported {
            method: "loretta-adp",
            target: "merge".into(),
            reason: "the bottleneck adapter is nonlinear (up(act(down(h)))), so it has no weight delta to fold in"
                .into(),
        })
    }
}

impl<B: Backend> LorettaAdp<B> {
    /// `h + s · up(act(down(h)))` for `h: [..., d]`.
    pub fn forward<const D: usize>(&self, h: Tensor<B, D>) -> Tensor<B, D> {
        ResidualLayer::forward(self, h)
    }

    /// Hidden size `d`.
    pub fn hidden(&self) -> usize {
        self.down.d_in
    }
}

impl<B: Backend> AdapterLayer<B> for LorettaAdp<B> {
    fn file_tensors(&mut self) -> Vec<FileTensor<'_, B>> {
        let mut tensors = Vec::new();
        for (name, projection) in [("LorettaAdp.down", &mut self.down), ("LorettaAdp.up", &mut self.up)] {
            if let Some(bias) = &mut projection.bias {
                tensors.push(FileTensor::new(format!("{name}.bias"), FileParam::Vector(bias)));
            }
            tensors.extend(FileTensor::train(&format!("{name}.tt"), &mut projection.tt));
        }
        tensors
    }
}
