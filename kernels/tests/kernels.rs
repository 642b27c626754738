//! The kernels against float64 references. Their agreement with Burn's op chains, values and
//! gradients, is tested where they are wired into Burn (`tensor-peft-models`, `fused_on_flex`).

use tensor_peft_kernels::ComputeDType;
use tensor_peft_kernels::attention::{AttentionShape, Mask, attention_backward, attention_forward};
use tensor_peft_kernels::norm::{rms_norm_backward, rms_norm_forward};
use tensor_peft_kernels::{exp, sigmoid};

#[test]
fn exp_and_sigmoid_are_accurate_to_f32_rounding() {
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x <= 88.0 {
        let exact = (x as f64).exp();
        worst = worst.max(((exp(x) as f64) - exact).abs() / exact);
        x += 0.001_37;
    }
    assert!(worst <= 2.5e-7, "exp: max relative error {worst:e}");
    for x in [-30.0f32, -5.0, -0.1, 0.0, 0.1, 5.0, 30.0] {
        let exact = 1.0 / (1.0 + (-(x as f64)).exp());
        assert!(((sigmoid(x) as f64) - exact).abs() <= 1e-7, "sigmoid({x})");
    }
    assert_eq!(exp(f32::NEG_INFINITY).min(1e-30), exp(f32::NEG_INFINITY), "clamped, not NaN");
    assert!(exp(-200.0) < 1e-37 && exp(200.0).is_finite());
}

#[test]
fn rms_norm_matches_float64_and_is_deterministic() {
    let (rows, d) = (67, 45);
    let x: Vec<f32> = (0..rows * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
    let gamma: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / d as f32).collect();
    let grad: Vec<f32> = (0..rows * d).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
    let eps = 1e-5;
    let mut out = vec![0.0; rows * d];
    rms_norm_forward(&x, &gamma, eps, &mut out);
    let mut d_gamma_exact = vec![0.0f64; d];
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..d {
            let exact = row[j] as f64 * inv * gamma[j] as f64;
            assert!((out[r * d + j] as f64 - exact).abs() <= 1e-6 * exact.abs().max(1.0));
            d_gamma_exact[j] += grad[r * d + j] as f64 * row[j] as f64 * inv;
        }
    }
    let mut dx = vec![0.0; rows * d];
    let d_gamma = rms_norm_backward(&x, &gamma, &grad, eps, &mut dx);
    for (a, b) in d_gamma.iter().zip(&d_gamma_exact) {
        assert!((*a as f64 - b).abs() <= 1e-4 * b.abs().max(1.0), "dγ {a} vs {b}");
    }
    // The per-task partial sums are added in task order: the same bits on every run.
    for _ in 0..5 {
        let mut again = vec![0.0; rows * d];
        let d_gamma_again = rms_norm_backward(&x, &gamma, &grad, eps, &mut again);
        assert_eq!(d_gamma_again, d_gamma);
        assert_eq!(again, dx);
    }
}

#[test]
fn attention_matches_float64_and_fully_masked_rows_are_zero() {
    let s = AttentionShape { batch: 2, q_len: 3, kv_len: 4, heads: 4, kv_heads: 2, head_dim: 5 };
    let q: Vec<f32> = (0..2 * 3 * 4 * 5).map(|i| ((i * 7 % 23) as f32 - 11.0) / 9.0).collect();
    let k: Vec<f32> = (0..2 * 4 * 2 * 5).map(|i| ((i * 5 % 19) as f32 - 9.0) / 8.0).collect();
    let v: Vec<f32> = (0..2 * 4 * 2 * 5).map(|i| ((i * 3 % 17) as f32 - 8.0) / 5.0).collect();
    // Sequence 0 pads its last key; sequence 1 pads every key.
    let pad = [false, false, false, true, true, true, true, true];
    let scale = 0.4;
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; 2 * 4 * 3];
    attention_forward(&q, &k, &v, s, Mask::KeyPadding(&pad), scale, ComputeDType::F32, &mut out, &mut lse);
    for h in 0..4 {
        let g = h / 2;
        for i in 0..3 {
            let qi = &q[(i * 4 + h) * 5..][..5];
            let scores: Vec<f64> = (0..3)
                .map(|j| scale as f64 * (0..5).map(|c| qi[c] as f64 * k[(j * 2 + g) * 5 + c] as f64).sum::<f64>())
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for c in 0..5 {
                let exact: f64 = (0..3).map(|j| (scores[j] - max).exp() / total * v[(j * 2 + g) * 5 + c] as f64).sum();
                assert!((out[(i * 4 + h) * 5 + c] as f64 - exact).abs() <= 1e-6, "out[0, {i}, {h}, {c}]");
            }
        }
    }
    assert!(out[3 * 4 * 5..].iter().all(|&o| o == 0.0), "nothing to attend to gives zeros, not NaN");
    let grad = vec![1.0f32; q.len()];
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let f32 = ComputeDType::F32;
    attention_backward(&q, &k, &v, &lse, &grad, s, Mask::KeyPadding(&pad), scale, f32, &mut dq, &mut dk, &mut dv);
    assert!(dq.iter().chain(&dk).chain(&dv).all(|g| g.is_finite()));
    // A padded key gets no gradient; the values' gradients sum to the number of queries per kv head.
    assert!(dk[3 * 2 * 5..4 * 2 * 5].iter().all(|&g| g == 0.0));
    let dv_total: f32 = dv[..4 * 2 * 5].iter().sum();
    assert!((dv_total - (3 * 4 * 5) as f32).abs() < 1e-4, "Σ dv = {dv_total}");
}

