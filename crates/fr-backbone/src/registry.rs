//! The backbone registry: a config section names a backbone by `type`, [`build_backbone`]
//! builds it.
//!
//! ```toml
//! [backbone]
//! type = "iresnet"
//! layers = [2, 2, 2, 2]
//! input_size = 56
//! ```
//!
//! Adding a backbone: one file with its config and model (a `new(&Config, VarBuilder)`
//! constructor and `impl Backbone`), plus one line in the `registry!` invocation below.

use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::iresnet::{IResNet, IResNetConfig};

/// A feature extractor: images `(B, 3, H, W)` → embeddings `(B, D)` via
/// `forward_t(images, train)`.
pub trait Backbone: candle_nn::ModuleT + Send {
    /// Embedding dimension `D`.
    fn embedding_size(&self) -> usize;
    /// Whether the parameter `name` is to be updated by an optimiser (false for BatchNorm
    /// running statistics and parameters the architecture keeps fixed).
    fn is_trainable(&self, name: &str) -> bool;
}

macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident($config:ty) => $model:ty),+ $(,)?) => {
        /// Any registered backbone's configuration, tagged by `type` (snake_case of the
        /// variant name).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
        pub enum BackboneConfig {
            $($(#[$doc])* $variant($config),)+
        }

        /// Builds the backbone `cfg` describes, with parameters from `vb`.
        pub fn build_backbone(cfg: &BackboneConfig, vb: VarBuilder) -> Result<Box<dyn Backbone>> {
            match cfg {
                $(BackboneConfig::$variant(c) => Ok(Box::new(<$model>::new(c, vb)?)),)+
            }
        }
    };
}

registry! {
    /// [`IResNet`] (`type = "iresnet"`).
    Iresnet(IResNetConfig) => IResNet,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        BackboneConfig::Iresnet(IResNetConfig::default())
    }
}
