//! Text generation with a LLaMA-family model (HF directory or GGUF file), optionally with a saved
//! adapter applied: what `tpeft generate` runs and what the examples call.

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
    /// The adapter directories (`adapter_config.json` + `adapter_model.safetensors`) to load,
    /// and which to apply (none: the base model).
    pub adapters: crate::multi_adapter::AdapterSelection,
    /// The precision the frozen base model is held at.
    pub base_dtype: tensor_peft_models::BaseDType,
}

/// `llama` with the adapter in `dir` injected, and the other tensors the adapter trained (norms
/// unfrozen by `--train-norms`) put in place.
pub fn apply_adapter<B: Backend>(
    mut llama: Llama<B>,
    spec: &tensor_peft_models::ArchSpec,
    dir: &std::path::Path,
) -> Result<Llama<B>, ModelError> {
    let (_, extras) = tensor_peft_models::adapter_file::load_adapter_with_extras(&mut llama, spec, dir)?;
    assign_extras(llama, extras, dir)
}

/// `llama` with the trained tensors `extras` of the adapter in `dir` (norms) put in place.
fn assign_extras<B: Backend>(
    llama: Llama<B>,
    extras: tensor_peft_models::adapter_file::TensorMap,
    dir: &Path,
) -> Result<Llama<B>, ModelError> {
    if extras.is_empty() {
        return Ok(llama);
    }
    let weights = dir.join(tensor_peft_models::adapter_file::WEIGHTS_FILE);
    crate::checkpoint::assign_params(llama, extras, &weights)
        .map_err(|e| ModelError::AdapterFile { reason: e.to_string() })
}

/// Loads `model` (HF directory or `.gguf`), generates, and returns the completion text.
pub fn generate<B: Backend>(model: &Path, options: &GenerateOptions, device: &B::Device) -> Result<String, ModelError> {
    let (mut llama, spec, tokenizer) = if model.extension().is_some_and(|e| e == "gguf") {
        Llama::<B>::from_gguf_as(model, device, options.base_dtype)?
    } else {
        let (llama, spec) = Llama::<B>::from_hf_dir_as(model, device, options.base_dtype)?;
        (llama, spec, TextTokenizer::from_hf_dir(model)?)
    };
    if !options.adapters.is_empty() {
        let (adapted, _, extras) = crate::multi_adapter::load_selection(llama, &spec, &options.adapters)?;
        llama = adapted;
        if !options.adapters.disabled {
            let (_, dir) = options.adapters.active()?;
            llama = assign_extras(llama, extras, dir)?;
        }
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
