//! The toy layer and its adapter-file names.

use crate::adapter::LinearDelta;
use crate::method::{AdapterLayer, FileParam, FileTensor};
use crate::methods::SharedFactors;
use burn::module::{Module, Param, ParamId};
use burn::tensor::{Tensor, backend::Backend};

/// A rank-one update `s · x·u·v`.
#[derive(Module, Debug)]
pub struct Toy<B: Backend> {
    /// `u: [d_in, 1]`, uniform.
    pub u: Param<Tensor<B, 2>>,
    /// `v: [1, d_out]`, zero at initialisation.
    pub v: Param<Tensor<B, 2>>,
    /// Output scale `s`.
    pub scale: f64,
}

impl<B: Backend> LinearDelta<B> for Toy<B> {
    fn dims(&self) -> (usize, usize) {
        (self.u.dims()[0], self.v.dims()[1])
    }

    fn low_rank_factors(&self, _shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        (self.u.val(), self.v.val().mul_scalar(self.scale))
    }
}

impl<B: Backend> AdapterLayer<B> for Toy<B> {
    fn file_tensors(&mut self) -> Vec<FileTensor<'_, B>> {
        let factors = [("toy.u", &mut self.u), ("toy.v", &mut self.v)];
        factors.into_iter().map(|(name, factor)| FileTensor::new(name, FileParam::Matrix(factor))).collect()
    }

    fn zero_init_factors(&self) -> Vec<ParamId> {
        vec![self.v.id]
    }
}
