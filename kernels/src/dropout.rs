//! Inverted dropout whose mask is a hash of the element index and a seed: one pass forward, one
//! pass backward, and no mask kept in memory between them.

use rayon::prelude::*;

use crate::CHUNK;
use crate::simd::multiversion;

/// Whether element `i` is kept: a uniform number in [0, 1) from `i` and `seed` (a Weyl step
/// through murmur3's 32-bit finaliser, on 32-bit lanes so that the loop vectorises) below `keep`.
#[inline(always)]
fn kept(i: u32, seed: [u32; 2], keep: f32) -> bool {
    let mut h = i.wrapping_mul(0x9E37_79B9) ^ seed[0];
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35) ^ seed[1];
    h ^= h >> 16;
    ((h >> 8) as f32) * (1.0 / (1u32 << 24) as f32) < keep
}

multiversion! {
    /// `out = x·mask/keep`, or `out += x·mask/keep` with `accumulate` (loop-invariant, so the
    /// compiler keeps one branch-free loop per case).
    fn masked_chunk(x: &[f32], out: &mut [f32], first: u32, seed: [u32; 2], keep: f32, accumulate: bool) {
        let scale = 1.0 / keep;
        for (k, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            let masked = if kept(first.wrapping_add(k as u32), seed, keep) { v * scale } else { 0.0 };
            *o = if accumulate { *o + masked } else { masked };
        }
    }
}

/// The mask of `seed` and `keep` applied to `x`, written into or added to `out`, in parallel.
fn masked(x: &[f32], seed: u64, keep: f32, out: &mut [f32], accumulate: bool, what: &str) {
    assert!(x.len() == out.len(), "{what}: slice lengths differ");
    assert!(keep > 0.0 && keep <= 1.0, "{what}: the keep probability must be in (0, 1]");
    let seed = [seed as u32, (seed >> 32) as u32];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(task, (o, x))| masked_chunk(x, o, (task * CHUNK) as u32, seed, keep, accumulate));
}

/// `out = x · mask / keep` with `mask[i] = 1` with probability `keep` (in `(0, 1]`), drawn from
/// `seed` and the index `i`. The backward is the same call on the output gradient with the same
/// seed. Indices wrap at 2³², beyond any activation this crate meets.
pub fn dropout(x: &[f32], seed: u64, keep: f32, out: &mut [f32]) {
    masked(x, seed, keep, out, false, "dropout");
}

/// `out += x · mask / keep` with the mask of [`dropout`] for the same `seed` and `keep`: a masked
/// gradient added into one that another branch already wrote.
pub fn dropout_add(x: &[f32], seed: u64, keep: f32, out: &mut [f32]) {
    masked(x, seed, keep, out, true, "dropout_add");
}
