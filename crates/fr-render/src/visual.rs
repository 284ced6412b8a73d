//! Turning maps into 8-bit images for report grids.

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::{Error, Result};

/// An RGB image of a map `(3, H, W)` (or `(1, H, W)`, shown as grey) whose values are in
/// [0, 1]: each value is clamped to [0, 1], scaled by 255 and rounded. Depth maps can be shown
/// after `(d − min_depth)/(max_depth − min_depth)`, normals after `n·0.5 + 0.5`.
///
/// # Errors
/// [`Error::Shape`] for another rank or channel count.
pub fn to_rgb8(map: &Tensor) -> Result<RgbImage> {
    let dims = map.dims();
    if dims.len() != 3 || !(dims[0] == 1 || dims[0] == 3) || dims[1] == 0 || dims[2] == 0 {
        return Err(Error::shape("map", "(3, H, W) or (1, H, W)", map));
    }
    let (c, h, w) = (dims[0], dims[1], dims[2]);
    let v: Vec<f32> = map.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let byte = |x: f32| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let p = y as usize * w + x as usize;
        let ch = |k: usize| byte(v[(if c == 3 { k } else { 0 }) * h * w + p]);
        image::Rgb([ch(0), ch(1), ch(2)])
    }))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn converts_clamps_and_rounds() -> Result<()> {
        let map = Tensor::new(
            &[[[0.0f32, 0.5]], [[1.0, 2.0]], [[-1.0, 0.2]]],
            &Device::Cpu,
        )?; // (3, 1, 2)
        let img = to_rgb8(&map)?;
        assert_eq!(img.dimensions(), (2, 1));
        assert_eq!(img.get_pixel(0, 0).0, [0, 255, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [128, 255, 51]);
        let grey = to_rgb8(&Tensor::new(&[[[0.2f64, 1.0]]], &Device::Cpu)?)?;
        assert_eq!(grey.get_pixel(0, 0).0, [51, 51, 51]);
        assert!(to_rgb8(&Tensor::zeros((2, 4, 4), DType::F32, &Device::Cpu)?).is_err());
        Ok(())
    }
}
