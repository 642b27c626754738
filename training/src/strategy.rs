//! The training loop: a burn-train [`SupervisedLearningStrategy`] that adds what the stock epoch
//! loop lacks — optimizer-step schedules with gradient accumulation, `--max-steps`, step
//! checkpoints that resume exactly (data position and dropout RNG included), a non-finite loss
//! check, best-epoch selection on any validation metric and early stopping — while burn-train's
//! event processor still feeds its dashboard. Also the quiet (non-terminal) renderer.

use crate::checkpoint::{self, TrainerState};
use crate::config::TrainConfig;
use crate::data::{self, TaskKind};
use crate::error::{Result, TrainError};
use crate::metrics::{Accumulator, EpochRecord, higher_is_better};
use crate::optim::{PeftOptimizer, WarmupSchedule};
use crate::parallel::DataParallel;
use crate::task::{Batch, TaskModel, TaskOutput};
use crate::trainer::StopAt;
use crate::trainer::report::{metric_for_best, print_record, write_history};
use burn::data::dataloader::{DataLoader, Progress};
use burn::optim::GradientsAccumulator;
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::MetricDefinition;
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, TrainingProgress,
};
use burn::train::{
    EventProcessorTraining, InferenceStep, Learner, LearnerEvent, LearningComponentsMarker, SupervisedLearningStrategy,
    SupervisedTrainingEventProcessor, TrainLoader, TrainingComponents, TrainingItem, ValidLoader,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tensor_peft_models::ArchSpec;
use tensor_peft_models::adapter_file::AdapterConfig;

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
pub(crate) struct NullLogger;

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
pub(crate) struct FitOutcome {
    pub(crate) killed: bool,
    /// Seconds spent in training batches (validation and checkpoints excluded).
    pub(crate) train_seconds: f64,
    pub(crate) state: Option<TrainerState>,
    pub(crate) error: Option<TrainError>,
    pub(crate) stop_reason: String,
    pub(crate) tokens: usize,
}

/// Above this `‖ΔW‖/‖W‖` the update outweighs the pretrained layer: warn. Measured on MiniLM and
/// the VADER recipe: healthy LoRA runs end at 0.01–0.2; a TT-LoRA run that degraded toward chance
/// reached 12.5 (median over its layers 3.1). A model with random weights, like the tests' tiny
/// LLaMA, passes 1 legitimately.
pub(crate) const UPDATE_RATIO_WARNING: f64 = 1.0;

/// The training loop of one run of task model `M`: the run's configuration, where it starts, and
/// the handles it shares with the data loader and the optimizer (which burn-train owns while it
/// runs).
pub(crate) struct PeftStrategy<B: AutodiffBackend, M> {
    /// The run's configuration (epochs, steps, batches, checkpoints, early stopping, output).
    pub(crate) cfg: Arc<TrainConfig>,
    /// The devices the steps run on: the model, the optimizer and validation live on the first;
    /// with several, each step's batch is split over them ([`crate::parallel`]).
    pub(crate) devices: Vec<B::Device>,
    /// The workers of a data-parallel run (several devices), taken by `fit`.
    pub(crate) parallel: Mutex<Option<DataParallel<B, M>>>,
    /// Classes of a label task (0 otherwise), for the metrics.
    pub(crate) n_classes: usize,
    /// Print one line per epoch and split (no dashboard).
    pub(crate) quiet: bool,
    /// The loop's position: fresh, or read from the checkpoint resumed.
    pub(crate) start: TrainerState,
    pub(crate) stop: StopAt,
    /// The loader's epoch and the batches it skips (resuming inside an epoch).
    pub(crate) train_epoch: Arc<AtomicUsize>,
    pub(crate) train_skip: Arc<AtomicUsize>,
    /// The optimizer's gradient scale (1 / micro-batches accumulated) and its state for checkpoints.
    pub(crate) grad_scale: Arc<Mutex<f64>>,
    pub(crate) optimizer_snapshot: Arc<Mutex<Option<crate::optim::OptimizerState<B>>>>,
    /// The base model's architecture and the adapter config written with every adapter.
    pub(crate) spec: ArchSpec,
    pub(crate) adapter_config: AdapterConfig,
    /// The model of the best validation epoch so far, for the test split.
    pub(crate) best_model: Arc<Mutex<Option<M>>>,
    pub(crate) outcome: Arc<Mutex<FitOutcome>>,
}

/// Seeds the backend RNG from the run seed and the data position, so dropout masks do not depend
/// on how often the process was restarted.
fn seed_for(seed: u64, epoch: usize, batch: usize) -> u64 {
    let mut rng = data::SplitMix64(seed ^ ((epoch as u64) << 32) ^ batch as u64);
    rng.next_u64()
}

/// burn-train's component types of a run of task model `M`.
pub(crate) type Marker<B, M> = LearningComponentsMarker<B, WarmupSchedule, M, PeftOptimizer<M, B>>;

impl<B, M> SupervisedLearningStrategy<Marker<B, M>> for PeftStrategy<B, M>
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
        let cfg = &*self.cfg;
        let metric_for_best = metric_for_best(cfg);
        let lm = cfg.task == TaskKind::CausalLm;
        let better = |a: f64, b: f64| if higher_is_better(&metric_for_best) { a > b } else { a < b };
        let max_steps = cfg.max_steps.unwrap_or(usize::MAX);
        let started_epoch = if state.epoch_finished { state.epoch + 1 } else { state.epoch.max(1) };
        let mut resume_skip = if state.epoch_finished { 0 } else { state.batches_done };
        let mut partial = state.partial_train.take();
        let parallel = self.parallel.lock().expect("not poisoned").take();
        // The loader counts its batches in parts of a global batch.
        let parts = self.devices.len();
        if cfg.eval_before_training && state.step == 0 && state.history.is_empty() {
            let record = self.validate(&learner.model(), &dataloader_valid, 0, 0, lm);
            state.history.push(record);
        }
        'epochs: for epoch in started_epoch..=cfg.epochs {
            if state.step >= max_steps {
                outcome.stop_reason = format!("reached --max-steps {max_steps}");
                break;
            }
            let global = Progress { items_processed: epoch, items_total: cfg.epochs };
            self.train_epoch.store(epoch, Ordering::SeqCst);
            self.train_skip.store(resume_skip * parts, Ordering::SeqCst);
            let mut batches_done = std::mem::take(&mut resume_skip);
            let mut train_acc = partial.take().unwrap_or_default();
            let mut accumulator = GradientsAccumulator::<M>::new();
            let mut accumulated = 0;
            let mut iterator = dataloader_train.iter();
            let mut hit_max = false;
            let epoch_started = std::time::Instant::now();
            let tokens_at_start = train_acc.tokens;
            while let Some(batch) = iterator.next() {
                let seed = seed_for(cfg.seed, epoch, batches_done);
                let item = match &parallel {
                    None => {
                        tensor_peft_kernels::rng::seed::<B>(&self.devices[0], seed);
                        let output = learner.train_step(batch);
                        train_acc.add(&output.item.stats);
                        accumulator.accumulate(&learner.model(), output.grads);
                        output.item
                    }
                    Some(parallel) => {
                        let mut batches = vec![batch];
                        while batches.len() < parallel.devices() {
                            match iterator.next() {
                                Some(next) => batches.push(next),
                                None => break,
                            }
                        }
                        match parallel.step(&learner.model(), batches, seed, &mut accumulator) {
                            Ok((parts, item)) => {
                                parts.iter().for_each(|part| train_acc.add(part));
                                item
                            }
                            Err(e) => {
                                outcome.error = Some(e);
                                break 'epochs;
                            }
                        }
                    }
                };
                let stats = &item.stats;
                if !stats.loss.is_finite() {
                    outcome.error = Some(TrainError::NonFiniteLoss { step: state.step + 1, loss: stats.loss });
                    break 'epochs;
                }
                outcome.tokens += stats.tokens;
                batches_done += 1;
                accumulated += 1;
                let epoch_end = batches_done == self.train_batches(&dataloader_train);
                let mut stepped = false;
                if accumulated == cfg.grad_accumulation || epoch_end {
                    *self.grad_scale.lock().expect("not poisoned") = 1.0 / accumulated as f64;
                    learner.lr_step();
                    learner.optimizer_step(accumulator.grads());
                    accumulated = 0;
                    state.step += 1;
                    stepped = true;
                }
                let item = TrainingItem::new(
                    item,
                    iterator.progress(),
                    global.clone(),
                    Some(batches_done),
                    Some(learner.lr_current()),
                );
                processor.process_train(LearnerEvent::ProcessedItem(item));
                if stepped && !epoch_end {
                    if cfg.eval_every_steps > 0 && state.step.is_multiple_of(cfg.eval_every_steps) {
                        let record = self.validate(&learner.model(), &dataloader_valid, epoch, state.step, lm);
                        let value = record.metrics.get(&metric_for_best).copied().unwrap_or(f64::NAN);
                        state.history.push(record);
                        if let Err(e) = self.consider_best(&mut state, value, epoch, &learner.model(), &better) {
                            outcome.error = Some(e);
                            break 'epochs;
                        }
                        if let Err(e) = write_history(&cfg.output, &state.history) {
                            outcome.error = Some(e);
                            break 'epochs;
                        }
                        if let Some(p) = cfg.early_stopping_patience
                            && state.epochs_without_improvement >= p
                        {
                            outcome.stop_reason =
                                format!("early stopping: no {metric_for_best} improvement in {p} evaluations");
                            break 'epochs;
                        }
                    }
                    if cfg.save_every_steps > 0 && state.step.is_multiple_of(cfg.save_every_steps) {
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
            let epoch_seconds = epoch_started.elapsed().as_secs_f64();
            outcome.train_seconds += epoch_seconds;
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
            let mut train_metrics = train_acc.metrics(self.n_classes, lm);
            train_metrics.insert("lr".into(), learner.lr_current());
            // This process's batches of the epoch (a resumed epoch counts only its own part).
            train_metrics.insert(
                "tokens_per_second".into(),
                (train_acc.tokens - tokens_at_start) as f64 / epoch_seconds.max(1e-9),
            );
            let ratios = learner.model().update_ratios(&self.spec);
            if let Some((site, max)) = ratios.into_iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
                train_metrics.insert("update_ratio".into(), max);
                if max > UPDATE_RATIO_WARNING {
                    eprintln!(
                        "warning: epoch {epoch}: the update of {site} has grown to {max:.2}× the norm of its frozen \
                         weight (‖ΔW‖/‖W‖); on a pretrained model healthy updates stay well below 1 (0.01–0.2 for \
                         LoRA on MiniLM) and a run that degraded toward chance reached 12.5 — if the metrics \
                         stall, lower --lr"
                    );
                }
            }
            let train_record = EpochRecord { epoch, split: "train".into(), step: state.step, metrics: train_metrics };
            let valid_record = EpochRecord {
                epoch,
                split: "valid".into(),
                step: state.step,
                metrics: valid_acc.metrics(self.n_classes, lm),
            };
            if self.quiet {
                print_record(&train_record);
                print_record(&valid_record);
            }
            let value = valid_record.metrics.get(&metric_for_best).copied().unwrap_or(f64::NAN);
            state.history.push(train_record);
            state.history.push(valid_record);
            if let Err(e) = self.consider_best(&mut state, value, epoch, &learner.model(), &better) {
                outcome.error = Some(e);
                break;
            }
            // A --max-steps stop inside an epoch keeps the data position, so that a resumed run
            // with a larger limit continues where this one stopped.
            let finished = batches_done == self.train_batches(&dataloader_train);
            state.epoch = epoch;
            state.batches_done = if finished { 0 } else { batches_done };
            state.epoch_finished = finished;
            state.partial_train = (!finished).then(|| train_acc.clone());
            if let Err(e) =
                write_history(&cfg.output, &state.history).and_then(|_| self.checkpoint(&learner.model(), &state))
            {
                outcome.error = Some(e);
                break;
            }
            if hit_max || state.step >= max_steps {
                outcome.stop_reason = format!("reached --max-steps {max_steps}");
                break;
            }
            if let Some(p) = cfg.early_stopping_patience
                && state.epochs_without_improvement >= p
            {
                let what = if cfg.eval_every_steps > 0 { "evaluations" } else { "epochs" };
                outcome.stop_reason = format!("early stopping: no {metric_for_best} improvement in {p} {what}");
                break;
            }
        }
        if outcome.stop_reason.is_empty() {
            outcome.stop_reason = format!("completed {} epochs", cfg.epochs);
        }
        if outcome.error.is_none()
            && !outcome.killed
            && !state.history.is_empty()
            && let Err(e) = self.save_adapter(&learner.model(), false)
        {
            outcome.error = Some(e);
        }
        outcome.state = Some(state);
        *self.outcome.lock().expect("not poisoned") = outcome;
        (learner.model(), processor)
    }
}

