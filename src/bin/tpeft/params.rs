//! `tpeft params`: PEFT-style trainable-parameter report for any method on any model, computed
//! from the architecture description alone (nothing is allocated).

use crate::CliError;
use tensor_peft_adapters::tensor::shape::parse_shape;
use tensor_peft_adapters::{DeltaInit, MethodConfig, ParamReport};
use tensor_peft_models::{ArchSpec, Targets};

/// Method hyper-parameters as given on the command line (`None` = method default).
#[derive(Debug, Clone, Default)]
pub struct MethodFlags {
    /// `--rank`: TT rank for tt-lora; LoRA rank for lora, loretta-rep, lotr, lorta.
    pub rank: Option<usize>,
    /// `--alpha`.
    pub alpha: Option<f64>,
    /// `--tensor-rank`: LoRETTA's TT rank.
    pub tensor_rank: Option<usize>,
    /// `--tt-shape`: TT-LoRA's full shape; LoRETTA_rep's `A` shape (B uses its reverse);
    /// LoRETTA_adp's down-projection shape.
    pub tt_shape: Option<String>,
    /// `--bottleneck`: LoRETTA_adp's width.
    pub bottleneck: Option<usize>,
    /// `--init`: `zero` (ΔW₀ = 0, the default) or `paper` (the official code's initialisation).
    pub init: Option<String>,
}

/// Builds a method configuration from its name and flags; flags that do not apply are refused.
pub fn method_from_flags(name: &str, flags: &MethodFlags) -> Result<MethodConfig, CliError> {
    let usage = |e: &dyn std::fmt::Display| CliError::Usage(e.to_string());
    let mut method = MethodConfig::from_name(name).map_err(|e| usage(&e))?;
    let shape = flags.tt_shape.as_deref().map(parse_shape).transpose().map_err(|e| usage(&e))?;
    let accepted: &[&str] = match method {
        MethodConfig::Lora(_) | MethodConfig::Lotr(_) | MethodConfig::Lorta(_) => &["--rank", "--alpha"],
        MethodConfig::TtLora(_) => &["--rank", "--alpha", "--tt-shape"],
        MethodConfig::LorettaRep(_) => &["--rank", "--alpha", "--tensor-rank", "--tt-shape"],
        MethodConfig::LorettaAdp(_) => &["--bottleneck", "--tensor-rank", "--tt-shape"],
    };
    let given = [
        ("--rank", flags.rank.is_some()),
        ("--alpha", flags.alpha.is_some()),
        ("--tensor-rank", flags.tensor_rank.is_some()),
        ("--tt-shape", shape.is_some()),
        ("--bottleneck", flags.bottleneck.is_some()),
    ];
    if let Some((flag, _)) = given.iter().find(|(flag, present)| *present && !accepted.contains(flag)) {
        return Err(CliError::Usage(format!("{flag} does not apply to {name}; it takes {}", accepted.join(", "))));
    }
    let rank = |default: usize| flags.rank.unwrap_or(default);
    let alpha = |default: f64| flags.alpha.unwrap_or(default);
    match &mut method {
        MethodConfig::Lora(c) => (c.rank, c.alpha) = (rank(c.rank), alpha(c.alpha)),
        MethodConfig::Lotr(c) => (c.rank, c.alpha) = (rank(c.rank), alpha(c.alpha)),
        MethodConfig::Lorta(c) => (c.rank, c.alpha) = (rank(c.rank), alpha(c.alpha)),
        MethodConfig::TtLora(c) => (c.rank, c.alpha, c.tt_shape) = (rank(c.rank), alpha(c.alpha), shape),
        MethodConfig::LorettaRep(c) => {
            (c.rank, c.alpha, c.a_shape) = (rank(c.rank), alpha(c.alpha), shape);
            c.tensor_rank = flags.tensor_rank.unwrap_or(c.tensor_rank);
        }
        MethodConfig::LorettaAdp(c) => {
            c.bottleneck = flags.bottleneck.unwrap_or(c.bottleneck);
            c.tensor_rank = flags.tensor_rank.unwrap_or(c.tensor_rank);
            c.down_shape = shape;
        }
    }
    if let Some(init) = flags.init.as_deref() {
        let init = match init {
            "zero" => DeltaInit::Zero,
            "paper" => DeltaInit::Paper,
            other => return Err(CliError::Usage(format!("--init {other}: expected zero or paper"))),
        };
        match &mut method {
            MethodConfig::Lora(_) => {
                if init == DeltaInit::Paper {
                    return Err(CliError::Usage(
                        "--init paper does not apply to lora: its official initialisation is the zero one".into(),
                    ));
                }
            }
            MethodConfig::Lotr(c) => c.init = init,
            MethodConfig::Lorta(c) => c.init = init,
            MethodConfig::TtLora(c) => c.init = init,
            MethodConfig::LorettaRep(c) => c.init = init,
            MethodConfig::LorettaAdp(c) => c.init = init,
        }
    }
    if flags.rank == Some(0) || flags.tensor_rank == Some(0) || flags.bottleneck == Some(0) {
        return Err(CliError::Usage("--rank, --tensor-rank and --bottleneck must be at least 1".into()));
    }
    Ok(method)
}

/// The counted report for `method` on `spec` at `targets`.
pub fn count(spec: &ArchSpec, method: &MethodConfig, targets: &Targets) -> Result<ParamReport, CliError> {
    let linear = targets.resolve(spec, method).map_err(|e| CliError::Usage(e.to_string()))?;
    let residual = if method.is_residual() { spec.residual_sites() } else { Vec::new() };
    method.count(&spec.geometry(), &linear, &residual).map_err(|e| CliError::Usage(e.to_string()))
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// PEFT's summary line: `trainable params: … || all params: … || trainable%: …`.
pub fn summary_line(trainable: usize, base: usize) -> String {
    let all = trainable + base;
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        thousands(trainable),
        thousands(all),
        100.0 * trainable as f64 / all as f64
    )
}

/// The whole report: model line, per-module table, summary line.
pub fn render(spec: &ArchSpec, method: &MethodConfig, report: &ParamReport) -> String {
    let mut out = format!(
        "model: {} ({}, {} layers, d={}, {} heads, {} kv heads, {} base params)\nmethod: {} {}\n\n",
        spec.source,
        spec.family.name(),
        spec.layers,
        spec.hidden,
        spec.heads,
        spec.kv_heads,
        thousands(spec.base_num_params()),
        method.name(),
        serde_json::to_string(method).unwrap_or_default()
    );
    let width = report.rows.iter().map(|r| r.module.len()).max().unwrap_or(6).max(6);
    out.push_str(&format!("{:<width$}  {:>14}  {:>12}\n", "module", "shape", "trainable"));
    for row in &report.rows {
        out.push_str(&format!("{:<width$}  {:>14}  {:>12}\n", row.module, row.shape, thousands(row.params)));
    }
    out.push('\n');
    out.push_str(&summary_line(report.total(), spec.base_num_params()));
    out.push('\n');
    out
}
