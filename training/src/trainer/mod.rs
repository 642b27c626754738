//! `finetune`: from a model path, a task, data and a method to a small adapter directory.
//!
//! A run has three parts, one module each: [`setup`] loads the base model and the data, builds the
//! task model with its adapters and the optimizer, and wires burn-train's `SupervisedTraining`;
//! [`resume`] picks up a run from its newest checkpoint (or starts a fresh one); [`report`] prints
//! and writes what the run measured (`metrics.csv`, `metrics.json`, `curves.png`,
//! `train_report.json`). The training loop itself is the strategy of [`crate::strategy`]. Metrics
//! go to burn-train's dashboard (TUI on a terminal) and, one line per epoch and split, to stdout
//! otherwise.

pub mod report;
pub mod resume;
pub mod setup;

pub use crate::config::{TaskInfo, TrainConfig, validate};
pub use report::{FinetuneReport, evaluate_items};
pub use setup::{BaseModel, Splits, load_base, load_splits};

use crate::checkpoint;
use crate::data::{Example, Labels, TaskKind};
use crate::error::{Result, TrainError};
use crate::loader::TaskLoader;
use crate::parallel::DataParallel;
use crate::strategy::{FitOutcome, PeftStrategy};
use crate::task::{Batch, TaskModel, TaskOutput};
use burn::tensor::backend::AutodiffBackend;
use burn::train::{InferenceStep, Learner};
use std::sync::{Arc, Mutex};
use tensor_peft_kernels::ComputeDType;

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
    finetune_until::<B>(cfg, std::slice::from_ref(device), StopAt::Never)
}

/// [`finetune`] data-parallel over `devices` (the first holds the model, the optimizer and
/// validation): each step's global batch of `cfg.batch_size` examples is split in order into
/// `cfg.batch_size / devices.len()` per device, the parts run at once, one worker thread per
/// device (a replica of the model on each device but the first), and their gradients, weighted by
/// each part's share of the loss units, are summed on the first device for one optimizer step
/// (`training/src/parallel.rs`). The adapter equals the one-device run's up to float rounding (without
/// dropout: the masks depend on the part).
pub fn finetune_on<B: AutodiffBackend>(cfg: &TrainConfig, devices: &[B::Device]) -> Result<FinetuneReport> {
    finetune_until::<B>(cfg, devices, StopAt::Never)
}

/// [`finetune_on`] that stops at `stop` (see [`StopAt`]).
pub fn finetune_until<B: AutodiffBackend>(
    cfg: &TrainConfig,
    devices: &[B::Device],
    stop: StopAt,
) -> Result<FinetuneReport> {
    validate(cfg)?;
    let Some(device) = devices.first() else {
        return Err(TrainError::Option { option: "devices", reason: "no device given".into() });
    };
    if !cfg.batch_size.is_multiple_of(devices.len()) {
        return Err(TrainError::Option {
            option: "batch_size",
            reason: format!(
                "the global batch of {} examples cannot be split evenly over {} devices; use a multiple of {}",
                cfg.batch_size,
                devices.len(),
                devices.len()
            ),
        });
    }
    if cfg.compute_dtype == ComputeDType::Bf16 && !tensor_peft_kernels::fused::runs_on::<B>() {
        return Err(TrainError::Option {
            option: "compute_dtype",
            reason: format!(
                "bf16 runs on the flex backend only (its fused linear kernels), not on {}",
                B::name(device)
            ),
        });
    }
    tensor_peft_kernels::set_compute_dtype(cfg.compute_dtype);
    let (cfg, recommended) = cfg.clone().with_recommended_settings();
    let cfg = &cfg;
    if let Some(note) = recommended {
        eprintln!("{note}");
    }
    setup::check_model_family(cfg)?;
    let (train, valid, test, notes) = load_splits(cfg)?;
    for note in notes {
        eprintln!("warning: {note}");
    }
    setup::prepare_output(cfg)?;
    // Seeds the generator that initialises adapters and heads on every backend (and the backend).
    tensor_peft_kernels::rng::seed::<B>(device, cfg.seed);
    let base = load_base::<B>(&cfg.model, cfg.base_dtype, device)?;
    let labels = if cfg.task.has_labels() { Some(Labels::from_examples(&train, &cfg.train)?) } else { None };
    let splits = [train, valid, test];
    // A data-parallel replica: the same task model built on another device from the same file.
    let base_on = |device: &B::Device| load_base::<B>(&cfg.model, cfg.base_dtype, device);
    let changed = || TrainError::Option { option: "model", reason: "the model file changed during the run".into() };
    match base {
        BaseModel::Encoder(bert, spec, tokenizer) => {
            let prepared = setup::encoder_task(cfg, bert, spec, tokenizer, labels.clone())?;
            let replica = |device: &B::Device| match base_on(device)? {
                BaseModel::Encoder(bert, spec, tokenizer) => {
                    Ok(setup::encoder_task(cfg, bert, spec, tokenizer, labels.clone())?.model)
                }
                _ => Err(changed()),
            };
            run(cfg, prepared, splits, devices, &replica, stop)
        }
        BaseModel::Decoder(llama, spec, tokenizer) if cfg.task == TaskKind::Dpo => {
            let prepared = setup::dpo_task(cfg, llama, spec, tokenizer)?;
            let replica = |device: &B::Device| match base_on(device)? {
                BaseModel::Decoder(llama, spec, tokenizer) => Ok(setup::dpo_task(cfg, llama, spec, tokenizer)?.model),
                _ => Err(changed()),
            };
            run(cfg, prepared, splits, devices, &replica, stop)
        }
        BaseModel::Decoder(llama, spec, tokenizer) => {
            let prepared = setup::lm_task(cfg, llama, spec, tokenizer, labels.clone())?;
            let replica = |device: &B::Device| match base_on(device)? {
                BaseModel::Decoder(llama, spec, tokenizer) => {
                    Ok(setup::lm_task(cfg, llama, spec, tokenizer, labels.clone())?.model)
                }
                _ => Err(changed()),
            };
            run(cfg, prepared, splits, devices, &replica, stop)
        }
    }
}

