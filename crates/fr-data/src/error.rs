//! Errors of fr-data: each names the file, record or offset that failed.

use std::path::PathBuf;

/// Result alias of fr-data.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong reading face data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A malformed file: `what` says what and where (record, byte offset).
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the record key or byte offset.
        what: String,
    },
    /// An index past the end of a dataset.
    #[error("index {index} out of range for a dataset of {len} images")]
    OutOfRange {
        /// The index asked for.
        index: usize,
        /// Number of images.
        len: usize,
    },
    /// A bad configuration value.
    #[error("invalid config `{key}`: {reason}")]
    Config {
        /// The offending key.
        key: String,
        /// Why it is invalid.
        reason: String,
    },
}
