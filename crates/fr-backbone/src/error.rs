//! The error type of fr-backbone.

use std::path::PathBuf;

/// Everything that can go wrong when configuring, building or loading a backbone.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape error, unsupported op, device error).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A weights file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A weights file was read but is not a valid file of its format.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A parameter the model needs is not in the weights.
    #[error("missing weight `{key}`{}", in_file(file))]
    MissingWeight {
        /// State-dict key, e.g. `layer1.0.bn1.running_mean`.
        key: String,
        /// The weights file, when known.
        file: Option<PathBuf>,
    },

    /// A weight exists but has the wrong shape.
    #[error(
        "weight `{key}`{} has shape {got:?}, the model expects {expected:?}",
        in_file(file)
    )]
    ShapeMismatch {
        /// State-dict key.
        key: String,
        /// Shape the model expects.
        expected: Vec<usize>,
        /// Shape found in the weights.
        got: Vec<usize>,
        /// The weights file, when known.
        file: Option<PathBuf>,
    },

    /// An invalid configuration value.
    #[error("invalid config `{key}`: {reason}")]
    Config {
        /// The configuration key, e.g. `layers` or `input_size`.
        key: String,
        /// Why the value is rejected.
        reason: String,
    },
}

fn in_file(file: &Option<PathBuf>) -> String {
    match file {
        Some(f) => format!(" in {}", f.display()),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn config(key: &str, reason: impl Into<String>) -> Self {
        Error::Config {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
