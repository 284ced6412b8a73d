//! The reconstruction loss L_reco and the branch's output.
//!
//! Unsup3D's photometric loss (`Unsup3D.photometric_loss` in `unsup3d/model.py` of
//! github.com/elliottwu/unsup3d) is the negative log-likelihood of a Laplacian with scale σ
//! per pixel, up to constants: for each channel `c` and pixel `p`,
//! `ℓ = √2·|Î − I| / (σ + ε) + ln(σ + ε)` with `ε = 1e-7` and σ `(B, 1, H, W)` shared by the
//! channels, averaged over the channels and the pixels where the mask is 1 (the mask is
//! broadcast over the channels, so the denominator is `C·Σ mask`). L_reco is that loss of the
//! reconstruction against the input plus `λ_flip` (0.5) times the same for the flipped
//! reconstruction with its own confidence map (Unsup3D's `loss_l1_im + lam_flip ·
//! loss_l1_im_flip`; the optional perceptual terms are not part of this crate), plus
//! `λ_frame` (1) times the frame term [`frame_loss`].
//!
//! The frame term is ours, not Unsup3D's. The masked average of the photometric loss ignores
//! the input-view pixels whose canonical point falls outside the canonical image, so a view
//! that moves most of the face out of the frame loses nothing for the pixels it drops; and as
//! the mask is a 0/1 result of the depth search, no gradient tells the view network what it
//! dropped. Trained jointly with recognition on a small budget, the view network drifts there:
//! every input ends at the same extreme view (all six view parameters at the ends of their
//! ranges), where only about a fifth of the pixels stay valid and the reconstruction of that
//! fifth is easy. The frame term charges each input-view pixel the distance by which its
//! canonical point lies outside the canonical image (normalised units), a differentiable
//! function of the view and the depth that is 0 for any view keeping the face in the frame.

use candle_core::Tensor;

use crate::config::RenderConfig;
use crate::{Error, Result};

/// Numerical floor added to σ (Unsup3D's `EPS`).
pub const CONF_EPS: f64 = 1e-7;

/// Everything the reconstruction branch computes for a batch of `B` images of `S`×`S` pixels;
/// the tensors keep their autograd graph (except the mask).
#[derive(Debug, Clone)]
pub struct ReconstructionOutput {
    /// Canonical depth `(B, S, S)` in `[min_depth, max_depth]` (world units).
    pub canonical_depth: Tensor,
    /// Canonical albedo `(B, 3, S, S)` in `[0, 1]`.
    pub canonical_albedo: Tensor,
    /// Unit normals of the canonical depth `(B, 3, S, S)`.
    pub canonical_normal: Tensor,
    /// Shading `(B, 1, S, S)` = ambient + diffuse·max(0, n·l).
    pub shading: Tensor,
    /// Canonical (frontalised, symmetric-lit) image `(B, 3, S, S)` = albedo × shading: the
    /// input of L_FR^canon.
    pub canonical_image: Tensor,
    /// The canonical image of the mirrored depth and albedo `(B, 3, S, S)`.
    pub canonical_image_flip: Tensor,
    /// Depth of the surface seen at each input-view pixel `(B, S, S)` (world units).
    pub view_depth: Tensor,
    /// Canonical point sampled by each input-view pixel `(B, S, S, 2)`, normalised `(x, y)`
    /// (−1 and 1 at the centres of the canonical image's edge pixels; the convention of
    /// [`crate::sample::grid_sample`]), differentiable with respect to the canonical depth and
    /// the view: the input of [`frame_loss`].
    pub view_grid: Tensor,
    /// The canonical image re-rendered in the input view `(B, 3, S, S)`: the input of L_view.
    pub reconstruction: Tensor,
    /// The mirrored canonical image re-rendered in the input view `(B, 3, S, S)`.
    pub reconstruction_flip: Tensor,
    /// `(B, 1, S, S)` 0/1, detached: pixels where both reconstructions are valid.
    pub mask: Tensor,
    /// Confidence σ of the reconstruction `(B, 1, S, S)`, positive (softplus).
    pub confidence: Tensor,
    /// Confidence σ of the flipped reconstruction `(B, 1, S, S)`.
    pub confidence_flip: Tensor,
    /// Light `(B, 4)` = (ambient, diffuse, dx, dy); direction `normalise(dx, dy, 1)`.
    pub light: Tensor,
    /// View `(B, 6)` = (pitch, yaw, roll) in radians, (tx, ty, tz) in world units.
    pub view: Tensor,
}

