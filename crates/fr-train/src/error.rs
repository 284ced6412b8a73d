//! Errors of fr-train: each names the file, key or step that failed.

use std::path::PathBuf;

/// Result alias of fr-train.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file that is missing, malformed or does not fit the model.
    #[error("checkpoint {path}: {what}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        what: String,
    },
    /// A bad configuration value.
    #[error("invalid config `{key}`: {reason}")]
    Config {
        /// The offending key.
        key: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A non-finite value where a finite one is required.
    #[error("non-finite {what} at step {step}")]
    NonFinite {
        /// What was non-finite (loss, gradient norm, ...).
        what: String,
        /// The global step.
        step: u64,
    },
    /// The output (checkpoint) directory cannot be created or written: read-only, full, or
    /// a path through a regular file ([`crate::checkpoint::check_output_dir`]).
    #[error("output directory {path}: {reason}")]
    OutputDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// [`crate::TrainerConfig::max_consecutive_skips`] steps in a row were skipped for a
    /// non-finite loss or gradient: the run has diverged and stops.
    #[error(
        "training stopped at step {step}: {skipped} consecutive steps skipped, the last for a \
         non-finite {what} (head `{head}`, learning rate {lr}, last finite loss {}); lower \
         the learning rate, enable clip_max_norm, or check the data",
        last_finite(.last_finite_loss)
    )]
    Diverged {
        /// The step that was skipped last.
        step: u64,
        /// Steps skipped in a row.
        skipped: u64,
        /// What was non-finite at the last one: `loss` or `gradient norm`.
        what: String,
        /// The head's registry name.
        head: String,
        /// The learning rate of the last skipped step.
        lr: f64,
        /// `(step, loss)` of the last step whose loss was finite, if any.
        last_finite_loss: Option<(u64, f64)>,
    },
    /// The loss head failed.
    #[error("head `{head}`: {source}")]
    Head {
        /// The head's registry name.
        head: String,
        /// The head's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An auxiliary loss ([`crate::AuxiliaryLoss`]) failed.
    #[error("auxiliary loss `{name}`: {source}")]
    Auxiliary {
        /// The auxiliary loss's name.
        name: String,
        /// Its own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A data-parallel collective (broadcast, gradient all-reduce) failed: a lost or
    /// mismatched rank, named in the source.
    #[error("data parallel: {0}")]
    Collective(#[source] fr_dist::Error),
}

fn last_finite(v: &Option<(u64, f64)>) -> String {
    match v {
        Some((step, loss)) => format!("{loss} at step {step}"),
        None => "none: no step had a finite loss".to_string(),
    }
}

impl Error {
    /// An [`Error::Config`] for `key`.
    pub(crate) fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Checkpoint`] for `path`.
    pub(crate) fn checkpoint(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            what: what.into(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
