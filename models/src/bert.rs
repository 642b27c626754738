//! BERT/RoBERTa-family encoder (learned absolute positions, token types, post-LN blocks, exact
//! GELU) whose projections are [`AdaptedLinear`]s, with mean-pooled L2-normalised sentence
//! embeddings (what sentence-transformers gives for models such as all-MiniLM-L6-v2). DeBERTa-v2/v3
//! are the same blocks with disentangled attention ([`crate::deberta`]) and a GELU context pooler.

use crate::arch::{ArchSpec, Family};
use crate::deberta::{RelativeContext, RelativeEmbeddings};
use crate::error::ModelError;
use crate::fused::{self, AttentionMask, KeyPadding};
use crate::inject::{Targets, adapter_slots, inject};
use crate::layout::{layout_table, load_projections};
use crate::precision::{BaseDType, embed};
use crate::stack::{BlockStack, StackInput};
use crate::tokenizer::TextTokenizer;
use crate::weights::Weights;
use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::tanh;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use std::path::Path;
/// What the loaders return.
type Loaded<T> = Result<T, ModelError>;

/// Token ids (or token types) `[batch, tokens]`.
pub type TokenIds<B> = Tensor<B, 2, Int>;

use tensor_peft_adapters::{
    AdaptedLinear, AttentionMatrix, FrozenLinear, MethodConfig, ResidualAdapter, SharedFactors,
};

layout_table! {
    /// One encoder block (post-LN).
    BertLayer {
        /// `attention.output.LayerNorm`.
        attention_norm: LayerNorm<B>,
        /// `output.LayerNorm`.
        output_norm: LayerNorm<B>,
        /// Attention heads.
        n_heads: usize,
    }
    /// The adaptable projections of a [`BertLayer`] (HF names, `(d_in, d_out)`), in checkpoint order.
    LAYOUT {
        query: "attention.self.query", Some(AttentionMatrix::Query), |s| (s.hidden, s.hidden);
        key: "attention.self.key", Some(AttentionMatrix::Key), |s| (s.hidden, s.hidden);
        value: "attention.self.value", Some(AttentionMatrix::Value), |s| (s.hidden, s.hidden);
        attention_output: "attention.output.dense", Some(AttentionMatrix::Output), |s| (s.hidden, s.hidden);
        intermediate: "intermediate.dense", None, |s| (s.hidden, s.intermediate);
        output: "output.dense", None, |s| (s.intermediate, s.hidden);
    }
    /// Where a [`BertLayer`] applies residual adapters.
    RESIDUAL_POSITIONS {
        attention_adapter: Attention;
        ffn_adapter: FeedForward;
    }
}

/// A BERT-family encoder.
#[derive(Module, Debug)]
pub struct Bert<B: Backend> {
    /// Token embeddings.
    pub word_embeddings: Embedding<B>,
    /// Absolute position embeddings (none in DeBERTa-v3, whose positions are relative).
    pub position_embeddings: Option<Embedding<B>>,
    /// Token-type embeddings (none when `type_vocab_size` is 0).
    pub token_type_embeddings: Option<Embedding<B>>,
    /// DeBERTa's relative-position embeddings, for disentangled attention.
    pub relative: Option<RelativeEmbeddings<B>>,
    /// Embedding LayerNorm.
    pub embeddings_norm: LayerNorm<B>,
    /// Encoder blocks.
    pub layers: Vec<BertLayer<B>>,
    /// Pooler (`tanh(W·h_[CLS])`, DeBERTa: `gelu(W·h_[CLS])`), when the checkpoint has one.
    pub pooler: Option<Linear<B>>,
    /// The pooler's activation: GELU for DeBERTa's context pooler, else tanh.
    #[module(skip)]
    pub pooler_gelu: bool,
    /// Factors shared by adapters across layers (LoTR, LoRTA), held once.
    pub shared: SharedFactors<B>,
    /// Position offset (2 for RoBERTa, whose positions start after the padding index).
    pub position_offset: usize,
    /// ε of every LayerNorm (`layer_norm_eps`).
    pub norm_eps: f64,
}

/// `norm` applied with the model's ε (Burn's `LayerNorm` keeps its own private).
fn norm<B: Backend>(norm: &LayerNorm<B>, x: Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
    let beta = norm.beta.as_ref().map_or_else(|| norm.gamma.val().zeros_like(), |b| b.val());
    fused::layer_norm(x, norm.gamma.val(), beta, eps)
}

/// The HF LayerNorm `name` (weight, bias).
fn layer_norm<B: Backend>(w: &mut Weights, name: &str, d: usize, eps: f64, dev: &B::Device) -> Loaded<LayerNorm<B>> {
    let mut norm = LayerNormConfig::new(d).with_epsilon(eps).init(dev);
    norm.gamma = Param::from_tensor(w.take(&format!("{name}.weight"), [d], dev)?);
    norm.beta = Some(Param::from_tensor(w.take(&format!("{name}.bias"), [d], dev)?));
    Ok(norm)
}

