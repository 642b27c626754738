//! Reading HF checkpoints: `model.safetensors` or a sharded `model.safetensors.index.json`.
//! Norm scales and biases are read as f32; the frozen matrices (projections, embeddings) at the
//! base dtype ([`BaseDType`]), without an f32 copy of a half-precision file.
//!
//! Files are memory-mapped and each tensor is converted only when the model takes it, so a load
//! never holds the checkpoint twice in anonymous memory (the mapping is file-backed page cache).

use crate::error::ModelError;
use crate::fused::{BlockMatrix, FrozenMatrix};
use crate::precision::{BaseDType, Held, StoredDType};
use burn::tensor::{DType, Tensor, TensorData, backend::Backend, bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tensor_peft_kernels::quant::BlockFormat;

/// Decodes one tensor of a file that is not a safetensors mapping (a GGUF tensor), when taken: its
/// values in f32, or (when asked with `true` and the file stores blocks) its blocks as they are.
pub type Decode = Box<dyn FnOnce(bool) -> Result<Decoded, ModelError> + Send>;

/// What a [`Decode`] gives.
pub enum Decoded {
    /// Row-major f32 values.
    Values(Vec<f32>),
    /// GGML blocks, row after row, in the file's format.
    Blocks(Vec<u8>),
}

/// Where a tensor's values are.
enum Stored {
    /// Values decoded when the tensor is taken (e.g. dequantised from GGUF), in the file's dtype.
    Lazy(Decode, StoredDType),
    /// Bytes `range` of a mapped safetensors file, in `dtype`.
    Mapped { map: Arc<memmap2::Mmap>, range: std::ops::Range<usize>, dtype: Dtype },
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stored::Lazy(_, dtype) => write!(f, "Lazy({dtype:?})"),
            Stored::Mapped { range, dtype, .. } => write!(f, "Mapped({dtype:?}, {range:?})"),
        }
    }
}

/// Row-major values of one element type, for building a tensor at the base dtype.
enum Values {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Values {
    fn transposed(self, rows: usize, cols: usize) -> Self {
        fn t<T: Copy + Default>(v: Vec<T>, rows: usize, cols: usize) -> Vec<T> {
            let mut out = vec![T::default(); v.len()];
            for r in 0..rows {
                for c in 0..cols {
                    out[c * rows + r] = v[r * cols + c];
                }
            }
            out
        }
        match self {
            Values::F32(v) => Values::F32(t(v, rows, cols)),
            Values::Bf16(v) => Values::Bf16(t(v, rows, cols)),
            Values::F16(v) => Values::F16(t(v, rows, cols)),
        }
    }

    fn into_data(self, shape: Vec<usize>) -> TensorData {
        match self {
            Values::F32(v) => TensorData::new(v, shape),
            Values::Bf16(v) => TensorData::new(v, shape),
            Values::F16(v) => TensorData::new(v, shape),
        }
    }
}

/// GGML blocks dequantized into bf16 or f16 values (`dtype`), a run of blocks at a time.
fn narrowed_blocks(bytes: &[u8], format: BlockFormat, dtype: DType) -> Values {
    fn narrowed<T>(bytes: &[u8], format: BlockFormat, narrow: impl Fn(f32) -> T) -> Vec<T> {
        const RUN: usize = 256;
        let mut out = Vec::with_capacity(bytes.len() / format.block_bytes() * format.block_len());
        let mut scratch = vec![0.0f32; RUN * format.block_len()];
        for run in bytes.chunks(RUN * format.block_bytes()) {
            let n = run.len() / format.block_bytes() * format.block_len();
            format.dequantize(run, &mut scratch[..n]);
            out.extend(scratch[..n].iter().map(|&v| narrow(v)));
        }
        out
    }
    match dtype {
        DType::F16 => Values::F16(narrowed(bytes, format, f16::from_f32)),
        _ => Values::Bf16(narrowed(bytes, format, bf16::from_f32)),
    }
}

impl Stored {
    fn dtype(&self) -> StoredDType {
        match self {
            Stored::Lazy(_, dtype) => *dtype,
            Stored::Mapped { dtype: Dtype::F16, .. } => StoredDType::F16,
            Stored::Mapped { dtype: Dtype::BF16, .. } => StoredDType::Bf16,
            Stored::Mapped { .. } => StoredDType::F32,
        }
    }

