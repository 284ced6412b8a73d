//! PocketNetS / PocketNetM: DARTS-searched extremely lightweight face-recognition networks.
//!
//! Boutros, Siebke, Klemt, Damer, Kirchbuchner, Kuijper, "PocketNet: Extreme Lightweight Face
//! Recognition Network Using Neural Architecture Search and Multistep Knowledge Distillation"
//! (IEEE Access 2022). Reference code: `fdbtrs/PocketNet`, `backbones/augment_cnn.py`
//! (`AugmentCNN`), `augment_cells.py`, `ops.py`, and the genotype `softmax_casia` of its
//! configs (the one its training scripts build). Parameter paths equal that module's
//! `state_dict()` keys.
//!
//! ```text
//! stem      conv 3x3/2 → BN                                   (B, 4C, S/2, S/2)
//! cells.i   DARTS cell i of n; reduction (channels ×2, stride 2) at i = n/3, 2n/3, n−1
//!   preproc0  FactorizedReduce after a reduction cell, else StdConv 1x1 (from cell i−2)
//!   preproc1  StdConv 1x1 (from cell i−1)
//!   dag.j.e   node j+2 = sum of two ops on earlier nodes (the genotype); output concat of
//!             nodes 2..5 (4·C_cur channels)                  (B, 4·8C, S/16, S/16)
//! tail      PReLU → conv 1x1 → BN → PReLU → depthwise (S/16)² conv → BN → conv 1x1 → BN
//!           → flatten                                         (B, D)
//! StdConv / DWConv = PReLU → depthwise k×k → pointwise 1x1 → BN (`net.0` … `net.3`)
//! PoolBN = 3×3 pool (padding 1) → BN (`bn`); skip = identity; none = zeros
//! ```
//!
//! `channels` and `cells` override the size's `C` and `n` (e.g. `size = "s"`, `channels = 8`,
//! `cells = 6`, `input_size = 64` for CPU-sized experiments; at least 4 cells, so that the
//! three reductions are distinct); unset, the published networks are built unchanged.
//!
//! The tail's width is 1024 for a 512-d embedding and 512 otherwise, as in the reference.
//! PocketNetS (C = 16, 18 cells) has 0.92 M parameters at 128-d and 0.99 M at 256-d; PocketNetM
//! (C = 32, 9 cells) 1.68 M and 1.75 M (the paper's Table; conventions in
//! [`crate::complexity`]). The reference's tail kernel is a fixed 7×7 (input 112); here it is
//! `input_size / 16`, which is 7 at 112.

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{Init, VarBuilder};
use fr_kernels::nn::{BatchNorm, Conv2d, PReLU, Pool3x3};
use fr_kernels::{Kernels, PoolKind};
use serde::{Deserialize, Serialize};

use crate::bn_stats::{
    check_input, collect_bn_stats, tapped_bn, BnBatchStats, BnStatsForward, BnTap,
};
use crate::complexity::{Complexity, Counter};
use crate::conv_bn::ConvBn;
use crate::error::{Error, Result};
use crate::layers::{self, ConvSpec};

/// The two published sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PocketNetSize {
    /// PocketNetS: 16 initial channels, 18 cells.
    #[default]
    S,
    /// PocketNetM: 32 initial channels, 9 cells.
    M,
}

impl PocketNetSize {
    /// Initial channels `C` (the stem has `4C`).
    pub fn channels(self) -> usize {
        match self {
            PocketNetSize::S => 16,
            PocketNetSize::M => 32,
        }
    }

    /// Number of cells `n`.
    pub fn cells(self) -> usize {
        match self {
            PocketNetSize::S => 18,
            PocketNetSize::M => 9,
        }
    }
}

