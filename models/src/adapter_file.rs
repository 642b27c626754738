//! Adapter files, PEFT style: `<dir>/adapter_config.json` (method, hyper-parameters, targets, base
//! model identity) and `<dir>/adapter_model.safetensors` (only the adapter tensors; shared factors
//! stored once). LoRA tensors use HF PEFT's layout (`base_model.model.<module>.lora_A.weight`
//! `[r, in]`, `lora_B.weight` `[out, r]`) so PEFT can read them; other methods store their factors
//! under `base_model.model.<module>.<parameter path>`.
//!
//! Loading rebuilds the adapters from the config and then replaces every parameter by name, after
//! checking that the base model matches; files are written to temporary names and renamed.

use crate::arch::ArchSpec;
use crate::error::ModelError;
use crate::inject::{AdapterSlots, Targets, inject};
use crate::tensor_io::{self, Params};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tensor_peft_adapters::{LinearAdapter, MethodConfig};

/// Name of the config file in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Name of the weights file in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The base model an adapter was trained on (checked when loading).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModelIdentity {
    /// `llama` or `bert`.
    pub family: String,
    /// Model width.
    pub hidden: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    /// Blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
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
    /// `LORA` for LoRA (PEFT's `peft_type`), else the method name.
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<serde_json::Value>,
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
        if let MethodConfig::Lora(c) = &self.method {
            let peft = serde_json::json!({
                "r": c.rank, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_rslora": c.use_rslora,
                "bias": "none", "fan_in_fan_out": false, "init_lora_weights": true, "use_dora": false,
                "modules_to_save": null, "layers_to_transform": null, "rank_pattern": {}, "alpha_pattern": {},
            });
            json.as_object_mut().expect("object").extend(peft.as_object().expect("object").clone());
        }
        if let Some(base_model) = &self.base_model {
            let section = TensorPeftSection {
                method: self.method.clone(),
                base_model: base_model.clone(),
                library_version: self.library_version.clone(),
                task: self.task.clone(),
            };
            json["tensor_peft"] = serde_json::to_value(section).expect("serialisable");
        }
        json
    }

    /// Parses `adapter_config.json` written by tensor-peft or by PEFT (LoRA).
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
        // A PEFT LoRA adapter: refuse the options whose semantics this loader does not implement.
        if peft_type != "LORA" {
            return Err(config_error(
                path,
                "peft_type",
                format!("is \"{peft_type}\"; only PEFT LoRA adapters (or tensor-peft's own) are supported"),
            ));
        }
        let unsupported = |field: &'static str, ok: &dyn Fn(&serde_json::Value) -> bool| -> Result<(), ModelError> {
            match json.get(field) {
                Some(v) if !ok(v) => Err(config_error(path, field, format!("is {v}; this option is not supported"))),
                _ => Ok(()),
            }
        };
        let empty = |v: &serde_json::Value| {
            v.is_null() || v.as_object().is_some_and(|o| o.is_empty()) || v.as_array().is_some_and(|a| a.is_empty())
        };
        unsupported("use_dora", &|v| v == &serde_json::Value::Bool(false))?;
        unsupported("bias", &|v| v == "none")?;
        unsupported("fan_in_fan_out", &|v| v == &serde_json::Value::Bool(false))?;
        for field in ["rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save", "layer_replication"] {
            unsupported(field, &empty)?;
        }
        let number = |field: &'static str| {
            json.get(field)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| config_error(path, field, "is missing or not a number"))
        };
        let rank = number("r")?;
        if rank < 1.0 || rank.fract() != 0.0 {
            return Err(config_error(path, "r", format!("is {rank}, expected a positive integer")));
        }
        let lora = tensor_peft_adapters::LoraConfig::new()
            .with_rank(rank as usize)
            .with_alpha(number("lora_alpha")?)
            .with_dropout(json.get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0))
            .with_use_rslora(json.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false));
        Ok(AdapterConfig {
            method: MethodConfig::Lora(lora),
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

/// `(path, values, shape)` of every float parameter, with paths made of field names.
fn collect<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<f32>, Vec<usize>)> {
    tensor_io::module_params(module, Params::All).into_iter().map(|p| (p.path, p.values, p.shape)).collect()
}

/// `module` with every parameter replaced by the tensor stored under `prefix.<path>`.
fn replace<B: Backend, M: Module<B>>(module: M, prefix: String, tensors: &mut TensorMap) -> Result<M, ModelError> {
    tensor_io::load_params(module, tensors, &prefix, Params::All).map_err(|e| ModelError::AdapterFile {
        reason: match e {
            tensor_io::LoadError::Missing(name) => format!("the adapter file has no tensor `{name}`"),
            other => other.to_string(),
        },
    })
}

/// PEFT's names for a LoRA site.
fn lora_names(site: &str) -> (String, String) {
    (format!("base_model.model.{site}.lora_A.weight"), format!("base_model.model.{site}.lora_B.weight"))
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
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for (name, shape, values) in extras {
        tensors.insert(format!("base_model.model.{name}"), (shape.clone(), values.clone()));
    }
    each_site(model, spec, |site, slot| {
        match slot {
            Slot::Linear(slot) => match slot.adapter.as_ref().expect("checked by each_site") {
                LinearAdapter::Lora(lora) => {
                    let (a_name, b_name) = lora_names(site);
                    let [d_in, r] = lora.a.dims();
                    let [_, d_out] = lora.b.dims();
                    let a = lora.a.val().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
                    let b = lora.b.val().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
                    tensors.insert(a_name, (vec![r, d_in], transpose(&a, d_in, r)));
                    tensors.insert(b_name, (vec![d_out, r], transpose(&b, r, d_out)));
                }
                adapter => {
                    for (path, values, shape) in collect(adapter) {
                        tensors.insert(format!("base_model.model.{site}.{path}"), (shape, values));
                    }
                }
            },
            Slot::Residual(adapter) => {
                for (path, values, shape) in collect(&*adapter) {
                    tensors.insert(format!("base_model.model.{site}.{path}"), (shape, values));
                }
            }
        }
        Ok(())
    })?;
    for (path, values, shape) in collect(model.shared_mut()) {
        tensors.insert(format!("base_model.model.shared.{path}"), (shape, values));
    }
    if tensors.is_empty() {
        return Err(ModelError::AdapterFile { reason: "the model carries no adapter to save".into() });
    }
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    tensor_io::write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, &[("format", "pt")])?;
    let json =
        serde_json::to_vec_pretty(&config.to_json()).map_err(|e| ModelError::AdapterFile { reason: e.to_string() })?;
    write_atomically(&dir.join(CONFIG_FILE), &json)
}

