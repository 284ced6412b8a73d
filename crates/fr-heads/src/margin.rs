//! The margin on the target logit: one implementation for every head that edits only the
//! target entry of a cosine matrix.
//!
//! arcface_torch's `CombinedMarginLoss(s, m1, m2, m3)` turns cosine logits into logits and
//! nothing else: the target cosine `c = cos θ_y` becomes `cos(m1·θ + m2) − m3` (ArcFace for
//! m1 = 1, m3 = 0; CosFace for m1 = 1, m2 = 0) and every logit is multiplied by `s`.
//! Reference: deepinsight/insightface `recognition/arcface_torch/losses.py`
//! (`CombinedMarginLoss`), handed to `partial_fc_v2.py` (`PartialFC_V2.margin_softmax`).
//!
//! - [`TargetMargin`] maps target cosines `(B,)` to target logits before scaling:
//!   [`TargetMargin::Cosine`] (`c − m`, CosFace / AM-Softmax, EPL's CosFace base) or
//!   [`TargetMargin::Angular`] ([`AngularMargin`]: `cos(m1·θ + m2) − m3` with fr's ArcFace
//!   options: exact or straight-through gradient ([`MarginMode`]), the th/mm or cosine
//!   fallback where `m1·θ + m2 > π` ([`Fallback`]), the easy margin).
//! - [`MarginSoftmax`] is the whole `CombinedMarginLoss`: the scale, the target margin, the
//!   cosine clamp and insightface's optional cap of the loss value. ArcFace, CosFace,
//!   sub-center ArcFace and the model-parallel Partial FC ([`crate::sharded`]) compute their
//!   logits with it; [`crate::partial_fc`] samples the centres of a head that does;
//!   [`crate::HeadConfig::margin_softmax`] gives the one a head config describes.
//!
//! How the options behave is documented in [`crate::arcface`] (exact: `acos` with derivative
//! `−1/sqrt(1 − c²)` for m1 ≠ 1; straight-through: `z = c + sg(target − c)`, the gradient of
//! the plain cosine, as arcface_torch, which edits the target logit under `no_grad`).

use std::f64::consts::PI;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common;
use crate::{HeadOutput, Result};

/// The probability floor of insightface's loss cap (`clamp_p_target`): each sample's loss
/// value is capped at `−ln(1e-30)`.
pub const P_TARGET_FLOOR: f64 = 1e-30;

/// How a margin enters the gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarginMode {
    /// Differentiate the margined target exactly.
    #[default]
    Exact,
    /// `z = c + sg(target − c)`: the margin shifts the value only (insightface arcface_torch).
    StraightThrough,
}

impl MarginMode {
    /// `f(c)` with this mode's gradient: `f(c)` differentiated (`exact`), or
    /// `c + sg(f(sg(c)) − sg(c))` (`straight_through`: the value of `f(c)`, the gradient of
    /// `c`). `c` is any tensor of target values, `(B,)` for the heads.
    ///
    /// # Errors
    /// Those of `f` and candle's.
    pub fn apply(self, c: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        match self {
            MarginMode::Exact => f(c),
            MarginMode::StraightThrough => {
                let shift = (f(&c.detach())? - c.detach())?;
                Ok((c + shift)?)
            }
        }
    }
}

/// What the target logit becomes where `m1·θ + m2 > π`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Keep `cos(m1·θ + m2) − m3` (insightface arcface_torch).
    None,
    /// `c − sin(π − m2)·m2 − m3` (the original th/mm rule).
    #[default]
    Classic,
    /// `c − fallback_margin` (FaceX-Zoo, whose `margin_am` defaults to 0).
    Cosine,
}

