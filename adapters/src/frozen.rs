//! The frozen base layer under an adapter: `y = x·W + b` with `W` held as the base model is, in
//! f32, bf16 or f16 values or in GGML's quantized blocks ([`BlockFormat`]).

use crate::error::AdapterError;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};
use tensor_peft_kernels::fused::{BlockMatrix, FrozenMatrix};
pub use tensor_peft_kernels::quant::BlockFormat;

/// A frozen linear layer (Burn layout: `W: [d_in, d_out]`).
#[derive(Module, Debug)]
pub struct FrozenLinear<B: Backend> {
    /// The weight.
    pub weight: FrozenWeight<B>,
    /// The bias `[d_out]` (f32), if the layer has one.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

/// How a frozen weight is held.
#[derive(Module, Debug)]
pub enum FrozenWeight<B: Backend> {
    /// Float values `[d_in, d_out]` in f32, bf16 or f16 (possibly a transposed view).
    Values(Param<Tensor<B, 2>>),
    /// GGML blocks of `Wᵀ`, row after row.
    Blocks(QuantizedWeight<B>),
}

/// A weight held as GGML blocks: see [`BlockMatrix`].
#[derive(Module, Debug)]
pub struct QuantizedWeight<B: Backend> {
    /// `[d_out, row_bytes]` bytes (U8).
    pub bytes: Tensor<B, 2, Int>,
    /// The block format.
    #[module(skip)]
    pub format: BlockFormat,
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
}

impl<B: Backend> From<Linear<B>> for FrozenLinear<B> {
    fn from(linear: Linear<B>) -> Self {
        Self { weight: FrozenWeight::Values(linear.weight), bias: linear.bias }
    }
}

impl<B: Backend> From<BlockMatrix<B>> for QuantizedWeight<B> {
    fn from(m: BlockMatrix<B>) -> Self {
        Self { bytes: m.bytes, format: m.format, d_in: m.d_in, d_out: m.d_out }
    }
}

impl<B: Backend> FrozenLinear<B> {
    /// A layer with weight `w: [d_in, d_out]` and no bias.
    pub fn new(weight: FrozenMatrix<B>) -> Self {
        let weight = match weight {
            FrozenMatrix::Values(w) => FrozenWeight::Values(Param::from_tensor(w)),
            FrozenMatrix::Blocks(m) => FrozenWeight::Blocks(m.into()),
        };
        Self { weight, bias: None }
    }

    /// `(d_in, d_out)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            FrozenWeight::Values(w) => (w.dims()[0], w.dims()[1]),
            FrozenWeight::Blocks(q) => (q.d_in, q.d_out),
        }
    }

    /// The weight as the fused linear ops take it (no copy).
    pub fn matrix(&self) -> FrozenMatrix<B> {
        match &self.weight {
            FrozenWeight::Values(w) => FrozenMatrix::Values(w.val()),
            FrozenWeight::Blocks(q) => FrozenMatrix::Blocks(BlockMatrix {
                bytes: q.bytes.clone(),
                format: q.format,
                d_in: q.d_in,
                d_out: q.d_out,
            }),
        }
    }

    /// `x·W + b` for `x: [..., d_in]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let tokens = dims[..D - 1].iter().product();
        let y = tensor_peft_kernels::fused::linear(x.reshape([tokens, dims[D - 1]]), self.matrix(), self.bias());
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(|b| b.val())
    }

    /// `W` in f32 (widened or dequantized; a copy unless it is f32), for merging, norms and export.
    pub fn weight_f32(&self) -> Tensor<B, 2> {
        let w = self.matrix().values();
        if w.dtype() == DType::F32 { w } else { w.cast(DType::F32) }
    }

    /// What the weight is held as: `F32`, `BF16`, `F16` or a block format's name.
    pub fn storage(&self) -> String {
        match &self.weight {
            FrozenWeight::Values(w) => format!("{:?}", w.val().dtype()),
            FrozenWeight::Blocks(q) => q.format.name().to_string(),
        }
    }

    /// `W ← W + delta`, outside the autodiff graph, keeping the weight's parameter id, trainability
    /// and dtype: a half-precision weight is summed in f32 and rounded back once, as PEFT merges
    /// into a bf16 base (so an unmerge restores it only to that rounding). Quantized blocks are
    /// refused: rounding the sum back to blocks would change the base model's own weights.
    pub fn add_delta(mut self, delta: Tensor<B, 2>) -> Result<Self, AdapterError> {
        let FrozenWeight::Values(weight) = self.weight else {
            return Err(AdapterError::State(format!(
                "cannot fold an adapter into a {}-quantized base layer; load the base with --base-dtype f32 or bf16 to merge",
                self.storage()
            )));
        };
        self.weight = FrozenWeight::Values(weight.map(|w| {
            let trainable = w.is_require_grad();
            let dtype = w.dtype();
            let sum = w.detach().cast(delta.dtype()) + delta.detach();
            let sum = if sum.dtype() == dtype { sum } else { sum.cast(dtype) };
            sum.set_require_grad(trainable)
        }));
        Ok(self)
    }
}
