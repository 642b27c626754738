//! Method-agnostic configuration, parameter accounting and construction: given where adapters go
//! (the [`LinearSite`]s and [`ResidualSite`]s a model reports), count parameters without allocating
//! anything, or build every adapter with its shared factors.

use crate::adapter::{LinearAdapter, ResidualAdapter, SharedFactors};
use crate::error::{AdapterError, Result};
use crate::lora::LoraConfig;
use crate::loretta_adp::LorettaAdpConfig;
use crate::loretta_rep::LorettaRepConfig;
use crate::lorta::{AttentionGeometry, AttentionMatrix, LortaConfig};
use crate::lotr::LotrConfig;
use crate::tt_lora::TtLoraConfig;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

/// A linear projection that can carry a [`LinearAdapter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSite {
    /// Full module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub name: String,
    /// Transformer layer index.
    pub layer: usize,
    /// Row of the projection in its model family's layout table (what the model code uses to
    /// find the slot; `name` is for display and file names).
    pub projection: usize,
    /// The attention role, for methods that index by it (LoRTA); `None` for MLP projections.
    pub role: Option<AttentionMatrix>,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
}

/// A position where a [`ResidualAdapter`] is inserted (after a block's attention or feed-forward).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidualSite {
    /// Path of the adapter, e.g. `model.layers.3.attention_adapter`.
    pub name: String,
    /// Transformer layer index.
    pub layer: usize,
    /// Where in the block the adapter sits.
    pub position: ResidualPosition,
    /// Hidden size at that position.
    pub hidden: usize,
}

/// Where a residual adapter sits in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResidualPosition {
    /// After the attention output projection.
    Attention,
    /// After the feed-forward output projection.
    FeedForward,
}

/// One row of a parameter report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamRow {
    /// Module path (or `shared: …` for shared factors).
    pub module: String,
    /// Shape of what is adapted, e.g. `4096x4096`.
    pub shape: String,
    /// Trainable parameters attributed to this row.
    pub params: usize,
}

/// Trainable parameters per module; shared factors appear once, in their own rows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParamReport {
    /// Rows in model order, shared factors last.
    pub rows: Vec<ParamRow>,
}

impl ParamReport {
    /// Sum over all rows.
    pub fn total(&self) -> usize {
        self.rows.iter().map(|r| r.params).sum()
    }
}

/// Any adapter method with its hyper-parameters (serialised with a `"method"` tag).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum MethodConfig {
    /// LoRA.
    Lora(LoraConfig),
    /// TT-LoRA.
    TtLora(TtLoraConfig),
    /// LoRETTA_rep.
    LorettaRep(LorettaRepConfig),
    /// LoRETTA_adp.
    LorettaAdp(LorettaAdpConfig),
    /// LoTR.
    Lotr(LotrConfig),
    /// LoRTA.
    Lorta(LortaConfig),
}

/// Every adapter of a model, ready to be placed by the model code.
#[derive(Debug)]
pub struct AdapterSet<B: Backend> {
    /// Factors shared across sites (held once, at model level).
    pub shared: SharedFactors<B>,
    /// One adapter per linear site, in site order.
    pub linear: Vec<(LinearSite, LinearAdapter<B>)>,
    /// One adapter per residual site, in site order.
    pub residual: Vec<(ResidualSite, ResidualAdapter<B>)>,
}

/// Method names accepted by [`MethodConfig::from_name`].
pub const METHOD_NAMES: [&str; 6] = ["lora", "tt-lora", "loretta-rep", "loretta-adp", "lotr", "lorta"];

