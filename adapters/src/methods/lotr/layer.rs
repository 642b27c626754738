//! The LoTR layers (the shared outer factors of a family, one matrix's core) and their
//! adapter-file names.

use crate::adapter::LinearDelta;
use crate::method::{AdapterLayer, FileParam, FileTensor};
use crate::methods::SharedFactors;
use crate::tensor::tucker::tucker2_factors;
use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};

/// The outer factors shared by one LoTR family.
#[derive(Module, Debug)]
pub struct LotrShared<B: Backend> {
    /// `A: [d_in, r]` (the paper's `R`), Glorot-normal (`N(0, 1)` with the paper's initialisation).
    pub a: Param<Tensor<B, 2>>,
    /// `Bᵀ: [r, d_out]` (the paper's `Lᵀ`), Glorot-normal (`N(0, 1)` with the paper's initialisation).
    pub bt: Param<Tensor<B, 2>>,
}

impl<B: Backend> LotrShared<B> {
    /// Tucker rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }
}

/// The private part of one LoTR-adapted matrix.
#[derive(Module, Debug)]
pub struct Lotr<B: Backend> {
    /// Core `G_l: [r, r]`, zero at initialisation.
    pub core: Param<Tensor<B, 2>>,
    /// Index of the family whose shared factors this matrix uses.
    pub family: usize,
    /// Output scale `α/r`.
    pub scaling: f64,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

impl<B: Backend> Lotr<B> {
    fn factors<'a>(&self, shared: &'a SharedFactors<B>) -> &'a LotrShared<B> {
        shared.lotr.get(self.family).unwrap_or_else(|| {
            panic!("LoTR family {} is missing from the shared factors passed to forward", self.family)
        })
    }
}

impl<B: Backend> LinearDelta<B> for Lotr<B> {
    fn dims(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    fn low_rank_factors(&self, shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let f = self.factors(shared);
        let (a, b) = tucker2_factors(f.a.val(), self.core.val(), f.bt.val());
        (a, b.mul_scalar(self.scaling))
    }
}

impl<B: Backend> AdapterLayer<B> for Lotr<B> {
    fn file_tensors(&mut self) -> Vec<FileTensor<'_, B>> {
        vec![FileTensor::new("Lotr.core", FileParam::Matrix(&mut self.core))]
    }
}

/// The families' factors, as `lotr.<family>.a` and `lotr.<family>.bt` under `shared`.
impl<B: Backend> AdapterLayer<B> for Vec<LotrShared<B>> {
    fn file_tensors(&mut self) -> Vec<FileTensor<'_, B>> {
        self.iter_mut()
            .enumerate()
            .flat_map(|(i, family)| {
                [
                    FileTensor::new(format!("lotr.{i}.a"), FileParam::Matrix(&mut family.a)),
                    FileTensor::new(format!("lotr.{i}.bt"), FileParam::Matrix(&mut family.bt)),
                ]
            })
            .collect()
    }
}
