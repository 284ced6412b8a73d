//! L-Softmax: a multiplicative angular margin on un-normalised logits, annealed from plain
//! softmax.
//!
//! With `c_j = cos θ_j = w_j·x/(‖w_j‖‖x‖)` and no bias:
//! - `f_j = w_j·x` for `j ≠ y`;
//! - `ψ(θ) = (−1)^k·cos(mθ) − 2k` on `θ ∈ [kπ/m, (k+1)π/m]`, `cos(mθ)` the Chebyshev
//!   polynomial `T_m(c)` (m = 2: `2c² − 1`, m = 3: `4c³ − 3c`, m = 4: `8c⁴ − 8c² + 1`) and
//!   `k = floor(m·acos(c)/π)` clamped to `0..m` (piecewise constant: no gradient);
//! - `f_y = (λ·‖w_y‖‖x‖c_y + ‖w_y‖‖x‖ψ(θ_y))/(1 + λ)`, `L = mean_i CE(f_i, y_i)`;
//! - `λ = max(λ_min, base·(1 + γ·iter)^(−power))` with `iter = StepContext::step + 1` (the
//!   reference's counter is 1 on the first forward call).
//!
//! ψ is continuous, decreasing in θ and `≤ cos θ`; m = 1 is plain softmax without bias. Shapes:
//! embeddings `(B, D)`, labels `(B,)`, class weights `weight` `(C, D)`, logits `(B, C)`.
//! Statistics: `loss`, `lambda`, `cos_target_mean`.
//!
//! Defaults: m = 4, base = 1000, γ = 2.5e-5, power = 35, λ_min = 0 (5–10 for hard data).
//! Liu, Wen, Yu, Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML
//! 2016; reference code wy1iu/LargeMargin_Softmax_Loss (Caffe,
//! `src/caffe/layers/largemargin_inner_product_layer.cpp`, where `k` comes from sign
//! tricks on `c` — the same `k` as from `acos`).
//!
//! Gradients are the exact derivatives of the forward above (autograd through `T_m`, the
//! norms and `w·x`). `margin_mode = "straight_through"` uses `f_y = w_y·x + sg(f_y − w_y·x)`
//! instead (margin in the value only). Cosines are clamped to `[−1 + ε, 1 − ε]` before `acos`.
//!
//! The ψ and λ helpers here are shared with [`crate::sphereface`].

use std::f64::consts::PI;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of, DEFAULT_COS_EPS};
use crate::margin::MarginMode;
use crate::{Error, Head, HeadOutput, Result, StepContext};

