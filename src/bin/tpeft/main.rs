//! `tpeft`: the command-line interface (a thin layer over the library).
// The doc comments below are the `--help` text (clap), written for a terminal, not for rustdoc.
#![allow(rustdoc::invalid_html_tags)]

mod backend;
mod bench;
mod compare;
mod demo;
mod embed;
mod finetune;
mod merge;
mod params;
mod plan;

use backend::{BackendKind, DeviceSpec};
use clap::{Parser, Subcommand};
use params::{count, render};
use std::process::ExitCode;
use tensor_peft_models::ArchSpec;
use tensor_peft_models::BaseDType;

#[derive(Parser)]
#[command(name = "tpeft", version, about = "Tensorized parameter-efficient fine-tuning on Burn")]
struct Cli {
    /// Compute backend: `flex` (default, the fastest CPU backend here), `ndarray`, or `wgpu` and
    /// `cuda` (cargo features of the same names).
    #[arg(long, global = true, value_enum, default_value = "flex")]
    backend: BackendKind,
    /// The devices to run on, comma-separated (default: the backend's default device): `cpu`
    /// (ndarray, flex); `wgpu:N` (the N-th discrete GPU), `wgpu:integrated:N`, `wgpu:virtual:N`,
    /// `wgpu:cpu`, `wgpu:default`; `cuda:N`. `finetune` trains data-parallel over several devices,
    /// splitting each global batch of `--batch-size` examples evenly; other commands take one.
    #[arg(long, global = true, value_delimiter = ',')]
    devices: Vec<String>,
    /// Precision of the frozen base's matrix products and the attention's: `f32` (default) or
    /// `bf16` (operands rounded to bf16, f32 accumulation, on AMX or AVX512-BF16 where the CPU has
    /// them; flex backend only). Adapters, softmax, norms, loss and optimizer stay f32.
    /// `finetune --config` files may set `compute_dtype`.
    #[arg(long, global = true)]
    compute_dtype: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Count trainable parameters of a method on a model (PEFT's print_trainable_parameters).
    Params {
        /// Preset (llama2-7b, llama2-13b, llama2-70b, llama3-8b, llama3.2-1b, mistral-7b,
        /// roberta-base, bert-base, minilm-l6), HF model directory, config.json, or .gguf file.
        #[arg(long)]
        model: String,
        /// The adapter method and its hyper-parameters.
        #[command(flatten)]
        adapter: params::MethodArgs,
        /// Comma-separated target modules (exact name or suffix, PEFT style).
        #[arg(long, value_delimiter = ',', conflicts_with = "target_regex")]
        targets: Option<Vec<String>>,
        /// A regular expression that must match whole module names (PEFT's string targets).
        #[arg(long)]
        target_regex: Option<String>,
        /// Also count the normalisation layers `finetune --train-norms` trains (LoRETTA's extra
        /// trainables).
        #[arg(long)]
        train_norms: bool,
    },
    /// Estimate a fine-tuning run's peak memory without loading the model: frozen weights at the
    /// base dtype, adapter and optimizer state, activations, loss workspace. Ends with
    /// `estimated peak memory: N MiB`.
    Plan {
        /// Preset (llama2-7b, …), HF model directory, config.json or .gguf file.
        #[arg(long)]
        model: String,
        /// The adapter method and its hyper-parameters.
        #[command(flatten)]
        adapter: params::MethodArgs,
        /// Comma-separated target modules (exact name or suffix, PEFT style).
        #[arg(long, value_delimiter = ',', conflicts_with = "target_regex")]
        targets: Option<Vec<String>>,
        /// A regular expression that must match whole module names (PEFT's string targets).
        #[arg(long)]
        target_regex: Option<String>,
        /// Precision of the frozen base: f32, bf16, f16, q8_0, q4_0 or native.
        #[arg(long, default_value = "f32")]
        base_dtype: BaseDType,
        /// Examples per micro-batch.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Tokens per example.
        #[arg(long, default_value_t = 128)]
        max_len: usize,
        /// Plan for `finetune --gradient-checkpointing`: the backward keeps each block's input and
        /// one block's activations instead of every block's.
        #[arg(long)]
        gradient_checkpointing: bool,
    },
    /// Fine-tune a model with an adapter (see docs/cli.md); writes an adapter directory.
    Finetune(Box<finetune::FinetuneArgs>),
    /// Train a grid of methods and sizes on one task (sweep.toml; see docs/cli.md "Comparing
    /// methods") and write results.csv, results.md and accuracy_vs_params.png.
    Compare {
        /// The sweep file.
        #[arg(long)]
        config: std::path::PathBuf,
        /// Stop training further runs after this many minutes (finished runs are kept).
        #[arg(long)]
        budget_minutes: Option<f64>,
    },
    /// Evaluate a fine-tuned adapter on a data file: one `metric: value` line each (or --json).
    Eval {
        /// The base model (HF directory or .gguf).
        #[arg(long)]
        model: std::path::PathBuf,
        /// Adapter directory written by `tpeft finetune`, or NAME=DIR; repeat to load several
        /// on one base (the first is applied unless --active-adapter names another).
        #[arg(long, required = true)]
        adapter: Vec<String>,
        /// The adapter to evaluate, by NAME (default: the first).
        #[arg(long)]
        active_adapter: Option<String>,
        /// Evaluate the base model: the adapters are loaded but none is applied (the active
        /// adapter's task head is kept).
        #[arg(long)]
        disable_adapters: bool,
        /// classification, regression, causal-lm, lm-classification, lm-multiple-choice,
        /// lm-generation or dpo.
        #[arg(long)]
        task: String,
        /// Data file (.jsonl, .csv, .tsv) or builtin:<name>.
        #[arg(long)]
        data: std::path::PathBuf,
        /// Examples per batch.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Column/key of the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Column/key of the second text of a pair.
        #[arg(long, default_value = "text_pair")]
        text_pair_field: String,
        /// Column/key of the label.
        #[arg(long, default_value = "label")]
        label_field: String,
        /// Column/key of the score.
        #[arg(long, default_value = "score")]
        score_field: String,
        /// Column/key of the prompt (causal-lm, lm-multiple-choice, lm-generation).
        #[arg(long, default_value = "prompt")]
        prompt_field: String,
        /// Column/key of the completion (causal-lm).
        #[arg(long, default_value = "completion")]
        completion_field: String,
        /// Key of the candidate continuations (lm-multiple-choice).
        #[arg(long, default_value = "choices")]
        choices_field: String,
        /// Key of the gold answers (lm-generation; else `answer`).
        #[arg(long, default_value = "answers")]
        answers_field: String,
        /// lm-generation: longest greedy answer, in tokens [default: the adapter's, from training].
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// Skip malformed rows.
        #[arg(long)]
        skip_bad_rows: bool,
        /// Print the metrics as one JSON object.
        #[arg(long)]
        json: bool,
        /// Also write every example's prediction to this JSONL file, one object per example:
        /// `{"index", "line", "expected", "predicted"}` (labels by name, regression scores, choice
        /// indices, or the gold answers and the generated text).
        /// Not for causal-lm, which has no single predicted value per example.
        #[arg(long)]
        predictions: Option<std::path::PathBuf>,
        /// Precision of the frozen base model's matrices: f32, bf16, f16, q8_0,
        /// q4_0 (GGML blocks; embeddings in bf16) or native (as the checkpoint stores them).
        /// Adapters stay f32.
        #[arg(long, default_value = "f32")]
        base_dtype: BaseDType,
    },
    /// Fine-tune MiniLM on the VADER movie reviews with TT-LoRA and with LoRA and compare them
    /// (fetches the assets first when they are missing).
    Demo {
        /// Training examples used (the full split has 9,512).
        #[arg(long, default_value_t = 2000)]
        train_examples: usize,
        /// Epochs.
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        /// Output directory for the two runs.
        #[arg(long, default_value = "runs/demo")]
        output: std::path::PathBuf,
    },
    /// Train every method briefly on a small synthetic stack on the chosen backend and check the
    /// factored forward against the dense reconstruction.
    Selfcheck {
        /// Adam steps per method.
        #[arg(long, default_value_t = 150)]
        steps: usize,
        /// Learning rate.
        #[arg(long, default_value_t = 1e-2)]
        lr: f64,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Generate text with a LLaMA-family model (greedy unless --temperature > 0).
    Generate {
        /// HF model directory (config.json, safetensors, tokenizer.json) or a .gguf file.
        #[arg(long)]
        model: std::path::PathBuf,
        /// The prompt (the user message with --chat).
        #[arg(long)]
        prompt: String,
        /// Apply the model's own chat template.
        #[arg(long)]
        chat: bool,
        /// Maximum number of new tokens.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Nucleus sampling: keep the most likely tokens up to this probability mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Adapter directory (adapter_config.json + adapter_model.safetensors; PEFT LoRA too), or
        /// NAME=DIR; repeat to load several on one base (the first is applied unless
        /// --active-adapter names another).
        #[arg(long)]
        adapter: Vec<String>,
        /// The adapter to apply, by NAME (default: the first).
        #[arg(long)]
        active_adapter: Option<String>,
        /// Generate with the base model: the adapters are loaded but none is applied.
        #[arg(long)]
        disable_adapters: bool,
        /// Precision of the frozen base model's matrices: f32, bf16, f16, q8_0,
        /// q4_0 (GGML blocks; embeddings in bf16) or native (as the checkpoint stores them).
        /// Adapters stay f32.
        #[arg(long, default_value = "f32")]
        base_dtype: BaseDType,
    },
    /// Fold an adapter into a LLaMA-family model and write a plain HF model directory.
    Merge {
        /// HF model directory or .gguf file.
        #[arg(long)]
        model: std::path::PathBuf,
        /// Adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: std::path::PathBuf,
        /// Output directory.
        #[arg(long)]
        output: std::path::PathBuf,
        /// Replace a model already in the output directory.
        #[arg(long)]
        overwrite: bool,
    },
    /// Write a weighted combination of adapters as one LoRA adapter (PEFT's
    /// add_weighted_adapter): `cat` is exactly ΔW = Σ wᵢ·ΔWᵢ for any linear methods, mixed too;
    /// `linear` is PEFT's weighted sum of LoRA factors (LoRA adapters of one rank only).
    Combine {
        /// The base model the adapters were trained on: preset, HF directory, config.json or
        /// .gguf (only its shapes are read).
        #[arg(long)]
        model: String,
        /// NAME=DIR (or a bare DIR) of an adapter to combine; repeat for each.
        #[arg(long, required = true)]
        adapter: Vec<String>,
        /// One weight per adapter, comma-separated, in --adapter order (negative subtracts).
        #[arg(long, value_delimiter = ',', required = true, allow_hyphen_values = true)]
        weights: Vec<f64>,
        /// cat (exact, rank Σ rᵢ) or linear (PEFT's, LoRA of one rank).
        #[arg(long, default_value = "cat")]
        combination: String,
        /// The adapter directory to write.
        #[arg(long)]
        output: std::path::PathBuf,
        /// Replace what the output directory holds.
        #[arg(long)]
        overwrite: bool,
    },
    /// Sentence embeddings (mean-pooled, L2-normalised) from a BERT-family model, as JSON.
    Embed {
        /// HF model directory (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        model: std::path::PathBuf,
        /// A text to embed (repeat for several).
        #[arg(long, required = true)]
        text: Vec<String>,
    },
    /// Micro-benchmarks of the adapters: medians and same-run ratios, optionally as JSON.
    Bench {
        /// Suites: linear, contraction, merged, scoring; model and train-step (need --model).
        #[arg(long, value_delimiter = ',', default_value = "linear,contraction,merged,scoring")]
        suite: Vec<String>,
        /// Layer widths d (square layers).
        #[arg(long, value_delimiter = ',', default_value = "1024")]
        dims: Vec<usize>,
        /// Row counts N (batch × sequence) for the linear and merged suites.
        #[arg(long, value_delimiter = ',', default_value = "512,2048")]
        tokens: Vec<usize>,
        /// Timed repetitions per variant (after one warm-up round).
        #[arg(long, default_value_t = 7)]
        repeats: usize,
        /// Also write the records to this JSON file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// LLaMA-family model for the `model` and `train-step` suites: HF directory, .gguf, or a
        /// LLaMA-family preset (llama2-7b, llama3-8b, mistral-7b, …) for that shape with random weights.
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Batch size × sequence length of the `train-step` suite, e.g. 4x512.
        #[arg(long, default_value = "4x64")]
        train_shape: String,
        /// Float type of the benchmarked tensors: f32, or bf16 (cuda only).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// model/train-step suites: precision of the frozen base model's matrices: f32, bf16, f16, q8_0,
        /// q4_0 (GGML blocks; embeddings in bf16) or native (as the checkpoint stores them).
        /// Adapters stay f32.
        #[arg(long, default_value = "f32")]
        base_dtype: BaseDType,
        /// train-step suite: every step with gradient checkpointing (each block recomputed in the
        /// backward). Peak RSS is per process: compare with a run without it.
        #[arg(long)]
        gradient_checkpointing: bool,
    },
}

/// A CLI-level error: usage errors (bad flags) exit with 2, runtime errors with 1.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// The command line asks for something impossible (bad flag value, backend not compiled in).
    #[error("{0}")]
    Usage(String),
    /// The command failed while running (unreadable file, invalid model config).
    #[error("{0}")]
    Runtime(String),
}

impl CliError {
    /// Process exit code: 2 for usage errors, 1 for runtime errors.
    fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }
}

