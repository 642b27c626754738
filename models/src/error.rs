//! The models crate's error type.

use std::path::PathBuf;
use thiserror::Error;

/// What can go wrong describing or loading a model. Messages name the file, field and value.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not valid JSON.
    #[error("{path} is not valid JSON: {reason}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A field is missing or has the wrong type or value.
    #[error("{path}: field `{field}` {problem}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field name.
        field: &'static str,
        /// What is wrong and what was expected.
        problem: String,
    },
    /// The `--model` argument is neither a preset nor an existing path.
    #[error("unknown model `{0}`: expected a preset ({presets}), an HF model directory or a config.json", presets = crate::arch::PRESETS.join(", "))]
    UnknownModel(String),
    /// A checkpoint file is unreadable, malformed or holds a tensor of the wrong shape or type.
    #[error("{path}: {reason}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint lacks a tensor the architecture needs.
    #[error("the checkpoint has no tensor `{name}` (is it a checkpoint of this architecture?)")]
    MissingTensor {
        /// Expected tensor name.
        name: String,
    },
    /// The checkpoint holds tensors this architecture does not use.
    #[error("the checkpoint has {count} tensors this architecture does not use, e.g. `{example}`")]
    UnexpectedTensors {
        /// How many.
        count: usize,
        /// One of their names.
        example: String,
    },
    /// An input is longer than the model's context.
    #[error("the input has {tokens} tokens; the model accepts at most {limit}")]
    TooLong {
        /// Tokens in the input.
        tokens: usize,
        /// The model's limit.
        limit: usize,
    },
    /// An adapter file does not fit the model.
    #[error("adapter file: {reason}")]
    AdapterFile {
        /// What is wrong.
        reason: String,
    },
    /// Several adapters on one model: an unknown or repeated name, a merged adapter to switch
    /// away from, adapters that cannot be combined (the message names them and says why).
    #[error("{reason}")]
    AdapterSet {
        /// What is wrong.
        reason: String,
    },
    /// Building or placing adapters failed.
    #[error(transparent)]
    Adapter(#[from] tensor_peft_adapters::AdapterError),
    /// A target regular expression does not compile.
    #[error("target regex `{target}` is invalid: {reason}")]
    BadTarget {
        /// The pattern.
        target: String,
        /// The regex error.
        reason: String,
    },
    /// Target module names matched nothing.
    #[error("target `{target}` matches no module of this {family} model; module names are: {available}")]
    UnmatchedTarget {
        /// The target as given.
        target: String,
        /// Model family.
        family: &'static str,
        /// The distinct short names that exist.
        available: String,
    },
}
