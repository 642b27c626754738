//! Evaluation of a saved adapter (`tpeft eval`): the base model, the adapter directory (factors,
//! head, label names, prompt), a data file; the task's metrics over the whole file.

use crate::checkpoint::assign_params;
use crate::data::{self, Example, FieldMap, Labels, TaskKind};
use crate::dpo::{DpoTask, fill_reference};
use crate::error::{Result, TrainError};
use crate::metrics::Accumulator;
use crate::multi_adapter::{AdapterSelection, load_selection};
use crate::task::{Decoding, Encoder, EncoderTask, LmTask, verbalizer_ids};
use crate::trainer::{BaseModel, TaskInfo, evaluate_items, load_base};
use burn::tensor::backend::Backend;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use tensor_peft_models::SequenceClassifier;
use tensor_peft_models::adapter_file::{HEAD_MODULES, read_adapter_config};

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The task (must be the one the adapter was trained for).
    pub task: TaskKind,
    /// Column/key names of the data file.
    pub fields: FieldMap,
    /// Skip malformed rows instead of stopping.
    pub skip_bad_rows: bool,
    /// Examples per batch.
    pub batch_size: usize,
    /// The precision the frozen base model is held at.
    pub base_dtype: tensor_peft_models::BaseDType,
    /// Longest greedy answer of `lm-generation` (default: the one the adapter was trained with).
    pub max_new_tokens: Option<usize>,
}

/// One example's prediction, for error analysis and paired comparisons between runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// 0-based position among the data's examples (file order, after skipped rows).
    pub index: usize,
    /// 1-based line of the example in its file.
    pub line: usize,
    /// The gold label or score.
    pub expected: Target,
    /// What the model predicted.
    pub predicted: Target,
}

/// A label (classification tasks) or a score (regression), as written to the predictions file.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Target {
    /// A class, by its name in the adapter's label mapping.
    Label(String),
    /// A regression score.
    Score(f32),
    /// A choice, by its 0-based index (lm-multiple-choice).
    Choice(usize),
    /// The gold answers (lm-generation).
    Answers(Vec<String>),
    /// A generated answer (lm-generation).
    Text(String),
}

/// The result of [`evaluate_with_predictions`].
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The task's metrics over the whole data (as [`evaluate`] returns them).
    pub metrics: BTreeMap<String, f64>,
    /// One entry per example in data order (for `lm-multiple-choice` the choice of the highest
    /// summed log-likelihood, for `lm-generation` the decoded answer); empty for `causal-lm` and
    /// `dpo`, whose examples have no single predicted value (their metrics are losses,
    /// perplexity and rewards).
    pub predictions: Vec<Prediction>,
}

/// Metrics of `adapter` on `model` over `data` (a file or `builtin:<name>`).
pub fn evaluate<B: Backend>(
    model: &Path,
    adapter: &Path,
    data_path: &Path,
    options: &EvalOptions,
    device: &B::Device,
) -> Result<BTreeMap<String, f64>> {
    Ok(evaluate_with_predictions::<B>(model, adapter, data_path, options, device)?.metrics)
}

/// [`evaluate`], also returning every example's prediction.
pub fn evaluate_with_predictions<B: Backend>(
    model: &Path,
    adapter: &Path,
    data_path: &Path,
    options: &EvalOptions,
    device: &B::Device,
) -> Result<Evaluation> {
    evaluate_selection::<B>(model, &AdapterSelection::single(adapter), data_path, options, device)
}

