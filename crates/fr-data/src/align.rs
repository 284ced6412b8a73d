//! Five-point face alignment as insightface does it (`insightface.utils.face_align.norm_crop`):
//! fit a similarity transform from the detected landmarks to the ArcFace template by least
//! squares (Umeyama 1991, as scikit-image's `SimilarityTransform.estimate`), then warp with
//! bilinear sampling and a black border (as `cv2.warpAffine(..., borderValue=0.0)`).
//!
//! Landmark order everywhere: left eye, right eye, nose tip, left mouth corner, right mouth
//! corner; coordinates `(x, y)` in pixels of the image they were detected on.
//!
//! Reference: S. Umeyama, "Least-squares estimation of transformation parameters between two
//! point patterns", IEEE TPAMI 13(4), 1991.
//!
//! ```
//! use fr_data::align::{align_face, ARCFACE_TEMPLATE_112};
//! use image::RgbImage;
//!
//! let crop = RgbImage::new(250, 250);
//! // Landmarks of a face twice the template's size, shifted by (20, 10).
//! let lmk = ARCFACE_TEMPLATE_112.map(|[x, y]| [2.0 * x + 20.0, 2.0 * y + 10.0]);
//! let face = align_face(&crop, lmk, 112)?; // 112×112 RGB, eyes at the template's positions
//! assert_eq!(face.dimensions(), (112, 112));
//! # Ok::<(), fr_data::Error>(())
//! ```

use image::{Rgb, RgbImage};
use nalgebra::{Matrix2, Vector2, SVD};

use crate::{Error, Result};

