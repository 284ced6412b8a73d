//! Building blocks shared by the lightweight backbones: convolution → BatchNorm (→ PReLU)
//! on this project's kernels, with the fused inference path.

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{Init, VarBuilder};
use fr_kernels::nn::{BatchNorm, Conv2d, PReLU};
use fr_kernels::{ConvParams, Kernels};

use crate::error::Result;
use crate::iresnet::BN_EPS;
use crate::quant::{quantized_conv, QuantAct, QuantBits};

/// Geometry of a square convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvSpec {
    pub in_c: usize,
    pub out_c: usize,
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl ConvSpec {
    /// PyTorch's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: N(0, 2 / (Cout·k²)).
    pub fn kaiming_fan_out(&self) -> Init {
        Init::Randn {
            mean: 0.0,
            stdev: (2.0 / (self.out_c * self.k * self.k) as f64).sqrt(),
        }
    }

    /// The convolution layer, weight `(Cout, Cin/groups, k, k)` named `weight` under `vb`,
    /// with a bias named `bias` when `bias` is true (zero-initialised).
    pub fn build(
        &self,
        init: Init,
        bias: bool,
        kernels: Kernels,
        vb: VarBuilder,
    ) -> Result<Conv2d> {
        let weight = vb.get_with_hints(
            (self.out_c, self.in_c / self.groups, self.k, self.k),
            "weight",
            init,
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(self.out_c, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        let params = ConvParams {
            stride: self.stride,
            padding: self.padding,
            groups: self.groups,
            ..Default::default()
        };
        Ok(Conv2d::new(weight, bias, params, kernels))
    }
}

/// `conv → BatchNorm (→ PReLU)`, optionally followed by a residual addition.
#[derive(Debug, Clone)]
pub(crate) struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    prelu: Option<PReLU>,
    quant: Option<ConvQuant>,
}

/// Fake quantisation of a [`ConvBn`]: weight bits, the kernels to rebuild the convolution
/// with, and the output's activation quantiser (after a PReLU or a residual addition).
#[derive(Debug, Clone)]
struct ConvQuant {
    weight_bits: u32,
    kernels: Kernels,
    output: Option<QuantAct>,
}

impl ConvBn {
    pub fn new(conv: Conv2d, bn: BatchNorm, prelu: Option<PReLU>) -> Self {
        Self {
            conv,
            bn,
            prelu,
            quant: None,
        }
    }

    /// Fake-quantises the weight (per output channel) and, when the block ends in a PReLU or
    /// `residual` is true, the output (per tensor, running range).
    pub fn quantize(&mut self, bits: QuantBits, kernels: Kernels, residual: bool) {
        let output = (self.prelu.is_some() || residual)
            .then(|| QuantAct::new(bits.activation, bits.freeze_after));
        self.quant = Some(ConvQuant {
            weight_bits: bits.weight,
            kernels,
            output,
        });
    }

    /// `(B, Cin, H, W)` → `(B, Cout, Ho, Wo)`, plus `residual` (of the output's shape).
    pub fn forward(
        &self,
        x: &Tensor,
        train: bool,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (bits, kernels) = match &self.quant {
            Some(q) => (Some(q.weight_bits), q.kernels),
            None => (None, Kernels::Auto),
        };
        let conv = quantized_conv(&self.conv, bits, kernels)?;
        let y = if !train {
            // Inside `no_grad` on the CPU kernels: one convolution with a fused epilogue.
            conv.forward_eval_fused(x, &self.bn, self.prelu.as_ref(), residual)?
        } else {
            let y = conv.forward(x)?;
            let y = match &self.prelu {
                Some(p) => self.bn.forward_prelu_t(&y, p, train)?,
                None => self.bn.forward_t(&y, train)?,
            };
            match residual {
                Some(r) => (y + r)?,
                None => y,
            }
        };
        match self.quant.as_ref().and_then(|q| q.output.as_ref()) {
            Some(act) => act.forward_t(&y, train),
            None => Ok(y),
        }
    }
}

/// A BatchNorm with the project's epsilon.
pub(crate) fn bn(c: usize, kernels: Kernels, vb: VarBuilder) -> Result<BatchNorm> {
    Ok(BatchNorm::load(c, BN_EPS, vb, kernels)?)
}

/// A per-channel PReLU (slopes 0.25).
pub(crate) fn prelu(c: usize, kernels: Kernels, vb: VarBuilder) -> Result<PReLU> {
    Ok(PReLU::load(c, vb, kernels)?)
}

/// Whether `name` (a state-dict key) is a BatchNorm running statistic, which no optimiser
/// updates.
pub(crate) fn is_running_stat(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    matches!(last, "running_mean" | "running_var" | "num_batches_tracked")
}
