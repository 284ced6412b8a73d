//! The pinhole camera and the rigid view transform of Unsup3D's renderer.
//!
//! Conventions (as Unsup3D, `unsup3d/renderer/renderer.py` and `utils.py` of
//! github.com/elliottwu/unsup3d): a square image of `S` pixels, focal length
//! `f = (S − 1)/2 / tan(fov/2)` pixels, principal point `c = (S − 1)/2`; a pixel `(u, v)`
//! (column, row) with depth `d` back-projects to `d·((u − c)/f, (v − c)/f, 1)` (camera at the
//! origin looking along +z, depth = the z coordinate). A view `(rx, ry, rz, tx, ty, tz)`
//! (radians, world units) maps a canonical point `P` to `R·(P − o) + o + t` with
//! `R = Rz(rz)·Ry(ry)·Rx(rx)` and the rotation centre `o = (0, 0, (min_depth + max_depth)/2)`;
//! `rx` is the pitch, `ry` the yaw and `rz` the roll.
//!
//! Point sets are kept as three `(B, H, W)` coordinate maps, so every operation is an
//! element-wise candle op with a correct backward.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Three coordinate maps `(B, H, W)` of 3-D points, in world units.
#[derive(Debug, Clone)]
pub struct Points {
    /// x (right).
    pub x: Tensor,
    /// y (down).
    pub y: Tensor,
    /// z (depth, away from the camera).
    pub z: Tensor,
}

/// A square pinhole camera (Unsup3D's intrinsics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Camera {
    size: usize,
    fov_deg: f64,
    min_depth: f64,
    max_depth: f64,
}

impl Camera {
    /// A camera for `size`×`size` images with a field of view of `fov_deg` degrees and
    /// canonical depths in `[min_depth, max_depth]` (world units).
    ///
    /// # Errors
    /// [`Error::Config`] for `size < 2`, a field of view outside `(0°, 180°)` or an empty or
    /// non-positive depth range.
    pub fn new(size: usize, fov_deg: f64, min_depth: f64, max_depth: f64) -> Result<Self> {
        if size < 2 {
            return Err(Error::config("image_size", format!("{size} < 2")));
        }
        if !(fov_deg > 0.0 && fov_deg < 180.0) {
            return Err(Error::config(
                "fov_deg",
                format!("{fov_deg} not in (0, 180)"),
            ));
        }
        if !(min_depth > 0.0 && max_depth > min_depth && max_depth.is_finite()) {
            return Err(Error::config(
                "min_depth",
                format!("need 0 < min_depth < max_depth, got [{min_depth}, {max_depth}]"),
            ));
        }
        Ok(Self {
            size,
            fov_deg,
            min_depth,
            max_depth,
        })
    }

    /// Image side `S` in pixels.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The canonical depth range `(min, max)` in world units.
    pub fn depth_range(&self) -> (f64, f64) {
        (self.min_depth, self.max_depth)
    }

    /// Focal length in pixels: `(S − 1)/2 / tan(fov/2)`.
    pub fn focal(&self) -> f64 {
        (self.size as f64 - 1.0) / 2.0 / (self.fov_deg.to_radians() / 2.0).tan()
    }

    /// Principal point (both axes) in pixels: `(S − 1)/2`.
    pub fn principal_point(&self) -> f64 {
        (self.size as f64 - 1.0) / 2.0
    }

    /// Depth of the rotation centre `(0, 0, (min + max)/2)`.
    pub fn rotation_centre(&self) -> f64 {
        (self.min_depth + self.max_depth) / 2.0
    }

