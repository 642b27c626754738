//! Data-parallel training steps (`tpeft finetune --devices a,b,…`) on burn-train's multi-device
//! engine: one [`MultiDevicesTrainStep`] worker thread per device forks the model onto its device
//! and runs the training step on its part of the global batch; the parts' gradients come back to
//! the first device, weighted by each part's share of the loss units (examples, or supervised
//! tokens), and are summed there for one optimizer step. The weighting makes the step's gradient
//! the one of the whole global batch (a mean over all its units), whatever the parts' padding: the
//! adapter after N steps equals the one-device run's up to float rounding. A factor shared by
//! several layers (LoTR, LoRTA) is one parameter of the model, so it gets one summed gradient and
//! one update per step, as on one device.
//!
//! Each part draws its random numbers (dropout masks) on its worker thread from a seed of its own,
//! derived from the run's seed, the step's position and the part: runs repeat exactly, but the
//! masks differ from a one-device run's (as under PyTorch's DDP).

use crate::data::SplitMix64;
use crate::metrics::StepStats;
use crate::strategy::Marker;
use crate::task::{Batch, Shard, TaskModel, TaskOutput};
use burn::data::dataloader::{DataLoaderIterator, Progress};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use burn::train::InferenceStep;
use burn::train::train::MultiDevicesTrainStep;

/// The workers of a data-parallel run, one per device.
pub(crate) struct DataParallel<B: AutodiffBackend, M>
where
    M: TaskModel<B>,
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    workers: MultiDevicesTrainStep<Marker<B, M>>,
    main: B::Device,
    devices: usize,
}

impl<B: AutodiffBackend, M> DataParallel<B, M>
where
    M: TaskModel<B>,
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    /// Starts a worker thread for each of `devices` (at least two); gradients are summed on the
    /// first.
    pub(crate) fn new(devices: &[B::Device]) -> Self {
        Self { workers: MultiDevicesTrainStep::new(devices), main: devices[0].clone(), devices: devices.len() }
    }

    /// Devices, and so the parts of a full global batch.
    pub(crate) fn devices(&self) -> usize {
        self.devices
    }

    /// One step on `parts` (the global batch's parts in order, part `i` made on device `i`; the
    /// last global batch of an epoch may have fewer parts than devices): adds the weighted sum of
    /// the parts' gradients to `accumulator` and returns the global batch's statistics. `seed` is
    /// the step's seed, from which each part's is derived.
    pub(crate) fn step(
        &self,
        model: &M,
        parts: Vec<Batch<B>>,
        seed: u64,
        accumulator: &mut GradientsAccumulator<M>,
    ) -> (Vec<StepStats>, TaskOutput) {
        let count = parts.len();
        let mut loaders: Vec<Box<dyn DataLoaderIterator<Batch<B>>>> = parts
            .into_iter()
            .enumerate()
            .map(|(index, mut part)| {
                part.shard = Some(Shard { index, seed: part_seed(seed, index) });
                Box::new(OneBatch(Some(part))) as Box<dyn DataLoaderIterator<Batch<B>>>
            })
            .collect();
        loaders.resize_with(self.devices, || Box::new(OneBatch::<B>(None)));
        let (outputs, _) = self.workers.step(&mut loaders, model);
        assert_eq!(outputs.len(), count, "each part of the batch ran on one worker");
        // In the parts' order, whatever order the workers finished in: the sums then repeat exactly.
        let mut outputs: Vec<_> = outputs.into_iter().map(|o| (o.output.item.shard.unwrap_or(0), o.output)).collect();
        outputs.sort_by_key(|(index, _)| *index);
        let units: usize = outputs.iter().map(|(_, o)| o.item.stats.units).sum();
        let mut stats = Vec::with_capacity(count);
        for (_, output) in outputs {
            let weight = if units == 0 { 1.0 } else { output.item.stats.units as f64 / units as f64 };
            let grads = output.grads.to_device(&self.main, model);
            accumulator.accumulate(model, scaled(grads, weight, model));
            stats.push(output.item.stats);
        }
        let combined = combine(&stats, units);
        (stats, TaskOutput { stats: combined, shard: None })
    }
}

/// The seed of part `index` of the step whose seed is `seed`.
fn part_seed(seed: u64, index: usize) -> u64 {
    let mut rng = SplitMix64(seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.next_u64()
}

/// The global batch's statistics from its parts' (in order): the loss is their units-weighted mean.
fn combine(parts: &[StepStats], units: usize) -> StepStats {
    let mut all = StepStats { units, ..Default::default() };
    let mut loss = 0.0;
    for s in parts {
        loss += if units == 0 { s.loss / parts.len() as f64 } else { s.loss * s.units as f64 / units as f64 };
        all.predicted.extend_from_slice(&s.predicted);
        all.labels.extend_from_slice(&s.labels);
        all.predicted_scores.extend_from_slice(&s.predicted_scores);
        all.scores.extend_from_slice(&s.scores);
        all.tokens += s.tokens;
        all.choices.extend_from_slice(&s.choices);
        all.generations.extend_from_slice(&s.generations);
        all.pairs.extend_from_slice(&s.pairs);
    }
    all.loss = loss;
    all
}

/// `grads` of `model`'s parameters, each multiplied by `factor`.
fn scaled<B: AutodiffBackend, M: AutodiffModule<B>>(grads: GradientsParams, factor: f64, model: &M) -> GradientsParams {
    if factor == 1.0 {
        return grads;
    }
    struct Scale {
        grads: GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut visitor = Scale { grads, factor };
    model.visit(&mut visitor);
    visitor.grads
}

/// A loader of one batch (or none): what a worker of [`MultiDevicesTrainStep`] takes per step.
struct OneBatch<B: AutodiffBackend>(Option<Batch<B>>);

impl<B: AutodiffBackend> Iterator for OneBatch<B> {
    type Item = Batch<B>;
    fn next(&mut self) -> Option<Batch<B>> {
        self.0.take()
    }
}

impl<B: AutodiffBackend> DataLoaderIterator<Batch<B>> for OneBatch<B> {
    fn progress(&self) -> Progress {
        Progress { items_processed: 0, items_total: 0 }
    }
}
