//! Tasks as burn-train models: examples are tokenised once ([`Encoded`]), padded per batch
//! ([`Batch`]), and run through [`EncoderTask`] (BERT family + head: classification, regression)
//! or [`LmTask`] (LLaMA: causal LM with the loss on completion tokens, prompt-based classification
//! by verbalizer words, multiple choice by the log-likelihood of each choice, generation scored by
//! exact match and F1). Both implement burn-train's `TrainStep` / `InferenceStep` and report
//! host-side [`StepStats`] to the metrics.
//!
//! Multiple choice and generation train as causal LM on the correct continuation (MeZO's
//! `--train_as_classification False`, which LoRETTA's code inherits for COPA, ReCoRD, SQuAD and
//! DROP); only their validation and test examples are encoded for scoring ([`Encoder::training`]).

use crate::data::{Content, Example, Labels, TaskKind};
use crate::error::{Result, TrainError};
use crate::loss::linear_cross_entropy;
use crate::metrics::{ChoiceOutcome, GenerationOutcome, StepStats};
use burn::module::{AutodiffModule, Module};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn::train::metric::Adaptor;
use burn::train::{InferenceStep, ItemLazy, TrainOutput, TrainStep};
use std::path::Path;
use std::sync::Arc;
use tensor_peft_models::adapter_file::{AdapterConfig, save_adapter_with_extras};
use tensor_peft_models::heads::head_to_hf;
use tensor_peft_models::tokenizer::{ChatMessage, TextTokenizer};
use tensor_peft_models::{AdapterSlots, ArchSpec, Bert, BlockStack, Llama, SequenceClassifier, StackInput};

/// What a tokenised example is trained to produce.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A class index.
    Class(usize),
    /// A real score.
    Score(f32),
    /// Next-token prediction; positions `>= from` of `ids` are supervised.
    Completion {
        /// Index in `ids` of the first supervised token.
        from: usize,
    },
    /// Multiple choice (evaluation): one sequence per choice, the prompt followed by the choice.
    /// `Encoded::ids` is the correct choice's sequence.
    Choices {
        /// 0-based index of the correct choice.
        label: usize,
        /// Each choice's token ids (prompt, cut from the left when it does not fit, then the
        /// choice) and the index of its first choice token.
        rows: Vec<(Vec<u32>, usize)>,
        /// Each choice's length in characters (for lm-eval-harness's `acc_norm`).
        chars: Vec<usize>,
    },
    /// Generation (evaluation): `ids` are the prompt, the first answer and EOS, supervised from
    /// `from` (the LM loss); greedy decoding continues `ids[..from]`.
    Generation {
        /// Index in `ids` of the first answer token.
        from: usize,
        /// The gold answers.
        answers: Vec<String>,
    },
    /// A DPO pair: `ids` is the prompt followed by the chosen response, positions `>= from` of
    /// `ids` and of `rejected` are scored.
    Preference(Box<crate::dpo::Pair>),
}

/// A tokenised example.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Token ids (with the tokenizer's special tokens).
    pub ids: Vec<u32>,
    /// Token types (sentence A / B).
    pub types: Vec<u32>,
    /// What to learn.
    pub target: Target,
}

/// How examples of a task become token ids.
pub struct Encoder<'a> {
    /// The tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// The task.
    pub task: TaskKind,
    /// Longest sequence kept (tokens).
    pub max_len: usize,
    /// Label vocabulary (label tasks).
    pub labels: Option<&'a Labels>,
    /// Prompt template of `lm-classification`: `{text}` (and `{text_pair}`) are replaced.
    pub template: &'a str,
    /// End-of-sequence token appended to completions.
    pub eos: Option<u32>,
    /// Encoding the training split: multiple-choice and generation examples become completions
    /// of their correct choice or first answer (scoring needs neither).
    pub training: bool,
}

/// Counts of what [`Encoder::encode_all`] truncated or dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeReport {
    /// Examples cut to `max_len`.
    pub truncated: usize,
    /// Causal-LM examples whose prompt alone fills `max_len` (nothing left to learn).
    pub dropped: usize,
}