/// The ArcFace 5-point template for a 112×112 crop, `(x, y)` in pixels: left eye, right eye,
/// nose tip, left mouth corner, right mouth corner (insightface's `arcface_dst`, stored as f32
/// there too).
pub const ARCFACE_TEMPLATE_112: [[f32; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// Landmarks whose RMS distance to their centroid is below this many pixels are degenerate:
/// the fitted scale would blow up (or be undefined when the points coincide).
pub const MIN_LANDMARK_SPREAD: f64 = 1e-3;

/// The ArcFace template for a `size`×`size` crop, following insightface's `estimate_norm`:
///
/// - `size` a multiple of 112 (checked first, so 224, 448, 896 take this rule): the 112 template
///   scaled by `size / 112`;
/// - otherwise `size` a multiple of 128 (128, 256, 384, ...): the 112 template scaled by
///   `size / 128` and shifted right by `8 · size / 128` pixels, i.e. the 112 face centred in a
///   128 canvas, then scaled.
///
/// The arithmetic is f32, as numpy does it on the f32 template (`arcface_dst * ratio`, then
/// `+= diff_x`), so the coordinates are bit-identical to insightface's.
///
/// # Errors
/// [`Error::Config`] (key `size`) when `size` is 0 or a multiple of neither 112 nor 128
/// (insightface asserts there).
pub fn arcface_template(size: u32) -> Result<[[f32; 2]; 5]> {
    // Python computes the ratio and shift in f64; numpy rounds them to f32 to meet the template.
    let (ratio, diff_x) = if size > 0 && size.is_multiple_of(112) {
        ((f64::from(size) / 112.0) as f32, 0.0f32)
    } else if size > 0 && size.is_multiple_of(128) {
        let ratio = f64::from(size) / 128.0;
        (ratio as f32, (8.0 * ratio) as f32)
    } else {
        return Err(Error::Config {
            key: "size".into(),
            reason: format!("{size} is not a positive multiple of 112 or 128"),
        });
    };
    Ok(ARCFACE_TEMPLATE_112.map(|[x, y]| [x * ratio + diff_x, y * ratio]))
}

/// A 2×3 affine matrix `[[a, b, tx], [c, d, ty]]` mapping a source pixel coordinate `(x, y)` to
/// `(a·x + b·y + tx, c·x + d·y + ty)` in the destination: the layout of OpenCV's `M` and of the
/// top two rows of scikit-image's `params`. [`umeyama`] fills it with a similarity
/// (`a = d = s·cos θ`, `c = −b = s·sin θ`); [`warp_affine`] accepts any affine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    /// The rows of the matrix, pixels for the translation column.
    pub matrix: [[f64; 3]; 2],
}

impl Similarity {
    /// The identity map.
    pub const IDENTITY: Self = Self {
        matrix: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    };

    /// `p ↦ scale · R(rotation) · p + (tx, ty)`, `rotation` in radians, counter-clockwise in a
    /// y-up frame (clockwise on screen, where y points down).
    pub fn new(scale: f64, rotation: f64, tx: f64, ty: f64) -> Self {
        let (sin, cos) = rotation.sin_cos();
        Self {
            matrix: [
                [scale * cos, -scale * sin, tx],
                [scale * sin, scale * cos, ty],
            ],
        }
    }

    /// The image of `p = (x, y)`.
    pub fn apply(&self, p: [f64; 2]) -> [f64; 2] {
        let m = &self.matrix;
        [
            m[0][0] * p[0] + m[0][1] * p[1] + m[0][2],
            m[1][0] * p[0] + m[1][1] * p[1] + m[1][2],
        ]
    }

    /// Scale factor of a similarity, `√(a² + c²)`.
    pub fn scale(&self) -> f64 {
        self.matrix[0][0].hypot(self.matrix[1][0])
    }

    /// Rotation angle of a similarity in radians, `atan2(c, a)` (scikit-image's `rotation`).
    pub fn rotation(&self) -> f64 {
        self.matrix[1][0].atan2(self.matrix[0][0])
    }

    /// `true` when every entry is finite ([`umeyama`] returns NaNs for coincident points).
    pub fn is_finite(&self) -> bool {
        self.matrix.iter().flatten().all(|v| v.is_finite())
    }

    /// The inverse affine map, or `None` when the 2×2 part is singular.
    pub fn inverse(&self) -> Option<Self> {
        let [[a, b, tx], [c, d, ty]] = self.matrix;
        let det = a * d - b * c;
        if det == 0.0 || !det.is_finite() {
            return None;
        }
        let (ia, ib, ic, id) = (d / det, -b / det, -c / det, a / det);
        Some(Self {
            matrix: [
                [ia, ib, -(ia * tx + ib * ty)],
                [ic, id, -(ic * tx + id * ty)],
            ],
        })
    }
}

/// Least-squares similarity transform taking `src` onto `dst` (Umeyama 1991), computed as
/// scikit-image's `_umeyama` does for 2-D points:
///
/// 1. demean both point sets; `A = dstᵀ·src / n` (2×2 cross-covariance, eq. 38);
/// 2. `d = (1, 1)`, or `(1, −1)` when `det A < 0` (eq. 39): the reflection correction, so the
///    result is a proper rotation even when the best orthogonal fit is a mirror;
/// 3. `A = U·S·Vᵀ` (nalgebra SVD, singular values sorted descending); rank by numpy's rule
///    (`S > S_max · 2 · ε`): rank 0 (all points coincide) gives a matrix of NaNs; rank 1
///    (collinear points) takes `R = U·Vᵀ` if `det U · det V > 0`, else `U·diag(1, −1)·Vᵀ`;
///    full rank takes `R = U·diag(d)·Vᵀ` (eqs. 40, 43);
/// 4. with `estimate_scale`, `s = (S·d) / Σ var(src)` (population variance per axis, eqs. 41–42),
///    else `s = 1`; `t = mean(dst) − s·R·mean(src)`.
///
/// Everything is computed in f64. (insightface passes f32 landmarks, so its numpy arithmetic is
/// partly f32; the two agree to about 1e-5 pixels, far below a warp's resolution.)
///
/// # Panics
/// When `src` and `dst` differ in length or are empty.
pub fn umeyama(src: &[[f64; 2]], dst: &[[f64; 2]], estimate_scale: bool) -> Similarity {
    assert_eq!(
        src.len(),
        dst.len(),
        "umeyama: src and dst differ in length"
    );
    assert!(!src.is_empty(), "umeyama: no points");
    let n = src.len() as f64;
    let mean = |pts: &[[f64; 2]]| {
        let s = pts
            .iter()
            .fold([0.0, 0.0], |a, p| [a[0] + p[0], a[1] + p[1]]);
        Vector2::new(s[0] / n, s[1] / n)
    };
    let (src_mean, dst_mean) = (mean(src), mean(dst));
    let mut a = Matrix2::zeros();
    let mut src_var = 0.0;
    for (s, d) in src.iter().zip(dst) {
        let sd = Vector2::new(s[0], s[1]) - src_mean;
        let dd = Vector2::new(d[0], d[1]) - dst_mean;
        a += dd * sd.transpose();
        src_var += sd.norm_squared();
    }
    a /= n;
    src_var /= n;

    let mut d = Vector2::new(1.0, 1.0);
    if a.determinant() < 0.0 {
        d[1] = -1.0;
    }
    let svd = SVD::new(a, true, true);
    let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
        unreachable!("SVD asked for U and Vᵀ");
    };
    let s = svd.singular_values;
    let tol = s.max() * 2.0 * f64::EPSILON;
    let rank = s.iter().filter(|&&v| v > tol).count();
    let rot = match rank {
        0 => {
            return Similarity {
                matrix: [[f64::NAN; 3]; 2],
            }
        }
        1 if u.determinant() * v_t.determinant() > 0.0 => u * v_t,
        1 => u * Matrix2::from_diagonal(&Vector2::new(d[0], -1.0)) * v_t,
        _ => u * Matrix2::from_diagonal(&d) * v_t,
    };
    let scale = if estimate_scale {
        s.dot(&d) / src_var
    } else {
        1.0
    };
    let t = dst_mean - scale * (rot * src_mean);
    let r = rot * scale;
    Similarity {
        matrix: [[r[(0, 0)], r[(0, 1)], t[0]], [r[(1, 0)], r[(1, 1)], t[1]]],
    }
}

