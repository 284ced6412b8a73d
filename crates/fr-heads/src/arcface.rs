//! ArcFace: an additive angular margin, and the combined margin.
//!
//! `z_y = s·(cos(m1·θ_y + m2) − m3)`, `z_j = s·c_j` (j ≠ y), `c_j = cos θ_j = ŵ_j·x̂`;
//! `L = mean_i CE(z_i, y_i)`. Plain ArcFace is m1 = 1, m2 = m = 0.5, m3 = 0, s = 64; the
//! combined margin of the paper's §3.3 (sample configs (1.0, 0.3, 0.2)) uses all three.
//! Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
//! Recognition", CVPR 2019 (TPAMI 2022). Reference code: deepinsight/insightface
//! `recognition/arcface_torch/losses.py` (`CombinedMarginLoss`, `ArcFace`); the classic
//! th/mm form as in HuangYG123/CurricularFace `head/metrics.py` (`ArcFace`); JDAI-CV/FaceX-Zoo
//! `head/ArcFace.py`.
//!
//! Options:
//! - `margin_mode`: `exact` (m1 = 1: `cos(θ+m) = c·cos m − sqrt(1−c²)·sin m`, differentiated
//!   normally; m1 ≠ 1: `θ = acos c` with derivative `−1/sqrt(1−c²)`) or `straight_through`
//!   (`z = c + sg(target − c)`: the gradient is that of the plain cosine, as in current
//!   insightface arcface_torch, which edits the target logit under `no_grad`).
//! - `fallback` where the margin would make the logit non-monotonic (m1·θ + m2 > π, i.e.
//!   `c ≤ th = cos((π − m2)/m1)`): `classic` uses `c − mm − m3` with `mm = sin(π − m2)·m2`
//!   (the original th/mm rule), `cosine` uses `c − fallback_margin` (FaceX-Zoo's `margin_am`),
//!   `none` keeps `cos(m1·θ + m2) − m3` (insightface).
//! - `easy_margin`: apply the margin only where `c > 0` (otherwise `c`); it replaces the fallback.
//! - `clamp_p_target`: insightface caps each sample's *loss value* at `−ln(1e-30)` (it clamps
//!   the target probability before the log); the gradient ignores the cap. Off by default.
//!
//! Cosines are clamped to `[−1 + ε, 1 − ε]` (ε = 1e-7) before `acos` / `sqrt(1 − c²)`, so the
//! loss and gradients stay finite at `c = ±1`.
//!
//! The margin itself is [`crate::margin`] ([`ArcFaceConfig::margin_softmax`]), shared with
//! CosFace, Partial FC and the model-parallel head.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{self, DEFAULT_COS_EPS};
use crate::margin::{AngularMargin, MarginSoftmax, TargetMargin};
pub use crate::margin::{Fallback, MarginMode};
use crate::{Head, HeadOutput, Result, StepContext};

