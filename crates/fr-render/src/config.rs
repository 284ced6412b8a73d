//! [`RenderConfig`]: image size, camera, value ranges, warp solver and network widths of the
//! reconstruction branch.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Configuration of the reconstruction branch. Defaults follow Unsup3D (Wu et al., CVPR 2020;
/// `configs/*.yml` and `model.py` of github.com/elliottwu/unsup3d) where it has a value —
/// 64×64 images, field of view 10°, depths in [0.9, 1.1], ambient and diffuse light in [0, 1],
/// translations ±0.1, flip weight 0.5 — with a smaller pitch and roll range than Unsup3D's ±60°
/// (faces vary mostly in yaw) and much narrower networks (the branch trains beside a
/// recognition backbone on a CPU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RenderConfig {
    /// Side of the square input and canonical maps, in pixels. Default 64; a power of two
    /// ≥ 16 (the encoders halve it four times).
    pub image_size: usize,
    /// Field of view in degrees. Default 10.
    pub fov_deg: f64,
    /// Nearest canonical depth (world units). Default 0.9.
    pub min_depth: f64,
    /// Farthest canonical depth (world units). Default 1.1.
    pub max_depth: f64,
    /// Range of the ambient light coefficient. Default [0, 1].
    pub ambient_range: [f64; 2],
    /// Range of the diffuse light coefficient. Default [0, 1].
    pub diffuse_range: [f64; 2],
    /// Largest rotation magnitudes `(pitch rx, yaw ry, roll rz)` in degrees. Default
    /// [20, 60, 20].
    pub max_rotation_deg: [f64; 3],
    /// Largest translations `(tx, ty, tz)` in world units. Default [0.1, 0.1, 0.1].
    pub max_translation: [f64; 3],
    /// Most iterations of the per-pixel view-depth search (Newton steps with a fixed-point
    /// fallback). Default 20; converged pixels stop after 3–5.
    pub warp_iterations: usize,
    /// A view pixel counts as reconstructed when the depth search ends within this distance
    /// (world units) of the canonical surface. Default 1e-4.
    pub warp_tolerance: f64,
    /// Base channel count of the depth encoder–decoder. Default 8.
    pub depth_width: usize,
    /// Base channel count of the albedo encoder–decoder. Default 8.
    pub albedo_width: usize,
    /// Base channel count of the confidence encoder–decoder. Default 4.
    pub confidence_width: usize,
    /// Base channel count of the light and view encoders. Default 8.
    pub encoder_width: usize,
    /// Channels of the 1×1 bottleneck of every network. Default 64.
    pub zdim: usize,
    /// Weight of the flipped reconstruction's loss. Default 0.5.
    pub lam_flip: f64,
    /// Weight of the face-in-front term of L_reco ([`crate::loss::front_loss`]: the face's
    /// centre at least `front_margin` nearer than the image's border band). Default 1; 0
    /// leaves the convex/concave reversal to chance.
    pub lam_front: f64,
    /// Margin of the face-in-front term (world units). Default 0: the term only orders the
    /// centre before the border. A margin of 0.02 (a tenth of the depth range) pushed the
    /// embedded default's view network back to degenerate views (87.5 % accuracy with the
    /// branch instead of 90.6 %).
    pub front_margin: f64,
    /// Weight of the frame term of L_reco ([`crate::loss::frame_loss`]: how far input-view
    /// pixels sample outside the canonical image). Default 1; 0 gives Unsup3D's L_reco, with
    /// which the view network drifts to views that leave most of the face out of the frame.
    pub lam_frame: f64,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            image_size: 64,
            fov_deg: 10.0,
            min_depth: 0.9,
            max_depth: 1.1,
            ambient_range: [0.0, 1.0],
            diffuse_range: [0.0, 1.0],
            max_rotation_deg: [20.0, 60.0, 20.0],
            max_translation: [0.1, 0.1, 0.1],
            warp_iterations: 20,
            warp_tolerance: 1e-4,
            depth_width: 8,
            albedo_width: 8,
            confidence_width: 4,
            encoder_width: 8,
            zdim: 64,
            lam_flip: 0.5,
            lam_front: 1.0,
            front_margin: 0.0,
            lam_frame: 1.0,
        }
    }
}

