//! Knot Magnify (KM) loss: softmax cross-entropy re-weighted per sample by
//! `(γ·p + 1)^(−2)`, `p` the softmax probability of the label, so that badly classified
//! samples (small `p`) keep nearly full weight while well classified ones are damped.
//!
//! Embeddings `x` `(B, D)`, class weights `W` `(C, D)`, logits `z` `(B, C)`:
//! `p_i = softmax(z_i)_{y_i} = exp(−CE(z_i, y_i))`,
//! `L = mean_i (γ·p_i + 1)^(−2) · (−log p_i)`. With `γ = 0` it is softmax cross-entropy
//! exactly (value and gradient; a property test).
//!
//! Logits ([`KmLogits`]): `linear` (default), `z = W·x` (+ `b` with `bias = true`), the plain
//! softmax classifier the seed poster compares against (softmax 99.10 vs KM 99.31 on LFW) and
//! the one center loss was introduced with; or `cosine`, `z = s·ŵ·x̂` (NormFace-style).
//!
//! Whether the weight is differentiated is unspecified in the source (*unverified*):
//! `detach_weight = true` (default) treats `(γp + 1)^(−2)` as a constant per sample (a focal-
//! style re-weighting of the cross-entropy gradient), `false` differentiates through it.
//!
//! The critical point [`critical_point`]`(γ) = sqrt(1/(γ·ln(1+γ))) − 1/γ` of the seed poster
//! (0.244, 0.202, 0.175, 0.145, 0.126, 0.114 for γ = 0.1, 1, 2, 4, 6, 8).
//!
//! Source: the seed poster "Knot Magnify loss" (no public code); the spec's defaults: γ = 1
//! (*unverified*: the poster tabulates γ from 0.1 to 8 without naming the trained value),
//! detached weight, linear logits without bias. Published (poster, 3.7M training images):
//! LFW softmax 99.10, KM 99.31, KM + center loss 99.53.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of, DEFAULT_COS_EPS};
use crate::{Head, HeadOutput, Result, StepContext};

/// The logits KM re-weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KmLogits {
    /// `z = W·x (+ b)`: plain softmax.
    #[default]
    Linear,
    /// `z = s·ŵ·x̂`: normalised features and weights, fixed scale `s`.
    Cosine,
}

