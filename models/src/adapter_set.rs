//! Several adapters on one base model, as HF PEFT holds them (`PeftModel.load_adapter(path,
//! adapter_name=)`, `set_adapter`, the `disable_adapter()` context manager,
//! `add_weighted_adapter`), written once for every model on top of its [`AdapterSlots`]:
//!
//! - [`take_adapters`] detaches every adapter of a model (linear, residual and the shared factors)
//!   as an [`AdapterSet`], leaving the plain base model; [`put_adapters`] puts a set in place.
//!   Switching adapters moves sets in and out of the slots: the base weights are never copied.
//! - [`MultiAdapterModel`] holds a model and named adapters, the active one in the model and the
//!   others detached; it switches between them, disables them for a base-model pass and adds
//!   weighted combinations.
//! - [`combine_adapters`] writes a weighted combination of linear adapters as one LoRA adapter
//!   (PEFT's `cat` and `linear` combination types).

use crate::adapter_file::{AdapterConfig, BaseModelIdentity, TensorMap, read_adapter};
use crate::arch::ArchSpec;
use crate::error::ModelError;
use crate::inject::AdapterSlots;
use crate::layout::LayoutBlock;
use burn::module::{Module, Param};
use burn::nn::DropoutConfig;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use std::path::Path;
use tensor_peft_adapters::{
    AdaptedLinear, AdapterError, AdapterSet, LinearAdapter, LinearDelta, LinearSite, Lora, LoraConfig, MethodConfig,
    ResidualPosition, SharedFactors,
};

fn error(reason: impl Into<String>) -> ModelError {
    ModelError::AdapterSet { reason: reason.into() }
}

/// Detaches every adapter `model` (of shape `spec`) carries: its linear and residual adapters and
/// its shared factors, as an [`AdapterSet`] in site order. The model is left as the plain base
/// model. Refuses (touching nothing) a model whose adapter is merged into its base weights: the
/// weights would keep the update. Unmerge first.
pub fn take_adapters<B: Backend, M: AdapterSlots<B>>(
    model: &mut M,
    spec: &ArchSpec,
) -> Result<AdapterSet<B>, ModelError> {
    let sites = spec.linear_sites();
    let merged = |slot: &AdaptedLinear<B>| slot.merged && slot.adapter.is_some();
    if let Some(site) = sites.iter().find(|s| model.linear_slot(s).is_some_and(|slot| merged(slot))) {
        return Err(error(format!(
            "the adapter at {} is merged into the base weights: unmerge it before detaching or switching adapters",
            site.name
        )));
    }
    let mut linear = Vec::new();
    for site in sites {
        if let Some(adapter) = model.linear_slot(&site).and_then(|slot| slot.adapter.take()) {
            linear.push((site, adapter));
        }
    }
    let mut residual = Vec::new();
    for site in spec.residual_sites() {
        if let Some(adapter) = model.residual_slot(&site).and_then(|slot| slot.take()) {
            residual.push((site, adapter));
        }
    }
    let shared = std::mem::take(model.shared_mut());
    Ok(AdapterSet { shared, linear, residual })
}

/// Whether `model` (of shape `spec`) carries any adapter or shared factor.
pub fn carries_adapters<B: Backend, M: AdapterSlots<B>>(model: &mut M, spec: &ArchSpec) -> bool {
    spec.linear_sites().iter().any(|s| model.linear_slot(s).is_some_and(|slot| slot.adapter.is_some()))
        || spec.residual_sites().iter().any(|s| model.residual_slot(s).is_some_and(|slot| slot.is_some()))
        || model.shared_mut().num_params() > 0
}

