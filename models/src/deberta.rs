//! DeBERTa-v2/v3: the BERT-family encoder ([`crate::bert::Bert`], whose blocks it shares) with
//! disentangled attention. Besides content-to-content scores `q·kᵀ`, each query scores the
//! relative position of each key (content-to-position, `c2p`) and each key the relative position
//! of each query (position-to-content, `p2c`), from learned relative-position embeddings passed
//! through the layer's own query and key projections (adapters included, as in PEFT).

use crate::arch::{ArchSpec, DisentangledAttention};
use crate::layout::Projection;
use burn::module::{Module, Param};
use burn::nn::LayerNorm;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use tensor_peft_adapters::{AdaptedLinear, AttentionMatrix, SharedFactors};

/// The adaptable projections of a DeBERTa block (HF names, `(d_in, d_out)`), in the order of
/// [`crate::bert::BertLayer`]'s projections, which hold them.
pub const LAYOUT: &[Projection] = &[
    Projection { name: "attention.self.query_proj", gguf: None, role: Some(AttentionMatrix::Query), shape: square },
    Projection { name: "attention.self.key_proj", gguf: None, role: Some(AttentionMatrix::Key), shape: square },
    Projection { name: "attention.self.value_proj", gguf: None, role: Some(AttentionMatrix::Value), shape: square },
    Projection { name: "attention.output.dense", gguf: None, role: Some(AttentionMatrix::Output), shape: square },
    Projection { name: "intermediate.dense", gguf: None, role: None, shape: |s| (s.hidden, s.intermediate) },
    Projection { name: "output.dense", gguf: None, role: None, shape: |s| (s.intermediate, s.hidden) },
];

fn square(spec: &ArchSpec) -> (usize, usize) {
    (spec.hidden, spec.hidden)
}

/// The relative-position embeddings (`encoder.rel_embeddings`, `[2·span, d]`) and their LayerNorm.
#[derive(Module, Debug)]
pub struct RelativeEmbeddings<B: Backend> {
    /// `[2·span, d]`: row `span + r` embeds relative position (or bucket) `r`.
    pub weight: Param<Tensor<B, 2>>,
    /// `encoder.LayerNorm`, when `norm_rel_ebd` asks for it.
    pub norm: Option<LayerNorm<B>>,
    /// The attention settings.
    #[module(skip)]
    pub settings: DisentangledAttention,
}

/// What every layer's disentangled attention shares in one forward pass: the (normed) relative
/// embeddings and the gather indices of the `c2p` and `p2c` scores.
#[derive(Debug, Clone)]
pub struct RelativeContext<B: Backend> {
    embeddings: Tensor<B, 3>,
    c2p_index: Tensor<B, 4, Int>,
    p2c_index: Tensor<B, 4, Int>,
    settings: DisentangledAttention,
}

/// transformers' `make_log_bucket_position` for one relative position, in f32 as torch computes
/// it: distances below half the buckets stay exact, longer ones share logarithmic buckets up to
/// `max_position`.
fn log_bucket(relative: i64, buckets: usize, max_position: usize) -> i64 {
    let mid = (buckets / 2) as i64;
    let abs = if relative < mid && relative > -mid { mid - 1 } else { relative.abs() };
    if abs <= mid {
        return relative;
    }
    let ratio = (abs as f32 / mid as f32).ln() / ((max_position as f32 - 1.0) / mid as f32).ln();
    let log_pos = (ratio * (mid - 1) as f32).ceil() + mid as f32;
    log_pos as i64 * relative.signum()
}

