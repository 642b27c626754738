//! `tpeft finetune` and `tpeft eval`: command-line flags (also the keys of `--config run.toml`)
//! turned into the training library's [`TrainConfig`], and the printed summaries.

use crate::CliError;
use crate::params::{MethodArgs, thousands};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tensor_peft_training::data::{FieldMap, TaskKind};
use tensor_peft_training::optim::Decay;
use tensor_peft_training::{FinetuneReport, TrainConfig};

/// The flags of `tpeft finetune`; a `--config` TOML file uses the same names in snake_case.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneArgs {
    /// A TOML file with any of these options (flags given on the command line win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HF model directory (BERT or LLaMA family) or LLaMA .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Precision of the frozen base model's matrices: f32, bf16, f16, q8_0, q4_0
    /// (GGML blocks; embeddings in bf16) or native (as the checkpoint stores them). Adapters train
    /// in f32 [default: f32].
    #[arg(long)]
    pub base_dtype: Option<String>,
    /// `--config` and sweep files: the precision of the frozen base's products, as the global
    /// `--compute-dtype` flag (which wins over a `finetune --config` file; it is recorded in
    /// train_config.json, and `--resume` keeps it unless the flag names another).
    #[arg(skip)]
    pub compute_dtype: Option<String>,
    /// classification, regression, causal-lm, lm-classification, lm-multiple-choice,
    /// lm-generation or dpo.
    #[arg(long)]
    pub task: Option<String>,
    /// Training data (.jsonl, .csv, .tsv) or builtin:vader-movie-reviews / builtin:chatterbot.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Validation data (default: a seeded split of --train).
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Test data, evaluated with the best adapter at the end.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Percent of --train held out for validation when no --valid is given [default: 10].
    #[arg(long)]
    pub valid_percent: Option<usize>,
    /// Percent of --train held out for test when no --test is given [default: 0].
    #[arg(long)]
    pub test_percent: Option<usize>,
    /// Train on at most this many examples.
    #[arg(long)]
    pub max_train_examples: Option<usize>,
    /// Column/key of the text [default: text].
    #[arg(long)]
    pub text_field: Option<String>,
    /// Column/key of the second text of a pair [default: text_pair].
    #[arg(long)]
    pub text_pair_field: Option<String>,
    /// Column/key of the label [default: label].
    #[arg(long)]
    pub label_field: Option<String>,
    /// Column/key of the regression score [default: score].
    #[arg(long)]
    pub score_field: Option<String>,
    /// Column/key of the prompt [default: prompt].
    #[arg(long)]
    pub prompt_field: Option<String>,
    /// Column/key of the completion [default: completion].
    #[arg(long)]
    pub completion_field: Option<String>,
    /// Key of the chat messages [default: messages].
    #[arg(long)]
    pub messages_field: Option<String>,
    /// Key of the candidate continuations of lm-multiple-choice [default: choices].
    #[arg(long)]
    pub choices_field: Option<String>,
    /// Key of the gold answers of lm-generation [default: answers, else answer].
    #[arg(long)]
    pub answers_field: Option<String>,
    /// dpo: column/key of the preferred response [default: chosen].
    #[arg(long)]
    pub chosen_field: Option<String>,
    /// dpo: column/key of the dispreferred response [default: rejected].
    #[arg(long)]
    pub rejected_field: Option<String>,
    /// Report malformed rows and go on instead of stopping.
    #[arg(long)]
    #[serde(default)]
    pub skip_bad_rows: bool,
    /// The adapter method and its hyper-parameters (the same flags as `tpeft params`).
    #[command(flatten)]
    #[serde(flatten)]
    pub adapter: MethodArgs,
    /// Comma-separated target modules (exact names or suffixes).
    #[arg(long, value_delimiter = ',', conflicts_with = "target_regex")]
    pub targets: Option<Vec<String>>,
    /// Regular expression over whole module names.
    #[arg(long)]
    pub target_regex: Option<String>,
    /// Also train the normalisation layers.
    #[arg(long)]
    #[serde(default)]
    pub train_norms: bool,
    /// Recompute each block's activations in the backward pass instead of keeping them: less
    /// memory, the same gradients, about a third more compute. Adapters must have no dropout.
    #[arg(long)]
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Head of classification and regression: linear (on the checkpoint's pooler) or tt
    /// (LoRETTA's tensorized head: a fresh TT layer replaces the pooler) [default: linear].
    #[arg(long)]
    pub head: Option<String>,
    /// Epochs [default: 3].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per batch [default: 16].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Batches per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accumulation: Option<usize>,
    /// Peak learning rate of the adapters [default: the method's recommended settings, printed when
    /// the run starts: its learning rate and LoRA+ ratio, the head at 1e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Peak learning rate of the task head [default: --lr, or 1e-3 without --lr].
    #[arg(long)]
    pub head_lr: Option<f64>,
    /// LoRA+: the factor that starts at zero (e.g. LoRA's B) trains at this multiple of --lr, as
    /// PEFT's loraplus_lr_ratio [default: off, or the method's recommended ratio without --lr].
    #[arg(long)]
    pub loraplus_lr_ratio: Option<f64>,
    /// AdamW weight decay [default: 0.01].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Fraction of steps for linear warmup [default: 0.06].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// linear, cosine or constant after warmup [default: linear].
    #[arg(long)]
    pub decay: Option<String>,
    /// Global gradient-norm clipping, 0 = off [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Longest sequence in tokens [default: 128].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Seed of initialisation, split, shuffling and dropout [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seed of the train/valid/test split only [default: --seed]; vary --seed with this fixed for
    /// seed studies on one split.
    #[arg(long)]
    pub split_seed: Option<u64>,
    /// Validation metric that picks the best epoch (default: accuracy / pearson / loss).
    #[arg(long)]
    pub metric_for_best: Option<String>,
    /// Stop after this many evaluations without improvement (each epoch end, and each
    /// --eval-every-steps evaluation).
    #[arg(long)]
    pub early_stopping_patience: Option<usize>,
    /// Also checkpoint every this many optimizer steps [default: 0 = at epoch ends].
    #[arg(long)]
    pub save_every_steps: Option<usize>,
    /// Also evaluate on the validation split every this many optimizer steps, keeping the best
    /// step's adapter [default: 0 = at epoch ends].
    #[arg(long)]
    pub eval_every_steps: Option<usize>,
    /// lm-classification: one word per label, in label order (e.g. terrible,great).
    #[arg(long, value_delimiter = ',')]
    pub verbalizers: Option<Vec<String>>,
    /// lm-classification prompt; {text} and {text_pair} are replaced [default: "{text} It was"].
    #[arg(long)]
    pub template: Option<String>,
    /// lm-generation: longest greedy answer when evaluating, in tokens [default: 32].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// dpo: β of the loss, how strongly the model is held to the reference (the base without
    /// adapters) [default: 0.1, as TRL].
    #[arg(long)]
    pub dpo_beta: Option<f64>,
    /// Output directory.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Evaluate the validation split before training (recorded as epoch 0).
    #[arg(long)]
    #[serde(default)]
    pub eval_before_training: bool,
    /// Start from the adapter saved in this directory (same method and targets; the task head
    /// starts fresh): sequential multi-task learning.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Replace a run already in the output directory.
    #[arg(long)]
    #[serde(default)]
    pub overwrite: bool,
    /// Start even when `tpeft plan`'s estimate of the run's peak memory exceeds the memory
    /// available on this machine.
    #[arg(long)]
    #[serde(default)]
    pub force: bool,
    /// Continue the run in this output directory (its options are read from train_config.json).
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
}

