//! The kernels as Burn ops, for the models and adapters: the frozen base layers' linear map,
//! SwiGLU, GELU, RMSNorm, LayerNorm, rotary embedding, attention, and the causal-LM loss's softmax
//! cross-entropy.
//!
//! Each function computes what Burn's op chain computes and is the only way the models call it.
//! On the flex backend, plain or under autodiff, it runs this crate's kernels forward and backward
//! (the `flex` module registers the backward as a custom autodiff step: Burn's "backend
//! extension" pattern); on every other backend, and for dtypes other than f32, it runs Burn's op
//! chain, which the tests use as the reference. On a CPU training step the chains cost as much as
//! the GEMMs.

mod chain;
#[cfg(feature = "flex")]
mod flex;

use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::linear as burn_linear;
use burn::tensor::{Bool, DType, IndexingUpdateOp, Int, Tensor, TensorData, TensorPrimitive};
use std::sync::Arc;

use crate::quant::BlockFormat;
use crate::rope::RopeConfig;
use rayon::prelude::*;

/// Whether the fused kernels run on backend `B` (flex, alone or under autodiff): elsewhere every
/// op here is Burn's, and [`crate::ComputeDType::Bf16`] has no effect.
pub fn runs_on<B: Backend>() -> bool {
    #[cfg(feature = "flex")]
    return flex::runs::<B>();
    #[cfg(not(feature = "flex"))]
    false
}

/// Whether a frozen `[d_in, d_out]` weight loaded from HF's `[d_out, d_in]` layout should stay a
/// transposed view of it instead of being transposed into contiguous memory: on flex when
/// `d_out > d_in`. Flex's GEMM packs a column-major right operand slowly when its reduction
/// dimension is long; the forward `x·W` reduces over `d_in` and the backward `dY·Wᵀ` over
/// `d_out`, so the longer of the two should read row-major memory. On SmolLM2's 576→1536 MLP
/// projections that makes forward + backward 1.2× faster (3.41 → 2.86 ms on 256 rows); on ndarray
/// a column-major operand is slower whichever dimension it reduces, so the layout is left alone.
pub fn weight_as_transposed_view<B: Backend>(d_in: usize, d_out: usize) -> bool {
    #[cfg(feature = "flex")]
    return flex::runs::<B>() && d_out > d_in;
    #[cfg(not(feature = "flex"))]
    {
        let _ = (d_in, d_out);
        false
    }
}

/// A frozen layer's weight `W: [d_in, d_out]` as the linear ops take it: float values, or GGML
/// blocks.
#[derive(Debug, Clone)]
pub enum FrozenMatrix<B: Backend> {
    /// f32, or bf16/f16 for a half-precision base (widened per product, a column panel at a time).
    Values(Tensor<B, 2>),
    /// Quantized blocks (dequantized per product).
    Blocks(BlockMatrix<B>),
}

impl<B: Backend> From<Tensor<B, 2>> for FrozenMatrix<B> {
    fn from(w: Tensor<B, 2>) -> Self {
        FrozenMatrix::Values(w)
    }
}

impl<B: Backend> From<BlockMatrix<B>> for FrozenMatrix<B> {
    fn from(m: BlockMatrix<B>) -> Self {
        FrozenMatrix::Blocks(m)
    }
}

impl<B: Backend> FrozenMatrix<B> {
    /// `(d_in, d_out)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            FrozenMatrix::Values(w) => (w.dims()[0], w.dims()[1]),
            FrozenMatrix::Blocks(m) => (m.d_in, m.d_out),
        }
    }

    /// `W` as a float tensor: the values, or the blocks dequantized to f32.
    pub fn values(self) -> Tensor<B, 2> {
        match self {
            FrozenMatrix::Values(w) => w,
            FrozenMatrix::Blocks(m) => m.dequantize(),
        }
    }
}

/// A frozen `W: [d_in, d_out]` held as GGML blocks of `Wᵀ` (HF's `[d_out, d_in]` layout, whose
/// rows run along `d_in`, as GGUF files store them): the bytes of each output row, a U8 tensor
/// `[d_out, row_bytes]`, so the weight takes its quantized size on the device.
#[derive(Debug, Clone)]
pub struct BlockMatrix<B: Backend> {
    /// `[d_out, format.row_bytes(d_in)]` bytes (U8).
    pub bytes: Tensor<B, 2, Int>,
    /// The block format.
    pub format: BlockFormat,
    /// Input width (a multiple of the format's block size, [`BlockFormat::block_len`]).
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
}

