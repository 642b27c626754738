//! Tensor trains: a list of cores `G_k: [r_{k-1}, n_k, r_k]` with `r_0 = r_d = 1` representing the
//! tensor `T[i_1, …, i_d] = G_1[i_1] · … · G_d[i_d]`.
//!
//! Matrices are the row-major reshape of `T` (rows from the leading modes). Contractions go
//! left to right or right to left by plain `reshape` + `matmul`, so every backend runs them.

use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor, backend::Backend};

/// Uniform TT ranks `[1, r, …, r, 1]` for `n_cores` cores.
pub fn uniform_ranks(n_cores: usize, rank: usize) -> Vec<usize> {
    (0..=n_cores)
        .map(|k| if k == 0 || k == n_cores { 1 } else { rank })
        .collect()
}

/// Number of parameters `Σ r_{k-1}·n_k·r_k` of a uniform-rank TT over `shape`.
///
/// `tt_num_params(&[12, 8, 8, 3, 8, 8, 12], 5) == 995` (the TT-LoRA paper prints 1,135 for this
/// configuration, which no uniform-rank train of that shape gives).
pub fn tt_num_params(shape: &[usize], rank: usize) -> usize {
    let ranks = uniform_ranks(shape.len(), rank);
    shape
        .iter()
        .enumerate()
        .map(|(k, &n)| ranks[k] * n * ranks[k + 1])
        .sum()
}

/// Contracts cores left to right: `[r_0·n_1·…·n_k, r_k]` (rows row-major over `(r_0, n_1, …, n_k)`).
pub fn contract_left<B: Backend>(cores: &[Tensor<B, 3>]) -> Tensor<B, 2> {
    let [r0, n0, r1] = cores[0].dims();
    let mut acc = cores[0].clone().reshape([r0 * n0, r1]);
    for core in &cores[1..] {
        let [r, n, r_next] = core.dims();
        let rows = acc.dims()[0];
        acc = acc
            .matmul(core.clone().reshape([r, n * r_next]))
            .reshape([rows * n, r_next]);
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
        acc = core
            .clone()
            .reshape([r_prev * n, r])
            .matmul(acc)
            .reshape([r_prev, n * cols]);
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
    pub fn new(
        shape: &[usize],
        rank: usize,
        init: CoreInit,
        zero_last: bool,
        device: &B::Device,
    ) -> Self {
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
                            Tensor::random(dims, Distribution::Normal(0.0, std), device)
                        }
                        CoreInit::UnitFrobenius => {
                            let core: Tensor<B, 3> =
                                Tensor::random(dims, Distribution::Uniform(-1.0, 1.0), device);
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
