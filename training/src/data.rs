//! Data sets: JSONL / CSV / TSV readers with field mapping, label vocabularies, the seeded
//! train/valid/test split, and loaders for the real corpora fetched by `scripts/fetch-assets.sh`
//! (VADER movie-review snippets, chatterbot conversations).
//!
//! Every row keeps the file and line it came from, so a bad row is reported as `file:line: why`.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tensor_peft_models::tokenizer::ChatMessage;

/// The fine-tuning tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Sentence or sentence-pair classification with an encoder and a trained head.
    Classification,
    /// Sentence-pair (or single) regression, STS-B style, with an encoder and a trained head.
    Regression,
    /// Instruction / chat fine-tuning of a causal LM, loss on completion tokens only.
    CausalLm,
    /// Prompt-based classification with a causal LM: the label whose verbalizer word scores highest.
    LmClassification,
    /// Multiple choice with a causal LM (COPA, ReCoRD style): trained with the LM loss on the
    /// correct choice, evaluated by the log-likelihood of each choice after the prompt.
    LmMultipleChoice,
    /// Question answering by generation with a causal LM (SQuAD, DROP style): trained with the LM
    /// loss on the answer, evaluated by greedy decoding, exact match and token F1.
    LmGeneration,
    /// Direct preference optimisation of a causal LM on `prompt` / `chosen` / `rejected` rows,
    /// against the base model without adapters ([`crate::dpo`]).
    Dpo,
}

/// Task names as written on the command line.
pub const TASK_NAMES: [&str; 7] =
    ["classification", "regression", "causal-lm", "lm-classification", "lm-multiple-choice", "lm-generation", "dpo"];

impl TaskKind {
    /// Parses a task name.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "classification" => Self::Classification,
            "regression" => Self::Regression,
            "causal-lm" => Self::CausalLm,
            "lm-classification" => Self::LmClassification,
            "lm-multiple-choice" => Self::LmMultipleChoice,
            "lm-generation" => Self::LmGeneration,
            "dpo" => Self::Dpo,
            other => {
                return Err(TrainError::Option {
                    option: "task",
                    reason: format!("unknown task `{other}`; expected one of {}", TASK_NAMES.join(", ")),
                });
            }
        })
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Classification => "classification",
            Self::Regression => "regression",
            Self::CausalLm => "causal-lm",
            Self::LmClassification => "lm-classification",
            Self::LmMultipleChoice => "lm-multiple-choice",
            Self::LmGeneration => "lm-generation",
            Self::Dpo => "dpo",
        }
    }

    /// Whether the task runs on an encoder (BERT family) with a trained head.
    pub fn is_encoder_task(self) -> bool {
        matches!(self, Self::Classification | Self::Regression)
    }

    /// Whether the task predicts a label (and so needs a label vocabulary).
    pub fn has_labels(self) -> bool {
        matches!(self, Self::Classification | Self::LmClassification)
    }
}

/// Which column/key holds which part of an example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FieldMap {
    /// The (first) text.
    pub text: String,
    /// The optional second text of a pair.
    pub text_pair: String,
    /// The class label (int or string).
    pub label: String,
    /// The regression score.
    pub score: String,
    /// The prompt of a causal-LM example.
    pub prompt: String,
    /// The completion of a causal-LM example.
    pub completion: String,
    /// A chat: a list of `{"role", "content"}` objects.
    pub messages: String,
    /// The candidate continuations of a multiple-choice example (a list of strings).
    pub choices: String,
    /// The gold answers of a generation example (a string, a list of strings, or SQuAD's
    /// `{"text": [...]}`).
    pub answers: String,
    /// The preferred response of a DPO row.
    pub chosen: String,
    /// The dispreferred response of a DPO row.
    pub rejected: String,
}

impl Default for FieldMap {
    fn default() -> Self {
        Self {
            text: "text".into(),
            text_pair: "text_pair".into(),
            label: "label".into(),
            score: "score".into(),
            prompt: "prompt".into(),
            completion: "completion".into(),
            messages: "messages".into(),
            choices: "choices".into(),
            answers: "answers".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
        }
    }
}