/// The ArcFace-family margin `cos(m1·θ + m2) − m3` on target cosines, with fr's rules for the
/// non-monotonic region and the easy margin. Built by [`crate::arcface::ArcFaceConfig`]; the
/// validation errors name that config's keys (`margin` is `m2`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AngularMargin {
    /// Multiplicative angular margin `m1`, in `[1, 8]`.
    pub m1: f64,
    /// Additive angular margin `m2` (radians), in `[0, π)`.
    pub m2: f64,
    /// Additive cosine margin `m3`, in `[0, 1]`.
    pub m3: f64,
    /// Exact or straight-through gradient.
    pub mode: MarginMode,
    /// Non-monotonic region rule.
    pub fallback: Fallback,
    /// Cosine margin of [`Fallback::Cosine`], in `[0, 1]`.
    pub fallback_margin: f64,
    /// Margin only where `c > 0`; replaces the fallback.
    pub easy_margin: bool,
}

impl AngularMargin {
    /// Check every range; the error names the key as spelled in an ArcFace config.
    ///
    /// # Errors
    /// [`crate::Error::Config`] naming `margin`, `m1`, `m3` or `fallback_margin`.
    pub fn validate(&self) -> Result<()> {
        common::check_range("margin", self.m2, 0.0, PI - 1e-6)?;
        common::check_range("m1", self.m1, 1.0, 8.0)?;
        common::check_range("m3", self.m3, 0.0, 1.0)?;
        common::check_range("fallback_margin", self.fallback_margin, 0.0, 1.0)
    }

    /// `cos(m1·θ + m2) − m3` for target cosines `c` `(B,)`, differentiable: for m1 = 1 as
    /// `c·cos m2 − sqrt(1 − c²)·sin m2` (candle has no `acos`), otherwise through
    /// [`common::acos`].
    ///
    /// # Errors
    /// Candle errors.
    pub fn margin_cos(&self, c: &Tensor) -> Result<Tensor> {
        let AngularMargin { m1, m2, m3, .. } = *self;
        let v = if m1 == 1.0 {
            let sin = c.sqr()?.neg()?.affine(1.0, 1.0)?.maximum(0.0)?.sqrt()?;
            ((c * m2.cos())? - (sin * m2.sin())?)?
        } else {
            common::acos(c)?.affine(m1, m2)?.cos()?
        };
        Ok((v - m3)?)
    }

    /// The target logit `(B,)` before scaling, differentiated exactly: the margin, then the
    /// easy-margin or fallback selection.
    ///
    /// # Errors
    /// Candle errors.
    pub fn target_logit(&self, c: &Tensor) -> Result<Tensor> {
        let phi = self.margin_cos(c)?;
        if self.easy_margin {
            return Ok(c.gt(0.0)?.where_cond(&phi, c)?);
        }
        let th = self.threshold();
        let alt = match self.fallback {
            Fallback::None => return Ok(phi),
            Fallback::Classic => (c - ((PI - self.m2).sin() * self.m2 + self.m3))?,
            Fallback::Cosine => (c - self.fallback_margin)?,
        };
        Ok(c.gt(th)?.where_cond(&phi, &alt)?)
    }

    /// Threshold `th = cos((π − m2)/m1)`: the margin applies where `c > th`, i.e.
    /// `m1·θ + m2 < π`.
    pub fn threshold(&self) -> f64 {
        let theta_max = (PI - self.m2) / self.m1;
        theta_max.cos()
    }
}

/// The map from target cosines `c` `(B,)` to target logits before scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetMargin {
    /// CosFace / AM-Softmax: `c − m`, differentiated exactly; `m` in `[0, 1]`.
    Cosine {
        /// The additive cosine margin.
        m: f64,
    },
    /// The ArcFace family (combined margin), with its gradient mode.
    Angular(AngularMargin),
}

impl TargetMargin {
    /// Check the margin's ranges; the error names the head config's key.
    ///
    /// # Errors
    /// [`crate::Error::Config`] naming `margin` (the cosine or additive angular margin),
    /// `m1`, `m3` or `fallback_margin`.
    pub fn validate(&self) -> Result<()> {
        match self {
            TargetMargin::Cosine { m } => common::check_range("margin", *m, 0.0, 1.0),
            TargetMargin::Angular(a) => a.validate(),
        }
    }

