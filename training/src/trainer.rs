//! `finetune`: from a model path, a task, data and a method to a small adapter directory.
//!
//! Training runs inside burn-train's `SupervisedTraining` / `Learner` with a custom
//! [`SupervisedLearningStrategy`] ([`PeftStrategy`]) that adds what the stock epoch loop lacks:
//! optimizer-step schedules with gradient accumulation, `--max-steps`, step checkpoints that hold
//! only trained tensors and resume exactly (data position and dropout RNG included), a non-finite
//! loss check, best-epoch selection on any validation metric, and early stopping. Metrics go to
//! burn-train's dashboard (TUI on a terminal) and, one line per epoch and split, to stdout
//! otherwise; `metrics.csv`, `metrics.json` and `curves.png` are written to the output directory.

use crate::checkpoint::{self, TrainerState};
use crate::data::{self, Example, FieldMap, Labels, TaskKind};
use crate::error::{Result, TrainError};
use crate::metrics::{Accumulator, DashboardMetric, EpochRecord, higher_is_better};
use crate::optim::{Decay, PeftOptimizer, WarmupSchedule};
use crate::task::{Batch, Encoded, Encoder, EncoderTask, LmTask, TaskOutput, make_batch, verbalizer_ids};
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::module::{AutodiffModule, Module, ParamId};
use burn::optim::{GradientsAccumulator, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::train::metric::{LearningRateMetric, MetricDefinition};
use burn::train::renderer::EvaluationName;
use burn::train::renderer::{
    EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation, MetricsRendererTraining,
    TrainingProgress,
};
use burn::train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearningComponentsMarker, SupervisedLearningStrategy,
    SupervisedTraining, SupervisedTrainingEventProcessor, TrainLoader, TrainStep, TrainingComponents, TrainingItem,
    TrainingStrategy, ValidLoader,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tensor_peft_adapters::MethodConfig;
use tensor_peft_models::adapter_file::{AdapterConfig, BaseModelIdentity};
use tensor_peft_models::tokenizer::TextTokenizer;
use tensor_peft_models::{ArchSpec, Bert, Family, Llama, SequenceClassifier, Targets};

/// Everything `tpeft finetune` takes; saved as `<output>/train_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// HF model directory or `.gguf` file.
    pub model: PathBuf,
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
    /// Epochs.
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accumulation: usize,
    /// Peak learning rate of the adapters.
    pub lr: f64,
    /// Peak learning rate of the task head (default: `lr`).
    pub head_lr: Option<f64>,
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
    /// Seed of initialisation, split, shuffling and dropout.
    pub seed: u64,
    /// Validation metric that picks the best epoch (`accuracy`, `f1`, `mcc`, `pearson`,
    /// `spearman`, `loss`, `perplexity`); default by task.
    pub metric_for_best: Option<String>,
    /// Stop after this many epochs without improvement of `metric_for_best`.
    pub early_stopping_patience: Option<usize>,
    /// Also write a checkpoint every this many optimizer steps (0 = only at epoch ends).
    pub save_every_steps: usize,
    /// Label words of `lm-classification`, in label order (e.g. `["terrible", "great"]`).
    pub verbalizers: Vec<String>,
    /// Prompt of `lm-classification`; `{text}` / `{text_pair}` are replaced.
    pub template: String,
    /// Output directory.
    pub output: PathBuf,
    /// Replace an output directory that already holds a run.
    pub overwrite: bool,
    /// Continue the run whose output directory this is.
    pub resume: bool,
    /// Evaluate the validation split before the first step (recorded as epoch 0).
    pub eval_before_training: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
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
            epochs: 3,
            max_steps: None,
            batch_size: 16,
            grad_accumulation: 1,
            lr: 1e-3,
            head_lr: None,
            weight_decay: 0.01,
            warmup_ratio: 0.06,
            decay: Decay::Linear,
            max_grad_norm: Some(1.0),
            max_len: 128,
            seed: 42,
            metric_for_best: None,
            early_stopping_patience: None,
            save_every_steps: 0,
            verbalizers: Vec::new(),
            template: "{text} It was".into(),
            output: PathBuf::new(),
            overwrite: false,
            resume: false,
            eval_before_training: false,
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
}

