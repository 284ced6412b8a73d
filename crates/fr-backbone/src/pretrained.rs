//! Pretrained backbones from a file, a checkpoint folder or a Hugging Face Hub repository.
//!
//! Sources ([`Source::parse`]):
//! - a safetensors file or a PyTorch checkpoint (`.pth`, `.pt`, `.bin`, `.ckpt`), read natively
//!   by candle's pickle reader (no Python): insightface / arcface_torch `backbone.pth`, DDP
//!   checkpoints, AdaFace `.ckpt` (nested `state_dict`);
//! - a folder holding a [`ModelCard`] (`config.json`) and its weights file: a saved fr
//!   checkpoint step, or a downloaded Hub snapshot;
//! - `hf://owner/name[@revision][/path/in/repo]`: a Hub repository through [`crate::hub`]
//!   (cache, offline mode via `HF_HUB_OFFLINE=1` or [`HubOptions::offline`]).
//!
//! In a folder or repository the weights file is the card's `weights_file`, else the first of
//! [`WEIGHTS_CANDIDATES`] present. Keys are renamed by [`KeyMap::detect`] (insightface names,
//! any prefix such as DDP's `module.` or CVLface's `model.net.`, AdaFace IR names; see
//! [`crate::keymap`]). Without an fr card, a CVLface repository's `pretrained_model/model.yaml`
//! supplies the colour order (`color_space: BGR`).
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use fr_backbone::pretrained::{LoadOptions, Pretrained, Source};
//!
//! let source = Source::parse("hf://owner/name")?;                  // or a path
//! let pretrained = Pretrained::load(&source, &LoadOptions::default())?;
//! let (cfg, from) = pretrained.config(None)?;                      // the card's, else inferred
//! let (model, report) = pretrained.build(&cfg, DType::F32, &Device::Cpu)?;
//! println!("{} ({from:?}): {} tensors loaded, {} unused", pretrained.origin, report.loaded, report.unused.len());
//! # Ok::<(), fr_backbone::Error>(())
//! ```
//!
//! Every mismatch between the weights and the configuration is reported at once
//! ([`crate::Error::Weights`]: all missing, wrong-shaped and unexpected keys).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::hub::{HubOptions, HubRepo};
use crate::keymap::{infer_iresnet_config, InferredIResNet, KeyLayout, KeyMap};
use crate::model_card::{ColourOrder, ModelCard, Normalisation, MODEL_CARD_FILE};
use crate::registry::{Backbone, BackboneConfig};
use crate::weights::{backbone_from_tensors, read_weights, LoadReport};

/// Weights files looked for, in this order, in a folder or repository without a card naming
/// one: fr / transformers / CVLface, then insightface's release names.
pub const WEIGHTS_CANDIDATES: [&str; 6] = [
    "model.safetensors",
    "backbone.safetensors",
    "backbone.pth",
    "model.pth",
    "model.pt",
    "pytorch_model.bin",
];

/// CVLface's model description inside its Hub repositories (read for `color_space`).
pub const CVLFACE_MODEL_YAML: &str = "pretrained_model/model.yaml";

/// Where weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A weights file or a checkpoint folder on disk.
    Path(PathBuf),
    /// A Hugging Face Hub model repository.
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit; `None`: `main`.
        revision: Option<String>,
        /// A weights file inside the repository; `None`: the card's, else a candidate.
        file: Option<String>,
    },
}

/// The URI scheme of Hub sources.
pub const HUB_SCHEME: &str = "hf://";

impl Source {
    /// `hf://owner/name[@revision][/path/in/repo]` is a Hub repository (a file path inside it
    /// selects the weights file); anything else a path.
    ///
    /// # Errors
    /// [`Error::Config`] (`repo`) for a malformed Hub URI.
    pub fn parse(s: &str) -> Result<Self> {
        let Some(rest) = s.strip_prefix(HUB_SCHEME) else {
            return Ok(Self::Path(PathBuf::from(s)));
        };
        let mut parts = rest.splitn(3, '/');
        let (owner, name) = match (parts.next(), parts.next()) {
            (Some(o), Some(n)) if !o.is_empty() && !n.is_empty() => (o, n),
            _ => {
                return Err(Error::config(
                    "repo",
                    format!("{s:?}: expected hf://owner/name[@revision][/file]"),
                ))
            }
        };
        let file = parts.next().filter(|f| !f.is_empty()).map(str::to_string);
        let (name, revision) = match name.split_once('@') {
            Some((n, r)) if !r.is_empty() => (n, Some(r.to_string())),
            Some(_) => {
                return Err(Error::config(
                    "repo",
                    format!("{s:?}: empty revision after `@`"),
                ))
            }
            None => (name, None),
        };
        let repo = format!("{owner}/{name}");
        crate::hub::validate_repo_id(&repo)?;
        if file
            .as_deref()
            .is_some_and(|f| f.split('/').any(|c| c == ".."))
        {
            return Err(Error::config(
                "repo",
                format!("{s:?}: `..` in the file path"),
            ));
        }
        Ok(Self::Hub {
            repo,
            revision,
            file,
        })
    }

