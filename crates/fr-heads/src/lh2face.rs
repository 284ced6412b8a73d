//! LH2Face: vMF similarity with an uncertainty-aware margin, plus proxy losses (the FR loss
//! `L_FR` of "LH2Face: Loss function for Hard High-quality Face", arXiv 2506.23555).
//!
//! The paper's full text was not available: parts marked **\[P\]** come from its abstract and
//! summary; parts marked **\[R\]** are our reading, each a config option with the reading as the
//! default. The reconstruction branch (`L_reco`, `L_FR^canon`, `L_view`) lives with the renderer,
//! not here; this head computes `L_FR = L_vMF + L_proxy` **\[P\]**.
//!
//! - **vMF similarity \[P\]**: direction `x = z/‖z‖`, proxy `μ_j` = unit row j of `weight`,
//!   concentration `κ = ‖z‖` **\[P\]**, clipped to `[kappa_min, kappa_max]` **\[R\]**;
//!   `S_ij = log C_n(κ_i) + κ_i·μ_jᵀx_i`, `log C_n` the vMF log normaliser on S^(n−1)
//!   ([`crate::vmf`]), with `n = vmf_dim` a hyperparameter separate from the embedding size
//!   (default 256) **\[R\]**. Cosines are clamped to `±(1 − cos_eps)`, `cos_eps = 1e-3` **\[R\]**.
//!   Inside the class softmax `log C_n(κ_i)` cancels; it is kept in the code path because it
//!   matters in the NLL and vMF-similarity proxy terms.
//! - **Uncertainty-aware margin \[P + R\]**: `m = 0.35·μ_‖z‖` **\[P\]**, `μ_‖z‖` the detached batch
//!   mean of the raw feature norms, or an EMA of it (`norm_ema`) **\[R\]**. `margin_mode = logit`
//!   **\[R\]**: `ℓ_iy = S_iy − m`, `ℓ_ij = S_ij` (in cosine units a margin `0.35·μ/‖z_i‖`: low-norm,
//!   uncertain samples get a larger margin). `margin_mode = per_sample` (alternative reading,
//!   MagFace-like): cosine margin `m_i = 0.35·sg(‖z_i‖)/μ`, `ℓ_iy = S_iy − κ_i·m_i`.
//!   `L_vMF = mean_i CE(ℓ_i, y_i)` **\[R\]**.
//! - **Optional NLL \[R\]**: `L_nll = −mean_i S_{i y_i}` (weight `nll_weight`, default 0); its
//!   optimum in κ gives `A_n(κ) = cos θ_y`.
//! - **Proxy losses \[P names, R forms\]**: Proxy-Anchor halves over the proxies present in the
//!   batch `P_b`, α = 32, δ = 0.1:
//!   `L_pps = mean_{p∈P_b} log(1 + Σ_{i: y_i = p} exp(−α(sim_ip − δ)))`,
//!   `L_pns = mean_{p∈P_b} log(1 + Σ_{i: y_i ≠ p} exp(α(sim_ip + δ)))` (`pns_proxies = all`:
//!   over every class, as the original Proxy-Anchor), `sim` = cosine (default) or `S_ij`
//!   (`proxy_similarity = vmf`) **\[R\]**; `L_pp = mean_{p∈P_b} max_{q∈P_b, q≠p} cos(μ_p, μ_q)`
//!   over the batch's proxies only (0 when the batch has one class) **\[R\]**.
//! - **Weights \[R\]**: all 1 (`vmf_weight`, `pps_weight`, `pns_weight`, `pp_weight`).
//!
//! `stats` reports every sub-loss (`loss_vmf`, `loss_nll`, `loss_pps`, `loss_pns`, `loss_pp`),
//! the margin in logit units, the norm statistic and the mean κ.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of};
use crate::{vmf, Error, Head, HeadOutput, Result, StepContext};

