//! Adapter files, PEFT style: `<dir>/adapter_config.json` (method, hyper-parameters, targets, base
//! model identity) and `<dir>/adapter_model.safetensors` (only the adapter tensors; shared factors
//! stored once). Every tensor is stored as `base_model.model.<module>.<name>` (shared factors as
//! `base_model.model.shared.<name>`) under the name its method gives it
//! ([`AdapterLayer::file_tensors`]): LoRA's are HF PEFT's (`lora_A.weight` `[r, in]`,
//! `lora_B.weight` `[out, r]`) so PEFT can read them.
//!
//! Loading rebuilds the adapters from the config and then replaces every parameter by name, after
//! checking that the base model matches; files are written to temporary names and renamed.

use crate::adapter_set::put_adapters;
use crate::arch::ArchSpec;
use crate::error::ModelError;
use crate::inject::{AdapterSlots, Targets};
use crate::tensor_io;
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tensor_peft_adapters::{
    AdapterError, AdapterLayer, AdapterSet, FileParam, FileTensor, MethodConfig, TENSOR_NAMES_VERSION,
};

/// Name of the config file in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Name of the weights file in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The base model an adapter was trained on (checked when loading): its family name and the
/// [`ArchSpec`] sizes the adapter's tensors depend on (width, feed-forward width, blocks, query and
/// key/value heads, vocabulary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModelIdentity {
    family: String,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
}

impl BaseModelIdentity {
    /// The identity of `spec`.
    pub fn of(spec: &ArchSpec) -> Self {
        Self {
            family: spec.family.name().into(),
            hidden: spec.hidden,
            intermediate: spec.intermediate,
            layers: spec.layers,
            heads: spec.heads,
            kv_heads: spec.kv_heads,
            vocab: spec.vocab,
        }
    }
}

/// What `adapter_config.json` describes. On disk it is PEFT's format: PEFT's LoRA keys (`peft_type`,
/// `r`, `lora_alpha`, `target_modules`, …) at the top level, and our method configuration, base-model
/// identity and version under `tensor_peft`. Files written by PEFT (LoRA) are read too.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// The method and its hyper-parameters.
    pub method: MethodConfig,
    /// `None`: the method's defaults; else module names/suffixes (PEFT's `target_modules` list).
    pub target_modules: Option<Vec<String>>,
    /// A regular expression over module names (PEFT's string `target_modules`).
    pub target_regex: Option<String>,
    /// Where the base model came from (informational).
    pub base_model_name_or_path: String,
    /// Shapes the base model must have (`None` for adapters written by PEFT, which records none;
    /// every tensor's shape is still checked).
    pub base_model: Option<BaseModelIdentity>,
    /// PEFT's `peft_type` ([`MethodConfig::peft_type`]: `LORA` for LoRA).
    pub peft_type: String,
    /// Version of tensor-peft that wrote the file.
    pub library_version: String,
    /// What the adapter was trained for (task, label names, head size, …), written by the trainer.
    pub task: Option<serde_json::Value>,
}

/// The part of `adapter_config.json` only tensor-peft writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TensorPeftSection {
    method: MethodConfig,
    base_model: BaseModelIdentity,
    library_version: String,
    /// [`TENSOR_NAMES_VERSION`] of the tensor names (absent in files written before it existed).
    #[serde(default = "first_names_version")]
    names_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<serde_json::Value>,
}

fn first_names_version() -> u32 {
    1
}

fn config_error(path: &Path, field: &'static str, problem: impl Into<String>) -> ModelError {
    ModelError::Field { path: path.to_path_buf(), field, problem: problem.into() }
}

