//! EPL, empirical prototype learning: a bank of per-class "empirical prototypes" (running,
//! normalised averages of the embeddings seen for each class) supplies a second set of logits
//! that is stacked under the classifier's and trained with the same margin loss.
//!
//! Embeddings `x` `(B, D)`, class centres `W` `(C, D)`, bank `E` `(C, D)` (no gradient):
//! 1. Bank update (training only, every epoch, before use), for each sample `i`:
//!    `σ_i = E_{y_i}·sg(x̂_i)`, `f_i = σ_i/(1 + |σ_i|)` (softsign),
//!    `E_{y_i} ← normalise(f_i·E_{y_i} + (1 − f_i)·sg(x̂_i))`.
//!    Repeated labels in a batch ([`RepeatedLabels`]): `last_wins` (default, the reference on
//!    CPU: every `f_i` comes from the bank *before* the batch and the last sample of a label
//!    is written) or `sequential` (the samples of a label update its row one after another,
//!    in batch order). Both are deterministic.
//! 2. From epoch `start_vp_epoch` on (counted from 1; on when `ctx.epoch + 1 ≥
//!    start_vp_epoch`, the reference's test): EP logits `p_ij = x̂_i·sg(Ê_j)` `(B, C)` with
//!    the adaptive margin `p_iy ← p_iy − k·sg(p_iy)` (value `(1 − k)·p_iy`, gradient 1).
//! 3. The base head's margin on the classifier cosines `c_ij = ŵ_j·x̂_i`; the `2B` rows
//!    `[c ; p]` are scaled by `s` and the loss is the mean cross-entropy over all `2B` rows
//!    (over `B` rows before the start epoch). `logits` of the output are those `(2B, C)` (or
//!    `(B, C)`) rows.
//!
//! Base heads ([`EplBase`]): `cosface` (`z_y = s(c_y − m)`; the reference's `CosFace_EPL`
//! applies the margin to the classifier rows only) and `arcface` (`cos(θ_y + m)` without
//! fallback, `margin_mode` exact or straight-through; the reference's `Arcface_EPL` applies
//! it to the EP rows as well, straight-through). `ep_margin` overrides whether the EP rows get
//! the base margin; unset, it follows the reference of the chosen base. The UniFace base of
//! the paper is not provided here.
//!
//! The bank is head state (`bank`, `(C, D)`). Before any update it is initialised
//! ([`BankInit`]) with seeded Gaussian rows: `unit` (default) normalises them, as the method
//! describes unit prototypes; `gaussian` keeps N(0, 1) rows as the reference's
//! `torch.randn(C, D)` buffer does. With raw Gaussian rows (norm ≈ √D) the first update of a
//! class computes `σ` with the long row and barely moves it towards the embedding; unit rows
//! make the first update land close to the first embedding. The EP logits always use the
//! normalised bank, so untouched classes are random unit directions in both cases.
//!
//! Du et al., "EPL: Empirical Prototype Learning for Deep Face Recognition",
//! arXiv 2405.12447; reference code WakingHours-GitHub/EPL `head_EPL.py` (`CosFace_EPL`,
//! `Arcface_EPL`, `EPL`). Defaults: s = 64, m = 0.4, k = 0.7, start epoch 4, CosFace base.
//! Published: R100 on WebFace12M, IJB-C 97.60 (TAR@FAR=1e-4).
//!
//! Differences from the reference: the bank is updated only in training
//! (`StepContext::train`); eval uses it as it is. Norms are floored at 1e-12 (the reference
//! uses 1e-5 for the embeddings and class centres, which matters only for norms below 1e-5).
//! Cosines of both row sets are clamped to `[−1 + cos_eps, 1 − cos_eps]` (the reference's
//! CosFace variant clamps neither). The reference's `EPL` criterion
//! `log(1 + Σ_neg e^{z}·Σ_pos e^{−z})` is, with one positive per row, the cross-entropy used
//! here (computed stably).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::arcface::ArcFaceConfig;
use crate::common::{self, as_dtype_of, DEFAULT_COS_EPS, NORM_EPS};
use crate::margin::{Fallback, MarginMode, TargetMargin};
use crate::{Head, HeadOutput, Result, StepContext};

/// Checkpoint key of the prototype bank.
const BANK_KEY: &str = "bank";

/// The margin head the classifier and EP rows go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EplBase {
    /// `z_y = s(c_y − m)` (reference `CosFace_EPL`); `"cosface"` in configs.
    #[default]
    #[serde(rename = "cosface")]
    CosFace,
    /// `z_y = s·cos(θ_y + m)`, no fallback (reference `Arcface_EPL`); `"arcface"` in configs.
    #[serde(rename = "arcface")]
    ArcFace,
}

