//! Widening half-precision values to f32, for products over a frozen weight held in bf16 or f16:
//! the weight is widened one layer at a time, just before its product, and dropped after it.

use crate::CHUNK;
use burn::tensor::{bf16, f16};
use rayon::prelude::*;

/// `src` (bf16) widened into `out` (f32), exactly (every bf16 value is an f32 value).
pub fn bf16_to_f32(src: &[bf16], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| {
        // bf16 is the top half of an f32's bits.
        o.iter_mut().zip(s).for_each(|(o, s)| *o = f32::from_bits((s.to_bits() as u32) << 16));
    });
}

/// `src` (f16) widened into `out` (f32), exactly.
pub fn f16_to_f32(src: &[f16], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| {
        o.iter_mut().zip(s).for_each(|(o, s)| *o = s.to_f32());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact() {
        let values = [0.0f32, -0.0, 1.0, -2.5, 3.140625, 1e-3, 65504.0, f32::INFINITY, 1e-40];
        let b: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        let (mut wb, mut wh) = (vec![0.0; values.len()], vec![0.0; values.len()]);
        bf16_to_f32(&b, &mut wb);
        f16_to_f32(&h, &mut wh);
        for i in 0..values.len() {
            assert_eq!(wb[i].to_bits(), b[i].to_f32().to_bits());
            assert_eq!(wh[i].to_bits(), h[i].to_f32().to_bits());
        }
    }
}