impl AdapterConfig {
    /// The JSON written to `adapter_config.json`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "peft_type": self.peft_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "target_modules": match (&self.target_modules, &self.target_regex) {
                (Some(names), _) => serde_json::json!(names),
                (None, Some(re)) => serde_json::json!(re),
                (None, None) => serde_json::Value::Null,
            },
            "inference_mode": true,
            "task_type": self.task.as_ref().and_then(|t| t.get("peft_task_type")).cloned().unwrap_or(serde_json::Value::Null),
        });
        if let Some(serde_json::Value::Object(peft)) = self.method.peft_config() {
            json.as_object_mut().expect("object").extend(peft);
        }
        if let Some(base_model) = &self.base_model {
            let section = TensorPeftSection {
                method: self.method.clone(),
                base_model: base_model.clone(),
                library_version: self.library_version.clone(),
                names_version: TENSOR_NAMES_VERSION,
                task: self.task.clone(),
            };
            json["tensor_peft"] = serde_json::to_value(section).expect("serialisable");
        }
        json
    }

    /// Parses `adapter_config.json` written by tensor-peft or by PEFT (for the methods that read
    /// PEFT's files: [`MethodConfig::from_peft_config`]).
    pub fn from_json(json: &serde_json::Value, path: &Path) -> Result<Self, ModelError> {
        let (target_modules, target_regex) = match json.get("target_modules") {
            None | Some(serde_json::Value::Null) => (None, None),
            Some(serde_json::Value::String(re)) => (None, Some(re.clone())),
            Some(serde_json::Value::Array(items)) => {
                let names = items.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<_>>>();
                (
                    Some(names.ok_or_else(|| {
                        config_error(path, "target_modules", "must be a list of strings or a regex string")
                    })?),
                    None,
                )
            }
            Some(v) => {
                return Err(config_error(path, "target_modules", format!("is {v}, expected a list or a regex string")));
            }
        };
        let base_model_name_or_path =
            json.get("base_model_name_or_path").and_then(|v| v.as_str()).unwrap_or("").to_string();
        let peft_type = json.get("peft_type").and_then(|v| v.as_str()).unwrap_or("").to_string();
        if let Some(section) = json.get("tensor_peft") {
            let section: TensorPeftSection = serde_json::from_value(section.clone())
                .map_err(|e| config_error(path, "tensor_peft", format!("is invalid: {e}")))?;
            if section.names_version > TENSOR_NAMES_VERSION {
                return Err(config_error(
                    path,
                    "tensor_peft.names_version",
                    format!(
                        "is {}; this version of tensor-peft reads tensor names up to version {TENSOR_NAMES_VERSION}",
                        section.names_version
                    ),
                ));
            }
            return Ok(AdapterConfig {
                method: section.method,
                target_modules,
                target_regex,
                base_model_name_or_path,
                base_model: Some(section.base_model),
                peft_type,
                library_version: section.library_version,
                task: section.task,
            });
        }
        // A PEFT adapter: its method reads PEFT's keys, refusing options it does not implement.
        let method = match MethodConfig::from_peft_config(&peft_type, json) {
            Some(method) => method.map_err(|e| match e {
                AdapterError::InvalidValue { field, value, reason } => {
                    config_error(path, field, format!("is {value}: {reason}"))
                }
                other => config_error(path, "peft_type", other.to_string()),
            })?,
            None => {
                return Err(config_error(
                    path,
                    "peft_type",
                    format!("is \"{peft_type}\"; only PEFT LoRA adapters (or tensor-peft's own) are supported"),
                ));
            }
        };
        Ok(AdapterConfig {
            method,
            target_modules,
            target_regex,
            base_model_name_or_path,
            base_model: None,
            peft_type,
            library_version: json
                .get("peft_version")
                .and_then(|v| v.as_str())
                .map(|v| format!("peft {v}"))
                .unwrap_or_default(),
            task: None,
        })
    }

    /// The target selection this config describes.
    pub fn targets(&self) -> Targets {
        match (&self.target_modules, &self.target_regex) {
            (Some(names), _) => Targets::Names(names.clone()),
            (None, Some(re)) => Targets::Regex(re.clone()),
            (None, None) => Targets::Default,
        }
    }
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Shape and values of `param` as the file stores it.
fn file_values<B: Backend>(param: &FileParam<'_, B>) -> (Vec<usize>, Vec<f32>) {
    match param {
        FileParam::Vector(p) => tensor_io::tensor_values(p.val()),
        FileParam::Matrix(p) => tensor_io::tensor_values(p.val()),
        FileParam::Core(p) => tensor_io::tensor_values(p.val()),
        FileParam::TransposedMatrix(p) => {
            let (shape, values) = tensor_io::tensor_values(p.val());
            (vec![shape[1], shape[0]], transpose(&values, shape[0], shape[1]))
        }
    }
}

