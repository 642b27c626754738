//! A small, bounds-checked GGUF (v2/v3) reader: metadata, tensor table, and dequantisation to f32
//! of F32, F16 and BF16 tensors and of GGML's block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 (32
//! weights a block) and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256 weights a super-block),
//! exactly as llama.cpp reads them ([`BlockFormat`]); the other types (Q8_K, the IQ and ternary
//! types, MXFP4) are refused by name, and a block tensor's rows must be whole blocks. Maps the
//! llama architecture's metadata to an [`ArchSpec`] and its tensors to HF names ([`Weights`]),
//! undoing the Q/K row permutation that llama.cpp's converter applies for its adjacent-pair RoPE
//! (a permutation of whole rows, so `--base-dtype native` applies it to the rows' blocks as they
//! are).
//!
//! Untrusted input: every length is checked against the bytes that remain before anything is
//! allocated, so a corrupt file gives an error, never a panic or a huge allocation.

use crate::arch::{ArchSpec, Family, Unimplemented};
use crate::error::ModelError;
use crate::precision::StoredDType;
use crate::weights::{Decoded, Weights};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tensor_peft_kernels::quant::BlockFormat;
use tensor_peft_kernels::rope::{RopeConfig, RopeScaling};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// `f32` or `f64`.
    Float(f64),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Uint(v) => Some(*v),
            MetaValue::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
    /// As a float (integers convert).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(v) => Some(*v),
            MetaValue::Uint(v) => Some(*v as f64),
            MetaValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name (llama.cpp naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, fastest-varying first (reverse of the row-major shape).
    pub dims: Vec<u64>,
    /// GGML type id.
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

/// A parsed GGUF file held in memory.
#[derive(Debug)]
pub struct Gguf {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, MetaValue>,
    /// The tensor table.
    pub tensors: Vec<TensorInfo>,
    bytes: FileBytes,
    data_start: usize,
}

/// A GGUF file's bytes: memory-mapped from disk (file-backed pages, returned to the OS when the
/// `Gguf` is dropped, so a load never holds the file in anonymous memory), or owned (in tests).
#[derive(Debug)]
enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(map) => map,
            FileBytes::Owned(bytes) => bytes,
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            format!("truncated: needed {n} bytes at offset {}, the file has {}", self.pos, self.bytes.len())
        })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn len(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > remaining {
            return Err(format!("{what} claims {n} items but only {remaining} bytes remain"));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.len("a string", 1)?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| format!("a string at offset {} is not UTF-8", self.pos))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::Uint(self.take(1)?[0] as u64),
            1 => MetaValue::Int(self.take(1)?[0] as i8 as i64),
            2 => MetaValue::Uint(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as u64),
            3 => MetaValue::Int(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            4 => MetaValue::Uint(self.u32()? as u64),
            5 => MetaValue::Int(self.u32()? as i32 as i64),
            6 => MetaValue::Float(f32::from_le_bytes(self.take(4)?.try_into().expect("4")) as f64),
            7 => MetaValue::Bool(self.take(1)?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err("arrays nested too deeply".into());
                }
                let item_ty = self.u32()?;
                let n = self.len("an array", 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::Uint(self.u64()?),
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

/// The float GGML types this reader reads: `(id, name, bytes per element)`. The block types are
/// [`BlockFormat`]'s.
const FLOAT_TYPES: [(u32, &str, usize); 3] = [(0, "F32", 4), (1, "F16", 2), (30, "BF16", 2)];

/// `(name, elements per block, bytes per block)` of GGML type `ty`, when this reader reads it.
fn geometry(ty: u32) -> Option<(&'static str, usize, usize)> {
    FLOAT_TYPES
        .iter()
        .find(|t| t.0 == ty)
        .map(|t| (t.1, 1, t.2))
        .or_else(|| BlockFormat::from_ggml_type(ty).map(|f| (f.name(), f.block_len(), f.block_bytes())))
}

/// The error for a GGML type this reader does not read, listing those it does.
fn unsupported(ty: u32) -> String {
    let known: Vec<_> = FLOAT_TYPES.iter().map(|t| t.1).chain(BlockFormat::ALL.iter().map(|f| f.name())).collect();
    format!("unsupported GGML tensor type {ty} (supported: {})", known.join(", "))
}

/// Dequantises `n` elements of GGML type `ty` from `data` (which must hold exactly their blocks).
pub fn dequantize(ty: u32, data: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let mut out = Vec::with_capacity(n);
    match ty {
        0 => out.extend(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        1 => out.extend(data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())),
        30 => out.extend(data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        _ => {
            let format = BlockFormat::from_ggml_type(ty).ok_or_else(|| unsupported(ty))?;
            out.resize(data.len() / format.block_bytes() * format.block_len(), 0.0);
            format.dequantize(data, &mut out);
        }
    }
    if out.len() != n {
        return Err(format!("expected {n} values, decoded {}", out.len()));
    }
    Ok(out)
}

impl Gguf {
    /// Reads and parses a GGUF file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; a file modified by another process while it is being
        // loaded is outside what the loader supports (as for safetensors checkpoints).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse_bytes(FileBytes::Mapped(map), path)
    }

    /// Parses GGUF bytes; `path` names the file in errors.
    pub fn parse(bytes: Vec<u8>, path: &Path) -> Result<Self, ModelError> {
        Self::parse_bytes(FileBytes::Owned(bytes), path)
    }

    fn parse_bytes(bytes: FileBytes, path: &Path) -> Result<Self, ModelError> {
        let err = |reason: String| ModelError::Weights {
            path: path.to_path_buf(),
            reason: format!("invalid GGUF: {reason}"),
        };
        let mut r = Reader { bytes: &bytes, pos: 0 };
        if r.take(4).map_err(err)? != b"GGUF" {
            return Err(err("the file does not start with the GGUF magic".into()));
        }
        let version = r.u32().map_err(err)?;
        if !(2..=3).contains(&version) {
            return Err(err(format!("version {version} is not supported (expected 2 or 3)")));
        }
        let n_tensors = r.len("the tensor table", 24).map_err(err)?;
        let n_meta = r.len("the metadata table", 12).map_err(err)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_meta {
            let key = r.string().map_err(err)?;
            let ty = r.u32().map_err(err)?;
            let value = r.value(ty, 0).map_err(|e| err(format!("metadata `{key}`: {e}")))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string().map_err(err)?;
            let n_dims = r.u32().map_err(err)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(err(format!("tensor `{name}` has {n_dims} dimensions (expected 1 to 4)")));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>().map_err(err)?;
            let ggml_type = r.u32().map_err(err)?;
            let offset = r.u64().map_err(err)?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let alignment = metadata.get("general.alignment").and_then(MetaValue::as_u64).unwrap_or(32) as usize;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(err(format!("general.alignment = {alignment} is not a power of two")));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let gguf = Gguf { path: path.to_path_buf(), metadata, tensors, bytes, data_start };
        for t in &gguf.tensors {
            gguf.tensor_bytes(t)?; // every tensor lies inside the file and has a known type
        }
        Ok(gguf)
    }

    fn tensor_bytes(&self, t: &TensorInfo) -> Result<(&[u8], usize), ModelError> {
        let err = |reason: String| ModelError::Weights {
            path: self.path.clone(),
            reason: format!("tensor `{}`: {reason}", t.name),
        };
        let (type_name, block, block_bytes) = geometry(t.ggml_type).ok_or_else(|| err(unsupported(t.ggml_type)))?;
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 36)
            .ok_or_else(|| err("too many elements".into()))? as usize;
        // Blocks run along rows (the first, fastest-varying dimension): each row is whole blocks.
        let width = t.dims.first().copied().unwrap_or(1);
        if !width.is_multiple_of(block as u64) {
            return Err(err(format!(
                "rows of {width} weights are not whole {type_name} blocks (the block size is {block})"
            )));
        }
        let size = n / block * block_bytes;
        let start = (self.data_start as u64).checked_add(t.offset).filter(|s| *s <= self.bytes.len() as u64);
        let range = start.and_then(|s| {
            s.checked_add(size as u64).filter(|e| *e <= self.bytes.len() as u64).map(|e| s as usize..e as usize)
        });
        let range =
            range.ok_or_else(|| err(format!("data at offset {} ({size} bytes) lies outside the file", t.offset)))?;
        Ok((&self.bytes[range], n))
    }

    /// Dequantised values of one tensor and its row-major shape.
    pub fn dequantize_tensor(&self, t: &TensorInfo) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let (data, n) = self.tensor_bytes(t)?;
        let values = dequantize(t.ggml_type, data, n).map_err(|reason| ModelError::Weights {
            path: self.path.clone(),
            reason: format!("tensor `{}`: {reason}", t.name),
        })?;
        Ok((t.dims.iter().rev().map(|&d| d as usize).collect(), values))
    }

    fn meta_field(&self, key: &'static str) -> Result<&MetaValue, ModelError> {
        self.metadata.get(key).ok_or_else(|| ModelError::Field {
            path: self.path.clone(),
            field: key,
            problem: "is missing".into(),
        })
    }

    fn meta_count(&self, key: &'static str) -> Result<usize, ModelError> {
        let max = crate::arch::size_limit(key);
        self.meta_field(key)?.as_u64().filter(|&n| n > 0 && n <= max).map(|n| n as usize).ok_or_else(|| {
            ModelError::Field {
                path: self.path.clone(),
                field: key,
                problem: format!("is not a positive integer up to {max}"),
            }
        })
    }

    /// The rotary embedding as llama.cpp computes it from the metadata (`rope.freq_base`,
    /// `rope.scaling.*`) and the `rope_freqs` tensor (per-frequency divisors: how converted
    /// LLaMA-3.1/3.2 files carry their `llama3` scaling). A scaling llama.cpp defines but these
    /// models do not implement is recorded in `unimplemented`.
    fn rope_config(&self, head_dim: usize, unimplemented: &mut Vec<Unimplemented>) -> Result<RopeConfig, ModelError> {
        let field_err =
            |field: &'static str, problem: String| ModelError::Field { path: self.path.clone(), field, problem };
        let number = |key: &'static str| -> Result<Option<f64>, ModelError> {
            match self.metadata.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .map(Some)
                    .ok_or_else(|| field_err(key, format!("is {v:?}, expected a positive number"))),
            }
        };
        let theta = number("llama.rope.freq_base")?.unwrap_or(10000.0);
        const KNOWN: [&str; 6] =
            ["type", "factor", "original_context_length", "finetuned", "yarn_beta_fast", "yarn_beta_slow"];
        if let Some((key, v)) = self
            .metadata
            .iter()
            .find(|(k, _)| k.strip_prefix("llama.rope.scaling.").is_some_and(|rest| !KNOWN.contains(&rest)))
        {
            return Err(ModelError::Weights {
                path: self.path.clone(),
                reason: format!("metadata `{key}` = {v:?} is a RoPE scaling setting these models do not implement"),
            });
        }
        let kind = match self.metadata.get("llama.rope.scaling.type") {
            None => "none",
            Some(v) => v
                .as_str()
                .ok_or_else(|| field_err("llama.rope.scaling.type", format!("is {v:?}, expected a string")))?,
        };
        let factor = || {
            number("llama.rope.scaling.factor")?.ok_or_else(|| {
                field_err("llama.rope.scaling.factor", format!("is missing; scaling type \"{kind}\" needs it"))
            })
        };
        let mut scaling = match kind {
            "none" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "yarn" => {
                let factor = factor()?;
                let original = self
                    .metadata
                    .get("llama.rope.scaling.original_context_length")
                    .and_then(MetaValue::as_u64)
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        field_err(
                            "llama.rope.scaling.original_context_length",
                            "is missing or not a positive integer".into(),
                        )
                    })?;
                RopeScaling::Yarn {
                    factor,
                    original_max_positions: original as usize,
                    beta_fast: number("llama.rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                    beta_slow: number("llama.rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
                    attention_factor: if factor <= 1.0 { 1.0 } else { 0.1 * factor.ln() + 1.0 },
                    truncate: true,
                }
            }
            _ => {
                let value = self.metadata["llama.rope.scaling.type"].clone();
                unimplemented.push(Unimplemented {
                    field: "llama.rope.scaling.type",
                    value: format!("{value:?}"),
                    reason: "this RoPE scaling is not implemented (implemented: none, linear, yarn, and rope_freqs)",
                });
                RopeScaling::None
            }
        };
        if let Some(t) = self.tensors.iter().find(|t| t.name == "rope_freqs.weight") {
            let (_, factors) = self.dequantize_tensor(t)?;
            if factors.len() != head_dim / 2 || factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                return Err(ModelError::Weights {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor `rope_freqs.weight`: expected {} positive factors (head width {head_dim} / 2), found {} values",
                        head_dim / 2,
                        factors.len()
                    ),
                });
            }
            if scaling != RopeScaling::None {
                return Err(ModelError::Weights {
                    path: self.path.clone(),
                    reason: format!("has both a `rope_freqs` tensor and RoPE scaling type \"{kind}\"; expected one"),
                });
            }
            scaling = RopeScaling::FrequencyFactors(factors.iter().map(|&f| f as f64).collect());
        }
        Ok(RopeConfig { theta, scaling })
    }

    /// The head width: `rope.dimension_count` (transformers reads it as `head_dim`), which the
    /// key and value lengths must equal, else `embedding_length / head_count`.
    fn head_dim(&self, hidden: usize, heads: usize) -> Result<usize, ModelError> {
        let explicit = match self.metadata.get("llama.rope.dimension_count") {
            Some(_) => Some(self.meta_count("llama.rope.dimension_count")?),
            None => None,
        };
        if explicit.is_none() && !hidden.is_multiple_of(heads) {
            return Err(ModelError::Field {
                path: self.path.clone(),
                field: "llama.attention.head_count",
                problem: format!("{heads} heads do not tile the width {hidden}"),
            });
        }
        let head_dim = explicit.unwrap_or(hidden / heads);
        for key in ["llama.attention.key_length", "llama.attention.value_length"] {
            if let Some(v) = self.metadata.get(key).filter(|v| v.as_u64() != Some(head_dim as u64)) {
                return Err(ModelError::Field {
                    path: self.path.clone(),
                    field: key,
                    problem: format!(
                        "is {v:?}; heads whose keys/values differ from the rotary width {head_dim} are not implemented"
                    ),
                });
            }
        }
        if head_dim % 2 != 0 {
            return Err(ModelError::Field {
                path: self.path.clone(),
                field: "llama.rope.dimension_count",
                problem: format!("is {head_dim}; rotary heads need an even width"),
            });
        }
        Ok(head_dim)
    }

    /// The architecture of a llama-architecture GGUF.
    pub fn arch_spec(&self) -> Result<ArchSpec, ModelError> {
        let arch = self.meta_field("general.architecture")?.as_str().unwrap_or("");
        if arch != "llama" {
            return Err(ModelError::Field {
                path: self.path.clone(),
                field: "general.architecture",
                problem: format!("is \"{arch}\", expected \"llama\""),
            });
        }
        let heads = self.meta_count("llama.attention.head_count")?;
        let hidden = self.meta_count("llama.embedding_length")?;
        let kv_heads = match self.metadata.get("llama.attention.head_count_kv") {
            Some(_) => self.meta_count("llama.attention.head_count_kv")?,
            None => heads,
        };
        if heads % kv_heads != 0 {
            return Err(ModelError::Field {
                path: self.path.clone(),
                field: "llama.attention.head_count_kv",
                problem: format!("{kv_heads} kv heads do not divide {heads} heads"),
            });
        }
        let head_dim = self.head_dim(hidden, heads)?;
        let vocab = match self.metadata.get("llama.vocab_size") {
            Some(_) => self.meta_count("llama.vocab_size")?,
            None => self.meta_field("tokenizer.ggml.tokens")?.as_array().map_or(0, |a| a.len()),
        };
        let float = |key: &str, default: f64| self.metadata.get(key).and_then(MetaValue::as_f64).unwrap_or(default);
        let mut unimplemented = Vec::new();
        let rope = self.rope_config(head_dim, &mut unimplemented)?;
        Ok(ArchSpec {
            family: Family::Llama,
            source: self.path.display().to_string(),
            hidden,
            intermediate: self.meta_count("llama.feed_forward_length")?,
            layers: self.meta_count("llama.block_count")?,
            heads,
            kv_heads,
            vocab,
            positions: 0,
            type_vocab: 0,
            tie_embeddings: !self.tensors.iter().any(|t| t.name == "output.weight"),
            head_dim,
            rope,
            sliding_window: None,
            relative: None,
            base_prefix: "",
            norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5),
            unimplemented,
        })
    }

    /// Every tensor renamed to the HF layout, each dequantised (and its Q/K rows restored to the
    /// rotate-half order) only when the model takes it, so that a load holds one tensor in f32 at
    /// a time.
    pub fn hf_weights(self: &Arc<Self>, spec: &ArchSpec) -> Result<Weights, ModelError> {
        let mut weights = Weights::default();
        let head_dim = spec.head_dim;
        for (index, t) in self.tensors.iter().enumerate() {
            if t.name == "rope_freqs.weight" {
                // Read into the architecture's RoPE frequencies, not a weight.
                continue;
            }
            let name =
                hf_name(&t.name).ok_or_else(|| ModelError::UnexpectedTensors { count: 1, example: t.name.clone() })?;
            let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
            let rope_heads = if name.ends_with("self_attn.q_proj.weight") {
                Some(spec.heads)
            } else if name.ends_with("self_attn.k_proj.weight") {
                Some(spec.kv_heads)
            } else {
                None
            };
            let format = BlockFormat::from_ggml_type(t.ggml_type);
            let stored = match (t.ggml_type, format) {
                (_, Some(format)) => StoredDType::Blocks(format),
                (1, _) => StoredDType::F16,
                (30, _) => StoredDType::Bf16,
                _ => StoredDType::F32,
            };
            let gguf = Arc::clone(self);
            let decode = Box::new(move |blocks: bool| {
                let t = &gguf.tensors[index];
                if let (true, Some(format)) = (blocks, format) {
                    // The file's own blocks; GGUF's Q/K row order is a permutation of whole rows.
                    let (bytes, _) = gguf.tensor_bytes(t)?;
                    let row_bytes = format.row_bytes(t.dims[0] as usize);
                    return Ok(Decoded::Blocks(match rope_heads {
                        Some(heads) => unpermute_rope_rows(bytes, heads, head_dim, row_bytes),
                        None => bytes.to_vec(),
                    }));
                }
                let (shape, values) = gguf.dequantize_tensor(t)?;
                Ok(Decoded::Values(match rope_heads {
                    Some(heads) => unpermute_rope_rows(&values, heads, head_dim, shape[1]),
                    None => values,
                }))
            });
            weights.insert(name, shape, stored, decode, self.path.clone());
        }
        Ok(weights)
    }
}

/// llama.cpp tensor name → HF name.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, local) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let stem = local.strip_suffix(".weight")?;
    // The projections' names come from the family's layout table; the norms are not in it.
    let hf = match stem {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => crate::llama::LAYOUT.iter().find(|row| row.gguf == Some(stem))?.name,
    };
    Some(format!("model.layers.{layer}.{hf}.weight"))
}

/// Undoes llama.cpp's `permute` of Q/K rows: GGUF row `h·d_h + 2i + s` is HF row
/// `h·d_h + s·d_h/2 + i` (the converter interleaves the two rotate-half halves).
fn unpermute_rope_rows<T: Copy + Default>(values: &[T], heads: usize, head_dim: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); values.len()];
    let half = head_dim / 2;
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let src = (h * head_dim + 2 * i + s) * cols;
                let dst = (h * head_dim + s * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    out
}
