//! IResNet: the ResNet with "improved residual" units of ArcFace.
//!
//! Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (CVPR 2019),
//! the IR unit (BN-Conv-BN-PReLU-Conv-BN) and output block "E" (BN-Dropout-FC-BN). Reference
//! code: insightface `recognition/arcface_torch/backbones/iresnet.py`. Parameter paths equal
//! that module's `state_dict()` keys, so official checkpoints load unchanged.
//!
//! ```text
//! conv1 3x3/1 → bn1 → prelu                                  (B, w0, S, S)
//! layer1..4: IBasicBlock × layers[i], the first with stride 2 (B, w3, ⌈S/16⌉, ⌈S/16⌉)
//!   block: bn1 → conv1 3x3/1 → bn2 → prelu → conv2 3x3/s → bn3, + downsample(x)
//! bn2 → flatten → dropout → fc → features (BatchNorm1d, weight fixed at 1)   (B, D)
//! ```
//!
//! This file is the architecture and its names; the `conv → BN (→ PReLU) (+ shortcut)` units
//! bring the fused inference path, QuantFace fake quantisation ([`IResNet::quantize`],
//! [`crate::quant`]) and the BatchNorm taps ([`crate::bn_stats`]).

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use fr_kernels::nn::{BatchNorm, Conv2d};
use fr_kernels::Kernels;
use serde::{Deserialize, Serialize};

use crate::bn_stats::{
    check_input, collect_bn_stats, tapped_bn, with_prefix, BnBatchStats, BnStatsForward, BnTap,
};
use crate::complexity::{Complexity, Counter};
use crate::conv_bn::{ConvBn, Shortcut};
use crate::error::{Error, Result};
use crate::layers::{self, ConvSpec};
use crate::quant::{quantized_linear, QuantBits};

/// insightface initialises every convolution with N(0, 0.1²).
const CONV_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.1,
};

/// Architecture of an [`IResNet`]. Defaults: IResNet-50 at 112×112, 512-d embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IResNetConfig {
    /// Number of [`IBasicBlock`]s in layer1..layer4.
    pub layers: [usize; 4],
    /// Channels of layer1..layer4; the stem has `widths[0]` channels.
    pub widths: [usize; 4],
    /// Embedding dimension `D` of the output `(B, D)`.
    pub embedding_size: usize,
    /// Side of the square input in pixels (112 for insightface, 56 for fast experiments).
    pub input_size: usize,
    /// Dropout probability before `fc` (training only).
    pub dropout: f32,
    /// Convolution / BatchNorm / PReLU implementation: `auto` (this project's CPU kernels on
    /// the CPU, candle's ops on a GPU), `fused` or `candle` (the reference path).
    pub kernels: Kernels,
}

impl Default for IResNetConfig {
    fn default() -> Self {
        Self::r50()
    }
}

impl IResNetConfig {
    fn with_layers(layers: [usize; 4]) -> Self {
        Self {
            layers,
            widths: [64, 128, 256, 512],
            embedding_size: 512,
            input_size: 112,
            dropout: 0.0,
            kernels: Kernels::Auto,
        }
    }

    /// IResNet-18: layers `[2, 2, 2, 2]`.
    pub fn r18() -> Self {
        Self::with_layers([2, 2, 2, 2])
    }

    /// IResNet-34: layers `[3, 4, 6, 3]`.
    pub fn r34() -> Self {
        Self::with_layers([3, 4, 6, 3])
    }

    /// IResNet-50: layers `[3, 4, 14, 3]`.
    pub fn r50() -> Self {
        Self::with_layers([3, 4, 14, 3])
    }

    /// IResNet-100: layers `[3, 13, 30, 3]`.
    pub fn r100() -> Self {
        Self::with_layers([3, 13, 30, 3])
    }

    /// IResNet-200: layers `[6, 26, 60, 6]`.
    pub fn r200() -> Self {
        Self::with_layers([6, 26, 60, 6])
    }

    /// Scales every width by `mult` (rounded, at least one channel).
    pub fn with_width_mult(mut self, mult: f64) -> Self {
        for w in &mut self.widths {
            let scaled = (*w as f64 * mult).round();
            // `as` saturates: NaN and negatives become 0, then the 1-channel floor applies.
            *w = (scaled as usize).max(1);
        }
        self
    }

    /// Sets the input side in pixels.
    pub fn with_input_size(mut self, input_size: usize) -> Self {
        self.input_size = input_size;
        self
    }