/// Shape of `param` as the file stores it, without reading its values.
fn file_shape<B: Backend>(param: &FileParam<'_, B>) -> Vec<usize> {
    match param {
        FileParam::Vector(p) => p.dims().to_vec(),
        FileParam::Matrix(p) => p.dims().to_vec(),
        FileParam::Core(p) => p.dims().to_vec(),
        FileParam::TransposedMatrix(p) => p.dims().into_iter().rev().collect(),
    }
}

/// `param` with the values stored as `shape` (the file's layout), keeping its id and trainability.
fn set_param<B: Backend, const D: usize>(param: &mut Param<Tensor<B, D>>, shape: [usize; D], values: Vec<f32>) {
    *param = param
        .clone()
        .map(|t| Tensor::from_data(TensorData::new(values, shape), &t.device()).set_require_grad(t.is_require_grad()));
}

/// Moves the tensor `name` of `tensors` into `tensor.param`, checking its shape.
fn load_file_tensor<B: Backend>(
    name: &str,
    tensor: FileTensor<'_, B>,
    tensors: &mut TensorMap,
) -> Result<(), ModelError> {
    let expected = file_shape(&tensor.param);
    let (shape, values) = match tensors.remove(name) {
        Some((shape, _)) if shape != expected => {
            return Err(ModelError::AdapterFile {
                reason: format!("tensor `{name}` has shape {shape:?}, expected {expected:?}"),
            });
        }
        Some(stored) => stored,
        None => return Err(ModelError::AdapterFile { reason: format!("the adapter file has no tensor `{name}`") }),
    };
    match tensor.param {
        FileParam::Vector(p) => set_param(p, [shape[0]], values),
        FileParam::Matrix(p) => set_param(p, [shape[0], shape[1]], values),
        FileParam::Core(p) => set_param(p, [shape[0], shape[1], shape[2]], values),
        FileParam::TransposedMatrix(p) => set_param(p, [shape[1], shape[0]], transpose(&values, shape[0], shape[1])),
    }
    Ok(())
}

