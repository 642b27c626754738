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
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// FNV-1a, 64 bit: a stable hash of a parameter path.
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

struct StableIds {
    path: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for StableIds {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(ParamId::from(fnv1a(&self.path.join("."))), tensor, mapper)
    }
}

/// `module` with every parameter id replaced by a hash of its path: ids are then the same in
/// every process that builds the same model.
pub fn stable_param_ids<B: Backend, M: Module<B>>(module: M) -> M {
    module.map(&mut StableIds { path: Vec::new() })
}

/// Path, shape and values of every parameter that requires a gradient.
struct Trainable {
    path: Vec<String>,
    out: Vec<(String, Vec<usize>, Vec<f32>, ParamId)>,
}

impl<B: Backend> ModuleVisitor<B> for Trainable {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        if t.is_require_grad() {
            let shape = t.dims().to_vec();
            let values = t.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
            self.out.push((self.path.join("."), shape, values, param.id));
        }
    }
}

/// `(path, shape, values, id)` of every trained parameter of `module`, in visiting order.
pub fn trainable_params<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>, Vec<f32>, ParamId)> {
    let mut v = Trainable { path: Vec::new(), out: Vec::new() };
    module.visit(&mut v);
    v.out
}

/// Number of trained scalars of `module`.
pub fn trainable_count<B: Backend, M: Module<B>>(module: &M) -> usize {
    trainable_params(module).iter().map(|(_, s, _, _)| s.iter().product::<usize>()).sum()
}

struct Restore<'a> {
    path: Vec<String>,
    tensors: &'a mut BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    error: Option<String>,
    /// Restore exactly the trained parameters (all must be present); otherwise replace whichever
    /// parameters `tensors` names.
    trained_only: bool,
}

impl<B: Backend> ModuleMapper<B> for Restore<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.join(".");
        let (id, tensor, mapper) = param.consume();
        let trained = tensor.is_require_grad();
        if (self.trained_only && !trained) || (!self.trained_only && !self.tensors.contains_key(&name)) {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let dims = tensor.dims();
        let tensor = match self.tensors.remove(&name) {
            Some((shape, values)) if shape[..] == dims[..] => {
                Tensor::from_data(TensorData::new(values, dims), &tensor.device()).set_require_grad(trained)
            }
            Some((shape, _)) => {
                self.error.get_or_insert(format!("`{name}` has shape {shape:?}, the model needs {dims:?}"));
                tensor
            }
            None => {
                self.error.get_or_insert(format!("no tensor `{name}`"));
                tensor
            }
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// `module` with its trained parameters read from `tensors` (every one must be present with the
/// same shape, and nothing else).
pub fn restore_trainable<B: Backend, M: Module<B>>(
    module: M,
    mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    file: &Path,
) -> Result<M> {
    let mut mapper = Restore { path: Vec::new(), tensors: &mut tensors, error: None, trained_only: true };
    let module = module.map(&mut mapper);
    if let Some(e) = mapper.error {
        return Err(TrainError::Checkpoint {
            path: file.into(),
            reason: format!("{e} (is it a checkpoint of this run?)"),
        });
    }
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
pub fn assign_params<B: Backend, M: Module<B>>(
    module: M,
    mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    file: &Path,
) -> Result<M> {
    let mut mapper = Restore { path: Vec::new(), tensors: &mut tensors, error: None, trained_only: false };
    let module = module.map(&mut mapper);
    if let Some(e) = mapper.error {
        return Err(TrainError::Checkpoint { path: file.into(), reason: e });
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(TrainError::Checkpoint {
            path: file.into(),
            reason: format!("holds `{extra}`, which this model has no parameter for"),
        });
    }
    Ok(module)
}

/// Serialises named f32 tensors as safetensors.
pub fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, d)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| TrainError::Checkpoint { path: PathBuf::new(), reason: e.to_string() })?;
    safetensors::serialize(views, None)
        .map_err(|e| TrainError::Checkpoint { path: PathBuf::new(), reason: e.to_string() })
}

/// Reads named f32 tensors from a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<tensor_peft_models::adapter_file::TensorMap> {
    let bytes = std::fs::read(path).map_err(TrainError::io(path))?;
    let bad = |reason: String| TrainError::Checkpoint { path: path.into(), reason };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("`{name}` is {:?}, expected F32", view.dtype())));
        }
        let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
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
    /// Epochs without improvement (early stopping).
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

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(TrainError::io(path))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(TrainError::io(path))
}

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
        let tensors: Vec<_> = trainable_params(module).into_iter().map(|(n, s, v, _)| (n, s, v)).collect();
        write_synced(&tmp.join(TRAINABLE_FILE), &safetensors_bytes(&tensors)?)?;
        if let Some(optimizer) = optimizer {
            let bytes = BinBytesRecorder::<FullPrecisionSettings>::default()
                .record(optimizer, ())
                .map_err(|e| TrainError::Checkpoint { path: tmp.join(OPTIMIZER_FILE), reason: e.to_string() })?;
            write_synced(&tmp.join(OPTIMIZER_FILE), &bytes)?;
        }
        let json = serde_json::to_vec_pretty(state).expect("serialisable");
        write_synced(&tmp.join(STATE_FILE), &json)?;
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