/// Checks that `set` can be put into `model`: every site exists, is free and has the adapter's
/// shape, and the model holds no shared factors when the set brings its own.
fn check_put<B: Backend, M: AdapterSlots<B>>(model: &mut M, set: &AdapterSet<B>) -> Result<(), ModelError> {
    let missing = |name: &str| AdapterError::State(format!("the model has no slot for {name}"));
    let occupied = |name: &str| AdapterError::State(format!("{name} already carries an adapter"));
    for (site, adapter) in &set.linear {
        let slot = model.linear_slot(site).ok_or_else(|| missing(&site.name))?;
        if slot.adapter.is_some() {
            return Err(occupied(&site.name).into());
        }
        let ((d_in, d_out), (a_in, a_out)) = (slot.base.dims(), adapter.dims());
        if (d_in, d_out) != (a_in, a_out) {
            return Err(AdapterError::State(format!(
                "the adapter for {} is {a_in}x{a_out} but the layer is {d_in}x{d_out}",
                site.name
            ))
            .into());
        }
    }
    for (site, _) in &set.residual {
        if model.residual_slot(site).ok_or_else(|| missing(&site.name))?.is_some() {
            return Err(occupied(&site.name).into());
        }
    }
    if set.shared.num_params() > 0 && model.shared_mut().num_params() > 0 {
        return Err(
            AdapterError::State("the model already holds shared factors (LoTR, LoRTA) of an adapter".into()).into()
        );
    }
    Ok(())
}

/// Puts the adapters of `set` into their slots of `model`, and its shared factors (if it has any)
/// into the model's. Refuses, touching nothing, a site the model lacks, one that already carries an
/// adapter or has another shape, and shared factors when the model already holds some.
pub fn put_adapters<B: Backend, M: AdapterSlots<B>>(model: &mut M, set: AdapterSet<B>) -> Result<(), ModelError> {
    check_put(model, &set)?;
    for (site, adapter) in set.linear {
        let slot = model.linear_slot(&site).expect("checked by check_put");
        *slot = AdaptedLinear::new(slot.base.clone(), Some(adapter))?;
    }
    for (site, adapter) in set.residual {
        *model.residual_slot(&site).expect("checked by check_put") = Some(adapter);
    }
    if set.shared.num_params() > 0 {
        *model.shared_mut() = set.shared;
    }
    Ok(())
}

/// Checks that the linear sites of `set` (the adapter called `name`) exist in a model of shape
/// `spec` with the adapters' shapes.
fn check_sites<B: Backend>(spec: &ArchSpec, name: &str, set: &AdapterSet<B>) -> Result<(), ModelError> {
    let sites = spec.linear_sites();
    for (site, adapter) in &set.linear {
        let Some(expected) = sites.iter().find(|s| s.name == site.name) else {
            return Err(error(format!("adapter `{name}` adapts {}, which this model does not have", site.name)));
        };
        let (d_in, d_out) = adapter.dims();
        if (d_in, d_out) != (expected.d_in, expected.d_out) {
            return Err(error(format!(
                "adapter `{name}` adapts {} as a {d_in}x{d_out} matrix, but in this model it is {}x{}",
                site.name, expected.d_in, expected.d_out
            )));
        }
    }
    let residual = spec.residual_sites();
    if let Some((site, _)) = set.residual.iter().find(|(site, _)| !residual.contains(site)) {
        return Err(error(format!("adapter `{name}` sits at {}, which this model does not have", site.name)));
    }
    Ok(())
}

/// One adapter held by a [`MultiAdapterModel`].
#[derive(Debug)]
pub struct NamedAdapter<B: Backend> {
    /// The name it was added under.
    pub name: String,
    /// Its configuration: method, targets, base model, task.
    pub config: AdapterConfig,
    /// The trained tensors of its file that are not adapter factors (a task head, unfrozen norms),
    /// as [`load_adapter_with_extras`](crate::adapter_file::load_adapter_with_extras) returns
    /// them. The holder switches only adapter factors and never applies these.
    pub extras: TensorMap,
    /// The adapters while detached; `None` while they sit in the model.
    set: Option<AdapterSet<B>>,
}

