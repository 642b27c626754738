//! LLaMA-2/3 style decoder (RMSNorm, rotate-half RoPE as in HF checkpoints, grouped-query causal
//! attention, SwiGLU MLP, tied or untied `lm_head`) whose projections are [`AdaptedLinear`]s, so
//! any adapter method can be injected by module name without the model knowing which method it is.

use crate::arch::{ArchSpec, Family};
use crate::error::ModelError;
use crate::fused::{self, AttentionMask, Rope};
use crate::fused::{BlockMatrix, FrozenMatrix};
use crate::gguf::Gguf;
use crate::inject::{Targets, adapter_slots, inject};
use crate::layout::{layout_table, load_projections};
use crate::precision::{BaseDType, Held, StoredDType, embed};
use crate::stack::{BlockStack, StackInput};
use crate::tokenizer::TextTokenizer;
use crate::weights::Weights;
use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::ElementConversion;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use std::path::Path;
use tensor_peft_adapters::{
    AdaptedLinear, AttentionMatrix, FrozenLinear, MethodConfig, ResidualAdapter, SharedFactors,
};
use tensor_peft_kernels::rope::RopeConfig;

/// Cached keys and values of one layer: `[B, T, H_kv, d_h]` each.
pub type LayerCache<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// Keys and values of the tokens seen so far, for every layer (the generation path).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    /// Number of cached positions.
    pub len: usize,
}

impl<B: Backend> Default for KvCache<B> {
    fn default() -> Self {
        Self { layers: Vec::new(), len: 0 }
    }
}

layout_table! {
    /// One decoder block.
    LlamaBlock {
        /// RMSNorm before attention.
        input_layernorm: RmsNorm<B>,
        /// RMSNorm before the MLP.
        post_attention_layernorm: RmsNorm<B>,
        /// Query heads.
        n_heads: usize,
        /// Key/value heads.
        n_kv_heads: usize,
    }
    /// The adaptable projections of a [`LlamaBlock`] (HF names, `(d_in, d_out)`), in checkpoint order.
    LAYOUT {
        q_proj: "self_attn.q_proj" / "attn_q", Some(AttentionMatrix::Query), |s| (s.hidden, s.heads * s.head_dim);
        k_proj: "self_attn.k_proj" / "attn_k", Some(AttentionMatrix::Key), |s| (s.hidden, s.kv_heads * s.head_dim);
        v_proj: "self_attn.v_proj" / "attn_v", Some(AttentionMatrix::Value), |s| (s.hidden, s.kv_heads * s.head_dim);
        o_proj: "self_attn.o_proj" / "attn_output", Some(AttentionMatrix::Output), |s| (s.heads * s.head_dim, s.hidden);
        gate_proj: "mlp.gate_proj" / "ffn_gate", None, |s| (s.hidden, s.intermediate);
        up_proj: "mlp.up_proj" / "ffn_up", None, |s| (s.hidden, s.intermediate);
        down_proj: "mlp.down_proj" / "ffn_down", None, |s| (s.intermediate, s.hidden);
    }
    /// Where a [`LlamaBlock`] applies residual adapters.
    RESIDUAL_POSITIONS {
        attention_adapter: Attention;
        gate_input_adapter: GateInput;
        up_input_adapter: UpInput;
        ffn_adapter: FeedForward;
    }
}

/// A LLaMA causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// Token embeddings `[vocab, d]`.
    pub embed_tokens: Embedding<B>,
    /// Decoder blocks.
    pub layers: Vec<LlamaBlock<B>>,
    /// Final RMSNorm.
    pub norm: RmsNorm<B>,
    /// Output head `[d, vocab]`; `None` when tied to the embeddings.
    pub lm_head: Option<Linear<B>>,
    /// Factors shared by adapters across layers (LoTR, LoRTA), held once.
    pub shared: SharedFactors<B>,
    /// Rotary embedding: base θ and scaling.
    #[module(skip)]
    pub rope: RopeConfig,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Sliding attention window (Mistral), if any.
    #[module(skip)]
    pub sliding_window: Option<usize>,
}

fn rms_norm<B: Backend>(gamma: Tensor<B, 1>, eps: f64) -> RmsNorm<B> {
    RmsNorm { gamma: Param::from_tensor(gamma), epsilon: eps }
}

