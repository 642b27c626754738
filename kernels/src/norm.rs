//! Row normalisations: RMSNorm (LLaMA), `y = x / √(mean(x²) + ε) · γ`, and LayerNorm (BERT),
//! `y = (x − mean(x)) / √(var(x) + ε) · γ + β`.

use rayon::prelude::*;

use crate::rows_per_task;
use crate::simd::{dot, dot3, multiversion, sum};

/// `1/√(mean(x²) + ε)` of one row.
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt()
}

multiversion! {
    fn forward_rows(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
        let d = gamma.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let r = inv_rms(xr, eps);
            for ((o, &v), &g) in or.iter_mut().zip(xr).zip(gamma) {
                *o = v * r * g;
            }
        }
    }
}

multiversion! {
    fn backward_rows(x: &[f32], gamma: &[f32], grad: &[f32], eps: f32, dx: &mut [f32], d_gamma: &mut [f32]) {
        let d = gamma.len();
        for ((xr, gr), dxr) in x.chunks_exact(d).zip(grad.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let r = inv_rms(xr, eps);
            // With x̂ = x·r and g = dy·γ: dx = r·(g − x̂·mean(g·x̂)), dγ += dy·x̂.
            let c = dot3(gr, gamma, xr) * r * r / d as f32;
            for (((o, &v), &dy), &w) in dxr.iter_mut().zip(xr).zip(gr).zip(gamma) {
                *o = r * (dy * w - v * c);
            }
            for ((dg, &v), &dy) in d_gamma.iter_mut().zip(xr).zip(gr) {
                *dg += dy * v * r;
            }
        }
    }
}

/// RMSNorm of each `gamma.len()`-wide row of `x` into `out`.
pub fn rms_norm_forward(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let d = gamma.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && out.len() == x.len(),
        "rms_norm_forward: x and out must be [rows, d]"
    );
    let rows = rows_per_task(d) * d;
    x.par_chunks(rows).zip(out.par_chunks_mut(rows)).for_each(|(x, out)| forward_rows(x, gamma, eps, out));
}

/// Gradients of [`rms_norm_forward`] for the output gradient `grad`: `dx` (same shape as `x`) and
/// the returned `dγ` (summed over rows).
pub fn rms_norm_backward(x: &[f32], gamma: &[f32], grad: &[f32], eps: f32, dx: &mut [f32]) -> Vec<f32> {
    let d = gamma.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && grad.len() == x.len() && dx.len() == x.len(),
        "rms_norm_backward: x, grad and dx must be [rows, d]"
    );
    let rows = rows_per_task(d) * d;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(rows)
        .zip(grad.par_chunks(rows))
        .zip(dx.par_chunks_mut(rows))
        .map(|((x, grad), dx)| {
            let mut d_gamma = vec![0.0f32; d];
            backward_rows(x, gamma, grad, eps, dx, &mut d_gamma);
            d_gamma
        })
        .collect();
    // Summed in task order, not in rayon's stealing order: the same numbers on every run.
    let mut d_gamma = vec![0.0f32; d];
    for partial in &partials {
        d_gamma.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
    }
    d_gamma
}

/// `(mean, 1/√(var + ε))` of one row (biased variance, as PyTorch and Burn).
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            let d = c[k] - mean;
            acc[k] += d * d;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
    let var = (acc.iter().sum::<f32>() + tail) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

multiversion! {
    fn layer_norm_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
        let d = gamma.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let (mean, r) = moments(xr, eps);
            for (((o, &v), &g), &b) in or.iter_mut().zip(xr).zip(gamma).zip(beta) {
                *o = (v - mean) * r * g + b;
            }
        }
    }
}

multiversion! {
    fn layer_norm_backward_rows(x: &[f32], gamma: &[f32], grad: &[f32], eps: f32, dx: &mut [f32], d_gamma: &mut [f32], d_beta: &mut [f32]) {
        let d = gamma.len();
        let n = d as f32;
        for ((xr, gr), dxr) in x.chunks_exact(d).zip(grad.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let (mean, r) = moments(xr, eps);
            // With x̂ = (x − μ)·r and g = dy·γ: dx = r·(g − mean(g) − x̂·mean(g·x̂)).
            let (mut sum_g, mut sum_gx) = (0.0f32, 0.0f32);
            for ((&v, &dy), &w) in xr.iter().zip(gr).zip(gamma) {
                let g = dy * w;
                sum_g += g;
                sum_gx += g * (v - mean) * r;
            }
            let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
            for (((o, &v), &dy), &w) in dxr.iter_mut().zip(xr).zip(gr).zip(gamma) {
                let xhat = (v - mean) * r;
                *o = r * (dy * w - mean_g - xhat * mean_gx);
            }
            for (((dg, db), &v), &dy) in d_gamma.iter_mut().zip(d_beta.iter_mut()).zip(xr).zip(gr) {
                *dg += dy * (v - mean) * r;
                *db += dy;
            }
        }
    }
}

/// LayerNorm of each `gamma.len()`-wide row of `x` into `out`.
pub fn layer_norm_forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let d = gamma.len();
    assert!(
        d > 0 && beta.len() == d && x.len().is_multiple_of(d) && out.len() == x.len(),
        "layer_norm_forward: x and out must be [rows, d], γ and β [d]"
    );
    let rows = rows_per_task(d) * d;
    x.par_chunks(rows).zip(out.par_chunks_mut(rows)).for_each(|(x, out)| layer_norm_rows(x, gamma, beta, eps, out));
}

/// Gradients of [`layer_norm_forward`] for the output gradient `grad`: `dx` (same shape as `x`)
/// and the returned `(dγ, dβ)`, summed over rows in a fixed order.
pub fn layer_norm_backward(x: &[f32], gamma: &[f32], grad: &[f32], eps: f32, dx: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && grad.len() == x.len() && dx.len() == x.len(),
        "layer_norm_backward: x, grad and dx must be [rows, d]"
    );
    let rows = rows_per_task(d) * d;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = x
        .par_chunks(rows)
        .zip(grad.par_chunks(rows))
        .zip(dx.par_chunks_mut(rows))
        .map(|((x, grad), dx)| {
            let (mut d_gamma, mut d_beta) = (vec![0.0f32; d], vec![0.0f32; d]);
            layer_norm_backward_rows(x, gamma, grad, eps, dx, &mut d_gamma, &mut d_beta);
            (d_gamma, d_beta)
        })
        .collect();
    let (mut d_gamma, mut d_beta) = (vec![0.0f32; d], vec![0.0f32; d]);
    for (g, b) in &partials {
        d_gamma.iter_mut().zip(g).for_each(|(a, b)| *a += b);
        d_beta.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    }
    (d_gamma, d_beta)
}
