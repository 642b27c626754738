//! Several adapters on one base model from the command line: which adapters a pass of `tpeft eval`
//! or `tpeft generate` loads and applies ([`AdapterSelection`]: `--adapter name=dir` repeated,
//! `--active-adapter`, `--disable-adapters`), and `tpeft combine` ([`combine`]: a weighted
//! combination of adapter directories written as a new one). The library underneath is
//! [`tensor_peft_models::adapter_set`].

use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};
use tensor_peft_models::adapter_file::{AdapterConfig, TensorMap, read_adapter, save_adapter_set};
use tensor_peft_models::adapter_set::{Combination, MultiAdapterModel, WeightedAdapter, combine_adapters};
use tensor_peft_models::{AdapterSlots, ArchSpec, ModelError};

fn error(reason: impl Into<String>) -> ModelError {
    ModelError::AdapterSet { reason: reason.into() }
}

/// The adapters of one pass: every directory loaded (by name), the one applied, or none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterSelection {
    /// Every adapter directory, by name, in the order given.
    pub adapters: Vec<(String, PathBuf)>,
    /// The name of the adapter applied; `None`: the first.
    pub active: Option<String>,
    /// Apply none: a pass of the base model (the adapters are still loaded and checked, and the
    /// active one's task head, if it has one, is kept: the base model has none).
    pub disabled: bool,
}

impl AdapterSelection {
    /// One adapter directory, applied (what a bare `--adapter dir` gives; its name is PEFT's
    /// `default`).
    pub fn single(dir: &Path) -> Self {
        Self { adapters: vec![("default".into(), dir.to_path_buf())], active: None, disabled: false }
    }

    /// Whether no adapter is given.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// The active adapter's name and directory; refuses a selection without adapters, repeated
    /// names and an active name that is not among them.
    pub fn active(&self) -> Result<(&str, &Path), ModelError> {
        for (i, (name, _)) in self.adapters.iter().enumerate() {
            if self.adapters[..i].iter().any(|(other, _)| other == name) {
                return Err(error(format!("two adapters are called `{name}`: give each its own name (NAME=DIR)")));
            }
        }
        let names = || self.adapters.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
        match &self.active {
            None => {
                self.adapters.first().map(|(n, d)| (n.as_str(), d.as_path())).ok_or_else(|| error("no adapter given"))
            }
            Some(active) => self
                .adapters
                .iter()
                .find(|(name, _)| name == active)
                .map(|(n, d)| (n.as_str(), d.as_path()))
                .ok_or_else(|| error(format!("there is no adapter called `{active}`; the adapters are: {}", names()))),
        }
    }
}

/// `model` (of shape `spec`) with every adapter of `selection` loaded into a
/// [`MultiAdapterModel`] and the active one applied (none when disabled); also the active
/// adapter's configuration and its other trained tensors (task head, norms), which the caller
/// applies as it sees fit.
pub fn load_selection<B: Backend, M: AdapterSlots<B>>(
    model: M,
    spec: &ArchSpec,
    selection: &AdapterSelection,
) -> Result<(M, AdapterConfig, TensorMap), ModelError> {
    let (active, _) = selection.active()?;
    let mut multi = MultiAdapterModel::new(model, spec.clone())?;
    for (name, dir) in &selection.adapters {
        multi.load_adapter(dir, name)?;
    }
    multi.set_adapter(active)?;
    if selection.disabled {
        multi.disable_adapters()?;
    }
    let entry = multi.adapter(active).expect("loaded above");
    let (config, extras) = (entry.config.clone(), entry.extras.clone());
    Ok((multi.into_model(), config, extras))
}

/// What `tpeft combine` combines and where it writes the result.
#[derive(Debug, Clone, PartialEq)]
pub struct CombineOptions {
    /// The adapter directories, by name (the names are for messages).
    pub adapters: Vec<(String, PathBuf)>,
    /// One weight per adapter.
    pub weights: Vec<f64>,
    /// PEFT's combination type.
    pub combination: Combination,
    /// The adapter directory to write.
    pub output: PathBuf,
    /// Replace an existing adapter directory at `output`.
    pub overwrite: bool,
}

/// Combines the adapters of `options` for the base model `model` (a preset, HF directory,
/// `config.json` or `.gguf`: only its shapes are read, not its weights) as
/// [`combine_adapters`] does, and writes the combination to `options.output` as a LoRA adapter
/// directory. The directory is written under a temporary name and renamed into place, so `output`
/// never holds a half-written adapter. Returns a one-line summary.
///
/// Refuses, before writing anything: a weight count other than the adapter count, repeated
/// names, an existing `output` that is not empty without `overwrite`, adapters with other trained
/// tensors (a task head, norms: they have no weighted combination), and what
/// [`combine_adapters`] refuses.
pub fn combine<B: Backend>(model: &str, options: &CombineOptions, device: &B::Device) -> Result<String, ModelError> {
    let (adapters, weights) = (&options.adapters, &options.weights);
    if weights.len() != adapters.len() {
        return Err(error(format!(
            "{} weights for {} adapters: give one weight per adapter",
            weights.len(),
            adapters.len()
        )));
    }
    AdapterSelection { adapters: adapters.clone(), active: None, disabled: false }.active()?;
    let output = &options.output;
    if !options.overwrite && std::fs::read_dir(output).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(error(format!("{} is not empty; pass --overwrite to replace it", output.display())));
    }
    let spec = ArchSpec::from_model_arg(model)?;
    let mut read = Vec::new();
    for (name, dir) in adapters {
        let (config, set, extras) = read_adapter::<B>(&spec, dir, device)
            .map_err(|e| error(format!("adapter `{name}` ({}): {e}", dir.display())))?;
        if let Some(example) = extras.keys().next() {
            return Err(error(format!(
                "adapter `{name}` ({}) also holds trained tensors that are not adapter factors (e.g. `{example}`: a \
                 task head or trained norms), which have no weighted combination",
                dir.display()
            )));
        }
        read.push((config, set));
    }
    let parts: Vec<WeightedAdapter<'_, B>> = read
        .iter()
        .zip(adapters)
        .zip(weights)
        .map(|(((config, set), (name, _)), &weight)| WeightedAdapter { name, config, set, weight })
        .collect();
    let (config, mut combined) = combine_adapters(&spec, &parts, options.combination)?;
    let rank = match &config.method {
        tensor_peft_adapters::MethodConfig::Lora(lora) => lora.rank,
        _ => unreachable!("combinations are LoRA adapters"),
    };
    let sites = combined.linear.len();
    write_dir_atomically(output, |tmp| save_adapter_set(&mut combined, &spec, &config, tmp))?;
    let inputs: Vec<String> =
        parts.iter().map(|p| format!("{} ({}, weight {})", p.name, p.config.method.name(), p.weight)).collect();
    Ok(format!(
        "combined {} ({}) into a LoRA adapter of rank {rank} at {sites} modules: {}",
        inputs.join(", "),
        options.combination.name(),
        output.display()
    ))
}

/// Writes a directory through `write` into a temporary sibling of `dir`, then renames it into
/// place (replacing what `dir` held), so `dir` never holds a half-written result.
fn write_dir_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<(), ModelError>) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
    let sibling = |what: &str| dir.with_file_name(format!(".{name}.{what}-{}", std::process::id()));
    let (tmp, old) = (sibling("tmp"), sibling("old"));
    let _ = std::fs::remove_dir_all(&tmp);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let replaced = dir.exists();
    if replaced {
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    if replaced {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}