impl Encoder<'_> {
    /// Tokenises every example; an example that cannot be used is an error naming its line.
    pub fn encode_all(&self, examples: &[Example]) -> Result<(Vec<Encoded>, EncodeReport)> {
        let mut report = EncodeReport::default();
        let mut out = Vec::with_capacity(examples.len());
        for e in examples {
            match self.encode(e, &mut report)? {
                Some(enc) => out.push(enc),
                None => report.dropped += 1,
            }
        }
        Ok((out, report))
    }

    fn tokens(&self, text: &str, e: &Example) -> Result<Vec<u32>> {
        self.tokenizer.encode(text).map_err(|err| e.origin.error(err.to_string()))
    }

    fn encode(&self, e: &Example, report: &mut EncodeReport) -> Result<Option<Encoded>> {
        let mismatch =
            |what: &str| e.origin.error(format!("this row is {what}, which task `{}` does not take", self.task.name()));
        match (self.task, &e.content) {
            (TaskKind::Classification | TaskKind::Regression, Content::Labelled { text, text_pair, .. })
            | (TaskKind::Classification | TaskKind::Regression, Content::Scored { text, text_pair, .. }) => {
                let target = match &e.content {
                    Content::Labelled { label, .. } if self.task == TaskKind::Classification => {
                        Target::Class(self.labels.expect("label tasks have labels").index(label, &e.origin)?)
                    }
                    Content::Scored { score, .. } if self.task == TaskKind::Regression => Target::Score(*score),
                    _ => return Err(mismatch("of another task")),
                };
                let (ids, types) = match text_pair {
                    Some(pair) => {
                        let (ids, types) = self
                            .tokenizer
                            .encode_pair(text, pair, self.max_len)
                            .map_err(|err| e.origin.error(err.to_string()))?;
                        if self.tokens(text, e)?.len() + self.tokens(pair, e)?.len() + 3 > self.max_len {
                            report.truncated += 1;
                        }
                        (ids, types)
                    }
                    None => {
                        let mut ids =
                            self.tokenizer.encode_with_specials(text).map_err(|err| e.origin.error(err.to_string()))?;
                        if ids.len() > self.max_len {
                            // Keep the closing special token (BERT's [SEP]).
                            let last = *ids.last().expect("non-empty");
                            ids.truncate(self.max_len);
                            *ids.last_mut().expect("non-empty") = last;
                            report.truncated += 1;
                        }
                        let types = vec![0; ids.len()];
                        (ids, types)
                    }
                };
                Ok(Some(Encoded { ids, types, target }))
            }
            (TaskKind::LmClassification, Content::Labelled { text, text_pair, label }) => {
                let class = self.labels.expect("label tasks have labels").index(label, &e.origin)?;
                let prompt =
                    self.template.replace("{text}", text).replace("{text_pair}", text_pair.as_deref().unwrap_or(""));
                let mut ids = self.tokens(&prompt, e)?;
                if ids.len() > self.max_len {
                    // Keep the end of the prompt: the verbalizer is predicted after it.
                    ids.drain(..ids.len() - self.max_len);
                    report.truncated += 1;
                }
                let types = vec![0; ids.len()];
                Ok(Some(Encoded { ids, types, target: Target::Class(class) }))
            }
            (TaskKind::CausalLm, Content::Completion { prompt, completion }) => {
                let prompt_ids = self.tokens(prompt, e)?;
                let completion_ids =
                    self.tokenizer.encode(completion).map_err(|err| e.origin.error(err.to_string()))?;
                // The completion is tokenised on its own: drop a BOS the tokenizer may prepend.
                let skip = usize::from(self.tokenizer.add_bos && !completion_ids.is_empty());
                let mut ids = prompt_ids.clone();
                ids.extend_from_slice(&completion_ids[skip..]);
                ids.extend(self.eos);
                self.finish_lm(ids, prompt_ids.len(), report)
            }
            (TaskKind::CausalLm, Content::Chat(messages)) => {
                // Supervise the last assistant turn; earlier turns are context.
                let last = messages.iter().rposition(|m| m.role == "assistant").expect("checked when reading");
                let context: Vec<ChatMessage> = messages[..last].to_vec();
                let prompt = self
                    .tokenizer
                    .apply_chat_template(&context, true)
                    .map_err(|err| e.origin.error(err.to_string()))?;
                let full = self
                    .tokenizer
                    .apply_chat_template(&messages[..=last], false)
                    .map_err(|err| e.origin.error(err.to_string()))?;
                let prompt_ids = self.tokens(&prompt, e)?;
                let ids = self.tokens(&full, e)?;
                if ids.len() <= prompt_ids.len() || ids[..prompt_ids.len()] != prompt_ids[..] {
                    return Err(e
                        .origin
                        .error("the chat template does not render the prompt as a prefix of the conversation"));
                }
                self.finish_lm(ids, prompt_ids.len(), report)
            }
            (TaskKind::LmMultipleChoice, Content::MultipleChoice { prompt, choices, label }) => {
                let prompt_ids = self.prompt_tokens(prompt, e)?;
                let continuations: Vec<Vec<u32>> = choices
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let ids = self.continuation(c, e)?;
                        if ids.is_empty() {
                            return Err(e.origin.error(format!("choice {i} ({c:?}) is no tokens")));
                        }
                        Ok(ids)
                    })
                    .collect::<Result<_>>()?;
                if self.training {
                    // The LM loss on the correct choice alone, without an end-of-sequence token.
                    let mut ids = prompt_ids.clone();
                    ids.extend_from_slice(&continuations[*label]);
                    return self.finish_lm(ids, prompt_ids.len(), report);
                }
                let mut cut = false;
                let rows: Vec<(Vec<u32>, usize)> =
                    continuations.iter().map(|c| self.fit_for_scoring(&prompt_ids, c, &mut cut)).collect();
                report.truncated += usize::from(cut);
                let chars = choices.iter().map(|c| c.chars().count()).collect();
                let ids = rows[*label].0.clone();
                let types = vec![0; ids.len()];
                Ok(Some(Encoded { ids, types, target: Target::Choices { label: *label, rows, chars } }))
            }
            (TaskKind::LmGeneration, Content::Question { prompt, answers }) => {
                let prompt_ids = self.prompt_tokens(prompt, e)?;
                let mut answer = self.continuation(&answers[0], e)?;
                answer.extend(self.eos);
                if self.training {
                    let mut ids = prompt_ids.clone();
                    ids.extend_from_slice(&answer);
                    return self.finish_lm(ids, prompt_ids.len(), report);
                }
                let mut cut = false;
                let (ids, from) = self.fit_for_scoring(&prompt_ids, &answer, &mut cut);
                report.truncated += usize::from(cut);
                let types = vec![0; ids.len()];
                Ok(Some(Encoded { ids, types, target: Target::Generation { from, answers: answers.clone() } }))
            }
            (_, Content::MultipleChoice { .. }) => Err(mismatch("a multiple-choice question")),
            (_, Content::Question { .. }) => Err(mismatch("a question with answers")),
            (_, Content::Labelled { .. }) => Err(mismatch("a labelled text")),
            (_, Content::Scored { .. }) => Err(mismatch("a scored text")),
            (_, Content::Completion { .. }) => Err(mismatch("a prompt/completion pair")),
            (TaskKind::Dpo, Content::Preference { prompt, chosen, rejected }) => {
                let prompt_ids = self.tokens(prompt, e)?;
                // Responses are tokenised on their own, as completions are, and end with EOS.
                let response = |text: &str| -> Result<Vec<u32>> {
                    let mut ids = self.continuation(text, e)?;
                    ids.extend(self.eos);
                    Ok(ids)
                };
                let pair = crate::dpo::encode_pair(
                    prompt_ids,
                    response(chosen)?,
                    response(rejected)?,
                    self.tokenizer.add_bos,
                    self.max_len,
                );
                if pair.1 {
                    report.truncated += 1;
                }
                Ok(Some(pair.0))
            }
            (_, Content::Chat(_)) => Err(mismatch("a conversation")),
            (_, Content::Preference { .. }) => Err(mismatch("a preference pair")),
        }
    }

    /// The prompt's tokens; a prompt of no tokens cannot precede a scored token.
    fn prompt_tokens(&self, prompt: &str, e: &Example) -> Result<Vec<u32>> {
        let ids = self.tokens(prompt, e)?;
        if ids.is_empty() {
            return Err(e.origin.error("the prompt is no tokens"));
        }
        Ok(ids)
    }

    /// A continuation tokenised on its own, without the BOS the tokenizer may prepend.
    fn continuation(&self, text: &str, e: &Example) -> Result<Vec<u32>> {
        let mut ids = self.tokens(text, e)?;
        if self.tokenizer.add_bos && !ids.is_empty() {
            ids.remove(0);
        }
        Ok(ids)
    }

    /// `prompt` + `continuation` in at most `max_len` tokens, and the index of the first
    /// continuation token: the prompt is cut from the left when needed (as lm-eval-harness does),
    /// and only a continuation longer than the whole length is cut itself. Sets `cut` when
    /// anything was cut.
    fn fit_for_scoring(&self, prompt: &[u32], continuation: &[u32], cut: &mut bool) -> (Vec<u32>, usize) {
        let total = prompt.len() + continuation.len();
        if total <= self.max_len {
            return ([prompt, continuation].concat(), prompt.len());
        }
        *cut = true;
        if continuation.len() < self.max_len {
            let keep = self.max_len - continuation.len();
            ([&prompt[prompt.len() - keep..], continuation].concat(), keep)
        } else {
            ([&prompt[prompt.len() - 1..], &continuation[..self.max_len - 1]].concat(), 1)
        }
    }

    fn finish_lm(&self, mut ids: Vec<u32>, prompt_len: usize, report: &mut EncodeReport) -> Result<Option<Encoded>> {
        if ids.len() > self.max_len {
            ids.truncate(self.max_len);
            report.truncated += 1;
        }
        // Position t predicts ids[t+1]: at least one supervised token must remain.
        if prompt_len >= ids.len() {
            return Ok(None);
        }
        let types = vec![0; ids.len()];
        Ok(Some(Encoded { ids, types, target: Target::Completion { from: prompt_len.max(1) } }))
    }
}