/// One adapted site of a model.
enum Slot<'a, B: Backend> {
    Linear(&'a mut tensor_peft_adapters::AdaptedLinear<B>),
    Residual(&'a mut tensor_peft_adapters::ResidualAdapter<B>),
}

/// Calls `f` with the name and slot of every adapted site of `model`.
fn each_site<B: Backend, M: AdapterSlots<B>>(
    model: &mut M,
    spec: &ArchSpec,
    mut f: impl FnMut(&str, Slot<'_, B>) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    for site in spec.linear_sites() {
        if let Some(slot) = model.linear_slot(&site)
            && slot.adapter.is_some()
        {
            f(&site.name, Slot::Linear(slot))?;
        }
    }
    for site in spec.residual_sites() {
        if let Some(Some(adapter)) = model.residual_slot(&site) {
            f(&site.name, Slot::Residual(adapter))?;
        }
    }
    Ok(())
}

/// Writes `<dir>/adapter_config.json` and `<dir>/adapter_model.safetensors` for the adapters
/// carried by `model`.
pub fn save_adapter<B: Backend, M: AdapterSlots<B>>(
    model: &mut M,
    spec: &ArchSpec,
    config: &AdapterConfig,
    dir: &Path,
) -> Result<(), ModelError> {
    save_adapter_with_extras(model, spec, config, dir, &[])
}

/// [`save_adapter`] plus `extras`: other trained tensors (a task head, unfrozen norms) stored as
/// `base_model.model.<name>` next to the adapter's.
pub fn save_adapter_with_extras<B: Backend, M: AdapterSlots<B>>(
    model: &mut M,
    spec: &ArchSpec,
    config: &AdapterConfig,
    dir: &Path,
    extras: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<(), ModelError> {
    let mut tensors = TensorMap::new();
    each_site(model, spec, |site, slot| {
        // PEFT's names: the site inside the task model's base-model attribute (`bert.…`).
        let prefix = format!("base_model.model.{}{site}", spec.base_prefix);
        match slot {
            Slot::Linear(slot) => {
                store(&mut tensors, &prefix, slot.adapter.as_mut().expect("checked by each_site").file_tensors())
            }
            Slot::Residual(adapter) => store(&mut tensors, &prefix, adapter.file_tensors()),
        }
        Ok(())
    })?;
    store(&mut tensors, "base_model.model.shared", model.shared_mut().file_tensors());
    write_adapter_files(tensors, config, dir, extras)
}

/// Writes `<dir>/adapter_config.json` and `<dir>/adapter_model.safetensors` for a detached set of
/// adapters ([`crate::adapter_set::take_adapters`], or a combination of several:
/// [`crate::adapter_set::combine_adapters`]) of a model of shape `spec`: the same files
/// [`save_adapter`] writes for a model carrying them.
pub fn save_adapter_set<B: Backend>(
    set: &mut AdapterSet<B>,
    spec: &ArchSpec,
    config: &AdapterConfig,
    dir: &Path,
) -> Result<(), ModelError> {
    let mut tensors = TensorMap::new();
    for (site, adapter) in &mut set.linear {
        store(&mut tensors, &format!("base_model.model.{}{}", spec.base_prefix, site.name), adapter.file_tensors());
    }
    for (site, adapter) in &mut set.residual {
        store(&mut tensors, &format!("base_model.model.{}{}", spec.base_prefix, site.name), adapter.file_tensors());
    }
    store(&mut tensors, "base_model.model.shared", set.shared.file_tensors());
    write_adapter_files(tensors, config, dir, &[])
}

/// Adds `layer`'s tensors to `tensors` under `<prefix>.<name>`, in the file's layout.
fn store<B: Backend>(tensors: &mut TensorMap, prefix: &str, layer: Vec<FileTensor<'_, B>>) {
    for tensor in layer {
        tensors.insert(format!("{prefix}.{}", tensor.name), file_values(&tensor.param));
    }
}

/// Writes the weights file (adapter `tensors` and `extras`) and then the config into `dir`.
fn write_adapter_files(
    mut tensors: TensorMap,
    config: &AdapterConfig,
    dir: &Path,
    extras: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<(), ModelError> {
    for (name, shape, values) in extras {
        tensors.insert(format!("base_model.model.{name}"), (shape.clone(), values.clone()));
    }
    if tensors.is_empty() {
        return Err(ModelError::AdapterFile { reason: "the model carries no adapter to save".into() });
    }
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    tensor_io::write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, &[("format", "pt")])?;
    let mut json = config.to_json();
    let heads: Vec<&str> = HEAD_MODULES
        .iter()
        .copied()
        .filter(|head| extras.iter().any(|(name, ..)| name.starts_with(&format!("{head}."))))
        .collect();
    if !heads.is_empty() {
        // PEFT loads these modules whole (and drops trained tensors of modules not listed).
        json["modules_to_save"] = serde_json::json!(heads);
    }
    let json = serde_json::to_vec_pretty(&json).map_err(|e| ModelError::AdapterFile { reason: e.to_string() })?;
    write_atomically(&dir.join(CONFIG_FILE), &json)
}

pub use crate::tensor_io::write_atomically;

/// Task heads written as PEFT's `modules_to_save`, under the names transformers' task models give
/// them (`BertForSequenceClassification.classifier`, `LlamaForSequenceClassification.score`).
pub const HEAD_MODULES: [&str; 2] = ["classifier", "score"];

/// Reads `<dir>/adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Json { path: path.clone(), reason: e.to_string() })?;
    AdapterConfig::from_json(&json, &path)
}

/// Injects the adapter stored in `dir` into `model` (whose architecture is `spec`), refusing a
/// base model of other shapes before touching any weight.
pub fn load_adapter<B: Backend, M: AdapterSlots<B>>(
    model: &mut M,
    spec: &ArchSpec,
    dir: &Path,
) -> Result<AdapterConfig, ModelError> {
    let (config, extras) = load_adapter_with_extras(model, spec, dir)?;
    if let Some(name) = extras.keys().next() {
        return Err(ModelError::AdapterFile {
            reason: format!(
                "{} holds {} tensors this model has no place for, e.g. `base_model.model.{name}`",
                dir.display(),
                extras.len()
            ),
        });
    }
    Ok(config)
}

pub use crate::tensor_io::TensorMap;

/// [`load_adapter`] that returns the tensors that are not adapter factors (a task head, norms:
/// see [`save_adapter_with_extras`]) by name, without the `base_model.model.` prefix.
pub fn load_adapter_with_extras<B: Backend, M: AdapterSlots<B>>(
    model: &mut M,
    spec: &ArchSpec,
    dir: &Path,
) -> Result<(AdapterConfig, TensorMap), ModelError> {
    let (config, set, extras) = read_adapter::<B>(spec, dir, &model.device())?;
    put_adapters(model, set)?;
    Ok((config, extras))
}

/// Reads the adapter stored in `dir` for a model of shape `spec` without a model: its config, its
/// adapters as a detached [`AdapterSet`] (on `device`; place them with
/// [`put_adapters`]), and the tensors that are not adapter
/// factors (as [`load_adapter_with_extras`] returns them). Refuses an adapter trained on a base
/// model of other shapes before reading any tensor.
pub fn read_adapter<B: Backend>(
    spec: &ArchSpec,
    dir: &Path,
    device: &B::Device,
) -> Result<(AdapterConfig, AdapterSet<B>, TensorMap), ModelError> {
    let config = read_adapter_config(dir)?;
    let actual = BaseModelIdentity::of(spec);
    if config.base_model.as_ref().is_some_and(|b| *b != actual) {
        return Err(ModelError::AdapterFile {
            reason: format!(
                "{} was trained on a base model with {:?}, but this model has {:?}",
                dir.display(),
                config.base_model,
                actual
            ),
        });
    }
    let mut tensors = tensor_io::read_safetensors(&dir.join(WEIGHTS_FILE))?;
    if !spec.base_prefix.is_empty() {
        // PEFT's names hold the sites inside the task model's base attribute; files written before
        // tensor-peft did the same do not.
        let inside = format!("base_model.model.{}", spec.base_prefix);
        tensors = tensors
            .into_iter()
            .map(|(name, v)| match name.strip_prefix(&inside) {
                Some(rest) => (format!("base_model.model.{rest}"), v),
                None => (name, v),
            })
            .collect();
    }
    let linear_sites = config.targets().resolve(spec, &config.method)?;
    let residual_sites = if config.method.is_residual() { spec.residual_sites() } else { Vec::new() };
    let mut set = config.method.build::<B>(&spec.geometry(), &linear_sites, &residual_sites, device)?;
    let mut load = |prefix: &str, layer: Vec<FileTensor<'_, B>>| {
        layer.into_iter().try_for_each(|t| load_file_tensor(&format!("{prefix}.{}", t.name), t, &mut tensors))
    };
    for (site, adapter) in &mut set.linear {
        load(&format!("base_model.model.{}", site.name), adapter.file_tensors())?;
    }
    for (site, adapter) in &mut set.residual {
        load(&format!("base_model.model.{}", site.name), adapter.file_tensors())?;
    }
    load("base_model.model.shared", set.shared.file_tensors())?;
    let extras = tensors
        .into_iter()
        .map(|(name, v)| (name.strip_prefix("base_model.model.").map(str::to_string).unwrap_or(name), v))
        .collect();
    Ok((config, set, extras))
}