pub use crate::tensor_io::write_atomically;

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
    inject(model, spec, &config.method, &config.targets())?;
    each_site(model, spec, |site, slot| {
        let prefix = format!("base_model.model.{site}");
        match slot {
            Slot::Linear(slot) => {
                let adapter = match slot.adapter.take().expect("checked by each_site") {
                    LinearAdapter::Lora(mut lora) => {
                        let (a_name, b_name) = lora_names(site);
                        let [d_in, r] = lora.a.dims();
                        let [_, d_out] = lora.b.dims();
                        let device = lora.a.device();
                        let mut take = |name: &str, shape: [usize; 2]| match tensors.remove(name) {
                            Some((s, v)) if s == shape => Ok(v),
                            Some((s, _)) => Err(ModelError::AdapterFile {
                                reason: format!("tensor `{name}` has shape {s:?}, expected {shape:?}"),
                            }),
                            None => Err(ModelError::AdapterFile {
                                reason: format!("the adapter file has no tensor `{name}`"),
                            }),
                        };
                        let a = transpose(&take(&a_name, [r, d_in])?, r, d_in);
                        let b = transpose(&take(&b_name, [d_out, r])?, d_out, r);
                        let load = |values: Vec<f32>, shape: [usize; 2]| {
                            let device = device.clone();
                            move |t: Tensor<B, 2>| {
                                Tensor::from_data(TensorData::new(values, shape), &device)
                                    .set_require_grad(t.is_require_grad())
                            }
                        };
                        lora.a = lora.a.map(load(a, [d_in, r]));
                        lora.b = lora.b.map(load(b, [r, d_out]));
                        LinearAdapter::Lora(lora)
                    }
                    adapter => replace(adapter, prefix, &mut tensors)?,
                };
                slot.adapter = Some(adapter);
            }
            Slot::Residual(adapter) => *adapter = replace(adapter.clone(), prefix, &mut tensors)?,
        }
        Ok(())
    })?;
    let shared = std::mem::take(model.shared_mut());
    *model.shared_mut() = replace(shared, "base_model.model.shared".into(), &mut tensors)?;
    let extras = tensors
        .into_iter()
        .map(|(name, v)| (name.strip_prefix("base_model.model.").map(str::to_string).unwrap_or(name), v))
        .collect();
    Ok((config, extras))
}