/// A padded batch (right padding).
#[derive(Debug, Clone)]
pub struct Batch<B: Backend> {
    /// Token ids `[B, T]`.
    pub ids: Tensor<B, 2, Int>,
    /// Token types `[B, T]`.
    pub types: Tensor<B, 2, Int>,
    /// 1 for tokens, 0 for padding `[B, T]`.
    pub mask: Tensor<B, 2>,
    /// Class indices `[B]` (label tasks).
    pub classes: Option<(Tensor<B, 1, Int>, Vec<usize>)>,
    /// Scores `[B]` (regression).
    pub scores: Option<(Tensor<B, 1>, Vec<f32>)>,
    /// Next-token targets `[B, T]` and their weights `[B, T]` (1 = supervised), with the count.
    pub next_tokens: Option<(Tensor<B, 2, Int>, Tensor<B, 2>, usize)>,
    /// Index of each example's last token `[B]`.
    pub last: Tensor<B, 1, Int>,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Multiple choice: the rows are the examples' choices, not the examples.
    pub choices: Option<ChoiceBatch<B>>,
    /// Generation: each example's prompt ids and gold answers (empty for other batches).
    pub generation: Vec<(Vec<u32>, Vec<String>)>,
    /// DPO: what is scored in each sequence and the reference log-probabilities; `ids` then holds
    /// the `n` chosen sequences followed by the `n` rejected ones (`[2n, T]`).
    pub pairs: Option<crate::dpo::PairBatch<B>>,
    /// Data-parallel training: which part of the step's global batch this is (`None` on one device).
    pub shard: Option<Shard>,
}

