//! Training checkpoints: only what is trained (adapter factors, head, unfrozen norms), the
//! optimizer state, the schedule position, the data-loader position and the metric history.
//!
//! A checkpoint is a directory `checkpoint/step-<N>/` written as `.tmp-step-<N>/` (every file
//! fsynced) and renamed, and an old one is renamed to `.old-step-<N>/` before it is deleted, so a
//! kill at any moment leaves only complete checkpoints under `step-*` names. Parameter
//! ids are derived from parameter paths ([`stable_param_ids`]) so the optimizer state, keyed by id,
//! is valid in a new process.

use crate::error::{Result, TrainError};
use crate::metrics::EpochRecord;
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tensor_peft_models::tensor_io::{self, Params, TensorMap};

/// FNV-1a, 64 bit: a stable hash of a parameter path.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Gives every parameter the id its old id maps to.
struct Reassign(HashMap<ParamId, ParamId>);

impl<B: Backend> ModuleMapper<B> for Reassign {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(self.0.get(&id).copied().unwrap_or(id), tensor, mapper)
    }
}

/// `module` with every parameter id replaced by a hash of its path: ids are then the same in
/// every process that builds the same model.
pub fn stable_param_ids<B: Backend, M: Module<B>>(module: M) -> M {
    let ids = tensor_io::param_paths(&module).into_iter().map(|(path, id)| (id, ParamId::from(fnv1a(&path))));
    module.map(&mut Reassign(ids.collect()))
}

/// `(path, shape, values, id)` of every trained parameter of `module`, in visiting order.
pub fn trainable_params<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>, Vec<f32>, ParamId)> {
    tensor_io::module_params(module, Params::Trained).into_iter().map(|p| (p.path, p.shape, p.values, p.id)).collect()
}

/// Number of trained scalars of `module`.
pub fn trainable_count<B: Backend, M: Module<B>>(module: &M) -> usize {
    trainable_params(module).iter().map(|(_, s, _, _)| s.iter().product::<usize>()).sum()
}

/// `module` with its trained parameters read from `tensors` (every one must be present with the
/// same shape, and nothing else).
pub fn restore_trainable<B: Backend, M: Module<B>>(module: M, mut tensors: TensorMap, file: &Path) -> Result<M> {
    let module = tensor_io::load_params(module, &mut tensors, "", Params::Trained).map_err(|e| {
        TrainError::Checkpoint { path: file.into(), reason: format!("{e} (is it a checkpoint of this run?)") }
    })?;
    if let Some(extra) = tensors.keys().next() {
        return Err(TrainError::Checkpoint {
            path: file.into(),
            reason: format!("holds `{extra}`, which this model does not train (is it a checkpoint of this run?)"),
        });
    }
    Ok(module)
}

/// `module` with the parameters named in `tensors` (Burn paths) replaced; names that match no
/// parameter, or a shape mismatch, are errors about `file`.
pub fn assign_params<B: Backend, M: Module<B>>(module: M, mut tensors: TensorMap, file: &Path) -> Result<M> {
    let module = tensor_io::load_params(module, &mut tensors, "", Params::Stored)
        .map_err(|e| TrainError::Checkpoint { path: file.into(), reason: e.to_string() })?;
    if let Some(extra) = tensors.keys().next() {
        return Err(TrainError::Checkpoint {
            path: file.into(),
            reason: format!("holds `{extra}`, which this model has no parameter for"),
        });
    }
    Ok(module)
}

/// Reads named f32 tensors from a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<TensorMap> {
    Ok(tensor_io::read_safetensors(path)?)
}

