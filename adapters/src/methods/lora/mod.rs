//! LoRA (Hu et al., 2021) with HF PEFT semantics: the baseline every tensorized method is
//! compared against.
//!
//! `Δ(x) = s · dropout(x) · A · B` with `A: [d_in, r]` (kaiming-uniform, `U(±1/√d_in)`, as PEFT's
//! `kaiming_uniform_(a=√5)`), `B: [r, d_out] = 0`, and `s = α/r` (or `α/√r` with rsLoRA).
//! PEFT stores `lora_A.weight` as `[r, d_in]` and `lora_B.weight` as `[d_out, r]`: transpose on
//! import and export.

mod layer;

pub use layer::Lora;

use crate::error::{invalid, require_dropout, require_positive, require_rank_and_alpha};
use crate::method::{AdapterSet, Flag, FlagField, Method, ParamReport, Sites, sets};
use crate::methods::LinearAdapter;
use burn::config::Config;
use burn::module::Param;
use burn::nn::DropoutConfig;
use burn::tensor::{Distribution, Tensor, backend::Backend};

/// Hyper-parameters of a LoRA adapter.
#[derive(Config, Debug)]
pub struct LoraConfig {
    /// Rank `r` of the update.
    #[config(default = 8)]
    pub rank: usize,
    /// Scale numerator `α` (PEFT's `lora_alpha`, default 8).
    #[config(default = 8.0)]
    pub alpha: f64,
    /// Use rsLoRA scaling `α/√r` instead of `α/r`.
    #[config(default = false)]
    pub use_rslora: bool,
    /// Dropout probability on the adapter input (active only on autodiff backends).
    #[config(default = 0.0)]
    pub dropout: f64,
}

impl LoraConfig {
    /// Checks every field (rank ≥ 1, finite α, dropout in `[0, 1)`).
    pub fn validate(&self) -> crate::Result<()> {
        require_rank_and_alpha(self.rank, self.alpha)?;
        require_dropout("dropout", self.dropout)
    }

    /// The output scale `α/r` (or `α/√r`).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.rank as f64).sqrt() } else { self.alpha / self.rank as f64 }
    }

    /// Trainable parameters for one `d_in × d_out` matrix: `r·(d_in + d_out)`.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> usize {
        self.rank * (d_in + d_out)
    }

    /// Creates the adapter for a `d_in × d_out` linear layer (ΔW = 0 at initialisation).
    pub fn init<B: Backend>(&self, d_in: usize, d_out: usize, device: &B::Device) -> crate::Result<Lora<B>> {
        self.validate()?;
        require_positive("d_in", d_in)?;
        require_positive("d_out", d_out)?;
        let bound = 1.0 / (d_in as f64).sqrt();
        Ok(Lora {
            a: Param::from_tensor(tensor_peft_kernels::rng::random(
                [d_in, self.rank],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            b: Param::from_tensor(Tensor::zeros([self.rank, d_out], device)),
            dropout: DropoutConfig::new(self.dropout).init(),
            scaling: self.scaling(),
        })
    }
}

impl Method for LoraConfig {
    const NAME: &'static str = "lora";
    const FLAGS: &'static [FlagField] = &[
        sets(Flag::Rank, "rank", "rank r"),
        sets(Flag::Alpha, "alpha", "scale α (update × α/r)"),
        sets(Flag::Dropout, "dropout", "dropout on the adapter's input (PEFT's lora_dropout)"),
    ];

    fn has_zero_init_factor(&self) -> bool {
        true
    }

    fn peft_type(&self) -> String {
        "LORA".into()
    }

    fn peft_config(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "use_rslora": self.use_rslora,
            "bias": "none", "fan_in_fan_out": false, "init_lora_weights": true, "use_dora": false,
            "modules_to_save": null, "layers_to_transform": null, "rank_pattern": {}, "alpha_pattern": {},
        }))
    }

    fn from_peft_config(json: &serde_json::Value) -> Option<crate::Result<Self>> {
        Some(peft_lora_config(json))
    }

    fn count(&self, sites: &Sites) -> crate::Result<ParamReport> {
        self.validate()?;
        ParamReport::per_linear_site(Self::NAME, sites.linear, |s| Ok(self.num_params(s.d_in, s.d_out)))
    }

    fn build<B: Backend>(&self, sites: &Sites, device: &B::Device) -> crate::Result<AdapterSet<B>> {
        AdapterSet::per_linear_site(sites.linear, |s| Ok(LinearAdapter::Lora(self.init(s.d_in, s.d_out, device)?)))
    }
}

/// A LoRA configuration from the keys of PEFT's `adapter_config.json`, refusing the options whose
/// semantics this implementation does not have (DoRA, biases, per-module ranks, …).
fn peft_lora_config(json: &serde_json::Value) -> crate::Result<LoraConfig> {
    let unsupported = |field: &'static str, ok: &dyn Fn(&serde_json::Value) -> bool| match json.get(field) {
        Some(v) if !ok(v) => Err(invalid(field, v, "this option is not supported")),
        _ => Ok(()),
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
        json.get(field).and_then(|v| v.as_f64()).ok_or_else(|| invalid(field, "(missing)", "expected a number"))
    };
    let rank = number("r")?;
    if rank < 1.0 || rank.fract() != 0.0 {
        return Err(invalid("r", rank, "expected a positive integer"));
    }
    Ok(LoraConfig::new()
        .with_rank(rank as usize)
        .with_alpha(number("lora_alpha")?)
        .with_dropout(json.get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0))
        .with_use_rslora(json.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false)))
}