/// Hyperparameters of [`Km`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KmConfig {
    /// `γ ≥ 0`; 0 gives softmax cross-entropy. Default 1 (*unverified*).
    pub gamma: f64,
    /// Treat the weight `(γp + 1)^(−2)` as a constant in the backward pass. Default `true`.
    pub detach_weight: bool,
    /// Linear or cosine logits. Default `linear`.
    pub logits: KmLogits,
    /// Linear logits only: learn a per-class bias `bias` `(C,)`. Default `false`.
    pub bias: bool,
    /// Cosine logits only: scale `s`. Default 64.
    pub scale: f64,
    /// Cosine logits only: cosines clamped to `[−1 + cos_eps, 1 − cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for KmConfig {
    fn default() -> Self {
        Self {
            gamma: 1.0,
            detach_weight: true,
            logits: KmLogits::Linear,
            bias: false,
            scale: 64.0,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl KmConfig {
    /// Check `gamma` in `[0, 1e6]`, `scale > 0`, `cos_eps` in `[0, 0.1]`.
    pub fn validate(&self) -> Result<()> {
        common::check_range("gamma", self.gamma, 0.0, 1e6)?;
        common::check_positive("scale", self.scale)?;
        common::check_range("cos_eps", self.cos_eps, 0.0, 0.1)
    }
}

/// The seed poster's critical label probability of KM with parameter `γ`:
/// `p_c(γ) = sqrt(1/(γ·ln(1+γ))) − 1/γ`.
///
/// Equivalently `(γ·p_c + 1)^(−2) = ln(1+γ)/γ`: `p_c` is where the KM weight equals
/// `ln(1+γ)/γ = ∫₀¹ dp/(1 + γp)`; samples whose label probability is below `p_c` get a larger
/// weight than that, those above a smaller one (the hard samples are relatively magnified).
/// It decreases with `γ` and tends to 1/4 as `γ → 0` (returned for `γ = 0`). The poster's
/// table (0.244, 0.202, 0.175, 0.145, 0.126, 0.114 for γ = 0.1, 1, 2, 4, 6, 8) is this value
/// rounded *up* to 3 decimals (e.g. 0.2431 → 0.244, 0.2011 → 0.202).
pub fn critical_point(gamma: f64) -> f64 {
    if gamma < 1e-6 {
        // Series: 1/4 − 7γ/96 + O(γ²), free of the cancellation of the closed form.
        return 0.25 - 7.0 * gamma / 96.0;
    }
    (1.0 / (gamma * gamma.ln_1p())).sqrt() - 1.0 / gamma
}

/// Knot Magnify loss head.
#[derive(Debug, Clone)]
pub struct Km {
    cfg: KmConfig,
    weight: Tensor,
    bias: Option<Tensor>,
    embedding_size: usize,
    num_classes: usize,
}

impl Km {
    /// Create the head; `weight` `(C, D)` (and `bias` `(C,)` for linear logits with
    /// `bias = true`) come from `vb`.
    pub fn new(
        cfg: &KmConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let weight = common::class_centres(&vb, embedding_size, num_classes)?;
        let bias = if cfg.bias && cfg.logits == KmLogits::Linear {
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
    pub fn config(&self) -> &KmConfig {
        &self.cfg
    }
}

impl Head for Km {
    fn name(&self) -> &'static str {
        "km"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        _ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let w = as_dtype_of(&self.weight, &inp.x)?;
        let logits = match self.cfg.logits {
            KmLogits::Linear => {
                let z = inp.x.matmul(&w.t()?)?;
                match &self.bias {
                    Some(b) => z.broadcast_add(&as_dtype_of(b, &inp.x)?)?,
                    None => z,
                }
            }
            KmLogits::Cosine => (common::cosine(&inp.x, &w, self.cfg.cos_eps)? * self.cfg.scale)?,
        };
        let mask = common::target_mask(&inp.labels_t, self.num_classes)?;
        let ce = common::cross_entropy_per_sample(&logits, &mask, None)?;
        let p = ce.neg()?.exp()?;
        // (γp + 1)^(−2); exactly 1 (and a zero derivative) at γ = 0.
        let weight = p.affine(self.cfg.gamma, 1.0)?.sqr()?.recip()?;
        let weight = if self.cfg.detach_weight {
            weight.detach()
        } else {
            weight
        };
        let loss = (&weight * &ce)?.mean_all()?;
        let stats = [
            ("ce", common::scalar(&ce.mean_all()?)?),
            ("p_target_mean", common::scalar(&p.mean_all()?)?),
            ("km_weight_mean", common::scalar(&weight.mean_all()?)?),
        ];
        common::head_output(loss, logits, &stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use crate::Error;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn head(cfg: KmConfig) -> Result<Km> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let h = Km::new(&cfg, 6, 5, vb)?;
        // Centres large enough for confident (and unconfident) samples.
        let v: Vec<f64> = (0..30).map(|i| (i as f64 * 2.3 + 0.1).cos()).collect();
        vm.data().lock().unwrap()["weight"].set(&Tensor::from_vec(v, (5, 6), &Device::Cpu)?)?;
        Ok(h)
    }

    fn x() -> Result<Tensor> {
        let v: Vec<f64> = (0..42)
            .map(|i| (i as f64 * 1.7 + 0.3).sin() * 2.0)
            .collect();
        Ok(Tensor::from_vec(v, (7, 6), &Device::Cpu)?)
    }

    fn y() -> Result<Tensor> {
        Ok(Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu)?)
    }

    /// Differentiated weight: the gradient is the derivative of the loss value (finite
    /// differences), for both logit kinds.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        for logits in [KmLogits::Linear, KmLogits::Cosine] {
            let h = head(KmConfig {
                gamma: 4.0,
                detach_weight: false,
                logits,
                scale: 4.0,
                ..Default::default()
            })?;
            let err = fd_check(&x()?, |x| {
                Ok(h.clone().forward(x, &y()?, &StepContext::default())?.loss)
            })?;
            assert!(err < 1e-6, "{logits:?}: finite-difference error {err:e}");
        }
        Ok(())
    }

    /// Detached weight: the gradient is that of `mean_i w_i·CE_i` with the weights `w_i`
    /// frozen at their current values (finite differences of that surrogate).
    #[test]
    fn detached_weight_gradient_is_the_weighted_cross_entropy_gradient() -> Result<()> {
        let mut h = head(KmConfig {
            gamma: 4.0,
            ..Default::default()
        })?;
        let out = h.forward(&x()?, &y()?, &StepContext::default())?;
        let mask = common::target_mask(&y()?, 5)?;
        let ce = common::cross_entropy_per_sample(&out.logits, &mask, None)?;
        let wts = ce.neg()?.exp()?.affine(4.0, 1.0)?.sqr()?.recip()?.detach();
        let wmat = h.weight.clone();
        let surrogate = |x: &Tensor| -> Result<Tensor> {
            let z = x.matmul(&wmat.t()?)?;
            let ce = common::cross_entropy_per_sample(&z, &mask, None)?;
            Ok((&wts * ce)?.mean_all()?)
        };
        let x0 = x()?;
        let var = candle_core::Var::from_tensor(&x0)?;
        let g = h
            .forward(var.as_tensor(), &y()?, &StepContext::default())?
            .loss
            .backward()?;
        let got: Vec<f64> = g.get(&var).unwrap().flatten_all()?.to_vec1()?;
        let gs = surrogate(var.as_tensor())?.backward()?;
        let want: Vec<f64> = gs.get(&var).unwrap().flatten_all()?.to_vec1()?;
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-14);
        }
        assert!(fd_check(&x0, surrogate)? < 1e-6);
        // The weights are < 1 and smaller for confident samples.
        let p: Vec<f64> = ce.neg()?.exp()?.to_vec1()?;
        let w: Vec<f64> = wts.to_vec1()?;
        assert!(w.iter().all(|&v| v <= 1.0));
        let (lo, hi) = (0..7).fold((0, 0), |(lo, hi), i| {
            (
                if p[i] < p[lo] { i } else { lo },
                if p[i] > p[hi] { i } else { hi },
            )
        });
        assert!(w[lo] > w[hi]);
        Ok(())
    }

    #[test]
    fn critical_point_limit_and_monotonicity() {
        assert_eq!(critical_point(0.0), 0.25);
        assert!((critical_point(1e-6) - critical_point(1.0001e-6)).abs() < 1e-9);
        assert!((critical_point(2e-6) - (0.25 - 7.0 * 2e-6 / 96.0)).abs() < 1e-9);
        let mut last = 0.25;
        for g in [0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 100.0] {
            let p = critical_point(g);
            assert!(p < last, "γ = {g}");
            // The defining identity.
            let w = (g * p + 1.0).powi(-2);
            assert!((w - g.ln_1p() / g).abs() < 1e-12);
            last = p;
        }
    }

    #[test]
    fn validate_names_the_key() {
        let bad = KmConfig {
            gamma: -1.0,
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(Error::Config { key, .. }) if key == "gamma"));
    }
}
