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

/// A device named with `--devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU backends' one device (`cpu`).
    Cpu,
    /// A wgpu adapter, as Burn's `WgpuDevice` selects it.
    Wgpu(WgpuSpec),
    /// CUDA device `N` (`cuda:N`).
    Cuda(usize),
}

/// How a wgpu adapter is named: Burn's `WgpuDevice` variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuSpec {
    /// `wgpu:N`: the N-th discrete GPU found.
    Discrete(usize),
    /// `wgpu:integrated:N`.
    Integrated(usize),
    /// `wgpu:virtual:N`.
    Virtual(usize),
    /// `wgpu:cpu`: a CPU Vulkan device (Mesa's lavapipe).
    Cpu,
    /// `wgpu:default`: Burn's default choice (the best adapter, or `CUBECL_WGPU_DEFAULT_DEVICE`).
    Default,
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Wgpu(WgpuSpec::Discrete(n)) => write!(f, "wgpu:{n}"),
            DeviceSpec::Wgpu(WgpuSpec::Integrated(n)) => write!(f, "wgpu:integrated:{n}"),
            DeviceSpec::Wgpu(WgpuSpec::Virtual(n)) => write!(f, "wgpu:virtual:{n}"),
            DeviceSpec::Wgpu(WgpuSpec::Cpu) => write!(f, "wgpu:cpu"),
            DeviceSpec::Wgpu(WgpuSpec::Default) => write!(f, "wgpu:default"),
        }
    }
}

/// The spellings `--devices` takes for `kind`.
fn spellings(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Ndarray | BackendKind::Flex => "`cpu`",
        BackendKind::Wgpu => {
            "`wgpu:N` (the N-th discrete GPU), `wgpu:integrated:N`, `wgpu:virtual:N`, `wgpu:cpu` or `wgpu:default`"
        }
        BackendKind::Cuda => "`cuda:N`",
    }
}

impl DeviceSpec {
    /// The backend's default device: what runs when `--devices` is not given.
    pub fn default_for(kind: BackendKind) -> Self {
        match kind {
            BackendKind::Ndarray | BackendKind::Flex => DeviceSpec::Cpu,
            BackendKind::Wgpu => DeviceSpec::Wgpu(WgpuSpec::Default),
            BackendKind::Cuda => DeviceSpec::Cuda(0),
        }
    }

    /// Parses one `--devices` entry for the backend `kind`.
    pub fn parse(text: &str, kind: BackendKind) -> Result<Self, CliError> {
        let index = |s: &str| s.parse::<usize>().ok();
        let parts: Vec<&str> = text.trim().split(':').collect();
        let spec = match (kind, parts.as_slice()) {
            (BackendKind::Ndarray | BackendKind::Flex, ["cpu"]) => Some(DeviceSpec::Cpu),
            (BackendKind::Wgpu, ["wgpu", "cpu"]) => Some(DeviceSpec::Wgpu(WgpuSpec::Cpu)),
            (BackendKind::Wgpu, ["wgpu", "default"]) => Some(DeviceSpec::Wgpu(WgpuSpec::Default)),
            (BackendKind::Wgpu, ["wgpu", n]) => index(n).map(|n| DeviceSpec::Wgpu(WgpuSpec::Discrete(n))),
            (BackendKind::Wgpu, ["wgpu", "integrated", n]) => {
                index(n).map(|n| DeviceSpec::Wgpu(WgpuSpec::Integrated(n)))
            }
            (BackendKind::Wgpu, ["wgpu", "virtual", n]) => index(n).map(|n| DeviceSpec::Wgpu(WgpuSpec::Virtual(n))),
            (BackendKind::Cuda, ["cuda", n]) => index(n).map(DeviceSpec::Cuda),
            _ => None,
        };
        spec.ok_or_else(|| {
            CliError::Usage(format!(
                "--devices: `{text}` is not a device of the {} backend; expected {}",
                kind.feature(),
                spellings(kind)
            ))
        })
    }

