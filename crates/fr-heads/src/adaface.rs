//! AdaFace: a margin that adapts to image quality, with the feature norm as the quality proxy.
//!
//! With `c_j = cos θ_j = ŵ_j·x̂` (clamped to `[−1 + ε, 1 − ε]`, ε = 1e-3) and the feature norm
//! `a = ‖x‖` (detached, clipped to `[norm_min, norm_max]` = `[1e-3, 100]`):
//! - running batch statistics, updated **before** use and only in training:
//!   `μ ← α·mean(a) + (1 − α)·μ`, `σ ← α·std(a) + (1 − α)·σ` (unbiased `std`, N − 1;
//!   initial μ = 20, σ = 100, α = `t_alpha`);
//! - `ẑ = clip(h·(a − μ)/(σ + ε), −1, 1)`, `g_ang = −m·ẑ`, `g_add = m·ẑ + m`;
//! - `z_y = s·(cos(clip(θ_y + g_ang, ε, π − ε)) − g_add)`, `z_j = s·c_j`;
//!   `L = mean_i CE(z_i, y_i)`.
//!
//! High-norm (good-quality) samples get an ArcFace-like angular margin, low-norm ones a
//! CosFace-like additive margin. Shapes: embeddings `(B, D)`, labels `(B,)`, class centres
//! `weight` `(C, D)`, logits `(B, C)`. The embedding gradient flows through `x̂` only (the
//! reference backbone hands the head `x/‖x‖` and a detached `‖x‖`).
//!
//! Defaults (the paper's): m = 0.4, h = 0.333, s = 64, `t_alpha` = 0.01.
//! Kim, Jain, Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022;
//! reference code mk-minchul/AdaFace `head.py` (`AdaFace`), `net.py` (the backbone returns
//! the normalised embedding and its norm). R100 on MS1MV2: IJB-B 95.67, IJB-C 96.89
//! (TAR@FAR=1e-4). Golden tests: tests/golden/adaface_talpha_0.01.json and
//! tests/golden/adaface_talpha_1.0.json (loss, logits, gradients and the statistics after
//! the step).
//!
//! Differences from the reference, on purpose:
//! - The statistics move only when `StepContext::train` is set (the reference updates them in
//!   every forward call, evaluation included).
//! - A batch of one sample has no unbiased standard deviation (the reference's `std` gives NaN
//!   there and poisons `σ` for good): `σ` is then left unchanged (`μ` is still updated).
//! - Non-target logits are `s·c_j` directly; the reference passes them through
//!   `cos(clip(acos c_j, ε, π − ε))`, which is the identity on the clamped range (same value
//!   to rounding, same gradient).
//!
//! `margin_mode = "straight_through"` keeps the value and takes the gradient of the plain
//! cosine (`z_y = s·(c_y + sg(target − c_y))`); the default `exact` is the reference.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of};
use crate::margin::MarginMode;
use crate::{Error, Head, HeadOutput, Result, StepContext};

/// Checkpoint key of the running mean of the feature norms.
const MEAN_KEY: &str = "batch_mean";
/// Checkpoint key of the running standard deviation of the feature norms.
const STD_KEY: &str = "batch_std";

/// Hyperparameters of [`AdaFace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaFaceConfig {
    /// Scale `s`. Default 64.
    pub scale: f64,
    /// Margin `m`, in `[0, 1]`. Default 0.4.
    pub margin: f64,
    /// Concentration `h` of the norm scaler, in `(0, 10]`. Default 0.333.
    pub h: f64,
    /// EMA rate `α` of the norm statistics, in `[0, 1]` (1 = batch statistics only).
    /// Default 0.01.
    pub t_alpha: f64,
    /// `ε`: cosine clamp `[−1 + ε, 1 − ε]`, angle clip `[ε, π − ε]` and the `σ + ε`
    /// denominator, as in the reference (one constant, 1e-3). Range `[1e-12, 0.1]`.
    pub eps: f64,
    /// Lower clip of the feature norm, > 0. Default 1e-3.
    pub norm_min: f64,
    /// Upper clip of the feature norm, > `norm_min`. Default 100.
    pub norm_max: f64,
    /// Initial running mean μ of the norms. Default 20.
    pub initial_mean: f64,
    /// Initial running standard deviation σ of the norms, ≥ 0. Default 100.
    pub initial_std: f64,
    /// Exact (reference) or straight-through margin gradient. Default `exact`.
    pub margin_mode: MarginMode,
}

impl Default for AdaFaceConfig {
    fn default() -> Self {
        Self {
            scale: 64.0,
            margin: 0.4,
            h: 0.333,
            t_alpha: 0.01,
            eps: 1e-3,
            norm_min: 1e-3,
            norm_max: 100.0,
            initial_mean: 20.0,
            initial_std: 100.0,
            margin_mode: MarginMode::Exact,
        }
    }
}

