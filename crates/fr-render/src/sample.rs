//! Differentiable bilinear resampling and horizontal flipping.
//!
//! [`grid_sample`] is PyTorch's `grid_sample(mode="bilinear", padding_mode="border",
//! align_corners=True)` (the convention of Unsup3D's renderer, where `-1` and `+1` are the
//! centres of the first and last pixels), with gradients with respect to both the image and
//! the grid. On the CPU it runs as one fused candle custom op with its own backward (image
//! gradient scatter-added per image, coordinate gradients from the cell's bilinear slopes);
//! elsewhere, and as the tested reference, [`sample_pixels_gather`] builds it from one
//! `gather` over the four corner pixels and their bilinear weights (candle 0.11
//! differentiates `gather` and the weights' arithmetic correctly; the corner indices come from
//! a detached copy of the coordinates). Either way the value is piecewise bilinear in the
//! coordinates and its gradient is the exact gradient of the piece (as PyTorch's).
//!
//! Padding: *border* — coordinates are clamped to the image before interpolation, so a sample
//! outside the image repeats the nearest edge pixel and has zero gradient with respect to the
//! out-of-range coordinate. Border padding keeps the fixed-point depth search of the renderer
//! well defined outside the image; which pixels really lie inside is reported separately as a
//! mask (see [`crate::renderer::Warp::mask`]).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::{Error, Result};

fn check_float(what: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank || !matches!(t.dtype(), DType::F32 | DType::F64) {
        return Err(Error::shape(what, format!("rank {rank}, f32 or f64"), t));
    }
    Ok(())
}

/// Bilinear samples of `image` `(B, C, H, W)` at pixel coordinates `u` (column) and `v` (row),
/// both `(B, Ho, Wo)` in pixels (`0` is the centre of the first pixel, `W − 1` of the last),
/// with border padding: `(B, C, Ho, Wo)`. Differentiable in `image`, `u` and `v`.
///
/// # Errors
/// [`Error::Shape`] for mismatched shapes or dtypes, or an image smaller than 2×2.
pub fn sample_pixels(image: &Tensor, u: &Tensor, v: &Tensor) -> Result<Tensor> {
    check_sample_args(image, u, v)?;
    if !image.device().is_cpu() {
        return sample_pixels_gather(image, u, v);
    }
    let (b, c, h, w) = image.dims4()?;
    let (_, ho, wo) = u.dims3()?;
    let n = ho * wo;
    let out = image.contiguous()?.apply_op3(
        &u.reshape((b, n))?.contiguous()?,
        &v.reshape((b, n))?.contiguous()?,
        BilinearSample { c, h, w },
    )?;
    Ok(out.reshape((b, c, ho, wo))?)
}

fn check_sample_args(image: &Tensor, u: &Tensor, v: &Tensor) -> Result<()> {
    check_float("image", image, 4)?;
    check_float("u", u, 3)?;
    let (b, c, h, w) = image.dims4()?;
    let (bu, ho, wo) = u.dims3()?;
    if h < 2 || w < 2 || bu != b || u.dtype() != image.dtype() {
        return Err(Error::shape(
            "u",
            format!("(B = {b}, Ho, Wo) {:?}, image at least 2x2", image.dtype()),
            u,
        ));
    }
    if v.dims() != u.dims() || v.dtype() != u.dtype() {
        return Err(Error::shape("v", format!("{:?} like u", u.dims()), v));
    }
    let _ = (c, ho, wo);
    Ok(())
}