/// The `compute_dtype` key of the `--config` file, if any.
pub fn config_compute_dtype(args: &FinetuneArgs) -> Result<Option<String>, CliError> {
    let Some(path) = &args.config else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|e| usage(format!("--config {}: {e}", path.display())))?;
    let file: FinetuneArgs = toml::from_str(&text).map_err(|e| usage(format!("--config {}: {e}", path.display())))?;
    Ok(file.compute_dtype)
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

/// Merges `--config` (if any) under the flags and builds the training configuration.
pub fn train_config(args: &FinetuneArgs) -> Result<TrainConfig, CliError> {
    let config = if let Some(dir) = &args.resume {
        resume_config(dir, args)?
    } else {
        let mut merged = args.clone();
        if let Some(path) = &args.config {
            let text = std::fs::read_to_string(path).map_err(|e| usage(format!("--config {}: {e}", path.display())))?;
            let file: FinetuneArgs =
                toml::from_str(&text).map_err(|e| usage(format!("--config {}: {e}", path.display())))?;
            merged = overlay(file, args)?;
        }
        build(&merged)?
    };
    // A usage error (exit 2) before anything is loaded or written.
    tensor_peft_training::config::check_gradient_checkpointing(&config).map_err(usage)?;
    Ok(config)
}

/// `flags` over `file`: every option given on the command line replaces the file's.
fn overlay(file: FinetuneArgs, flags: &FinetuneArgs) -> Result<FinetuneArgs, CliError> {
    let mut base = serde_json::to_value(&file).expect("serialisable");
    let top = serde_json::to_value(flags).expect("serialisable");
    if let (Some(base), Some(top)) = (base.as_object_mut(), top.as_object()) {
        for (k, v) in top {
            if !v.is_null() && v != &serde_json::Value::Bool(false) {
                base.insert(k.clone(), v.clone());
            }
        }
    }
    serde_json::from_value(base).map_err(usage)
}