/// Causal attention over more queries than one block of the kernel (which multiplies only the keys
/// a block of queries sees), with a KV-cache offset, grouped heads and a sliding window: outputs,
/// the rows' log-sum-exp and all three gradients (from probabilities the backward recomputes)
/// against a float64 reference of the masked softmax and its backward.
#[test]
fn causal_attention_over_several_query_blocks_matches_float64() {
    let exact = causal_attention_against_float64(ComputeDType::F32, &|x| x, 1e-5, 1e-4);
    // bf16 products: the reference rounds each operand where the kernel does (`scale·q`, `k`, `v`
    // and the output's gradient; the probabilities and the scores' gradient from their f32
    // values), so only f32 accumulation separates the outputs (measured 1.5e-8), and for the
    // gradients also the rare score gradient whose f32 value lies on the other side of a bf16
    // rounding boundary than the f64 one (one bf16 step of one term: measured 1.8e-4 relative).
    // Without the rounding the reference is 3.7e-3 (outputs) and 5e-3 (gradients) away.
    let rounded = causal_attention_against_float64(ComputeDType::Bf16, &round_to_bf16, 1e-6, 5e-4);
    // And the bf16 products are not the f32 ones.
    let differs = exact.iter().zip(&rounded).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(differs > 1e-3, "bf16 attention output within {differs} of f32");
}

/// `x` rounded to the nearest bf16 (ties to even), back in f32.
fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits((tensor_peft_kernels::bf16_gemm::bf16_bits(x) as u32) << 16)
}

