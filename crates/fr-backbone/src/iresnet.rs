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

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use fr_kernels::nn::{BatchNorm, Conv2d, PReLU};
use fr_kernels::{ConvParams, Kernels};
use serde::{Deserialize, Serialize};

pub use crate::bn_stats::BnBatchStats;
use crate::bn_stats::{check_input, BnStatsForward, BnTap};
use crate::complexity::{Complexity, Counter};
use crate::error::{Error, Result};
use crate::quant::{fake_quantize_weight, quantized_conv, quantized_prelu, QuantAct, QuantBits};

/// BatchNorm epsilon used everywhere in the reference.
pub(crate) const BN_EPS: f64 = 1e-5;
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

/// Layer constructors for one network, all with the same [`Kernels`].
#[derive(Clone, Copy)]
struct Layers(Kernels);

impl Layers {
    fn conv(
        self,
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Conv2d> {
        let weight = vb.get_with_hints((out_c, in_c, k, k), "weight", CONV_INIT)?;
        let params = ConvParams {
            stride,
            padding,
            ..Default::default()
        };
        Ok(Conv2d::new(weight, None, params, self.0))
    }

    fn bn(self, c: usize, vb: VarBuilder) -> Result<BatchNorm> {
        Ok(BatchNorm::load(c, BN_EPS, vb, self.0)?)
    }

    fn prelu(self, c: usize, vb: VarBuilder) -> Result<PReLU> {
        Ok(PReLU::load(c, vb, self.0)?)
    }
}

/// The residual block of IResNet (pre-activation style, PReLU inside).
#[derive(Debug, Clone)]
pub struct IBasicBlock {
    bn1: BatchNorm,
    conv1: Conv2d,
    bn2: BatchNorm,
    prelu: PReLU,
    conv2: Conv2d,
    bn3: BatchNorm,
    downsample: Option<(Conv2d, BatchNorm)>,
    quant: Option<BlockQuant>,
}

/// Fake quantisation of one block ([`IResNet::quantize`]): weight bits, PReLU slope bits (the
/// activation width), the kernels to rebuild its convolutions and PReLU with, and the
/// activation quantisers after the PReLU and after the residual addition.
#[derive(Debug, Clone)]
struct BlockQuant {
    weight_bits: u32,
    slope_bits: u32,
    kernels: Kernels,
    after_prelu: QuantAct,
    after_residual: QuantAct,
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
        let l = Layers(kernels);
        let downsample = if stride != 1 || in_c != out_c {
            let vb = vb.pp("downsample");
            Some((
                l.conv(in_c, out_c, 1, stride, 0, vb.pp("0"))?,
                l.bn(out_c, vb.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            bn1: l.bn(in_c, vb.pp("bn1"))?,
            conv1: l.conv(in_c, out_c, 3, 1, 1, vb.pp("conv1"))?,
            bn2: l.bn(out_c, vb.pp("bn2"))?,
            prelu: l.prelu(out_c, vb.pp("prelu"))?,
            conv2: l.conv(out_c, out_c, 3, stride, 1, vb.pp("conv2"))?,
            bn3: l.bn(out_c, vb.pp("bn3"))?,
            downsample,
            quant: None,
        })
    }
}

impl ModuleT for IBasicBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_tapped(x, train, None)
    }
}

