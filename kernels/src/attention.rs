//! Scaled dot-product attention with grouped-query heads, forward and backward.
//!
//! The tensors stay in the projections' own layout, `[batch, seq, heads, head_dim]`, so the
//! caller needs no head transposes and no copies of the key/value heads for grouped-query
//! attention; a query head `h` reads key/value head `h / (heads / kv_heads)`.

use rayon::prelude::*;

use crate::simd::{axpy, dot, exp, multiversion, sum};

/// Sizes of one attention call. `q` and the output are `[batch, q_len, heads, head_dim]`; `k` and
/// `v` are `[batch, kv_len, kv_heads, head_dim]`; the probabilities are
/// `[batch, heads, q_len, kv_len]`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Query positions per sequence.
    pub q_len: usize,
    /// Key/value positions per sequence.
    pub kv_len: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

/// Which keys each query may attend to.
#[derive(Debug, Clone, Copy)]
pub enum Mask<'a> {
    /// Every key.
    None,
    /// Causal: query `i` sits at position `offset + i` and sees keys `0..=offset + i` (a KV cache
    /// holds `offset` earlier positions).
    Causal {
        /// Cached positions before the first query.
        offset: usize,
    },
    /// `[batch, kv_len]`, `true` where the key is padding and must not be attended to.
    KeyPadding(&'a [bool]),
}

impl Mask<'_> {
    /// Keys at or after the returned index are masked for query `i` (all keys for non-causal masks).
    #[inline(always)]
    fn end(&self, i: usize, kv_len: usize) -> usize {
        match *self {
            Mask::Causal { offset } => (offset + i + 1).min(kv_len),
            _ => kv_len,
        }
    }

    #[inline(always)]
    fn is_padding(&self, b: usize, j: usize, kv_len: usize) -> bool {
        match *self {
            Mask::KeyPadding(pad) => pad[b * kv_len + j],
            _ => false,
        }
    }
}

impl AttentionShape {
    fn check(&self, q: usize, k: usize, v: usize, mask: &Mask) {
        let s = self;
        assert!(s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads), "attention: kv_heads must divide heads");
        assert!(q == s.batch * s.q_len * s.heads * s.head_dim, "attention: q must be [batch, q_len, heads, head_dim]");
        assert!(
            k == s.batch * s.kv_len * s.kv_heads * s.head_dim && v == k,
            "attention: k and v must be [batch, kv_len, kv_heads, head_dim]"
        );
        if let Mask::KeyPadding(pad) = mask {
            assert!(pad.len() == s.batch * s.kv_len, "attention: the padding mask must be [batch, kv_len]");
        }
    }

    #[inline(always)]
    fn q_row(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.q_len + i) * self.heads + h) * self.head_dim
    }

    #[inline(always)]
    fn kv_row(&self, b: usize, j: usize, g: usize) -> usize {
        ((b * self.kv_len + j) * self.kv_heads + g) * self.head_dim
    }
}

/// The operands of one attention call, passed whole to the per-task kernels.
#[derive(Clone, Copy)]
struct Problem<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    s: AttentionShape,
    mask: Mask<'a>,
    scale: f32,
}

multiversion! {
    /// One (sequence, query head): the probabilities into `probs` (`[q_len, kv_len]`) and the
    /// output rows into `out` (`[q_len, head_dim]`).
    fn forward_head(problem: Problem, b: usize, h: usize, probs: &mut [f32], out: &mut [f32]) {
        let Problem { q, k, v, s, mask, scale } = problem;
        let g = h / (s.heads / s.kv_heads);
        let dh = s.head_dim;
        for (i, (p, o)) in probs.chunks_exact_mut(s.kv_len).zip(out.chunks_exact_mut(dh)).enumerate() {
            let qi = &q[s.q_row(b, i, h)..][..dh];
            let end = mask.end(i, s.kv_len);
            let (mut max, mut any_key) = (f32::NEG_INFINITY, false);
            for j in 0..end {
                p[j] = if mask.is_padding(b, j, s.kv_len) {
                    f32::NEG_INFINITY
                } else {
                    any_key = true;
                    scale * dot(qi, &k[s.kv_row(b, j, g)..][..dh])
                };
                max = max.max(p[j]);
            }
            p[end..].fill(0.0);
            // (Scores that are NaN leave `max` at −∞ and come out as NaN probabilities: a
            // diverged model must not look finite.)
            if !any_key {
                // Nothing to attend to: zero output (Burn's softmax would give NaN).
                p[..end].fill(0.0);
                o.fill(0.0);
                continue;
            }
            for x in &mut p[..end] {
                *x = if *x == f32::NEG_INFINITY { 0.0 } else { exp(*x - max) };
            }
            let inv = 1.0 / sum(&p[..end]);
            for x in &mut p[..end] {
                *x *= inv;
            }
            o.fill(0.0);
            for (j, &pj) in p[..end].iter().enumerate() {
                if pj != 0.0 {
                    axpy(o, pj, &v[s.kv_row(b, j, g)..][..dh]);
                }
            }
        }
    }
}