/// A model with several named adapters, PEFT's `PeftModel` with several adapters loaded: one is
/// active and sits in the model's slots, the others wait detached. Switching
/// ([`set_adapter`](Self::set_adapter)) moves adapter factors in and out of the slots; the frozen
/// base is shared by all of them and never copied.
///
/// The first adapter added becomes the active one, as with `PeftModel.from_pretrained`; later ones
/// do not until [`set_adapter`](Self::set_adapter). With adapters disabled
/// ([`disable_adapters`](Self::disable_adapters), or for one pass
/// [`with_adapters_disabled`](Self::with_adapters_disabled)) the model computes exactly the base
/// model.
#[derive(Debug)]
pub struct MultiAdapterModel<B: Backend, M: AdapterSlots<B>> {
    model: M,
    spec: ArchSpec,
    adapters: Vec<NamedAdapter<B>>,
    active: Option<usize>,
    enabled: bool,
}

impl<B: Backend, M: AdapterSlots<B>> MultiAdapterModel<B, M> {
    /// Holds `model` (of shape `spec`), which must not carry adapters yet (detach them with
    /// [`take_adapters`] and add them by name).
    pub fn new(mut model: M, spec: ArchSpec) -> Result<Self, ModelError> {
        if carries_adapters(&mut model, &spec) {
            return Err(error(
                "the model already carries adapters: detach them with take_adapters and add them by name",
            ));
        }
        Ok(Self { model, spec, adapters: Vec::new(), active: None, enabled: true })
    }

    /// Reads the adapter stored in `dir` and adds it as `name` (PEFT's `load_adapter(path,
    /// adapter_name=)`); it becomes the active adapter if it is the first. Refuses a name already
    /// taken and an adapter trained on a base model of other shapes.
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<&NamedAdapter<B>, ModelError> {
        self.check_new_name(name)?;
        let (config, set, extras) = read_adapter::<B>(&self.spec, dir, &self.model.device())
            .map_err(|e| error(format!("adapter `{name}` ({}): {e}", dir.display())))?;
        self.insert(name, config, set, extras)
    }

    /// Adds adapters built or detached in memory as `name` (PEFT's `add_adapter`); the first
    /// becomes active. Refuses a name already taken and sites this model lacks or has in other
    /// shapes.
    pub fn add_adapter(&mut self, name: &str, config: AdapterConfig, set: AdapterSet<B>) -> Result<(), ModelError> {
        self.check_new_name(name)?;
        check_sites(&self.spec, name, &set)?;
        self.insert(name, config, set, TensorMap::new())?;
        Ok(())
    }

    /// Makes `name` the active adapter and enables adapters (PEFT's `set_adapter`). Refuses an
    /// unknown name (listing the known ones) and, while the active adapter is merged into the base
    /// weights, any switch.
    pub fn set_adapter(&mut self, name: &str) -> Result<(), ModelError> {
        let index = self.index(name)?;
        if self.active == Some(index) && self.enabled {
            return Ok(());
        }
        self.detach()?;
        self.active = Some(index);
        self.enabled = true;
        self.attach()
    }

    /// Detaches the active adapter: the model computes the base model until
    /// [`enable_adapters`](Self::enable_adapters) or [`set_adapter`](Self::set_adapter).
    pub fn disable_adapters(&mut self) -> Result<(), ModelError> {
        self.detach()?;
        self.enabled = false;
        Ok(())
    }

    /// Puts the active adapter back after [`disable_adapters`](Self::disable_adapters).
    pub fn enable_adapters(&mut self) -> Result<(), ModelError> {
        self.enabled = true;
        self.attach()
    }

    /// Runs `pass` on the base model, with adapters disabled, and enables them again if they were
    /// (PEFT's `with model.disable_adapter():`): the reference model of DPO, or a before/after
    /// comparison.
    pub fn with_adapters_disabled<R>(&mut self, pass: impl FnOnce(&M) -> R) -> Result<R, ModelError> {
        let was_enabled = self.enabled;
        self.disable_adapters()?;
        let out = pass(&self.model);
        if was_enabled {
            self.enable_adapters()?;
        }
        Ok(out)
    }

