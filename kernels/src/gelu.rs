//! The exact (erf) GELU, `x·Φ(x)`, as BERT uses it.

use rayon::prelude::*;

use crate::CHUNK;
use crate::simd::{exp, multiversion};

/// `(Φ(x), φ(x))`: the normal CDF from Abramowitz & Stegun 7.1.26 (`erf` to 1.5e-7 absolute,
/// below f32's resolution of `Φ` near 1) and the density, sharing one `exp(−x²/2)`.
#[inline(always)]
fn cdf_pdf(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let e = exp(-z * z);
    // ½·erfc(z) = ½·poly·e; Φ(x) = 1 − that for x ≥ 0, that itself for x < 0.
    let tail = 0.5 * poly * e;
    let cdf = if x >= 0.0 { 1.0 - tail } else { tail };
    (cdf, e * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2))
}

multiversion! {
    fn forward_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * cdf_pdf(v).0;
        }
    }
}

multiversion! {
    fn backward_chunk(x: &[f32], grad: &[f32], dx: &mut [f32]) {
        for ((d, &v), &dy) in dx.iter_mut().zip(x).zip(grad) {
            let (cdf, pdf) = cdf_pdf(v);
            *d = dy * (cdf + v * pdf);
        }
    }
}

/// `out = x·Φ(x)`, element-wise.
pub fn gelu_forward(x: &[f32], out: &mut [f32]) {
    assert!(x.len() == out.len(), "gelu_forward: slice lengths differ");
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| forward_chunk(x, o));
}

/// `dx = grad·(Φ(x) + x·φ(x))`, the gradient of [`gelu_forward`].
pub fn gelu_backward(x: &[f32], grad: &[f32], dx: &mut [f32]) {
    assert!(x.len() == grad.len() && x.len() == dx.len(), "gelu_backward: slice lengths differ");
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|((d, x), g)| backward_chunk(x, g, d));
}
