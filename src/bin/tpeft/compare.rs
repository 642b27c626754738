//! `tpeft compare --config sweep.toml`: a grid of methods and sizes on one task, each trained by
//! the same code as `tpeft finetune`, then `results.csv`, `results.md` and
//! `accuracy_vs_params.png` (score against adapter parameters, log x, Pareto front).
//!
//! The sweep file holds `output`, an optional `metric`, a `[base]` table with `finetune` options
//! and one `[[variant]]` table per family of runs; a list value in a variant (e.g.
//! `rank = [1, 4, 8]`) expands to one run per value (a grid over all lists). A finished run
//! (`train_report.json` present) is not repeated, and an interrupted one is resumed.
//! With successive halving, every run first trains `min_epochs` epochs, the best `1/eta` continue
//! (resumed, not restarted) with `eta`× the epochs, and so on up to `base.epochs`, within
//! `--budget-minutes` when given.

use crate::CliError;
use crate::finetune::{FinetuneArgs, train_config};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tensor_peft_training::{FinetuneReport, TrainConfig};

/// The sweep file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// Where runs and results go.
    pub output: PathBuf,
    /// The validation/test metric to compare (default: the task's selection metric).
    pub metric: Option<String>,
    /// Options shared by every run (the keys of `tpeft finetune --config`).
    pub base: toml::Table,
    /// Run families; list values expand to a grid.
    #[serde(rename = "variant")]
    pub variants: Vec<toml::Table>,
    /// Successive halving (optional).
    pub halving: Option<Halving>,
}

/// Successive-halving settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Halving {
    /// Epochs of the first rung.
    pub min_epochs: usize,
    /// Keep the best `1/eta` at each rung and multiply the epochs by `eta`.
    pub eta: usize,
}

/// One planned run.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Directory name under `<output>/runs/`.
    pub name: String,
    /// The variant's own options (for the table).
    pub options: BTreeMap<String, String>,
    /// Its `finetune` options.
    pub args: FinetuneArgs,
}

/// Keys whose value is itself a list (a list of lists sweeps them).
const LIST_KEYS: [&str; 2] = ["targets", "verbalizers"];

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

/// Expands a variant's list values into one table per grid point.
fn expand(variant: &toml::Table) -> Vec<toml::Table> {
    let mut out = vec![toml::Table::new()];
    for (key, value) in variant {
        let choices: Vec<toml::Value> = match value {
            toml::Value::Array(items) if !LIST_KEYS.contains(&key.as_str()) => items.clone(),
            toml::Value::Array(items) if items.iter().all(|i| i.is_array()) && !items.is_empty() => items.clone(),
            other => vec![other.clone()],
        };
        out = out
            .into_iter()
            .flat_map(|t| {
                choices.iter().map(move |c| {
                    let mut t = t.clone();
                    t.insert(key.clone(), c.clone());
                    t
                })
            })
            .collect();
    }
    out
}

fn short(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => items.iter().map(short).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Reads and expands a sweep file.
pub fn plan(path: &Path) -> Result<(SweepFile, Vec<Planned>), CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| usage(format!("--config {}: {e}", path.display())))?;
    let sweep: SweepFile = toml::from_str(&text).map_err(|e| usage(format!("--config {}: {e}", path.display())))?;
    if sweep.variants.is_empty() {
        return Err(usage(format!("--config {}: no [[variant]] table", path.display())));
    }
    if let Some(h) = &sweep.halving
        && (h.eta < 2 || h.min_epochs == 0)
    {
        return Err(usage(format!("--config {}: halving needs eta >= 2 and min_epochs >= 1", path.display())));
    }
    let mut planned = Vec::new();
    for variant in &sweep.variants {
        for point in expand(variant) {
            let mut table = sweep.base.clone();
            table.extend(point.clone());
            if table.contains_key("output") || table.contains_key("resume") {
                return Err(usage(format!(
                    "--config {}: `output`/`resume` are set by compare (runs go to <output>/runs/<name>)",
                    path.display()
                )));
            }
            let args: FinetuneArgs =
                table.try_into().map_err(|e: toml::de::Error| usage(format!("--config {}: {e}", path.display())))?;
            let options: BTreeMap<String, String> = point.iter().map(|(k, v)| (k.clone(), short(v))).collect();
            let method =
                options.get("method").cloned().or_else(|| args.adapter.method.clone()).unwrap_or_else(|| "lora".into());
            let rest: Vec<String> =
                options.iter().filter(|(k, _)| *k != "method").map(|(k, v)| format!("{k}={v}")).collect();
            let mut name = method.clone();
            if !rest.is_empty() {
                name.push('-');
                name.push_str(&rest.join("-"));
            }
            let name: String =
                name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.=".contains(c) { c } else { '_' }).collect();
            if planned.iter().any(|p: &Planned| p.name == name) {
                return Err(usage(format!("--config {}: two variants give the same run `{name}`", path.display())));
            }
            let mut options = options;
            options.insert("method".into(), method);
            planned.push(Planned { name, options, args });
        }
    }
    Ok((sweep, planned))
}