multiversion! {
    /// One (sequence, key/value head) and every query head that reads it: `dq` for those heads
    /// (`[heads/kv_heads, q_len, head_dim]`), `dk` and `dv` for the key/value head
    /// (`[kv_len, head_dim]` each, accumulated).
    fn backward_group(problem: Problem, probs: &[f32], grad: &[f32], task: (usize, usize), dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let Problem { q, k, v, s, mask, scale } = problem;
        let (b, g) = task;
        let group = s.heads / s.kv_heads;
        let dh = s.head_dim;
        let mut dp = vec![0.0f32; s.kv_len];
        for (local, dq_head) in dq.chunks_exact_mut(s.q_len * dh).enumerate() {
            let h = g * group + local;
            let head_probs = &probs[(b * s.heads + h) * s.q_len * s.kv_len..][..s.q_len * s.kv_len];
            for (i, (p, dqi)) in head_probs.chunks_exact(s.kv_len).zip(dq_head.chunks_exact_mut(dh)).enumerate() {
                let end = mask.end(i, s.kv_len);
                let qi = &q[s.q_row(b, i, h)..][..dh];
                let doi = &grad[s.q_row(b, i, h)..][..dh];
                // dP = dO·vᵀ; softmax backward dS = P ⊙ (dP − Σⱼ P·dP).
                let mut weighted = 0.0f32;
                for j in 0..end {
                    dp[j] = if p[j] == 0.0 { 0.0 } else { dot(doi, &v[s.kv_row(b, j, g)..][..dh]) };
                    weighted += p[j] * dp[j];
                }
                dqi.fill(0.0);
                for j in 0..end {
                    let pj = p[j];
                    if pj == 0.0 {
                        continue;
                    }
                    let ds = pj * (dp[j] - weighted) * scale;
                    let kv = s.kv_row(b, j, g);
                    axpy(dqi, ds, &k[kv..][..dh]);
                    axpy(&mut dk[j * dh..][..dh], ds, qi);
                    axpy(&mut dv[j * dh..][..dh], pj, doi);
                }
            }
        }
    }
}

/// `softmax(scale·q·kᵀ + mask)·v` into `out`, keeping the probabilities in `probs` for the
/// backward. Parallel over (sequence, query head).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    mask: Mask,
    scale: f32,
    out: &mut [f32],
    probs: &mut [f32],
) {
    let s = shape;
    s.check(q.len(), k.len(), v.len(), &mask);
    assert!(out.len() == q.len(), "attention_forward: out must be shaped as q");
    assert!(
        probs.len() == s.batch * s.heads * s.q_len * s.kv_len,
        "attention_forward: probs must be [batch, heads, q_len, kv_len]"
    );
    let problem = Problem { q, k, v, s, mask, scale };
    let block = s.q_len * s.kv_len;
    if block == 0 || s.head_dim == 0 {
        out.fill(0.0);
        return;
    }
    let rows: Vec<Vec<f32>> = probs
        .par_chunks_mut(block)
        .enumerate()
        .map(|(task, p)| {
            let mut o = vec![0.0f32; s.q_len * s.head_dim];
            forward_head(problem, task / s.heads, task % s.heads, p, &mut o);
            o
        })
        .collect();
    // Each task's rows go to their `[b, i, h, :]` slots.
    let dh = s.head_dim;
    for (task, o) in rows.iter().enumerate() {
        let (b, h) = (task / s.heads, task % s.heads);
        for (i, row) in o.chunks_exact(dh).enumerate() {
            out[s.q_row(b, i, h)..][..dh].copy_from_slice(row);
        }
    }
}

/// Gradients of [`attention_forward`] for the output gradient `grad`, from the probabilities it
/// kept: `dq` (shaped as `q`), `dk` and `dv` (shaped as `k`). Parallel over (sequence, key/value
/// head), so grouped query heads accumulate into their shared `dk`, `dv` without contention.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    grad: &[f32],
    shape: AttentionShape,
    mask: Mask,
    scale: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let s = shape;
    s.check(q.len(), k.len(), v.len(), &mask);
    assert!(grad.len() == q.len() && dq.len() == q.len(), "attention_backward: grad and dq must be shaped as q");
    assert!(dk.len() == k.len() && dv.len() == k.len(), "attention_backward: dk and dv must be shaped as k");
    assert!(
        probs.len() == s.batch * s.heads * s.q_len * s.kv_len,
        "attention_backward: probs must be [batch, heads, q_len, kv_len]"
    );
    let problem = Problem { q, k, v, s, mask, scale };
    let dh = s.head_dim;
    let group = s.heads / s.kv_heads;
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (b, g) = (task / s.kv_heads, task % s.kv_heads);
            let mut dq_local = vec![0.0f32; group * s.q_len * dh];
            let mut dk_local = vec![0.0f32; s.kv_len * dh];
            let mut dv_local = vec![0.0f32; s.kv_len * dh];
            backward_group(problem, probs, grad, (b, g), &mut dq_local, &mut dk_local, &mut dv_local);
            (dq_local, dk_local, dv_local)
        })
        .collect();
    for (task, (dq_local, dk_local, dv_local)) in parts.iter().enumerate() {
        let (b, g) = (task / s.kv_heads, task % s.kv_heads);
        for (local, head) in dq_local.chunks_exact(s.q_len * dh).enumerate() {
            let h = g * group + local;
            for (i, row) in head.chunks_exact(dh).enumerate() {
                dq[s.q_row(b, i, h)..][..dh].copy_from_slice(row);
            }
        }
        for (j, (dk_row, dv_row)) in dk_local.chunks_exact(dh).zip(dv_local.chunks_exact(dh)).enumerate() {
            dk[s.kv_row(b, j, g)..][..dh].copy_from_slice(dk_row);
            dv[s.kv_row(b, j, g)..][..dh].copy_from_slice(dv_row);
        }
    }
}