/// Hyperparameters of [`LSoftmax`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LSoftmaxConfig {
    /// Multiplicative angular margin `m`, in `1..=4`. Default 4.
    pub margin: u32,
    /// `base` of the λ schedule, ≥ 0. Default 1000.
    pub base: f64,
    /// `γ` of the λ schedule, ≥ 0. Default 2.5e-5.
    pub gamma: f64,
    /// `power` of the λ schedule, ≥ 0. Default 35.
    pub power: f64,
    /// Floor `λ_min` of λ, ≥ 0. Default 0.
    pub lambda_min: f64,
    /// Exact or straight-through margin gradient. Default `exact`.
    pub margin_mode: MarginMode,
    /// Cosines are clamped to `[−1 + cos_eps, 1 − cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for LSoftmaxConfig {
    fn default() -> Self {
        Self {
            margin: 4,
            base: 1000.0,
            gamma: 2.5e-5,
            power: 35.0,
            lambda_min: 0.0,
            margin_mode: MarginMode::Exact,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl LSoftmaxConfig {
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

/// `margin` must be 1, 2, 3 or 4.
pub(crate) fn check_margin(m: u32) -> Result<()> {
    if (1..=4).contains(&m) {
        Ok(())
    } else {
        Err(Error::config(
            "margin",
            format!("must be 1, 2, 3 or 4, got {m}"),
        ))
    }
}

/// The λ schedule's parameters must be finite and ≥ 0.
pub(crate) fn check_schedule(base: f64, gamma: f64, power: f64, lambda_min: f64) -> Result<()> {
    for (key, v) in [
        ("base", base),
        ("gamma", gamma),
        ("power", power),
        ("lambda_min", lambda_min),
    ] {
        common::check_range(key, v, 0.0, f64::MAX)?;
    }
    Ok(())
}

/// `λ = max(λ_min, base·(1 + γ·iter)^(−power))` with `iter = step + 1`.
pub(crate) fn annealed_lambda(
    base: f64,
    gamma: f64,
    power: f64,
    lambda_min: f64,
    step: u64,
) -> f64 {
    let iter = step as f64 + 1.0;
    (base * (1.0 + gamma * iter).powf(-power)).max(lambda_min)
}

/// `k = floor(m·θ/π)` clamped to `0..m`, for a cosine `c` (clamped to `[−1, 1]`).
pub(crate) fn psi_interval(c: f64, m: u32) -> u32 {
    let k = (f64::from(m) * c.clamp(-1.0, 1.0).acos() / PI).floor();
    k.clamp(0.0, f64::from(m - 1)) as u32
}

/// `ψ(θ) = (−1)^k·T_m(c) − 2k` for cosines `c` (any shape, already clamped), differentiable
/// in `c` (`k` is piecewise constant).
pub(crate) fn psi(c: &Tensor, m: u32) -> Result<Tensor> {
    let host: Vec<f64> = c.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let (sign, offset): (Vec<f64>, Vec<f64>) = host
        .iter()
        .map(|&c| {
            let k = psi_interval(c, m);
            let sign = if k.is_multiple_of(2) { 1.0 } else { -1.0 };
            (sign, -2.0 * f64::from(k))
        })
        .unzip();
    let to_t = |v: Vec<f64>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, c.shape(), &Device::Cpu)?
            .to_dtype(c.dtype())?
            .to_device(c.device())?)
    };
    let c2 = c.sqr()?;
    let t = match m {
        1 => c.clone(),
        2 => c2.affine(2.0, -1.0)?,
        3 => c.mul(&c2.affine(4.0, -3.0)?)?,
        _ => c2.mul(&c2.affine(8.0, -8.0)?)?.affine(1.0, 1.0)?,
    };
    Ok(t.mul(&to_t(sign)?)?.add(&to_t(offset)?)?)
}

/// The margin logits shared by L-Softmax and SphereFace: `x` `(B, D)`, class weights `w`
/// `(C, D)` (as given: raw for L-Softmax, unit rows for SphereFace). Returns the logits
/// `(B, C)`, the target mask and the target cosines `(B,)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn margin_logits(
    x: &Tensor,
    w: &Tensor,
    labels_t: &Tensor,
    num_classes: usize,
    m: u32,
    lambda: f64,
    mode: MarginMode,
    cos_eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let plain = x.matmul(&w.t()?)?;
    let mask = common::target_mask(labels_t, num_classes)?;
    let a = common::target_values(&plain, &mask)?;
    let norms = common::row_norms(x)?.mul(&common::row_norms(w)?.index_select(labels_t, 0)?)?;
    let c = common::clamp_cos(&a.div(&norms)?, cos_eps)?;
    let margin = |a: &Tensor, norms: &Tensor, c: &Tensor| -> Result<Tensor> {
        let v = (a * lambda)?.add(&norms.mul(&psi(c, m)?)?)?;
        Ok((v / (1.0 + lambda))?)
    };
    let target = match mode {
        MarginMode::Exact => margin(&a, &norms, &c)?,
        MarginMode::StraightThrough => {
            let shift = (margin(&a.detach(), &norms.detach(), &c.detach())? - a.detach())?;
            (&a + shift)?
        }
    };
    let logits = common::replace_target(&plain, &mask, &target)?;
    Ok((logits, mask, c))
}

/// Large-margin softmax with λ annealing.
#[derive(Debug, Clone)]
pub struct LSoftmax {
    cfg: LSoftmaxConfig,
    weight: Tensor,
    embedding_size: usize,
    num_classes: usize,
}