    /// Target logits `(B,)` of target cosines `c` `(B,)`, before scaling, with the margin's
    /// gradient (exact, or straight-through for an angular margin that asks for it).
    ///
    /// # Errors
    /// Candle errors.
    pub fn apply(&self, c: &Tensor) -> Result<Tensor> {
        match self {
            TargetMargin::Cosine { m } => Ok((c - *m)?),
            TargetMargin::Angular(a) => a.mode.apply(c, |c| a.target_logit(c)),
        }
    }

    /// The smallest cosine clamp the margin tolerates: an angular margin needs `ε > 0` to keep
    /// `sqrt(1 − c²)` and `acos` differentiable at `c = ±1`.
    fn min_cos_eps(&self) -> f64 {
        match self {
            TargetMargin::Cosine { .. } => 0.0,
            TargetMargin::Angular(_) => 1e-12,
        }
    }
}

/// arcface_torch's `CombinedMarginLoss` with fr's options: cosines `(B, C)` in, scaled logits
/// with the margin on the target entries out. Produced by the head configs
/// ([`crate::arcface::ArcFaceConfig::margin_softmax`],
/// [`crate::cosface::CosFaceConfig::margin_softmax`], [`crate::HeadConfig::margin_softmax`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarginSoftmax {
    /// Scale `s` of every logit, > 0.
    pub scale: f64,
    /// The margin on the target logit.
    pub margin: TargetMargin,
    /// Cap each sample's loss value at `−ln(1e-30)` as insightface does (gradient unchanged).
    pub clamp_p_target: bool,
    /// Cosines are clamped to `[−1 + cos_eps, 1 − cos_eps]` by whoever computes them; in
    /// `[0, 0.1]` (`[1e-12, 0.1]` for an angular margin).
    pub cos_eps: f64,
}

impl Default for MarginSoftmax {
    /// ArcFace with the paper's defaults (s = 64, m = 0.5).
    fn default() -> Self {
        crate::arcface::ArcFaceConfig::default().margin_softmax()
    }
}

impl MarginSoftmax {
    /// Check `scale > 0`, the margin and `cos_eps`; the error names the head config's key.
    ///
    /// # Errors
    /// [`crate::Error::Config`] naming `scale`, a margin key or `cos_eps`.
    pub fn validate(&self) -> Result<()> {
        common::check_positive("scale", self.scale)?;
        self.margin.validate()?;
        common::check_range("cos_eps", self.cos_eps, self.margin.min_cos_eps(), 0.1)
    }

    /// The probability floor of the final cross-entropy: [`P_TARGET_FLOOR`] with
    /// `clamp_p_target`, else none.
    pub fn p_floor(&self) -> Option<f64> {
        self.clamp_p_target.then_some(P_TARGET_FLOOR)
    }

    /// `CombinedMarginLoss.forward`: cosines `cos` `(B, C)` and the target mask `(B, C)` u8
    /// (a row without a target is left without margin) → `(s·z, c)`: the scaled logits
    /// `(B, C)` with the target entries replaced by [`TargetMargin::apply`], and the target
    /// cosines `c` `(B,)` (0 for a row without a target).
    ///
    /// # Errors
    /// Candle errors.
    pub fn logits(&self, cos: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = common::target_values(cos, mask)?;
        let target = self.margin.apply(&c)?;
        let logits = (common::replace_target(cos, mask, &target)? * self.scale)?;
        Ok((logits, c))
    }

