//! Building blocks shared by the backbones: convolution geometry, BatchNorm and PReLU on this
//! project's kernels (the `conv → BN (→ PReLU)` unit is [`crate::conv_bn`]).

use candle_nn::{Init, VarBuilder};
use fr_kernels::nn::{BatchNorm, Conv2d, PReLU};
use fr_kernels::{ConvParams, Kernels};

use crate::error::Result;

/// BatchNorm epsilon of every reference (PyTorch's default).
pub(crate) const BN_EPS: f64 = 1e-5;

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
    /// A `k`×`k` convolution from `in_c` to `out_c` channels (`groups` divides both).
    pub fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Self {
        Self {
            in_c,
            out_c,
            k,
            stride,
            padding,
            groups,
        }
    }

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
