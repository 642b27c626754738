//! `tpeft params`: PEFT-style trainable-parameter report for any method on any model, computed
//! from the architecture description alone (nothing is allocated).

use crate::CliError;
use tensor_peft_adapters::tensor::shape::parse_shape;
use tensor_peft_adapters::{MethodConfig, ParamReport};
use tensor_peft_models::ArchSpec;

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
}

/// Builds a method configuration from its name and flags; flags that do not apply are refused.
pub fn method_from_flags(name: &str, flags: &MethodFlags) -> Result<MethodConfig, CliError> {
    let usage = |e: &dyn std::fmt::Display| CliError::Usage(e.to_string());
    let mut method = MethodConfig::from_name(name).map_err(|e| usage(&e))?;
    let shape = flags
        .tt_shape
        .as_deref()
        .map(parse_shape)
        .transpose()
        .map_err(|e| usage(&e))?;
    let not_for = |flag: &str| CliError::Usage(format!("{flag} does not apply to {name}"));
    match &mut method {
        MethodConfig::Lora(c) => {
            if flags.tensor_rank.is_some() {
                return Err(not_for("--tensor-rank"));
            }
            if shape.is_some() {
                return Err(not_for("--tt-shape"));
            }
            if flags.bottleneck.is_some() {
                return Err(not_for("--bottleneck"));
            }
            c.rank = flags.rank.unwrap_or(c.rank);
            c.alpha = flags.alpha.unwrap_or(c.alpha);
        }
        MethodConfig::TtLora(c) => {
            if flags.tensor_rank.is_some() {
                return Err(not_for("--tensor-rank (use --rank for the TT rank)"));
            }
            if flags.bottleneck.is_some() {
                return Err(not_for("--bottleneck"));
            }
            c.rank = flags.rank.unwrap_or(c.rank);
            c.alpha = flags.alpha.unwrap_or(c.alpha);
            c.tt_shape = shape;
        }
        MethodConfig::LorettaRep(c) => {
            if flags.bottleneck.is_some() {
                return Err(not_for("--bottleneck"));
            }
            c.rank = flags.rank.unwrap_or(c.rank);
            c.alpha = flags.alpha.unwrap_or(c.alpha);
            c.tensor_rank = flags.tensor_rank.unwrap_or(c.tensor_rank);
            c.a_shape = shape;
        }
        MethodConfig::LorettaAdp(c) => {
            if flags.rank.is_some() {
                return Err(not_for("--rank (use --bottleneck and --tensor-rank)"));
            }
            if flags.alpha.is_some() {
                return Err(not_for("--alpha"));
            }
            c.bottleneck = flags.bottleneck.unwrap_or(c.bottleneck);
            c.tensor_rank = flags.tensor_rank.unwrap_or(c.tensor_rank);
            c.down_shape = shape;
        }
        MethodConfig::Lotr(c) => {
            if flags.tensor_rank.is_some() {
                return Err(not_for("--tensor-rank"));
            }
            if shape.is_some() {
                return Err(not_for("--tt-shape"));
            }
            if flags.bottleneck.is_some() {
                return Err(not_for("--bottleneck"));
            }
            c.rank = flags.rank.unwrap_or(c.rank);
            c.alpha = flags.alpha.unwrap_or(c.alpha);
        }
        MethodConfig::Lorta(c) => {
            if flags.tensor_rank.is_some() {
                return Err(not_for("--tensor-rank"));
            }
            if shape.is_some() {
                return Err(not_for("--tt-shape"));
            }
            if flags.bottleneck.is_some() {
                return Err(not_for("--bottleneck"));
            }
            c.rank = flags.rank.unwrap_or(c.rank);
            c.alpha = flags.alpha.unwrap_or(c.alpha);
        }
    }
    if flags.rank == Some(0) || flags.tensor_rank == Some(0) || flags.bottleneck == Some(0) {
        return Err(CliError::Usage(
            "--rank, --tensor-rank and --bottleneck must be at least 1".into(),
        ));
    }
    Ok(method)
}

/// The counted report for `method` on `spec` with optional explicit targets.
pub fn count(
    spec: &ArchSpec,
    method: &MethodConfig,
    targets: Option<&[String]>,
) -> Result<ParamReport, CliError> {
    if method.is_residual() && targets.is_some() {
        return Err(CliError::Usage(format!(
            "--targets does not apply to {}: it is inserted after every block's attention and feed-forward output",
            method.name()
        )));
    }
    let linear = match targets {
        Some(t) => spec.select(t).map_err(|e| CliError::Usage(e.to_string()))?,
        None => spec.select_roles(method.default_roles()),
    };
    let residual = if method.is_residual() {
        spec.residual_sites()
    } else {
        Vec::new()
    };
    method
        .count(&spec.geometry(), &linear, &residual)
        .map_err(|e| CliError::Usage(e.to_string()))
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
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
    let width = report
        .rows
        .iter()
        .map(|r| r.module.len())
        .max()
        .unwrap_or(6)
        .max(6);
    out.push_str(&format!(
        "{:<width$}  {:>14}  {:>12}\n",
        "module", "shape", "trainable"
    ));
    for row in &report.rows {
        out.push_str(&format!(
            "{:<width$}  {:>14}  {:>12}\n",
            row.module,
            row.shape,
            thousands(row.params)
        ));
    }
    out.push('\n');
    out.push_str(&summary_line(report.total(), spec.base_num_params()));
    out.push('\n');
    out
}
