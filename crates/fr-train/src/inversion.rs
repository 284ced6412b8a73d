//! ArcFace inversion: images whose embeddings under a frozen backbone match given targets.
//!
//! The input image is optimised (Adam) on
//!
//! ```text
//! L = λ_id · mean_i (1 − cos(f(x_i), t_i))                       identity
//!   + λ_bn · Σ_l w_l (‖μ_l(x) − running_mean_l‖₂ + ‖σ²_l(x) − running_var_l‖₂)   BN statistics
//!   + λ_tv · R_TV(x) + λ_l2 · ‖x‖₂                                  image priors
//! ```
//!
//! with `f` the backbone in eval mode (any [`BnStatsForward`] backbone: IResNet,
//! MobileFaceNet, PocketNet, SphereNet), `t_i` a target embedding or class centre (cosine is
//! scale-free, so neither needs normalising), `μ_l, σ²_l` the per-channel batch mean and biased
//! variance of the input of BatchNorm2d layer `l` over the generated batch, `w_0` =
//! `first_bn_multiplier` and `w_l = 1` after (a backbone without BatchNorm, such as SphereNet,
//! has no such term), `R_TV` the sum of the ℓ2 norms of the horizontal, vertical and both
//! diagonal neighbour differences.
//!
//! The images are `(N, 3, H, W)` with `(H, W)` the backbone's input shape
//! ([`BnStatsForward::input_shape`]; 112×96 for SphereFace's networks);
//! [`InversionConfig::image_size`] is 0 (the default: take it from the backbone) or, for a
//! square backbone, its side as a check.
//!
//! The BatchNorm-statistics prior, the image priors, the optimiser (Adam, β = (0.5, 0.9)), the
//! random-normal initialisation, the cosine schedule with warm-up and the clipping of the image
//! to its valid range after every step follow DeepInversion (Yin et al., "Dreaming to Distill:
//! Data-free Knowledge Transfer via DeepInversion", CVPR 2020; reference code
//! NVlabs/DeepInversion, `deepinversion.py`), with its classification cross-entropy replaced by
//! the embedding-matching objective of optimisation-based face-embedding inversion (Zhmoginov &
//! Sandler, "Inverting face embeddings with convolutional neural networks", 2016), here as
//! `1 − cos`, the similarity ArcFace models are trained and scored with. DeepInversion's random
//! jitter and flips and Adaptive DeepInversion's competition term are not implemented.
//!
//! Images are in the recognition normalisation, `(pixel − 127.5)/127.5` ∈ [−1, 1], channels in
//! the backbone's colour order; [`save_png_grid`] maps them back to 8-bit pixels.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use fr_backbone::{BnBatchStats, BnStatsForward};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::{AdamW, AdamWConfig, Error, LrSchedule, Result};

/// Hyper-parameters of [`invert`]. Defaults are DeepInversion's (NVlabs/DeepInversion,
/// `imagenet_inversion.py` and `deepinversion.py`, for ImageNet ResNet-50 at 224×224), with the
/// image shape taken from the backbone; the weights act on sums of norms, so another image
/// size or batch size may need other weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InversionConfig {
    /// Optimisation steps (DeepInversion: 2000, its "setting 1", full resolution).
    pub steps: usize,
    /// Base learning rate of Adam on the image, in normalised pixel units per step
    /// (DeepInversion README's ResNet-50 command: 0.25).
    pub lr: f64,
    /// Adam β1 (DeepInversion: 0.5).
    pub beta1: f64,
    /// Adam β2 (DeepInversion: 0.9).
    pub beta2: f64,
    /// Learning-rate schedule over `steps` (DeepInversion's `lr_cosine_policy`: cosine to 0
    /// after a 100-step linear warm-up).
    pub schedule: LrSchedule,
    /// λ_id, weight of `1 − cos` (DeepInversion's `main_loss_multiplier`: 1).
    pub identity_weight: f64,
    /// λ_bn, weight of the BatchNorm-statistics prior (DeepInversion README: `r_feature` 0.01).
    pub bn_weight: f64,
    /// Extra factor on the first BatchNorm layer's term (DeepInversion: 10).
    pub first_bn_multiplier: f64,
    /// λ_tv, weight of the ℓ2 total variation (DeepInversion: `tv_l2` 1e-4).
    pub tv_l2_weight: f64,
    /// λ_l2, weight of the ℓ2 norm of the image batch (DeepInversion: `l2` 1e-5).
    pub l2_weight: f64,
    /// Standard deviation of the initial image, normalised units, before clipping to [−1, 1]
    /// (DeepInversion: `randn`, 1).
    pub init_std: f64,
    /// Side of the generated square images in pixels, checked against the backbone's input
    /// size (insightface: 112); 0 (the default) takes the image shape `(H, W)` from the
    /// backbone ([`BnStatsForward::input_shape`]), square or not (SphereFace: 112×96).
    pub image_size: usize,
    /// Seed of the initial image; the same seed gives the same images on the CPU.
    pub seed: u64,
}

