//! Task heads and extra trainables on top of the frozen encoders: a sequence classification or
//! regression head (PEFT's `modules_to_save`), and unfreezing the normalisation layers (LoRETTA
//! trains them next to its adapters).

use crate::bert::{Bert, TokenIds};
use crate::llama::Llama;
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear, RmsNorm};
use burn::tensor::activation::tanh;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use tensor_peft_adapters::tensor::shape::plan_flat_shape;
use tensor_peft_adapters::tensor::tt_linear::TtLinear;
use tensor_peft_kernels::fused;

fn trainable<B: Backend, const D: usize>(p: &mut Param<Tensor<B, D>>) {
    *p = p.clone().map(|t| t.set_require_grad(true));
}

fn train_rms_norm<B: Backend>(n: &mut RmsNorm<B>) {
    trainable(&mut n.gamma);
}

fn train_layer_norm<B: Backend>(n: &mut LayerNorm<B>) {
    trainable(&mut n.gamma);
    n.beta.iter_mut().for_each(trainable);
}

impl<B: Backend> Llama<B> {
    /// Makes every RMSNorm scale trainable (LoRETTA's extra trainables).
    pub fn train_norms(mut self) -> Self {
        for l in &mut self.layers {
            train_rms_norm(&mut l.input_layernorm);
            train_rms_norm(&mut l.post_attention_layernorm);
        }
        train_rms_norm(&mut self.norm);
        self
    }
}

impl<B: Backend> Bert<B> {
    /// Makes every LayerNorm (scale and bias) trainable.
    pub fn train_norms(mut self) -> Self {
        train_layer_norm(&mut self.embeddings_norm);
        for l in &mut self.layers {
            train_layer_norm(&mut l.attention_norm);
            train_layer_norm(&mut l.output_norm);
        }
        self
    }
}

/// Standard deviation of a fresh [`SequenceClassifier`] head's weight: transformers'
/// `initializer_range` default, which BERT-family checkpoints (MiniLM, BERT, RoBERTa) ship with.
///
/// The same init as the transformers + PEFT reference runs, so that a comparison with them does not
/// also compare head inits. Burn's default `Linear` init (PyTorch's uniform `±1/√d` for weight and
/// bias) starts with larger logits; with it the torch TT-LoRA reference of the VADER recipe tested
/// 0.5 points lower over three seeds (`docs/results/vader-seeds/README.md`).
pub const HEAD_INIT_STD: f64 = 0.02;

/// TT rank of [`SequenceClassifier::with_tt_pooler`]'s layer (LoRETTA's default tensor rank).
pub const TT_POOLER_RANK: usize = 5;

/// A BERT-family encoder with a trainable head: `n_outputs` logits for classification, or one
/// score for regression (`n_outputs = 1`). Uses the pooler (`tanh(W·h_[CLS])`) when the checkpoint
/// has one, else mean pooling over the attention mask; with a TT pooler ([`Self::with_tt_pooler`],
/// LoRETTA's tensorized head) `act(TT(h_[CLS]))` replaces both.
#[derive(Module, Debug)]
pub struct SequenceClassifier<B: Backend> {
    /// The (adapted) encoder.
    pub encoder: Bert<B>,
    /// The trainable output layer `[d, n_outputs]`.
    pub head: Linear<B>,
    /// A trainable `d × d` tensor-train layer in place of the checkpoint's pooler, if any.
    pub tt_pooler: Option<TtLinear<B>>,
}

impl<B: Backend> SequenceClassifier<B> {
    /// A fresh head on `encoder`, initialised as transformers initialises
    /// `BertForSequenceClassification.classifier`: weight `N(0, HEAD_INIT_STD²)`, bias zero.
    pub fn new(encoder: Bert<B>, n_outputs: usize) -> Self {
        let device = encoder.word_embeddings.weight.device();
        let d = encoder.word_embeddings.weight.dims()[1];
        let n = n_outputs.max(1);
        // Drawn from the run's generator (not Burn's initializer, which draws from the backend's
        // own generator when the weight is first read): the same seed gives the same head on
        // every backend.
        let weight = tensor_peft_kernels::rng::random([d, n], Distribution::Normal(0.0, HEAD_INIT_STD), &device);
        let head =
            Linear { weight: Param::from_tensor(weight), bias: Some(Param::from_tensor(Tensor::zeros([n], &device))) };
        Self { encoder, head, tt_pooler: None }
    }

