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

use crate::complexity::Complexity;
use crate::error::Result;
use crate::iresnet::{IResNet, IResNetConfig};
use crate::mobilefacenet::{MobileFaceNet, MobileFaceNetConfig};
use crate::pocketnet::{PocketNet, PocketNetConfig};
use crate::spherenet::{SphereNet, SphereNetConfig};

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

        /// [`build_backbone`] as a [`crate::BnStatsForward`] (every registered backbone is
        /// one): for ArcFace inversion and other users of the BatchNorm-statistics taps.
        pub fn build_bn_stats_backbone(
            cfg: &BackboneConfig,
            vb: VarBuilder,
        ) -> Result<Box<dyn crate::BnStatsForward>> {
            match cfg {
                $(BackboneConfig::$variant(c) => Ok(Box::new(<$model>::new(c, vb)?)),)+
            }
        }

        impl BackboneConfig {
            /// Parameters and operations of one forward pass of one image, computed from the
            /// configuration (conventions in [`crate::complexity`]).
            ///
            /// # Errors
            /// An invalid configuration (the error names the key).
            pub fn complexity(&self) -> Result<Complexity> {
                match self {
                    $(BackboneConfig::$variant(c) => c.complexity(),)+
                }
            }

            /// Input `(H, W)` in pixels the backbone expects.
            pub fn input_shape(&self) -> (usize, usize) {
                match self {
                    $(BackboneConfig::$variant(c) => c.input_shape(),)+
                }
            }

            /// Embedding dimension `D` of its output `(B, D)`.
            pub fn embedding_size(&self) -> usize {
                match self {
                    $(BackboneConfig::$variant(c) => c.embedding_size,)+
                }
            }
        }
    };
}

registry! {
    /// [`IResNet`] (`type = "iresnet"`).
    Iresnet(IResNetConfig) => IResNet,
    /// [`MobileFaceNet`] (`type = "mobilefacenet"`).
    Mobilefacenet(MobileFaceNetConfig) => MobileFaceNet,
    /// [`SphereNet`] (`type = "spherenet"`).
    Spherenet(SphereNetConfig) => SphereNet,
    /// [`PocketNet`] (`type = "pocketnet"`, `size = "s"` or `"m"`).
    Pocketnet(PocketNetConfig) => PocketNet,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        BackboneConfig::Iresnet(IResNetConfig::default())
    }
}

/// Declares [`NAMED_BACKBONES`] and [`BackboneConfig::named`] from one list of
/// `"name" => "what", config;` lines, so each short name is written once.
macro_rules! named_backbones {
    ($($name:literal => $what:literal, $config:expr;)+) => {
        /// The short names of insightface's `get_model` (and this crate's additions), with the
        /// configuration each stands for: `(name, what)`.
        pub const NAMED_BACKBONES: &[(&str, &str)] = &[$(($name, $what)),+];

        impl BackboneConfig {
            /// The configuration of a short name of [`NAMED_BACKBONES`] (`r50`, …); `None` for
            /// an unknown name.
            pub fn named(name: &str) -> Option<Self> {
                match name {
                    $($name => Some($config),)+
                    _ => None,
                }
            }
        }
    };
}

named_backbones! {
    "r18" => "IResNet-18, 112x112, 512-d", BackboneConfig::Iresnet(IResNetConfig::r18());
    "r34" => "IResNet-34, 112x112, 512-d", BackboneConfig::Iresnet(IResNetConfig::r34());
    "r50" => "IResNet-50, 112x112, 512-d", BackboneConfig::Iresnet(IResNetConfig::r50());
    "r100" => "IResNet-100, 112x112, 512-d", BackboneConfig::Iresnet(IResNetConfig::r100());
    "r200" => "IResNet-200, 112x112, 512-d", BackboneConfig::Iresnet(IResNetConfig::r200());
    "mbf" => "MobileFaceNet (insightface mbf), 112x112, 512-d",
        BackboneConfig::Mobilefacenet(MobileFaceNetConfig::mbf());
    "mbf_large" => "MobileFaceNet (insightface mbf_large), 112x112, 512-d",
        BackboneConfig::Mobilefacenet(MobileFaceNetConfig::mbf_large());
    "sphere20" => "SphereNet-20 (SphereFace), 112x96, 512-d",
        BackboneConfig::Spherenet(SphereNetConfig::sphere20());
    "sphere64" => "SphereNet-64 (SphereFace), 112x96, 512-d",
        BackboneConfig::Spherenet(SphereNetConfig::sphere64());
    "pocketnets" => "PocketNetS (DARTS cells), 112x112, 128-d",
        BackboneConfig::Pocketnet(PocketNetConfig::s());
    "pocketnetm" => "PocketNetM (DARTS cells), 112x112, 128-d",
        BackboneConfig::Pocketnet(PocketNetConfig::m());
}