impl<B: Backend> BlockMatrix<B> {
    /// Blocks from GGML bytes of `Wᵀ` (`[d_out, d_in]`, row after row); errors when the sizes do
    /// not fit or the backend holds no U8 tensors.
    pub fn from_bytes(
        bytes: Vec<u8>,
        format: BlockFormat,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Self, String> {
        format.check_row(d_in)?;
        let row_bytes = format.row_bytes(d_in);
        if bytes.len() != d_out * row_bytes {
            return Err(format!(
                "{} bytes for a {d_out}×{d_in} {} matrix (expected {})",
                bytes.len(),
                format.name(),
                d_out * row_bytes
            ));
        }
        if !B::supports_dtype(device, DType::U8) {
            return Err(format!("the {} backend cannot hold quantized blocks (U8 tensors)", B::name(device)));
        }
        let bytes = Tensor::from_data(TensorData::new(bytes, [d_out, row_bytes]), (device, DType::U8));
        Ok(Self { bytes, format, d_in, d_out })
    }

    /// Quantizes `w: [d_in, d_out]` (any float dtype) into blocks along `d_in`, on the host.
    pub fn quantize(w: Tensor<B, 2>, format: BlockFormat) -> Result<Self, String> {
        let [d_in, d_out] = w.dims();
        let device = w.device();
        // HF's `[d_out, d_in]` rows, so each block runs along `d_in`.
        let rows = w.transpose().into_data().convert::<f32>();
        let rows = rows.as_slice::<f32>().map_err(|e| format!("{e:?}"))?;
        Self::quantize_rows(rows, format, d_in, d_out, &device)
    }

    /// Quantizes the `d_out` rows of `d_in` weights in `rows` (`Wᵀ`, row-major, on the host); an
    /// error for a format that is only read ([`BlockFormat::can_quantize`]).
    pub fn quantize_rows(
        rows: &[f32],
        format: BlockFormat,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Self, String> {
        format.check_row(d_in)?;
        // Refused before the allocation (and also for an empty matrix).
        if !format.can_quantize() {
            return Err(format!("{} blocks can be loaded from a GGUF file but not quantized here", format.name()));
        }
        let row_bytes = format.row_bytes(d_in);
        let mut bytes = vec![0u8; d_out * row_bytes];
        bytes
            .par_chunks_mut(row_bytes)
            .zip(rows.par_chunks(d_in))
            .try_for_each(|(out, row)| format.quantize(row, out))?;
        Self::from_bytes(bytes, format, d_in, d_out, device)
    }

    /// `W: [d_in, d_out]` dequantized to f32 (through the host: for merging, norms and the
    /// backends without the fused kernels).
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let data = self.bytes.to_data().convert::<u8>();
        let bytes = data.as_slice::<u8>().expect("converted to u8");
        let mut out = vec![0.0f32; self.d_in * self.d_out];
        self.format.dequantize_rows(bytes, self.d_in, &mut out);
        Tensor::<B, 2>::from_data(TensorData::new(out, [self.d_out, self.d_in]), &self.bytes.device()).transpose()
    }
}

/// `x·W + b` for `x: [rows, d_in]`, `W: [d_in, d_out]` (any strides, e.g. a transposed view; a
/// frozen `W` may be bf16, f16 or quantized blocks, see [`FrozenMatrix`]), as Burn's `linear`. On
/// flex the products run on `gemm` directly into the output buffer: flex's own matmul zero-fills
/// and then copies every output. The backward computes `W`'s and `b`'s gradients only when they
/// are tracked, and keeps `x` only then; a half-precision or quantized `W` is widened to f32 for
/// each product, forward and backward, and the graph keeps only `W` as the model holds it.
pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: impl Into<FrozenMatrix<B>>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    let weight = weight.into();
    #[cfg(feature = "flex")]
    let (x, weight, bias) = match flex::linear(x, weight, bias) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    // Off the fused kernels a half-precision or quantized weight joins the product as an f32 copy,
    // which autodiff keeps until the backward pass.
    let weight = weight.values();
    let weight = if weight.dtype() == x.dtype() { weight } else { weight.cast(x.dtype()) };
    burn_linear(x, weight, bias)
}