/// Where [`Llama::build`] takes each parameter from: checkpoint weights or a random init.
trait ParamSource<B: Backend> {
    /// The HF weight `name` (`[out, in]`) of a projection, as Burn's `[in, out]`, held as the base
    /// dtype says.
    fn projection(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<FrozenMatrix<B>, ModelError>;
    /// The untied output head `lm_head` (`[vocab, d]`), as Burn's `[d, vocab]` float values.
    fn head(&mut self, d: usize, vocab: usize) -> Result<Tensor<B, 2>, ModelError>;
    /// The RMSNorm scale `name` (`[d]`).
    fn norm(&mut self, name: &str, d: usize) -> Result<Tensor<B, 1>, ModelError>;
    /// The token embedding table `name` (`[vocab, d]`).
    fn embedding(&mut self, name: &str, vocab: usize, d: usize) -> Result<Tensor<B, 2>, ModelError>;
}

/// Parameters read (and removed) from HF-named tensors.
struct FromWeights<'a, B: Backend> {
    weights: &'a mut Weights,
    device: &'a B::Device,
}

impl<B: Backend> ParamSource<B> for FromWeights<'_, B> {
    fn projection(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<FrozenMatrix<B>, ModelError> {
        self.weights.take_transposed::<B>(&format!("{name}.weight"), [d_out, d_in], self.device)
    }
    fn head(&mut self, d: usize, vocab: usize) -> Result<Tensor<B, 2>, ModelError> {
        self.weights.take_head::<B>("lm_head.weight", [vocab, d], self.device)
    }
    fn norm(&mut self, name: &str, d: usize) -> Result<Tensor<B, 1>, ModelError> {
        self.weights.take(&format!("{name}.weight"), [d], self.device)
    }
    fn embedding(&mut self, name: &str, vocab: usize, d: usize) -> Result<Tensor<B, 2>, ModelError> {
        self.weights.take_matrix(&format!("{name}.weight"), [vocab, d], self.device)
    }
}

/// HF's `LlamaPreTrainedModel` init: matrices N(0, 0.02²), norm scales 1. Created directly on the
/// device, one matrix at a time, and held as the base dtype says, so a 7B-shaped model never passes
/// through host memory whole nor exists whole in f32.
struct RandomInit<'a, B: Backend> {
    device: &'a B::Device,
    base: BaseDType,
}

impl<B: Backend> RandomInit<'_, B> {
    fn matrix(&self, shape: [usize; 2], dtype: DType) -> Result<Tensor<B, 2>, ModelError> {
        crate::weights::backend_holds::<B>(dtype, self.device).map_err(random_error)?;
        let t = Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 0.02), self.device);
        Ok(if dtype == t.dtype() { t } else { t.cast(dtype) })
    }
}

fn random_error(reason: String) -> ModelError {
    ModelError::Weights { path: "random weights".into(), reason }
}

impl<B: Backend> ParamSource<B> for RandomInit<'_, B> {
    fn projection(&mut self, _: &str, d_in: usize, d_out: usize) -> Result<FrozenMatrix<B>, ModelError> {
        match self.base.projection(StoredDType::F32) {
            Held::Values(dtype) => Ok(FrozenMatrix::Values(self.matrix([d_in, d_out], dtype)?)),
            Held::Blocks(format) => {
                let w = self.matrix([d_in, d_out], DType::F32)?;
                BlockMatrix::quantize(w, format).map(FrozenMatrix::Blocks).map_err(random_error)
            }
        }
    }
    fn head(&mut self, d: usize, vocab: usize) -> Result<Tensor<B, 2>, ModelError> {
        self.matrix([d, vocab], self.base.embedding(StoredDType::F32, B::supports_dtype(self.device, DType::BF16)))
    }
    fn norm(&mut self, _: &str, d: usize) -> Result<Tensor<B, 1>, ModelError> {
        Ok(Tensor::ones([d], self.device))
    }
    fn embedding(&mut self, _: &str, vocab: usize, d: usize) -> Result<Tensor<B, 2>, ModelError> {
        self.matrix([vocab, d], self.base.embedding(StoredDType::F32, B::supports_dtype(self.device, DType::BF16)))
    }
}

/// A frozen, not yet adapted linear layer (Burn layout `[in, out]`, no bias).
fn frozen_linear<B: Backend>(weight: FrozenMatrix<B>) -> Result<AdaptedLinear<B>, ModelError> {
    Ok(AdaptedLinear::new(FrozenLinear::new(weight), None)?)
}