impl IBasicBlock {
    /// [`ModuleT::forward_t`], handing the input of every BatchNorm to `tap` when given
    /// (which also keeps the layers separate: no fused inference path).
    fn forward_tapped(
        &self,
        x: &Tensor,
        train: bool,
        mut tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        let (bits, slope_bits, kernels) = match &self.quant {
            Some(q) => (Some(q.weight_bits), Some(q.slope_bits), q.kernels),
            None => (None, None, Kernels::Auto),
        };
        let prelu = quantized_prelu(&self.prelu, slope_bits, kernels)?;
        let conv1 = quantized_conv(&self.conv1, bits, kernels)?;
        let conv2 = quantized_conv(&self.conv2, bits, kernels)?;
        let down = match &self.downsample {
            Some((c, b)) => Some((quantized_conv(c, bits, kernels)?, b)),
            None => None,
        };
        let act = |q: fn(&BlockQuant) -> &QuantAct, y: Tensor| match &self.quant {
            Some(bq) => q(bq).forward_t(&y, train),
            None => Ok(y),
        };
        if !train && !fr_kernels::is_grad_enabled() && tap.is_none() {
            // Inference: conv1+bn2+prelu and conv2+bn3+residual as two fused convolutions.
            let out = self.bn1.forward_t(x, false)?;
            let out = conv1.forward_eval_fused(&out, &self.bn2, Some(&prelu), None)?;
            let out = act(|q| &q.after_prelu, out)?;
            let identity = match &down {
                Some((c, b)) => c.forward_eval_fused(x, b, None, None)?,
                None => x.clone(),
            };
            let out = conv2.forward_eval_fused(&out, &self.bn3, None, Some(&identity))?;
            return act(|q| &q.after_residual, out);
        }
        let mut record = |name: &str, bn: &BatchNorm, input: &Tensor| match tap.as_deref_mut() {
            Some(t) => t.record(name, bn, input),
            None => Ok(()),
        };
        record("bn1", &self.bn1, x)?;
        let out = self.bn1.forward_t(x, train)?;
        let out = conv1.forward(&out)?;
        record("bn2", &self.bn2, &out)?;
        let out = self.bn2.forward_prelu_t(&out, &prelu, train)?;
        let out = act(|q| &q.after_prelu, out)?;
        let out = conv2.forward(&out)?;
        record("bn3", &self.bn3, &out)?;
        let out = self.bn3.forward_t(&out, train)?;
        let identity = match &down {
            Some((c, b)) => {
                let y = c.forward(x)?;
                record("downsample.1", b, &y)?;
                b.forward_t(&y, train)?
            }
            None => x.clone(),
        };
        act(|q| &q.after_residual, (out + identity)?)
    }
}

/// Fake quantisation of the stem and `fc` ([`IResNet::quantize`]).
#[derive(Debug, Clone)]
struct StemQuant {
    weight_bits: u32,
    slope_bits: u32,
    /// After the stem's PReLU.
    act: QuantAct,
}

/// IResNet: images `(B, 3, S, S)` → embeddings `(B, D)` (not normalised).
#[derive(Debug, Clone)]
pub struct IResNet {
    cfg: IResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm,
    prelu: PReLU,
    layers: Vec<Vec<IBasicBlock>>,
    bn2: BatchNorm,
    fc: Linear,
    features: BatchNorm,
    /// The stem's fake quantisation, when quantised.
    quant: Option<StemQuant>,
}

impl IResNet {
    /// Builds the network, taking (or creating) its parameters from `vb` under insightface's
    /// state-dict names. With a `VarMap`-backed builder the BatchNorm running statistics are
    /// `Var`s of the map too: filter them with [`IResNet::is_trainable`].
    pub fn new(cfg: &IResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let w = cfg.widths;
        let l = Layers(cfg.kernels);
        let conv1 = l.conv(3, w[0], 3, 1, 1, vb.pp("conv1"))?;
        let bn1 = l.bn(w[0], vb.pp("bn1"))?;
        let prelu = l.prelu(w[0], vb.pp("prelu"))?;
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
                    cfg.kernels,
                    vb_l.pp(bi.to_string()),
                )?);
                in_c = out_c;
            }
            layers.push(blocks);
        }
        let bn2 = l.bn(w[3], vb.pp("bn2"))?;
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
        let features = l.bn(cfg.embedding_size, vb.pp("features"))?;
        Ok(Self {
            cfg: cfg.clone(),
            conv1,
            bn1,
            prelu,
            layers,
            bn2,
            fc,
            features,
            quant: None,
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
        let act = || QuantAct::new(bits.activation, bits.freeze_after);
        for block in self.layers.iter_mut().flatten() {
            block.quant = Some(BlockQuant {
                weight_bits: bits.weight,
                slope_bits: bits.activation,
                kernels: self.cfg.kernels,
                after_prelu: act(),
                after_residual: act(),
            });
        }
        self.quant = Some(StemQuant {
            weight_bits: bits.weight,
            slope_bits: bits.activation,
            act: act(),
        });
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
        let last = name.rsplit('.').next().unwrap_or(name);
        let fixed_stat = matches!(last, "running_mean" | "running_var" | "num_batches_tracked");
        let fixed_scale = name == "features.weight" || name.ends_with(".features.weight");
        !(fixed_stat || fixed_scale)
    }
}

