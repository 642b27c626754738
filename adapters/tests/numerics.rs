//! Numerical test-suite of the adapter library: every method against independent references
//! (dense reconstruction by explicit index loops, central finite differences, paper formulas).
//!
//! Test bodies are generic over the backend and instantiated for ndarray (CI) and, behind the
//! `test-wgpu` / `test-cuda` features, for the GPU backends. All data comes from a seeded
//! generator owned by each test (not the backend's process-global RNG), so every run sees the
//! same numbers whatever the thread interleaving.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::LinearConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use std::collections::HashSet;
use tensor_peft_adapters::tensor::shape::{parse_shape, validate_split_shape};
use tensor_peft_adapters::tensor::tt::tt_num_params;
use tensor_peft_adapters::*;

// ---------------------------------------------------------------- deterministic data

/// SplitMix64 with Box-Muller normals: the tests' own seeded generator.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
    }
    fn normals(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

fn tensor<B: Backend, const D: usize>(values: Vec<f64>, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values, shape).convert::<B::FloatElem>(), device)
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    diff / norm.max(1e-30)
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Replaces every float parameter with seeded `N(0, std²)` values, keeping ids and trainability.
struct Randomize<'a> {
    rng: &'a mut Rng,
    std: f64,
}
impl<B: Backend> ModuleMapper<B> for Randomize<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, t, mapper) = param.consume();
        let trainable = t.is_require_grad();
        let dims = t.dims();
        let fresh = tensor::<B, D>(self.rng.normals(dims.iter().product(), self.std), dims, &t.device());
        Param::from_mapped_value(id, fresh.set_require_grad(trainable), mapper)
    }
}

fn randomize<B: Backend, M: Module<B>>(module: M, rng: &mut Rng, std: f64) -> M {
    module.map(&mut Randomize { rng, std })
}

// ---------------------------------------------------------------- the harness

/// A miniature "model": shared factors held once plus every adapted site of a method.
#[derive(Module, Debug)]
struct Harness<B: Backend> {
    shared: SharedFactors<B>,
    linear: Vec<AdaptedLinear<B>>,
    residual: Vec<ResidualAdapter<B>>,
}

impl<B: Backend> Harness<B> {
    fn outputs(&self, x: &Tensor<B, 3>) -> Vec<Tensor<B, 3>> {
        let mut out: Vec<_> = self.linear.iter().map(|l| l.forward(x.clone(), &self.shared)).collect();
        out.extend(self.residual.iter().map(|r| r.forward(x.clone())));
        out
    }

    /// A loss linear in every output: `Σ_i sum(out_i ⊙ w_i)`.
    fn loss(&self, x: &Tensor<B, 3>, weights: &[Tensor<B, 3>]) -> Tensor<B, 1> {
        let outs = self.outputs(x);
        outs.into_iter().zip(weights).map(|(o, w)| (o * w.clone()).sum()).reduce(|a, b| a + b).unwrap()
    }
}

const TOKENS: [usize; 2] = [2, 3];

fn geometry(n_kv_heads: usize) -> AttentionGeometry {
    AttentionGeometry::new(2, 24, 4, n_kv_heads)
}

fn sites(method: &MethodConfig, geo: &AttentionGeometry) -> (Vec<LinearSite>, Vec<ResidualSite>) {
    let mut linear = Vec::new();
    let mut residual = Vec::new();
    for layer in 0..geo.n_layers {
        for &role in method.default_roles() {
            let (d_in, d_out) = geo.matrix_dims(role);
            let projection = role as usize;
            linear.push(LinearSite {
                name: format!("layers.{layer}.{role:?}"),
                layer,
                projection,
                role: Some(role),
                d_in,
                d_out,
            });
        }
        for (place, position) in [("attention", ResidualPosition::Attention), ("ffn", ResidualPosition::FeedForward)] {
            residual.push(ResidualSite {
                name: format!("layers.{layer}.{place}_adapter"),
                layer,
                position,
                hidden: geo.d_model,
            });
        }
    }
    (linear, residual)
}

/// One small configuration of every method (dropout off, smooth activation for finite differences).
fn methods() -> Vec<MethodConfig> {
    vec![
        MethodConfig::Lora(LoraConfig::new().with_rank(3).with_alpha(6.0)),
        MethodConfig::TtLora(TtLoraConfig::new().with_rank(3).with_tt_shape(Some(vec![4, 6, 6, 4]))),
        MethodConfig::LorettaRep(LorettaRepConfig::new().with_rank(4).with_tensor_rank(3).with_dropout(0.0)),
        MethodConfig::LorettaAdp(
            LorettaAdpConfig::new().with_bottleneck(8).with_tensor_rank(3).with_activation(Activation::Tanh),
        ),
        MethodConfig::Lotr(LotrConfig::new().with_rank(3)),
        MethodConfig::Lorta(LortaConfig::new().with_rank(3)),
        #[cfg(feature = "toy-method")]
        MethodConfig::Toy(tensor_peft_adapters::methods::ToyConfig::new().with_scale(0.5)),
    ]
}

/// Every method on a multi-head geometry, plus LoRTA and TT-LoRA (planned shapes) on a GQA one,
/// and TT-LoRA with a shape that has no input/output cut (24×24 as 8·9·8: ΔW reconstructed).
fn cases() -> Vec<(MethodConfig, AttentionGeometry)> {
    let mut cases: Vec<_> = methods().into_iter().map(|m| (m, geometry(4))).collect();
    cases
        .push((MethodConfig::TtLora(TtLoraConfig::new().with_rank(3).with_tt_shape(Some(vec![8, 9, 8]))), geometry(4)));
    cases.push((MethodConfig::Lorta(LortaConfig::new().with_rank(3)), geometry(2)));
    cases.push((MethodConfig::TtLora(TtLoraConfig::new().with_rank(2)), geometry(2)));
    cases
}

fn build<B: Backend>(method: &MethodConfig, geo: &AttentionGeometry, device: &B::Device) -> Harness<B> {
    let (linear_sites, residual_sites) = sites(method, geo);
    let set = method.build::<B>(geo, &linear_sites, &residual_sites, device).unwrap();
    let linear = set
        .linear
        .into_iter()
        .map(|(s, adapter)| AdaptedLinear::new(LinearConfig::new(s.d_in, s.d_out).init(device), Some(adapter)).unwrap())
        .collect();
    Harness { shared: set.shared, linear, residual: set.residual.into_iter().map(|(_, a)| a).collect() }
}

