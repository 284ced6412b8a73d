//! Face-recognition backbones on candle, with insightface's parameter names.
//!
//! A backbone maps aligned face crops `(B, 3, H, W)` (RGB, normalised to [-1, 1]) to raw
//! embeddings `(B, D)` through [`candle_nn::ModuleT::forward_t`]; `train = true` uses batch
//! statistics in BatchNorm and updates its running statistics.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{ModuleT, VarMap};
//! use fr_backbone::{IResNet, IResNetConfig};
//! use fr_train::SeededVarMap; // seeded, order-independent initialisation
//!
//! let cfg = IResNetConfig::r18().with_width_mult(0.125).with_input_size(56).with_embedding_size(32);
//! let varmap = VarMap::new(); // trainable: pass varmap.all_vars() filtered by is_trainable
//! let net = IResNet::new(&cfg, SeededVarMap::with_varmap(varmap.clone(), 42).var_builder(DType::F32, &Device::Cpu))?;
//! let images = Tensor::zeros((2, 3, 56, 56), DType::F32, &Device::Cpu)?;
//! assert_eq!(net.forward_t(&images, false)?.dims(), &[2, 32]);
//! // Pretrained (official insightface names): fr_backbone::load_safetensors(path, dtype, &dev)
//! // for inference, or fr_backbone::varmap_from_safetensors(&varmap, path, "") before training.
//! # Ok::<(), fr_backbone::Error>(())
//! ```
//!
//! From a config file, [`BackboneConfig`] (`type = "iresnet"`, …) and [`build_backbone`] give a
//! `Box<dyn Backbone>`. [`BnStatsForward`] adds an eval forward that also reports the batch
//! statistics of every BatchNorm2d input (DeepInversion's prior; `fr_train::invert`).
//!
//! Pretrained weights from a file, a checkpoint folder or a Hugging Face Hub repository
//! (`hf://owner/name`, cached, offline with `HF_HUB_OFFLINE=1`): [`pretrained`], with the key
//! maps of the public layouts in [`keymap`] and the model card (`config.json`) in
//! [`model_card`]. The Hub client is the default cargo feature `hub`.

pub mod bn_stats;
pub mod complexity;
mod conv_bn;
pub mod error;
pub mod hub;
pub mod iresnet;
pub mod keymap;
mod layers;
pub mod mobilefacenet;
pub mod model_card;
pub mod pocketnet;
pub mod pretrained;
pub mod quant;
pub mod registry;
pub mod spherenet;
pub mod weights;

pub use bn_stats::{BnBatchStats, BnStatsForward};
pub use complexity::{parameter_shapes, Complexity, Counter, ParameterShape};
pub use error::{Error, Misshapen, Result};
pub use hub::{HubOptions, HubRepo};
pub use iresnet::{IBasicBlock, IResNet, IResNetConfig};
pub use keymap::{infer_iresnet_config, KeyLayout, KeyMap};
pub use mobilefacenet::{MobileFaceNet, MobileFaceNetConfig};
pub use model_card::{ColourOrder, ModelCard, Normalisation, MODEL_CARD_FILE};
pub use pocketnet::{PocketNet, PocketNetConfig, PocketNetSize};
pub use pretrained::{ConfigOrigin, LoadOptions, Pretrained, Source};
pub use quant::{model_size_bytes, QuantAct, QuantBits};
pub use registry::{
    build_backbone, build_bn_stats_backbone, Backbone, BackboneConfig, NAMED_BACKBONES,
};
pub use spherenet::{SphereNet, SphereNetConfig};
pub use weights::{
    backbone_from_tensors, load_pth, load_safetensors, read_pth, read_safetensors, read_weights,
    var_builder_from_tensors, varmap_from_safetensors, varmap_from_tensors, LoadReport,
    WeightsFormat,
};
