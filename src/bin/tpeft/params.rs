//! `tpeft params`: PEFT-style trainable-parameter report for any method on any model, computed
//! from the architecture description alone (nothing is allocated).

use crate::CliError;
use serde::{Deserialize, Serialize};
use tensor_peft_adapters::tensor::shape::parse_shape;
use tensor_peft_adapters::{DeltaInit, Flag, METHOD_NAMES, MethodConfig, MethodFlags, ParamReport};
use tensor_peft_models::{ArchSpec, Targets};

/// The method and its hyper-parameters as typed: one set of flags, flattened into `tpeft params`
/// and `tpeft finetune` (and the keys of its `--config` files).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
pub struct MethodArgs {
    /// The adapter method.
    #[arg(long, help = method_help())]
    pub method: Option<String>,
    /// The method's rank.
    #[arg(long, help = flag_help(Flag::Rank))]
    pub rank: Option<usize>,
    /// Scale α.
    #[arg(long, help = flag_help(Flag::Alpha))]
    pub alpha: Option<f64>,
    /// TT rank of a factor's trains.
    #[arg(long, help = flag_help(Flag::TensorRank))]
    pub tensor_rank: Option<usize>,
    /// TT shape: one for every target, and/or `NAME=shape` for the modules NAME names (repeat the
    /// flag, or separate entries with `;` in one value, as TOML files must).
    #[arg(long, help = flag_help(Flag::TtShape))]
    #[serde(default, deserialize_with = "one_or_many")]
    pub tt_shape: Vec<String>,
    /// Bottleneck width.
    #[arg(long, help = flag_help(Flag::Bottleneck))]
    pub bottleneck: Option<usize>,
    /// Where residual adapters go.
    #[arg(long, help = flag_help(Flag::Placement))]
    pub placement: Option<String>,
    /// Dropout on the adapter's input (PEFT's `lora_dropout`).
    #[arg(long, help = flag_help(Flag::Dropout))]
    pub dropout: Option<f64>,
    /// Adapter initialisation: zero (ΔW₀ = 0, the default) or paper (the official code's; ΔW₀ ≠ 0
    /// for the TT methods, N(0, 1) shared factors for lotr).
    #[arg(long)]
    pub init: Option<String>,
}

impl MethodArgs {
    /// The method configuration these flags give (`default` when no `--method` is given); flags
    /// that do not apply to the method are refused.
    pub fn config(&self, default: &str) -> Result<MethodConfig, CliError> {
        let usage = |e: &dyn std::fmt::Display| CliError::Usage(e.to_string());
        let init = match self.init.as_deref() {
            None => None,
            Some("zero") => Some(DeltaInit::Zero),
            Some("paper") => Some(DeltaInit::Paper),
            Some(other) => return Err(CliError::Usage(format!("--init {other}: expected zero or paper"))),
        };
        let (tt_shape, tt_module_shapes) = parse_tt_shapes(&self.tt_shape).map_err(CliError::Usage)?;
        let flags = MethodFlags {
            rank: self.rank,
            alpha: self.alpha,
            tensor_rank: self.tensor_rank,
            tt_shape,
            tt_module_shapes,
            bottleneck: self.bottleneck,
            placement: self.placement.clone(),
            dropout: self.dropout,
            init,
        };
        MethodConfig::from_flags(self.method.as_deref().unwrap_or(default), &flags).map_err(|e| usage(&e))
    }
}

/// A module name and its TT shape.
type ModuleShape = (String, Vec<usize>);

/// `--tt-shape` values: at most one bare shape (every target) and `NAME=shape` entries, each value
/// possibly holding several entries separated by `;`.
fn parse_tt_shapes(values: &[String]) -> Result<(Option<Vec<usize>>, Vec<ModuleShape>), String> {
    let mut bare = None;
    let mut per_module = Vec::new();
    let separated = values.iter().any(|v| v.contains(';'));
    for entry in values.iter().flat_map(|v| v.split(';')).map(str::trim) {
        if entry.is_empty() && separated {
            // A trailing or doubled `;`.
            continue;
        }
        match entry.split_once('=') {
            Some((name, shape)) => {
                let name = name.trim();
                if name.is_empty() {
                    return Err(format!("--tt-shape {entry}: expected NAME=a,b,… with a module name"));
                }
                let shape = parse_shape(shape).map_err(|e| format!("--tt-shape {name}=…: {e}"))?;
                per_module.push((name.to_string(), shape));
            }
            None if bare.is_some() => {
                return Err(format!(
                    "--tt-shape {entry}: a shape for every target was already given; name the module (NAME=a,b,…)"
                ));
            }
            None => bare = Some(parse_shape(entry).map_err(|e| e.to_string())?),
        }
    }
    Ok((bare, per_module))
}

/// A TOML value that is one string or a list of them (`tt_shape`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// `--method`'s help: the registered methods.
pub fn method_help() -> String {
    format!("Adapter method: {} [default: lora]", METHOD_NAMES.join(", "))
}

/// A hyper-parameter flag's help: what it sets in each method that takes it.
pub fn flag_help(flag: Flag) -> String {
    let meanings: Vec<String> = METHOD_NAMES
        .iter()
        .filter_map(|name| {
            let flags = MethodConfig::flags_of(name)?;
            let taken = flags.iter().find(|f| f.flag == flag)?;
            Some(format!("{name}: {}", taken.meaning))
        })
        .collect();
    let what = if flag == Flag::TtShape {
        "Comma-separated, e.g. 16,24,24,16; NAME=a,b,… (repeatable) gives the modules NAME names their own shape. "
    } else {
        ""
    };
    format!("{what}{}", meanings.join("; "))
}

/// The counted report for `method` on `spec` at `targets`.
pub fn count(spec: &ArchSpec, method: &MethodConfig, targets: &Targets) -> Result<ParamReport, CliError> {
    targets.count(spec, method).map_err(|e| CliError::Usage(e.to_string()))
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
/// `trained_base` of the report's rows are base-model parameters made trainable (norms), which the
/// summary's total counts once.
pub fn render(spec: &ArchSpec, method: &MethodConfig, report: &ParamReport, trained_base: usize) -> String {
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
        let line = format!("{:<width$}  {:>14}  {:>12}  {}", row.module, row.shape, thousands(row.params), row.note);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&summary_line(report.total(), spec.base_num_params() - trained_base));
    out.push('\n');
    out
}
