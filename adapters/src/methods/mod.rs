//! The adapter methods, one folder each (its configuration implementing [`Method`]
//! in `mod.rs`, its layers in `layer.rs`), and the registry: one line per method.
//!
//! Adding a method: write `methods/<method>/`, add `pub mod <method>;` and its line below.

pub mod lora;
pub mod loretta_adp;
pub mod loretta_rep;
pub mod lorta;
pub mod lotr;
#[cfg(feature = "toy-method")]
pub mod toy;
pub mod tt_lora;

pub use lora::{Lora, LoraConfig};
pub use loretta_adp::{LorettaAdp, LorettaAdpConfig};
pub use loretta_rep::{LorettaRep, LorettaRepConfig};
pub use lorta::{Lorta, LortaConfig, LortaShared};
pub use lotr::{Lotr, LotrConfig, LotrShared};
#[cfg(feature = "toy-method")]
pub use toy::{Toy, ToyConfig};
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
    #[cfg(feature = "toy-method")]
    linear Toy(ToyConfig);
}

impl MethodConfig {
    /// The default configuration of the method called `name` with the hyper-parameters `flags`
    /// gives (each sets the field its [`FlagField`](crate::FlagField) names); refuses a flag that
    /// does not apply to the method, naming the ones that do.
    pub fn from_flags(name: &str, flags: &crate::MethodFlags) -> crate::Result<Self> {
        let method = Self::from_name(name)?;
        let accepted = method.flags();
        let refused = |f: &crate::Flag| flags.value(*f).is_some() && !accepted.iter().any(|a| a.flag == *f);
        if let Some(flag) = crate::Flag::ALL.into_iter().find(refused) {
            let takes: Vec<&str> = accepted.iter().map(|a| a.flag.cli()).collect();
            let (flag, method, takes) = (flag.cli(), method.name(), takes.join(", "));
            return Err(crate::AdapterError::NotApplicable { flag, method, takes });
        }
        for (field, value) in
            [("rank", flags.rank), ("tensor_rank", flags.tensor_rank), ("bottleneck", flags.bottleneck)]
        {
            crate::error::require_positive(field, value.unwrap_or(1))?;
        }
        let mut fields = serde_json::to_value(&method).expect("a configuration serialises");
        for a in accepted {
            if let Some(value) = flags.value(a.flag) {
                fields[a.field] = value;
            }
        }
        match flags.init {
            Some(init) if fields.get("init").is_some() => {
                fields["init"] = serde_json::to_value(init).expect("serialises")
            }
            Some(crate::DeltaInit::Paper) => {
                let takes = "--init zero: its only initialisation is the zero one".into();
                return Err(crate::AdapterError::NotApplicable { flag: "--init paper", method: method.name(), takes });
            }
            _ => {}
        }
        serde_json::from_value(fields).map_err(|e| crate::error::invalid("method flags", name, e.to_string()))
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
