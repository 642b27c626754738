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
    /// The cores of ΔW over `input_factors ++ reversed(output_factors)`.
    pub tt: TensorTrain<B>,
    /// Number of input cores (the cut with rank ≤ r).
    pub split: usize,
    /// Output multiplier `α`.
    pub alpha: f64,
}

impl<B: Backend> TtLora<B> {
    /// The two half-trains `(A: [d_in, r], α·B: [r, d_out])` with `ΔW = A·(α·B)`: `α` goes on the
    /// small right half-train, not on the layer's output.
    pub fn scaled_half_trains(&self) -> (Tensor<B, 2>, Tensor<B, 2>) {
        (self.tt.left(self.split), self.tt.right(self.split).mul_scalar(self.alpha))
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
                apply_core_by_core(x2, &self.tt.core_values(), self.split).reshape(dims).mul_scalar(self.alpha)
            }
        }
    }
}

impl<B: Backend> LinearDelta<B> for TtLora<B> {
    fn dims(&self) -> (usize, usize) {
        let shape = self.tt.shape();
        (shape[..self.split].iter().product(), shape[self.split..].iter().product())
    }

    /// Along the cheaper contraction path for this many rows ([`plan_tt_path`]).
    fn delta<const D: usize>(&self, x: Tensor<B, D>, _shared: &SharedFactors<B>) -> Tensor<B, D> {
        let tokens = x.dims()[..D - 1].iter().product();
        self.delta_with(x, plan_tt_path(&self.tt.shape(), self.split, self.rank(), tokens))
    }

    fn low_rank_factors(&self, _shared: &SharedFactors<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        self.scaled_half_trains()
    }

    fn low_rank_update(&self, tokens: usize, _shared: &SharedFactors<B>) -> Option<LowRankUpdate<B>> {
        let path = plan_tt_path(&self.tt.shape(), self.split, self.rank(), tokens);
        (path == TtPath::HalfTrains).then(|| LowRankUpdate::plain(self.scaled_half_trains()))
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
