//! The LoRA layer and its adapter-file names (HF PEFT's).

use crate::adapter::LinearDelta;
use crate::method::{AdapterLayer, FileParam, FileTensor};
use crate::methods::SharedFactors;
use burn::module::{Module, Param, ParamId};
use burn::nn::Dropout;
use burn::tensor::{Tensor, backend::Backend};

/// A LoRA update `s · x·A·B` for one linear layer.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// Down projection `A: [d_in, r]`, kaiming-uniform.
    pub a: Param<Tensor<B, 2>>,
    /// Up projection `B: [r, d_out]`, zero at initialisation.
    pub b: Param<Tensor<B, 2>>,
    /// Dropout on the adapter input.
    pub dropout: Dropout,
    /// Output scale `α/r` (or `α/√r`).
    pub scaling: f64,
}

impl<B: Backend> LinearDelta<B> for Lora<B> {
    fn dims(&self) -> (usize, usize) {
        (self.a.dims()[0], self.b.dims()[1])
    }

    fn dropout(&self) -> f64 {
        self.dropout.prob
    }

    fn low_rank_factors(&self, _shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        (self.a.val(), self.b.val().mul_scalar(self.scaling))
    }
}

impl<B: Backend> AdapterLayer<B> for Lora<B> {
    /// PEFT's layout, so PEFT reads the files: `lora_A.weight: [r, d_in]`, `lora_B.weight: [d_out, r]`.
    fn file_tensors(&mut self) -> Vec<FileTensor<'_, B>> {
        vec![
            FileTensor::new("lora_A.weight", FileParam::TransposedMatrix(&mut self.a)),
            FileTensor::new("lora_B.weight", FileParam::TransposedMatrix(&mut self.b)),
        ]
    }

    fn zero_init_factors(&self) -> Vec<ParamId> {
        vec![self.b.id]
    }
}
