//! CPU kernels for face-recognition backbones, as candle custom ops with their own backward.
//!
//! candle 0.11's CPU convolution builds a full-size im2col buffer per call and computes the
//! input gradient with a naive transposed convolution; BatchNorm and PReLU are chains of
//! broadcast ops whose intermediates all stay alive for backward. This crate replaces them on
//! the CPU with
//! - [`conv2d`]: im2col + GEMM (the `gemm` crate candle uses) per chunk of images, both
//!   gradients in one pass, reused per-thread buffers, 1×1 and depthwise fast paths;
//! - [`batch_norm_train`] / [`batch_norm_eval`]: one fused pass each way (closed-form backward);
//! - [`prelu`]: one fused pass each way;
//! - [`conv2d_eval_fused`]: inference convolution with BatchNorm, PReLU and the residual add
//!   applied in the GEMM epilogue.
//!
//! The layers in [`nn`] pick these kernels or candle's own ops (the reference path) through
//! [`Kernels`]; on a GPU they always use candle's. [`no_grad`] runs inference without an
//! autograd graph and [`tune_cpu_runtime`] keeps glibc from `mmap`-ing every activation and
//! candle's pool from spinning on the cores the kernels use. Results are deterministic for a given
//! thread count. Tests check every kernel against candle and against finite differences.

mod alloc;
mod batch_norm;
mod conv2d;
mod conv2d_eval;
mod depthwise;
mod elem;
mod grad;
pub mod nn;
mod prelu;

pub use alloc::{tune_allocator, tune_cpu_runtime};
pub use batch_norm::{batch_norm_eval, batch_norm_train, BatchStats};
pub use conv2d::{conv2d, ConvParams};
pub use conv2d_eval::conv2d_eval_fused;
pub use elem::Elem;
pub use grad::{is_grad_enabled, no_grad, track};
pub use nn::Kernels;
pub use prelu::prelu;
