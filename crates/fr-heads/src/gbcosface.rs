//! GB-CosFace: CosFace rewritten as two binary (softplus) terms that meet at a global,
//! slowly moving "virtual positive" cosine `P`, which balances the push on the target and on
//! the hardest negatives.
//!
//! With `c_j = ŵ_j·x̂` (embeddings `(B, D)`, class centres `(C, D)`, cosines `(B, C)`):
//! - `c_p = c_y`, `c_n = (1/s)·logsumexp_{j≠y}(s·c_j)` (a soft maximum of the negatives);
//! - `v_i = sg((c_p + c_n)/2)`;
//! - global scalar `P`: set to `mean_i v_i` on the first call, clamped to `[p_min, p_max]`
//!   before every use; `ṽ_i = v_i + α(P − v_i)` (no gradient);
//! - `L = ½·mean_i softplus(2s(ṽ_i − c_p + m)) + ½·mean_i softplus(2s(c_n − ṽ_i + m))`, each
//!   softplus written as the 2-way cross-entropy of the reference: `CE([2s(c_p − m), 2sṽ], 0)`
//!   and `CE([2s(ṽ − m), 2s·c_n], 0)`;
//! - after the step (training only): `P ← (1 − r)·P + r·mean_i v_i` (with the clamped `P`).
//!
//! With `α = 0` the loss equals CosFace with scale `s` and margin `2m`, `z_y = s(c_y − 2m)`,
//! `z_j = s·c_j`, in value and gradient (a property test; see the integration tests).
//!
//! `logits` of the output are `(B, 4)`: the two 2-way logit pairs side by side,
//! `[2s(c_p − m), 2sṽ | 2s(ṽ − m), 2s·c_n]` (class 0 of each pair is the target).
//!
//! Chen, Liu, Chen, Zhu, "GB-CosFace: Rethinking Softmax-based Face Recognition from the
//! Perspective of Open Set Classification", ACCV 2022; reference code aliyun/GB-CosFace
//! `loss/GBCosFace.py` (`GBCosFace`) on the cosines of `head/BaseHead.py`. Defaults (the
//! reference's): s = 32, m = 0.16, α = 0.15, r = 0.01, P clamped to [0.5, 0.7]. Reported vs
//! CosFace on IJB-C: +1.58 / +0.57 / +0.28 TAR at FAR 1e-6 / 1e-5 / 1e-4.
//!
//! Differences from the reference: `P` is updated only in training (`StepContext::train`; the
//! reference updates it on every call, and initialises it on the first call even in eval —
//! here an eval call before any training step uses the clamped batch mean without storing
//! it); the reference all-reduces `P` over ranks after each step, which a distributed trainer
//! must do itself through [`GbCosFace::set_p`]; cosines are clamped to
//! `[−1 + cos_eps, 1 − cos_eps]` (the reference clamps to `[−1, 1]`).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of, DEFAULT_COS_EPS};
use crate::{Error, Head, HeadOutput, Result, StepContext};

/// Checkpoint key of `P`.
const P_KEY: &str = "p";
/// Checkpoint key of the flag "P has been initialised" (1.0 or 0.0).
const INIT_KEY: &str = "p_initialised";