impl AdaFaceConfig {
    /// Check every range; the error names the key.
    pub fn validate(&self) -> Result<()> {
        common::check_positive("scale", self.scale)?;
        common::check_range("margin", self.margin, 0.0, 1.0)?;
        common::check_range("h", self.h, 1e-12, 10.0)?;
        common::check_range("t_alpha", self.t_alpha, 0.0, 1.0)?;
        common::check_range("eps", self.eps, 1e-12, 0.1)?;
        common::check_positive("norm_min", self.norm_min)?;
        common::check_positive("norm_max", self.norm_max)?;
        if self.norm_max <= self.norm_min {
            return Err(Error::config(
                "norm_max",
                format!("must exceed norm_min = {}", self.norm_min),
            ));
        }
        if !self.initial_mean.is_finite() {
            return Err(Error::config("initial_mean", "must be finite"));
        }
        common::check_range("initial_std", self.initial_std, 0.0, f64::MAX)
    }
}

/// Quality-adaptive margin loss with running norm statistics.
#[derive(Debug, Clone)]
pub struct AdaFace {
    cfg: AdaFaceConfig,
    weight: Tensor,
    embedding_size: usize,
    num_classes: usize,
    /// Running mean μ of the clipped feature norms.
    batch_mean: f64,
    /// Running standard deviation σ of the clipped feature norms.
    batch_std: f64,
}

impl AdaFace {
    /// Create the head; `weight` `(C, D)` comes from `vb`; μ and σ start at their configured
    /// initial values.
    pub fn new(
        cfg: &AdaFaceConfig,
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
            batch_mean: cfg.initial_mean,
            batch_std: cfg.initial_std,
        })
    }

    /// The running mean μ and standard deviation σ of the feature norms.
    pub fn norm_statistics(&self) -> (f64, f64) {
        (self.batch_mean, self.batch_std)
    }

    /// Update μ and σ with a batch of clipped norms (σ only when there are two or more).
    fn update_statistics(&mut self, norms: &[f64]) {
        let n = norms.len() as f64;
        let mean = norms.iter().sum::<f64>() / n;
        let a = self.cfg.t_alpha;
        self.batch_mean = mean * a + (1.0 - a) * self.batch_mean;
        if norms.len() > 1 {
            let var = norms.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
            self.batch_std = var.sqrt() * a + (1.0 - a) * self.batch_std;
        }
    }

    /// The margin scaler `ẑ` of each sample, in `[−1, 1]`.
    fn margin_scaler(&self, norms: &[f64]) -> Vec<f64> {
        let denom = self.batch_std + self.cfg.eps;
        norms
            .iter()
            .map(|a| ((a - self.batch_mean) / denom * self.cfg.h).clamp(-1.0, 1.0))
            .collect()
    }

    /// Logits `(B, C)`, target mask and target cosines `(B,)` for given margin scalers.
    fn logits(&self, inp: &common::Inputs, scaler: &[f64]) -> Result<(Tensor, Tensor, Tensor)> {
        let (x, dtype, dev) = (&inp.x, inp.x.dtype(), inp.x.device());
        let (m, eps) = (self.cfg.margin, self.cfg.eps);
        let to_t = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, scaler.len(), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)?)
        };
        let g_ang = to_t(scaler.iter().map(|z| -m * z).collect())?;
        let g_add = to_t(scaler.iter().map(|z| m * z + m).collect())?;

        let cos = common::cosine(x, &as_dtype_of(&self.weight, x)?, eps)?;
        let mask = common::target_mask(&inp.labels_t, self.num_classes)?;
        let c = common::target_values(&cos, &mask)?;
        let margin_target = |c: &Tensor| -> Result<Tensor> {
            let theta = common::acos(c)?.add(&g_ang)?.clamp(eps, PI - eps)?;
            Ok(theta.cos()?.sub(&g_add)?)
        };
        let target = self.cfg.margin_mode.apply(&c, margin_target)?;
        let logits = (common::replace_target(&cos, &mask, &target)? * self.cfg.scale)?;
        Ok((logits, mask, c))
    }
}

