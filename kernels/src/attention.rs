//! Scaled dot-product attention with grouped-query heads, forward and backward.
//!
//! The tensors stay in the projections' own layout, `[batch, seq, heads, head_dim]`, so the
//! caller needs no head transposes and no copies of the key/value heads for grouped-query
//! attention; a query head `h` reads key/value head `h / (heads / kv_heads)`.
//!
//! The forward keeps one number per query row for the backward, the log-sum-exp of its scores,
//! rather than the `[q_len, kv_len]` probabilities of every head (1 GiB over LLaMA-2-7B's layers at
//! 512 tokens): the backward recomputes them a block of queries at a time (one more `Q·Kᵀ`), as
//! FlashAttention does.
//!
//! The per-head products run in f32, or with [`ComputeDType::Bf16`] on bf16 operands with f32
//! accumulation (`scale·Q`, `K`, `V`, the probabilities, the output's gradient and the scores'
//! gradient rounded as they enter a product), as PyTorch's attention over a bf16 model; the
//! softmax, its log-sum-exp and its backward stay f32.

use rayon::prelude::*;

use crate::ComputeDType;
use crate::bf16_gemm::{self, Buffers, Kernel, PackedB, Strided, Weight};
use crate::matmul::{View, matmul_strided};
use crate::simd::{dot, exp, max, multiversion, sum};

/// One task's per-head products, at the precision of the call.
enum Products {
    /// f32 operands on `gemm`.
    F32,
    /// bf16 operands, f32 accumulation, with the task's packing buffers and its right operands
    /// packed once per head ([`Products::prepare`]).
    Bf16 { kernel: Kernel, buffers: Box<Buffers>, packed: [PackedB; 3] },
}

impl Products {
    fn new(dtype: ComputeDType) -> Products {
        match dtype {
            ComputeDType::F32 => Products::F32,
            ComputeDType::Bf16 => {
                Products::Bf16 { kernel: Kernel::detect(), buffers: Box::default(), packed: Default::default() }
            }
        }
    }

    /// Readies `operands` (a head's keys and values, as right operands) for [`Products::mul_prefix`]
    /// with the same slot: with bf16 each is packed once here, for every block of queries.
    fn prepare(&mut self, operands: &[View]) {
        if let Products::Bf16 { kernel, buffers, packed } = self {
            for (slot, b) in packed.iter_mut().zip(operands) {
                slot.pack(*kernel, Weight::F32(strided(*b)), b.rows, b.cols, buffers);
            }
        }
    }

    /// `dst = beta·lhs·rhs` (or `+=` with `accumulate`), `dst` rows `dst_row_stride` apart.
    fn mul(&mut self, dst: &mut [f32], dst_row_stride: usize, lhs: View, rhs: View, beta: f32, accumulate: bool) {
        match self {
            Products::F32 => matmul_strided(dst, dst_row_stride, lhs, rhs, beta, accumulate),
            Products::Bf16 { kernel, buffers, .. } => {
                assert!(rhs.rows == lhs.cols, "attention: inner dimensions {} and {} differ", lhs.cols, rhs.rows);
                let b = Weight::F32(strided(rhs));
                bf16_gemm::matmul_single(*kernel, lhs, beta, b, rhs.cols, dst, dst_row_stride, accumulate, buffers)
            }
        }
    }

    /// [`Products::mul`] with `rhs` the leading `rows × cols` of the operand prepared in `slot`.
    #[allow(clippy::too_many_arguments)]
    fn mul_prefix(
        &mut self,
        slot: usize,
        dst: &mut [f32],
        dst_row_stride: usize,
        lhs: View,
        rhs: View,
        beta: f32,
        accumulate: bool,
    ) {
        match self {
            // An odd prefix of the packed rows would meet a row outside the product.
            Products::Bf16 { kernel, buffers, packed }
                if rhs.rows.is_multiple_of(2) || rhs.rows == packed[slot].rows() =>
            {
                assert!(rhs.rows == lhs.cols, "attention: inner dimensions {} and {} differ", lhs.cols, rhs.rows);
                let b = &packed[slot];
                bf16_gemm::matmul_packed(*kernel, lhs, beta, b, rhs.cols, dst, dst_row_stride, accumulate, buffers)
            }
            _ => self.mul(dst, dst_row_stride, lhs, rhs, beta, accumulate),
        }
    }
}

/// A view as the bf16 GEMM's right operand.
fn strided(b: View) -> Strided<f32> {
    Strided { data: b.data, offset: b.offset, k_stride: b.row_stride, n_stride: b.col_stride }
}

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
    /// holds `offset` earlier positions), or with a sliding `window` only the last `window` of them
    /// (Mistral).
    Causal {
        /// Cached positions before the first query.
        offset: usize,
        /// How many keys, ending at its own position, a query sees; `None`: all earlier keys.
        window: Option<usize>,
    },
    /// `[batch, kv_len]`, `true` where the key is padding and must not be attended to.
    KeyPadding(&'a [bool]),
}

