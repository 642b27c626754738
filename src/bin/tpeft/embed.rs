//! `tpeft embed`: mean-pooled, L2-normalised sentence embeddings from a BERT-family model.

use burn::tensor::backend::Backend;
use std::path::Path;
use tensor_peft_models::tokenizer::TextTokenizer;
use tensor_peft_models::{Bert, ModelError};

/// Embeds `texts` with the HF model directory `model` and returns them as a JSON array of arrays.
pub fn run<B: Backend>(model: &Path, texts: &[String], device: &B::Device) -> Result<String, ModelError> {
    let (bert, _) = Bert::<B>::from_hf_dir(model, device)?;
    let tokenizer = TextTokenizer::from_hf_dir(model)?;
    let embeddings = bert.embed_texts(&tokenizer, texts)?;
    Ok(serde_json::to_string(&embeddings).expect("finite floats serialise"))
}