    /// The active adapter's name (also while adapters are disabled); `None` before any is added
    /// or after the active one is deleted.
    pub fn active_adapter(&self) -> Option<&str> {
        self.active.map(|i| self.adapters[i].name.as_str())
    }

    /// Whether the active adapter is applied (false after
    /// [`disable_adapters`](Self::disable_adapters)).
    pub fn adapters_enabled(&self) -> bool {
        self.enabled
    }

    /// The adapters' names, in the order they were added.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|a| a.name.as_str()).collect()
    }

    /// The adapter called `name`.
    pub fn adapter(&self, name: &str) -> Option<&NamedAdapter<B>> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// Removes the adapter called `name` (PEFT's `delete_adapter`); if it was active, the model is
    /// left without an active adapter.
    pub fn delete_adapter(&mut self, name: &str) -> Result<(), ModelError> {
        let index = self.index(name)?;
        if self.active == Some(index) {
            self.detach()?;
            self.active = None;
        }
        self.adapters.remove(index);
        self.active = self.active.map(|a| if a > index { a - 1 } else { a });
        Ok(())
    }

    /// Adds `name`, a weighted combination of the named adapters (PEFT's
    /// `add_weighted_adapter(adapters, weights, adapter_name, combination_type)`), computed by
    /// [`combine_adapters`]. It does not become active. Refuses unknown names, adapters with other
    /// trained tensors (a task head, norms), and what [`combine_adapters`] refuses.
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[(&str, f64)],
        name: &str,
        combination: Combination,
    ) -> Result<(), ModelError> {
        self.check_new_name(name)?;
        let indices = adapters.iter().map(|(n, _)| self.index(n)).collect::<Result<Vec<_>, _>>()?;
        if let Some(a) = indices.iter().map(|&i| &self.adapters[i]).find(|a| !a.extras.is_empty()) {
            return Err(extras_refused(&a.name, &a.extras));
        }
        self.detach()?;
        let parts: Vec<WeightedAdapter<'_, B>> = indices
            .iter()
            .zip(adapters)
            .map(|(&i, &(_, weight))| {
                let a = &self.adapters[i];
                WeightedAdapter { name: &a.name, config: &a.config, set: a.set.as_ref().expect("detached"), weight }
            })
            .collect();
        let combined = combine_adapters(&self.spec, &parts, combination);
        self.attach()?;
        let (config, set) = combined?;
        self.insert(name, config, set, TensorMap::new())?;
        Ok(())
    }

    /// The model, with the active adapter in place when adapters are enabled.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The model, mutably (to merge the active adapter for fast inference, say). Switching refuses
    /// a merged adapter until it is unmerged; adapters placed or removed through this reference
    /// are not known to the holder.
    pub fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }

    /// The shape of the model.
    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// The model, with the active adapter in place when adapters are enabled; the other adapters
    /// are dropped.
    pub fn into_model(self) -> M {
        self.model
    }

    fn check_new_name(&self, name: &str) -> Result<(), ModelError> {
        if name.is_empty() {
            return Err(error("an adapter name must not be empty"));
        }
        if self.adapter(name).is_some() {
            return Err(error(format!("there is already an adapter called `{name}`")));
        }
        Ok(())
    }

    fn index(&self, name: &str) -> Result<usize, ModelError> {
        self.adapters.iter().position(|a| a.name == name).ok_or_else(|| {
            error(format!("there is no adapter called `{name}`; the adapters are: {}", self.adapter_names().join(", ")))
        })
    }

    fn insert(
        &mut self,
        name: &str,
        config: AdapterConfig,
        set: AdapterSet<B>,
        extras: TensorMap,
    ) -> Result<&NamedAdapter<B>, ModelError> {
        self.adapters.push(NamedAdapter { name: name.to_string(), config, extras, set: Some(set) });
        if self.active.is_none() {
            self.active = Some(self.adapters.len() - 1);
            self.attach()?;
        }
        Ok(self.adapters.last().expect("just added"))
    }

    /// Puts the active adapter into the model if adapters are enabled and it is not there yet.
    fn attach(&mut self) -> Result<(), ModelError> {
        let Some(entry) = self.active.filter(|_| self.enabled).map(|i| &mut self.adapters[i]) else {
            return Ok(());
        };
        let Some(set) = &entry.set else {
            return Ok(());
        };
        check_put(&mut self.model, set)?;
        put_adapters(&mut self.model, entry.set.take().expect("checked above"))
    }

    /// Moves the active adapter out of the model into its entry, if it is in the model.
    fn detach(&mut self) -> Result<(), ModelError> {
        if let Some(i) = self.active
            && self.adapters[i].set.is_none()
        {
            self.adapters[i].set = Some(take_adapters(&mut self.model, &self.spec)?);
        }
        Ok(())
    }
}

