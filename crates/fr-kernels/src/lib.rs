//! CPU kernels for face-recognition backbones, as candle custom ops with their own backward.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use fr_kernels::{conv2d, ConvParams};
//!
//! # fn main() -> candle_core::Result<()> {
//! fr_kernels::tune_cpu_runtime(); // once, first thing in main
//! let x = Var::randn(0f32, 1.0, (2, 3, 9, 9), &Device::Cpu)?;
//! let w = Var::randn(0f32, 0.1, (8, 3, 3, 3), &Device::Cpu)?;
//! let p = ConvParams { stride: 2, padding: 1, ..Default::default() };
//! let y = conv2d(x.as_tensor(), w.as_tensor(), p)?; // (2, 8, 5, 5)
//! let grads = y.sqr()?.sum_all()?.backward()?;
//! assert_eq!(grads.get(&w).unwrap().dims(), &[8, 3, 3, 3]);
//! // Inference without an autograd graph: the output keeps nothing alive.
//! let y = fr_kernels::no_grad(|| conv2d(&x.detach(), &w.detach(), p))?;
//! assert_eq!(y.dims(), &[2, 8, 5, 5]);
//! # Ok(())
//! # }
//! ```
//!
//! candle 0.11's CPU convolution builds a full-size im2col buffer per call and computes the
//! input gradient with a naive transposed convolution; BatchNorm and PReLU are chains of
//! broadcast ops whose intermediates all stay alive for backward. This crate replaces them on
//! the CPU with
//! - [`conv2d`]: im2col + GEMM (the `gemm` crate candle uses) per chunk of images, both
//!   gradients in one pass, reused per-thread buffers, 1×1 and depthwise fast paths;
//! - [`batch_norm_train`] / [`batch_norm_eval`]: one fused pass each way (closed-form backward);
//! - [`prelu`]: one fused pass each way, and [`batch_norm_prelu_train`], the two as one op that
//!   does not store the BatchNorm output;
//! - [`conv2d_eval_fused`]: inference convolution with BatchNorm, PReLU and the residual add
//!   applied in the GEMM epilogue;
//! - [`pool3x3`]: 3×3, padding-1 max / average pooling (DARTS' pooling primitives) with an exact
//!   backward (candle's `max_pool2d` backward is scaled wrongly and has no padding).
//!
//! The layers in [`nn`] pick these kernels or candle's own ops (the reference path) through
//! [`Kernels`]; on a GPU they always use candle's. [`no_grad`] runs inference without an
//! autograd graph and [`tune_cpu_runtime`] keeps glibc from `mmap`-ing every activation and
//! candle's pool from spinning on the cores the kernels use. Results are deterministic for a given
//! thread count. Tests check every kernel against candle and against finite differences.

mod alloc;
mod batch_norm;
mod bn_prelu;
mod conv2d;
mod conv2d_eval;
mod depthwise;
mod elem;
mod grad;
pub mod nn;
mod pool;
mod prelu;

pub use alloc::{tune_allocator, tune_cpu_runtime};
pub use batch_norm::{batch_norm_eval, batch_norm_train, BatchStats};
pub use bn_prelu::batch_norm_prelu_train;
pub use conv2d::{conv2d, ConvParams};
pub use conv2d_eval::conv2d_eval_fused;
pub use elem::Elem;
pub use grad::{is_grad_enabled, no_grad, track};
pub use nn::Kernels;
pub use pool::{pool3x3, PoolKind};
pub use prelu::prelu;
