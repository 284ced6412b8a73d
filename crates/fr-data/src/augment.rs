//! Training-time augmentations of CVLface / AdaFace (Kim et al., "AdaFace: Quality Adaptive
//! Margin for Face Recognition", CVPR 2022; github.com/mk-minchul/AdaFace `dataset/augmenter.py`,
//! carried over to CVLface), each applied with its own probability, plus random grayscale:
//!
//! 1. random resized crop with zero padding: a window of `crop_scale` of the area and
//!    `crop_ratio` aspect ratio (torchvision `RandomResizedCrop.get_params`) is kept **in
//!    place** and everything outside it is set to 0, so the size is unchanged and the face is
//!    partly cut off, as in a bad detection;
//! 2. low resolution: downsample to a square of side `U(low_res_scale) · H` and back up, each
//!    resize with a filter drawn from nearest, bilinear, bicubic (Catmull–Rom), Gaussian and
//!    Lanczos-3 (the reference draws from OpenCV's nearest, linear, area, cubic, Lanczos-4);
//! 3. photometric: brightness, contrast and saturation factors drawn from
//!    `U(max(0, 1 − v), 1 + v)` applied in a random order (torchvision `ColorJitter`, hue 0);
//! 4. grayscale: R = G = B = the ITU-R 601 luma `0.299 R + 0.587 G + 0.114 B`.
//!
//! The random draws of image `index` in `epoch` come from a generator seeded with a hash of
//! `(seed, epoch, index)`, so an augmented batch is the same whatever the thread count. Every
//! probability defaults to 0 (off); the loader's horizontal flip is separate
//! ([`LoaderConfig::flip_prob`](crate::LoaderConfig)) and comes after these.

use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Augmentation options (serde; every probability 0 by default, i.e. no augmentation). The
/// ranges are AdaFace's defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Probability of the random resized crop with zero padding (AdaFace: 0.2).
    pub crop_prob: f32,
    /// Range of the crop's area as a fraction of the image, `[min, max]` in (0, 1].
    pub crop_scale: [f32; 2],
    /// Range of the crop's aspect ratio width / height, `[min, max]`, positive.
    pub crop_ratio: [f32; 2],
    /// Probability of the low-resolution down/up-sampling (AdaFace: 0.2).
    pub low_res_prob: f32,
    /// Range of the small side as a fraction of the image height, `[min, max]` in (0, 1].
    pub low_res_scale: [f32; 2],
    /// Probability of the colour jitter (AdaFace: 0.2).
    pub photometric_prob: f32,
    /// Brightness jitter `v`: factor in `U(max(0, 1 − v), 1 + v)`; 0 leaves brightness alone.
    pub brightness: f32,
    /// Contrast jitter, as `brightness`.
    pub contrast: f32,
    /// Saturation jitter, as `brightness`.
    pub saturation: f32,
    /// Probability of converting to grayscale (kept as three equal channels).
    pub grayscale_prob: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop_prob: 0.0,
            crop_scale: [0.2, 1.0],
            crop_ratio: [0.75, 4.0 / 3.0],
            low_res_prob: 0.0,
            low_res_scale: [0.2, 1.0],
            photometric_prob: 0.0,
            brightness: 0.5,
            contrast: 0.5,
            saturation: 0.5,
            grayscale_prob: 0.0,
        }
    }
}

fn config_err(key: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        key: format!("augment.{key}"),
        reason: reason.into(),
    }
}

impl AugmentConfig {
    /// AdaFace's training setting: crop, low resolution and photometric each with
    /// probability 0.2, no grayscale.
    pub fn adaface() -> Self {
        Self {
            crop_prob: 0.2,
            low_res_prob: 0.2,
            photometric_prob: 0.2,
            ..Self::default()
        }
    }

    /// `true` when every probability is 0: [`Self::apply`] returns its input unchanged.
    pub fn is_identity(&self) -> bool {
        self.crop_prob == 0.0
            && self.low_res_prob == 0.0
            && self.photometric_prob == 0.0
            && self.grayscale_prob == 0.0
    }

