//! `tpeft bench`: micro-benchmarks of the adapters on the chosen backend.
//!
//! Machines are noisy, so every suite runs its variants interleaved (after warm-up, each round in
//! a freshly shuffled order) and reports medians together with **ratios measured in the same run**.
//! Suites:
//! - `linear`: one adapted `d×d` layer, forward + backward (the input requires a gradient, as it
//!   does inside a model), each method at its default size vs LoRA r=8 and vs the frozen base
//!   layer; plus the *materialising* baselines (ΔW built from the factors every step and added to
//!   the weight, as the official LoRTA / 2024 TT-LoRA code and Burn 0.22's LoRA do), checked to
//!   give the same output and gradients; and LoRA with its scaling on the output instead of on
//!   its small factor (what every method did before), to show what that saves.
//! - `contraction`: TT-LoRA half-trains vs core-by-core, forward only, and the planner's choice.
//! - `merged`: inference of the base layer, the merged layer and the unmerged (factored) layer.
//! - `scoring`: forward-only factored vs dense ΔW as the number of rows grows, and the switch
//!   [`tensor_peft_adapters::prefer_dense_delta`] makes.
//! - `model`: load, forward and greedy decoding of a LLaMA-family model.
//! - `train-step`: one fine-tuning step of a LLaMA-family model (batch 4 × 64 tokens by default,
//!   LoRA r=8 and TT-LoRA on q,v: forward, causal-LM loss, backward, clipped AdamW), the training
//!   crate's own task and optimizer, with tokens/s and the peak RSS of each method's step. A preset
//!   name instead of a model path (`llama2-7b`) benchmarks that shape with random weights.
//!   `--gradient-checkpointing` runs every step with per-block recompute (compare two runs: peak
//!   RSS is per process).
//!
//! With [`tensor_peft::allocator::CountingAllocator`] installed (as in `tpeft`), the `linear` and
//! `train-step` records also say what one step allocates: allocations, MiB, and the peak of live
//! heap above the step's start (`model`: allocations of one forward).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use serde_json::{Value, json};
use std::time::Instant;
use tensor_peft_adapters::tensor::low_rank_apply;
use tensor_peft_adapters::tensor::tt::{TtPath, plan_tt_path};
use tensor_peft_adapters::{
    AdaptedLinear, AdapterSet, AttentionGeometry, AttentionMatrix, LinearAdapter, LinearDelta, LinearSite, LoraConfig,
    METHOD_NAMES, MethodConfig, ResidualAdapter, ResidualPosition, ResidualSite, SharedFactors, TtLora, TtLoraConfig,
    prefer_dense_delta,
};
use tensor_peft_kernels::fused::linear;

use tensor_peft::allocator::{AllocationDelta, count_allocations};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Suites to run (`linear`, `contraction`, `merged`, `scoring`).
    pub suites: Vec<String>,
    /// Layer widths `d` (square layers).
    pub dims: Vec<usize>,
    /// Row counts `N` (batch × sequence) for the `linear` and `merged` suites.
    pub tokens: Vec<usize>,
    /// Timed repetitions per variant (after one warm-up round).
    pub repeats: usize,
    /// A LLaMA-family model for the `model` and `train-step` suites: an HF directory, a `.gguf`
    /// file, or a preset name (`llama2-7b`) for random weights of that shape.
    pub model: Option<std::path::PathBuf>,
    /// Batch size × sequence length of the `train-step` suite.
    pub train_shape: (usize, usize),
    /// The precision the `model` and `train-step` suites hold the frozen base at.
    pub base_dtype: tensor_peft_models::BaseDType,
    /// `train-step`: every step with gradient checkpointing (per-block recompute).
    pub gradient_checkpointing: bool,
}

/// Suite names accepted by `--suite`.
pub const SUITES: [&str; 6] = ["linear", "contraction", "merged", "scoring", "model", "train-step"];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A named benchmark body.
type Variant<'a> = (String, Box<dyn FnMut() + 'a>);

