//! Softmax cross-entropy over vocabulary-sized rows, with its gradient, in place.

use rayon::prelude::*;

use crate::simd::{exp, max, multiversion};

multiversion! {
    /// One row: returns `(log softmax(z)[target], Σ exp(z − max))` and leaves `exp(z − max)` in `z`.
    fn exp_row(z: &mut [f32], target: usize) -> (f32, f32) {
        let max = max(z);
        let shifted_target = z[target] - max;
        let mut sums = [0.0f32; 8];
        let mut chunks = z.chunks_exact_mut(8);
        for c in &mut chunks {
            for k in 0..8 {
                c[k] = exp(c[k] - max);
                sums[k] += c[k];
            }
        }
        let mut sum = 0.0f32;
        for v in chunks.into_remainder() {
            *v = exp(*v - max);
            sum += *v;
        }
        let sum = sum + sums.iter().sum::<f32>();
        (shifted_target - sum.ln(), sum)
    }
}

multiversion! {
    fn scale_row(z: &mut [f32], factor: f32) {
        for v in z.iter_mut() {
            *v *= factor;
        }
    }
}

/// For each `vocab`-wide row `z` of `logits` with target `t` and weight `w`: adds
/// `−w·log softmax(z)[t]` to the returned sum and overwrites the row with the gradient of that
/// term, `w·(softmax(z) − onehot(t))`. Three passes per row (max, exp and sum, scale), rows in
/// parallel; the per-row losses are summed in f64 in row order, so the result is the same on
/// every run.
pub fn softmax_cross_entropy(logits: &mut [f32], vocab: usize, targets: &[usize], weights: &[f32]) -> f64 {
    let rows = targets.len();
    assert!(vocab > 0 && logits.len() == rows * vocab, "softmax_cross_entropy: logits must be [targets, vocab]");
    assert!(weights.len() == rows, "softmax_cross_entropy: one weight per row");
    assert!(targets.iter().all(|&t| t < vocab), "softmax_cross_entropy: a target is outside the vocabulary");
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(weights.par_iter())
        .map(|((z, &target), &w)| {
            let (log_p, sum) = exp_row(z, target);
            scale_row(z, w / sum);
            z[target] -= w;
            -(w as f64) * log_p as f64
        })
        .collect();
    losses.iter().sum()
}
