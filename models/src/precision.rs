//! The precision the frozen base model is held at (`--base-dtype`).
//!
//! Adapters, their gradients, the optimizer state and the loss are always f32; only the frozen
//! matrices (projections, embeddings, the output head) take the base dtype. Norm scales and biases
//! stay f32: they are a rounding error of the model's size and feed every activation.

use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};
use std::fmt;
use std::str::FromStr;
use tensor_peft_kernels::quant::BlockFormat;

/// How the frozen base model's matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseDType {
    /// f32 (the default: exact on every backend, and on the CPU backends the fastest, since a
    /// half-precision weight is widened to f32 before each product).
    #[default]
    F32,
    /// bfloat16: half the memory of f32, the dtype LLaMA checkpoints ship in.
    Bf16,
    /// IEEE half precision.
    F16,
    /// GGML's Q8_0 blocks (8.5 bits a weight) for the projections; embeddings in bf16.
    Q8_0,
    /// GGML's Q4_0 blocks (4.5 bits a weight) for the projections; embeddings in bf16.
    Q4_0,
    /// What the checkpoint stores: bf16/f16 safetensors stay half precision, f32 stays f32, a
    /// GGUF file's block-quantized projections (any [`BlockFormat`]: Q4_0 … Q8_1 and the K-quants
    /// Q2_K … Q6_K) stay those blocks, each tensor in its own format (embeddings in bf16).
    Native,
}

/// The dtype a checkpoint stores a tensor in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDType {
    /// f32.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// GGML quantized blocks.
    Blocks(BlockFormat),
}

/// How a frozen matrix is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Float values of this dtype.
    Values(DType),
    /// GGML blocks of this format.
    Blocks(BlockFormat),
}

impl BaseDType {
    /// Every accepted spelling, in the order the help lists them.
    pub const NAMES: [&'static str; 6] = ["f32", "bf16", "f16", "q8_0", "q4_0", "native"];

    /// The flag's spelling of this dtype.
    pub fn name(self) -> &'static str {
        match self {
            BaseDType::F32 => "f32",
            BaseDType::Bf16 => "bf16",
            BaseDType::F16 => "f16",
            BaseDType::Q8_0 => "q8_0",
            BaseDType::Q4_0 => "q4_0",
            BaseDType::Native => "native",
        }
    }

    /// How a projection stored as `stored` is held.
    pub fn projection(self, stored: StoredDType) -> Held {
        match (self, stored) {
            (BaseDType::Q8_0, _) => Held::Blocks(BlockFormat::Q8_0),
            (BaseDType::Q4_0, _) => Held::Blocks(BlockFormat::Q4_0),
            (BaseDType::Native, StoredDType::Blocks(format)) => Held::Blocks(format),
            _ => Held::Values(self.embedding(stored, true)),
        }
    }

    /// The dtype an embedding table stored as `stored` is held at: as a projection, except that
    /// tables are never blocks (a quantized base keeps its embeddings in bf16, or in f32 on a
    /// backend without bf16, `holds_bf16` false).
    pub fn embedding(self, stored: StoredDType, holds_bf16: bool) -> DType {
        match (self, stored) {
            (BaseDType::F32, _) | (BaseDType::Native, StoredDType::F32) => DType::F32,
            (BaseDType::F16, _) | (BaseDType::Native, StoredDType::F16) => DType::F16,
            (BaseDType::Bf16, _) | (BaseDType::Native, StoredDType::Bf16) => DType::BF16,
            _ if holds_bf16 => DType::BF16,
            _ => DType::F32,
        }
    }
}

impl fmt::Display for BaseDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for BaseDType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for BaseDType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for BaseDType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "f32" => BaseDType::F32,
            "bf16" => BaseDType::Bf16,
            "f16" => BaseDType::F16,
            "q8_0" => BaseDType::Q8_0,
            "q4_0" => BaseDType::Q4_0,
            "native" => BaseDType::Native,
            other => {
                return Err(format!("unknown base dtype `{other}`; expected one of {}", BaseDType::NAMES.join(", ")));
            }
        })
    }
}

/// How the checkpoint at `model` (an HF directory or a GGUF file; anything else, such as a preset,
/// counts as f32) stores its projections: `config.json`'s `torch_dtype` (or transformers ≥ 5's
/// `dtype`), or the GGML type of a GGUF file's first attention query. For planning `native`.
pub fn stored_projections(model: &std::path::Path) -> Result<StoredDType, crate::ModelError> {
    if model.extension().is_some_and(|e| e == "gguf") && model.is_file() {
        let gguf = crate::gguf::Gguf::open(model)?;
        let ty = gguf.tensors.iter().find(|t| t.name.ends_with("attn_q.weight")).map(|t| t.ggml_type);
        return Ok(match ty {
            Some(1) => StoredDType::F16,
            Some(30) => StoredDType::Bf16,
            Some(ty) => BlockFormat::from_ggml_type(ty).map_or(StoredDType::F32, StoredDType::Blocks),
            None => StoredDType::F32,
        });
    }
    let config = if model.is_dir() { model.join("config.json") } else { model.to_path_buf() };
    let Ok(text) = std::fs::read_to_string(&config) else { return Ok(StoredDType::F32) };
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| crate::ModelError::Json { path: config.clone(), reason: e.to_string() })?;
    let dtype = json.get("torch_dtype").or_else(|| json.get("dtype")).and_then(|v| v.as_str());
    Ok(match dtype {
        Some("bfloat16") => StoredDType::Bf16,
        Some("float16") => StoredDType::F16,
        _ => StoredDType::F32,
    })
}

/// The rows of `table` for `ids`, as f32 whatever the table's dtype (the activations are f32).
pub(crate) fn embed<B: Backend>(table: &Embedding<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let rows = table.forward(ids);
    if rows.dtype() == DType::F32 { rows } else { rows.cast(DType::F32) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for name in BaseDType::NAMES {
            assert_eq!(name.parse::<BaseDType>().unwrap().name(), name);
        }
        let err = "fp8".parse::<BaseDType>().unwrap_err();
        assert!(err.contains("`fp8`") && err.contains("bf16"), "{err}");
    }

    #[test]
    fn native_keeps_what_the_file_stores() {
        use BaseDType::*;
        assert_eq!(Native.projection(StoredDType::Bf16), Held::Values(DType::BF16));
        assert_eq!(Native.projection(StoredDType::F16), Held::Values(DType::F16));
        assert_eq!(Native.projection(StoredDType::Blocks(BlockFormat::Q4_1)), Held::Blocks(BlockFormat::Q4_1));
        assert_eq!(Native.projection(StoredDType::Blocks(BlockFormat::Q4_K)), Held::Blocks(BlockFormat::Q4_K));
        assert_eq!(Native.embedding(StoredDType::Blocks(BlockFormat::Q4_1), true), DType::BF16);
        assert_eq!(Native.embedding(StoredDType::Blocks(BlockFormat::Q4_1), false), DType::F32);
        assert_eq!(Bf16.embedding(StoredDType::F32, false), DType::BF16);
        assert_eq!(Bf16.projection(StoredDType::F32), Held::Values(DType::BF16));
        assert_eq!(Q8_0.projection(StoredDType::Bf16), Held::Blocks(BlockFormat::Q8_0));
        assert_eq!(Q4_0.embedding(StoredDType::F32, true), DType::BF16);
        assert_eq!(F32.projection(StoredDType::Blocks(BlockFormat::Q8_0)), Held::Values(DType::F32));
    }
}
