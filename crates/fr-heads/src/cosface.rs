//! CosFace / AM-Softmax: an additive cosine margin on the target logit.
//!
//! `z_y = s·(c_y − m)`, `z_j = s·c_j` (j ≠ y), `c_j = ŵ_j·x̂`; `L = mean_i CE(z_i, y_i)`.
//! Normalised features and weights, no bias; the subtraction is differentiated exactly.
//!
//! - Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018:
//!   s = 64, m = 0.35 (the defaults here; insightface's Glint360K/WebFace configs use m = 0.4).
//! - Wang, Cheng, Liu, Liu, "Additive Margin Softmax for Face Verification", IEEE SPL 2018
//!   (AM-Softmax): the same formula with s = 30 (FaceX-Zoo: s = 32), m = 0.35.
//!
//! Reference code: deepinsight/insightface `recognition/arcface_torch/losses.py`
//! (`CombinedMarginLoss` with m3) and JDAI-CV/FaceX-Zoo `head/AM_Softmax.py`.
//! insightface caps the *loss value* of each sample at `-ln(1e-30)` (it clamps the target
//! probability before the log; the gradient ignores the cap): `clamp_p_target = true`
//! reproduces its logged loss. The margin is [`crate::margin`]
//! ([`CosFaceConfig::margin_softmax`]).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{self, DEFAULT_COS_EPS};
use crate::margin::{MarginSoftmax, TargetMargin};
use crate::{Head, HeadOutput, Result, StepContext};

/// Hyperparameters of [`CosFace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CosFaceConfig {
    /// Scale `s`. Default 64 (AM-Softmax: 30 or 32).
    pub scale: f64,
    /// Additive cosine margin `m`, in `[0, 1]`. Default 0.35.
    pub margin: f64,
    /// Cap each sample's loss value at `-ln(1e-30)` as insightface does (gradient unchanged).
    /// Default `false`.
    pub clamp_p_target: bool,
    /// Cosines are clamped to `[-1 + cos_eps, 1 - cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for CosFaceConfig {
    fn default() -> Self {
        Self {
            scale: 64.0,
            margin: 0.35,
            clamp_p_target: false,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl CosFaceConfig {
    /// AM-Softmax as in FaceX-Zoo's config: s = 32, m = 0.35.
    pub fn am_softmax() -> Self {
        Self {
            scale: 32.0,
            ..Self::default()
        }
    }

    /// insightface's CosFace (m3 mode of `CombinedMarginLoss`): s = 64, m = 0.4, loss value
    /// capped at `-ln(1e-30)`.
    pub fn insightface() -> Self {
        Self {
            scale: 64.0,
            margin: 0.4,
            clamp_p_target: true,
            ..Self::default()
        }
    }

    /// Check `scale > 0`, `margin` in `[0, 1]`, `cos_eps` in `[0, 0.1]`.
    pub fn validate(&self) -> Result<()> {
        self.margin_softmax().validate()
    }

    /// The logits of this head: arcface_torch's `CombinedMarginLoss` with m1 = 1, m2 = 0,
    /// m3 = `margin` (the target logit `c − m`, [`TargetMargin::Cosine`]).
    pub fn margin_softmax(&self) -> MarginSoftmax {
        MarginSoftmax {
            scale: self.scale,
            margin: TargetMargin::Cosine { m: self.margin },
            clamp_p_target: self.clamp_p_target,
            cos_eps: self.cos_eps,
        }
    }
}

/// Large-margin cosine loss.
#[derive(Debug, Clone)]
pub struct CosFace {
    cfg: CosFaceConfig,
    weight: Tensor,
    num_classes: usize,
}

impl CosFace {
    /// Create the head; `weight` `(C, D)` comes from `vb`.
    pub fn new(
        cfg: &CosFaceConfig,
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
    pub fn config(&self) -> &CosFaceConfig {
        &self.cfg
    }
}

impl Head for CosFace {
    fn name(&self) -> &'static str {
        "cosface"
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
    use crate::normface::{NormFace, NormFaceConfig};
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn zero_margin_equals_fixed_scale_normface() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let cfg = CosFaceConfig {
            margin: 0.0,
            scale: 30.0,
            ..Default::default()
        };
        let mut cos = CosFace::new(&cfg, 5, 4, vb.clone())?;
        let nf = NormFaceConfig {
            scale: 30.0,
            learnable_scale: false,
            ..Default::default()
        };
        let mut norm = NormFace::new(&nf, 5, 4, vb)?; // shares `weight` through the VarMap
        let x = Tensor::randn(0f64, 1.0, (3, 5), &dev)?;
        let y = Tensor::new(&[3u32, 0, 3], &dev)?;
        let a = cos.forward(&x, &y, &StepContext::default())?;
        let b = norm.forward(&x, &y, &StepContext::default())?;
        let d = (a.logits - b.logits)?.abs()?.max_all()?;
        assert!(common::scalar(&d)? < 1e-13);
        assert!((common::scalar(&a.loss)? - common::scalar(&b.loss)?).abs() < 1e-13);
        Ok(())
    }

    #[test]
    fn margin_moves_only_the_target_logit() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let mut head = CosFace::new(&CosFaceConfig::default(), 2, 2, vb)?;
        vm.data().lock().unwrap()["weight"]
            .set(&Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0]], &dev)?)?;
        let x = Tensor::new(&[[3.0f64, 4.0]], &dev)?;
        let out = head.forward(&x, &Tensor::new(&[1u32], &dev)?, &StepContext::default())?;
        let l = out.logits.to_vec2::<f64>()?;
        assert!((l[0][0] - 64.0 * 0.6).abs() < 1e-12);
        assert!((l[0][1] - 64.0 * (0.8 - 0.35)).abs() < 1e-12);
        Ok(())
    }
}