/// [`evaluate_with_predictions`] with several adapters loaded on the base model (`tpeft eval
/// --adapter a=dir --adapter b=dir --active-adapter b`): the active one is evaluated, or, with
/// `selection.disabled`, the base model (keeping the active adapter's task head, which the base
/// model lacks). The task, labels and prompt come from the active adapter's configuration.
pub fn evaluate_selection<B: Backend>(
    model: &Path,
    selection: &AdapterSelection,
    data_path: &Path,
    options: &EvalOptions,
    device: &B::Device,
) -> Result<Evaluation> {
    let (_, adapter) = selection.active()?;
    let config = read_adapter_config(adapter)?;
    let info: TaskInfo =
        config.task.clone().and_then(|t| serde_json::from_value(t).ok()).ok_or_else(|| TrainError::Checkpoint {
            path: adapter.join("adapter_config.json"),
            reason: "has no `tensor_peft.task` section: it was not written by `tpeft finetune`".into(),
        })?;
    if info.task != options.task {
        return Err(TrainError::Option {
            option: "task",
            reason: format!("the adapter was trained for {}, not {}", info.task.name(), options.task.name()),
        });
    }
    let d = data::read_source(data_path, options.task, &options.fields, options.skip_bad_rows)?;
    if !d.skipped.is_empty() {
        eprintln!("warning: skipped {} bad rows, e.g. {}", d.skipped.len(), d.skipped[0]);
    }
    let examples = d.examples;
    let labels = info.labels.clone().map(|names| Labels { names });
    let n_classes = labels.as_ref().map_or(0, Labels::len);
    let lm = options.task == TaskKind::CausalLm;
    if options.max_new_tokens == Some(0) {
        return Err(TrainError::Option { option: "max-new-tokens", reason: "must be at least 1".into() });
    }
    let prefixed = |extras: tensor_peft_models::adapter_file::TensorMap| -> BTreeMap<_, _> {
        extras.into_iter().map(|(k, v)| (format!("net.{k}"), v)).collect()
    };
    let weights = adapter.join(tensor_peft_models::adapter_file::WEIGHTS_FILE);
    let acc = match load_base::<B>(model, options.base_dtype, device)? {
        BaseModel::Encoder(bert, spec, tokenizer) => {
            let (bert, _, extras) = load_selection(bert, &spec, selection)?;
            // Without its trained head the classifier would be evaluated with a random one.
            if !extras.keys().any(|name| is_task_head(name)) {
                return Err(TrainError::Checkpoint {
                    path: weights.clone(),
                    reason: format!(
                        "holds no trained task head (`classifier.*`), which {} needs: evaluate an adapter written by `tpeft finetune --task {}`",
                        options.task.name(),
                        options.task.name()
                    ),
                });
            }
            let extras = extras
                .into_iter()
                .filter(|(name, _)| !selection.disabled || is_task_head(name))
                .map(|(name, (shape, values))| {
                    let (name, shape, values) = tensor_peft_models::heads::head_from_hf(&name, &shape, &values);
                    (name, (shape, values))
                })
                .collect();
            let mut net = SequenceClassifier::new(bert, info.n_outputs);
            if info.head == crate::config::HeadKind::Tt {
                net = net.with_tt_pooler()?;
            }
            let task =
                EncoderTask { net, regression: options.task == TaskKind::Regression, gradient_checkpointing: false };
            let task = assign_params(task, prefixed(extras), &weights)?;
            let encoder = Encoder {
                tokenizer: &tokenizer,
                task: options.task,
                max_len: info.max_len,
                labels: labels.as_ref(),
                template: "",
                eos: None,
                training: false,
            };
            let (items, _) = encoder.encode_all(&examples)?;
            let pad = tokenizer.token_id("[PAD]").unwrap_or(0);
            evaluate_items(&task, &items, options.batch_size, pad, device)
        }
        BaseModel::Decoder(llama, spec, tokenizer) if options.task == TaskKind::Dpo => {
            // The reference is the base as loaded: neither the adapter nor trained norms.
            let base = llama.clone();
            let (llama, _, mut extras) = load_selection(llama, &spec, selection)?;
            if selection.disabled {
                extras.clear(); // trained norms belong to the adapter, not to the base model
            }
            let beta = info.dpo_beta.unwrap_or(crate::dpo::DEFAULT_BETA);
            let task =
                assign_params(DpoTask { net: llama, beta, gradient_checkpointing: false }, prefixed(extras), &weights)?;
            let encoder = Encoder {
                tokenizer: &tokenizer,
                task: options.task,
                max_len: info.max_len,
                labels: None,
                template: "",
                eos: tokenizer.eos,
                training: false,
            };
            let (mut items, _) = encoder.encode_all(&examples)?;
            let pad = tokenizer.eos.unwrap_or(0);
            fill_reference(&base, &mut items, options.batch_size, pad, device)?;
            evaluate_items(&task, &items, options.batch_size, pad, device)
        }
        BaseModel::Decoder(llama, spec, tokenizer) => {
            let (llama, _, mut extras) = load_selection(llama, &spec, selection)?;
            if selection.disabled {
                extras.clear(); // trained norms belong to the adapter, not to the base model
            }
            let verbalizer = if options.task == TaskKind::LmClassification {
                verbalizer_ids(&tokenizer, &info.verbalizers)?
            } else {
                Vec::new()
            };
            let decoding = (options.task == TaskKind::LmGeneration).then(|| Decoding {
                tokenizer: std::sync::Arc::new(tokenizer.clone()),
                max_new_tokens: options.max_new_tokens.unwrap_or(info.max_new_tokens),
            });
            let task = assign_params(
                LmTask { net: llama, verbalizer, decoding, gradient_checkpointing: false },
                prefixed(extras),
                &weights,
            )?;
            let encoder = Encoder {
                tokenizer: &tokenizer,
                task: options.task,
                max_len: info.max_len,
                labels: labels.as_ref(),
                template: &info.template,
                eos: tokenizer.eos,
                training: false,
            };
            let (items, _) = encoder.encode_all(&examples)?;
            evaluate_items(&task, &items, options.batch_size, tokenizer.eos.unwrap_or(0), device)
        }
    };
    let metrics = acc.metrics(n_classes, lm);
    let predictions =
        if lm || options.task == TaskKind::Dpo { Vec::new() } else { predictions(&acc, &examples, labels.as_ref())? };
    Ok(Evaluation { metrics, predictions })
}