impl Default for InversionConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            lr: 0.25,
            beta1: 0.5,
            beta2: 0.9,
            schedule: LrSchedule::Cosine {
                min_lr: 0.0,
                warmup_steps: 100,
            },
            identity_weight: 1.0,
            bn_weight: 0.01,
            first_bn_multiplier: 10.0,
            tv_l2_weight: 1e-4,
            l2_weight: 1e-5,
            init_std: 1.0,
            image_size: 0,
            seed: 0,
        }
    }
}

impl InversionConfig {
    /// Checks every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::config("steps", "must be at least 1"));
        }
        let weights = [
            ("identity_weight", self.identity_weight),
            ("bn_weight", self.bn_weight),
            ("first_bn_multiplier", self.first_bn_multiplier),
            ("tv_l2_weight", self.tv_l2_weight),
            ("l2_weight", self.l2_weight),
            ("init_std", self.init_std),
        ];
        for (key, v) in weights {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(
                    key,
                    format!("must be finite and ≥ 0, got {v}"),
                ));
            }
        }
        self.schedule.validate()?;
        self.adam().validate()
    }

    /// Plain Adam: AdamW without weight decay.
    fn adam(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        }
    }
}

/// The loss terms of one step, before the update (unweighted, except `total`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InversionStep {
    /// 0-based step.
    pub step: usize,
    /// Learning rate of this step's update.
    pub lr: f64,
    /// The weighted sum that was minimised.
    pub total: f64,
    /// `mean_i (1 − cos_i)`.
    pub identity: f64,
    /// `Σ_l w_l (‖Δμ_l‖₂ + ‖Δσ²_l‖₂)`, `first_bn_multiplier` included.
    pub bn_prior: f64,
    /// ℓ2 total variation of the batch.
    pub tv_l2: f64,
    /// ℓ2 norm of the batch.
    pub l2: f64,
}

/// What [`invert`] returns.
#[derive(Debug, Clone)]
pub struct InversionResult {
    /// Generated images `(N, 3, H, W)` (the backbone's input shape), f32, recognition
    /// normalisation ([−1, 1]).
    pub images: Tensor,
    /// `cos(f(image_i), target_i)` of the final images (eval forward), one per target.
    pub cosines: Vec<f32>,
    /// The loss terms of every step, in order.
    pub history: Vec<InversionStep>,
}

