//! What a run is configured with: [`TrainConfig`] (the flags of `tpeft finetune` and the keys of
//! `--config run.toml`), its validation, and [`TaskInfo`], the task description stored with the
//! adapter.

use crate::data::{FieldMap, TaskKind};
use crate::error::{Result, TrainError};
use crate::optim::Decay;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tensor_peft_adapters::{MethodConfig, RecommendedTraining};
use tensor_peft_kernels::ComputeDType;
use tensor_peft_models::{BaseDType, Targets};

/// Everything `tpeft finetune` takes; saved as `<output>/train_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// HF model directory or `.gguf` file.
    pub model: PathBuf,
    /// The precision the frozen base model is held at (adapters train in f32 whatever it is).
    pub base_dtype: BaseDType,
    /// The task.
    pub task: TaskKind,
    /// Training data (JSONL/CSV/TSV), or `builtin:vader-movie-reviews` / `builtin:chatterbot`.
    pub train: PathBuf,
    /// Validation data; a seeded split of `train` when absent.
    pub valid: Option<PathBuf>,
    /// Test data, evaluated with the best adapter at the end.
    pub test: Option<PathBuf>,
    /// Percent of `train` held out for validation when `valid` is absent.
    pub valid_percent: usize,
    /// Percent of `train` held out for test when `test` is absent (0 = none).
    pub test_percent: usize,
    /// Use at most this many training examples (after the split).
    pub max_train_examples: Option<usize>,
    /// Column/key names.
    pub fields: FieldMap,
    /// Report and skip malformed rows instead of stopping.
    pub skip_bad_rows: bool,
    /// The adapter method and its hyper-parameters.
    pub method: MethodConfig,
    /// Target modules (names or suffixes); `None` = the method's defaults.
    pub target_modules: Option<Vec<String>>,
    /// Target modules as a regular expression over module names.
    pub target_regex: Option<String>,
    /// Also train the normalisation layers (LoRETTA does).
    pub train_norms: bool,
    /// The encoder tasks' head: a linear layer on the pooled output, or LoRETTA's tensorized head.
    pub head: HeadKind,
    /// Epochs.
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accumulation: usize,
    /// Peak learning rate of the adapters. `None`: the method's recommended settings
    /// ([`RecommendedTraining`]: its learning rate and LoRA+ ratio, and the head at
    /// [`RecommendedTraining::HEAD_LR`] unless `head_lr` is set); see
    /// [`TrainConfig::with_recommended_settings`].
    pub lr: Option<f64>,
    /// Peak learning rate of the task head (default: `lr`).
    pub head_lr: Option<f64>,
    /// LoRA+ (PEFT's `loraplus_lr_ratio`): the factor that starts at zero (LoRA's `B`, TT-LoRA's
    /// last core, the last core of LoRETTA_rep's `B`) trains at this multiple of `lr` (lora,
    /// tt-lora and loretta-rep with zero init only).
    pub loraplus_lr_ratio: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Fraction of the optimizer steps used for linear warmup.
    pub warmup_ratio: f64,
    /// Decay after warmup.
    pub decay: Decay,
    /// Global gradient-norm clipping (`None` = off).
    pub max_grad_norm: Option<f64>,
    /// Longest sequence in tokens.
    pub max_len: usize,
    /// Seed of initialisation, shuffling and dropout (and of the split unless `split_seed` is set).
    pub seed: u64,
    /// Seed of the train/valid/test split (default: `seed`); fixing it while varying `seed` gives
    /// seed studies on one split (HF `TrainingArguments.data_seed` plays the same role).
    pub split_seed: Option<u64>,
    /// Validation metric that picks the best epoch (`accuracy`, `f1`, `mcc`, `pearson`,
    /// `spearman`, `loss`, `perplexity`, `accuracy_norm`, `accuracy_per_token`, `exact_match`);
    /// default by task.
    pub metric_for_best: Option<String>,
    /// Stop after this many evaluations (epoch ends, and every `eval_every_steps` steps) without
    /// improvement of `metric_for_best`.
    pub early_stopping_patience: Option<usize>,
    /// Also write a checkpoint every this many optimizer steps (0 = only at epoch ends).
    pub save_every_steps: usize,
    /// Also evaluate on the validation split every this many optimizer steps (0 = only at epoch
    /// ends); the best evaluation's adapter is the one kept, whatever step it came at.
    pub eval_every_steps: usize,
    /// Label words of `lm-classification`, in label order (e.g. `["terrible", "great"]`).
    pub verbalizers: Vec<String>,
    /// Prompt of `lm-classification`; `{text}` / `{text_pair}` are replaced.
    pub template: String,
    /// Longest greedy answer of `lm-generation` when evaluating, in tokens.
    pub max_new_tokens: usize,
    /// β of the DPO loss (`dpo`): how strongly the trained model is held to the reference.
    pub dpo_beta: f64,
    /// Output directory.
    pub output: PathBuf,
    /// Replace an output directory that already holds a run.
    pub overwrite: bool,
    /// Continue the run whose output directory this is.
    pub resume: bool,
    /// Evaluate the validation split before the first step (recorded as epoch 0).
    pub eval_before_training: bool,
    /// Start the adapter from the one saved in this directory (same method and targets) instead of
    /// its initialisation: sequential multi-task learning. The task head starts fresh.
    pub init_from: Option<PathBuf>,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// ([`crate::recompute`]): less memory, the same gradients, about a third more compute.
    pub gradient_checkpointing: bool,
    /// The precision of the frozen base's products, set for the process when the run starts
    /// ([`tensor_peft_kernels::set_compute_dtype`]); `bf16` runs on the flex backend only.
    #[serde(with = "compute_dtype_name")]
    pub compute_dtype: ComputeDType,
}