/// Where an example came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
}

impl Origin {
    /// A row error at this origin.
    pub fn error(&self, reason: impl Into<String>) -> TrainError {
        TrainError::Row { path: self.path.clone(), line: self.line, reason: reason.into() }
    }
}

/// The content of one example, by task.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// A text (or text pair) with a label, kept as text until the vocabulary is known.
    Labelled {
        /// First text.
        text: String,
        /// Optional second text.
        text_pair: Option<String>,
        /// The label as written in the file.
        label: String,
    },
    /// A text (or pair) with a real-valued score.
    Scored {
        /// First text.
        text: String,
        /// Optional second text.
        text_pair: Option<String>,
        /// The score.
        score: f32,
    },
    /// A prompt and its completion.
    Completion {
        /// Text the model is given.
        prompt: String,
        /// Text the model learns to produce.
        completion: String,
    },
    /// A conversation; the model learns the assistant turns.
    Chat(Vec<ChatMessage>),
    /// A prompt, its candidate continuations and the index of the correct one.
    MultipleChoice {
        /// Text the choices follow.
        prompt: String,
        /// The candidate continuations, appended to the prompt as written.
        choices: Vec<String>,
        /// 0-based index of the correct choice.
        label: usize,
    },
    /// A prompt and the answers a generation may match (the first one is trained).
    Question {
        /// Text the answer follows.
        prompt: String,
        /// Gold answers, at least one.
        answers: Vec<String>,
    },
    /// A prompt with a preferred and a dispreferred response (DPO).
    Preference {
        /// Text both responses follow.
        prompt: String,
        /// The preferred response.
        chosen: String,
        /// The dispreferred response.
        rejected: String,
    },
}

/// One example and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// What it holds.
    pub content: Content,
    /// File and line.
    pub origin: Origin,
}

/// A parsed data file: the good examples and how many bad rows were skipped.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Rows skipped because of `--skip-bad-rows`, with their errors.
    pub skipped: Vec<String>,
}

/// A row as a map from field name to JSON value (CSV cells become strings).
type Row = serde_json::Map<String, serde_json::Value>;

fn text_field(row: &Row, key: &str, origin: &Origin, required: bool) -> Result<Option<String>> {
    match row.get(key) {
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        None | Some(serde_json::Value::Null) if !required => Ok(None),
        None | Some(serde_json::Value::Null) => {
            Err(origin.error(format!("missing field `{key}` (use --{}-field to map another column)", flag_of(key))))
        }
        Some(other) => Err(origin.error(format!("field `{key}` must be a string, found {other}"))),
    }
}

fn flag_of(key: &str) -> &str {
    match key {
        "text_pair" => "text-pair",
        k => k,
    }
}

/// The prompt of a multiple-choice or generation row: `fields.prompt`, else `fields.text`.
fn prompt_field(row: &Row, fields: &FieldMap, origin: &Origin) -> Result<String> {
    let key =
        if row.contains_key(&fields.prompt) || !row.contains_key(&fields.text) { &fields.prompt } else { &fields.text };
    let prompt = text_field(row, key, origin, true)?.unwrap_or_default();
    if prompt.is_empty() {
        return Err(origin.error(format!("field `{key}` is empty: the first scored token needs a prompt before it")));
    }
    Ok(prompt)
}

