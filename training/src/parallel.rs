//! Data-parallel training steps (`tpeft --devices a,b,… finetune`): one worker thread per device
//! runs the training step on its part of the global batch; the parts' gradients come back to the
//! first device, weighted by each part's share of the loss units (examples, or supervised
//! tokens), and are summed there for one optimizer step. The weighting makes the step's gradient
//! the one of the whole global batch (a mean over all its units), whatever the parts' padding: the
//! adapter after N steps equals the one-device run's up to float rounding. A factor shared by
//! several layers (LoTR, LoRTA) is one parameter of the model, so it gets one summed gradient and
//! one update per step, as on one device.
//!
//! A device other than the first holds a **replica**: the task model built there once, as on
//! the first (the base loaded from its file onto that device). Each step sends it only the trained
//! parameters' values and brings back only their gradients, through host memory: the frozen base
//! never moves. (burn-train's `MultiDevicesTrainStep` instead forks the whole model onto every
//! device each step, which copies the frozen base every step and, in Burn 0.21, cannot run on
//! wgpu at all: moving a tensor between two wgpu devices is unimplemented in CubeCL 0.10.) A
//! worker on the first device itself (the CPU backends' only device, listed twice) shares the
//! model.
//!
//! Each part draws its random numbers (dropout masks) on its worker thread from a seed of its own,
//! derived from the run's seed, the step's position and the part: runs repeat exactly, but the
//! masks differ from a one-device run's (as under PyTorch's DDP).

use crate::data::SplitMix64;
use crate::error::{Result, TrainError};
use crate::metrics::StepStats;
use crate::task::{Batch, Shard, TaskModel, TaskOutput};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use burn::train::{InferenceStep, TrainOutput};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

/// Values of trained parameters (or their gradients), by parameter, in host memory.
type HostTensors = HashMap<ParamId, TensorData>;

/// One part of a step, for a worker.
struct Job<B: AutodiffBackend, M> {
    part: Batch<B>,
    /// The model, for a worker on the first device.
    model: Option<M>,
    /// The trained parameters' values, for a replica.
    params: Option<Arc<HostTensors>>,
}

/// A part's gradients: on the first device already, or in host memory from a replica.
enum PartGrads {
    Shared(GradientsParams),
    Host(HostTensors),
}

/// What a worker sends back for its part.
struct PartOutput {
    index: usize,
    stats: StepStats,
    grads: std::result::Result<PartGrads, String>,
}

/// The workers of a data-parallel run, one per device.
pub(crate) struct DataParallel<B: AutodiffBackend, M> {
    jobs: Vec<Sender<Job<B, M>>>,
    /// Per worker: whether it runs on the first device, sharing the model.
    shared: Vec<bool>,
    outputs: Receiver<PartOutput>,
    main: B::Device,
    /// Whether some worker holds a replica (then each step sends the trained parameters' values).
    replicated: bool,
}

impl<B: AutodiffBackend, M> DataParallel<B, M>
where
    M: TaskModel<B>,
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    /// Starts a worker thread for each of `devices` (at least two), building the replica of each
    /// device other than the first with `replica` (the task model as it was built on the first,
    /// before training; its trained values are replaced at every step).
    pub(crate) fn new(devices: &[B::Device], replica: &dyn Fn(&B::Device) -> Result<M>) -> Result<Self> {
        let main = devices[0].clone();
        let (output_sender, outputs) = channel();
        let mut jobs = Vec::with_capacity(devices.len());
        let shared: Vec<bool> = devices.iter().map(|d| *d == main).collect();
        for (worker, device) in devices.iter().enumerate() {
            let own = if shared[worker] { None } else { Some(replica(device)?) };
            let (sender, receiver) = channel::<Job<B, M>>();
            let output_sender = output_sender.clone();
            let device = device.clone();
            std::thread::Builder::new()
                .name(format!("tpeft-data-parallel-{worker}"))
                .spawn(move || work(own, device, receiver, output_sender))
                .map_err(|e| TrainError::Device(format!("cannot start the worker thread of device {worker}: {e}")))?;
            jobs.push(sender);
        }
        let replicated = shared.contains(&false);
        Ok(Self { jobs, shared, outputs, main, replicated })
    }

    /// Devices, and so the parts of a full global batch.
    pub(crate) fn devices(&self) -> usize {
        self.jobs.len()
    }

    /// One step on `parts` (the global batch's parts in order, part `i` made on device `i`; the
    /// last global batch of an epoch may have fewer parts than devices): adds the weighted sum of
    /// the parts' gradients to `accumulator` and returns each part's statistics and the global
    /// batch's. `seed` is the step's seed, from which each part's is derived.
    pub(crate) fn step(
        &self,
        model: &M,
        parts: Vec<Batch<B>>,
        seed: u64,
        accumulator: &mut GradientsAccumulator<M>,
    ) -> Result<(Vec<StepStats>, TaskOutput)> {
        let count = parts.len();
        let params = self.replicated.then(|| Arc::new(trained_values(model)));
        for (index, (mut part, jobs)) in parts.into_iter().zip(&self.jobs).enumerate() {
            part.shard = Some(Shard { index, seed: part_seed(seed, index) });
            let shared = self.shared[index];
            let job =
                Job { part, model: shared.then(|| model.clone()), params: if shared { None } else { params.clone() } };
            jobs.send(job).map_err(|_| worker_failed(index, "it has stopped"))?;
        }
        let mut outputs = Vec::with_capacity(count);
        for _ in 0..count {
            outputs.push(self.outputs.recv().map_err(|_| worker_failed(0, "a worker stopped"))?);
        }
        // In the parts' order, whatever order the workers finished in: the sums then repeat exactly.
        outputs.sort_by_key(|o| o.index);
        let units: usize = outputs.iter().map(|o| o.stats.units).sum();
        let mut stats = Vec::with_capacity(count);
        for output in outputs {
            let grads = match output.grads.map_err(|why| worker_failed(output.index, &why))? {
                PartGrads::Shared(grads) => grads,
                PartGrads::Host(values) => grads_on(model, values, &self.main),
            };
            let weight = if units == 0 { 1.0 / count as f64 } else { output.stats.units as f64 / units as f64 };
            accumulator.accumulate(model, scaled(grads, weight, model));
            stats.push(output.stats);
        }
        let combined = combine(&stats, units);
        Ok((stats, TaskOutput { stats: combined, shard: None }))
    }
}