/// Evaluates `$body` with `$B` bound to the backend of `$kind` (wrap it in `Autodiff` to train;
/// a string error when that backend is not compiled in, which `run` checks first).
macro_rules! with_backend {
    ($kind:expr, $B:ident => $body:expr) => {
        with_backend!(@arms $kind, $B, $body,
            ["ndarray", Ndarray, NdArray] ["flex", Flex, Flex] ["wgpu", Wgpu, Wgpu] ["cuda", Cuda, Cuda])
    };
    (@arms $kind:expr, $B:ident, $body:expr, $([$feature:literal, $variant:ident, $backend:ident])*) => {
        match $kind {
            $(
                #[cfg(feature = $feature)]
                BackendKind::$variant => {
                    type $B = burn::backend::$backend;
                    $body
                }
            )*
            #[allow(unreachable_patterns)]
            other => Err(format!("the {} backend is not compiled in", other.feature())),
        }
    };
}

/// Set while [`start_device`] starts a GPU device: a panic in any thread then (the probe's, or
/// the device thread CubeCL runs its server on) is recorded in [`DEVICE_PANIC`] for it to report,
/// instead of ending the process as an internal failure.
static STARTING_DEVICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The first panic message seen while [`STARTING_DEVICE`] was set.
static DEVICE_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The text of a panic payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown failure".into())
}

