//! A toy method that exists to prove the registry: added with this folder and one registry line
//! alone (behind the `toy-method` feature, which only the test-suites enable), it counts, builds,
//! trains, saves and reloads through the same code as every real method.
//!
//! `Δ(x) = s · x·u·v` with `u: [d_in, 1]` uniform and `v: [1, d_out] = 0`: a rank-one LoRA.

mod layer;

pub use layer::Toy;

use crate::error::require_finite;
use crate::method::{AdapterSet, Flag, FlagField, Method, ParamReport, Sites, sets};
use crate::methods::LinearAdapter;
use burn::config::Config;
use burn::module::Param;
use burn::tensor::{Distribution, Tensor, backend::Backend};

/// Hyper-parameters of the toy method.
#[derive(Config, Debug)]
pub struct ToyConfig {
    /// Output scale `s`.
    #[config(default = 1.0)]
    pub scale: f64,
}

impl Method for ToyConfig {
    const NAME: &'static str = "toy";
    const FLAGS: &'static [FlagField] = &[sets(Flag::Alpha, "scale", "output scale s")];

    fn has_zero_init_factor(&self) -> bool {
        true
    }

    fn count(&self, sites: &Sites) -> crate::Result<ParamReport> {
        require_finite("scale", self.scale)?;
        ParamReport::per_linear_site(Self::NAME, sites.linear, |s| Ok(s.d_in + s.d_out))
    }

    fn build<B: Backend>(&self, sites: &Sites, device: &B::Device) -> crate::Result<AdapterSet<B>> {
        AdapterSet::per_linear_site(sites.linear, |s| {
            let bound = 1.0 / (s.d_in as f64).sqrt();
            Ok(LinearAdapter::Toy(Toy {
                u: Param::from_tensor(tensor_peft_kernels::rng::random(
                    [s.d_in, 1],
                    Distribution::Uniform(-bound, bound),
                    device,
                )),
                v: Param::from_tensor(Tensor::zeros([1, s.d_out], device)),
                scale: self.scale,
            }))
        })
    }
}
