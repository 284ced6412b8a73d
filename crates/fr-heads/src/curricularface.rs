//! CurricularFace: ArcFace on the target, and hard negatives re-weighted by a running
//! curriculum parameter `t`, so that easy samples dominate early and hard ones later.
//!
//! With `c_j = ŵ_j·x̂`, `φ_y = cos(θ_y + m)` (ArcFace with the classic th/mm fallback):
//! - `t ← 0.01·mean_i(c_{y_i}) + 0.99·t`, updated **before** use and only in training
//!   (detached; initial `t = 0`);
//! - a negative `j ≠ y` is hard when `c_j > cos(θ_y + m)` (the margin cosine *before* the
//!   fallback); hard negatives become `c_j·(t + c_j)`, others stay `c_j`;
//! - `z_y = s·φ_y`, `z_j = s·c'_j`, `L = mean_i CE(z_i, y_i)`; exact gradient.
//!
//! Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face
//! Recognition", CVPR 2020, Eq. 8–10; reference code HuangYG123/CurricularFace
//! `head/metrics.py` (`CurricularFace`): s = 64, m = 0.5. R100 on MS1MV2: IJB-B 94.80,
//! IJB-C 96.10 (TAR@FAR=1e-4). In eval mode (`StepContext::train == false`) `t` is used but
//! not updated (the reference updates it in every forward call).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::arcface::ArcFaceConfig;
use crate::common::{self, as_dtype_of, DEFAULT_COS_EPS};
use crate::margin::AngularMargin;
use crate::{Head, HeadOutput, Result, StepContext};

/// Checkpoint key of the curriculum parameter.
const T_KEY: &str = "t";