    /// Parses `--devices` (empty: the backend's default device). A GPU may be listed once;
    /// `cpu` may repeat (the CPU backends have one device, which several workers can share).
    pub fn parse_list(list: &[String], kind: BackendKind) -> Result<Vec<Self>, CliError> {
        if list.is_empty() {
            return Ok(vec![DeviceSpec::default_for(kind)]);
        }
        let specs = list.iter().map(|s| DeviceSpec::parse(s, kind)).collect::<Result<Vec<_>, _>>()?;
        for (i, spec) in specs.iter().enumerate() {
            if *spec != DeviceSpec::Cpu && specs[..i].contains(spec) {
                return Err(CliError::Usage(format!("--devices: {spec} is listed twice")));
            }
        }
        Ok(specs)
    }
}

/// A backend's device type, built from a [`DeviceSpec`] of that backend (checked by
/// [`DeviceSpec::parse`]).
pub trait FromSpec: Sized {
    /// The device `spec` names.
    fn from_spec(spec: &DeviceSpec) -> Self;
}

/// The device of the backend in scope that `spec` names: `device(&spec)` where a `&B::Device` is
/// expected.
pub fn device<D: FromSpec>(spec: &DeviceSpec) -> D {
    D::from_spec(spec)
}

#[cfg(feature = "ndarray")]
impl FromSpec for burn::backend::ndarray::NdArrayDevice {
    fn from_spec(_: &DeviceSpec) -> Self {
        Self::Cpu
    }
}

#[cfg(feature = "flex")]
impl FromSpec for burn::backend::flex::FlexDevice {
    fn from_spec(_: &DeviceSpec) -> Self {
        Self
    }
}

#[cfg(feature = "wgpu")]
impl FromSpec for burn::backend::wgpu::WgpuDevice {
    fn from_spec(spec: &DeviceSpec) -> Self {
        match spec {
            DeviceSpec::Wgpu(WgpuSpec::Discrete(n)) => Self::DiscreteGpu(*n),
            DeviceSpec::Wgpu(WgpuSpec::Integrated(n)) => Self::IntegratedGpu(*n),
            DeviceSpec::Wgpu(WgpuSpec::Virtual(n)) => Self::VirtualGpu(*n),
            DeviceSpec::Wgpu(WgpuSpec::Cpu) => Self::Cpu,
            _ => Self::DefaultDevice,
        }
    }
}

#[cfg(feature = "cuda")]
impl FromSpec for burn::backend::cuda::CudaDevice {
    fn from_spec(spec: &DeviceSpec) -> Self {
        match spec {
            DeviceSpec::Cuda(n) => Self { index: *n },
            _ => Self::default(),
        }
    }
}

/// Where the GPU backends keep what they compile between runs: `$TPEFT_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/tensor-peft/kernels`, else `~/.cache/tensor-peft/kernels`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn kernel_cache_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("TPEFT_KERNEL_CACHE").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("tensor-peft").join("kernels")
}

/// Points CubeCL's caches (compiled CUDA kernels, autotune results) at [`kernel_cache_dir`] before
/// a GPU device starts, so that a second run reuses what the first compiled and timed instead of
/// doing it again; without this CubeCL keeps no compiled kernels and puts autotune results in
/// the `target` directory of whatever Cargo project the command runs in. A `cubecl.toml` or
/// `burn.toml` (searched from the working directory up) that names a compilation cache, or an
/// autotune cache other than `target`, is kept; `CUBECL_AUTOTUNE_LEVEL` still applies. Returns the
/// directory and whether it held anything yet.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn configure_kernel_caches() -> (std::path::PathBuf, bool) {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    let dir = kernel_cache_dir();
    let warm = std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some());
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if config.compilation.cache.is_none() {
        config.compilation.cache = Some(CacheConfig::File(dir.clone()));
    }
    if matches!(config.autotune.cache, CacheConfig::Target) {
        config.autotune.cache = CacheConfig::File(dir.clone());
    }
    CubeClRuntimeConfig::set(config);
    (dir, warm)
}