/// The HF projection `name` (weight `[d_out, d_in]`, bias) in Burn's layout, held as the base
/// dtype says.
fn dense<B: Backend>(w: &mut Weights, name: &str, dims: (usize, usize), dev: &B::Device) -> Loaded<FrozenLinear<B>> {
    let (d_in, d_out) = dims;
    let weight = w.take_transposed::<B>(&format!("{name}.weight"), [d_out, d_in], dev)?;
    let bias = w.take::<B, 1>(&format!("{name}.bias"), [d_out], dev)?;
    Ok(FrozenLinear { bias: Some(Param::from_tensor(bias)), ..FrozenLinear::new(weight) })
}

/// The pooler `name` (weight `[d, d]`, bias), float values whatever the base dtype.
fn pooler<B: Backend>(w: &mut Weights, name: &str, d: usize, dev: &B::Device) -> Loaded<Linear<B>> {
    let weight = w.take_head::<B>(&format!("{name}.weight"), [d, d], dev)?;
    let bias = w.take::<B, 1>(&format!("{name}.bias"), [d], dev)?;
    Ok(Linear { weight: Param::from_tensor(weight), bias: Some(Param::from_tensor(bias)) })
}

fn embedding<B: Backend>(
    w: &mut Weights,
    name: &str,
    n: usize,
    d: usize,
    device: &B::Device,
) -> Result<Embedding<B>, ModelError> {
    Ok(Embedding { weight: Param::from_tensor(w.take_matrix(name, [n, d], device)?) })
}

/// What every block of one encoder forward shares: how attention sees positions and padding.
#[derive(Debug, Clone)]
pub struct BertContext<B: Backend>(Attention<B>);

/// How a block's attention sees positions and padding.
#[derive(Debug, Clone)]
enum Attention<B: Backend> {
    /// Plain scaled dot-product attention with a padding mask (positions were added to the input).
    Absolute(AttentionMask<B>),
    /// DeBERTa's disentangled attention, with the additive `[B, 1, 1, T]` padding bias.
    Disentangled(RelativeContext<B>, Tensor<B, 4>),
}

impl<B: Backend> BertLayer<B> {
    fn forward(&self, x: Tensor<B, 3>, attention: &Attention<B>, eps: f64, shared: &SharedFactors<B>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let h = self.n_heads;
        let attn = match attention {
            Attention::Absolute(mask) => {
                // Heads stay in the projections' `[B, T, H, d_h]` layout.
                let heads = |y: Tensor<B, 3>| y.reshape([b, t, h, d / h]);
                let q = heads(self.query.forward(x.clone(), shared));
                let k = heads(self.key.forward(x.clone(), shared));
                let v = heads(self.value.forward(x.clone(), shared));
                fused::attention(q, k, v, mask).reshape([b, t, d])
            }
            Attention::Disentangled(context, bias) => crate::deberta::attention(
                [&self.query, &self.key, &self.value],
                x.clone(),
                h,
                context,
                bias.clone(),
                shared,
            ),
        };
        let mut attn_out = self.attention_output.forward(attn, shared);
        if let Some(adapter) = &self.attention_adapter {
            attn_out = adapter.forward(attn_out);
        }
        let x = norm(&self.attention_norm, attn_out + x, eps);
        let mut ffn = self.output.forward(fused::gelu(self.intermediate.forward(x.clone(), shared)), shared);
        if let Some(adapter) = &self.ffn_adapter {
            ffn = adapter.forward(ffn);
        }
        norm(&self.output_norm, ffn + x, eps)
    }
}

impl<B: Backend> Bert<B> {
    /// Loads an HF BERT/RoBERTa/DeBERTa-v2 directory (`config.json` + safetensors). Every parameter
    /// is frozen. Accepts bare encoder names (`embeddings.…`) and `bert.`/`roberta.`/`deberta.`
    /// prefixed ones; DeBERTa's masked-LM pretraining heads are not loaded.
    pub fn from_hf_dir(dir: &Path, device: &B::Device) -> Result<(Self, ArchSpec), ModelError> {
        Self::from_hf_dir_as(dir, device, BaseDType::F32)
    }