/// [`ComputeDType`] as its `--compute-dtype` name in `train_config.json`.
mod compute_dtype_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use tensor_peft_kernels::ComputeDType;

    pub fn serialize<S: Serializer>(dtype: &ComputeDType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(dtype.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ComputeDType, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            base_dtype: BaseDType::F32,
            task: TaskKind::Classification,
            train: PathBuf::new(),
            valid: None,
            test: None,
            valid_percent: 10,
            test_percent: 0,
            max_train_examples: None,
            fields: FieldMap::default(),
            skip_bad_rows: false,
            method: MethodConfig::from_name("lora").expect("lora exists"),
            target_modules: None,
            target_regex: None,
            train_norms: false,
            head: HeadKind::Linear,
            epochs: 3,
            max_steps: None,
            batch_size: 16,
            grad_accumulation: 1,
            lr: None,
            head_lr: None,
            loraplus_lr_ratio: None,
            weight_decay: 0.01,
            warmup_ratio: 0.06,
            decay: Decay::Linear,
            max_grad_norm: Some(1.0),
            max_len: 128,
            seed: 42,
            split_seed: None,
            metric_for_best: None,
            early_stopping_patience: None,
            save_every_steps: 0,
            eval_every_steps: 0,
            verbalizers: Vec::new(),
            template: "{text} It was".into(),
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            dpo_beta: crate::dpo::DEFAULT_BETA,
            output: PathBuf::new(),
            overwrite: false,
            resume: false,
            eval_before_training: false,
            init_from: None,
            gradient_checkpointing: false,
            compute_dtype: ComputeDType::F32,
        }
    }
}

impl TrainConfig {
    /// The run with its method's recommended settings where no learning rate is set (`lr` is
    /// `None`): the method's learning rate and LoRA+ ratio, and the head at
    /// [`RecommendedTraining::HEAD_LR`] unless `head_lr` is given; with them, the line that says
    /// so. A run with `lr` set is returned as it is: the settings are then the user's.
    pub fn with_recommended_settings(mut self) -> (Self, Option<String>) {
        if self.lr.is_some() {
            return (self, None);
        }
        let recommended = self.method.recommended_training();
        self.lr = Some(recommended.lr);
        // LoRA+ needs a factor that starts at zero (not there with `--init paper`).
        if self.loraplus_lr_ratio.is_none() && self.method.has_zero_init_factor() {
            self.loraplus_lr_ratio = recommended.loraplus_lr_ratio;
        }
        let head = self.task.is_encoder_task() && self.head_lr.is_none();
        if head {
            self.head_lr = Some(RecommendedTraining::HEAD_LR);
        }
        let mut note = format!("{}'s recommended settings: lr {}", self.method.name(), recommended.lr);
        if let Some(ratio) = self.loraplus_lr_ratio {
            note += &format!(", LoRA+ ratio {ratio}");
        }
        if head {
            note += &format!(", head lr {}", RecommendedTraining::HEAD_LR);
        }
        note += " (give --lr to choose your own)";
        (self, Some(note))
    }

    /// The adapters' peak learning rate: `lr`, or the method's recommended one.
    pub fn peak_lr(&self) -> f64 {
        self.lr.unwrap_or_else(|| self.method.recommended_training().lr)
    }
}

/// The default of [`TrainConfig::max_new_tokens`].
pub const DEFAULT_MAX_NEW_TOKENS: usize = 32;

fn default_max_new_tokens() -> usize {
    DEFAULT_MAX_NEW_TOKENS
}