    /// Ray directions `(ax, ay)`, each `(1, S, S)`: `ax = (u − c)/f`, `ay = (v − c)/f`, so the
    /// pixel `(u, v)` at depth `d` is the point `(d·ax, d·ay, d)`.
    ///
    /// # Errors
    /// Candle errors.
    pub fn rays(&self, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let s = self.size;
        let (f, c) = (self.focal(), self.principal_point());
        let line = Tensor::arange(0u32, s as u32, device)?
            .to_dtype(dtype)?
            .affine(1.0 / f, -c / f)?;
        let ax = line
            .reshape((1, 1, s))?
            .broadcast_as((1, s, s))?
            .contiguous()?;
        let ay = line
            .reshape((1, s, 1))?
            .broadcast_as((1, s, s))?
            .contiguous()?;
        Ok((ax, ay))
    }

    /// Back-project a depth map `(B, S, S)` (z, world units) to the points seen at each pixel.
    ///
    /// # Errors
    /// [`Error::Shape`] for a depth map of another size.
    pub fn back_project(&self, depth: &Tensor) -> Result<Points> {
        self.check_map("depth", depth)?;
        let (ax, ay) = self.rays(depth.dtype(), depth.device())?;
        Ok(Points {
            x: depth.broadcast_mul(&ax)?,
            y: depth.broadcast_mul(&ay)?,
            z: depth.clone(),
        })
    }

    /// Pixel coordinates `(u, v)` `(B, H, W)` of points `p`: `u = f·x/z + c`, `v = f·y/z + c`.
    ///
    /// # Errors
    /// Candle errors for mismatched shapes.
    pub fn project(&self, p: &Points) -> Result<(Tensor, Tensor)> {
        let (f, c) = (self.focal(), self.principal_point());
        let u = p.x.div(&p.z)?.affine(f, c)?;
        let v = p.y.div(&p.z)?.affine(f, c)?;
        Ok((u, v))
    }

    pub(crate) fn check_map(&self, what: &str, t: &Tensor) -> Result<()> {
        let s = self.size;
        let ok = t.rank() == 3
            && t.dim(1)? == s
            && t.dim(2)? == s
            && t.dim(0)? > 0
            && matches!(t.dtype(), DType::F32 | DType::F64);
        if !ok {
            return Err(Error::shape(what, format!("(B, {s}, {s}) f32 or f64"), t));
        }
        Ok(())
    }
}

/// The rotation matrices `(B, 3, 3)` = `Rz(rz)·Ry(ry)·Rx(rx)` of angles `(B, 3)` =
/// `(rx, ry, rz)` in radians (Unsup3D's `get_rotation_matrix`).
///
/// # Errors
/// [`Error::Shape`] for angles that are not `(B, 3)`.
pub fn rotation_matrix(angles: &Tensor) -> Result<Tensor> {
    let e = rotation_entries(angles)?;
    let b = angles.dim(0)?;
    let rows: Vec<Tensor> = e.iter().flatten().cloned().collect();
    Ok(Tensor::stack(&rows, 1)?.reshape((b, 3, 3))?)
}

/// The nine entries `R[i][j]`, each `(B,)`.
fn rotation_entries(angles: &Tensor) -> Result<[[Tensor; 3]; 3]> {
    if angles.rank() != 2 || angles.dim(1)? != 3 {
        return Err(Error::shape("rotation angles", "(B, 3) radians", angles));
    }
    let a = |i: usize| angles.narrow(1, i, 1).and_then(|t| t.squeeze(1));
    let (rx, ry, rz) = (a(0)?, a(1)?, a(2)?);
    let (sx, cx) = (rx.sin()?, rx.cos()?);
    let (sy, cy) = (ry.sin()?, ry.cos()?);
    let (sz, cz) = (rz.sin()?, rz.cos()?);
    let sysx = sy.mul(&sx)?;
    let sycx = sy.mul(&cx)?;
    Ok([
        [
            cz.mul(&cy)?,
            cz.mul(&sysx)?.sub(&sz.mul(&cx)?)?,
            cz.mul(&sycx)?.add(&sz.mul(&sx)?)?,
        ],
        [
            sz.mul(&cy)?,
            sz.mul(&sysx)?.add(&cz.mul(&cx)?)?,
            sz.mul(&sycx)?.sub(&cz.mul(&sx)?)?,
        ],
        [sy.neg()?, cy.mul(&sx)?, cy.mul(&cx)?],
    ])
}