/// How the uncertainty-aware margin enters the target logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UamMode {
    /// `ℓ_iy = S_iy − 0.35·μ_‖z‖` (logit units; our reading).
    #[default]
    Logit,
    /// `ℓ_iy = S_iy − κ_i·0.35·sg(‖z_i‖)/μ_‖z‖` (MagFace-like alternative reading).
    PerSample,
}

/// The similarity the proxy losses use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxySimilarity {
    /// `cos(x_i, μ_p)`.
    #[default]
    Cosine,
    /// The vMF log-density `S_ip`.
    Vmf,
}

/// The proxies `L_pns` averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxySet {
    /// The proxies of the classes present in the batch.
    #[default]
    Batch,
    /// Every class (the original Proxy-Anchor negative term).
    All,
}

/// Hyperparameters of [`Lh2Face`]; see the module docs for which are \[P\] and which \[R\].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lh2FaceConfig {
    /// vMF dimension n (S^(n−1)), ≥ 2. Default 256 \[R\].
    pub vmf_dim: usize,
    /// Lower clip of κ = ‖z‖. Default 1e-3 \[R\].
    pub kappa_min: f64,
    /// Upper clip of κ. Default 1000 \[R\].
    pub kappa_max: f64,
    /// Cosines are clamped to `±(1 − cos_eps)`. Default 1e-3 \[R\].
    pub cos_eps: f64,
    /// Margin coefficient: `m = margin_coef·μ_‖z‖`. Default 0.35 \[P\].
    pub margin_coef: f64,
    /// Where the margin enters. Default `logit` \[R\].
    pub margin_mode: UamMode,
    /// EMA momentum for `μ_‖z‖` (`μ ← (1 − a)·μ + a·batch mean`, updated before use, in training
    /// only); `None` uses the batch mean. Default `None` \[R\].
    pub norm_ema: Option<f64>,
    /// Weight of `L_vMF`. Default 1.
    pub vmf_weight: f64,
    /// Weight of the optional NLL term. Default 0 \[R\].
    pub nll_weight: f64,
    /// Weight of `L_pps`. Default 1 \[R\].
    pub pps_weight: f64,
    /// Weight of `L_pns`. Default 1 \[R\].
    pub pns_weight: f64,
    /// Weight of `L_pp`. Default 1 \[R\].
    pub pp_weight: f64,
    /// Proxy-Anchor α. Default 32 \[R\].
    pub proxy_alpha: f64,
    /// Proxy-Anchor δ. Default 0.1 \[R\].
    pub proxy_delta: f64,
    /// Similarity of the proxy losses. Default `cosine` \[R\].
    pub proxy_similarity: ProxySimilarity,
    /// Proxies `L_pns` averages over. Default `batch` \[R\].
    pub pns_proxies: ProxySet,
}

impl Default for Lh2FaceConfig {
    fn default() -> Self {
        Self {
            vmf_dim: 256,
            kappa_min: 1e-3,
            kappa_max: 1000.0,
            cos_eps: 1e-3,
            margin_coef: 0.35,
            margin_mode: UamMode::Logit,
            norm_ema: None,
            vmf_weight: 1.0,
            nll_weight: 0.0,
            pps_weight: 1.0,
            pns_weight: 1.0,
            pp_weight: 1.0,
            proxy_alpha: 32.0,
            proxy_delta: 0.1,
            proxy_similarity: ProxySimilarity::Cosine,
            pns_proxies: ProxySet::Batch,
        }
    }
}

