//! Rotary position embedding in HF's rotate-half layout, and its frequencies as transformers
//! computes them for each `rope_type` (default, linear, dynamic NTK, YaRN, LLaMA-3) or as a GGUF
//! file's `rope_freqs` factors give them.

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

/// How a model turns positions into rotation angles beyond the plain `θ^(−2j/d)` frequencies:
/// transformers' `rope_type`s, and llama.cpp's per-frequency factors.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    /// `rope_type = "default"`: the plain frequencies.
    #[default]
    None,
    /// `"linear"` (position interpolation): every frequency divided by `factor`.
    Linear {
        /// Interpolation factor.
        factor: f64,
    },
    /// `"dynamic"` (NTK-aware): past `max_positions`, θ grows with the sequence length.
    Dynamic {
        /// Scaling factor.
        factor: f64,
        /// `max_position_embeddings`: sequences up to it use the plain frequencies.
        max_positions: usize,
    },
    /// `"yarn"`: high frequencies kept, low ones interpolated, a linear ramp between, and cos/sin
    /// scaled by `attention_factor`.
    Yarn {
        /// Interpolation factor.
        factor: f64,
        /// The pretraining context (`original_max_position_embeddings`).
        original_max_positions: usize,
        /// Rotations above which a frequency is kept (`beta_fast`).
        beta_fast: f64,
        /// Rotations below which a frequency is interpolated (`beta_slow`).
        beta_slow: f64,
        /// Scale of cos and sin (so of the attention logits, squared).
        attention_factor: f64,
        /// Whether the ramp's ends are rounded to whole dimensions (`truncate`).
        truncate: bool,
    },
    /// `"llama3"`: wavelengths beyond `original / low_freq_factor` divided by `factor`, those
    /// below `original / high_freq_factor` kept, a smooth blend between.
    Llama3 {
        /// Interpolation factor of the low frequencies.
        factor: f64,
        /// Sets the longest wavelength kept unblended.
        low_freq_factor: f64,
        /// Sets the shortest wavelength blended.
        high_freq_factor: f64,
        /// The pretraining context (`original_max_position_embeddings`).
        original_max_positions: usize,
    },
    /// One divisor per frequency, as a GGUF file's `rope_freqs` tensor holds them (llama.cpp
    /// divides each angle by its factor; LLaMA-3.1 files store their `llama3` scaling this way).
    FrequencyFactors(Vec<f64>),
}

/// A model's rotary embedding: base θ and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base θ (`rope_theta`).
    pub theta: f64,
    /// How the frequencies are scaled.
    pub scaling: RopeScaling,
}

impl Default for RopeConfig {
    fn default() -> Self {
        Self { theta: 10000.0, scaling: RopeScaling::None }
    }
}

impl RopeConfig {
    /// The `head_dim / 2` inverse frequencies for a forward pass over positions `0..positions`
    /// (only dynamic scaling depends on it), and the factor cos and sin are multiplied by.
    pub fn frequencies(&self, head_dim: usize, positions: usize) -> (Vec<f64>, f64) {
        let dim = head_dim as f64;
        let plain =
            |theta: f64| -> Vec<f64> { (0..head_dim / 2).map(|j| theta.powf(-((2 * j) as f64) / dim)).collect() };
        match &self.scaling {
            RopeScaling::None => (plain(self.theta), 1.0),
            RopeScaling::Linear { factor } => (plain(self.theta).into_iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Dynamic { factor, max_positions } => {
                let len = positions.max(*max_positions) as f64;
                let ratio = factor * len / *max_positions as f64 - (factor - 1.0);
                (plain(self.theta * ratio.powf(dim / (dim - 2.0))), 1.0)
            }
            RopeScaling::Yarn { factor, original_max_positions, beta_fast, beta_slow, attention_factor, truncate } => {
                // The dimension whose frequency turns `rotations` times over the original context.
                let correction = |rotations: f64| {
                    dim * (*original_max_positions as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let inv = plain(self.theta)
                    .into_iter()
                    .enumerate()
                    .map(|(j, f)| {
                        let keep = 1.0 - ((j as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        f / factor * (1.0 - keep) + f * keep
                    })
                    .collect();
                (inv, *attention_factor)
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => {
                let original = *original_max_positions as f64;
                let (low_wavelen, high_wavelen) = (original / low_freq_factor, original / high_freq_factor);
                let inv = plain(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
            RopeScaling::FrequencyFactors(factors) => {
                (plain(self.theta).into_iter().zip(factors).map(|(f, d)| f / d).collect(), 1.0)
            }
        }
    }
}