    /// LoRETTA's tensorized classification head: a fresh trainable `d × d` tensor-train layer of TT
    /// rank [`TT_POOLER_RANK`] (LoRETTA's initialisation, flat shape planned for `d × d`) replaces the
    /// checkpoint's pooler, as the official code replaces RoBERTa's `classifier.dense` and DeBERTa's
    /// `pooler.dense`; the family's pooler activation follows it (tanh, GELU for DeBERTa).
    pub fn with_tt_pooler(self) -> Result<Self, crate::error::ModelError> {
        let device = self.encoder.word_embeddings.weight.device();
        let d = self.encoder.word_embeddings.weight.dims()[1];
        let shape = plan_flat_shape(d, d)?;
        let tt = TtLinear::new(d, d, &shape, TT_POOLER_RANK, true, false, &device)?;
        Ok(Self { tt_pooler: Some(tt), ..self })
    }

    /// Logits (or scores) `[B, n_outputs]` for ids `[B, T]`, token types `[B, T]` (sentence
    /// pairs; `None`: all 0) and attention mask `[B, T]`.
    pub fn forward(&self, ids: TokenIds<B>, types: Option<TokenIds<B>>, mask: Tensor<B, 2>) -> Tensor<B, 2> {
        let hidden = self.encoder.forward(ids, types, mask.clone());
        self.classify(hidden, mask)
    }

    /// The head (pooling and output layer) on the encoder's hidden states `[B, T, d]`, with the
    /// attention mask `[B, T]`: logits (or scores) `[B, n_outputs]`.
    pub fn classify(&self, hidden: Tensor<B, 3>, mask: Tensor<B, 2>) -> Tensor<B, 2> {
        if let Some(tt) = &self.tt_pooler {
            let [b, _, d] = hidden.dims();
            let dense = tt.forward(hidden.narrow(1, 0, 1).reshape([b, d]));
            let pooled = if self.encoder.pooler_gelu { fused::gelu(dense) } else { tanh(dense) };
            return self.head.forward(pooled);
        }
        let pooled = match self.encoder.pooled(hidden.clone()) {
            Some(p) => p,
            None => {
                let [b, t, d] = hidden.dims();
                let mask = mask.reshape([b, t, 1]);
                (hidden * mask.clone()).sum_dim(1).reshape([b, d]) / mask.sum_dim(1).reshape([b, 1])
            }
        };
        self.head.forward(pooled)
    }
}

/// transformers' name of a sequence-classification head (`BertForSequenceClassification.classifier`,
/// `DebertaV2ForSequenceClassification.classifier`), under which adapter files hold it as PEFT's
/// `modules_to_save`.
pub const HF_HEAD: &str = "classifier";

/// `[rows, cols]` row-major values as `[cols, rows]`.
fn transposed(shape: &[usize], values: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let [rows, cols] = [shape[0], shape[1]];
    let out = (0..cols).flat_map(|c| (0..rows).map(move |r| values[r * cols + c])).collect();
    (vec![cols, rows], out)
}

/// A [`SequenceClassifier`]'s trained head tensor as transformers names and lays it out:
/// `head.weight` (`[d, n]`, Burn's layout) becomes `classifier.weight` (`[n, d]`) and `head.bias`
/// `classifier.bias`; any other tensor is returned unchanged.
pub fn head_to_hf(name: &str, shape: &[usize], values: &[f32]) -> (String, Vec<usize>, Vec<f32>) {
    match name {
        "head.weight" if shape.len() == 2 => {
            let (shape, values) = transposed(shape, values);
            (format!("{HF_HEAD}.weight"), shape, values)
        }
        "head.bias" => (format!("{HF_HEAD}.bias"), shape.to_vec(), values.to_vec()),
        _ => (name.to_string(), shape.to_vec(), values.to_vec()),
    }
}

/// The inverse of [`head_to_hf`] (files written before the head was named `classifier` hold
/// `head.*`, which passes unchanged).
pub fn head_from_hf(name: &str, shape: &[usize], values: &[f32]) -> (String, Vec<usize>, Vec<f32>) {
    match name.strip_prefix(HF_HEAD) {
        Some(".weight") if shape.len() == 2 => {
            let (shape, values) = transposed(shape, values);
            ("head.weight".into(), shape, values)
        }
        Some(".bias") => ("head.bias".into(), shape.to_vec(), values.to_vec()),
        _ => (name.to_string(), shape.to_vec(), values.to_vec()),
    }
}
