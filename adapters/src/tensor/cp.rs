//! CP (canonical polyadic) updates over heads (LoRTA).
//!
//! For one adapted matrix, head `h` of the output axis gets
//! `ΔW[:, h·d_h..(h+1)·d_h] = A · diag(w_h) · Bᵀ` with `A: [d_in, r]`, `B: [d_h, r]` and the
//! per-head weights `w: [H, r]` (the Hadamard product of the CP factors of the other modes).

use burn::tensor::{Tensor, backend::Backend, module::linear};

/// Applies the head-blocked CP update to `x: [..., d_in]`, giving `[..., H·d_h]`.
///
/// Cost `N·r·(d_in + H·d_h)`, the same as LoRA: `z = x·A`, then every head scales `z` by its
/// weights and projects with `Bᵀ`.
pub fn cp_heads_apply<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    a: Tensor<B, 2>,
    w: Tensor<B, 2>,
    b: Tensor<B, 2>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let [heads, rank] = w.dims();
    let [head_dim, _] = b.dims();
    let tokens: usize = dims[..D - 1].iter().product();
    let z = linear(x, a, None).reshape([tokens, 1, rank]); // [N, 1, r]
    let scaled = z * w.unsqueeze::<3>(); // [N, H, r]
    let out = linear(scaled, b.transpose(), None); // [N, H, d_h]
    let mut out_dims = dims;
    out_dims[D - 1] = heads * head_dim;
    out.reshape(out_dims)
}

/// The dense head-blocked matrix `[d_in, H·d_h]`.
pub fn cp_heads_dense<B: Backend>(a: Tensor<B, 2>, w: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let [d_in, rank] = a.dims();
    let [heads, _] = w.dims();
    let [head_dim, _] = b.dims();
    // [H, d_in, r] · [1, r, d_h] → [H, d_in, d_h] → [d_in, H, d_h]
    let scaled = a.unsqueeze::<3>() * w.reshape([heads, 1, rank]);
    scaled.matmul(b.transpose().unsqueeze::<3>()).swap_dims(0, 1).reshape([d_in, heads * head_dim])
}