/// Options that must not change when resuming (everything that shapes the computation).
fn fingerprint(cfg: &TrainConfig) -> String {
    let mut c = cfg.clone();
    c.resume = false;
    c.overwrite = false;
    c.epochs = 0;
    c.max_steps = None;
    c.early_stopping_patience = None;
    c.save_every_steps = 0;
    c.output = PathBuf::new();
    let json = serde_json::to_string(&c).expect("serialisable");
    format!("{:016x}", json.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)))
}

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
            let [tr, va, te] = data::split_indices(all.len(), cfg.seed, cfg.valid_percent, test_percent);
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
}

/// Batches over tokenised examples, shuffled per epoch by `(seed, epoch)`; the epoch and the
/// number of leading batches to skip (resume) are set by the strategy through shared counters.
#[derive(Clone)]
pub struct TaskLoader<B: Backend> {
    items: Arc<Vec<Encoded>>,
    batch_size: usize,
    pad: u32,
    device: B::Device,
    shuffle_seed: Option<u64>,
    epoch: Arc<AtomicUsize>,
    skip: Arc<AtomicUsize>,
}

impl<B: Backend> TaskLoader<B> {
    /// A loader over `items`.
    pub fn new(
        items: Arc<Vec<Encoded>>,
        batch_size: usize,
        pad: u32,
        device: B::Device,
        shuffle_seed: Option<u64>,
    ) -> Self {
        Self {
            items,
            batch_size: batch_size.max(1),
            pad,
            device,
            shuffle_seed,
            epoch: Arc::new(AtomicUsize::new(1)),
            skip: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Batches per epoch.
    pub fn batches(&self) -> usize {
        self.items.len().div_ceil(self.batch_size)
    }

    fn order(&self) -> Vec<usize> {
        match self.shuffle_seed {
            Some(seed) => {
                let epoch = self.epoch.load(Ordering::SeqCst) as u64;
                data::permutation(self.items.len(), seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            }
            None => (0..self.items.len()).collect(),
        }
    }
}

struct TaskLoaderIter<'a, B: Backend> {
    loader: &'a TaskLoader<B>,
    order: Vec<usize>,
    next_batch: usize,
}

impl<B: Backend> Iterator for TaskLoaderIter<'_, B> {
    type Item = Batch<B>;
    fn next(&mut self) -> Option<Batch<B>> {
        let bs = self.loader.batch_size;
        let start = self.next_batch * bs;
        if start >= self.order.len() {
            return None;
        }
        let end = (start + bs).min(self.order.len());
        let items: Vec<&Encoded> = self.order[start..end].iter().map(|&i| &self.loader.items[i]).collect();
        self.next_batch += 1;
        Some(make_batch(&items, self.loader.pad, &self.loader.device))
    }
}

impl<B: Backend> DataLoaderIterator<Batch<B>> for TaskLoaderIter<'_, B> {
    fn progress(&self) -> Progress {
        Progress {
            items_processed: (self.next_batch * self.loader.batch_size).min(self.order.len()),
            items_total: self.order.len(),
        }
    }
}

impl<B: Backend> DataLoader<B, Batch<B>> for TaskLoader<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<Batch<B>> + 'a> {
        let skip = self.skip.swap(0, Ordering::SeqCst);
        Box::new(TaskLoaderIter { loader: self, order: self.order(), next_batch: skip })
    }
    fn num_items(&self) -> usize {
        self.items.len()
    }
    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, Batch<B>>> {
        let mut l = self.clone();
        l.device = device.clone();
        Arc::new(l)
    }
    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, Batch<B>>> {
        let mut l = self.clone();
        l.items = Arc::new(self.items[start.min(end)..end.min(self.items.len())].to_vec());
        Arc::new(l)
    }
}

/// Output of the quiet (non-terminal) mode: burn-train's per-batch renderer is replaced by one
/// line per epoch and split, printed by the strategy.
#[derive(Default)]
pub struct QuietRenderer;

impl MetricsRendererTraining for QuietRenderer {
    fn update_train(&mut self, _state: MetricState) {}
    fn update_valid(&mut self, _state: MetricState) {}
    fn render_train(&mut self, _item: TrainingProgress, _: Vec<burn::train::renderer::ProgressType>) {}
    fn render_valid(&mut self, _item: TrainingProgress, _: Vec<burn::train::renderer::ProgressType>) {}
    fn on_train_end(
        &mut self,
        _summary: Option<burn::train::LearnerSummary>,
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        Ok(())
    }
}

impl MetricsRendererEvaluation for QuietRenderer {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}
    fn render_test(&mut self, _item: EvaluationProgress, _: Vec<burn::train::renderer::ProgressType>) {}
}

