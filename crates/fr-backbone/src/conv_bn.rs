//! `conv → BatchNorm (→ PReLU) (+ residual)`, the unit of MobileFaceNet and PocketNet, with
//! QuantFace fake quantisation ([`crate::quant`]) and BatchNorm-input taps
//! ([`crate::bn_stats`]).

use candle_core::{Module, ModuleT, Tensor};
use fr_kernels::nn::{BatchNorm, Conv2d, PReLU};
use fr_kernels::Kernels;

use crate::bn_stats::BnTap;
use crate::quant::{quantized_conv, quantized_prelu, QuantAct, QuantBits};

/// `conv → BatchNorm (→ PReLU)`, optionally followed by a residual addition.
#[derive(Debug, Clone)]
pub(crate) struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    /// The BatchNorm's state-dict prefix (the name of its tap).
    bn_name: String,
    prelu: Option<PReLU>,
    quant: Option<ConvQuant>,
}

/// Fake quantisation of a [`ConvBn`]: weight bits, PReLU slope bits (the activation width),
/// the kernels to rebuild the convolution and PReLU with, and the output's activation
/// quantiser (after a PReLU or a residual addition).
#[derive(Debug, Clone)]
struct ConvQuant {
    weight_bits: u32,
    slope_bits: u32,
    kernels: Kernels,
    output: Option<QuantAct>,
}

impl ConvBn {
    /// The unit; `bn_name` is the BatchNorm's state-dict prefix.
    pub fn new(conv: Conv2d, bn: BatchNorm, bn_name: String, prelu: Option<PReLU>) -> Self {
        Self {
            conv,
            bn,
            bn_name,
            prelu,
            quant: None,
        }
    }

    /// Fake-quantises the weight (per output channel), the PReLU's slopes (one range over the
    /// vector, at the activation width) and, when the unit ends in a PReLU or `residual` is
    /// true, the output (per tensor, running range).
    pub fn quantize(&mut self, bits: QuantBits, kernels: Kernels, residual: bool) {
        let output = (self.prelu.is_some() || residual)
            .then(|| QuantAct::new(bits.activation, bits.freeze_after));
        self.quant = Some(ConvQuant {
            weight_bits: bits.weight,
            slope_bits: bits.activation,
            kernels,
            output,
        });
    }

    /// `(B, Cin, H, W)` → `(B, Cout, Ho, Wo)`, plus `residual` (of the output's shape); the
    /// BatchNorm's input goes to `tap` when given (which keeps the layers separate: no fused
    /// inference path).
    pub fn forward_tapped(
        &self,
        x: &Tensor,
        train: bool,
        residual: Option<&Tensor>,
        tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        let (bits, slope_bits, kernels) = match &self.quant {
            Some(q) => (Some(q.weight_bits), Some(q.slope_bits), q.kernels),
            None => (None, None, Kernels::Auto),
        };
        let conv = quantized_conv(&self.conv, bits, kernels)?;
        let prelu = match &self.prelu {
            Some(p) => Some(quantized_prelu(p, slope_bits, kernels)?),
            None => None,
        };
        let y = if !train && tap.is_none() {
            // Inside `no_grad` on the CPU kernels: one convolution with a fused epilogue.
            conv.forward_eval_fused(x, &self.bn, prelu.as_deref(), residual)?
        } else {
            let y = conv.forward(x)?;
            if let Some(t) = tap {
                t.record(&self.bn_name, &self.bn, &y)?;
            }
            let y = match &prelu {
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
