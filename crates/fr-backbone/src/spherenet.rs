//! SphereNet-20 / 64: the residual CNN of SphereFace, on 112×96 faces.
//!
//! Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition" (CVPR 2017),
//! Table 2: four stages of a stride-2 3×3 convolution followed by residual units of two 3×3
//! convolutions, PReLU after every convolution, no BatchNorm, and a 512-d fully connected
//! layer. Reference code: the authors' Caffe prototxts and `net_sphere.py` of the
//! `sphereface_pytorch` port (`sphere20a`), whose `state_dict()` names this module uses
//! (`conv{s}_{i}`, `relu{s}_{i}`, `fc5`).
//!
//! ```text
//! stage s = 1..4: conv{s}_1 3x3/2 → relu{s}_1                       (B, w_s, H/2^s, W/2^s)
//!   unit u = 1..units[s]: x + relu{s}_{2u+1}(conv{s}_{2u+1}(relu{s}_{2u}(conv{s}_{2u}(x))))
//! flatten → fc5                                                      (B, D)
//! ```
//!
//! SphereNet-20 has units `[1, 2, 4, 1]`, SphereNet-64 `[3, 8, 16, 3]`, widths
//! 64-128-256-512. At 112×96 and 512-d: 22.7 M / 48.2 M parameters and 1.75 G / 6.12 G MACs
//! (conventions in [`crate::complexity`]).

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use fr_kernels::nn::{Conv2d, PReLU};
use fr_kernels::Kernels;
use serde::{Deserialize, Serialize};

use crate::bn_stats::{check_input, BnBatchStats, BnStatsForward};
use crate::complexity::{Complexity, Counter};
use crate::error::{Error, Result};
use crate::layers::{self, ConvSpec};

/// Architecture of a [`SphereNet`]. Defaults: SphereNet-20 at 112×96, 512-d.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SphereNetConfig {
    /// Residual units of the four stages (after each stage's stride-2 convolution).
    pub units: [usize; 4],
    /// Channels of the four stages.
    pub widths: [usize; 4],
    /// Embedding dimension `D` of the output `(B, D)` (`fc5`).
    pub embedding_size: usize,
    /// Input `[H, W]` in pixels (SphereFace: 112×96).
    pub input_size: [usize; 2],
    /// Convolution / PReLU implementation (see [`Kernels`]).
    pub kernels: Kernels,
}

impl Default for SphereNetConfig {
    fn default() -> Self {
        Self::sphere20()
    }
}

impl SphereNetConfig {
    fn with_units(units: [usize; 4]) -> Self {
        Self {
            units,
            widths: [64, 128, 256, 512],
            embedding_size: 512,
            input_size: [112, 96],
            kernels: Kernels::Auto,
        }
    }

    /// SphereNet-20: units `[1, 2, 4, 1]` (20 convolutions, then `fc5`).
    pub fn sphere20() -> Self {
        Self::with_units([1, 2, 4, 1])
    }

    /// SphereNet-64: units `[3, 8, 16, 3]` (64 convolutions, then `fc5`).
    pub fn sphere64() -> Self {
        Self::with_units([3, 8, 16, 3])
    }

    /// Sets the embedding dimension.
    pub fn with_embedding_size(mut self, embedding_size: usize) -> Self {
        self.embedding_size = embedding_size;
        self
    }

    /// Sets the input `(H, W)` in pixels.
    pub fn with_input_size(mut self, h: usize, w: usize) -> Self {
        self.input_size = [h, w];
        self
    }

    /// Sets the kernel implementation (see [`Kernels`]).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Input `(H, W)` in pixels.
    pub fn input_shape(&self) -> (usize, usize) {
        (self.input_size[0], self.input_size[1])
    }

    /// `(H, W)` of the last feature map: each side halved (rounded up) four times; 7×6 at
    /// 112×96.
    pub fn final_shape(&self) -> (usize, usize) {
        let f = |s: usize| (0..4).fold(s, |s, _| s.div_ceil(2));
        (f(self.input_size[0]), f(self.input_size[1]))
    }

    /// Checks every field; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        if self.widths.contains(&0) {
            return Err(Error::config(
                "widths",
                "every stage needs at least one channel",
            ));
        }
        if self.embedding_size == 0 {
            return Err(Error::config("embedding_size", "must be at least 1"));
        }
        if self.input_size.iter().any(|&s| s < 16) {
            return Err(Error::config(
                "input_size",
                format!("{:?} is too small (SphereFace: [112, 96])", self.input_size),
            ));
        }
        Ok(())
    }

    /// Parameters and operations of one forward pass of one image (conventions in
    /// [`crate::complexity`]).
    ///
    /// # Errors
    /// An invalid configuration ([`SphereNetConfig::validate`]).
    pub fn complexity(&self) -> Result<Complexity> {
        self.validate()?;
        let [h, w] = self.input_size;
        let mut n = Counter::new(3, h, w);
        for (&units, &c) in self.units.iter().zip(&self.widths) {
            n.conv(c, 3, 2, 1, 1, true).prelu();
            for _ in 0..2 * units {
                n.conv(c, 3, 1, 1, 1, true).prelu();
            }
        }
        n.linear(self.embedding_size, true);
        Ok(n.total())
    }
}

