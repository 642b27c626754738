//! Setting a run up: the base model and data, the task model with its adapters, the optimizer and
//! its parameter groups, the output directory, and burn-train's `SupervisedTraining`.

use crate::checkpoint;
use crate::config::{HeadKind, TaskInfo, TrainConfig, targets_of};
use crate::data::{self, Example, Labels, TaskKind};
use crate::dpo::DpoTask;
use crate::error::{Result, TrainError};
use crate::loader::TaskLoader;
use crate::metrics::DashboardMetric;
use crate::optim::{PeftOptimizer, WarmupSchedule};
use crate::strategy::{NullLogger, PeftStrategy, QuietRenderer};
use crate::task::{Batch, Decoding, Encoded, Encoder, EncoderTask, LmTask, TaskModel, TaskOutput, verbalizer_ids};
use burn::module::ParamId;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::train::metric::LearningRateMetric;
use burn::train::{InferenceStep, SupervisedTraining, TrainingStrategy};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use tensor_peft_models::adapter_file::{
    AdapterConfig, BaseModelIdentity, load_adapter_with_extras, read_adapter_config,
};
use tensor_peft_models::tokenizer::TextTokenizer;
use tensor_peft_models::{AdapterSlots, ArchSpec, BaseDType, Bert, Family, Llama, SequenceClassifier};

/// Loaded base model, tokenizer and architecture.
#[allow(clippy::large_enum_variant)] // built once per run, never moved in a loop
pub enum BaseModel<B: Backend> {
    /// BERT family.
    Encoder(Bert<B>, ArchSpec, TextTokenizer),
    /// LLaMA family.
    Decoder(Llama<B>, ArchSpec, TextTokenizer),
}

/// Loads a model directory (BERT or LLaMA, from `config.json`) or a LLaMA `.gguf` file, its
/// frozen matrices held at `base_dtype`.
pub fn load_base<B: Backend>(path: &Path, base_dtype: BaseDType, device: &B::Device) -> Result<BaseModel<B>> {
    let base = read_base(path, base_dtype, device)?;
    // The load's transient buffers (decoded tensors, weights before their conversion) are free
    // but still resident: handed back, so that they do not count in the run's peak memory.
    tensor_peft_kernels::release_free_memory();
    Ok(base)
}

/// [`load_base`] without the release of the load's free memory.
fn read_base<B: Backend>(path: &Path, base_dtype: BaseDType, device: &B::Device) -> Result<BaseModel<B>> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let (llama, spec, tok) = Llama::<B>::from_gguf_as(path, device, base_dtype)?;
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
        Family::Bert | Family::Deberta => {
            BaseModel::Encoder(Bert::<B>::from_hf_dir_as(path, device, base_dtype)?.0, spec, tokenizer)
        }
        Family::Llama => BaseModel::Decoder(Llama::<B>::from_hf_dir_as(path, device, base_dtype)?.0, spec, tokenizer),
    })
}

fn wrong_family(task: TaskKind, spec: &ArchSpec) -> TrainError {
    let needs = if task.is_encoder_task() { "an encoder (BERT family)" } else { "a causal LM (LLaMA family)" };
    TrainError::Option {
        option: "task",
        reason: format!("task {} needs {needs}, but {} is a {} model", task.name(), spec.source, spec.family.name()),
    }
}

/// The task must suit the model family: checked from `config.json` before any data is read.
pub(crate) fn check_model_family(cfg: &TrainConfig) -> Result<()> {
    if cfg.model.extension().is_none_or(|e| e != "gguf") && cfg.model.is_dir() {
        let spec = ArchSpec::from_config_file(&cfg.model.join("config.json"))?;
        if cfg.task.is_encoder_task() != spec.family.is_encoder() {
            return Err(wrong_family(cfg.task, &spec));
        }
    } else if cfg.task.is_encoder_task() {
        let spec = ArchSpec::from_model_arg(&cfg.model.to_string_lossy())?;
        return Err(wrong_family(cfg.task, &spec));
    }
    Ok(())
}

/// Train, valid and test examples, and notes about skipped rows.
pub type Splits = (Vec<Example>, Vec<Example>, Vec<Example>, Vec<String>);