/// The head of an encoder task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadKind {
    /// A linear layer on the checkpoint's pooler (or on mean pooling without one).
    #[default]
    Linear,
    /// LoRETTA's tensorized head: a fresh trainable TT layer in place of the pooler, then the
    /// linear layer ([`tensor_peft_models::SequenceClassifier::with_tt_pooler`]).
    Tt,
}

impl HeadKind {
    /// From its command-line name (`linear`, `tt`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "linear" => Ok(Self::Linear),
            "tt" => Ok(Self::Tt),
            other => Err(TrainError::Option { option: "head", reason: format!("`{other}`: expected linear or tt") }),
        }
    }
}

/// The task description saved in `adapter_config.json` (`tensor_peft.task`): what evaluation and
/// serving need besides the adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// The task.
    pub task: TaskKind,
    /// Label names in class order (label tasks).
    pub labels: Option<Vec<String>>,
    /// Head outputs (encoder tasks).
    pub n_outputs: usize,
    /// Verbalizer words (lm-classification).
    pub verbalizers: Vec<String>,
    /// Prompt template (lm-classification).
    pub template: String,
    /// Longest sequence used in training.
    pub max_len: usize,
    /// PEFT's `task_type`.
    pub peft_task_type: String,
    /// The head (encoder tasks); absent in files written before it existed: linear.
    #[serde(default)]
    pub head: HeadKind,
    /// Longest greedy answer (lm-generation); absent in files written before it existed: 32.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// β of the DPO loss the adapter was trained with (`dpo`), which `eval` uses too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo_beta: Option<f64>,
}

/// Options that must not change when resuming (everything that shapes the computation).
pub(crate) fn fingerprint(cfg: &TrainConfig) -> String {
    let mut c = cfg.clone();
    c.resume = false;
    c.overwrite = false;
    c.epochs = 0;
    c.max_steps = None;
    c.early_stopping_patience = None;
    c.save_every_steps = 0;
    c.eval_every_steps = 0;
    c.output = PathBuf::new();
    // The same gradients either way: a run may be resumed with or without it.
    c.gradient_checkpointing = false;
    let json = serde_json::to_string(&c).expect("serialisable");
    // The same model and data at another precision of the frozen products: a run may be resumed
    // at either (not bit-identically, then). The key is left out, so that checkpoints written
    // before it existed keep their fingerprint (it is the last field).
    let json = match json.rfind(",\"compute_dtype\":") {
        Some(at) => format!("{}}}", &json[..at]),
        None => json,
    };
    format!("{:016x}", json.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)))
}

/// Checks option values before anything is loaded.
pub fn validate(cfg: &TrainConfig) -> Result<()> {
    let bad = |option: &'static str, reason: &str| Err(TrainError::Option { option, reason: reason.into() });
    if cfg.epochs == 0 {
        return bad("epochs", "must be at least 1");
    }
    if cfg.batch_size == 0 {
        return bad("batch-size", "must be at least 1");
    }
    if cfg.grad_accumulation == 0 {
        return bad("grad-accumulation", "must be at least 1");
    }
    if cfg.max_steps == Some(0) {
        return bad("max-steps", "must be at least 1");
    }
    if cfg.lr.is_some_and(|l| !(l.is_finite() && l > 0.0)) || cfg.head_lr.is_some_and(|l| !(l.is_finite() && l > 0.0)) {
        return bad("lr", "learning rates must be positive numbers");
    }
    if let Some(ratio) = cfg.loraplus_lr_ratio {
        if !(ratio.is_finite() && ratio > 0.0) {
            return bad("loraplus-lr-ratio", "must be a positive number");
        }
        if !cfg.method.has_zero_init_factor() {
            let takes: Vec<&str> = tensor_peft_adapters::METHOD_NAMES
                .iter()
                .filter(|name| MethodConfig::from_name(name).is_ok_and(|m| m.has_zero_init_factor()))
                .copied()
                .collect();
            return bad(
                "loraplus-lr-ratio",
                &format!(
                    "applies to the methods with one factor that starts at zero ({}, with their default --init), not to {} as configured",
                    takes.join(", "),
                    cfg.method.name()
                ),
            );
        }
    }
    if !(0.0..1.0).contains(&cfg.warmup_ratio) {
        return bad("warmup-ratio", "must be in [0, 1)");
    }
    if cfg.max_len < 4 {
        return bad("max-len", "must be at least 4 tokens");
    }
    if cfg.valid.is_none() && (cfg.valid_percent == 0 || cfg.valid_percent + cfg.test_percent >= 100) {
        return bad("valid-percent", "must be at least 1, with valid + test below 100, when no --valid file is given");
    }
    if cfg.max_grad_norm.is_some_and(|n| !(n.is_finite() && n > 0.0)) {
        return bad("max-grad-norm", "must be a positive number");
    }
    if cfg.output.as_os_str().is_empty() {
        return bad("output", "an output directory is required");
    }
    if cfg.task == TaskKind::LmClassification && cfg.verbalizers.is_empty() {
        return bad(
            "verbalizers",
            "lm-classification needs one label word per class, e.g. --verbalizers terrible,great",
        );
    }
    if cfg.task == TaskKind::LmGeneration && cfg.max_new_tokens == 0 {
        return bad("max-new-tokens", "must be at least 1");
    }
    if !(cfg.dpo_beta.is_finite() && cfg.dpo_beta > 0.0) {
        return bad("dpo-beta", "must be a positive number");
    }
    check_gradient_checkpointing(cfg)?;
    if let Some(m) = &cfg.metric_for_best {
        let ok: &[&str] = match cfg.task {
            TaskKind::Classification | TaskKind::LmClassification => &["loss", "accuracy", "f1", "mcc"],
            TaskKind::Regression => &["loss", "pearson", "spearman"],
            TaskKind::CausalLm => &["loss", "perplexity"],
            TaskKind::LmMultipleChoice => &["loss", "accuracy", "accuracy_norm", "accuracy_per_token"],
            TaskKind::LmGeneration => &["loss", "exact_match", "f1"],
            TaskKind::Dpo => &["loss", "rewards/accuracies", "rewards/margins"],
        };
        if !ok.contains(&m.as_str()) {
            return Err(TrainError::Option {
                option: "metric-for-best",
                reason: format!("`{m}` is not a {} metric; expected one of {}", cfg.task.name(), ok.join(", ")),
            });
        }
    }
    Ok(())
}