/// Trains the prepared task model: setup, resume, burn-train's loop, report.
fn run<B, M>(
    cfg: &TrainConfig,
    prepared: setup::Prepared<M>,
    splits: [Vec<Example>; 3],
    devices: &[B::Device],
    replica: &dyn Fn(&B::Device) -> Result<M>,
    stop: StopAt,
) -> Result<FinetuneReport>
where
    B: AutodiffBackend,
    M: TaskModel<B>,
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    let setup::Prepared { model, spec, tokenizer, labels, info, pad } = prepared;
    let device = &devices[0];
    let [mut train_items, mut valid_items, mut test_items] =
        setup::encode_splits(cfg, &tokenizer, labels.as_ref(), splits)?;
    // Before the checkpoint of a resumed run is restored: what the task takes from the base model.
    for items in [&mut train_items, &mut valid_items, &mut test_items] {
        model.prepare_items(items, cfg.batch_size, pad, device)?;
    }
    let model = checkpoint::stable_param_ids(model);
    let trainable_params = checkpoint::trainable_count(&model);
    let adapter_params = model.adapter_params();
    let optimizer = setup::optimizer::<B, M>(cfg, &spec, &model);
    let (model, optimizer, start) = resume::start::<B, M>(cfg, model, optimizer, device)?;
    setup::write_train_config(cfg)?;

    let total_steps = setup::total_steps(cfg, train_items.len());
    let schedule = setup::schedule(cfg, total_steps, start.step);
    let train_loader = TaskLoader::<B>::new(Arc::new(train_items), cfg.batch_size, pad, device.clone(), Some(cfg.seed))
        .sharded(devices);
    let valid_loader =
        TaskLoader::<B::InnerBackend>::new(Arc::new(valid_items), cfg.batch_size, pad, device.clone(), None);
    // The workers of a data-parallel run, with a replica of the model (stable parameter ids) on
    // each device but the first; built last, so their random initialisation draws nothing the
    // run uses (their trained values are the first device's at every step).
    let parallel = if devices.len() > 1 {
        let replica = |device: &B::Device| replica(device).map(checkpoint::stable_param_ids);
        Some(DataParallel::<B, M>::new(devices, &replica)?)
    } else {
        None
    };
    let n_classes = labels.as_ref().map_or(0, Labels::len);
    let quiet = report::quiet();
    let best_model: Arc<Mutex<Option<M>>> = Arc::new(Mutex::new(None));
    let outcome = Arc::new(Mutex::new(FitOutcome::default()));
    let strategy = PeftStrategy::<B, M> {
        cfg: Arc::new(cfg.clone()),
        devices: devices.to_vec(),
        parallel: Mutex::new(parallel),
        n_classes,
        quiet,
        start,
        stop,
        train_epoch: train_loader.epoch.clone(),
        train_skip: train_loader.skip.clone(),
        grad_scale: optimizer.grad_scale.clone(),
        optimizer_snapshot: optimizer.snapshot.clone(),
        adapter_config: setup::adapter_config(cfg, &spec, &info),
        spec: spec.clone(),
        best_model: best_model.clone(),
        outcome: outcome.clone(),
    };
    if quiet {
        report::announce(cfg, &spec, trainable_params, adapter_params, total_steps);
    }
    let training = setup::supervised_training(cfg, train_loader, valid_loader, strategy, n_classes, quiet);
    let started = std::time::Instant::now();
    let result = training.launch(Learner::new(model, optimizer, schedule));
    let train_seconds = started.elapsed().as_secs_f64();

    let outcome = std::mem::take(&mut *outcome.lock().expect("not poisoned"));
    if let Some(e) = outcome.error {
        return Err(e);
    }
    drop(result);
    let best = best_model.lock().expect("not poisoned").clone();
    let test = report::TestRun { best: best.as_ref(), items: &test_items, pad, n_classes, quiet };
    report::finish::<B, M>(cfg, outcome, test, trainable_params, adapter_params, train_seconds, device)
}