    /// Whether this is a Hub source.
    pub fn is_hub(&self) -> bool {
        matches!(self, Self::Hub { .. })
    }
}

impl std::str::FromStr for Source {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Hub {
                repo,
                revision,
                file,
            } => {
                write!(f, "{HUB_SCHEME}{repo}")?;
                if let Some(r) = revision {
                    write!(f, "@{r}")?;
                }
                if let Some(file) = file {
                    write!(f, "/{file}")?;
                }
                Ok(())
            }
        }
    }
}

/// Options of [`Pretrained::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The key map; `None`: [`KeyMap::detect`] (falling back to the card's `weights_prefix`
    /// with insightface names when nothing is detected).
    pub key_map: Option<KeyMap>,
    /// Hub access (cache, offline mode, token).
    pub hub: HubOptions,
}

/// Where the backbone configuration of [`Pretrained::config`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigOrigin {
    /// The model card.
    Card,
    /// The caller's fallback.
    Given,
    /// Inferred from the weights' shapes ([`infer_iresnet_config`]).
    Inferred,
}

/// Weights under insightface's names, ready to build a backbone from, with what is known about
/// feeding the model.
#[derive(Debug, Clone)]
pub struct Pretrained {
    /// The state dict after the key map.
    pub tensors: HashMap<String, Tensor>,
    /// The fr model card, when the source has one.
    pub card: Option<ModelCard>,
    /// Input channel order: the card's, a CVLface `color_space`, else RGB.
    pub colour_order: ColourOrder,
    /// Input normalisation: the card's, else mean 0.5, std 0.5.
    pub normalisation: Normalisation,
    /// The local weights file read (inside the Hub cache for a Hub source).
    pub weights_file: PathBuf,
    /// The source as given, for reports (`hf://owner/name@main`, or the path).
    pub origin: String,
    /// The key map applied.
    pub key_map: KeyMap,
    /// Keys outside the map's prefix, dropped (sorted).
    pub dropped: Vec<String>,
    /// Keys the map added (identity shortcuts, affine-free BatchNorm).
    pub synthesized: Vec<String>,
}

/// Files of a folder or a Hub repository.
enum Files<'a> {
    Dir(&'a Path),
    Hub(&'a HubRepo),
}

impl Files<'_> {
    /// The local path of `file`, `None` when absent (offline: when not cached).
    fn optional(&self, file: &str) -> Result<Option<PathBuf>> {
        match self {
            Files::Dir(d) => {
                let p = d.join(file);
                Ok(p.is_file().then_some(p))
            }
            Files::Hub(r) => match r.get_optional(file) {
                Err(Error::HubFileMissing { .. }) => {
                    tracing::debug!(repo = %r.uri(), file, "not cached (offline): skipped");
                    Ok(None)
                }
                other => other,
            },
        }
    }

    /// The local path of `file`, an error naming it when absent.
    fn required(&self, file: &str) -> Result<PathBuf> {
        match self {
            Files::Dir(d) => {
                let p = d.join(file);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(Error::Io {
                        path: p,
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "the weights file the model card names is missing",
                        ),
                    })
                }
            }
            Files::Hub(r) => r.get(file),
        }
    }

    /// The first of [`WEIGHTS_CANDIDATES`] present.
    fn weights(&self) -> Result<PathBuf> {
        match self {
            Files::Dir(d) => WEIGHTS_CANDIDATES
                .iter()
                .map(|c| d.join(c))
                .find(|p| p.is_file())
                .ok_or_else(|| Error::Format {
                    path: d.to_path_buf(),
                    reason: format!(
                        "no weights file: expected a model card ({MODEL_CARD_FILE}) naming one, \
or one of {}",
                        WEIGHTS_CANDIDATES.join(", ")
                    ),
                }),
            Files::Hub(r) => {
                // Cached candidates first: a second run needs no network.
                if let Some(c) = WEIGHTS_CANDIDATES.iter().find(|c| r.is_cached(c)) {
                    return r.get(c);
                }
                if r.options.is_offline() {
                    let cache = r.options.resolved_cache_dir();
                    let looked_in = crate::hub::cached_snapshot(&cache, &r.id, &r.revision)
                        .unwrap_or_else(|missing| missing);
                    return Err(Error::HubFileMissing {
                        repo: r.id.clone(),
                        revision: r.revision.clone(),
                        file: WEIGHTS_CANDIDATES.join(" | "),
                        looked_in,
                        offline: true,
                    });
                }
                let files = r.files()?;
                match WEIGHTS_CANDIDATES
                    .iter()
                    .find(|c| files.iter().any(|f| f == *c))
                {
                    Some(c) => r.get(c),
                    None => Err(Error::Hub {
                        repo: r.id.clone(),
                        revision: r.revision.clone(),
                        file: WEIGHTS_CANDIDATES.join(" | "),
                        reason: format!(
                            "no weights file among the repository's files ({}); name one: \
hf://{}/<file>",
                            files.join(", "),
                            r.id
                        ),
                    }),
                }
            }
        }
    }
}

