//! The model card: `config.json` next to a checkpoint's weights, saying how to rebuild and feed
//! the model, so that a saved checkpoint folder can be uploaded to the Hugging Face Hub as it is
//! and loaded back by repository id ([`crate::pretrained`]).
//!
//! ```json
//! {
//!   "format": "fr-model-card",
//!   "format_version": 1,
//!   "library": "fr-backbone 0.1.0",
//!   "backbone": { "type": "iresnet", "layers": [3, 13, 30, 3], "widths": [64, 128, 256, 512],
//!                 "embedding_size": 512, "input_size": 112, "dropout": 0.0, "kernels": "auto" },
//!   "embedding_size": 512,
//!   "input_size": 112,
//!   "colour_order": "RGB",
//!   "normalisation": { "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5] },
//!   "weights_file": "model.safetensors",
//!   "weights_prefix": "",
//!   "head": { "name": "arcface", "config": { "type": "arcface", "scale": 64.0, "margin": 0.5 }, "classes": 85742 },
//!   "training_set": { "name": "faces_emore/train.rec", "identities": 85742, "images": 5822653 },
//!   "metrics": { "loss": 3.21, "lfw_accuracy": 0.9978 },
//!   "step": 181952,
//!   "epoch": 19
//! }
//! ```
//!
//! A `config.json` without `"format": "fr-model-card"` (a transformers config, CVLface's) is
//! not a card: [`ModelCard::read`] returns `None` for it. Every field but `format` has a
//! default, so cards written by a later version with more fields still load.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::registry::BackboneConfig;

/// File name of the model card, next to the weights.
pub const MODEL_CARD_FILE: &str = "config.json";
/// The `format` value that marks a `config.json` as an fr model card.
pub const MODEL_CARD_FORMAT: &str = "fr-model-card";
/// The card layout version written by this crate.
pub const MODEL_CARD_VERSION: u32 = 1;
/// The weights file a card names by default (fr-train's checkpoint file).
pub const DEFAULT_WEIGHTS_FILE: &str = "model.safetensors";

/// Channel order the model expects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ColourOrder {
    /// Red, green, blue (insightface, fr).
    #[default]
    #[serde(rename = "RGB")]
    Rgb,
    /// Blue, green, red (AdaFace and CVLface IR models, OpenCV-loaded training data).
    #[serde(rename = "BGR")]
    Bgr,
}

/// Per-channel normalisation of the input: `x = (p / 255 − mean) / std` for a pixel value
/// `p` in 0..=255, channels in the model's [`ColourOrder`]. Default: mean 0.5, std 0.5
/// (insightface's `(p − 127.5) / 127.5`, inputs in [−1, 1]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalisation {
    /// Mean per channel, in [0, 1] units.
    pub mean: [f32; 3],
    /// Standard deviation per channel, in [0, 1] units.
    pub std: [f32; 3],
}

impl Default for Normalisation {
    fn default() -> Self {
        Self {
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }
}

/// The training head, for the record (evaluation does not need it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadInfo {
    /// The head's registry name (`arcface`, `adaface`, …).
    pub name: String,
    /// Its configuration as the trainer had it (free-form JSON; fr-heads' `HeadConfig`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// Number of classes (identities) of the training set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<usize>,
}

/// The training set, for the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingSet {
    /// Its name or path (`faces_emore/train.rec`, `synthetic (seed 42)`).
    pub name: String,
    /// Identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identities: Option<usize>,
    /// Images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<usize>,
}