fn worker_failed(index: usize, why: &str) -> TrainError {
    TrainError::Device(format!("the worker of part {index} failed: {why}"))
}

/// A worker's loop: runs each part it receives on `replica` (its own model on `device`, brought
/// up to date with the values sent) or on the model sent along, and sends back the gradients.
fn work<B: AutodiffBackend, M: TaskModel<B>>(
    mut replica: Option<M>,
    device: B::Device,
    jobs: Receiver<Job<B, M>>,
    outputs: Sender<PartOutput>,
) where
    M::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    while let Ok(job) = jobs.recv() {
        let index = job.part.shard.map_or(0, |s| s.index);
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job.model {
            Some(model) => {
                // A graph of its own: the workers sharing the model must not share its leaves.
                let TrainOutput { grads, item } = model.fork(&device).step(job.part);
                (item.stats, PartGrads::Shared(grads))
            }
            None => {
                let own = replica.take().expect("a worker off the first device holds a replica");
                let own = match &job.params {
                    Some(values) => own.map(&mut Assign { values, device: &device }),
                    None => own,
                };
                let TrainOutput { grads, item } = own.step(job.part);
                let grads = host_grads(&own, grads);
                replica = Some(own);
                (item.stats, PartGrads::Host(grads))
            }
        }));
        let output = match ran {
            Ok((stats, grads)) => PartOutput { index, stats, grads: Ok(grads) },
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "it panicked".into());
                PartOutput { index, stats: StepStats::default(), grads: Err(why) }
            }
        };
        if outputs.send(output).is_err() {
            break;
        }
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

/// The values of `model`'s trained parameters, in host memory.
fn trained_values<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> HostTensors {
    struct Collect(HostTensors);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if value.is_require_grad() {
                self.0.insert(param.id, value.detach().into_data());
            }
        }
    }
    let mut collect = Collect(HashMap::new());
    model.visit(&mut collect);
    collect.0
}

/// Replaces the parameters named in `values` by those values on `device`, keeping each
/// parameter's id and whether it is trained.
struct Assign<'a, D> {
    values: &'a HostTensors,
    device: &'a D,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Assign<'_, B::Device> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        match self.values.get(&param.id) {
            Some(value) => param.map(|old| {
                let trained = old.is_require_grad();
                Tensor::from_data(value.clone(), self.device).set_require_grad(trained)
            }),
            None => param,
        }
    }
}

/// `grads` of `model`'s parameters in host memory.
fn host_grads<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: GradientsParams) -> HostTensors {
    struct Collect {
        grads: GradientsParams,
        host: HostTensors,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.host.insert(param.id, g.into_data());
            }
        }
    }
    let mut collect = Collect { grads, host: HashMap::new() };
    model.visit(&mut collect);
    collect.host
}

/// Gradients of `model`'s parameters on `device` from their values in host memory.
fn grads_on<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    values: HostTensors,
    device: &B::Device,
) -> GradientsParams {
    struct Place<'a, D> {
        values: HostTensors,
        grads: GradientsParams,
        device: &'a D,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Place<'_, B::Device> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(value) = self.values.remove(&param.id) {
                let grad = Tensor::<B::InnerBackend, D>::from_data(value, self.device);
                self.grads.register::<B::InnerBackend, D>(param.id, grad);
            }
        }
    }
    let mut place = Place { values, grads: GradientsParams::new(), device };
    model.visit(&mut place);
    place.grads
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
