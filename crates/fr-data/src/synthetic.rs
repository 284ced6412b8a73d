//! Synthetic identities: deterministic, procedurally rendered face-like RGB images.
//!
//! Each identity is a set of facial parameters (head shape, skin, hair line and colour, eye
//! spacing and colour, brows, nose, mouth, moles, beard, glasses). Each image renders that
//! identity as a textured ellipsoid under its own nuisances: pose (yaw, pitch, roll), scale and
//! translation, Lambertian lighting with a random direction and colour cast, a cluttered
//! background, expression, blur and sensor noise. Nuisances dominate the pixel distance, so
//! raw pixels verify poorly while the identity stays recoverable from the face itself.
//!
//! Every image records a [`Quality`] level:
//! - [`Quality::Normal`]: moderate pose (|yaw| ≤ 25°), sharp;
//! - [`Quality::HighQualityHard`]: large pose (35° ≤ |yaw| ≤ 60°), sharp: the "hard
//!   high-quality" faces LH2Face targets;
//! - [`Quality::LowQuality`]: moderate pose, strong blur, down-sampling and noise.
//!
//! Everything is a pure function of `(seed, identity, image)`, so datasets need no storage, render
//! in parallel, and are identical on every machine. Train and test sets use disjoint identities
//! ([`SyntheticConfig::first_identity`]).

use std::f32::consts::PI;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::dataset::{FaceDataset, Quality};
use crate::error::{Error, Result};

/// Size and mix of a synthetic identity set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Number of identities (classes).
    pub num_identities: usize,
    /// Images per identity.
    pub images_per_identity: usize,
    /// Global identity number of class 0; train and test sets use disjoint ranges.
    pub first_identity: u64,
    /// Master seed: the same seed renders the same pixels.
    pub seed: u64,
    /// Output side in pixels (square); 112 is the insightface crop.
    pub image_size: u32,
    /// Fraction of images rendered at large pose and sharp ([`Quality::HighQualityHard`]).
    pub hard_fraction: f32,
    /// Fraction of images rendered blurred and noisy ([`Quality::LowQuality`]).
    pub low_quality_fraction: f32,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            num_identities: 200,
            images_per_identity: 20,
            first_identity: 0,
            seed: 42,
            image_size: 112,
            hard_fraction: 0.2,
            low_quality_fraction: 0.2,
        }
    }
}

impl SyntheticConfig {
    /// Check the values.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key: zero sizes, fractions outside [0, 1] or summing above 1.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: &str| {
            Err(Error::Config {
                key: format!("synthetic.{key}"),
                reason: reason.to_string(),
            })
        };
        if self.num_identities == 0 {
            return bad("num_identities", "must be at least 1");
        }
        if self.images_per_identity == 0 {
            return bad("images_per_identity", "must be at least 1");
        }
        if self.image_size < 16 {
            return bad("image_size", "must be at least 16 pixels");
        }
        for (key, f) in [
            ("hard_fraction", self.hard_fraction),
            ("low_quality_fraction", self.low_quality_fraction),
        ] {
            if !(0.0..=1.0).contains(&f) {
                return bad(key, "must be in [0, 1]");
            }
        }
        if self.hard_fraction + self.low_quality_fraction > 1.0 {
            return bad(
                "hard_fraction",
                "hard_fraction + low_quality_fraction must not exceed 1",
            );
        }
        Ok(())
    }
}

/// The identity-defining parameters, in face coordinates (u, v) ∈ [−1, 1]² (v points down).
#[derive(Debug, Clone)]
struct Identity {
    radii: [f32; 3],
    skin: [f32; 3],
    hair: [f32; 3],
    hairline: f32,
    hair_wave: (f32, f32, f32),
    side_hair: f32,
    eye_dx: f32,
    eye_y: f32,
    eye_r: (f32, f32),
    iris: [f32; 3],
    brow: (f32, f32, f32),
    nose: (f32, f32),
    mouth: (f32, f32, f32),
    lip: [f32; 3],
    moles: Vec<(f32, f32, f32)>,
    beard: Option<f32>,
    glasses: Option<[f32; 3]>,
}

