//! MobileFaceNet as insightface trains it (`mbf`, `mbf_large`).
//!
//! Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on
//! Mobile Devices" (CCBR 2018): inverted residual bottlenecks with PReLU and a global depthwise
//! convolution (GDC) instead of global pooling. Reference code: insightface
//! `recognition/arcface_torch/backbones/mobilefacenet.py` (adapted there from cavaface);
//! parameter paths equal that module's `state_dict()` keys, so arcface_torch checkpoints load
//! unchanged.
//!
//! ```text
//! layers.0  ConvBlock 3x3/2 → 64s                               (B, 64s, S/2, S/2)
//! layers.1  blocks[0] = 1: ConvBlock 3x3, 64 groups; else Residual(blocks[0], expansion 128)
//! layers.2  DepthWise /2 (expansion 128) → 64s;   layers.3 Residual(blocks[1], 128)
//! layers.4  DepthWise /2 (expansion 256) → 128s;  layers.5 Residual(blocks[2], 256)
//! layers.6  DepthWise /2 (expansion 512) → 128s;  layers.7 Residual(blocks[3], 256)   (B, 128s, S/16, S/16)
//! conv_sep  ConvBlock 1x1 → 512
//! features  GDC: depthwise (S/16)x(S/16) conv + BN → flatten → linear (no bias) → BatchNorm1d   (B, D)
//! ConvBlock = conv → BN → PReLU (`layers.{0,1,2}`); LinearBlock = conv → BN (`layers.{0,1}`);
//! DepthWise = ConvBlock 1x1 → ConvBlock depthwise 3x3 → LinearBlock 1x1 (+ input in Residual)
//! ```
//!
//! `s` is `scale` (2 for `mbf`, 4 for `mbf_large`). At 112×112 and 512-d, `mbf` has 2.06 M
//! parameters and 0.45 G MACs (arcface_torch's "mobilefacenet-0.45G"), `mbf_large` 6.31 M and
//! 1.84 G (conventions in [`crate::complexity`]).

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use fr_kernels::nn::BatchNorm;
use fr_kernels::Kernels;
use serde::{Deserialize, Serialize};

use crate::bn_stats::{check_input, collect_bn_stats, BnBatchStats, BnStatsForward, BnTap};
use crate::complexity::{Complexity, Counter};
use crate::conv_bn::{ConvBn, Shortcut};
use crate::error::{Error, Result};
use crate::layers::{self, ConvSpec};
use crate::quant::{quantized_linear, QuantBits};

/// Architecture of a [`MobileFaceNet`]. Defaults: insightface's `mbf` at 112×112, 512-d.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MobileFaceNetConfig {
    /// Bottleneck counts of the four stages (`layers.1`, `.3`, `.5`, `.7`); `blocks[0] = 1`
    /// is a single grouped 3×3 ConvBlock instead of a residual stage, as in the reference.
    pub blocks: [usize; 4],
    /// Width multiplier: the stages have `64·scale` and `128·scale` channels.
    pub scale: usize,
    /// Embedding dimension `D` of the output `(B, D)` (insightface's `num_features`).
    pub embedding_size: usize,
    /// Side of the square input in pixels (112 in insightface; a multiple of 16). The GDC
    /// kernel is `input_size / 16` (7 at 112).
    pub input_size: usize,
    /// Convolution / BatchNorm / PReLU implementation (see [`Kernels`]).
    pub kernels: Kernels,
}

impl Default for MobileFaceNetConfig {
    fn default() -> Self {
        Self::mbf()
    }
}

/// Expansion widths (the reference's `groups` argument of `DepthWise` / `Residual`) of
/// `layers.2` … `layers.7`, fixed in the reference whatever the scale.
const EXPANSION: [usize; 6] = [128, 128, 256, 256, 512, 256];
/// Channels of the last 1×1 ConvBlock (`conv_sep`) and of the GDC.
const SEP_CHANNELS: usize = 512;

impl MobileFaceNetConfig {
    /// insightface's `mbf`: blocks `[1, 4, 6, 2]`, scale 2.
    pub fn mbf() -> Self {
        Self {
            blocks: [1, 4, 6, 2],
            scale: 2,
            embedding_size: 512,
            input_size: 112,
            kernels: Kernels::Auto,
        }
    }

    /// insightface's `mbf_large`: blocks `[2, 8, 12, 4]`, scale 4.
    pub fn mbf_large() -> Self {
        Self {
            blocks: [2, 8, 12, 4],
            scale: 4,
            ..Self::mbf()
        }
    }

    /// Sets the embedding dimension.
    pub fn with_embedding_size(mut self, embedding_size: usize) -> Self {
        self.embedding_size = embedding_size;
        self
    }