/// One device's part of a data-parallel step's global batch (see [`crate::finetune_on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Its position in the global batch (0 = the first rows).
    pub index: usize,
    /// The seed of its random draws (dropout masks), drawn on the device's worker thread.
    pub seed: u64,
}

/// How the rows of a multiple-choice batch (one per choice, each example's choices in turn) map
/// to its examples. The batch's `next_tokens` weight every choice token of every row.
#[derive(Debug, Clone)]
pub struct ChoiceBatch<B: Backend> {
    /// 1 for each row that is its example's correct choice, 0 for the others `[R]`.
    pub correct: Tensor<B, 1>,
    /// Per example: its first row, its number of choices and the index of the correct one.
    pub examples: Vec<(usize, usize, usize)>,
    /// Per row: the choice's length in characters.
    pub chars: Vec<usize>,
    /// Per row: the choice's scored tokens.
    pub row_tokens: Vec<usize>,
    /// Scored tokens of the correct rows (the loss's units).
    pub correct_tokens: usize,
}

/// Pads `items` into a batch on `device`. Multiple-choice items (evaluation) give one row per
/// choice; they are not mixed with other items.
pub fn make_batch<B: Backend>(items: &[&Encoded], pad: u32, device: &B::Device) -> Batch<B> {
    if items.first().is_some_and(|e| matches!(e.target, Target::Preference(_))) {
        return crate::dpo::make_pair_batch(items, pad, device);
    }
    if items.iter().any(|e| matches!(e.target, Target::Choices { .. })) {
        return choice_batch(items, pad, device);
    }
    let b = items.len();
    let t = items.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![pad as i64; b * t];
    let mut types = vec![0i64; b * t];
    let mut mask = vec![0f32; b * t];
    let mut last = Vec::with_capacity(b);
    let mut tokens = 0;
    for (row, e) in items.iter().enumerate() {
        for (k, (&id, &ty)) in e.ids.iter().zip(&e.types).enumerate() {
            ids[row * t + k] = id as i64;
            types[row * t + k] = ty as i64;
            mask[row * t + k] = 1.0;
        }
        last.push(e.ids.len().saturating_sub(1) as i64);
        tokens += e.ids.len();
    }
    let classes: Vec<usize> =
        items.iter().filter_map(|e| if let Target::Class(c) = e.target { Some(c) } else { None }).collect();
    let scores: Vec<f32> =
        items.iter().filter_map(|e| if let Target::Score(s) = e.target { Some(s) } else { None }).collect();
    let next_tokens =
        items.iter().any(|e| matches!(e.target, Target::Completion { .. } | Target::Generation { .. })).then(|| {
            let mut targets = vec![0i64; b * t];
            let mut weights = vec![0f32; b * t];
            let mut count = 0;
            for (row, e) in items.iter().enumerate() {
                if let Target::Completion { from } | Target::Generation { from, .. } = e.target {
                    for pos in from.saturating_sub(1)..e.ids.len().saturating_sub(1) {
                        targets[row * t + pos] = e.ids[pos + 1] as i64;
                        weights[row * t + pos] = 1.0;
                        count += 1;
                    }
                }
            }
            (
                Tensor::from_data(TensorData::new(targets, [b, t]), device),
                Tensor::from_data(TensorData::new(weights, [b, t]), device),
                count,
            )
        });
    Batch {
        ids: Tensor::from_data(TensorData::new(ids, [b, t]), device),
        types: Tensor::from_data(TensorData::new(types, [b, t]), device),
        mask: Tensor::from_data(TensorData::new(mask, [b, t]), device),
        classes: (classes.len() == b).then(|| {
            let data: Vec<i64> = classes.iter().map(|&c| c as i64).collect();
            (Tensor::from_data(TensorData::new(data, [b]), device), classes)
        }),
        scores: (scores.len() == b).then(|| (Tensor::from_data(TensorData::new(scores.clone(), [b]), device), scores)),
        next_tokens,
        last: Tensor::from_data(TensorData::new(last, [b]), device),
        tokens,
        choices: None,
        pairs: None,
        shard: None,
        generation: items
            .iter()
            .filter_map(|e| match &e.target {
                Target::Generation { from, answers } => Some((e.ids[..*from].to_vec(), answers.clone())),
                _ => None,
            })
            .collect(),
    }
}