/// A seeded input `[2, 3, d_model]`.
fn random_input<B: Backend>(rng: &mut Rng, geo: &AttentionGeometry, device: &B::Device) -> Tensor<B, 3> {
    tensor::<B, 3>(
        rng.normals(TOKENS.iter().product::<usize>() * geo.d_model, 1.0),
        [TOKENS[0], TOKENS[1], geo.d_model],
        device,
    )
}

/// Seeded weights `w_i` of the linear test loss, one per harness output.
fn loss_weights<B: Backend>(h: &Harness<B>, x: &Tensor<B, 3>, rng: &mut Rng, device: &B::Device) -> Vec<Tensor<B, 3>> {
    h.outputs(x).iter().map(|o| tensor::<B, 3>(rng.normals(o.shape().num_elements(), 1.0), o.dims(), device)).collect()
}

// ---------------------------------------------------------------- independent references

fn matmul_ref(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for p in 0..k {
            for j in 0..m {
                out[i * m + j] += a[i * k + p] * b[p * m + j];
            }
        }
    }
    out
}

/// Full tensor of a train by explicit index loops, row-major over the modes.
fn tt_full_ref<B: Backend>(tt: &tensor_peft_adapters::tensor::tt::TensorTrain<B>) -> Vec<f64> {
    let mut state = vec![1.0]; // [prefix, rank]
    let mut prefix = 1;
    for core in &tt.cores {
        let [r0, n, r1] = core.dims();
        let c = values(core.val());
        let mut next = vec![0.0; prefix * n * r1];
        for p in 0..prefix {
            for i in 0..n {
                for b in 0..r1 {
                    next[(p * n + i) * r1 + b] = (0..r0).map(|a| state[p * r0 + a] * c[(a * n + i) * r1 + b]).sum();
                }
            }
        }
        state = next;
        prefix *= n;
    }
    state
}

/// ΔW `[d_in, d_out]` computed from the raw factors without any library contraction code.
fn delta_weight_ref<B: Backend>(adapter: &LinearAdapter<B>, shared: &SharedFactors<B>) -> Vec<f64> {
    let scale = |v: Vec<f64>, s: f64| v.into_iter().map(|x| x * s).collect::<Vec<_>>();
    match adapter {
        LinearAdapter::Lora(l) => {
            let [d_in, r] = l.a.dims();
            let d_out = l.b.dims()[1];
            scale(matmul_ref(&values(l.a.val()), &values(l.b.val()), d_in, r, d_out), l.scaling)
        }
        LinearAdapter::TtLora(t) => scale(tt_full_ref(&t.tt), t.alpha),
        LinearAdapter::LorettaRep(l) => {
            let (d_in, r, d_out) = (l.a.d_in, l.a.d_out, l.b.d_out);
            scale(matmul_ref(&tt_full_ref(&l.a.tt), &tt_full_ref(&l.b.tt), d_in, r, d_out), l.scaling)
        }
        LinearAdapter::Lotr(l) => {
            let f = &shared.lotr[l.family];
            let r = f.rank();
            let ag = matmul_ref(&values(f.a.val()), &values(l.core.val()), l.d_in, r, r);
            scale(matmul_ref(&ag, &values(f.bt.val()), l.d_in, r, l.d_out), l.scaling)
        }
        LinearAdapter::Lorta(l) => {
            let f = shared.lorta.as_ref().unwrap();
            let [d, r] = f.a.dims();
            let d_h = f.b.dims()[0];
            let (a, b) = (values(f.a.val()), values(f.b.val()));
            let heads = if l.kv_heads { values(f.c_kv_heads.as_ref().unwrap().val()) } else { values(f.c_heads.val()) };
            let (cl, cm) = (values(f.c_layers.val()), values(f.c_matrices.val()));
            let n_heads = heads.len() / r;
            let mut out = vec![0.0; d * n_heads * d_h];
            for i in 0..d {
                for h in 0..n_heads {
                    for j in 0..d_h {
                        out[i * n_heads * d_h + h * d_h + j] = (0..r)
                            .map(|k| {
                                a[i * r + k]
                                    * heads[h * r + k]
                                    * cl[l.layer * r + k]
                                    * cm[l.matrix * r + k]
                                    * b[j * r + k]
                            })
                            .sum::<f64>()
                            * f.scaling;
                    }
                }
            }
            out
        }
        #[cfg(feature = "toy-method")]
        LinearAdapter::Toy(t) => {
            let (d_in, d_out) = (t.u.dims()[0], t.v.dims()[1]);
            scale(matmul_ref(&values(t.u.val()), &values(t.v.val()), d_in, 1, d_out), t.scale)
        }
    }
}

/// LoRETTA_adp forward `h + s·up(tanh(down(h)))` by loops.
fn adapter_forward_ref<B: Backend>(adapter: &ResidualAdapter<B>, h: &[f64], tokens: usize) -> Vec<f64> {
    let ResidualAdapter::LorettaAdp(a) = adapter;
    let (d, b) = (a.down.d_in, a.down.d_out);
    let mut z = matmul_ref(h, &tt_full_ref(&a.down.tt), tokens, d, b);
    let bias_down = values(a.down.bias.as_ref().unwrap().val());
    for (i, v) in z.iter_mut().enumerate() {
        *v = (*v + bias_down[i % b]).tanh();
    }
    let mut y = matmul_ref(&z, &tt_full_ref(&a.up.tt), tokens, b, d);
    let bias_up = values(a.up.bias.as_ref().unwrap().val());
    for (i, v) in y.iter_mut().enumerate() {
        *v = h[i] + a.scaling * (*v + bias_up[i % d]);
    }
    y
}

// ---------------------------------------------------------------- generic test bodies

/// Relative tolerance of comparisons that go through matrix products on `B`. CUDA runs f32
/// matmuls on TF32 tensor cores (10-bit mantissa): an H100 gave 2.7e-4 on LoRA's ΔW against the
/// f64 loops. The CPU backends (and wgpu on lavapipe) are exact f32.
fn tolerance<B: Backend>(device: &B::Device) -> f64 {
    if B::name(device).contains("cuda") { 2e-3 } else { 1e-5 }
}

