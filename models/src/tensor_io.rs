//! Named tensors on disk and in modules, once for adapter files, training checkpoints and HF
//! export: safetensors files (written atomically, read memory-mapped through [`Weights`]) and the
//! walk between a Burn module's parameters and tensors named by parameter path.
//!
//! The module walk is burn-store's ([`ModuleSnapshot`]: path matching, shape checks, partial
//! loads through a [`PathFilter`]). Written here by hand: the atomic write (burn-store's file
//! store writes in place, so a kill mid-write would leave a torn file under the final name) and
//! which parameters are trained (its snapshots do not carry `require_grad`).

use crate::error::ModelError;
use crate::weights::Weights;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use burn_store::{ApplyError, ModuleSnapshot, PathFilter, TensorSnapshot};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;

/// Named tensors: name → (shape, values).
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// One parameter of a module: its path (field names joined by `.`, enum variants included),
/// shape, values and id.
#[derive(Debug, Clone)]
pub struct NamedParam {
    /// Parameter path, e.g. `layers.0.q_proj.adapter.Lora.a`.
    pub path: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
    /// The parameter's id.
    pub id: ParamId,
}

/// Which parameters of a module to read or load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Params {
    /// Only the parameters that require a gradient.
    Trained,
    /// Loads: only the parameters with a stored tensor (the others keep their values); reads:
    /// every float parameter.
    Stored,
}

/// Shape and row-major f32 values of `tensor`.
pub fn tensor_values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
    let shape = tensor.dims().to_vec();
    (shape, tensor.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default())
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename; the temporary file is
/// removed on failure, so `path` holds either its old content or all of `bytes`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let io = |source| ModelError::Io { path: path.to_path_buf(), source };
    let written = std::fs::File::create(&tmp)
        .and_then(|mut file| file.write_all(bytes).and_then(|_| file.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// Writes `tensors` to `path` as F32 safetensors with `metadata` (e.g. `{"format": "pt"}`, which
/// PEFT writes), atomically.
pub fn write_safetensors(path: &Path, tensors: &TensorMap, metadata: &[(&str, &str)]) -> Result<(), ModelError> {
    let invalid =
        |e: safetensors::SafeTensorError| ModelError::Weights { path: path.to_path_buf(), reason: e.to_string() };
    let bytes: Vec<(&String, &Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(n, (s, v))| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views = bytes
        .iter()
        .map(|(n, s, d)| safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.to_vec(), d).map(|v| (*n, v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let metadata = (!metadata.is_empty())
        .then(|| metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>());
    write_atomically(path, &safetensors::serialize(views, metadata).map_err(invalid)?)
}

/// Every tensor of the safetensors file `path`, as f32 (F16 and BF16 converted; memory-mapped,
/// as [`Weights::add_file`] reads checkpoints).
pub fn read_safetensors(path: &Path) -> Result<TensorMap, ModelError> {
    let mut weights = Weights::default();
    weights.add_file(path)?;
    weights.into_map()
}

/// Ids of the parameters that require a gradient (burn-store's snapshots do not tell).
struct TrainedIds(HashSet<ParamId>);

impl<B: Backend> ModuleVisitor<B> for TrainedIds {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if param.val().is_require_grad() {
            self.0.insert(param.id);
        }
    }
}

/// Path and id of every float parameter of `module`, in visiting order, without reading values.
pub fn param_paths<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, ParamId)> {
    module.collect(None, None, false).into_iter().filter_map(|s| Some((s.full_path(), s.tensor_id?))).collect()
}

/// The paths of the `which` parameters of `module` (`None`: all of them).
fn selected<B: Backend, M: Module<B>>(module: &M, which: Params) -> Option<Vec<String>> {
    (which == Params::Trained).then(|| {
        let mut trained = TrainedIds(HashSet::new());
        module.visit(&mut trained);
        param_paths(module).into_iter().filter(|(_, id)| trained.0.contains(id)).map(|(path, _)| path).collect()
    })
}

fn path_filter(selected: &Option<Vec<String>>) -> Option<PathFilter> {
    selected.as_ref().map(|paths| PathFilter::new().with_full_paths(paths.iter().cloned()))
}

/// `which` float parameters of `module`, in visiting order.
pub fn module_params<B: Backend, M: Module<B>>(module: &M, which: Params) -> Vec<NamedParam> {
    module
        .collect(path_filter(&selected(module, which)), None, false)
        .into_iter()
        .map(|snapshot| {
            let data = snapshot.to_data().expect("a module's own tensor is readable");
            NamedParam {
                path: snapshot.full_path(),
                shape: data.shape.to_vec(),
                values: data.convert::<f32>().to_vec::<f32>().unwrap_or_default(),
                id: snapshot.tensor_id.unwrap_or_default(),
            }
        })
        .collect()
}

/// Why [`load_params`] refused.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadError {
    /// No tensor for the parameter stored as this name.
    Missing(String),
    /// The tensor stored as `name` has another shape than the parameter.
    Shape {
        /// Stored name.
        name: String,
        /// Its shape.
        found: Vec<usize>,
        /// The parameter's shape.
        needed: Vec<usize>,
    },
    /// A tensor that could not be loaded.
    Other(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Missing(name) => write!(f, "no tensor `{name}`"),
            LoadError::Shape { name, found, needed } => {
                write!(f, "tensor `{name}` has shape {found:?}, the model needs {needed:?}")
            }
            LoadError::Other(reason) => f.write_str(reason),
        }
    }
}

/// `module` with its `which` parameters replaced by the tensors stored as `{prefix}.{path}`
/// (`path` alone when `prefix` is empty); each must be present (except with [`Params::Stored`])
/// with the parameter's shape. Loaded tensors are removed from `tensors`; what is left is the
/// caller's to judge.
pub fn load_params<B: Backend, M: Module<B>>(
    mut module: M,
    tensors: &mut TensorMap,
    prefix: &str,
    which: Params,
) -> Result<M, LoadError> {
    let full = |path: &str| if prefix.is_empty() { path.to_string() } else { format!("{prefix}.{path}") };
    let stored_path = |name: &str| match prefix {
        "" => Some(name.to_string()),
        _ => name.strip_prefix(prefix)?.strip_prefix('.').map(String::from),
    };
    let mut snapshots = Vec::new();
    for (name, (shape, values)) in
        tensors.range::<str, _>((Bound::Included(prefix), Bound::Unbounded)).take_while(|(n, _)| n.starts_with(prefix))
    {
        let Some(path) = stored_path(name) else { continue };
        // In the backend's float type, as the parameters it replaces.
        let data = TensorData::new(values.clone(), shape.clone()).convert::<B::FloatElem>();
        let stack = path.split('.').map(String::from).collect();
        snapshots.push(TensorSnapshot::from_data(data, stack, Vec::new(), ParamId::new()));
    }
    let selected = selected(&module, which);
    let result = module.apply(snapshots, path_filter(&selected), None, false);
    if let Some(error) = result.errors.first() {
        return Err(match error {
            ApplyError::ShapeMismatch { path, expected, found } => {
                LoadError::Shape { name: full(path), found: found.to_vec(), needed: expected.to_vec() }
            }
            other => LoadError::Other(format!("{other:?}")),
        });
    }
    let required = |path: &String| which != Params::Stored && selected.as_ref().is_none_or(|s| s.contains(path));
    if let Some((path, _)) = result.missing.iter().find(|(path, _)| required(path)) {
        return Err(LoadError::Missing(full(path)));
    }
    for path in &result.applied {
        tensors.remove(&full(path));
    }
    Ok(module)
}
