//! TT-LoRA (Anjum et al., 2024): the update ΔW itself is a tensor train, scaled by a plain `α`.
//!
//! Layout: `tt_shape = input_factors ++ reversed(output_factors)`, TT ranks `[1, r, …, r, 1]`;
//! ΔW (Burn layout `[d_in, d_out]`) is the row-major reshape of the train, rows from the input
//! modes. The cut between input and output modes has rank ≤ r, so the forward contracts the two
//! half-trains `A = left: [d_in, r]` and `B = right: [r, d_out]` (cost `r²·(d_in+d_out)`) and applies
//! them as two thin GEMMs, exactly like LoRA; the dense ΔW is never formed during training.
//! For very few rows (e.g. one decoded token) contracting core by core is cheaper; the forward
//! picks the path with [`plan_tt_path`](crate::tensor::tt::plan_tt_path)'s cost formulas.
//!
//! Index order: LANL's reference reads the input index with the input modes reversed
//! (`x.view(m_factors[::-1])`); we read both halves in shape order. The two differ by a fixed
//! permutation of the input features, so parameter counts and expressivity are identical.

mod layer;

pub use layer::TtLora;

use crate::adapter::DeltaInit;
use crate::error::require_rank_and_alpha;
use crate::method::LinearSite;
use crate::method::{AdapterSet, Flag, FlagField, Method, ParamReport, RecommendedTraining, Sites, sets};
use crate::methods::LinearAdapter;
use crate::tensor::shape::{plan_tt_lora_shape, shape_error, validate_flat_shape, validate_split_shape};
use crate::tensor::tt::{CoreInit, TensorTrain, tt_num_params};
use burn::config::Config;
use burn::tensor::backend::Backend;

/// Hyper-parameters of a TT-LoRA adapter.
#[derive(Config, Debug)]
pub struct TtLoraConfig {
    /// TT rank `r` of every inner bond. Default 3: with the planned shape it keeps TT-LoRA under a
    /// tenth of LoRA r=8's parameters even on 384-wide layers, and it tests within a point of LoRA
    /// on the VADER recipe (0.7 below over three seeds). The paper searched 1–16 and reports 4, 5 and 10 as best (5 on LLaMA-2-7B).
    #[config(default = 3)]
    pub rank: usize,
    /// Plain output multiplier `α` (not divided by the rank).
    #[config(default = 8.0)]
    pub alpha: f64,
    /// Explicit `input_factors ++ reversed(output_factors)`; planned from the layer size when `None`.
    pub tt_shape: Option<Vec<usize>>,
    /// Shapes for particular modules, `(name, shape)`: a module whose HF name is `name` or ends
    /// with `.name` takes that shape instead of `tt_shape` (the first entry that matches wins).
    /// Needed where targets differ in size, e.g. q and v of a GQA model. (An `Option`, so that
    /// files written before it existed still read.)
    pub tt_module_shapes: Option<Vec<(String, Vec<usize>)>>,
    /// `Zero` (default): last core zero, ΔW₀ = 0. `Paper`: LANL's `direct_init`, every core uniform
    /// with unit Frobenius norm, ΔW₀ ≠ 0.
    #[config(default = "DeltaInit::Zero")]
    pub init: DeltaInit,
}

impl TtLoraConfig {
    /// The shape used for a `d_in × d_out` layer (explicit or planned), validated (its product must
    /// be `d_in·d_out`); returns it with the number of input cores, `None` when no leading factors
    /// multiply to `d_in` (the paper's `[64,16,9,64]` for 768×768: ΔW is then reconstructed).
    pub fn resolve_shape(&self, d_in: usize, d_out: usize) -> crate::Result<(Vec<usize>, Option<usize>)> {
        let shape = match &self.tt_shape {
            Some(shape) => shape.clone(),
            None => plan_tt_lora_shape(d_in, d_out)?,
        };
        validate_flat_shape(&shape, d_in, d_out)?;
        if shape.len() < 2 {
            // One core is the dense ΔW itself.
            return Err(shape_error(&shape, d_in, d_out, "needs at least two factors"));
        }
        Ok((shape.clone(), validate_split_shape(&shape, d_in, d_out).ok()))
    }