impl Head for AdaFace {
    fn name(&self) -> &'static str {
        "adaface"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        // Detached, clipped norms on the host (one per sample).
        let norms: Vec<f64> = common::row_norms(&inp.x)?
            .detach()
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .map(|a| a.clamp(self.cfg.norm_min, self.cfg.norm_max))
            .collect();
        if ctx.train {
            self.update_statistics(&norms);
        }
        let scaler = self.margin_scaler(&norms);
        let (logits, mask, c) = self.logits(&inp, &scaler)?;
        let cos_target_mean = common::scalar(&c.mean_all()?)?;
        let scaler_mean = scaler.iter().sum::<f64>() / scaler.len() as f64;
        common::ce_output(
            logits,
            &mask,
            None,
            &[
                ("cos_target_mean", cos_target_mean),
                ("batch_mean", self.batch_mean),
                ("batch_std", self.batch_std),
                ("margin_scaler_mean", scaler_mean),
            ],
        )
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (
                MEAN_KEY.to_string(),
                Tensor::new(self.batch_mean, &Device::Cpu)?,
            ),
            (
                STD_KEY.to_string(),
                Tensor::new(self.batch_std, &Device::Cpu)?,
            ),
        ])
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let read = |key: &str| common::state_scalar(state, key);
        let (mean, std) = (read(MEAN_KEY)?, read(STD_KEY)?);
        self.batch_mean = mean;
        self.batch_std = std;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use candle_nn::{VarBuilder, VarMap};

    fn head(vm: &VarMap, cfg: AdaFaceConfig) -> Result<AdaFace> {
        let vb = VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu);
        AdaFace::new(&cfg, 6, 5, vb)
    }

    fn batch() -> Result<(Tensor, Tensor)> {
        // Norms from ~0.3 to ~40 so the scaler takes both signs and saturates.
        let v: Vec<f64> = (0..42)
            .map(|i| (i as f64 * 1.7 + 0.3).sin() * (1.0 + (i / 6) as f64 * 2.5))
            .collect();
        let x = Tensor::from_vec(v, (7, 6), &Device::Cpu)?;
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu)?;
        Ok((x, y))
    }

    /// The embedding gradient (through x̂; the norm, hence the margin scaler, is detached)
    /// matches finite differences at fixed scalers of both signs, saturated ones included;
    /// eval mode leaves the statistics alone.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let vm = VarMap::new();
        let mut h = head(&vm, AdaFaceConfig::default())?;
        let (x, y) = batch()?;
        let scaler = [-1.0, -0.4, 0.0, 0.2, 0.7, 1.0, -0.05];
        let err = fd_check(&x, |x| {
            let inp = common::check_inputs(x, &y, 6, 5)?;
            let (logits, mask, _) = h.logits(&inp, &scaler)?;
            common::cross_entropy(&logits, &mask, None)
        })?;
        assert!(err < 1e-6, "finite-difference error {err:e}");
        let before = h.norm_statistics();
        h.forward(&x, &y, &StepContext::default())?;
        assert_eq!(h.norm_statistics(), before);
        h.forward(&x, &y, &StepContext::train(0, 0))?;
        assert_ne!(h.norm_statistics(), before);
        Ok(())
    }

    #[test]
    fn single_sample_batch_keeps_sigma_finite() -> Result<()> {
        let vm = VarMap::new();
        let mut h = head(&vm, AdaFaceConfig::default())?;
        let x = Tensor::new(&[[3.0f64, 0.0, 4.0, 0.0, 0.0, 0.0]], &Device::Cpu)?;
        let y = Tensor::new(&[2u32], &Device::Cpu)?;
        let out = h.forward(&x, &y, &StepContext::train(0, 0))?;
        let (mu, sigma) = h.norm_statistics();
        assert!((mu - (0.01 * 5.0 + 0.99 * 20.0)).abs() < 1e-12);
        assert_eq!(sigma, 100.0);
        assert!(common::scalar(&out.loss)?.is_finite());
        Ok(())
    }

    #[test]
    fn state_round_trip_and_errors() -> Result<()> {
        let vm = VarMap::new();
        let mut h = head(&vm, AdaFaceConfig::default())?;
        h.batch_mean = 31.5;
        h.batch_std = 7.25;
        let state: BTreeMap<String, Tensor> = h.state()?.into_iter().collect();
        let mut g = head(&vm, AdaFaceConfig::default())?;
        g.load_state(&state)?;
        assert_eq!(g.norm_statistics(), (31.5, 7.25));
        assert!(g.load_state(&BTreeMap::new()).is_err());
        let mut bad = state.clone();
        bad.insert(STD_KEY.into(), Tensor::zeros(2, DType::F64, &Device::Cpu)?);
        assert!(matches!(g.load_state(&bad), Err(Error::State { ref key, .. }) if key == STD_KEY));
        let mut missing = state;
        missing.remove(MEAN_KEY);
        assert!(
            matches!(g.load_state(&missing), Err(Error::State { ref key, .. }) if key == MEAN_KEY)
        );
        Ok(())
    }

    #[test]
    fn rejects_bad_config() {
        for (cfg, key) in [
            (
                AdaFaceConfig {
                    t_alpha: 1.5,
                    ..Default::default()
                },
                "t_alpha",
            ),
            (
                AdaFaceConfig {
                    norm_max: 1e-4,
                    ..Default::default()
                },
                "norm_max",
            ),
            (
                AdaFaceConfig {
                    h: 0.0,
                    ..Default::default()
                },
                "h",
            ),
        ] {
            let err = cfg.validate().unwrap_err();
            assert!(
                matches!(err, Error::Config { key: ref k, .. } if k == key),
                "{err}"
            );
        }
    }
}