    /// The stored blocks, when the file stores this tensor as blocks (`None`: it does not).
    fn into_blocks(self) -> Result<Option<Vec<u8>>, ModelError> {
        match self {
            Stored::Lazy(decode, StoredDType::Blocks(_)) => match decode(true)? {
                Decoded::Blocks(bytes) => Ok(Some(bytes)),
                Decoded::Values(_) => Ok(None),
            },
            _ => Ok(None),
        }
    }

    fn into_f32(self) -> Result<Vec<f32>, ModelError> {
        match self.into_values(DType::F32)? {
            Values::F32(v) => Ok(v),
            _ => unreachable!("f32 was asked for"),
        }
    }

    /// The values as `dtype` (f32, bf16 or f16), converted straight from the stored bytes.
    fn into_values(self, dtype: DType) -> Result<Values, ModelError> {
        let values = match self {
            // Blocks wanted in half precision (a quantized file's embeddings): dequantized a run of
            // blocks at a time, so that the whole tensor never exists in f32 (for a 49K × 576
            // embedding, 113 MiB that were the loader's peak).
            Stored::Lazy(decode, StoredDType::Blocks(format)) if dtype != DType::F32 => match decode(true)? {
                Decoded::Blocks(bytes) => return Ok(narrowed_blocks(&bytes, format, dtype)),
                Decoded::Values(v) => Values::F32(v),
            },
            Stored::Lazy(decode, _) => match decode(false)? {
                Decoded::Values(v) => Values::F32(v),
                Decoded::Blocks(_) => unreachable!("values were asked for"),
            },
            Stored::Mapped { map, range, dtype: stored } => {
                let data = &map[range];
                let halves = || data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
                match (stored, dtype) {
                    (Dtype::BF16, DType::BF16) => return Ok(Values::Bf16(halves().map(bf16::from_bits).collect())),
                    (Dtype::F16, DType::F16) => return Ok(Values::F16(halves().map(f16::from_bits).collect())),
                    (Dtype::F16, _) => Values::F32(halves().map(|h| f16::from_bits(h).to_f32()).collect()),
                    (Dtype::BF16, _) => Values::F32(halves().map(|h| bf16::from_bits(h).to_f32()).collect()),
                    _ => Values::F32(
                        data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                    ),
                }
            }
        };
        let Values::F32(v) = values else { unreachable!("decoded as f32 above") };
        // Into a new vector: collected from `v.into_iter()`, the narrower values would reuse (and
        // keep) the f32 allocation, twice their size, for as long as the weight lives.
        Ok(match dtype {
            DType::BF16 => Values::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => Values::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            _ => Values::F32(v),
        })
    }
}

/// Every tensor of a checkpoint: its shape, where its values are, and the file it came from.
#[derive(Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, (Vec<usize>, Stored, PathBuf)>,
    base_dtype: BaseDType,
}

fn weights_error(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Weights { path: path.to_path_buf(), reason: reason.into() }
}