/// L_reco and its three terms, scalars `()`.
#[derive(Debug, Clone)]
pub struct ReconstructionLoss {
    /// `l1 + λ_flip · l1_flip + λ_frame · frame`.
    pub total: Tensor,
    /// Confidence-weighted L1 of the reconstruction.
    pub l1: Tensor,
    /// Confidence-weighted L1 of the flipped reconstruction.
    pub l1_flip: Tensor,
    /// The frame term ([`frame_loss`] of [`ReconstructionOutput::view_grid`]).
    pub frame: Tensor,
    /// The face-in-front term ([`front_loss`] of [`ReconstructionOutput::canonical_depth`]).
    pub front: Tensor,
}

/// The face-in-front term of L_reco, a scalar: for canonical depths `(B, S, S)` (world units,
/// nearer is smaller), the batch mean of `max(0, d_centre − d_border + margin)`, where
/// `d_centre` is an image's mean depth over its central square (rows and columns in
/// `[S/4, 3S/4)`) and `d_border` its mean depth over the band of width `S/8` along the four
/// edges. 0 once every face's centre lies at least `margin` in front of its surroundings; it
/// says nothing about the shape beyond that.
///
/// Why: depth and view are only determined up to the convex/concave (hollow-face) reversal
/// — a concave face seen at the mirrored view under the mirrored light gives the same image
/// under (near-)orthographic projection, and this renderer does no occlusion reasoning, the
/// one cue that tells them apart — so without a prior the branch learns either, by seed. In
/// aligned crops the face is at the centre, in front of the background. \[R\], not in Unsup3D
/// (whose far depth on the two outermost columns plays a weaker form of this role).
///
/// # Errors
/// [`Error::Shape`] for another rank, a non-square map or one smaller than 8×8.
pub fn front_loss(depth: &Tensor, margin: f64) -> Result<Tensor> {
    let dims = depth.dims();
    if dims.len() != 3 || dims[1] != dims[2] || dims[1] < 8 {
        return Err(Error::shape("depth", "(B, S, S) with S ≥ 8", depth));
    }
    let s = dims[1];
    let (q, e) = (s / 4, s / 8);
    let centre = depth
        .narrow(1, q, s - 2 * q)?
        .narrow(2, q, s - 2 * q)?
        .mean((1, 2))?;
    let total = depth.sum((1, 2))?;
    let inner = depth
        .narrow(1, e, s - 2 * e)?
        .narrow(2, e, s - 2 * e)?
        .sum((1, 2))?;
    let band_count = (s * s - (s - 2 * e) * (s - 2 * e)) as f64;
    let border = total.sub(&inner)?.affine(1.0 / band_count, 0.0)?;
    Ok(centre
        .sub(&border)?
        .affine(1.0, margin)?
        .relu()?
        .mean_all()?)
}

/// The frame term of L_reco, a scalar: for a sampling grid `(B, H, W, 2)` of normalised
/// canonical coordinates (−1 and 1 at the centres of the edge pixels), the mean over pixels and
/// both coordinates of `max(0, |g| − 1)`: how far, in normalised units, the input-view pixels
/// sample outside the canonical image. 0 when every pixel samples inside it. See the module
/// documentation for why L_reco needs it. \[R\], not in Unsup3D.
///
/// # Errors
/// [`Error::Shape`] for another rank or a last dimension other than 2.
pub fn frame_loss(grid: &Tensor) -> Result<Tensor> {
    if grid.rank() != 4 || grid.dims()[3] != 2 {
        return Err(Error::shape("grid", "(B, H, W, 2)", grid));
    }
    Ok(grid.abs()?.affine(1.0, -1.0)?.relu()?.mean_all()?)
}