/// Whether the extra tensor `name` of an adapter file belongs to a task head (transformers'
/// `classifier`, the `head` of older files, the TT pooler) rather than to the base model (norms).
fn is_task_head(name: &str) -> bool {
    let module = name.split('.').next().unwrap_or_default();
    HEAD_MODULES.contains(&module) || module == "head" || module == "tt_pooler"
}

/// Pairs the accumulated per-example outputs with the examples they came from. Label, score,
/// multiple-choice and generation tasks never drop an example while encoding for evaluation, so
/// outputs and examples align one to one.
fn predictions(acc: &Accumulator, examples: &[Example], labels: Option<&Labels>) -> Result<Vec<Prediction>> {
    let name = |i: usize| -> Target {
        Target::Label(labels.and_then(|l| l.names.get(i)).cloned().unwrap_or_else(|| i.to_string()))
    };
    let pairs: Vec<(Target, Target)> = if !acc.choices().is_empty() {
        acc.choices().iter().map(|c| (Target::Choice(c.label), Target::Choice(c.by_sum))).collect()
    } else if !acc.generations().is_empty() {
        let answers = examples.iter().map(|e| match &e.content {
            data::Content::Question { answers, .. } => answers.clone(),
            _ => Vec::new(),
        });
        answers.zip(acc.generations()).map(|(a, g)| (Target::Answers(a), Target::Text(g.text.clone()))).collect()
    } else if acc.labels().is_empty() {
        acc.scores().iter().zip(acc.predicted_scores()).map(|(&e, &p)| (Target::Score(e), Target::Score(p))).collect()
    } else {
        acc.labels().iter().zip(acc.predicted()).map(|(&e, &p)| (name(e), name(p))).collect()
    };
    if pairs.len() != examples.len() {
        return Err(TrainError::Option {
            option: "predictions",
            reason: format!("{} outputs for {} examples", pairs.len(), examples.len()),
        });
    }
    Ok(pairs
        .into_iter()
        .zip(examples)
        .enumerate()
        .map(|(index, ((expected, predicted), e))| Prediction { index, line: e.origin.line, expected, predicted })
        .collect())
}