/// Hyperparameters of [`GbCosFace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GbCosFaceConfig {
    /// Scale `s` (the 2-way logits use `2s`). Default 32.
    pub scale: f64,
    /// Margin `m`, in `[0, 1]`. Default 0.16.
    pub margin: f64,
    /// Pull `α` of each sample's `v` towards the global `P`, in `[0, 1]`. Default 0.15.
    pub alpha: f64,
    /// EMA rate `r` of `P`, in `[0, 1]`. Default 0.01.
    pub update_rate: f64,
    /// Lower clamp of `P` (reference `min_cos_v`). Default 0.5.
    pub p_min: f64,
    /// Upper clamp of `P` (reference `max_cos_v`). Default 0.7.
    pub p_max: f64,
    /// Cosines are clamped to `[−1 + cos_eps, 1 − cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for GbCosFaceConfig {
    fn default() -> Self {
        Self {
            scale: 32.0,
            margin: 0.16,
            alpha: 0.15,
            update_rate: 0.01,
            p_min: 0.5,
            p_max: 0.7,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl GbCosFaceConfig {
    /// Check `scale > 0`, `margin`, `alpha`, `update_rate` in `[0, 1]`,
    /// `−1 ≤ p_min ≤ p_max ≤ 1`, `cos_eps` in `[0, 0.1]`.
    pub fn validate(&self) -> Result<()> {
        common::check_positive("scale", self.scale)?;
        common::check_range("margin", self.margin, 0.0, 1.0)?;
        common::check_range("alpha", self.alpha, 0.0, 1.0)?;
        common::check_range("update_rate", self.update_rate, 0.0, 1.0)?;
        common::check_range("p_min", self.p_min, -1.0, 1.0)?;
        common::check_range("p_max", self.p_max, self.p_min, 1.0)?;
        common::check_range("cos_eps", self.cos_eps, 0.0, 0.1)
    }
}

/// GB-CosFace head.
#[derive(Debug, Clone)]
pub struct GbCosFace {
    cfg: GbCosFaceConfig,
    weight: Tensor,
    embedding_size: usize,
    num_classes: usize,
    /// The global virtual positive cosine `P`; `None` before the first training step.
    p: Option<f64>,
}

impl GbCosFace {
    /// Create the head; `weight` `(C, D)` comes from `vb`. Needs `num_classes ≥ 2` (`c_n` is
    /// taken over the other classes). `P` starts uninitialised.
    pub fn new(
        cfg: &GbCosFaceConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        if num_classes < 2 {
            return Err(Error::config(
                "num_classes",
                "GB-CosFace needs at least 2 classes",
            ));
        }
        let weight = common::class_centres(&vb, embedding_size, num_classes)?;
        Ok(Self {
            cfg: cfg.clone(),
            weight,
            embedding_size,
            num_classes,
            p: None,
        })
    }

    /// The global `P` as stored (after the last update), `None` before the first training
    /// step.
    pub fn p(&self) -> Option<f64> {
        self.p
    }

    /// Overwrite `P` (e.g. with its average over ranks after each step, as the reference's
    /// all-reduce does).
    pub fn set_p(&mut self, p: f64) {
        self.p = Some(p);
    }
}

impl Head for GbCosFace {
    fn name(&self) -> &'static str {
        "gbcosface"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let cfg = &self.cfg;
        let (s, m) = (cfg.scale, cfg.margin);
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let cos = common::cosine(&inp.x, &as_dtype_of(&self.weight, &inp.x)?, cfg.cos_eps)?;
        let mask = common::target_mask(&inp.labels_t, self.num_classes)?;
        let c_p = common::target_values(&cos, &mask)?;
        // c_n = logsumexp over the negatives of s·c, divided by s; the target entry is
        // replaced by a constant far below any logit (exp underflows to exactly 0).
        let very_negative = cos.zeros_like()?.affine(1.0, -1e30)?;
        let neg_logits = mask.where_cond(&very_negative, &(&cos * s)?)?;
        let c_n = (common::logsumexp(&neg_logits)? / s)?;
        let v = ((&c_p + &c_n)? * 0.5)?.detach();
        let mean_v = common::scalar(&v.mean_all()?)?;
        let p = self.p.unwrap_or(mean_v).clamp(cfg.p_min, cfg.p_max);
        // ṽ = v + α(P − v), a constant.
        let v_pred = (&v + (v.affine(-1.0, p)? * cfg.alpha)?)?;
        let two_s = 2.0 * s;
        let logits_pos = (Tensor::stack(&[(&c_p - m)?, v_pred.clone()], 1)? * two_s)?;
        let logits_neg = (Tensor::stack(&[(&v_pred - m)?, c_n.clone()], 1)? * two_s)?;
        let b = inp.labels.len();
        let first = common::target_mask(&Tensor::zeros(b, DType::U32, cos.device())?, 2)?;
        let loss_pos = (common::cross_entropy(&logits_pos, &first, None)? * 0.5)?;
        let loss_neg = (common::cross_entropy(&logits_neg, &first, None)? * 0.5)?;
        let loss = (&loss_pos + &loss_neg)?;
        if ctx.train {
            let r = cfg.update_rate;
            self.p = Some((1.0 - r) * p + r * mean_v);
        }
        // Diagnostics of the reference: the mean probability the 2-way softmaxes give the
        // non-target entry, and the mean |α(P − v)|.
        let other = |l: &Tensor| -> Result<f64> {
            let l = l.detach();
            let lse = common::logsumexp(&l)?;
            let p1 = l.narrow(1, 1, 1)?.squeeze(1)?.sub(&lse)?.exp()?;
            common::scalar(&p1.mean_all()?)
        };
        let delta = common::scalar(&(v.affine(-1.0, p)? * cfg.alpha)?.abs()?.mean_all()?)?;
        let stats = BTreeMap::from([
            ("loss".to_string(), common::scalar(&loss)?),
            ("loss_pos".to_string(), common::scalar(&loss_pos)?),
            ("loss_neg".to_string(), common::scalar(&loss_neg)?),
            ("p".to_string(), self.p.unwrap_or(p)),
            ("delta_p".to_string(), other(&logits_pos)?),
            ("delta_n".to_string(), other(&logits_neg)?),
            ("delta".to_string(), delta),
            (
                "cos_target_mean".to_string(),
                common::scalar(&c_p.mean_all()?)?,
            ),
        ]);
        Ok(HeadOutput {
            loss,
            logits: Tensor::cat(&[logits_pos, logits_neg], D::Minus1)?,
            stats,
        })
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let (p, init) = match self.p {
            Some(p) => (p, 1.0),
            None => (0.0, 0.0),
        };
        Ok(vec![
            (P_KEY.to_string(), Tensor::new(p, &Device::Cpu)?),
            (INIT_KEY.to_string(), Tensor::new(init, &Device::Cpu)?),
        ])
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let read = |key: &str| common::state_scalar(state, key);
        let (p, init) = (read(P_KEY)?, read(INIT_KEY)?);
        self.p = (init != 0.0).then_some(p);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use candle_nn::{VarBuilder, VarMap};

    fn head(vm: &VarMap) -> Result<GbCosFace> {
        let vb = VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu);
        GbCosFace::new(&GbCosFaceConfig::default(), 6, 5, vb)
    }

    /// Gradients with respect to the embeddings match finite differences. `v` is detached
    /// by design, so the loss value depends on `x` through paths the gradient ignores unless
    /// `α = 1` (then `ṽ = P`, a constant): the check runs there, with `P` inside the clamp
    /// range; the stop-gradient itself is checked against the reference (golden test) and by
    /// the α = 0 identity with CosFace.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let cfg = GbCosFaceConfig {
            alpha: 1.0,
            scale: 8.0,
            ..Default::default()
        };
        let mut h = GbCosFace::new(&cfg, 6, 5, vb)?;
        let w: Vec<f64> = (0..30).map(|i| (i as f64 * 2.3 + 0.1).cos()).collect();
        vm.data().lock().unwrap()["weight"].set(&Tensor::from_vec(w, (5, 6), &Device::Cpu)?)?;
        h.p = Some(0.55);
        let v: Vec<f64> = (0..42).map(|i| (i as f64 * 1.3 + 0.7).sin()).collect();
        let x = Tensor::from_vec(v, (7, 6), &Device::Cpu)?;
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu)?;
        let err = fd_check(&x, |x| {
            Ok(h.clone().forward(x, &y, &StepContext::default())?.loss)
        })?;
        assert!(err < 1e-6, "finite-difference error {err:e}");
        Ok(())
    }

    /// First training call: P = clamp(batch mean of v) then one EMA step; eval leaves P
    /// alone; an eval call before any training does not initialise P.
    #[test]
    fn p_is_initialised_clamped_and_updated_in_training_only() -> Result<()> {
        let vm = VarMap::new();
        let mut h = head(&vm)?;
        let x = Tensor::from_vec(
            (0..24).map(|i| (i as f64 * 0.9).cos()).collect::<Vec<_>>(),
            (4, 6),
            &Device::Cpu,
        )?;
        let y = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu)?;
        // v by hand on the host.
        let cos = common::cosine(&x, &h.weight, DEFAULT_COS_EPS)?.to_vec2::<f64>()?;
        let mean_v = (0..4)
            .map(|i| {
                let neg: f64 = (0..5)
                    .filter(|&j| j != i)
                    .map(|j| (32.0 * cos[i][j]).exp())
                    .sum();
                (cos[i][i] + neg.ln() / 32.0) / 2.0
            })
            .sum::<f64>()
            / 4.0;
        h.forward(&x, &y, &StepContext::default())?;
        assert_eq!(h.p(), None);
        let out = h.forward(&x, &y, &StepContext::train(0, 0))?;
        let p1 = h.p().unwrap();
        let want = 0.99 * mean_v.clamp(0.5, 0.7) + 0.01 * mean_v;
        assert!((p1 - want).abs() < 1e-12, "P {p1} vs {want}");
        assert_eq!(out.stats["p"], p1);
        h.forward(&x, &y, &StepContext::default())?;
        assert_eq!(h.p(), Some(p1));
        h.forward(&x, &y, &StepContext::train(1, 0))?;
        let want = 0.99 * p1.clamp(0.5, 0.7) + 0.01 * mean_v;
        assert!((h.p().unwrap() - want).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn state_round_trip_and_errors() -> Result<()> {
        let vm = VarMap::new();
        let mut h = head(&vm)?;
        let fresh: BTreeMap<String, Tensor> = h.state()?.into_iter().collect();
        h.p = Some(0.61);
        let state: BTreeMap<String, Tensor> = h.state()?.into_iter().collect();
        let mut g = head(&vm)?;
        g.load_state(&state)?;
        assert_eq!(g.p(), Some(0.61));
        g.load_state(&fresh)?;
        assert_eq!(g.p(), None);
        assert!(g.load_state(&BTreeMap::new()).is_err());
        let mut missing = state.clone();
        missing.remove(INIT_KEY);
        assert!(g.load_state(&missing).is_err());
        let mut bad = state;
        bad.insert(P_KEY.into(), Tensor::zeros(2, DType::F64, &Device::Cpu)?);
        assert!(g.load_state(&bad).is_err());
        Ok(())
    }

    #[test]
    fn validate_names_the_key() {
        let bad = GbCosFaceConfig {
            p_max: 0.4,
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(Error::Config { key, .. }) if key == "p_max"));
        let bad = GbCosFaceConfig {
            alpha: -0.1,
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(Error::Config { key, .. }) if key == "alpha"));
    }
}