/// `color_space: BGR` / `RGB` in a CVLface `model.yaml`.
fn cvlface_colour_order(yaml: &str) -> Option<ColourOrder> {
    yaml.lines().find_map(|l| {
        let v = l.trim().strip_prefix("color_space:")?;
        match v.trim().trim_matches(|c| c == '\'' || c == '"') {
            "BGR" => Some(ColourOrder::Bgr),
            "RGB" => Some(ColourOrder::Rgb),
            _ => None,
        }
    })
}

impl Pretrained {
    /// Loads `source` (see the module documentation).
    ///
    /// # Errors
    /// Unreadable or malformed files and cards ([`Error::Io`], [`Error::Format`],
    /// [`Error::ModelCard`]); Hub failures ([`Error::HubFileMissing`], [`Error::Hub`]).
    pub fn load(source: &Source, options: &LoadOptions) -> Result<Self> {
        match source {
            Source::Path(p) => Self::from_path(p, options),
            Source::Hub {
                repo,
                revision,
                file,
            } => {
                let repo = HubRepo::new(repo, revision.as_deref(), options.hub.clone())?;
                Self::from_files(&Files::Hub(&repo), repo.uri(), file.as_deref(), options)
            }
        }
    }

    /// Loads a weights file, or a folder with a card and weights (a checkpoint step, a Hub
    /// snapshot); a card next to a weights file (`config.json` in its folder) is read too.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn from_path(path: &Path, options: &LoadOptions) -> Result<Self> {
        if path.is_dir() {
            return Self::from_files(&Files::Dir(path), path.display().to_string(), None, options);
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let card = ModelCard::read(dir.join(MODEL_CARD_FILE))?.filter(|c| {
            path.file_name()
                .is_some_and(|f| f == c.weights_file.as_str())
        });
        Self::from_tensors(
            read_weights(path)?,
            path.to_path_buf(),
            path.display().to_string(),
            card,
            None,
            options,
        )
    }

