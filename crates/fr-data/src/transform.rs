//! Image transforms shared by training batches and evaluation: resize, horizontal flip and the
//! insightface normalisation `(x/255 − 0.5)/0.5` into planar RGB (CHW) f32.

use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::RgbImage;
use rayon::prelude::*;

use crate::{Error, Result};

/// Per-channel mean of the normalisation, in [0, 1] units.
pub const MEAN: f32 = 0.5;
/// Per-channel standard deviation of the normalisation, in [0, 1] units.
pub const STD: f32 = 0.5;

/// Resize to `width`×`height` with a bilinear (triangle) filter; returns `img` unchanged when it
/// already has that size.
pub fn resize_rgb(img: RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        img
    } else {
        imageops::resize(&img, width, height, FilterType::Triangle)
    }
}

/// Deterministic coin for the random horizontal flip of image `index` in `epoch`: a hash of
/// `(seed, epoch, index)`, so the result does not depend on which thread decodes the image.
pub fn flip_coin(seed: u64, epoch: u64, index: u64, p: f32) -> bool {
    let mut h = splitmix64(seed ^ 0x6A09_E667_F3BC_C908);
    h = splitmix64(h ^ epoch);
    h = splitmix64(h ^ index);
    // 53 uniform bits → [0, 1).
    ((h >> 11) as f64 / (1u64 << 53) as f64) < f64::from(p)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Write `img` as planar RGB `(3, H, W)` f32 normalised to [−1, 1] into `out`.
///
/// # Errors
/// `out.len() != 3 · H · W`.
pub fn normalise_into(img: &RgbImage, out: &mut [f32]) -> Result<()> {
    normalise_flip_into(img, false, out)
}

/// As [`normalise_into`], mirrored left–right when `flip`.
///
/// # Errors
/// `out.len() != 3 · H · W`.
pub fn normalise_flip_into(img: &RgbImage, flip: bool, out: &mut [f32]) -> Result<()> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    if out.len() != 3 * plane {
        return Err(Error::Config {
            key: "out".into(),
            reason: format!(
                "buffer of {} floats for a {w}x{h} RGB image ({} needed)",
                out.len(),
                3 * plane
            ),
        });
    }
    if plane == 0 {
        return Ok(());
    }
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let lut = normalise_table();
    let rows = img
        .as_raw()
        .chunks_exact(3 * w)
        .zip(r.chunks_exact_mut(w))
        .zip(g.chunks_exact_mut(w))
        .zip(b.chunks_exact_mut(w));
    let put = |p: &[u8], (r, (g, b)): (&mut f32, (&mut f32, &mut f32))| {
        (*r, *g, *b) = (lut[p[0] as usize], lut[p[1] as usize], lut[p[2] as usize]);
    };
    for (((src, r), g), b) in rows {
        let dst = r.iter_mut().zip(g.iter_mut().zip(b.iter_mut()));
        if flip {
            // Output column x takes source column w − 1 − x.
            src.chunks_exact(3)
                .rev()
                .zip(dst)
                .for_each(|(p, o)| put(p, o));
        } else {
            src.chunks_exact(3).zip(dst).for_each(|(p, o)| put(p, o));
        }
    }
    Ok(())
}

/// `(x − 255·mean) / (255·std)` for every byte `x`: exact at 0 and 255, so the range is
/// exactly [−1, 1]. A table lookup per sample is several times faster than the division and
/// gives the same floats.
fn normalise_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let (m, d) = (255.0 * MEAN, 255.0 * STD);
        std::array::from_fn(|x| (x as f32 - m) / d)
    })
}

/// `(N, 3, size, size)` normalised f32, row-major, for a slice of images (resized where they
/// differ, mirrored when `flip`); decoded in parallel. For evaluation batches.
pub fn images_to_chw(images: &[RgbImage], size: u32, flip: bool) -> Vec<f32> {
    let per = 3 * (size as usize) * (size as usize);
    let mut out = vec![0f32; per * images.len()];
    out.par_chunks_mut(per.max(1))
        .zip(images.par_iter())
        .for_each(|(dst, img)| {
            let resized;
            let img = if img.dimensions() == (size, size) {
                img
            } else {
                resized = imageops::resize(img, size, size, FilterType::Triangle);
                &resized
            };
            normalise_flip_into(img, flip, dst).expect("buffer sized for the image");
        });
    out
}

/// As [`images_to_chw`], as a `(N, 3, size, size)` tensor on `device`.
///
/// # Errors
/// A tensor allocation failure.
pub fn images_to_tensor(
    images: &[RgbImage],
    size: u32,
    flip: bool,
    device: &Device,
) -> Result<Tensor> {
    let s = size as usize;
    let data = images_to_chw(images, size, flip);
    Ok(Tensor::from_vec(data, (images.len(), 3, s, s), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_rgb_planes() {
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgb([255, 0, 51]));
        img.put_pixel(1, 0, image::Rgb([0, 255, 204]));
        let mut out = [0f32; 6];
        normalise_into(&img, &mut out).unwrap();
        let want = [
            1.0,
            -1.0,
            -1.0,
            1.0,
            51.0 / 127.5 - 1.0,
            204.0 / 127.5 - 1.0,
        ];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
        normalise_flip_into(&img, true, &mut out).unwrap();
        assert_eq!(out[0], -1.0);
        assert_eq!(out[1], 1.0);
        assert!(normalise_into(&img, &mut [0f32; 5]).is_err());
    }

    #[test]
    fn flip_coin_is_fair_and_seeded() {
        let n = 10_000;
        let heads = (0..n).filter(|&i| flip_coin(7, 0, i, 0.5)).count();
        assert!((4_700..5_300).contains(&heads), "{heads}");
        let a: Vec<bool> = (0..64).map(|i| flip_coin(7, 0, i, 0.5)).collect();
        let b: Vec<bool> = (0..64).map(|i| flip_coin(8, 0, i, 0.5)).collect();
        let c: Vec<bool> = (0..64).map(|i| flip_coin(7, 1, i, 0.5)).collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!((0..100).all(|i| !flip_coin(1, 2, i, 0.0)));
        assert!((0..100).all(|i| flip_coin(1, 2, i, 1.0)));
    }
}
