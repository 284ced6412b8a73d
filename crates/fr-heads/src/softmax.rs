//! Softmax: a plain linear classifier with cross-entropy.
//!
//! `z = W·x + b`, `L = mean_i CE(z_i, y_i)`; neither features nor weights are normalised.
//! The baseline every margin paper compares to. Weights under `weight` `(C, D)` (insightface
//! init N(0, 0.01)), the optional bias under `bias` `(C,)` (zeros).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of};
use crate::{Head, HeadOutput, Result, StepContext};

/// Hyperparameters of [`Softmax`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SoftmaxConfig {
    /// Learn a per-class bias `b` (default `true`, as `nn.Linear`).
    pub bias: bool,
}

impl Default for SoftmaxConfig {
    fn default() -> Self {
        Self { bias: true }
    }
}

impl SoftmaxConfig {
    /// Nothing to validate; present for symmetry with the other heads.
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// Linear classifier + cross-entropy.
#[derive(Debug, Clone)]
pub struct Softmax {
    cfg: SoftmaxConfig,
    weight: Tensor,
    bias: Option<Tensor>,
    embedding_size: usize,
    num_classes: usize,
}

impl Softmax {
    /// Create the head; its parameters (`weight`, and `bias` if enabled) come from `vb`.
    pub fn new(
        cfg: &SoftmaxConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let weight = common::class_centres(&vb, embedding_size, num_classes)?;
        let bias = if cfg.bias {
            Some(vb.get_with_hints(num_classes, "bias", candle_nn::Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            weight,
            bias,
            embedding_size,
            num_classes,
        })
    }

    /// The configuration the head was built with.
    pub fn config(&self) -> &SoftmaxConfig {
        &self.cfg
    }
}

impl Head for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        _ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let w = as_dtype_of(&self.weight, &inp.x)?;
        let mut logits = inp.x.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            logits = logits.broadcast_add(&as_dtype_of(b, &inp.x)?)?;
        }
        let mask = common::target_mask(&inp.labels_t, self.num_classes)?;
        common::ce_output(logits, &mask, None, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn bias_is_created_and_used() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let mut head = Softmax::new(&SoftmaxConfig::default(), 3, 2, vb)?;
        vm.data().lock().unwrap()["bias"].set(&Tensor::new(&[0.0f64, 2.0], &Device::Cpu)?)?;
        vm.data().lock().unwrap()["weight"].set(&Tensor::zeros(
            (2, 3),
            DType::F64,
            &Device::Cpu,
        )?)?;
        let x = Tensor::ones((1, 3), DType::F64, &Device::Cpu)?;
        let out = head.forward(
            &x,
            &Tensor::new(&[0u32], &Device::Cpu)?,
            &StepContext::default(),
        )?;
        assert_eq!(out.logits.to_vec2::<f64>()?, vec![vec![0.0, 2.0]]);
        let want = (1.0 + 2f64.exp()).ln();
        assert!((common::scalar(&out.loss)? - want).abs() < 1e-14);
        Ok(())
    }
}