/// The same as [`sample_pixels`] from candle ops alone (one `gather` of the four corners and
/// the bilinear weights): the path on GPUs and the reference the fused CPU kernel is tested
/// against. Its gradient with respect to `u` at exactly `u = 0` or `u = W − 1` is half the
/// one-sided derivative (candle's `maximum`/`minimum` split ties), where the fused kernel
/// gives 0.
///
/// # Errors
/// As [`sample_pixels`].
pub fn sample_pixels_gather(image: &Tensor, u: &Tensor, v: &Tensor) -> Result<Tensor> {
    check_sample_args(image, u, v)?;
    let (b, c, h, w) = image.dims4()?;
    let (_, ho, wo) = u.dims3()?;
    let n = ho * wo;
    // Border padding: clamp to the pixel centres of the edges.
    let uc = u.clamp(0.0, (w - 1) as f64)?.reshape((b, n))?;
    let vc = v.clamp(0.0, (h - 1) as f64)?.reshape((b, n))?;
    // Top-left corner; at the last column / row the cell to the left / above is used with a
    // weight of 1 on its far side, so every index stays inside the image.
    let u0 = uc.detach().floor()?.clamp(0.0, (w - 2) as f64)?;
    let v0 = vc.detach().floor()?.clamp(0.0, (h - 2) as f64)?;
    let fu = uc.sub(&u0)?;
    let fv = vc.sub(&v0)?;
    let i00 = v0.affine(w as f64, 0.0)?.add(&u0)?;
    let idx = Tensor::cat(
        &[
            i00.clone(),
            i00.affine(1.0, 1.0)?,
            i00.affine(1.0, w as f64)?,
            i00.affine(1.0, (w + 1) as f64)?,
        ],
        1,
    )?
    .to_dtype(DType::U32)?
    .unsqueeze(1)?
    .broadcast_as((b, c, 4 * n))?
    .contiguous()?;
    let gu = fu.affine(-1.0, 1.0)?;
    let gv = fv.affine(-1.0, 1.0)?;
    let weights = Tensor::stack(&[gu.mul(&gv)?, fu.mul(&gv)?, gu.mul(&fv)?, fu.mul(&fv)?], 1)?
        .unsqueeze(1)?; // (B, 1, 4, N)
    let corners = image
        .contiguous()?
        .reshape((b, c, h * w))?
        .gather(&idx, 2)?
        .reshape((b, c, 4, n))?;
    Ok(corners
        .broadcast_mul(&weights)?
        .sum(2)?
        .reshape((b, c, ho, wo))?)
}

/// Float types of the fused kernel.
trait Real: Copy + Send + Sync + Default + std::ops::AddAssign + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
}

impl Real for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// The bilinear cell of coordinate `x` in `0..len` (border padding): the left index, the
/// fraction, and whether `x` lies strictly inside (where the derivative is not clamped away).
#[inline]
fn cell(x: f64, len: usize) -> (usize, f64, bool) {
    let last = (len - 1) as f64;
    let xc = x.clamp(0.0, last);
    let x0 = xc.floor().clamp(0.0, last - 1.0);
    (x0 as usize, xc - x0, x > 0.0 && x < last)
}

/// Fused bilinear sampling on the CPU: `(image (B, C, H, W), u (B, N), v (B, N)) → (B, C, N)`,
/// with a backward that writes the image gradient (a scatter-add per image) and the
/// coordinate gradients in one pass, parallel over the batch. Inputs are contiguous.
struct BilinearSample {
    c: usize,
    h: usize,
    w: usize,
}

impl BilinearSample {
    fn forward<T: Real>(&self, img: &[T], u: &[T], v: &[T]) -> Vec<T> {
        let (c, h, w) = (self.c, self.h, self.w);
        let n = u.len() / (img.len() / (c * h * w));
        let mut out = vec![T::default(); img.len() / (h * w) * n];
        out.par_chunks_mut(c * n).enumerate().for_each(|(b, out)| {
            let img = &img[b * c * h * w..(b + 1) * c * h * w];
            for p in 0..n {
                let (x0, fx, _) = cell(u[b * n + p].to_f64(), w);
                let (y0, fy, _) = cell(v[b * n + p].to_f64(), h);
                let i = y0 * w + x0;
                let wts = [
                    (1.0 - fx) * (1.0 - fy),
                    fx * (1.0 - fy),
                    (1.0 - fx) * fy,
                    fx * fy,
                ];
                for ch in 0..c {
                    let m = &img[ch * h * w..];
                    let val = wts[0] * m[i].to_f64()
                        + wts[1] * m[i + 1].to_f64()
                        + wts[2] * m[i + w].to_f64()
                        + wts[3] * m[i + w + 1].to_f64();
                    out[ch * n + p] = T::from_f64(val);
                }
            }
        });
        out
    }

