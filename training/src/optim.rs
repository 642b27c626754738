//! The optimizer and learning-rate schedule: AdamW with a separate learning rate for the task
//! head, global-norm gradient clipping (as `torch.nn.utils.clip_grad_norm_`; Burn's built-in
//! clipping is per tensor), and linear warmup followed by linear or cosine decay (HF's
//! `get_{linear,cosine}_schedule_with_warmup`).

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::lr_scheduler::LrScheduler;
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, MultiGradientsParams, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The optimizer state saved in checkpoints.
pub type OptimizerState<B> = HashMap<ParamId, AdaptorRecord<AdamW, B>>;

/// AdamW over the adapters and, with its own learning rate, the head; clipping by global norm.
#[derive(Clone)]
pub struct PeftOptimizer<M: AutodiffModule<B>, B: AutodiffBackend> {
    main: OptimizerAdaptor<AdamW, M, B>,
    head: OptimizerAdaptor<AdamW, M, B>,
    head_ids: Arc<HashSet<ParamId>>,
    head_lr_scale: f64,
    /// LoRA+'s fast group: the factors that start at zero (LoRA's `B`, TT-LoRA's last core).
    fast: OptimizerAdaptor<AdamW, M, B>,
    fast_ids: Arc<HashSet<ParamId>>,
    fast_lr_scale: f64,
    max_grad_norm: Option<f64>,
    /// The state after the latest step, readable while burn-train owns the optimizer (for
    /// checkpoints) — the learner does not expose its optimizer.
    pub snapshot: Arc<Mutex<Option<OptimizerState<B>>>>,
    /// Global gradient norm (before clipping) of the latest step.
    pub last_grad_norm: Arc<Mutex<f64>>,
    /// Factor applied to the gradients before clipping: `1 / micro-batches` under gradient
    /// accumulation (burn's accumulator sums), set by the training loop.
    pub grad_scale: Arc<Mutex<f64>>,
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> PeftOptimizer<M, B> {
    /// AdamW(`betas`, `eps`, `weight_decay`) for every trained parameter; those in `head_ids`
    /// use `head_lr_scale` × the scheduled learning rate.
    pub fn new(weight_decay: f64, head_ids: HashSet<ParamId>, head_lr_scale: f64, max_grad_norm: Option<f64>) -> Self {
        let config = AdamWConfig::new().with_weight_decay(weight_decay as f32).with_epsilon(1e-8);
        Self {
            main: config.init(),
            head: config.init(),
            head_ids: Arc::new(head_ids),
            head_lr_scale,
            fast: config.init(),
            fast_ids: Arc::new(HashSet::new()),
            fast_lr_scale: 1.0,
            max_grad_norm,
            snapshot: Arc::new(Mutex::new(None)),
            last_grad_norm: Arc::new(Mutex::new(0.0)),
            grad_scale: Arc::new(Mutex::new(1.0)),
        }
    }
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> PeftOptimizer<M, B> {
    /// LoRA+ (Hayou et al. 2024; PEFT's `create_loraplus_optimizer`): the parameters in `ids`
    /// train at `lr_scale` × the scheduled learning rate (PEFT's `loraplus_lr_ratio`).
    pub fn with_fast_group(mut self, ids: HashSet<ParamId>, lr_scale: f64) -> Self {
        self.fast_ids = Arc::new(ids);
        self.fast_lr_scale = lr_scale;
        self
    }
}

/// Sums the squared gradients of a module's parameters, then optionally rescales them.
struct GlobalNorm<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    sum_sq: f64,
    scale: Option<f64>,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GlobalNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        match self.scale {
            None => {
                if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                    let sq = (g.clone() * g).sum().into_data().convert::<f64>().to_vec::<f64>().unwrap_or_default();
                    self.sum_sq += sq.first().copied().unwrap_or(0.0);
                }
            }
            Some(scale) => {
                if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                    self.grads.register::<B::InnerBackend, D>(param.id, g.mul_scalar(scale));
                }
            }
        }
    }
}

/// Moves the gradients of `ids` from `from` into a new set.
struct Split<'a, B: AutodiffBackend> {
    from: &'a mut GradientsParams,
    to: GradientsParams,
    ids: &'a HashSet<ParamId>,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Split<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.ids.contains(&param.id)
            && let Some(g) = self.from.remove::<B::InnerBackend, D>(param.id)
        {
            self.to.register::<B::InnerBackend, D>(param.id, g);
        }
    }
}