/// The rigid transform of a view `(B, 6)`: rotation about the centre `(0, 0, centre)`, then
/// translation. Entries are kept as `(B, 1, 1)` tensors to broadcast over `(B, H, W)` maps.
#[derive(Debug, Clone)]
pub struct RigidTransform {
    r: [[Tensor; 3]; 3],
    t: [Tensor; 3],
    centre: f64,
}

impl RigidTransform {
    /// From a view `(B, 6)` = `(rx, ry, rz, tx, ty, tz)` (radians, world units) and the depth
    /// of the rotation centre.
    ///
    /// # Errors
    /// [`Error::Shape`] for a view that is not `(B, 6)`.
    pub fn from_view(view: &Tensor, centre: f64) -> Result<Self> {
        if view.rank() != 2 || view.dim(1)? != 6 {
            return Err(Error::shape(
                "view",
                "(B, 6) = 3 angles + 3 translations",
                view,
            ));
        }
        let b = view.dim(0)?;
        let r = rotation_entries(&view.narrow(1, 0, 3)?)?;
        let col = |t: &Tensor| t.reshape((b, 1, 1));
        let r = [
            [col(&r[0][0])?, col(&r[0][1])?, col(&r[0][2])?],
            [col(&r[1][0])?, col(&r[1][1])?, col(&r[1][2])?],
            [col(&r[2][0])?, col(&r[2][1])?, col(&r[2][2])?],
        ];
        let t = |i: usize| view.narrow(1, 3 + i, 1).and_then(|t| t.reshape((b, 1, 1)));
        Ok(Self {
            r,
            t: [t(0)?, t(1)?, t(2)?],
            centre,
        })
    }

    /// `M·(x, y, z)` for the 3×3 matrix `m` of `(B, 1, 1)` entries.
    fn mat_mul(m: &[[&Tensor; 3]; 3], x: &Tensor, y: &Tensor, z: &Tensor) -> Result<Points> {
        let row = |i: usize| -> Result<Tensor> {
            Ok(x.broadcast_mul(m[i][0])?
                .add(&y.broadcast_mul(m[i][1])?)?
                .add(&z.broadcast_mul(m[i][2])?)?)
        };
        Ok(Points {
            x: row(0)?,
            y: row(1)?,
            z: row(2)?,
        })
    }

    /// Canonical → view: `R·(P − o) + o + t`.
    ///
    /// # Errors
    /// Candle errors for mismatched shapes.
    pub fn apply(&self, p: &Points) -> Result<Points> {
        let r = &self.r;
        let m = [
            [&r[0][0], &r[0][1], &r[0][2]],
            [&r[1][0], &r[1][1], &r[1][2]],
            [&r[2][0], &r[2][1], &r[2][2]],
        ];
        let q = Self::mat_mul(&m, &p.x, &p.y, &p.z.affine(1.0, -self.centre)?)?;
        Ok(Points {
            x: q.x.broadcast_add(&self.t[0])?,
            y: q.y.broadcast_add(&self.t[1])?,
            z: q.z.broadcast_add(&self.t[2])?.affine(1.0, self.centre)?,
        })
    }

