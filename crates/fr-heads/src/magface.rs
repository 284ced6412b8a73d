//! MagFace: an angular margin that grows with the feature norm, plus a regulariser that
//! rewards large norms, so that the norm becomes a quality score.
//!
//! With `a = ‖x‖`, `â = clamp(a, l_a, u_a)` (zero gradient outside), `c_j = ŵ_j·x̂`:
//! - `m(â) = l_m + (u_m − l_m)·(â − l_a)/(u_a − l_a)` (differentiable in `â`: the embedding
//!   gradient has a term through the norm);
//! - `z_y = s·cos(θ_y + m(â))` where `c_y > 0` (`easy_margin`, the default), else `s·c_y`;
//!   with `easy_margin = false`: `s·cos(θ_y + m)` where `c_y > cos(π − m)`, else
//!   `s·(c_y − sin(π − m)·m)`; `z_j = s·c_j`;
//! - `g(â) = â/u_a² + 1/â`; `L = mean_i CE(z_i, y_i) + λ_g·mean_i g(â_i)`.
//!
//! Shapes: embeddings `(B, D)` (not normalised: the norm is the quality), labels `(B,)`,
//! class centres `weight` `(C, D)`, logits `(B, C)`. Statistics: `loss`, `loss_id` (the
//! cross-entropy), `loss_g` (mean g), `norm_mean`, `margin_mean`.
//!
//! Defaults (the paper's / reference trainer's): l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8,
//! λ_g = 35, s = 64, easy_margin on. The convexity condition of the paper,
//! `λ_g ≥ s·k·u_a²·l_a²/(u_a² − l_a²)` with `k = (u_m − l_m)/(u_a − l_a)` (≈ 22.6 for the
//! defaults), is checked by [`MagFaceConfig::validate`] (an `Error::Config` naming
//! `lambda_g`).
//!
//! Meng, Zhao, Huang, Zhou, "MagFace: A Universal Representation for Face Recognition and
//! Quality Assessment", CVPR 2021; reference code IrvingMeng/MagFace `models/magface.py`
//! (`MagLinear`, `MagLoss`, `SoftmaxBuilder._margin`) and `run/trainer.py`
//! (`loss_id + lambda_g·loss_g`). R100 on MS1MV2: IJB-B 94.51, IJB-C 95.97 (TAR@FAR=1e-4).
//! Golden tests: tests/golden/magface.json (easy margin) and
//! tests/golden/magface_hard_margin.json.
//!
//! Difference from the reference, on purpose: it clamps cosines to `[−1, 1]` only, so
//! `sqrt(1 − c²)` has an infinite derivative at `c = ±1`; here they are clamped to
//! `[−1 + ε, 1 − ε]` (ε = `cos_eps`, 1e-7), which keeps the gradient finite and changes
//! nothing elsewhere.
//!
//! `margin_mode = "straight_through"` keeps the value and takes the gradient of the plain
//! cosine (the margin then gives no gradient to the norm, only `g` does); the default
//! `exact` is the reference.

use std::f64::consts::PI;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of, DEFAULT_COS_EPS};
use crate::margin::MarginMode;
use crate::{Error, Head, HeadOutput, Result, StepContext};

