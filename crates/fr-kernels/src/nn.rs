//! Layers that run on this crate's kernels on the CPU and on candle's own ops elsewhere (or
//! everywhere, as the reference path, with [`Kernels::Candle`]).

use candle_core::{DType, Module, ModuleT, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::batch_norm::{batch_norm_eval, batch_norm_train, BatchStats};
use crate::bn_prelu::batch_norm_prelu_train;
use crate::conv2d::{conv2d, ConvParams};
use crate::conv2d_eval::conv2d_eval_fused;
use crate::grad::track;
use crate::pool::{pool3x3, pool3x3_windowed, PoolKind};
use crate::prelu::prelu;

/// Which implementation a layer runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// This crate's kernels for f32 / f64 tensors on the CPU, candle's ops otherwise.
    #[default]
    Auto,
    /// Always this crate's kernels (errors on a GPU tensor).
    Fused,
    /// Always candle's own ops: the reference path.
    Candle,
}

impl Kernels {
    /// Whether `x` goes through this crate's kernels.
    pub fn fused_for(self, x: &Tensor) -> bool {
        match self {
            Kernels::Auto => x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64),
            Kernels::Fused => true,
            Kernels::Candle => false,
        }
    }
}

/// 2-D convolution layer, weight `(Cout, Cin/groups, kh, kw)`, optional bias `(Cout,)`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    params: ConvParams,
    kernels: Kernels,
}

impl Conv2d {
    /// A convolution with the given parameters.
    pub fn new(weight: Tensor, bias: Option<Tensor>, params: ConvParams, kernels: Kernels) -> Self {
        Self {
            weight,
            bias,
            params,
            kernels,
        }
    }

    /// The weight `(Cout, Cin/groups, kh, kw)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Stride, padding, dilation and groups.
    pub fn params(&self) -> ConvParams {
        self.params
    }

    /// Inference: `prelu(bn(conv(x))) + residual` with `bn` in eval mode. Inside
    /// [`crate::no_grad`], on the CPU kernels and with an affine `bn`, the three layers and the
    /// add run as one convolution with a fused epilogue ([`conv2d_eval_fused`]); otherwise
    /// (gradients recorded, a GPU, the candle path) as the separate layers. Same result up to
    /// float rounding.
    ///
    /// # Errors
    /// Shape mismatches, or failures of the layers.
    pub fn forward_eval_fused(
        &self,
        x: &Tensor,
        bn: &BatchNorm,
        prelu: Option<&PReLU>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let fusable = !crate::grad::is_grad_enabled()
            && self.kernels.fused_for(x)
            && bn.kernels.fused_for(x)
            && prelu.is_none_or(|p| p.kernels.fused_for(x));
        if let (true, Some((scale, mut shift))) = (fusable, bn.eval_scale_shift()?) {
            if let Some(b) = &self.bias {
                let b = BatchNorm::host(b)?;
                for ((s, a), b) in shift.iter_mut().zip(&scale).zip(&b) {
                    *s += a * b;
                }
            }
            let slope = prelu.map(|p| p.slopes(scale.len())).transpose()?;
            return conv2d_eval_fused(x, &self.weight, self.params, scale, shift, slope, residual);
        }
        let y = bn.forward_t(&self.forward(x)?, false)?;
        let y = match prelu {
            Some(p) => p.forward(&y)?,
            None => y,
        };
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }
}