/// How a batch with a repeated label updates that label's bank row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RepeatedLabels {
    /// Every factor from the bank before the batch; the last sample of the label is written
    /// (the reference's indexed assignment on CPU).
    #[default]
    LastWins,
    /// The samples of a label update its row in turn, in batch order.
    Sequential,
}

/// Initial content of the prototype bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BankInit {
    /// Seeded N(0, 1) rows, normalised to unit length.
    #[default]
    Unit,
    /// Seeded N(0, 1) rows as they are (the reference's `torch.randn` buffer).
    Gaussian,
}

/// Hyperparameters of [`Epl`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EplConfig {
    /// Base margin head, `"cosface"` or `"arcface"`. Default `"cosface"`.
    pub base: EplBase,
    /// Scale `s`. Default 64.
    pub scale: f64,
    /// Margin `m` of the base head (cosine for CosFace, radians for ArcFace), in `[0, 1]`.
    /// Default 0.4.
    pub margin: f64,
    /// Adaptive EP margin `k`, in `[0, 1]`. Default 0.7.
    pub k: f64,
    /// First epoch (counted from 1) with EP rows: on when `ctx.epoch + 1 ≥ start_vp_epoch`.
    /// Default 4 (the reference's `start_vp_epoch`; 0-based epochs 3 and later).
    pub start_vp_epoch: usize,
    /// Whether the EP rows get the base margin too; unset: as the reference of the base
    /// (CosFace no, ArcFace yes).
    pub ep_margin: Option<bool>,
    /// ArcFace base only: exact or straight-through margin. Default `straight_through` (the
    /// reference's "characteristic gradient detachment").
    pub margin_mode: MarginMode,
    /// Repeated labels in a batch. Default `last_wins` (the reference).
    pub repeated_labels: RepeatedLabels,
    /// Bank initialisation. Default `unit`.
    pub bank_init: BankInit,
    /// Seed of the bank initialisation. Default 0.
    pub bank_seed: u64,
    /// Cosines are clamped to `[−1 + cos_eps, 1 − cos_eps]`, `cos_eps > 0`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for EplConfig {
    fn default() -> Self {
        Self {
            base: EplBase::CosFace,
            scale: 64.0,
            margin: 0.4,
            k: 0.7,
            start_vp_epoch: 4,
            ep_margin: None,
            margin_mode: MarginMode::StraightThrough,
            repeated_labels: RepeatedLabels::LastWins,
            bank_init: BankInit::Unit,
            bank_seed: 0,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl EplConfig {
    /// The base head's target margin: `c − m` (CosFace), or ArcFace's `cos(θ + m)` without
    /// fallback in the configured margin mode.
    fn target_margin(&self) -> TargetMargin {
        match self.base {
            EplBase::CosFace => TargetMargin::Cosine { m: self.margin },
            EplBase::ArcFace => TargetMargin::Angular(
                ArcFaceConfig {
                    scale: self.scale,
                    margin: self.margin,
                    margin_mode: self.margin_mode,
                    fallback: Fallback::None,
                    cos_eps: self.cos_eps,
                    ..ArcFaceConfig::default()
                }
                .angular_margin(),
            ),
        }
    }

    /// Whether the EP rows get the base margin.
    pub fn ep_rows_margin(&self) -> bool {
        self.ep_margin.unwrap_or(self.base == EplBase::ArcFace)
    }

    /// Check `scale > 0`, `margin` and `k` in `[0, 1]`, `cos_eps` in `[1e-12, 0.1]`.
    pub fn validate(&self) -> Result<()> {
        common::check_positive("scale", self.scale)?;
        common::check_range("margin", self.margin, 0.0, 1.0)?;
        common::check_range("k", self.k, 0.0, 1.0)?;
        common::check_range("cos_eps", self.cos_eps, 1e-12, 0.1)
    }
}

/// Empirical prototype learning on a CosFace or ArcFace base.
#[derive(Debug, Clone)]
pub struct Epl {
    cfg: EplConfig,
    /// The base head's margin on target cosines.
    margin: TargetMargin,
    weight: Tensor,
    embedding_size: usize,
    num_classes: usize,
    /// The prototype bank `(C, D)`, in the dtype and on the device of the class centres.
    bank: Tensor,
}

impl Epl {
    /// Create the head; `weight` `(C, D)` comes from `vb`, the bank is initialised as
    /// `bank_init` says, in `vb`'s dtype and on its device.
    pub fn new(
        cfg: &EplConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let weight = common::class_centres(&vb, embedding_size, num_classes)?;
        let raw = Tensor::from_vec(
            seeded_gaussian(num_classes * embedding_size, cfg.bank_seed),
            (num_classes, embedding_size),
            &Device::Cpu,
        )?;
        let bank = match cfg.bank_init {
            BankInit::Unit => common::l2_normalize(&raw)?,
            BankInit::Gaussian => raw,
        };
        let bank = bank.to_dtype(vb.dtype())?.to_device(vb.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            margin: cfg.target_margin(),
            weight,
            embedding_size,
            num_classes,
            bank,
        })
    }

    /// The prototype bank `(C, D)`.
    pub fn bank(&self) -> &Tensor {
        &self.bank
    }

    /// Apply the per-sample bank update for a batch (normalised, detached embeddings `xn`
    /// `(B, D)`, host labels) and return the new bank.
    fn updated_bank(&self, xn: &Tensor, labels: &[u32]) -> Result<Tensor> {
        let d = self.embedding_size;
        // The distinct labels in order of first appearance, and each sample's slot.
        let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
        let mut unique = Vec::new();
        let slot_of: Vec<usize> = labels
            .iter()
            .map(|&l| {
                *slots.entry(l).or_insert_with(|| {
                    unique.push(l);
                    unique.len() - 1
                })
            })
            .collect();
        let idx = Tensor::new(unique.as_slice(), self.bank.device())?;
        let old = host_rows(&self.bank.index_select(&idx, 0)?)?;
        let xs = host_rows(xn)?;
        let mut rows = old.clone();
        for (i, &slot) in slot_of.iter().enumerate() {
            let e = match self.cfg.repeated_labels {
                RepeatedLabels::LastWins => &old[slot],
                RepeatedLabels::Sequential => &rows[slot],
            };
            let x = &xs[i];
            let sigma: f64 = e.iter().zip(x).map(|(a, b)| a * b).sum();
            let f = sigma / (1.0 + sigma.abs());
            let v: Vec<f64> = e
                .iter()
                .zip(x)
                .map(|(a, b)| f * a + (1.0 - f) * b)
                .collect();
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(NORM_EPS);
            rows[slot] = v.into_iter().map(|a| a / norm).collect();
        }
        let new_rows = Tensor::from_vec(rows.concat(), (unique.len(), d), &Device::Cpu)?
            .to_dtype(self.bank.dtype())?
            .to_device(self.bank.device())?;
        replace_rows(&self.bank, &unique, &new_rows)
    }

    /// The margin-applied target values `(N,)` of target cosines `c` `(N,)`, before scaling.
    fn margin_target(&self, c: &Tensor) -> Result<Tensor> {
        self.margin.apply(c)
    }
}

/// Rows of a 2-d tensor as host f64 vectors.
fn host_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.to_vec2()?)
}