/// Starts the backend's default device and moves one value through it, in a thread of its own
/// that may take at most `TPEFT_DEVICE_TIMEOUT_S` seconds (default 300: lavapipe, Mesa's software
/// Vulkan, needed up to 50 s on 2 busy cores). A missing driver or device is one line that names
/// the backend and what to do, and a driver that hangs while enumerating devices cannot hang the
/// run. The CPU backends have nothing to start.
fn start_device(kind: BackendKind, spec: &DeviceSpec) -> Result<(), CliError> {
    use std::sync::atomic::Ordering;
    if matches!(kind, BackendKind::Ndarray | BackendKind::Flex) {
        return Ok(());
    }
    let seconds = match std::env::var("TPEFT_DEVICE_TIMEOUT_S") {
        Ok(v) => v.parse::<u64>().ok().filter(|&s| s > 0).ok_or_else(|| {
            CliError::Usage(format!("TPEFT_DEVICE_TIMEOUT_S={v}: expected a positive number of seconds"))
        })?,
        Err(_) => 300,
    };
    let name = kind.feature();
    let named = *spec != DeviceSpec::default_for(kind);
    let hint = match kind {
        BackendKind::Cuda if named => "`nvidia-smi -L` lists the devices there are (cuda:N counts from 0)",
        BackendKind::Cuda => "check the NVIDIA driver with `nvidia-smi`, or use --backend flex",
        _ if named => {
            "`vulkaninfo --summary` lists the adapters there are (wgpu:N counts discrete GPUs from 0; wgpu:default takes the best one)"
        }
        _ => {
            "install a Vulkan driver (Debian: `apt-get install mesa-vulkan-drivers libvulkan1`; check with `vulkaninfo --summary`), or use --backend flex"
        }
    };
    let failed = |why: &str| {
        let why: String = why.lines().next().unwrap_or("").trim().chars().take(200).collect();
        CliError::Runtime(format!("no {name} device could be started for {spec} ({why}); {hint}"))
    };
    STARTING_DEVICE.store(true, Ordering::SeqCst);
    let (sender, receiver) = std::sync::mpsc::channel();
    let probed = spec.clone();
    std::thread::Builder::new()
        .name("tpeft-device-probe".into())
        .spawn(move || {
            let started = std::panic::catch_unwind(|| {
                with_backend!(kind, B => {
                    let one = burn::tensor::Tensor::<B, 1>::from_floats([1.0], &backend::device(&probed)).into_data();
                    Ok::<_, String>(one.to_vec::<f32>().is_ok_and(|v| v == [1.0]))
                })
            });
            let _ = sender.send(started);
        })
        .map_err(|e| CliError::Runtime(format!("cannot start a thread for the {name} device: {e}")))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let outcome = loop {
        // A panic on the device's own thread may leave the probe waiting forever: poll for it.
        if let Some(why) = DEVICE_PANIC.lock().unwrap_or_else(|p| p.into_inner()).take() {
            break Err(failed(&why));
        }
        match receiver.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(Ok(Ok(true))) => break Ok(()),
            Ok(Ok(Ok(false))) => break Err(failed("it returned a wrong value")),
            Ok(Ok(Err(e))) => break Err(CliError::Runtime(e)),
            Ok(Err(panic)) => break Err(failed(&panic_text(panic.as_ref()))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Err(failed("its thread ended")),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if std::time::Instant::now() >= deadline => {
                break Err(CliError::Runtime(format!(
                    "the {name} device {spec} did not start within {seconds} s (TPEFT_DEVICE_TIMEOUT_S); {hint}"
                )));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    };
    // Once started, a panic is a failure of the run again; after a failed start the device's
    // threads may still panic while the process exits, and add nothing to the one line.
    STARTING_DEVICE.store(outcome.is_err(), Ordering::SeqCst);
    outcome
}

/// Sets the process's compute dtype from `--compute-dtype` (or `finetune --config`'s
/// `compute_dtype`): unknown names and `bf16` off flex are usage errors.
fn set_compute_dtype(cli: &Cli) -> Result<(), CliError> {
    let name = match (&cli.compute_dtype, &cli.command) {
        (Some(name), _) => Some(name.clone()),
        (None, Command::Finetune(args)) => finetune::config_compute_dtype(args)?,
        (None, _) => None,
    };
    let Some(name) = name else { return Ok(()) };
    let dtype: tensor_peft_kernels::ComputeDType =
        name.parse().map_err(|e| CliError::Usage(format!("--compute-dtype: {e}")))?;
    if dtype == tensor_peft_kernels::ComputeDType::Bf16 && cli.backend != BackendKind::Flex {
        return Err(CliError::Usage(format!(
            "--compute-dtype bf16 runs on the flex backend only (its fused linear kernels), not on {}; use --backend flex or --compute-dtype f32",
            cli.backend.feature()
        )));
    }
    tensor_peft_kernels::set_compute_dtype(dtype);
    Ok(())
}

fn run(cli: Cli) -> Result<String, CliError> {
    cli.backend.require()?;
    set_compute_dtype(&cli)?;
    let devices = DeviceSpec::parse_list(&cli.devices, cli.backend)?;
    if devices.len() > 1 && !matches!(cli.command, Command::Finetune(_) | Command::Compare { .. }) {
        return Err(CliError::Usage(format!(
            "--devices lists {} devices, but only finetune and compare train on several (data parallel); give one",
            devices.len()
        )));
    }
    if !matches!(cli.command, Command::Params { .. } | Command::Plan { .. }) {
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        let caches =
            matches!(cli.backend, BackendKind::Wgpu | BackendKind::Cuda).then(backend::configure_kernel_caches);
        for spec in &devices {
            start_device(cli.backend, spec)?;
        }
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        match (cli.backend, caches) {
            (BackendKind::Cuda, Some((dir, true))) => {
                eprintln!("note: CUDA kernels compiled by earlier runs are reused from {}", dir.display())
            }
            (BackendKind::Cuda, Some((dir, false))) => eprintln!(
                "note: the first steps compile CUDA kernels with NVRTC (minutes on a new machine); they are kept in {} for later runs",
                dir.display()
            ),
            (BackendKind::Wgpu, _) => eprintln!(
                "note: wgpu compiles each GPU kernel at its first use, in every run (seconds per kernel on software Vulkan)"
            ),
            _ => {}
        }
    }
    let device = &devices[0];
    let names: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
    let _ = RUNNING_ON.set(format!("the {} device {}", cli.backend.feature(), names.join(", ")));
    match cli.command {
        Command::Params { model, adapter, targets, target_regex, train_norms } => {
            let method = adapter.config("lora")?;
            let spec = ArchSpec::from_model_arg(&model).map_err(|e| match e {
                tensor_peft_models::ModelError::UnknownModel(_) => CliError::Usage(e.to_string()),
                other => CliError::Runtime(other.to_string()),
            })?;
            let targets = match (targets, target_regex) {
                (Some(names), _) => tensor_peft_models::Targets::Names(names),
                (None, Some(pattern)) => tensor_peft_models::Targets::Regex(pattern),
                (None, None) => tensor_peft_models::Targets::Default,
            };
            let mut report = count(&spec, &method, &targets)?;
            let trained_base = if train_norms { spec.norm_params() } else { 0 };
            if train_norms {
                report.rows.push(tensor_peft_adapters::ParamRow {
                    module: "norms (--train-norms)".into(),
                    shape: format!("{} layers", spec.layers),
                    params: spec.norm_params(),
                    note: String::new(),
                });
            }
            Ok(render(&spec, &method, &report, trained_base))
        }
        Command::Plan { model, adapter, targets, target_regex, base_dtype, batch_size, max_len, gradient_checkpointing } => {
            if batch_size == 0 || max_len == 0 {
                return Err(CliError::Usage("--batch-size and --max-len must be at least 1".into()));
            }
            let method = adapter.config("lora")?;
            let targets = match (targets, target_regex) {
                (Some(names), _) => tensor_peft_models::Targets::Names(names),
                (None, Some(pattern)) => tensor_peft_models::Targets::Regex(pattern),
                (None, None) => tensor_peft_models::Targets::Default,
            };
            let run = plan::RunShape {
                model: &model,
                method: &method,
                targets: &targets,
                base_dtype,
                batch_size,
                max_len,
                lm: None,
                gradient_checkpointing,
            };
            let (spec, estimate) = plan::estimate(&run)?;
            let available = tensor_peft_training::plan::available_memory()
                .map_or("unknown".into(), |b| format!("{} MiB", params::thousands((b >> 20) as usize)));
            Ok(format!(
                "model: {} ({}, {} layers, d={}); method: {}; base dtype: {base_dtype}; batch {batch_size} x {max_len} tokens{}\navailable memory on this machine: {available}\n\n{}",
                spec.source,
                spec.family.name(),
                spec.layers,
                spec.hidden,
                method.name(),
                if gradient_checkpointing { "; gradient checkpointing" } else { "" },
                estimate.render()
            ))
        }
        Command::Bench {
            suite,
            dims,
            tokens,
            repeats,
            json,
            model,
            train_shape,
            dtype,
            base_dtype,
            gradient_checkpointing,
        } => {
            for s in &suite {
                if !bench::SUITES.contains(&s.as_str()) {
                    return Err(CliError::Usage(format!(
                        "unknown suite `{s}`: expected one of {}",
                        bench::SUITES.join(", ")
                    )));
                }
            }
            if dims.contains(&0) || tokens.contains(&0) || tokens.is_empty() || repeats == 0 {
                return Err(CliError::Usage("--dims, --tokens and --repeats must be positive".into()));
            }
            if let Some(s) = suite.iter().find(|s| *s == "model" || *s == "train-step")
                && model.is_none()
            {
                return Err(CliError::Usage(format!(
                    "the {s} suite needs --model <HF dir | file.gguf | preset such as llama2-7b>"
                )));
            }
            if gradient_checkpointing && !suite.iter().any(|s| s == "train-step") {
                return Err(CliError::Usage("--gradient-checkpointing applies to the train-step suite".into()));
            }
            let train_shape = parse_train_shape(&train_shape)?;
            let bf16 = match dtype.as_str() {
                "f32" => false,
                "bf16" if cli.backend == BackendKind::Cuda => true,
                "bf16" => return Err(CliError::Usage("--dtype bf16 needs --backend cuda".into())),
                other => return Err(CliError::Usage(format!("--dtype {other}: expected f32 or bf16"))),
            };
            let options = bench::BenchOptions {
                suites: suite,
                dims,
                tokens,
                repeats,
                model,
                train_shape,
                base_dtype,
                gradient_checkpointing,
            };
            let records = if bf16 { bench_bf16(device, &options) } else { bench(cli.backend, device, &options) }
                .map_err(CliError::Runtime)?;
            if let Some(path) = json {
                write_atomically(&path, &serde_json::to_string_pretty(&records).expect("json values serialise"))?;
            }
            Ok(format!("backend: {:?}\n{}", cli.backend, bench::render(&records)))
        }
        Command::Generate { model, prompt, chat, max_new_tokens, temperature, top_p, seed, adapter, active_adapter, disable_adapters, base_dtype } => {
            let adapters = adapter_selection(adapter, active_adapter, disable_adapters)?;
            if !(temperature >= 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
                return Err(CliError::Usage("--temperature must be ≥ 0 and --top-p in (0, 1]".into()));
            }
            if !model.exists() {
                return Err(CliError::Usage(format!("--model {}: no such file or directory", model.display())));
            }
            let options = tensor_peft_training::GenerateOptions {
                prompt,
                chat,
                max_new_tokens,
                temperature,
                top_p,
                seed,
                adapters,
                base_dtype,
            };
            let text =
                with_backend!(cli.backend, B => tensor_peft_training::generate::<B>(&model, &options, &backend::device(device))
                .map_err(|e| e.to_string()))
                .map_err(CliError::Runtime)?;
            Ok(format!("{text}\n"))
        }
        Command::Merge { model, adapter, output, overwrite } => {
            if !model.exists() {
                return Err(CliError::Usage(format!("--model {}: no such file or directory", model.display())));
            }
            if output.join("model.safetensors").exists() && !overwrite {
                return Err(CliError::Usage(format!(
                    "--output {} already holds a model; pass --overwrite to replace it",
                    output.display()
                )));
            }
            let summary = with_backend!(cli.backend, B => merge::run::<B>(&model, &adapter, &output, &backend::device(device))
                .map_err(|e| e.to_string()))
            .map_err(CliError::Runtime)?;
            Ok(format!("{summary}\n"))
        }
        Command::Combine { model, adapter, weights, combination, output, overwrite } => {
            let adapters = adapter_selection(adapter, None, false)?.adapters;
            if weights.len() != adapters.len() {
                return Err(CliError::Usage(format!(
                    "--weights: {} weights for {} adapters; give one weight per --adapter",
                    weights.len(),
                    adapters.len()
                )));
            }
            if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
                return Err(CliError::Usage(format!("--weights: {w} is not a finite number")));
            }
            let combination = tensor_peft_models::Combination::parse(&combination)
                .map_err(|e| CliError::Usage(format!("--combination: {e}")))?;
            if !overwrite && std::fs::read_dir(&output).is_ok_and(|mut entries| entries.next().is_some()) {
                return Err(CliError::Usage(format!(
                    "--output {} is not empty; pass --overwrite to replace it",
                    output.display()
                )));
            }
            ArchSpec::from_model_arg(&model).map_err(|e| match e {
                tensor_peft_models::ModelError::UnknownModel(_) => CliError::Usage(e.to_string()),
                other => CliError::Runtime(other.to_string()),
            })?;
            let options = tensor_peft_training::multi_adapter::CombineOptions { adapters, weights, combination, output, overwrite };
            let summary = with_backend!(cli.backend, B => tensor_peft_training::multi_adapter::combine::<B>(&model, &options, &backend::device(device))
                .map_err(|e| e.to_string()))
            .map_err(CliError::Runtime)?;
            Ok(format!("{summary}\n"))
        }
        Command::Embed { model, text } => {
            if !model.is_dir() {
                return Err(CliError::Usage(format!("--model {}: not a model directory", model.display())));
            }
            let json = with_backend!(cli.backend, B => embed::run::<B>(&model, &text, &backend::device(device))
                .map_err(|e| e.to_string()))
            .map_err(CliError::Runtime)?;
            Ok(format!("{json}\n"))
        }
        Command::Selfcheck { steps, lr, seed } => {
            let results = selfcheck(cli.backend, device, steps, lr, seed).map_err(CliError::Runtime)?;
            Ok(format!("backend: {:?}\n{}", cli.backend, demo::render(&results)))
        }
        Command::Compare { config, budget_minutes } => {
            if budget_minutes.is_some_and(|m| m.is_nan() || m <= 0.0) {
                return Err(CliError::Usage("--budget-minutes must be positive".into()));
            }
            // Usage errors in the sweep file keep exit code 2: the inner result is returned as is.
            with_backend!(cli.backend, B => Ok(compare::run::<burn::backend::Autodiff<B>>(&config, budget_minutes, &devices.iter().map(backend::device).collect::<Vec<_>>())))
                .map_err(CliError::Runtime)?
        }
        Command::Finetune(args) => {
            // The global flag is the command line's value of the run's `compute_dtype`.
            let args = finetune::FinetuneArgs { compute_dtype: cli.compute_dtype.clone(), ..*args };
            let config = finetune::train_config(&args)?;
            if !config.batch_size.is_multiple_of(devices.len()) {
                return Err(CliError::Usage(format!(
                    "--batch-size {} is the global batch: it must split evenly over the {} --devices (a multiple of {})",
                    config.batch_size,
                    devices.len(),
                    devices.len()
                )));
            }
            plan::check_fits(&config, args.force)?;
            let report = with_backend!(cli.backend, B => tensor_peft_training::finetune_on::<burn::backend::Autodiff<B>>(&config, &devices.iter().map(backend::device).collect::<Vec<_>>())
                .map_err(|e| e.to_string()))
            .map_err(CliError::Runtime)?;
            Ok(finetune::render_report(&report))
        }
        Command::Eval {
            model,
            adapter,
            active_adapter,
            disable_adapters,
            task,
            data,
            batch_size,
            text_field,
            text_pair_field,
            label_field,
            score_field,
            prompt_field,
            completion_field,
            choices_field,
            answers_field,
            max_new_tokens,
            skip_bad_rows,
            json,
            predictions,
            base_dtype,
        } => {
            let adapters = adapter_selection(adapter, active_adapter, disable_adapters)?;
            let task = tensor_peft_training::TaskKind::parse(&task).map_err(|e| CliError::Usage(e.to_string()))?;
            if let Some(path) = &predictions {
                if task == tensor_peft_training::TaskKind::CausalLm {
                    return Err(CliError::Usage(
                        "--predictions: causal-lm has no single predicted value per example (its metrics are loss and perplexity)".into(),
                    ));
                }
                if task == tensor_peft_training::TaskKind::Dpo {
                    return Err(CliError::Usage(
                        "--predictions: dpo has no single predicted value per example (its metrics are the loss and the rewards)".into(),
                    ));
                }
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
                if !parent.is_dir() {
                    return Err(CliError::Usage(format!("--predictions {}: directory {} does not exist", path.display(), parent.display())));
                }
            }
            if !model.exists() {
                return Err(CliError::Usage(format!("--model {}: no such file or directory", model.display())));
            }
            if batch_size == 0 {
                return Err(CliError::Usage("--batch-size must be at least 1".into()));
            }
            let fields = tensor_peft_training::data::FieldMap {
                text: text_field,
                text_pair: text_pair_field,
                label: label_field,
                score: score_field,
                prompt: prompt_field,
                completion: completion_field,
                choices: choices_field,
                answers: answers_field,
                ..Default::default()
            };
            let options = tensor_peft_training::eval::EvalOptions {
                task,
                fields,
                skip_bad_rows,
                batch_size,
                base_dtype,
                max_new_tokens,
            };
            let evaluation = with_backend!(cli.backend, B => tensor_peft_training::eval::evaluate_selection::<B>(&model, &adapters, &data, &options, &backend::device(device))
                .map_err(|e| e.to_string()))
            .map_err(CliError::Runtime)?;
            if let Some(path) = &predictions {
                let lines: String = evaluation
                    .predictions
                    .iter()
                    .map(|p| serde_json::to_string(p).expect("predictions serialise") + "\n")
                    .collect();
                tensor_peft_models::adapter_file::write_atomically(path, lines.as_bytes())
                    .map_err(|e| CliError::Runtime(e.to_string()))?;
            }
            let metrics = evaluation.metrics;
            if json {
                return Ok(format!("{}\n", serde_json::to_string_pretty(&metrics).expect("numbers serialise")));
            }
            Ok(metrics.iter().map(|(k, v)| format!("{k}: {v:.4}\n")).collect())
        }
        Command::Demo { train_examples, epochs, output } => {
            with_backend!(cli.backend, B => demo::vader::<burn::backend::Autodiff<B>>(train_examples, epochs, &output, &backend::device(device)))
                .map_err(CliError::Runtime)
        }
    }
}

fn selfcheck(
    kind: BackendKind,
    device: &DeviceSpec,
    steps: usize,
    lr: f64,
    seed: u64,
) -> Result<Vec<demo::DemoResult>, String> {
    with_backend!(kind, B => demo::run::<burn::backend::Autodiff<B>>(&backend::device(device), steps, lr, seed))
}

fn bench(
    kind: BackendKind,
    device: &DeviceSpec,
    options: &bench::BenchOptions,
) -> Result<Vec<serde_json::Value>, String> {
    with_backend!(kind, B => bench::run::<burn::backend::Autodiff<B>>(&backend::device(device), options))
}

/// The benchmarks on CUDA in bf16 (the precision GPU fine-tuning runs in).
fn bench_bf16(device: &DeviceSpec, options: &bench::BenchOptions) -> Result<Vec<serde_json::Value>, String> {
    #[cfg(feature = "cuda")]
    {
        type B = burn::backend::Cuda<burn::tensor::bf16>;
        bench::run::<burn::backend::Autodiff<B>>(&backend::device(device), options)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, options);
        Err("the cuda backend is not compiled in".into())
    }
}