    /// Gradients with respect to the image `(B, C, H, W)`, `u` and `v` `(B, N)`.
    fn backward<T: Real>(&self, img: &[T], u: &[T], v: &[T], g: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (c, h, w) = (self.c, self.h, self.w);
        let b = img.len() / (c * h * w);
        let n = u.len() / b;
        let mut gi = vec![T::default(); img.len()];
        let mut gu = vec![T::default(); u.len()];
        let mut gv = vec![T::default(); v.len()];
        gi.par_chunks_mut(c * h * w)
            .zip(gu.par_chunks_mut(n))
            .zip(gv.par_chunks_mut(n))
            .enumerate()
            .for_each(|(k, ((gi, gu), gv))| {
                let img = &img[k * c * h * w..(k + 1) * c * h * w];
                let g = &g[k * c * n..(k + 1) * c * n];
                for p in 0..n {
                    let (x0, fx, x_in) = cell(u[k * n + p].to_f64(), w);
                    let (y0, fy, y_in) = cell(v[k * n + p].to_f64(), h);
                    let i = y0 * w + x0;
                    let wts = [
                        (1.0 - fx) * (1.0 - fy),
                        fx * (1.0 - fy),
                        (1.0 - fx) * fy,
                        fx * fy,
                    ];
                    let (mut du, mut dv) = (0.0, 0.0);
                    for ch in 0..c {
                        let gp = g[ch * n + p].to_f64();
                        let o = ch * h * w;
                        let m = &img[o..];
                        let (a, bb, cc, d) = (
                            m[i].to_f64(),
                            m[i + 1].to_f64(),
                            m[i + w].to_f64(),
                            m[i + w + 1].to_f64(),
                        );
                        du += gp * ((1.0 - fy) * (bb - a) + fy * (d - cc));
                        dv += gp * ((1.0 - fx) * (cc - a) + fx * (d - bb));
                        gi[o + i] += T::from_f64(wts[0] * gp);
                        gi[o + i + 1] += T::from_f64(wts[1] * gp);
                        gi[o + i + w] += T::from_f64(wts[2] * gp);
                        gi[o + i + w + 1] += T::from_f64(wts[3] * gp);
                    }
                    gu[p] = T::from_f64(if x_in { du } else { 0.0 });
                    gv[p] = T::from_f64(if y_in { dv } else { 0.0 });
                }
            });
        (gi, gu, gv)
    }
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("bilinear-sample: non-contiguous input"),
    }
}

impl CustomOp3 for BilinearSample {
    fn name(&self) -> &'static str {
        "bilinear-sample"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = l1.dims()[0];
        let n = l2.dims()[1];
        let shape = Shape::from((b, self.c, n));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(i), CpuStorage::F32(u), CpuStorage::F32(v)) => CpuStorage::F32(
                self.forward(contiguous(i, l1)?, contiguous(u, l2)?, contiguous(v, l3)?),
            ),
            (CpuStorage::F64(i), CpuStorage::F64(u), CpuStorage::F64(v)) => CpuStorage::F64(
                self.forward(contiguous(i, l1)?, contiguous(u, l2)?, contiguous(v, l3)?),
            ),
            _ => candle_core::bail!("bilinear-sample: f32 or f64 inputs of one dtype"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        img: &Tensor,
        u: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dev = img.device();
        let flat = |t: &Tensor| t.detach().flatten_all();
        let (gi, gu, gv) = match img.dtype() {
            DType::F32 => {
                let (i, uu, vv, g) = (
                    flat(img)?.to_vec1::<f32>()?,
                    flat(u)?.to_vec1::<f32>()?,
                    flat(v)?.to_vec1::<f32>()?,
                    flat(grad)?.to_vec1::<f32>()?,
                );
                let (a, b, c) = self.backward(&i, &uu, &vv, &g);
                (
                    Tensor::from_vec(a, img.shape(), dev)?,
                    Tensor::from_vec(b, u.shape(), dev)?,
                    Tensor::from_vec(c, v.shape(), dev)?,
                )
            }
            _ => {
                let (i, uu, vv, g) = (
                    flat(img)?.to_vec1::<f64>()?,
                    flat(u)?.to_vec1::<f64>()?,
                    flat(v)?.to_vec1::<f64>()?,
                    flat(grad)?.to_vec1::<f64>()?,
                );
                let (a, b, c) = self.backward(&i, &uu, &vv, &g);
                (
                    Tensor::from_vec(a, img.shape(), dev)?,
                    Tensor::from_vec(b, u.shape(), dev)?,
                    Tensor::from_vec(c, v.shape(), dev)?,
                )
            }
        };
        Ok((Some(gi), Some(gu), Some(gv)))
    }
}