impl Mask<'_> {
    /// Keys at or after the returned index are masked for query `i` (all keys for non-causal masks).
    #[inline(always)]
    fn end(&self, i: usize, kv_len: usize) -> usize {
        match *self {
            Mask::Causal { offset, .. } => (offset + i + 1).min(kv_len),
            _ => kv_len,
        }
    }

    /// Keys before the returned index are outside query `i`'s sliding window.
    #[inline(always)]
    fn begin(&self, i: usize) -> usize {
        match *self {
            Mask::Causal { offset, window: Some(window) } => (offset + i + 1).saturating_sub(window),
            _ => 0,
        }
    }
}

/// Query rows per block of the causal kernels: a block's products stop at the last key its last
/// query sees, so about half of the masked upper triangle is never computed.
const QUERY_BLOCK: usize = 64;

impl Mask<'_> {
    /// Rows of the largest of [`Self::query_blocks`] (a buffer of that many score rows serves all).
    fn query_block_rows(&self, q_len: usize) -> usize {
        if matches!(self, Mask::Causal { .. }) { QUERY_BLOCK.min(q_len) } else { q_len }
    }

    /// The query blocks `(first, end, keys)` of `q_len` queries: rows `first..end`, which see no
    /// key at or after `keys`. One block of every query and key unless the mask is causal.
    fn query_blocks(&self, q_len: usize, kv_len: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let step = self.query_block_rows(q_len).max(1);
        (0..q_len).step_by(step).map(move |first| {
            let end = (first + step).min(q_len);
            (first, end, self.end(end - 1, kv_len))
        })
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

impl Problem<'_> {
    /// Query head `h` of sequence `b` as a `[q_len, head_dim]` view of `x` (`q`, or a tensor shaped
    /// like it).
    fn query_head<'x>(&self, x: &'x [f32], b: usize, h: usize) -> View<'x> {
        let s = self.s;
        View::rows(x, s.q_row(b, 0, h), s.q_len, s.head_dim, s.heads * s.head_dim)
    }

    /// Key/value head `g` of sequence `b` as a `[kv_len, head_dim]` view of `x` (`k` or `v`).
    fn kv_head<'x>(&self, x: &'x [f32], b: usize, g: usize) -> View<'x> {
        let s = self.s;
        View::rows(x, s.kv_row(b, 0, g), s.kv_len, s.head_dim, s.kv_heads * s.head_dim)
    }
}

multiversion! {
    /// Scaled scores of query rows `first..` of one (sequence `b`, head) in `p` (rows of
    /// `kv_len`) to masked softmax probabilities, in place, and each row's log-sum-exp of its seen
    /// scores into `lse` (`+∞` for a row that sees no key), from which [`probs_from_scores`]
    /// recomputes the probabilities.
    fn softmax_rows(problem: Problem, b: usize, first: usize, p: &mut [f32], lse: &mut [f32]) {
        let Problem { s, mask, .. } = problem;
        for ((r, row), lse) in p.chunks_exact_mut(s.kv_len).enumerate().zip(lse.iter_mut()) {
            let i = first + r;
            let end = mask.end(i, s.kv_len);
            row[end..].fill(0.0);
            // −∞ scores come out as zero probabilities, so the backward needs no window of its own.
            row[..mask.begin(i).min(end)].fill(f32::NEG_INFINITY);
            let scores = &mut row[..end];
            let any_key = match mask {
                Mask::KeyPadding(pad) => {
                    let mut any_key = false;
                    for (score, &padded) in scores.iter_mut().zip(&pad[b * s.kv_len..][..end]) {
                        *score = if padded { f32::NEG_INFINITY } else { *score };
                        any_key |= !padded;
                    }
                    any_key
                }
                _ => end > 0,
            };
            if !any_key {
                // Nothing to attend to: zero probabilities, zero output (Burn's softmax: NaN).
                scores.fill(0.0);
                *lse = f32::INFINITY;
                continue;
            }
            // Scores that are NaN leave `max` at −∞ and come out as NaN probabilities: a diverged
            // model must not look finite.
            let max = max(scores);
            for x in scores.iter_mut() {
                *x = if *x == f32::NEG_INFINITY { 0.0 } else { exp(*x - max) };
            }
            let total = sum(scores);
            *lse = max + total.ln();
            let inv = 1.0 / total;
            for x in scores.iter_mut() {
                *x *= inv;
            }
        }
    }
}

