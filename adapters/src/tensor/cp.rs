//! CP (canonical polyadic) updates over heads (LoRTA).
//!
//! For one adapted matrix, head `h` of the output axis gets
//! `ΔW[:, h·d_h..(h+1)·d_h] = A · diag(w_h) · Bᵀ` with `A: [d_in, r]`, `B: [d_h, r]` and the
//! per-head weights `w: [H, r]` (the Hadamard product of the CP factors of the other modes).
//! Since every head shares `A`, the whole matrix is `A · M` with the small output factor
//! `M[k, h·d_h + j] = w[h, k] · B[j, k]`, `M: [r, H·d_h]`: building `M` costs `r·H·d_h` and the update
//! is then applied exactly like LoRA (`low_rank_apply` with `M` as the output factor).

use burn::tensor::{Tensor, backend::Backend};

/// The output factor `M: [r, H·d_h]` of a head-blocked CP update.
pub fn cp_heads_output_factor<B: Backend>(w: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let [heads, rank] = w.dims();
    let [head_dim, _] = b.dims();
    // [H, r, 1] ⊙ [1, r, d_h] → [H, r, d_h] → [r, H, d_h]
    (w.reshape([heads, rank, 1]) * b.transpose().unsqueeze::<3>()).swap_dims(0, 1).reshape([rank, heads * head_dim])
}