    fn from_files(
        files: &Files,
        origin: String,
        file: Option<&str>,
        options: &LoadOptions,
    ) -> Result<Self> {
        let card = match files.optional(MODEL_CARD_FILE)? {
            Some(p) => ModelCard::read(&p)?,
            None => None,
        };
        let weights = match (file, &card) {
            (Some(f), _) => files.required(f)?,
            (None, Some(c)) => files.required(&c.weights_file)?,
            (None, None) => files.weights()?,
        };
        let cvl_colour = if card.is_none() {
            match files.optional(CVLFACE_MODEL_YAML) {
                Ok(Some(p)) => std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| cvlface_colour_order(&t)),
                // An uncached optional file offline, or no such file: not CVLface.
                _ => None,
            }
        } else {
            None
        };
        let tensors = read_weights(&weights)?;
        Self::from_tensors(tensors, weights, origin, card, cvl_colour, options)
    }

    /// Applies the key map to an in-memory state dict.
    ///
    /// # Errors
    /// A tensor failure while the key map adds identity shortcuts.
    fn from_tensors(
        tensors: HashMap<String, Tensor>,
        weights_file: PathBuf,
        origin: String,
        card: Option<ModelCard>,
        colour: Option<ColourOrder>,
        options: &LoadOptions,
    ) -> Result<Self> {
        let key_map = options.key_map.clone().unwrap_or_else(|| {
            KeyMap::detect(tensors.keys().map(String::as_str)).unwrap_or_else(|| {
                KeyMap::new(
                    card.as_ref()
                        .map(|c| c.weights_prefix.clone())
                        .unwrap_or_default(),
                    KeyLayout::Insightface,
                )
            })
        });
        let mapped = key_map.apply(tensors)?;
        tracing::info!(
            origin,
            layout = key_map.describe(),
            tensors = mapped.tensors.len(),
            dropped = mapped.dropped.len(),
            "pretrained weights read"
        );
        let colour_order = card
            .as_ref()
            .map(|c| c.colour_order)
            .or(colour)
            .unwrap_or_default();
        let normalisation = card.as_ref().map(|c| c.normalisation).unwrap_or_default();
        Ok(Self {
            tensors: mapped.tensors,
            card,
            colour_order,
            normalisation,
            weights_file,
            origin,
            key_map,
            dropped: mapped.dropped,
            synthesized: mapped.synthesized,
        })
    }

    /// The IResNet the weights' shapes describe (input size 16 × the last feature map side).
    pub fn inferred(&self) -> Option<InferredIResNet> {
        infer_iresnet_config(&self.tensors)
    }

    /// The backbone configuration: the card's, else `fallback`, else inferred from the shapes.
    ///
    /// # Errors
    /// [`Error::Config`] (`backbone`) when there is no card with a backbone, no fallback and
    /// the shapes are not an IResNet's.
    pub fn config(
        &self,
        fallback: Option<&BackboneConfig>,
    ) -> Result<(BackboneConfig, ConfigOrigin)> {
        if let Some(b) = self.card.as_ref().and_then(|c| c.backbone.clone()) {
            return Ok((b, ConfigOrigin::Card));
        }
        if let Some(b) = fallback {
            return Ok((b.clone(), ConfigOrigin::Given));
        }
        match self.inferred() {
            Some(i) => Ok((BackboneConfig::Iresnet(i.config), ConfigOrigin::Inferred)),
            None => Err(Error::config(
                "backbone",
                format!(
                    "{}: no model card with a backbone, and the weights are not an IResNet's \
({}); pass a configuration",
                    self.origin,
                    self.key_map.describe()
                ),
            )),
        }
    }

    /// Builds the backbone `cfg` describes from these weights, on `device` in `dtype`.
    ///
    /// # Errors
    /// [`Error::Weights`] listing every key that does not fit (with the weights file), or an
    /// invalid `cfg`.
    pub fn build(
        &self,
        cfg: &BackboneConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<(Box<dyn Backbone>, LoadReport)> {
        backbone_from_tensors(
            cfg,
            self.tensors.clone(),
            Some(&self.weights_file),
            dtype,
            device,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            Source::parse("weights/backbone.pth").unwrap(),
            Source::Path("weights/backbone.pth".into())
        );
        assert_eq!(
            Source::parse("hf://owner/name").unwrap(),
            Source::Hub {
                repo: "owner/name".into(),
                revision: None,
                file: None
            }
        );
        let s = Source::parse("hf://owner/name@v1.0/sub/backbone.pth").unwrap();
        assert_eq!(
            s,
            Source::Hub {
                repo: "owner/name".into(),
                revision: Some("v1.0".into()),
                file: Some("sub/backbone.pth".into())
            }
        );
        assert_eq!(s.to_string(), "hf://owner/name@v1.0/sub/backbone.pth");
        for bad in [
            "hf://",
            "hf://owner",
            "hf://owner/",
            "hf://o/n@",
            "hf://o/n/../x",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cvlface_yaml_colour() {
        let yaml = "name: ir101\ncolor_space: 'BGR'\noutput_dim: 512\n";
        assert_eq!(cvlface_colour_order(yaml), Some(ColourOrder::Bgr));
        assert_eq!(
            cvlface_colour_order("color_space: RGB"),
            Some(ColourOrder::Rgb)
        );
        assert_eq!(cvlface_colour_order("name: vit"), None);
    }
}