impl Lh2FaceConfig {
    /// Check every range; the error names the key.
    pub fn validate(&self) -> Result<()> {
        if self.vmf_dim < 2 {
            return Err(Error::config(
                "vmf_dim",
                format!("must be >= 2, got {}", self.vmf_dim),
            ));
        }
        common::check_positive("kappa_min", self.kappa_min)?;
        if !(self.kappa_max.is_finite() && self.kappa_max > self.kappa_min) {
            return Err(Error::config(
                "kappa_max",
                format!(
                    "must be finite and > kappa_min = {}, got {}",
                    self.kappa_min, self.kappa_max
                ),
            ));
        }
        common::check_range("cos_eps", self.cos_eps, 1e-12, 0.1)?;
        common::check_range("margin_coef", self.margin_coef, 0.0, 10.0)?;
        if let Some(a) = self.norm_ema {
            common::check_range("norm_ema", a, 1e-9, 1.0)?;
        }
        for (key, w) in [
            ("vmf_weight", self.vmf_weight),
            ("nll_weight", self.nll_weight),
            ("pps_weight", self.pps_weight),
            ("pns_weight", self.pns_weight),
            ("pp_weight", self.pp_weight),
        ] {
            common::check_range(key, w, 0.0, 1e6)?;
        }
        common::check_positive("proxy_alpha", self.proxy_alpha)?;
        common::check_range("proxy_delta", self.proxy_delta, 0.0, 1.0)
    }
}

/// The LH2Face FR loss `L_vMF + L_pps + L_pns + L_pp` (+ optional NLL).
#[derive(Debug, Clone)]
pub struct Lh2Face {
    cfg: Lh2FaceConfig,
    weight: Tensor,
    embedding_size: usize,
    num_classes: usize,
    /// EMA of the batch mean feature norm (with `norm_ema`).
    norm_mean: Option<f64>,
}

/// Key of the EMA norm in [`Head::state`].
const NORM_MEAN_KEY: &str = "norm_mean";

impl Lh2Face {
    /// Create the head; the proxies `weight` `(C, D)` come from `vb`.
    pub fn new(
        cfg: &Lh2FaceConfig,
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
            norm_mean: None,
        })
    }

    /// The configuration the head was built with.
    pub fn config(&self) -> &Lh2FaceConfig {
        &self.cfg
    }

    /// `μ_‖z‖` for this step (updating the EMA first in training mode).
    fn norm_statistic(&mut self, batch_mean: f64, ctx: &StepContext) -> f64 {
        match self.cfg.norm_ema {
            None => batch_mean,
            Some(a) => {
                if ctx.train {
                    let m = self
                        .norm_mean
                        .map_or(batch_mean, |m| (1.0 - a) * m + a * batch_mean);
                    self.norm_mean = Some(m);
                }
                self.norm_mean.unwrap_or(batch_mean)
            }
        }
    }
}

impl Head for Lh2Face {
    fn name(&self) -> &'static str {
        "lh2face"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let cfg = self.cfg.clone();
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let (x, dev) = (&inp.x, inp.x.device());
        let w = as_dtype_of(&self.weight, x)?;

        // vMF similarity S_ij = log C_n(κ_i) + κ_i·cos_ij.
        let norm = common::row_norms(x)?;
        let kappa = norm.clamp(cfg.kappa_min, cfg.kappa_max)?;
        let wn = common::l2_normalize(&w)?;
        let xn = x.broadcast_div(&norm.unsqueeze(1)?)?;
        let cos = common::clamp_cos(&xn.matmul(&wn.t()?)?, cfg.cos_eps)?;
        let log_c = vmf::log_cn_tensor(&kappa, cfg.vmf_dim)?;
        let sim = cos
            .broadcast_mul(&kappa.unsqueeze(1)?)?
            .broadcast_add(&log_c.unsqueeze(1)?)?;

        // Uncertainty-aware margin on the target logit.
        let mask = common::target_mask(&inp.labels_t, self.num_classes)?;
        let batch_mean = common::scalar(&norm.mean_all()?)?;
        let mu = self.norm_statistic(batch_mean, ctx);
        let margin = cfg.margin_coef * mu;
        let s_y = common::target_values(&sim, &mask)?;
        let target = match cfg.margin_mode {
            UamMode::Logit => (&s_y - margin)?,
            UamMode::PerSample => {
                let m_i = (norm.detach() * (cfg.margin_coef / mu))?;
                (&s_y - kappa.mul(&m_i)?)?
            }
        };
        let logits = common::replace_target(&sim, &mask, &target)?;
        let loss_vmf = common::cross_entropy(&logits, &mask, None)?;
        let loss_nll = s_y.mean_all()?.neg()?;

