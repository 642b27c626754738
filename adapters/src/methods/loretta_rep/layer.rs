//! The LoRETTA_rep layer and its adapter-file names.

use crate::adapter::LinearDelta;
use crate::method::{AdapterLayer, FileTensor};
use crate::methods::SharedFactors;
use crate::tensor::tt_linear::TtLinear;
use burn::module::Module;
use burn::nn::Dropout;
use burn::tensor::{Tensor, backend::Backend};

/// A LoRETTA_rep update for one linear layer.
#[derive(Module, Debug)]
pub struct LorettaRep<B: Backend> {
    /// `A: [d_in, r]` as a tensor train.
    pub a: TtLinear<B>,
    /// `B: [r, d_out]` as a tensor train.
    pub b: TtLinear<B>,
    /// Dropout on the adapter input.
    pub dropout: Dropout,
    /// Output scale `α/r`.
    pub scaling: f64,
}

impl<B: Backend> LinearDelta<B> for LorettaRep<B> {
    /// `A`'s rows and `B`'s columns.
    fn dims(&self) -> (usize, usize) {
        (self.a.d_in, self.b.d_out)
    }

    /// Dropout on the input, as LoRA's.
    fn dropout(&self) -> f64 {
        self.dropout.prob
    }

    /// Both trains contracted to their small matrices (`≈ k²·r·d` flops per step), the scale on
    /// `B`.
    fn low_rank_factors(&self, _shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        (self.a.weight(), self.b.weight().mul_scalar(self.scaling))
    }
}

impl<B: Backend> AdapterLayer<B> for LorettaRep<B> {
    fn file_tensors(&mut self) -> Vec<FileTensor<'_, B>> {
        let mut tensors = FileTensor::train("LorettaRep.a.tt", &mut self.a.tt);
        tensors.extend(FileTensor::train("LorettaRep.b.tt", &mut self.b.tt));
        tensors
    }

    /// `B`'s last core (zero under [`DeltaInit::Zero`](crate::DeltaInit::Zero), the only
    /// initialisation LoRA+ is accepted with), as TT-LoRA's.
    fn zero_init_factors(&self) -> Vec<burn::module::ParamId> {
        self.b.tt.cores.last().map(|c| c.id).into_iter().collect()
    }
}
