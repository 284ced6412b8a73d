//! Batch statistics of every BatchNorm2d input during an eval-mode forward: the taps that the
//! BatchNorm-statistics prior of DeepInversion needs.
//!
//! Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion" (CVPR
//! 2020; reference code NVlabs/DeepInversion, `deepinversion.py`, `DeepInversionFeatureHook`)
//! hooks every `nn.BatchNorm2d` of a frozen network and compares the per-channel mean and
//! biased variance of the layer's input over `(B, H, W)` with the layer's running statistics.
//! [`BnStatsForward`] is that hook for the backbones of this crate: [`crate::IResNet`],
//! [`crate::MobileFaceNet`], [`crate::PocketNet`] (every BatchNorm2d, in forward order, named by
//! its state-dict prefix; 1-D BatchNorms such as IResNet's and MobileFaceNet's `features` are
//! left out, as in the reference) and [`crate::SphereNet`] (no BatchNorm: an empty list).

use candle_core::Tensor;
use fr_kernels::nn::BatchNorm;

use crate::registry::Backbone;

/// Batch statistics of the input `(B, C, H, W)` of one BatchNorm2d layer, next to the layer's
/// running statistics ([`BnStatsForward::forward_with_bn_stats`]).
#[derive(Debug, Clone)]
pub struct BnBatchStats {
    /// The layer's state-dict prefix, e.g. `bn1`, `layer2.0.bn3`, `layer1.0.downsample.1`
    /// (IResNet), `layers.0.layers.1` (MobileFaceNet), `cells.3.preproc1.net.3` (PocketNet).
    pub name: String,
    /// Per-channel mean over `(B, H, W)`, `(C,)`, on the autograd graph of the input.
    pub mean: Tensor,
    /// Per-channel biased variance over `(B, H, W)`, `(C,)`, on the autograd graph.
    pub var: Tensor,
    /// The layer's running mean `(C,)` (detached).
    pub running_mean: Tensor,
    /// The layer's running variance `(C,)` (detached).
    pub running_var: Tensor,
}

/// A backbone whose eval-mode forward can also report the batch statistics of the input of
/// every BatchNorm2d layer (module doc: the reference). Implemented by [`crate::IResNet`],
/// [`crate::MobileFaceNet`], [`crate::PocketNet`] and [`crate::SphereNet`]; the embedding
/// dimension is [`Backbone::embedding_size`].
pub trait BnStatsForward: Backbone {
    /// Eval-mode forward of images `(B, 3, H, W)` → embeddings `(B, D)`, plus one
    /// [`BnBatchStats`] per BatchNorm2d layer in forward order, with gradients back to `x`.
    /// BatchNorm normalises with its running statistics, as `forward_t(x, false)`, and nothing
    /// is updated; layers run unfused, so the embeddings equal the eval forward up to float
    /// rounding.
    ///
    /// # Errors
    /// An input that is not `(B, 3, H, W)` with `(H, W)` = [`BnStatsForward::input_shape`], or
    /// a failure of a layer.
    fn forward_with_bn_stats(&self, x: &Tensor)
        -> candle_core::Result<(Tensor, Vec<BnBatchStats>)>;

    /// Input `(H, W)` in pixels the backbone expects (112×112 for insightface's models,
    /// 112×96 for SphereFace's).
    fn input_shape(&self) -> (usize, usize);
}

/// Collects [`BnBatchStats`] during a forward; `prefix` is prepended to the names recorded
/// (the current block's path, where a block does not know its own).
#[derive(Default)]
pub(crate) struct BnTap {
    pub prefix: String,
    pub stats: Vec<BnBatchStats>,
}

impl BnTap {
    /// Records the statistics of `x` `(B, C, H, W)`, the input of `bn` named `name`.
    pub fn record(&mut self, name: &str, bn: &BatchNorm, x: &Tensor) -> candle_core::Result<()> {
        let x = fr_kernels::track(x);
        let c = x.dim(1)?;
        // (B, C, H, W) → (C, B·H·W); the biased variance, as DeepInversion's hook.
        let flat = x.transpose(0, 1)?.contiguous()?.reshape((c, ()))?;
        let mean = flat.mean(1)?;
        let var = flat.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.mean(1)?;
        self.stats.push(BnBatchStats {
            name: format!("{}{name}", self.prefix),
            mean,
            var,
            running_mean: bn.running_mean().detach(),
            running_var: bn.running_var().detach(),
        });
        Ok(())
    }
}

/// An eval-mode forward `f` run with a fresh tap: the embeddings and the statistics it
/// recorded ([`BnStatsForward::forward_with_bn_stats`] of the backbones with BatchNorm).
pub(crate) fn collect_bn_stats(
    f: impl FnOnce(Option<&mut BnTap>) -> candle_core::Result<Tensor>,
) -> candle_core::Result<(Tensor, Vec<BnBatchStats>)> {
    let mut tap = BnTap::default();
    let y = f(Some(&mut tap))?;
    Ok((y, tap.stats))
}

/// `f(tap)` with `prefix()` prepended to the names `tap` records meanwhile: for a block that
/// does not know its own state-dict path (IResNet's `layer2.0.`).
pub(crate) fn with_prefix<T>(
    tap: Option<&mut BnTap>,
    prefix: impl FnOnce() -> String,
    f: impl FnOnce(Option<&mut BnTap>) -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    match tap {
        None => f(None),
        Some(t) => {
            t.prefix = prefix();
            let y = f(Some(&mut *t))?;
            t.prefix.clear();
            Ok(y)
        }
    }
}

/// `bn(x)` (train or eval mode), recording `x` under `name` first when `tap` is given.
pub(crate) fn tapped_bn(
    bn: &BatchNorm,
    name: &str,
    x: &Tensor,
    train: bool,
    tap: Option<&mut BnTap>,
) -> candle_core::Result<Tensor> {
    if let Some(t) = tap {
        t.record(name, bn, x)?;
    }
    candle_core::ModuleT::forward_t(bn, x, train)
}

/// Checks that `x` is `(B, 3, H, W)` with the expected `(H, W)`.
pub(crate) fn check_input(
    model: &str,
    x: &Tensor,
    (h, w): (usize, usize),
) -> candle_core::Result<()> {
    match x.dims() {
        [_, 3, xh, xw] if *xh == h && *xw == w => Ok(()),
        d => candle_core::bail!("{model} expects input (B, 3, {h}, {w}), got {d:?}"),
    }
}
