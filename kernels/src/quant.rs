//! GGML's block formats for a frozen base held quantized (`--base-dtype q8_0|q4_0`, and `native`
//! for a GGUF file's Q4_1): 32 weights a block, each block one f16 scale (and, for Q4_1, an f16
//! minimum) followed by the codes. Quantization follows llama.cpp's reference code, so the bytes
//! are the ones `gguf-py` and llama.cpp write; dequantization is what both read back.

use burn::tensor::f16;
use rayon::prelude::*;

/// Weights a block holds, in every format here.
pub const BLOCK: usize = 32;

/// A GGML block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// `d·q`, q an i8: 34 bytes a block (8.5 bits a weight).
    Q8_0,
    /// `d·(q − 8)`, q a nibble: 18 bytes a block (4.5 bits a weight).
    Q4_0,
    /// `d·q + m`, q a nibble: 20 bytes a block (5 bits a weight).
    Q4_1,
}

impl BlockFormat {
    /// The format of GGML tensor type `ty`, if it is one of these.
    pub fn from_ggml_type(ty: u32) -> Option<Self> {
        match ty {
            8 => Some(BlockFormat::Q8_0),
            2 => Some(BlockFormat::Q4_0),
            3 => Some(BlockFormat::Q4_1),
            _ => None,
        }
    }

    /// GGML's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q4_1 => "Q4_1",
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
        }
    }

    /// Bytes of a row of `n` weights (`n` a multiple of [`BLOCK`]).
    pub fn row_bytes(self, n: usize) -> usize {
        n / BLOCK * self.block_bytes()
    }

    /// Quantizes `x` (a multiple of [`BLOCK`] values) into `out` (`row_bytes(x.len())` bytes), as
    /// llama.cpp's `quantize_row_*_ref`.
    pub fn quantize(self, x: &[f32], out: &mut [u8]) {
        for (x, out) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(self.block_bytes())) {
            match self {
                BlockFormat::Q8_0 => {
                    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                    for (q, v) in out[2..].iter_mut().zip(x) {
                        *q = (v * id).round() as i8 as u8;
                    }
                }
                BlockFormat::Q4_0 => {
                    // The value of largest magnitude, with its sign, maps to −8.
                    let max = x.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                    let code = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                    for j in 0..BLOCK / 2 {
                        out[2 + j] = code(x[j]) | (code(x[j + BLOCK / 2]) << 4);
                    }
                }
                BlockFormat::Q4_1 => {
                    let (min, max) = x.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                    out[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
                    let code = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
                    for j in 0..BLOCK / 2 {
                        out[4 + j] = code(x[j]) | (code(x[j + BLOCK / 2]) << 4);
                    }
                }
            }
        }
    }

    /// Dequantizes whole blocks `bytes` into `out` (32 values a block).
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (b, out) in bytes.chunks_exact(self.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
            let d = half(b);
            match self {
                BlockFormat::Q8_0 => out.iter_mut().zip(&b[2..]).for_each(|(o, &q)| *o = d * (q as i8) as f32),
                BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                    let (m, codes) = match self {
                        BlockFormat::Q4_1 => (half(&b[2..]), &b[4..]),
                        _ => (-8.0 * d, &b[2..]),
                    };
                    let (low, high) = out.split_at_mut(BLOCK / 2);
                    for ((l, h), &q) in low.iter_mut().zip(high).zip(codes) {
                        *l = d * (q & 0x0F) as f32 + m;
                        *h = d * (q >> 4) as f32 + m;
                    }
                }
            }
        }
    }

    /// Dequantizes `rows` rows of `cols` weights each, stored row after row, into `out`
    /// (`rows·cols` values, row-major), splitting the rows over rayon's threads.
    pub fn dequantize_rows(self, bytes: &[u8], cols: usize, out: &mut [f32]) {
        let row_bytes = self.row_bytes(cols);
        let rows_per_task = crate::rows_per_task(cols).max(1);
        out.par_chunks_mut(rows_per_task * cols).zip(bytes.par_chunks(rows_per_task * row_bytes)).for_each(
            |(out, bytes)| {
                for (o, b) in out.chunks_exact_mut(cols).zip(bytes.chunks_exact(row_bytes)) {
                    self.dequantize(b, o);
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 613) as f32 / 613.0 - 0.45) * if i % 5 == 0 { 3.0 } else { 1.0 }).collect()
    }

    /// Round trips stay within half a quantization step of each block, and the codes use the
    /// formats' whole ranges (the sign-carrying maximum of Q4_0 lands on −8).
    #[test]
    fn quantize_then_dequantize_is_within_half_a_step() {
        let x = values(4 * BLOCK);
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1] {
            let mut bytes = vec![0u8; format.row_bytes(x.len())];
            format.quantize(&x, &mut bytes);
            let mut back = vec![0.0f32; x.len()];
            format.dequantize_rows(&bytes, BLOCK * 2, &mut back);
            for (block, (x, y)) in x.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
                let d =
                    f16::from_le_bytes([bytes[block * format.block_bytes()], bytes[block * format.block_bytes() + 1]])
                        .to_f32()
                        .abs();
                let err = x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                // Half a step, plus the f16 rounding of the scale (and minimum) times the codes.
                assert!(
                    err <= 0.5 * d + 16.0 * d * 1e-3 + 1e-3 * x.iter().fold(0.0f32, |m, v| m.max(v.abs())),
                    "{format:?} block {block}: {err} vs step {d}"
                );
            }
        }
        // A block of zeros stays zeros.
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1] {
            let mut bytes = vec![0u8; format.block_bytes()];
            format.quantize(&[0.0; BLOCK], &mut bytes);
            let mut back = [1.0f32; BLOCK];
            format.dequantize(&bytes, &mut back);
            assert!(back.iter().all(|&v| v == 0.0), "{format:?}");
        }
    }
}
