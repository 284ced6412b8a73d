//! SphereFace (A-Softmax): L-Softmax's multiplicative angular margin with unit class weights
//! and un-normalised features.
//!
//! With unit weights `ŵ_j` and `c_j = ŵ_j·x/‖x‖`:
//! `f_j = ‖x‖·c_j` (j ≠ y), `f_y = ‖x‖·(λ·c_y + ψ(θ_y))/(1 + λ)`, `L = mean_i CE(f_i, y_i)`,
//! with ψ and the λ schedule of [`crate::lsoftmax`]: `ψ(θ) = (−1)^k·cos(mθ) − 2k` on
//! `[kπ/m, (k+1)π/m]`, `λ = max(λ_min, base·(1 + γ·iter)^(−power))`, `iter = step + 1`.
//! Shapes: embeddings `(B, D)`, labels `(B,)`, class weights `weight` `(C, D)`, logits
//! `(B, C)`. Statistics: `loss`, `lambda`, `cos_target_mean`.
//!
//! Defaults: m = 4, base = 1000, γ = 0.12, power = 1, λ_min = 5. Training recipe of the
//! paper: Sphere20 on CASIA-WebFace 112×96, SGD lr 0.1, ×0.1 at 16K and 24K iterations, stop
//! at 28K, weight decay 5e-4; reported LFW ≈ 99.3% (the reference README's reproduction).
//! Pitfall: the loss stalls near 87 without a softmax warm-up or a larger λ.
//! Liu, Wen, Yu, Li, Raj, Song, "SphereFace: Deep Hypersphere Embedding for Face
//! Recognition", CVPR 2017; reference code wy1iu/sphereface (Caffe,
//! `tools/caffe-sphereface/src/caffe/layers/margin_inner_product_layer.cpp`).
//!
//! How the weights are normalised. The reference rescales the stored weight rows to unit
//! length in place at every forward pass and then treats them as constants of the
//! normalisation: the gradient it computes with respect to the unit weight is applied to the
//! stored (unit) weight. A head cannot overwrite its caller's parameters, so by default
//! (`weight_gradient = "identity"`) the forward uses `ŵ = W + sg(W/‖W‖ − W)`: the value is the
//! unit weight and `dL/dW = dL/dŵ`, the reference's update when `W` is kept at unit norm
//! (call [`renormalize`] on the weight after each optimiser step to reproduce the in-place
//! rescaling exactly). `weight_gradient = "through_norm"` differentiates `W/‖W‖` instead.
//!
//! Differences from the reference's hand-written backward, on purpose (both are
//! approximations there, not part of the method): it gives the weights the gradient of the
//! plain inner products (ignoring the margin on the target) and rescales the target's pair of
//! (weight, feature) gradient coefficients to unit length. Here both gradients are the exact
//! derivatives of the forward above (`k` piecewise constant).
//! `margin_mode = "straight_through"` keeps the margin in the value only.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of, DEFAULT_COS_EPS};
use crate::lsoftmax::{annealed_lambda, check_margin, check_schedule, margin_logits};
use crate::margin::MarginMode;
use crate::{Head, HeadOutput, Result, StepContext};

/// How the gradient reaches the stored weight through the per-forward normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightGradient {
    /// `dL/dW = dL/dŵ` (no gradient through the normalisation; the reference).
    #[default]
    Identity,
    /// The exact gradient of `ŵ = W/‖W‖`.
    ThroughNorm,
}