/// Warp `image` by `m` (source → destination coordinates) into an `out_w`×`out_h` image, as
/// `cv2.warpAffine(image, m, (out_w, out_h), flags=INTER_LINEAR, borderValue=0)`:
///
/// - inverse mapping: output pixel `(x, y)` samples the source at `m⁻¹·(x, y)`;
/// - OpenCV's pixel-centre convention: integer coordinates are pixel centres, no half-pixel
///   offset (output pixel `(0, 0)` samples exactly `m⁻¹·(0, 0)`);
/// - bilinear interpolation of the four neighbours, each neighbour outside the source counting
///   as 0 (`BORDER_CONSTANT` with value 0), so pixels mapping more than one pixel outside are
///   black and edge pixels blend towards black;
/// - rounded to the nearest u8.
///
/// OpenCV quantises the source coordinate to 1/32 pixel and the weights to 15-bit fixed point;
/// this evaluates in f64, so results can differ from OpenCV's by one grey level.
/// A singular `m` maps every output pixel to the source origin, as OpenCV's inversion does
/// (it replaces the inverse determinant by 0).
pub fn warp_affine(image: &RgbImage, m: &Similarity, out_w: u32, out_h: u32) -> RgbImage {
    let inv = m.inverse().unwrap_or(Similarity {
        matrix: [[0.0; 3]; 2],
    });
    let (w, h) = (i64::from(image.width()), i64::from(image.height()));
    let texel = |x: i64, y: i64| -> [f64; 3] {
        if x < 0 || y < 0 || x >= w || y >= h {
            [0.0; 3]
        } else {
            image.get_pixel(x as u32, y as u32).0.map(f64::from)
        }
    };
    let mut out = RgbImage::new(out_w, out_h);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let [sx, sy] = inv.apply([f64::from(x), f64::from(y)]);
        if !(sx.is_finite() && sy.is_finite()) || sx <= -1.0 || sy <= -1.0 {
            continue;
        }
        let (x0, y0) = (sx.floor(), sy.floor());
        if x0 >= w as f64 || y0 >= h as f64 {
            continue;
        }
        let (fx, fy) = (sx - x0, sy - y0);
        let (x0, y0) = (x0 as i64, y0 as i64);
        let (p00, p10) = (texel(x0, y0), texel(x0 + 1, y0));
        let (p01, p11) = (texel(x0, y0 + 1), texel(x0 + 1, y0 + 1));
        let mut v = [0u8; 3];
        for c in 0..3 {
            let top = p00[c] + (p10[c] - p00[c]) * fx;
            let bottom = p01[c] + (p11[c] - p01[c]) * fx;
            v[c] = (top + (bottom - top) * fy).round().clamp(0.0, 255.0) as u8;
        }
        *px = Rgb(v);
    }
    out
}