impl Weights {
    /// Loads `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let text =
                std::fs::read_to_string(&index).map_err(|source| ModelError::Io { path: index.clone(), source })?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Json { path: index.clone(), reason: e.to_string() })?;
            let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Field {
                path: index.clone(),
                field: "weight_map",
                problem: "is missing (expected an object of tensor name → shard file)".into(),
            })?;
            let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.sort_unstable();
            shards.dedup();
            let mut weights = Weights::default();
            for shard in shards {
                if shard.contains('/') || shard.contains("..") {
                    return Err(weights_error(
                        &index,
                        format!("shard name `{shard}` must be a file in the model directory"),
                    ));
                }
                weights.add_file(&dir.join(shard))?;
            }
            return Ok(weights);
        }
        let mut weights = Weights::default();
        weights.add_file(&dir.join("model.safetensors"))?;
        Ok(weights)
    }

    /// Adds every tensor of one safetensors file (memory-mapped; the file must not change while
    /// the weights are being loaded).
    pub fn add_file(&mut self, path: &Path) -> Result<(), ModelError> {
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        // SAFETY: the mapping is read-only and only read while this loader runs; a checkpoint
        // modified concurrently by another process is outside what the loader supports.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let map = Arc::new(map);
        let invalid =
            |e: safetensors::SafeTensorError| weights_error(path, format!("not a valid safetensors file: {e}"));
        // `deserialize` validates every tensor's bounds and dtype size against the buffer.
        SafeTensors::deserialize(&map).map_err(invalid)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(invalid)?;
        let data_start = 8 + header_len;
        for (name, info) in metadata.tensors() {
            // Integer buffers such as BERT's `position_ids` are recomputed, not loaded.
            if matches!(info.dtype, Dtype::I64 | Dtype::I32) && name.ends_with("position_ids") {
                continue;
            }
            if !matches!(info.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(weights_error(
                    path,
                    format!("tensor `{name}` has dtype {:?}; expected F32, F16 or BF16", info.dtype),
                ));
            }
            let (begin, end) = info.data_offsets;
            let stored =
                Stored::Mapped { map: map.clone(), range: data_start + begin..data_start + end, dtype: info.dtype };
            self.tensors.insert(name, (info.shape.clone(), stored, path.to_path_buf()));
        }
        Ok(())
    }

    /// Adds one tensor (row-major `shape`) stored as `dtype` in `source` (e.g. a GGUF file), whose
    /// values `decode` produces when the model takes it.
    pub fn insert(&mut self, name: String, shape: Vec<usize>, dtype: StoredDType, decode: Decode, source: PathBuf) {
        self.tensors.insert(name, (shape, Stored::Lazy(decode, dtype), source));
    }

    /// Holds the frozen matrices taken from now on ([`Self::take_transposed`],
    /// [`Self::take_matrix`]) at `dtype`.
    pub fn with_base_dtype(mut self, dtype: BaseDType) -> Self {
        self.base_dtype = dtype;
        self
    }

    /// Whether a tensor named `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Renames tensors that start with one of `prefixes` (e.g. `bert.`) to their bare names.
    pub fn strip_prefixes(mut self, prefixes: &[&str]) -> Self {
        self.tensors = self
            .tensors
            .into_iter()
            .map(|(name, v)| {
                let bare = prefixes.iter().find_map(|p| name.strip_prefix(p)).map(str::to_string).unwrap_or(name);
                (bare, v)
            })
            .collect();
        self
    }

    /// Drops the tensors whose names start with one of `prefixes`: parts of a checkpoint the
    /// models deliberately do not load (e.g. DeBERTa's masked-LM pretraining heads).
    pub fn discard_prefixes(mut self, prefixes: &[&str]) -> Self {
        self.tensors.retain(|name, _| !prefixes.iter().any(|p| name.starts_with(p)));
        self
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no tensor was loaded.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Removes tensor `name`, checking its shape.
    fn remove<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<(Stored, PathBuf), ModelError> {
        let (found, stored, path) =
            self.tensors.remove(name).ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        if found != shape {
            return Err(weights_error(&path, format!("tensor `{name}` has shape {found:?}, expected {shape:?}")));
        }
        Ok((stored, path))
    }

    /// Removes and returns tensor `name` as f32 (norm scales, biases), checking its shape.
    pub fn take<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, ModelError> {
        let (stored, _) = self.remove(name, shape)?;
        Ok(Tensor::from_data(TensorData::new(stored.into_f32()?, shape), device))
    }

    /// Removes and returns the frozen matrix `name` (an embedding table) at the base dtype's
    /// embedding precision ([`BaseDType::embedding`]).
    pub fn take_matrix<B: Backend>(
        &mut self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>, ModelError> {
        let (stored, path) = self.remove(name, shape)?;
        let dtype = self.base_dtype.embedding(stored.dtype(), B::supports_dtype(device, DType::BF16));
        backend_holds::<B>(dtype, device).map_err(|reason| weights_error(&path, reason))?;
        held_at(Tensor::from_data(stored.into_values(dtype)?.into_data(shape.to_vec()), (device, dtype)), dtype, &path)
    }

    /// Removes and returns the frozen projection `name` stored as `[rows, cols]` (HF's `[out, in]`)
    /// as Burn's `W: [cols, rows]` (`[in, out]`), held as the base dtype says
    /// ([`BaseDType::projection`]): float values, or GGML blocks (a GGUF file's own blocks when
    /// they are that format, else quantized here, one matrix at a time).
    pub fn take_transposed<B: Backend>(
        &mut self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<FrozenMatrix<B>, ModelError> {
        let (stored, path) = self.remove(name, shape)?;
        match self.base_dtype.projection(stored.dtype()) {
            Held::Values(dtype) => Ok(FrozenMatrix::Values(values_transposed(stored, shape, dtype, &path, device)?)),
            Held::Blocks(format) => {
                let [rows, cols] = shape;
                let failed = |reason: String| weights_error(&path, format!("tensor `{name}`: {reason}"));
                let matrix = if stored.dtype() == StoredDType::Blocks(format) {
                    let bytes = stored.into_blocks()?.expect("the file stores these blocks");
                    BlockMatrix::from_bytes(bytes, format, cols, rows, device)
                } else {
                    BlockMatrix::quantize_rows(&stored.into_f32()?, format, cols, rows, device)
                };
                matrix.map(FrozenMatrix::Blocks).map_err(failed)
            }
        }
    }

    /// Removes and returns the 2-D matrix `name` stored as `[rows, cols]` as Burn's `[cols, rows]`
    /// (a transposed view) at the base dtype's embedding precision: for the output head and BERT's
    /// pooler, which stay float values under a quantized base.
    pub fn take_head<B: Backend>(
        &mut self,
        name: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>, ModelError> {
        Ok(self.take_matrix::<B>(name, shape, device)?.transpose())
    }

    /// Every remaining tensor converted to f32, by name.
    pub fn into_map(self) -> Result<crate::tensor_io::TensorMap, ModelError> {
        self.tensors.into_iter().map(|(name, (shape, stored, _))| Ok((name, (shape, stored.into_f32()?)))).collect()
    }

    /// Names of the tensors not taken yet (a checkpoint with unexpected tensors is refused).
    pub fn remaining(&self) -> Vec<String> {
        let mut names: Vec<_> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}

/// `stored` (`[rows, cols]`) as a `[cols, rows]` tensor of `dtype`: transposed into contiguous
/// memory, or, where the backend's GEMMs run faster that way
/// ([`crate::fused::weight_as_transposed_view`]), a transposed view of the stored layout.
fn values_transposed<B: Backend>(
    stored: Stored,
    [rows, cols]: [usize; 2],
    dtype: DType,
    path: &Path,
    device: &B::Device,
) -> Result<Tensor<B, 2>, ModelError> {
    backend_holds::<B>(dtype, device).map_err(|reason| weights_error(path, reason))?;
    let values = stored.into_values(dtype)?;
    let tensor = if crate::fused::weight_as_transposed_view::<B>(cols, rows) {
        Tensor::<B, 2>::from_data(values.into_data(vec![rows, cols]), (device, dtype)).transpose()
    } else {
        Tensor::from_data(values.transposed(rows, cols).into_data(vec![cols, rows]), (device, dtype))
    };
    held_at(tensor, dtype, path)
}

/// Whether backend `B` can hold tensors of `dtype` (ndarray holds no half-precision floats); the
/// error says what to choose instead.
pub fn backend_holds<B: Backend>(dtype: DType, device: &B::Device) -> Result<(), String> {
    if B::supports_dtype(device, dtype) {
        return Ok(());
    }
    Err(format!(
        "the {} backend cannot hold {dtype:?} tensors; use --base-dtype f32 or --backend flex",
        B::name(device)
    ))
}

/// `tensor`, or an error when the backend did not keep the dtype asked for.
fn held_at<B: Backend>(tensor: Tensor<B, 2>, dtype: DType, path: &Path) -> Result<Tensor<B, 2>, ModelError> {
    if tensor.dtype() == dtype {
        return Ok(tensor);
    }
    Err(weights_error(
        path,
        format!(
            "the {} backend cannot hold {dtype:?} tensors (it made {:?}); use another --base-dtype or --backend flex",
            B::name(&tensor.device()),
            tensor.dtype()
        ),
    ))
}