/// Hyperparameters of [`CurricularFace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CurricularFaceConfig {
    /// Scale `s`. Default 64.
    pub scale: f64,
    /// Additive angular margin `m` in radians. Default 0.5.
    pub margin: f64,
    /// EMA rate of `t`. Default 0.01.
    pub t_momentum: f64,
    /// Cosines are clamped to `[-1 + cos_eps, 1 - cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for CurricularFaceConfig {
    fn default() -> Self {
        Self {
            scale: 64.0,
            margin: 0.5,
            t_momentum: 0.01,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl CurricularFaceConfig {
    /// The ArcFace part: same scale, margin and clamp, classic fallback, exact margin.
    fn arcface(&self) -> ArcFaceConfig {
        ArcFaceConfig {
            scale: self.scale,
            margin: self.margin,
            cos_eps: self.cos_eps,
            ..ArcFaceConfig::default()
        }
    }

    /// Check `scale > 0`, `margin` in `[0, π)`, `t_momentum` in `[0, 1]`, `cos_eps`.
    pub fn validate(&self) -> Result<()> {
        common::check_range("t_momentum", self.t_momentum, 0.0, 1.0)?;
        self.arcface().validate()
    }
}

/// Adaptive curriculum margin loss.
#[derive(Debug, Clone)]
pub struct CurricularFace {
    cfg: CurricularFaceConfig,
    /// The ArcFace margin on the target cosine.
    arc: AngularMargin,
    weight: Tensor,
    embedding_size: usize,
    num_classes: usize,
    /// The curriculum parameter `t` (a detached running mean of target cosines).
    t: f64,
}

impl CurricularFace {
    /// Create the head; `weight` `(C, D)` comes from `vb`; `t` starts at 0.
    pub fn new(
        cfg: &CurricularFaceConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let weight = common::class_centres(&vb, embedding_size, num_classes)?;
        Ok(Self {
            cfg: cfg.clone(),
            arc: cfg.arcface().angular_margin(),
            weight,
            embedding_size,
            num_classes,
            t: 0.0,
        })
    }

    /// The curriculum parameter `t`.
    pub fn t(&self) -> f64 {
        self.t
    }
}

impl Head for CurricularFace {
    fn name(&self) -> &'static str {
        "curricularface"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let cos = common::cosine(
            &inp.x,
            &as_dtype_of(&self.weight, &inp.x)?,
            self.cfg.cos_eps,
        )?;
        let mask = common::target_mask(&inp.labels_t, self.num_classes)?;
        let c = common::target_values(&cos, &mask)?;
        let cos_target_mean = common::scalar(&c.mean_all()?)?;
        if ctx.train {
            let a = self.cfg.t_momentum;
            self.t = a * cos_target_mean + (1.0 - a) * self.t;
        }
        // Hard negatives: c_j > cos(θ_y + m) (before the fallback), target column excluded.
        let phi_raw = self.arc.margin_cos(&c.detach())?;
        let above = cos.detach().broadcast_gt(&phi_raw.unsqueeze(1)?)?;
        let not_target = mask.ones_like()?.sub(&mask)?;
        let hard = (above.mul(&not_target)?).to_dtype(cos.dtype())?;
        // c' = c + hard·(c·(t + c) − c), exact gradient t + 2c on hard entries.
        let reweighted = ((&cos * (&cos + self.t)?)? - &cos)?;
        let cos2 = (&cos + (hard.mul(&reweighted))?)?;
        let target = self.arc.target_logit(&c)?;
        let logits = (common::replace_target(&cos2, &mask, &target)? * self.cfg.scale)?;
        let n_hard = common::scalar(&hard.sum_all()?.to_dtype(DType::F64)?)?;
        common::ce_output(
            logits,
            &mask,
            None,
            &[
                ("cos_target_mean", cos_target_mean),
                ("t", self.t),
                ("hard_negatives", n_hard),
            ],
        )
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(
            T_KEY.to_string(),
            Tensor::new(self.t, &candle_core::Device::Cpu)?,
        )])
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        self.t = common::state_scalar(state, T_KEY)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use candle_core::Device;
    use candle_nn::{VarBuilder, VarMap};

    fn head(vm: &VarMap) -> Result<CurricularFace> {
        let vb = VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu);
        CurricularFace::new(&CurricularFaceConfig::default(), 6, 5, vb)
    }

    /// Gradients with respect to the embeddings match finite differences at a non-zero `t`
    /// (so the hard-negative re-weighting `c·(t + c)` is exercised); eval mode keeps `t` fixed.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let vm = VarMap::new();
        let mut h = head(&vm)?;
        h.t = 0.4;
        let v: Vec<f64> = (0..42).map(|i| (i as f64 * 1.7 + 0.3).sin()).collect();
        let x = Tensor::from_vec(v, (7, 6), &Device::Cpu)?;
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu)?;
        let out = h.forward(&x, &y, &StepContext::default())?;
        assert_eq!(h.t, 0.4);
        let err = fd_check(&x, |x| {
            Ok(h.clone().forward(x, &y, &StepContext::default())?.loss)
        })?;
        assert!(err < 1e-6, "finite-difference error {err:e}");
        assert!(common::scalar(&out.loss)?.is_finite());
        assert!(
            out.stats["hard_negatives"] > 0.0,
            "the case must have hard negatives"
        );
        Ok(())
    }

    #[test]
    fn state_round_trip_and_errors() -> Result<()> {
        let vm = VarMap::new();
        let mut h = head(&vm)?;
        h.t = 0.25;
        let state: BTreeMap<String, Tensor> = h.state()?.into_iter().collect();
        let mut g = head(&vm)?;
        g.load_state(&state)?;
        assert_eq!(g.t(), 0.25);
        assert!(g.load_state(&BTreeMap::new()).is_err());
        let bad = BTreeMap::from([(
            T_KEY.to_string(),
            Tensor::zeros(2, DType::F64, &Device::Cpu)?,
        )]);
        assert!(g.load_state(&bad).is_err());
        let cfg = CurricularFaceConfig {
            t_momentum: 1.5,
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
        Ok(())
    }
}
