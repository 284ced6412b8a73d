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

    /// A state dict does not fit the model: every missing, wrong-shaped and (for diagnosis)
    /// unexpected key at once, so that one run shows the whole mismatch.
    #[error("{}", weights_message(file, missing, misshapen, unexpected))]
    Weights {
        /// The weights file (or Hub file), when known.
        file: Option<PathBuf>,
        /// Keys the model needs that the weights lack (sorted).
        missing: Vec<String>,
        /// Keys present with a shape other than the model's (sorted by key).
        misshapen: Vec<Misshapen>,
        /// Keys of the weights the model did not ask for (sorted; `num_batches_tracked` left
        /// out). Not an error by themselves: a training checkpoint also holds the head.
        unexpected: Vec<String>,
    },

    /// A model card (`config.json` written by fr) that cannot be read or parsed.
    #[error("model card {}: {reason}", path.display())]
    ModelCard {
        /// The card file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A file of a Hugging Face Hub repository is neither in the local cache nor (offline,
    /// or not on the Hub) downloadable.
    #[error(
        "hf://{repo}@{revision}: `{file}` is not in the local Hub cache (looked in {}){}",
        looked_in.display(),
        if *offline { "; offline (HF_HUB_OFFLINE or offline = true), so it was not downloaded" } else { "" }
    )]
    HubFileMissing {
        /// Repository id, `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// Path of the file inside the repository.
        file: String,
        /// The directory the file was looked for in (`<cache>/models--owner--name/snapshots/…`).
        looked_in: PathBuf,
        /// Whether downloading was disabled.
        offline: bool,
    },

    /// Talking to the Hugging Face Hub failed (network, authentication, missing repository).
    #[error("hf://{repo}@{revision}: {file}: {reason}")]
    Hub {
        /// Repository id, `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// The file being fetched (or `repository listing`).
        file: String,
        /// What the Hub client reported.
        reason: String,
    },
}

/// A weight whose shape differs from the model's (see [`Error::Weights`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misshapen {
    /// State-dict key.
    pub key: String,
    /// Shape the model expects.
    pub expected: Vec<usize>,
    /// Shape found in the weights.
    pub got: Vec<usize>,
}

/// More unexpected keys than this are summarised by their first name component.
const UNEXPECTED_LISTED: usize = 32;

fn weights_message(
    file: &Option<PathBuf>,
    missing: &[String],
    misshapen: &[Misshapen],
    unexpected: &[String],
) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("{} missing", missing.len()));
    }
    if !misshapen.is_empty() {
        parts.push(format!("{} with the wrong shape", misshapen.len()));
    }
    if !unexpected.is_empty() {
        parts.push(format!("{} unexpected", unexpected.len()));
    }
    let mut msg = format!(
        "weights{} do not fit the model ({})",
        in_file(file),
        parts.join(", ")
    );
    if !missing.is_empty() {
        msg += &format!("\n  missing: {}", missing.join(", "));
    }
    if !misshapen.is_empty() {
        let list: Vec<String> = misshapen
            .iter()
            .map(|m| format!("{} (weights {:?}, model {:?})", m.key, m.got, m.expected))
            .collect();
        msg += &format!("\n  wrong shape: {}", list.join(", "));
    }
    if !unexpected.is_empty() {
        let listed = if unexpected.len() <= UNEXPECTED_LISTED {
            unexpected.join(", ")
        } else {
            // Group by the first component (`head.*`, `render.*`) to keep the message readable.
            let mut groups: std::collections::BTreeMap<&str, usize> = Default::default();
            for k in unexpected {
                *groups.entry(k.split('.').next().unwrap_or(k)).or_default() += 1;
            }
            groups
                .iter()
                .map(|(g, n)| format!("{g}.* ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        msg += &format!("\n  unexpected: {listed}");
    }
    msg
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