/// The global L2 norm of `grads` over `module`'s parameters, and the grads clipped to `max_norm`.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    mut grads: GradientsParams,
    max_norm: Option<f64>,
) -> (f64, GradientsParams) {
    let mut visitor = GlobalNorm::<B> { grads: &mut grads, sum_sq: 0.0, scale: None, _b: Default::default() };
    module.visit(&mut visitor);
    let norm = visitor.sum_sq.sqrt();
    if let Some(max) = max_norm
        && norm > max
        && norm.is_finite()
    {
        // torch's clip_grad_norm_: coefficient max / (norm + 1e-6).
        let mut visitor = GlobalNorm::<B> {
            grads: &mut grads,
            sum_sq: 0.0,
            scale: Some(max / (norm + 1e-6)),
            _b: Default::default(),
        };
        module.visit(&mut visitor);
    }
    (norm, grads)
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> Optimizer<M, B> for PeftOptimizer<M, B> {
    type Record = OptimizerState<B>;

    fn step(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> M {
        let scale = *self.grad_scale.lock().expect("not poisoned");
        if scale != 1.0 {
            let mut visitor =
                GlobalNorm::<B> { grads: &mut grads, sum_sq: 0.0, scale: Some(scale), _b: Default::default() };
            module.visit(&mut visitor);
        }
        let (norm, mut grads) = clip_global_norm(&module, grads, self.max_grad_norm);
        *self.last_grad_norm.lock().expect("not poisoned") = norm;
        let mut split =
            Split::<B> { from: &mut grads, to: GradientsParams::new(), ids: &self.head_ids, _b: Default::default() };
        module.visit(&mut split);
        let head_grads = split.to;
        let mut split =
            Split::<B> { from: &mut grads, to: GradientsParams::new(), ids: &self.fast_ids, _b: Default::default() };
        module.visit(&mut split);
        let fast_grads = split.to;
        let module = self.main.step(lr, module, grads);
        let module =
            if head_grads.is_empty() { module } else { self.head.step(lr * self.head_lr_scale, module, head_grads) };
        let module =
            if fast_grads.is_empty() { module } else { self.fast.step(lr * self.fast_lr_scale, module, fast_grads) };
        *self.snapshot.lock().expect("not poisoned") = Some(self.to_record());
        module
    }

    fn step_multi(&mut self, lr: f64, module: M, grads: MultiGradientsParams) -> M {
        // Single-device training only: take the first device's gradients.
        let first = grads.grads.into_iter().next().map(|(g, _)| g).unwrap_or_default();
        self.step(lr, module, first)
    }

    fn to_record(&self) -> Self::Record {
        let mut record = self.main.to_record();
        record.extend(self.head.to_record());
        record.extend(self.fast.to_record());
        record
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        let (head, rest): (HashMap<_, _>, HashMap<_, _>) =
            record.into_iter().partition(|(id, _)| self.head_ids.contains(id));
        let (fast, main): (HashMap<_, _>, HashMap<_, _>) =
            rest.into_iter().partition(|(id, _)| self.fast_ids.contains(id));
        self.main = self.main.load_record(main);
        self.head = self.head.load_record(head);
        self.fast = self.fast.load_record(fast);
        self
    }
}

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Linearly to 0 at the last step.
    #[default]
    Linear,
    /// Half a cosine to 0 at the last step.
    Cosine,
    /// Constant after warmup.
    Constant,
}

/// Linear warmup from 0 over `warmup` steps, then [`Decay`] to 0 at `total` steps. Step `k`
/// (0-based) uses `peak · k / warmup` during warmup, as HF's schedules do.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// Total optimizer steps.
    pub total: usize,
    /// Decay after warmup.
    pub decay: Decay,
    /// Steps taken so far.
    pub step: usize,
}

impl WarmupSchedule {
    /// The learning rate of optimizer step `k` (0-based).
    pub fn lr_at(&self, k: usize) -> f64 {
        if k < self.warmup {
            return self.peak * k as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((k - self.warmup) as f64 / span).min(1.0);
        match self.decay {
            Decay::Linear => self.peak * (1.0 - progress).max(0.0),
            Decay::Cosine => self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Constant => self.peak,
        }
    }
}

impl LrScheduler for WarmupSchedule {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        let lr = self.lr_at(self.step);
        self.step += 1;
        lr
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.step
    }

    fn load_record<B: Backend>(mut self, record: usize) -> Self {
        self.step = record;
        self
    }
}