/// Runs every variant once per round (`1 + repeats` rounds, the first discarded), in an order
/// shuffled anew each round, and returns the median milliseconds of each.
///
/// A fixed order made a variant pay for what the one before it left behind (allocator and cache
/// state): LoRTA, always run after LoTR, measured 1.17–1.21× LoRA at N=512 in the `linear` suite
/// against 1.00–1.07× in a four-variant probe (BENCHMARKS.md "Current numbers"). The shuffle is
/// seeded, so runs stay comparable.
fn time_interleaved<B: Backend>(device: &B::Device, variants: &mut [Variant<'_>], repeats: usize) -> Vec<f64> {
    let mut samples = vec![Vec::new(); variants.len()];
    for round in 0..=repeats {
        for i in tensor_peft_training::data::permutation(variants.len(), round as u64) {
            let run = &mut variants[i].1;
            let _ = B::sync(device);
            let start = Instant::now();
            run();
            let _ = B::sync(device);
            if round > 0 {
                samples[i].push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    samples.into_iter().map(median).collect()
}

/// Runs every variant once more and returns what each allocated (`None` without the counting
/// allocator, e.g. when the library is used from another binary).
fn count_each<B: Backend>(device: &B::Device, variants: &mut [Variant<'_>]) -> Vec<Option<AllocationDelta>> {
    variants
        .iter_mut()
        .map(|(_, run)| {
            let _ = B::sync(device);
            count_allocations(|| {
                run();
                let _ = B::sync(device);
            })
            .1
        })
        .collect()
}

/// The allocation fields of a record: allocations, MiB allocated, and the peak of live heap above
/// the start in MiB.
fn allocation_fields(delta: Option<AllocationDelta>) -> Value {
    match delta {
        Some(d) => json!({
            "allocations": d.allocations,
            "allocated_mib": d.allocated_bytes as f64 / MIB,
            "heap_peak_extra_mib": d.peak_extra_bytes as f64 / MIB,
        }),
        None => json!({"allocations": null, "allocated_mib": null, "heap_peak_extra_mib": null}),
    }
}

/// Adds `fields`' entries to the JSON object `record`.
fn with_fields(mut record: Value, fields: Value) -> Value {
    if let (Some(r), Value::Object(f)) = (record.as_object_mut(), fields) {
        r.extend(f);
    }
    record
}

const MIB: f64 = 1024.0 * 1024.0;

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap_or_default()
}

fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    diff / b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-30)
}

/// A single adapted site of `method` on a `d×d` layer (q of layer 0; LoRTA gets 64-wide heads).
fn single_site<B: Backend>(method: &MethodConfig, d: usize, device: &B::Device) -> Result<AdapterSet<B>, String> {
    let geometry = AttentionGeometry::new(1, d, (d / 64).max(1), (d / 64).max(1));
    let site =
        LinearSite { name: "q".into(), layer: 0, projection: 0, role: Some(AttentionMatrix::Query), d_in: d, d_out: d };
    let residual =
        ResidualSite { name: "attention_adapter".into(), layer: 0, position: ResidualPosition::Attention, hidden: d };
    let (linear_sites, residual_sites) =
        if method.is_residual() { (vec![], vec![residual]) } else { (vec![site], vec![]) };
    method.build(&geometry, &linear_sites, &residual_sites, device).map_err(|e| e.to_string())
}

/// Adapters with non-zero factors, so that every variant does the same work a trained one does.
fn perturbed<B: Backend, M: Module<B>>(module: M, device: &B::Device) -> M {
    struct Perturb<'a, B: Backend>(&'a B::Device);
    impl<B: Backend> burn::module::ModuleMapper<B> for Perturb<'_, B> {
        fn map_float<const D: usize>(
            &mut self,
            p: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            let (id, t, mapper) = p.consume();
            let noise = Tensor::random(t.shape(), Distribution::Normal(0.0, 0.02), self.0);
            let trainable = t.is_require_grad();
            burn::module::Param::from_mapped_value(id, (t + noise).detach().set_require_grad(trainable), mapper)
        }
    }
    module.map(&mut Perturb(device))
}

/// Every method at its default size, plus those with a default dropout once more without it
/// (dropout draws a random mask over the whole input each step, which is not the tensor format's
/// cost).
fn methods() -> Vec<(String, MethodConfig)> {
    let mut all: Vec<_> =
        METHOD_NAMES.iter().map(|n| (n.to_string(), MethodConfig::from_name(n).expect("known"))).collect();
    for name in METHOD_NAMES {
        let mut config = serde_json::to_value(MethodConfig::from_name(name).expect("known")).expect("serialisable");
        if config.get("dropout").and_then(Value::as_f64).is_some_and(|p| p > 0.0) {
            config["dropout"] = json!(0.0);
            all.push((format!("{name} (dropout 0)"), serde_json::from_value(config).expect("the same fields")));
        }
    }
    all
}