multiversion! {
    /// Scaled scores to probabilities again in the backward, `exp(s − lse)` where the forward's
    /// mask let a key through and zero elsewhere: rows `first..` of one (sequence `b`, head) in `p`
    /// (`kv_len` apart; their first `keys` elements, the rest never read), with their `lse` from
    /// [`softmax_rows`].
    fn probs_from_scores(problem: Problem, b: usize, first: usize, p: &mut [f32], keys: usize, lse: &[f32]) {
        let Problem { s, mask, .. } = problem;
        for ((r, row), &lse) in p.chunks_mut(s.kv_len).enumerate().zip(lse) {
            let i = first + r;
            let end = mask.end(i, s.kv_len).min(keys);
            let begin = mask.begin(i).min(end);
            let row = &mut row[..keys];
            if lse == f32::INFINITY {
                row.fill(0.0);
                continue;
            }
            row[..begin].fill(0.0);
            row[end..].fill(0.0);
            match mask {
                Mask::KeyPadding(pad) => {
                    for (x, &padded) in row[begin..end].iter_mut().zip(&pad[b * s.kv_len + begin..]) {
                        *x = if padded { 0.0 } else { exp(*x - lse) };
                    }
                }
                _ => row[begin..end].iter_mut().for_each(|x| *x = exp(*x - lse)),
            }
        }
    }
}

multiversion! {
    /// `dP` (rows of `kv_len`, in place, only their first `keys` elements read and written: `P`
    /// is zero after them) to the scores' gradient `scale·P ⊙ (dP − Σⱼ P·dP)`.
    fn softmax_backward_rows(p: &[f32], dp: &mut [f32], kv_len: usize, keys: usize, scale: f32) {
        for (pr, dr) in p.chunks(kv_len).zip(dp.chunks_mut(kv_len)) {
            let (pr, dr) = (&pr[..keys], &mut dr[..keys]);
            let weighted = dot(pr, dr);
            for (d, &pj) in dr.iter_mut().zip(pr) {
                *d = pj * (*d - weighted) * scale;
            }
        }
    }
}

/// One (sequence, query head), a block of queries at a time: `S = scale·Q·Kᵀ` into a buffer of
/// the block's score rows, the masked softmax in place (each row's log-sum-exp into `lse`), and
/// `P·V` into `out` (`[q_len, head_dim]`). Under a causal mask each block multiplies only the keys
/// it may see (the rest of its scores are set by the softmax).
fn forward_head(problem: Problem, products: &mut Products, b: usize, h: usize, lse: &mut [f32], out: &mut [f32]) {
    let s = problem.s;
    let g = h / (s.heads / s.kv_heads);
    let (q, k, v) =
        (problem.query_head(problem.q, b, h), problem.kv_head(problem.k, b, g), problem.kv_head(problem.v, b, g));
    let mut probs = vec![0.0f32; problem.mask.query_block_rows(s.q_len) * s.kv_len];
    products.prepare(&[k.t(), v]);
    for (first, end, keys) in problem.mask.query_blocks(s.q_len, s.kv_len) {
        let rows = end - first;
        let p_rows = &mut probs[..rows * s.kv_len];
        let (q_block, k_seen, v_seen) = (q.row_range(first, end), k.row_range(0, keys), v.row_range(0, keys));
        products.mul_prefix(0, p_rows, s.kv_len, q_block, k_seen.t(), problem.scale, false);
        softmax_rows(problem, b, first, p_rows, &mut lse[first..end]);
        let p_block = View { cols: keys, ..View::rows(p_rows, 0, rows, s.kv_len, s.kv_len) };
        products.mul_prefix(1, &mut out[first * s.head_dim..], s.head_dim, p_block, v_seen, 1.0, false);
    }
}

