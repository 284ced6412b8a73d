//! Face-recognition loss heads on candle, behind one [`Head`] trait and a serde-tagged
//! [`HeadConfig`] registry: softmax, NormFace, CosFace / AM-Softmax, ArcFace (and the combined
//! margin), sub-center ArcFace, L-Softmax, SphereFace, CurricularFace, AdaFace, MagFace,
//! Knot Magnify, center loss, GB-CosFace, EPL, UniFace, the uniform-classification BCE,
//! UniTSFace, the Deep Simplex Classifier, angular softmax + batch-hard triplet and LH2Face
//! (vMF similarity, uncertainty-aware margin, proxy losses); [`partial_fc`] samples the class
//! centres of any of them and [`sharded`] is its model-parallel form over K ranks (simulated in
//! one process); [`qmagface`] scoring and [`kd`] losses are tools beside the heads.
//! The table of heads, defaults and published numbers is `docs/heads.md` in the repository.
//!
//! A head takes embeddings `(B, D)` and u32 labels `(B,)` and returns the loss to
//! back-propagate, the final logits and named statistics. Its class centres live in the
//! caller's `VarMap` (via the `VarBuilder` it is built with), so they train and checkpoint
//! with the backbone.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use fr_heads::{arcface::ArcFaceConfig, build_head, HeadConfig, StepContext};
//!
//! let dev = Device::Cpu;
//! let varmap = VarMap::new(); // owns the class centres `weight` (1000, 128)
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let mut head = build_head(&HeadConfig::ArcFace(ArcFaceConfig::default()), 128, 1000, vb)?;
//! let embeddings = Tensor::randn(0f32, 1., (8, 128), &dev)?;
//! let labels = Tensor::new(&[3u32, 14, 15, 92, 65, 35, 89, 79], &dev)?;
//! let out = head.forward(&embeddings, &labels, &StepContext::train(0, 0))?;
//! let grads = out.loss.backward()?; // hand to an optimiser over varmap.all_vars()
//! assert!(grads.get(&varmap.all_vars()[0]).is_some() && out.stats["loss"].is_finite());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Modules: [`common`] (normalisation, cosine, masks, stable cross-entropy), [`margin`] (the
//! target-logit margin of arcface_torch's `CombinedMarginLoss`, shared by ArcFace, CosFace,
//! sub-center ArcFace, EPL, Partial FC and the model-parallel head), one module per head, [`qmagface`] (quality-aware MagFace comparison scores), [`vmf`] (Bessel functions
//! and the vMF normaliser), [`registry`].

pub mod adaface;
pub mod arcface;
pub mod center;
pub mod common;
pub mod cosface;
pub mod curricularface;
pub mod epl;
mod error;
pub mod gbcosface;
mod head;
pub mod kd;
pub mod km;
pub mod lh2face;
pub mod lsoftmax;
pub mod magface;
pub mod margin;
pub mod normface;
pub mod partial_fc;
pub mod qmagface;
pub mod registry;
pub mod sharded;
pub mod simplex;
pub mod softmax;
pub mod sphereface;
pub mod subcenter;
pub mod triplet;
pub mod uniface;
pub mod unitsface;
pub mod vmf;

pub use error::{Error, Result};
pub use head::{Head, HeadOutput, StepContext};
pub use registry::{build_head, HeadConfig};