/// The kernels at `dtype` against float64 with the product operands passed through `round`
/// (errors within `tol_out` for the output and log-sum-exp, `tol_grad` relative for the
/// gradients); returns the output.
fn causal_attention_against_float64(
    dtype: ComputeDType,
    round: &dyn Fn(f32) -> f32,
    tol_out: f64,
    tol_grad: f64,
) -> Vec<f32> {
    let (batch, q_len, offset, heads, kv_heads, dh) = (2, 150, 10, 4, 2, 8);
    let kv_len = q_len + offset;
    let s = AttentionShape { batch, q_len, kv_len, heads, kv_heads, head_dim: dh };
    let wave = |n: usize, a: usize, m: usize| -> Vec<f32> {
        (0..n).map(|i| ((i * a % m) as f32 - (m / 2) as f32) / (m as f32 / 3.0)).collect()
    };
    let (q, k, v) = (
        wave(batch * q_len * heads * dh, 7, 23),
        wave(batch * kv_len * kv_heads * dh, 5, 19),
        wave(batch * kv_len * kv_heads * dh, 3, 17),
    );
    let grad = wave(q.len(), 11, 29);
    let scale = 0.35f32;
    // The operands as the products see them.
    let r = |x: f32| round(x) as f64;
    let mut first_out = Vec::new();
    for window in [None, Some(70)] {
        let mask = Mask::Causal { offset, window };
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![f32::NAN; batch * heads * q_len];
        attention_forward(&q, &k, &v, s, mask, scale, dtype, &mut out, &mut lse);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward(&q, &k, &v, &lse, &grad, s, mask, scale, dtype, &mut dq, &mut dk, &mut dv);
        let (mut dq64, mut dk64, mut dv64) = (vec![0.0f64; q.len()], vec![0.0f64; k.len()], vec![0.0f64; v.len()]);
        let qi = |b: usize, i: usize, h: usize| ((b * q_len + i) * heads + h) * dh;
        let kj = |b: usize, j: usize, g: usize| ((b * kv_len + j) * kv_heads + g) * dh;
        for b in 0..batch {
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                for i in 0..q_len {
                    let seen = |j: usize| j <= offset + i && window.is_none_or(|w| j + w > offset + i);
                    let scores: Vec<f64> = (0..kv_len)
                        .map(|j| (0..dh).map(|c| r(scale * q[qi(b, i, h) + c]) * r(k[kj(b, j, g) + c])).sum::<f64>())
                        .collect();
                    let max = (0..kv_len).filter(|&j| seen(j)).map(|j| scores[j]).fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> =
                        (0..kv_len).map(|j| if seen(j) { (scores[j] - max).exp() } else { 0.0 }).collect();
                    let total: f64 = e.iter().sum();
                    let p: Vec<f64> = e.iter().map(|x| x / total).collect();
                    // The probabilities as a product sees them.
                    let p_in: Vec<f64> = p.iter().map(|&x| r(x as f32)).collect();
                    let got = lse[(b * heads + h) * q_len + i] as f64;
                    assert!((got - (max + total.ln())).abs() <= tol_out, "window {window:?} lse[{b},{h},{i}] {got}");
                    let d_out = &grad[qi(b, i, h)..][..dh];
                    for c in 0..dh {
                        let exact: f64 = (0..kv_len).map(|j| p_in[j] * r(v[kj(b, j, g) + c])).sum();
                        let got = out[qi(b, i, h) + c] as f64;
                        assert!(
                            (got - exact).abs() <= tol_out,
                            "window {window:?} out[{b},{i},{h},{c}] {got} vs {exact}"
                        );
                    }
                    // dP = dO·Vᵀ, dS = scale·P ⊙ (dP − Σ P·dP); dQ = dS·K, dK += dSᵀ·Q, dV += Pᵀ·dO.
                    let dp: Vec<f64> =
                        (0..kv_len).map(|j| (0..dh).map(|c| r(d_out[c]) * r(v[kj(b, j, g) + c])).sum()).collect();
                    let weighted: f64 = (0..kv_len).map(|j| p[j] * dp[j]).sum();
                    for j in 0..kv_len {
                        let ds = r((scale as f64 * p[j] * (dp[j] - weighted)) as f32);
                        for c in 0..dh {
                            dq64[qi(b, i, h) + c] += ds * r(k[kj(b, j, g) + c]);
                            dk64[kj(b, j, g) + c] += ds * r(q[qi(b, i, h) + c]);
                            dv64[kj(b, j, g) + c] += p_in[j] * r(d_out[c]);
                        }
                    }
                }
            }
        }
        for (name, got, want) in [("dq", &dq, &dq64), ("dk", &dk, &dk64), ("dv", &dv, &dv64)] {
            for (idx, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                let ok = (*g as f64 - w).abs() <= tol_grad * w.abs().max(1.0);
                assert!(ok, "{dtype} window {window:?} {name}[{idx}] {g} vs {w}");
            }
        }
        if first_out.is_empty() {
            first_out = out;
        }
    }
    first_out
}

#[test]
fn attention_propagates_nan_scores() {
    let s = AttentionShape { batch: 1, q_len: 2, kv_len: 2, heads: 1, kv_heads: 1, head_dim: 3 };
    let q = [f32::NAN, 0.0, 0.0, f32::NAN, 1.0, 1.0];
    let kv = [0.5f32; 6];
    let (mut out, mut lse) = ([0.0; 6], [0.0; 2]);
    let causal = Mask::Causal { offset: 0, window: None };
    attention_forward(&q, &kv, &kv, s, causal, 1.0, ComputeDType::F32, &mut out, &mut lse);
    assert!(out.iter().all(|o| o.is_nan()), "a NaN query must give NaN outputs, not zeros: {out:?}");
}

