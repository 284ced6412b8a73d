//! QuantFace fake quantisation: asymmetric uniform signed quantisers for weights and
//! activations with a straight-through gradient.
//!
//! Boutros, Damer, Kuijper, "QuantFace: Towards Lightweight Face Recognition by Synthetic Data
//! Low-bit Quantization" (ICPR 2022). Reference code: `fdbtrs/QuantFace`,
//! `quantization_utils/quant_utils.py` (`asymmetric_linear_quantization_params`,
//! `linear_quantize`, `linear_dequantize`, `AsymmetricQuantFunction`) and `quant_modules.py`
//! (`Quant_Conv2d`, `Quant_Linear`, `QuantAct`), which take them from ZeroQ.
//!
//! With `k` bits and a range `[lo, hi]`:
//!
//! ```text
//! S = (2^k − 1) / max(hi − lo, 1e-8)           (the inverse of a step size)
//! Z = round(S · lo) + 2^(k−1)
//! q = clamp(round(S · x − Z), −2^(k−1), 2^(k−1) − 1)       (the integer code)
//! x̂ = (q + Z) / S
//! ```
//!
//! `round` is half to even (`torch.round`); every step is evaluated in the tensor's precision
//! (f32 or f64) in the reference's order, so the codes are bit-exact. Weights use one range per
//! output channel (min / max of that channel, recomputed every forward); activations one range
//! per tensor, a running min / max that starts at 0 and is updated for the first
//! `freeze_after` training forwards (300 in QuantFace), then frozen ([`QuantAct`]). The
//! backward pass is the identity (straight-through estimator).
//!
//! PReLU slopes (`QuantActPreLu` in `quant_modules.py`) are fake-quantised too, at the
//! *activation* width, with one range for the whole slope vector `(C,)`: `lo` and `hi` are the
//! minimum and maximum over the channels of the current (detached) slopes, recomputed every
//! forward ([`fake_quantize_prelu_slopes`]). The PReLU then runs with the quantised slopes and
//! its output goes through the per-tensor activation quantiser.
//!
//! [`crate::IResNet::quantize`] and [`crate::MobileFaceNet::quantize`] switch a built backbone
//! to fake-quantised convolution / linear weights, PReLU slopes and activations
//! ([`QuantBits::w8a8`], [`QuantBits::w6a6`]); BatchNorm stays in float, as in QuantFace.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use fr_kernels::nn::{Conv2d, PReLU};
use fr_kernels::Kernels;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Floating-point types the quantiser runs in (f32, the reference's, or f64).
pub trait QuantFloat: Copy + PartialOrd + std::fmt::Debug {
    /// `x as Self`.
    fn from_f64(x: f64) -> Self;
    /// `self as f64`.
    fn to_f64(self) -> f64;
    /// Round half to even.
    fn round_even(self) -> Self;
    /// IEEE operations in this precision.
    fn add(self, o: Self) -> Self;
    /// `self − o`.
    fn sub(self, o: Self) -> Self;
    /// `self · o`.
    fn mul(self, o: Self) -> Self;
    /// `self / o`.
    fn div(self, o: Self) -> Self;
}

macro_rules! quant_float {
    ($t:ty) => {
        impl QuantFloat for $t {
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn round_even(self) -> Self {
                self.round_ties_even()
            }
            fn add(self, o: Self) -> Self {
                self + o
            }
            fn sub(self, o: Self) -> Self {
                self - o
            }
            fn mul(self, o: Self) -> Self {
                self * o
            }
            fn div(self, o: Self) -> Self {
                self / o
            }
        }
    };
}
quant_float!(f32);
quant_float!(f64);

/// Scale `S` and integral zero point `Z` of a `bits`-bit signed asymmetric quantiser for the
/// range `[lo, hi]` (`asymmetric_linear_quantization_params` with `integral_zero_point` and
/// `signed`), computed in `T`'s precision. A degenerate range (`hi − lo < 1e-8`) is widened to
/// `1e-8`, as in the reference.
pub fn quant_params<T: QuantFloat>(bits: u32, lo: T, hi: T) -> (T, T) {
    let n = T::from_f64(((1u64 << bits) - 1) as f64);
    let eps = T::from_f64(1e-8);
    let range = hi.sub(lo);
    let range = if range < eps { eps } else { range };
    let scale = n.div(range);
    let zero_point = scale
        .mul(lo)
        .round_even()
        .add(T::from_f64((1u64 << (bits - 1)) as f64));
    (scale, zero_point)
}

/// The integer code of `x`: `clamp(round(S·x − Z), −2^(k−1), 2^(k−1) − 1)` (`linear_quantize`
/// and the clamp of `AsymmetricQuantFunction`).
pub fn quantize<T: QuantFloat>(bits: u32, x: T, scale: T, zero_point: T) -> i64 {
    let half = (1i64 << (bits - 1)) as f64;
    let q = scale.mul(x).sub(zero_point).round_even().to_f64();
    q.clamp(-half, half - 1.0) as i64
}

/// The value a code stands for: `(q + Z) / S` (`linear_dequantize`).
pub fn dequantize<T: QuantFloat>(code: i64, scale: T, zero_point: T) -> T {
    T::from_f64(code as f64).add(zero_point).div(scale)
}

/// The result of quantising one tensor: per range (one per output channel, or one for the
/// tensor) the bounds, scale and zero point; per element the code and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized<T> {
    /// Lower bounds `lo`, one per range.
    pub min: Vec<T>,
    /// Upper bounds `hi`, one per range.
    pub max: Vec<T>,
    /// Scales `S` (inverse step sizes), one per range.
    pub scale: Vec<T>,
    /// Zero points `Z` (integral), one per range.
    pub zero_point: Vec<T>,
    /// Integer codes in `[−2^(k−1), 2^(k−1) − 1]`, row-major like the input.
    pub codes: Vec<i64>,
    /// Fake-quantised values `(q + Z) / S`, row-major like the input.
    pub dequantized: Vec<T>,
}