    /// [`Self::from_hf_dir`] with the frozen matrices held at `base` ([`BaseDType`]).
    pub fn from_hf_dir_as(dir: &Path, device: &B::Device, base: BaseDType) -> Result<(Self, ArchSpec), ModelError> {
        let spec = ArchSpec::from_config_file(&dir.join("config.json"))?;
        spec.require_implemented()?;
        if !spec.family.is_encoder() {
            return Err(ModelError::Field {
                path: dir.join("config.json"),
                field: "model_type",
                problem: format!("is a {} model; expected a BERT-family encoder", spec.family.name()),
            });
        }
        let mut w = Weights::from_hf_dir(dir)?
            .strip_prefixes(&["bert.", "roberta.", "deberta."])
            .discard_prefixes(&["lm_predictions.", "mask_predictions."])
            .with_base_dtype(base);
        let roberta = std::fs::read_to_string(dir.join("config.json")).is_ok_and(|c| c.contains("\"roberta\""));
        let (d, eps) = (spec.hidden, spec.norm_eps);
        let mut layers = Vec::with_capacity(spec.layers);
        for l in 0..spec.layers {
            let p = spec.family.block_path(l);
            // In `LAYOUT` order.
            let [query, key, value, attention_output, intermediate, output] =
                load_projections(&spec, &p, |name, d_in, d_out| {
                    Ok(AdaptedLinear::new(dense(&mut w, name, (d_in, d_out), device)?, None)?)
                })?;
            layers.push(BertLayer {
                query,
                key,
                value,
                attention_output,
                attention_adapter: None,
                attention_norm: layer_norm(&mut w, &format!("{p}.attention.output.LayerNorm"), d, eps, device)?,
                intermediate,
                output,
                ffn_adapter: None,
                output_norm: layer_norm(&mut w, &format!("{p}.output.LayerNorm"), d, eps, device)?,
                n_heads: spec.heads,
            });
        }
        let pooler =
            if w.contains("pooler.dense.weight") { Some(pooler(&mut w, "pooler.dense", d, device)?) } else { None };
        let mut optional_embedding = |name: &str, n: usize| match n {
            0 => Ok(None),
            n => embedding(&mut w, name, n, d, device).map(Some),
        };
        let position_embeddings = optional_embedding("embeddings.position_embeddings.weight", spec.positions)?;
        let token_type_embeddings = optional_embedding("embeddings.token_type_embeddings.weight", spec.type_vocab)?;
        let relative = match &spec.relative {
            None => None,
            Some(settings) => Some(RelativeEmbeddings {
                weight: Param::from_tensor(w.take::<B, 2>(
                    "encoder.rel_embeddings.weight",
                    [2 * settings.span, d],
                    device,
                )?),
                norm: match settings.norm_embeddings {
                    true => Some(layer_norm(&mut w, "encoder.LayerNorm", d, eps, device)?),
                    false => None,
                },
                settings: settings.clone(),
            }),
        };
        let model = Bert {
            word_embeddings: embedding(&mut w, "embeddings.word_embeddings.weight", spec.vocab, d, device)?,
            position_embeddings,
            token_type_embeddings,
            relative,
            embeddings_norm: layer_norm(&mut w, "embeddings.LayerNorm", d, eps, device)?,
            layers,
            pooler,
            pooler_gelu: spec.family == Family::Deberta,
            shared: SharedFactors::empty(),
            position_offset: if roberta { 2 } else { 0 },
            norm_eps: eps,
        };
        if let Some(example) = w.remaining().first() {
            return Err(ModelError::UnexpectedTensors { count: w.len(), example: example.clone() });
        }
        Ok((model.no_grad(), spec))
    }

    /// Hidden states `[B, T, d]` for token ids `[B, T]`, token types `[B, T]` (0 = first sentence,
    /// 1 = second of a pair; `None`: all 0) and `mask` `[B, T]` (1 = token, 0 = padding).
    /// A model without token types ignores `types`, as transformers does.
    pub fn forward(&self, ids: TokenIds<B>, types: Option<TokenIds<B>>, mask: Tensor<B, 2>) -> Tensor<B, 3> {
        self.stack_forward(&StackInput { ids, types, mask: Some(mask) })
    }

    /// The attention mask of `input` (all ones when it has none).
    fn mask_of(input: &StackInput<B>) -> Tensor<B, 2> {
        input.mask.clone().unwrap_or_else(|| Tensor::ones(input.ids.dims(), &input.ids.device()))
    }

    /// Mean over unpadded tokens, L2-normalised: `[B, d]` sentence embeddings.
    pub fn sentence_embeddings(&self, ids: Tensor<B, 2, Int>, attention_mask: Tensor<B, 2>) -> Tensor<B, 2> {
        let hidden = self.forward(ids, None, attention_mask.clone());
        let [b, t, d] = hidden.dims();
        let mask = attention_mask.reshape([b, t, 1]);
        let summed = (hidden * mask.clone()).sum_dim(1).reshape([b, d]);
        let mean = summed / mask.sum_dim(1).reshape([b, 1]);
        let norm = (mean.clone() * mean.clone()).sum_dim(1).sqrt().clamp_min(1e-12);
        mean / norm
    }