/// `--adapter` values (`NAME=DIR`, or a bare `DIR` named `default` as in PEFT), `--active-adapter`
/// and `--disable-adapters`: usage errors for a directory without `adapter_config.json`, repeated
/// names, an unknown active name, and the last two flags without an adapter.
fn adapter_selection(
    values: Vec<String>,
    active: Option<String>,
    disabled: bool,
) -> Result<tensor_peft_training::AdapterSelection, CliError> {
    if values.is_empty() && (active.is_some() || disabled) {
        return Err(CliError::Usage("--active-adapter and --disable-adapters need at least one --adapter".into()));
    }
    let bare = values.len() == 1;
    let mut adapters = Vec::new();
    for value in values {
        // An existing directory is a bare DIR even if its name holds `=`.
        let (name, dir) = match value.split_once('=') {
            Some((name, dir)) if !std::path::Path::new(&value).exists() && !name.is_empty() && !dir.is_empty() => {
                (name.to_string(), std::path::PathBuf::from(dir))
            }
            _ if bare => ("default".to_string(), std::path::PathBuf::from(&value)),
            _ => {
                return Err(CliError::Usage(format!("--adapter {value}: name each of several adapters as NAME=DIR")));
            }
        };
        if !dir.join("adapter_config.json").is_file() {
            return Err(CliError::Usage(format!("--adapter {}: no adapter_config.json there", dir.display())));
        }
        adapters.push((name, dir));
    }
    let selection = tensor_peft_training::AdapterSelection { adapters, active, disabled };
    if !selection.is_empty() {
        selection.active().map_err(|e| CliError::Usage(format!("--adapter / --active-adapter: {e}")))?;
    }
    Ok(selection)
}