/// `config.json`: how to rebuild the backbone of a checkpoint and what to feed it. See the
/// module documentation for an example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelCard {
    /// Always [`MODEL_CARD_FORMAT`].
    pub format: String,
    /// [`MODEL_CARD_VERSION`] when written by this crate.
    pub format_version: u32,
    /// The writer, `fr-backbone <version>`.
    pub library: String,
    /// The backbone configuration; `None` when the writer did not know it (a bare trainer).
    pub backbone: Option<BackboneConfig>,
    /// Embedding dimension `D` of the output `(B, D)`.
    pub embedding_size: Option<usize>,
    /// Side of the square input in pixels.
    pub input_size: Option<usize>,
    /// Channel order of the input.
    pub colour_order: ColourOrder,
    /// Input normalisation.
    pub normalisation: Normalisation,
    /// The weights file next to the card ([`DEFAULT_WEIGHTS_FILE`]).
    pub weights_file: String,
    /// Prefix of the backbone's keys in the weights file (`""`: top level).
    pub weights_prefix: String,
    /// The training head.
    pub head: Option<HeadInfo>,
    /// The training set.
    pub training_set: Option<TrainingSet>,
    /// The latest value of each training (and evaluation) metric; finite values only.
    pub metrics: BTreeMap<String, f64>,
    /// Optimiser steps taken when the checkpoint was saved.
    pub step: Option<u64>,
    /// Epoch (0-based) when the checkpoint was saved.
    pub epoch: Option<usize>,
}

impl Default for ModelCard {
    fn default() -> Self {
        Self {
            format: MODEL_CARD_FORMAT.to_string(),
            format_version: MODEL_CARD_VERSION,
            library: format!("fr-backbone {}", env!("CARGO_PKG_VERSION")),
            backbone: None,
            embedding_size: None,
            input_size: None,
            colour_order: ColourOrder::Rgb,
            normalisation: Normalisation::default(),
            weights_file: DEFAULT_WEIGHTS_FILE.to_string(),
            weights_prefix: String::new(),
            head: None,
            training_set: None,
            metrics: BTreeMap::new(),
            step: None,
            epoch: None,
        }
    }
}

impl ModelCard {
    /// A card for `backbone`, with its embedding and input sizes, RGB in [−1, 1].
    pub fn new(backbone: BackboneConfig) -> Self {
        let (embedding_size, input_size) = sizes(&backbone);
        Self {
            backbone: Some(backbone),
            embedding_size: Some(embedding_size),
            input_size: Some(input_size),
            ..Self::default()
        }
    }

    /// Sets the head's name, configuration and class count.
    pub fn with_head(
        mut self,
        name: impl Into<String>,
        config: Option<serde_json::Value>,
        classes: Option<usize>,
    ) -> Self {
        self.head = Some(HeadInfo {
            name: name.into(),
            config,
            classes,
        });
        self
    }

    /// Sets the training set's description.
    pub fn with_training_set(
        mut self,
        name: impl Into<String>,
        identities: Option<usize>,
        images: Option<usize>,
    ) -> Self {
        self.training_set = Some(TrainingSet {
            name: name.into(),
            identities,
            images,
        });
        self
    }

    /// Records `value` for `name` (ignored when not finite: JSON cannot hold it).
    pub fn set_metric(&mut self, name: impl Into<String>, value: f64) {
        if value.is_finite() {
            self.metrics.insert(name.into(), value);
        }
    }

