//! Taking every adapter out of a model: the base model a DPO run compares against (its reference
//! policy), without a second copy of the weights.
//!
//! [`strip_adapters`] is written once for every model through [`AdapterSlots`], like
//! [`inject`](crate::inject::inject); it empties the slots `inject` fills. Run on a clone, it leaves
//! the adapted model as it was: Burn's tensors are reference-counted, so the clone shares the frozen
//! weights instead of copying them.

use crate::error::ModelError;
use crate::inject::AdapterSlots;
use crate::layout::LayoutBlock;
use burn::tensor::backend::Backend;
use tensor_peft_adapters::{AdapterError, ResidualPosition, SharedFactors};

/// Removes every linear adapter, residual adapter and shared factor from `model`, so that it
/// computes what the base model computes (trained norms or heads, which are not adapters, stay).
/// Returns how many adapters were removed.
///
/// Refuses a model whose update is merged into a base weight: removing the adapter would leave
/// ΔW folded into the weight (unmerge it first).
pub fn strip_adapters<B: Backend, M: AdapterSlots<B>>(model: &mut M) -> Result<usize, ModelError> {
    let mut removed = 0;
    for (layer, block) in model.blocks_mut().iter_mut().enumerate() {
        for (projection, slot) in block.projections_mut().into_iter().enumerate() {
            if slot.merged {
                let name = M::Block::LAYOUT.get(projection).map_or("a projection", |p| p.name);
                return Err(AdapterError::State(format!(
                    "layer {layer} {name}: the adapter is merged into the base weight; unmerge it before removing it"
                ))
                .into());
            }
            removed += usize::from(slot.adapter.take().is_some());
        }
        for position in [ResidualPosition::Attention, ResidualPosition::FeedForward] {
            removed += usize::from(block.residual_mut(position).take().is_some());
        }
    }
    *model.shared_mut() = SharedFactors::empty();
    Ok(removed)
}