/// The similarity taking `landmarks` onto the ArcFace template for a `size`×`size` crop
/// (insightface's `estimate_norm`), after checking the landmarks.
///
/// # Errors
/// [`Error::Config`] with key `landmarks` for a non-finite coordinate or degenerate landmarks
/// (RMS spread below [`MIN_LANDMARK_SPREAD`] pixels, or a non-finite fit); key `size` as
/// [`arcface_template`].
pub fn estimate_norm(landmarks: [[f32; 2]; 5], size: u32) -> Result<Similarity> {
    let template = arcface_template(size)?;
    let bad = |reason: String| Error::Config {
        key: "landmarks".into(),
        reason,
    };
    for (i, p) in landmarks.iter().enumerate() {
        if !(p[0].is_finite() && p[1].is_finite()) {
            return Err(bad(format!(
                "point {i} is not finite: ({}, {})",
                p[0], p[1]
            )));
        }
    }
    let src = landmarks.map(|[x, y]| [f64::from(x), f64::from(y)]);
    let dst = template.map(|[x, y]| [f64::from(x), f64::from(y)]);
    let c = src
        .iter()
        .fold([0.0, 0.0], |a, p| [a[0] + p[0] / 5.0, a[1] + p[1] / 5.0]);
    let spread = (src
        .iter()
        .map(|p| (p[0] - c[0]).powi(2) + (p[1] - c[1]).powi(2))
        .sum::<f64>()
        / 5.0)
        .sqrt();
    if spread < MIN_LANDMARK_SPREAD {
        return Err(bad(format!(
            "degenerate: the five points (nearly) coincide (RMS spread {spread:.3e} px around ({:.3}, {:.3}))",
            c[0], c[1]
        )));
    }
    let m = umeyama(&src, &dst, true);
    if !m.is_finite() || m.inverse().is_none() {
        return Err(bad(format!(
            "degenerate: no finite similarity fits {src:?}"
        )));
    }
    Ok(m)
}