/// A multiple-choice row: the prompt, a list of at least two string choices, an integer label
/// that indexes them.
fn multiple_choice_row(row: &Row, fields: &FieldMap, origin: &Origin) -> Result<Content> {
    let prompt = prompt_field(row, fields, origin)?;
    let key = &fields.choices;
    let choices: Vec<String> = match row.get(key) {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                serde_json::Value::String(s) if !s.is_empty() => Ok(s.clone()),
                other => Err(origin.error(format!("`{key}[{i}]` must be a non-empty string, found {other}"))),
            })
            .collect::<Result<_>>()?,
        None | Some(serde_json::Value::Null) => {
            return Err(origin.error(format!("missing field `{key}` (use --choices-field to map another key)")));
        }
        Some(other) => return Err(origin.error(format!("field `{key}` must be a list of strings, found {other}"))),
    };
    if choices.len() < 2 {
        return Err(origin.error(format!("field `{key}` has {} choice(s); at least two are needed", choices.len())));
    }
    let label = match row.get(&fields.label) {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
        None | Some(serde_json::Value::Null) => {
            return Err(
                origin.error(format!("missing field `{}` (use --label-field to map another key)", fields.label))
            );
        }
        Some(_) => None,
    };
    match label {
        Some(l) if (l as usize) < choices.len() => Ok(Content::MultipleChoice { prompt, choices, label: l as usize }),
        _ => Err(origin.error(format!(
            "field `{}` must be the 0-based index of the correct choice (0 to {}), found {}",
            fields.label,
            choices.len() - 1,
            row.get(&fields.label).map_or("nothing".to_string(), |v| v.to_string())
        ))),
    }
}

/// A generation row: the prompt and its gold answers (`fields.answers`, else `answer`).
fn question_row(row: &Row, fields: &FieldMap, origin: &Origin) -> Result<Content> {
    let prompt = prompt_field(row, fields, origin)?;
    let key = if row.contains_key(&fields.answers) || !row.contains_key("answer") {
        fields.answers.as_str()
    } else {
        "answer"
    };
    let strings = |items: &[serde_json::Value], at: &str| -> Result<Vec<String>> {
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                serde_json::Value::String(s) => Ok(s.clone()),
                other => Err(origin.error(format!("`{at}[{i}]` must be a string, found {other}"))),
            })
            .collect()
    };
    let answers = match row.get(key) {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(items)) => strings(items, key)?,
        // SQuAD's own layout: {"text": [...], "answer_start": [...]}.
        Some(serde_json::Value::Object(o)) if o.get("text").is_some_and(|t| t.is_array()) => {
            strings(o["text"].as_array().expect("checked"), &format!("{key}.text"))?
        }
        None | Some(serde_json::Value::Null) => {
            return Err(origin.error(format!("missing field `{key}` (use --answers-field to map another key)")));
        }
        Some(other) => {
            return Err(origin.error(format!(
                "field `{key}` must be a string, a list of strings or {{\"text\": [strings]}}, found {other}"
            )));
        }
    };
    if answers.is_empty() || answers[0].trim().is_empty() {
        return Err(origin.error(format!("field `{key}` has no (non-empty first) answer to learn")));
    }
    Ok(Content::Question { prompt, answers })
}

