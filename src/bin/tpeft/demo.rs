//! `tpeft demo`: every method trains on the chosen backend in a few seconds.
//!
//! A two-layer attention-shaped stack of frozen random linear layers (LLaMA naming, d=64, 4 heads)
//! gets each method at its default size; the adapters are fitted with Adam to a teacher whose
//! layers carry a hidden rank-2 update. For each method the demo prints the trainable parameters,
//! the loss before and after training, and the relative error between the factored forward and
//! the dense reconstruction `x·ΔW` — the same check the test-suite makes, on whatever backend runs.

use burn::module::{AutodiffModule, Module};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use tensor_peft_adapters::{AdaptedLinear, LinearDelta, METHOD_NAMES, MethodConfig, ResidualAdapter, SharedFactors};
use tensor_peft_models::{ArchSpec, Family, RopeConfig};

/// The adapted stack: shared factors once, then every adapted site.
#[derive(Module, Debug)]
pub struct DemoStack<B: Backend> {
    /// Factors shared across sites (LoTR, LoRTA).
    pub shared: SharedFactors<B>,
    /// Adapted linear layers.
    pub linear: Vec<AdaptedLinear<B>>,
    /// Residual (block-output) adapters.
    pub residual: Vec<ResidualAdapter<B>>,
}

impl<B: Backend> DemoStack<B> {
    /// Outputs of every site for the same input `x: [batch, tokens, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Vec<Tensor<B, 3>> {
        let mut out: Vec<_> = self.linear.iter().map(|l| l.forward(x.clone(), &self.shared)).collect();
        out.extend(self.residual.iter().map(|r| r.forward(x.clone())));
        out
    }
}

/// One line of the demo's result table.
#[derive(Debug, Clone)]
pub struct DemoResult {
    /// Method name.
    pub method: &'static str,
    /// Trainable parameters.
    pub trainable: usize,
    /// Mean squared error against the teacher before training.
    pub loss_before: f64,
    /// Mean squared error after training.
    pub loss_after: f64,
    /// Largest relative error of the factored forward vs the dense one: `x·ΔW` at linear sites,
    /// the map from dense reconstructions of its factors for a residual adapter.
    pub factored_vs_dense: f64,
}

/// The demo's architecture: LLaMA naming, 2 layers, d=64, 4 heads, MLP 128.
pub fn demo_spec() -> ArchSpec {
    ArchSpec {
        family: Family::Llama,
        source: "demo".into(),
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        kv_heads: 4,
        vocab: 0,
        positions: 0,
        type_vocab: 0,
        tie_embeddings: true,
        head_dim: 16,
        rope: RopeConfig::default(),
        sliding_window: None,
        relative: None,
        base_prefix: "",
        norm_eps: 1e-5,
        unimplemented: Vec::new(),
    }
}

fn mse<B: Backend>(outputs: Vec<Tensor<B, 3>>, targets: &[Tensor<B, 3>]) -> Tensor<B, 1> {
    let n = outputs.len() as f64;
    outputs
        .into_iter()
        .zip(targets)
        .map(|(o, t)| (o - t.clone()).powf_scalar(2.0).mean())
        .reduce(|a, b| a + b)
        .unwrap()
        .div_scalar(n)
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().convert::<f64>().to_vec::<f64>().map(|v| v[0]).unwrap_or(f64::NAN)
}