/// `linear` suite: forward + backward of one adapted layer.
fn bench_linear<B: AutodiffBackend>(
    device: &B::Device,
    d: usize,
    n: usize,
    repeats: usize,
) -> Result<Vec<Value>, String> {
    let base: Linear<B> = LinearConfig::new(d, d).init::<B>(device).no_grad();
    let x = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, 1.0), device).require_grad();
    let g = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, 1.0), device);
    let mut sets = Vec::new();
    for (label, method) in methods() {
        let set = single_site::<B>(&method, d, device)?;
        let shared = perturbed(set.shared, device);
        let adapter = match set.linear.into_iter().next() {
            Some((_, a)) => Adapter::Linear(
                AdaptedLinear::new(base.clone(), Some(perturbed(a, device))).map_err(|e| e.to_string())?,
            ),
            None => {
                Adapter::Residual(base.clone(), perturbed(set.residual.into_iter().next().expect("one site").1, device))
            }
        };
        sets.push((label, shared, adapter));
    }
    let step = |y: Tensor<B, 2>| {
        let grads = (y * g.clone()).sum().backward();
        drop(grads);
    };
    // The closures borrow the shared input and step.
    let (x, step) = (&x, &step);
    let mut variants: Vec<(String, Box<dyn FnMut()>)> =
        vec![("base".into(), Box::new(|| step(frozen(&base, x.clone()))))];
    for (name, shared, adapter) in &sets {
        variants.push((name.to_string(), Box::new(move || step(adapter.forward(x.clone(), shared)))));
    }
    // Materialising baselines: W + ΔW built from the factors every step.
    for (name, shared, adapter) in &sets {
        if let (Adapter::Linear(layer), "lora" | "tt-lora") = (adapter, name.as_str()) {
            let update = layer.adapter.as_ref().expect("adapted");
            variants.push((
                format!("{name} (materialised)"),
                Box::new(move || {
                    step(linear(
                        x.clone(),
                        layer.base.weight_f32() + update.delta_weight(shared),
                        layer.base.bias.as_ref().map(|b| b.val()),
                    ))
                }),
            ));
        }
    }
    // Ablation: LoRA with α/r applied to the N × d output, as every method did before its scaling
    // moved onto the small factor; the same run shows what that move saves.
    for (name, _, adapter) in &sets {
        if let (Adapter::Linear(layer), "lora") = (adapter, name.as_str())
            && let Some(LinearAdapter::Lora(lora)) = layer.adapter.as_ref()
        {
            variants.push((
                "lora (output scaled)".into(),
                Box::new(move || {
                    let delta = low_rank_apply(x.clone(), lora.a.val(), lora.b.val()).mul_scalar(lora.scaling);
                    step(frozen(&layer.base, x.clone()) + delta)
                }),
            ));
        }
    }
    let medians = time_interleaved::<B>(device, &mut variants, repeats);
    let allocations = count_each::<B>(device, &mut variants);
    let names: Vec<String> = variants.iter().map(|(n, _)| n.clone()).collect();
    drop(variants);
    // Same results: factored vs materialised output and input gradient.
    let mut agreement = Vec::new();
    for (name, shared, adapter) in &sets {
        if let (Adapter::Linear(layer), "lora" | "tt-lora") = (adapter, name.as_str()) {
            let update = layer.adapter.as_ref().expect("adapted");
            let y1 = layer.forward(x.clone(), shared);
            let y2 = linear(
                x.clone(),
                layer.base.weight_f32() + update.delta_weight(shared),
                layer.base.bias.as_ref().map(|b| b.val()),
            );
            let g1 = x.grad(&(y1.clone() * g.clone()).sum().backward()).map(values).unwrap_or_default();
            let g2 = x.grad(&(y2.clone() * g.clone()).sum().backward()).map(values).unwrap_or_default();
            let diff = rel_diff(&values(y1), &values(y2)).max(rel_diff(&g1, &g2));
            agreement.push((name.to_string(), diff));
        }
    }
    let base_ms = medians[0];
    let lora_ms = medians[names.iter().position(|n| n == "lora").expect("lora runs")];
    Ok(names
        .iter()
        .zip(&medians)
        .zip(allocations)
        .map(|((name, &ms), allocated)| {
            let factored = name.trim_end_matches(" (materialised)");
            let factored_ms = medians[names.iter().position(|n| n == factored).unwrap_or(0)];
            with_fields(json!({
                "suite": "linear", "d": d, "tokens": n, "variant": name, "median_ms": ms,
                "vs_lora": ms / lora_ms, "vs_base": ms / base_ms,
                "materialised_vs_factored": if name.ends_with("(materialised)") { json!(ms / factored_ms) } else { Value::Null },
                "max_rel_diff_vs_factored": agreement.iter().find(|(n, _)| n == factored && name.ends_with("(materialised)")).map(|(_, d)| *d),
            }), allocation_fields(allocated))
        })
        .collect())
}

