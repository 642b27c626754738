//! LoRETTA's tensorized linear layer: a weight `[d_in, d_out]` stored as a flat tensor train
//! (`Π n_k = d_in·d_out`, row-major; the row/column cut may fall inside a mode), plus an
//! optional bias. Used for the factors of LoRETTA_rep and the projections of LoRETTA_adp.

use crate::error::{Result, require_positive};
use crate::tensor::shape::validate_flat_shape;
use crate::tensor::tt::{CoreInit, TensorTrain, tt_num_params};
use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor, backend::Backend, module::linear};

/// A linear map whose weight is a tensor train.
#[derive(Module, Debug)]
pub struct TtLinear<B: Backend> {
    /// The weight's cores.
    pub tt: TensorTrain<B>,
    /// Optional bias `[d_out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

/// Trainable parameters of a [`TtLinear`]: the cores plus the bias.
pub fn tt_linear_num_params(shape: &[usize], rank: usize, d_out: usize, bias: bool) -> usize {
    tt_num_params(shape, rank) + if bias { d_out } else { 0 }
}

/// Two TT linear layers in a chain `d_in → k → d_out` (LoRETTA_rep's `A·B`, LoRETTA_adp's
/// down and up projections): their TT shapes and what they share.
#[derive(Debug, Clone, PartialEq)]
pub struct TtLinearPair {
    /// `(d_in, k, d_out)`.
    pub dims: (usize, usize, usize),
    /// TT shapes of the first (`d_in·k`) and the second (`k·d_out`) layer.
    pub shapes: (Vec<usize>, Vec<usize>),
    /// TT rank of both trains.
    pub rank: usize,
    /// Whether both layers have a bias.
    pub bias: bool,
}

impl TtLinearPair {
    /// Trainable parameters of both layers, after checking that the shapes fit.
    pub fn num_params(&self) -> Result<usize> {
        let ((first, second), (d_in, k, d_out)) = (&self.shapes, self.dims);
        validate_flat_shape(first, d_in, k)?;
        validate_flat_shape(second, k, d_out)?;
        Ok(tt_linear_num_params(first, self.rank, k, self.bias)
            + tt_linear_num_params(second, self.rank, d_out, self.bias))
    }

    /// Both layers; with `zero_second` the second outputs 0 ([`TtLinear::new`]).
    pub fn init<B: Backend>(&self, zero_second: bool, device: &B::Device) -> Result<(TtLinear<B>, TtLinear<B>)> {
        let ((first, second), (d_in, k, d_out)) = (&self.shapes, self.dims);
        Ok((
            TtLinear::new(d_in, k, first, self.rank, self.bias, false, device)?,
            TtLinear::new(k, d_out, second, self.rank, self.bias, zero_second, device)?,
        ))
    }
}

impl<B: Backend> TtLinear<B> {
    /// LoRETTA initialisation: Gaussian cores whose product has entry std `√(1/(d_in+d_out))`,
    /// bias `U(±1/√d_out)`. With `zero` the last core and the bias are zero (the layer outputs 0).
    pub fn new(
        d_in: usize,
        d_out: usize,
        shape: &[usize],
        rank: usize,
        bias: bool,
        zero: bool,
        device: &B::Device,
    ) -> Result<Self> {
        require_positive("tensor_rank", rank)?;
        validate_flat_shape(shape, d_in, d_out)?;
        let target_std = (1.0 / (d_in + d_out) as f64).sqrt();
        let tt = TensorTrain::new(shape, rank, CoreInit::Gaussian { target_std }, zero, device);
        let bias = bias.then(|| {
            let value = if zero {
                Tensor::zeros([d_out], device)
            } else {
                let bound = 1.0 / (d_out as f64).sqrt();
                tensor_peft_kernels::rng::random([d_out], Distribution::Uniform(-bound, bound), device)
            };
            Param::from_tensor(value)
        });
        Ok(Self { tt, bias, d_in, d_out })
    }

    /// The dense weight `[d_in, d_out]` (as small as the factor it represents).
    pub fn weight(&self) -> Tensor<B, 2> {
        self.tt.to_matrix(self.d_in, self.d_out)
    }

    /// The dense weight contracted right to left: the same matrix as [`TtLinear::weight`] by the
    /// other contraction order, an independent reference for it.
    pub fn weight_right_to_left(&self) -> Tensor<B, 2> {
        crate::tensor::tt::contract_right(&self.tt.core_values()).reshape([self.d_in, self.d_out])
    }

    /// `x · W + b` for `x: [..., d_in]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        linear(x, self.weight(), self.bias.as_ref().map(|b| b.val()))
    }

    /// `s · (x · W + b)`, with `s` applied to the weight and bias rather than to the larger output.
    pub fn forward_scaled<const D: usize>(&self, x: Tensor<B, D>, scale: f64) -> Tensor<B, D> {
        linear(x, self.weight().mul_scalar(scale), self.bias.as_ref().map(|b| b.val().mul_scalar(scale)))
    }
}
