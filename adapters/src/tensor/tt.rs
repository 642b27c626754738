//! Tensor trains: a list of cores `G_k: [r_{k-1}, n_k, r_k]` with `r_0 = r_d = 1` representing the
//! tensor `T[i_1, …, i_d] = G_1[i_1] · … · G_d[i_d]`.
//!
//! Matrices are the row-major reshape of `T` (rows from the leading modes). Contractions go
//! left to right or right to left by plain `reshape` + `matmul`, so every backend runs them.

use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor, backend::Backend};

/// Uniform TT ranks `[1, r, …, r, 1]` for `n_cores` cores.
pub fn uniform_ranks(n_cores: usize, rank: usize) -> Vec<usize> {
    (0..=n_cores).map(|k| if k == 0 || k == n_cores { 1 } else { rank }).collect()
}

/// Number of parameters `Σ r_{k-1}·n_k·r_k` of a uniform-rank TT over `shape`.
///
/// `tt_num_params(&[12, 8, 8, 3, 8, 8, 12], 5) == 995` (the TT-LoRA paper prints 1,135 for this
/// configuration, which no uniform-rank train of that shape gives).
pub fn tt_num_params(shape: &[usize], rank: usize) -> usize {
    let ranks = uniform_ranks(shape.len(), rank);
    shape.iter().enumerate().map(|(k, &n)| ranks[k] * n * ranks[k + 1]).sum()
}

/// Contracts cores left to right: `[r_0·n_1·…·n_k, r_k]` (rows row-major over `(r_0, n_1, …, n_k)`).
pub fn contract_left<B: Backend>(cores: &[Tensor<B, 3>]) -> Tensor<B, 2> {
    let [r0, n0, r1] = cores[0].dims();
    let mut acc = cores[0].clone().reshape([r0 * n0, r1]);
    for core in &cores[1..] {
        let [r, n, r_next] = core.dims();
        let rows = acc.dims()[0];
        acc = acc.matmul(core.clone().reshape([r, n * r_next])).reshape([rows * n, r_next]);
    }
    acc
}

/// Contracts cores right to left: `[r_{k-1}, n_k·…·n_d·r_d]` (columns row-major over `(n_k, …, n_d, r_d)`).
pub fn contract_right<B: Backend>(cores: &[Tensor<B, 3>]) -> Tensor<B, 2> {
    let last = cores.last().expect("at least one core");
    let [r, n, r_next] = last.dims();
    let mut acc = last.clone().reshape([r, n * r_next]);
    for core in cores[..cores.len() - 1].iter().rev() {
        let [r_prev, n, r] = core.dims();
        let cols = acc.dims()[1];
        acc = core.clone().reshape([r_prev * n, r]).matmul(acc).reshape([r_prev, n * cols]);
    }
    acc
}

/// How TT cores are initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CoreInit {
    /// LoRETTA (`low_rank_tensors.py`): `N(0,1)/√r_k · σ^(1/d)`, so reconstructed entries have std ≈ `σ`.
    Gaussian {
        /// Target standard deviation `σ` of the reconstructed entries.
        target_std: f64,
    },
    /// TT-LoRA (LANL `direct_init`): uniform entries, each core rescaled to unit Frobenius norm.
    UnitFrobenius,
}

/// A tensor train with trainable cores (see the module docs for the layout).
#[derive(Module, Debug)]
pub struct TensorTrain<B: Backend> {
    /// Cores `[r_{k-1}, n_k, r_k]`, boundary ranks 1.
    pub cores: Vec<Param<Tensor<B, 3>>>,
}

impl<B: Backend> TensorTrain<B> {
    /// A uniform-rank train over `shape` initialised by `init`; with `zero_last` the last core is
    /// zero, so the represented tensor is exactly zero while every other core stays random
    /// (the TT analogue of LoRA's `B = 0`: the last core receives gradient at the first step).
    pub fn new(shape: &[usize], rank: usize, init: CoreInit, zero_last: bool, device: &B::Device) -> Self {
        let ranks = uniform_ranks(shape.len(), rank);
        let order = shape.len() as f64;
        let cores = shape
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let dims = [ranks[k], n, ranks[k + 1]];
                let core = if zero_last && k + 1 == shape.len() {
                    Tensor::zeros(dims, device)
                } else {
                    match init {
                        CoreInit::Gaussian { target_std } => {
                            let std = target_std.powf(1.0 / order) / (ranks[k + 1] as f64).sqrt();
                            tensor_peft_kernels::rng::random(dims, Distribution::Normal(0.0, std), device)
                        }
                        CoreInit::UnitFrobenius => {
                            let core: Tensor<B, 3> =
                                tensor_peft_kernels::rng::random(dims, Distribution::Uniform(-1.0, 1.0), device);
                            let norm = (core.clone() * core.clone()).sum().sqrt();
                            core / norm.unsqueeze::<3>()
                        }
                    }
                };
                Param::from_tensor(core)
            })
            .collect();
        Self { cores }
    }

    /// Mode sizes `n_k`.
    pub fn shape(&self) -> Vec<usize> {
        self.cores.iter().map(|c| c.dims()[1]).collect()
    }

    /// Current core values.
    pub fn core_values(&self) -> Vec<Tensor<B, 3>> {
        self.cores.iter().map(|c| c.val()).collect()
    }

    /// Left half-train over the first `split` cores: `[n_1·…·n_split, r_split]`.
    pub fn left(&self, split: usize) -> Tensor<B, 2> {
        contract_left(&self.core_values()[..split])
    }

    /// Right half-train over the cores from `split` on: `[r_split, n_{split+1}·…·n_d]`.
    pub fn right(&self, split: usize) -> Tensor<B, 2> {
        contract_right(&self.core_values()[split..])
    }

    /// The whole tensor as a row-major `[rows, cols]` matrix (`rows·cols = Π n_k`; the boundary may
    /// cut through a mode).
    pub fn to_matrix(&self, rows: usize, cols: usize) -> Tensor<B, 2> {
        contract_left(&self.core_values()).reshape([rows, cols])
    }
}