    /// Check the values.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key (`augment.crop_prob`, ...): a probability outside
    /// [0, 1], a range whose bounds are out of order or outside their domain, a negative jitter.
    pub fn validate(&self) -> Result<()> {
        for (key, p) in [
            ("crop_prob", self.crop_prob),
            ("low_res_prob", self.low_res_prob),
            ("photometric_prob", self.photometric_prob),
            ("grayscale_prob", self.grayscale_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(config_err(key, format!("must be in [0, 1], got {p}")));
            }
        }
        for (key, [lo, hi]) in [
            ("crop_scale", self.crop_scale),
            ("low_res_scale", self.low_res_scale),
        ] {
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                return Err(config_err(
                    key,
                    format!("must be [min, max] with 0 < min <= max <= 1, got [{lo}, {hi}]"),
                ));
            }
        }
        let [lo, hi] = self.crop_ratio;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return Err(config_err(
                "crop_ratio",
                format!("must be [min, max] with 0 < min <= max, got [{lo}, {hi}]"),
            ));
        }
        for (key, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(config_err(key, format!("must be >= 0, got {v}")));
            }
        }
        Ok(())
    }

    /// The generator of image `index` in `epoch`.
    fn rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
        let mut h = mix(seed ^ 0xB7E1_5162_8AED_2A6A);
        h = mix(h ^ epoch);
        h = mix(h ^ index);
        ChaCha8Rng::seed_from_u64(h)
    }

    /// Augment image `index` of `epoch` (the same inputs give the same output). The size is
    /// kept.
    pub fn apply(&self, img: RgbImage, seed: u64, epoch: u64, index: u64) -> RgbImage {
        if self.is_identity() || img.width() == 0 || img.height() == 0 {
            return img;
        }
        let mut rng = Self::rng(seed, epoch, index);
        let mut img = img;
        if self.crop_prob > 0.0 && rng.random::<f32>() < self.crop_prob {
            img = self.crop_with_zero_padding(&img, &mut rng);
        }
        if self.low_res_prob > 0.0 && rng.random::<f32>() < self.low_res_prob {
            img = self.low_resolution(&img, &mut rng);
        }
        if self.photometric_prob > 0.0 && rng.random::<f32>() < self.photometric_prob {
            self.photometric(&mut img, &mut rng);
        }
        if self.grayscale_prob > 0.0 && rng.random::<f32>() < self.grayscale_prob {
            grayscale(&mut img);
        }
        img
    }

    /// torchvision's `RandomResizedCrop.get_params`: `(top, left, height, width)`.
    fn crop_window(&self, w: u32, h: u32, rng: &mut ChaCha8Rng) -> (u32, u32, u32, u32) {
        let area = f64::from(w) * f64::from(h);
        let [s0, s1] = self.crop_scale.map(f64::from);
        let [r0, r1] = self.crop_ratio.map(|r| f64::from(r).ln());
        for _ in 0..10 {
            let target = area * uniform(rng, s0, s1);
            let aspect = uniform(rng, r0, r1).exp();
            let cw = (target * aspect).sqrt().round();
            let ch = (target / aspect).sqrt().round();
            if cw >= 1.0 && ch >= 1.0 && cw <= f64::from(w) && ch <= f64::from(h) {
                let (cw, ch) = (cw as u32, ch as u32);
                let top = rng.random_range(0..=h - ch);
                let left = rng.random_range(0..=w - cw);
                return (top, left, ch, cw);
            }
        }
        // Fallback: the largest centred window within the ratio range.
        let in_ratio = f64::from(w) / f64::from(h);
        let (cw, ch) = if in_ratio < f64::from(self.crop_ratio[0]) {
            let ch = (f64::from(w) / f64::from(self.crop_ratio[0])).round() as u32;
            (w, ch.clamp(1, h))
        } else if in_ratio > f64::from(self.crop_ratio[1]) {
            let cw = (f64::from(h) * f64::from(self.crop_ratio[1])).round() as u32;
            (cw.clamp(1, w), h)
        } else {
            (w, h)
        };
        ((h - ch) / 2, (w - cw) / 2, ch, cw)
    }

    fn crop_with_zero_padding(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
        let (w, h) = img.dimensions();
        let (top, left, ch, cw) = self.crop_window(w, h, rng);
        let mut out = RgbImage::new(w, h);
        for y in top..top + ch {
            for x in left..left + cw {
                out.put_pixel(x, y, *img.get_pixel(x, y));
            }
        }
        out
    }

    fn low_resolution(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> RgbImage {
        const FILTERS: [FilterType; 5] = [
            FilterType::Nearest,
            FilterType::Triangle,
            FilterType::CatmullRom,
            FilterType::Gaussian,
            FilterType::Lanczos3,
        ];
        let (w, h) = img.dimensions();
        let [s0, s1] = self.low_res_scale.map(f64::from);
        let ratio = uniform(rng, s0, s1);
        let small = ((ratio * f64::from(h)) as u32).max(1);
        let down = FILTERS[rng.random_range(0..FILTERS.len())];
        let up = FILTERS[rng.random_range(0..FILTERS.len())];
        let tiny = imageops::resize(img, small, small, down);
        imageops::resize(&tiny, w, h, up)
    }

    fn photometric(&self, img: &mut RgbImage, rng: &mut ChaCha8Rng) {
        let mut order = [0usize, 1, 2];
        order.shuffle(rng);
        let mut factor = |v: f32| {
            let v = f64::from(v);
            uniform(rng, (1.0 - v).max(0.0), 1.0 + v) as f32
        };
        let factors = [
            factor(self.brightness),
            factor(self.contrast),
            factor(self.saturation),
        ];
        for op in order {
            let f = factors[op];
            match op {
                0 if self.brightness > 0.0 => adjust_brightness(img, f),
                1 if self.contrast > 0.0 => adjust_contrast(img, f),
                2 if self.saturation > 0.0 => adjust_saturation(img, f),
                _ => {}
            }
        }
    }
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in `[lo, hi]` (`lo` when the range is empty).
fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

fn to_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

fn luma(p: &[u8; 3]) -> f32 {
    0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2])
}