/// PyTorch-style `grid_sample(image, grid, mode="bilinear", padding_mode="border",
/// align_corners=True)`: `image` `(B, C, H, W)`, `grid` `(B, Ho, Wo, 2)` holding normalised
/// `(x, y)` in `[-1, 1]` (`x = -1` is the centre of the left column, `x = 1` of the right
/// one) → `(B, C, Ho, Wo)`. Gradients flow to `image` and `grid`.
///
/// # Errors
/// [`Error::Shape`] for a grid that is not `(B, Ho, Wo, 2)` with the image's batch and dtype,
/// or an image smaller than 2×2.
pub fn grid_sample(image: &Tensor, grid: &Tensor) -> Result<Tensor> {
    check_float("image", image, 4)?;
    check_float("grid", grid, 4)?;
    let (_, _, h, w) = image.dims4()?;
    if grid.dim(D::Minus1)? != 2 {
        return Err(Error::shape("grid", "(B, Ho, Wo, 2)", grid));
    }
    let x = grid.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let y = grid.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
    let u = x.affine(0.5 * (w as f64 - 1.0), 0.5 * (w as f64 - 1.0))?;
    let v = y.affine(0.5 * (h as f64 - 1.0), 0.5 * (h as f64 - 1.0))?;
    sample_pixels(image, &u, &v)
}

/// The normalised grid `(B, H, W, 2)` of pixel coordinates `u`, `v` `(B, H, W)` in an image of
/// `width` × `height` pixels (the inverse of the mapping in [`grid_sample`]).
///
/// # Errors
/// Candle errors for mismatched shapes.
pub fn pixels_to_grid(u: &Tensor, v: &Tensor, width: usize, height: usize) -> Result<Tensor> {
    let x = u.affine(2.0 / (width as f64 - 1.0), -1.0)?;
    let y = v.affine(2.0 / (height as f64 - 1.0), -1.0)?;
    Ok(Tensor::stack(&[x, y], D::Minus1)?)
}

/// Bilinear resize of `image` `(B, C, H, W)` to `(B, C, size, size)`, differentiable in the
/// image: pixel centres are aligned (PyTorch's `interpolate(mode="bilinear",
/// align_corners=False)` without antialiasing; output pixel `i` samples input coordinate
/// `(i + 0.5)·H/size − 0.5`, clamped to the border). Used to move images between the
/// recognition input size (56 or 112) and the branch's size (64). Returns the input when the
/// size already matches.
///
/// # Errors
/// [`Error::Shape`] for another rank or dtype, an image smaller than 2×2, or `size` 0.
pub fn resize_bilinear(image: &Tensor, size: usize) -> Result<Tensor> {
    check_float("image", image, 4)?;
    let (b, _, h, w) = image.dims4()?;
    if size == 0 || h < 2 || w < 2 {
        return Err(Error::shape(
            "image",
            format!("(B, C, H ≥ 2, W ≥ 2) and a target size ≥ 1 (got {size})"),
            image,
        ));
    }
    if h == size && w == size {
        return Ok(image.clone());
    }
    let coords = |n: usize| -> Vec<f64> {
        (0..size)
            .map(|i| ((i as f64 + 0.5) * n as f64 / size as f64 - 0.5).clamp(0.0, n as f64 - 1.0))
            .collect()
    };
    let dev = image.device();
    let u = Tensor::from_vec(coords(w), (1, 1, size), dev)?
        .to_dtype(image.dtype())?
        .broadcast_as((b, size, size))?
        .contiguous()?;
    let v = Tensor::from_vec(coords(h), (1, size, 1), dev)?
        .to_dtype(image.dtype())?
        .broadcast_as((b, size, size))?
        .contiguous()?;
    sample_pixels(image, &u, &v)
}