    /// The forward pass of a dense margin head (ArcFace, CosFace): `embeddings` `(B, D)` and
    /// u32 `labels` `(B,)` checked against `embedding_size` and `num_classes`, cosines
    /// against every row of `weight` `(C, D)`, then [`Self::head_output`].
    ///
    /// # Errors
    /// [`crate::Error::Shape`] / [`crate::Error::Label`] for bad inputs, candle errors.
    pub fn forward_dense(
        &self,
        embeddings: &Tensor,
        labels: &Tensor,
        weight: &Tensor,
        num_classes: usize,
    ) -> Result<HeadOutput> {
        let embedding_size = weight.dim(1)?;
        let inp = common::check_inputs(embeddings, labels, embedding_size, num_classes)?;
        let cos = common::cosine(&inp.x, &common::as_dtype_of(weight, &inp.x)?, self.cos_eps)?;
        let mask = common::target_mask(&inp.labels_t, num_classes)?;
        self.head_output(&cos, &mask)
    }

    /// A head's output from its cosines `(B, C)` and target mask: [`Self::logits`], the mean
    /// cross-entropy (with the optional cap), and statistics `loss` and `cos_target_mean`.
    ///
    /// # Errors
    /// Candle errors.
    pub fn head_output(&self, cos: &Tensor, mask: &Tensor) -> Result<HeadOutput> {
        let (logits, c) = self.logits(cos, mask)?;
        let cos_target_mean = common::scalar(&c.mean_all()?)?;
        common::ce_output(
            logits,
            mask,
            self.p_floor(),
            &[("cos_target_mean", cos_target_mean)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// CosFace is the combined margin with m1 = 1, m2 = 0, m3 = m: the same target logits.
    #[test]
    fn cosine_margin_equals_combined_margin_with_m3() -> Result<()> {
        let c = Tensor::new(&[-0.9f64, -0.2, 0.0, 0.45, 0.99], &Device::Cpu)?;
        let cos = TargetMargin::Cosine { m: 0.35 }.apply(&c)?;
        let combined = TargetMargin::Angular(AngularMargin {
            m1: 1.0,
            m2: 0.0,
            m3: 0.35,
            mode: MarginMode::Exact,
            fallback: Fallback::None,
            fallback_margin: 0.0,
            easy_margin: false,
        })
        .apply(&c)?;
        assert_eq!(cos.to_vec1::<f64>()?, combined.to_vec1::<f64>()?);
        Ok(())
    }

    /// Straight-through keeps the value of the exact margin and the gradient of `c`.
    #[test]
    fn straight_through_value_and_gradient() -> Result<()> {
        let c = candle_core::Var::new(&[-0.5f64, 0.3, 0.8], &Device::Cpu)?;
        let f = |c: &Tensor| Ok(c.sqr()?);
        let exact = MarginMode::Exact.apply(c.as_tensor(), f)?;
        let st = MarginMode::StraightThrough.apply(c.as_tensor(), f)?;
        let (e, s) = (exact.to_vec1::<f64>()?, st.to_vec1::<f64>()?);
        for (e, s) in e.iter().zip(&s) {
            assert!((e - s).abs() < 1e-15);
        }
        let g = st.sum_all()?.backward()?;
        assert_eq!(g.get(&c).unwrap().to_vec1::<f64>()?, vec![1.0; 3]);
        Ok(())
    }

    #[test]
    fn validation_names_the_head_key() {
        let bad = MarginSoftmax {
            margin: TargetMargin::Cosine { m: 1.5 },
            ..MarginSoftmax::default()
        };
        let err = bad.validate().unwrap_err();
        assert!(
            matches!(&err, crate::Error::Config { key, .. } if key == "margin"),
            "{err}"
        );
        let angular_eps = MarginSoftmax {
            cos_eps: 0.0,
            ..MarginSoftmax::default()
        };
        assert!(angular_eps.validate().is_err());
        let cosine_eps = MarginSoftmax {
            cos_eps: 0.0,
            margin: TargetMargin::Cosine { m: 0.35 },
            ..MarginSoftmax::default()
        };
        assert!(cosine_eps.validate().is_ok());
    }
}