/// The batch of multiple-choice items: every choice of every item is a row, its choice tokens
/// weighted in `next_tokens`.
fn choice_batch<B: Backend>(items: &[&Encoded], pad: u32, device: &B::Device) -> Batch<B> {
    let mut rows: Vec<(&[u32], usize)> = Vec::new();
    let mut correct = Vec::new();
    let mut examples = Vec::with_capacity(items.len());
    let mut all_chars = Vec::new();
    for e in items {
        if let Target::Choices { label, rows: choices, chars } = &e.target {
            examples.push((rows.len(), choices.len(), *label));
            for (k, (ids, from)) in choices.iter().enumerate() {
                rows.push((ids, *from));
                correct.push(if k == *label { 1.0f32 } else { 0.0 });
            }
            all_chars.extend_from_slice(chars);
        }
    }
    let r = rows.len();
    let t = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![pad as i64; r * t];
    let mut mask = vec![0f32; r * t];
    let mut targets = vec![0i64; r * t];
    let mut weights = vec![0f32; r * t];
    let mut last = Vec::with_capacity(r);
    let mut row_tokens = Vec::with_capacity(r);
    let (mut tokens, mut count, mut correct_tokens) = (0, 0, 0);
    for (row, (seq, from)) in rows.iter().enumerate() {
        for (k, &id) in seq.iter().enumerate() {
            ids[row * t + k] = id as i64;
            mask[row * t + k] = 1.0;
        }
        // Position p predicts seq[p + 1]: the choice tokens seq[from..] are predicted at from - 1 on.
        let scored = from.saturating_sub(1)..seq.len().saturating_sub(1);
        for pos in scored.clone() {
            targets[row * t + pos] = seq[pos + 1] as i64;
            weights[row * t + pos] = 1.0;
        }
        row_tokens.push(scored.len());
        count += scored.len();
        if correct[row] > 0.0 {
            correct_tokens += scored.len();
        }
        last.push(seq.len().saturating_sub(1) as i64);
        tokens += seq.len();
    }
    Batch {
        ids: Tensor::from_data(TensorData::new(ids, [r, t]), device),
        types: Tensor::zeros([r, t], device),
        mask: Tensor::from_data(TensorData::new(mask, [r, t]), device),
        classes: None,
        scores: None,
        next_tokens: Some((
            Tensor::from_data(TensorData::new(targets, [r, t]), device),
            Tensor::from_data(TensorData::new(weights, [r, t]), device),
            count,
        )),
        last: Tensor::from_data(TensorData::new(last, [r]), device),
        tokens,
        choices: Some(ChoiceBatch {
            correct: Tensor::from_data(TensorData::new(correct, [r]), device),
            examples,
            chars: all_chars,
            row_tokens,
            correct_tokens,
        }),
        generation: Vec::new(),
        pairs: None,
        shard: None,
    }
}

/// Mean cross-entropy of `logits` `[B, C]` against `classes`, and the argmax predictions.
fn classification_loss<B: Backend>(
    logits: Tensor<B, 2>,
    classes: &(Tensor<B, 1, Int>, Vec<usize>),
) -> (Tensor<B, 1>, Vec<usize>) {
    let [b, c] = logits.dims();
    let predicted = argmax_rows(&logits, c);
    let log_p = log_softmax(logits, 1);
    let picked = log_p.gather(1, classes.0.clone().reshape([b, 1]));
    (picked.mean().neg().reshape([1]), predicted)
}

fn argmax_rows<B: Backend>(logits: &Tensor<B, 2>, c: usize) -> Vec<usize> {
    let values = logits.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    values
        .chunks(c.max(1))
        .map(|row| row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best }))
        .collect()
}

pub(crate) fn scalar<B: Backend>(t: &Tensor<B, 1>) -> f64 {
    t.clone().into_data().convert::<f64>().to_vec::<f64>().ok().and_then(|v| v.first().copied()).unwrap_or(f64::NAN)
}

/// What a step hands to burn-train: the host-side statistics.
#[derive(Debug, Clone)]
pub struct TaskOutput {
    /// The batch's statistics.
    pub stats: StepStats,
    /// The batch's [`Shard::index`] in a data-parallel step.
    pub shard: Option<usize>,
}

impl ItemLazy for TaskOutput {
    type ItemSync = TaskOutput;
    fn sync(self) -> Self {
        self
    }
}

impl Adaptor<StepStats> for TaskOutput {
    fn adapt(&self) -> StepStats {
        self.stats.clone()
    }
}

/// A BERT-family encoder with a trainable head, for classification (`n_outputs` classes) and
/// regression (one output, MSE loss).
#[derive(Module, Debug)]
pub struct EncoderTask<B: Backend> {
    /// Encoder (with adapters) and head.
    pub net: SequenceClassifier<B>,
    /// Regression instead of classification.
    pub regression: bool,
    /// Train with gradient checkpointing ([`crate::recompute`]).
    pub gradient_checkpointing: bool,
}

impl<B: Backend> EncoderTask<B> {
    /// Loss and statistics of a batch.
    pub fn run(&self, batch: Batch<B>) -> (Tensor<B, 1>, StepStats) {
        self.run_with(batch, |input| self.net.encoder.stack_forward(&input))
    }