/// `bank` `(C, D)` with rows `rows[u]` replaced by `new_rows[u]` `(U, D)` (distinct `rows`),
/// without scatter: an `index_select` of the new rows and a row mask.
pub(crate) fn replace_rows(bank: &Tensor, rows: &[u32], new_rows: &Tensor) -> Result<Tensor> {
    let c = bank.dims()[0];
    let mut src = vec![0u32; c];
    let mut mask = vec![0u8; c];
    for (u, &r) in rows.iter().enumerate() {
        src[r as usize] = u as u32;
        mask[r as usize] = 1;
    }
    let dev = bank.device();
    let src = Tensor::from_vec(src, c, dev)?;
    let mask = Tensor::from_vec(mask, (c, 1), dev)?.broadcast_as(bank.shape())?;
    Ok(mask.where_cond(&new_rows.index_select(&src, 0)?, bank)?)
}

/// `n` seeded standard normal numbers (splitmix64 + Box–Muller): reproducible bank
/// initialisation on any device (candle's CPU generator cannot be seeded).
pub(crate) fn seeded_gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits in (0, 1].
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

impl Head for Epl {
    fn name(&self) -> &'static str {
        "epl"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let cfg = &self.cfg;
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let xn = common::l2_normalize(&inp.x)?;
        let w = as_dtype_of(&self.weight, &inp.x)?;
        let cos = common::clamp_cos(&xn.matmul(&common::l2_normalize(&w)?.t()?)?, cfg.cos_eps)?;
        let mask = common::target_mask(&inp.labels_t, self.num_classes)?;
        if ctx.train {
            self.bank = self.updated_bank(&xn.detach(), &inp.labels)?;
        }
        let ep_on = ctx.epoch + 1 >= cfg.start_vp_epoch;
        let b = inp.labels.len();
        let c_cls = common::target_values(&cos, &mask)?;
        let cls_target = self.margin_target(&c_cls)?;
        let mut stats = vec![
            ("cos_target_mean", common::scalar(&c_cls.mean_all()?)?),
            ("ep_rows", if ep_on { 1.0 } else { 0.0 }),
        ];
        let (all_cos, all_mask, all_target) = if ep_on {
            let e_hat = common::l2_normalize(&as_dtype_of(&self.bank, &inp.x)?)?.detach();
            let p = common::clamp_cos(&xn.matmul(&e_hat.t()?)?, cfg.cos_eps)?;
            let p_y = common::target_values(&p, &mask)?;
            // Adaptive margin: value (1 − k)·p_y, gradient 1.
            let p_y = (&p_y - (p_y.detach() * cfg.k)?)?;
            stats.push(("ep_target_mean", common::scalar(&p_y.mean_all()?)?));
            let ep_target = if cfg.ep_rows_margin() {
                self.margin_target(&p_y)?
            } else {
                p_y
            };
            (
                Tensor::cat(&[&cos, &p], 0)?,
                Tensor::cat(&[&mask, &mask], 0)?,
                Tensor::cat(&[&cls_target, &ep_target], 0)?,
            )
        } else {
            (cos, mask, cls_target)
        };
        let logits = (common::replace_target(&all_cos, &all_mask, &all_target)? * cfg.scale)?;
        let per_row = common::cross_entropy_per_sample(&logits, &all_mask, None)?;
        stats.push((
            "loss_cls",
            common::scalar(&per_row.narrow(0, 0, b)?.mean_all()?)?,
        ));
        if ep_on {
            stats.push((
                "loss_ep",
                common::scalar(&per_row.narrow(0, b, b)?.mean_all()?)?,
            ));
        }
        let loss = per_row.mean_all()?;
        common::head_output(loss, logits, &stats)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(BANK_KEY.to_string(), self.bank.copy()?)])
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let t = common::state_tensor(state, BANK_KEY, &[self.num_classes, self.embedding_size])?;
        self.bank = t
            .to_dtype(self.bank.dtype())?
            .to_device(self.bank.device())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use crate::Error;
    use candle_nn::{VarBuilder, VarMap};

    fn head(vm: &VarMap, cfg: EplConfig) -> Result<Epl> {
        let vb = VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu);
        let h = Epl::new(&cfg, 6, 5, vb)?;
        // Deterministic class weights.
        let w: Vec<f64> = (0..30).map(|i| (i as f64 * 2.3 + 0.1).cos()).collect();
        vm.data().lock().unwrap()["weight"].set(&Tensor::from_vec(w, (5, 6), &Device::Cpu)?)?;
        Ok(h)
    }

    fn x() -> Result<Tensor> {
        let v: Vec<f64> = (0..42).map(|i| (i as f64 * 1.7 + 0.3).sin()).collect();
        Ok(Tensor::from_vec(v, (7, 6), &Device::Cpu)?)
    }

    /// Gradients with respect to the embeddings match finite differences with the EP rows
    /// on, for both bases, the EP rows with and without the base margin (eval mode, so the
    /// bank stays fixed). The adaptive margin `p − k·sg(p)` and the straight-through ArcFace
    /// margin deliberately give gradients that are not the derivative of the loss value
    /// (checked against the reference in the golden test), so here `k = 0` and the margin is
    /// exact.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu)?;
        let ctx = StepContext {
            epoch: 5,
            ..StepContext::default()
        };
        for (base, ep_margin) in [
            (EplBase::CosFace, None),
            (EplBase::CosFace, Some(true)),
            (EplBase::ArcFace, None),
            (EplBase::ArcFace, Some(false)),
        ] {
            let vm = VarMap::new();
            let cfg = EplConfig {
                base,
                ep_margin,
                margin_mode: MarginMode::Exact,
                k: 0.0,
                scale: 8.0,
                ..Default::default()
            };
            let h = head(&vm, cfg)?;
            let out = h.clone().forward(&x()?, &y, &ctx)?;
            assert_eq!(out.logits.dims(), [14, 5]);
            let err = fd_check(&x()?, |x| Ok(h.clone().forward(x, &y, &ctx)?.loss))?;
            assert!(
                err < 1e-6,
                "{base:?} {ep_margin:?}: finite-difference error {err:e}"
            );
        }
        Ok(())
    }

    /// The per-sample update on a hand case: one row, two samples of the same label, both
    /// repeated-label rules; eval leaves the bank alone; untouched rows are unchanged.
    #[test]
    fn bank_update_rules() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let mut h = Epl::new(&EplConfig::default(), 2, 3, vb)?;
        let bank0 = Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0], [0.6, 0.8]], &dev)?;
        let load = |h: &mut Epl| h.load_state(&BTreeMap::from([(BANK_KEY.into(), bank0.clone())]));
        load(&mut h)?;
        let x = Tensor::new(&[[0.0f64, 2.0], [3.0, 3.0]], &dev)?;
        let y = Tensor::new(&[0u32, 0], &dev)?;
        h.forward(&x, &y, &StepContext::default())?;
        assert_eq!(h.bank().to_vec2::<f64>()?, bank0.to_vec2::<f64>()?);
        let upd = |e: [f64; 2], x: [f64; 2]| {
            let s = e[0] * x[0] + e[1] * x[1];
            let f = s / (1.0 + s.abs());
            let v = [f * e[0] + (1.0 - f) * x[0], f * e[1] + (1.0 - f) * x[1]];
            let n = (v[0] * v[0] + v[1] * v[1]).sqrt();
            [v[0] / n, v[1] / n]
        };
        let r = std::f64::consts::FRAC_1_SQRT_2;
        // last_wins: the second sample from the old row.
        h.forward(&x, &y, &StepContext::train(0, 0))?;
        let want = upd([1.0, 0.0], [r, r]);
        let got = h.bank().to_vec2::<f64>()?;
        assert!((got[0][0] - want[0]).abs() < 1e-15 && (got[0][1] - want[1]).abs() < 1e-15);
        assert_eq!(&got[1..], &bank0.to_vec2::<f64>()?[1..]);
        // sequential: the second sample from the row the first one wrote.
        h.cfg.repeated_labels = RepeatedLabels::Sequential;
        load(&mut h)?;
        h.forward(&x, &y, &StepContext::train(0, 0))?;
        let want = upd(upd([1.0, 0.0], [0.0, 1.0]), [r, r]);
        let got = h.bank().to_vec2::<f64>()?;
        assert!((got[0][0] - want[0]).abs() < 1e-15 && (got[0][1] - want[1]).abs() < 1e-15);
        Ok(())
    }

    #[test]
    fn epoch_switch_and_bank_init() -> Result<()> {
        let vm = VarMap::new();
        let mut h = head(&vm, EplConfig::default())?;
        let norms: Vec<f64> = common::row_norms(h.bank())?.to_vec1()?;
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-6));
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu)?;
        let at = |epoch| StepContext {
            epoch,
            ..StepContext::default()
        };
        assert_eq!(h.forward(&x()?, &y, &at(2))?.logits.dims(), [7, 5]);
        assert_eq!(h.forward(&x()?, &y, &at(3))?.logits.dims(), [14, 5]);
        let g = head(
            &vm,
            EplConfig {
                bank_init: BankInit::Gaussian,
                ..Default::default()
            },
        )?;
        let raw = g.bank().to_vec2::<f64>()?;
        let unit = h.bank().to_vec2::<f64>()?;
        let n0 = raw[0].iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!(
            (raw[0][0] / n0 - unit[0][0]).abs() < 1e-6,
            "same seed, same directions"
        );
        assert!((n0 - 1.0).abs() > 1e-3);
        let mean = seeded_gaussian(20000, 7)
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>()
            / 20000.0;
        assert!(mean.abs() < 0.05);
        Ok(())
    }

    #[test]
    fn state_round_trip_and_errors() -> Result<()> {
        let vm = VarMap::new();
        let mut h = head(&vm, EplConfig::default())?;
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu)?;
        h.forward(&x()?, &y, &StepContext::train(0, 0))?;
        let state: BTreeMap<String, Tensor> = h.state()?.into_iter().collect();
        let mut g = head(&vm, EplConfig::default())?;
        g.load_state(&state)?;
        assert_eq!(g.bank().to_vec2::<f64>()?, h.bank().to_vec2::<f64>()?);
        // The checkpoint is a copy: further training does not change it.
        h.forward(&x()?, &y, &StepContext::train(1, 0))?;
        assert_eq!(
            state[BANK_KEY].to_vec2::<f64>()?,
            g.bank().to_vec2::<f64>()?
        );
        assert!(g.load_state(&BTreeMap::new()).is_err());
        let bad = BTreeMap::from([(
            BANK_KEY.to_string(),
            Tensor::zeros((5, 5), DType::F64, &Device::Cpu)?,
        )]);
        assert!(matches!(g.load_state(&bad), Err(Error::State { .. })));
        let cfg = EplConfig {
            k: 1.5,
            ..Default::default()
        };
        assert!(matches!(cfg.validate(), Err(Error::Config { key, .. }) if key == "k"));
        Ok(())
    }
}