fn build(a: &FinetuneArgs) -> Result<TrainConfig, CliError> {
    let d = TrainConfig::default();
    let required = |v: &Option<PathBuf>, flag: &str| v.clone().ok_or_else(|| usage(format!("{flag} is required")));
    let task = TaskKind::parse(a.task.as_deref().ok_or_else(|| usage("--task is required"))?).map_err(usage)?;
    let method = a.adapter.config("lora")?;
    let decay = match a.decay.as_deref() {
        None | Some("linear") => Decay::Linear,
        Some("cosine") => Decay::Cosine,
        Some("constant") => Decay::Constant,
        Some(other) => return Err(usage(format!("--decay {other}: expected linear, cosine or constant"))),
    };
    let df = FieldMap::default();
    let base_dtype = match &a.base_dtype {
        Some(name) => name.parse().map_err(|e| usage(format!("--base-dtype: {e}")))?,
        None => d.base_dtype,
    };
    let model = required(&a.model, "--model")?;
    if !model.exists() {
        return Err(usage(format!("--model {}: no such file or directory", model.display())));
    }
    let train = required(&a.train, "--train")?;
    for (flag, path) in [("--train", Some(&train)), ("--valid", a.valid.as_ref()), ("--test", a.test.as_ref())] {
        if let Some(p) = path
            && !p.to_string_lossy().starts_with("builtin:")
            && !p.is_file()
        {
            return Err(usage(format!("{flag} {}: no such file", p.display())));
        }
    }
    Ok(TrainConfig {
        model,
        base_dtype,
        task,
        train,
        valid: a.valid.clone(),
        test: a.test.clone(),
        valid_percent: a.valid_percent.unwrap_or(d.valid_percent),
        test_percent: a.test_percent.unwrap_or(d.test_percent),
        max_train_examples: a.max_train_examples,
        fields: FieldMap {
            text: a.text_field.clone().unwrap_or(df.text),
            text_pair: a.text_pair_field.clone().unwrap_or(df.text_pair),
            label: a.label_field.clone().unwrap_or(df.label),
            score: a.score_field.clone().unwrap_or(df.score),
            prompt: a.prompt_field.clone().unwrap_or(df.prompt),
            completion: a.completion_field.clone().unwrap_or(df.completion),
            messages: a.messages_field.clone().unwrap_or(df.messages),
            choices: a.choices_field.clone().unwrap_or(df.choices),
            answers: a.answers_field.clone().unwrap_or(df.answers),
            chosen: a.chosen_field.clone().unwrap_or(df.chosen),
            rejected: a.rejected_field.clone().unwrap_or(df.rejected),
        },
        skip_bad_rows: a.skip_bad_rows,
        method,
        target_modules: a.targets.clone(),
        target_regex: a.target_regex.clone(),
        train_norms: a.train_norms,
        head: match &a.head {
            Some(name) => tensor_peft_training::HeadKind::parse(name).map_err(|e| CliError::Usage(e.to_string()))?,
            None => d.head,
        },
        epochs: a.epochs.unwrap_or(d.epochs),
        max_steps: a.max_steps,
        batch_size: a.batch_size.unwrap_or(d.batch_size),
        grad_accumulation: a.grad_accumulation.unwrap_or(d.grad_accumulation),
        lr: a.lr.or(d.lr),
        head_lr: a.head_lr,
        loraplus_lr_ratio: a.loraplus_lr_ratio,
        weight_decay: a.weight_decay.unwrap_or(d.weight_decay),
        warmup_ratio: a.warmup_ratio.unwrap_or(d.warmup_ratio),
        decay,
        max_grad_norm: match a.max_grad_norm {
            Some(0.0) => None,
            Some(n) => Some(n),
            None => d.max_grad_norm,
        },
        max_len: a.max_len.unwrap_or(d.max_len),
        seed: a.seed.unwrap_or(d.seed),
        split_seed: a.split_seed.or(d.split_seed),
        metric_for_best: a.metric_for_best.clone(),
        early_stopping_patience: a.early_stopping_patience,
        save_every_steps: a.save_every_steps.unwrap_or(d.save_every_steps),
        eval_every_steps: a.eval_every_steps.unwrap_or(d.eval_every_steps),
        verbalizers: a.verbalizers.clone().unwrap_or_default(),
        template: a.template.clone().unwrap_or(d.template),
        max_new_tokens: a.max_new_tokens.unwrap_or(d.max_new_tokens),
        dpo_beta: a.dpo_beta.unwrap_or(d.dpo_beta),
        output: required(&a.output, "--output")?,
        overwrite: a.overwrite,
        resume: false,
        eval_before_training: a.eval_before_training,
        init_from: a.init_from.clone(),
        gradient_checkpointing: a.gradient_checkpointing,
        // A sweep run's own key, else the process's (the global flag, already set).
        compute_dtype: match &a.compute_dtype {
            Some(name) => name.parse().map_err(|e| usage(format!("compute_dtype: {e}")))?,
            None => tensor_peft_kernels::compute_dtype(),
        },
    })
}