    /// Checks that the sizes agree with the backbone; `path` names the card in the error.
    ///
    /// # Errors
    /// [`Error::ModelCard`] naming the disagreeing field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::ModelCard {
            path: path.to_path_buf(),
            reason,
        };
        if self.format != MODEL_CARD_FORMAT {
            return Err(bad(format!(
                "format {:?} is not {MODEL_CARD_FORMAT:?}",
                self.format
            )));
        }
        if self.format_version == 0 || self.format_version > MODEL_CARD_VERSION {
            return Err(bad(format!(
                "format_version {} is not supported (1..={MODEL_CARD_VERSION})",
                self.format_version
            )));
        }
        if let Some(b) = &self.backbone {
            let (d, s) = sizes(b);
            if self.embedding_size.is_some_and(|e| e != d) {
                return Err(bad(format!(
                    "embedding_size {} disagrees with the backbone's {d}",
                    self.embedding_size.unwrap_or_default()
                )));
            }
            if self.input_size.is_some_and(|i| i != s) {
                return Err(bad(format!(
                    "input_size {} disagrees with the backbone's {s}",
                    self.input_size.unwrap_or_default()
                )));
            }
        }
        if self
            .normalisation
            .std
            .iter()
            .any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(bad(format!(
                "normalisation.std {:?} must be positive",
                self.normalisation.std
            )));
        }
        if self.weights_file.is_empty() || self.weights_file.contains("..") {
            return Err(bad(format!(
                "weights_file {:?} is not a file name",
                self.weights_file
            )));
        }
        Ok(())
    }

    /// Parses a `config.json`; `Ok(None)` when it is not an fr card (no `"format":
    /// "fr-model-card"`). `path` names the file in errors.
    ///
    /// # Errors
    /// [`Error::ModelCard`] for invalid JSON, or a card whose fields do not parse or
    /// [`validate`](Self::validate).
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Option<Self>> {
        let bad = |reason: String| Error::ModelCard {
            path: path.to_path_buf(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(MODEL_CARD_FORMAT) {
            return Ok(None);
        }
        let card: Self = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        card.validate(path)?;
        Ok(Some(card))
    }

    /// Reads the card at `path`; `Ok(None)` when the file does not exist or is not an fr card.
    ///
    /// # Errors
    /// [`Error::Io`] for an unreadable file, otherwise as [`from_json`](Self::from_json).
    pub fn read(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        match std::fs::read(path) {
            Ok(bytes) => Self::from_json(&bytes, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The card as pretty-printed JSON (non-finite metrics left out).
    pub fn to_json(&self) -> Vec<u8> {
        let mut card = self.clone();
        card.metrics.retain(|_, v| v.is_finite());
        let mut bytes =
            serde_json::to_vec_pretty(&card).expect("a model card always serialises to JSON");
        bytes.push(b'\n');
        bytes
    }
}

/// `(embedding size, input size)` of a backbone configuration.
fn sizes(backbone: &BackboneConfig) -> (usize, usize) {
    (backbone.embedding_size(), backbone.input_shape().0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IResNetConfig;
    use std::path::PathBuf;

    #[test]
    fn round_trip_and_foreign_configs() {
        let mut card = ModelCard::new(BackboneConfig::Iresnet(IResNetConfig::r18()))
            .with_head(
                "arcface",
                Some(serde_json::json!({"type": "arcface"})),
                Some(10),
            )
            .with_training_set("synthetic", Some(10), Some(100));
        card.set_metric("loss", 1.5);
        card.set_metric("nan", f64::NAN);
        let p = PathBuf::from("config.json");
        let back = ModelCard::from_json(&card.to_json(), &p).unwrap().unwrap();
        assert_eq!(back, card);
        assert_eq!(back.embedding_size, Some(512));
        assert!(!back.metrics.contains_key("nan"));
        let text = String::from_utf8(card.to_json()).unwrap();
        assert!(text.contains("\"colour_order\": \"RGB\""), "{text}");
        // A transformers / CVLface config.json is not a card.
        let foreign = br#"{"architectures": ["CVLFaceRecognitionModel"], "model_type": "x"}"#;
        assert_eq!(ModelCard::from_json(foreign, &p).unwrap(), None);
        // Unknown fields of a later version are ignored; missing ones take defaults.
        let minimal = br#"{"format": "fr-model-card", "format_version": 1, "future": 3}"#;
        let m = ModelCard::from_json(minimal, &p).unwrap().unwrap();
        assert_eq!(m.weights_file, DEFAULT_WEIGHTS_FILE);
        assert_eq!(m.backbone, None);
    }

    #[test]
    fn inconsistent_cards_are_rejected_naming_the_field() {
        let p = PathBuf::from("x/config.json");
        let mut card = ModelCard::new(BackboneConfig::Iresnet(IResNetConfig::r18()));
        card.input_size = Some(56);
        let err = ModelCard::from_json(&card.to_json(), &p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("input_size") && err.contains("x/config.json"),
            "{err}"
        );
        let err = ModelCard::from_json(b"{ nope", &p).unwrap_err().to_string();
        assert!(err.contains("not JSON"), "{err}");
        let err =
            ModelCard::from_json(br#"{"format": "fr-model-card", "colour_order": "RBG"}"#, &p)
                .unwrap_err()
                .to_string();
        assert!(err.contains("RBG"), "{err}");
        let v2 = br#"{"format": "fr-model-card", "format_version": 99}"#;
        assert!(ModelCard::from_json(v2, &p).is_err());
    }
}