/// `--train-shape BxT` (e.g. `4x512`): two positive integers.
fn parse_train_shape(text: &str) -> Result<(usize, usize), CliError> {
    let parsed = text.split_once('x').and_then(|(b, t)| Some((b.parse::<usize>().ok()?, t.parse::<usize>().ok()?)));
    match parsed {
        Some((b, t)) if b > 0 && t > 1 => Ok((b, t)),
        _ => Err(CliError::Usage(format!(
            "--train-shape {text}: expected BATCHxSEQUENCE with a positive batch and a sequence of at least 2, e.g. 4x512"
        ))),
    }
}

/// Writes `text` to a temporary file beside `path`, then renames it into place.
fn write_atomically(path: &std::path::Path, text: &str) -> Result<(), CliError> {
    let tmp = path.with_extension("json.tmp");
    let err = |e: std::io::Error| CliError::Runtime(format!("cannot write {}: {e}", path.display()));
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// The backend and devices of the run, for messages written from the panic hook.
static RUNNING_ON: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The one line for a panic that says a GPU device ran out of memory (CubeCL's `OutOfMemory` and
/// `BufferTooBig` errors), or `None` for any other panic.
fn out_of_memory(msg: &str) -> Option<String> {
    const SIGNS: [&str; 6] = [
        "out-of-memory",
        "out of memory",
        "outofmemory",
        "can't allocate buffer of size",
        "buffertoobig",
        "greater than the maximum buffer size",
    ];
    let says = |line: &str| SIGNS.iter().any(|sign| line.to_lowercase().contains(sign));
    let what: String = msg.lines().find(|l| says(l))?.trim().chars().take(200).collect();
    let on = RUNNING_ON.get().map(String::as_str).unwrap_or("the device");
    Some(format!(
        "{on} ran out of memory ({what}); lower --batch-size or --max-len, add --gradient-checkpointing, \
         hold the base in less memory (--base-dtype bf16 or q8_0), or use a device with more memory \
         (`tpeft plan` estimates a run's peak)"
    ))
}

/// Ends the process from the panic hook, on whatever thread panicked, without the exit handlers:
/// `std::process::exit` runs them (the GPU driver's among them) while the driver's own threads
/// still work. Once, on a loaded machine, a wgpu run that had printed its out-of-memory line then
/// ended by a signal instead of exit code 1 (not reproduced in 7 tries since); without exit
/// handlers there is no such race. The error line is already out (stderr is
/// unbuffered), and files are only ever written whole (temporary file, then rename). Stdout is not
/// flushed: another thread may hold its lock.
fn exit_from_panic(code: i32) -> ! {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `_exit` only ends the process; it touches no memory of ours.
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    std::process::exit(code)
}

/// Counts allocations while `tpeft bench` measures them (until then: one relaxed load per allocation).
#[global_allocator]
static ALLOCATOR: tensor_peft::allocator::CountingAllocator = tensor_peft::allocator::CountingAllocator;

fn main() -> ExitCode {
    tensor_peft::allocator::keep_freed_memory();
    // A backend that fails deep inside Burn (e.g. no GPU device) must still end with one clear
    // line and exit code 1, never a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = panic_text(info.payload());
        // While a GPU device starts, `start_device` reports its failure with what to do.
        if STARTING_DEVICE.load(std::sync::atomic::Ordering::SeqCst) {
            DEVICE_PANIC.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(msg);
            return;
        }
        // A device out of memory is the user's to fix, not a bug: say so, with what to try.
        if let Some(line) = out_of_memory(&msg) {
            eprintln!("error: {line}");
            exit_from_panic(1);
        }
        // Where it failed, for a bug report (not a backtrace: one line).
        let at = info.location().map(|l| format!(" (at {}:{})", l.file(), l.line())).unwrap_or_default();
        let msg = msg.split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" / ");
        eprintln!("error: internal failure: {msg}{at}");
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        }
        exit_from_panic(1);
    }));
    let cli = Cli::parse();
    match run(cli) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