/// Hyperparameters of [`SphereFace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SphereFaceConfig {
    /// Multiplicative angular margin `m`, in `1..=4`. Default 4.
    pub margin: u32,
    /// `base` of the λ schedule, ≥ 0. Default 1000.
    pub base: f64,
    /// `γ` of the λ schedule, ≥ 0. Default 0.12.
    pub gamma: f64,
    /// `power` of the λ schedule, ≥ 0. Default 1.
    pub power: f64,
    /// Floor `λ_min` of λ, ≥ 0. Default 5.
    pub lambda_min: f64,
    /// Gradient through the weight normalisation. Default `identity` (the reference).
    pub weight_gradient: WeightGradient,
    /// Exact or straight-through margin gradient. Default `exact`.
    pub margin_mode: MarginMode,
    /// Cosines are clamped to `[−1 + cos_eps, 1 − cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for SphereFaceConfig {
    fn default() -> Self {
        Self {
            margin: 4,
            base: 1000.0,
            gamma: 0.12,
            power: 1.0,
            lambda_min: 5.0,
            weight_gradient: WeightGradient::Identity,
            margin_mode: MarginMode::Exact,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl SphereFaceConfig {
    /// Check every range; the error names the key.
    pub fn validate(&self) -> Result<()> {
        check_margin(self.margin)?;
        check_schedule(self.base, self.gamma, self.power, self.lambda_min)?;
        common::check_range("cos_eps", self.cos_eps, 1e-12, 0.1)
    }

    /// λ at optimiser step `step` (0-based).
    pub fn lambda(&self, step: u64) -> f64 {
        annealed_lambda(self.base, self.gamma, self.power, self.lambda_min, step)
    }
}

/// Rescale the rows of a weight variable to unit length in place (what the reference does
/// at every forward pass); call it after each optimiser step to train exactly as it does.
///
/// # Errors
/// Candle errors.
pub fn renormalize(weight: &Var) -> Result<()> {
    let unit = common::l2_normalize(&weight.as_tensor().detach())?;
    Ok(weight.set(&unit)?)
}

/// Angular softmax with unit weights and λ annealing.
#[derive(Debug, Clone)]
pub struct SphereFace {
    cfg: SphereFaceConfig,
    weight: Tensor,
    embedding_size: usize,
    num_classes: usize,
}

impl SphereFace {
    /// Create the head; `weight` `(C, D)` comes from `vb`.
    pub fn new(
        cfg: &SphereFaceConfig,
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

    /// The unit weight rows, with the configured gradient.
    fn unit_weight(&self, x: &Tensor) -> Result<Tensor> {
        let w = as_dtype_of(&self.weight, x)?;
        let unit = common::l2_normalize(&w)?;
        Ok(match self.cfg.weight_gradient {
            WeightGradient::ThroughNorm => unit,
            WeightGradient::Identity => (&w + (unit.detach() - w.detach())?)?,
        })
    }
}

impl Head for SphereFace {
    fn name(&self) -> &'static str {
        "sphereface"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let lambda = self.cfg.lambda(ctx.step);
        let (logits, mask, c) = margin_logits(
            &inp.x,
            &self.unit_weight(&inp.x)?,
            &inp.labels_t,
            self.num_classes,
            self.cfg.margin,
            lambda,
            self.cfg.margin_mode,
            self.cfg.cos_eps,
        )?;
        let cos_target_mean = common::scalar(&c.mean_all()?)?;
        common::ce_output(
            logits,
            &mask,
            None,
            &[("lambda", lambda), ("cos_target_mean", cos_target_mean)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn inputs() -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let x: Vec<f64> = (0..35)
            .map(|i| (i as f64 * 1.9 + 0.4).sin() * 3.0)
            .collect();
        let w: Vec<f64> = (0..20).map(|i| (i as f64 * 0.8 + 0.1).cos()).collect();
        Ok((
            Tensor::from_vec(x, (7, 5), &dev)?,
            Tensor::from_vec(w, (4, 5), &dev)?,
            Tensor::new(&[0u32, 1, 2, 3, 0, 1, 2], &dev)?,
        ))
    }

    fn head(cfg: SphereFaceConfig, w0: &Tensor) -> Result<(SphereFace, Var)> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let h = SphereFace::new(&cfg, 5, 4, vb)?;
        let w = vm.data().lock().unwrap()["weight"].clone();
        w.set(w0)?;
        Ok((h, w))
    }

    /// The embedding gradient matches finite differences (through-norm weights: the weight
    /// gradient too); the identity weight gradient equals the gradient w.r.t. the unit
    /// weight.
    #[test]
    fn gradients() -> Result<()> {
        let (x, w0, y) = inputs()?;
        let cfg = SphereFaceConfig {
            weight_gradient: WeightGradient::ThroughNorm,
            ..Default::default()
        };
        let ctx = StepContext::train(100, 0);
        let (h, _) = head(cfg.clone(), &w0)?;
        let ex = fd_check(&x, |x| Ok(h.clone().forward(x, &y, &ctx)?.loss))?;
        assert!(ex < 1e-6, "fd error (x) {ex:e}");
        let ew = fd_check(&w0, |w| {
            let mut h = SphereFace {
                weight: w.clone(),
                ..h.clone()
            };
            Ok(h.forward(&x, &y, &ctx)?.loss)
        })?;
        assert!(ew < 1e-6, "fd error (W) {ew:e}");

        // Identity: dL/dW is the finite-difference gradient with respect to a unit weight
        // held fixed under the normalisation, i.e. of the same loss at W = ŵ.
        let unit = common::l2_normalize(&w0)?;
        let (mut h, w) = head(SphereFaceConfig::default(), &w0)?;
        let g = h.forward(&x, &y, &ctx)?.loss.backward()?;
        let got: Vec<f64> = g.get(&w).unwrap().flatten_all()?.to_vec1()?;
        let var = Var::from_tensor(&unit)?;
        let (logits, mask, _) = margin_logits(
            &x,
            var.as_tensor(),
            &y,
            4,
            4,
            h.cfg.lambda(100),
            MarginMode::Exact,
            1e-7,
        )?;
        let g = common::cross_entropy(&logits, &mask, None)?.backward()?;
        let want: Vec<f64> = g.get(&var).unwrap().flatten_all()?.to_vec1()?;
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn renormalize_gives_unit_rows_and_same_loss() -> Result<()> {
        let (x, w0, y) = inputs()?;
        let (mut h, w) = head(SphereFaceConfig::default(), &w0)?;
        let before = common::scalar(&h.forward(&x, &y, &StepContext::default())?.loss)?;
        renormalize(&w)?;
        let norms: Vec<f64> = common::row_norms(w.as_tensor())?.to_vec1()?;
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-14));
        let after = common::scalar(&h.forward(&x, &y, &StepContext::default())?.loss)?;
        assert!((before - after).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn defaults_and_schedule() {
        let cfg = SphereFaceConfig::default();
        assert!((cfg.lambda(0) - 1000.0 / 1.12).abs() < 1e-9);
        assert_eq!(cfg.lambda(1_000_000), 5.0);
        let bad = SphereFaceConfig {
            lambda_min: f64::NAN,
            ..cfg
        };
        assert!(matches!(
            bad.validate(),
            Err(crate::Error::Config { ref key, .. }) if key == "lambda_min"
        ));
    }
}