fn quantize_rows<T: QuantFloat>(bits: u32, x: &[T], ranges: &[(T, T)]) -> Quantized<T> {
    let row = x.len() / ranges.len().max(1);
    let mut out = Quantized {
        min: Vec::new(),
        max: Vec::new(),
        scale: Vec::new(),
        zero_point: Vec::new(),
        codes: Vec::with_capacity(x.len()),
        dequantized: Vec::with_capacity(x.len()),
    };
    for (chunk, &(lo, hi)) in x.chunks(row.max(1)).zip(ranges) {
        let (s, z) = quant_params(bits, lo, hi);
        for &v in chunk {
            let q = quantize(bits, v, s, z);
            out.codes.push(q);
            out.dequantized.push(dequantize(q, s, z));
        }
        out.min.push(lo);
        out.max.push(hi);
        out.scale.push(s);
        out.zero_point.push(z);
    }
    out
}

fn check_bits(bits: u32) -> Result<()> {
    if !(2..=16).contains(&bits) {
        return Err(Error::config("bits", format!("{bits}: must be in 2..=16")));
    }
    Ok(())
}

/// Per-output-channel weight quantisation (`Quant_Conv2d` / `Quant_Linear`): `w` is row-major
/// `(Cout, …)` with `out_channels` rows; each row is quantised with its own min / max.
///
/// # Errors
/// `bits` outside 2..=16, or a length that is not a multiple of `out_channels`.
pub fn quantize_per_channel<T: QuantFloat>(
    bits: u32,
    w: &[T],
    out_channels: usize,
) -> Result<Quantized<T>> {
    check_bits(bits)?;
    if out_channels == 0 || w.len() % out_channels != 0 || w.is_empty() {
        return Err(Error::config(
            "out_channels",
            format!(
                "{} weights do not split into {out_channels} channels",
                w.len()
            ),
        ));
    }
    let row = w.len() / out_channels;
    let ranges: Vec<(T, T)> = w
        .chunks(row)
        .map(|r| {
            r.iter().fold((r[0], r[0]), |(lo, hi), &v| {
                (if v < lo { v } else { lo }, if v > hi { v } else { hi })
            })
        })
        .collect();
    Ok(quantize_rows(bits, w, &ranges))
}

/// Per-tensor quantisation with a given range `[lo, hi]` (`AsymmetricQuantFunction` as
/// `QuantAct` calls it).
///
/// # Errors
/// `bits` outside 2..=16.
pub fn quantize_with_range<T: QuantFloat>(
    bits: u32,
    x: &[T],
    lo: T,
    hi: T,
) -> Result<Quantized<T>> {
    check_bits(bits)?;
    Ok(quantize_rows(bits, x, &[(lo, hi)]))
}

/// `q + (x − sg(x))`: the value of `q`, the gradient of `x` (straight-through).
fn straight_through(x: &Tensor, q: Tensor) -> candle_core::Result<Tensor> {
    if fr_kernels::is_grad_enabled() && x.track_op() {
        q.add(&(x - x.detach())?)
    } else {
        Ok(q)
    }
}

