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
pub mod bf16_gemm;
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

use std::sync::atomic::{AtomicU8, Ordering};

/// The precision of the frozen base layers' products and the attention's (`--compute-dtype`),
/// process-wide, as PyTorch's `torch.set_float32_matmul_precision` or QLoRA's
/// `bnb_4bit_compute_dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDType {
    /// f32 operands, f32 accumulation (the weight widened to f32): the default.
    #[default]
    F32,
    /// Operands rounded to bf16 (the activations, and the weight from its stored form), products
    /// accumulated in f32 ([`bf16_gemm`]): on the flex backend's fused linear ops and attention
    /// (its per-head products; the softmax stays f32) only.
    Bf16,
}

impl ComputeDType {
    /// The name `--compute-dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            ComputeDType::F32 => "f32",
            ComputeDType::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for ComputeDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ComputeDType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(ComputeDType::F32),
            "bf16" | "bfloat16" => Ok(ComputeDType::Bf16),
            _ => Err(format!("unknown compute dtype {s:?}: expected f32 or bf16")),
        }
    }
}

static COMPUTE_DTYPE: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of the frozen base's products for the whole process (see [`ComputeDType`]).
/// Takes effect on the next product; the adapters, softmax, norms, loss and optimizer stay f32.
pub fn set_compute_dtype(dtype: ComputeDType) {
    COMPUTE_DTYPE.store(dtype as u8, Ordering::Relaxed);
}

thread_local! {
    static SCOPED: std::cell::Cell<Option<ComputeDType>> = const { std::cell::Cell::new(None) };
}

/// The precision the products started on this thread use: the one [`with_compute_dtype`] set
/// for this thread, else the process's ([`set_compute_dtype`]; [`ComputeDType::F32`] unless set).
pub fn compute_dtype() -> ComputeDType {
    if let Some(dtype) = SCOPED.with(std::cell::Cell::get) {
        return dtype;
    }
    match COMPUTE_DTYPE.load(Ordering::Relaxed) {
        0 => ComputeDType::F32,
        _ => ComputeDType::Bf16,
    }
}

/// Runs `f` with the products started on this thread (forward and backward passes run on the
/// calling thread) at `dtype`, whatever the process-wide setting: for tests that compare the two
/// precisions while other tests run on other threads.
pub fn with_compute_dtype<R>(dtype: ComputeDType, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<ComputeDType>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SCOPED.with(|s| s.replace(Some(dtype))));
    f()
}

/// Elements per parallel task for element-wise kernels: large enough that rayon's scheduling
/// (a few microseconds) is noise, small enough to share a 400k-element activation among threads.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Rows per parallel task for row-wise kernels with rows of `width` elements.
pub(crate) fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// Hands the heap's free memory back to the operating system (glibc's `malloc_trim`; elsewhere
/// nothing): after a model is built or loaded, the transient buffers of its construction (a
/// layer's weights in f32 before they are quantized, a file's decoded tensors) are free but
/// still resident, and would count in every later peak of the process.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: `malloc_trim` only returns free pages of glibc's heaps to the system.
        unsafe {
            malloc_trim(0);
        }
    }
}
