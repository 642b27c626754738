//! `finetune`: from a model path, a task, data and a method to a small adapter directory.
//!
//! Loads the base model and data, builds the task model with its adapters, and runs burn-train's
//! `SupervisedTraining` / `Learner` with the strategy of [`crate::strategy`]. Metrics go to
//! burn-train's dashboard (TUI on a terminal) and, one line per epoch and split, to stdout
//! otherwise; `metrics.csv`, `metrics.json` and `curves.png` are written to the output directory.

use crate::checkpoint::{self, TrainerState};
pub use crate::config::{TaskInfo, TrainConfig, validate};
use crate::config::{default_metric, fingerprint, targets_of};
use crate::data::{self, Example, Labels, TaskKind};
use crate::error::{Result, TrainError};
use crate::loader::TaskLoader;
use crate::metrics::{Accumulator, DashboardMetric, EpochRecord};
use crate::optim::{PeftOptimizer, WarmupSchedule};
use crate::strategy::{FitOutcome, NullLogger, PeftStrategy, QuietRenderer, print_record};
use crate::task::{Batch, Encoded, Encoder, EncoderTask, LmTask, TaskOutput, make_batch, verbalizer_ids};
use burn::module::{AutodiffModule, Module, ParamId};
use burn::optim::Optimizer;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::train::metric::LearningRateMetric;
use burn::train::{InferenceStep, Learner, SupervisedTraining, TrainStep, TrainingStrategy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tensor_peft_models::adapter_file::{AdapterConfig, BaseModelIdentity};
use tensor_peft_models::tokenizer::TextTokenizer;
use tensor_peft_models::{ArchSpec, Bert, Family, Llama, SequenceClassifier};

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

/// Loaded base model, tokenizer and architecture.
#[allow(clippy::large_enum_variant)] // built once per run, never moved in a loop
pub enum BaseModel<B: Backend> {
    /// BERT family.
    Encoder(Bert<B>, ArchSpec, TextTokenizer),
    /// LLaMA family.
    Decoder(Llama<B>, ArchSpec, TextTokenizer),
}

/// Loads a model directory (BERT or LLaMA, from `config.json`) or a LLaMA `.gguf` file.
pub fn load_base<B: Backend>(path: &Path, device: &B::Device) -> Result<BaseModel<B>> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let (llama, spec, tok) = Llama::<B>::from_gguf(path, device)?;
        return Ok(BaseModel::Decoder(llama, spec, tok));
    }
    if !path.is_dir() {
        return Err(TrainError::Option {
            option: "model",
            reason: format!("{} is neither a model directory nor a .gguf file", path.display()),
        });
    }
    let spec = ArchSpec::from_config_file(&path.join("config.json"))?;
    let tokenizer = TextTokenizer::from_hf_dir(path)?;
    Ok(match spec.family {
        Family::Bert => BaseModel::Encoder(Bert::<B>::from_hf_dir(path, device)?.0, spec, tokenizer),
        Family::Llama => BaseModel::Decoder(Llama::<B>::from_hf_dir(path, device)?.0, spec, tokenizer),
    })
}

/// Train, valid and test examples, and notes about skipped rows.
pub type Splits = (Vec<Example>, Vec<Example>, Vec<Example>, Vec<String>);

