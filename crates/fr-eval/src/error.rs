//! The one error type of fr-eval.

/// Everything that can go wrong while evaluating.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// Two inputs that must agree in size do not.
    #[error("length mismatch: {left} has {left_len} entries but {right} has {right_len}")]
    LengthMismatch {
        /// Name of the first input.
        left: &'static str,
        /// Its size.
        left_len: usize,
        /// Name of the second input.
        right: &'static str,
        /// Its size.
        right_len: usize,
    },
    /// An array has the wrong shape (e.g. an embedder returned too few rows).
    #[error("shape mismatch in {what}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// What was checked.
        what: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Actual shape.
        got: Vec<usize>,
    },
    /// Pair embeddings must come as rows 2i and 2i+1.
    #[error("odd number of embeddings ({rows}): pair i uses rows 2i and 2i+1")]
    OddEmbeddings {
        /// Number of rows received.
        rows: usize,
    },
    /// An input that must not be empty is.
    #[error("{what} is empty")]
    Empty {
        /// Name of the empty input.
        what: &'static str,
    },
    /// A score, distance or embedding value is NaN or infinite.
    #[error("{what}[{index}] is not finite ({value})")]
    NonFinite {
        /// Name of the input.
        what: &'static str,
        /// Position of the first bad value.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A protocol needs both genuine and impostor pairs (in a fold, or overall).
    #[error("{what} has no {missing} pairs ({n} pairs in all)")]
    MissingClass {
        /// Where the class is missing (e.g. "fold 3 (test)").
        what: String,
        /// "genuine" or "impostor".
        missing: &'static str,
        /// Number of pairs in that set.
        n: usize,
    },
    /// A parameter is out of its valid range.
    #[error("invalid {name}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The embedder failed.
    #[error("embedder failed on images {start}..{end}: {source}")]
    Embedder {
        /// First image of the failing batch.
        start: usize,
        /// One past the last image of the failing batch.
        end: usize,
        /// The embedder's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// Result alias of fr-eval.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// Fails on the first NaN/inf in `values`.
pub(crate) fn check_finite(what: &'static str, values: &[f64]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(EvalError::NonFinite {
            what,
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

/// Fails when `left_len != right_len`.
pub(crate) fn check_len(
    left: &'static str,
    left_len: usize,
    right: &'static str,
    right_len: usize,
) -> Result<()> {
    if left_len == right_len {
        Ok(())
    } else {
        Err(EvalError::LengthMismatch {
            left,
            left_len,
            right,
            right_len,
        })
    }
}
