//! `tpeft generate`: text generation with a LLaMA-family model from an HF directory or a GGUF file.

use burn::tensor::backend::Backend;
use std::path::Path;
use tensor_peft_models::sampling::Sampler;
use tensor_peft_models::tokenizer::{ChatMessage, TextTokenizer};
use tensor_peft_models::{Llama, ModelError};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The prompt (the user message with `chat`).
    pub prompt: String,
    /// Wrap the prompt with the model's own chat template.
    pub chat: bool,
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass.
    pub top_p: f64,
    /// Sampling seed.
    pub seed: u64,
    /// An adapter directory (`adapter_config.json` + `adapter_model.safetensors`) to apply.
    pub adapter: Option<std::path::PathBuf>,
}

/// Loads `model` (HF directory or `.gguf`), generates, and returns the completion text.
pub fn run<B: Backend>(model: &Path, options: &GenerateOptions, device: &B::Device) -> Result<String, ModelError> {
    let (mut llama, spec, tokenizer) = if model.extension().is_some_and(|e| e == "gguf") {
        Llama::<B>::from_gguf(model, device)?
    } else {
        let (llama, spec) = Llama::<B>::from_hf_dir(model, device)?;
        (llama, spec, TextTokenizer::from_hf_dir(model)?)
    };
    if let Some(dir) = &options.adapter {
        tensor_peft_models::adapter_file::load_adapter(&mut llama, &spec, dir)?;
    }
    let text = if options.chat {
        let message = ChatMessage { role: "user".into(), content: options.prompt.clone() };
        tokenizer.apply_chat_template(&[message], true)?
    } else {
        options.prompt.clone()
    };
    let ids = tokenizer.encode(&text)?;
    let mut sampler = Sampler::new(options.temperature, options.top_p, options.seed);
    let mut out = llama.generate(&ids, options.max_new_tokens, tokenizer.eos, |logits| sampler.pick(logits));
    if out.last().copied() == tokenizer.eos {
        out.pop(); // the end-of-sequence marker is not part of the completion
    }
    tokenizer.decode(&out)
}
