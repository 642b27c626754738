//! The TT-LoRA layer: its contraction paths and adapter-file names.

use crate::adapter::{LinearDelta, LowRankUpdate};
use crate::method::{AdapterLayer, FileTensor};
use crate::methods::SharedFactors;
use crate::tensor::low_rank_apply;
use crate::tensor::tt::{TensorTrain, TtPath, apply_core_by_core, plan_tt_path};
use burn::module::{Module, ParamId};
use burn::tensor::{Tensor, backend::Backend};

/// A TT-LoRA update for one linear layer.
#[derive(Module, Debug)]
pub struct TtLora<B: Backend> {
    /// The cores of ΔW, row-major `[d_in, d_out]` over the modes: `input_factors ++
    /// reversed(output_factors)`, or any shape whose product is `d_in·d_out`.
    pub tt: TensorTrain<B>,
    /// Number of input cores (the cut with rank ≤ r), when some leading modes multiply to `d_in`;
    /// `None` when the input/output boundary falls inside a mode (then ΔW is reconstructed).
    pub split: Option<usize>,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Output multiplier `α`.
    pub alpha: f64,
}

impl<B: Backend> TtLora<B> {
    /// The two half-trains `(A: [d_in, r], α·B: [r, d_out])` with `ΔW = A·(α·B)`: `α` goes on the
    /// small right half-train, not on the layer's output. Without an input/output cut, `(α·ΔW, I)`.
    pub fn scaled_half_trains(&self) -> (Tensor<B, 2>, Tensor<B, 2>) {
        match self.split {
            Some(split) => (self.tt.left(split), self.tt.right(split).mul_scalar(self.alpha)),
            None => (self.scaled_delta_weight(), Tensor::eye(self.d_out, &self.tt.cores[0].device())),
        }
    }

    /// `α·ΔW: [d_in, d_out]`, reconstructed from the whole train.
    pub fn scaled_delta_weight(&self) -> Tensor<B, 2> {
        self.tt.to_matrix(self.d_in, self.d_out).mul_scalar(self.alpha)
    }
}

impl<B: Backend> TtLora<B> {
    /// TT rank of the inner bonds.
    pub fn rank(&self) -> usize {
        self.tt.cores.first().map_or(1, |c| c.dims()[2])
    }

    /// The update along an explicit contraction path (the planner picks the cheaper one in
    /// [`LinearDelta::delta`]).
    pub fn delta_with<const D: usize>(&self, x: Tensor<B, D>, path: TtPath) -> Tensor<B, D> {
        let Some(split) = self.split else {
            return burn::tensor::module::linear(x, self.scaled_delta_weight(), None);
        };
        match path {
            TtPath::HalfTrains => {
                let (a, b) = self.scaled_half_trains();
                low_rank_apply(x, a, b)
            }
            TtPath::CoreByCore => {
                let mut dims = x.dims();
                let (d_in, d_out) = self.dims();
                let x2 = x.reshape([dims[..D - 1].iter().product(), d_in]);
                dims[D - 1] = d_out;
                apply_core_by_core(x2, &self.tt.core_values(), split).reshape(dims).mul_scalar(self.alpha)
            }
        }
    }
}

impl<B: Backend> LinearDelta<B> for TtLora<B> {
    fn dims(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    /// Along the cheaper contraction path for this many rows ([`plan_tt_path`]); without an
    /// input/output cut, `x·ΔW` from the reconstructed ΔW.
    fn delta<const D: usize>(&self, x: Tensor<B, D>, _shared: &SharedFactors<B>) -> Tensor<B, D> {
        let tokens = x.dims()[..D - 1].iter().product();
        let path = self.split.map_or(TtPath::HalfTrains, |s| plan_tt_path(&self.tt.shape(), s, self.rank(), tokens));
        self.delta_with(x, path)
    }

    /// The half-trains; without an input/output cut `(α·ΔW, I)`, which the overrides below never
    /// multiply out.
    fn low_rank_factors(&self, _shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        self.scaled_half_trains()
    }

    fn low_rank_update(&self, tokens: usize, _shared: &SharedFactors<B>) -> Option<LowRankUpdate<B>> {
        let path = plan_tt_path(&self.tt.shape(), self.split?, self.rank(), tokens);
        (path == TtPath::HalfTrains).then(|| LowRankUpdate::plain(self.scaled_half_trains()))
    }

    fn delta_weight(&self, _shared: &SharedFactors<B>) -> Tensor<B, 2> {
        match self.split {
            Some(_) => {
                let (a, b) = self.scaled_half_trains();
                a.matmul(b)
            }
            None => self.scaled_delta_weight(),
        }
    }

    fn delta_frobenius_sq(&self, shared: &SharedFactors<B>) -> Tensor<B, 1> {
        match self.split {
            Some(_) => {
                let (a, b) = self.scaled_half_trains();
                crate::tensor::low_rank_frobenius_sq(a, b)
            }
            None => self.delta_weight(shared).powf_scalar(2.0).sum(),
        }
    }
}

impl<B: Backend> AdapterLayer<B> for TtLora<B> {
    fn file_tensors(&mut self) -> Vec<FileTensor<'_, B>> {
        FileTensor::train("TtLora.tt", &mut self.tt)
    }

    /// The last core (zero under [`DeltaInit::Zero`](crate::DeltaInit::Zero), the only
    /// initialisation LoRA+ is accepted with).
    fn zero_init_factors(&self) -> Vec<ParamId> {
        self.tt.cores.last().map(|c| c.id).into_iter().collect()
    }
}