/// Architecture of a [`PocketNet`]. Defaults: PocketNetS at 112×112, 128-d.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PocketNetConfig {
    /// `s` (PocketNetS) or `m` (PocketNetM): the published initial channels and cell count,
    /// unless `channels` / `cells` override them.
    pub size: PocketNetSize,
    /// Override of the initial channels `C` (the stem has `4C`); `None` (default): the
    /// size's (16 for S, 32 for M). At least 1. For CPU-sized experiments, e.g. 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Override of the number of cells `n`; `None` (default): the size's (18 for S, 9 for M).
    /// At least 4, so that the three reduction cells `n/3`, `2n/3` and `n − 1` are distinct
    /// (with 3 cells `2n/3 = n − 1`) and the last feature map is `input_size / 16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cells: Option<usize>,
    /// Embedding dimension `D` of the output `(B, D)` (128, 256 or 512 in the paper).
    pub embedding_size: usize,
    /// Side of the square input in pixels (112 in the reference; a multiple of 16).
    pub input_size: usize,
    /// Convolution / BatchNorm / PReLU implementation (see [`Kernels`]).
    pub kernels: Kernels,
}

impl Default for PocketNetConfig {
    fn default() -> Self {
        Self::s()
    }
}

/// One primitive of the DARTS search space (`ops.OPS` of the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primitive {
    /// `max_pool_3x3`: 3×3 max pooling (padding 1) → BN.
    MaxPool3,
    /// `avg_pool_3x3`: 3×3 average pooling (padding 1, padding not counted) → BN.
    AvgPool3,
    /// `skip_connect`: identity, or FactorizedReduce when strided.
    Skip,
    /// `dw_conv_kxk`: PReLU → depthwise k×k → pointwise 1×1 → BN, k ∈ {1, 3, 5, 7}.
    DwConv(usize),
    /// `none`: zeros.
    Zero,
}

/// A cell's wiring: for each of the four intermediate nodes, two `(op, input node)` edges
/// (nodes 0 and 1 are the two preprocessed inputs); the output concatenates nodes 2..5.
pub type Gene = [[(Primitive, usize); 2]; 4];

/// The published genotype (`softmax_casia` in the reference configs), normal cell.
pub const NORMAL_GENE: Gene = {
    use Primitive::*;
    [
        [(DwConv(3), 0), (DwConv(1), 1)],
        [(DwConv(3), 2), (DwConv(5), 0)],
        [(DwConv(3), 3), (DwConv(3), 0)],
        [(DwConv(3), 4), (Skip, 0)],
    ]
};

/// The published genotype (`softmax_casia`), reduction cell: edges from nodes 0 and 1 have
/// stride 2.
pub const REDUCE_GENE: Gene = {
    use Primitive::*;
    [
        [(DwConv(3), 1), (DwConv(7), 0)],
        [(Skip, 2), (DwConv(5), 1)],
        [(MaxPool3, 0), (Skip, 2)],
        [(MaxPool3, 0), (MaxPool3, 1)],
    ]
};

/// Intermediate nodes per cell; the output has `NODES · C_cur` channels.
const NODES: usize = 4;
/// Stem width as a multiple of `C`.
const STEM_MULTIPLIER: usize = 4;

impl PocketNetConfig {
    /// PocketNetS-128: C = 16, 18 cells, 128-d, 112×112.
    pub fn s() -> Self {
        Self {
            size: PocketNetSize::S,
            channels: None,
            cells: None,
            embedding_size: 128,
            input_size: 112,
            kernels: Kernels::Auto,
        }
    }