/// Align a face to a `size`×`size` crop (112 for every insightface model): fit
/// [`estimate_norm`] and [`warp_affine`] with a black border, as insightface's `norm_crop`.
/// The colour order is the input's (insightface reads BGR with OpenCV, warps, then converts to
/// RGB; warping an RGB image gives the same pixels).
///
/// `landmarks`: left eye, right eye, nose, left mouth, right mouth, `(x, y)` pixels of `image`.
///
/// # Errors
/// As [`estimate_norm`]: non-finite or degenerate landmarks, or an unsupported `size`.
pub fn align_face(image: &RgbImage, landmarks: [[f32; 2]; 5], size: u32) -> Result<RgbImage> {
    let m = estimate_norm(landmarks, size)?;
    Ok(warp_affine(image, &m, size, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-6;

    fn template_f64() -> [[f64; 2]; 5] {
        ARCFACE_TEMPLATE_112.map(|[x, y]| [f64::from(x), f64::from(y)])
    }

    fn max_err(a: &Similarity, b: &[[f64; 3]; 2]) -> f64 {
        a.matrix
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn assert_matrix(got: &Similarity, want: [[f64; 3]; 2], what: &str) {
        let err = max_err(got, &want);
        eprintln!("{what}: max error {err:e}");
        assert!(
            err < TOL,
            "{what}: max error {err:e}\n got {got:?}\nwant {want:?}"
        );
    }

    #[test]
    fn template_sizes_follow_estimate_norm() {
        assert_eq!(arcface_template(112).unwrap(), ARCFACE_TEMPLATE_112);
        let t224 = arcface_template(224).unwrap();
        let t128 = arcface_template(128).unwrap();
        let t256 = arcface_template(256).unwrap();
        for i in 0..5 {
            let [x, y] = ARCFACE_TEMPLATE_112[i];
            assert_eq!(t224[i], [x * 2.0, y * 2.0]);
            // 128: ratio 1, shifted right by 8.
            assert_eq!(t128[i], [x + 8.0, y]);
            // 256 is not a multiple of 112: ratio 2, shift 16.
            assert_eq!(t256[i], [x * 2.0 + 16.0, y * 2.0]);
        }
        // 896 is a multiple of both: the 112 rule wins (it is checked first).
        assert_eq!(
            arcface_template(896).unwrap()[0],
            [38.2946 * 8.0, 51.6963 * 8.0]
        );
        for bad in [0, 100, 120, 160] {
            let err = arcface_template(bad).unwrap_err().to_string();
            assert!(
                err.contains("size") && err.contains(&bad.to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn pure_rotation() {
        let src = template_f64();
        let theta = 30f64.to_radians();
        let (s, c) = (0.5, 3f64.sqrt() / 2.0);
        let dst = src.map(|[x, y]| [c * x - s * y, s * x + c * y]);
        let m = umeyama(&src, &dst, true);
        assert_matrix(&m, [[c, -s, 0.0], [s, c, 0.0]], "rotation 30°");
        assert!((m.rotation() - theta).abs() < TOL);
        assert!((m.scale() - 1.0).abs() < TOL);
        // Without scale estimation a rigid motion is recovered just the same.
        assert_matrix(
            &umeyama(&src, &dst, false),
            [[c, -s, 0.0], [s, c, 0.0]],
            "rotation 30°, no scale",
        );
    }

    #[test]
    fn scale_and_translation() {
        let src = template_f64();
        let dst = src.map(|[x, y]| [2.5 * x + 3.0, 2.5 * y - 7.0]);
        let m = umeyama(&src, &dst, true);
        assert_matrix(
            &m,
            [[2.5, 0.0, 3.0], [0.0, 2.5, -7.0]],
            "scale 2.5 + (3, -7)",
        );
        // With the scale fixed to 1 the best rigid fit maps the centroids onto each other.
        let n = src.len() as f64;
        let (mx, my) = (
            src.iter().map(|p| p[0]).sum::<f64>() / n,
            src.iter().map(|p| p[1]).sum::<f64>() / n,
        );
        let m1 = umeyama(&src, &dst, false);
        assert_matrix(
            &m1,
            [[1.0, 0.0, 1.5 * mx + 3.0], [0.0, 1.0, 1.5 * my - 7.0]],
            "scale fixed to 1",
        );
    }

    #[test]
    fn reflection_is_corrected_to_a_rotation() {
        // src: (±2, 0), (0, ±1), (0, 0) shifted by (10, 20); dst mirrors x. Cross-covariance
        // A = diag(−1.6, 0.4): det < 0, so d = (1, −1), R = −I (a rotation by 180°, not the
        // mirror) and s = (1.6 − 0.4) / (1.6 + 0.4) = 0.6; t = (−10, 20) − 0.6·(−I)·(10, 20).
        let base = [[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, 0.0]];
        let src = base.map(|[x, y]| [x + 10.0, y + 20.0]);
        let dst = src.map(|[x, y]| [-x, y]);
        let m = umeyama(&src, &dst, true);
        assert_matrix(&m, [[-0.6, 0.0, -4.0], [0.0, -0.6, 32.0]], "reflection");
        let m1 = umeyama(&src, &dst, false);
        assert_matrix(
            &m1,
            [[-1.0, 0.0, 0.0], [0.0, -1.0, 40.0]],
            "reflection, no scale",
        );
        let det = m.matrix[0][0] * m.matrix[1][1] - m.matrix[0][1] * m.matrix[1][0];
        assert!(det > 0.0, "a proper rotation, det {det}");
    }

    #[test]
    fn recovers_a_known_similarity() {
        let truth = Similarity::new(0.37, -1.1, 55.5, -12.25);
        let src = [
            [10.0, 3.0],
            [-4.5, 7.25],
            [0.5, -9.0],
            [13.0, 11.0],
            [-6.0, -2.0],
        ];
        let dst = src.map(|p| truth.apply(p));
        let m = umeyama(&src, &dst, true);
        assert_matrix(&m, truth.matrix, "known similarity");
        assert!((m.scale() - 0.37).abs() < TOL && (m.rotation() + 1.1).abs() < TOL);
        // And the inverse direction gives the inverse map.
        let back = umeyama(&dst, &src, true);
        assert_matrix(&back, truth.inverse().unwrap().matrix, "inverse similarity");
    }

    #[test]
    fn template_onto_itself_is_identity() {
        for size in [112, 128, 224] {
            let t = arcface_template(size).unwrap();
            let m = estimate_norm(t, size).unwrap();
            assert_matrix(&m, Similarity::IDENTITY.matrix, &format!("template {size}"));
        }
        // The 112 landmarks onto the 128 template: the +8 shift of estimate_norm.
        let m = estimate_norm(ARCFACE_TEMPLATE_112, 128).unwrap();
        assert_matrix(&m, [[1.0, 0.0, 8.0], [0.0, 1.0, 0.0]], "112 → 128");
    }

    #[test]
    fn collinear_points_take_the_rank_one_branch() {
        // Points on a line: A has rank 1; the fit still maps each point exactly.
        let src = [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]];
        let truth = Similarity::new(1.5, 0.4, -2.0, 5.0);
        let dst = src.map(|p| truth.apply(p));
        let m = umeyama(&src, &dst, true);
        for (s, d) in src.iter().zip(&dst) {
            let p = m.apply(*s);
            assert!(
                (p[0] - d[0]).abs() < TOL && (p[1] - d[1]).abs() < TOL,
                "{p:?} vs {d:?}"
            );
        }
        assert!((m.scale() - 1.5).abs() < TOL);
    }

    #[test]
    fn degenerate_landmarks_are_errors() {
        assert!(!umeyama(&[[3.0, 4.0]; 5], &template_f64(), true).is_finite());
        let err = estimate_norm([[3.0, 4.0]; 5], 112).unwrap_err().to_string();
        assert!(
            err.contains("landmarks") && err.contains("degenerate"),
            "{err}"
        );
        let mut lmk = ARCFACE_TEMPLATE_112;
        lmk[2][1] = f32::NAN;
        let err = align_face(&RgbImage::new(8, 8), lmk, 112)
            .unwrap_err()
            .to_string();
        assert!(err.contains("point 2") && err.contains("NaN"), "{err}");
        lmk[2][1] = f32::INFINITY;
        assert!(estimate_norm(lmk, 112).is_err());
        let err = estimate_norm(ARCFACE_TEMPLATE_112, 100)
            .unwrap_err()
            .to_string();
        assert!(err.contains("size"), "{err}");
    }

    /// A 60×50 source where R = x + 2y, G = 3x + y, B = 200 − 2x: bilinear interpolation of a
    /// linear function is exact, so the warp's interior is known in closed form.
    fn linear_image() -> RgbImage {
        RgbImage::from_fn(60, 50, |x, y| {
            let (x, y) = (x as f64, y as f64);
            Rgb([
                (x + 2.0 * y) as u8,
                (3.0 * x + y) as u8,
                (200.0 - 2.0 * x) as u8,
            ])
        })
    }

    #[test]
    fn warp_matches_direct_evaluation() {
        let src = linear_image();
        // Source → destination: scale 1.3, rotation 0.35 rad, translation (4, −6).
        let m = Similarity::new(1.3, 0.35, 4.0, -6.0);
        let inv = m.inverse().unwrap();
        let out = warp_affine(&src, &m, 70, 64);
        let (mut interior, mut border, mut worst) = (0, 0, 0.0f64);
        for (x, y, px) in out.enumerate_pixels() {
            let [sx, sy] = inv.apply([f64::from(x), f64::from(y)]);
            if (0.0..=59.0).contains(&sx) && (0.0..=49.0).contains(&sy) {
                let want = [sx + 2.0 * sy, 3.0 * sx + sy, 200.0 - 2.0 * sx];
                for (c, (&got, &want)) in px.0.iter().zip(&want).enumerate() {
                    let err = (f64::from(got) - want).abs();
                    worst = worst.max(err);
                    assert!(err <= 0.5 + 1e-9, "({x}, {y}) c{c}: {got} vs {want}");
                }
                interior += 1;
            } else if sx <= -1.0 || sy <= -1.0 || sx >= 60.0 || sy >= 50.0 {
                assert_eq!(px.0, [0, 0, 0], "({x}, {y}) maps outside to ({sx}, {sy})");
                border += 1;
            }
        }
        assert!(
            interior > 1000 && border > 300,
            "{interior} interior, {border} border"
        );
        assert!(worst <= 0.5, "worst rounding error {worst}");
    }

    #[test]
    fn warp_pixel_centres_and_border_blend() {
        let src = linear_image();
        // Identity and integer shifts reproduce pixels exactly.
        assert_eq!(warp_affine(&src, &Similarity::IDENTITY, 60, 50), src);
        let shifted = warp_affine(&src, &Similarity::new(1.0, 0.0, 3.0, 2.0), 60, 50);
        assert_eq!(shifted.get_pixel(3, 2), src.get_pixel(0, 0));
        assert_eq!(shifted.get_pixel(59, 49), src.get_pixel(56, 47));
        assert_eq!(shifted.get_pixel(2, 10).0, [0, 0, 0]);
        // Half-pixel shift: OpenCV's convention (integer coordinates are pixel centres) makes
        // output x sample source x − 0.5, the mean of two neighbours.
        let half = warp_affine(&src, &Similarity::new(1.0, 0.0, 0.5, 0.0), 60, 50);
        // R = x + 2y at (9.5, 7) = 23.5 → 24 (round half away from zero).
        assert_eq!(half.get_pixel(10, 7).0[0], 24);
        // Output x = 0 samples x = −0.5: half of pixel 0 blended with the black border.
        let p = src.get_pixel(0, 7).0;
        let want = p.map(|v| (f64::from(v) / 2.0).round() as u8);
        assert_eq!(half.get_pixel(0, 7).0, want);
    }

    #[test]
    fn align_recovers_a_face_warped_by_a_known_similarity() {
        // An "aligned face": a smooth pattern with bright spots at the template points.
        let face = RgbImage::from_fn(112, 112, |x, y| {
            let (xf, yf) = (f64::from(x), f64::from(y));
            let mut v = [60.0 + xf, 40.0 + yf, 120.0];
            for [tx, ty] in template_f64() {
                let g = (-((xf - tx).powi(2) + (yf - ty).powi(2)) / 18.0).exp();
                v[2] += 120.0 * g;
            }
            Rgb(v.map(|c| c.round().clamp(0.0, 255.0) as u8))
        });
        // Place it in a 320×300 loose crop, 1.8× larger, rotated by 0.3 rad, shifted.
        let place = Similarity::new(1.8, 0.3, 90.0, 20.0);
        let crop = warp_affine(&face, &place, 320, 300);
        let lmk = ARCFACE_TEMPLATE_112.map(|[x, y]| {
            let p = place.apply([f64::from(x), f64::from(y)]);
            [p[0] as f32, p[1] as f32]
        });
        // f32 landmarks (as insightface passes them) limit the recovery to about 1e-5.
        let m = estimate_norm(lmk, 112).unwrap();
        let err = max_err(&m, &place.inverse().unwrap().matrix);
        eprintln!("estimate_norm from f32 landmarks: max error {err:e}");
        assert!(err < 1e-4, "estimate_norm: max error {err:e}");
        let back = align_face(&crop, lmk, 112).unwrap();
        // Interior pixels survive two bilinear resamplings within a few grey levels.
        let mut sum = 0.0;
        let mut n = 0.0;
        for y in 4..108 {
            for x in 4..108 {
                for c in 0..3 {
                    let d =
                        f64::from(back.get_pixel(x, y).0[c]) - f64::from(face.get_pixel(x, y).0[c]);
                    sum += d.abs();
                    n += 1.0;
                }
            }
        }
        eprintln!(
            "align_face round trip: mean |Δ| {:.3} over the interior",
            sum / n
        );
        assert!(sum / n < 1.5, "mean abs difference {}", sum / n);
    }
}