    /// Sets the embedding dimension.
    pub fn with_embedding_size(mut self, embedding_size: usize) -> Self {
        self.embedding_size = embedding_size;
        self
    }

    /// Sets the dropout probability before `fc`.
    pub fn with_dropout(mut self, dropout: f32) -> Self {
        self.dropout = dropout;
        self
    }

    /// Sets the kernel implementation (see [`Kernels`]).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Spatial side after the four stride-2 stages (3x3, padding 1): 112 → 7, 56 → 4.
    pub fn final_size(&self) -> usize {
        (0..4).fold(self.input_size, |s, _| s.div_ceil(2))
    }

    /// Input features of `fc`: `widths[3] · final_size²`.
    pub fn fc_in_features(&self) -> usize {
        self.widths[3] * self.final_size() * self.final_size()
    }

    /// Input `(H, W)` in pixels: `(input_size, input_size)`.
    pub fn input_shape(&self) -> (usize, usize) {
        (self.input_size, self.input_size)
    }

    /// Parameters and operations of one forward pass of one image (conventions in
    /// [`crate::complexity`]): IResNet-50 43.6 M parameters and 6.3 G ptflops MACs at 112×112,
    /// IResNet-100 65.2 M and 12.1 G.
    ///
    /// # Errors
    /// An invalid configuration ([`IResNetConfig::validate`]).
    pub fn complexity(&self) -> Result<Complexity> {
        self.validate()?;
        let w = self.widths;
        let mut n = Counter::new(3, self.input_size, self.input_size);
        n.conv(w[0], 3, 1, 1, 1, false).bn().prelu();
        let mut in_c = w[0];
        for (&blocks, &out_c) in self.layers.iter().zip(w.iter()) {
            for bi in 0..blocks {
                let stride = if bi == 0 { 2 } else { 1 };
                let mut down = n.branch();
                n.bn().conv(out_c, 3, 1, 1, 1, false).bn().prelu();
                n.conv(out_c, 3, stride, 1, 1, false).bn();
                if stride != 1 || in_c != out_c {
                    down.conv(out_c, 1, stride, 0, 1, false).bn();
                    n.merge(&down);
                }
                in_c = out_c;
            }
        }
        n.bn().linear(self.embedding_size, true).bn();
        Ok(n.total())
    }

    /// Checks every field; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        if let Some(i) = self.layers.iter().position(|&n| n == 0) {
            return Err(Error::config(
                "layers",
                format!(
                    "layer{} has 0 blocks; every layer needs at least one",
                    i + 1
                ),
            ));
        }
        if let Some(i) = self.widths.iter().position(|&n| n == 0) {
            return Err(Error::config(
                "widths",
                format!("layer{} has width 0", i + 1),
            ));
        }
        if self.embedding_size == 0 {
            return Err(Error::config("embedding_size", "must be at least 1"));
        }
        if self.input_size < 16 {
            return Err(Error::config(
                "input_size",
                format!(
                    "{} is too small; use 112 (insightface) or 56 (at least 16)",
                    self.input_size
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                "dropout",
                format!("{} is not a probability in [0, 1)", self.dropout),
            ));
        }
        Ok(())
    }
}

/// A bias-free `k`×`k` convolution, `weight` `(out_c, in_c, k, k)` under `vb`.
fn conv(
    (in_c, out_c, k): (usize, usize, usize),
    stride: usize,
    padding: usize,
    kernels: Kernels,
    vb: VarBuilder,
) -> Result<Conv2d> {
    ConvSpec::new(in_c, out_c, k, stride, padding, 1).build(CONV_INIT, false, kernels, vb)
}

/// The residual block of IResNet (pre-activation style, PReLU inside):
/// `bn1 → conv1 → bn2 → prelu → conv2 → bn3`, plus the input or `downsample.{0,1}` of it.
#[derive(Debug, Clone)]
pub struct IBasicBlock {
    bn1: BatchNorm,
    /// `conv1 → bn2 → prelu`.
    conv1: ConvBn,
    /// `conv2 → bn3`, plus the shortcut.
    conv2: ConvBn,
    /// `downsample.0` (1×1 conv, stride) `→ downsample.1` (BatchNorm), where the shape
    /// changes.
    downsample: Option<ConvBn>,
}

