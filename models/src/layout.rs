//! Model layouts: each family lists its block's adaptable projections once, in a table
//! ([`crate::llama::LAYOUT`], [`crate::bert::LAYOUT`]) that names, shapes and reaches every
//! projection. Site lists, parameter counts, loaders, injection, update ratios, saving and merging
//! all walk that table instead of listing the projections again.

use crate::arch::ArchSpec;
use crate::error::ModelError;
use burn::tensor::backend::Backend;
use tensor_peft_adapters::{AdaptedLinear, AttentionMatrix, ResidualAdapter, ResidualPosition};

/// One adaptable projection of a block: a row of a model family's layout table.
#[derive(Debug, Clone, Copy)]
pub struct Projection {
    /// HF module name inside a block (`self_attn.q_proj`, `attention.output.dense`).
    pub name: &'static str,
    /// Its name in llama.cpp's GGUF files (`attn_q`), for families GGUF files hold.
    pub gguf: Option<&'static str>,
    /// The attention role, for methods that index by it; `None` for feed-forward projections.
    pub role: Option<AttentionMatrix>,
    /// `(d_in, d_out)` in a model of shape `spec`.
    pub shape: fn(&ArchSpec) -> (usize, usize),
}

/// A transformer block whose projections follow a layout table; implemented by `layout_table!`
/// from the table itself, so the rows and the fields they reach cannot drift apart.
pub trait LayoutBlock<B: Backend> {
    /// The family's layout table.
    const LAYOUT: &'static [Projection];
    /// The block's projections, in [`LayoutBlock::LAYOUT`] order.
    fn projections(&self) -> Vec<&AdaptedLinear<B>>;
    /// The block's projections, mutably, in [`LayoutBlock::LAYOUT`] order.
    fn projections_mut(&mut self) -> Vec<&mut AdaptedLinear<B>>;
    /// The residual adapter slot at `position` (`None` where the family has no such position).
    fn residual_mut(&mut self, position: ResidualPosition) -> Option<&mut Option<ResidualAdapter<B>>>;
    /// Whether the block carries a residual adapter.
    fn has_residual(&self) -> bool;
}

/// The name of a residual adapter at `position` inside a block.
pub fn residual_name(position: ResidualPosition) -> &'static str {
    match position {
        ResidualPosition::Attention => "attention_adapter",
        ResidualPosition::FeedForward => "ffn_adapter",
        ResidualPosition::GateInput => "gate_input_adapter",
        ResidualPosition::UpInput => "up_input_adapter",
    }
}

/// A block's projections, built in `spec`'s layout-table order: `load` gets each one's HF name
/// (`{block}.{row name}`) and `(d_in, d_out)`.
pub fn load_projections<B: Backend, const N: usize>(
    spec: &ArchSpec,
    block: &str,
    mut load: impl FnMut(&str, usize, usize) -> Result<AdaptedLinear<B>, ModelError>,
) -> Result<[AdaptedLinear<B>; N], ModelError> {
    let built = spec
        .family
        .layout()
        .iter()
        .map(|row| {
            let (d_in, d_out) = (row.shape)(spec);
            load(&format!("{block}.{}", row.name), d_in, d_out)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rows = built.len();
    Ok(built.try_into().unwrap_or_else(|_| panic!("a {} block has {rows} projections, not {N}", spec.family.name())))
}

/// Defines a family's block struct `$block`, its layout table `$table` and its residual positions
/// `$positions`, and implements [`LayoutBlock`] from them: one row per projection, `field:
/// "hf.name", role, |spec| (d_in, d_out);` (`"hf.name" / "gguf_name"` where GGUF files hold the
/// family), and one `slot: Position;` per residual adapter position the block's forward applies.
/// The block's fields are the table's projections (an `AdaptedLinear` each), its residual adapter
/// slots, then `$field`s.
macro_rules! layout_table {
    (
        $(#[$block_doc:meta])*
        $block:ident { $($(#[$field_doc:meta])* $field:ident: $field_ty:ty,)* }
        $(#[$doc:meta])*
        $table:ident { $($proj:ident: $name:literal $(/ $gguf:literal)?, $role:expr, $shape:expr;)* }
        $(#[$positions_doc:meta])*
        $positions:ident { $($slot:ident: $position:ident;)* }
    ) => {
        $(#[$block_doc])*
        #[derive(Module, Debug)]
        pub struct $block<B: Backend> {
            $(
                #[doc = concat!("`", $name, "`, a row of [`", stringify!($table), "`].")]
                pub $proj: AdaptedLinear<B>,
            )*
            $(
                #[doc = concat!(
                    "Residual adapter at [`ResidualPosition::", stringify!($position),
                    "`](tensor_peft_adapters::ResidualPosition::", stringify!($position), "), if any."
                )]
                pub $slot: Option<ResidualAdapter<B>>,
            )*
            $($(#[$field_doc])* pub $field: $field_ty,)*
        }

        $(#[$doc])*
        pub const $table: &[$crate::layout::Projection] =
            &[$($crate::layout::Projection {
                name: $name,
                gguf: $crate::layout::optional!($($gguf)?),
                role: $role,
                shape: $shape,
            }),*];

        $(#[$positions_doc])*
        pub const $positions: &[tensor_peft_adapters::ResidualPosition] =
            &[$(tensor_peft_adapters::ResidualPosition::$position),*];

        impl<B: Backend> $crate::layout::LayoutBlock<B> for $block<B> {
            const LAYOUT: &'static [$crate::layout::Projection] = $table;
            fn projections(&self) -> Vec<&AdaptedLinear<B>> {
                vec![$(&self.$proj),*]
            }
            fn projections_mut(&mut self) -> Vec<&mut AdaptedLinear<B>> {
                vec![$(&mut self.$proj),*]
            }
            fn residual_mut(
                &mut self,
                position: tensor_peft_adapters::ResidualPosition,
            ) -> Option<&mut Option<ResidualAdapter<B>>> {
                match position {
                    $(tensor_peft_adapters::ResidualPosition::$position => Some(&mut self.$slot),)*
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
            fn has_residual(&self) -> bool {
                false $(|| self.$slot.is_some())*
            }
        }
    };
}
pub(crate) use layout_table;

/// `Some(x)` for `x`, `None` for nothing: an optional column of `layout_table!`.
macro_rules! optional {
    () => {
        None
    };
    ($value:expr) => {
        Some($value)
    };
}
pub(crate) use optional;