/// Parses one row into the example `task` needs.
fn parse_row(task: TaskKind, fields: &FieldMap, row: &Row, origin: Origin) -> Result<Example> {
    let content = match task {
        TaskKind::LmMultipleChoice => multiple_choice_row(row, fields, &origin)?,
        TaskKind::LmGeneration => question_row(row, fields, &origin)?,
        TaskKind::Classification | TaskKind::LmClassification => {
            let text = text_field(row, &fields.text, &origin, true)?.unwrap_or_default();
            let text_pair = text_field(row, &fields.text_pair, &origin, false)?;
            let label = match row.get(&fields.label) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
                Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
                Some(serde_json::Value::Bool(b)) => u8::from(*b).to_string(),
                None | Some(serde_json::Value::Null) => {
                    return Err(origin
                        .error(format!("missing field `{}` (use --label-field to map another column)", fields.label)));
                }
                Some(other) => {
                    return Err(origin.error(format!(
                        "field `{}` must be an integer or a string label, found {other}",
                        fields.label
                    )));
                }
            };
            Content::Labelled { text, text_pair, label }
        }
        TaskKind::Regression => {
            let text = text_field(row, &fields.text, &origin, true)?.unwrap_or_default();
            let text_pair = text_field(row, &fields.text_pair, &origin, false)?;
            let score = match row.get(&fields.score) {
                Some(serde_json::Value::Number(n)) => n.as_f64(),
                Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match score {
                Some(s) if s.is_finite() => Content::Scored { text, text_pair, score: s as f32 },
                _ => {
                    return Err(origin.error(format!(
                        "field `{}` must be a finite number, found {}",
                        fields.score,
                        row.get(&fields.score).map_or("nothing".to_string(), |v| v.to_string())
                    )));
                }
            }
        }
        TaskKind::CausalLm => match row.get(&fields.messages) {
            Some(serde_json::Value::Array(items)) => {
                let mut messages = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let role = item.get("role").and_then(|r| r.as_str());
                    let content = item.get("content").and_then(|c| c.as_str());
                    match (role, content) {
                        (Some(role @ ("system" | "user" | "assistant")), Some(content)) => {
                            messages.push(ChatMessage { role: role.into(), content: content.into() })
                        }
                        _ => {
                            return Err(origin.error(format!(
                                "`{}[{i}]` must be {{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": string}}, found {item}",
                                fields.messages
                            )));
                        }
                    }
                }
                if !messages.iter().any(|m| m.role == "assistant") {
                    return Err(origin.error(format!("`{}` has no assistant turn to learn", fields.messages)));
                }
                Content::Chat(messages)
            }
            Some(other) => {
                return Err(
                    origin.error(format!("field `{}` must be a list of messages, found {other}", fields.messages))
                );
            }
            None => {
                let prompt = text_field(row, &fields.prompt, &origin, true)?.unwrap_or_default();
                let completion = text_field(row, &fields.completion, &origin, true)?.unwrap_or_default();
                if completion.is_empty() {
                    return Err(origin.error(format!("field `{}` is empty", fields.completion)));
                }
                Content::Completion { prompt, completion }
            }
        },
        TaskKind::Dpo => {
            let prompt = text_field(row, &fields.prompt, &origin, true)?.unwrap_or_default();
            let chosen = text_field(row, &fields.chosen, &origin, true)?.unwrap_or_default();
            let rejected = text_field(row, &fields.rejected, &origin, true)?.unwrap_or_default();
            for (key, value) in [(&fields.chosen, &chosen), (&fields.rejected, &rejected)] {
                if value.trim().is_empty() {
                    return Err(origin.error(format!("field `{key}` is empty")));
                }
            }
            Content::Preference { prompt, chosen, rejected }
        }
    };
    Ok(Example { content, origin })
}

/// The format of a data file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated with a header row.
    Csv,
    /// Tab-separated with a header row.
    Tsv,
}

impl Format {
    /// The format of `path` (`.jsonl`/`.json`, `.csv`, `.tsv`/`.tab`).
    pub fn of(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("jsonl" | "json" | "ndjson") => Ok(Self::Jsonl),
            Some("csv") => Ok(Self::Csv),
            Some("tsv" | "tab") => Ok(Self::Tsv),
            _ => Err(TrainError::Data {
                path: path.into(),
                reason: "unknown data format: expected a .jsonl, .csv or .tsv file".into(),
            }),
        }
    }
}