impl IBasicBlock {
    /// A block from `in_c` to `out_c` channels, `stride` in its second convolution.
    /// `kernels` picks the implementation of its layers.
    pub fn new(
        in_c: usize,
        out_c: usize,
        stride: usize,
        kernels: Kernels,
        vb: VarBuilder,
    ) -> Result<Self> {
        let downsample = if stride != 1 || in_c != out_c {
            let vb = vb.pp("downsample");
            let conv = conv((in_c, out_c, 1), stride, 0, kernels, vb.pp("0"))?;
            let bn = layers::bn(out_c, kernels, vb.pp("1"))?;
            Some(ConvBn::new(conv, bn, "downsample.1".into(), None))
        } else {
            None
        };
        let bn1 = layers::bn(in_c, kernels, vb.pp("bn1"))?;
        let conv1 = conv((in_c, out_c, 3), 1, 1, kernels, vb.pp("conv1"))?;
        let bn2 = layers::bn(out_c, kernels, vb.pp("bn2"))?;
        let prelu = layers::prelu(out_c, kernels, vb.pp("prelu"))?;
        let conv2 = conv((out_c, out_c, 3), stride, 1, kernels, vb.pp("conv2"))?;
        let bn3 = layers::bn(out_c, kernels, vb.pp("bn3"))?;
        Ok(Self {
            bn1,
            conv1: ConvBn::new(conv1, bn2, "bn2".into(), Some(prelu)),
            conv2: ConvBn::new(conv2, bn3, "bn3".into(), None),
            downsample,
        })
    }

    /// QuantFace fake quantisation of the block ([`IResNet::quantize`]): activations after
    /// the PReLU and after the residual addition.
    fn quantize(&mut self, bits: QuantBits, kernels: Kernels) {
        self.conv1.quantize(bits, kernels, false);
        self.conv2.quantize(bits, kernels, true);
        if let Some(d) = &mut self.downsample {
            d.quantize(bits, kernels, false);
        }
    }

    /// [`ModuleT::forward_t`], handing the input of every BatchNorm to `tap` when given:
    /// `bn1`, `bn2`, `bn3`, `downsample.1`.
    fn forward_tapped(
        &self,
        x: &Tensor,
        train: bool,
        mut tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        let out = tapped_bn(&self.bn1, "bn1", x, train, tap.as_deref_mut())?;
        let out = self
            .conv1
            .forward_tapped(&out, train, None, tap.as_deref_mut())?;
        let shortcut = match &self.downsample {
            Some(d) => Shortcut::Projection(d, x),
            None => Shortcut::Identity(x),
        };
        self.conv2.forward_tapped(&out, train, Some(shortcut), tap)
    }
}

impl ModuleT for IBasicBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_tapped(x, train, None)
    }
}

/// IResNet: images `(B, 3, S, S)` → embeddings `(B, D)` (not normalised).
#[derive(Debug, Clone)]
pub struct IResNet {
    cfg: IResNetConfig,
    /// `conv1 → bn1 → prelu`.
    stem: ConvBn,
    layers: Vec<Vec<IBasicBlock>>,
    bn2: BatchNorm,
    fc: Linear,
    features: BatchNorm,
    /// Weight bits of `fc`, when fake-quantised.
    fc_bits: Option<u32>,
}