fn check_factored_forward_matches_dense<B: Backend>(device: &B::Device) {
    let tol = tolerance::<B>(device);
    let mut rng = Rng(1);
    for (method, geo) in cases() {
        let h: Harness<B> = randomize(build(&method, &geo, device), &mut rng, 0.5);
        let x_vals = rng.normals(TOKENS.iter().product::<usize>() * geo.d_model, 1.0);
        let x = tensor::<B, 3>(x_vals.clone(), [TOKENS[0], TOKENS[1], geo.d_model], device);
        let n = TOKENS.iter().product();
        for layer in &h.linear {
            let adapter = layer.adapter.as_ref().unwrap();
            let (d_in, d_out) = adapter.dims();
            let dense = delta_weight_ref(adapter, &h.shared);
            assert!(norm(&dense) > 1e-3, "{}: reference ΔW is zero, the check would be vacuous", method.name());
            let built = values(adapter.delta_weight(&h.shared));
            assert!(
                rel_err(&built, &dense) < tol,
                "{}: delta_weight vs loops {}",
                method.name(),
                rel_err(&built, &dense)
            );
            // ‖ΔW‖² from the factors' Gram matrices (the update_ratio metric) vs the loop reference
            let norm_sq = values(adapter.delta_frobenius_sq(&h.shared))[0];
            let expected_sq = norm(&dense).powi(2);
            assert!(
                (norm_sq - expected_sq).abs() <= tol * expected_sq,
                "{}: factored ‖ΔW‖² {norm_sq} vs dense {expected_sq}",
                method.name()
            );
            let factored = values(adapter.delta(x.clone(), &h.shared));
            let expected = matmul_ref(&x_vals, &dense, n, d_in, d_out);
            let err = rel_err(&factored, &expected);
            assert!(err < tol, "{} {:?}: factored forward vs x·ΔW rel err {err}", method.name(), geo);
            // The factors `AdaptedLinear` adds inside the base product give the same update; every
            // method offers them at this many rows (TT-LoRA plans its half-trains for more than a
            // handful), except TT-LoRA without an input/output cut, which has no low-rank factors.
            let Some(update) = adapter.low_rank_update(n, &h.shared) else {
                assert!(matches!(adapter, LinearAdapter::TtLora(t) if t.split.is_none()), "{}", method.name());
                continue;
            };
            assert_eq!(update.dropout, 0.0, "{}: dropout is off in these cases", method.name());
            let x2 = x.clone().reshape([n, d_in]);
            let err = rel_err(&values(x2.matmul(update.a).matmul(update.b)), &expected);
            assert!(err < tol, "{} {:?}: low-rank update vs x·ΔW rel err {err}", method.name(), geo);
        }
        for adapter in &h.residual {
            let got = values(adapter.forward(x.clone()));
            let err = rel_err(&got, &adapter_forward_ref(adapter, &x_vals, n));
            assert!(err < tol, "loretta-adp forward rel err {err}");
        }
    }
}

fn check_zero_delta_init<B: Backend>(device: &B::Device) {
    let mut rng = Rng(2);
    for (method, geo) in cases() {
        let h: Harness<B> = build(&method, &geo, device);
        let x = random_input::<B>(&mut rng, &geo, device);
        for layer in &h.linear {
            let adapted = values(layer.forward(x.clone(), &h.shared));
            let base = values(layer.base.forward(x.clone()));
            assert_eq!(adapted, base, "{}: zero-delta init changed the output", method.name());
        }
        for adapter in &h.residual {
            assert_eq!(values(adapter.forward(x.clone())), values(x.clone()), "loretta-adp zero init changed h");
        }
    }
    // The official initialisations of TT-LoRA and LoRETTA start with ΔW ≠ 0.
    let paper = [
        MethodConfig::TtLora(
            TtLoraConfig::new().with_rank(3).with_tt_shape(Some(vec![4, 6, 6, 4])).with_init(DeltaInit::Paper),
        ),
        MethodConfig::LorettaRep(LorettaRepConfig::new().with_rank(4).with_tensor_rank(3).with_init(DeltaInit::Paper)),
    ];
    for method in paper {
        let h: Harness<B> = build(&method, &geometry(4), device);
        let dw = values(h.linear[0].adapter.as_ref().unwrap().delta_weight(&h.shared));
        assert!(norm(&dw) > 1e-6, "{}: paper init should give ΔW₀ ≠ 0", method.name());
    }
    // LoTR's shared factors: Glorot-normal by default, the official N(0, 1) with the paper's init
    // (2,048 draws each: the sample std is within 10 % of the target far beyond 5 sigma).
    for (init, std_a, std_b) in
        [(DeltaInit::Zero, (2.0f64 / 264.0).sqrt(), (2.0f64 / 136.0).sqrt()), (DeltaInit::Paper, 1.0, 1.0)]
    {
        let shared = LotrConfig::new().with_rank(8).with_init(init).init_shared::<B>(256, 128, device).unwrap();
        for (name, v, target) in [("A", values(shared.a.val()), std_a), ("Bᵀ", values(shared.bt.val()), std_b)] {
            let std = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
            assert!((std / target - 1.0).abs() < 0.1, "LoTR {init:?} {name}: std {std}, expected {target}");
        }
    }
}

fn check_merge_unmerge<B: Backend>(device: &B::Device) {
    let tol = tolerance::<B>(device);
    let mut rng = Rng(3);
    for (method, geo) in cases() {
        let h: Harness<B> = randomize(build(&method, &geo, device), &mut rng, 0.5);
        let x = random_input::<B>(&mut rng, &geo, device);
        for layer in h.linear.iter().cloned() {
            let before = values(layer.base.weight_f32());
            let adapted = values(layer.forward(x.clone(), &h.shared));
            let merged = layer.merge(&h.shared).unwrap();
            assert!(merged.merged);
            let y_merged = values(merged.forward(x.clone(), &h.shared));
            assert!(rel_err(&y_merged, &adapted) < tol, "{}: merged forward differs", method.name());
            assert!(merged.clone().merge(&h.shared).is_err(), "merging twice must fail");
            let restored = merged.unmerge(&h.shared).unwrap();
            let after = values(restored.base.weight_f32());
            let max_diff = before.iter().zip(&after).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(max_diff < tol, "{}: unmerge left {max_diff}", method.name());
            assert!(restored.unmerge(&h.shared).is_err(), "unmerging an unmerged layer must fail");
        }
        for adapter in &h.residual {
            assert!(!adapter.merge_supported());
            assert!(adapter.merge().unwrap_err().to_string().contains("nonlinear"));
        }
    }
}