impl LSoftmax {
    /// Create the head; `weight` `(C, D)` comes from `vb`.
    pub fn new(
        cfg: &LSoftmaxConfig,
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
}

impl Head for LSoftmax {
    fn name(&self) -> &'static str {
        "lsoftmax"
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
            &as_dtype_of(&self.weight, &inp.x)?,
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
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn psi_matches_its_definition() -> Result<()> {
        let thetas: Vec<f64> = (1..40).map(|i| i as f64 * PI / 40.0).collect();
        let cs: Vec<f64> = thetas.iter().map(|t| t.cos()).collect();
        let c = Tensor::new(cs.as_slice(), &Device::Cpu)?;
        for m in 1..=4u32 {
            let got: Vec<f64> = psi(&c, m)?.to_vec1()?;
            for (g, t) in got.iter().zip(&thetas) {
                let k = ((f64::from(m) * t / PI).floor()).min(f64::from(m - 1));
                let want = (-1f64).powi(k as i32) * (f64::from(m) * t).cos() - 2.0 * k;
                assert!((g - want).abs() < 1e-12, "m={m} θ={t}: {g} vs {want}");
            }
        }
        Ok(())
    }

    #[test]
    fn lambda_schedule() {
        let cfg = LSoftmaxConfig::default();
        assert!((cfg.lambda(0) - 1000.0 * 1.000025f64.powf(-35.0)).abs() < 1e-9);
        let floor = LSoftmaxConfig {
            lambda_min: 5.0,
            ..cfg
        };
        assert_eq!(floor.lambda(10_000_000), 5.0);
    }

    /// Exact gradients (w.r.t. embeddings and weights) match finite differences for every m,
    /// with targets in every interval k.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        // Class j's weight ≈ (j + 1)/2·e_j; sample i at angle θ_i from its class in the plane
        // (e_y, e_4), norm 1 + i/2, plus a little of every axis.
        let y = [0usize, 1, 2, 3, 3, 2, 1, 0];
        let thetas = [0.3, 0.9, 1.3, 1.8, 2.0, 2.5, 2.9, 0.6];
        let mut v = vec![0.0; 40];
        for (i, (&yi, &t)) in y.iter().zip(&thetas).enumerate() {
            let r = 1.0 + i as f64 / 2.0;
            for d in 0..5 {
                v[i * 5 + d] = 0.05 * ((i * 5 + d) as f64).sin();
            }
            v[i * 5 + yi] += r * f64::cos(t);
            v[i * 5 + 4] += r * f64::sin(t);
        }
        let x = Tensor::from_vec(v, (8, 5), &dev)?;
        let w: Vec<f64> = (0..20)
            .map(|i| {
                0.03 * (i as f64).cos()
                    + if i % 6 == 0 {
                        0.5 + i as f64 / 12.0
                    } else {
                        0.0
                    }
            })
            .collect();
        let w = Tensor::from_vec(w, (4, 5), &dev)?;
        let y = Tensor::new(&[0u32, 1, 2, 3, 3, 2, 1, 0], &dev)?;
        for m in 1..=4 {
            let run = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
                let (logits, mask, _) =
                    margin_logits(x, w, &y, 4, m, 0.7, MarginMode::Exact, 1e-7)?;
                common::cross_entropy(&logits, &mask, None)
            };
            let ex = fd_check(&x, |x| run(x, &w))?;
            let ew = fd_check(&w, |w| run(&x, w))?;
            assert!(ex < 1e-6 && ew < 1e-6, "m={m}: fd errors {ex:e} {ew:e}");
        }
        // The case covers every interval k of m = 4.
        let (_, _, c) = margin_logits(&x, &w, &y, 4, 4, 0.7, MarginMode::Exact, 1e-7)?;
        let ks: std::collections::BTreeSet<u32> = c
            .to_vec1::<f64>()?
            .iter()
            .map(|&c| psi_interval(c, 4))
            .collect();
        assert_eq!(ks.len(), 4, "{ks:?}");
        Ok(())
    }

    #[test]
    fn rejects_bad_config() {
        for (cfg, key) in [
            (
                LSoftmaxConfig {
                    margin: 5,
                    ..Default::default()
                },
                "margin",
            ),
            (
                LSoftmaxConfig {
                    gamma: -1.0,
                    ..Default::default()
                },
                "gamma",
            ),
        ] {
            let err = cfg.validate().unwrap_err();
            assert!(
                matches!(err, Error::Config { key: ref k, .. } if k == key),
                "{err}"
            );
        }
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        assert!(LSoftmax::new(&LSoftmaxConfig::default(), 4, 3, vb).is_ok());
    }
}