impl IResNet {
    /// Builds the network, taking (or creating) its parameters from `vb` under insightface's
    /// state-dict names. With a `VarMap`-backed builder the BatchNorm running statistics are
    /// `Var`s of the map too: filter them with [`IResNet::is_trainable`].
    pub fn new(cfg: &IResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (w, k) = (cfg.widths, cfg.kernels);
        let conv1 = conv((3, w[0], 3), 1, 1, k, vb.pp("conv1"))?;
        let bn1 = layers::bn(w[0], k, vb.pp("bn1"))?;
        let prelu = layers::prelu(w[0], k, vb.pp("prelu"))?;
        let mut layers = Vec::with_capacity(4);
        let mut in_c = w[0];
        for (li, (&n, &out_c)) in cfg.layers.iter().zip(w.iter()).enumerate() {
            let vb_l = vb.pp(format!("layer{}", li + 1));
            let mut blocks = Vec::with_capacity(n);
            for bi in 0..n {
                let stride = if bi == 0 { 2 } else { 1 };
                blocks.push(IBasicBlock::new(
                    in_c,
                    out_c,
                    stride,
                    k,
                    vb_l.pp(bi.to_string()),
                )?);
                in_c = out_c;
            }
            layers.push(blocks);
        }
        let bn2 = layers::bn(w[3], k, vb.pp("bn2"))?;
        let fc_in = cfg.fc_in_features();
        // PyTorch's nn.Linear default: U(±1/√fan_in) for weight and bias.
        let bound = 1.0 / (fc_in as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let vb_fc = vb.pp("fc");
        let fc = Linear::new(
            vb_fc.get_with_hints((cfg.embedding_size, fc_in), "weight", init)?,
            Some(vb_fc.get_with_hints(cfg.embedding_size, "bias", init)?),
        );
        let features = layers::bn(cfg.embedding_size, k, vb.pp("features"))?;
        Ok(Self {
            cfg: cfg.clone(),
            stem: ConvBn::new(conv1, bn1, "bn1".into(), Some(prelu)),
            layers,
            bn2,
            fc,
            features,
            fc_bits: None,
        })
    }

    /// The same network (sharing its parameters) with QuantFace fake quantisation
    /// ([`crate::quant`]): convolution and `fc` weights at `bits.weight` bits per output
    /// channel, every PReLU's slopes `(C,)` at `bits.activation` bits with one min / max range
    /// over the vector ([`crate::quant::fake_quantize_prelu_slopes`]), activations at
    /// `bits.activation` bits per tensor after every PReLU and residual addition, with running
    /// ranges updated during the first `bits.freeze_after` training forwards; BatchNorm in
    /// float; straight-through gradients. Boutros et al., QuantFace (ICPR 2022); reference
    /// `fdbtrs/QuantFace` `quantization_utils/quant_modules.py` (`Quant_Conv2d`,
    /// `Quant_Linear`, `QuantAct`, `QuantActPreLu`).
    ///
    /// # Errors
    /// A bit width outside 2..=16.
    pub fn quantize(mut self, bits: QuantBits) -> Result<Self> {
        bits.validate()?;
        let k = self.cfg.kernels;
        for block in self.layers.iter_mut().flatten() {
            block.quantize(bits, k);
        }
        self.stem.quantize(bits, k, false);
        self.fc_bits = Some(bits.weight);
        Ok(self)
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &IResNetConfig {
        &self.cfg
    }

    /// Embedding dimension `D`.
    pub fn embedding_size(&self) -> usize {
        self.cfg.embedding_size
    }

    /// Whether an optimiser should update the parameter `name` (a state-dict key, possibly
    /// with a prefix such as `backbone.`): false for BatchNorm running statistics and for
    /// `features.weight`, which insightface fixes at 1.
    pub fn is_trainable(name: &str) -> bool {
        let fixed_scale = name == "features.weight" || name.ends_with(".features.weight");
        !(layers::is_running_stat(name) || fixed_scale)
    }

    /// The forward pass, handing the input of every BatchNorm2d to `tap` when given.
    fn forward_tapped(
        &self,
        x: &Tensor,
        train: bool,
        mut tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        check_input("IResNet", x, self.cfg.input_shape())?;
        let mut x = self
            .stem
            .forward_tapped(x, train, None, tap.as_deref_mut())?;
        for (li, blocks) in self.layers.iter().enumerate() {
            for (bi, block) in blocks.iter().enumerate() {
                let prefix = || format!("layer{}.{bi}.", li + 1);
                x = with_prefix(tap.as_deref_mut(), prefix, |t| {
                    block.forward_tapped(&x, train, t)
                })?;
            }
        }
        let x = tapped_bn(&self.bn2, "bn2", &x, train, tap)?.flatten_from(1)?;
        let x = if train && self.cfg.dropout > 0.0 {
            candle_nn::ops::dropout(&x, self.cfg.dropout)?
        } else {
            x
        };
        let x = quantized_linear(&self.fc, self.fc_bits)?.forward(&x)?;
        self.features.forward_t(&x, train)
    }
}

impl ModuleT for IResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_tapped(x, train, None)
    }
}

impl crate::Backbone for IResNet {
    fn embedding_size(&self) -> usize {
        self.cfg.embedding_size
    }

    fn is_trainable(&self, name: &str) -> bool {
        IResNet::is_trainable(name)
    }
}

/// Every BatchNorm2d in forward order (the prior of DeepInversion, Yin et al., CVPR 2020,
/// hooks every `BatchNorm2d`; the 1-D `features` layer is left out, as there), named by its
/// state-dict prefix: `bn1`, then per block `layerL.B.bn1`, `…bn2`, `…bn3`,
/// `…downsample.1`, then `bn2`.
impl BnStatsForward for IResNet {
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