    /// [`Self::run`] with the encoder's hidden states computed by `hidden`.
    fn run_with(
        &self,
        batch: Batch<B>,
        hidden: impl FnOnce(StackInput<B>) -> Tensor<B, 3>,
    ) -> (Tensor<B, 1>, StepStats) {
        let mask = batch.mask.clone();
        let hidden = hidden(StackInput { ids: batch.ids, types: Some(batch.types), mask: Some(batch.mask) });
        let logits = self.net.classify(hidden, mask);
        let [b, c] = logits.dims();
        let mut stats = StepStats { units: b, tokens: batch.tokens, ..Default::default() };
        let loss = if self.regression {
            let (target, scores) = batch.scores.expect("regression batches carry scores");
            let predicted = logits.reshape([b]);
            stats.predicted_scores = predicted.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
            stats.scores = scores;
            let diff = predicted - target;
            (diff.clone() * diff).mean().reshape([1])
        } else {
            let classes = batch.classes.expect("classification batches carry classes");
            let (loss, predicted) = classification_loss(logits, &classes);
            debug_assert!(c > 1);
            stats.predicted = predicted;
            stats.labels = classes.1;
            loss
        };
        stats.loss = scalar(&loss);
        (loss, stats)
    }
}

/// What decoding the answers of `lm-generation` needs besides the model.
#[derive(Debug, Clone)]
pub struct Decoding {
    /// Turns the generated ids into text.
    pub tokenizer: Arc<TextTokenizer>,
    /// Upper bound on generated tokens per answer.
    pub max_new_tokens: usize,
}

/// A causal LM trained on completions (`verbalizer` empty) or as a prompt-based classifier: the
/// logits of the `verbalizer` tokens after the prompt are the class scores. Multiple-choice
/// batches are scored by each choice's log-likelihood; generation batches are also decoded
/// greedily when `decoding` is set.
#[derive(Module, Debug)]
pub struct LmTask<B: Backend> {
    /// The (adapted) model.
    pub net: Llama<B>,
    /// Token id of each class's word (lm-classification), empty for causal LM.
    pub verbalizer: Vec<usize>,
    /// Greedy decoding of generation batches (lm-generation); `None` scores the loss only.
    pub decoding: Option<Decoding>,
    /// Train with gradient checkpointing ([`crate::recompute`]).
    pub gradient_checkpointing: bool,
}

impl<B: Backend> LmTask<B> {
    /// Loss and statistics of a batch.
    pub fn run(&self, batch: Batch<B>) -> (Tensor<B, 1>, StepStats) {
        self.run_with(batch, |input| self.net.stack_forward(&input))
    }

    /// [`Self::run`] with the model's final hidden states computed by `hidden`: every loss is a
    /// function of them.
    fn run_with(
        &self,
        mut batch: Batch<B>,
        hidden: impl FnOnce(StackInput<B>) -> Tensor<B, 3>,
    ) -> (Tensor<B, 1>, StepStats) {
        let mut stats = StepStats { tokens: batch.tokens, ..Default::default() };
        if let Some(choices) = batch.choices.take() {
            let (loss, outcomes) = self.score_choices(batch, choices, hidden);
            stats.units = outcomes.1;
            stats.choices = outcomes.0;
            stats.loss = scalar(&loss);
            return (loss, stats);
        }
        if let Some(decoding) = &self.decoding {
            stats.generations = batch
                .generation
                .iter()
                .map(|(prompt, answers)| GenerationOutcome::score(self.decode(decoding, prompt), answers))
                .collect();
        }
        let loss = if self.verbalizer.is_empty() {
            let (targets, weights, count) = batch.next_tokens.expect("causal-LM batches carry targets");
            let hidden = hidden(StackInput::ids(batch.ids));
            let [b, t, d] = hidden.dims();
            stats.units = count;
            linear_cross_entropy(
                hidden.reshape([b * t, d]),
                self.net.output_head(),
                self.net.output_head_is_trainable(),
                targets.reshape([b * t]),
                weights.reshape([b * t]),
                count,
                None,
            )
        } else {
            let logits = self.net.logits(hidden(StackInput::ids(batch.ids)));
            let [b, _, v] = logits.dims();
            let index = batch.last.reshape([b, 1, 1]).repeat_dim(2, v);
            let at_last = logits.gather(1, index).reshape([b, v]);
            let device = at_last.device();
            let words: Vec<i64> = self.verbalizer.iter().map(|&w| w as i64).collect();
            let words = Tensor::<B, 1, Int>::from_data(TensorData::new(words, [self.verbalizer.len()]), &device);
            let class_logits = at_last.select(1, words);
            let classes = batch.classes.expect("lm-classification batches carry classes");
            let (loss, predicted) = classification_loss(class_logits, &classes);
            stats.units = b;
            stats.predicted = predicted;
            stats.labels = classes.1;
            loss
        };
        stats.loss = scalar(&loss);
        (loss, stats)
    }
}

