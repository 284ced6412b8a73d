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
//! `Box<dyn Backbone>`.

pub mod error;
pub mod iresnet;
pub mod registry;
pub mod weights;

pub use error::{Error, Result};
pub use iresnet::{IBasicBlock, IResNet, IResNetConfig};
pub use registry::{build_backbone, Backbone, BackboneConfig};
pub use weights::{
    load_pth, load_safetensors, read_pth, read_safetensors, var_builder_from_tensors,
    varmap_from_safetensors, varmap_from_tensors, LoadReport,
};