/// Mirror a map left–right along its last dimension (`(…, W)`), through `index_select`
/// (whose backward is correct): depth `(B, H, W)` or albedo `(B, C, H, W)`.
///
/// # Errors
/// Candle errors for a rank-0 tensor.
pub fn flip_horizontal(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(D::Minus1)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    let idx = Tensor::from_vec(idx, w, x.device())?;
    Ok(x.index_select(&idx, x.rank() - 1)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::testutil::{fd_check, rand_tensor};

    #[test]
    fn matches_direct_bilinear_interpolation() -> Result<()> {
        // 2x3 image, one channel; sample at interior, edge and outside points.
        let img = Tensor::new(&[[[[1.0f64, 2.0, 4.0], [8.0, 16.0, 32.0]]]], &Device::Cpu)?;
        let u = Tensor::new(&[[[0.5f64, 2.0, -1.0, 1.25, 3.5]]], &Device::Cpu)?;
        let v = Tensor::new(&[[[0.5f64, 1.0, 0.0, 0.25, -2.0]]], &Device::Cpu)?;
        let got: Vec<f64> = sample_pixels(&img, &u, &v)?.flatten_all()?.to_vec1()?;
        let want = [
            (1.0 + 2.0 + 8.0 + 16.0) / 4.0,
            32.0,
            1.0, // clamped to (0, 0)
            0.75 * (0.75 * 2.0 + 0.25 * 4.0) + 0.25 * (0.75 * 16.0 + 0.25 * 32.0),
            4.0, // clamped to (2, 0)
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn identity_grid_reproduces_the_image() -> Result<()> {
        let img = rand_tensor(&[2, 3, 5, 7], 1)?;
        let v = Tensor::arange(0u32, 5, &Device::Cpu)?
            .to_dtype(DType::F64)?
            .reshape((1, 5, 1))?
            .broadcast_as((2, 5, 7))?;
        let u = Tensor::arange(0u32, 7, &Device::Cpu)?
            .to_dtype(DType::F64)?
            .reshape((1, 1, 7))?
            .broadcast_as((2, 5, 7))?;
        let grid = pixels_to_grid(&u, &v, 7, 5)?;
        let out = grid_sample(&img, &grid)?;
        let err = out.sub(&img)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err < 1e-12, "{err}");
        Ok(())
    }

    #[test]
    fn gradient_wrt_image_matches_finite_differences() -> Result<()> {
        let img = rand_tensor(&[2, 2, 6, 6], 2)?;
        let grid = rand_tensor(&[2, 4, 5, 2], 3)?.affine(2.4, -1.2)?; // some samples outside
        let w = rand_tensor(&[2, 2, 4, 5], 4)?;
        let f = |x: &Tensor| -> Result<Tensor> { Ok(grid_sample(x, &grid)?.mul(&w)?.sum_all()?) };
        let worst = fd_check(&img, f)?;
        assert!(worst < 1e-8, "{worst}");
        Ok(())
    }

    #[test]
    fn gradient_wrt_grid_matches_finite_differences() -> Result<()> {
        let img = rand_tensor(&[2, 2, 6, 6], 5)?;
        // Inside the image, away from pixel centres (where the bilinear map has kinks) and
        // from the border.
        let grid = rand_tensor(&[2, 4, 5, 2], 6)?.affine(1.6, -0.8)?;
        let w = rand_tensor(&[2, 2, 4, 5], 7)?;
        let f = |g: &Tensor| -> Result<Tensor> { Ok(grid_sample(&img, g)?.mul(&w)?.sum_all()?) };
        let worst = fd_check(&grid, f)?;
        assert!(worst < 1e-7, "{worst}");
        // Outside the image (border padding) the gradient with respect to the grid is zero.
        let outside = Tensor::full(1.5f64, (2, 4, 5, 2), &Device::Cpu)?;
        let var = candle_core::Var::from_tensor(&outside)?;
        let grads = grid_sample(&img, var.as_tensor())?.sum_all()?.backward()?;
        let g = grads.get(&var).expect("grid gradient");
        assert_eq!(g.abs()?.max_all()?.to_scalar::<f64>()?, 0.0);
        Ok(())
    }

    #[test]
    fn gradients_in_f32_agree_with_f64() -> Result<()> {
        let img = rand_tensor(&[1, 3, 6, 6], 8)?;
        let grid = rand_tensor(&[1, 6, 6, 2], 9)?.affine(1.8, -0.9)?;
        let run = |img: &Tensor, grid: &Tensor| -> Result<(Vec<f64>, Vec<f64>)> {
            let (vi, vg) = (
                candle_core::Var::from_tensor(img)?,
                candle_core::Var::from_tensor(grid)?,
            );
            let loss = grid_sample(vi.as_tensor(), vg.as_tensor())?
                .sqr()?
                .sum_all()?;
            let g = loss.backward()?;
            let flat = |t: &Tensor| -> Result<Vec<f64>> {
                Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
            };
            Ok((flat(g.get(&vi).unwrap())?, flat(g.get(&vg).unwrap())?))
        };
        let (a_img, a_grid) = run(&img, &grid)?;
        let (b_img, b_grid) = run(&img.to_dtype(DType::F32)?, &grid.to_dtype(DType::F32)?)?;
        for (a, b) in a_img.iter().zip(&b_img).chain(a_grid.iter().zip(&b_grid)) {
            assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn flip_is_an_involution_with_correct_gradient() -> Result<()> {
        let x = rand_tensor(&[2, 3, 4, 5], 10)?;
        let f = flip_horizontal(&x)?;
        assert_eq!(
            f.narrow(3, 0, 1)?.flatten_all()?.to_vec1::<f64>()?,
            x.narrow(3, 4, 1)?.flatten_all()?.to_vec1::<f64>()?
        );
        let back = flip_horizontal(&f)?;
        assert_eq!(back.sub(&x)?.abs()?.max_all()?.to_scalar::<f64>()?, 0.0);
        let w = rand_tensor(&[2, 3, 4, 5], 11)?;
        let worst = fd_check(&x, |x| Ok(flip_horizontal(x)?.mul(&w)?.sum_all()?))?;
        assert!(worst < 1e-8);
        Ok(())
    }

    #[test]
    fn fused_kernel_matches_the_gather_reference() -> Result<()> {
        for dtype in [DType::F64, DType::F32] {
            let img = rand_tensor(&[2, 3, 7, 6], 12)?.to_dtype(dtype)?;
            let u = rand_tensor(&[2, 4, 5], 13)?
                .affine(7.0, -0.5)?
                .to_dtype(dtype)?;
            let v = rand_tensor(&[2, 4, 5], 14)?
                .affine(8.0, -0.5)?
                .to_dtype(dtype)?;
            let w = rand_tensor(&[2, 3, 4, 5], 15)?.to_dtype(dtype)?;
            let run =
                |f: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| -> Result<Vec<Vec<f64>>> {
                    let (vi, vu, vv) = (
                        candle_core::Var::from_tensor(&img)?,
                        candle_core::Var::from_tensor(&u)?,
                        candle_core::Var::from_tensor(&v)?,
                    );
                    let out = f(vi.as_tensor(), vu.as_tensor(), vv.as_tensor())?;
                    let g = out.mul(&w)?.sum_all()?.backward()?;
                    let flat = |t: &Tensor| -> Result<Vec<f64>> {
                        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
                    };
                    Ok(vec![
                        flat(&out)?,
                        flat(g.get(&vi).unwrap())?,
                        flat(g.get(&vu).unwrap())?,
                        flat(g.get(&vv).unwrap())?,
                    ])
                };
            let (a, b) = (run(sample_pixels)?, run(sample_pixels_gather)?);
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for (x, y) in a.iter().zip(&b) {
                for (p, q) in x.iter().zip(y) {
                    assert!(
                        (p - q).abs() < tol * (1.0 + p.abs()),
                        "{dtype:?}: {p} vs {q}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn resize_aligns_pixel_centres_and_is_differentiable() -> Result<()> {
        // A horizontal ramp 0..W−1 resized 4 → 8: output pixel i samples (i + 0.5)/2 − 0.5,
        // clamped to [0, 3]; rows are constant.
        let ramp = Tensor::arange(0f64, 4., &Device::Cpu)?
            .reshape((1, 1, 1, 4))?
            .broadcast_as((1, 1, 4, 4))?
            .contiguous()?;
        let up: Vec<f64> = resize_bilinear(&ramp, 8)?
            .get(0)?
            .get(0)?
            .get(3)?
            .to_vec1()?;
        let want = [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0];
        for (a, b) in up.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{up:?}");
        }
        // Down and up again keeps a constant image; same size is the identity.
        let c = Tensor::full(0.3f64, (2, 3, 7, 7), &Device::Cpu)?;
        let back = resize_bilinear(&resize_bilinear(&c, 5)?, 7)?;
        assert!((back - &c)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
        let img = rand_tensor(&[2, 2, 6, 6], 12)?;
        let same: Vec<f64> = resize_bilinear(&img, 6)?.flatten_all()?.to_vec1()?;
        assert_eq!(same, img.flatten_all()?.to_vec1::<f64>()?);
        let w = rand_tensor(&[2, 2, 5, 5], 13)?;
        let worst = fd_check(&img, |x| Ok(resize_bilinear(x, 5)?.mul(&w)?.sum_all()?))?;
        assert!(worst < 1e-8, "{worst}");
        assert!(resize_bilinear(&img, 0).is_err());
        Ok(())
    }

    #[test]
    fn rejects_bad_shapes() {
        let img = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let grid = Tensor::zeros((1, 4, 4, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(grid_sample(&img, &grid), Err(Error::Shape { .. })));
        let grid = Tensor::zeros((2, 4, 4, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(grid_sample(&img, &grid), Err(Error::Shape { .. })));
        let tiny = Tensor::zeros((1, 1, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let grid = Tensor::zeros((1, 4, 4, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            grid_sample(&tiny, &grid),
            Err(Error::Shape { .. })
        ));
    }
}