/// Reads a JSONL, CSV or TSV file into examples of `task`. A bad row is an error naming its line,
/// unless `skip_bad_rows`, in which case it is counted in [`Dataset::skipped`].
pub fn read_file(path: &Path, task: TaskKind, fields: &FieldMap, skip_bad_rows: bool) -> Result<Dataset> {
    let format = Format::of(path)?;
    let bytes = std::fs::read(path).map_err(TrainError::io(path))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| TrainError::Data { path: path.into(), reason: format!("not UTF-8 text ({e})") })?;
    let mut data = Dataset::default();
    let mut push = |row: Result<Example>| -> Result<()> {
        match row {
            Ok(example) => data.examples.push(example),
            Err(e) if skip_bad_rows => data.skipped.push(e.to_string()),
            Err(e) => return Err(e),
        }
        Ok(())
    };
    match format {
        Format::Jsonl => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let origin = Origin { path: path.into(), line: i + 1 };
                let row = match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(serde_json::Value::Object(row)) => parse_row(task, fields, &row, origin),
                    Ok(other) => Err(origin.error(format!("expected a JSON object, found {}", kind_of(&other)))),
                    Err(e) => Err(origin.error(format!("invalid JSON: {e}"))),
                };
                push(row)?;
            }
        }
        Format::Csv | Format::Tsv => {
            let mut reader = csv::ReaderBuilder::new()
                .delimiter(if format == Format::Csv { b',' } else { b'\t' })
                .flexible(false)
                .from_reader(text.as_bytes());
            let headers = reader
                .headers()
                .map_err(|e| TrainError::Data {
                    path: path.into(),
                    reason: format!("cannot read the header row: {e}"),
                })?
                .clone();
            for record in reader.records() {
                let row = match record {
                    Ok(record) => {
                        let line = record.position().map_or(0, |p| p.line() as usize);
                        let origin = Origin { path: path.into(), line };
                        let row: Row = headers
                            .iter()
                            .zip(record.iter())
                            .map(|(h, v)| (h.to_string(), serde_json::Value::String(v.to_string())))
                            .collect();
                        parse_row(task, fields, &row, origin)
                    }
                    Err(e) => {
                        let line = e.position().map_or(0, |p| p.line() as usize);
                        Err(TrainError::Row { path: path.into(), line, reason: e.to_string() })
                    }
                };
                push(row)?;
            }
        }
    }
    if data.examples.is_empty() {
        return Err(TrainError::Data {
            path: path.into(),
            reason: match data.skipped.first() {
                Some(first) => format!("no usable rows ({} bad, the first: {first})", data.skipped.len()),
                None => "the data set is empty".into(),
            },
        });
    }
    Ok(data)
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The label vocabulary: label text → class index. Integer labels keep numeric order; string
/// labels are sorted. Saved with the adapter (`id2label`) so evaluation uses the same indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    /// `names[i]` is the label text of class `i`.
    pub names: Vec<String>,
}

