//! `tpeft plan` and the memory check `tpeft finetune` makes before it loads a model: the training
//! library's estimate ([`tensor_peft_training::plan`]) for a model argument, a method and targets.

use crate::CliError;
use crate::params::{count, thousands};
use tensor_peft_adapters::MethodConfig;
use tensor_peft_models::precision::stored_projections;
use tensor_peft_models::{ArchSpec, BaseDType, Targets};
use tensor_peft_training::TrainConfig;
use tensor_peft_training::data::TaskKind;
use tensor_peft_training::plan::{MemoryPlan, PlanRequest, available_memory, plan};

/// What a run's memory depends on.
pub struct RunShape<'a> {
    /// Preset, HF directory, config.json or GGUF file.
    pub model: &'a str,
    /// The adapter.
    pub method: &'a MethodConfig,
    /// Where it goes.
    pub targets: &'a Targets,
    /// The frozen base's precision.
    pub base_dtype: BaseDType,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Tokens per example.
    pub max_len: usize,
    /// Whether the loss runs over the vocabulary (`None`: by family, LLaMA yes, BERT no).
    pub lm: Option<bool>,
    /// Gradient checkpointing (`--gradient-checkpointing`).
    pub gradient_checkpointing: bool,
}

/// The architecture and the estimate for `run`.
pub fn estimate(run: &RunShape) -> Result<(ArchSpec, MemoryPlan), CliError> {
    let spec = ArchSpec::from_model_arg(run.model).map_err(|e| match e {
        tensor_peft_models::ModelError::UnknownModel(_) => CliError::Usage(e.to_string()),
        other => CliError::Runtime(other.to_string()),
    })?;
    let stored = stored_projections(run.model.as_ref()).map_err(|e| CliError::Runtime(e.to_string()))?;
    let trainable = count(&spec, run.method, run.targets)?.total();
    let request = PlanRequest {
        spec: &spec,
        base: run.base_dtype,
        stored,
        trainable_params: trainable,
        batch_size: run.batch_size,
        max_len: run.max_len,
        vocabulary_loss: run.lm.unwrap_or(spec.family == tensor_peft_models::Family::Llama),
        gradient_checkpointing: run.gradient_checkpointing,
    };
    let estimate = plan(&request).map_err(CliError::Usage)?;
    Ok((spec, estimate))
}

/// Refuses (exit 2) a run whose estimated peak exceeds the memory available, with the estimate,
/// unless `force`.
pub fn check_fits(config: &TrainConfig, force: bool) -> Result<(), CliError> {
    let Some(available) = available_memory() else { return Ok(()) };
    let targets = match (&config.target_modules, &config.target_regex) {
        (Some(names), _) => Targets::Names(names.clone()),
        (None, Some(re)) => Targets::Regex(re.clone()),
        (None, None) => Targets::Default,
    };
    let model = config.model.to_string_lossy();
    let run = RunShape {
        model: &model,
        method: &config.method,
        targets: &targets,
        base_dtype: config.base_dtype,
        // A DPO batch of B pairs runs 2B sequences (chosen and rejected) at once.
        batch_size: if config.task == TaskKind::Dpo { 2 * config.batch_size } else { config.batch_size },
        max_len: config.max_len,
        lm: Some(matches!(
            config.task,
            TaskKind::CausalLm
                | TaskKind::LmClassification
                | TaskKind::LmMultipleChoice
                | TaskKind::LmGeneration
                | TaskKind::Dpo
        )),
        gradient_checkpointing: config.gradient_checkpointing,
    };
    let (_, estimate) = estimate(&run)?;
    if force || estimate.total() <= available {
        return Ok(());
    }
    Err(CliError::Usage(format!(
        "this run needs an estimated {} MiB (`tpeft plan --model {model} --base-dtype {} --batch-size {} --max-len {}{}` \
         shows the parts) but {} MiB are available; use a smaller --base-dtype, --batch-size or --max-len{}, \
         or pass --force to try anyway",
        thousands(estimate.total_mib() as usize),
        config.base_dtype,
        config.batch_size,
        config.max_len,
        if config.gradient_checkpointing { " --gradient-checkpointing" } else { "" },
        if config.gradient_checkpointing { "" } else { ", --gradient-checkpointing" },
        thousands((available >> 20) as usize),
    )))
}