/// Unsup3D's photometric loss of `recon` against `target` (both `(B, C, H, W)`), a scalar:
/// with `sigma` `(B, 1, H, W)`, the mean of `√2·|Î − I|/(σ + ε) + ln(σ + ε)`, else the mean of
/// `|Î − I|`; over the pixels where `mask` `(B, 1, H, W)` is 1 when given (0 if the mask is
/// empty).
///
/// # Errors
/// [`Error::Shape`] for mismatched shapes.
pub fn photometric_loss(
    recon: &Tensor,
    target: &Tensor,
    sigma: Option<&Tensor>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if recon.rank() != 4 || target.dims() != recon.dims() || target.dtype() != recon.dtype() {
        return Err(Error::shape(
            "target",
            format!(
                "{:?} {:?} like the reconstruction",
                recon.dims(),
                recon.dtype()
            ),
            target,
        ));
    }
    let (b, _, h, w) = recon.dims4()?;
    for (what, t) in [("confidence", sigma), ("mask", mask)] {
        if let Some(t) = t {
            if t.dims() != [b, 1, h, w] || t.dtype() != recon.dtype() {
                return Err(Error::shape(
                    what,
                    format!("({b}, 1, {h}, {w}) {:?}", recon.dtype()),
                    t,
                ));
            }
        }
    }
    let mut loss = recon.sub(target)?.abs()?;
    if let Some(sigma) = sigma {
        let s = sigma.affine(1.0, CONF_EPS)?;
        loss = loss
            .broadcast_div(&s)?
            .affine(std::f64::consts::SQRT_2, 0.0)?
            .broadcast_add(&s.log()?)?;
    }
    match mask {
        None => Ok(loss.mean_all()?),
        Some(mask) => {
            let m = mask.broadcast_as(loss.shape())?;
            let count = m.sum_all()?.maximum(1.0)?;
            Ok(loss.mul(&m)?.sum_all()?.div(&count)?)
        }
    }
}