impl MetricsRenderer for QuietRenderer {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _definition: MetricDefinition) {}
}

/// burn-train's default metric logger writes a file per metric, split and epoch; this run writes
/// `metrics.csv` / `metrics.json` itself, so the stock logger is replaced by one that keeps nothing.
struct NullLogger;

impl burn::train::logger::MetricLogger for NullLogger {
    fn log(
        &mut self,
        _update: burn::train::metric::store::MetricsUpdate,
        _epoch: usize,
        _split: &burn::train::metric::store::Split,
    ) {
    }
    fn read_numeric(
        &mut self,
        _name: &str,
        _epoch: usize,
        _split: &burn::train::metric::store::Split,
    ) -> std::result::Result<Vec<burn::train::metric::NumericEntry>, String> {
        Ok(Vec::new())
    }
    fn log_metric_definition(&mut self, _definition: MetricDefinition) {}
    fn log_epoch_summary(&mut self, _summary: burn::train::metric::store::EpochSummary) {}
}

/// What the strategy hands back after `fit`.
#[derive(Default)]
struct FitOutcome {
    killed: bool,
    /// Seconds spent in training batches (validation and checkpoints excluded).
    train_seconds: f64,
    state: Option<TrainerState>,
    error: Option<TrainError>,
    stop_reason: String,
    tokens: usize,
}

/// Writes the adapter of a trained model (downcast from `Any`); `true` = best so far.
type SaveAdapter = Box<dyn Fn(&dyn std::any::Any, bool) -> Result<()> + Send + Sync>;

/// Everything the training loop needs besides burn-train's components.
struct PeftStrategy<B: AutodiffBackend> {
    device: B::Device,
    seed: u64,
    epochs: usize,
    max_steps: Option<usize>,
    grad_accumulation: usize,
    batch_size: usize,
    save_every_steps: usize,
    patience: Option<usize>,
    metric_for_best: String,
    n_classes: usize,
    lm: bool,
    quiet: bool,
    eval_before_training: bool,
    start: TrainerState,
    train_epoch: Arc<AtomicUsize>,
    train_skip: Arc<AtomicUsize>,
    grad_scale: Arc<Mutex<f64>>,
    optimizer_snapshot: Arc<Mutex<Option<crate::optim::OptimizerState<B>>>>,
    /// Writes the adapter of a model (`true`: the best so far, into the output directory;
    /// `false`: the last one, into `<output>/last`).
    on_save: SaveAdapter,
    checkpoint_root: PathBuf,
    output: PathBuf,
    outcome: Arc<Mutex<FitOutcome>>,
    stop: StopAt,
}

/// Seeds the backend RNG from the run seed and the data position, so dropout masks do not depend
/// on how often the process was restarted.
fn seed_for(seed: u64, epoch: usize, batch: usize) -> u64 {
    let mut rng = data::SplitMix64(seed ^ ((epoch as u64) << 32) ^ batch as u64);
    rng.next_u64()
}

fn print_record(r: &EpochRecord) {
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
    tensor_peft_models::adapter_file::write_atomically(&dir.join("metrics.csv"), csv.as_bytes())?;
    let json = serde_json::to_vec_pretty(history).expect("serialisable");
    tensor_peft_models::adapter_file::write_atomically(&dir.join("metrics.json"), &json)?;
    Ok(())
}

type Marker<B, M> = LearningComponentsMarker<B, WarmupSchedule, M, PeftOptimizer<M, B>>;

