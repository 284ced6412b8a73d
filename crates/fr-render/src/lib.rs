//! The reconstruction branch of LH2Face: an Unsup3D-style photo-geometric autoencoder (Wu et
//! al., CVPR 2020, "Unsupervised Learning of Probably Symmetric Deformable 3D Objects from
//! Images in the Wild"; github.com/elliottwu/unsup3d) on candle.
//!
//! From a face image, networks predict a canonical depth, albedo, light, view and confidence
//! maps; a differentiable renderer shades the canonical face (Lambertian), warps it into the
//! input view and resamples it bilinearly; the reconstruction loss compares that with the
//! input, and the horizontally flipped canonical face is rendered too (the symmetry prior); a
//! frame term keeps the view from moving the face out of the canonical image.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use fr_render::{to_rgb8, ReconstructionBranch, RenderConfig};
//!
//! let cfg = RenderConfig { image_size: 32, ..RenderConfig::default() };
//! let varmap = VarMap::new(); // depth_net.*, albedo_net.*, confidence_net.*, light_net.*, view_net.*
//! let branch = ReconstructionBranch::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
//! let images = Tensor::rand(0f32, 1., (2, 3, 32, 32), &Device::Cpu)?; // RGB in [0, 1]
//! let out = branch.forward(&images, true)?;
//! let loss = out.loss(&images, &cfg)?; // L_reco
//! let grads = loss.total.backward()?; // hand to an optimiser over the non-`running_` vars
//! assert_eq!(out.canonical_image.dims(), &[2, 3, 32, 32]); // the input of L_FR^canon
//! let picture = to_rgb8(&out.reconstruction.get(0)?)?; // the re-rendered view, for a grid
//! assert_eq!(picture.dimensions(), (32, 32));
//! # let _ = grads;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Modules: [`camera`] (intrinsics, view transform), [`sample`] (differentiable
//! `grid_sample`, flips), [`renderer`] (normals, shading, the warp into the view), [`nets`],
//! [`loss`] (L_reco and [`ReconstructionOutput`]), [`config`], the [`ReconstructionBranch`]
//! that ties them together, [`joint`] (LH2Face's joint objective `λ_reco·L_reco +
//! λ_canon·L_FR^canon + λ_view·L_view` as an auxiliary loss of fr-train's `Trainer`) and
//! [`to_rgb8`] for pictures.

mod branch;
pub mod camera;
pub mod config;
mod error;
pub mod joint;
pub mod loss;
pub mod nets;
pub mod renderer;
pub mod sample;
#[cfg(test)]
mod testutil;
mod visual;

pub use branch::ReconstructionBranch;
pub use config::RenderConfig;
pub use error::{Error, Result};
pub use joint::{JointConfig, JointLosses, RenderObjective};
pub use loss::{photometric_loss, ReconstructionLoss, ReconstructionOutput};
pub use renderer::{Renderer, Rendering};
pub use sample::{flip_horizontal, grid_sample, resize_bilinear};
pub use visual::to_rgb8;