fn mix_seed(seed: u64, a: u64, b: u64) -> u64 {
    // SplitMix64 finaliser over the three inputs: independent streams per (seed, a, b).
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(a.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(b.wrapping_mul(0x94D0_49BB_1331_11EB))
        .wrapping_add(0x2545_F491_4F6C_DD1D);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(1.0) * 6.0;
    let i = h.floor();
    let f = h - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i as i32 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

impl Identity {
    fn sample(rng: &mut ChaCha8Rng) -> Self {
        let skin_v = rng.random_range(0.35..0.95f32);
        let skin = hsv(
            rng.random_range(0.02..0.11),
            rng.random_range(0.25..0.6),
            skin_v,
        );
        let hair = hsv(
            rng.random_range(0.0..1.0),
            rng.random_range(0.0..0.8),
            rng.random_range(0.05..0.9),
        );
        let n_moles = rng.random_range(0..3usize);
        let moles = (0..n_moles)
            .map(|_| {
                (
                    rng.random_range(-0.6..0.6f32),
                    rng.random_range(-0.2..0.7f32),
                    rng.random_range(0.03..0.07f32),
                )
            })
            .collect();
        Self {
            radii: [
                rng.random_range(0.30..0.40f32),
                rng.random_range(0.40..0.50f32),
                rng.random_range(0.28..0.38f32),
            ],
            skin,
            hair,
            hairline: rng.random_range(-0.85..-0.45f32),
            hair_wave: (
                rng.random_range(0.0..0.15f32),
                rng.random_range(2.0..7.0f32),
                rng.random_range(0.0..2.0 * PI),
            ),
            side_hair: rng.random_range(0.0..0.6f32),
            eye_dx: rng.random_range(0.28..0.45f32),
            eye_y: rng.random_range(-0.25..-0.02f32),
            eye_r: (
                rng.random_range(0.10..0.17f32),
                rng.random_range(0.05..0.10f32),
            ),
            iris: hsv(
                rng.random_range(0.0..1.0),
                rng.random_range(0.3..0.9),
                rng.random_range(0.2..0.7),
            ),
            brow: (
                rng.random_range(0.12..0.22f32),
                rng.random_range(0.025..0.07f32),
                rng.random_range(-0.35..0.35f32),
            ),
            nose: (
                rng.random_range(0.2..0.42f32),
                rng.random_range(0.07..0.16f32),
            ),
            mouth: (
                rng.random_range(0.4..0.62f32),
                rng.random_range(0.18..0.36f32),
                rng.random_range(0.04..0.09f32),
            ),
            lip: hsv(
                rng.random_range(-0.05..0.03),
                rng.random_range(0.3..0.7),
                rng.random_range(0.35..0.8),
            ),
            moles,
            beard: if rng.random_bool(0.25) {
                Some(rng.random_range(0.25..0.6f32))
            } else {
                None
            },
            glasses: if rng.random_bool(0.2) {
                Some(hsv(
                    rng.random_range(0.0..1.0),
                    0.5,
                    rng.random_range(0.05..0.6),
                ))
            } else {
                None
            },
        }
    }

    /// Albedo at face-frame point (u, v) on the front (w ≥ 0) or back of the head.
    fn albedo(&self, u: f32, v: f32, w: f32, view: &View) -> [f32; 3] {
        let (wave_amp, wave_freq, wave_phase) = self.hair_wave;
        let hairline = self.hairline + wave_amp * (wave_freq * u + wave_phase).sin();
        let side = u.abs() > 0.93 - 0.25 * self.side_hair && v < 0.1 + 0.4 * self.side_hair;
        if w < 0.05 || v < hairline || side {
            return self.hair;
        }
        for &(mu, mv, mr) in &self.moles {
            if (u - mu).powi(2) + (v - mv).powi(2) < mr * mr {
                return scale(self.skin, 0.35);
            }
        }
        for sign in [-1.0f32, 1.0] {
            let ex = sign * self.eye_dx;
            // Glasses: a ring around each eye and a bridge.
            if let Some(frame) = self.glasses {
                let r = ((u - ex).powi(2) + ((v - self.eye_y) * 1.3).powi(2)).sqrt();
                if (r - 0.2).abs() < 0.025 {
                    return frame;
                }
                if u.abs() < self.eye_dx - 0.2 && (v - self.eye_y + 0.03).abs() < 0.02 {
                    return frame;
                }
            }
            // Brow: a tilted thick segment above the eye.
            let (brow_len, brow_thick, brow_tilt) = self.brow;
            let by = self.eye_y - self.eye_r.1 - 0.09;
            let du = (u - ex) * sign;
            let dv = v - by + brow_tilt * du;
            if du.abs() < brow_len && dv.abs() < brow_thick {
                return scale(self.hair, 0.8);
            }
            // Eye: sclera, iris, pupil; gaze shifts with the view.
            let (erx, ery) = self.eye_r;
            let open = view.eye_open;
            let ey = (v - self.eye_y) / (ery * open);
            let eu = (u - ex) / erx;
            if eu * eu + ey * ey < 1.0 {
                let gu = u - ex - view.gaze * erx * 0.4;
                let gv = v - self.eye_y;
                let ir = (gu * gu + gv * gv).sqrt();
                if ir < 0.45 * ery.max(erx * 0.5) {
                    return [0.02, 0.02, 0.02];
                }
                if ir < ery.max(erx * 0.5) {
                    return self.iris;
                }
                return [0.92, 0.92, 0.9];
            }
        }
        // Nose: a shaded ridge and two nostrils.
        let (nose_len, nose_w) = self.nose;
        let ny0 = self.eye_y + 0.05;
        let ny1 = ny0 + nose_len;
        if v > ny0 && v < ny1 && (u - 0.04).abs() < 0.025 {
            return scale(self.skin, 0.75);
        }
        for sign in [-1.0f32, 1.0] {
            let du = (u - sign * nose_w * 0.6) / (nose_w * 0.45);
            let dv = (v - ny1) / 0.035;
            if du * du + dv * dv < 1.0 {
                return scale(self.skin, 0.3);
            }
        }
        // Mouth: lips, opened or smiling by expression.
        let (mouth_y, mouth_w, mouth_h) = self.mouth;
        let curve = view.smile * (u / mouth_w).powi(2) * 0.08;
        let mu = u / mouth_w;
        let mv = (v - mouth_y + curve) / (mouth_h * (1.0 + view.mouth_open));
        if mu * mu + mv * mv < 1.0 {
            if mv.abs() < 0.25 * view.mouth_open {
                return [0.1, 0.03, 0.03];
            }
            return self.lip;
        }
        if let Some(beard) = self.beard {
            if v > mouth_y - 0.12 && !(mu * mu + mv * mv < 2.0 && v < mouth_y) {
                return lerp(self.skin, self.hair, beard);
            }
        }
        self.skin
    }
}

/// The per-image nuisances.
#[derive(Debug, Clone)]
struct View {
    quality: Quality,
    yaw: f32,
    pitch: f32,
    roll: f32,
    scale: f32,
    shift: (f32, f32),
    light: [f32; 3],
    ambient: f32,
    diffuse: f32,
    cast: [f32; 3],
    background: ([f32; 3], [f32; 3], f32),
    blobs: Vec<(f32, f32, f32, [f32; 3])>,
    gaze: f32,
    eye_open: f32,
    smile: f32,
    mouth_open: f32,
    blur: f32,
    downsample: u32,
    noise: f32,
}

impl View {
    fn sample(rng: &mut ChaCha8Rng, quality: Quality) -> Self {
        let deg = PI / 180.0;
        let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
        let yaw = match quality {
            Quality::HighQualityHard => sign * rng.random_range(35.0..60.0f32) * deg,
            _ => rng.random_range(-25.0..25.0f32) * deg,
        };
        let light_az = rng.random_range(-1.2..1.2f32);
        let light_el = rng.random_range(-0.6..0.9f32);
        let blobs = (0..rng.random_range(0..6usize))
            .map(|_| {
                (
                    rng.random_range(0.0..1.0f32),
                    rng.random_range(0.0..1.0f32),
                    rng.random_range(0.05..0.25f32),
                    [rng.random(), rng.random(), rng.random()],
                )
            })
            .collect();
        let (blur, downsample, noise) = match quality {
            Quality::LowQuality => (
                rng.random_range(1.2..2.5f32),
                rng.random_range(2..4u32),
                rng.random_range(0.04..0.09f32),
            ),
            _ => (
                rng.random_range(0.0..0.6f32),
                1,
                rng.random_range(0.0..0.02f32),
            ),
        };
        Self {
            quality,
            yaw,
            pitch: rng.random_range(-15.0..15.0f32) * deg,
            roll: rng.random_range(-12.0..12.0f32) * deg,
            scale: rng.random_range(0.88..1.12f32),
            shift: (
                rng.random_range(-0.06..0.06f32),
                rng.random_range(-0.06..0.06f32),
            ),
            light: normalise3([
                light_az.sin() * light_el.cos(),
                -light_el.sin(),
                light_az.cos() * light_el.cos(),
            ]),
            ambient: rng.random_range(0.4..0.6f32),
            diffuse: rng.random_range(0.4..0.75f32),
            cast: [
                rng.random_range(0.94..1.06f32),
                rng.random_range(0.95..1.05f32),
                rng.random_range(0.94..1.06f32),
            ],
            background: (
                [rng.random(), rng.random(), rng.random()],
                [rng.random(), rng.random(), rng.random()],
                rng.random_range(0.0..2.0 * PI),
            ),
            blobs,
            gaze: rng.random_range(-1.0..1.0f32),
            eye_open: rng.random_range(0.6..1.1f32),
            smile: rng.random_range(-0.5..1.0f32),
            mouth_open: if rng.random_bool(0.3) {
                rng.random_range(0.2..0.8f32)
            } else {
                0.0
            },
            blur,
            downsample,
            noise,
        }
    }
}

fn scale(c: [f32; 3], k: f32) -> [f32; 3] {
    [c[0] * k, c[1] * k, c[2] * k]
}

fn lerp(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn normalise3(v: [f32; 3]) -> [f32; 3] {
    let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt().max(1e-12);
    [v[0] / n, v[1] / n, v[2] / n]
}

/// Rotation R = Rz(roll)·Ry(yaw)·Rx(pitch) mapping face-frame vectors to view vectors (row-major).
fn rotation(yaw: f32, pitch: f32, roll: f32) -> [[f32; 3]; 3] {
    let (sy, cy) = yaw.sin_cos();
    let (sp, cp) = pitch.sin_cos();
    let (sr, cr) = roll.sin_cos();
    let ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
    let rx = [[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]];
    let rz = [[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]];
    matmul3(rz, matmul3(ry, rx))
}

fn matmul3(a: [[f32; 3]; 3], b: [[f32; 3]; 3]) -> [[f32; 3]; 3] {
    let mut c = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            c[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    c
}

/// Render one identity under one view at `size`×`size`, before blur and noise.
fn render(id: &Identity, view: &View, size: u32) -> RgbImage {
    let r = rotation(view.yaw, view.pitch, view.roll);
    let (bg0, bg1, bg_angle) = view.background;
    let (ga, gb) = (bg_angle.cos(), bg_angle.sin());
    let [rx, ry, rz] = id.radii.map(|x| x * view.scale);
    let mut img = RgbImage::new(size, size);
    let s = size as f32;
    for py in 0..size {
        for px in 0..size {
            // View coordinates in [−0.5, 0.5], y down, viewer at +z.
            let x = (px as f32 + 0.5) / s - 0.5 - view.shift.0;
            let y = (py as f32 + 0.5) / s - 0.5 - view.shift.1;
            // Ray (x, y, t) in face frame: o + t·d, with Rᵀ.
            let o = [
                r[0][0] * x + r[1][0] * y,
                r[0][1] * x + r[1][1] * y,
                r[0][2] * x + r[1][2] * y,
            ];
            let d = [r[2][0], r[2][1], r[2][2]];
            let inv = [1.0 / (rx * rx), 1.0 / (ry * ry), 1.0 / (rz * rz)];
            let a: f32 = (0..3).map(|i| d[i] * d[i] * inv[i]).sum();
            let b: f32 = (0..3).map(|i| 2.0 * o[i] * d[i] * inv[i]).sum();
            let c: f32 = (0..3).map(|i| o[i] * o[i] * inv[i]).sum::<f32>() - 1.0;
            let disc = b * b - 4.0 * a * c;
            let colour = if disc >= 0.0 {
                let t = (-b + disc.sqrt()) / (2.0 * a);
                let p = [o[0] + t * d[0], o[1] + t * d[1], o[2] + t * d[2]];
                let (u, v, w) = (p[0] / rx, p[1] / ry, p[2] / rz);
                let albedo = id.albedo(u, v, w, view);
                let nf = normalise3([p[0] * inv[0], p[1] * inv[1], p[2] * inv[2]]);
                let nv = [
                    r[0][0] * nf[0] + r[0][1] * nf[1] + r[0][2] * nf[2],
                    r[1][0] * nf[0] + r[1][1] * nf[1] + r[1][2] * nf[2],
                    r[2][0] * nf[0] + r[2][1] * nf[1] + r[2][2] * nf[2],
                ];
                let lambert =
                    (nv[0] * view.light[0] + nv[1] * view.light[1] + nv[2] * view.light[2])
                        .max(0.0);
                let shade = view.ambient + view.diffuse * lambert;
                [
                    albedo[0] * shade * view.cast[0],
                    albedo[1] * shade * view.cast[1],
                    albedo[2] * shade * view.cast[2],
                ]
            } else if y > 0.25 * view.scale && x.abs() < 0.14 * view.scale {
                // Neck below the chin, in shadow.
                scale(id.skin, 0.5 * view.ambient + 0.3)
            } else {
                let fx = px as f32 / s;
                let fy = py as f32 / s;
                let mut col = lerp(
                    bg0,
                    bg1,
                    (ga * (fx - 0.5) + gb * (fy - 0.5) + 0.5).clamp(0.0, 1.0),
                );
                for &(bx, by, br, bc) in &view.blobs {
                    if (fx - bx).powi(2) + (fy - by).powi(2) < br * br {
                        col = bc;
                    }
                }
                col
            };
            img.put_pixel(
                px,
                py,
                Rgb(colour.map(|c| (c * 255.0).round().clamp(0.0, 255.0) as u8)),
            );
        }
    }
    img
}

/// A synthetic identity set implementing [`FaceDataset`]: image `i` shows identity
/// `i / images_per_identity` (its class id), rendered on demand.
#[derive(Debug, Clone)]
pub struct SyntheticFaces {
    config: SyntheticConfig,
    identities: Vec<Identity>,
}

impl SyntheticFaces {
    /// Build the identity set (cheap: identities are parameters; images render on demand).
    ///
    /// # Errors
    /// An invalid config ([`SyntheticConfig::validate`]).
    pub fn new(config: SyntheticConfig) -> Result<Self> {
        config.validate()?;
        let identities = (0..config.num_identities as u64)
            .map(|k| {
                let id = config.first_identity + k;
                Identity::sample(&mut ChaCha8Rng::seed_from_u64(mix_seed(config.seed, id, 0)))
            })
            .collect();
        Ok(Self { config, identities })
    }

    /// The configuration this set was built from.
    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    /// Quality level of image `index` (a pure function of seed and index; no rendering).
    fn quality_of(&self, index: usize) -> Quality {
        let (id, k) = self.split(index);
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(self.config.seed, id, 1 + k as u64));
        let q: f32 = rng.random();
        if q < self.config.hard_fraction {
            Quality::HighQualityHard
        } else if q < self.config.hard_fraction + self.config.low_quality_fraction {
            Quality::LowQuality
        } else {
            Quality::Normal
        }
    }

    fn split(&self, index: usize) -> (u64, usize) {
        let class = index / self.config.images_per_identity;
        (
            self.config.first_identity + class as u64,
            index % self.config.images_per_identity,
        )
    }

    fn check(&self, index: usize) -> Result<()> {
        if index >= self.len() {
            return Err(Error::OutOfRange {
                index,
                len: self.len(),
            });
        }
        Ok(())
    }

    /// Verification pairs over this set, for one quality subset: `n_pairs` pairs of dataset
    /// indices, half genuine and half impostor, interleaved (genuine first). With
    /// `subset = Some(q)` the first image of every pair has quality `q` and the second is any
    /// image of a different quality-class than low (for `HighQualityHard`) or any image (for the
    /// others); with `None` both images are drawn uniformly.
    ///
    /// # Errors
    /// [`Error::Config`] when the set has fewer than 2 identities or 2 images per identity,
    /// or no image of the requested quality.
    pub fn pairs(
        &self,
        n_pairs: usize,
        subset: Option<Quality>,
        seed: u64,
    ) -> Result<Vec<(usize, usize, bool)>> {
        let per = self.config.images_per_identity;
        let n_id = self.config.num_identities;
        if n_id < 2 || per < 2 {
            return Err(Error::Config {
                key: "synthetic".into(),
                reason: "pairs need at least 2 identities with 2 images each".into(),
            });
        }
        let quality: Vec<Quality> = (0..self.len()).map(|i| self.quality_of(i)).collect();
        let first: Vec<usize> = (0..self.len())
            .filter(|&i| subset.is_none_or(|q| quality[i] == q))
            .collect();
        if first.is_empty() {
            return Err(Error::Config {
                key: "synthetic".into(),
                reason: format!("no image of quality {subset:?} in the set"),
            });
        }
        // The partner of a hard pair is sharp (not low quality), so the subset isolates pose.
        let partner_ok = |j: usize| match subset {
            Some(Quality::HighQualityHard) => quality[j] != Quality::LowQuality,
            _ => true,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, 0xA11, 0xB22));
        let mut out = Vec::with_capacity(n_pairs);
        let mut attempts = 0usize;
        while out.len() < n_pairs {
            attempts += 1;
            if attempts > 1000 * n_pairs.max(1) {
                return Err(Error::Config {
                    key: "synthetic".into(),
                    reason: "could not draw enough pairs for this subset".into(),
                });
            }
            let genuine = out.len() % 2 == 0;
            let a = first[rng.random_range(0..first.len())];
            let class_a = a / per;
            let b = if genuine {
                let k = rng.random_range(0..per);
                class_a * per + k
            } else {
                let mut c = rng.random_range(0..n_id - 1);
                if c >= class_a {
                    c += 1;
                }
                c * per + rng.random_range(0..per)
            };
            if b == a || !partner_ok(b) {
                continue;
            }
            out.push((a, b, genuine));
        }
        Ok(out)
    }
}

/// Ground-truth geometry of one identity in its canonical view: frontal (no rotation), scale
/// 1, no shift — the view an Unsup3D-style reconstruction calls canonical. Row-major,
/// `size`×`size`, over the same field of view as the rendered images.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthMap {
    /// Side in pixels.
    pub size: usize,
    /// Per pixel, the distance along the (orthographic, +z-facing) viewing ray from the plane
    /// `z = r_z` that touches the head's nearest point, to the head's front surface: 0 at the
    /// nearest point, up to `r_z` at the silhouette (face-frame units, where the image spans
    /// 1). Nearer is smaller, as for a camera distance. 0 outside the mask.
    pub depth: Vec<f32>,
    /// Whether the pixel's ray hits the head (the face region).
    pub mask: Vec<bool>,
}

impl SyntheticFaces {
    /// The canonical depth map of identity `class` (0-based within this set) at
    /// `size`×`size`: the head is the ellipsoid `(x/r_x)² + (y/r_y)² + (z/r_z)² = 1` the
    /// renderer ray-traces (facial features are texture only), seen frontally, so a pixel at
    /// view coordinates `(x, y)` has depth `r_z − r_z·√(1 − (x/r_x)² − (y/r_y)²)`.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] for a class past the set's identities.
    pub fn canonical_depth(&self, class: usize, size: u32) -> Result<DepthMap> {
        let id = self.identities.get(class).ok_or(Error::OutOfRange {
            index: class,
            len: self.identities.len(),
        })?;
        let [rx, ry, rz] = id.radii;
        let n = size as usize;
        let s = size as f32;
        let (mut depth, mut mask) = (vec![0f32; n * n], vec![false; n * n]);
        for py in 0..n {
            for px in 0..n {
                // The renderer's pixel centres: view coordinates in [−0.5, 0.5], y down.
                let x = (px as f32 + 0.5) / s - 0.5;
                let y = (py as f32 + 0.5) / s - 0.5;
                let q = 1.0 - (x / rx).powi(2) - (y / ry).powi(2);
                if q >= 0.0 {
                    depth[py * n + px] = rz - rz * q.sqrt();
                    mask[py * n + px] = true;
                }
            }
        }
        Ok(DepthMap {
            size: n,
            depth,
            mask,
        })
    }
}

impl FaceDataset for SyntheticFaces {
    fn len(&self) -> usize {
        self.config.num_identities * self.config.images_per_identity
    }

    fn num_classes(&self) -> usize {
        self.config.num_identities
    }

    fn label(&self, index: usize) -> Result<u32> {
        self.check(index)?;
        Ok((index / self.config.images_per_identity) as u32)
    }

    fn image(&self, index: usize) -> Result<RgbImage> {
        self.check(index)?;
        let (id, k) = self.split(index);
        let quality = self.quality_of(index);
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(self.config.seed, id, 1 << 40 | k as u64));
        let view = View::sample(&mut rng, quality);
        let identity = &self.identities[index / self.config.images_per_identity];
        let size = self.config.image_size;
        let mut img = render(identity, &view, size);
        if view.downsample > 1 {
            let small = size / view.downsample;
            img =
                image::imageops::resize(&img, small, small, image::imageops::FilterType::Triangle);
            img = image::imageops::resize(&img, size, size, image::imageops::FilterType::Triangle);
        }
        if view.blur > 0.3 {
            img = image::imageops::blur(&img, view.blur);
        }
        if view.noise > 0.0 {
            let normal = Normal::new(0.0f32, view.noise * 255.0).expect("noise sigma is finite");
            for p in img.pixels_mut() {
                for c in p.0.iter_mut() {
                    *c = (*c as f32 + normal.sample(&mut rng))
                        .round()
                        .clamp(0.0, 255.0) as u8;
                }
            }
        }
        debug_assert_eq!(quality, view.quality);
        Ok(img)
    }

    fn quality(&self, index: usize) -> Option<Quality> {
        (index < self.len()).then(|| self.quality_of(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SyntheticFaces {
        SyntheticFaces::new(SyntheticConfig {
            num_identities: 6,
            images_per_identity: 5,
            image_size: 48,
            ..SyntheticConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn deterministic_and_labelled() {
        let a = small();
        let b = small();
        assert_eq!(a.len(), 30);
        assert_eq!(a.label(12).unwrap(), 2);
        assert_eq!(a.image(7).unwrap(), b.image(7).unwrap());
        assert_ne!(a.image(7).unwrap(), a.image(8).unwrap());
        assert!(a.image(30).is_err());
    }

    #[test]
    fn disjoint_identity_ranges_differ() {
        let a = small();
        let b = SyntheticFaces::new(SyntheticConfig {
            first_identity: 1000,
            ..a.config().clone()
        })
        .unwrap();
        assert_ne!(a.image(0).unwrap(), b.image(0).unwrap());
    }

    #[test]
    fn quality_mix_follows_fractions() {
        let set = SyntheticFaces::new(SyntheticConfig {
            num_identities: 50,
            images_per_identity: 20,
            ..SyntheticConfig::default()
        })
        .unwrap();
        let n = set.len() as f32;
        let hard = (0..set.len())
            .filter(|&i| set.quality(i) == Some(Quality::HighQualityHard))
            .count() as f32;
        let low = (0..set.len())
            .filter(|&i| set.quality(i) == Some(Quality::LowQuality))
            .count() as f32;
        assert!((hard / n - 0.2).abs() < 0.04, "hard fraction {}", hard / n);
        assert!((low / n - 0.2).abs() < 0.04, "low fraction {}", low / n);
    }

    #[test]
    fn pairs_are_balanced_and_respect_subset() {
        let set = small();
        let pairs = set.pairs(40, Some(Quality::HighQualityHard), 3).unwrap();
        assert_eq!(pairs.len(), 40);
        assert_eq!(pairs.iter().filter(|p| p.2).count(), 20);
        for &(a, b, same) in &pairs {
            assert_eq!(set.quality(a), Some(Quality::HighQualityHard));
            assert_ne!(set.quality(b), Some(Quality::LowQuality));
            assert_eq!(same, a / 5 == b / 5);
            assert_ne!(a, b);
        }
    }

    #[test]
    fn canonical_depth_is_the_frontal_ellipsoid() {
        let set = small();
        let n = 64;
        let d = set.canonical_depth(2, n as u32).unwrap();
        assert_eq!((d.size, d.depth.len(), d.mask.len()), (n, n * n, n * n));
        let [rx, ry, rz] = set.identities[2].radii;
        // The silhouette is the ellipse of radii (r_x, r_y): its area in pixels.
        let area = d.mask.iter().filter(|&&m| m).count() as f32;
        let want = PI * rx * ry * (n * n) as f32;
        assert!((area / want - 1.0).abs() < 0.03, "{area} vs {want}");
        // Nearest at the centre, farther towards the rim, mirror-symmetric, 0 outside.
        let at = |x: usize, y: usize| d.depth[y * n + x];
        assert!(at(32, 32) < 1e-3 && at(31, 31) < 1e-3);
        assert!(at(32, 32) < at(40, 32) && at(40, 32) < at(48, 32));
        for y in 0..n {
            for x in 0..n {
                assert_eq!(at(x, y), at(n - 1 - x, y));
                let v = at(x, y);
                assert!((0.0..=rz).contains(&v));
                if !d.mask[y * n + x] {
                    assert_eq!(v, 0.0);
                }
            }
        }
        // The mask agrees with the rendered silhouette: a pixel on the rim's inside is face.
        assert!(d.mask[32 * n + 32 + ((rx * 0.9 * n as f32) as usize)]);
        assert!(!d.mask[32 * n + 32 + ((rx * 1.1 * n as f32) as usize).min(n - 32 - 1)]);
        assert!(set.canonical_depth(6, 8).is_err());
    }

    #[test]
    fn bad_config_is_rejected_with_key() {
        let err = SyntheticFaces::new(SyntheticConfig {
            hard_fraction: 0.8,
            low_quality_fraction: 0.5,
            ..SyntheticConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("synthetic.hard_fraction"), "{err}");
    }
}
