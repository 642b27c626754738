//! Tensor-format math shared by every adapter: tensor trains ([`tt`]), CP ([`cp`]),
//! Tucker-2 ([`tucker`]), the low-rank products they all reduce to, TT shapes ([`shape`]) and
//! LoRETTA's TT-factored linear layer ([`tt_linear`]).
//!
//! Every linear method's update is applied as a chain of thin products `x·A·B` with
//! `A: [d_in, r]` and `B: [r, d_out]`; the dense `d_in × d_out` matrix is built only on request
//! (merging, tests).

pub mod cp;
pub mod shape;
pub mod tt;
pub mod tt_linear;
pub mod tucker;

use burn::tensor::{Tensor, backend::Backend};
use tensor_peft_kernels::fused;

/// `x · a · b` for `x: [..., d_in]`, `a: [d_in, r]`, `b: [r, d_out]` → `[..., d_out]`,
/// as two thin GEMMs (never forming `a·b`) on rows, through `fused::linear` (on flex, `gemm`
/// straight into the outputs).
pub fn low_rank_apply<B: Backend, const D: usize>(x: Tensor<B, D>, a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, D> {
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    let mut out = dims;
    out[D - 1] = b.dims()[1];
    fused::linear(fused::linear(x.reshape([rows, dims[D - 1]]), a, None), b, None).reshape(out)
}

/// `‖a · b‖_F²` without forming `a · b`: `Σ (aᵀa) ⊙ (b bᵀ)` over the two `r × r` Gram matrices
/// (cost `r²·(d_in + d_out)` instead of `d_in·d_out·r`).
///
/// Rounding in the Gram products can leave a tiny negative value when `a · b` is almost zero;
/// callers taking a square root clamp at zero.
pub fn low_rank_frobenius_sq<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 1> {
    let gram_a = a.clone().transpose().matmul(a);
    let gram_b = b.clone().matmul(b.transpose());
    (gram_a * gram_b).sum()
}

/// The dense `a · b` (`[d_in, d_out]`), for merging and reference checks.
pub fn low_rank_dense<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    a.matmul(b)
}