/// One row of the results.
#[derive(Debug, Clone, Serialize)]
pub struct ResultRow {
    /// Run name.
    pub run: String,
    /// Method.
    pub method: String,
    /// Variant options (`k=v; …`).
    pub options: String,
    /// Trained adapter parameters (head excluded).
    pub adapter_params: usize,
    /// Trained parameters with the head and norms.
    pub trainable_params: usize,
    /// Bytes of `adapter_model.safetensors`.
    pub adapter_bytes: u64,
    /// Epochs trained.
    pub epochs: usize,
    /// Best validation value of the metric.
    pub valid: f64,
    /// Test value with the best adapter (NaN without a test split).
    pub test: f64,
    /// Seconds (sum over the run's processes).
    pub seconds: f64,
    /// Training tokens per second.
    pub tokens_per_second: f64,
    /// Stopped by successive halving.
    pub halted: bool,
}

fn row(p: &Planned, r: &FinetuneReport, metric: &str, seconds: f64, halted: bool) -> ResultRow {
    ResultRow {
        run: p.name.clone(),
        method: p.options["method"].clone(),
        options: p
            .options
            .iter()
            .filter(|(k, _)| *k != "method")
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; "),
        adapter_params: r.adapter_params,
        trainable_params: r.trainable_params,
        adapter_bytes: r.adapter_file_bytes,
        epochs: r.history.iter().map(|h| h.epoch).max().unwrap_or(0),
        valid: r.history.iter().filter(|h| h.split == "valid").filter_map(|h| h.metrics.get(metric).copied()).fold(
            f64::NAN,
            |best, v| {
                if best.is_nan() || (tensor_peft_training::metrics::higher_is_better(metric) == (v > best)) {
                    v
                } else {
                    best
                }
            },
        ),
        test: r.test.as_ref().and_then(|t| t.get(metric).copied()).unwrap_or(f64::NAN),
        seconds,
        tokens_per_second: r.tokens_per_second,
        halted,
    }
}

/// Trains (or resumes, or skips) `p` up to `epochs` epochs.
fn train<B: AutodiffBackend>(
    p: &Planned,
    dir: &Path,
    epochs: usize,
    devices: &[B::Device],
) -> Result<(FinetuneReport, f64), CliError> {
    let report_path = dir.join("train_report.json");
    let done: Option<FinetuneReport> = std::fs::read(&report_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let trained_epochs = |r: &FinetuneReport| r.history.iter().map(|h| h.epoch).max().unwrap_or(0);
    if let Some(r) = &done
        && (trained_epochs(r) >= epochs || r.stop_reason.starts_with("early stopping"))
    {
        eprintln!("compare: {} already trained ({} epochs), skipped", p.name, trained_epochs(r));
        return Ok((r.clone(), r.train_seconds));
    }
    let has_checkpoint = !tensor_peft_training::checkpoint::list_checkpoints(&dir.join("checkpoint")).is_empty();
    let config: TrainConfig = if has_checkpoint {
        let args = FinetuneArgs { resume: Some(dir.to_path_buf()), epochs: Some(epochs), ..FinetuneArgs::default() };
        train_config(&args)?
    } else {
        let args =
            FinetuneArgs { output: Some(dir.to_path_buf()), epochs: Some(epochs), overwrite: true, ..p.args.clone() };
        train_config(&args)?
    };
    eprintln!("compare: training {} to {epochs} epochs", p.name);
    let previous = done.as_ref().map_or(0.0, |r| r.train_seconds);
    let report = tensor_peft_training::finetune_on::<B>(&config, devices)
        .map_err(|e| CliError::Runtime(format!("{}: {e}", p.name)))?;
    let seconds = previous + report.train_seconds;
    let mut saved = report.clone();
    saved.train_seconds = seconds;
    let json = serde_json::to_vec_pretty(&saved).expect("serialisable");
    tensor_peft_models::adapter_file::write_atomically(&report_path, &json)
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    Ok((saved, seconds))
}

/// Runs the sweep and writes the results; returns the Markdown table.
pub fn run<B: AutodiffBackend>(
    path: &Path,
    budget_minutes: Option<f64>,
    devices: &[B::Device],
) -> Result<String, CliError> {
    let (sweep, planned) = plan(path)?;
    // Every run must fit before the first one starts (`force = true` in a table goes on anyway).
    for p in &planned {
        let config =
            train_config(&FinetuneArgs { output: Some(sweep.output.join("runs").join(&p.name)), ..p.args.clone() })?;
        crate::plan::check_fits(&config, p.args.force).map_err(|e| match e {
            CliError::Usage(reason) => CliError::Usage(format!("{}: {reason}", p.name)),
            other => other,
        })?;
    }
    let probe =
        train_config(&FinetuneArgs { output: Some(sweep.output.join("runs/probe")), ..planned[0].args.clone() })?;
    let metric = sweep
        .metric
        .clone()
        .or(probe.metric_for_best.clone())
        .unwrap_or_else(|| tensor_peft_training::config::default_metric(probe.task).to_string());
    let max_epochs = probe.epochs;
    std::fs::create_dir_all(sweep.output.join("runs"))
        .map_err(|e| CliError::Runtime(format!("{}: {e}", sweep.output.display())))?;
    let started = std::time::Instant::now();
    let over_budget = || budget_minutes.is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0);
    let mut results: BTreeMap<String, ResultRow> = BTreeMap::new();
    let rungs: Vec<usize> = match &sweep.halving {
        Some(h) => {
            let mut e = vec![h.min_epochs.min(max_epochs)];
            while *e.last().expect("non-empty") < max_epochs {
                let next = (e.last().expect("non-empty") * h.eta).min(max_epochs);
                e.push(next);
            }
            e
        }
        None => vec![max_epochs],
    };
    let eta = sweep.halving.as_ref().map_or(1, |h| h.eta);
    let mut alive: Vec<&Planned> = planned.iter().collect();
    for (rung, &epochs) in rungs.iter().enumerate() {
        for p in &alive {
            if over_budget() {
                eprintln!(
                    "compare: the {} min budget is spent; {} is not trained further",
                    budget_minutes.unwrap_or(0.0),
                    p.name
                );
                continue;
            }
            let (report, seconds) = train::<B>(p, &sweep.output.join("runs").join(&p.name), epochs, devices)?;
            results.insert(p.name.clone(), row(p, &report, &metric, seconds, false));
        }
        if rung + 1 == rungs.len() {
            break;
        }
        // Keep the best 1/eta by validation metric.
        let higher = tensor_peft_training::metrics::higher_is_better(&metric);
        let mut ranked: Vec<&Planned> = alive.iter().copied().filter(|p| results.contains_key(&p.name)).collect();
        ranked.sort_by(|a, b| {
            let (x, y) = (results[&a.name].valid, results[&b.name].valid);
            if higher { y.total_cmp(&x) } else { x.total_cmp(&y) }
        });
        let keep = ranked.len().div_ceil(eta).max(1);
        for p in &ranked[keep..] {
            if let Some(r) = results.get_mut(&p.name) {
                r.halted = true;
            }
        }
        alive = ranked[..keep].to_vec();
    }
    let rows: Vec<ResultRow> = planned.iter().filter_map(|p| results.get(&p.name).cloned()).collect();
    write_results(&sweep.output, &rows, &metric)
}