    /// PocketNetM-128: C = 32, 9 cells, 128-d, 112×112.
    pub fn m() -> Self {
        Self {
            size: PocketNetSize::M,
            ..Self::s()
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

    /// Overrides the initial channels `C` (see [`PocketNetConfig::channels`]).
    pub fn with_channels(mut self, channels: usize) -> Self {
        self.channels = Some(channels);
        self
    }

    /// Overrides the number of cells `n` (see [`PocketNetConfig::cells`]).
    pub fn with_cells(mut self, cells: usize) -> Self {
        self.cells = Some(cells);
        self
    }

    /// The initial channels `C` in effect: the override, else the size's.
    pub fn channels(&self) -> usize {
        self.channels.unwrap_or(self.size.channels())
    }

    /// The number of cells `n` in effect: the override, else the size's.
    pub fn cells(&self) -> usize {
        self.cells.unwrap_or(self.size.cells())
    }

    /// Input `(H, W)` in pixels.
    pub fn input_shape(&self) -> (usize, usize) {
        (self.input_size, self.input_size)
    }

    /// Side of the last feature map and of the tail's depthwise kernel: `input_size / 16`.
    pub fn final_size(&self) -> usize {
        self.input_size / 16
    }

    /// Channels of the tail (`con` in the reference): 1024 for a 512-d embedding, else 512.
    pub fn tail_channels(&self) -> usize {
        if self.embedding_size == 512 {
            1024
        } else {
            512
        }
    }

    /// Whether cell `i` is a reduction cell: `i ∈ {n/3, 2n/3, n−1}` with `n` =
    /// [`PocketNetConfig::cells`].
    pub fn is_reduction(&self, i: usize) -> bool {
        let n = self.cells();
        i == n / 3 || i == 2 * n / 3 || i + 1 == n
    }

    /// Checks every field; the error names the offending key (`channels`, `cells`,
    /// `embedding_size`, `input_size`).
    pub fn validate(&self) -> Result<()> {
        if self.channels == Some(0) {
            return Err(Error::config("channels", "must be at least 1"));
        }
        if let Some(n) = self.cells.filter(|&n| n < 4) {
            return Err(Error::config(
                "cells",
                format!(
                    "{n} cells: at least 4 are needed for three distinct reduction cells \
                     (n/3, 2n/3, n − 1)"
                ),
            ));
        }
        if self.embedding_size == 0 {
            return Err(Error::config("embedding_size", "must be at least 1"));
        }
        if self.input_size < 16 || self.input_size % 16 != 0 {
            return Err(Error::config(
                "input_size",
                format!(
                    "{} is not a positive multiple of 16 (112 in the reference)",
                    self.input_size
                ),
            ));
        }
        Ok(())
    }

    /// `(C_pp, C_p, C_cur, reduction_p, reduction)` of every cell.
    fn cell_specs(&self) -> Vec<(usize, usize, usize, bool, bool)> {
        let c = self.channels();
        let (mut c_pp, mut c_p, mut c_cur) = (STEM_MULTIPLIER * c, STEM_MULTIPLIER * c, c);
        let mut reduction_p = false;
        (0..self.cells())
            .map(|i| {
                let reduction = self.is_reduction(i);
                if reduction {
                    c_cur *= 2;
                }
                let cell = (c_pp, c_p, c_cur, reduction_p, reduction);
                reduction_p = reduction;
                (c_pp, c_p) = (c_p, NODES * c_cur);
                cell
            })
            .collect()
    }

    /// Parameters and operations of one forward pass of one image (conventions in
    /// [`crate::complexity`]).
    ///
    /// # Errors
    /// An invalid configuration ([`PocketNetConfig::validate`]).
    pub fn complexity(&self) -> Result<Complexity> {
        self.validate()?;
        let c = self.channels();
        let mut n = Counter::new(3, self.input_size, self.input_size);
        n.conv(STEM_MULTIPLIER * c, 3, 2, 1, 1, false).bn();
        let sep = |n: &mut Counter, out: usize, k: usize, stride: usize| {
            let c_in = n.shape().0;
            n.prelu().conv(c_in, k, stride, k / 2, c_in, false);
            n.conv(out, 1, 1, 0, 1, false).bn();
        };
        let (mut s0, mut s1) = (n.branch(), n.branch());
        for (_, _, c_cur, reduction_p, reduction) in self.cell_specs() {
            let mut p0 = s0.branch();
            if reduction_p {
                let (c_in, h, w) = p0.shape();
                p0.prelu();
                let mut half = p0.branch();
                half.conv(c_in, 1, 2, 0, c_in, false)
                    .conv(c_cur / 2, 1, 1, 0, 1, false);
                let (_, ho, wo) = half.shape();
                p0.merge(&half).merge(&half);
                p0.set_shape(c_cur, ho, wo).bn();
                debug_assert_eq!((h / 2, w / 2), (ho, wo));
            } else {
                sep(&mut p0, c_cur, 1, 1);
            }
            let mut p1 = s1.branch();
            sep(&mut p1, c_cur, 1, 1);
            n.merge(&p0).merge(&p1);
            let mut states = vec![p0.shape(), p1.shape()];
            let gene = if reduction {
                &REDUCE_GENE
            } else {
                &NORMAL_GENE
            };
            for edges in gene {
                let mut out = (0, 0, 0);
                for &(op, from) in edges {
                    let stride = if reduction && from < 2 { 2 } else { 1 };
                    let (ci, hi, wi) = states[from];
                    let mut e = Counter::new(ci, hi, wi);
                    match op {
                        Primitive::MaxPool3 | Primitive::AvgPool3 => {
                            e.pool(3, stride, 1).bn();
                        }
                        Primitive::Skip if stride == 1 => {}
                        Primitive::Skip => {
                            e.prelu();
                            let mut half = e.branch();
                            half.conv(ci, 1, 2, 0, ci, false)
                                .conv(ci / 2, 1, 1, 0, 1, false);
                            let (_, ho, wo) = half.shape();
                            e.merge(&half).merge(&half).set_shape(ci, ho, wo).bn();
                        }
                        Primitive::DwConv(k) => sep(&mut e, ci, k, stride),
                        Primitive::Zero => {
                            e.set_shape(ci, hi.div_ceil(stride), wi.div_ceil(stride));
                        }
                    }
                    n.merge(&e);
                    out = e.shape();
                }
                states.push(out);
            }
            let (_, h, w) = states[2];
            s0 = s1;
            s1 = Counter::new(NODES * c_cur, h, w);
        }
        let (c_p, h, w) = s1.shape();
        let mut t = Counter::new(c_p, h, w);
        let con = self.tail_channels();
        let f = self.final_size();
        t.prelu().conv(con, 1, 1, 0, 1, false).bn().prelu();
        t.conv(con, f, 1, 0, con, false).bn();
        t.conv(self.embedding_size, 1, 1, 0, 1, false).bn();
        n.merge(&t);
        Ok(n.total())
    }
}

/// `PyTorch`'s `kaiming_uniform_` with its defaults (a = 0): U(±√(6 / fan_in)), the
/// reference's `_init_params`.
fn kaiming_uniform(spec: &ConvSpec) -> Init {
    let fan_in = (spec.in_c / spec.groups * spec.k * spec.k) as f64;
    let bound = (6.0 / fan_in).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

fn conv(
    in_c: usize,
    out_c: usize,
    k: usize,
    stride: usize,
    groups: usize,
    kernels: Kernels,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let spec = ConvSpec::new(in_c, out_c, k, stride, k / 2, groups);
    spec.build(kaiming_uniform(&spec), false, kernels, vb)
}

/// The reference's `StdConv` / `DWConv`: PReLU → depthwise k×k (stride) → pointwise 1×1 →
/// BN, as `net.0` … `net.3`.
#[derive(Debug, Clone)]
struct SepConv {
    prelu: PReLU,
    depthwise: Conv2d,
    pointwise: ConvBn,
}

impl SepConv {
    fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        kernels: Kernels,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("net");
        Ok(Self {
            prelu: layers::prelu(in_c, kernels, vb.pp("0"))?,
            depthwise: conv(in_c, in_c, k, stride, in_c, kernels, vb.pp("1"))?,
            pointwise: ConvBn::new(
                conv(in_c, out_c, 1, 1, 1, kernels, vb.pp("2"))?,
                layers::bn(out_c, kernels, vb.pp("3"))?,
                vb.pp("3").prefix(),
                None,
            ),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        let y = self.depthwise.forward(&self.prelu.forward(x)?)?;
        self.pointwise.forward_tapped(&y, train, None, tap)
    }
}

/// The reference's `FactorizedReduce`: PReLU, then two stride-2 paths (depthwise 1×1 →
/// pointwise 1×1 to `C_out/2`) on `x` and on `x` shifted by one pixel, concatenated → BN.
#[derive(Debug, Clone)]
struct FactorizedReduce {
    prelu: PReLU,
    conv11: Conv2d,
    conv12: Conv2d,
    conv21: Conv2d,
    conv22: Conv2d,
    bn: BatchNorm,
    bn_name: String,
}

impl FactorizedReduce {
    fn new(in_c: usize, out_c: usize, kernels: Kernels, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            prelu: layers::prelu(in_c, kernels, vb.pp("relu"))?,
            conv11: conv(in_c, in_c, 1, 2, in_c, kernels, vb.pp("conv11"))?,
            conv12: conv(in_c, out_c / 2, 1, 1, 1, kernels, vb.pp("conv12"))?,
            conv21: conv(in_c, in_c, 1, 2, in_c, kernels, vb.pp("conv21"))?,
            conv22: conv(in_c, out_c / 2, 1, 1, 1, kernels, vb.pp("conv22"))?,
            bn: layers::bn(out_c, kernels, vb.pp("bn"))?,
            bn_name: vb.pp("bn").prefix(),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        let x = self.prelu.forward(x)?;
        let first = self.conv12.forward(&self.conv11.forward(&x)?)?;
        let (h, w) = (x.dim(2)?, x.dim(3)?);
        let shifted = x.narrow(2, 1, h - 1)?.narrow(3, 1, w - 1)?;
        let second = self.conv22.forward(&self.conv21.forward(&shifted)?)?;
        let y = Tensor::cat(&[&first, &second], 1)?;
        tapped_bn(&self.bn, &self.bn_name, &y, train, tap)
    }
}

/// DARTS' `max_pool_3x3` / `avg_pool_3x3` (`ops.py`: `nn.MaxPool2d(3, stride, 1)` /
/// `nn.AvgPool2d(3, stride, 1, count_include_pad=False)`), `(B, C, H, W)` →
/// `(B, C, ⌈H/s⌉, ⌈W/s⌉)`: fr-kernels' [`fr_kernels::pool3x3`] with its exact backward on the
/// CPU, the windowed candle path elsewhere (candle 0.11's `max_pool2d` backward is wrong and
/// has no padding).
fn pool3(max: bool, stride: usize, kernels: Kernels) -> Pool3x3 {
    let kind = if max { PoolKind::Max } else { PoolKind::Avg };
    Pool3x3::new(kind, stride, kernels)
}

/// One edge of a cell: an op with its input node.
#[derive(Debug, Clone)]
enum Op {
    Pool {
        pool: Pool3x3,
        bn: BatchNorm,
        bn_name: String,
    },
    Identity,
    Reduce(FactorizedReduce),
    Sep(SepConv),
    Zero {
        stride: usize,
    },
}

impl Op {
    fn new(
        prim: Primitive,
        c: usize,
        stride: usize,
        kernels: Kernels,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(match prim {
            Primitive::MaxPool3 | Primitive::AvgPool3 => Op::Pool {
                pool: pool3(prim == Primitive::MaxPool3, stride, kernels),
                bn: layers::bn(c, kernels, vb.pp("bn"))?,
                bn_name: vb.pp("bn").prefix(),
            },
            Primitive::Skip if stride == 1 => Op::Identity,
            Primitive::Skip => Op::Reduce(FactorizedReduce::new(c, c, kernels, vb)?),
            Primitive::DwConv(k) => Op::Sep(SepConv::new(c, c, k, stride, kernels, vb)?),
            Primitive::Zero => Op::Zero { stride },
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Op::Pool { pool, bn, bn_name } => tapped_bn(bn, bn_name, &pool.forward(x)?, train, tap),
            Op::Identity => Ok(x.clone()),
            Op::Reduce(r) => r.forward(x, train, tap),
            Op::Sep(s) => s.forward(x, train, tap),
            Op::Zero { stride } => {
                let (b, c, h, w) = x.dims4()?;
                Tensor::zeros(
                    (b, c, h.div_ceil(*stride), w.div_ceil(*stride)),
                    x.dtype(),
                    x.device(),
                )
            }
        }
    }
}

/// The first input's preprocessing.
#[derive(Debug, Clone)]
enum Preproc {
    Std(SepConv),
    Reduce(FactorizedReduce),
}

/// One DARTS cell (`AugmentCell`).
#[derive(Debug, Clone)]
struct Cell {
    preproc0: Preproc,
    preproc1: SepConv,
    dag: Vec<Vec<(Op, usize)>>,
}

impl Cell {
    fn forward(
        &self,
        s0: &Tensor,
        s1: &Tensor,
        train: bool,
        mut tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        let s0 = match &self.preproc0 {
            Preproc::Std(s) => s.forward(s0, train, tap.as_deref_mut())?,
            Preproc::Reduce(r) => r.forward(s0, train, tap.as_deref_mut())?,
        };
        let s1 = self.preproc1.forward(s1, train, tap.as_deref_mut())?;
        let mut states = vec![s0, s1];
        for edges in &self.dag {
            let mut sum: Option<Tensor> = None;
            for (op, from) in edges {
                let y = op.forward(&states[*from], train, tap.as_deref_mut())?;
                sum = Some(match sum {
                    Some(s) => (s + y)?,
                    None => y,
                });
            }
            states.push(sum.ok_or_else(|| candle_core::Error::Msg("node without edges".into()))?);
        }
        Tensor::cat(&states[2..], 1)
    }
}

/// PocketNet: images `(B, 3, S, S)` → embeddings `(B, D)` (not normalised).
#[derive(Debug, Clone)]
pub struct PocketNet {
    cfg: PocketNetConfig,
    stem: ConvBn,
    cells: Vec<Cell>,
    tail_prelu: PReLU,
    tail: [ConvBn; 3],
}

impl PocketNet {
    /// Builds the network, taking (or creating, with the reference's Kaiming-uniform
    /// initialisation) its parameters from `vb` under the reference's state-dict names.
    ///
    /// # Errors
    /// An invalid configuration, or tensors of `vb` with the wrong shape.
    pub fn new(cfg: &PocketNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let k = cfg.kernels;
        let c_stem = STEM_MULTIPLIER * cfg.channels();
        let stem = ConvBn::new(
            conv(3, c_stem, 3, 2, 1, k, vb.pp("stem").pp("0"))?,
            layers::bn(c_stem, k, vb.pp("stem").pp("1"))?,
            vb.pp("stem").pp("1").prefix(),
            None,
        );
        let mut cells = Vec::new();
        for (i, (c_pp, c_p, c, reduction_p, reduction)) in cfg.cell_specs().into_iter().enumerate()
        {
            let vb = vb.pp("cells").pp(i.to_string());
            let preproc0 = if reduction_p {
                Preproc::Reduce(FactorizedReduce::new(c_pp, c, k, vb.pp("preproc0"))?)
            } else {
                Preproc::Std(SepConv::new(c_pp, c, 1, 1, k, vb.pp("preproc0"))?)
            };
            let preproc1 = SepConv::new(c_p, c, 1, 1, k, vb.pp("preproc1"))?;
            let gene = if reduction {
                &REDUCE_GENE
            } else {
                &NORMAL_GENE
            };
            let dag = gene
                .iter()
                .enumerate()
                .map(|(j, edges)| {
                    edges
                        .iter()
                        .enumerate()
                        .map(|(e, &(prim, from))| {
                            let stride = if reduction && from < 2 { 2 } else { 1 };
                            let vb = vb.pp("dag").pp(j.to_string()).pp(e.to_string());
                            Ok((Op::new(prim, c, stride, k, vb)?, from))
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()?;
            cells.push(Cell {
                preproc0,
                preproc1,
                dag,
            });
        }
        let c_p = cfg.cell_specs().last().map_or(c_stem, |c| NODES * c.2);
        let (con, f, d) = (cfg.tail_channels(), cfg.final_size(), cfg.embedding_size);
        let vb_t = vb.pp("tail");
        let tail_prelu = layers::prelu(c_p, k, vb_t.pp("0"))?;
        // The global depthwise convolution over the final map.
        let gdc = ConvSpec::new(con, con, f, 1, 0, con);
        let tail = [
            ConvBn::new(
                conv(c_p, con, 1, 1, 1, k, vb_t.pp("1"))?,
                layers::bn(con, k, vb_t.pp("2"))?,
                vb_t.pp("2").prefix(),
                Some(layers::prelu(con, k, vb_t.pp("3"))?),
            ),
            ConvBn::new(
                gdc.build(kaiming_uniform(&gdc), false, k, vb_t.pp("4"))?,
                layers::bn(con, k, vb_t.pp("5"))?,
                vb_t.pp("5").prefix(),
                None,
            ),
            ConvBn::new(
                conv(con, d, 1, 1, 1, k, vb_t.pp("6"))?,
                layers::bn(d, k, vb_t.pp("7"))?,
                vb_t.pp("7").prefix(),
                None,
            ),
        ];
        Ok(Self {
            cfg: cfg.clone(),
            stem,
            cells,
            tail_prelu,
            tail,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &PocketNetConfig {
        &self.cfg
    }

    /// Whether an optimiser should update the parameter `name`: false for BatchNorm running
    /// statistics, true for everything else.
    pub fn is_trainable(name: &str) -> bool {
        !layers::is_running_stat(name)
    }
}

impl PocketNet {
    fn forward_tapped(
        &self,
        x: &Tensor,
        train: bool,
        mut tap: Option<&mut BnTap>,
    ) -> candle_core::Result<Tensor> {
        check_input("PocketNet", x, self.cfg.input_shape())?;
        let stem = self
            .stem
            .forward_tapped(x, train, None, tap.as_deref_mut())?;
        let (mut s0, mut s1) = (stem.clone(), stem);
        for cell in &self.cells {
            let out = cell.forward(&s0, &s1, train, tap.as_deref_mut())?;
            (s0, s1) = (s1, out);
        }
        let mut y = self.tail_prelu.forward(&s1)?;
        for block in &self.tail {
            y = block.forward_tapped(&y, train, None, tap.as_deref_mut())?;
        }
        y.flatten_from(1)
    }
}

impl ModuleT for PocketNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_tapped(x, train, None)
    }
}

/// Every BatchNorm2d in forward order, named by its state-dict prefix: `stem.1`; per cell
/// `cells.i.preproc0.net.3` (or `….preproc0.bn` after a reduction), `cells.i.preproc1.net.3`,
/// then the edges' `cells.i.dag.j.e.net.3` / `….bn` (pooling, strided skip); the tail's
/// `tail.2`, `tail.5` and `tail.7` (the last on `(B, D, 1, 1)`, a BatchNorm2d in the
/// reference too).
impl BnStatsForward for PocketNet {
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

impl crate::Backbone for PocketNet {
    fn embedding_size(&self) -> usize {
        self.cfg.embedding_size
    }

    fn is_trainable(&self, name: &str) -> bool {
        PocketNet::is_trainable(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Direct 3×3, padding-1 pooling of one `(H, W)` plane.
    fn direct(x: &[f64], h: usize, w: usize, stride: usize, max: bool) -> Vec<f64> {
        let (ho, wo) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        let mut out = Vec::new();
        for i in 0..ho {
            for j in 0..wo {
                let mut vals = Vec::new();
                for di in 0..3 {
                    for dj in 0..3 {
                        let (r, c) = (
                            (i * stride + di) as isize - 1,
                            (j * stride + dj) as isize - 1,
                        );
                        if r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w {
                            vals.push(x[r as usize * w + c as usize]);
                        }
                    }
                }
                out.push(if max {
                    vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
                } else {
                    vals.iter().sum::<f64>() / vals.len() as f64
                });
            }
        }
        out
    }

    #[test]
    fn pooling_equals_the_direct_computation_and_routes_max_gradients() {
        // Both implementations: fr-kernels' op (CPU) and the windowed candle path (GPUs).
        for kernels in [Kernels::Fused, Kernels::Candle] {
            for (h, w) in [(6, 6), (5, 7)] {
                let data: Vec<f64> = (0..h * w).map(|i| ((i * 37 % 23) as f64).sin()).collect();
                let x = Var::from_vec(data.clone(), (1, 1, h, w), &Device::Cpu).unwrap();
                for stride in [1, 2] {
                    for max in [true, false] {
                        let y = pool3(max, stride, kernels).forward(x.as_tensor()).unwrap();
                        let got: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
                        let want = direct(&data, h, w, stride, max);
                        assert_eq!(got.len(), want.len());
                        for (g, e) in got.iter().zip(&want) {
                            assert!(
                                (g - e).abs() < 1e-12,
                                "{kernels:?} {h}x{w} s{stride} max={max}: {g} vs {e}"
                            );
                        }
                        if max {
                            // d sum / dx = how many windows take x as their maximum.
                            let grads = y.sum_all().unwrap().backward().unwrap();
                            let g: Vec<f64> = grads
                                .get(x.as_tensor())
                                .unwrap()
                                .flatten_all()
                                .unwrap()
                                .to_vec1()
                                .unwrap();
                            assert_eq!(g.iter().sum::<f64>(), want.len() as f64);
                            for (k, &gk) in g.iter().enumerate() {
                                assert!(gk == 0.0 || want.contains(&data[k]), "{k}: {gk}");
                            }
                        }
                    }
                }
            }
        }
    }
}