impl<B: Backend> LlamaBlock<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: &AttentionMask<B>,
        cache: Option<&mut LayerCache<B>>,
        shared: &SharedFactors<B>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, kv) = (self.n_heads, self.n_kv_heads);
        let d_h = rope.head_dim();
        let norm = |n: &RmsNorm<B>, x: Tensor<B, 3>| fused::rms_norm(x, n.gamma.val(), n.epsilon);
        let hs = norm(&self.input_layernorm, x.clone());
        // Heads stay in the projections' `[B, T, H, d_h]` layout throughout.
        let split = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, d_h]);
        let q = rope.apply(split(self.q_proj.forward(hs.clone(), shared), h));
        let mut k = rope.apply(split(self.k_proj.forward(hs.clone(), shared), kv));
        let mut v = split(self.v_proj.forward(hs, shared), kv);
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.take() {
                k = Tensor::cat(vec![past_k, k], 1);
                v = Tensor::cat(vec![past_v, v], 1);
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let attn = fused::attention(q, k, v, mask).reshape([b, t, h * d_h]);
        let mut attn_out = self.o_proj.forward(attn, shared);
        if let Some(adapter) = &self.attention_adapter {
            attn_out = adapter.forward(attn_out);
        }
        let x = x + attn_out;
        let hs = norm(&self.post_attention_layernorm, x.clone());
        let input = |adapter: &Option<ResidualAdapter<B>>, hs: Tensor<B, 3>| match adapter {
            Some(adapter) => adapter.forward(hs),
            None => hs,
        };
        let gate = self.gate_proj.forward(input(&self.gate_input_adapter, hs.clone()), shared);
        let up = self.up_proj.forward(input(&self.up_input_adapter, hs), shared);
        let gated = fused::swiglu(gate, up);
        let mut mlp_out = self.down_proj.forward(gated, shared);
        if let Some(adapter) = &self.ffn_adapter {
            mlp_out = adapter.forward(mlp_out);
        }
        x + mlp_out
    }
}

impl<B: Backend> Llama<B> {
    /// Loads an HF model directory (`config.json` + safetensors, single or sharded). Every
    /// parameter is frozen.
    pub fn from_hf_dir(dir: &Path, device: &B::Device) -> Result<(Self, ArchSpec), ModelError> {
        Self::from_hf_dir_as(dir, device, BaseDType::F32)
    }

    /// [`Self::from_hf_dir`] with the frozen matrices held at `base` ([`BaseDType`]).
    pub fn from_hf_dir_as(dir: &Path, device: &B::Device, base: BaseDType) -> Result<(Self, ArchSpec), ModelError> {
        let spec = ArchSpec::from_config_file(&dir.join("config.json"))?;
        spec.require_implemented()?;
        let mut weights = Weights::from_hf_dir(dir)?.with_base_dtype(base);
        let model = Self::from_weights(&spec, &mut weights, device)?;
        let rest = weights.remaining();
        // HF checkpoints may carry precomputed rotary tables; nothing else may be left over.
        let unexpected: Vec<_> = rest.iter().filter(|n| !n.ends_with("rotary_emb.inv_freq")).collect();
        if let Some(example) = unexpected.first() {
            return Err(ModelError::UnexpectedTensors { count: unexpected.len(), example: example.to_string() });
        }
        Ok((model, spec))
    }

    /// Loads a llama-architecture GGUF file (weights dequantised to f32, Q/K rows restored to the
    /// HF rotate-half layout) together with its embedded tokenizer.
    pub fn from_gguf(path: &Path, device: &B::Device) -> Result<(Self, ArchSpec, TextTokenizer), ModelError> {
        Self::from_gguf_as(path, device, BaseDType::F32)
    }

    /// [`Self::from_gguf`] with the frozen matrices held at `base` ([`BaseDType`]).
    pub fn from_gguf_as(
        path: &Path,
        device: &B::Device,
        base: BaseDType,
    ) -> Result<(Self, ArchSpec, TextTokenizer), ModelError> {
        let gguf = std::sync::Arc::new(Gguf::open(path)?);
        let spec = gguf.arch_spec()?;
        spec.require_implemented()?;
        let tokenizer = TextTokenizer::from_gguf(&gguf)?;
        let mut weights = gguf.hf_weights(&spec)?.with_base_dtype(base);
        drop(gguf);
        let model = Self::from_weights(&spec, &mut weights, device)?;
        if let Some(example) = weights.remaining().first() {
            return Err(ModelError::UnexpectedTensors { count: weights.len(), example: example.clone() });
        }
        Ok((model, spec, tokenizer))
    }