/// Scale every channel by `f` (blend with black), clamped to [0, 255].
pub fn adjust_brightness(img: &mut RgbImage, f: f32) {
    for v in img.iter_mut() {
        *v = to_u8(f32::from(*v) * f);
    }
}

/// Blend with the mean luma of the image: `f · x + (1 − f) · mean`, clamped.
pub fn adjust_contrast(img: &mut RgbImage, f: f32) {
    let n = (img.width() * img.height()).max(1) as f32;
    let mean = img.pixels().map(|p| luma(&p.0)).sum::<f32>() / n;
    for v in img.iter_mut() {
        *v = to_u8(f * f32::from(*v) + (1.0 - f) * mean);
    }
}

/// Blend each pixel with its luma: `f · x + (1 − f) · luma` (0: grayscale, 1: unchanged).
pub fn adjust_saturation(img: &mut RgbImage, f: f32) {
    for p in img.pixels_mut() {
        let l = luma(&p.0);
        for c in &mut p.0 {
            *c = to_u8(f * f32::from(*c) + (1.0 - f) * l);
        }
    }
}

/// Replace every pixel by its ITU-R 601 luma in all three channels.
pub fn grayscale(img: &mut RgbImage) {
    for p in img.pixels_mut() {
        let l = to_u8(luma(&p.0));
        p.0 = [l, l, l];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A colourful 32×24 test card: a gradient and a bright square.
    fn card() -> RgbImage {
        RgbImage::from_fn(32, 24, |x, y| {
            if (8..20).contains(&x) && (6..16).contains(&y) {
                image::Rgb([250, 240, 20])
            } else {
                image::Rgb([(x * 7) as u8 + 10, (y * 9) as u8 + 10, 128])
            }
        })
    }

    #[test]
    fn probability_zero_is_the_identity() {
        let cfg = AugmentConfig::default();
        assert!(cfg.is_identity());
        for i in 0..20 {
            assert_eq!(cfg.apply(card(), 7, 3, i), card());
        }
        // Non-zero strengths with zero probabilities change nothing either.
        let cfg = AugmentConfig {
            brightness: 0.9,
            crop_scale: [0.1, 0.2],
            ..AugmentConfig::default()
        };
        assert_eq!(cfg.apply(card(), 1, 0, 0), card());
    }

    #[test]
    fn grayscale_makes_channels_equal() {
        let cfg = AugmentConfig {
            grayscale_prob: 1.0,
            ..AugmentConfig::default()
        };
        let out = cfg.apply(card(), 0, 0, 0);
        assert_eq!(out.dimensions(), (32, 24));
        assert!(out.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
        // Luma of the yellow square: 0.299·250 + 0.587·240 + 0.114·20 ≈ 218.
        assert_eq!(out.get_pixel(10, 10)[0], 218);
    }

    #[test]
    fn crop_keeps_the_size_pads_with_zeros_and_keeps_a_window() {
        let cfg = AugmentConfig {
            crop_prob: 1.0,
            crop_scale: [0.2, 0.5],
            ..AugmentConfig::default()
        };
        let src = RgbImage::from_pixel(40, 40, image::Rgb([200, 100, 50]));
        for i in 0..10 {
            let out = cfg.apply(src.clone(), 3, 0, i);
            assert_eq!(out.dimensions(), (40, 40));
            let kept: Vec<(u32, u32)> = out
                .enumerate_pixels()
                .filter(|(_, _, p)| p.0 != [0, 0, 0])
                .map(|(x, y, _)| (x, y))
                .collect();
            // Everything kept is the source pixel, everything else zero, the kept part a
            // rectangle of 20–50% of the area.
            assert!(out
                .pixels()
                .all(|p| p.0 == [0, 0, 0] || p.0 == [200, 100, 50]));
            let (x0, x1) = (
                kept.iter().map(|p| p.0).min().unwrap(),
                kept.iter().map(|p| p.0).max().unwrap(),
            );
            let (y0, y1) = (
                kept.iter().map(|p| p.1).min().unwrap(),
                kept.iter().map(|p| p.1).max().unwrap(),
            );
            let rect = ((x1 - x0 + 1) * (y1 - y0 + 1)) as usize;
            assert_eq!(rect, kept.len(), "kept pixels form a rectangle");
            let frac = kept.len() as f64 / 1600.0;
            assert!((0.15..=0.55).contains(&frac), "kept {frac} of the area");
        }
    }

    #[test]
    fn low_resolution_blurs_but_keeps_the_size() {
        let cfg = AugmentConfig {
            low_res_prob: 1.0,
            low_res_scale: [0.2, 0.3],
            ..AugmentConfig::default()
        };
        // A one-pixel checkerboard cannot survive a 5x downsampling.
        let src = RgbImage::from_fn(40, 40, |x, y| {
            let v = if (x + y) % 2 == 0 { 255 } else { 0 };
            image::Rgb([v, v, v])
        });
        let out = cfg.apply(src.clone(), 0, 0, 5);
        assert_eq!(out.dimensions(), (40, 40));
        let diff: u64 = src
            .iter()
            .zip(out.iter())
            .map(|(&a, &b)| u64::from(a.abs_diff(b)))
            .sum();
        assert!(diff > 40 * 40 * 3 * 60, "mean change {}", diff / 4800);
    }

    #[test]
    fn photometric_changes_colours_within_the_jitter() {
        let cfg = AugmentConfig {
            photometric_prob: 1.0,
            brightness: 0.5,
            contrast: 0.0,
            saturation: 0.0,
            ..AugmentConfig::default()
        };
        let src = RgbImage::from_pixel(8, 8, image::Rgb([100, 100, 100]));
        let mut changed = 0;
        for i in 0..20 {
            let out = cfg.apply(src.clone(), 0, 0, i);
            let v = out.get_pixel(0, 0)[0];
            assert!(
                (50..=150).contains(&v),
                "brightness factor out of [0.5, 1.5]: {v}"
            );
            assert!(out.pixels().all(|p| p.0 == [v, v, v]));
            changed += usize::from(v != 100);
        }
        assert!(changed >= 15);
        // Saturation 0 of the jitter range [0, 2] can give gray; factor 0 is full grayscale.
        let mut img = card();
        adjust_saturation(&mut img, 0.0);
        assert!(img.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
        let mut img = card();
        adjust_contrast(&mut img, 1.0);
        assert_eq!(img, card());
    }

    #[test]
    fn deterministic_per_seed_epoch_and_index() {
        let cfg = AugmentConfig {
            crop_prob: 0.5,
            low_res_prob: 0.5,
            photometric_prob: 0.5,
            grayscale_prob: 0.3,
            ..AugmentConfig::default()
        };
        let a: Vec<RgbImage> = (0..16).map(|i| cfg.apply(card(), 9, 2, i)).collect();
        let b: Vec<RgbImage> = (0..16).rev().map(|i| cfg.apply(card(), 9, 2, i)).collect();
        assert!(a.iter().zip(b.iter().rev()).all(|(x, y)| x == y));
        // Another epoch or seed draws differently for at least one image.
        assert!((0..16).any(|i| cfg.apply(card(), 9, 3, i) != a[i as usize]));
        assert!((0..16).any(|i| cfg.apply(card(), 10, 2, i) != a[i as usize]));
        // With probability 0.5 each, some images are left alone and some are not.
        assert!(a.iter().any(|x| *x == card()) && a.iter().any(|x| *x != card()));
    }

    #[test]
    fn validate_names_the_key() {
        let bad = |cfg: AugmentConfig, key: &str| {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("augment.{key}")), "{e}");
        };
        bad(
            AugmentConfig {
                crop_prob: 1.5,
                ..AugmentConfig::default()
            },
            "crop_prob",
        );
        bad(
            AugmentConfig {
                grayscale_prob: -0.1,
                ..AugmentConfig::default()
            },
            "grayscale_prob",
        );
        bad(
            AugmentConfig {
                crop_scale: [0.5, 0.2],
                ..AugmentConfig::default()
            },
            "crop_scale",
        );
        bad(
            AugmentConfig {
                low_res_scale: [0.0, 1.0],
                ..AugmentConfig::default()
            },
            "low_res_scale",
        );
        bad(
            AugmentConfig {
                crop_ratio: [0.0, 1.0],
                ..AugmentConfig::default()
            },
            "crop_ratio",
        );
        bad(
            AugmentConfig {
                contrast: -1.0,
                ..AugmentConfig::default()
            },
            "contrast",
        );
        AugmentConfig::default().validate().unwrap();
        AugmentConfig::adaface().validate().unwrap();
        // Unknown keys are refused by serde, naming them.
        let e = serde_json::from_str::<AugmentConfig>(r#"{"crop_probability": 0.2}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("crop_probability"), "{e}");
    }
}
