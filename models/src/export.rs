//! Merging adapters into the base weights and writing the result as an HF model directory
//! (`config.json`, `model.safetensors`, tokenizer files): the zero-overhead artefact to ship.

use crate::adapter_file::write_atomically;
use crate::arch::ArchSpec;
use crate::error::ModelError;
use crate::llama::Llama;
use crate::tokenizer::TextTokenizer;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use std::path::Path;
use tensor_peft_adapters::{AdapterError, LinearDelta};

impl<B: Backend> Llama<B> {
    /// Folds every linear adapter into its base weight and removes it, giving a plain model.
    /// Refuses residual (LoRETTA_adp) adapters, which are nonlinear and cannot be merged.
    pub fn merge_adapters(mut self) -> Result<Self, ModelError> {
        if self.layers.iter().any(|l| l.attention_adapter.is_some() || l.ffn_adapter.is_some()) {
            return Err(AdapterError::Unsupported {
                method: "loretta-adp",
                target: "merge".into(),
                reason: "bottleneck adapters are nonlinear, so they cannot be folded into the base weights".into(),
            }
            .into());
        }
        let shared = std::mem::take(&mut self.shared);
        for layer in &mut self.layers {
            for slot in [
                &mut layer.q_proj,
                &mut layer.k_proj,
                &mut layer.v_proj,
                &mut layer.o_proj,
                &mut layer.gate_proj,
                &mut layer.up_proj,
                &mut layer.down_proj,
            ] {
                if let Some(adapter) = slot.adapter.take() {
                    slot.base = adapter.merge(slot.base.clone(), &shared);
                    slot.merged = false;
                }
            }
        }
        Ok(self)
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (HF names and `[out, in]` layout, F32).
    pub fn save_hf(&self, spec: &ArchSpec, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut push = |name: String, t: Tensor<B, 2>| {
            let dims = t.dims().to_vec();
            let bytes = t
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap_or_default()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            tensors.push((name, dims, bytes));
        };
        let row = |t: Tensor<B, 1>| t.unsqueeze::<2>();
        push("model.embed_tokens.weight".into(), self.embed_tokens.weight.val());
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            push(format!("{p}.input_layernorm.weight"), row(layer.input_layernorm.gamma.val()));
            push(format!("{p}.post_attention_layernorm.weight"), row(layer.post_attention_layernorm.gamma.val()));
            for (name, slot) in [
                ("self_attn.q_proj", &layer.q_proj),
                ("self_attn.k_proj", &layer.k_proj),
                ("self_attn.v_proj", &layer.v_proj),
                ("self_attn.o_proj", &layer.o_proj),
                ("mlp.gate_proj", &layer.gate_proj),
                ("mlp.up_proj", &layer.up_proj),
                ("mlp.down_proj", &layer.down_proj),
            ] {
                if slot.adapter.is_some() {
                    return Err(ModelError::AdapterFile {
                        reason: format!("{p}.{name} still carries an adapter: merge first"),
                    });
                }
                push(format!("{p}.{name}.weight"), slot.base.weight.val().transpose());
            }
        }
        push("model.norm.weight".into(), row(self.norm.gamma.val()));
        if let Some(head) = &self.lm_head {
            push("lm_head.weight".into(), head.weight.val().transpose());
        }
        // Norms were pushed as [1, d]: store them as [d].
        let views = tensors
            .iter()
            .map(|(n, s, d)| {
                let shape = if s[0] == 1 && n.contains("norm") { vec![s[1]] } else { s.clone() };
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, d).map(|v| (n.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ModelError::AdapterFile { reason: e.to_string() })?;
        let data =
            safetensors::serialize(views, None).map_err(|e| ModelError::AdapterFile { reason: e.to_string() })?;
        write_atomically(&dir.join("model.safetensors"), &data)?;
        let config = serde_json::json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "vocab_size": spec.vocab,
            "rope_theta": spec.rope_theta,
            "rms_norm_eps": spec.norm_eps,
            "tie_word_embeddings": spec.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        write_atomically(&dir.join("config.json"), serde_json::to_string_pretty(&config).expect("json").as_bytes())
    }
}

impl TextTokenizer {
    /// Writes `dir/tokenizer.json` and a `tokenizer_config.json` with the chat template and
    /// BOS/EOS tokens, so the directory is a complete HF model.
    pub fn save_hf(&self, dir: &Path) -> Result<(), ModelError> {
        let json = self.to_json()?;
        write_atomically(&dir.join("tokenizer.json"), json.as_bytes())?;
        let config = serde_json::json!({
            "chat_template": self.chat_template,
            "bos_token": self.bos.and_then(|i| self.id_to_token(i)),
            "eos_token": self.eos.and_then(|i| self.id_to_token(i)),
            "add_bos_token": self.add_bos,
        });
        write_atomically(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config).expect("json").as_bytes(),
        )
    }
}
