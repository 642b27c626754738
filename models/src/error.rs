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
