//! What a run tells: the line that announces it, one line per epoch and split when there is no
//! dashboard, `metrics.csv` / `metrics.json` after every epoch, and at the end the test metrics of
//! the best adapter, `curves.png` and `train_report.json` ([`FinetuneReport`]).

use crate::config::{TrainConfig, default_metric};
use crate::error::Result;
use crate::metrics::{Accumulator, EpochRecord};
use crate::strategy::FitOutcome;
use crate::task::{Batch, Encoded, TaskOutput, make_batch};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::train::InferenceStep;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tensor_peft_models::ArchSpec;
use tensor_peft_models::adapter_file::{WEIGHTS_FILE, write_atomically};

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneReport {
    /// Output directory.
    pub output: PathBuf,
    /// Trained scalars (adapters + head + norms).
    pub trainable_params: usize,
    /// Trained scalars in the adapters alone.
    pub adapter_params: usize,
    /// Size of `adapter_model.safetensors`.
    pub adapter_file_bytes: u64,
    /// Metric history.
    pub history: Vec<EpochRecord>,
    /// Selection metric, its best validation value, epoch and step.
    pub best: Option<(String, f64, usize, usize)>,
    /// Test metrics of the best adapter.
    pub test: Option<BTreeMap<String, f64>>,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Wall time of the whole run in this process (training, validation, checkpoints), seconds.
    pub train_seconds: f64,
    /// Training tokens per second over the training batches of this process (validation and
    /// checkpoint writes excluded).
    pub tokens_per_second: f64,
    /// Why training stopped.
    pub stop_reason: String,
}

/// The validation metric that picks the best epoch: `--metric-for-best`, else the task's default.
pub(crate) fn metric_for_best(cfg: &TrainConfig) -> String {
    cfg.metric_for_best.clone().unwrap_or_else(|| default_metric(cfg.task).into())
}

/// Whether the run prints plain lines instead of burn-train's dashboard: stdout is not a terminal,
/// or `TENSOR_PEFT_NO_TUI` is set.
pub(crate) fn quiet() -> bool {
    !std::io::IsTerminal::is_terminal(&std::io::stdout()) || std::env::var_os("TENSOR_PEFT_NO_TUI").is_some()
}

/// The line a quiet run starts with.
pub(crate) fn announce(
    cfg: &TrainConfig,
    spec: &ArchSpec,
    trainable_params: usize,
    adapter_params: usize,
    total_steps: usize,
) {
    println!(
        "fine-tuning {} ({}) on {} with {} ({}): {} trainable parameters ({} in adapters), {} steps",
        cfg.model.display(),
        spec.family.name(),
        cfg.task.name(),
        cfg.method.name(),
        method_settings(&cfg.method),
        trainable_params,
        adapter_params,
        total_steps
    );
}

/// The method's settings as `name value` pairs (`rank 2, alpha 4, …`), read from its serialized
/// configuration so that every method's defaults show without per-method code; options left to
/// the planner (unset shapes, targets) are left out.
fn method_settings(method: &tensor_peft_adapters::MethodConfig) -> String {
    let value = serde_json::to_value(method).unwrap_or_default();
    let Some(fields) = value.as_object() else { return String::new() };
    let shown = fields.iter().filter(|(name, value)| *name != "method" && !value.is_null());
    let pairs: Vec<String> = shown
        .map(|(name, value)| format!("{name} {}", value.as_str().map_or(value.to_string(), str::to_string)))
        .collect();
    pairs.join(", ")
}

/// One epoch's metrics of one split, as a quiet run prints them.
pub(crate) fn print_record(r: &EpochRecord) {
    let metrics: Vec<String> = r.metrics.iter().map(|(k, v)| format!("{k}={v:.4}")).collect();
    println!("epoch {} {:<5} step {:>6}  {}", r.epoch, r.split, r.step, metrics.join("  "));
}