        // Proxy losses over the proxies present in the batch.
        let mut present = inp.labels.clone();
        present.sort_unstable();
        present.dedup();
        let n_present = present.len();
        let idx = Tensor::from_vec(present, n_present, dev)?;
        let proxy_sim = match cfg.proxy_similarity {
            ProxySimilarity::Cosine => &cos,
            ProxySimilarity::Vmf => &sim,
        };
        let sim_b = proxy_sim.index_select(&idx, 1)?;
        let pos = inp
            .labels_t
            .unsqueeze(1)?
            .broadcast_eq(&idx.unsqueeze(0)?)?;
        let (alpha, delta) = (cfg.proxy_alpha, cfg.proxy_delta);
        let loss_pps = common::log1p_sum_exp_masked(&sim_b.affine(-alpha, alpha * delta)?, &pos)?
            .mean_all()?;
        let loss_pns = match cfg.pns_proxies {
            ProxySet::Batch => {
                common::log1p_sum_exp_masked(&sim_b.affine(alpha, alpha * delta)?, &pos.eq(0.0)?)?
            }
            ProxySet::All => common::log1p_sum_exp_masked(
                &proxy_sim.affine(alpha, alpha * delta)?,
                &mask.eq(0.0)?,
            )?,
        }
        .mean_all()?;
        let loss_pp = if n_present >= 2 {
            let wp = wn.index_select(&idx, 0)?;
            let gram = wp.matmul(&wp.t()?)?;
            let ar = Tensor::arange(0u32, n_present as u32, dev)?;
            let diag = ar.unsqueeze(1)?.broadcast_eq(&ar.unsqueeze(0)?)?;
            let below = Tensor::full(-2f64, gram.shape(), dev)?.to_dtype(gram.dtype())?;
            diag.where_cond(&below, &gram)?.max(1)?.mean_all()?
        } else {
            Tensor::zeros((), x.dtype(), dev)?
        };

