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
//! loss_l1_im_flip`; the optional perceptual terms are not part of this crate).

use candle_core::Tensor;

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

/// L_reco and its two terms, scalars `()`.
#[derive(Debug, Clone)]
pub struct ReconstructionLoss {
    /// `l1 + λ_flip · l1_flip`.
    pub total: Tensor,
    /// Confidence-weighted L1 of the reconstruction.
    pub l1: Tensor,
    /// Confidence-weighted L1 of the flipped reconstruction.
    pub l1_flip: Tensor,
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
    /// `lam_flip` × that of the flipped reconstruction, both over [`Self::mask`].
    ///
    /// # Errors
    /// [`Error::Shape`] for images of another shape.
    pub fn loss(&self, images: &Tensor, lam_flip: f64) -> Result<ReconstructionLoss> {
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
        Ok(ReconstructionLoss {
            total: l1.add(&l1_flip.affine(lam_flip, 0.0)?)?,
            l1,
            l1_flip,
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