    /// How the update is computed for a `d_in × d_out` layer: from the two half-trains (or core by
    /// core for few rows), or by reconstructing ΔW when the shape has no input/output cut.
    pub fn path_note(&self, d_in: usize, d_out: usize) -> crate::Result<&'static str> {
        Ok(match self.resolve_shape(d_in, d_out)?.1 {
            Some(_) => "half-trains",
            None => "dense ΔW (no input/output cut)",
        })
    }

    /// The configuration for `site`: its module's entry of `tt_module_shapes` as the shape, if any.
    pub fn for_site(&self, site: &LinearSite) -> Self {
        match self.tt_module_shapes.iter().flatten().find(|(name, _)| names(&site.name, name)) {
            Some((_, shape)) => Self { tt_shape: Some(shape.clone()), ..self.clone() },
            None => self.clone(),
        }
    }

    /// Refuses a `tt_module_shapes` entry that names none of `sites` (it would be ignored).
    fn check_module_shapes(&self, sites: &[LinearSite]) -> crate::Result<()> {
        match self.tt_module_shapes.iter().flatten().find(|(name, _)| !sites.iter().any(|s| names(&s.name, name))) {
            Some((name, _)) => Err(crate::error::invalid(
                "--tt-shape NAME=…",
                name,
                "names none of the adapted modules (give a module name or its suffix, e.g. q_proj)",
            )),
            None => Ok(()),
        }
    }

    /// Trainable parameters for one `d_in × d_out` matrix.
    pub fn num_params(&self, d_in: usize, d_out: usize) -> crate::Result<usize> {
        require_rank_and_alpha(self.rank, self.alpha)?;
        let (shape, _) = self.resolve_shape(d_in, d_out)?;
        Ok(tt_num_params(&shape, self.rank))
    }

    /// Creates the adapter for a `d_in × d_out` linear layer.
    pub fn init<B: Backend>(&self, d_in: usize, d_out: usize, device: &B::Device) -> crate::Result<TtLora<B>> {
        require_rank_and_alpha(self.rank, self.alpha)?;
        let (shape, split) = self.resolve_shape(d_in, d_out)?;
        let zero = self.init == DeltaInit::Zero;
        Ok(TtLora {
            tt: TensorTrain::new(&shape, self.rank, CoreInit::UnitFrobenius, zero, device),
            split,
            d_in,
            d_out,
            alpha: self.alpha,
        })
    }
}

impl Method for TtLoraConfig {
    const NAME: &'static str = "tt-lora";
    const FLAGS: &'static [FlagField] = &[
        sets(Flag::Rank, "rank", "TT rank of the inner bonds"),
        sets(Flag::Alpha, "alpha", "output multiplier α"),
        sets(Flag::TtShape, "tt_shape", "input factors ++ reversed output factors"),
        sets(Flag::TtModuleShape, "tt_module_shapes", "the shape of the modules NAME names (repeat per module)"),
    ];

    /// The last core starts at zero with the zero initialisation.
    fn has_zero_init_factor(&self) -> bool {
        self.init == DeltaInit::Zero
    }

    /// lr 5e-3 with LoRA+ ×4 on the last core: at LoRA's 1e-3 the train's small cores move too
    /// slowly (the VADER recipe tested 3.3 points below LoRA; with these, within a point of it).
    fn recommended_training(&self) -> RecommendedTraining {
        RecommendedTraining { lr: 5e-3, loraplus_lr_ratio: Some(4.0) }
    }

    fn count(&self, sites: &Sites) -> crate::Result<ParamReport> {
        self.check_module_shapes(sites.linear)?;
        let mut report =
            ParamReport::per_linear_site(Self::NAME, sites.linear, |s| self.for_site(s).num_params(s.d_in, s.d_out))?;
        for (row, site) in report.rows.iter_mut().zip(sites.linear) {
            row.note = self.for_site(site).path_note(site.d_in, site.d_out)?.to_string();
        }
        Ok(report)
    }

    fn build<B: Backend>(&self, sites: &Sites, device: &B::Device) -> crate::Result<AdapterSet<B>> {
        self.check_module_shapes(sites.linear)?;
        AdapterSet::per_linear_site(sites.linear, |s| {
            Ok(LinearAdapter::TtLora(self.for_site(s).init(s.d_in, s.d_out, device)?))
        })
    }
}

/// Whether module `module` is named by `name`: equal, or a `.`-suffix (PEFT's target semantics).
fn names(module: &str, name: &str) -> bool {
    module == name || module.strip_suffix(name).is_some_and(|rest| rest.ends_with('.'))
}