/// Generates one image `(3, H, W)` per row of `targets` `(N, D)` (embeddings or class
/// centres; any scale) by optimising the input of the frozen `backbone` (module doc: the loss
/// and its sources); `(H, W)` is the backbone's input shape. Any [`BnStatsForward`] backbone
/// (`&IResNet`, `&MobileFaceNet`, `&PocketNet`, `&SphereNet` or a `&dyn BnStatsForward`). The
/// backbone runs in eval mode and is not modified: its parameters receive gradients in the
/// backward pass but are never updated, and its running statistics stay. All `N` images are
/// optimised together, so the BatchNorm prior acts on their joint batch statistics, as in
/// DeepInversion.
///
/// # Errors
/// An invalid config, a nonzero `image_size` that is not the side of the backbone's square
/// input, `targets` not `(N, D)` with `N ≥ 1` and `D` the backbone's embedding size, or a
/// non-finite loss.
pub fn invert<B: BnStatsForward + ?Sized>(
    backbone: &B,
    targets: &Tensor,
    cfg: &InversionConfig,
) -> Result<InversionResult> {
    cfg.validate()?;
    let (h, w) = backbone.input_shape();
    if cfg.image_size != 0 && (cfg.image_size, cfg.image_size) != (h, w) {
        return Err(Error::config(
            "image_size",
            format!(
                "{} differs from the backbone's input size {h}×{w} (0 takes the backbone's)",
                cfg.image_size
            ),
        ));
    }
    let d = backbone.embedding_size();
    let n = match targets.dims() {
        [n, dt] if *n > 0 && *dt == d => *n,
        dims => {
            return Err(Error::config(
                "targets",
                format!("expected (N, {d}) with N ≥ 1, got {dims:?}"),
            ))
        }
    };
    let device = targets.device().clone();
    let targets = targets.to_dtype(DType::F32)?.detach();

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let init: Vec<f32> = (0..n * 3 * h * w)
        .map(|_| (cfg.init_std * rng.sample::<f64, _>(StandardNormal)).clamp(-1.0, 1.0) as f32)
        .collect();
    let image = Var::from_tensor(&Tensor::from_vec(init, (n, 3, h, w), &device)?)?;
    let mut adam = AdamW::new_named(vec![("image".to_string(), image.clone())], cfg.adam())?;

    let mut history = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let lr = cfg.schedule.lr_at(cfg.lr, step as u64, cfg.steps as u64);
        adam.set_learning_rate(lr);
        let x = image.as_tensor();
        let (emb, stats) = backbone.forward_with_bn_stats(x)?;
        let identity = identity_loss(&emb, &targets)?;
        let bn = bn_prior(&stats, cfg.first_bn_multiplier, &device)?;
        let tv = tv_l2(x)?;
        let l2 = l2_norm(x)?;
        let total = ((((&identity * cfg.identity_weight)? + (&bn * cfg.bn_weight)?)?
            + (&tv * cfg.tv_l2_weight)?)?
            + (&l2 * cfg.l2_weight)?)?;
        let record = InversionStep {
            step,
            lr,
            total: scalar(&total)?,
            identity: scalar(&identity)?,
            bn_prior: scalar(&bn)?,
            tv_l2: scalar(&tv)?,
            l2: scalar(&l2)?,
        };
        if !record.total.is_finite() {
            return Err(Error::NonFinite {
                what: "inversion loss".to_string(),
                step: step as u64,
            });
        }
        history.push(record);
        adam.step_grads(&total.backward()?)?;
        // DeepInversion's `clip`: keep the image in the valid pixel range.
        image.set(&image.as_tensor().clamp(-1f32, 1f32)?)?;
        if step % 100 == 0 || step + 1 == cfg.steps {
            tracing::debug!(
                step,
                total = record.total,
                identity = record.identity,
                bn_prior = record.bn_prior,
                "inversion"
            );
        }
    }

    let images = image.as_tensor().detach();
    let emb = fr_kernels::no_grad(|| backbone.forward_t(&images, false))?;
    let cosines = cosine(&emb, &targets)?.to_vec1::<f32>()?;
    Ok(InversionResult {
        images,
        cosines,
        history,
    })
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Row-wise cosine of `(N, D)` and `(N, D)` → `(N,)`.
fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dot = (a * b)?.sum(1)?;
    let na = a.sqr()?.sum(1)?;
    let nb = b.sqr()?.sum(1)?;
    // ε keeps the gradient finite for a zero embedding.
    Ok(dot.div(&((na * nb)? + 1e-12)?.sqrt()?)?)
}

fn identity_loss(emb: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(cosine(emb, targets)?.affine(-1.0, 1.0)?.mean_all()?)
}

/// ℓ2 norm with an ε under the root, so its gradient stays finite at 0.
fn norm(t: &Tensor) -> Result<Tensor> {
    Ok((t.sqr()?.sum_all()? + 1e-12)?.sqrt()?)
}

fn bn_prior(stats: &[BnBatchStats], first: f64, device: &Device) -> Result<Tensor> {
    let mut total = Tensor::zeros((), DType::F32, device)?;
    for (i, st) in stats.iter().enumerate() {
        let dm = st.mean.sub(&st.running_mean.to_dtype(st.mean.dtype())?)?;
        let dv = st.var.sub(&st.running_var.to_dtype(st.var.dtype())?)?;
        let term = (norm(&dm)? + norm(&dv)?)?.to_dtype(DType::F32)?;
        let w = if i == 0 { first } else { 1.0 };
        total = (total + (term * w)?)?;
    }
    Ok(total)
}