/// One (sequence, key/value head) and every query head that reads it: `dq` for those heads
/// (`[heads/kv_heads, q_len, head_dim]`), `dk` and `dv` for the key/value head (`[kv_len,
/// head_dim]` each, zeroed by the caller, accumulated over the heads). Causal masks go block by
/// block of queries, as in the forward.
#[allow(clippy::too_many_arguments)]
fn backward_group(
    problem: Problem,
    products: &mut Products,
    lse: &[f32],
    grad: &[f32],
    b: usize,
    g: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let s = problem.s;
    let group = s.heads / s.kv_heads;
    let (k, v) = (problem.kv_head(problem.k, b, g), problem.kv_head(problem.v, b, g));
    // One block of queries' probabilities (recomputed) and scores' gradient at a time.
    let buffer = problem.mask.query_block_rows(s.q_len) * s.kv_len;
    let (mut p, mut ds) = (vec![0.0f32; buffer], vec![0.0f32; buffer]);
    products.prepare(&[k.t(), v.t(), k]);
    for (local, dq_head) in dq.chunks_exact_mut(s.q_len * s.head_dim).enumerate() {
        let h = g * group + local;
        let head_lse = &lse[(b * s.heads + h) * s.q_len..][..s.q_len];
        let (q, d_out) = (problem.query_head(problem.q, b, h), problem.query_head(grad, b, h));
        for (first, end, keys) in problem.mask.query_blocks(s.q_len, s.kv_len) {
            let rows = end - first;
            let (q_block, d_out_block) = (q.row_range(first, end), d_out.row_range(first, end));
            let (k_seen, v_seen) = (k.row_range(0, keys), v.row_range(0, keys));
            // P = exp(scale·Q·Kᵀ − lse), masked as in the forward.
            let p_rows = &mut p[..rows * s.kv_len];
            products.mul_prefix(0, p_rows, s.kv_len, q_block, k_seen.t(), problem.scale, false);
            probs_from_scores(problem, b, first, p_rows, keys, &head_lse[first..end]);
            let p_block = View { cols: keys, ..View::rows(p_rows, 0, rows, s.kv_len, s.kv_len) };
            // dV += Pᵀ·dO; dP = dO·Vᵀ, then dS = scale·P ⊙ (dP − rowsum(P ⊙ dP)).
            products.mul(&mut dv[..keys * s.head_dim], s.head_dim, p_block.t(), d_out_block, 1.0, true);
            let ds_rows = &mut ds[..rows * s.kv_len];
            products.mul_prefix(1, ds_rows, s.kv_len, d_out_block, v_seen.t(), 1.0, false);
            softmax_backward_rows(p_rows, ds_rows, s.kv_len, keys, problem.scale);
            let ds_block = View { cols: keys, ..View::rows(ds_rows, 0, rows, s.kv_len, s.kv_len) };
            // dQ = dS·K; dK += dSᵀ·Q.
            products.mul_prefix(2, &mut dq_head[first * s.head_dim..], s.head_dim, ds_block, k_seen, 1.0, false);
            products.mul(&mut dk[..keys * s.head_dim], s.head_dim, ds_block.t(), q_block, 1.0, true);
        }
    }
}

/// `softmax(scale·q·kᵀ + mask)·v` into `out`, keeping for the backward only each query row's
/// log-sum-exp of its scores in `lse` (`[batch, heads, q_len]`), not the probabilities: the
/// backward recomputes them a block of queries at a time, as FlashAttention does. The products
/// run at `dtype` (the backward must be given the same). Parallel over (sequence, query head).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    mask: Mask,
    scale: f32,
    dtype: ComputeDType,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let s = shape;
    s.check(q.len(), k.len(), v.len(), &mask);
    assert!(out.len() == q.len(), "attention_forward: out must be shaped as q");
    assert!(lse.len() == s.batch * s.heads * s.q_len, "attention_forward: lse must be [batch, heads, q_len]");
    let problem = Problem { q, k, v, s, mask, scale };
    if s.q_len == 0 || s.kv_len == 0 || s.head_dim == 0 {
        out.fill(0.0);
        lse.fill(f32::INFINITY);
        return;
    }
    let rows: Vec<Vec<f32>> = lse
        .par_chunks_mut(s.q_len)
        .enumerate()
        .map_init(
            || Products::new(dtype),
            |products, (task, lse)| {
                let mut o = vec![0.0f32; s.q_len * s.head_dim];
                forward_head(problem, products, task / s.heads, task % s.heads, lse, &mut o);
                o
            },
        )
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

/// Gradients of [`attention_forward`] for the output gradient `grad`, from the log-sum-exp `lse` it
/// kept (the probabilities recomputed): `dq` (shaped as `q`), `dk` and `dv` (shaped as `k`), with
/// the products at the forward's `dtype`. Parallel over (sequence, key/value head), so grouped
/// query heads accumulate into their shared `dk`, `dv` without contention.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    grad: &[f32],
    shape: AttentionShape,
    mask: Mask,
    scale: f32,
    dtype: ComputeDType,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let s = shape;
    s.check(q.len(), k.len(), v.len(), &mask);
    assert!(grad.len() == q.len() && dq.len() == q.len(), "attention_backward: grad and dq must be shaped as q");
    assert!(dk.len() == k.len() && dv.len() == k.len(), "attention_backward: dk and dv must be shaped as k");
    assert!(lse.len() == s.batch * s.heads * s.q_len, "attention_backward: lse must be [batch, heads, q_len]");
    let problem = Problem { q, k, v, s, mask, scale };
    let dh = s.head_dim;
    let group = s.heads / s.kv_heads;
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map_init(
            || Products::new(dtype),
            |products, task| {
                let (b, g) = (task / s.kv_heads, task % s.kv_heads);
                let mut dq_local = vec![0.0f32; group * s.q_len * dh];
                let mut dk_local = vec![0.0f32; s.kv_len * dh];
                let mut dv_local = vec![0.0f32; s.kv_len * dh];
                backward_group(problem, products, lse, grad, b, g, &mut dq_local, &mut dk_local, &mut dv_local);
                (dq_local, dk_local, dv_local)
            },
        )
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
