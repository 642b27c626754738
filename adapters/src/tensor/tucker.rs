//! Tucker-2 over a family of matrices (LoTR): `ΔW_l = A · G_l · Bᵀ`, with the outer factors
//! `A` and `B` shared by the family and one small core `G_l` per matrix.
//!
//! Burn layout: `a: [d_in, r]`, `g: [r, r]`, `bt = Bᵀ: [r, d_out]`.

use burn::tensor::{Tensor, backend::Backend};

/// `(A, G·Bᵀ)`: the update as a product of two thin factors, `[d_in, r]` and `[r, d_out]`
/// (folding the core into the output factor costs `r²·d_out`, independent of the tokens).
pub fn tucker2_factors<B: Backend>(a: Tensor<B, 2>, g: Tensor<B, 2>, bt: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    (a, g.matmul(bt))
}
