//! Backend selection: which Burn backends this binary was compiled with.

use crate::CliError;

/// A Burn backend the CLI can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// CPU, `ndarray` crate (`ndarray` feature, on by default): the backend of the numeric tests.
    Ndarray,
    /// CPU, Burn's own `flex` backend (`flex` feature, on by default): the CLI default.
    Flex,
    /// WebGPU/Vulkan (`wgpu` feature).
    Wgpu,
    /// NVIDIA CUDA (`cuda` feature).
    Cuda,
}

impl BackendKind {
    /// The cargo feature that compiles this backend in.
    pub fn feature(&self) -> &'static str {
        match self {
            BackendKind::Ndarray => "ndarray",
            BackendKind::Flex => "flex",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }

    /// Whether this binary includes the backend.
    pub fn compiled(&self) -> bool {
        match self {
            BackendKind::Ndarray => cfg!(feature = "ndarray"),
            BackendKind::Flex => cfg!(feature = "flex"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// `Ok` if compiled in, else a usage error that says how to get it.
    pub fn require(&self) -> Result<(), CliError> {
        if self.compiled() {
            return Ok(());
        }
        let available: Vec<_> = [BackendKind::Ndarray, BackendKind::Flex, BackendKind::Wgpu, BackendKind::Cuda]
            .iter()
            .filter(|b| b.compiled())
            .map(|b| b.feature())
            .collect();
        Err(CliError::Usage(format!(
            "the {0} backend is not compiled into this binary (compiled: {1}); rebuild with `cargo build --release --features {0}`",
            self.feature(),
            if available.is_empty() { "none".to_string() } else { available.join(", ") }
        )))
    }
}