fn host<T: QuantFloat + candle_core::WithDType>(x: &Tensor) -> candle_core::Result<Vec<T>> {
    x.flatten_all()?.to_vec1::<T>()
}

fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Fake-quantises a weight tensor `(Cout, …)` per output channel with `bits` bits (range
/// recomputed from the current values), straight-through gradient. Computed on the host in
/// the weight's precision (f32 or f64).
///
/// # Errors
/// A dtype other than f32 / f64, `bits` outside 2..=16, or a scalar weight.
pub fn fake_quantize_weight(w: &Tensor, bits: u32) -> candle_core::Result<Tensor> {
    let cout = *w
        .dims()
        .first()
        .ok_or_else(|| candle_core::Error::Msg("weight without dimensions".into()))?;
    let q = match w.dtype() {
        DType::F32 => {
            let v = quantize_per_channel(bits, &host::<f32>(w)?, cout).map_err(to_candle)?;
            Tensor::from_vec(v.dequantized, w.shape(), w.device())?
        }
        DType::F64 => {
            let v = quantize_per_channel(bits, &host::<f64>(w)?, cout).map_err(to_candle)?;
            Tensor::from_vec(v.dequantized, w.shape(), w.device())?
        }
        d => candle_core::bail!("fake quantisation needs f32 or f64 weights, got {d:?}"),
    };
    straight_through(w, q)
}

/// Fake-quantises `x` (any shape) with one range `[lo, hi]`, straight-through gradient.
///
/// # Errors
/// A dtype other than f32 / f64, or `bits` outside 2..=16.
pub fn fake_quantize_range(x: &Tensor, bits: u32, lo: f64, hi: f64) -> candle_core::Result<Tensor> {
    let q = match x.dtype() {
        DType::F32 => {
            let v = quantize_with_range(bits, &host::<f32>(x)?, lo as f32, hi as f32)
                .map_err(to_candle)?;
            Tensor::from_vec(v.dequantized, x.shape(), x.device())?
        }
        DType::F64 => {
            let v = quantize_with_range(bits, &host::<f64>(x)?, lo, hi).map_err(to_candle)?;
            Tensor::from_vec(v.dequantized, x.shape(), x.device())?
        }
        d => candle_core::bail!("fake quantisation needs f32 or f64 tensors, got {d:?}"),
    };
    straight_through(x, q)
}

/// Fake-quantises a PReLU slope vector `(C,)` (or a shared slope `(1,)`) with one range for
/// the whole vector: `lo` / `hi` are the minimum / maximum over its channels, read from the
/// detached values on every call, and `bits` is the network's *activation* width. Same shape
/// and dtype out; straight-through gradient (the slope receives the gradient its quantised
/// value gets). QuantFace's `QuantActPreLu` (`fdbtrs/QuantFace`,
/// `quantization_utils/quant_modules.py`).
///
/// # Errors
/// An empty tensor, a dtype other than f32 / f64, or `bits` outside 2..=16.
pub fn fake_quantize_prelu_slopes(slopes: &Tensor, bits: u32) -> candle_core::Result<Tensor> {
    if slopes.elem_count() == 0 {
        candle_core::bail!("fake quantisation of an empty PReLU slope vector");
    }
    let d = slopes.detach().flatten_all()?.to_dtype(DType::F64)?;
    // f32 bounds are exact in f64, so `fake_quantize_range` sees them unchanged.
    let (lo, hi) = (
        d.min_all()?.to_scalar::<f64>()?,
        d.max_all()?.to_scalar::<f64>()?,
    );
    fake_quantize_range(slopes, bits, lo, hi)
}

/// Bit widths of a quantised backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantBits {
    /// Bits of convolution and linear weights (per output channel).
    pub weight: u32,
    /// Bits of activations (per tensor, after every PReLU and residual addition) and of the
    /// PReLU slopes (one range per slope vector).
    pub activation: u32,
    /// Training forwards during which the activation ranges are updated (QuantFace: 300).
    pub freeze_after: usize,
}

impl QuantBits {
    /// QuantFace's w8a8.
    pub fn w8a8() -> Self {
        Self {
            weight: 8,
            activation: 8,
            freeze_after: 300,
        }
    }

    /// QuantFace's w6a6.
    pub fn w6a6() -> Self {
        Self {
            weight: 6,
            activation: 6,
            ..Self::w8a8()
        }
    }

    /// Checks both widths.
    ///
    /// # Errors
    /// A width outside 2..=16 (the error names `weight` or `activation`).
    pub fn validate(&self) -> Result<()> {
        for (key, b) in [("weight", self.weight), ("activation", self.activation)] {
            if !(2..=16).contains(&b) {
                return Err(Error::config(key, format!("{b} bits: must be in 2..=16")));
            }
        }
        Ok(())
    }
}