/// Collects `(id, gradient)` of every parameter that requires one, and the ids of frozen ones.
struct GradCollector<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    trainable: Vec<(ParamId, Option<Vec<f64>>)>,
    frozen: Vec<(ParamId, bool)>,
}
impl<B: AutodiffBackend> ModuleVisitor<B> for GradCollector<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let grad = param.val().grad(self.grads);
        if param.val().is_require_grad() {
            self.trainable.push((param.id, grad.map(values)));
        } else {
            self.frozen.push((param.id, grad.is_some()));
        }
    }
}

fn collect_grads<'g, B: AutodiffBackend>(h: &Harness<B>, grads: &'g B::Gradients) -> GradCollector<'g, B> {
    let mut c = GradCollector { grads, trainable: Vec::new(), frozen: Vec::new() };
    h.visit(&mut c);
    c
}

fn check_only_adapters_get_gradients<B: AutodiffBackend>(device: &B::Device) {
    let mut rng = Rng(4);
    for (method, geo) in cases() {
        // Randomise only the adapters so every factor has a non-zero gradient.
        let mut h: Harness<B> = build(&method, &geo, device);
        h.shared = randomize(h.shared, &mut rng, 0.5);
        h.linear = h
            .linear
            .into_iter()
            .map(|mut l| {
                l.adapter = l.adapter.map(|a| randomize(a, &mut rng, 0.5));
                l
            })
            .collect();
        h.residual = randomize(h.residual, &mut rng, 0.5);
        let x = random_input::<B>(&mut rng, &geo, device);
        let w = loss_weights(&h, &x, &mut rng, device);
        let grads = h.loss(&x, &w).backward();
        let c = collect_grads(&h, &grads);
        let expected_frozen = if method.is_residual() { 0 } else { 2 * h.linear.len() };
        assert_eq!(c.frozen.len(), expected_frozen, "{}: base weight and bias are frozen", method.name());
        assert!(c.frozen.iter().all(|(_, has)| !has), "{}: a frozen base parameter received a gradient", method.name());
        assert!(!c.trainable.is_empty());
        for (id, g) in &c.trainable {
            let g = g.as_ref().unwrap_or_else(|| panic!("{}: adapter parameter {id} got no gradient", method.name()));
            assert!(norm(g) > 0.0, "{}: adapter parameter {id} has a zero gradient", method.name());
        }
        let trainable: usize = h.num_params() - h.linear.iter().map(|l| l.base.num_params()).sum::<usize>();
        let (ls, rs) = sites(&method, &geo);
        assert_eq!(trainable, method.count(&geo, &ls, &rs).unwrap().total(), "{}: counted vs allocated", method.name());
    }
}

fn check_shared_factors_update_once<B: AutodiffBackend>(device: &B::Device) {
    let tol = tolerance::<B>(device);
    let mut rng = Rng(5);
    let shared_methods =
        [MethodConfig::Lotr(LotrConfig::new().with_rank(3)), MethodConfig::Lorta(LortaConfig::new().with_rank(3))];
    for method in shared_methods {
        let geo = geometry(4);
        let h: Harness<B> = randomize(build(&method, &geo, device), &mut rng, 0.5);
        // Every parameter appears exactly once in the module tree.
        let mut ids = Vec::new();
        struct Ids<'a>(&'a mut Vec<ParamId>);
        impl<B: Backend> ModuleVisitor<B> for Ids<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                self.0.push(p.id);
            }
        }
        h.visit(&mut Ids(&mut ids));
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "{}: a parameter appears twice", method.name());

        let x = random_input::<B>(&mut rng, &geo, device);
        let w = loss_weights(&h, &x, &mut rng, device);
        let shared_a = |h: &Harness<B>| match &method {
            MethodConfig::Lotr(_) => h.shared.lotr[0].a.val(),
            _ => h.shared.lorta.as_ref().unwrap().a.val(),
        };
        // The shared factor's gradient is the sum of every site's contribution.
        let joint = values(shared_a(&h).grad(&h.loss(&x, &w).backward()).unwrap());
        let mut summed = vec![0.0; joint.len()];
        for (i, layer) in h.linear.iter().enumerate() {
            let part = (layer.forward(x.clone(), &h.shared) * w[i].clone()).sum();
            for (s, g) in summed.iter_mut().zip(values(shared_a(&h).grad(&part.backward()).unwrap())) {
                *s += g;
            }
        }
        assert!(rel_err(&summed, &joint) < tol, "{}: shared gradient is not the sum over sites", method.name());
        assert!(h.linear.len() >= 4);

        // One SGD step moves the shared factor by exactly -lr·grad (once, not once per site).
        let before = values(shared_a(&h));
        let lr = 0.1;
        let grads = GradientsParams::from_grads(h.loss(&x, &w).backward(), &h);
        let mut optim = SgdConfig::new().init::<B, Harness<B>>();
        let h = optim.step(lr, h, grads);
        let after = values(shared_a(&h));
        let expected: Vec<f64> = before.iter().zip(&joint).map(|(b, g)| b - lr * g).collect();
        assert!(rel_err(&after, &expected) < tol, "{}: shared factor not updated exactly once", method.name());
        // Every site sees the updated factor (there is only one copy).
        for layer in &h.linear {
            let adapter = layer.adapter.as_ref().unwrap();
            let err = rel_err(&values(adapter.delta_weight(&h.shared)), &delta_weight_ref(adapter, &h.shared));
            assert!(err < tol, "{}: ΔW after the step, rel err {err}", method.name());
        }
    }
}

/// Outputs and gradients of one harness with seeded values, in visiting order.
fn outputs_and_grads<B: AutodiffBackend>(
    method: &MethodConfig,
    geo: &AttentionGeometry,
    seed: u64,
    device: &B::Device,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut rng = Rng(seed);
    let h: Harness<B> = randomize(build(method, geo, device), &mut rng, 0.5);
    let x = random_input::<B>(&mut rng, geo, device);
    let w = loss_weights(&h, &x, &mut rng, device);
    let outputs = h.outputs(&x).into_iter().map(values).collect();
    let grads = h.loss(&x, &w).backward();
    let c = collect_grads(&h, &grads);
    let grads = c
        .trainable
        .into_iter()
        .map(|(id, g)| g.unwrap_or_else(|| panic!("{}: {id} has no gradient", method.name())))
        .collect();
    (outputs, grads)
}