#[test]
fn softmax_cross_entropy_matches_float64() {
    use tensor_peft_kernels::loss::softmax_cross_entropy;
    let (rows, vocab) = (5, 37);
    let logits: Vec<f32> = (0..rows * vocab).map(|i| ((i * 29 % 83) as f32 - 41.0) / 3.0).collect();
    let targets = [0usize, 36, 5, 5, 17];
    let weights = [1.0f32, 0.5, 0.0, 2.0, 0.25];
    let mut grad = logits.clone();
    let loss = softmax_cross_entropy(&mut grad, vocab, &targets, &weights);
    let mut exact = 0.0f64;
    for r in 0..rows {
        let z: Vec<f64> = logits[r * vocab..(r + 1) * vocab].iter().map(|&v| v as f64).collect();
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
        exact -= weights[r] as f64 * (z[targets[r]] - max - sum.ln());
        for (j, v) in z.iter().enumerate() {
            let p = (v - max).exp() / sum;
            let g = weights[r] as f64 * (p - if j == targets[r] { 1.0 } else { 0.0 });
            assert!((grad[r * vocab + j] as f64 - g).abs() <= 1e-6, "gradient [{r}, {j}]");
        }
    }
    assert!((loss - exact).abs() <= 1e-5 * exact.abs(), "loss {loss} vs {exact}");
}

/// `s` as bytes (two hex digits a byte).
fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// Every GGML block format against gguf-py, block by block (`tests/fixtures/gguf-quants.json`,
/// written by `scripts/fixtures/gguf_quants.py`): the dequantized values bit for bit (both compute
/// llama.cpp's f32 operations in its order, without fused multiply-adds, so no tolerance is
/// needed), also as rows of several blocks; and for the formats quantized here (Q8_0, Q4_0, Q4_1)
/// the bytes gguf-py writes for the same inputs. Q8_1's reference is ggml's 36-byte layout computed
/// in numpy (gguf-py has no Q8_1 dequantizer).
#[test]
fn gguf_blocks_dequantize_as_gguf_py() {
    use tensor_peft_kernels::quant::BlockFormat;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/gguf-quants.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let fixture = fixture.as_object().unwrap();
    assert_eq!(fixture.len(), BlockFormat::ALL.len());
    for format in BlockFormat::ALL {
        let blocks = fixture[format.name()].as_array().unwrap();
        let (mut all_bytes, mut all_values) = (Vec::new(), Vec::new());
        for (i, block) in blocks.iter().enumerate() {
            let bytes = hex(block["bytes"].as_str().unwrap());
            let expected: Vec<u32> = hex(block["values"].as_str().unwrap())
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!((bytes.len(), expected.len()), (format.block_bytes(), format.block_len()), "{format:?}");
            let mut got = vec![f32::NAN; format.block_len()];
            format.dequantize(&bytes, &mut got);
            for (j, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert_eq!(g.to_bits(), *e, "{format:?} block {i} weight {j}: {g} vs {}", f32::from_bits(*e));
            }
            if let Some(input) = block.get("input") {
                let x: Vec<f32> = hex(input.as_str().unwrap())
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let mut ours = vec![0u8; format.block_bytes()];
                match format.quantize(&x, &mut ours) {
                    Ok(()) => assert_eq!(ours, bytes, "{format:?} block {i}: quantized bytes"),
                    Err(e) => assert!(!format.can_quantize() && e.contains(format.name()), "{e}"),
                }
            }
            all_bytes.extend(bytes);
            all_values.extend(expected);
        }
        // The same blocks as rows of two blocks each (the frozen base's path).
        let rows = blocks.len() / 2;
        let cols = 2 * format.block_len();
        let mut got = vec![f32::NAN; rows * cols];
        format.dequantize_rows(&all_bytes[..rows * format.row_bytes(cols)], cols, &mut got);
        assert!(got.iter().zip(&all_values).all(|(g, e)| g.to_bits() == *e), "{format:?} rows");
    }
    // Only the formats `--base-dtype` asks for are quantized; the others say so.
    for format in BlockFormat::ALL {
        let mut out = vec![0u8; format.row_bytes(256)];
        let result = format.quantize(&[0.5; 256], &mut out);
        assert_eq!(result.is_ok(), format.can_quantize(), "{format:?}");
        assert_eq!(format.can_quantize(), matches!(format, BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q4_1));
        assert_eq!(BlockFormat::from_ggml_type(format.ggml_type()), Some(format));
        assert_eq!(format.check_row(format.block_len() * 3), Ok(()));
    }
    let err = BlockFormat::Q4_K.check_row(576).unwrap_err();
    assert!(err.contains("Q4_K") && err.contains("256") && err.contains("576"), "{err}");
    assert_eq!(BlockFormat::from_ggml_type(15), None, "Q8_K is not read");
}