/// The frozen layer as `AdaptedLinear` runs it (`fused::linear`: on flex, `gemm` straight into the
/// output), so that "base" and the adapted variants share one base path.
fn frozen<B: Backend>(layer: &impl FrozenLayer<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let (weight, bias) = layer.parts();
    linear(x, weight, bias)
}

/// A frozen layer's weight and bias: a plain `Linear`, or an adapted layer's base.
trait FrozenLayer<B: Backend> {
    fn parts(&self) -> (tensor_peft_models::fused::FrozenMatrix<B>, Option<Tensor<B, 1>>);
}

impl<B: Backend> FrozenLayer<B> for Linear<B> {
    fn parts(&self) -> (tensor_peft_models::fused::FrozenMatrix<B>, Option<Tensor<B, 1>>) {
        (self.weight.val().into(), self.bias.as_ref().map(|b| b.val()))
    }
}

impl<B: Backend> FrozenLayer<B> for tensor_peft_adapters::FrozenLinear<B> {
    fn parts(&self) -> (tensor_peft_models::fused::FrozenMatrix<B>, Option<Tensor<B, 1>>) {
        (self.matrix(), self.bias())
    }
}

enum Adapter<B: Backend> {
    Linear(AdaptedLinear<B>),
    /// A residual adapter after the frozen layer (LoRETTA_adp sits after a block's output).
    Residual(Linear<B>, ResidualAdapter<B>),
}

impl<B: Backend> Adapter<B> {
    fn forward(&self, x: Tensor<B, 2>, shared: &SharedFactors<B>) -> Tensor<B, 2> {
        match self {
            Adapter::Linear(l) => l.forward(x, shared),
            Adapter::Residual(base, r) => r.forward(frozen(base, x)),
        }
    }
}

/// `contraction` suite: TT-LoRA paths, forward only, on the inner backend.
fn bench_contraction<B: Backend>(device: &B::Device, repeats: usize) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for (shape, d) in [(vec![16, 8, 8, 8, 8, 16], 1024usize), (vec![32, 32, 32, 32], 1024), (vec![16; 6], 4096)] {
        let cfg = TtLoraConfig::new().with_rank(5).with_tt_shape(Some(shape.clone()));
        let tt: TtLora<B> = perturbed(cfg.init(d, d, device).map_err(|e| e.to_string())?, device);
        for n in [1usize, 2, 8, 64, 512] {
            let x = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, 1.0), device);
            let mut variants: Vec<(String, Box<dyn FnMut()>)> = vec![
                ("half-trains".into(), Box::new(|| drop(tt.delta_with(x.clone(), TtPath::HalfTrains)))),
                ("core-by-core".into(), Box::new(|| drop(tt.delta_with(x.clone(), TtPath::CoreByCore)))),
            ];
            let m = time_interleaved::<B>(device, &mut variants, repeats);
            let planned = plan_tt_path(&shape, shape.len() / 2, 5, n);
            let faster = if m[0] <= m[1] { TtPath::HalfTrains } else { TtPath::CoreByCore };
            out.push(json!({
                "suite": "contraction", "d": d, "shape": shape, "tokens": n,
                "half_trains_ms": m[0], "core_by_core_ms": m[1], "core_vs_half": m[1] / m[0],
                "planned": format!("{planned:?}"), "measured_faster": format!("{faster:?}"),
            }));
        }
    }
    Ok(out)
}

/// `merged` suite: inference of base, merged and unmerged (factored) layers.
fn bench_merged<B: Backend>(device: &B::Device, d: usize, n: usize, repeats: usize) -> Result<Vec<Value>, String> {
    let base: Linear<B> = LinearConfig::new(d, d).init::<B>(device);
    let x = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, 1.0), device);
    let mut out = Vec::new();
    for (label, method) in methods().into_iter().filter(|(_, m)| !m.is_residual()) {
        let set = single_site::<B>(&method, d, device)?;
        let shared = perturbed(set.shared, device);
        let adapter = perturbed(set.linear.into_iter().next().expect("one site").1, device);
        let layer = AdaptedLinear::new(base.clone(), Some(adapter)).map_err(|e| e.to_string())?;
        let merged = layer.clone().merge(&shared).map_err(|e| e.to_string())?;
        let update = layer.adapter.as_ref().expect("adapted");
        let mut variants: Vec<(String, Box<dyn FnMut()>)> = vec![
            ("base".into(), Box::new(|| drop(frozen(&base, x.clone())))),
            ("merged".into(), Box::new(|| drop(merged.forward(x.clone(), &shared)))),
            ("unmerged".into(), Box::new(|| drop(frozen(&layer.base, x.clone()) + update.delta(x.clone(), &shared)))),
        ];
        let m = time_interleaved::<B>(device, &mut variants, repeats);
        out.push(json!({
            "suite": "merged", "d": d, "tokens": n, "method": label,
            "base_ms": m[0], "merged_ms": m[1], "unmerged_ms": m[2],
            "merged_vs_base": m[1] / m[0], "unmerged_vs_base": m[2] / m[0],
        }));
    }
    Ok(out)
}

