//! Merging adapters into the base weights and writing the result as an HF model directory
//! (`config.json`, `model.safetensors`, tokenizer files): the zero-overhead artefact to ship.

use crate::arch::ArchSpec;
use crate::error::ModelError;
use crate::layout::LayoutBlock;
use crate::llama::{LAYOUT, Llama};
use crate::tensor_io::{TensorMap, tensor_values, write_atomically, write_safetensors};
use crate::tokenizer::TextTokenizer;
use burn::tensor::backend::Backend;
use std::path::Path;
use tensor_peft_adapters::{AdapterError, LinearDelta};

impl<B: Backend> Llama<B> {
    /// Folds every linear adapter into its base weight and removes it, giving a plain model.
    /// Refuses residual (LoRETTA_adp) adapters, which are nonlinear and cannot be merged.
    pub fn merge_adapters(mut self) -> Result<Self, ModelError> {
        if self.layers.iter().any(|l| l.has_residual()) {
            return Err(AdapterError::Unsupported {
                method: "loretta-adp",
                target: "merge".into(),
                reason: "bottleneck adapters are nonlinear, so they cannot be folded into the base weights".into(),
            }
            .into());
        }
        let shared = std::mem::take(&mut self.shared);
        for layer in &mut self.layers {
            for slot in layer.projections_mut() {
                if let Some(adapter) = slot.adapter.take() {
                    slot.base = slot.base.clone().add_delta(adapter.delta_weight(&shared))?;
                    slot.merged = false;
                }
            }
        }
        Ok(self)
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (HF names and `[out, in]` layout, F32).
    pub fn save_hf(&self, spec: &ArchSpec, dir: &Path) -> Result<(), ModelError> {
        // The config first: a model it cannot describe is refused before anything is written.
        let mut config = serde_json::json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "head_dim": spec.head_dim,
            "vocab_size": spec.vocab,
            "rope_theta": spec.rope.theta,
            "rms_norm_eps": spec.norm_eps,
            "tie_word_embeddings": spec.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        let fields = crate::arch::rope_config_json(&spec.rope)
            .map_err(|reason| ModelError::Weights { path: dir.to_path_buf(), reason })?;
        for (key, value) in fields {
            config[key] = value;
        }
        if let Some(window) = spec.sliding_window {
            // Only transformers' Mistral reads a window.
            config["model_type"] = "mistral".into();
            config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
            config["sliding_window"] = window.into();
        }
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
        let mut tensors = TensorMap::new();
        tensors.insert("model.embed_tokens.weight".into(), tensor_values(self.embed_tokens.weight.val()));
        for (l, layer) in self.layers.iter().enumerate() {
            let p = spec.family.block_path(l);
            tensors.insert(format!("{p}.input_layernorm.weight"), tensor_values(layer.input_layernorm.gamma.val()));
            let post_norm = tensor_values(layer.post_attention_layernorm.gamma.val());
            tensors.insert(format!("{p}.post_attention_layernorm.weight"), post_norm);
            for (row, slot) in LAYOUT.iter().zip(layer.projections()) {
                if slot.adapter.is_some() {
                    return Err(ModelError::AdapterFile {
                        reason: format!("{p}.{} still carries an adapter: merge first", row.name),
                    });
                }
                tensors.insert(format!("{p}.{}.weight", row.name), tensor_values(slot.base.weight_f32().transpose()));
            }
        }
        tensors.insert("model.norm.weight".into(), tensor_values(self.norm.gamma.val()));
        if let Some(head) = &self.lm_head {
            tensors.insert("lm_head.weight".into(), tensor_values(head.weight.val().transpose()));
        }
        write_safetensors(&dir.join("model.safetensors"), &tensors, &[])?;
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
            "add_eos_token": self.add_eos,
        });
        write_atomically(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config).expect("json").as_bytes(),
        )
    }
}
