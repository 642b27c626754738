//! What every adapter method says about itself ([`Method`], implemented by each method's config in
//! `methods/<method>/`), what its layers say about their tensors ([`AdapterLayer`]), and the
//! method-agnostic types they speak in: the sites a model reports, parameter reports, the built
//! [`AdapterSet`] and the hyper-parameter flags of the command line.

use crate::adapter::DeltaInit;
use crate::error::{AdapterError, require_positive};
use crate::methods::{LinearAdapter, ResidualAdapter, SharedFactors};
use crate::tensor::tt::TensorTrain;
use burn::config::Config;
use burn::module::{Param, ParamId};
use burn::tensor::{Tensor, backend::Backend};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A linear projection that can carry a [`LinearAdapter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSite {
    /// Full module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub name: String,
    /// Transformer layer index.
    pub layer: usize,
    /// Row of the projection in its model family's layout table (what the model code uses to
    /// find the slot; `name` is for display and file names).
    pub projection: usize,
    /// The attention role, for methods that index by it (LoRTA); `None` for MLP projections.
    pub role: Option<AttentionMatrix>,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

/// A position where a [`ResidualAdapter`] is inserted (after a block's attention or feed-forward).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidualSite {
    /// Path of the adapter, e.g. `model.layers.3.attention_adapter`.
    pub name: String,
    /// Transformer layer index.
    pub layer: usize,
    /// Where in the block the adapter sits.
    pub position: ResidualPosition,
    /// Hidden size at that position.
    pub hidden: usize,
}

/// Where a residual adapter sits in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResidualPosition {
    /// After the attention output projection.
    Attention,
    /// After the feed-forward output projection.
    FeedForward,
    /// Before a gated feed-forward's gate projection, which then reads `h + f(h)` (LLaMA's
    /// `gate_proj`; LoRETTA's official placement).
    GateInput,
    /// Before a gated feed-forward's up projection, which then reads `h + f(h)` (LLaMA's
    /// `up_proj`).
    UpInput,
}

impl ResidualPosition {
    /// Every position, in block order.
    pub const ALL: [ResidualPosition; 4] = [
        ResidualPosition::Attention,
        ResidualPosition::GateInput,
        ResidualPosition::UpInput,
        ResidualPosition::FeedForward,
    ];
}

/// One row of a parameter report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamRow {
    /// Module path (or `shared: …` for shared factors).
    pub module: String,
    /// Shape of what is adapted, e.g. `4096x4096`.
    pub shape: String,
    /// Trainable parameters attributed to this row.
    pub params: usize,
    /// How the adapter computes its update there, where a method has a choice (empty otherwise).
    pub note: String,
}

impl ParamRow {
    /// The row of a linear site holding `params` parameters.
    pub fn linear(site: &LinearSite, params: usize) -> Self {
        Self { module: site.name.clone(), shape: format!("{}x{}", site.d_in, site.d_out), params, note: String::new() }
    }
}

/// Trainable parameters per module; shared factors appear once, in their own rows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParamReport {
    /// Rows in model order, shared factors last.
    pub rows: Vec<ParamRow>,
}

impl ParamReport {
    /// One row per linear site with the parameters `params` counts for it; an error names the
    /// site.
    pub fn per_linear_site(
        method: &'static str,
        linear: &[LinearSite],
        params: impl Fn(&LinearSite) -> crate::Result<usize>,
    ) -> crate::Result<Self> {
        let rows = linear.iter().map(|s| Ok(ParamRow::linear(s, params(s).map_err(at_site(method, &s.name))?)));
        Ok(Self { rows: rows.collect::<crate::Result<_>>()? })
    }

    /// Sum over all rows.
    pub fn total(&self) -> usize {
        self.rows.iter().map(|r| r.params).sum()
    }
}

/// Where a method's adapters go in a model: what [`Method::count`] and [`Method::build`] take.
#[derive(Debug, Clone, Copy)]
pub struct Sites<'a> {
    /// The model's attention shape.
    pub geometry: &'a AttentionGeometry,
    /// The projections chosen for linear methods.
    pub linear: &'a [LinearSite],
    /// The block outputs for residual methods.
    pub residual: &'a [ResidualSite],
}

/// Every adapter of a model, ready to be placed by the model code.
#[derive(Debug)]
pub struct AdapterSet<B: Backend> {
    /// Factors shared across sites (held once, at model level).
    pub shared: SharedFactors<B>,
    /// One adapter per linear site, in site order.
    pub linear: Vec<(LinearSite, LinearAdapter<B>)>,
    /// One adapter per residual site, in site order.
    pub residual: Vec<(ResidualSite, ResidualAdapter<B>)>,
}

impl<B: Backend> AdapterSet<B> {
    /// One adapter per linear site, built by `init`, and no shared factors: what most linear
    /// methods build.
    pub fn per_linear_site(
        linear: &[LinearSite],
        mut init: impl FnMut(&LinearSite) -> crate::Result<LinearAdapter<B>>,
    ) -> crate::Result<Self> {
        let linear = linear.iter().map(|s| Ok((s.clone(), init(s)?))).collect::<crate::Result<_>>()?;
        Ok(Self { shared: SharedFactors::empty(), linear, residual: Vec::new() })
    }
}

/// How a method trains best when the user sets no learning rate: its recommended settings,
/// chosen on the training and validation splits of the README's tasks and printed when a run
/// starts with them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecommendedTraining {
    /// Peak learning rate of the adapter.
    pub lr: f64,
    /// LoRA+ ratio for the factor that starts at zero (`None`: off).
    pub loraplus_lr_ratio: Option<f64>,
}

impl RecommendedTraining {
    /// Peak learning rate of a fresh task head under the recommended settings, whatever the
    /// method: the head is a plain dense layer.
    pub const HEAD_LR: f64 = 1e-3;
}

/// A hyper-parameter flag of the command line (and key of `--config` files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// `--rank`.
    Rank,
    /// `--alpha`.
    Alpha,
    /// `--tensor-rank`.
    TensorRank,
    /// `--tt-shape`.
    TtShape,
    /// `--tt-shape NAME=a,b,…`: a shape for the modules `NAME` names.
    TtModuleShape,
    /// `--bottleneck`.
    Bottleneck,
    /// `--placement`.
    Placement,
    /// `--dropout`.
    Dropout,
}

impl Flag {
    /// Every flag, in help order.
    pub const ALL: [Flag; 8] = [
        Flag::Rank,
        Flag::Alpha,
        Flag::TensorRank,
        Flag::TtShape,
        Flag::TtModuleShape,
        Flag::Bottleneck,
        Flag::Placement,
        Flag::Dropout,
    ];

    /// The flag as typed, e.g. `--tensor-rank`.
    pub fn cli(self) -> &'static str {
        match self {
            Flag::Rank => "--rank",
            Flag::Alpha => "--alpha",
            Flag::TensorRank => "--tensor-rank",
            Flag::TtShape => "--tt-shape",
            Flag::TtModuleShape => "--tt-shape NAME=…",
            Flag::Bottleneck => "--bottleneck",
            Flag::Placement => "--placement",
            Flag::Dropout => "--dropout",
        }
    }
}

/// Hyper-parameters given on the command line (`None`: the method's default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodFlags {
    /// `--rank`.
    pub rank: Option<usize>,
    /// `--alpha`.
    pub alpha: Option<f64>,
    /// `--tensor-rank`.
    pub tensor_rank: Option<usize>,
    /// `--tt-shape`, parsed.
    pub tt_shape: Option<Vec<usize>>,
    /// `--tt-shape NAME=a,b,…` entries, parsed, in the order given.
    pub tt_module_shapes: Vec<(String, Vec<usize>)>,
    /// `--bottleneck`.
    pub bottleneck: Option<usize>,
    /// `--placement`, as typed (the method's configuration parses it).
    pub placement: Option<String>,
    /// `--dropout`.
    pub dropout: Option<f64>,
    /// `--init`.
    pub init: Option<DeltaInit>,
}

impl MethodFlags {
    /// The value given for `flag`, as the configuration field it sets holds it.
    pub fn value(&self, flag: Flag) -> Option<serde_json::Value> {
        match flag {
            Flag::Rank => self.rank.map(Into::into),
            Flag::Alpha => self.alpha.map(Into::into),
            Flag::TensorRank => self.tensor_rank.map(Into::into),
            Flag::TtShape => self.tt_shape.clone().map(Into::into),
            Flag::TtModuleShape => {
                (!self.tt_module_shapes.is_empty()).then(|| serde_json::json!(self.tt_module_shapes))
            }
            Flag::Bottleneck => self.bottleneck.map(Into::into),
            Flag::Placement => self.placement.clone().map(Into::into),
            Flag::Dropout => self.dropout.map(Into::into),
        }
    }
}

/// A flag a method takes: the configuration field it sets, and what that field means for the
/// method (the CLI's help).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagField {
    /// The flag.
    pub flag: Flag,
    /// The configuration field it sets.
    pub field: &'static str,
    /// What the field is, e.g. `TT rank of the inner bonds`.
    pub meaning: &'static str,
}

/// `flag` sets the configuration field `field`, which is `meaning`.
pub const fn sets(flag: Flag, field: &'static str, meaning: &'static str) -> FlagField {
    FlagField { flag, field, meaning }
}

/// Everything the rest of the code asks of an adapter method, implemented by the method's
/// configuration (a Burn `Config` whose fields all have defaults: `new()` is the default method).
/// The registry (`methods/mod.rs`) turns the implementations into the
/// [`MethodConfig`](crate::MethodConfig), [`LinearAdapter`] and [`ResidualAdapter`] enums.
pub trait Method: Clone + std::fmt::Debug + Serialize + DeserializeOwned + 'static {
    /// The name on the command line and in files, e.g. `tt-lora`.
    const NAME: &'static str;
    /// Whether the method adds residual adapters after blocks' outputs instead of updates to
    /// linear projections (its registry line says `residual`, which the registry checks).
    const RESIDUAL: bool = false;
    /// The flags that set this method's hyper-parameters (the others are refused). `--init` sets
    /// the field `init` where the configuration has one; without it only `--init zero` is taken.
    const FLAGS: &'static [FlagField];

    /// Attention projections adapted when no targets are given (ignored by residual methods).
    fn default_roles(&self) -> &'static [AttentionMatrix] {
        &[AttentionMatrix::Query, AttentionMatrix::Value]
    }

    /// Whether one factor starts at zero (LoRA's `B`), which LoRA+ trains faster: the layers
    /// then name it in [`AdapterLayer::zero_init_factors`].
    fn has_zero_init_factor(&self) -> bool {
        false
    }

    /// The settings this method trains best with when the user gives no learning rate (by
    /// default LoRA's: lr 1e-3, no LoRA+).
    fn recommended_training(&self) -> RecommendedTraining {
        RecommendedTraining { lr: 1e-3, loraplus_lr_ratio: None }
    }

    /// HF PEFT's `peft_type` written to `adapter_config.json`.
    fn peft_type(&self) -> String {
        Self::NAME.to_uppercase()
    }

    /// HF PEFT's own keys for this configuration, written at the top level of
    /// `adapter_config.json` so PEFT can read the file (`None`: PEFT has no such method).
    fn peft_config(&self) -> Option<serde_json::Value> {
        None
    }

    /// Reads an `adapter_config.json` written by HF PEFT whose `peft_type` is
    /// [`peft_type`](Self::peft_type) (`None`: files of this method come from tensor-peft only).
    fn from_peft_config(json: &serde_json::Value) -> Option<crate::Result<Self>> {
        let _ = json;
        None
    }

    /// Trainable parameters per site and for shared factors, without allocating tensors; fails
    /// on the first site the method cannot adapt, naming it.
    fn count(&self, sites: &Sites) -> crate::Result<ParamReport>;

    /// Every adapter for the given sites, with the shared factors.
    fn build<B: Backend>(&self, sites: &Sites, device: &B::Device) -> crate::Result<AdapterSet<B>>;
}

/// Wraps an error about `site` into one that names the method and the site.
pub fn at_site<'a>(method: &'static str, site: &'a str) -> impl Fn(AdapterError) -> AdapterError + 'a {
    move |e| AdapterError::Unsupported { method, target: site.to_string(), reason: e.to_string() }
}

/// The version of the tensor names adapter files use. A method that renames its tensors bumps
/// it and keeps reading the older names; files record it as `tensor_peft.names_version` (absent
/// in files written before it existed, which use version 1).
pub const TENSOR_NAMES_VERSION: u32 = 1;

/// A parameter as an adapter file stores it.
pub enum FileParam<'a, B: Backend> {
    /// A vector (biases).
    Vector(&'a mut Param<Tensor<B, 1>>),
    /// A matrix stored as it is.
    Matrix(&'a mut Param<Tensor<B, 2>>),
    /// A matrix stored transposed (PEFT's `[out, in]` linear weights).
    TransposedMatrix(&'a mut Param<Tensor<B, 2>>),
    /// A TT core `[r_{k-1}, n_k, r_k]`.
    Core(&'a mut Param<Tensor<B, 3>>),
}

/// One named tensor of an adapter file.
pub struct FileTensor<'a, B: Backend> {
    /// Name relative to the adapted site (or to `shared` for shared factors), e.g.
    /// `lora_A.weight`. Spelled out by each method, so renaming a Rust type or field cannot
    /// change a file.
    pub name: String,
    /// The parameter it holds.
    pub param: FileParam<'a, B>,
}

impl<'a, B: Backend> FileTensor<'a, B> {
    /// `name` holding `param`.
    pub fn new(name: impl Into<String>, param: FileParam<'a, B>) -> Self {
        Self { name: name.into(), param }
    }

    /// The cores of `train` as `{prefix}.cores.{k}`.
    pub fn train(prefix: &str, train: &'a mut TensorTrain<B>) -> Vec<Self> {
        train
            .cores
            .iter_mut()
            .enumerate()
            .map(|(k, core)| Self::new(format!("{prefix}.cores.{k}"), FileParam::Core(core)))
            .collect()
    }
}

/// What an adapter layer (or a method's shared factors) says about its tensors.
pub trait AdapterLayer<B: Backend> {
    /// Every parameter under its adapter-file name (version [`TENSOR_NAMES_VERSION`]).
    fn file_tensors(&mut self) -> Vec<FileTensor<'_, B>>;

    /// The factors that start at zero, which LoRA+ trains at a higher learning rate.
    fn zero_init_factors(&self) -> Vec<ParamId> {
        Vec::new()
    }
}

/// Which attention projection a matrix is (the `C_M` row it uses).
#[derive(Config, Debug, Copy, PartialEq, Eq, Hash)]
pub enum AttentionMatrix {
    /// Query projection (`q_proj`, `query`).
    Query,
    /// Key projection (`k_proj`, `key`).
    Key,
    /// Value projection (`v_proj`, `value`).
    Value,
    /// Output projection (`o_proj`, `attention.output.dense`).
    Output,
}

impl AttentionMatrix {
    /// Row of `C_M`: q=0, k=1, v=2, o=3.
    pub fn index(&self) -> usize {
        match self {
            AttentionMatrix::Query => 0,
            AttentionMatrix::Key => 1,
            AttentionMatrix::Value => 2,
            AttentionMatrix::Output => 3,
        }
    }

    /// Whether the output axis holds the key/value heads.
    pub fn uses_kv_heads(&self) -> bool {
        matches!(self, AttentionMatrix::Key | AttentionMatrix::Value)
    }
}

/// Attention shape of a model (what a method indexing layers × heads × roles needs).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub struct AttentionGeometry {
    /// Number of transformer layers `L`.
    pub n_layers: usize,
    /// Model width `d`.
    pub d_model: usize,
    /// Query heads `H`.
    pub n_heads: usize,
    /// Key/value heads (`H` for multi-head attention, fewer for GQA).
    pub n_kv_heads: usize,
}

impl AttentionGeometry {
    /// Head width `d_h = d / H`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Whether key/value projections are narrower than the query projection.
    pub fn is_grouped(&self) -> bool {
        self.n_kv_heads != self.n_heads
    }

    /// Checks that heads tile the model width.
    pub fn validate(&self) -> crate::Result<()> {
        require_positive("n_layers", self.n_layers)?;
        require_positive("n_heads", self.n_heads)?;
        require_positive("n_kv_heads", self.n_kv_heads)?;
        let err = |reason: String| AdapterError::Unsupported { method: "lorta", target: format!("{self:?}"), reason };
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(err(format!("d_model {} is not divisible by n_heads {}", self.d_model, self.n_heads)));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(err(format!("n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads)));
        }
        Ok(())
    }

    /// `(d_in, d_out)` of a projection.
    pub fn matrix_dims(&self, matrix: AttentionMatrix) -> (usize, usize) {
        if matrix.uses_kv_heads() {
            (self.d_model, self.n_kv_heads * self.head_dim())
        } else {
            (self.d_model, self.d_model)
        }
    }
}
