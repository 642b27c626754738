//! The adapter methods, one folder each (its configuration implementing [`Method`](crate::Method)
//! in `mod.rs`, its layers in `layer.rs`), and the registry: one line per method.
//!
//! Adding a method: write `methods/<method>/`, add `pub mod <method>;` and its line below.

pub mod lora;
pub mod loretta_adp;
pub mod loretta_rep;
pub mod lorta;
pub mod lotr;
pub mod tt_lora;

pub use lora::{Lora, LoraConfig};
pub use loretta_adp::{LorettaAdp, LorettaAdpConfig};
pub use loretta_rep::{LorettaRep, LorettaRepConfig};
pub use lorta::{Lorta, LortaConfig, LortaShared};
pub use lotr::{Lotr, LotrConfig, LotrShared};
pub use tt_lora::{TtLora, TtLoraConfig};

use crate::method::Method;
use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

crate::registry::registry! {
    linear Lora(LoraConfig);
    linear TtLora(TtLoraConfig);
    linear LorettaRep(LorettaRepConfig);
    residual LorettaAdp(LorettaAdpConfig);
    linear Lotr(LotrConfig) shared lotr: Vec<LotrShared<B>>;
    linear Lorta(LortaConfig) shared lorta: Option<LortaShared<B>>;
}

impl MethodConfig {
    /// The default configuration of the method called `name` with the hyper-parameters `flags`
    /// gives; refuses a flag that does not apply to the method, naming the ones that do.
    pub fn from_flags(name: &str, flags: &crate::MethodFlags) -> crate::Result<Self> {
        let mut method = Self::from_name(name)?;
        let accepted = method.flags();
        if let Some(flag) =
            crate::Flag::ALL.into_iter().find(|f| flags.given(*f) && !accepted.iter().any(|(a, _)| a == f))
        {
            let takes: Vec<&str> = accepted.iter().map(|(f, _)| f.cli()).collect();
            return Err(crate::AdapterError::NotApplicable {
                flag: flag.cli(),
                method: method.name(),
                takes: takes.join(", "),
            });
        }
        for (field, value) in
            [("rank", flags.rank), ("tensor_rank", flags.tensor_rank), ("bottleneck", flags.bottleneck)]
        {
            crate::error::require_positive(field, value.unwrap_or(1))?;
        }
        method.apply_flags_unchecked(flags);
        if let Some(init) = flags.init {
            method.set_init(init)?;
        }
        Ok(method)
    }

    /// Counts trainable parameters, per module and for shared factors, without allocating tensors.
    pub fn count(
        &self,
        geometry: &crate::AttentionGeometry,
        linear: &[crate::LinearSite],
        residual: &[crate::ResidualSite],
    ) -> crate::Result<crate::ParamReport> {
        let nothing = if self.is_residual() { residual.is_empty() } else { linear.is_empty() };
        if nothing {
            return Err(crate::AdapterError::Unsupported {
                method: self.name(),
                target: "the model".into(),
                reason: "no module matched the targets".into(),
            });
        }
        self.count_checked(&crate::Sites { geometry, linear, residual })
    }

    /// Builds every adapter (and the shared factors) for the given sites.
    pub fn build<B: Backend>(
        &self,
        geometry: &crate::AttentionGeometry,
        linear: &[crate::LinearSite],
        residual: &[crate::ResidualSite],
        device: &B::Device,
    ) -> crate::Result<crate::AdapterSet<B>> {
        // Counting validates every shape and names the failing module before anything is allocated.
        self.count(geometry, linear, residual)?;
        self.build_checked(&crate::Sites { geometry, linear, residual }, device)
    }
}