/// `scoring` suite: forward-only factored vs dense LoRA update as `N` grows past `d/2`.
fn bench_scoring<B: Backend>(device: &B::Device, d: usize, repeats: usize) -> Result<Vec<Value>, String> {
    let base: Linear<B> = LinearConfig::new(d, d).init::<B>(device);
    let lora = perturbed(LoraConfig::new().init::<B>(d, d, device).map_err(|e| e.to_string())?, device);
    let shared = SharedFactors::empty();
    let mut out = Vec::new();
    for n in [d / 8, d / 4, d / 2, d, 2 * d] {
        let x = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, 1.0), device);
        let mut variants: Vec<(String, Box<dyn FnMut()>)> = vec![
            ("factored".into(), Box::new(|| drop(frozen(&base, x.clone()) + lora.delta(x.clone(), &shared)))),
            (
                "dense".into(),
                Box::new(|| {
                    drop(linear(
                        x.clone(),
                        base.weight.val() + lora.delta_weight(&shared),
                        base.bias.as_ref().map(|b| b.val()),
                    ))
                }),
            ),
        ];
        let m = time_interleaved::<B>(device, &mut variants, repeats);
        out.push(json!({
            "suite": "scoring", "d": d, "tokens": n, "factored_ms": m[0], "dense_ms": m[1], "dense_vs_factored": m[1] / m[0],
            "switch_chooses_dense": prefer_dense_delta(d, d, n, false),
        }));
    }
    Ok(out)
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|kib| kib / 1024.0)
}

/// Resets the kernel's peak-RSS counter of this process (`VmHWM`; Linux ≥ 4.0), so that the next
/// [`peak_rss_mib`] reports the peak since now. Returns whether it worked.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Loads a LLaMA-family model from an HF directory or a `.gguf` file, or builds one with random
/// weights when `path` is a preset name such as `llama2-7b` (no such file existing).
fn load_llama<B: Backend>(
    path: &std::path::Path,
    base: tensor_peft_models::BaseDType,
    device: &B::Device,
) -> Result<(tensor_peft_models::Llama<B>, tensor_peft_models::ArchSpec), String> {
    use tensor_peft_models::Llama;
    if let Some(spec) = random_preset(path) {
        return Llama::<B>::random_as(&spec, device, base).map(|l| (l, spec)).map_err(|e| e.to_string());
    }
    if path.extension().is_some_and(|e| e == "gguf") {
        Llama::<B>::from_gguf_as(path, device, base).map(|(l, s, _)| (l, s)).map_err(|e| e.to_string())
    } else {
        Llama::<B>::from_hf_dir_as(path, device, base).map_err(|e| e.to_string())
    }
}

/// The preset architecture `path` names, when it names one and no such file exists.
fn random_preset(path: &std::path::Path) -> Option<tensor_peft_models::ArchSpec> {
    if path.exists() {
        return None;
    }
    tensor_peft_models::ArchSpec::preset(path.to_str()?)
}

/// How a record names its model: the path, or `<preset> (random weights)`.
fn model_label(path: &std::path::Path) -> String {
    match random_preset(path) {
        Some(_) => format!("{} (random weights)", path.display()),
        None => path.display().to_string(),
    }
}