/// Running activation range of a [`QuantAct`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActRange {
    /// Running minimum (starts at 0).
    pub min: f64,
    /// Running maximum (starts at 0).
    pub max: f64,
    /// Training forwards seen so far.
    pub updates: usize,
}

/// Per-tensor activation quantiser with a running range (`QuantAct`): the range starts at
/// `[0, 0]` and, during the first `freeze_after` training forwards, widens to the batch's
/// min / max; afterwards (and in evaluation) it is fixed. Clones share the range.
#[derive(Debug, Clone)]
pub struct QuantAct {
    bits: u32,
    freeze_after: usize,
    range: Arc<Mutex<ActRange>>,
}

impl QuantAct {
    /// A fresh quantiser (range `[0, 0]`).
    pub fn new(bits: u32, freeze_after: usize) -> Self {
        Self {
            bits,
            freeze_after,
            range: Arc::new(Mutex::new(ActRange {
                min: 0.0,
                max: 0.0,
                updates: 0,
            })),
        }
    }

    /// The current range.
    pub fn range(&self) -> ActRange {
        *self.range.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `x` (any shape) → its fake-quantised value, same shape; in training (and while not
    /// frozen) the range is first widened to `x`'s min / max. Straight-through gradient.
    ///
    /// # Errors
    /// A dtype other than f32 / f64.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (lo, hi) = {
            let mut r = self.range.lock().unwrap_or_else(|e| e.into_inner());
            if train && r.updates < self.freeze_after {
                let d = x.detach();
                let (mn, mx) = (
                    d.min_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                    d.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                );
                r.min = r.min.min(mn);
                r.max = r.max.max(mx);
                r.updates += 1;
            }
            (r.min, r.max)
        };
        fake_quantize_range(x, self.bits, lo, hi)
    }
}

/// `conv` with its weight fake-quantised to `bits` bits (bias-free convolutions, as in every
/// backbone here).
pub(crate) fn quantized_conv(
    conv: &Conv2d,
    bits: Option<u32>,
    kernels: Kernels,
) -> candle_core::Result<std::borrow::Cow<'_, Conv2d>> {
    Ok(match bits {
        None => std::borrow::Cow::Borrowed(conv),
        Some(b) => std::borrow::Cow::Owned(Conv2d::new(
            fake_quantize_weight(conv.weight(), b)?,
            None,
            conv.params(),
            kernels,
        )),
    })
}

/// `linear` with its weight fake-quantised to `bits` bits per output row when given, its
/// tensors tracked (detached inside `fr_kernels::no_grad`, like the other layers).
pub(crate) fn quantized_linear(
    linear: &candle_nn::Linear,
    bits: Option<u32>,
) -> candle_core::Result<candle_nn::Linear> {
    let weight = match bits {
        Some(b) => fake_quantize_weight(linear.weight(), b)?,
        None => linear.weight().clone(),
    };
    Ok(candle_nn::Linear::new(
        fr_kernels::track(&weight),
        linear.bias().map(fr_kernels::track),
    ))
}

/// `prelu` with its slopes fake-quantised to `bits` bits ([`fake_quantize_prelu_slopes`]),
/// rebuilt on `kernels`.
pub(crate) fn quantized_prelu(
    prelu: &PReLU,
    bits: Option<u32>,
    kernels: Kernels,
) -> candle_core::Result<std::borrow::Cow<'_, PReLU>> {
    Ok(match bits {
        None => std::borrow::Cow::Borrowed(prelu),
        Some(b) => std::borrow::Cow::Owned(PReLU::new(
            fake_quantize_prelu_slopes(prelu.weight(), b)?,
            kernels,
        )),
    })
}

/// Storage in bytes of `params` parameters at `bits` bits each, rounded up to whole bytes
/// (QuantFace's model-size column: every parameter at the weight width, e.g. 32 bits for
/// the float model).
pub fn model_size_bytes(params: u64, bits: u32) -> u64 {
    (params * bits as u64).div_ceil(8)
}

/// Storage in bytes of a backbone's learnable parameters ([`crate::Complexity::params`]) at
/// `bits` bits each.
///
/// # Errors
/// An invalid configuration.
pub fn backbone_size_bytes(cfg: &crate::BackboneConfig, bits: u32) -> Result<u64> {
    Ok(model_size_bytes(cfg.complexity()?.params, bits))
}