impl Module for Conv2d {
    /// `(B, Cin, H, W)` → `(B, Cout, Ho, Wo)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.params;
        let (x, weight) = (track(x), track(&self.weight));
        let y = if self.kernels.fused_for(&x) {
            conv2d(&x, &weight, p)?
        } else if x.device().is_cpu() && x.dtype() == DType::BF16 {
            // candle's CPU convolution has no bf16 matmul: widen to f32 and round back (the
            // result is what a bf16 convolution with f32 accumulation gives).
            x.to_dtype(DType::F32)?
                .conv2d(
                    &weight.to_dtype(DType::F32)?,
                    p.padding,
                    p.stride,
                    p.dilation,
                    p.groups,
                )?
                .to_dtype(DType::BF16)?
        } else {
            x.conv2d(&weight, p.padding, p.stride, p.dilation, p.groups)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&track(b).reshape((1, b.elem_count(), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Batch normalisation (`(B, C)` or `(B, C, H, W)`) with running statistics kept as `Var`s of
/// the wrapped candle-nn layer, so both paths read and update the same statistics (momentum as
/// PyTorch: `running = (1 − m)·running + m·batch`, unbiased batch variance).
#[derive(Debug, Clone)]
pub struct BatchNorm {
    inner: candle_nn::BatchNorm,
    running_mean: Var,
    running_var: Var,
    kernels: Kernels,
}

impl BatchNorm {
    /// Wraps a candle-nn BatchNorm (its running statistics are shared, not copied, when they
    /// are `Var`s, as with a `VarMap`-backed builder).
    ///
    /// # Errors
    /// Only from candle when copying non-variable statistics.
    pub fn new(inner: candle_nn::BatchNorm, kernels: Kernels) -> Result<Self> {
        let running_mean = Var::from_tensor(inner.running_mean())?;
        let running_var = Var::from_tensor(inner.running_var())?;
        // Rebuild the candle layer on the same Vars so the reference path shares them too.
        let inner = match inner.weight_and_bias() {
            Some((w, b)) => candle_nn::BatchNorm::new(
                running_mean.dim(0)?,
                running_mean.as_tensor().clone(),
                running_var.as_tensor().clone(),
                w.clone(),
                b.clone(),
                inner.eps(),
            )?,
            None => candle_nn::BatchNorm::new_no_bias(
                running_mean.dim(0)?,
                running_mean.as_tensor().clone(),
                running_var.as_tensor().clone(),
                inner.eps(),
            )?,
        };
        Ok(Self {
            inner,
            running_mean,
            running_var,
            kernels,
        })
    }

    /// `num_features` channels from `vb` (`weight`, `bias`, `running_mean`, `running_var`).
    /// With a bf16 / f16 `vb` the running statistics are f32 variables (autocast keeps
    /// BatchNorm statistics in f32); `weight` and `bias` take `vb`'s dtype.
    ///
    /// # Errors
    /// Missing or mis-shaped tensors in `vb`.
    pub fn load(
        num_features: usize,
        eps: f64,
        vb: candle_nn::VarBuilder,
        kernels: Kernels,
    ) -> Result<Self> {
        if !matches!(vb.dtype(), DType::BF16 | DType::F16) {
            return Self::new(candle_nn::batch_norm(num_features, eps, vb)?, kernels);
        }
        // A half-precision model (mixed-precision training) keeps its running statistics in
        // f32, as PyTorch's autocast does: an exponential average stored in bf16 stalls once
        // `m · (batch − running)` falls below half an ulp of the running value.
        use candle_nn::Init;
        let stats = vb.clone().set_dtype(DType::F32);
        let running_mean = stats.get_with_hints(num_features, "running_mean", Init::Const(0.))?;
        let running_var = stats.get_with_hints(num_features, "running_var", Init::Const(1.))?;
        let weight = vb.get_with_hints(num_features, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(num_features, "bias", Init::Const(0.))?;
        let inner =
            candle_nn::BatchNorm::new(num_features, running_mean, running_var, weight, bias, eps)?;
        Self::new(inner, kernels)
    }

    /// The running mean `(C,)`.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running variance `(C,)`.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    fn host(t: &Tensor) -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.to_vec1::<f64>()
    }

    /// The eval-mode map `y = x·scale + shift` per channel: `scale = γ/√(running_var + ε)`,
    /// `shift = β − running_mean·scale` (`(C,)` each, f64); `None` without affine parameters.
    ///
    /// # Errors
    /// Only from reading the tensors.
    pub fn eval_scale_shift(&self) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        let Some((w, b)) = self.inner.weight_and_bias() else {
            return Ok(None);
        };
        let (w, b) = (Self::host(w)?, Self::host(b)?);
        let (rm, rv) = (
            Self::host(self.running_mean())?,
            Self::host(self.running_var())?,
        );
        let eps = self.inner.eps();
        let scale: Vec<f64> = w
            .iter()
            .zip(&rv)
            .map(|(g, v)| g / (v + eps).sqrt())
            .collect();
        let shift = b
            .iter()
            .zip(&rm)
            .zip(&scale)
            .map(|((b, m), a)| b - m * a)
            .collect();
        Ok(Some((scale, shift)))
    }

    /// `running = (1 − m)·running + m·batch`, with the unbiased batch variance (PyTorch).
    fn update_running_stats(&self, st: &BatchStats) -> Result<()> {
        let m = self.inner.momentum();
        let unbias = st.count as f64 / (st.count.max(2) - 1) as f64;
        let update = |var: &Var, batch: &[f64], scale: f64| -> Result<()> {
            let old = Self::host(var.as_tensor())?;
            let new: Vec<f64> = old
                .iter()
                .zip(batch)
                .map(|(o, v)| (1.0 - m) * o + m * scale * v)
                .collect();
            let t = Tensor::from_vec(new, old.len(), var.device())?.to_dtype(var.dtype())?;
            var.set(&t)
        };
        update(&self.running_mean, &st.mean, 1.0)?;
        update(&self.running_var, &st.var, unbias)
    }

    /// `prelu(self(x))`. In train mode on the CPU kernels (affine BatchNorm, gradients
    /// recorded) the two run as one op that does not keep the BatchNorm output for backward
    /// ([`batch_norm_prelu_train`]); otherwise as the two layers.
    ///
    /// # Errors
    /// Shape mismatches, or failures of the layers.
    pub fn forward_prelu_t(&self, x: &Tensor, prelu: &PReLU, train: bool) -> Result<Tensor> {
        let fusable = train
            && crate::grad::is_grad_enabled()
            && self.kernels.fused_for(x)
            && prelu.kernels.fused_for(x);
        match (fusable, self.inner.weight_and_bias()) {
            (true, Some((w, b))) => {
                let (y, st) = batch_norm_prelu_train(x, w, b, prelu.weight(), self.inner.eps())?;
                self.update_running_stats(&st)?;
                Ok(y)
            }
            _ => prelu.forward(&self.forward_t(x, train)?),
        }
    }
}

impl BatchNorm {
    /// bf16 / f16 input (mixed precision): statistics and normalisation in f32, the output
    /// rounded back to the input's dtype, the running statistics updated on the device in f32
    /// and stored in their own dtype (candle-nn's BatchNorm adds its f32 batch statistics to half-precision running
    /// statistics and fails). PyTorch's autocast likewise keeps batch normalisation in f32.
    fn forward_half(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        let c = x.dim(1)?;
        let x32 = x.to_dtype(DType::F32)?;
        // Per-channel values broadcast over `(B, C)` or `(B, C, H, W)`.
        let mut shape = vec![1usize; x.rank()];
        shape[1] = c;
        let (mean, var) = if train {
            let per_channel = x32.transpose(0, 1)?.flatten_from(1)?; // (C, N)
            let count = per_channel.dim(1)?;
            let mean = per_channel.mean_keepdim(1)?;
            let var = per_channel.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
            // On the device (no host round trip per layer): running = (1 − m)·running +
            // m·batch, with the unbiased batch variance, as update_running_stats.
            let m = self.inner.momentum();
            let unbias = count as f64 / (count.max(2) - 1) as f64;
            for (var, batch, scale) in [
                (&self.running_mean, &mean, 1.0),
                (&self.running_var, &var, unbias),
            ] {
                let old = var.as_tensor().to_dtype(DType::F32)?;
                let new = ((old * (1.0 - m))? + (batch.detach().flatten_all()? * (m * scale))?)?;
                var.set(&new.to_dtype(var.dtype())?)?;
            }
            (
                mean.reshape(shape.as_slice())?,
                var.reshape(shape.as_slice())?,
            )
        } else {
            (
                self.running_mean()
                    .to_dtype(DType::F32)?
                    .detach()
                    .reshape(shape.as_slice())?,
                self.running_var()
                    .to_dtype(DType::F32)?
                    .detach()
                    .reshape(shape.as_slice())?,
            )
        };
        let mut y = x32
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + self.inner.eps())?.sqrt()?)?;
        if let Some((w, b)) = self.inner.weight_and_bias() {
            let (w, b) = (track(w), track(b));
            y = y
                .broadcast_mul(&w.to_dtype(DType::F32)?.reshape(shape.as_slice())?)?
                .broadcast_add(&b.to_dtype(DType::F32)?.reshape(shape.as_slice())?)?;
        }
        y.to_dtype(dtype)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = &track(x);
        if matches!(x.dtype(), DType::BF16 | DType::F16) {
            return self.forward_half(x, train);
        }
        let Some((w, b)) = self.inner.weight_and_bias() else {
            return self.inner.forward_t(x, train);
        };
        if !self.kernels.fused_for(x) {
            if crate::grad::is_grad_enabled() {
                return self.inner.forward_t(x, train);
            }
            // The same layer on detached weights (the running statistics stay shared).
            let detached = candle_nn::BatchNorm::new(
                w.elem_count(),
                self.running_mean.as_tensor().clone(),
                self.running_var.as_tensor().clone(),
                w.detach(),
                b.detach(),
                self.inner.eps(),
            )?;
            return detached.forward_t(x, train);
        }
        let (w, b) = (&track(w), &track(b));
        let eps = self.inner.eps();
        if !train {
            let (rm, rv) = (
                Self::host(self.running_mean())?,
                Self::host(self.running_var())?,
            );
            return batch_norm_eval(x, w, b, rm, rv, eps);
        }
        let (y, st) = batch_norm_train(x, w, b, eps)?;
        self.update_running_stats(&st)?;
        Ok(y)
    }
}

/// PReLU layer, slopes `(C,)` or `(1,)`.
#[derive(Debug, Clone)]
pub struct PReLU {
    weight: Tensor,
    kernels: Kernels,
}

impl PReLU {
    /// A PReLU with the given slopes.
    pub fn new(weight: Tensor, kernels: Kernels) -> Self {
        Self { weight, kernels }
    }