/// Hyperparameters of [`MagFace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MagFaceConfig {
    /// Scale `s`. Default 64.
    pub scale: f64,
    /// Lower norm bound `l_a`, > 0. Default 10.
    pub l_a: f64,
    /// Upper norm bound `u_a`, > `l_a`. Default 110.
    pub u_a: f64,
    /// Margin at `l_a` (radians), in `[0, π/2]`. Default 0.45.
    pub l_margin: f64,
    /// Margin at `u_a` (radians), in `[l_margin, π/2]`. Default 0.8.
    pub u_margin: f64,
    /// Weight `λ_g` of the norm regulariser; must satisfy the convexity condition. Default 35.
    pub lambda_g: f64,
    /// Margin only where `c_y > 0` (else the th/mm fallback). Default `true`.
    pub easy_margin: bool,
    /// Exact (reference) or straight-through margin gradient. Default `exact`.
    pub margin_mode: MarginMode,
    /// Cosines are clamped to `[−1 + cos_eps, 1 − cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for MagFaceConfig {
    fn default() -> Self {
        Self {
            scale: 64.0,
            l_a: 10.0,
            u_a: 110.0,
            l_margin: 0.45,
            u_margin: 0.8,
            lambda_g: 35.0,
            easy_margin: true,
            margin_mode: MarginMode::Exact,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl MagFaceConfig {
    /// Slope `k = (u_m − l_m)/(u_a − l_a)` of the margin in the norm.
    pub fn margin_slope(&self) -> f64 {
        (self.u_margin - self.l_margin) / (self.u_a - self.l_a)
    }

    /// The smallest `λ_g` of the paper's convexity condition,
    /// `s·k·u_a²·l_a²/(u_a² − l_a²)`.
    pub fn min_lambda_g(&self) -> f64 {
        let (ua2, la2) = (self.u_a * self.u_a, self.l_a * self.l_a);
        self.scale * self.margin_slope() * ua2 * la2 / (ua2 - la2)
    }

    /// The margin `m(â)` of a norm (clamped to `[l_a, u_a]` first).
    pub fn margin_at(&self, norm: f64) -> f64 {
        let a = norm.clamp(self.l_a, self.u_a);
        self.l_margin + self.margin_slope() * (a - self.l_a)
    }

    /// Check every range and the convexity condition on `lambda_g`; the error names the key.
    pub fn validate(&self) -> Result<()> {
        common::check_positive("scale", self.scale)?;
        common::check_positive("l_a", self.l_a)?;
        common::check_positive("u_a", self.u_a)?;
        if self.u_a <= self.l_a {
            return Err(Error::config(
                "u_a",
                format!("must exceed l_a = {}", self.l_a),
            ));
        }
        common::check_range("l_margin", self.l_margin, 0.0, PI / 2.0)?;
        common::check_range("u_margin", self.u_margin, self.l_margin, PI / 2.0)?;
        common::check_range("cos_eps", self.cos_eps, 1e-12, 0.1)?;
        let min = self.min_lambda_g();
        if !(self.lambda_g.is_finite() && self.lambda_g >= min) {
            return Err(Error::config(
                "lambda_g",
                format!(
                    "must be at least s·k·u_a²·l_a²/(u_a² − l_a²) = {min:.4} for the norm \
                     regulariser to work (MagFace Thm. 1), got {}",
                    self.lambda_g
                ),
            ));
        }
        Ok(())
    }
}

/// Norm-adaptive margin loss with the magnitude regulariser.
#[derive(Debug, Clone)]
pub struct MagFace {
    cfg: MagFaceConfig,
    weight: Tensor,
    embedding_size: usize,
    num_classes: usize,
}

impl MagFace {
    /// Create the head; `weight` `(C, D)` comes from `vb`.
    pub fn new(
        cfg: &MagFaceConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let weight = common::class_centres(&vb, embedding_size, num_classes)?;
        Ok(Self {
            cfg: cfg.clone(),
            weight,
            embedding_size,
            num_classes,
        })
    }

    /// The target logit before scaling for target cosines `c` and margins `m` (both `(B,)`).
    fn target(&self, c: &Tensor, m: &Tensor) -> Result<Tensor> {
        let sin = c.sqr()?.neg()?.affine(1.0, 1.0)?.maximum(0.0)?.sqrt()?;
        let phi = (c.mul(&m.cos()?)? - sin.mul(&m.sin()?)?)?;
        if self.cfg.easy_margin {
            return Ok(c.gt(0.0)?.where_cond(&phi, c)?);
        }
        // cos(π − m) = −cos m, sin(π − m)·m = sin m·m.
        let th = m.cos()?.neg()?;
        let alt = (c - m.sin()?.mul(m)?)?;
        Ok(c.gt(&th)?.where_cond(&phi, &alt)?)
    }
}

impl Head for MagFace {
    fn name(&self) -> &'static str {
        "magface"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        _ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let x = &inp.x;
        let cfg = &self.cfg;
        let a = common::row_norms(x)?.clamp(cfg.l_a, cfg.u_a)?;
        let m = a.affine(
            cfg.margin_slope(),
            cfg.l_margin - cfg.margin_slope() * cfg.l_a,
        )?;

        let cos = common::cosine(x, &as_dtype_of(&self.weight, x)?, cfg.cos_eps)?;
        let mask = common::target_mask(&inp.labels_t, self.num_classes)?;
        let c = common::target_values(&cos, &mask)?;
        let target = match cfg.margin_mode {
            MarginMode::Exact => self.target(&c, &m)?,
            MarginMode::StraightThrough => {
                let shift = (self.target(&c.detach(), &m.detach())? - c.detach())?;
                (&c + shift)?
            }
        };
        let logits = (common::replace_target(&cos, &mask, &target)? * cfg.scale)?;
        let loss_id = common::cross_entropy(&logits, &mask, None)?;
        let g = (a.affine(1.0 / (cfg.u_a * cfg.u_a), 0.0)? + a.recip()?)?;
        let loss_g = g.mean_all()?;
        let loss = (&loss_id + (&loss_g * cfg.lambda_g)?)?;

        let stats = [
            ("loss_id", common::scalar(&loss_id)?),
            ("loss_g", common::scalar(&loss_g)?),
            ("norm_mean", common::scalar(&a.mean_all()?)?),
            ("margin_mean", common::scalar(&m.mean_all()?)?),
            ("cos_target_mean", common::scalar(&c.mean_all()?)?),
        ];
        common::head_output(loss, logits, &stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn head(cfg: MagFaceConfig) -> Result<MagFace> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        MagFace::new(&cfg, 6, 5, vb)
    }

    /// Gradients (through the cosines, the norm-dependent margin and g) match finite
    /// differences, for both margin forms; norms inside and outside `[l_a, u_a]`.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let v: Vec<f64> = (0..42)
            .map(|i| (i as f64 * 1.7 + 0.3).sin() * (4.0 + (i / 6) as f64 * 9.0))
            .collect();
        let x = Tensor::from_vec(v, (7, 6), &Device::Cpu)?;
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu)?;
        for easy_margin in [true, false] {
            let h = head(MagFaceConfig {
                easy_margin,
                ..Default::default()
            })?;
            let err = fd_check(&x, |x| {
                Ok(h.clone().forward(x, &y, &StepContext::default())?.loss)
            })?;
            assert!(err < 1e-6, "easy_margin={easy_margin}: fd error {err:e}");
        }
        Ok(())
    }

    #[test]
    fn lambda_g_condition() {
        let cfg = MagFaceConfig::default();
        assert!((cfg.min_lambda_g() - 22.5867).abs() < 1e-3);
        assert!(cfg.validate().is_ok());
        let low = MagFaceConfig {
            lambda_g: 20.0,
            ..cfg.clone()
        };
        assert!(matches!(low.validate(), Err(Error::Config { ref key, .. }) if key == "lambda_g"));
        for (bad, key) in [
            (
                MagFaceConfig {
                    u_a: 5.0,
                    ..cfg.clone()
                },
                "u_a",
            ),
            (
                MagFaceConfig {
                    u_margin: 0.3,
                    ..cfg.clone()
                },
                "u_margin",
            ),
            (MagFaceConfig { scale: 0.0, ..cfg }, "scale"),
        ] {
            assert!(
                matches!(bad.validate(), Err(Error::Config { key: ref k, .. }) if k == key),
                "{key}"
            );
        }
    }

    #[test]
    fn margin_is_linear_in_the_clamped_norm() {
        let cfg = MagFaceConfig::default();
        assert_eq!(cfg.margin_at(3.0), 0.45);
        assert!((cfg.margin_at(60.0) - 0.625).abs() < 1e-15);
        assert!((cfg.margin_at(500.0) - 0.8).abs() < 1e-15);
    }
}