/// `x·W + b + (dropout(x)·a)·b_lr` for `x: [rows, d_in]`, `W: [d_in, d_out]`, `a: [d_in, k]`,
/// `b_lr: [k, d_out]`: a frozen layer with a low-rank update whose input goes through [`dropout`]
/// with probability `dropout` (LoRA's `lora_dropout`; 0 for none), what every factored adapter
/// computes. On flex the update's product is added into the layer's output buffer by `gemm`, and
/// in the backward the update's part of `dX` into `dX` (through the mask in the same pass),
/// instead of each being written to a buffer of its own and summed in another pass. Elsewhere it
/// is [`linear`] plus the update through [`dropout`] and [`linear`].
pub fn low_rank_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: impl Into<FrozenMatrix<B>>,
    bias: Option<Tensor<B, 1>>,
    a: Tensor<B, 2>,
    b_lr: Tensor<B, 2>,
    dropout_prob: f64,
) -> Tensor<B, 2> {
    let weight = weight.into();
    #[cfg(feature = "flex")]
    let (x, weight, bias, a, b_lr) = match flex::low_rank_linear(x, weight, bias, a, b_lr, dropout_prob) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    linear(x.clone(), weight, bias) + linear(linear(dropout(x, dropout_prob), a, None), b_lr, None)
}

/// Inverted dropout with drop probability `prob`, as Burn's `Dropout` (identity without autodiff
/// or at `prob = 0`). The mask is a hash of each element's index and a seed drawn from
/// [`crate::rng`], so one seed gives the same mask on every backend. On flex it is applied in one
/// pass forward and recomputed in the backward (Burn draws a Bernoulli tensor element by element
/// and multiplies twice, which cost almost as much as the rest of an adapted layer's step);
/// elsewhere the mask is computed on the host and multiplied in on the device.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, prob: f64) -> Tensor<B, D> {
    if !B::ad_enabled(&x.device()) || prob == 0.0 {
        return x;
    }
    #[cfg(feature = "flex")]
    let x = match flex::dropout(x, prob) {
        Ok(out) => return out,
        Err(x) => x,
    };
    let n = x.shape().num_elements();
    if !(0.0..1.0).contains(&prob) || n > u32::MAX as usize {
        // Outside the mask kernel's domain (everything dropped, or indices past 2³²).
        return burn::nn::Dropout { prob }.forward(x);
    }
    // `mask[i]` is 0 or `1/keep`, so `x · mask` rounds as the flex kernel's `x[i] · (1/keep)`.
    let keep = (1.0 - prob) as f32;
    let mut mask = vec![0.0f32; n];
    crate::dropout::dropout(&vec![1.0f32; n], crate::rng::dropout_seed(), keep, &mut mask);
    let mask: Tensor<B, D> = Tensor::from_data(TensorData::new(mask, x.shape()), &x.device());
    let dtype = x.dtype();
    x * if mask.dtype() == dtype { mask } else { mask.cast(dtype) }
}

/// `silu(gate) · up`, LLaMA's MLP gate.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let (gate, up) = match flex::swiglu(gate, up) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    silu(gate) * up
}

/// RMSNorm over the last dimension: `x / √(mean(x²) + ε) · γ`, as Burn's `RmsNorm`.
pub fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, epsilon: f64) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let (x, gamma) = match flex::rms_norm(x, gamma, epsilon) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    // As Burn's `RmsNorm`: the mean of squares in f32 whatever the activations' dtype (bf16 on GPUs).
    let dtype = x.dtype();
    let rms = (x.clone().cast(DType::F32).square().mean_dim(D - 1) + epsilon).sqrt();
    (x / rms.cast(dtype)) * gamma.unsqueeze()
}

/// Rotary position embedding (HF rotate-half layout) for positions `start..start + seq`, built once
/// per forward and applied to every layer's queries and keys.
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    start: usize,
    // Read by the flex kernel only.
    #[cfg_attr(not(feature = "flex"), allow(dead_code))]
    seq: usize,
    head_dim: usize,
    /// `cos`, `sin` of the `[seq, head_dim/2]` angles, for the fused kernel.
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
    /// For the op chain, per head count: the tables repeated per head as `[1, seq·heads·head_dim]`
    /// rows. One row broadcast over the batch is the shape Burn's CPU backends vectorise; a
    /// `[seq, head_dim]` table broadcast over the heads took their scalar strided path.
    rows: Vec<(usize, Tensor<B, 2>, Tensor<B, 2>)>,
}