/// Train / valid / test examples for `cfg` (a seeded split of `train` when no valid file is given).
pub fn load_splits(cfg: &TrainConfig) -> Result<Splits> {
    let mut notes = Vec::new();
    let read = |path: &Path, notes: &mut Vec<String>| -> Result<Vec<Example>> {
        let name = path.to_string_lossy();
        if let Some(builtin) = name.strip_prefix("builtin:") {
            return builtin_dataset(builtin, cfg.task);
        }
        let data = data::read_file(path, cfg.task, &cfg.fields, cfg.skip_bad_rows)?;
        if !data.skipped.is_empty() {
            notes.push(format!(
                "{}: skipped {} bad rows, e.g. {}",
                path.display(),
                data.skipped.len(),
                data.skipped[0]
            ));
        }
        Ok(data.examples)
    };
    let all = read(&cfg.train, &mut notes)?;
    let (mut train, valid, test) = match &cfg.valid {
        Some(valid) => {
            let test = match &cfg.test {
                Some(t) => read(t, &mut notes)?,
                None => Vec::new(),
            };
            (all, read(valid, &mut notes)?, test)
        }
        None => {
            let test_percent = if cfg.test.is_some() { 0 } else { cfg.test_percent };
            let [tr, va, te] =
                data::split_indices(all.len(), cfg.split_seed.unwrap_or(cfg.seed), cfg.valid_percent, test_percent);
            let test = match &cfg.test {
                Some(t) => read(t, &mut notes)?,
                None => data::pick(&all, &te),
            };
            (data::pick(&all, &tr), data::pick(&all, &va), test)
        }
    };
    if let Some(n) = cfg.max_train_examples {
        train.truncate(n);
    }
    if train.is_empty() || valid.is_empty() {
        return Err(TrainError::Data {
            path: cfg.train.clone(),
            reason: format!(
                "too few examples: {} for training and {} for validation (give --valid or raise --valid-percent)",
                train.len(),
                valid.len()
            ),
        });
    }
    Ok((train, valid, test, notes))
}

/// The corpora fetched by `scripts/fetch-assets.sh`, by name.
pub fn builtin_dataset(name: &str, task: TaskKind) -> Result<Vec<Example>> {
    let root = std::env::var_os("TENSOR_PEFT_ASSETS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("assets"));
    match (name, task) {
        ("vader-movie-reviews", TaskKind::Classification | TaskKind::LmClassification) => {
            data::vader_movie_reviews(&root.join("vader/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"))
        }
        ("chatterbot", TaskKind::CausalLm) => {
            data::chatterbot_conversations(&root.join("chatterbot/chatterbot_corpus/data/english"))
        }
        _ => Err(TrainError::Option {
            option: "train",
            reason: format!(
                "unknown built-in data set `{name}` for task {}: expected builtin:vader-movie-reviews (classification, lm-classification) or builtin:chatterbot (causal-lm); run scripts/fetch-assets.sh first",
                task.name()
            ),
        }),
    }
}

/// The task-specific side of training: a trainable model made from a base model.
pub trait TaskModel<B: AutodiffBackend>:
    TrainStep<Input = Batch<B>, Output = TaskOutput> + AutodiffModule<B> + core::fmt::Display + 'static
where
    Self::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    /// Writes the adapter directory (adapter factors + `extras`) for this model.
    fn write_adapter(&self, spec: &ArchSpec, config: &AdapterConfig, dir: &Path) -> Result<()>;
    /// Trained scalars in the adapters (excluding heads and norms).
    fn adapter_params(&self) -> usize;
    /// `‖ΔW‖_F / ‖W‖_F` of every adapted projection, by site name
    /// ([`tensor_peft_models::update_ratios`]).
    fn update_ratios(&self, spec: &ArchSpec) -> Vec<(String, f64)>;
}

/// Whether a parameter path belongs to an adapter (factor or shared factor).
fn is_adapter_path(path: &str) -> bool {
    path.split('.').any(|seg| seg == "adapter" || seg.ends_with("_adapter") || seg == "shared")
}

/// Trained tensors that are not adapter factors, named without the task wrapper's `net.`.
fn extras<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    checkpoint::trainable_params(model)
        .into_iter()
        .filter(|(p, ..)| !is_adapter_path(p))
        .map(|(p, s, v, _)| (p.strip_prefix("net.").unwrap_or(&p).to_string(), s, v))
        .collect()
}

fn adapter_count<B: Backend, M: Module<B>>(model: &M) -> usize {
    checkpoint::trainable_params(model)
        .iter()
        .filter(|(p, ..)| is_adapter_path(p))
        .map(|(_, s, ..)| s.iter().product::<usize>())
        .sum()
}