/// Every method's outputs and the gradients of every factor on `B` equal ndarray's for the same
/// values (the reference for the GPU backends; on ndarray itself the check is trivially true).
fn check_matches_ndarray<B: AutodiffBackend>(device: &B::Device) {
    type Reference = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
    let tol = tolerance::<B>(device);
    let mut worst = 0.0f64;
    for (i, (method, geo)) in cases().into_iter().enumerate() {
        let (out, grads) = outputs_and_grads::<B>(&method, &geo, 10 + i as u64, device);
        let (out_ref, grads_ref) = outputs_and_grads::<Reference>(&method, &geo, 10 + i as u64, &Default::default());
        assert_eq!(out.len(), out_ref.len());
        for (k, (a, b)) in out.iter().zip(&out_ref).enumerate() {
            let err = rel_err(a, b);
            worst = worst.max(err);
            assert!(err < tol, "{} {geo:?}: output {k} differs from ndarray's, rel err {err}", method.name());
        }
        assert_eq!(grads.len(), grads_ref.len(), "{}: trainable tensors", method.name());
        for (k, (a, b)) in grads.iter().zip(&grads_ref).enumerate() {
            let err = rel_err(a, b);
            worst = worst.max(err);
            assert!(
                err < tol,
                "{} {geo:?}: gradient of factor {k} differs from ndarray's, rel err {err}",
                method.name()
            );
        }
    }
    eprintln!("{}: largest relative error against ndarray {worst:.1e}", B::name(device));
}

/// Loss of the inner (non-autodiff) harness with one parameter entry moved by `eps`.
struct Perturb {
    target: usize,
    index: usize,
    eps: f64,
    seen: usize,
}
impl<B: Backend> ModuleMapper<B> for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let k = self.seen;
        self.seen += 1;
        if k != self.target {
            return param;
        }
        let (id, t, mapper) = param.consume();
        let dims = t.dims();
        let mut v = values(t.clone());
        v[self.index] += self.eps;
        Param::from_mapped_value(id, tensor::<B, D>(v, dims, &t.device()), mapper)
    }
}

fn check_gradients_match_finite_differences<B: AutodiffBackend>(device: &B::Device, tolerance: f64, step: f64) {
    let mut rng = Rng(6);
    for (method, geo) in cases() {
        let h: Harness<B> = randomize(build(&method, &geo, device), &mut rng, 0.5);
        let x = random_input::<B>(&mut rng, &geo, device);
        let w = loss_weights(&h, &x, &mut rng, device);
        let grads = h.loss(&x, &w).backward();
        // Visit order = map order: record which visited parameters are trainable.
        struct Order<'a, B: AutodiffBackend>(&'a B::Gradients, Vec<Option<Vec<f64>>>);
        impl<B: AutodiffBackend> ModuleVisitor<B> for Order<'_, B> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                self.1.push(p.val().is_require_grad().then(|| values(p.val().grad(self.0).unwrap())));
            }
        }
        let mut order = Order::<B>(&grads, Vec::new());
        h.visit(&mut order);
        let inner = h.valid();
        let x_inner = x.inner();
        let w_inner: Vec<_> = w.iter().map(|t| t.clone().inner()).collect();
        let loss_at = |target: usize, index: usize, eps: f64| -> f64 {
            let moved = inner.clone().map(&mut Perturb { target, index, eps, seen: 0 });
            values(moved.loss(&x_inner, &w_inner))[0]
        };
        let mut checked = 0;
        for (target, grad) in order.1.iter().enumerate() {
            let Some(grad) = grad else { continue };
            for pick in 0..3 {
                let index = (rng.next_u64() as usize + pick) % grad.len();
                let fd = (loss_at(target, index, step) - loss_at(target, index, -step)) / (2.0 * step);
                let ad = grad[index];
                assert!(
                    (fd - ad).abs() <= tolerance * (1.0 + ad.abs()),
                    "{}: parameter #{target}[{index}]: autodiff {ad} vs finite difference {fd}",
                    method.name()
                );
                checked += 1;
            }
        }
        assert!(checked >= 3, "{}: no trainable parameter checked", method.name());
    }
}

// ---------------------------------------------------------------- backend instantiations

/// One `#[test]` per check, for the backend `$backend`.
macro_rules! backend_tests {
    ($module:ident, $backend:ty, $device:expr) => {
        backend_tests!(@tests $module, $backend, $device,
            factored_forward_matches_dense_reconstruction: check_factored_forward_matches_dense,
            zero_delta_init_leaves_output_unchanged: check_zero_delta_init,
            merge_then_unmerge: check_merge_unmerge,
            only_adapter_parameters_receive_gradients: check_only_adapters_get_gradients,
            shared_factors_update_once_per_step: check_shared_factors_update_once,
            outputs_and_gradients_match_ndarray: check_matches_ndarray,
        );
    };
    (@tests $module:ident, $backend:ty, $device:expr, $($test:ident: $check:ident,)*) => {
        mod $module {
            use super::*;
            $(
                #[test]
                fn $test() {
                    $check::<$backend>(&$device);
                }
            )*
        }
    };
}

backend_tests!(ndarray, burn::backend::Autodiff<burn::backend::NdArray<f32>>, Default::default());
#[cfg(feature = "test-wgpu")]
backend_tests!(wgpu, burn::backend::Autodiff<burn::backend::Wgpu>, Default::default());
#[cfg(feature = "test-cuda")]
backend_tests!(cuda, burn::backend::Autodiff<burn::backend::Cuda>, Default::default());