/// DeepInversion's `loss_var_l2`: ℓ2 norms of the four neighbour differences of `(N, C, H, W)`.
fn tv_l2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h < 2 || w < 2 {
        return Ok(Tensor::zeros((), x.dtype(), x.device())?);
    }
    let crop = |r: usize, c: usize| -> candle_core::Result<Tensor> {
        x.narrow(2, r, h - 1)?.narrow(3, c, w - 1)
    };
    let right = x.narrow(3, 0, w - 1)?.sub(&x.narrow(3, 1, w - 1)?)?;
    let down = x.narrow(2, 0, h - 1)?.sub(&x.narrow(2, 1, h - 1)?)?;
    let anti = crop(1, 0)?.sub(&crop(0, 1)?)?;
    let diag = crop(0, 0)?.sub(&crop(1, 1)?)?;
    Ok((((norm(&right)? + norm(&down)?)? + norm(&anti)?)? + norm(&diag)?)?)
}

fn l2_norm(x: &Tensor) -> Result<Tensor> {
    norm(x)
}

/// Side of the gap between tiles of [`save_png_grid`], in pixels.
pub const GRID_GAP: usize = 2;

/// Writes `generated` `(N, 3, H, W)` (recognition normalisation; channels as R, G, B) as one
/// PNG grid to `path`, each tile preceded by its reference image `(N, 3, H, W)` when
/// `references` is given. Tiles are laid out in `c = ⌈√N⌉` columns and `r = ⌈N/c⌉` rows with
/// [`GRID_GAP`] pixels of black around each: width `c·k·W + (c + 1)·GRID_GAP` with `k` = 2 with
/// references (1 without), height `r·H + (r + 1)·GRID_GAP`. Pixels are `x·127.5 + 127.5`,
/// rounded and clamped to 0..=255. The file is written to a temporary name beside `path` and
/// renamed into place, so a reader never sees a partial PNG.
///
/// # Errors
/// Shapes that are not `(N, 3, H, W)` (or references of another shape), an empty batch, or
/// an I/O or encoding error naming the file.
pub fn save_png_grid(path: &Path, generated: &Tensor, references: Option<&Tensor>) -> Result<()> {
    let (n, c, h, w) = generated.dims4()?;
    if c != 3 || n == 0 {
        return Err(Error::config(
            "generated",
            format!("expected (N ≥ 1, 3, H, W), got {:?}", generated.dims()),
        ));
    }
    if let Some(r) = references {
        if r.dims() != generated.dims() {
            return Err(Error::config(
                "references",
                format!(
                    "shape {:?} differs from the generated images' {:?}",
                    r.dims(),
                    generated.dims()
                ),
            ));
        }
    }
    let to_host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let gen = to_host(generated)?;
    let refs = references.map(to_host).transpose()?;
    let k = if refs.is_some() { 2 } else { 1 };
    let cols = (1..=n).find(|c| c * c >= n).unwrap_or(n);
    let rows = n.div_ceil(cols);
    let width = cols * k * w + (cols + 1) * GRID_GAP;
    let height = rows * h + (rows + 1) * GRID_GAP;
    let mut canvas = image::RgbImage::new(width as u32, height as u32);
    let plane = h * w;
    let mut blit = |src: &[f32], i: usize, x0: usize, y0: usize| {
        let img = &src[i * 3 * plane..(i + 1) * 3 * plane];
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| (img[ch * plane + y * w + x] * 127.5 + 127.5).round();
                let rgb = [0, 1, 2].map(|ch| px(ch).clamp(0.0, 255.0) as u8);
                canvas.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(rgb));
            }
        }
    };
    for i in 0..n {
        let x0 = GRID_GAP + (i % cols) * (k * w + GRID_GAP);
        let y0 = GRID_GAP + (i / cols) * (h + GRID_GAP);
        match &refs {
            Some(r) => {
                blit(r, i, x0, y0);
                blit(&gen, i, x0 + w, y0);
            }
            None => blit(&gen, i, x0, y0),
        }
    }
    let file_name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "grid.png".to_string());
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    canvas
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::io(&tmp, std::io::Error::other(e)))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