    /// Sets the input side in pixels (a multiple of 16).
    pub fn with_input_size(mut self, input_size: usize) -> Self {
        self.input_size = input_size;
        self
    }

    /// Sets the kernel implementation (see [`Kernels`]).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Input `(H, W)` in pixels.
    pub fn input_shape(&self) -> (usize, usize) {
        (self.input_size, self.input_size)
    }

    /// Side of the last feature map and of the GDC kernel: `input_size / 16`.
    pub fn final_size(&self) -> usize {
        self.input_size / 16
    }

    /// Checks every field; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        if self.blocks[1..].contains(&0) || self.blocks[0] == 0 {
            return Err(Error::config(
                "blocks",
                format!("{:?}: every stage needs at least one block", self.blocks),
            ));
        }
        if self.scale == 0 {
            return Err(Error::config("scale", "must be at least 1"));
        }
        if self.blocks[0] == 1 && (64 * self.scale) % 64 != 0 {
            return Err(Error::config("scale", "64·scale must be divisible by 64"));
        }
        if self.embedding_size == 0 {
            return Err(Error::config("embedding_size", "must be at least 1"));
        }
        if self.input_size < 16 || self.input_size % 16 != 0 {
            return Err(Error::config(
                "input_size",
                format!(
                    "{} is not a positive multiple of 16 (112 in insightface)",
                    self.input_size
                ),
            ));
        }
        Ok(())
    }

    /// The stages after the stem as `(in, out, expansion, stride, residual blocks)`: a
    /// stride-2 DepthWise when `residual blocks` is `None`.
    fn stages(&self) -> [(usize, usize, usize, Option<usize>); 6] {
        let (c1, c2) = (64 * self.scale, 128 * self.scale);
        [
            (c1, c1, EXPANSION[0], None),
            (c1, c1, EXPANSION[1], Some(self.blocks[1])),
            (c1, c2, EXPANSION[2], None),
            (c2, c2, EXPANSION[3], Some(self.blocks[2])),
            (c2, c2, EXPANSION[4], None),
            (c2, c2, EXPANSION[5], Some(self.blocks[3])),
        ]
    }

    /// Parameters and operations of one forward pass of one image (conventions in
    /// [`crate::complexity`]).
    ///
    /// # Errors
    /// An invalid configuration ([`MobileFaceNetConfig::validate`]).
    pub fn complexity(&self) -> Result<Complexity> {
        self.validate()?;
        let c1 = 64 * self.scale;
        let mut n = Counter::new(3, self.input_size, self.input_size);
        n.conv(c1, 3, 2, 1, 1, false).bn().prelu();
        let depthwise = |n: &mut Counter, out: usize, e: usize, stride: usize| {
            n.conv(e, 1, 1, 0, 1, false).bn().prelu();
            n.conv(e, 3, stride, 1, e, false).bn().prelu();
            n.conv(out, 1, 1, 0, 1, false).bn();
        };
        if self.blocks[0] == 1 {
            n.conv(c1, 3, 1, 1, 64, false).bn().prelu();
        } else {
            for _ in 0..self.blocks[0] {
                depthwise(&mut n, c1, 128, 1);
            }
        }
        for (_, out, e, residual) in self.stages() {
            match residual {
                None => depthwise(&mut n, out, e, 2),
                Some(k) => (0..k).for_each(|_| depthwise(&mut n, out, e, 1)),
            }
        }
        n.conv(SEP_CHANNELS, 1, 1, 0, 1, false).bn().prelu();
        let f = self.final_size();
        n.conv(SEP_CHANNELS, f, 1, 0, SEP_CHANNELS, false).bn();
        n.linear(self.embedding_size, false).bn();
        Ok(n.total())
    }
}

/// The reference's `ConvBlock` (`prelu = true`) or `LinearBlock`: `layers.0` conv,
/// `layers.1` BatchNorm, `layers.2` PReLU.
fn block(spec: ConvSpec, prelu: bool, kernels: Kernels, vb: VarBuilder) -> Result<ConvBn> {
    let vb = vb.pp("layers");
    let conv = spec.build(spec.kaiming_fan_out(), false, kernels, vb.pp("0"))?;
    let bn = layers::bn(spec.out_c, kernels, vb.pp("1"))?;
    let prelu = if prelu {
        Some(layers::prelu(spec.out_c, kernels, vb.pp("2"))?)
    } else {
        None
    };
    Ok(ConvBn::new(conv, bn, vb.pp("1").prefix(), prelu))
}