impl Labels {
    /// The vocabulary of the labels in `examples` (at least two classes).
    pub fn from_examples(examples: &[Example], path: &Path) -> Result<Self> {
        let mut names: Vec<String> = examples
            .iter()
            .filter_map(|e| match &e.content {
                Content::Labelled { label, .. } => Some(label.clone()),
                _ => None,
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if names.iter().all(|n| n.parse::<i64>().is_ok()) {
            names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
        }
        if names.len() < 2 {
            return Err(TrainError::Data {
                path: path.into(),
                reason: format!("a classification data set needs at least two labels, found {names:?}"),
            });
        }
        Ok(Self { names })
    }

    /// The class index of `label` at `origin`.
    pub fn index(&self, label: &str, origin: &Origin) -> Result<usize> {
        self.names.iter().position(|n| n == label).ok_or_else(|| {
            origin.error(format!("unknown label `{label}`; the training data has labels {:?}", self.names))
        })
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are no classes.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// SplitMix64: a tiny, well-mixed generator, easy to reproduce in any language (the Python
/// reference scripts use the same one so that splits are identical).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A Fisher–Yates permutation of `0..n` driven by SplitMix64(`seed`).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

/// Index sets of a seeded split: `valid_percent`% and `test_percent`% of `n` (rounded down) go to
/// valid and test, the rest to train, in the order of [`permutation`]`(n, seed)`.
pub fn split_indices(n: usize, seed: u64, valid_percent: usize, test_percent: usize) -> [Vec<usize>; 3] {
    let idx = permutation(n, seed);
    let n_valid = n * valid_percent / 100;
    let n_test = n * test_percent / 100;
    let n_train = n - n_valid - n_test;
    [idx[..n_train].to_vec(), idx[n_train..n_train + n_valid].to_vec(), idx[n_train + n_valid..].to_vec()]
}

/// `examples` picked at `indices`.
pub fn pick(examples: &[Example], indices: &[usize]) -> Vec<Example> {
    indices.iter().map(|&i| examples[i].clone()).collect()
}

/// The VADER movie-review snippets (`movieReviewSnippets_GroundTruth.txt`: id, mean rating, text)
/// as binary sentiment: ratings of exactly 0 are dropped, label `1` when the rating is positive.
pub fn vader_movie_reviews(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let origin = Origin { path: path.into(), line: i + 1 };
        let mut parts = line.splitn(3, '\t');
        let (_id, rating, snippet) = (parts.next(), parts.next(), parts.next());
        let rating: f64 = rating
            .and_then(|r| r.trim().parse().ok())
            .ok_or_else(|| origin.error("expected `id<TAB>rating<TAB>text` with a numeric rating"))?;
        let snippet = snippet.ok_or_else(|| origin.error("expected `id<TAB>rating<TAB>text`"))?;
        if rating == 0.0 {
            continue;
        }
        let label = if rating > 0.0 { "1" } else { "0" };
        out.push(Example {
            content: Content::Labelled { text: snippet.trim().to_string(), text_pair: None, label: label.into() },
            origin,
        });
    }
    if out.is_empty() {
        return Err(TrainError::Data { path: path.into(), reason: "no rated snippets".into() });
    }
    Ok(out)
}

/// The chatterbot-corpus conversations of every `*.yml` file in `dir` (sorted by file name), as
/// chats: turns alternate user / assistant.
pub fn chatterbot_conversations(dir: &Path) -> Result<Vec<Example>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(TrainError::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(TrainError::io(&path))?;
        let docs = yaml_rust2::YamlLoader::load_from_str(&text)
            .map_err(|e| TrainError::Data { path: path.clone(), reason: format!("invalid YAML: {e}") })?;
        let Some(conversations) = docs.first().and_then(|d| d["conversations"].as_vec()) else {
            return Err(TrainError::Data { path, reason: "no `conversations` list".into() });
        };
        for (i, conversation) in conversations.iter().enumerate() {
            let turns: Vec<String> = conversation
                .as_vec()
                .map(|v| v.iter().filter_map(|t| t.as_str().map(|s| s.trim().to_string())).collect())
                .unwrap_or_default();
            if turns.len() < 2 {
                continue;
            }
            let messages = turns
                .into_iter()
                .enumerate()
                .map(|(k, content)| ChatMessage { role: if k % 2 == 0 { "user" } else { "assistant" }.into(), content })
                .collect();
            // YAML positions are not kept by the loader; the conversation index stands in for a line.
            out.push(Example { content: Content::Chat(messages), origin: Origin { path: path.clone(), line: i + 1 } });
        }
    }
    if out.is_empty() {
        return Err(TrainError::Data { path: dir.into(), reason: "no conversations found (*.yml)".into() });
    }
    Ok(out)
}

/// The corpora fetched by `scripts/fetch-assets.sh`, by name (under `$TENSOR_PEFT_ASSETS`, default
/// `assets/`).
pub fn builtin_dataset(name: &str, task: TaskKind) -> Result<Vec<Example>> {
    let root = std::env::var_os("TENSOR_PEFT_ASSETS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("assets"));
    match (name, task) {
        ("vader-movie-reviews", TaskKind::Classification | TaskKind::LmClassification) => {
            vader_movie_reviews(&root.join("vader/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"))
        }
        ("chatterbot", TaskKind::CausalLm) => {
            chatterbot_conversations(&root.join("chatterbot/chatterbot_corpus/data/english"))
        }
        _ => Err(TrainError::Option {
            option: "train",
            reason: format!(
                "unknown built-in data set `{name}` for task {}: expected builtin:vader-movie-reviews (classification, lm-classification) or builtin:chatterbot (causal-lm); run scripts/fetch-assets.sh first",
                task.name()
            ),
        }),
    }
}

/// The examples of `path`: `builtin:<name>` (a [`builtin_dataset`], which skips nothing) or a data
/// file ([`read_file`]).
pub fn read_source(path: &Path, task: TaskKind, fields: &FieldMap, skip_bad_rows: bool) -> Result<Dataset> {
    match path.to_string_lossy().strip_prefix("builtin:") {
        Some(name) => Ok(Dataset { examples: builtin_dataset(name, task)?, skipped: Vec::new() }),
        None => read_file(path, task, fields, skip_bad_rows),
    }
}

/// Counts of examples per label text, for reports.
pub fn label_counts(examples: &[Example]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for e in examples {
        if let Content::Labelled { label, .. } = &e.content {
            *counts.entry(label.clone()).or_insert(0) += 1;
        }
    }
    counts
}
