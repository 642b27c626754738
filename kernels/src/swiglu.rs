//! SwiGLU, LLaMA's MLP gate: `silu(gate) · up` with `silu(g) = g·σ(g)`.

use rayon::prelude::*;

use crate::CHUNK;
use crate::simd::{multiversion, sigmoid};

multiversion! {
    fn forward_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

multiversion! {
    fn backward_chunk(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
        for ((((dg, du), &g), &u), &dy) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(gate).zip(up).zip(grad) {
            let s = sigmoid(g);
            *du = dy * g * s;
            // d silu / dg = σ(g) + g·σ(g)·(1 − σ(g))
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// `out = silu(gate) · up`, element-wise. All slices have one length.
pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len(), "swiglu_forward: slice lengths differ");
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((o, g), u)| forward_chunk(g, u, o));
}

/// Gradients of [`swiglu_forward`] for the output gradient `grad`: `d_gate` and `d_up`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    let n = grad.len();
    assert!(
        gate.len() == n && up.len() == n && d_gate.len() == n && d_up.len() == n,
        "swiglu_backward: slice lengths differ"
    );
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|((((dg, du), g), u), dy)| backward_chunk(g, u, dy, dg, du));
}