// ---------------------------------------------------------------------------------------------
// The bf16 GEMM (`--compute-dtype bf16`)

mod bf16_gemm {
    use burn::tensor::{bf16, f16};
    use tensor_peft_kernels::bf16_gemm::{Kernel, Lhs, Strided, Weight, bf16_bits, matmul, product};
    use tensor_peft_kernels::quant::BlockFormat;

    /// Deterministic values in about [−1.5, 1.5], some larger, of varied magnitude.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 10_007;
                let v = h as f32 / 10_007.0 * 3.0 - 1.5;
                if i % 11 == 0 { v * 7.3 } else { v }
            })
            .collect()
    }

    fn round(x: f32) -> f64 {
        bf16::from_f32(x).to_f32() as f64
    }

    fn kernels() -> Vec<Kernel> {
        [Kernel::Portable, Kernel::Avx512Bf16, Kernel::Amx].into_iter().filter(|k| k.available()).collect()
    }

    /// Checks `matmul` (each kernel, fresh and accumulating) and `product` against `Σ bf16(a)·b` in f64, `b` the
    /// weight's values as `b_at(r, j)` (already bf16-rounded by the caller when stored wider).
    /// f32 accumulation of `k` exact products (two bf16 values multiply exactly in f32) errs by at
    /// most about `k·2⁻²⁴·Σ|a·b|` (the standard bound on recursive summation); `(k + 4)` covers the
    /// pairing and the added initial value. Every kernel also agrees with the portable one within
    /// twice that.
    fn check(a: Lhs, b: Weight, n: usize, b_at: &dyn Fn(usize, usize) -> f64, what: &str) {
        let (m, k) = (a.rows, a.cols);
        let a_at = |i: usize, c: usize| round(a.data[a.offset + i * a.row_stride + c * a.col_stride]);
        let init = values(m * n, 99);
        let mut results = Vec::new();
        for kernel in kernels() {
            for accumulate in [false, true] {
                let mut out = if accumulate { init.clone() } else { vec![f32::NAN; m * n] };
                matmul(kernel, a, b, n, &mut out, accumulate);
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut magnitude) = (0.0f64, 0.0f64);
                        for c in 0..k {
                            let p = a_at(i, c) * b_at(c, j);
                            exact += p;
                            magnitude += p.abs();
                        }
                        if accumulate {
                            exact += init[i * n + j] as f64;
                            magnitude += (init[i * n + j] as f64).abs();
                        }
                        let tol = (k + 4) as f64 * 2f64.powi(-24) * magnitude + 1e-30;
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= tol,
                            "{what} {kernel:?} acc={accumulate} m={m} n={n} k={k} ({i},{j}): {got} vs {exact} (tol {tol:e})"
                        );
                    }
                }
                if !accumulate {
                    // The allocating form writes the same values into a buffer it never zeroes.
                    let fresh = product(kernel, a, b, n);
                    assert!(
                        fresh.iter().zip(&out).all(|(f, o)| f.to_bits() == o.to_bits()),
                        "{what} {kernel:?}: product"
                    );
                    results.push((kernel, out));
                }
            }
        }
        let (_, portable) = &results[0];
        for (kernel, simd) in &results[1..] {
            for (idx, (p, s)) in portable.iter().zip(simd).enumerate() {
                let (i, j) = (idx / n, idx % n);
                let magnitude: f64 = (0..k).map(|c| (a_at(i, c) * b_at(c, j)).abs()).sum();
                let tol = 2.0 * (k + 4) as f64 * 2f64.powi(-24) * magnitude + 1e-30;
                assert!(((p - s) as f64).abs() <= tol, "{what}: portable {p} vs {kernel:?} {s} at ({i},{j})");
            }
        }
    }

    #[test]
    fn bf16_rounding_is_half_s_round_to_nearest_even() {
        let mut xs = values(4096, 1);
        xs.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, 1e-40, -3e-39]);
        // Halfway cases both ways, and just above/below.
        for bits in [0x3F80_8000u32, 0x3F81_8000, 0x3F80_8001, 0x3F80_7FFF, 0x7F7F_FFFF, 0xFF7F_8000] {
            xs.push(f32::from_bits(bits));
        }
        for x in xs {
            assert_eq!(bf16_bits(x), bf16::from_f32(x).to_bits(), "{x:e} ({:#x})", x.to_bits());
        }
        assert!(bf16::from_bits(bf16_bits(f32::NAN)).is_nan());
    }

    /// Every edge of the blocking: `m` from decoding (1) to a full tile multiple, `n` not a
    /// multiple of 16 or 32 and past one 256-column block, `k` odd, below and above one 256 block;
    /// `k` a multiple of 32 (AMX's depth) in one slice and in two (of either kernel's slice
    /// length, 512 or 1,024), `m` past one and two AMX tiles and a whole one (a block of 16 rows).
    #[test]
    fn bf16_matmul_of_float_weights_matches_float64() {
        let shapes = [(1, 1, 1), (3, 45, 7), (17, 300, 255), (128, 33, 513), (1, 290, 300), (17, 16, 257)];
        for (m, n, k) in
            shapes.into_iter().chain([(33, 70, 64), (40, 300, 544), (1, 33, 32), (35, 40, 1088), (48, 70, 1088)])
        {
            let x = values(m * k, m + k);
            let a = Lhs { data: &x, offset: 0, rows: m, cols: k, row_stride: k, col_stride: 1 };
            let w = values(k * n, n);
            // Row-major W (`x·W` of a contiguous weight).
            let b = Weight::F32(Strided { data: &w, offset: 0, k_stride: n, n_stride: 1 });
            check(a, b, n, &|r, j| round(w[r * n + j]), "f32 row-major");
            // A transposed view (HF's [d_out, d_in] read as W; also `dY·Wᵀ` of a contiguous W).
            let b = Weight::F32(Strided { data: &w, offset: 0, k_stride: 1, n_stride: k });
            check(a, b, n, &|r, j| round(w[j * k + r]), "f32 transposed");
            // bf16 and f16 storage, at an offset with padded rows, and a strided left operand.
            let padded = n + 3;
            let wb: Vec<bf16> = (0..5 + k * padded).map(|i| bf16::from_f32(values(1, i)[0] * 0.7)).collect();
            let b = Weight::Bf16(Strided { data: &wb, offset: 5, k_stride: padded, n_stride: 1 });
            let xt: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect();
            let at = Lhs { data: &xt, offset: 0, rows: m, cols: k, row_stride: 1, col_stride: m };
            check(at, b, n, &|r, j| wb[5 + r * padded + j].to_f32() as f64, "bf16 padded, strided lhs");
            // Stored bf16 is packed from its bits (no widening and rounding): the same products,
            // bit for bit, as its values stored as f32, by rows and by columns.
            let wide: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            for (k_stride, n_stride) in [(padded, 1), (1, k + 2)] {
                if 5 + (k - 1) * k_stride + (n - 1) * n_stride >= wb.len() {
                    continue;
                }
                let bits = Weight::Bf16(Strided { data: &wb, offset: 5, k_stride, n_stride });
                let floats = Weight::F32(Strided { data: &wide, offset: 5, k_stride, n_stride });
                for kernel in kernels() {
                    let (mut got, mut want) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
                    matmul(kernel, a, bits, n, &mut got, false);
                    matmul(kernel, a, floats, n, &mut want, false);
                    let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(
                        same,
                        "{kernel:?} bf16 k_stride={k_stride} m={m} n={n} k={k}: stored bits differ from f32 values"
                    );
                }
            }
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let b = Weight::F16(Strided { data: &wh, offset: 0, k_stride: 1, n_stride: k });
            check(a, b, n, &|r, j| round(wh[j * k + r].to_f32()), "f16 transposed");
        }
    }

    /// The single-threaded product (`β·A` into rows `ldc` apart) and the product with a packed
    /// right operand (a leading part of it) give what `matmul` gives, bit for bit: the same
    /// packing, micro-kernel and accumulation order, on every kernel.
    #[test]
    fn bf16_single_and_packed_products_are_matmul_bit_for_bit() {
        use tensor_peft_kernels::bf16_gemm::{Buffers, PackedB, matmul_packed, matmul_single};
        // (m, k, n) of the attention's products, odd and AMX-sized depths, several slices.
        for (m, k, n) in [(64, 128, 192), (37, 96, 70), (5, 544, 33), (64, 64, 128), (9, 7, 20)] {
            let (ldc, beta) = (n + 5, 0.35f32);
            let x = values(m * k, m + 3 * k);
            let scaled: Vec<f32> = x.iter().map(|v| v * beta).collect();
            // B is a transposed view (a head's keys as `Kᵀ`), with two more rows and columns than used.
            let (k_all, n_all) = (k + 2, n + 2);
            let w = values(k_all * n_all, n);
            let b_all = Weight::F32(Strided { data: &w, offset: 0, k_stride: 1, n_stride: k_all });
            let b = b_all;
            for kernel in kernels() {
                let mut want = vec![0.0f32; m * n];
                let a = Lhs { data: &scaled, offset: 0, rows: m, cols: k, row_stride: k, col_stride: 1 };
                matmul(kernel, a, b, n, &mut want, false);
                let a = Lhs { data: &x, offset: 0, rows: m, cols: k, row_stride: k, col_stride: 1 };
                let mut buffers = Buffers::new();
                let mut packed = PackedB::default();
                packed.pack(kernel, b_all, k_all, n_all, &mut buffers);
                for accumulate in [false, true] {
                    let init = values(m * ldc, 7);
                    // `matmul` accumulating onto the same values (AMX adds the products to the
                    // loaded tile, the other kernels add the sum to the old value).
                    let mut want_acc: Vec<f32> = init.chunks(ldc).flat_map(|row| row[..n].to_vec()).collect();
                    let a_scaled = Lhs { data: &scaled, offset: 0, rows: m, cols: k, row_stride: k, col_stride: 1 };
                    matmul(kernel, a_scaled, b, n, &mut want_acc, true);
                    let mut single = init.clone();
                    matmul_single(kernel, a, beta, b, n, &mut single, ldc, accumulate, &mut buffers);
                    let mut prefix = init.clone();
                    // A packed operand is sliced at 512 whatever the kernel: past one slice, its
                    // accumulation onto partial AMX blocks (added after each slice) is not
                    // `matmul`'s bit for bit.
                    let packed_same = k % 2 == 0 && (!accumulate || k <= 512);
                    if packed_same {
                        matmul_packed(kernel, a, beta, &packed, n, &mut prefix, ldc, accumulate, &mut buffers);
                    }
                    for (i, row) in single.chunks(ldc).enumerate() {
                        for j in 0..ldc {
                            let expect = match (j < n, accumulate) {
                                (false, _) => init[i * ldc + j],
                                (true, false) => want[i * n + j],
                                (true, true) => want_acc[i * n + j],
                            };
                            let what = format!("{kernel:?} m={m} k={k} n={n} acc={accumulate} ({i},{j})");
                            assert_eq!(row[j].to_bits(), expect.to_bits(), "single {what}");
                            if packed_same {
                                assert_eq!(prefix[i * ldc + j].to_bits(), expect.to_bits(), "packed {what}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// GGML blocks, both ways round: stored rows as the columns of `B` (`x·W`, the rows of `Wᵀ`
    /// hold `d_in` weights) and as its rows (`dY·Wᵀ`); for AMX, Q8_0 packed a strip ahead over
    /// two slices of `k` and two panels of rows.
    #[test]
    fn bf16_matmul_of_block_weights_matches_float64() {
        let shapes = |format: BlockFormat| -> Vec<(usize, usize, usize)> {
            if format.block_len() == 32 {
                vec![(1, 45, 32), (3, 96, 288), (17, 288, 544), (128, 64, 96), (33, 64, 1088), (136, 64, 1088)]
            } else {
                vec![(1, 3, 256), (17, 256, 512), (3, 512, 256)]
            }
        };
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q4_K] {
            for (m, n, k) in shapes(format) {
                for rows_are_columns in [true, false] {
                    if !rows_are_columns && n % format.block_len() != 0 {
                        continue;
                    }
                    let (rows, len) = if rows_are_columns { (n, k) } else { (k, n) };
                    let row_bytes = format.row_bytes(len);
                    let mut bytes = vec![0u8; rows * row_bytes];
                    if format.can_quantize() {
                        let w = values(rows * len, 7);
                        for (row, out) in w.chunks(len).zip(bytes.chunks_mut(row_bytes)) {
                            format.quantize(row, out).unwrap();
                        }
                    } else {
                        // Any bytes are codes; the block's f16 scale and minimum (its first four
                        // bytes, Q4_K) are set to modest values.
                        for (i, b) in bytes.iter_mut().enumerate() {
                            *b = (i.wrapping_mul(2_654_435_761) >> 7) as u8;
                        }
                        for block in bytes.chunks_mut(format.block_bytes()) {
                            block[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
                            block[2..4].copy_from_slice(&f16::from_f32(0.02).to_le_bytes());
                        }
                    }
                    let mut wide = vec![0.0f32; rows * len];
                    format.dequantize_rows(&bytes, len, &mut wide);
                    let x = values(m * k, 3);
                    let a = Lhs { data: &x, offset: 0, rows: m, cols: k, row_stride: k, col_stride: 1 };
                    let b = Weight::Blocks { bytes: &bytes, format, rows_are_columns };
                    let b_at =
                        |r: usize, j: usize| round(if rows_are_columns { wide[j * k + r] } else { wide[r * n + j] });
                    check(a, b, n, &b_at, &format!("{format:?} rows_are_columns={rows_are_columns}"));
                }
            }
        }
    }

    /// The AVX-512 Q8_0 packing (blocks converted in registers) must give the same bf16 words as
    /// the generic path, which rounds the dequantized f32 values: the products of Q8_0 blocks
    /// equal, bit for bit, those of their dequantized values stored as f32 in the same
    /// orientation. Edge shapes: `k` past one `KC` slice and not a multiple of it, a column count
    /// that is not a multiple of 16 or 32 (columns), an odd `k` (rows); extreme block scales.
    #[test]
    fn bf16_matmul_of_q8_0_blocks_equals_f32_of_their_values_bit_for_bit() {
        let format = BlockFormat::Q8_0;
        for (m, n, k) in [(1, 45, 32), (3, 17, 288), (5, 275, 544), (8, 96, 33), (2, 288, 289), (9, 544, 600)] {
            for rows_are_columns in [true, false] {
                let (rows, len) = if rows_are_columns { (n, k) } else { (k, n) };
                if len % 32 != 0 {
                    continue;
                }
                let row_bytes = format.row_bytes(len);
                let mut bytes = vec![0u8; rows * row_bytes];
                let w = values(rows * len, 5);
                for (row, out) in w.chunks(len).zip(bytes.chunks_mut(row_bytes)) {
                    format.quantize(row, out).unwrap();
                }
                // Some scales at the f16 extremes (subnormal, largest) and a zero block.
                for (i, block) in bytes.chunks_mut(34).enumerate() {
                    match i % 7 {
                        1 => block[..2].copy_from_slice(&0x0001u16.to_le_bytes()),
                        3 => block[..2].copy_from_slice(&0x7BFFu16.to_le_bytes()),
                        5 => block[2..].fill(0),
                        _ => {}
                    }
                }
                let mut wide = vec![0.0f32; rows * len];
                format.dequantize_rows(&bytes, len, &mut wide);
                let x = values(m * k, 3);
                let a = Lhs { data: &x, offset: 0, rows: m, cols: k, row_stride: k, col_stride: 1 };
                let blocks = Weight::Blocks { bytes: &bytes, format, rows_are_columns };
                let (k_stride, n_stride) = if rows_are_columns { (1, k) } else { (n, 1) };
                let floats = Weight::F32(Strided { data: &wide, offset: 0, k_stride, n_stride });
                for kernel in kernels() {
                    for accumulate in [false, true] {
                        let init = values(m * n, 11);
                        let (mut got, mut want) = (init.clone(), init);
                        matmul(kernel, a, blocks, n, &mut got, accumulate);
                        matmul(kernel, a, floats, n, &mut want, accumulate);
                        for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                g.to_bits() == w.to_bits(),
                                "{kernel:?} rows_are_columns={rows_are_columns} acc={accumulate} m={m} n={n} k={k} at {idx}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_matmul_with_empty_reduction_is_zero_or_unchanged() {
        let a = Lhs { data: &[], offset: 0, rows: 2, cols: 0, row_stride: 0, col_stride: 1 };
        let b = Weight::F32(Strided { data: &[], offset: 0, k_stride: 3, n_stride: 1 });
        let mut out = vec![5.0f32; 6];
        matmul(Kernel::Portable, a, b, 3, &mut out, true);
        assert_eq!(out, [5.0; 6]);
        matmul(Kernel::Portable, a, b, 3, &mut out, false);
        assert_eq!(out, [0.0; 6]);
    }
}