impl<B: Backend> LmTask<B> {
    /// The LM loss on the correct choices (mean per token) and each example's outcome, with the
    /// loss's units: the sum of the log-probabilities of each row's choice tokens, from one
    /// forward pass over all rows.
    fn score_choices(
        &self,
        batch: Batch<B>,
        choices: ChoiceBatch<B>,
        hidden: impl FnOnce(StackInput<B>) -> Tensor<B, 3>,
    ) -> (Tensor<B, 1>, (Vec<ChoiceOutcome>, usize)) {
        let (targets, weights, _) = batch.next_tokens.expect("multiple-choice batches carry targets");
        let logits = self.net.logits(hidden(StackInput::ids(batch.ids)));
        let [r, t, _] = logits.dims();
        let picked = log_softmax(logits, 2).gather(2, targets.reshape([r, t, 1])).reshape([r, t]);
        let sums = (picked * weights).sum_dim(1).reshape([r]);
        let units = choices.correct_tokens;
        let loss = (sums.clone() * choices.correct).sum().neg().div_scalar(units.max(1) as f64).reshape([1]);
        let sums: Vec<f64> = sums.into_data().convert::<f64>().to_vec::<f64>().unwrap_or_default();
        let outcomes = choices
            .examples
            .iter()
            .filter(|(first, n, _)| first + n <= sums.len())
            .map(|&(first, n, label)| {
                let rows = first..first + n;
                ChoiceOutcome::from_scores(
                    label,
                    &sums[rows.clone()],
                    &choices.chars[rows.clone()],
                    &choices.row_tokens[rows],
                )
            })
            .collect();
        (loss, (outcomes, units))
    }

    /// Greedy decoding after `prompt` up to `max_new_tokens` or the end-of-sequence token; the
    /// text up to its first newline (MeZO's stop string for SQuAD and DROP), trimmed.
    fn decode(&self, decoding: &Decoding, prompt: &[u32]) -> String {
        let eos = decoding.tokenizer.eos;
        let mut out = self.net.generate_greedy(prompt, decoding.max_new_tokens, eos);
        if out.last().copied() == eos {
            out.pop();
        }
        let text = decoding.tokenizer.decode(&out).unwrap_or_default();
        text.split('\n').next().unwrap_or_default().trim().to_string()
    }
}

/// Implements burn-train's `TrainStep` / `InferenceStep` for a task model with a
/// `run(&self, Batch<B>) -> (loss, StepStats)` method, a
/// `run_with(&self, Batch<B>, hidden: impl FnOnce(StackInput<B>) -> Tensor<B, 3>)` method that
/// takes the stack's hidden states from `hidden`, a `gradient_checkpointing` flag and the block
/// stack `$stack<B>` at `self.<path>` (with the flag, the step recomputes each block in the
/// backward: [`crate::recompute`]).
macro_rules! steps {
    ($task:ident, $stack:ident at $($path:ident).+) => {
        impl<B: AutodiffBackend> $task<B> {
            /// The first pass of a checkpointed training step ([`crate::recompute`]): the loss, the
            /// statistics and what the backward needs.
            pub fn checkpointed_forward(
                &self,
                batch: Batch<B>,
            ) -> (Tensor<B, 1>, StepStats, $crate::recompute::Recompute<B, $stack<B>>) {
                let mut pass = None;
                let (loss, stats) = self.run_with(batch, |input| {
                    let (recompute, hidden) = $crate::recompute::Recompute::forward(&self.$($path).+, &input);
                    pass = Some(recompute);
                    hidden
                });
                (loss, stats, pass.expect("every loss reads the stack's hidden states"))
            }

            /// The gradients of a training step's `loss`: a plain backward, or with `pass` (from
            /// [`Self::checkpointed_forward`]) the blocks recomputed one at a time.
            pub fn gradients(
                &self,
                loss: Tensor<B, 1>,
                pass: Option<$crate::recompute::Recompute<B, $stack<B>>>,
            ) -> burn::optim::GradientsParams {
                match pass {
                    Some(pass) => pass.backward(&self.$($path).+, loss, self),
                    None => burn::optim::GradientsParams::from_grads(loss.backward(), self),
                }
            }
        }

        impl<B: AutodiffBackend> TrainStep for $task<B> {
            type Input = Batch<B>;
            type Output = TaskOutput;
            fn step(&self, batch: Batch<B>) -> TrainOutput<TaskOutput> {
                // A data-parallel worker draws its shard's dropout masks from a generator of its own.
                let shard = batch.shard;
                let _draws = shard.map(|s| tensor_peft_kernels::rng::ThreadDraws::seeded(s.seed));
                let (loss, stats, pass) = if self.gradient_checkpointing {
                    let (loss, stats, pass) = self.checkpointed_forward(batch);
                    (loss, stats, Some(pass))
                } else {
                    let (loss, stats) = self.run(batch);
                    (loss, stats, None)
                };
                TrainOutput { grads: self.gradients(loss, pass), item: TaskOutput { stats, shard: shard.map(|s| s.index) } }
            }
        }

        impl<B: Backend> InferenceStep for $task<B> {
            type Input = Batch<B>;
            type Output = TaskOutput;
            fn step(&self, batch: Batch<B>) -> TaskOutput {
                TaskOutput { stats: self.run(batch).1, shard: None }
            }
        }
    };
}
pub(crate) use steps;
steps!(EncoderTask, Bert at net.encoder);
steps!(LmTask, Llama at net);

