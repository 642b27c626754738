//! Tucker-2 over a family of matrices (LoTR): `ΔW_l = A · G_l · Bᵀ`, with the outer factors
//! `A` and `B` shared by the family and one small core `G_l` per matrix.
//!
//! Burn layout: `a: [d_in, r]`, `g: [r, r]`, `bt = Bᵀ: [r, d_out]`.

use super::low_rank_apply;
use burn::tensor::{Tensor, backend::Backend};

/// `x · A · G · Bᵀ` (the core is folded into the output factor first: `r²·d_out` flops).
pub fn tucker2_apply<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    a: Tensor<B, 2>,
    g: Tensor<B, 2>,
    bt: Tensor<B, 2>,
) -> Tensor<B, D> {
    let (a, out) = tucker2_factors(a, g, bt);
    low_rank_apply(x, a, out)
}

/// `(A, G·Bᵀ)`: the update as a product of two thin factors, `[d_in, r]` and `[r, d_out]`.
pub fn tucker2_factors<B: Backend>(a: Tensor<B, 2>, g: Tensor<B, 2>, bt: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    (a, g.matmul(bt))
}