/// The refusal of an adapter that also holds trained tensors other than adapter factors.
fn extras_refused(name: &str, extras: &TensorMap) -> ModelError {
    let example = extras.keys().next().map(String::as_str).unwrap_or_default();
    error(format!(
        "adapter `{name}` also holds {} trained tensors that are not adapter factors (e.g. `{example}`: a task head or \
         trained norms), which have no weighted combination",
        extras.len()
    ))
}

/// How [`combine_adapters`] combines adapters: PEFT's `combination_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// `ΔW = Σ wᵢ·ΔWᵢ` exactly, as one LoRA adapter of rank `Σ kᵢ`: at each site `A = [w₁a₁ … wₙaₙ]`
    /// and `B = [b₁; …; bₙ]` from every adapter's factors `ΔWᵢ = aᵢ·bᵢ`
    /// ([`LinearDelta::low_rank_factors`]), so any linear methods combine, mixed too.
    Cat,
    /// PEFT's `linear`, for LoRA adapters of one rank `r`: `A = Σ ±√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ`
    /// (`sᵢ` each adapter's scale, the sign of `wᵢ` on `A`), rank `r`. This is not `Σ wᵢ·ΔWᵢ`:
    /// the products `Aᵢ·Bⱼ` of different adapters remain (PEFT calls it a rough approximation).
    Linear,
}

impl Combination {
    /// The names [`Combination::parse`] accepts, as PEFT spells them.
    pub const NAMES: [&'static str; 2] = ["cat", "linear"];

    /// The combination called `name` (`cat` or `linear`).
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        match name {
            "cat" => Ok(Self::Cat),
            "linear" => Ok(Self::Linear),
            other => Err(error(format!(
                "unknown combination `{other}`: expected {} (PEFT's svd and ties families are not implemented)",
                Self::NAMES.join(" or ")
            ))),
        }
    }

    /// The name PEFT gives this combination type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cat => "cat",
            Self::Linear => "linear",
        }
    }
}

/// One adapter of a weighted combination ([`combine_adapters`]).
#[derive(Debug, Clone, Copy)]
pub struct WeightedAdapter<'a, B: Backend> {
    /// Its name, for messages.
    pub name: &'a str,
    /// Its configuration.
    pub config: &'a AdapterConfig,
    /// Its adapters, detached.
    pub set: &'a AdapterSet<B>,
    /// Its weight `wᵢ` (any finite number; negative subtracts).
    pub weight: f64,
}