impl<B: Backend> RelativeEmbeddings<B> {
    /// The shared state of a forward over `[batch, len]` tokens with `heads` heads.
    pub fn context(&self, batch: usize, len: usize, heads: usize, eps: f64) -> RelativeContext<B> {
        let s = &self.settings;
        let device = self.weight.device();
        let mut embeddings = self.weight.val();
        if let Some(norm) = &self.norm {
            let beta = norm.beta.as_ref().map_or_else(|| norm.gamma.val().zeros_like(), |b| b.val());
            embeddings =
                crate::fused::layer_norm(embeddings.unsqueeze::<3>(), norm.gamma.val(), beta, eps).squeeze_dim(0);
        }
        let relative = |i: usize, j: usize| {
            let r = i as i64 - j as i64;
            s.buckets.map_or(r, |b| log_bucket(r, b, s.max_relative))
        };
        let span = s.span as i64;
        let clamp = |r: i64| (r + span).clamp(0, 2 * span - 1);
        // c2p: query i reads the embedding of δ(i, j); p2c: key j reads that of −δ(j, i) (the
        // `[j, i]` layout its gather produces, transposed after).
        let table = |f: &dyn Fn(usize, usize) -> i64| {
            let rows: Vec<i64> = (0..len).flat_map(|a| (0..len).map(move |b| (a, b))).map(|(a, b)| f(a, b)).collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(rows, [len, len]), &device)
                .reshape([1, 1, len, len])
                .repeat_dim(0, batch)
                .repeat_dim(1, heads)
        };
        RelativeContext {
            embeddings: embeddings.unsqueeze::<3>(),
            c2p_index: table(&|i, j| clamp(relative(i, j))),
            p2c_index: table(&|j, i| clamp(-relative(j, i))),
            settings: s.clone(),
        }
    }
}

/// Disentangled self-attention over `x` (`[B, T, d]`), with an additive key mask `bias`
/// (`[B, 1, 1, T]`: 0 for tokens, −10⁹ for padding): `softmax((q·kᵀ + c2p + p2c)/√(d_h·n))·v`,
/// `n` = 1 + the number of relative terms. Returns `[B, T, d]` before the output projection.
pub(crate) fn attention<B: Backend>(
    projections: [&AdaptedLinear<B>; 3],
    x: Tensor<B, 3>,
    heads: usize,
    context: &RelativeContext<B>,
    bias: Tensor<B, 4>,
    shared: &SharedFactors<B>,
) -> Tensor<B, 3> {
    let [query, key, value] = projections;
    let [b, t, d] = x.dims();
    let d_h = d / heads;
    // `[rows, n, d]` projections to `[rows, heads, n, d_h]`.
    let split = |y: Tensor<B, 3>| {
        let [rows, n, _] = y.dims();
        y.reshape([rows, n, heads, d_h]).swap_dims(1, 2)
    };
    let q = split(query.forward(x.clone(), shared));
    let k = split(key.forward(x.clone(), shared));
    let v = split(value.forward(x, shared));
    let s = &context.settings;
    let terms = 1 + s.c2p as usize + s.p2c as usize;
    let scale = ((d_h * terms) as f32).sqrt() as f64;
    let mut scores = q.clone().matmul(k.clone().swap_dims(2, 3));
    let positions = context.embeddings.clone();
    let rows = positions.dims()[1];
    if s.c2p {
        let pos_key = split(key.forward(positions.clone(), shared)).expand([b, heads, rows, d_h]);
        let c2p = q.matmul(pos_key.swap_dims(2, 3));
        scores = scores + c2p.gather(3, context.c2p_index.clone());
    }
    if s.p2c {
        let pos_query = split(query.forward(positions, shared)).expand([b, heads, rows, d_h]);
        let p2c = k.matmul(pos_query.swap_dims(2, 3));
        scores = scores + p2c.gather(3, context.p2c_index.clone()).swap_dims(2, 3);
    }
    let probs = softmax(scores.div_scalar(scale) + bias, 3);
    probs.matmul(v).swap_dims(1, 2).reshape([b, t, d])
}

#[cfg(test)]
mod tests {
    use super::log_bucket;

    /// Values of transformers' `make_log_bucket_position` (4 buckets over 8 positions, and
    /// DeBERTa-v3's 256 over 512).
    #[test]
    fn log_buckets_match_transformers() {
        let got: Vec<i64> = (-12..=12).map(|r| log_bucket(r, 4, 8)).collect();
        let expected = [-4, -4, -4, -4, -4, -3, -3, -3, -3, -3, -2, -1, 0, 1, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4];
        assert_eq!(got, expected);
        let got: Vec<i64> = (-300..=300).step_by(37).map(|r| log_bucket(r, 256, 512)).collect();
        let expected = [-207, -195, -181, -164, -144, -115, -78, -41, -4, 33, 70, 107, 139, 160, 177, 192, 204];
        assert_eq!(got, expected);
    }
}
