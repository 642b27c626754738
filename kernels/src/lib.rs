#![warn(missing_docs)]
//! Fused CPU kernels for the transformer blocks' element-wise and attention work.
//!
//! Burn's CPU backends run a block's activations, rotary embedding, normalisations and attention
//! softmax as chains of element-wise ops, each a full pass over memory on one thread, and the
//! autodiff backward adds a second chain. On a CPU training step those chains cost as much as the
//! GEMMs. Each kernel here does one op's forward or
//! backward in one pass, split over rayon's threads and vectorised, on plain contiguous `f32`
//! slices. The [`fused`] module makes them Burn ops: on the flex backend they run these kernels,
//! on every other backend Burn's op chains.
//!
//! The crate is built at `opt-level = 3` even in the dev profile (workspace `Cargo.toml`): its
//! loops are the point of it, and unoptimised they would be slower than the op chains they replace.

pub(crate) mod matmul;
mod simd;

pub mod attention;
pub mod dropout;
pub mod fused;
pub mod gelu;
pub mod loss;
pub mod norm;
pub mod quant;
pub mod rng;
pub mod rope;
pub mod swiglu;

pub use simd::{exp, sigmoid};

/// Elements per parallel task for element-wise kernels: large enough that rayon's scheduling
/// (a few microseconds) is noise, small enough to share a 400k-element activation among threads.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Rows per parallel task for row-wise kernels with rows of `width` elements.
pub(crate) fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}