impl<B: Backend> Rope<B> {
    /// Tables for `seq` positions from `start`, head size `head_dim`, frequencies from `config`
    /// (as transformers computes them for a forward over positions `0..start + seq`), for
    /// projections with any of `head_counts` heads.
    pub fn new(
        start: usize,
        seq: usize,
        head_dim: usize,
        config: &RopeConfig,
        head_counts: &[usize],
        device: &B::Device,
    ) -> Self {
        let half = head_dim / 2;
        let (inv_freq, scale) = config.frequencies(head_dim, start + seq);
        let (mut cos, mut sin) = (Vec::with_capacity(seq * half), Vec::with_capacity(seq * half));
        for pos in start..start + seq {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push((angle.cos() * scale) as f32);
                sin.push((angle.sin() * scale) as f32);
            }
        }
        let (cos, sin): (Arc<[f32]>, Arc<[f32]>) = (cos.into(), sin.into());
        let mut rows = Vec::new();
        #[cfg(feature = "flex")]
        let chain = !flex::runs::<B>();
        #[cfg(not(feature = "flex"))]
        let chain = true;
        if chain {
            for &heads in head_counts {
                if rows.iter().all(|(n, _, _)| *n != heads) {
                    let row = |table: &[f32]| repeat_per_head::<B>(table, seq, heads, head_dim, device);
                    rows.push((heads, row(&cos), row(&sin)));
                }
            }
        }
        Self { start, seq, head_dim, cos, sin, rows }
    }

    /// Position of the first row of the tables.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Width of the heads the tables rotate.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// `x·cos + rotate_half(x)·sin` for `x: [B, seq, heads, head_dim]`, heads one of the counts
    /// given to [`Rope::new`].
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        #[cfg(feature = "flex")]
        let x = match flex::rope(x, &self.cos, &self.sin, self.seq, self.head_dim) {
            Ok(out) => return out,
            Err(x) => x,
        };
        let [b, t, n, d_h] = x.dims();
        let (cos, sin) = match self.rows.iter().find(|(heads, _, _)| *heads == n) {
            Some((_, c, s)) => (c.clone(), s.clone()),
            None => {
                let row = |table: &[f32]| repeat_per_head::<B>(table, t, n, d_h, &x.device());
                (row(&self.cos), row(&self.sin))
            }
        };
        let half = d_h / 2;
        let row = t * n * d_h;
        let rotated = Tensor::cat(vec![x.clone().narrow(3, half, half).neg(), x.clone().narrow(3, 0, half)], 3);
        (x.reshape([b, row]) * cos + rotated.reshape([b, row]) * sin).reshape([b, t, n, d_h])
    }
}

/// A `[seq, head_dim/2]` table as one `[1, seq·heads·head_dim]` row: each position's half-row
/// twice (HF repeats the frequencies), once per head.
fn repeat_per_head<B: Backend>(
    table: &[f32],
    seq: usize,
    heads: usize,
    head_dim: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let half = head_dim / 2;
    let mut row = Vec::with_capacity(seq * heads * head_dim);
    for pos in table.chunks_exact(half.max(1)).take(seq) {
        for _ in 0..heads {
            row.extend_from_slice(pos);
            row.extend_from_slice(pos);
        }
    }
    Tensor::from_data(TensorData::new(row, [1, seq * heads * head_dim]), device)
}

/// Which keys each query attends to in [`attention`].
#[derive(Debug, Clone)]
pub enum AttentionMask<B: Backend> {
    /// Causal: query `i` sits at position `offset + i` and sees keys `0..=offset + i` (a KV cache
    /// holds the `offset` earlier positions), or with a sliding `window` only the last `window` of
    /// them (Mistral).
    Causal {
        /// Cached positions before the first query.
        offset: usize,
        /// How many keys, ending at its own position, a query sees; `None`: all earlier keys.
        window: Option<usize>,
    },
    /// Every query sees every key that is not padding.
    KeyPadding(KeyPadding<B>),
}

/// The padded keys of a batch, in the form the running backend needs: flags for the fused
/// kernel, which skips those keys, or an additive `[B, H, T, T]` bias of −10⁹ for the op chain
/// (laid out in full once per forward: added as a `[B, 1, 1, T]` broadcast it took flex's strided
/// path, 11 ms per layer on a MiniLM batch).
#[derive(Debug, Clone)]
pub struct KeyPadding<B: Backend> {
    // Read by the flex kernel only.
    #[cfg_attr(not(feature = "flex"), allow(dead_code))]
    padded: Arc<[bool]>,
    bias: Option<Tensor<B, 4>>,
}

impl<B: Backend> KeyPadding<B> {
    /// From an HF attention mask `[B, T]` (1 = token, 0 = padding), for `heads` heads and
    /// `T` queries per sequence.
    pub fn new(attention_mask: Tensor<B, 2>, heads: usize) -> Self {
        #[cfg(feature = "flex")]
        if flex::runs::<B>() {
            let mask = attention_mask.into_data().convert::<f32>();
            let padded = mask.iter::<f32>().map(|m| m < 0.5).collect();
            return Self { padded, bias: None };
        }
        let [b, t] = attention_mask.dims();
        let bias = (attention_mask.ones_like() - attention_mask)
            .mul_scalar(-1e9)
            .reshape([b, 1, 1, t])
            .repeat_dim(1, heads)
            .repeat_dim(2, t);
        Self { padded: Arc::from(Vec::new()), bias: Some(bias) }
    }
}