impl IResNet {
    /// Eval-mode forward `(B, 3, S, S)` → embeddings `(B, D)` that also returns the batch
    /// statistics of the input of every BatchNorm2d layer, in forward order, with gradients
    /// (for the BatchNorm-statistics prior of DeepInversion, Yin et al., CVPR 2020, which
    /// hooks every `BatchNorm2d`; the 1-D `features` layer is left out, as there): `bn1`,
    /// then per block `bn1`, `bn2`, `bn3`, `downsample.1`, then `bn2`. BatchNorm normalises
    /// with the running statistics, as in [`ModuleT::forward_t`] with `train = false`;
    /// nothing is updated. The layers run unfused, so the result equals the eval forward up
    /// to float rounding. Also [`BnStatsForward::forward_with_bn_stats`].
    ///
    /// # Errors
    /// An input that is not `(B, 3, S, S)`, or a failure of a layer.
    pub fn forward_with_bn_stats(
        &self,
        x: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<BnBatchStats>)> {
        let mut tap = BnTap::default();
        let y = self.forward_tapped(x, false, Some(&mut tap))?;
        Ok((y, tap.stats))
    }

    fn forward_tapped(
        &self,
        x: &Tensor,
        train: bool,
        mut tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        check_input("IResNet", x, self.cfg.input_shape())?;
        let q = self.quant.as_ref();
        let conv1 = quantized_conv(&self.conv1, q.map(|q| q.weight_bits), self.cfg.kernels)?;
        let prelu = quantized_prelu(&self.prelu, q.map(|q| q.slope_bits), self.cfg.kernels)?;
        let mut x = if !train && !fr_kernels::is_grad_enabled() && tap.is_none() {
            conv1.forward_eval_fused(x, &self.bn1, Some(&prelu), None)?
        } else {
            let x = conv1.forward(x)?;
            if let Some(t) = tap.as_deref_mut() {
                t.record("bn1", &self.bn1, &x)?;
            }
            self.bn1.forward_prelu_t(&x, &prelu, train)?
        };
        if let Some(q) = q {
            x = q.act.forward_t(&x, train)?;
        }
        for (li, blocks) in self.layers.iter().enumerate() {
            for (bi, block) in blocks.iter().enumerate() {
                x = match tap.as_deref_mut() {
                    Some(t) => {
                        t.prefix = format!("layer{}.{bi}.", li + 1);
                        let y = block.forward_tapped(&x, train, Some(&mut *t))?;
                        t.prefix.clear();
                        y
                    }
                    None => block.forward_t(&x, train)?,
                };
            }
        }
        if let Some(t) = tap {
            t.record("bn2", &self.bn2, &x)?;
        }
        let x = self.bn2.forward_t(&x, train)?.flatten_from(1)?;
        let x = if train && self.cfg.dropout > 0.0 {
            candle_nn::ops::dropout(&x, self.cfg.dropout)?
        } else {
            x
        };
        // Detached inside `fr_kernels::no_grad`, like the other layers.
        let weight = match q {
            Some(q) => fake_quantize_weight(self.fc.weight(), q.weight_bits)?,
            None => self.fc.weight().clone(),
        };
        let fc = Linear::new(
            fr_kernels::track(&weight),
            self.fc.bias().map(fr_kernels::track),
        );
        let x = fc.forward(&x)?;
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

impl BnStatsForward for IResNet {
    fn forward_with_bn_stats(
        &self,
        x: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<BnBatchStats>)> {
        IResNet::forward_with_bn_stats(self, x)
    }

    fn input_shape(&self) -> (usize, usize) {
        self.cfg.input_shape()
    }
}