impl<B, M> SupervisedLearningStrategy<Marker<B, M>> for PeftStrategy<B>
where
    B: AutodiffBackend,
    M: TaskModel<B>,
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    fn fit(
        &self,
        components: TrainingComponents<Marker<B, M>>,
        mut learner: Learner<Marker<B, M>>,
        dataloader_train: TrainLoader<Marker<B, M>>,
        dataloader_valid: ValidLoader<Marker<B, M>>,
        _starting_epoch: usize,
    ) -> (M, SupervisedTrainingEventProcessor<Marker<B, M>>) {
        let mut processor = components.event_processor;
        let interrupter = components.interrupter;
        let mut state = self.start.clone();
        let mut outcome = FitOutcome::default();
        let better = |a: f64, b: f64| if higher_is_better(&self.metric_for_best) { a > b } else { a < b };
        let max_steps = self.max_steps.unwrap_or(usize::MAX);
        let started_epoch = if state.epoch_finished { state.epoch + 1 } else { state.epoch.max(1) };
        let mut resume_skip = if state.epoch_finished { 0 } else { state.batches_done };
        let mut partial = state.partial_train.take();
        if self.eval_before_training && state.step == 0 && state.history.is_empty() {
            let model = learner.model().valid();
            let mut acc = Accumulator::default();
            for batch in dataloader_valid.iter() {
                acc.add(&model.step(batch).stats);
            }
            let record =
                EpochRecord { epoch: 0, split: "valid".into(), step: 0, metrics: acc.metrics(self.n_classes, self.lm) };
            if self.quiet {
                print_record(&record);
            }
            state.history.push(record);
        }
        'epochs: for epoch in started_epoch..=self.epochs {
            if state.step >= max_steps {
                outcome.stop_reason = format!("reached --max-steps {max_steps}");
                break;
            }
            let global = Progress { items_processed: epoch, items_total: self.epochs };
            self.train_epoch.store(epoch, Ordering::SeqCst);
            self.train_skip.store(resume_skip, Ordering::SeqCst);
            let mut batches_done = std::mem::take(&mut resume_skip);
            let mut train_acc = partial.take().unwrap_or_default();
            let mut accumulator = GradientsAccumulator::<M>::new();
            let mut accumulated = 0;
            let mut iterator = dataloader_train.iter();
            let mut hit_max = false;
            let epoch_started = std::time::Instant::now();
            while let Some(batch) = iterator.next() {
                B::seed(&self.device, seed_for(self.seed, epoch, batches_done));
                let output = learner.train_step(batch);
                let stats = output.item.stats.clone();
                if !stats.loss.is_finite() {
                    outcome.error = Some(TrainError::NonFiniteLoss { step: state.step + 1, loss: stats.loss });
                    break 'epochs;
                }
                train_acc.add(&stats);
                outcome.tokens += stats.tokens;
                batches_done += 1;
                accumulator.accumulate(&learner.model(), output.grads);
                accumulated += 1;
                let epoch_end = batches_done == self.train_batches(&dataloader_train);
                let mut stepped = false;
                if accumulated == self.grad_accumulation || epoch_end {
                    *self.grad_scale.lock().expect("not poisoned") = 1.0 / accumulated as f64;
                    learner.lr_step();
                    learner.optimizer_step(accumulator.grads());
                    accumulated = 0;
                    state.step += 1;
                    stepped = true;
                }
                let item = TrainingItem::new(
                    output.item,
                    iterator.progress(),
                    global.clone(),
                    Some(batches_done),
                    Some(learner.lr_current()),
                );
                processor.process_train(LearnerEvent::ProcessedItem(item));
                if stepped && !epoch_end {
                    if self.save_every_steps > 0 && state.step.is_multiple_of(self.save_every_steps) {
                        state.epoch = epoch;
                        state.batches_done = batches_done;
                        state.epoch_finished = false;
                        state.partial_train = Some(train_acc.clone());
                        if let Err(e) = self.checkpoint(&learner.model(), &state) {
                            outcome.error = Some(e);
                            break 'epochs;
                        }
                        state.partial_train = None;
                        if self.stop == StopAt::Step(state.step) {
                            outcome.stop_reason = format!("stopped after the checkpoint of step {}", state.step);
                            outcome.killed = true;
                            break 'epochs;
                        }
                    }
                    if state.step >= max_steps {
                        hit_max = true;
                        break;
                    }
                }
                if interrupter.should_stop() {
                    outcome.stop_reason = "interrupted".into();
                    break 'epochs;
                }
            }
            drop(iterator);
            outcome.train_seconds += epoch_started.elapsed().as_secs_f64();
            processor.process_train(LearnerEvent::EndEpoch(epoch));
            // Validation.
            let model = learner.model().valid();
            let mut valid_acc = Accumulator::default();
            let mut iterator = dataloader_valid.iter();
            let mut iteration = 0;
            while let Some(batch) = iterator.next() {
                iteration += 1;
                let out = model.step(batch);
                valid_acc.add(&out.stats);
                let item = TrainingItem::new(out, iterator.progress(), global.clone(), Some(iteration), None);
                processor.process_valid(LearnerEvent::ProcessedItem(item));
            }
            drop(iterator);
            processor.process_valid(LearnerEvent::EndEpoch(epoch));
            let train_record = EpochRecord {
                epoch,
                split: "train".into(),
                step: state.step,
                metrics: train_acc.metrics(self.n_classes, self.lm),
            };
            let valid_record = EpochRecord {
                epoch,
                split: "valid".into(),
                step: state.step,
                metrics: valid_acc.metrics(self.n_classes, self.lm),
            };
            if self.quiet {
                print_record(&train_record);
                print_record(&valid_record);
            }
            let value = valid_record.metrics.get(&self.metric_for_best).copied().unwrap_or(f64::NAN);
            state.history.push(train_record);
            state.history.push(valid_record);
            let improved = value.is_finite() && state.best.is_none_or(|(b, _, _)| better(value, b));
            if improved {
                state.best = Some((value, epoch, state.step));
                state.epochs_without_improvement = 0;
                let trained = learner.model();
                if let Err(e) = (self.on_save)(&trained as &dyn std::any::Any, true) {
                    outcome.error = Some(e);
                    break;
                }
            } else {
                state.epochs_without_improvement += 1;
            }
            // A --max-steps stop inside an epoch keeps the data position, so that a resumed run
            // with a larger limit continues where this one stopped.
            let finished = batches_done == self.train_batches(&dataloader_train);
            state.epoch = epoch;
            state.batches_done = if finished { 0 } else { batches_done };
            state.epoch_finished = finished;
            state.partial_train = (!finished).then(|| train_acc.clone());
            if let Err(e) =
                write_history(&self.output, &state.history).and_then(|_| self.checkpoint(&learner.model(), &state))
            {
                outcome.error = Some(e);
                break;
            }
            if hit_max || state.step >= max_steps {
                outcome.stop_reason = format!("reached --max-steps {max_steps}");
                break;
            }
            if let Some(p) = self.patience
                && state.epochs_without_improvement >= p
            {
                outcome.stop_reason = format!("early stopping: no {} improvement in {p} epochs", self.metric_for_best);
                break;
            }
        }
        if outcome.stop_reason.is_empty() {
            outcome.stop_reason = format!("completed {} epochs", self.epochs);
        }
        if outcome.error.is_none()
            && !outcome.killed
            && !state.history.is_empty()
            && let Err(e) = (self.on_save)(&learner.model() as &dyn std::any::Any, false)
        {
            outcome.error = Some(e);
        }
        outcome.state = Some(state);
        *self.outcome.lock().expect("not poisoned") = outcome;
        (learner.model(), processor)
    }
}

