//! The training loop: a burn-train [`SupervisedLearningStrategy`] that adds what the stock epoch
//! loop lacks — optimizer-step schedules with gradient accumulation, `--max-steps`, step
//! checkpoints that resume exactly (data position and dropout RNG included), a non-finite loss
//! check, best-epoch selection on any validation metric and early stopping — while burn-train's
//! event processor still feeds its dashboard. Also the quiet (non-terminal) renderer.

use crate::checkpoint::{self, TrainerState};
use crate::data;
use crate::error::{Result, TrainError};
use crate::metrics::{Accumulator, EpochRecord, higher_is_better};
use crate::optim::{PeftOptimizer, WarmupSchedule};
use crate::task::{Batch, TaskOutput};
use crate::trainer::{StopAt, TaskModel};
use burn::data::dataloader::{DataLoader, Progress};
use burn::module::Module;
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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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

/// Writes the adapter of a trained model (downcast from `Any`); `true` = best so far.
pub(crate) type SaveAdapter = Box<dyn Fn(&dyn std::any::Any, bool) -> Result<()> + Send + Sync>;

/// `‖ΔW‖/‖W‖` of every adapted projection of a model (downcast from `Any`), by site name.
pub(crate) type UpdateRatios = Box<dyn Fn(&dyn std::any::Any) -> Vec<(String, f64)> + Send + Sync>;

/// Above this `‖ΔW‖/‖W‖` the update outweighs the pretrained layer: warn. Measured on MiniLM and
/// the VADER recipe: healthy LoRA runs end at 0.01–0.2; a TT-LoRA run that degraded toward chance
/// reached 12.5 (median over its layers 3.1). A model with random weights, like the tests' tiny
/// LLaMA, passes 1 legitimately.
pub(crate) const UPDATE_RATIO_WARNING: f64 = 1.0;

/// Everything the training loop needs besides burn-train's components.
pub(crate) struct PeftStrategy<B: AutodiffBackend> {
    pub(crate) device: B::Device,
    pub(crate) seed: u64,
    pub(crate) epochs: usize,
    pub(crate) max_steps: Option<usize>,
    pub(crate) grad_accumulation: usize,
    pub(crate) batch_size: usize,
    pub(crate) save_every_steps: usize,
    pub(crate) patience: Option<usize>,
    pub(crate) metric_for_best: String,
    pub(crate) n_classes: usize,
    pub(crate) lm: bool,
    pub(crate) quiet: bool,
    pub(crate) eval_before_training: bool,
    pub(crate) start: TrainerState,
    pub(crate) train_epoch: Arc<AtomicUsize>,
    pub(crate) train_skip: Arc<AtomicUsize>,
    pub(crate) grad_scale: Arc<Mutex<f64>>,
    pub(crate) optimizer_snapshot: Arc<Mutex<Option<crate::optim::OptimizerState<B>>>>,
    /// Writes the adapter of a model (`true`: the best so far, into the output directory;
    /// `false`: the last one, into `<output>/last`).
    pub(crate) on_save: SaveAdapter,
    /// Measures how large the updates have grown (the `update_ratio` train metric).
    pub(crate) update_ratios: UpdateRatios,
    pub(crate) checkpoint_root: PathBuf,
    pub(crate) output: PathBuf,
    pub(crate) outcome: Arc<Mutex<FitOutcome>>,
    pub(crate) stop: StopAt,
}

/// Seeds the backend RNG from the run seed and the data position, so dropout masks do not depend
/// on how often the process was restarted.
fn seed_for(seed: u64, epoch: usize, batch: usize) -> u64 {
    let mut rng = data::SplitMix64(seed ^ ((epoch as u64) << 32) ^ batch as u64);
    rng.next_u64()
}

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
            let tokens_at_start = train_acc.tokens;
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
            let mut train_metrics = train_acc.metrics(self.n_classes, self.lm);
            train_metrics.insert("lr".into(), learner.lr_current());
            // This process's batches of the epoch (a resumed epoch counts only its own part).
            train_metrics.insert(
                "tokens_per_second".into(),
                (train_acc.tokens - tokens_at_start) as f64 / epoch_seconds.max(1e-9),
            );
            let ratios = (self.update_ratios)(&learner.model() as &dyn std::any::Any);
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
                checkpoint::remove_checkpoint(&dir);
            }
        }
        Ok(())
    }
}