/// The reference's `DepthWise`: 1×1 expansion → depthwise 3×3 (stride) → 1×1 projection, plus
/// the input when residual.
#[derive(Debug, Clone)]
struct DepthWise {
    expand: ConvBn,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl DepthWise {
    fn new(
        in_c: usize,
        out_c: usize,
        expansion: usize,
        stride: usize,
        residual: bool,
        kernels: Kernels,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("layers");
        let conv = ConvSpec::new;
        Ok(Self {
            expand: block(conv(in_c, expansion, 1, 1, 0, 1), true, kernels, vb.pp("0"))?,
            depthwise: block(
                conv(expansion, expansion, 3, stride, 1, expansion),
                true,
                kernels,
                vb.pp("1"),
            )?,
            project: block(
                conv(expansion, out_c, 1, 1, 0, 1),
                false,
                kernels,
                vb.pp("2"),
            )?,
            residual,
        })
    }

    fn quantize(&mut self, bits: QuantBits, kernels: Kernels) {
        self.expand.quantize(bits, kernels, false);
        self.depthwise.quantize(bits, kernels, false);
        self.project.quantize(bits, kernels, self.residual);
    }

    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        mut tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        let y = self
            .expand
            .forward_tapped(x, train, None, tap.as_deref_mut())?;
        let y = self
            .depthwise
            .forward_tapped(&y, train, None, tap.as_deref_mut())?;
        let shortcut = self.residual.then_some(Shortcut::Identity(x));
        self.project.forward_tapped(&y, train, shortcut, tap)
    }
}

/// One entry of the reference's top-level `layers` list.
#[derive(Debug, Clone)]
enum Stage {
    /// A single ConvBlock (stem, or the grouped conv of `blocks[0] = 1`).
    Conv(ConvBn),
    /// A stride-2 DepthWise.
    Down(DepthWise),
    /// A `Residual`: DepthWise blocks with identity shortcuts.
    Residual(Vec<DepthWise>),
}

impl Stage {
    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        mut tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Stage::Conv(c) => c.forward_tapped(x, train, None, tap),
            Stage::Down(d) => d.forward(x, train, tap),
            Stage::Residual(blocks) => blocks
                .iter()
                .try_fold(x.clone(), |x, b| b.forward(&x, train, tap.as_deref_mut())),
        }
    }
}

/// MobileFaceNet: images `(B, 3, S, S)` → embeddings `(B, D)` (not normalised).
#[derive(Debug, Clone)]
pub struct MobileFaceNet {
    cfg: MobileFaceNetConfig,
    layers: Vec<Stage>,
    conv_sep: ConvBn,
    gdc: ConvBn,
    linear: Linear,
    features: BatchNorm,
    /// Weight bits of `linear`, when fake-quantised.
    linear_bits: Option<u32>,
}

impl MobileFaceNet {
    /// Builds the network, taking (or creating, with the reference's Kaiming fan-out
    /// initialisation) its parameters from `vb` under insightface's state-dict names.
    ///
    /// # Errors
    /// An invalid configuration, or tensors of `vb` with the wrong shape.
    pub fn new(cfg: &MobileFaceNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let k = cfg.kernels;
        let c1 = 64 * cfg.scale;
        let vb_l = vb.pp("layers");
        let spec = ConvSpec::new;
        let mut stages = vec![Stage::Conv(block(
            spec(3, c1, 3, 2, 1, 1),
            true,
            k,
            vb_l.pp("0"),
        )?)];
        stages.push(if cfg.blocks[0] == 1 {
            Stage::Conv(block(spec(c1, c1, 3, 1, 1, 64), true, k, vb_l.pp("1"))?)
        } else {
            let vb_r = vb_l.pp("1").pp("layers");
            let blocks = (0..cfg.blocks[0])
                .map(|i| DepthWise::new(c1, c1, 128, 1, true, k, vb_r.pp(i.to_string())))
                .collect::<Result<_>>()?;
            Stage::Residual(blocks)
        });
        for (i, (in_c, out_c, e, residual)) in cfg.stages().into_iter().enumerate() {
            let vb_s = vb_l.pp((i + 2).to_string());
            stages.push(match residual {
                None => Stage::Down(DepthWise::new(in_c, out_c, e, 2, false, k, vb_s)?),
                Some(n) => {
                    let vb_r = vb_s.pp("layers");
                    let blocks = (0..n)
                        .map(|j| DepthWise::new(in_c, out_c, e, 1, true, k, vb_r.pp(j.to_string())))
                        .collect::<Result<_>>()?;
                    Stage::Residual(blocks)
                }
            });
        }
        let c2 = 128 * cfg.scale;
        let conv_sep = block(
            spec(c2, SEP_CHANNELS, 1, 1, 0, 1),
            true,
            k,
            vb.pp("conv_sep"),
        )?;
        let vb_f = vb.pp("features").pp("layers");
        let f = cfg.final_size();
        let gdc = block(
            spec(SEP_CHANNELS, SEP_CHANNELS, f, 1, 0, SEP_CHANNELS),
            false,
            k,
            vb_f.pp("0"),
        )?;
        // Kaiming normal, fan-out mode: N(0, 2 / D).
        let init = Init::Randn {
            mean: 0.0,
            stdev: (2.0 / cfg.embedding_size as f64).sqrt(),
        };
        let linear = Linear::new(
            vb_f.pp("2")
                .get_with_hints((cfg.embedding_size, SEP_CHANNELS), "weight", init)?,
            None,
        );
        let features = layers::bn(cfg.embedding_size, k, vb_f.pp("3"))?;
        Ok(Self {
            cfg: cfg.clone(),
            layers: stages,
            conv_sep,
            gdc,
            linear,
            features,
            linear_bits: None,
        })
    }