    /// Decodes up to `max_new_tokens` after `prompt` with a KV cache, stopping at `eos`; `pick`
    /// chooses the next id from the last logits (`[vocab]`). Returns only the new ids.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
        mut pick: impl FnMut(Tensor<B, 1>) -> u32,
    ) -> Vec<u32> {
        let device = self.embed_tokens.weight.device();
        let vocab = self.embed_tokens.weight.dims()[0];
        let mut cache = KvCache::default();
        let mut input: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let mut out = Vec::new();
        while out.len() < max_new_tokens && !input.is_empty() {
            let t = input.len();
            let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(std::mem::take(&mut input), [1, t]), &device);
            let logits = self.forward_cached(tokens, &mut cache).narrow(1, t - 1, 1).reshape([vocab]);
            let next = pick(logits);
            out.push(next);
            if Some(next) != eos {
                input.push(next as i64);
            }
        }
        out
    }

    /// Greedy decoding (see [`generate`](Self::generate)).
    pub fn generate_greedy(&self, prompt: &[u32], max_new_tokens: usize, eos: Option<u32>) -> Vec<u32> {
        self.generate(prompt, max_new_tokens, eos, |logits| logits.argmax(0).into_scalar().elem::<i64>() as u32)
    }

    /// Builds the model from HF-named tensors.
    pub fn from_weights(spec: &ArchSpec, w: &mut Weights, device: &B::Device) -> Result<Self, ModelError> {
        Self::build(spec, &mut FromWeights { weights: w, device })
    }

    /// A model of architecture `spec` with random weights (HF's init: N(0, 0.02²) matrices, unit
    /// norms), created on `device` in the backend's float type. For benchmarks of shapes whose
    /// real weights are out of reach (`llama2-7b`): speed does not depend on the values.
    pub fn random(spec: &ArchSpec, device: &B::Device) -> Result<Self, ModelError> {
        Self::random_as(spec, device, BaseDType::F32)
    }

    /// [`Self::random`] with the matrices held at `base` (`native` means f32 here).
    pub fn random_as(spec: &ArchSpec, device: &B::Device, base: BaseDType) -> Result<Self, ModelError> {
        Self::build(spec, &mut RandomInit { device, base })
    }

    fn build(spec: &ArchSpec, src: &mut impl ParamSource<B>) -> Result<Self, ModelError> {
        if spec.family != Family::Llama {
            return Err(ModelError::Weights {
                path: spec.source.clone().into(),
                reason: format!("this is a {} model, not a LLaMA-family decoder", spec.family.name()),
            });
        }
        let (d, v) = (spec.hidden, spec.vocab);
        let mut layers = Vec::with_capacity(spec.layers);
        for l in 0..spec.layers {
            let p = spec.family.block_path(l);
            let input_layernorm = rms_norm(src.norm(&format!("{p}.input_layernorm"), d)?, spec.norm_eps);
            // In `LAYOUT` order.
            let [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] =
                load_projections(spec, &p, |name, d_in, d_out| frozen_linear(src.projection(name, d_in, d_out)?))?;
            let post_attention_layernorm =
                rms_norm(src.norm(&format!("{p}.post_attention_layernorm"), d)?, spec.norm_eps);
            layers.push(LlamaBlock {
                input_layernorm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                attention_adapter: None,
                gate_input_adapter: None,
                up_input_adapter: None,
                post_attention_layernorm,
                gate_proj,
                up_proj,
                down_proj,
                ffn_adapter: None,
                n_heads: spec.heads,
                n_kv_heads: spec.kv_heads,
            });
        }
        let embed = src.embedding("model.embed_tokens", v, d)?;
        let lm_head = if spec.tie_embeddings {
            None
        } else {
            Some(Linear { weight: Param::from_tensor(src.head(d, v)?), bias: None })
        };
        let model = Llama {
            embed_tokens: Embedding { weight: Param::from_tensor(embed) },
            layers,
            norm: rms_norm(src.norm("model.norm", d)?, spec.norm_eps),
            lm_head,
            shared: SharedFactors::empty(),
            rope: spec.rope.clone(),
            head_dim: spec.head_dim,
            sliding_window: spec.sliding_window,
        };
        Ok(model.no_grad())
    }

    /// Logits `[B, T, vocab]` for token ids `[B, T]` (causal, no KV cache: the training path).
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_inner(tokens, None)
    }

    /// Logits for `tokens` that continue the sequence held by `cache` (the generation path): only
    /// the new tokens are computed; their keys and values are appended to the cache.
    pub fn forward_cached(&self, tokens: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache { layers: (0..self.layers.len()).map(|_| None).collect(), len: 0 };
        }
        self.forward_inner(tokens, Some(cache))
    }

    /// The final (normed) hidden states `[B, T, d]` for token ids `[B, T]` (causal, no KV cache):
    /// the input of the output head. With [`Self::output_head`] the training loss computes the
    /// logits chunk by chunk instead of holding all `[B, T, vocab]` of them.
    pub fn hidden(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.hidden_inner(tokens, None)
    }

    /// The output head as `[vocab, d]` (logits = `h·Wᵀ`): the token embeddings when the head is
    /// tied, else the `lm_head` weight (a transposed view of its `[d, vocab]` parameter).
    pub fn output_head(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.weight.val().transpose(),
            None => self.embed_tokens.weight.val(),
        }
    }

    /// Whether the output head's parameter takes gradients (never for a model as loaded: the base
    /// is frozen). Read off the parameter, because [`Self::output_head`] may be a view of it.
    pub fn output_head_is_trainable(&self) -> bool {
        match &self.lm_head {
            Some(head) => head.weight.is_require_grad(),
            None => self.embed_tokens.weight.is_require_grad(),
        }
    }

    fn forward_inner(&self, tokens: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.logits(self.hidden_inner(tokens, cache))
    }

    fn hidden_inner(&self, tokens: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let Some(cache) = cache else {
            return self.stack_forward(&StackInput::ids(tokens));
        };
        // The generation path: the stack's pieces with each layer's KV cache.
        let t = tokens.dims()[1];
        let context = self.context(cache.len, t, &tokens.device());
        let mut x = embed(&self.embed_tokens, tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, &context.rope, &context.mask, Some(&mut cache.layers[i]), &self.shared);
        }
        cache.len += t;
        self.stack_output(x)
    }

    /// The RoPE tables and causal mask of `t` positions after `start` cached ones.
    fn context(&self, start: usize, t: usize, device: &B::Device) -> LlamaContext<B> {
        let (heads, kv_heads) = self.layers.first().map_or((1, 1), |l| (l.n_heads, l.n_kv_heads));
        LlamaContext {
            rope: Rope::new(start, t, self.head_dim, &self.rope, &[heads, kv_heads], device),
            mask: AttentionMask::Causal { offset: start, window: self.sliding_window },
        }
    }

    /// Logits `[B, T, vocab]` from final hidden states `[B, T, d]` ([`Self::hidden`]).
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        // `h·head` on `[B·T, d]` rows: a 2-D product takes the (tied: transposed embedding) head
        // as a strided operand (broadcasting it to 3-D would reshape, i.e. copy, it on every
        // call), and `fused::linear` spreads a decoding step's one row over the threads.
        let [b, t, d] = hidden.dims();
        let head = self.output_head().transpose();
        let vocab = head.dims()[1];
        let bias = self.lm_head.as_ref().and_then(|h| h.bias.as_ref().map(|b| b.val()));
        fused::linear(hidden.reshape([b * t, d]), head, bias).reshape([b, t, vocab])
    }

    /// Injects `method` at `targets` (see [`inject`]); the base stays frozen and shared factors are
    /// held once by the model.
    pub fn adapt(mut self, spec: &ArchSpec, method: &MethodConfig, targets: &Targets) -> Result<Self, ModelError> {
        inject(&mut self, spec, method, targets)?;
        Ok(self)
    }
}

/// What every block of one LLaMA forward shares: the RoPE tables and the causal mask.
#[derive(Debug, Clone)]
pub struct LlamaContext<B: Backend> {
    rope: Rope<B>,
    mask: AttentionMask<B>,
}

impl<B: Backend> BlockStack<B> for Llama<B> {
    type Context = LlamaContext<B>;

    fn stack_input(&self, input: &StackInput<B>) -> Tensor<B, 3> {
        embed(&self.embed_tokens, input.ids.clone())
    }

    fn stack_context(&self, input: &StackInput<B>) -> LlamaContext<B> {
        self.context(0, input.ids.dims()[1], &input.ids.device())
    }

    fn num_blocks(&self) -> usize {
        self.layers.len()
    }

    fn block_forward(&self, i: usize, x: Tensor<B, 3>, context: &LlamaContext<B>) -> Tensor<B, 3> {
        self.layers[i].forward(x, &context.rope, &context.mask, None, &self.shared)
    }

    fn stack_output(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        fused::rms_norm(x, self.norm.gamma.val(), self.norm.epsilon)
    }
}

adapter_slots!(Llama, LlamaBlock, device: embed_tokens.weight);
