//! Reading HF checkpoints: `model.safetensors` or a sharded `model.safetensors.index.json`,
//! F32/F16/BF16 converted to f32 on load.
//!
//! Files are memory-mapped and each tensor is converted only when the model takes it, so a load
//! never holds the checkpoint twice in anonymous memory (the mapping is file-backed page cache).

use crate::error::ModelError;
use burn::tensor::{Tensor, TensorData, backend::Backend};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a tensor's values are.
#[derive(Debug)]
enum Stored {
    /// Already f32 (e.g. dequantised from GGUF).
    Owned(Vec<f32>),
    /// Bytes `range` of a mapped safetensors file, in `dtype`.
    Mapped { map: Arc<memmap2::Mmap>, range: std::ops::Range<usize>, dtype: Dtype },
}

impl Stored {
    fn into_f32(self) -> Vec<f32> {
        match self {
            Stored::Owned(v) => v,
            Stored::Mapped { map, range, dtype } => {
                let data = &map[range];
                match dtype {
                    Dtype::F16 => {
                        data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                    }
                    Dtype::BF16 => {
                        data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                    }
                    _ => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                }
            }
        }
    }
}

/// Every tensor of a checkpoint: its shape, where its values are, and the file it came from.
#[derive(Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, (Vec<usize>, Stored, PathBuf)>,
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

    /// Adds one tensor (row-major `shape`), e.g. from a GGUF file.
    pub fn insert(&mut self, name: String, shape: Vec<usize>, values: Vec<f32>, source: PathBuf) {
        self.tensors.insert(name, (shape, Stored::Owned(values), source));
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

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no tensor was loaded.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Removes and returns tensor `name`, checking its shape.
    pub fn take<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, ModelError> {
        let (found, stored, path) =
            self.tensors.remove(name).ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;

        if found != shape {
            return Err(weights_error(&path, format!("tensor `{name}` has shape {found:?}, expected {shape:?}")));
        }
        Ok(Tensor::from_data(TensorData::new(stored.into_f32(), shape), device))
    }

    /// Removes and returns the 2-D tensor `name` stored as `[rows, cols]` (HF's `[out, in]`) as
    /// Burn's `[cols, rows]` (`[in, out]`): transposed into contiguous memory, or, where the
    /// backend's GEMMs run faster that way ([`crate::fused::weight_as_transposed_view`]), a
    /// transposed view of the stored layout.
    pub fn take_transposed<B: Backend>(
        &mut self,
        name: &str,
        [rows, cols]: [usize; 2],
        device: &B::Device,
    ) -> Result<Tensor<B, 2>, ModelError> {
        let (found, stored, path) =
            self.tensors.remove(name).ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        if found != [rows, cols] {
            return Err(weights_error(
                &path,
                format!("tensor `{name}` has shape {found:?}, expected {:?}", [rows, cols]),
            ));
        }
        let values = stored.into_f32();
        if crate::fused::weight_as_transposed_view::<B>(cols, rows) {
            return Ok(Tensor::<B, 2>::from_data(TensorData::new(values, [rows, cols]), device).transpose());
        }
        let mut transposed = vec![0.0f32; values.len()];
        for r in 0..rows {
            for c in 0..cols {
                transposed[c * rows + r] = values[r * cols + c];
            }
        }
        Ok(Tensor::from_data(TensorData::new(transposed, [cols, rows]), device))
    }

    /// Every remaining tensor converted to f32, by name.
    pub fn into_map(self) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        self.tensors.into_iter().map(|(name, (shape, stored, _))| (name, (shape, stored.into_f32()))).collect()
    }

    /// Names of the tensors not taken yet (a checkpoint with unexpected tensors is refused).
    pub fn remaining(&self) -> Vec<String> {
        let mut names: Vec<_> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}