impl<B: AutodiffBackend> TaskModel<B> for EncoderTask<B> {
    fn write_adapter(&self, spec: &ArchSpec, config: &AdapterConfig, dir: &Path) -> Result<()> {
        let mut encoder = self.net.encoder.clone();
        let extras = extras(self);
        tensor_peft_models::adapter_file::save_adapter_with_extras(&mut encoder, spec, config, dir, &extras)?;
        Ok(())
    }
    fn adapter_params(&self) -> usize {
        adapter_count(self)
    }
    fn update_ratios(&self, spec: &ArchSpec) -> Vec<(String, f64)> {
        tensor_peft_models::update_ratios(&mut self.net.encoder.clone(), spec)
    }
}

impl<B: AutodiffBackend> TaskModel<B> for LmTask<B> {
    fn write_adapter(&self, spec: &ArchSpec, config: &AdapterConfig, dir: &Path) -> Result<()> {
        let mut net = self.net.clone();
        let extras = extras(self);
        tensor_peft_models::adapter_file::save_adapter_with_extras(&mut net, spec, config, dir, &extras)?;
        Ok(())
    }
    fn adapter_params(&self) -> usize {
        adapter_count(self)
    }
    fn update_ratios(&self, spec: &ArchSpec) -> Vec<(String, f64)> {
        tensor_peft_models::update_ratios(&mut self.net.clone(), spec)
    }
}

/// LoRA+'s fast group: the factors that start at zero, i.e. LoRA's `B` (`….Lora.b`) and the last
/// core of every TT-LoRA train (`….TtLora.tt.cores.<last>`), given trainable parameter paths.
pub fn zero_init_factor_ids(paths: &[(String, ParamId)]) -> HashSet<ParamId> {
    let mut last_core: std::collections::HashMap<&str, (usize, ParamId)> = Default::default();
    let mut ids = HashSet::new();
    for (path, id) in paths {
        if path.ends_with(".Lora.b") {
            ids.insert(*id);
        } else if let Some((train, index)) = path.rsplit_once(".TtLora.tt.cores.")
            && let Ok(index) = index.parse::<usize>()
        {
            let entry = last_core.entry(train).or_insert((index, *id));
            if index >= entry.0 {
                *entry = (index, *id);
            }
        }
    }
    ids.extend(last_core.into_values().map(|(_, id)| id));
    ids
}

/// Files a run writes at the top of its output directory.
const RUN_FILES: [&str; 4] = ["train_config.json", "metrics.csv", "adapter_config.json", "checkpoint"];