impl RenderConfig {
    /// Check every field.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first invalid key.
    pub fn validate(&self) -> Result<()> {
        let s = self.image_size;
        if s < 16 || !s.is_power_of_two() {
            return Err(Error::config(
                "image_size",
                format!("{s}: need a power of two ≥ 16"),
            ));
        }
        if !(self.fov_deg > 0.0 && self.fov_deg < 90.0) {
            return Err(Error::config(
                "fov_deg",
                format!("{} not in (0, 90)", self.fov_deg),
            ));
        }
        if !(self.min_depth > 0.0 && self.max_depth > self.min_depth && self.max_depth < 100.0) {
            return Err(Error::config(
                "min_depth",
                format!(
                    "need 0 < min_depth < max_depth < 100, got [{}, {}]",
                    self.min_depth, self.max_depth
                ),
            ));
        }
        for (key, r) in [
            ("ambient_range", self.ambient_range),
            ("diffuse_range", self.diffuse_range),
        ] {
            if !(r[0] >= 0.0 && r[1] >= r[0] && r[1].is_finite()) {
                return Err(Error::config(key, format!("{r:?}: need 0 ≤ lo ≤ hi")));
            }
        }
        if self
            .max_rotation_deg
            .iter()
            .any(|&a| !(0.0..=90.0).contains(&a))
        {
            return Err(Error::config(
                "max_rotation_deg",
                format!("{:?}: each in [0, 90]", self.max_rotation_deg),
            ));
        }
        let half_range = (self.max_depth - self.min_depth) / 2.0;
        if self
            .max_translation
            .iter()
            .any(|&t| !(0.0..=self.min_depth / 2.0).contains(&t))
        {
            return Err(Error::config(
                "max_translation",
                format!("{:?}: each in [0, min_depth/2]", self.max_translation),
            ));
        }
        if self.warp_iterations == 0 || self.warp_iterations > 1000 {
            return Err(Error::config(
                "warp_iterations",
                format!("{}: need 1..=1000", self.warp_iterations),
            ));
        }
        if !(self.warp_tolerance > 0.0 && self.warp_tolerance <= half_range) {
            return Err(Error::config(
                "warp_tolerance",
                format!(
                    "{}: need (0, (max_depth − min_depth)/2]",
                    self.warp_tolerance
                ),
            ));
        }
        for (key, w) in [
            ("depth_width", self.depth_width),
            ("albedo_width", self.albedo_width),
            ("confidence_width", self.confidence_width),
            ("encoder_width", self.encoder_width),
            ("zdim", self.zdim),
        ] {
            if w == 0 || w > 1024 {
                return Err(Error::config(key, format!("{w}: need 1..=1024")));
            }
        }
        if !(0.0..=self.max_depth - self.min_depth).contains(&self.front_margin) {
            return Err(Error::config(
                "front_margin",
                format!(
                    "{}: need within [0, max_depth − min_depth]",
                    self.front_margin
                ),
            ));
        }
        for (key, w) in [
            ("lam_flip", self.lam_flip),
            ("lam_frame", self.lam_frame),
            ("lam_front", self.lam_front),
        ] {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(Error::config(key, format!("{w}: need ≥ 0")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip_through_toml() {
        let cfg = RenderConfig::default();
        cfg.validate().unwrap();
        let text = toml::to_string(&cfg).unwrap();
        let back: RenderConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
        let partial: RenderConfig = toml::from_str("fov_deg = 12.0\ndepth_width = 16").unwrap();
        assert_eq!(partial.fov_deg, 12.0);
        assert_eq!(partial.depth_width, 16);
        assert_eq!(partial.image_size, 64);
        assert!(toml::from_str::<RenderConfig>("fov = 12.0").is_err());
    }

    #[test]
    fn invalid_values_name_their_key() {
        let bad = |f: fn(&mut RenderConfig), key: &str| {
            let mut cfg = RenderConfig::default();
            f(&mut cfg);
            match cfg.validate() {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        };
        bad(|c| c.image_size = 48, "image_size");
        bad(|c| c.fov_deg = 0.0, "fov_deg");
        bad(|c| c.max_depth = 0.8, "min_depth");
        bad(|c| c.ambient_range = [0.5, 0.2], "ambient_range");
        bad(|c| c.max_rotation_deg[1] = 120.0, "max_rotation_deg");
        bad(|c| c.max_translation[2] = 0.6, "max_translation");
        bad(|c| c.warp_iterations = 0, "warp_iterations");
        bad(|c| c.warp_tolerance = 0.0, "warp_tolerance");
        bad(|c| c.albedo_width = 0, "albedo_width");
        bad(|c| c.lam_flip = -1.0, "lam_flip");
        bad(|c| c.lam_frame = f64::NAN, "lam_frame");
        bad(|c| c.lam_front = -0.5, "lam_front");
        bad(|c| c.front_margin = 0.5, "front_margin");
    }
}