        let mut loss = Tensor::zeros((), x.dtype(), dev)?;
        let parts = [
            ("loss_vmf", cfg.vmf_weight, &loss_vmf),
            ("loss_nll", cfg.nll_weight, &loss_nll),
            ("loss_pps", cfg.pps_weight, &loss_pps),
            ("loss_pns", cfg.pns_weight, &loss_pns),
            ("loss_pp", cfg.pp_weight, &loss_pp),
        ];
        let mut stats = BTreeMap::new();
        for (name, weight, part) in parts {
            stats.insert(name.to_string(), common::scalar(part)?);
            if weight != 0.0 {
                loss = (loss + (part * weight)?)?;
            }
        }
        stats.insert("loss".to_string(), common::scalar(&loss)?);
        stats.insert("margin".to_string(), margin);
        stats.insert("norm_mean".to_string(), mu);
        stats.insert("norm_batch_mean".to_string(), batch_mean);
        stats.insert(
            "kappa_mean".to_string(),
            common::scalar(&kappa.mean_all()?)?,
        );
        stats.insert(
            "cos_target_mean".to_string(),
            common::scalar(&common::target_values(&cos, &mask)?.mean_all()?)?,
        );
        Ok(HeadOutput {
            loss,
            logits,
            stats,
        })
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(match self.norm_mean {
            Some(m) => vec![(
                NORM_MEAN_KEY.to_string(),
                Tensor::new(m, &candle_core::Device::Cpu)?,
            )],
            None => Vec::new(),
        })
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        // Absent when no EMA has been taken yet.
        self.norm_mean = if state.contains_key(NORM_MEAN_KEY) {
            Some(common::state_scalar(state, NORM_MEAN_KEY)?)
        } else {
            None
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use candle_core::DType;
    use candle_core::{Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    const D: usize = 6;
    const C: usize = 5;

    fn setup(cfg: &Lh2FaceConfig) -> Result<(Lh2Face, Var, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let head = Lh2Face::new(cfg, D, C, vb)?;
        let w = vm.data().lock().unwrap()["weight"].clone();
        let wv: Vec<f64> = (0..C * D)
            .map(|i| ((i * 7 % 11) as f64 - 5.0) / 7.0)
            .collect();
        w.set(&Tensor::from_vec(wv, (C, D), &dev)?)?;
        let xv: Vec<f64> = (0..4 * D)
            .map(|i| ((i * 5 % 13) as f64 - 6.0) * (1.0 + (i / D) as f64))
            .collect();
        let x = Tensor::from_vec(xv, (4, D), &dev)?;
        let y = Tensor::new(&[1u32, 3, 1, 0], &dev)?;
        Ok((head, w, x, y))
    }

    /// Recompute the head's loss by hand on the host for the default configuration.
    #[test]
    fn default_loss_matches_a_direct_evaluation() -> Result<()> {
        let cfg = Lh2FaceConfig::default();
        let (mut head, w, x, y) = setup(&cfg)?;
        let out = head.forward(&x, &y, &StepContext::train(0, 0))?;
        let xs: Vec<Vec<f64>> = x.to_vec2()?;
        let ws: Vec<Vec<f64>> = w.as_tensor().to_vec2()?;
        let ys = [1usize, 3, 1, 0];
        let nrm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        let cosm: Vec<Vec<f64>> = xs
            .iter()
            .map(|xi| {
                ws.iter()
                    .map(|wj| {
                        let d: f64 = xi.iter().zip(wj).map(|(a, b)| a * b).sum();
                        (d / (nrm(xi) * nrm(wj))).clamp(-1.0 + 1e-3, 1.0 - 1e-3)
                    })
                    .collect()
            })
            .collect();
        let norms: Vec<f64> = xs.iter().map(|v| nrm(v)).collect();
        let mu = norms.iter().sum::<f64>() / 4.0;
        let mut l_vmf = 0.0;
        for i in 0..4 {
            let lc = vmf::log_cn(256, norms[i]);
            let row: Vec<f64> = (0..C)
                .map(|j| lc + norms[i] * cosm[i][j] - if j == ys[i] { 0.35 * mu } else { 0.0 })
                .collect();
            let mx = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            l_vmf += (lse - row[ys[i]]) / 4.0;
        }
        let present = [0usize, 1, 3];
        let (mut pps, mut pns) = (0.0, 0.0);
        for &p in &present {
            let (mut sp, mut sn) = (0.0, 0.0);
            for i in 0..4 {
                if ys[i] == p {
                    sp += (-32.0 * (cosm[i][p] - 0.1)).exp();
                } else {
                    sn += (32.0 * (cosm[i][p] + 0.1)).exp();
                }
            }
            pps += (1.0 + sp).ln() / 3.0;
            pns += (1.0 + sn).ln() / 3.0;
        }
        let mut pp = 0.0;
        for &p in &present {
            let best = present
                .iter()
                .filter(|&&q| q != p)
                .map(|&q| {
                    let d: f64 = ws[p].iter().zip(&ws[q]).map(|(a, b)| a * b).sum();
                    d / (nrm(&ws[p]) * nrm(&ws[q]))
                })
                .fold(f64::MIN, f64::max);
            pp += best / 3.0;
        }
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
        assert!(
            close(out.stats["loss_vmf"], l_vmf),
            "{} vs {l_vmf}",
            out.stats["loss_vmf"]
        );
        assert!(close(out.stats["loss_pps"], pps));
        assert!(close(out.stats["loss_pns"], pns));
        assert!(close(out.stats["loss_pp"], pp));
        assert!(close(common::scalar(&out.loss)?, l_vmf + pps + pns + pp));
        assert!(close(out.stats["margin"], 0.35 * mu));
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_for_every_option() -> Result<()> {
        let base = Lh2FaceConfig::default();
        let configs = [
            base.clone(),
            Lh2FaceConfig {
                nll_weight: 0.5,
                vmf_dim: 16,
                ..base.clone()
            },
            Lh2FaceConfig {
                proxy_similarity: ProxySimilarity::Vmf,
                proxy_alpha: 0.05,
                pns_proxies: ProxySet::All,
                ..base.clone()
            },
            Lh2FaceConfig {
                margin_mode: UamMode::PerSample,
                kappa_max: 20.0,
                ..base
            },
        ];
        for cfg in configs {
            let (mut head, w, x, y) = setup(&cfg)?;
            let w0 = w.as_tensor().copy()?;
            let ctx = StepContext::default();
            // μ is a detached statistic: freeze it (an EMA value read in evaluation mode) so the
            // finite differences do not see it move.
            head.norm_mean = Some(common::scalar(&common::row_norms(&x)?.mean_all()?)?);
            head.cfg.norm_ema = Some(0.5);
            // The per-sample margin uses the detached norm ‖z_i‖ by design: finite differences
            // in x would see it move, so that mode is checked in W only.
            if cfg.margin_mode == UamMode::Logit {
                let err_x = fd_check(&x, |x| Ok(head.clone().forward(x, &y, &ctx)?.loss))?;
                assert!(err_x < 1e-5, "{cfg:?}: dx fd error {err_x}");
            }
            let err_w = fd_check(&w0, |wt| {
                let mut h = head.clone();
                h.weight = wt.clone();
                Ok(h.forward(&x, &y, &ctx)?.loss)
            })?;
            assert!(err_w < 1e-5, "{cfg:?}: dW fd error {err_w}");
        }
        Ok(())
    }

    #[test]
    fn ema_state_round_trips() -> Result<()> {
        let cfg = Lh2FaceConfig {
            norm_ema: Some(0.5),
            ..Default::default()
        };
        let (mut head, _, x, y) = setup(&cfg)?;
        let batch = common::scalar(&common::row_norms(&x)?.mean_all()?)?;
        head.forward(&x, &y, &StepContext::train(0, 0))?;
        assert_eq!(head.norm_mean, Some(batch));
        let x2 = (&x * 2.0)?;
        let out = head.forward(&x2, &y, &StepContext::train(1, 0))?;
        assert!((out.stats["norm_mean"] - 1.5 * batch).abs() < 1e-12 * batch);
        // Evaluation does not update it.
        head.forward(&x2, &y, &StepContext::default())?;
        let state: BTreeMap<String, Tensor> = head.state()?.into_iter().collect();
        let (mut fresh, _, _, _) = setup(&cfg)?;
        fresh.load_state(&state)?;
        assert_eq!(fresh.norm_mean, head.norm_mean);
        assert!((fresh.norm_mean.unwrap() - 1.5 * batch).abs() < 1e-12 * batch);
        Ok(())
    }

    #[test]
    fn single_class_batch_has_zero_repulsion() -> Result<()> {
        let (mut head, _, x, _) = setup(&Lh2FaceConfig::default())?;
        let y = Tensor::new(&[2u32, 2, 2, 2], &Device::Cpu)?;
        let out = head.forward(&x, &y, &StepContext::default())?;
        assert_eq!(out.stats["loss_pp"], 0.0);
        assert_eq!(out.stats["loss_pns"], 0.0);
        Ok(())
    }

    #[test]
    fn rejects_bad_config() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let cfg = Lh2FaceConfig {
            kappa_max: 1e-4,
            ..Default::default()
        };
        let err = Lh2Face::new(&cfg, 4, 3, vb).unwrap_err();
        assert!(
            matches!(err, Error::Config { ref key, .. } if key == "kappa_max"),
            "{err}"
        );
    }
}