impl ReconstructionOutput {
    /// L_reco of this output against the input `images` `(B, 3, S, S)` in [0, 1] (the same
    /// images the branch was run on): confidence-weighted L1 of the reconstruction plus
    /// `cfg.lam_flip` × that of the flipped reconstruction, both over [`Self::mask`], plus
    /// `cfg.lam_frame` × the frame term of [`Self::view_grid`] and `cfg.lam_front` × the
    /// face-in-front term of [`Self::canonical_depth`] (margin `cfg.front_margin`).
    ///
    /// # Errors
    /// [`Error::Shape`] for images of another shape.
    pub fn loss(&self, images: &Tensor, cfg: &RenderConfig) -> Result<ReconstructionLoss> {
        let l1 = photometric_loss(
            &self.reconstruction,
            images,
            Some(&self.confidence),
            Some(&self.mask),
        )?;
        let l1_flip = photometric_loss(
            &self.reconstruction_flip,
            images,
            Some(&self.confidence_flip),
            Some(&self.mask),
        )?;
        let frame = frame_loss(&self.view_grid)?;
        let front = front_loss(&self.canonical_depth, cfg.front_margin)?;
        Ok(ReconstructionLoss {
            total: l1
                .add(&l1_flip.affine(cfg.lam_flip, 0.0)?)?
                .add(&frame.affine(cfg.lam_frame, 0.0)?)?
                .add(&front.affine(cfg.lam_front, 0.0)?)?,
            l1,
            l1_flip,
            frame,
            front,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::testutil::{fd_check, rand_tensor};

    #[test]
    fn matches_a_direct_evaluation() -> Result<()> {
        let recon = rand_tensor(&[2, 3, 4, 5], 1)?;
        let target = rand_tensor(&[2, 3, 4, 5], 2)?;
        let sigma = rand_tensor(&[2, 1, 4, 5], 3)?.affine(1.0, 0.1)?;
        let mask = rand_tensor(&[2, 1, 4, 5], 4)?
            .ge(0.3)?
            .to_dtype(DType::F64)?;
        let got =
            photometric_loss(&recon, &target, Some(&sigma), Some(&mask))?.to_scalar::<f64>()?;
        let (r, t): (Vec<f64>, Vec<f64>) = (
            recon.flatten_all()?.to_vec1()?,
            target.flatten_all()?.to_vec1()?,
        );
        let (s, m): (Vec<f64>, Vec<f64>) = (
            sigma.flatten_all()?.to_vec1()?,
            mask.flatten_all()?.to_vec1()?,
        );
        let (mut sum, mut count) = (0.0, 0.0);
        for b in 0..2 {
            for c in 0..3 {
                for p in 0..20 {
                    let i = (b * 3 + c) * 20 + p;
                    let j = b * 20 + p;
                    let sg = s[j] + CONF_EPS;
                    sum += m[j] * (2f64.sqrt() * (r[i] - t[i]).abs() / sg + sg.ln());
                    count += m[j];
                }
            }
        }
        assert!(
            (got - sum / count).abs() < 1e-12,
            "{got} vs {}",
            sum / count
        );
        let plain = photometric_loss(&recon, &target, None, None)?.to_scalar::<f64>()?;
        let want = r.iter().zip(&t).map(|(a, b)| (a - b).abs()).sum::<f64>() / 120.0;
        assert!((plain - want).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let recon = rand_tensor(&[1, 3, 3, 3], 5)?;
        let target = rand_tensor(&[1, 3, 3, 3], 6)?.affine(1.0, 0.05)?; // no exact ties
        let sigma = rand_tensor(&[1, 1, 3, 3], 7)?.affine(1.0, 0.2)?;
        let mask = Tensor::ones((1, 1, 3, 3), DType::F64, &Device::Cpu)?;
        let wr = fd_check(&recon, |x| {
            photometric_loss(x, &target, Some(&sigma), Some(&mask))
        })?;
        let ws = fd_check(&sigma, |s| {
            photometric_loss(&recon, &target, Some(s), Some(&mask))
        })?;
        assert!(wr < 1e-7 && ws < 1e-7, "{wr} {ws}");
        Ok(())
    }

    #[test]
    fn frame_term_charges_only_samples_outside_the_image() -> Result<()> {
        let inside = Tensor::new(&[[[[1.0f64, -1.0], [0.3, 0.99]]]], &Device::Cpu)?; // (1, 1, 2, 2)
        assert_eq!(frame_loss(&inside)?.to_scalar::<f64>()?, 0.0);
        // One pixel at (1.5, −3): (0.5 + 2)/(2 pixels × 2 coordinates).
        let out = Tensor::new(&[[[[1.5f64, -3.0], [0.0, 0.2]]]], &Device::Cpu)?;
        assert!((frame_loss(&out)?.to_scalar::<f64>()? - 2.5 / 4.0).abs() < 1e-15);
        let g = rand_tensor(&[1, 2, 3, 2], 8)?.affine(5.0, -2.55)?; // in (−2.55, 2.45), no kinks hit
        assert!(fd_check(&g, frame_loss)? < 1e-7);
        assert!(frame_loss(&rand_tensor(&[1, 2, 3], 9)?).is_err());
        Ok(())
    }

    #[test]
    fn front_term_wants_the_centre_in_front_of_the_border() -> Result<()> {
        // 8×8: centre rows/cols 2..6, border band 1 pixel wide (28 pixels).
        let map = |centre: f64, border: f64, rest: f64| -> Result<Tensor> {
            let v: Vec<f64> = (0..64)
                .map(|p| {
                    let (i, j) = (p / 8, p % 8);
                    if i == 0 || i == 7 || j == 0 || j == 7 {
                        border
                    } else if (2..6).contains(&i) && (2..6).contains(&j) {
                        centre
                    } else {
                        rest
                    }
                })
                .collect();
            Ok(Tensor::from_vec(v, (1, 8, 8), &Device::Cpu)?)
        };
        let f = |t: &Tensor| -> Result<f64> { Ok(front_loss(t, 0.02)?.to_scalar::<f64>()?) };
        assert_eq!(f(&map(0.95, 1.05, 1.0)?)?, 0.0); // convex: nothing to pay
        assert!((f(&map(1.05, 0.95, 1.0)?)? - 0.12).abs() < 1e-12); // hollow: 0.1 + margin
        assert!((f(&map(1.0, 1.01, 0.9)?)? - 0.01).abs() < 1e-12); // in front, but by < margin
        let d = rand_tensor(&[2, 8, 8], 13)?.affine(0.2, 0.9)?;
        assert!(fd_check(&d, |t| front_loss(t, 0.5))? < 1e-7);
        assert!(front_loss(&rand_tensor(&[1, 4, 4], 1)?, 0.0).is_err());
        Ok(())
    }

    #[test]
    fn optimal_sigma_is_the_scaled_error() -> Result<()> {
        // For one pixel, d/dσ [√2·e/σ + ln σ] = 0 at σ = √2·e.
        let recon = Tensor::new(&[[[[0.7f64]]]], &Device::Cpu)?;
        let target = Tensor::new(&[[[[0.4f64]]]], &Device::Cpu)?;
        let f = |s: f64| -> Result<f64> {
            let s = Tensor::new(&[[[[s]]]], &Device::Cpu)?;
            Ok(photometric_loss(&recon, &target, Some(&s), None)?.to_scalar::<f64>()?)
        };
        let best = 2f64.sqrt() * 0.3;
        assert!(f(best)? < f(best * 1.1)? && f(best)? < f(best * 0.9)?);
        assert!(photometric_loss(&recon, &target.reshape((1, 1, 1))?, None, None).is_err());
        Ok(())
    }
}