/// Trains every method for `steps` Adam steps at learning rate `lr` on `device`.
pub fn run<B: AutodiffBackend>(
    device: &B::Device,
    steps: usize,
    lr: f64,
    seed: u64,
) -> Result<Vec<DemoResult>, String> {
    let spec = demo_spec();
    let geometry = spec.geometry();
    let mut results = Vec::new();
    for name in METHOD_NAMES {
        tensor_peft_kernels::rng::seed::<B>(device, seed);
        let method = MethodConfig::from_name(name).map_err(|e| e.to_string())?;
        let linear_sites = spec.select_roles(method.default_roles());
        let residual_sites = if method.is_residual() { spec.residual_sites() } else { Vec::new() };
        let set = method.build::<B>(&geometry, &linear_sites, &residual_sites, device).map_err(|e| e.to_string())?;
        let d = spec.hidden;
        // Teacher: frozen base plus a hidden rank-2 update at every site.
        let teacher_update =
            |d_out: usize| {
                Tensor::<B::InnerBackend, 2>::random([d, 2], Distribution::Normal(0.0, 0.3), device)
                    .matmul(Tensor::random([2, d_out], Distribution::Normal(0.0, 0.3), device))
            };
        let mut bases: Vec<Linear<B>> = Vec::new();
        let mut updates = Vec::new();
        for (site, _) in &set.linear {
            bases.push(LinearConfig::new(site.d_in, site.d_out).init(device));
            updates.push(teacher_update(site.d_out));
        }
        for _ in &set.residual {
            updates.push(teacher_update(d));
        }
        let mut stack = DemoStack {
            shared: set.shared,
            linear: set
                .linear
                .into_iter()
                .zip(bases.iter().cloned())
                .map(|((_, adapter), base)| AdaptedLinear::new(base, Some(adapter)).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?,
            residual: set.residual.into_iter().map(|(_, a)| a).collect(),
        };
        let trainable = stack.num_params() - bases.iter().map(|b| b.num_params()).sum::<usize>();
        let targets = |x: &Tensor<B, 3>| -> Vec<Tensor<B, 3>> {
            let x_inner = x.clone().inner();
            let mut out: Vec<Tensor<B, 3>> = bases
                .iter()
                .zip(&updates)
                .map(|(b, u)| {
                    Tensor::from_inner(
                        b.valid().forward(x_inner.clone())
                            + burn::tensor::module::linear(x_inner.clone(), u.clone(), None),
                    )
                })
                .collect();
            out.extend(updates[bases.len()..].iter().map(|u| {
                Tensor::from_inner(x_inner.clone() + burn::tensor::module::linear(x_inner.clone(), u.clone(), None))
            }));
            out
        };
        let eval_x = Tensor::<B, 3>::random([4, 16, d], Distribution::Normal(0.0, 1.0), device);
        let eval_targets = targets(&eval_x);
        let loss_before = scalar(mse(
            stack.valid().forward(eval_x.clone().inner()),
            &eval_targets.iter().map(|t| t.clone().inner()).collect::<Vec<_>>(),
        ));
        let mut optim = AdamConfig::new().init::<B, DemoStack<B>>();
        for _ in 0..steps {
            let x = Tensor::<B, 3>::random([8, 16, d], Distribution::Normal(0.0, 1.0), device);
            let loss = mse(stack.forward(x.clone()), &targets(&x));
            let grads = GradientsParams::from_grads(loss.backward(), &stack);
            stack = optim.step(lr, stack, grads);
        }
        let inner = stack.valid();
        let loss_after = scalar(mse(
            inner.forward(eval_x.clone().inner()),
            &eval_targets.iter().map(|t| t.clone().inner()).collect::<Vec<_>>(),
        ));
        let mut factored_vs_dense: f64 = 0.0;
        for layer in &inner.linear {
            let adapter = layer.adapter.as_ref().expect("every demo site is adapted");
            let x = eval_x.clone().inner();
            let factored = adapter.delta(x.clone(), &inner.shared);
            let dense = burn::tensor::module::linear(x, adapter.delta_weight(&inner.shared), None);
            let err = scalar((factored - dense.clone()).powf_scalar(2.0).sum().sqrt())
                / scalar(dense.powf_scalar(2.0).sum().sqrt()).max(1e-30);
            factored_vs_dense = factored_vs_dense.max(err);
        }
        // Residual adapters have no linear site: their forward against the same map from dense
        // reconstructions of their tensor-format factors.
        for adapter in &inner.residual {
            let x = eval_x.clone().inner();
            let factored = adapter.forward(x.clone()) - x.clone();
            let dense = adapter.dense_reference(x.clone()) - x;
            let err = scalar((factored - dense.clone()).powf_scalar(2.0).sum().sqrt())
                / scalar(dense.powf_scalar(2.0).sum().sqrt()).max(1e-30);
            factored_vs_dense = factored_vs_dense.max(err);
        }
        results.push(DemoResult { method: method.name(), trainable, loss_before, loss_after, factored_vs_dense });
    }
    Ok(results)
}

/// The result table as printed by `tpeft demo`.
pub fn render(results: &[DemoResult]) -> String {
    let mut out = format!(
        "{:<12} {:>10} {:>12} {:>12} {:>18}\n",
        "method", "trainable", "loss before", "loss after", "factored vs dense"
    );
    for r in results {
        out.push_str(&format!(
            "{:<12} {:>10} {:>12.5} {:>12.5} {:>18.2e}\n",
            r.method,
            crate::params::thousands(r.trainable),
            r.loss_before,
            r.loss_after,
            r.factored_vs_dense
        ));
    }
    out
}

/// `tpeft demo`: fine-tunes all-MiniLM-L6-v2 on the VADER movie-review snippets (90/5/5 split,
/// seed 1234, max length 64, batch 16) with TT-LoRA (the VADER recipe's settings: rank 4, shape
/// 8,6,8,8,6,8, lr 5e-3, LoRA+ ratio 4) and with LoRA r=8 (lr 2e-3) on query,value, using the first
/// `train_examples` training examples, and prints the comparison. Fetches the assets first when
/// they are missing.
pub fn vader<B: AutodiffBackend>(
    train_examples: usize,
    epochs: usize,
    output: &std::path::Path,
    device: &B::Device,
) -> Result<String, String> {
    use tensor_peft_training::{TaskKind, TrainConfig};
    let model = std::path::PathBuf::from("assets/all-minilm-l6-v2");
    let corpus = std::path::Path::new("assets/vader/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt");
    if !model.join("model.safetensors").is_file() || !corpus.is_file() {
        eprintln!("assets missing: running scripts/fetch-assets.sh");
        let status = std::process::Command::new("bash").arg("scripts/fetch-assets.sh").status().map_err(|e| {
            format!("cannot run scripts/fetch-assets.sh (run tpeft demo from the repository root): {e}")
        })?;
        if !status.success() {
            return Err("scripts/fetch-assets.sh failed; see its output above".into());
        }
    }
    let base = TrainConfig {
        model,
        task: TaskKind::Classification,
        train: "builtin:vader-movie-reviews".into(),
        valid_percent: 5,
        test_percent: 5,
        max_train_examples: Some(train_examples),
        head_lr: Some(1e-3),
        target_modules: Some(vec!["query".into(), "value".into()]),
        epochs,
        // Small batches: more optimizer steps in the demo's few minutes.
        batch_size: 16,
        max_len: 64,
        seed: 1234,
        overwrite: true,
        ..TrainConfig::default()
    };
    let mut tt_lora = MethodConfig::from_name("tt-lora").map_err(|e| e.to_string())?;
    if let MethodConfig::TtLora(c) = &mut tt_lora {
        (c.rank, c.alpha, c.tt_shape) = (4, 16.0, Some(vec![8, 6, 8, 8, 6, 8]));
    }
    let mut lora = MethodConfig::from_name("lora").map_err(|e| e.to_string())?;
    if let MethodConfig::Lora(c) = &mut lora {
        (c.rank, c.alpha) = (8, 16.0);
    }
    // The recipe's TT-LoRA settings keep every update below its frozen weight's norm, so the demo
    // prints no update-ratio warning; 8 cores at lr 1e-2 learned as fast but grew past it.
    let runs = [("tt-lora", tt_lora, 5e-3, Some(4.0)), ("lora", lora, 2e-3, None)];
    let mut rows = Vec::new();
    for (name, method, lr, loraplus_lr_ratio) in runs {
        let config = TrainConfig { method, lr: Some(lr), loraplus_lr_ratio, output: output.join(name), ..base.clone() };
        let report = tensor_peft_training::finetune::<B>(&config, device).map_err(|e| e.to_string())?;
        rows.push((name, report));
    }
    let mut out = String::from(
        "\nVADER movie reviews, all-MiniLM-L6-v2, query+value adapters\nmethod    adapter params  trained (with head)  adapter file  test accuracy  test F1  train time\n",
    );
    for (name, r) in &rows {
        let test = r.test.clone().unwrap_or_default();
        out.push_str(&format!(
            "{name:<8}  {:>14}  {:>19}  {:>10} B  {:>13.4}  {:>7.4}  {:>8.1} s\n",
            r.adapter_params,
            r.trainable_params,
            r.adapter_file_bytes,
            test.get("accuracy").copied().unwrap_or(f64::NAN),
            test.get("f1").copied().unwrap_or(f64::NAN),
            r.train_seconds
        ));
    }
    if let [(_, tt), (_, lora)] = &rows[..] {
        out.push_str(&format!(
            "TT-LoRA trains {:.1}x fewer adapter parameters than LoRA r=8.\n",
            lora.adapter_params as f64 / tt.adapter_params.max(1) as f64
        ));
    }
    Ok(out)
}