/// Writes `metrics.csv` and `metrics.json` (atomically).
pub fn write_history(dir: &Path, history: &[EpochRecord]) -> Result<()> {
    let keys: std::collections::BTreeSet<&String> = history.iter().flat_map(|r| r.metrics.keys()).collect();
    let mut csv = String::from("epoch,split,step");
    for k in &keys {
        csv.push(',');
        csv.push_str(k);
    }
    csv.push('\n');
    for r in history {
        csv.push_str(&format!("{},{},{}", r.epoch, r.split, r.step));
        for k in &keys {
            csv.push(',');
            if let Some(v) = r.metrics.get(*k) {
                csv.push_str(&format!("{v}"));
            }
        }
        csv.push('\n');
    }
    write_atomically(&dir.join("metrics.csv"), csv.as_bytes())?;
    let json = serde_json::to_vec_pretty(history).expect("serialisable");
    write_atomically(&dir.join("metrics.json"), &json)?;
    Ok(())
}

/// Runs `model` over `items` in inference mode and accumulates the statistics.
pub fn evaluate_items<B: Backend, M: InferenceStep<Input = Batch<B>, Output = TaskOutput>>(
    model: &M,
    items: &[Encoded],
    batch_size: usize,
    pad: u32,
    device: &B::Device,
) -> Accumulator {
    let mut acc = Accumulator::default();
    for chunk in items.chunks(batch_size.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        acc.add(&model.step(make_batch::<B>(&refs, pad, device)).stats);
    }
    acc
}

/// The test split and what scoring it needs.
pub(crate) struct TestRun<'a, M> {
    /// The adapter of the best validation epoch (none if no epoch finished).
    pub(crate) best: Option<&'a M>,
    /// The encoded test examples (none without a test split).
    pub(crate) items: &'a [Encoded],
    /// The token id batches are padded with.
    pub(crate) pad: u32,
    /// Classes of a label task (0 otherwise).
    pub(crate) n_classes: usize,
    /// Print the test record (no dashboard).
    pub(crate) quiet: bool,
}

/// The end of a run: scores the best adapter on the test split, draws `curves.png` and writes
/// `train_report.json`.
pub(crate) fn finish<B, M>(
    cfg: &TrainConfig,
    outcome: FitOutcome,
    test: TestRun<'_, M>,
    trainable_params: usize,
    adapter_params: usize,
    train_seconds: f64,
    device: &B::Device,
) -> Result<FinetuneReport>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    let state = outcome.state.expect("fit stores its state");
    let lm = cfg.task == crate::data::TaskKind::CausalLm;
    let test_metrics = match (test.best, test.items.is_empty()) {
        (Some(best), false) => {
            let acc = evaluate_items(&best.valid(), test.items, cfg.batch_size, test.pad, device);
            let metrics = acc.metrics(test.n_classes, lm);
            if test.quiet {
                print_record(&EpochRecord {
                    epoch: state.best.map_or(0, |b| b.1),
                    split: "test".into(),
                    step: state.step,
                    metrics: metrics.clone(),
                });
            }
            Some(metrics)
        }
        _ => None,
    };
    crate::plot::curves(&state.history, &cfg.output.join("curves.png"))?;
    let adapter_file_bytes = std::fs::metadata(cfg.output.join(WEIGHTS_FILE)).map(|m| m.len()).unwrap_or(0);
    let report = FinetuneReport {
        output: cfg.output.clone(),
        trainable_params,
        adapter_params,
        adapter_file_bytes,
        best: state.best.map(|(v, e, s)| (metric_for_best(cfg), v, e, s)),
        history: state.history,
        test: test_metrics,
        steps: state.step,
        train_seconds,
        tokens_per_second: outcome.tokens as f64 / outcome.train_seconds.max(1e-9),
        stop_reason: outcome.stop_reason,
    };
    let json = serde_json::to_vec_pretty(&report).expect("serialisable");
    write_atomically(&cfg.output.join("train_report.json"), &json)?;
    Ok(report)
}