/// Refuses to train into a directory that holds another run (unless `overwrite`), creates it.
fn prepare_output(cfg: &TrainConfig) -> Result<()> {
    let out = &cfg.output;
    let holds_run = RUN_FILES.iter().any(|f| out.join(f).exists());
    if cfg.resume {
        if checkpoint::list_checkpoints(&out.join("checkpoint")).is_empty() {
            return Err(TrainError::Checkpoint {
                path: out.join("checkpoint"),
                reason: "no complete checkpoint to resume from".into(),
            });
        }
        return Ok(());
    }
    if holds_run {
        if !cfg.overwrite {
            return Err(TrainError::Option {
                option: "output",
                reason: format!(
                    "{} already holds a run; pass --overwrite to replace it or --resume to continue it",
                    out.display()
                ),
            });
        }
        for f in RUN_FILES.iter().chain(&[
            "metrics.json",
            "adapter_model.safetensors",
            "last",
            "curves.png",
            "train_report.json",
        ]) {
            let p = out.join(f);
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    // Fail now, not after an hour of training, when the directory is not writable.
    let probe = out.join(".write-test");
    std::fs::write(&probe, b"").map_err(TrainError::io(out))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn wrong_family(task: TaskKind, spec: &ArchSpec) -> TrainError {
    let needs = match task {
        TaskKind::Classification | TaskKind::Regression => "an encoder (BERT family)",
        TaskKind::CausalLm | TaskKind::LmClassification => "a causal LM (LLaMA family)",
    };
    TrainError::Option {
        option: "task",
        reason: format!("task {} needs {needs}, but {} is a {} model", task.name(), spec.source, spec.family.name()),
    }
}

/// Where a run stops early on purpose (tests of resuming: as if the process were killed right
/// after a checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAt {
    /// Run to the end.
    Never,
    /// Stop right after the checkpoint of this optimizer step, writing nothing else.
    Step(usize),
}

/// Fine-tunes `cfg.model` on `cfg.task` with `cfg.method` and writes the adapter directory.
pub fn finetune<B: AutodiffBackend>(cfg: &TrainConfig, device: &B::Device) -> Result<FinetuneReport> {
    finetune_until::<B>(cfg, device, StopAt::Never)
}

/// [`finetune`] that stops at `stop` (see [`StopAt`]).
pub fn finetune_until<B: AutodiffBackend>(
    cfg: &TrainConfig,
    device: &B::Device,
    stop: StopAt,
) -> Result<FinetuneReport> {
    validate(cfg)?;
    // The task must suit the model family: checked from config.json before any data is read.
    if cfg.model.extension().is_none_or(|e| e != "gguf") && cfg.model.is_dir() {
        let spec = ArchSpec::from_config_file(&cfg.model.join("config.json"))?;
        let encoder_task = matches!(cfg.task, TaskKind::Classification | TaskKind::Regression);
        if encoder_task != (spec.family == Family::Bert) {
            return Err(wrong_family(cfg.task, &spec));
        }
    } else if matches!(cfg.task, TaskKind::Classification | TaskKind::Regression) {
        let spec = ArchSpec::from_model_arg(&cfg.model.to_string_lossy())?;
        return Err(wrong_family(cfg.task, &spec));
    }
    let (train, valid, test, notes) = load_splits(cfg)?;
    for note in notes {
        eprintln!("warning: {note}");
    }
    prepare_output(cfg)?;
    B::seed(device, cfg.seed);
    let base = load_base::<B>(&cfg.model, device)?;
    let labels = if cfg.task.has_labels() { Some(Labels::from_examples(&train, &cfg.train)?) } else { None };
    let targets = targets_of(cfg);
    let label_names = labels.as_ref().map(|l| l.names.clone());
    match base {
        BaseModel::Encoder(bert, spec, tokenizer) => {
            if !matches!(cfg.task, TaskKind::Classification | TaskKind::Regression) {
                return Err(wrong_family(cfg.task, &spec));
            }
            let mut bert = bert.adapt(&spec, &cfg.method, &targets)?;
            if cfg.train_norms {
                bert = bert.train_norms();
            }
            let n_outputs = labels.as_ref().map_or(1, Labels::len);
            let model = EncoderTask {
                net: SequenceClassifier::new(bert, n_outputs),
                regression: cfg.task == TaskKind::Regression,
            };
            let info = TaskInfo {
                task: cfg.task,
                labels: label_names,
                n_outputs,
                verbalizers: Vec::new(),
                template: String::new(),
                max_len: cfg.max_len,
                peft_task_type: "SEQ_CLS".into(),
            };
            let pad = tokenizer.token_id("[PAD]").unwrap_or(0);
            run(cfg, model, &spec, &tokenizer, labels.as_ref(), [train, valid, test], pad, info, device, stop)
        }
        BaseModel::Decoder(llama, spec, tokenizer) => {
            if !matches!(cfg.task, TaskKind::CausalLm | TaskKind::LmClassification) {
                return Err(wrong_family(cfg.task, &spec));
            }
            if spec.positions > 0 && cfg.max_len > spec.positions {
                return Err(TrainError::Option {
                    option: "max-len",
                    reason: format!("{} exceeds the model's context of {} tokens", cfg.max_len, spec.positions),
                });
            }
            let mut llama = llama.adapt(&spec, &cfg.method, &targets)?;
            if cfg.train_norms {
                llama = llama.train_norms();
            }
            let verbalizer = if cfg.task == TaskKind::LmClassification {
                let n = labels.as_ref().map_or(0, Labels::len);
                if cfg.verbalizers.len() != n {
                    return Err(TrainError::Option {
                        option: "verbalizers",
                        reason: format!(
                            "{} words given for {n} labels {:?}; give one word per label, in label order",
                            cfg.verbalizers.len(),
                            label_names.clone().unwrap_or_default()
                        ),
                    });
                }
                verbalizer_ids(&tokenizer, &cfg.verbalizers)?
            } else {
                Vec::new()
            };
            let model = LmTask { net: llama, verbalizer };
            let info = TaskInfo {
                task: cfg.task,
                labels: label_names,
                n_outputs: 0,
                verbalizers: cfg.verbalizers.clone(),
                template: cfg.template.clone(),
                max_len: cfg.max_len,
                peft_task_type: "CAUSAL_LM".into(),
            };
            let pad = tokenizer.eos.unwrap_or(0);
            run(cfg, model, &spec, &tokenizer, labels.as_ref(), [train, valid, test], pad, info, device, stop)
        }
    }
}

/// The adapter config written for a run.
fn adapter_config(cfg: &TrainConfig, spec: &ArchSpec, info: &TaskInfo) -> AdapterConfig {
    AdapterConfig {
        method: cfg.method.clone(),
        target_modules: cfg.target_modules.clone(),
        target_regex: cfg.target_regex.clone(),
        base_model_name_or_path: cfg.model.to_string_lossy().into(),
        base_model: Some(BaseModelIdentity::of(spec)),
        peft_type: if cfg.method.name() == "lora" { "LORA".into() } else { cfg.method.name().to_uppercase() },
        library_version: env!("CARGO_PKG_VERSION").into(),
        task: Some(serde_json::to_value(info).expect("serialisable")),
    }
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

#[allow(clippy::too_many_arguments)]
fn run<B, M>(
    cfg: &TrainConfig,
    model: M,
    spec: &ArchSpec,
    tokenizer: &TextTokenizer,
    labels: Option<&Labels>,
    [train, valid, test]: [Vec<Example>; 3],
    pad: u32,
    info: TaskInfo,
    device: &B::Device,
    stop: StopAt,
) -> Result<FinetuneReport>
where
    B: AutodiffBackend,
    M: TaskModel<B>,
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    let encoder = Encoder {
        tokenizer,
        task: cfg.task,
        max_len: cfg.max_len,
        labels,
        template: &cfg.template,
        eos: tokenizer.eos,
    };
    let (train_items, report) = encoder.encode_all(&train)?;
    if report.truncated > 0 || report.dropped > 0 {
        eprintln!(
            "note: {} training examples truncated to {} tokens, {} dropped (prompt fills the length)",
            report.truncated, cfg.max_len, report.dropped
        );
    }
    if train_items.is_empty() {
        return Err(TrainError::Data { path: cfg.train.clone(), reason: "no training example fits --max-len".into() });
    }
    let (valid_items, _) = encoder.encode_all(&valid)?;
    let (test_items, _) = encoder.encode_all(&test)?;
    let model = checkpoint::stable_param_ids(model);
    // Trained parameter paths, read once: they pick the head's and LoRA+'s optimizer groups.
    let param_paths: Vec<(String, ParamId)> =
        checkpoint::trainable_params(&model).into_iter().map(|(p, .., id)| (p, id)).collect();
    let head_ids: HashSet<ParamId> =
        param_paths.iter().filter(|(p, _)| p.starts_with("net.head.")).map(|(_, id)| *id).collect();
    let trainable_params = checkpoint::trainable_count(&model);
    let adapter_params = model.adapter_params();
    let checkpoint_root = cfg.output.join("checkpoint");
    let fingerprint = fingerprint(cfg);
    let mut optimizer = PeftOptimizer::<M, B>::new(
        cfg.weight_decay,
        head_ids,
        cfg.head_lr.map_or(1.0, |h| h / cfg.lr),
        cfg.max_grad_norm,
    );
    if let Some(ratio) = cfg.loraplus_lr_ratio {
        optimizer = optimizer.with_fast_group(zero_init_factor_ids(&param_paths), ratio);
    }
    let (model, start) = if cfg.resume {
        let (_, dir) = checkpoint::list_checkpoints(&checkpoint_root).pop().expect("checked by prepare_output");
        let state = checkpoint::read_state(&dir)?;
        if state.fingerprint != fingerprint {
            return Err(TrainError::Checkpoint {
                path: dir,
                reason: "was written by a run with other data, model, method or hyper-parameters; resume with the same options (only --epochs, --max-steps, --early-stopping-patience and --save-every-steps may change)".into(),
            });
        }
        let model = checkpoint::restore_trainable(
            model,
            checkpoint::read_safetensors(&dir.join(checkpoint::TRAINABLE_FILE))?,
            &dir,
        )?;
        if dir.join(checkpoint::OPTIMIZER_FILE).exists() {
            optimizer = optimizer.load_record(checkpoint::read_optimizer::<B>(&dir, device)?);
        }
        eprintln!("resuming from {} (epoch {}, step {})", dir.display(), state.epoch, state.step);
        (model, state)
    } else {
        let state = TrainerState {
            fingerprint,
            epoch: 1,
            batches_done: 0,
            step: 0,
            epoch_finished: false,
            history: Vec::new(),
            best: None,
            epochs_without_improvement: 0,
            partial_train: None,
        };
        (model, state)
    };
    let config_json = serde_json::to_vec_pretty(cfg).expect("serialisable");
    tensor_peft_models::adapter_file::write_atomically(&cfg.output.join("train_config.json"), &config_json)?;

    let batches_per_epoch = train_items.len().div_ceil(cfg.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(cfg.grad_accumulation);
    let total_steps = (steps_per_epoch * cfg.epochs).min(cfg.max_steps.unwrap_or(usize::MAX));
    let schedule = WarmupSchedule {
        peak: cfg.lr,
        warmup: (cfg.warmup_ratio * total_steps as f64).ceil() as usize,
        total: total_steps,
        decay: cfg.decay,
        step: start.step,
    };
    let train_loader = TaskLoader::<B>::new(Arc::new(train_items), cfg.batch_size, pad, device.clone(), Some(cfg.seed));
    let valid_loader =
        TaskLoader::<B::InnerBackend>::new(Arc::new(valid_items), cfg.batch_size, pad, device.clone(), None);
    let n_classes = labels.map_or(0, Labels::len);
    let lm = cfg.task == TaskKind::CausalLm;
    let metric_for_best = cfg.metric_for_best.clone().unwrap_or_else(|| default_metric(cfg.task).into());
    let quiet =
        !std::io::IsTerminal::is_terminal(&std::io::stdout()) || std::env::var_os("TENSOR_PEFT_NO_TUI").is_some();
    let adapter_cfg = adapter_config(cfg, spec, &info);
    let best_model: Arc<Mutex<Option<M>>> = Arc::new(Mutex::new(None));
    let on_save = {
        let (spec, adapter_cfg, output, best_model) =
            (spec.clone(), adapter_cfg.clone(), cfg.output.clone(), best_model.clone());
        move |m: &dyn std::any::Any, best: bool| -> Result<()> {
            let m = m.downcast_ref::<M>().expect("the strategy trains M");
            if best {
                m.write_adapter(&spec, &adapter_cfg, &output)?;
                *best_model.lock().expect("not poisoned") = Some(m.clone());
            } else {
                m.write_adapter(&spec, &adapter_cfg, &output.join("last"))?;
            }
            Ok(())
        }
    };
    let update_ratios = {
        let spec = spec.clone();
        move |m: &dyn std::any::Any| -> Vec<(String, f64)> {
            m.downcast_ref::<M>().expect("the strategy trains M").update_ratios(&spec)
        }
    };
    let outcome = Arc::new(Mutex::new(FitOutcome::default()));
    let strategy = PeftStrategy::<B> {
        device: device.clone(),
        seed: cfg.seed,
        epochs: cfg.epochs,
        max_steps: cfg.max_steps,
        grad_accumulation: cfg.grad_accumulation,
        batch_size: cfg.batch_size,
        save_every_steps: cfg.save_every_steps,
        patience: cfg.early_stopping_patience,
        metric_for_best: metric_for_best.clone(),
        n_classes,
        lm,
        quiet,
        eval_before_training: cfg.eval_before_training,
        start,
        train_epoch: train_loader.epoch.clone(),
        train_skip: train_loader.skip.clone(),
        grad_scale: optimizer.grad_scale.clone(),
        optimizer_snapshot: optimizer.snapshot.clone(),
        on_save: Box::new(on_save),
        update_ratios: Box::new(update_ratios),
        checkpoint_root,
        output: cfg.output.clone(),
        outcome: outcome.clone(),
        stop,
    };
    if quiet {
        println!(
            "fine-tuning {} ({}) on {} with {}: {} trainable parameters ({} in adapters), {} steps",
            cfg.model.display(),
            spec.family.name(),
            cfg.task.name(),
            cfg.method.name(),
            trainable_params,
            adapter_params,
            total_steps
        );
    }
    let mut training = SupervisedTraining::new(&cfg.output, Arc::new(train_loader), Arc::new(valid_loader))
        .with_training_strategy(TrainingStrategy::Custom(Arc::new(strategy)))
        .with_application_logger(None)
        .with_metric_logger(NullLogger)
        .num_epochs(cfg.epochs)
        .metric_train_numeric(LearningRateMetric::new())
        .metric_train_numeric(DashboardMetric::new("tokens/s", "Tokens per second", n_classes, lm));
    let shown: &[(&'static str, &str)] = match cfg.task {
        TaskKind::Classification | TaskKind::LmClassification => {
            &[("loss", "Loss"), ("accuracy", "Accuracy"), ("f1", "F1"), ("mcc", "MCC")]
        }
        TaskKind::Regression => &[("loss", "Loss"), ("pearson", "Pearson"), ("spearman", "Spearman")],
        TaskKind::CausalLm => &[("loss", "Loss"), ("perplexity", "Perplexity")],
    };
    for (key, label) in shown {
        training = training
            .metric_train_numeric(DashboardMetric::new(key, label, n_classes, lm))
            .metric_valid_numeric(DashboardMetric::new(key, label, n_classes, lm));
    }
    if quiet {
        training = training.renderer(QuietRenderer);
    }
    let started = std::time::Instant::now();
    let result = training.launch(Learner::new(model, optimizer, schedule));
    let train_seconds = started.elapsed().as_secs_f64();

    let outcome = std::mem::take(&mut *outcome.lock().expect("not poisoned"));
    if let Some(e) = outcome.error {
        return Err(e);
    }
    let state = outcome.state.expect("fit stores its state");
    drop(result);
    let history = state.history.clone();
    let best_guard = best_model.lock().expect("not poisoned").clone();
    let test_metrics = match (&best_guard, test_items.is_empty()) {
        (Some(best), false) => {
            let acc = evaluate_items(&best.valid(), &test_items, cfg.batch_size, pad, device);
            let metrics = acc.metrics(n_classes, lm);
            if quiet {
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
    crate::plot::curves(&history, &cfg.output.join("curves.png"))?;
    let adapter_file_bytes = std::fs::metadata(cfg.output.join(tensor_peft_models::adapter_file::WEIGHTS_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    let report = FinetuneReport {
        output: cfg.output.clone(),
        trainable_params,
        adapter_params,
        adapter_file_bytes,
        history,
        best: state.best.map(|(v, e, s)| (metric_for_best.clone(), v, e, s)),
        test: test_metrics,
        steps: state.step,
        train_seconds,
        tokens_per_second: outcome.tokens as f64 / outcome.train_seconds.max(1e-9),
        stop_reason: outcome.stop_reason,
    };
    let json = serde_json::to_vec_pretty(&report).expect("serialisable");
    tensor_peft_models::adapter_file::write_atomically(&cfg.output.join("train_report.json"), &json)?;
    Ok(report)
}