/// `softmax(q·kᵀ/√d_h + mask)·v` per head, with grouped-query heads: `q: [B, T_q, H, d_h]`,
/// `k`, `v`: `[B, T_k, H_kv, d_h]` (query head `h` reads key/value head `h / (H / H_kv)`), output
/// `[B, T_q, H, d_h]`: the projections' own layouts, so no head transposes on the fused path.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let (q, k, v) = match flex::attention(q, k, v, mask) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    let [b, t_q, h, d_h] = q.dims();
    let [_, t_k, kv, _] = k.dims();
    let device = q.device();
    let repeat = |y: Tensor<B, 4>| {
        let y = y.swap_dims(1, 2);
        if kv == h { y } else { y.reshape([b, kv, 1, t_k, d_h]).repeat_dim(2, h / kv).reshape([b, h, t_k, d_h]) }
    };
    let scores = q.swap_dims(1, 2).matmul(repeat(k).swap_dims(2, 3)).div_scalar((d_h as f64).sqrt());
    let scores = match mask {
        AttentionMask::Causal { offset, window } => {
            let hidden: Vec<bool> = (0..t_q * t_k)
                .map(|n| {
                    let (query, key) = (offset + n / t_k, n % t_k);
                    key > query || window.is_some_and(|w| key + w <= query)
                })
                .collect();
            let hidden = Tensor::<B, 2, Bool>::from_data(TensorData::new(hidden, [t_q, t_k]), &device);
            scores.mask_fill(hidden.unsqueeze::<4>(), f32::NEG_INFINITY)
        }
        AttentionMask::KeyPadding(padding) => match &padding.bias {
            Some(bias) => scores + bias.clone(),
            None => scores,
        },
    };
    softmax(scores, 3).matmul(repeat(v)).swap_dims(1, 2)
}

/// The exact (erf) GELU, `x·Φ(x)`, as BERT uses it. The op chain builds `Φ` from Abramowitz &
/// Stegun's approximation 7.1.26 of `erf` (absolute error ≤ 1.5e-7, below f32's resolution of `Φ`
/// near 1) and hands autodiff the derivative `Φ(x) + x·φ(x)`: about 2× faster than Burn's `gelu` on
/// the CPU backends, and exact where Burn's backward flushes to 0 beyond |x| ≈ 5.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let x = match flex::gelu(x) {
        Ok(out) => return out,
        Err(x) => x,
    };
    chain::gelu(x)
}

/// LayerNorm over the last dimension, `(x − mean) / √(var + ε) · γ + β`, as Burn's `LayerNorm`.
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let (x, gamma, beta) = match flex::layer_norm(x, gamma, beta, epsilon) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        Some(beta.into_primitive().tensor()),
        epsilon,
    )))
}

/// The weighted softmax cross-entropy of each logit row against its target, outside the autodiff
/// graph: `Σᵢ −wᵢ·log softmax(zᵢ)[tᵢ]` as a `[1]` tensor and, when `with_grad`, its gradient with
/// respect to the logits, `w·(softmax(z) − onehot(t))` (`[rows, vocab]`). `logits` is consumed: on
/// flex the gradient is written over it in three passes per row. Targets must lie in the
/// vocabulary.
pub fn softmax_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    weights: Tensor<B, 1>,
    with_grad: bool,
) -> (Tensor<B, 1>, Option<Tensor<B, 2>>) {
    #[cfg(feature = "flex")]
    let (logits, targets, weights) = match flex::softmax_cross_entropy(logits, targets, weights) {
        Ok((value, grad)) => return (value, with_grad.then_some(grad)),
        Err(inputs) => inputs,
    };
    let n = targets.dims()[0];
    let (target, weight) = (targets.reshape([n, 1]), weights.reshape([n, 1]));
    let shifted = logits.clone() - logits.max_dim(1);
    let exp = shifted.clone().exp();
    let sum = exp.clone().sum_dim(1);
    let log_p = shifted.gather(1, target.clone()) - sum.clone().log();
    let value = (log_p * weight.clone()).sum().neg();
    let grad =
        with_grad.then(|| (exp * (weight.clone() / sum)).scatter(1, target, weight.neg(), IndexingUpdateOp::Add));
    (value, grad)
}