/// One convolution (with bias) and its PReLU.
#[derive(Debug, Clone)]
struct ConvPrelu {
    conv: Conv2d,
    prelu: PReLU,
}

impl ConvPrelu {
    fn new(spec: ConvSpec, kernels: Kernels, vb: &VarBuilder, s: usize, i: usize) -> Result<Self> {
        // PyTorch's Conv2d default: U(±1/√fan_in) for weight and bias.
        let bound = 1.0 / ((spec.in_c * spec.k * spec.k) as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let vb_c = vb.pp(format!("conv{s}_{i}"));
        let weight =
            vb_c.get_with_hints((spec.out_c, spec.in_c, spec.k, spec.k), "weight", init)?;
        let bias = vb_c.get_with_hints(spec.out_c, "bias", init)?;
        let params = fr_kernels::ConvParams {
            stride: spec.stride,
            padding: spec.padding,
            ..Default::default()
        };
        Ok(Self {
            conv: Conv2d::new(weight, Some(bias), params, kernels),
            prelu: layers::prelu(spec.out_c, kernels, vb.pp(format!("relu{s}_{i}")))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.prelu.forward(&self.conv.forward(x)?)
    }
}

/// One stage: the stride-2 convolution and its residual units.
#[derive(Debug, Clone)]
struct Stage {
    down: ConvPrelu,
    units: Vec<(ConvPrelu, ConvPrelu)>,
}

/// SphereNet: images `(B, 3, H, W)` (112×96 in SphereFace) → embeddings `(B, D)`.
#[derive(Debug, Clone)]
pub struct SphereNet {
    cfg: SphereNetConfig,
    stages: Vec<Stage>,
    fc5: Linear,
}

impl SphereNet {
    /// Builds the network, taking (or creating, with PyTorch's default initialisation) its
    /// parameters from `vb` under `sphereface_pytorch`'s state-dict names.
    ///
    /// # Errors
    /// An invalid configuration, or tensors of `vb` with the wrong shape.
    pub fn new(cfg: &SphereNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let k = cfg.kernels;
        let mut in_c = 3;
        let mut stages = Vec::with_capacity(4);
        for (si, (&units, &c)) in cfg.units.iter().zip(&cfg.widths).enumerate() {
            let s = si + 1;
            let spec = |in_c, stride| ConvSpec::new(in_c, c, 3, stride, 1, 1);
            let down = ConvPrelu::new(spec(in_c, 2), k, &vb, s, 1)?;
            let units = (0..units)
                .map(|u| {
                    Ok((
                        ConvPrelu::new(spec(c, 1), k, &vb, s, 2 * u + 2)?,
                        ConvPrelu::new(spec(c, 1), k, &vb, s, 2 * u + 3)?,
                    ))
                })
                .collect::<Result<_>>()?;
            stages.push(Stage { down, units });
            in_c = c;
        }
        let (fh, fw) = cfg.final_shape();
        let fc_in = cfg.widths[3] * fh * fw;
        let bound = 1.0 / (fc_in as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let vb_fc = vb.pp("fc5");
        let fc5 = Linear::new(
            vb_fc.get_with_hints((cfg.embedding_size, fc_in), "weight", init)?,
            Some(vb_fc.get_with_hints(cfg.embedding_size, "bias", init)?),
        );
        Ok(Self {
            cfg: cfg.clone(),
            stages,
            fc5,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &SphereNetConfig {
        &self.cfg
    }

    /// Whether an optimiser should update the parameter `name`: always (no BatchNorm).
    pub fn is_trainable(name: &str) -> bool {
        !layers::is_running_stat(name)
    }
}

impl ModuleT for SphereNet {
    /// `train` changes nothing (no BatchNorm, no dropout).
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        check_input("SphereNet", x, self.cfg.input_shape())?;
        let mut x = x.clone();
        for stage in &self.stages {
            x = stage.down.forward(&x)?;
            for (a, b) in &stage.units {
                x = (&x + b.forward(&a.forward(&x)?)?)?;
            }
        }
        let fc = Linear::new(
            fr_kernels::track(self.fc5.weight()),
            self.fc5.bias().map(fr_kernels::track),
        );
        fc.forward(&x.flatten_from(1)?)
    }
}

impl crate::Backbone for SphereNet {
    fn embedding_size(&self) -> usize {
        self.cfg.embedding_size
    }

    fn is_trainable(&self, name: &str) -> bool {
        SphereNet::is_trainable(name)
    }
}

/// SphereNet has no BatchNorm: the eval forward (with gradients) and an empty list.
impl BnStatsForward for SphereNet {
    fn forward_with_bn_stats(
        &self,
        x: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<BnBatchStats>)> {
        Ok((self.forward_t(x, false)?, Vec::new()))
    }

    fn input_shape(&self) -> (usize, usize) {
        self.cfg.input_shape()
    }
}