/// The weighted combination of `parts`, adapters of a model of shape `spec`, as one LoRA adapter
/// and its configuration: PEFT's `add_weighted_adapter`.
///
/// The combination adapts the union of the parts' sites (a part without a site adds nothing
/// there, as in PEFT); every site gets the same rank, the largest sum of ranks at a site for
/// [`Combination::Cat`], zero-padded elsewhere. It is stored as PEFT stores its combinations,
/// `r = lora_alpha = rank` (scale 1), so the file reproduces the combined ΔW exactly. Its targets
/// are the union of the parts' `target_modules` lists when every part has one, else the adapted
/// module names; it keeps the parts' task section when they all have the same one.
///
/// Refuses: no parts, a weight that is not finite, residual (LoRETTA_adp) adapters (nonlinear:
/// they have no ΔW), adapters of another base model or with sites of other shapes, and for
/// [`Combination::Linear`] anything but LoRA adapters of one rank.
pub fn combine_adapters<B: Backend>(
    spec: &ArchSpec,
    parts: &[WeightedAdapter<'_, B>],
    combination: Combination,
) -> Result<(AdapterConfig, AdapterSet<B>), ModelError> {
    if parts.is_empty() {
        return Err(error("nothing to combine: give at least one adapter"));
    }
    let identity = BaseModelIdentity::of(spec);
    for part in parts {
        let name = part.name;
        if !part.weight.is_finite() {
            return Err(error(format!("the weight of adapter `{name}` is {}: weights must be finite", part.weight)));
        }
        if part.config.method.is_residual() || !part.set.residual.is_empty() {
            return Err(error(format!(
                "adapter `{name}` is {}: a nonlinear adapter after blocks (h + f(h)) has no weight update ΔW to \
                 combine; only linear methods can be combined",
                part.config.method.name()
            )));
        }
        if let Some(base) = &part.config.base_model
            && *base != identity
        {
            return Err(error(format!(
                "adapter `{name}` was trained on a base model with {base:?}, but this model has {identity:?}"
            )));
        }
        check_sites(spec, name, part.set)?;
    }
    let sites: Vec<LinearSite> = spec
        .linear_sites()
        .into_iter()
        .filter(|site| parts.iter().any(|p| p.set.linear.iter().any(|(s, _)| s.name == site.name)))
        .collect();
    if sites.is_empty() {
        return Err(error("the adapters adapt no projection: nothing to combine"));
    }
    let factors: Vec<Factors<B>> = match combination {
        Combination::Cat => sites
            .iter()
            .map(|site| {
                let (a, b): (Vec<_>, Vec<_>) = parts
                    .iter()
                    .filter_map(|part| {
                        let (a, b) = adapter_at(part.set, site)?.low_rank_factors(&part.set.shared);
                        Some((a.mul_scalar(part.weight), b))
                    })
                    .unzip();
                (Tensor::cat(a, 1), Tensor::cat(b, 0))
            })
            .collect(),
        Combination::Linear => linear_combination(parts, &sites)?,
    };
    let rank = factors.iter().map(|(a, _)| a.dims()[1]).max().expect("at least one site");
    let lora = LoraConfig::new().with_rank(rank).with_alpha(rank as f64);
    let linear = sites
        .into_iter()
        .zip(factors)
        .map(|(site, (a, b))| {
            let (d_in, k) = (a.dims()[0], a.dims()[1]);
            let (a, b) = if k < rank {
                let device = a.device();
                let a = Tensor::cat(vec![a, Tensor::zeros([d_in, rank - k], &device)], 1);
                let b = Tensor::cat(vec![b, Tensor::zeros([rank - k, site.d_out], &device)], 0);
                (a, b)
            } else {
                (a, b)
            };
            let adapter = Lora {
                a: Param::from_tensor(a.detach()),
                b: Param::from_tensor(b.detach()),
                dropout: DropoutConfig::new(lora.dropout).init(),
                scaling: lora.scaling(),
            };
            (site, LinearAdapter::Lora(adapter))
        })
        .collect::<Vec<_>>();
    let names: Option<Vec<Vec<String>>> = parts.iter().map(|p| p.config.target_modules.clone()).collect();
    let target_modules = match names {
        Some(lists) => {
            let mut union: Vec<String> = Vec::new();
            for name in lists.into_iter().flatten() {
                if !union.contains(&name) {
                    union.push(name);
                }
            }
            union
        }
        None => linear.iter().map(|(site, _)| site.name.clone()).collect(),
    };
    let first = parts[0].config;
    let task = first.task.clone().filter(|task| parts.iter().all(|p| p.config.task.as_ref() == Some(task)));
    let method = MethodConfig::Lora(lora);
    let config = AdapterConfig {
        peft_type: method.peft_type(),
        method,
        target_modules: Some(target_modules),
        target_regex: None,
        base_model_name_or_path: first.base_model_name_or_path.clone(),
        base_model: Some(identity),
        library_version: env!("CARGO_PKG_VERSION").into(),
        task,
    };
    let set = AdapterSet { shared: Default::default(), linear, residual: Vec::new() };
    Ok((config, set))
}

/// A site's update as factors `(a, b)`, `ΔW = a·b`.
type Factors<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// The adapter `set` holds at `site`, if any.
fn adapter_at<'s, B: Backend>(set: &'s AdapterSet<B>, site: &LinearSite) -> Option<&'s LinearAdapter<B>> {
    set.linear.iter().find(|(s, _)| s.name == site.name).map(|(_, adapter)| adapter)
}