/// Runs `body` in a fresh process of this test binary.
///
/// Burn 0.21's `NdArray<f32>` and `NdArray<f64>` share one device, whose default float dtype is
/// fixed process-wide by the first tensor created; after an f32 test has run, "f64" tensors
/// created by `zeros`/`random` silently come out in f32. f64 checks therefore get a process of
/// their own.
fn in_fresh_process(test_name: &str, body: impl FnOnce()) {
    const VAR: &str = "TENSOR_PEFT_FRESH_PROCESS";
    if std::env::var(VAR).as_deref() == Ok(test_name) {
        let device = Default::default();
        burn::tensor::backend::set_default_float_dtype::<burn::backend::NdArray<f64>>(
            &device,
            burn::tensor::DType::F64,
        )
        .expect("the f64 process must set the dtype before any tensor exists");
        return body();
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--test-threads=1", "--nocapture"])
        .env(VAR, test_name)
        .output()
        .unwrap();
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "{test_name} failed in its own process:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn gradients_match_finite_differences_f64() {
    in_fresh_process("gradients_match_finite_differences_f64", || {
        check_gradients_match_finite_differences::<burn::backend::Autodiff<burn::backend::NdArray<f64>>>(
            &Default::default(),
            1e-6,
            1e-6,
        )
    });
}

#[test]
fn gradients_match_finite_differences_f32_loose() {
    check_gradients_match_finite_differences::<burn::backend::Autodiff<burn::backend::NdArray<f32>>>(
        &Default::default(),
        2e-2,
        1e-2,
    );
}

// ---------------------------------------------------------------- paper formulas and errors

fn llama_sites(layers: usize, d: usize, kv: usize, roles: &[AttentionMatrix]) -> Vec<LinearSite> {
    let geo = AttentionGeometry::new(layers, d, 1, 1);
    let mut out = Vec::new();
    for layer in 0..layers {
        for &role in roles {
            let d_out = if role.uses_kv_heads() { kv } else { d };
            let _ = geo;
            out.push(LinearSite {
                name: format!("{layer}.{role:?}"),
                layer,
                projection: role as usize,
                role: Some(role),
                d_in: d,
                d_out,
            });
        }
    }
    out
}

/// Counts the LoRA, TT-LoRA, LoTR and LoRTA papers (and LoTR's official repository) print.
#[test]
fn parameter_counts_match_the_papers() {
    use AttentionMatrix::*;
    let qv = [Query, Value];
    let count =
        |m: MethodConfig, geo: AttentionGeometry, sites: Vec<LinearSite>| m.count(&geo, &sites, &[]).unwrap().total();
    let l7 = AttentionGeometry::new(32, 4096, 32, 32);
    let lora8 = || MethodConfig::Lora(LoraConfig::new().with_rank(8));
    assert_eq!(count(lora8(), l7, llama_sites(32, 4096, 4096, &qv)), 4_194_304);
    assert_eq!(count(lora8(), AttentionGeometry::new(40, 5120, 40, 40), llama_sites(40, 5120, 5120, &qv)), 6_553_600);
    assert_eq!(count(lora8(), AttentionGeometry::new(80, 8192, 64, 8), llama_sites(80, 8192, 1024, &qv)), 16_384_000);
    let tt = MethodConfig::TtLora(TtLoraConfig::new().with_rank(5).with_tt_shape(Some(vec![16; 6])));
    assert_eq!(count(tt, l7, llama_sites(32, 4096, 4096, &qv)), 112_640);
    let lotr8 = || MethodConfig::Lotr(LotrConfig::new().with_rank(8));
    assert_eq!(count(lotr8(), AttentionGeometry::new(12, 768, 12, 12), llama_sites(12, 768, 768, &qv)), 13_824);
    assert_eq!(count(lotr8(), l7, llama_sites(32, 4096, 4096, &qv)), 69_632);
    let lorta = MethodConfig::Lorta(LortaConfig::new().with_rank(8));
    assert_eq!(count(lorta, l7, llama_sites(32, 4096, 4096, &[Query, Key, Value, Output])), 34_336);
    // LoRTA for GQA (documented generalisation): + r·H_kv.
    let l70 = AttentionGeometry::new(80, 8192, 64, 8);
    assert_eq!(LortaConfig::new().with_rank(8).num_params(&l70).unwrap(), 8 * (8192 + 128 + 64 + 8 + 80 + 4));
    // LoTR for RoBERTa-base across ranks, against the official repository's table.
    for (r, expected) in [(1, 1_560), (2, 3_168), (4, 6_528), (8, 13_824), (16, 30_720), (32, 73_728)] {
        let m = MethodConfig::Lotr(LotrConfig::new().with_rank(r));
        assert_eq!(count(m, AttentionGeometry::new(12, 768, 12, 12), llama_sites(12, 768, 768, &qv)), expected);
    }
}

/// LoRETTA's counts as its official code builds the adapters (not the paper's figures, which
/// count another placement on LLaMA; see docs/design.md).
#[test]
fn loretta_counts_match_the_official_code() {
    // rep 768x768 r=8 k=5 and LLaMA-2-7B q,v (the official r=8, not this crate's default r=2).
    let rep = |tensor_rank| LorettaRepConfig::new().with_rank(8).with_alpha(16.0).with_tensor_rank(tensor_rank);
    assert_eq!(rep(5).num_params(768, 768).unwrap(), 1_160);
    assert_eq!(rep(5).num_params(4096, 4096).unwrap() * 64, 102_400);
    assert_eq!(rep(8).num_params(4096, 4096).unwrap() * 64, 249_856);
    let adp = LorettaAdpConfig::new().with_bottleneck(64).with_tensor_rank(5);
    assert_eq!(adp.num_params(768).unwrap(), 1_560 + 832);
    assert_eq!(adp.num_params(4096).unwrap(), 2 * 1_100 + 64 + 4096);
}

#[test]
fn tt_lora_paper_example_has_995_parameters() {
    // The TT-LoRA paper prints 1,135 for this DeBERTa in_proj configuration; no uniform-rank
    // train of this shape has that many parameters.
    let shape = [12, 8, 8, 3, 8, 8, 12];
    assert_eq!(tt_num_params(&shape, 5), 60 + 200 + 200 + 75 + 200 + 200 + 60);
    assert_eq!(tt_num_params(&shape, 5), 995);
    assert_eq!(validate_split_shape(&shape, 768, 2304), Ok(3)); // 12·8·8 = 768
    let cfg = TtLoraConfig::new().with_rank(5).with_tt_shape(Some(shape.to_vec()));
    assert_eq!(cfg.num_params(768, 2304), Ok(995));
    let built = cfg.init::<burn::backend::NdArray>(768, 2304, &Default::default()).unwrap();
    assert_eq!(built.num_params(), 995);
}

#[test]
fn tt_lora_delta_has_rank_at_most_r_at_the_cut() {
    in_fresh_process("tt_lora_delta_has_rank_at_most_r_at_the_cut", || {
        assert!(rank_at_most::<burn::backend::NdArray<f64>>(&built_f64(&[12, 8, 8, 3, 8, 8, 12]), 5));
    });
}

fn built_f64(shape: &[usize]) -> TtLora<burn::backend::NdArray<f64>> {
    let cfg = TtLoraConfig::new().with_rank(5).with_tt_shape(Some(shape.to_vec())).with_init(DeltaInit::Paper);
    let mut rng = Rng(7);
    randomize(cfg.init(768, 2304, &Default::default()).unwrap(), &mut rng, 1.0)
}

/// rank(ΔW) ≤ r at the input/output cut: Gaussian elimination on the dense ΔW.
fn rank_at_most<B: Backend>(tt: &TtLora<B>, r: usize) -> bool {
    let (rows, cols) = tt.dims();
    let mut m = values(tt.delta_weight(&SharedFactors::empty()));
    let scale = m.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
    let mut rank = 0;
    let mut used = vec![false; rows];
    for c in 0..cols {
        let pivot =
            (0..rows).filter(|&i| !used[i]).max_by(|&a, &b| m[a * cols + c].abs().total_cmp(&m[b * cols + c].abs()));
        let Some(p) = pivot else { break };
        if m[p * cols + c].abs() <= 1e-9 * scale {
            continue;
        }
        used[p] = true;
        rank += 1;
        for i in 0..rows {
            if i != p {
                let f = m[i * cols + c] / m[p * cols + c];
                for j in c..cols {
                    m[i * cols + j] -= f * m[p * cols + j];
                }
            }
        }
    }
    rank <= r && rank > 0
}

#[test]
fn low_rank_updates_carry_the_dropout_and_core_by_core_keeps_its_path() {
    // LoRA and LoRETTA_rep hand their input dropout to the fused layer, which applies it in
    // training: the adapted layer then differs from the unmasked `base(x) + x·ΔW`.
    type B = burn::backend::Autodiff<burn::backend::NdArray>;
    let device = Default::default();
    let shared = SharedFactors::<B>::empty();
    let lora =
        LinearAdapter::Lora(LoraConfig::new().with_rank(4).with_dropout(0.5).init::<B>(16, 16, &device).unwrap());
    let rep = LinearAdapter::LorettaRep(
        LorettaRepConfig::new().with_rank(4).with_tensor_rank(3).with_dropout(0.5).init::<B>(16, 16, &device).unwrap(),
    );
    for adapter in [&lora, &rep] {
        assert_eq!(adapter.low_rank_update(8, &shared).unwrap().dropout, 0.5);
    }
    let mut rng = Rng(7);
    let base = LinearConfig::new(16, 16).init::<B>(&device);
    let layer = AdaptedLinear::new(base.clone(), Some(randomize(lora, &mut rng, 0.5))).unwrap();
    let x = tensor::<B, 2>(rng.normals(8 * 16, 1.0), [8, 16], &device);
    let delta_weight = layer.adapter.as_ref().unwrap().delta_weight(&shared);
    let plain = values(base.forward(x.clone()) + x.clone().matmul(delta_weight));
    let masked = values(layer.forward(x, &shared));
    assert!(rel_err(&masked, &plain) > 1e-3, "LoRA's dropout was not applied in training");
    // One row through a deep train: TT-LoRA contracts core by core and offers no half-trains.
    let tt = LinearAdapter::TtLora(
        TtLoraConfig::new()
            .with_rank(5)
            .with_tt_shape(Some(vec![16, 16, 16, 16, 16, 16]))
            .init::<B>(4096, 4096, &device)
            .unwrap(),
    );
    assert!(tt.low_rank_update(1, &shared).is_none());
    assert!(tt.low_rank_update(512, &shared).is_some());
}

#[test]
fn invalid_configurations_are_errors_not_panics() {
    let device = Default::default();
    type B = burn::backend::NdArray;
    let bad_shapes: [&[usize]; 4] = [&[], &[0, 4, 4], &[4, 4, 4], &[100]];
    for shape in bad_shapes {
        let err = TtLoraConfig::new().with_tt_shape(Some(shape.to_vec())).init::<B>(4, 25, &device).unwrap_err();
        assert!(err.to_string().contains("TT shape"), "{err}");
    }
    assert!(TtLoraConfig::new().with_rank(0).init::<B>(16, 16, &device).unwrap_err().to_string().contains("rank"));
    assert!(LoraConfig::new().with_rank(0).init::<B>(16, 16, &device).is_err());
    assert!(LoraConfig::new().with_dropout(1.5).init::<B>(16, 16, &device).is_err());
    assert!(LorettaRepConfig::new().with_a_shape(Some(vec![3, 3])).init::<B>(16, 16, &device).is_err());
    assert!(LorettaAdpConfig::new().with_tensor_rank(0).init::<B>(16, &device).is_err());
    assert!(LotrConfig::new().with_alpha(f64::NAN).init_shared::<B>(16, 16, &device).is_err());
    assert!(parse_shape("16,x").is_err());
    // LoRTA refuses MLP projections and heads that do not tile the width.
    let geo = AttentionGeometry::new(1, 24, 5, 5);
    assert!(LortaConfig::new().num_params(&geo).is_err());
    let mlp = LinearSite { name: "mlp.up_proj".into(), layer: 0, projection: 5, role: None, d_in: 24, d_out: 64 };
    let err = MethodConfig::from_name("lorta").unwrap().count(&geometry(4), &[mlp], &[]).unwrap_err();
    assert!(err.to_string().contains("mlp.up_proj"), "{err}");
    assert!(MethodConfig::from_name("dora").unwrap_err().to_string().contains("lora, tt-lora"));
    // A TT shape that fits q but not a narrower GQA v names the module.
    let m = MethodConfig::TtLora(TtLoraConfig::new().with_tt_shape(Some(vec![4, 6, 6, 4])));
    let (ls, rs) = sites(&m, &geometry(2));
    let err = m.count(&geometry(2), &ls, &rs).unwrap_err().to_string();
    assert!(err.contains("layers.0.Value"), "{err}");
}

#[test]
fn method_configs_round_trip_through_json() {
    // The generic suites cover every registered method.
    let covered: Vec<&str> = methods().iter().map(|m| m.name()).collect();
    assert_eq!(covered, METHOD_NAMES);
    for method in methods() {
        let json = serde_json::to_string(&method).unwrap();
        let back: MethodConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert!(json.contains(&format!("\"method\":\"{}\"", method.name())), "{json}");
    }
}

#[test]
fn tt_core_by_core_equals_half_trains_and_the_planner_picks_the_cheaper() {
    use tensor_peft_adapters::tensor::tt::{TtPath, plan_tt_path, tt_apply_costs};
    type B = burn::backend::NdArray;
    let device = Default::default();
    let mut rng = Rng(8);
    for (shape, d_in, d_out) in
        [(vec![4, 6, 6, 4], 24, 24), (vec![3, 8, 2, 5, 4], 48, 20), (vec![12, 2, 9], 24, 9), (vec![7, 5], 7, 5)]
    {
        let cfg = TtLoraConfig::new().with_rank(3).with_tt_shape(Some(shape.clone()));
        let tt: TtLora<B> = randomize(cfg.init(d_in, d_out, &device).unwrap(), &mut rng, 0.7);
        let x = tensor::<B, 3>(rng.normals(2 * 5 * d_in, 1.0), [2, 5, d_in], &device);
        let half = values(tt.delta_with(x.clone(), TtPath::HalfTrains));
        let core = values(tt.delta_with(x, TtPath::CoreByCore));
        assert!(norm(&half) > 1e-3);
        assert!(rel_err(&core, &half) < 1e-5, "{shape:?}: {}", rel_err(&core, &half));
    }
    // 4096x4096 as 16^6 at rank 5: building the half-trains costs 217,600 MACs, applying them
    // 40,960 per row, in 6 ops; core by core costs 54,560 MACs per row plus 16 per permuted state
    // element (4096 + 256·5 + 16·5 per row), in 3·3 + 3 ops. So core by core for one row only.
    let (shape, op) = ([16; 6], tensor_peft_adapters::tensor::tt::OP_COST);
    assert_eq!(
        tt_apply_costs(&shape, 3, 5, 1),
        (217_600 + 40_960 + 6 * op, 54_560 + 16 * (4096 + 1280 + 80) + 12 * op)
    );
    assert_eq!(plan_tt_path(&shape, 3, 5, 1), TtPath::CoreByCore);
    assert_eq!(plan_tt_path(&shape, 3, 5, 2), TtPath::HalfTrains);
    assert_eq!(plan_tt_path(&shape, 3, 5, 512), TtPath::HalfTrains);
    // 1024-wide trains: the op count decides a single row for the half-trains (measured faster).
    assert_eq!(plan_tt_path(&[16, 8, 8, 8, 8, 16], 3, 5, 1), TtPath::HalfTrains);
    assert_eq!(plan_tt_path(&[32, 32, 32, 32], 2, 5, 1), TtPath::HalfTrains);
}

#[test]
fn inference_switches_to_the_dense_update_for_many_rows() {
    assert!(!prefer_dense_delta(24, 24, 12, false)); // N·48 = 576 = 24·24: not more
    assert!(prefer_dense_delta(24, 24, 13, false));
    assert!(!prefer_dense_delta(24, 24, 10_000, true)); // never with gradients
    // On a backend without autodiff, both paths give the same outputs.
    type B = burn::backend::NdArray;
    let device = Default::default();
    let mut rng = Rng(9);
    for (method, geo) in cases() {
        let h: Harness<B> = randomize(build(&method, &geo, &device), &mut rng, 0.5);
        for tokens in [3, 40] {
            let x = tensor::<B, 2>(rng.normals(tokens * geo.d_model, 1.0), [tokens, geo.d_model], &device);
            for layer in &h.linear {
                let adapter = layer.adapter.as_ref().unwrap();
                let factored = values(layer.base.forward(x.clone()) + adapter.delta(x.clone(), &h.shared));
                let got = values(layer.forward(x.clone(), &h.shared));
                assert!(rel_err(&got, &factored) < 1e-5, "{} with {tokens} rows", method.name());
            }
        }
    }
}

/// The registry's lookup, flags and serde form, for every registered method.
#[test]
fn the_registry_names_flags_and_serialises_every_method() {
    let one = |flag: Flag| MethodFlags {
        rank: (flag == Flag::Rank).then_some(3),
        alpha: (flag == Flag::Alpha).then_some(0.5),
        tensor_rank: (flag == Flag::TensorRank).then_some(2),
        tt_shape: (flag == Flag::TtShape).then(|| vec![2, 3]),
        tt_module_shapes: if flag == Flag::TtModuleShape { vec![("q_proj".into(), vec![2, 3])] } else { Vec::new() },
        bottleneck: (flag == Flag::Bottleneck).then_some(3),
        placement: (flag == Flag::Placement).then(|| "houlsby".into()),
        dropout: (flag == Flag::Dropout).then_some(0.25),
        init: None,
    };
    for &name in METHOD_NAMES {
        let method = MethodConfig::from_name(name).unwrap();
        assert_eq!(method.name(), name);
        let json = serde_json::to_value(&method).unwrap();
        assert_eq!(json["method"], name);
        for flag in Flag::ALL {
            let flags = one(flag);
            match method.flags().iter().find(|taken| taken.flag == flag) {
                // A flag the method takes sets the field it names.
                Some(taken) => {
                    assert!(!taken.meaning.is_empty() && json.get(taken.field).is_some(), "{name} {flag:?}");
                    let set = serde_json::to_value(MethodConfig::from_flags(name, &flags).unwrap()).unwrap();
                    assert_eq!(set[taken.field], flags.value(flag).unwrap(), "{name} {flag:?}");
                }
                // Another is refused, naming the ones it takes.
                None => {
                    let err = MethodConfig::from_flags(name, &flags).unwrap_err().to_string();
                    assert!(err.starts_with(&format!("{} does not apply to {name}; it takes ", flag.cli())), "{err}");
                }
            }
        }
        // `--init paper` sets `init` where the method has it, and is refused where it has not.
        let paper = MethodConfig::from_flags(name, &MethodFlags { init: Some(DeltaInit::Paper), ..Default::default() });
        match json.get("init") {
            Some(_) => assert_eq!(serde_json::to_value(paper.unwrap()).unwrap()["init"], "Paper"),
            None => assert!(paper.unwrap_err().to_string().contains("--init paper does not apply")),
        }
    }
    let unknown = MethodConfig::from_name("dora").unwrap_err().to_string();
    assert!(unknown.contains("dora") && unknown.contains(&METHOD_NAMES.join(", ")), "{unknown}");
    let err = serde_json::from_str::<MethodConfig>(r#"{"method": "dora", "rank": 8}"#).unwrap_err().to_string();
    assert!(err.contains("unknown method `dora`"), "{err}");
    let err = serde_json::from_str::<MethodConfig>(r#"{"rank": 8}"#).unwrap_err().to_string();
    assert!(err.contains("method"), "{err}");
    let zero = MethodConfig::from_flags("lora", &MethodFlags { rank: Some(0), ..Default::default() });
    assert!(zero.unwrap_err().to_string().contains("at least 1"));
}