/// `train-step` suite: one fine-tuning step (forward, loss on every next token, backward, AdamW
/// with weight decay 0.01 and global-norm clipping at 1.0) of LoRA r=8 (alpha 16) and TT-LoRA
/// (default rank and planned shape) on q_proj,v_proj, timed interleaved; then each method's step
/// again alone with the peak-RSS counter reset before it and its allocations counted.
fn bench_train_step<B: AutodiffBackend>(
    device: &B::Device,
    path: &std::path::Path,
    base_dtype: tensor_peft_models::BaseDType,
    (batch_size, seq): (usize, usize),
    repeats: usize,
    checkpointing: bool,
) -> Result<Vec<Value>, String> {
    use burn::optim::Optimizer;
    use tensor_peft_models::Targets;
    use tensor_peft_training::optim::PeftOptimizer;
    use tensor_peft_training::task::{Encoded, LmTask, Target, make_batch};

    let (base, spec) = load_llama::<B>(path, base_dtype, device)?;
    let vocab = base.embed_tokens.weight.dims()[0] as u32;
    // Deterministic ids (the same formula as scripts/bench/smollm2_peft_train_step.py), every
    // position after the first supervised.
    let items: Vec<Encoded> = (0..batch_size)
        .map(|row| Encoded {
            ids: (0..seq).map(|i| (((row * seq + i) * 7919 + 13) as u32) % vocab).collect(),
            types: vec![0; seq],
            target: Target::Completion { from: 1 },
        })
        .collect();
    let refs: Vec<&Encoded> = items.iter().collect();
    let targets = Targets::Names(vec!["q_proj".into(), "v_proj".into()]);
    let methods = [
        ("lora r=8", MethodConfig::Lora(LoraConfig::new().with_rank(8).with_alpha(16.0))),
        // Rank 5, the paper's LLaMA-2-7B setting, which every recorded train-step figure used.
        ("tt-lora r=5", MethodConfig::TtLora(TtLoraConfig::new().with_rank(5))),
    ];
    let mut runs = Vec::new();
    for (name, method) in methods {
        // The frozen base is shared between the two adapted models (tensors are reference-counted).
        let net = base.clone().adapt(&spec, &method, &targets).map_err(|e| e.to_string())?;
        let params = tensor_peft_training::checkpoint::trainable_count(&net);
        runs.push((
            name,
            params,
            Some(LmTask { net, verbalizer: Vec::new(), decoding: None, gradient_checkpointing: checkpointing }),
        ));
    }
    drop(base);
    // As the trainer after loading: the construction's transient buffers handed back.
    tensor_peft_kernels::release_free_memory();
    type Task<B> = LmTask<B>;
    let optimizers: Vec<std::cell::RefCell<PeftOptimizer<Task<B>, B>>> = runs
        .iter()
        .map(|_| std::cell::RefCell::new(PeftOptimizer::new(0.01, Default::default(), 1.0, Some(1.0))))
        .collect();
    let models: Vec<std::cell::RefCell<Option<Task<B>>>> =
        runs.iter_mut().map(|(_, _, m)| std::cell::RefCell::new(m.take())).collect();
    // Milliseconds of each phase (forward + loss, backward, optimizer) of every timed step, to say
    // where a step's time goes; the backend is synchronised between phases.
    let phases: Vec<std::cell::RefCell<Vec<[f64; 3]>>> = runs.iter().map(|_| Default::default()).collect();
    let step = |i: usize| {
        let mut clock = Instant::now();
        let mut lap = || {
            let _ = B::sync(device);
            let ms = clock.elapsed().as_secs_f64() * 1e3;
            clock = Instant::now();
            ms
        };
        let task = models[i].borrow_mut().take().expect("model present");
        let batch = make_batch::<B>(&refs, 0, device);
        // With checkpointing the forward keeps only the block inputs and the backward recomputes
        // each block.
        let (loss, pass) = if checkpointing {
            let (loss, _, pass) = task.checkpointed_forward(batch);
            (loss, Some(pass))
        } else {
            (task.run(batch).0, None)
        };
        let forward = lap();
        let grads = task.gradients(loss, pass);
        let backward = lap();
        let task = optimizers[i].borrow_mut().step(1e-4, task, grads);
        let optimizer = lap();
        phases[i].borrow_mut().push([forward, backward, optimizer]);
        *models[i].borrow_mut() = Some(task);
    };
    let mut variants: Vec<Variant<'_>> =
        runs.iter().enumerate().map(|(i, (name, _, _))| (name.to_string(), Box::new(move || step(i)) as _)).collect();
    let medians = time_interleaved::<B>(device, &mut variants, repeats);
    drop(variants);
    let mut out = Vec::new();
    for (i, (name, params, _)) in runs.iter().enumerate() {
        // The first (warm-up) step is not part of the medians.
        let timed: Vec<[f64; 3]> = phases[i].borrow().iter().skip(1).copied().collect();
        let phase = |k: usize| median(timed.iter().map(|p| p[k]).collect());
        let reset = reset_peak_rss();
        let allocated = count_allocations(|| step(i)).1;
        let peak = if reset { peak_rss_mib() } else { None };
        out.push(with_fields(
            json!({
                "suite": "train-step", "model": model_label(path), "method": name, "base_dtype": base_dtype.name(), "compute_dtype": tensor_peft_kernels::compute_dtype().name(),
                "bf16_kernel": format!("{:?}", tensor_peft_kernels::bf16_gemm::Kernel::detect()),
                "batch": batch_size, "seq": seq, "adapter_params": params, "gradient_checkpointing": checkpointing,
                "step_ms": medians[i], "tokens_per_s": (batch_size * seq) as f64 / (medians[i] / 1e3),
                "vs_lora": medians[i] / medians[0], "peak_rss_mib": peak,
                "forward_ms": phase(0), "backward_ms": phase(1), "optimizer_ms": phase(2),
            }),
            allocation_fields(allocated),
        ));
    }
    Ok(out)
}