/// Where training stands: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Fingerprint of the options that must not change on resume.
    pub fingerprint: String,
    /// Epoch in progress (1-based) when the checkpoint was taken.
    pub epoch: usize,
    /// Batches of that epoch already consumed.
    pub batches_done: usize,
    /// Optimizer steps taken.
    pub step: usize,
    /// Whether the epoch was finished (validated) when the checkpoint was taken.
    pub epoch_finished: bool,
    /// Metric history so far.
    pub history: Vec<EpochRecord>,
    /// Best validation value of the selection metric so far, with its epoch and step.
    pub best: Option<(f64, usize, usize)>,
    /// Evaluations (epoch ends, and `eval_every_steps` ones) without improvement (early stopping).
    pub epochs_without_improvement: usize,
    /// Train-split statistics of the unfinished epoch, so a resumed epoch reports the same metrics.
    pub partial_train: Option<crate::metrics::Accumulator>,
}

/// File names inside a checkpoint directory.
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
/// Optimizer state (Burn binary record, full precision).
pub const OPTIMIZER_FILE: &str = "optimizer.bin";
/// [`TrainerState`] as JSON.
pub const STATE_FILE: &str = "trainer_state.json";

/// Writes checkpoint `step-<step>` under `root` atomically and returns its path.
pub fn write_checkpoint<B: burn::tensor::backend::AutodiffBackend, M: Module<B>>(
    root: &Path,
    module: &M,
    optimizer: Option<crate::optim::OptimizerState<B>>,
    state: &TrainerState,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(TrainError::io(root))?;
    sweep_leftovers(root);
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    let dest = root.join(&name);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    let result = (|| {
        let tensors: TensorMap = trainable_params(module).into_iter().map(|(n, s, v, _)| (n, (s, v))).collect();
        tensor_io::write_safetensors(&tmp.join(TRAINABLE_FILE), &tensors, &[])?;
        if let Some(optimizer) = optimizer {
            let bytes = BinBytesRecorder::<FullPrecisionSettings>::default()
                .record(optimizer, ())
                .map_err(|e| TrainError::Checkpoint { path: tmp.join(OPTIMIZER_FILE), reason: e.to_string() })?;
            tensor_io::write_atomically(&tmp.join(OPTIMIZER_FILE), &bytes)?;
        }
        let json = serde_json::to_vec_pretty(state).expect("serialisable");
        tensor_io::write_atomically(&tmp.join(STATE_FILE), &json)?;
        if dest.exists() {
            remove_checkpoint(&dest);
        }
        std::fs::rename(&tmp, &dest).map_err(TrainError::io(&dest))?;
        if let Ok(dir) = std::fs::File::open(root) {
            let _ = dir.sync_all();
        }
        Ok(dest.clone())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Removes a checkpoint so that a kill at any moment leaves either the whole checkpoint or nothing
/// under its name: it is first renamed to `.old-step-<N>` (atomic), then deleted. Leftovers of an
/// interrupted deletion are swept by the next [`write_checkpoint`].
pub fn remove_checkpoint(dir: &Path) {
    let Some(name) = dir.file_name() else { return };
    let doomed = dir.with_file_name(format!(".old-{}", name.to_string_lossy()));
    if std::fs::rename(dir, &doomed).is_ok() {
        let _ = std::fs::remove_dir_all(&doomed);
    }
}

/// Deletes what interrupted writes and deletions left under `root` (`.tmp-*`, `.old-*`).
fn sweep_leftovers(root: &Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(".tmp-") || name.starts_with(".old-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Complete checkpoints under `root`, oldest first, with their steps.
pub fn list_checkpoints(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            let dir = e.path();
            dir.join(STATE_FILE).is_file().then_some((step, dir))
        })
        .collect();
    out.sort();
    out
}

/// Reads a checkpoint's state.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(TrainError::io(&path))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint { path, reason: format!("invalid trainer state: {e}") })
}

/// Reads a checkpoint's optimizer state.
pub fn read_optimizer<B: burn::tensor::backend::AutodiffBackend>(
    dir: &Path,
    device: &B::Device,
) -> Result<crate::optim::OptimizerState<B>> {
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).map_err(TrainError::io(&path))?;
    BinBytesRecorder::<FullPrecisionSettings>::default()
        .load(bytes, device)
        .map_err(|e| TrainError::Checkpoint { path, reason: format!("unreadable optimizer state: {e}") })
}