impl MethodConfig {
    /// The default configuration of a method by CLI name.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "lora" => MethodConfig::Lora(LoraConfig::new()),
            "tt-lora" => MethodConfig::TtLora(TtLoraConfig::new()),
            "loretta-rep" => MethodConfig::LorettaRep(LorettaRepConfig::new()),
            "loretta-adp" => MethodConfig::LorettaAdp(LorettaAdpConfig::new()),
            "lotr" => MethodConfig::Lotr(LotrConfig::new()),
            "lorta" => MethodConfig::Lorta(LortaConfig::new()),
            other => {
                return Err(crate::error::invalid(
                    "method",
                    other,
                    format!("expected one of {}", METHOD_NAMES.join(", ")),
                ));
            }
        })
    }

    /// CLI name of the method.
    pub fn name(&self) -> &'static str {
        match self {
            MethodConfig::Lora(_) => "lora",
            MethodConfig::TtLora(_) => "tt-lora",
            MethodConfig::LorettaRep(_) => "loretta-rep",
            MethodConfig::LorettaAdp(_) => "loretta-adp",
            MethodConfig::Lotr(_) => "lotr",
            MethodConfig::Lorta(_) => "lorta",
        }
    }

    /// Attention projections adapted when no targets are given: q, v (q, k, v, o for LoRTA; none
    /// for LoRETTA_adp, which goes after every block's attention and feed-forward output).
    pub fn default_roles(&self) -> &'static [AttentionMatrix] {
        use AttentionMatrix::*;
        match self {
            MethodConfig::Lorta(_) => &[Query, Key, Value, Output],
            MethodConfig::LorettaAdp(_) => &[],
            _ => &[Query, Value],
        }
    }

    /// Whether the method inserts residual (block-output) adapters instead of linear updates.
    pub fn is_residual(&self) -> bool {
        matches!(self, MethodConfig::LorettaAdp(_))
    }

    fn check_sites(&self, linear: &[LinearSite], residual: &[ResidualSite]) -> Result<()> {
        let nothing = if self.is_residual() { residual.is_empty() } else { linear.is_empty() };
        if nothing {
            return Err(AdapterError::Unsupported {
                method: self.name(),
                target: "the model".into(),
                reason: "no module matched the targets".into(),
            });
        }
        if let MethodConfig::Lorta(_) = self
            && let Some(site) = linear.iter().find(|s| s.role.is_none())
        {
            return Err(AdapterError::Unsupported {
                method: "lorta",
                target: site.name.clone(),
                reason: "LoRTA adapts only attention projections (q, k, v, o)".into(),
            });
        }
        Ok(())
    }

    /// Groups linear sites into LoTR families: equally shaped matrices share one pair of factors.
    fn lotr_families(linear: &[LinearSite]) -> Vec<(usize, usize)> {
        let mut families: Vec<(usize, usize)> = Vec::new();
        for s in linear {
            if !families.contains(&(s.d_in, s.d_out)) {
                families.push((s.d_in, s.d_out));
            }
        }
        families
    }

    /// Counts trainable parameters, per module and for shared factors, without allocating tensors.
    pub fn count(
        &self,
        geometry: &AttentionGeometry,
        linear: &[LinearSite],
        residual: &[ResidualSite],
    ) -> Result<ParamReport> {
        self.check_sites(linear, residual)?;
        let row = |s: &LinearSite, params: usize| ParamRow {
            module: s.name.clone(),
            shape: format!("{}x{}", s.d_in, s.d_out),
            params,
        };
        let named = |site: &LinearSite, e: AdapterError| AdapterError::Unsupported {
            method: self.name(),
            target: site.name.clone(),
            reason: e.to_string(),
        };
        let mut rows = Vec::new();
        match self {
            MethodConfig::Lora(c) => {
                c.validate()?;
                rows.extend(linear.iter().map(|s| row(s, c.num_params(s.d_in, s.d_out))));
            }
            MethodConfig::TtLora(c) => {
                for s in linear {
                    rows.push(row(s, c.num_params(s.d_in, s.d_out).map_err(|e| named(s, e))?));
                }
            }
            MethodConfig::LorettaRep(c) => {
                for s in linear {
                    rows.push(row(s, c.num_params(s.d_in, s.d_out).map_err(|e| named(s, e))?));
                }
            }
            MethodConfig::LorettaAdp(c) => {
                for s in residual {
                    let params = c.num_params(s.hidden).map_err(|e| AdapterError::Unsupported {
                        method: "loretta-adp",
                        target: s.name.clone(),
                        reason: e.to_string(),
                    })?;
                    rows.push(ParamRow { module: s.name.clone(), shape: format!("{}", s.hidden), params });
                }
            }
            MethodConfig::Lotr(c) => {
                c.validate()?;
                rows.extend(linear.iter().map(|s| row(s, c.num_params())));
                for (i, (d_in, d_out)) in Self::lotr_families(linear).into_iter().enumerate() {
                    rows.push(ParamRow {
                        module: format!("shared: lotr family {i} (A, B)"),
                        shape: format!("{d_in}x{d_out}"),
                        params: c.shared_num_params(d_in, d_out),
                    });
                }
            }
            MethodConfig::Lorta(c) => {
                for s in linear {
                    let role = s.role.expect("checked above");
                    if geometry.matrix_dims(role) != (s.d_in, s.d_out) {
                        return Err(named(
                            s,
                            AdapterError::State(format!(
                                "expected {:?} for {role:?} from the attention geometry",
                                geometry.matrix_dims(role)
                            )),
                        ));
                    }
                    rows.push(row(s, 0));
                }
                rows.push(ParamRow {
                    module: "shared: lorta CP factors (A, B, C_L, C_H, C_M)".into(),
                    shape: format!("L={} H={} d={}", geometry.n_layers, geometry.n_heads, geometry.d_model),
                    params: c.num_params(geometry)?,
                });
            }
        }
        Ok(ParamReport { rows })
    }

    /// Builds every adapter (and the shared factors) for the given sites.
    pub fn build<B: Backend>(
        &self,
        geometry: &AttentionGeometry,
        linear: &[LinearSite],
        residual: &[ResidualSite],
        device: &B::Device,
    ) -> Result<AdapterSet<B>> {
        // Counting validates every shape and names the failing module before anything is allocated.
        self.count(geometry, linear, residual)?;
        let mut shared = SharedFactors::empty();
        let mut linear_out = Vec::new();
        let mut residual_out = Vec::new();
        match self {
            MethodConfig::LorettaAdp(c) => {
                for s in residual {
                    residual_out.push((s.clone(), ResidualAdapter::LorettaAdp(c.init(s.hidden, device)?)));
                }
            }
            MethodConfig::Lotr(c) => {
                let families = Self::lotr_families(linear);
                for &(d_in, d_out) in &families {
                    shared.lotr.push(c.init_shared(d_in, d_out, device)?);
                }
                for s in linear {
                    let family = families.iter().position(|f| *f == (s.d_in, s.d_out)).expect("grouped above");
                    linear_out.push((s.clone(), LinearAdapter::Lotr(c.init(family, &shared, device)?)));
                }
            }
            MethodConfig::Lorta(c) => {
                shared.lorta = Some(c.init_shared(geometry, device)?);
                for s in linear {
                    let role = s.role.expect("checked by count");
                    linear_out.push((s.clone(), LinearAdapter::Lorta(c.init(s.layer, role, geometry)?)));
                }
            }
            MethodConfig::Lora(c) => {
                for s in linear {
                    linear_out.push((s.clone(), LinearAdapter::Lora(c.init(s.d_in, s.d_out, device)?)));
                }
            }
            MethodConfig::TtLora(c) => {
                for s in linear {
                    linear_out.push((s.clone(), LinearAdapter::TtLora(c.init(s.d_in, s.d_out, device)?)));
                }
            }
            MethodConfig::LorettaRep(c) => {
                for s in linear {
                    linear_out.push((s.clone(), LinearAdapter::LorettaRep(c.init(s.d_in, s.d_out, device)?)));
                }
            }
        }
        Ok(AdapterSet { shared, linear: linear_out, residual: residual_out })
    }
}