/// `model` suite: load time, a 1×64-token forward (tokens/s), 32 greedy tokens with the KV cache
/// after a 16-token prompt (tokens/s), and peak RSS.
fn bench_model<B: Backend>(
    device: &B::Device,
    path: &std::path::Path,
    base_dtype: tensor_peft_models::BaseDType,
    repeats: usize,
) -> Result<Vec<Value>, String> {
    let start = Instant::now();
    let llama = load_llama::<B>(path, base_dtype, device)?.0;
    let load_s = start.elapsed().as_secs_f64();
    let vocab = llama.embed_tokens.weight.dims()[0] as i64;
    let ids: Vec<i64> = (0..64).map(|i| (i * 7919 + 13) % vocab).collect();
    let tokens =
        Tensor::<B, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(ids.clone(), [1, 64]), device);
    let mut variants: Vec<(String, Box<dyn FnMut()>)> =
        vec![("forward".into(), Box::new(|| drop(llama.forward(tokens.clone()))))];
    let forward_ms = time_interleaved::<B>(device, &mut variants, repeats)[0];
    let forward_allocations = count_each::<B>(device, &mut variants)[0].map(|d| d.allocations);
    drop(variants);
    let prompt: Vec<u32> = ids[..16].iter().map(|&i| i as u32).collect();
    let start = Instant::now();
    let generated = llama.generate_greedy(&prompt, 32, None).len();
    let decode_s = start.elapsed().as_secs_f64();
    Ok(vec![json!({
        "suite": "model", "model": model_label(path), "base_dtype": base_dtype.name(), "compute_dtype": tensor_peft_kernels::compute_dtype().name(), "load_s": load_s,
        "forward_1x64_ms": forward_ms, "forward_tokens_per_s": 64.0 / (forward_ms / 1e3),
        "forward_1x64_allocations": forward_allocations,
        "generate_32_tokens_s": decode_s, "generate_tokens_per_s": generated as f64 / decode_s,
        "peak_rss_mib": peak_rss_mib(),
    })])
}