fn fmt(v: f64) -> String {
    if v.is_finite() { format!("{v:.4}") } else { "–".into() }
}

/// Writes `results.csv`, `results.md` and `accuracy_vs_params.png`; returns the Markdown.
pub fn write_results(dir: &Path, rows: &[ResultRow], metric: &str) -> Result<String, CliError> {
    let io = |e: tensor_peft_models::ModelError| CliError::Runtime(e.to_string());
    let mut csv = format!(
        "run,method,options,adapter_params,trainable_params,adapter_bytes,epochs,valid_{metric},test_{metric},seconds,tokens_per_second,halted\n"
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},\"{}\",{},{},{},{},{},{},{:.1},{:.1},{}\n",
            r.run,
            r.method,
            r.options,
            r.adapter_params,
            r.trainable_params,
            r.adapter_bytes,
            r.epochs,
            r.valid,
            r.test,
            r.seconds,
            r.tokens_per_second,
            r.halted
        ));
    }
    tensor_peft_models::adapter_file::write_atomically(&dir.join("results.csv"), csv.as_bytes()).map_err(io)?;
    let mut md = format!(
        "| method | options | adapter params | adapter file | epochs | best valid {metric} | test {metric} | time (s) | tokens/s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} KiB | {}{} | {} | {} | {:.0} | {:.0} |\n",
            r.method,
            r.options,
            crate::params::thousands(r.adapter_params),
            r.adapter_bytes as f64 / 1024.0,
            r.epochs,
            if r.halted { " (halved)" } else { "" },
            fmt(r.valid),
            fmt(r.test),
            r.seconds,
            r.tokens_per_second
        ));
    }
    tensor_peft_models::adapter_file::write_atomically(&dir.join("results.md"), md.as_bytes()).map_err(io)?;
    let points: Vec<(String, f64, f64)> = rows
        .iter()
        .map(|r| (r.method.clone(), r.adapter_params as f64, if r.test.is_finite() { r.test } else { r.valid }))
        .collect();
    let label =
        if rows.iter().any(|r| r.test.is_finite()) { format!("test {metric}") } else { format!("valid {metric}") };
    tensor_peft_training::plot::scatter_vs_params(
        &points,
        &label,
        tensor_peft_training::metrics::higher_is_better(metric),
        &dir.join("accuracy_vs_params.png"),
    )
    .map_err(|e| CliError::Runtime(e.to_string()))?;
    Ok(md)
}
