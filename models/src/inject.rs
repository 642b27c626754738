//! Adapter injection, written once for every model: resolve the targets to sites, build the
//! method's adapters and shared factors, and put each adapter into the model's slot of that name.
//! Models only expose their slots ([`AdapterSlots`]); they know nothing about methods.

use crate::arch::ArchSpec;
use crate::error::ModelError;
use burn::tensor::backend::Backend;
use tensor_peft_adapters::{AdaptedLinear, AdapterError, LinearSite, MethodConfig, ResidualAdapter, SharedFactors};

/// Which projections get a linear adapter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Targets {
    /// The method's default attention projections (q, v; q, k, v, o for LoRTA).
    #[default]
    Default,
    /// PEFT's list semantics: each entry is an exact module name or a `.`-suffix of one.
    Names(Vec<String>),
    /// PEFT's string semantics: a regular expression that must match the whole module name.
    Regex(String),
}

impl Targets {
    /// The sites these targets select on `spec` for `method` (none for residual methods, which go
    /// after every block instead).
    pub fn resolve(&self, spec: &ArchSpec, method: &MethodConfig) -> Result<Vec<LinearSite>, ModelError> {
        if method.is_residual() {
            return match self {
                Targets::Default => Ok(Vec::new()),
                _ => Err(AdapterError::Unsupported {
                    method: method.name(),
                    target: "explicit targets".into(),
                    reason: "it is inserted after every block's attention and feed-forward output".into(),
                }
                .into()),
            };
        }
        match self {
            Targets::Default => Ok(spec.select_roles(method.default_roles())),
            Targets::Names(names) => spec.select(names),
            Targets::Regex(pattern) => spec.select_regex(pattern),
        }
    }
}

/// Where a residual adapter sits in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResidualPosition {
    /// After the attention output projection.
    Attention,
    /// After the feed-forward output projection.
    FeedForward,
}

/// The adapter slots a model exposes to [`inject`].
pub trait AdapterSlots<B: Backend> {
    /// The projection `local` (e.g. `self_attn.q_proj`) of block `layer`.
    fn linear_slot(&mut self, layer: usize, local: &str) -> Option<&mut AdaptedLinear<B>>;
    /// The residual adapter slot at `position` of block `layer`.
    fn residual_slot(&mut self, layer: usize, position: ResidualPosition) -> Option<&mut Option<ResidualAdapter<B>>>;
    /// The model-level home of shared factors.
    fn shared_mut(&mut self) -> &mut SharedFactors<B>;
    /// The device the model's weights live on.
    fn device(&self) -> B::Device;
}

/// `(layer, local name)` of a site named `<prefix>.<layer>.<local>`.
fn split_site_name(name: &str) -> Option<(usize, &str)> {
    let mut parts = name.splitn(4, '.');
    let (_, _, layer, local) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some((layer.parse().ok()?, local))
}

/// `‖ΔW‖_F / ‖W‖_F` of every adapted (unmerged) projection of `model`, by site name, in site
/// order: how far each update has grown relative to the frozen weight ([`AdaptedLinear::update_ratio`]).
pub fn update_ratios<B: Backend, M: AdapterSlots<B>>(model: &mut M, spec: &ArchSpec) -> Vec<(String, f64)> {
    let shared = model.shared_mut().clone();
    spec.linear_sites()
        .into_iter()
        .filter_map(|site| {
            let (layer, local) = split_site_name(&site.name)?;
            let ratio = model.linear_slot(layer, local)?.update_ratio(&shared)?;
            Some((site.name, ratio))
        })
        .collect()
}

/// Injects `method` at `targets` into `model` (described by `spec`). Refuses a model that already
/// carries an adapter at any chosen site.
pub fn inject<B: Backend, M: AdapterSlots<B>>(
    model: &mut M,
    spec: &ArchSpec,
    method: &MethodConfig,
    targets: &Targets,
) -> Result<(), ModelError> {
    let linear_sites = targets.resolve(spec, method)?;
    let residual_sites = if method.is_residual() { spec.residual_sites() } else { Vec::new() };
    let set = method.build::<B>(&spec.geometry(), &linear_sites, &residual_sites, &model.device())?;
    let missing = |name: &str| AdapterError::State(format!("the model has no slot for {name}"));
    let occupied = |name: &str| AdapterError::State(format!("{name} already carries an adapter"));
    for (site, adapter) in set.linear {
        let (layer, local) = split_site_name(&site.name).ok_or_else(|| missing(&site.name))?;
        let slot = model.linear_slot(layer, local).ok_or_else(|| missing(&site.name))?;
        if slot.adapter.is_some() {
            return Err(occupied(&site.name).into());
        }
        *slot = AdaptedLinear::new(slot.base.clone(), Some(adapter))?;
    }
    for (site, adapter) in set.residual {
        let (layer, local) = split_site_name(&site.name).ok_or_else(|| missing(&site.name))?;
        let position =
            if local == "attention_adapter" { ResidualPosition::Attention } else { ResidualPosition::FeedForward };
        let slot = model.residual_slot(layer, position).ok_or_else(|| missing(&site.name))?;
        if slot.is_some() {
            return Err(occupied(&site.name).into());
        }
        *slot = Some(adapter);
    }
    *model.shared_mut() = set.shared;
    Ok(())
}
