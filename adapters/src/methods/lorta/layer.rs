//! The LoRTA layers (the shared CP factors, one matrix's place in them) and their adapter-file
//! names.

use crate::adapter::LinearDelta;
use crate::method::{AdapterLayer, FileParam, FileTensor};
use crate::methods::SharedFactors;
use crate::tensor::cp::cp_heads_output_factor;
use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};
use std::marker::PhantomData;

/// The CP factors shared by every LoRTA-adapted matrix of a model.
#[derive(Module, Debug)]
pub struct LortaShared<B: Backend> {
    /// `A: [d, r]` on the input axis.
    pub a: Param<Tensor<B, 2>>,
    /// `B: [d_h, r]` on the within-head output axis, zero at initialisation.
    pub b: Param<Tensor<B, 2>>,
    /// Layer factor `C_L: [L, r]`.
    pub c_layers: Param<Tensor<B, 2>>,
    /// Head factor `C_H: [H, r]` (query and output projections; all four for MHA models).
    pub c_heads: Param<Tensor<B, 2>>,
    /// Key/value head factor `C_KV: [H_kv, r]`, only for grouped-query models.
    pub c_kv_heads: Option<Param<Tensor<B, 2>>>,
    /// Matrix-type factor `C_M: [4, r]` (q, k, v, o).
    pub c_matrices: Param<Tensor<B, 2>>,
    /// Output scale `α/r`.
    pub scaling: f64,
}

/// One LoRTA-adapted matrix: a position `(layer, matrix type)` in the shared CP tensor.
#[derive(Module, Debug)]
pub struct Lorta<B: Backend> {
    /// Layer index `l`.
    pub layer: usize,
    /// Matrix type index `m` (q=0, k=1, v=2, o=3).
    pub matrix: usize,
    /// Whether the output axis uses the key/value head factor (GQA k and v).
    pub kv_heads: bool,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    pub(super) backend: PhantomData<B>,
}

impl<B: Backend> Lorta<B> {
    fn factors<'a>(&self, shared: &'a SharedFactors<B>) -> &'a LortaShared<B> {
        shared.lorta.as_ref().expect("LoRTA factors are missing from the shared factors passed to forward")
    }

    /// Per-head weights `C_H[h] ⊙ C_L[l] ⊙ C_M[m]`: `[H, r]`.
    fn head_weights(&self, f: &LortaShared<B>) -> Tensor<B, 2> {
        let heads = match (&f.c_kv_heads, self.kv_heads) {
            (Some(kv), true) => kv.val(),
            _ => f.c_heads.val(),
        };
        let layer = f.c_layers.val().narrow(0, self.layer, 1);
        let matrix = f.c_matrices.val().narrow(0, self.matrix, 1);
        heads * (layer * matrix)
    }
}

impl<B: Backend> LinearDelta<B> for Lorta<B> {
    fn dims(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    fn low_rank_factors(&self, shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let f = self.factors(shared);
        (f.a.val(), cp_heads_output_factor(self.head_weights(f), f.b.val()).mul_scalar(f.scaling))
    }
}

/// A matrix's place in the CP tensor holds no parameters of its own.
impl<B: Backend> AdapterLayer<B> for Lorta<B> {
    fn file_tensors(&mut self) -> Vec<FileTensor<'_, B>> {
        Vec::new()
    }
}

/// The CP factors as `lorta.<factor>` under `shared`.
impl<B: Backend> AdapterLayer<B> for Option<LortaShared<B>> {
    fn file_tensors(&mut self) -> Vec<FileTensor<'_, B>> {
        let Some(f) = self else { return Vec::new() };
        let mut tensors = vec![
            FileTensor::new("lorta.a", FileParam::Matrix(&mut f.a)),
            FileTensor::new("lorta.b", FileParam::Matrix(&mut f.b)),
            FileTensor::new("lorta.c_layers", FileParam::Matrix(&mut f.c_layers)),
            FileTensor::new("lorta.c_heads", FileParam::Matrix(&mut f.c_heads)),
            FileTensor::new("lorta.c_matrices", FileParam::Matrix(&mut f.c_matrices)),
        ];
        if let Some(kv) = &mut f.c_kv_heads {
            tensors.push(FileTensor::new("lorta.c_kv_heads", FileParam::Matrix(kv)));
        }
        tensors
    }
}
