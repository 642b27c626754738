//! `tpeft merge`: fold an adapter into a LLaMA-family model and write a plain HF model directory.

use burn::tensor::backend::Backend;
use std::path::Path;
use tensor_peft_models::adapter_file::read_adapter_config;
use tensor_peft_models::{Llama, ModelError};

/// Loads `model` (HF directory or `.gguf`) and `adapter`, merges, and writes `output`
/// (`config.json`, `model.safetensors`, tokenizer files). Returns a one-line summary.
pub fn run<B: Backend>(model: &Path, adapter: &Path, output: &Path, device: &B::Device) -> Result<String, ModelError> {
    let gguf = model.extension().is_some_and(|e| e == "gguf");
    let (llama, spec, tokenizer) = if gguf {
        let (llama, spec, tokenizer) = Llama::<B>::from_gguf(model, device)?;
        (llama, spec, Some(tokenizer))
    } else {
        let (llama, spec) = Llama::<B>::from_hf_dir(model, device)?;
        (llama, spec, None)
    };
    let config = read_adapter_config(adapter)?;
    let llama = tensor_peft_training::generate::apply_adapter(llama, &spec, adapter)?;
    let merged = llama.merge_adapters()?;
    merged.save_hf(&spec, output)?;
    match tokenizer {
        Some(tokenizer) => tokenizer.save_hf(output)?,
        None => {
            for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
            {
                let source = model.join(name);
                if source.is_file() {
                    std::fs::copy(&source, output.join(name))
                        .map_err(|e| ModelError::Io { path: output.join(name), source: e })?;
                }
            }
        }
    }
    Ok(format!(
        "merged {} ({}) into {} and wrote {}",
        adapter.display(),
        config.method.name(),
        model.display(),
        output.display()
    ))
}