impl<B: AutodiffBackend, M: TaskModel<B>> PeftStrategy<B, M>
where
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    fn train_batches<O>(&self, loader: &Arc<dyn DataLoader<B, O>>) -> usize {
        loader.num_items().div_ceil(self.cfg.batch_size)
    }

    /// A validation pass outside the epoch loop's own (before training, every `eval_every_steps`):
    /// the record of `model` on the validation split, printed when quiet.
    fn validate(
        &self,
        model: &M,
        loader: &ValidLoader<Marker<B, M>>,
        epoch: usize,
        step: usize,
        lm: bool,
    ) -> EpochRecord {
        let model = model.valid();
        let mut acc = Accumulator::default();
        for batch in loader.iter() {
            acc.add(&model.step(batch).stats);
        }
        let record = EpochRecord { epoch, split: "valid".into(), step, metrics: acc.metrics(self.n_classes, lm) };
        if self.quiet {
            print_record(&record);
        }
        record
    }

    /// Records an evaluation's `value` of the selection metric: a new best (strictly better, finite)
    /// saves `model`'s adapter as the best; anything else counts towards early stopping.
    fn consider_best(
        &self,
        state: &mut TrainerState,
        value: f64,
        epoch: usize,
        model: &M,
        better: &impl Fn(f64, f64) -> bool,
    ) -> Result<()> {
        if value.is_finite() && state.best.is_none_or(|(b, _, _)| better(value, b)) {
            state.best = Some((value, epoch, state.step));
            state.epochs_without_improvement = 0;
            self.save_adapter(model, true)
        } else {
            state.epochs_without_improvement += 1;
            Ok(())
        }
    }

    /// Writes the adapter of `model`: the best so far into the output directory (and kept for the
    /// test split), or the last one into `<output>/last`.
    fn save_adapter(&self, model: &M, best: bool) -> Result<()> {
        if best {
            model.write_adapter(&self.spec, &self.adapter_config, &self.cfg.output)?;
            *self.best_model.lock().expect("not poisoned") = Some(model.clone());
        } else {
            model.write_adapter(&self.spec, &self.adapter_config, &self.cfg.output.join("last"))?;
        }
        Ok(())
    }

    /// Writes a step checkpoint and keeps only the newest.
    fn checkpoint(&self, model: &M, state: &TrainerState) -> Result<()> {
        let root = self.cfg.output.join("checkpoint");
        let optimizer = self.optimizer_snapshot.lock().expect("not poisoned").clone();
        let written = checkpoint::write_checkpoint(&root, model, optimizer, state)?;
        for (_, dir) in checkpoint::list_checkpoints(&root) {
            if dir != written {
                checkpoint::remove_checkpoint(&dir);
            }
        }
        Ok(())
    }
}
