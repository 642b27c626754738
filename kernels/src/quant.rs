//! GGML's block formats for a frozen base held quantized (`--base-dtype q8_0|q4_0`, and `native`
//! for a GGUF file's own blocks). Each block holds a fixed number of weights, [`BLOCK`] (32) in the
//! legacy formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1: one f16 scale, for some an f16 minimum or
//! sum, then the codes) and [`SUPER_BLOCK`] (256) in the K-quants (Q2_K … Q6_K: an f16 scale, for
//! some an f16 minimum, then 16 or 8 sub-blocks' 4-, 6- or 8-bit scales, then the codes).
//!
//! Quantization (Q8_0, Q4_0, Q4_1 only: the formats `--base-dtype` can ask for) follows
//! llama.cpp's reference code, so the bytes are the ones `gguf-py` and llama.cpp write.
//! Dequantization of every format is llama.cpp's `dequantize_row_*`: the same f32 operations in the
//! same order, so the values are the bits that llama.cpp and gguf-py read back (checked against
//! gguf-py in `kernels/tests/kernels.rs`).

use burn::tensor::f16;
use rayon::prelude::*;

/// Weights a block holds in the legacy formats (Q4_0 … Q8_1).
pub const BLOCK: usize = 32;

/// Weights a super-block holds in the K-quants (ggml's `QK_K`).
pub const SUPER_BLOCK: usize = 256;

/// A GGML block format. The variants carry GGML's names.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// `d·q`, q an i8: 34 bytes a block of 32 (8.5 bits a weight).
    Q8_0,
    /// `d·(q − 8)`, q a nibble: 18 bytes a block of 32 (4.5 bits a weight).
    Q4_0,
    /// `d·q + m`, q a nibble: 20 bytes a block of 32 (5 bits a weight).
    Q4_1,
    /// `d·(q − 16)`, q 5 bits (a nibble and a bit of a 32-bit mask): 22 bytes a block of 32.
    Q5_0,
    /// `d·q + m`, q 5 bits: 24 bytes a block of 32.
    Q5_1,
    /// `d·q`, q an i8, with an f16 `d·Σq` that dequantization ignores: 36 bytes a block of 32
    /// (ggml's activation format for dot products; rare in files).
    Q8_1,
    /// `d·s·q − dmin·m`, q 2 bits, 4-bit `s`, `m` per 16 weights: 84 bytes a block of 256.
    Q2_K,
    /// `d·(s − 32)·(q − 4·(1 − h))`, q 2 bits and a high bit h, 6-bit `s` per 16 weights: 110
    /// bytes a block of 256.
    Q3_K,
    /// `d·s·q − dmin·m`, q a nibble, 6-bit `s`, `m` per 32 weights: 144 bytes a block of 256.
    Q4_K,
    /// `d·s·q − dmin·m`, q 5 bits, 6-bit `s`, `m` per 32 weights: 176 bytes a block of 256.
    Q5_K,
    /// `d·s·(q − 32)`, q 6 bits, i8 `s` per 16 weights: 210 bytes a block of 256.
    Q6_K,
}

/// The f16 at `b[at..at + 2]`, widened.
#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Sub-block `j`'s 6-bit scale and minimum from a Q4_K/Q5_K block's 12 packed bytes (llama.cpp's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

impl BlockFormat {
    /// Every format, legacy ones first.
    pub const ALL: [BlockFormat; 11] = [
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q5_1,
        BlockFormat::Q8_0,
        BlockFormat::Q8_1,
        BlockFormat::Q2_K,
        BlockFormat::Q3_K,
        BlockFormat::Q4_K,
        BlockFormat::Q5_K,
        BlockFormat::Q6_K,
    ];