impl<B: AutodiffBackend> PeftStrategy<B> {
    fn train_batches<O>(&self, loader: &Arc<dyn DataLoader<B, O>>) -> usize {
        loader.num_items().div_ceil(self.batch_size)
    }

    /// Writes a step checkpoint and keeps only the newest.
    fn checkpoint<M: Module<B>>(&self, model: &M, state: &TrainerState) -> Result<()> {
        let optimizer = self.optimizer_snapshot.lock().expect("not poisoned").clone();
        let written = checkpoint::write_checkpoint(&self.checkpoint_root, model, optimizer, state)?;
        for (_, dir) in checkpoint::list_checkpoints(&self.checkpoint_root) {
            if dir != written {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Ok(())
    }
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
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) || cfg.head_lr.is_some_and(|l| !(l.is_finite() && l > 0.0)) {
        return bad("lr", "learning rates must be positive numbers");
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
    if let Some(m) = &cfg.metric_for_best {
        let ok: &[&str] = match cfg.task {
            TaskKind::Classification | TaskKind::LmClassification => &["loss", "accuracy", "f1", "mcc"],
            TaskKind::Regression => &["loss", "pearson", "spearman"],
            TaskKind::CausalLm => &["loss", "perplexity"],
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

fn targets_of(cfg: &TrainConfig) -> Targets {
    match (&cfg.target_modules, &cfg.target_regex) {
        (Some(names), _) => Targets::Names(names.clone()),
        (None, Some(re)) => Targets::Regex(re.clone()),
        (None, None) => Targets::Default,
    }
}

fn default_metric(task: TaskKind) -> &'static str {
    match task {
        TaskKind::Classification | TaskKind::LmClassification => "accuracy",
        TaskKind::Regression => "pearson",
        TaskKind::CausalLm => "loss",
    }
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
    let head_ids: HashSet<ParamId> = checkpoint::trainable_params(&model)
        .into_iter()
        .filter(|(p, ..)| p.starts_with("net.head."))
        .map(|(.., id)| id)
        .collect();
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
