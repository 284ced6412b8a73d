//! Errors of fr-render: each names the tensor or config key that failed.

/// Result alias of fr-render.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong building or running the renderer and the reconstruction nets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An invalid configuration value.
    #[error("invalid render config `{key}`: {reason}")]
    Config {
        /// The offending key, as spelled in the config file.
        key: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A tensor has the wrong shape or dtype.
    #[error("`{what}`: expected {expected}, got {got}")]
    Shape {
        /// Which tensor (`depth`, `albedo`, `light`, `view`, `grid`, ...).
        what: String,
        /// What was expected, e.g. `(B, 3, 64, 64) f32 or f64`.
        expected: String,
        /// What was received, e.g. `[8, 3, 32, 32] F32`.
        got: String,
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

    /// An [`Error::Shape`] for tensor `what`.
    pub(crate) fn shape(what: &str, expected: impl Into<String>, t: &candle_core::Tensor) -> Self {
        Self::Shape {
            what: what.into(),
            expected: expected.into(),
            got: format!("{:?} {:?}", t.dims(), t.dtype()),
        }
    }
}
