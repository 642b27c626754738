//! Rotary position embedding in HF's rotate-half layout.

use rayon::prelude::*;

use crate::rows_per_task;
use crate::simd::multiversion;

/// Shape of a RoPE application: `x` is `[batch·seq, heads, head_dim]` (row `r` at sequence position
/// `r % seq`), and `cos`, `sin` are `[seq, head_dim / 2]` tables for those positions.
#[derive(Debug, Clone, Copy)]
pub struct RopeShape {
    /// Positions per sequence (rows of the tables).
    pub seq: usize,
    /// Heads per row.
    pub heads: usize,
    /// Elements per head; even.
    pub head_dim: usize,
}

multiversion! {
    fn rotate_rows(x: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], first_row: usize, shape: RopeShape, sign: f32) {
        let half = shape.head_dim / 2;
        let width = shape.heads * shape.head_dim;
        for (i, (xr, or)) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)).enumerate() {
            let pos = (first_row + i) % shape.seq;
            let c = &cos[pos * half..(pos + 1) * half];
            let s = &sin[pos * half..(pos + 1) * half];
            for (xh, oh) in xr.chunks_exact(shape.head_dim).zip(or.chunks_exact_mut(shape.head_dim)) {
                let (x1, x2) = xh.split_at(half);
                let (o1, o2) = oh.split_at_mut(half);
                for j in 0..half {
                    let s = sign * s[j];
                    o1[j] = x1[j] * c[j] - x2[j] * s;
                    o2[j] = x2[j] * c[j] + x1[j] * s;
                }
            }
        }
    }
}

/// `out = x·cos + rotate_half(x)·sin` per head, with `rotate_half([x₁, x₂]) = [−x₂, x₁]`
/// (`inverse = false`), or the transposed rotation `x·cos − rotate_half(x)·sin` (`inverse = true`),
/// which is RoPE's backward: the rotation is orthogonal, so its gradient is the rotation by −θ.
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], shape: RopeShape, inverse: bool, out: &mut [f32]) {
    let RopeShape { seq, heads, head_dim } = shape;
    let width = heads * head_dim;
    assert!(head_dim % 2 == 0 && width > 0, "rope: head_dim must be even and non-zero");
    assert!(x.len() == out.len() && x.len().is_multiple_of(width), "rope: x and out must be [rows, heads, head_dim]");
    assert!(cos.len() == seq * head_dim / 2 && sin.len() == cos.len(), "rope: tables must be [seq, head_dim/2]");
    assert!(seq > 0 && (x.len() / width).is_multiple_of(seq), "rope: rows must be whole sequences");
    let sign = if inverse { -1.0 } else { 1.0 };
    let rows = rows_per_task(width);
    x.par_chunks(rows * width)
        .zip(out.par_chunks_mut(rows * width))
        .enumerate()
        .for_each(|(task, (x, out))| rotate_rows(x, out, cos, sin, task * rows, shape, sign));
}
