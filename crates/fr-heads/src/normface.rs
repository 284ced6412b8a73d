//! NormFace: cross-entropy on scaled cosines.
//!
//! `z_j = s·ŵ_j·x̂`, `L = mean_i CE(z_i, y_i)`, no margin, no bias.
//! Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification",
//! ACM MM 2017; reference code: github.com/happynear/NormFace (README and prototxt).
//!
//! The scale `s` is learnable by default (a scalar parameter `scale` in the caller's `VarMap`,
//! initialised to 10) or fixed. A learnable scale is floored at `scale_floor` (0.01) in the
//! forward pass with a straight-through gradient, so it can always grow back. Small scales
//! (s ≈ 1) cannot converge: s must reach the tens.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of, DEFAULT_COS_EPS};
use crate::{Head, HeadOutput, Result, StepContext};

/// Hyperparameters of [`NormFace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NormFaceConfig {
    /// Scale `s` (the initial value when learnable). Default 10.
    pub scale: f64,
    /// Learn `s` (default `true`).
    pub learnable_scale: bool,
    /// Lower bound of a learnable `s` in the forward pass. Default 0.01.
    pub scale_floor: f64,
    /// Cosines are clamped to `[-1 + cos_eps, 1 - cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for NormFaceConfig {
    fn default() -> Self {
        Self {
            scale: 10.0,
            learnable_scale: true,
            scale_floor: 0.01,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl NormFaceConfig {
    /// Check `scale > 0`, `scale_floor > 0`, `cos_eps` in `[0, 0.1]`.
    pub fn validate(&self) -> Result<()> {
        common::check_positive("scale", self.scale)?;
        common::check_positive("scale_floor", self.scale_floor)?;
        common::check_range("cos_eps", self.cos_eps, 0.0, 0.1)
    }
}

/// Normalised softmax with a (learnable) scale.
#[derive(Debug, Clone)]
pub struct NormFace {
    cfg: NormFaceConfig,
    weight: Tensor,
    scale: Option<Tensor>,
    embedding_size: usize,
    num_classes: usize,
}

impl NormFace {
    /// Create the head; `weight` `(C, D)` and, when learnable, `scale` `()` come from `vb`.
    pub fn new(
        cfg: &NormFaceConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let weight = common::class_centres(&vb, embedding_size, num_classes)?;
        let scale = if cfg.learnable_scale {
            Some(vb.get_with_hints((), "scale", candle_nn::Init::Const(cfg.scale))?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            weight,
            scale,
            embedding_size,
            num_classes,
        })
    }

    /// The configuration the head was built with.
    pub fn config(&self) -> &NormFaceConfig {
        &self.cfg
    }
}

impl Head for NormFace {
    fn name(&self) -> &'static str {
        "normface"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        _ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let cos = common::cosine(
            &inp.x,
            &as_dtype_of(&self.weight, &inp.x)?,
            self.cfg.cos_eps,
        )?;
        let (logits, s) = match &self.scale {
            Some(s) => {
                let s = as_dtype_of(s, &inp.x)?;
                // Floor the value, keep the gradient: s + sg(max(s, floor) - s).
                let s = s.add(&s.maximum(self.cfg.scale_floor)?.sub(&s)?.detach())?;
                (cos.broadcast_mul(&s)?, common::scalar(&s)?)
            }
            None => ((&cos * self.cfg.scale)?, self.cfg.scale),
        };
        let mask = common::target_mask(&inp.labels_t, self.num_classes)?;
        let cos_target_mean = common::scalar(&common::target_values(&cos, &mask)?.mean_all()?)?;
        common::ce_output(
            logits,
            &mask,
            None,
            &[("scale", s), ("cos_target_mean", cos_target_mean)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn learnable_scale_gets_a_gradient_and_is_floored() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let mut head = NormFace::new(&NormFaceConfig::default(), 4, 3, vb)?;
        let scale: Var = vm.data().lock().unwrap()["scale"].clone();
        assert_eq!(common::scalar(scale.as_tensor())?, 10.0);
        let x = Tensor::new(
            &[[1.0f64, 0.5, -0.2, 0.3], [0.1, -1.0, 0.4, 0.2]],
            &Device::Cpu,
        )?;
        let y = Tensor::new(&[0u32, 2], &Device::Cpu)?;
        let out = head.forward(&x, &y, &StepContext::default())?;
        let g = out.loss.backward()?;
        assert!(common::scalar(g.get(scale.as_tensor()).unwrap())?.abs() > 0.0);

        scale.set(&Tensor::new(-1.0f64, &Device::Cpu)?)?;
        let out = head.forward(&x, &y, &StepContext::default())?;
        assert!((out.stats["scale"] - 0.01).abs() < 1e-15);
        let g = out.loss.backward()?;
        assert!(common::scalar(g.get(scale.as_tensor()).unwrap())?.abs() > 0.0);
        Ok(())
    }

    #[test]
    fn rejects_bad_scale() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let cfg = NormFaceConfig {
            scale: 0.0,
            ..Default::default()
        };
        let err = NormFace::new(&cfg, 4, 3, vb).unwrap_err();
        assert!(matches!(err, crate::Error::Config { ref key, .. } if key == "scale"));
    }
}
