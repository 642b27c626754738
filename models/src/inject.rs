//! Adapter injection, written once for every model: resolve the targets to sites, build the
//! method's adapters and shared factors, and put each adapter into the model's slot of that name.
//! Models only expose their slots ([`AdapterSlots`]); they know nothing about methods.

use crate::arch::ArchSpec;
use crate::error::ModelError;
use crate::layout::LayoutBlock;
use burn::module::ParamId;
use burn::tensor::backend::Backend;
use tensor_peft_adapters::{
    AdaptedLinear, AdapterError, AdapterLayer, LinearSite, MethodConfig, ResidualAdapter, ResidualSite, SharedFactors,
};

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

    /// The parameters `method` trains at these targets of `spec` (its residual methods at every
    /// block position they use), counted from the shapes alone: nothing is allocated.
    pub fn count(
        &self,
        spec: &ArchSpec,
        method: &MethodConfig,
    ) -> Result<tensor_peft_adapters::ParamReport, ModelError> {
        let linear = self.resolve(spec, method)?;
        let residual = if method.is_residual() { spec.residual_sites() } else { Vec::new() };
        Ok(method.count(&spec.geometry(), &linear, &residual)?)
    }
}

pub use tensor_peft_adapters::ResidualPosition;

/// The adapter slots a model exposes to [`inject`]: its blocks, each reached through its family's
/// layout table ([`LayoutBlock`]), and the home of shared factors. Implemented with
/// `adapter_slots!`.
pub trait AdapterSlots<B: Backend> {
    /// The model's block type.
    type Block: LayoutBlock<B>;
    /// The blocks, in layer order.
    fn blocks_mut(&mut self) -> &mut [Self::Block];
    /// The model-level home of shared factors.
    fn shared_mut(&mut self) -> &mut SharedFactors<B>;
    /// The device the model's weights live on.
    fn device(&self) -> B::Device;

    /// The projection at `site`.
    fn linear_slot(&mut self, site: &LinearSite) -> Option<&mut AdaptedLinear<B>> {
        self.blocks_mut().get_mut(site.layer)?.projections_mut().into_iter().nth(site.projection)
    }

    /// The residual adapter slot at `site`.
    fn residual_slot(&mut self, site: &ResidualSite) -> Option<&mut Option<ResidualAdapter<B>>> {
        self.blocks_mut().get_mut(site.layer)?.residual_mut(site.position)
    }
}

/// Implements [`AdapterSlots`] for `$model` whose blocks are its `layers`, whose shared factors
/// are its `shared`, and whose device is that of the parameter `$device`.
macro_rules! adapter_slots {
    ($model:ident, $block:ident, device: $($device:ident).+) => {
        impl<B: Backend> $crate::inject::AdapterSlots<B> for $model<B> {
            type Block = $block<B>;
            fn blocks_mut(&mut self) -> &mut [$block<B>] {
                &mut self.layers
            }
            fn shared_mut(&mut self) -> &mut SharedFactors<B> {
                &mut self.shared
            }
            fn device(&self) -> B::Device {
                self.$($device).+.device()
            }
        }
    };
}
pub(crate) use adapter_slots;

/// `‖ΔW‖_F / ‖W‖_F` of every adapted (unmerged) projection of `model`, by site name, in site
/// order: how far each update has grown relative to the frozen weight ([`AdaptedLinear::update_ratio`]).
pub fn update_ratios<B: Backend, M: AdapterSlots<B>>(model: &mut M, spec: &ArchSpec) -> Vec<(String, f64)> {
    let shared = model.shared_mut().clone();
    spec.linear_sites()
        .into_iter()
        .filter_map(|site| {
            let ratio = model.linear_slot(&site)?.update_ratio(&shared)?;
            Some((site.name, ratio))
        })
        .collect()
}

/// The adapter factors of `model` that start at zero (LoRA's `B`, TT-LoRA's last core), which
/// LoRA+ trains at a higher learning rate: each method names its own
/// ([`AdapterLayer::zero_init_factors`]).
pub fn zero_init_factors<B: Backend, M: AdapterSlots<B>>(model: &mut M, spec: &ArchSpec) -> Vec<ParamId> {
    let mut ids = model.shared_mut().zero_init_factors();
    for site in spec.linear_sites() {
        if let Some(adapter) = model.linear_slot(&site).and_then(|slot| slot.adapter.as_ref()) {
            ids.extend(adapter.zero_init_factors());
        }
    }
    for site in spec.residual_sites() {
        if let Some(Some(adapter)) = model.residual_slot(&site) {
            ids.extend(adapter.zero_init_factors());
        }
    }
    ids
}

/// Injects `method` at `targets` into `model` (described by `spec`): builds its adapters and puts
/// them in place ([`put_adapters`](crate::adapter_set::put_adapters)). Refuses a model that already
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
    crate::adapter_set::put_adapters(model, set)
}
