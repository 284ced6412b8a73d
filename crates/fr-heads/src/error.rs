//! Errors of fr-heads: each names the key, tensor or label that failed.

/// Result alias of fr-heads.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong building or running a head.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An invalid hyperparameter.
    #[error("invalid head config `{key}`: {reason}")]
    Config {
        /// The offending key, as spelled in the config file.
        key: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A tensor handed to a head has the wrong shape or dtype.
    #[error("`{what}`: expected {expected}, got {got}")]
    Shape {
        /// Which tensor (`embeddings`, `labels`, a state entry).
        what: String,
        /// What was expected, e.g. `(B, 512) f32 or f64`.
        expected: String,
        /// What was received, e.g. `[8, 128] F32`.
        got: String,
    },
    /// A label outside `0..num_classes`.
    #[error("labels[{index}] = {label} is out of range for {num_classes} classes")]
    Label {
        /// Position in the batch.
        index: usize,
        /// The label found there.
        label: i64,
        /// Number of classes of the head.
        num_classes: usize,
    },
    /// A collective operation between ranks of the model-parallel head failed (a lost
    /// connection, a peer calling another operation, a timeout, an NCCL error, inputs that do
    /// not match across ranks): `fr_dist`'s error, naming the operation and the rank.
    #[error(transparent)]
    Collective(#[from] fr_dist::Error),
    /// A checkpointed state entry that is missing or malformed.
    #[error("head state `{key}`: {reason}")]
    State {
        /// The state key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// An [`Error::Config`] for `key`.
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