    /// View → canonical: `Rᵀ·(P − t − o) + o` (the inverse of [`Self::apply`]).
    ///
    /// # Errors
    /// Candle errors for mismatched shapes.
    pub fn apply_inverse(&self, p: &Points) -> Result<Points> {
        let r = &self.r;
        let m = [
            [&r[0][0], &r[1][0], &r[2][0]],
            [&r[0][1], &r[1][1], &r[2][1]],
            [&r[0][2], &r[1][2], &r[2][2]],
        ];
        let x = p.x.broadcast_sub(&self.t[0])?;
        let y = p.y.broadcast_sub(&self.t[1])?;
        let z = p.z.broadcast_sub(&self.t[2])?.affine(1.0, -self.centre)?;
        let q = Self::mat_mul(&m, &x, &y, &z)?;
        Ok(Points {
            z: q.z.affine(1.0, self.centre)?,
            ..q
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand_tensor;

    fn host_rotation(rx: f64, ry: f64, rz: f64) -> [[f64; 3]; 3] {
        let mx = [
            [1.0, 0.0, 0.0],
            [0.0, rx.cos(), -rx.sin()],
            [0.0, rx.sin(), rx.cos()],
        ];
        let my = [
            [ry.cos(), 0.0, ry.sin()],
            [0.0, 1.0, 0.0],
            [-ry.sin(), 0.0, ry.cos()],
        ];
        let mz = [
            [rz.cos(), -rz.sin(), 0.0],
            [rz.sin(), rz.cos(), 0.0],
            [0.0, 0.0, 1.0],
        ];
        let mul = |a: [[f64; 3]; 3], b: [[f64; 3]; 3]| {
            let mut c = [[0.0; 3]; 3];
            for i in 0..3 {
                for j in 0..3 {
                    c[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
                }
            }
            c
        };
        mul(mz, mul(my, mx))
    }

    #[test]
    fn rotation_is_rz_ry_rx() -> Result<()> {
        let angles = Tensor::new(&[[0.3f64, -0.7, 0.2], [-1.0, 0.5, 0.9]], &Device::Cpu)?;
        let r: Vec<Vec<Vec<f64>>> = rotation_matrix(&angles)?.to_vec3()?;
        for (k, a) in [[0.3, -0.7, 0.2], [-1.0, 0.5, 0.9]].iter().enumerate() {
            let want = host_rotation(a[0], a[1], a[2]);
            for i in 0..3 {
                for j in 0..3 {
                    assert!((r[k][i][j] - want[i][j]).abs() < 1e-14);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn inverse_transform_undoes_the_transform() -> Result<()> {
        let cam = Camera::new(5, 10.0, 0.9, 1.1)?;
        let depth = rand_tensor(&[2, 5, 5], 1)?.affine(0.2, 0.9)?;
        let p = cam.back_project(&depth)?;
        let view = rand_tensor(&[2, 6], 2)?.affine(1.0, -0.5)?;
        let tf = RigidTransform::from_view(&view, cam.rotation_centre())?;
        let back = tf.apply_inverse(&tf.apply(&p)?)?;
        for (a, b) in [(&back.x, &p.x), (&back.y, &p.y), (&back.z, &p.z)] {
            assert!(a.sub(b)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-14);
        }
        // Projection of the back-projected grid returns the pixel grid.
        let (u, v) = cam.project(&p)?;
        let u: Vec<Vec<Vec<f64>>> = u.to_vec3()?;
        let v: Vec<Vec<Vec<f64>>> = v.to_vec3()?;
        for row in 0..5 {
            for col in 0..5 {
                assert!((u[1][row][col] - col as f64).abs() < 1e-12);
                assert!((v[1][row][col] - row as f64).abs() < 1e-12);
            }
        }
        Ok(())
    }

    #[test]
    fn intrinsics_follow_unsup3d() -> Result<()> {
        let cam = Camera::new(64, 10.0, 0.9, 1.1)?;
        assert!((cam.focal() - 31.5 / (5f64).to_radians().tan()).abs() < 1e-12);
        assert_eq!(cam.principal_point(), 31.5);
        assert!((cam.rotation_centre() - 1.0).abs() < 1e-15);
        assert!(Camera::new(1, 10.0, 0.9, 1.1).is_err());
        assert!(Camera::new(8, 0.0, 0.9, 1.1).is_err());
        assert!(Camera::new(8, 10.0, 1.1, 0.9).is_err());
        Ok(())
    }
}