/// Refuses `gradient_checkpointing` with adapter dropout: the recomputed blocks would draw other
/// masks than the first pass ([`crate::recompute`]).
pub fn check_gradient_checkpointing(cfg: &TrainConfig) -> Result<()> {
    if cfg.gradient_checkpointing && method_dropout(&cfg.method) > 0.0 {
        let without: Vec<&str> = tensor_peft_adapters::METHOD_NAMES
            .iter()
            .filter(|name| MethodConfig::from_name(name).is_ok_and(|m| method_dropout(&m) == 0.0))
            .copied()
            .collect();
        return Err(TrainError::Option {
            option: "gradient-checkpointing",
            reason: format!(
                "{} is configured with adapter dropout {}, and the recomputed blocks would draw other dropout masks \
                 than the first pass; give --dropout 0 (without dropout by default: {})",
                cfg.method.name(),
                method_dropout(&cfg.method),
                without.join(", ")
            ),
        });
    }
    Ok(())
}

/// The adapter dropout probability `method` is configured with (0 for methods without dropout).
pub fn method_dropout(method: &MethodConfig) -> f64 {
    fn find(v: &serde_json::Value) -> Option<f64> {
        let map = v.as_object()?;
        map.get("dropout").and_then(serde_json::Value::as_f64).or_else(|| map.values().find_map(find))
    }
    serde_json::to_value(method).ok().as_ref().and_then(find).unwrap_or(0.0)
}

pub(crate) fn targets_of(cfg: &TrainConfig) -> Targets {
    match (&cfg.target_modules, &cfg.target_regex) {
        (Some(names), _) => Targets::Names(names.clone()),
        (None, Some(re)) => Targets::Regex(re.clone()),
        (None, None) => Targets::Default,
    }
}

/// The validation metric that picks the best epoch of `task` when `--metric-for-best` is not given.
pub fn default_metric(task: TaskKind) -> &'static str {
    match task {
        TaskKind::Classification | TaskKind::LmClassification | TaskKind::LmMultipleChoice => "accuracy",
        TaskKind::Regression => "pearson",
        TaskKind::CausalLm | TaskKind::Dpo => "loss",
        TaskKind::LmGeneration => "f1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compute dtype is recorded but not part of the fingerprint: a run resumes at either, and
    /// checkpoints written before the key existed keep theirs.
    #[test]
    fn the_compute_dtype_is_left_out_of_the_fingerprint() {
        let f32_run = TrainConfig::default();
        let bf16_run = TrainConfig { compute_dtype: ComputeDType::Bf16, ..TrainConfig::default() };
        assert_eq!(fingerprint(&f32_run), fingerprint(&bf16_run));
        let json = serde_json::to_string(&bf16_run).unwrap();
        assert!(json.ends_with(",\"compute_dtype\":\"bf16\"}"), "{json}");
        let other = TrainConfig { batch_size: 3, ..TrainConfig::default() };
        assert_ne!(fingerprint(&f32_run), fingerprint(&other));
    }
}