/// Applies a split train (the first `split` cores over the input modes, the rest over the output
/// modes) to `x: [N, d_in]` core by core, never forming the half-trains: LANL's contraction path.
/// Returns `x · reshape(T, [d_in, d_out])`.
pub fn apply_core_by_core<B: Backend>(x: Tensor<B, 2>, cores: &[Tensor<B, 3>], split: usize) -> Tensor<B, 2> {
    let [n, d_in] = x.dims();
    // State [N, rest, r]: the leading mode of `rest` is contracted next.
    let mut rest = d_in;
    let mut state = x.reshape([n, d_in, 1]);
    for core in &cores[..split] {
        let [r0, m, r1] = core.dims();
        rest /= m;
        let lhs = state.reshape([n, m, rest, r0]).swap_dims(1, 2).reshape([n * rest, m * r0]);
        let rhs = core.clone().swap_dims(0, 1).reshape([m * r0, r1]);
        state = lhs.matmul(rhs).reshape([n, rest, r1]);
    }
    // State [N·out_prefix, r]: each output core appends its mode as the least significant index.
    let mut out = 1;
    let mut state = state.reshape([n, cores[split - 1].dims()[2]]);
    for core in &cores[split..] {
        let [r0, m, r1] = core.dims();
        state = state.matmul(core.clone().reshape([r0, m * r1]));
        out *= m;
        state = state.reshape([n * out, r1]);
    }
    state.reshape([n, out])
}

/// How a split train is applied to `N` input rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtPath {
    /// Build `left: [d_in, r]` and `right: [r, d_out]`, then two thin GEMMs (LoRA-like).
    HalfTrains,
    /// Contract the input with one core at a time ([`apply_core_by_core`]).
    CoreByCore,
}

/// Element moves of the core-by-core path are charged as this many multiply-accumulates: each input
/// step permutes the whole state, which costs far more than its flops on every backend we measured
/// (`tpeft bench --suite contraction`).
pub const PERMUTE_COST: usize = 16;

/// The fixed cost of one tensor op (dispatch, output allocation), charged as this many
/// multiply-accumulates. It decides single-row calls, where both paths take ~20 µs on CPU: with
/// flex and ndarray the half-trains won at one row on 1024-wide trains (`[16,8,8,8,8,16]`,
/// `[32,32,32,32]`) and core by core on `[16; 6]`, which puts the value between 7.7k and 19k
/// (`tpeft bench --suite contraction`).
pub const OP_COST: usize = 12_000;

/// Costs `(half_trains, core_by_core)` of applying a split train of uniform rank `rank` to `tokens`
/// rows, in multiply-accumulates plus [`PERMUTE_COST`] per permuted element and [`OP_COST`] per
/// op: one per half-train contraction and per GEMM for the half-trains, three per input core (two
/// layout copies and a product) and one per output core for core by core (forward pass; backward
/// scales both alike).
pub fn tt_apply_costs(shape: &[usize], split: usize, rank: usize, tokens: usize) -> (usize, usize) {
    let ranks = uniform_ranks(shape.len(), rank);
    let (d_in, d_out): (usize, usize) = (shape[..split].iter().product(), shape[split..].iter().product());
    // Half-trains: left grows its rows by n_k per core, right its columns.
    let mut build = 0;
    let mut rows = shape[0];
    for k in 1..split {
        build += rows * ranks[k] * shape[k] * ranks[k + 1];
        rows *= shape[k];
    }
    let mut cols = shape[shape.len() - 1];
    for k in (split..shape.len() - 1).rev() {
        build += ranks[k] * shape[k] * ranks[k + 1] * cols;
        cols *= shape[k];
    }
    let half = build + tokens * ranks[split] * (d_in + d_out) + OP_COST * shape.len();
    // Core by core: input step k touches the remaining input modes, output step j the produced ones.
    let mut core = 0;
    let mut rest = d_in;
    for k in 0..split {
        core += tokens * rest * ranks[k] * ranks[k + 1] + PERMUTE_COST * tokens * rest * ranks[k];
        rest /= shape[k];
    }
    let mut produced = 1;
    for k in split..shape.len() {
        produced *= shape[k];
        core += tokens * produced * ranks[k] * ranks[k + 1];
    }
    core += OP_COST * (3 * split + shape.len() - split);
    (half, core)
}

/// The cheaper path by [`tt_apply_costs`].
pub fn plan_tt_path(shape: &[usize], split: usize, rank: usize, tokens: usize) -> TtPath {
    let (half, core) = tt_apply_costs(shape, split, rank, tokens);
    if core < half { TtPath::CoreByCore } else { TtPath::HalfTrains }
}