/// Runs the selected suites; returns one JSON record per measurement.
pub fn run<B: AutodiffBackend>(device: &B::Device, options: &BenchOptions) -> Result<Vec<Value>, String> {
    tensor_peft_kernels::rng::seed::<B>(device, 0);
    let inner = device;
    let mut records = Vec::new();
    for suite in &options.suites {
        match suite.as_str() {
            "linear" => {
                for &d in &options.dims {
                    for &n in &options.tokens {
                        records.extend(bench_linear::<B>(device, d, n, options.repeats)?);
                    }
                }
            }
            "contraction" => records.extend(bench_contraction::<B::InnerBackend>(inner, options.repeats)?),
            "merged" => {
                for &d in &options.dims {
                    records.extend(bench_merged::<B::InnerBackend>(inner, d, options.tokens[0], options.repeats)?);
                }
            }
            "scoring" => {
                for &d in &options.dims {
                    records.extend(bench_scoring::<B::InnerBackend>(inner, d, options.repeats)?);
                }
            }
            "model" => {
                let path = options.model.as_deref().ok_or("the model suite needs --model <HF dir | file.gguf>")?;
                records.extend(bench_model::<B::InnerBackend>(inner, path, options.base_dtype, options.repeats)?);
            }
            "train-step" => {
                let path = options.model.as_deref().ok_or("the train-step suite needs --model <HF dir | file.gguf>")?;
                records.extend(bench_train_step::<B>(
                    device,
                    path,
                    options.base_dtype,
                    options.train_shape,
                    options.repeats,
                    options.gradient_checkpointing,
                )?);
            }
            other => return Err(format!("unknown suite `{other}`: expected one of {}", SUITES.join(", "))),
        }
    }
    Ok(records)
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// An integer field as text (empty when absent), so that width formatting applies.
fn count(v: &Value, key: &str) -> String {
    v[key].as_u64().map(|n| n.to_string()).unwrap_or_default()
}

/// Human-readable tables of the records.
pub fn render(records: &[Value]) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for r in records {
        let suite = r["suite"].as_str().unwrap_or("");
        let header = match suite {
            "linear" => format!("linear d={} N={}", r["d"], r["tokens"]),
            "merged" => format!("merged d={} N={}", r["d"], r["tokens"]),
            "contraction" => format!("contraction {} ", r["shape"]),
            "model" => format!("model {}", r["model"].as_str().unwrap_or("")),
            "train-step" => {
                format!(
                    "train-step {} batch {}x{}{}",
                    r["model"].as_str().unwrap_or(""),
                    r["batch"],
                    r["seq"],
                    if r["gradient_checkpointing"] == true { ", gradient checkpointing" } else { "" }
                )
            }
            _ => format!("scoring d={}", r["d"]),
        };
        if header != last {
            out.push_str(&format!("\n== {header}\n"));
            out.push_str(match suite {
                "linear" => "variant                       median ms   vs LoRA   vs base   same result   allocs  alloc MiB\n",
                "merged" => "method        base ms  merged ms  unmerged ms  merged/base  unmerged/base\n",
                "contraction" => "   N  half-trains ms  core-by-core ms  core/half  planned      measured faster\n",
                "model" => "load s  forward 1x64 ms  forward tok/s  generate tok/s  peak RSS MiB\n",
                "train-step" => "method      adapter params   step ms   tokens/s   vs LoRA   step peak RSS MiB   forward ms  backward ms  optimizer ms   allocs  alloc MiB  heap peak MiB\n",
                _ => "     N  factored ms  dense ms  dense/factored  switch\n",
            });
            last = header;
        }
        out.push_str(&match suite {
            "linear" => format!(
                "{:<28} {:>10.3} {:>9.3} {:>9.3}   {:<11} {:>6} {:>10.2}\n",
                r["variant"].as_str().unwrap_or(""),
                f(r, "median_ms"),
                f(r, "vs_lora"),
                f(r, "vs_base"),
                r["max_rel_diff_vs_factored"].as_f64().map(|d| format!("{d:.1e}")).unwrap_or_default(),
                count(r, "allocations"),
                f(r, "allocated_mib")
            ),
            "merged" => format!(
                "{:<12} {:>8.3} {:>10.3} {:>12.3} {:>12.3} {:>14.3}\n",
                r["method"].as_str().unwrap_or(""),
                f(r, "base_ms"),
                f(r, "merged_ms"),
                f(r, "unmerged_ms"),
                f(r, "merged_vs_base"),
                f(r, "unmerged_vs_base")
            ),
            "contraction" => format!(
                "{:>4} {:>15.4} {:>16.4} {:>10.2}  {:<12} {}\n",
                r["tokens"],
                f(r, "half_trains_ms"),
                f(r, "core_by_core_ms"),
                f(r, "core_vs_half"),
                r["planned"].as_str().unwrap_or(""),
                r["measured_faster"].as_str().unwrap_or("")
            ),
            "model" => format!(
                "{:>6.2} {:>16.1} {:>14.1} {:>15.2} {:>13.0}\n",
                f(r, "load_s"),
                f(r, "forward_1x64_ms"),
                f(r, "forward_tokens_per_s"),
                f(r, "generate_tokens_per_s"),
                f(r, "peak_rss_mib")
            ),
            "train-step" => format!(
                "{:<10} {:>15} {:>9.1} {:>10.1} {:>9.3} {:>19.0} {:>12.1} {:>12.1} {:>13.1} {:>8} {:>10.1} {:>14.1}\n",
                r["method"].as_str().unwrap_or(""),
                r["adapter_params"],
                f(r, "step_ms"),
                f(r, "tokens_per_s"),
                f(r, "vs_lora"),
                f(r, "peak_rss_mib"),
                f(r, "forward_ms"),
                f(r, "backward_ms"),
                f(r, "optimizer_ms"),
                count(r, "allocations"),
                f(r, "allocated_mib"),
                f(r, "heap_peak_extra_mib")
            ),
            _ => format!(
                "{:>6} {:>12.3} {:>9.3} {:>15.3}  {}\n",
                r["tokens"],
                f(r, "factored_ms"),
                f(r, "dense_ms"),
                f(r, "dense_vs_factored"),
                if r["switch_chooses_dense"].as_bool() == Some(true) { "dense" } else { "factored" }
            ),
        });
    }
    out
}