    /// Sentence embeddings of `texts` (tokenised without padding, then padded to the longest with
    /// an attention mask), one `Vec` of `d` values per text.
    pub fn embed_texts(&self, tokenizer: &TextTokenizer, texts: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        let device = self.word_embeddings.weight.device();
        let encoded = texts.iter().map(|t| tokenizer.encode_with_specials(t)).collect::<Result<Vec<_>, _>>()?;
        let t = encoded.iter().map(Vec::len).max().unwrap_or(0);
        let max_len =
            self.position_embeddings.as_ref().map_or(usize::MAX, |p| p.weight.dims()[0] - self.position_offset);
        if t > max_len {
            return Err(ModelError::TooLong { tokens: t, limit: max_len });
        }
        let b = encoded.len();
        let ids: Vec<i64> = encoded
            .iter()
            .flat_map(|e| e.iter().map(|&i| i as i64).chain(std::iter::repeat_n(0, t - e.len())))
            .collect();
        let mask: Vec<f32> =
            encoded.iter().flat_map(|e| (0..t).map(move |k| if k < e.len() { 1.0 } else { 0.0 })).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, t]), &device);
        let emb = self.sentence_embeddings(ids, mask);
        let d = emb.dims()[1];
        let values = emb.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        Ok(values.chunks(d).map(<[f32]>::to_vec).collect())
    }

    /// Pooler output `tanh(W·h_[CLS] + b)` (DeBERTa: `gelu(…)`) (`[B, d]`), for sequence
    /// classification heads.
    pub fn pooled(&self, hidden: Tensor<B, 3>) -> Option<Tensor<B, 2>> {
        let [b, _, d] = hidden.dims();
        self.pooler.as_ref().map(|p| {
            let first = hidden.narrow(1, 0, 1).reshape([b, d]);
            let dense = fused::linear(first, p.weight.val(), p.bias.as_ref().map(|b| b.val()));
            if self.pooler_gelu { fused::gelu(dense) } else { tanh(dense) }
        })
    }

    /// Injects `method` at `targets` (see [`inject`]); the base stays frozen and shared factors are
    /// held once by the model.
    pub fn adapt(mut self, spec: &ArchSpec, method: &MethodConfig, targets: &Targets) -> Result<Self, ModelError> {
        inject(&mut self, spec, method, targets)?;
        Ok(self)
    }
}

impl<B: Backend> BlockStack<B> for Bert<B> {
    type Context = BertContext<B>;

    fn stack_input(&self, input: &StackInput<B>) -> Tensor<B, 3> {
        let [b, t] = input.ids.dims();
        let device = input.ids.device();
        let mut x = embed(&self.word_embeddings, input.ids.clone());
        if let Some(position_embeddings) = &self.position_embeddings {
            let positions: Vec<i64> = (0..b).flat_map(|_| (0..t).map(|p| (p + self.position_offset) as i64)).collect();
            let positions = Tensor::<B, 2, Int>::from_data(TensorData::new(positions, [b, t]), &device);
            x = x + embed(position_embeddings, positions);
        }
        if let Some(token_type_embeddings) = &self.token_type_embeddings {
            let types = input.types.clone().unwrap_or_else(|| Tensor::<B, 2, Int>::zeros([b, t], &device));
            x = x + embed(token_type_embeddings, types);
        }
        let x = norm(&self.embeddings_norm, x, self.norm_eps);
        match &self.relative {
            None => x,
            // DeBERTa zeroes the padded positions' embeddings too.
            Some(_) => x * Self::mask_of(input).reshape([b, t, 1]),
        }
    }

    fn stack_context(&self, input: &StackInput<B>) -> BertContext<B> {
        let [b, t] = input.ids.dims();
        let heads = self.layers.first().map_or(1, |l| l.n_heads);
        let mask = Self::mask_of(input);
        BertContext(match &self.relative {
            None => Attention::Absolute(AttentionMask::KeyPadding(KeyPadding::new(mask, heads))),
            Some(relative) => {
                let context = relative.context(b, t, heads, self.norm_eps);
                let bias = (mask.ones_like() - mask).mul_scalar(-1e9).reshape([b, 1, 1, t]);
                Attention::Disentangled(context, bias)
            }
        })
    }

    fn num_blocks(&self) -> usize {
        self.layers.len()
    }

    fn block_forward(&self, i: usize, x: Tensor<B, 3>, context: &BertContext<B>) -> Tensor<B, 3> {
        self.layers[i].forward(x, &context.0, self.norm_eps, &self.shared)
    }

    fn stack_output(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        x
    }
}

adapter_slots!(Bert, BertLayer, device: word_embeddings.weight);