    /// The format of GGML tensor type `ty`, if it is one of these.
    pub fn from_ggml_type(ty: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.ggml_type() == ty)
    }

    /// GGML's type id of the format (`ggml_type`).
    pub fn ggml_type(self) -> u32 {
        match self {
            BlockFormat::Q4_0 => 2,
            BlockFormat::Q4_1 => 3,
            BlockFormat::Q5_0 => 6,
            BlockFormat::Q5_1 => 7,
            BlockFormat::Q8_0 => 8,
            BlockFormat::Q8_1 => 9,
            BlockFormat::Q2_K => 10,
            BlockFormat::Q3_K => 11,
            BlockFormat::Q4_K => 12,
            BlockFormat::Q5_K => 13,
            BlockFormat::Q6_K => 14,
        }
    }

    /// GGML's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q4_1 => "Q4_1",
            BlockFormat::Q5_0 => "Q5_0",
            BlockFormat::Q5_1 => "Q5_1",
            BlockFormat::Q8_1 => "Q8_1",
            BlockFormat::Q2_K => "Q2_K",
            BlockFormat::Q3_K => "Q3_K",
            BlockFormat::Q4_K => "Q4_K",
            BlockFormat::Q5_K => "Q5_K",
            BlockFormat::Q6_K => "Q6_K",
        }
    }

    /// Weights of one block: [`BLOCK`] or [`SUPER_BLOCK`].
    pub fn block_len(self) -> usize {
        match self {
            BlockFormat::Q2_K | BlockFormat::Q3_K | BlockFormat::Q4_K | BlockFormat::Q5_K | BlockFormat::Q6_K => {
                SUPER_BLOCK
            }
            _ => BLOCK,
        }
    }

    /// Bytes of one block (ggml's `type_size`).
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q5_0 => 22,
            BlockFormat::Q5_1 => 24,
            BlockFormat::Q8_1 => 36,
            BlockFormat::Q2_K => 84,
            BlockFormat::Q3_K => 110,
            BlockFormat::Q4_K => 144,
            BlockFormat::Q5_K => 176,
            BlockFormat::Q6_K => 210,
        }
    }

    /// Bytes of a row of `n` weights (`n` a multiple of [`Self::block_len`]).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }

    /// `Ok` when a row of `n` weights is whole blocks of this format; else the error says so.
    pub fn check_row(self, n: usize) -> Result<(), String> {
        if n.is_multiple_of(self.block_len()) {
            Ok(())
        } else {
            Err(format!(
                "{} needs rows of a multiple of {} weights (its block size); this one has {n}",
                self.name(),
                self.block_len()
            ))
        }
    }

    /// Whether [`Self::quantize`] can write this format: Q8_0, Q4_0 and Q4_1. The others are only
    /// read (dequantized) from files that store them.
    pub fn can_quantize(self) -> bool {
        matches!(self, BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q4_1)
    }

    /// Quantizes `x` (a multiple of [`BLOCK`] values) into `out` (`row_bytes(x.len())` bytes), as
    /// llama.cpp's `quantize_row_*_ref`; an error for the formats that [`Self::can_quantize`]
    /// refuses.
    pub fn quantize(self, x: &[f32], out: &mut [u8]) -> Result<(), String> {
        if !self.can_quantize() {
            return Err(format!("quantizing to {} is not implemented (only Q8_0, Q4_0 and Q4_1)", self.name()));
        }
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
                _ => unreachable!("refused above"),
            }
        }
        Ok(())
    }

    /// Dequantizes whole blocks `bytes` into `out` ([`Self::block_len`] values a block). Inlined,
    /// so that the bf16 GEMM's packing compiles it for AVX-512.
    #[inline(always)]
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        let n = self.block_len();
        for (b, y) in bytes.chunks_exact(self.block_bytes()).zip(out.chunks_exact_mut(n)) {
            self.dequantize_block(b, y);
        }
    }

    /// One block, as llama.cpp's `dequantize_row_*` (its operations, in its order).
    #[inline(always)]
    fn dequantize_block(self, b: &[u8], y: &mut [f32]) {
        // Weights j and j + 16 of a 32-weight block from the low and high nibbles of code byte j.
        fn nibbles(b: &[u8], y: &mut [f32], value: impl Fn(usize, u8) -> f32) {
            let (low, high) = y.split_at_mut(BLOCK / 2);
            for (j, (l, h)) in low.iter_mut().zip(high).enumerate() {
                *l = value(j, b[j] & 0x0F);
                *h = value(j + BLOCK / 2, b[j] >> 4);
            }
        }
        match self {
            BlockFormat::Q8_0 | BlockFormat::Q8_1 => {
                let d = half(b, 0);
                let codes = if self == BlockFormat::Q8_0 { &b[2..] } else { &b[4..] };
                y.iter_mut().zip(codes).for_each(|(o, &q)| *o = (q as i8) as f32 * d);
            }
            BlockFormat::Q4_0 => {
                let d = half(b, 0);
                nibbles(&b[2..], y, |_, q| (q as i32 - 8) as f32 * d);
            }
            BlockFormat::Q4_1 => {
                let (d, m) = (half(b, 0), half(b, 2));
                nibbles(&b[4..], y, |_, q| q as f32 * d + m);
            }
            BlockFormat::Q5_0 => {
                let d = half(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                nibbles(&b[6..], y, |j, q| ((q | (((qh >> j) & 1) << 4) as u8) as i32 - 16) as f32 * d);
            }
            BlockFormat::Q5_1 => {
                let (d, m) = (half(b, 0), half(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                nibbles(&b[8..], y, |j, q| (q | (((qh >> j) & 1) << 4) as u8) as f32 * d + m);
            }
            BlockFormat::Q2_K => {
                // scales[16] | qs[64] | d | dmin. Weight i: 16-weight group i/16 (its scale byte:
                // low nibble scale, high nibble minimum), 2-bit code at shift 2·(i%128/32) of
                // byte 32·(i/128) + i%32.
                let (d, min) = (half(b, 80), half(b, 82));
                for (g, y) in y.chunks_exact_mut(16).enumerate() {
                    let sc = b[g];
                    let (dl, ml) = (d * (sc & 0x0F) as f32, min * (sc >> 4) as f32);
                    let shift = 2 * (g % 8 / 2);
                    let qs = &b[16 + g / 8 * 32 + g % 2 * 16..][..16];
                    for (y, &q) in y.iter_mut().zip(qs) {
                        *y = dl * ((q >> shift) & 3) as f32 - ml;
                    }
                }
            }
            BlockFormat::Q3_K => {
                // hmask[32] | qs[64] | scales[12] | d. Group g's 6-bit scale: its low nibble in
                // byte g (g < 8) or the high nibble of byte g − 8, its top 2 bits at shift
                // 2·(g/4) of byte 8 + g%4. A clear mask bit subtracts 4 from the 2-bit code.
                let d = half(b, 108);
                let (hmask, qs, scales) = (&b[..32], &b[32..96], &b[96..108]);
                for (g, y) in y.chunks_exact_mut(16).enumerate() {
                    let low = if g < 8 { scales[g] & 0x0F } else { scales[g - 8] >> 4 };
                    let high = (scales[8 + g % 4] >> (2 * (g / 4))) & 3;
                    let dl = d * ((low | (high << 4)) as i32 - 32) as f32;
                    let (shift, bit) = (2 * (g % 8 / 2), g / 8 * 4 + g % 8 / 2);
                    let at = g % 2 * 16;
                    for (l, y) in y.iter_mut().enumerate() {
                        let q = ((qs[g / 8 * 32 + at + l] >> shift) & 3) as i32;
                        let h = if (hmask[at + l] >> bit) & 1 == 1 { 0 } else { 4 };
                        *y = dl * (q - h) as f32;
                    }
                }
            }
            BlockFormat::Q4_K | BlockFormat::Q5_K => {
                // d | dmin | scales[12] | (Q5_K: qh[32]) | qs[128]. Sub-block s of 32 weights:
                // the low (s even) or high nibble of bytes 32·(s/2)…, plus bit s of qh for Q5_K.
                let (d, min) = (half(b, 0), half(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if self == BlockFormat::Q5_K { (Some(&b[16..48]), &b[48..]) } else { (None, &b[16..]) };
                for (s, y) in y.chunks_exact_mut(32).enumerate() {
                    let (sc, m) = scale_min_k4(s, scales);
                    let (d1, m1) = (d * sc as f32, min * m as f32);
                    let shift = 4 * (s % 2);
                    for (l, y) in y.iter_mut().enumerate() {
                        let mut q = (qs[s / 2 * 32 + l] >> shift) & 0x0F;
                        if let Some(qh) = qh {
                            q += ((qh[l] >> s) & 1) << 4;
                        }
                        *y = d1 * q as f32 - m1;
                    }
                }
            }
            BlockFormat::Q6_K => {
                // ql[128] | qh[64] | scales[16] (i8) | d. Weight i = 128·c + 32·k + l: the low
                // (k < 2) or high nibble of ql[64·c + 32·(k%2) + l], the 2 bits at shift 2·k of
                // qh[32·c + l], group i/16's scale.
                let d = half(b, 208);
                let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
                for (g, y) in y.chunks_exact_mut(16).enumerate() {
                    let (c, k, at) = (g / 8, g % 8 / 2, g % 2 * 16);
                    let dl = d * (scales[g] as i8) as f32;
                    for (l, y) in y.iter_mut().enumerate() {
                        let low = (ql[64 * c + 32 * (k % 2) + at + l] >> (4 * (k / 2))) & 0x0F;
                        let high = (qh[32 * c + at + l] >> (2 * k)) & 3;
                        *y = dl * ((low | (high << 4)) as i32 - 32) as f32;
                    }
                }
            }
        }
    }

    /// Dequantizes `rows` rows of `cols` weights each (`cols` a multiple of
    /// [`Self::block_len`]), stored row after row, into `out` (`rows·cols` values, row-major),
    /// splitting the rows over rayon's threads.
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
            format.quantize(&x, &mut bytes).unwrap();
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
            format.quantize(&[0.0; BLOCK], &mut bytes).unwrap();
            let mut back = [1.0f32; BLOCK];
            format.dequantize(&bytes, &mut back);
            assert!(back.iter().all(|&v| v == 0.0), "{format:?}");
        }
    }
}