    /// The same network (sharing its parameters) with QuantFace fake quantisation
    /// ([`crate::quant`]): every convolution and the linear layer at `bits.weight` bits per
    /// output channel, every PReLU's slopes `(C,)` at `bits.activation` bits with one min / max
    /// range over the vector ([`crate::quant::fake_quantize_prelu_slopes`]), activations at
    /// `bits.activation` bits per tensor after every PReLU and residual addition (running
    /// ranges, frozen after `bits.freeze_after` training forwards); BatchNorm in float;
    /// straight-through gradients. Boutros et al., QuantFace (ICPR 2022); reference
    /// `fdbtrs/QuantFace` `quantization_utils/quant_modules.py` (`Quant_Conv2d`,
    /// `Quant_Linear`, `QuantAct`, `QuantActPreLu`).
    ///
    /// # Errors
    /// A bit width outside 2..=16.
    pub fn quantize(mut self, bits: QuantBits) -> Result<Self> {
        bits.validate()?;
        let k = self.cfg.kernels;
        for stage in &mut self.layers {
            match stage {
                Stage::Conv(c) => c.quantize(bits, k, false),
                Stage::Down(d) => d.quantize(bits, k),
                Stage::Residual(blocks) => blocks.iter_mut().for_each(|b| b.quantize(bits, k)),
            }
        }
        self.conv_sep.quantize(bits, k, false);
        self.gdc.quantize(bits, k, false);
        self.linear_bits = Some(bits.weight);
        Ok(self)
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &MobileFaceNetConfig {
        &self.cfg
    }

    /// Whether an optimiser should update the parameter `name`: false for BatchNorm running
    /// statistics (every other parameter trains, the final BatchNorm1d's scale included).
    pub fn is_trainable(name: &str) -> bool {
        !layers::is_running_stat(name)
    }
}

impl MobileFaceNet {
    fn forward_tapped(
        &self,
        x: &Tensor,
        train: bool,
        mut tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        check_input("MobileFaceNet", x, self.cfg.input_shape())?;
        let mut x = x.clone();
        for stage in &self.layers {
            x = stage.forward(&x, train, tap.as_deref_mut())?;
        }
        let x = self
            .conv_sep
            .forward_tapped(&x, train, None, tap.as_deref_mut())?;
        let x = self
            .gdc
            .forward_tapped(&x, train, None, tap)?
            .flatten_from(1)?;
        let x = quantized_linear(&self.linear, self.linear_bits)?.forward(&x)?;
        self.features.forward_t(&x, train)
    }
}

impl ModuleT for MobileFaceNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_tapped(x, train, None)
    }
}

/// Every BatchNorm2d in forward order, named by its state-dict prefix: `layers.N.layers.1`
/// (ConvBlock), `layers.N[.layers.J].layers.K.layers.1` (DepthWise / Residual),
/// `conv_sep.layers.1`, `features.layers.0.layers.1` (the GDC's, on `(B, 512, 1, 1)`); the
/// final BatchNorm1d `features.layers.3` is left out (DeepInversion hooks BatchNorm2d only).
impl BnStatsForward for MobileFaceNet {
    fn forward_with_bn_stats(
        &self,
        x: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<BnBatchStats>)> {
        collect_bn_stats(|tap| self.forward_tapped(x, false, tap))
    }

    fn input_shape(&self) -> (usize, usize) {
        self.cfg.input_shape()
    }
}

impl crate::Backbone for MobileFaceNet {
    fn embedding_size(&self) -> usize {
        self.cfg.embedding_size
    }

    fn is_trainable(&self, name: &str) -> bool {
        MobileFaceNet::is_trainable(name)
    }
}