/// The configuration of the run in `dir`, with the options that may change on resume applied.
fn resume_config(dir: &Path, a: &FinetuneArgs) -> Result<TrainConfig, CliError> {
    let path = dir.join("train_config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| usage(format!("--resume {}: cannot read {}: {e}", dir.display(), path.display())))?;
    let mut cfg: TrainConfig = serde_json::from_str(&text)
        .map_err(|e| CliError::Runtime(format!("{}: invalid run configuration: {e}", path.display())))?;
    cfg.resume = true;
    cfg.overwrite = false;
    cfg.output = dir.to_path_buf();
    cfg.epochs = a.epochs.unwrap_or(cfg.epochs);
    cfg.max_steps = a.max_steps.or(cfg.max_steps);
    cfg.early_stopping_patience = a.early_stopping_patience.or(cfg.early_stopping_patience);
    cfg.save_every_steps = a.save_every_steps.unwrap_or(cfg.save_every_steps);
    cfg.eval_every_steps = a.eval_every_steps.unwrap_or(cfg.eval_every_steps);
    // The same gradients either way: checkpointing may be turned on for the rest of a run.
    cfg.gradient_checkpointing |= a.gradient_checkpointing;
    // The recorded precision unless `--compute-dtype` names another.
    if let Some(name) = &a.compute_dtype {
        cfg.compute_dtype = name.parse().map_err(|e| usage(format!("--compute-dtype: {e}")))?;
    }
    Ok(cfg)
}

/// The summary printed when `finetune` ends.
pub fn render_report(r: &FinetuneReport) -> String {
    let mut out = format!(
        "stopped: {} after {} steps ({:.1} s, {:.0} tokens/s)\ntrainable params: {} ({} in adapters)\nadapter: {} ({} bytes)\n",
        r.stop_reason,
        r.steps,
        r.train_seconds,
        r.tokens_per_second,
        thousands(r.trainable_params),
        thousands(r.adapter_params),
        r.output.display(),
        thousands(r.adapter_file_bytes as usize)
    );
    if let Some((metric, value, epoch, step)) = &r.best {
        out.push_str(&format!("best valid {metric}: {value:.4} (epoch {epoch}, step {step})\n"));
    }
    if let Some(test) = &r.test {
        for (k, v) in test {
            out.push_str(&format!("test {k}: {v:.4}\n"));
        }
    }
    out
}