    /// `num_parameters` slopes from `vb` (`weight`, initialised to 0.25 as PyTorch).
    ///
    /// # Errors
    /// A missing or mis-shaped `weight` in `vb`.
    pub fn load(
        num_parameters: usize,
        vb: candle_nn::VarBuilder,
        kernels: Kernels,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(num_parameters, "weight", candle_nn::Init::Const(0.25))?;
        Ok(Self::new(weight, kernels))
    }

    /// The slopes.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The slopes of `channels` channels on the host (a shared slope repeated).
    ///
    /// # Errors
    /// A slope count other than 1 or `channels`.
    pub fn slopes(&self, channels: usize) -> Result<Vec<f64>> {
        let a = BatchNorm::host(&self.weight.flatten_all()?)?;
        match a.len() {
            1 => Ok(vec![a[0]; channels]),
            n if n == channels => Ok(a),
            n => candle_core::bail!("prelu: {n} slopes for {channels} channels"),
        }
    }
}

impl Module for PReLU {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x, weight) = (track(x), track(&self.weight));
        if self.kernels.fused_for(&x) {
            prelu(&x, &weight)
        } else {
            candle_nn::PReLU::new(weight.clone(), weight.elem_count() == 1).forward(&x)
        }
    }
}

/// 3×3 pooling with padding 1, `(B, C, H, W)` → `(B, C, (H − 1)/stride + 1, (W − 1)/stride + 1)`:
/// DARTS' `max_pool_3x3` / `avg_pool_3x3` (PyTorch's `MaxPool2d(3, stride, padding=1)` /
/// `AvgPool2d(3, stride, padding=1, count_include_pad=False)`). [`pool3x3`] on the CPU kernels;
/// otherwise (a GPU, [`Kernels::Candle`]) the same pooling from stacked shifted views and
/// candle's reductions, which gives the gradient of a max-pooling output to every tied maximum
/// instead of only the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool3x3 {
    kind: PoolKind,
    stride: usize,
    kernels: Kernels,
}

impl Pool3x3 {
    /// A pooling layer of the given kind and stride (≥ 1).
    pub fn new(kind: PoolKind, stride: usize, kernels: Kernels) -> Self {
        Self {
            kind,
            stride,
            kernels,
        }
    }

    /// Max or average.
    pub fn kind(&self) -> PoolKind {
        self.kind
    }

    /// The stride.
    pub fn stride(&self) -> usize {
        self.stride
    }
}

impl Module for Pool3x3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = track(x);
        if self.kernels.fused_for(&x) {
            pool3x3(&x, self.kind, self.stride)
        } else {
            pool3x3_windowed(&x, self.kind, self.stride)
        }
    }
}