/// The task-specific side of training: a trainable model made from a base model.
pub trait TaskModel<B: AutodiffBackend>:
    TrainStep<Input = Batch<B>, Output = TaskOutput> + AutodiffModule<B> + core::fmt::Display + 'static
where
    Self::InnerModule: InferenceStep<Input = Batch<B::InnerBackend>, Output = TaskOutput>,
{
    /// The adapted base model inside: its adapters are what the adapter file holds.
    type Adapted: AdapterSlots<B> + Clone;

    /// The adapted base model (without the task's head).
    fn adapted(&self) -> &Self::Adapted;

    /// Writes the adapter directory: the adapter factors and the other trained tensors (head,
    /// norms).
    fn write_adapter(&self, spec: &ArchSpec, config: &AdapterConfig, dir: &Path) -> Result<()> {
        save_adapter_with_extras(&mut self.adapted().clone(), spec, config, dir, &extras(self))?;
        Ok(())
    }

    /// Trained scalars in the adapters (excluding heads and norms).
    fn adapter_params(&self) -> usize {
        crate::checkpoint::trainable_params(self)
            .iter()
            .filter(|(p, ..)| is_adapter_path(p))
            .map(|(_, s, ..)| s.iter().product::<usize>())
            .sum()
    }

    /// The adapter factors that start at zero, which LoRA+ trains faster
    /// ([`tensor_peft_models::zero_init_factors`]).
    fn zero_init_factors(&self, spec: &ArchSpec) -> std::collections::HashSet<burn::module::ParamId> {
        tensor_peft_models::zero_init_factors(&mut self.adapted().clone(), spec).into_iter().collect()
    }

    /// `‖ΔW‖_F / ‖W‖_F` of every adapted projection, by site name
    /// ([`tensor_peft_models::update_ratios`]).
    fn update_ratios(&self, spec: &ArchSpec) -> Vec<(String, f64)> {
        tensor_peft_models::update_ratios(&mut self.adapted().clone(), spec)
    }

    /// Fills in what the task's loss takes from the base model, once, before training starts
    /// (and before a resumed run restores its checkpoint), `batch_size` items at a time, padding
    /// with `pad`: DPO's reference log-probabilities ([`crate::dpo::fill_reference`]). Nothing
    /// for the other tasks.
    fn prepare_items(&self, items: &mut [Encoded], batch_size: usize, pad: u32, device: &B::Device) -> Result<()> {
        let _ = (items, batch_size, pad, device);
        Ok(())
    }
}

impl<B: AutodiffBackend> TaskModel<B> for EncoderTask<B> {
    type Adapted = Bert<B>;
    fn adapted(&self) -> &Bert<B> {
        &self.net.encoder
    }

    /// The head is written as transformers' `classifier` (PEFT's `modules_to_save`).
    fn write_adapter(&self, spec: &ArchSpec, config: &AdapterConfig, dir: &Path) -> Result<()> {
        let extras: Vec<_> = extras(self).iter().map(|(name, shape, values)| head_to_hf(name, shape, values)).collect();
        save_adapter_with_extras(&mut self.adapted().clone(), spec, config, dir, &extras)?;
        Ok(())
    }
}

impl<B: AutodiffBackend> TaskModel<B> for LmTask<B> {
    type Adapted = Llama<B>;
    fn adapted(&self) -> &Llama<B> {
        &self.net
    }
}

/// Whether a parameter path belongs to an adapter (factor or shared factor).
fn is_adapter_path(path: &str) -> bool {
    path.split('.').any(|seg| seg == "adapter" || seg.ends_with("_adapter") || seg == "shared")
}

/// Trained tensors that are not adapter factors, named without the task wrapper's `net.`.
fn extras<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    crate::checkpoint::trainable_params(model)
        .into_iter()
        .filter(|(p, ..)| !is_adapter_path(p))
        .map(|(p, s, v, _)| (p.strip_prefix("net.").unwrap_or(&p).to_string(), s, v))
        .collect()
}

/// The single-token id of each verbalizer word (looked up with a leading space, as it follows the
/// prompt), or an error naming the word that is not one token.
pub fn verbalizer_ids(tokenizer: &TextTokenizer, words: &[String]) -> Result<Vec<usize>> {
    words
        .iter()
        .map(|w| {
            let spaced = format!(" {}", w.trim());
            let mut ids = tokenizer
                .encode(&spaced)
                .map_err(|e| TrainError::Option { option: "verbalizers", reason: e.to_string() })?;
            if tokenizer.add_bos && !ids.is_empty() {
                ids.remove(0);
            }
            match ids.as_slice() {
                [id] => Ok(*id as usize),
                _ => Err(TrainError::Option {
                    option: "verbalizers",
                    reason: format!("`{w}` is {} tokens ({ids:?}); each label word must be a single token", ids.len()),
                }),
            }
        })
        .collect()
}

/// Turns off autodiff-only state: the inference copy of a task model.
pub fn inference<B: AutodiffBackend, M: AutodiffModule<B>>(m: &M) -> M::InnerModule {
    m.valid()
}