/// Train / valid / test examples for `cfg` (a seeded split of `train` when no valid file is given).
pub fn load_splits(cfg: &TrainConfig) -> Result<Splits> {
    let mut notes = Vec::new();
    let read = |path: &Path, notes: &mut Vec<String>| -> Result<Vec<Example>> {
        let data = data::read_source(path, cfg.task, &cfg.fields, cfg.skip_bad_rows)?;
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

/// Files a run writes at the top of its output directory.
const RUN_FILES: [&str; 4] = ["train_config.json", "metrics.csv", "adapter_config.json", "checkpoint"];

/// Refuses to train into a directory that holds another run (unless `overwrite`), creates it.
pub(crate) fn prepare_output(cfg: &TrainConfig) -> Result<()> {
    if cfg.resume {
        return super::resume::check_resumable(cfg);
    }
    let out = &cfg.output;
    if RUN_FILES.iter().any(|f| out.join(f).exists()) {
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

/// Writes `<output>/train_config.json`, which `--resume` and `tpeft finetune --config` read back.
pub(crate) fn write_train_config(cfg: &TrainConfig) -> Result<()> {
    let config_json = serde_json::to_vec_pretty(cfg).expect("serialisable");
    tensor_peft_models::adapter_file::write_atomically(&cfg.output.join("train_config.json"), &config_json)?;
    Ok(())
}

/// A task model ready to train, with what its run needs besides the configuration.
pub(crate) struct Prepared<M> {
    /// The task model with its adapters injected.
    pub(crate) model: M,
    /// The base model's architecture.
    pub(crate) spec: ArchSpec,
    /// The base model's tokenizer.
    pub(crate) tokenizer: TextTokenizer,
    /// The label names of label tasks, in class order.
    pub(crate) labels: Option<Labels>,
    /// The task description stored with the adapter.
    pub(crate) info: TaskInfo,
    /// The token id batches are padded with.
    pub(crate) pad: u32,
}

/// `model` with `cfg.method`'s adapters at `cfg`'s targets: freshly initialised, or with
/// `--init-from`'s values (refused unless that adapter has the same method and targets).
fn adapt<B: Backend, M: AdapterSlots<B>>(mut model: M, spec: &ArchSpec, cfg: &TrainConfig) -> Result<M> {
    let Some(dir) = &cfg.init_from else {
        tensor_peft_models::inject(&mut model, spec, &cfg.method, &targets_of(cfg))?;
        return Ok(model);
    };
    let option_err = |reason: String| TrainError::Option { option: "init-from", reason };
    let saved = read_adapter_config(dir)?;
    let json = |m: &tensor_peft_adapters::MethodConfig| serde_json::to_string(m).expect("serialisable");
    if json(&saved.method) != json(&cfg.method) || saved.targets() != targets_of(cfg) {
        return Err(option_err(format!(
            "{} holds {} at {:?}, but this run asks for {} at {:?}; give the same method flags and targets",
            dir.display(),
            json(&saved.method),
            saved.targets(),
            json(&cfg.method),
            targets_of(cfg)
        )));
    }
    let (_, extras) = load_adapter_with_extras(&mut model, spec, dir)?;
    if !extras.is_empty() {
        let names: Vec<&String> = extras.keys().take(3).collect();
        eprintln!(
            "note: --init-from {}: starts from its adapter only; its other trained tensors ({names:?}…) are not used",
            dir.display()
        );
    }
    Ok(model)
}

/// A BERT-family classifier or regressor with `cfg.method`'s adapters.
pub(crate) fn encoder_task<B: Backend>(
    cfg: &TrainConfig,
    bert: Bert<B>,
    spec: ArchSpec,
    tokenizer: TextTokenizer,
    labels: Option<Labels>,
) -> Result<Prepared<EncoderTask<B>>> {
    if !cfg.task.is_encoder_task() {
        return Err(wrong_family(cfg.task, &spec));
    }
    // Learned absolute positions end the context (relative-only models such as DeBERTa-v3 have none).
    if let Some(table) = &bert.position_embeddings {
        let context = table.weight.dims()[0].saturating_sub(bert.position_offset);
        if cfg.max_len > context {
            return Err(TrainError::Option {
                option: "max-len",
                reason: format!("{} exceeds the model's context of {context} positions", cfg.max_len),
            });
        }
    }
    let mut bert = adapt(bert, &spec, cfg)?;
    if cfg.train_norms {
        bert = bert.train_norms();
    }
    let n_outputs = labels.as_ref().map_or(1, Labels::len);
    let mut net = SequenceClassifier::new(bert, n_outputs);
    if cfg.head == HeadKind::Tt {
        net = net.with_tt_pooler()?;
    }
    let model = EncoderTask {
        net,
        regression: cfg.task == TaskKind::Regression,
        gradient_checkpointing: cfg.gradient_checkpointing,
    };
    let info = TaskInfo {
        task: cfg.task,
        labels: labels.as_ref().map(|l| l.names.clone()),
        n_outputs,
        verbalizers: Vec::new(),
        template: String::new(),
        max_len: cfg.max_len,
        peft_task_type: "SEQ_CLS".into(),
        head: cfg.head,
        max_new_tokens: cfg.max_new_tokens,
        dpo_beta: None,
    };
    let pad = tokenizer.token_id("[PAD]").unwrap_or(0);
    Ok(Prepared { model, spec, tokenizer, labels, info, pad })
}

/// A LLaMA-family causal LM (or verbalizer classifier) with `cfg.method`'s adapters.
pub(crate) fn lm_task<B: Backend>(
    cfg: &TrainConfig,
    llama: Llama<B>,
    spec: ArchSpec,
    tokenizer: TextTokenizer,
    labels: Option<Labels>,
) -> Result<Prepared<LmTask<B>>> {
    if cfg.task.is_encoder_task() {
        return Err(wrong_family(cfg.task, &spec));
    }
    if cfg.head != HeadKind::Linear {
        return Err(TrainError::Option {
            option: "head",
            reason: format!(
                "task {} has no classification head; --head applies to classification and regression",
                cfg.task.name()
            ),
        });
    }
    if spec.positions > 0 && cfg.max_len > spec.positions {
        return Err(TrainError::Option {
            option: "max-len",
            reason: format!("{} exceeds the model's context of {} tokens", cfg.max_len, spec.positions),
        });
    }
    let mut llama = adapt(llama, &spec, cfg)?;
    if cfg.train_norms {
        llama = llama.train_norms();
    }
    let label_names = labels.as_ref().map(|l| l.names.clone());
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
    let decoding = (cfg.task == TaskKind::LmGeneration)
        .then(|| Decoding { tokenizer: Arc::new(tokenizer.clone()), max_new_tokens: cfg.max_new_tokens });
    let model = LmTask { net: llama, verbalizer, decoding, gradient_checkpointing: cfg.gradient_checkpointing };
    let info = TaskInfo {
        task: cfg.task,
        labels: label_names,
        n_outputs: 0,
        verbalizers: cfg.verbalizers.clone(),
        template: cfg.template.clone(),
        max_len: cfg.max_len,
        peft_task_type: "CAUSAL_LM".into(),
        head: HeadKind::Linear,
        max_new_tokens: cfg.max_new_tokens,
        dpo_beta: None,
    };
    let pad = tokenizer.eos.unwrap_or(0);
    Ok(Prepared { model, spec, tokenizer, labels, info, pad })
}

/// A LLaMA-family causal LM with `cfg.method`'s adapters, trained with DPO (β = `cfg.dpo_beta`).
pub(crate) fn dpo_task<B: Backend>(
    cfg: &TrainConfig,
    llama: Llama<B>,
    spec: ArchSpec,
    tokenizer: TextTokenizer,
) -> Result<Prepared<DpoTask<B>>> {
    let Prepared { model, spec, tokenizer, labels, info, pad } = lm_task(cfg, llama, spec, tokenizer, None)?;
    let model = DpoTask { net: model.net, beta: cfg.dpo_beta, gradient_checkpointing: cfg.gradient_checkpointing };
    let info = TaskInfo { dpo_beta: Some(cfg.dpo_beta), ..info };
    Ok(Prepared { model, spec, tokenizer, labels, info, pad })
}

/// Tokenises the train, valid and test examples; says how many training examples were cut.
pub(crate) fn encode_splits(
    cfg: &TrainConfig,
    tokenizer: &TextTokenizer,
    labels: Option<&Labels>,
    [train, valid, test]: [Vec<Example>; 3],
) -> Result<[Vec<Encoded>; 3]> {
    let encoder = Encoder {
        tokenizer,
        task: cfg.task,
        max_len: cfg.max_len,
        labels,
        template: &cfg.template,
        eos: tokenizer.eos,
        training: true,
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
    let encoder = Encoder { training: false, ..encoder };
    let (valid_items, _) = encoder.encode_all(&valid)?;
    let (test_items, _) = encoder.encode_all(&test)?;
    Ok([train_items, valid_items, test_items])
}

/// The adapter config written for a run.
pub(crate) fn adapter_config(cfg: &TrainConfig, spec: &ArchSpec, info: &TaskInfo) -> AdapterConfig {
    AdapterConfig {
        method: cfg.method.clone(),
        target_modules: cfg.target_modules.clone(),
        target_regex: cfg.target_regex.clone(),
        base_model_name_or_path: cfg.model.to_string_lossy().into(),
        base_model: Some(BaseModelIdentity::of(spec)),
        peft_type: cfg.method.peft_type(),
        library_version: env!("CARGO_PKG_VERSION").into(),
        task: Some(serde_json::to_value(info).expect("serialisable")),
    }
}

/// AdamW over the trained parameters, with two parameter groups of their own: the task head
/// (`--head-lr`) and, with LoRA+, the factors that start at zero (each method names its own).
pub(crate) fn optimizer<B, M>(cfg: &TrainConfig, spec: &ArchSpec, model: &M) -> PeftOptimizer<M, B>
where
    B: AutodiffBackend,
    M: TaskModel<B>,
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    let head_ids: HashSet<ParamId> = checkpoint::trainable_params(model)
        .into_iter()
        .filter(|(p, ..)| p.starts_with("net.head."))
        .map(|(.., id)| id)
        .collect();
    let optimizer = PeftOptimizer::<M, B>::new(
        cfg.weight_decay,
        head_ids,
        cfg.head_lr.map_or(1.0, |h| h / cfg.peak_lr()),
        cfg.max_grad_norm,
    );
    match cfg.loraplus_lr_ratio {
        Some(ratio) => optimizer.with_fast_group(model.zero_init_factors(spec), ratio),
        None => optimizer,
    }
}

/// Optimizer steps of the whole run: every epoch's, capped by `--max-steps`.
pub(crate) fn total_steps(cfg: &TrainConfig, train_items: usize) -> usize {
    let batches_per_epoch = train_items.div_ceil(cfg.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(cfg.grad_accumulation);
    (steps_per_epoch * cfg.epochs).min(cfg.max_steps.unwrap_or(usize::MAX))
}

/// Linear warmup to `lr`, then `cfg.decay`, positioned at optimizer step `step`.
pub(crate) fn schedule(cfg: &TrainConfig, total_steps: usize, step: usize) -> WarmupSchedule {
    WarmupSchedule {
        peak: cfg.peak_lr(),
        warmup: (cfg.warmup_ratio * total_steps as f64).ceil() as usize,
        total: total_steps,
        decay: cfg.decay,
        step,
    }
}

/// burn-train's supervised training with the run's strategy, loaders and dashboard metrics (the
/// task's own, the learning rate and tokens per second).
pub(crate) fn supervised_training<B, M>(
    cfg: &TrainConfig,
    train_loader: TaskLoader<B>,
    valid_loader: TaskLoader<B::InnerBackend>,
    strategy: PeftStrategy<B, M>,
    n_classes: usize,
    quiet: bool,
) -> SupervisedTraining<crate::strategy::Marker<B, M>>
where
    B: AutodiffBackend,
    M: TaskModel<B>,
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    let lm = cfg.task == TaskKind::CausalLm;
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
        TaskKind::LmMultipleChoice => &[
            ("loss", "Loss"),
            ("accuracy", "Accuracy"),
            ("accuracy_norm", "Accuracy (per char)"),
            ("accuracy_per_token", "Accuracy (per token)"),
        ],
        TaskKind::LmGeneration => &[("loss", "Loss"), ("exact_match", "Exact match"), ("f1", "F1")],
        TaskKind::Dpo => {
            &[("loss", "Loss"), ("rewards/accuracies", "Reward accuracy"), ("rewards/margins", "Reward margin")]
        }
    };
    // Multiple choice and generation train on completions: only the loss is measured in training.
    let scored_in_training = !matches!(cfg.task, TaskKind::LmMultipleChoice | TaskKind::LmGeneration);
    for (key, label) in shown {
        if scored_in_training || *key == "loss" {
            training = training.metric_train_numeric(DashboardMetric::new(key, label, n_classes, lm));
        }
        training = training.metric_valid_numeric(DashboardMetric::new(key, label, n_classes, lm));
    }
    if quiet {
        training = training.renderer(QuietRenderer);
    }
    training
}
