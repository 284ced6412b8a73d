//! `conv → BatchNorm (→ PReLU) (+ shortcut)`, the unit every BatchNorm backbone here is built
//! from (IResNet, MobileFaceNet, PocketNet), with what the architecture files leave out: the
//! fused inference path (one convolution with a BatchNorm / PReLU / residual epilogue), QuantFace
//! fake quantisation ([`crate::quant`]) and the BatchNorm-input taps ([`crate::bn_stats`]).

use candle_core::{Module, ModuleT, Tensor};
use fr_kernels::nn::{BatchNorm, Conv2d, PReLU};
use fr_kernels::Kernels;

use crate::bn_stats::BnTap;
use crate::quant::{quantized_conv, quantized_prelu, QuantAct, QuantBits};

/// `conv → BatchNorm (→ PReLU)`, optionally followed by a shortcut addition.
#[derive(Debug, Clone)]
pub(crate) struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    /// The BatchNorm's state-dict name (the name of its tap).
    bn_name: String,
    prelu: Option<PReLU>,
    quant: Option<ConvQuant>,
}

/// What a [`ConvBn`] adds to its output.
pub(crate) enum Shortcut<'a> {
    /// The tensor itself (an identity shortcut).
    Identity(&'a Tensor),
    /// A projection of the block input (IResNet's `downsample`): run after this unit's
    /// BatchNorm on the recorded path, so the taps come in the reference's forward order.
    Projection(&'a ConvBn, &'a Tensor),
}

impl Shortcut<'_> {
    fn forward(&self, train: bool, tap: Option<&mut BnTap>) -> candle_core::Result<Tensor> {
        match self {
            Shortcut::Identity(x) => Ok((*x).clone()),
            Shortcut::Projection(unit, x) => unit.forward_tapped(x, train, None, tap),
        }
    }
}

/// Fake quantisation of a [`ConvBn`]: weight bits, PReLU slope bits (the activation width),
/// the kernels to rebuild the convolution and PReLU with, and the output's activation
/// quantiser (after a PReLU or a shortcut addition).
#[derive(Debug, Clone)]
struct ConvQuant {
    weight_bits: u32,
    slope_bits: u32,
    kernels: Kernels,
    output: Option<QuantAct>,
}

impl ConvBn {
    /// The unit; `bn_name` is the BatchNorm's state-dict name, as its tap reports it.
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
    /// true (it is given a shortcut), the output (per tensor, running range).
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

    /// `(B, Cin, H, W)` → `(B, Cout, Ho, Wo)`, plus the `shortcut` (of the output's shape);
    /// the BatchNorm's input goes to `tap` when given (which keeps the layers separate: no
    /// fused inference path).
    pub fn forward_tapped(
        &self,
        x: &Tensor,
        train: bool,
        shortcut: Option<Shortcut<'_>>,
        mut tap: Option<&mut BnTap>,
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
            // Inside `no_grad` on the CPU kernels: one convolution with a fused epilogue (the
            // layers one after the other otherwise).
            let residual = match &shortcut {
                Some(s) => Some(s.forward(false, None)?),
                None => None,
            };
            conv.forward_eval_fused(x, &self.bn, prelu.as_deref(), residual.as_ref())?
        } else {
            let y = conv.forward(x)?;
            if let Some(t) = tap.as_deref_mut() {
                t.record(&self.bn_name, &self.bn, &y)?;
            }
            let y = match &prelu {
                Some(p) => self.bn.forward_prelu_t(&y, p, train)?,
                None => self.bn.forward_t(&y, train)?,
            };
            match &shortcut {
                Some(s) => (y + s.forward(train, tap)?)?,
                None => y,
            }
        };
        match self.quant.as_ref().and_then(|q| q.output.as_ref()) {
            Some(act) => act.forward_t(&y, train),
            None => Ok(y),
        }
    }
}
