//! The adapter library's error type.

use thiserror::Error;

/// Everything that can be wrong with an adapter configuration or a tensor-format shape.
///
/// Messages name the offending field and value and say what was expected, so the CLI can
/// show them verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AdapterError {
    /// A hyper-parameter is out of range (`field` names it, `reason` says what was expected).
    #[error("invalid `{field}` = {value}: {reason}")]
    InvalidValue {
        /// The configuration field, e.g. `rank`.
        field: &'static str,
        /// The value that was given, formatted.
        value: String,
        /// What was expected instead.
        reason: String,
    },
    /// A tensor-train shape does not fit the matrix it should represent.
    #[error("invalid TT shape {shape:?} for a {rows}x{cols} matrix: {reason}")]
    InvalidTtShape {
        /// The shape that was given.
        shape: Vec<usize>,
        /// Rows of the matrix (d_in, Burn layout).
        rows: usize,
        /// Columns of the matrix (d_out, Burn layout).
        cols: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A shape string such as `16,16,16` could not be parsed.
    #[error("cannot parse TT shape `{input}`: {reason}")]
    ShapeParse {
        /// The text that was given.
        input: String,
        /// What was expected.
        reason: String,
    },
    /// The method cannot be applied to this model or module.
    #[error("{method} cannot adapt {target}: {reason}")]
    Unsupported {
        /// Method name, e.g. `lorta`.
        method: &'static str,
        /// What it was asked to adapt.
        target: String,
        /// Why not.
        reason: String,
    },
    /// A hyper-parameter flag was given to a method it does not apply to.
    #[error("{flag} does not apply to {method}; it takes {takes}")]
    NotApplicable {
        /// The flag as typed, e.g. `--bottleneck`.
        flag: &'static str,
        /// Method name.
        method: &'static str,
        /// The flags the method takes, comma-separated.
        takes: String,
    },
    /// A state transition that does not make sense (merging twice, unmerging an unmerged layer).
    #[error("{0}")]
    State(String),
}

/// Result type of the adapter library.
pub type Result<T> = std::result::Result<T, AdapterError>;

pub(crate) fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> AdapterError {
    AdapterError::InvalidValue { field, value: value.to_string(), reason: reason.into() }
}

/// Returns an error naming `field` unless `value >= 1`.
pub(crate) fn require_positive(field: &'static str, value: usize) -> Result<()> {
    if value == 0 { Err(invalid(field, value, "must be at least 1")) } else { Ok(()) }
}

/// Checks the two fields every low-rank method has: `rank ≥ 1` and a finite `alpha`.
pub(crate) fn require_rank_and_alpha(rank: usize, alpha: f64) -> Result<()> {
    require_positive("rank", rank)?;
    require_finite("alpha", alpha)
}

/// Returns an error naming `field` unless `value` is a probability below 1 (a dropout rate).
pub(crate) fn require_dropout(field: &'static str, value: f64) -> Result<()> {
    if (0.0..1.0).contains(&value) { Ok(()) } else { Err(invalid(field, value, "must be in [0, 1)")) }
}

/// Returns an error naming `field` unless `value` is finite.
pub(crate) fn require_finite(field: &'static str, value: f64) -> Result<()> {
    if value.is_finite() { Ok(()) } else { Err(invalid(field, value, "must be a finite number")) }
}