/// PEFT's `linear` combination at every site: `(Σ ±√|wᵢsᵢ|·Aᵢ, Σ √|wᵢsᵢ|·Bᵢ)` over the LoRA
/// adapters there.
fn linear_combination<B: Backend>(
    parts: &[WeightedAdapter<'_, B>],
    sites: &[LinearSite],
) -> Result<Vec<Factors<B>>, ModelError> {
    let mut ranks = Vec::new();
    for part in parts {
        match &part.config.method {
            MethodConfig::Lora(config) => ranks.push((part.name, config.rank)),
            other => {
                return Err(error(format!(
                    "the linear combination sums LoRA factors, but adapter `{}` is {}; use the cat combination, \
                     which combines any linear methods exactly",
                    part.name,
                    other.name()
                )));
            }
        }
    }
    if ranks.iter().any(|&(_, r)| r != ranks[0].1) {
        let ranks: Vec<String> = ranks.iter().map(|(name, r)| format!("`{name}` r={r}")).collect();
        return Err(error(format!(
            "the linear combination needs LoRA adapters of one rank, but they have {}; use the cat combination",
            ranks.join(", ")
        )));
    }
    let mut factors = Vec::new();
    for site in sites {
        let mut sum: Option<Factors<B>> = None;
        for part in parts {
            let Some(LinearAdapter::Lora(lora)) = adapter_at(part.set, site) else {
                continue;
            };
            let scaled = part.weight * lora.scaling;
            let root = scaled.abs().sqrt();
            let a = lora.a.val().mul_scalar(if scaled < 0.0 { -root } else { root });
            let b = lora.b.val().mul_scalar(root);
            sum = Some(match sum {
                Some((sa, sb)) => (sa + a, sb + b),
                None => (a, b),
            });
        }
        factors.push(sum.expect("every site has an adapter"));
    }
    Ok(factors)
}

/// Removes every linear adapter, residual adapter and shared factor from `model` without a
/// description of its sites (what [`take_adapters`] needs), so that it computes what the base model
/// computes (a DPO run's reference policy, on a clone that shares the frozen weights) (trained norms or heads, which are not adapters, stay).
/// Returns how many adapters were removed.
///
/// Refuses a model whose update is merged into a base weight: removing the adapter would leave
/// ΔW folded into the weight (unmerge it first).
pub fn strip_adapters<B: Backend, M: AdapterSlots<B>>(model: &mut M) -> Result<usize, ModelError> {
    let mut removed = 0;
    for (layer, block) in model.blocks_mut().iter_mut().enumerate() {
        for (projection, slot) in block.projections_mut().into_iter().enumerate() {
            if slot.merged {
                let name = M::Block::LAYOUT.get(projection).map_or("a projection", |p| p.name);
                return Err(AdapterError::State(format!(
                    "layer {layer} {name}: the adapter is merged into the base weight; unmerge it before removing it"
                ))
                .into());
            }
            removed += usize::from(slot.adapter.take().is_some());
        }
        for position in ResidualPosition::ALL {
            removed += usize::from(block.residual_mut(position).and_then(Option::take).is_some());
        }
    }
    *model.shared_mut() = SharedFactors::empty();
    Ok(removed)
}