/// Hyperparameters of [`ArcFace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArcFaceConfig {
    /// Scale `s`. Default 64.
    pub scale: f64,
    /// Additive angular margin `m2` (radians), in `[0, π)`. Default 0.5.
    pub margin: f64,
    /// Multiplicative angular margin `m1` (SphereFace-style), in `[1, 8]`. Default 1.
    pub m1: f64,
    /// Additive cosine margin `m3` (CosFace-style), in `[0, 1]`. Default 0.
    pub m3: f64,
    /// Exact or straight-through gradient. Default `exact`.
    pub margin_mode: MarginMode,
    /// Non-monotonic region rule. Default `classic` (th/mm).
    pub fallback: Fallback,
    /// Cosine margin of `fallback = "cosine"`, in `[0, 1]`. Default 0.
    pub fallback_margin: f64,
    /// Margin only where `c_y > 0`; replaces the fallback. Default `false`.
    pub easy_margin: bool,
    /// Cap each sample's loss value at `−ln(1e-30)` as insightface does. Default `false`.
    pub clamp_p_target: bool,
    /// Cosines are clamped to `[−1 + cos_eps, 1 − cos_eps]`, `cos_eps > 0`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for ArcFaceConfig {
    fn default() -> Self {
        Self {
            scale: 64.0,
            margin: 0.5,
            m1: 1.0,
            m3: 0.0,
            margin_mode: MarginMode::Exact,
            fallback: Fallback::Classic,
            fallback_margin: 0.0,
            easy_margin: false,
            clamp_p_target: false,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl ArcFaceConfig {
    /// insightface arcface_torch: straight-through margin, no fallback, loss value capped.
    pub fn insightface() -> Self {
        Self {
            margin_mode: MarginMode::StraightThrough,
            fallback: Fallback::None,
            clamp_p_target: true,
            ..Self::default()
        }
    }

    /// FaceX-Zoo's `head_conf.yaml` ArcFace: s = 32, m = 0.35, fallback `c − margin_am` (0).
    pub fn facexzoo() -> Self {
        Self {
            scale: 32.0,
            margin: 0.35,
            fallback: Fallback::Cosine,
            ..Self::default()
        }
    }

    /// Check every range; the error names the key.
    pub fn validate(&self) -> Result<()> {
        self.margin_softmax().validate()
    }

    /// The angular margin `cos(m1·θ + m2) − m3` with this config's mode, fallback and easy
    /// margin.
    pub fn angular_margin(&self) -> AngularMargin {
        AngularMargin {
            m1: self.m1,
            m2: self.margin,
            m3: self.m3,
            mode: self.margin_mode,
            fallback: self.fallback,
            fallback_margin: self.fallback_margin,
            easy_margin: self.easy_margin,
        }
    }

    /// The logits of this head (arcface_torch's `CombinedMarginLoss(s, m1, m2, m3)`), for the
    /// dense head, Partial FC and the model-parallel head.
    pub fn margin_softmax(&self) -> MarginSoftmax {
        MarginSoftmax {
            scale: self.scale,
            margin: TargetMargin::Angular(self.angular_margin()),
            clamp_p_target: self.clamp_p_target,
            cos_eps: self.cos_eps,
        }
    }

    /// Threshold `th`: the margin applies where `c > th`, i.e. `m1·θ + m2 < π`
    /// ([`AngularMargin::threshold`]).
    pub fn threshold(&self) -> f64 {
        self.angular_margin().threshold()
    }
}

/// Additive angular margin loss with the combined-margin extension.
#[derive(Debug, Clone)]
pub struct ArcFace {
    cfg: ArcFaceConfig,
    weight: Tensor,
    num_classes: usize,
}

impl ArcFace {
    /// Create the head; `weight` `(C, D)` comes from `vb`.
    pub fn new(
        cfg: &ArcFaceConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let weight = common::class_centres(&vb, embedding_size, num_classes)?;
        Ok(Self {
            cfg: cfg.clone(),
            weight,
            num_classes,
        })
    }

    /// The configuration the head was built with.
    pub fn config(&self) -> &ArcFaceConfig {
        &self.cfg
    }
}

impl Head for ArcFace {
    fn name(&self) -> &'static str {
        "arcface"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        _ctx: &StepContext,
    ) -> Result<HeadOutput> {
        self.cfg
            .margin_softmax()
            .forward_dense(embeddings, labels, &self.weight, self.num_classes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use std::f64::consts::PI;

    fn head(cfg: ArcFaceConfig) -> Result<(ArcFace, VarMap)> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        Ok((ArcFace::new(&cfg, 4, 3, vb)?, vm))
    }

    fn target(h: &ArcFace, c: &[f64]) -> Result<Vec<f64>> {
        Ok(h.cfg
            .angular_margin()
            .target_logit(&Tensor::new(c, &Device::Cpu)?)?
            .to_vec1()?)
    }

    #[test]
    fn exact_margin_matches_cos_theta_plus_m() -> Result<()> {
        let (h, _) = head(ArcFaceConfig {
            fallback: Fallback::None,
            ..Default::default()
        })?;
        let cs = [-0.99, -0.5, 0.0, 0.3, 0.95];
        for (got, c) in target(&h, &cs)?.iter().zip(cs) {
            assert!((got - (c.acos() + 0.5).cos()).abs() < 1e-14);
        }
        // Combined margin through the host acos.
        let cfg = ArcFaceConfig {
            m1: 1.35,
            margin: 0.3,
            m3: 0.2,
            ..Default::default()
        };
        let (h, _) = head(ArcFaceConfig {
            fallback: Fallback::None,
            ..cfg
        })?;
        for (got, c) in target(&h, &cs)?.iter().zip(cs) {
            assert!((got - ((1.35 * c.acos() + 0.3).cos() - 0.2)).abs() < 1e-14);
        }
        Ok(())
    }

    #[test]
    fn fallbacks_and_easy_margin() -> Result<()> {
        let (h, _) = head(ArcFaceConfig::default())?;
        let th = h.cfg.threshold();
        assert!((th - (PI - 0.5).cos()).abs() < 1e-15);
        let mm = (PI - 0.5).sin() * 0.5;
        let v = target(&h, &[-0.99, 0.2])?;
        assert!((v[0] - (-0.99 - mm)).abs() < 1e-15);
        assert!((v[1] - (0.2f64.acos() + 0.5).cos()).abs() < 1e-14);
        let (h, _) = head(ArcFaceConfig {
            fallback: Fallback::Cosine,
            fallback_margin: 0.1,
            ..Default::default()
        })?;
        assert!((target(&h, &[-0.99])?[0] + 1.09).abs() < 1e-15);
        let (h, _) = head(ArcFaceConfig {
            easy_margin: true,
            ..Default::default()
        })?;
        let v = target(&h, &[-0.3, 0.2])?;
        assert_eq!(v[0], -0.3);
        assert!((v[1] - (0.2f64.acos() + 0.5).cos()).abs() < 1e-14);
        Ok(())
    }

    #[test]
    fn exact_gradients_match_finite_differences() -> Result<()> {
        let c = Tensor::new(&[-0.95f64, -0.2, 0.4, 0.9], &Device::Cpu)?;
        for cfg in [
            ArcFaceConfig::default(),
            ArcFaceConfig {
                m1: 1.35,
                margin: 0.25,
                m3: 0.1,
                ..Default::default()
            },
            ArcFaceConfig {
                easy_margin: true,
                ..Default::default()
            },
        ] {
            let (h, _) = head(cfg)?;
            let margin = h.cfg.angular_margin();
            let err = fd_check(&c, |c| Ok(margin.target_logit(c)?.sqr()?.sum_all()?))?;
            assert!(err < 1e-6, "fd error {err}");
        }
        Ok(())
    }

    #[test]
    fn straight_through_gradient_equals_margin_free_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (5, 4), &dev)?;
        let y = Tensor::new(&[0u32, 2, 1, 2, 0], &dev)?;
        let (mut st, vm) = head(ArcFaceConfig::insightface())?;
        let w = vm.data().lock().unwrap()["weight"].clone();
        let out = st.forward(&x, &y, &StepContext::default())?;
        // d loss / d logits = (softmax − onehot)/B; d logits / d cos = s everywhere.
        let probs = candle_nn::ops::softmax(&out.logits, 1)?;
        let onehot = common::target_mask(&y, 3)?.to_dtype(DType::F64)?;
        let dcos = ((probs - onehot)? * (64.0 / 5.0))?;
        let xv = candle_core::Var::from_tensor(&x)?;
        let cos = common::cosine(xv.as_tensor(), w.as_tensor(), 1e-7)?;
        let g_ref = (cos * dcos)?.sum_all()?.backward()?;
        let out = st.forward(xv.as_tensor(), &y, &StepContext::default())?;
        let g = out.loss.backward()?;
        let diff = (g.get(&xv).unwrap() - g_ref.get(&xv).unwrap())?
            .abs()?
            .max_all()?;
        assert!(common::scalar(&diff)? < 1e-12);
        Ok(())
    }

    #[test]
    fn rejects_out_of_range_margins() {
        for (cfg, key) in [
            (
                ArcFaceConfig {
                    margin: -0.1,
                    ..Default::default()
                },
                "margin",
            ),
            (
                ArcFaceConfig {
                    m1: 0.5,
                    ..Default::default()
                },
                "m1",
            ),
            (
                ArcFaceConfig {
                    scale: f64::NAN,
                    ..Default::default()
                },
                "scale",
            ),
        ] {
            let err = head(cfg).map(|_| ()).unwrap_err();
            assert!(
                matches!(err, crate::Error::Config { key: ref k, .. } if k == key),
                "{err}"
            );
        }
    }
}
