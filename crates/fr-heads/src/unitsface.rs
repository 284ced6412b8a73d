//! UniTSFace: the unified-threshold sample-to-sample loss (USS) against a memory of recent
//! embeddings, combined with a CosFace sample-to-class loss.
//!
//! State: a memory `M` `(C, D)` holding, per class, the latest (detached) embedding of that
//! class seen in training, and a filled mask `(C,)`; a class's memory slot takes part in the
//! loss only once it has been filled. With `p_i = cos(x_i, M_{y_i})`, `n_ij = cos(x_i, M_j)`
//! (x `(B, D)`):
//! - USS logits `z_{i,y_i} = s·(p_i − m) − b`, `z_ij = s·n_ij − b` (j ≠ y_i), `(B, C)`;
//! - `L_uss = mean_i [ softplus(−z_{i,y_i}) + Σ_{j≠y_i} softplus(z_ij) ]`, summing only over
//!   filled classes (a row whose own class is unfilled has no positive term), stable unclamped
//!   softplus (see [`crate::uniface::softplus`]);
//! - `b` is a learnable scalar `bias` `()` (through the `VarBuilder`), initialised from the
//!   first training batch in which the USS term is active and some negative slot is filled:
//!   `b = mean_i logsumexp_{j≠y_i, filled} (s·n_ij)` over the rows that have a filled negative,
//!   rounded to f32 (the reference keeps the bias in float32);
//! - total `L = w_c·L_CosFace + w_u·L_uss` from epoch `uss_start_epoch` (default 1), and
//!   `L = L_CosFace` before it (the memory fills during those epochs). The CosFace part
//!   (`z_y = s_c·(c_y − m_c)`, `s_c = 64`, `m_c = 0.4`, plain cross-entropy) is
//!   [`crate::cosface::CosFace`] with its class centres `weight` `(C, D)`.
//! - After the loss, in training only (`StepContext::train`), each sample's detached embedding
//!   is written to `M[y_i]` in batch order (a later duplicate wins) and the slot marked filled.
//!
//! `logits` are the CosFace logits whenever the CosFace term is computed, and the USS logits
//! above (before any clamp; unfilled columns hold `−b`) when it is not (`cosface_weight = 0`
//! after the start epoch). While the USS term is inactive the bias is attached to the loss with
//! a zero coefficient, so it receives a (zero) gradient like every other parameter.
//!
//! Source: Li, Jia, Zhou, Shen, Duan, "UniTSFace: Unified Threshold Integrated Sample-to-Sample
//! Loss for Face Recognition", NeurIPS 2023; reference code CVI-SZU/UniTSFace `head.py`
//! (`Unified_Threshold_Integrated_Sample_to_Sample_Loss`: s = 64, m = 0.1) and `backbone.py`
//! (CosFace `Normalized_Softmax_Loss` s = 64, m = 0.4 at epoch 0, the sum of both losses from
//! epoch 1, memory written after the loss). The specification records no headline numbers.
//!
//! Differences from the reference, on purpose:
//! - the reference memory starts as uninitialised float32 storage and every slot enters the
//!   loss at once; here unfilled slots are masked out (also in the bias initialisation);
//! - the reference (re)initialises the bias whenever its value is `≤ 0`, so a bias trained
//!   down to 0 would be silently reset; here it is initialised once (the `bias_initialized`
//!   state entry);
//! - the reference clamps logits to `[−s, s]` (zero gradient outside, e.g. for a positive pair
//!   with `p ≈ −1`); the default here is unclamped, `clamp_logits = true` reproduces it
//!   (tests/golden/unitsface_uss.json);
//! - the memory is kept in the parameter dtype of the `VarBuilder` (the reference: float32),
//!   and is updated only in training mode (the reference: every forward call in training).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of, DEFAULT_COS_EPS};
use crate::cosface::{CosFace, CosFaceConfig};
use crate::{Head, HeadOutput, Result, StepContext};

/// Checkpoint key of the memory `(C, D)`.
pub const MEMORY_KEY: &str = "memory";
/// Checkpoint key of the filled mask `(C,)` (u8, 1 = filled).
pub const FILLED_KEY: &str = "filled";
/// Checkpoint key of the bias-initialised flag `()` (u8).
pub const BIAS_INIT_KEY: &str = "bias_initialized";

/// Hyperparameters of [`UniTsFace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UniTsFaceConfig {
    /// USS scale `s`. Default 64.
    pub scale: f64,
    /// USS margin `m` on the positive pair, in `[0, 1]`. Default 0.1.
    pub margin: f64,
    /// CosFace scale. Default 64.
    pub cosface_scale: f64,
    /// CosFace margin, in `[0, 1]`. Default 0.4.
    pub cosface_margin: f64,
    /// Weight `w_c` of CosFace once the USS term is active (before, CosFace has weight 1);
    /// 0 trains with USS alone (the reference's `combine=False`). Default 1.
    pub cosface_weight: f64,
    /// Weight `w_u` of the USS term. Default 1.
    pub uss_weight: f64,
    /// First (0-based) epoch of the USS term. Default 1.
    pub uss_start_epoch: usize,
    /// Clamp USS logits to `[−s, s]` as the reference does. Default `false`.
    pub clamp_logits: bool,
    /// Cosines are clamped to `[−1 + cos_eps, 1 − cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for UniTsFaceConfig {
    fn default() -> Self {
        Self {
            scale: 64.0,
            margin: 0.1,
            cosface_scale: 64.0,
            cosface_margin: 0.4,
            cosface_weight: 1.0,
            uss_weight: 1.0,
            uss_start_epoch: 1,
            clamp_logits: false,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl UniTsFaceConfig {
    /// The reference's USS: logits clamped to `[−s, s]`.
    pub fn reference() -> Self {
        Self {
            clamp_logits: true,
            ..Self::default()
        }
    }

    fn cosface(&self) -> CosFaceConfig {
        CosFaceConfig {
            scale: self.cosface_scale,
            margin: self.cosface_margin,
            clamp_p_target: false,
            cos_eps: self.cos_eps,
        }
    }

    /// Check the scales (`> 0`), margins (`[0, 1]`), weights (`≥ 0`), `cos_eps`.
    pub fn validate(&self) -> Result<()> {
        common::check_positive("scale", self.scale)?;
        common::check_range("margin", self.margin, 0.0, 1.0)?;
        common::check_positive("cosface_scale", self.cosface_scale)?;
        common::check_range("cosface_margin", self.cosface_margin, 0.0, 1.0)?;
        common::check_range("cosface_weight", self.cosface_weight, 0.0, f64::MAX)?;
        common::check_range("uss_weight", self.uss_weight, 0.0, f64::MAX)?;
        common::check_range("cos_eps", self.cos_eps, 0.0, 0.1)
    }
}

/// USS + CosFace with a per-class sample memory. See the module docs.
#[derive(Debug, Clone)]
pub struct UniTsFace {
    cfg: UniTsFaceConfig,
    cosface: CosFace,
    bias: Var,
    memory: Tensor,
    filled: Vec<bool>,
    bias_initialized: bool,
    embedding_size: usize,
    num_classes: usize,
}

impl UniTsFace {
    /// Create the head; `weight` `(C, D)` and `bias` `()` (initial value 0) come from `vb`;
    /// the memory starts empty (zeros, nothing filled) in `vb`'s dtype.
    pub fn new(
        cfg: &UniTsFaceConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let cosface = CosFace::new(&cfg.cosface(), embedding_size, num_classes, vb.clone())?;
        let bias = vb.get_with_hints((), "bias", candle_nn::Init::Const(0.0))?;
        let memory = Tensor::zeros((num_classes, embedding_size), vb.dtype(), vb.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            cosface,
            bias: Var::from_tensor(&bias)?,
            memory,
            filled: vec![false; num_classes],
            bias_initialized: false,
            embedding_size,
            num_classes,
        })
    }

    /// The memory `(C, D)` (zeros in unfilled slots).
    pub fn memory(&self) -> &Tensor {
        &self.memory
    }

    /// Which memory slots are filled.
    pub fn filled(&self) -> &[bool] {
        &self.filled
    }

    /// The USS logits `(B, C)` (before any clamp), the target mask and the validity mask of the
    /// filled columns `(B, C)`.
    fn uss_logits(
        &mut self,
        x: &Tensor,
        labels_t: &Tensor,
        labels: &[u32],
        train: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mem = as_dtype_of(&self.memory, x)?;
        let cos = common::cosine(x, &mem, self.cfg.cos_eps)?;
        let mask = common::target_mask(labels_t, self.num_classes)?;
        let filled: Vec<u8> = self.filled.iter().map(|&f| u8::from(f)).collect();
        let valid = Tensor::from_vec(filled, (1, self.num_classes), x.device())?
            .broadcast_as(cos.shape())?
            .contiguous()?;
        if train && !self.bias_initialized {
            self.init_bias(&cos, labels)?;
        }
        let onehot = mask.to_dtype(cos.dtype())?;
        let bias = as_dtype_of(self.bias.as_tensor(), x)?;
        let z = ((&cos - (&onehot * self.cfg.margin)?)? * self.cfg.scale)?.broadcast_sub(&bias)?;
        Ok((z, mask, valid))
    }

    /// `b = mean_i logsumexp_{j ≠ y_i, filled} s·n_ij` over rows with a filled negative,
    /// rounded to f32; nothing happens when no row has one.
    fn init_bias(&mut self, cos: &Tensor, labels: &[u32]) -> Result<()> {
        let rows: Vec<Vec<f64>> = cos.to_dtype(DType::F64)?.to_vec2()?;
        let s = self.cfg.scale;
        let lses: Vec<f64> = rows
            .iter()
            .zip(labels)
            .filter_map(|(row, &y)| {
                let neg: Vec<f64> = row
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != y as usize && self.filled[j])
                    .map(|(_, &c)| s * c)
                    .collect();
                let max = neg.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (!neg.is_empty())
                    .then(|| max + neg.iter().map(|v| (v - max).exp()).sum::<f64>().ln())
            })
            .collect();
        if lses.is_empty() {
            return Ok(());
        }
        let b = (lses.iter().sum::<f64>() / lses.len() as f64) as f32 as f64;
        let t = self.bias.as_tensor();
        self.bias
            .set(&Tensor::new(b, t.device())?.to_dtype(t.dtype())?)?;
        self.bias_initialized = true;
        Ok(())
    }

    /// Write each sample's detached embedding into its class slot (later duplicates win).
    fn update_memory(&mut self, x: &Tensor, labels: &[u32]) -> Result<()> {
        let mut src = vec![0u32; self.num_classes];
        let mut upd = vec![0u8; self.num_classes];
        for (i, &y) in labels.iter().enumerate() {
            src[y as usize] = i as u32;
            upd[y as usize] = 1;
            self.filled[y as usize] = true;
        }
        let dev = self.memory.device();
        let rows = x
            .detach()
            .to_dtype(self.memory.dtype())?
            .to_device(dev)?
            .index_select(&Tensor::new(src.as_slice(), dev)?, 0)?;
        let upd = Tensor::from_vec(upd, (self.num_classes, 1), dev)?
            .broadcast_as(self.memory.shape())?
            .contiguous()?;
        self.memory = upd.where_cond(&rows, &self.memory)?;
        Ok(())
    }
}

impl Head for UniTsFace {
    fn name(&self) -> &'static str {
        "unitsface"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let active = ctx.epoch >= self.cfg.uss_start_epoch;
        let mut stats = BTreeMap::new();
        let cos_part = if !active || self.cfg.cosface_weight > 0.0 {
            let out = self.cosface.forward(&inp.x, labels, ctx)?;
            let w = if active { self.cfg.cosface_weight } else { 1.0 };
            stats.insert("cosface_loss".to_string(), out.stats["loss"]);
            stats.insert("cos_target_mean".to_string(), out.stats["cos_target_mean"]);
            Some(((out.loss * w)?, out.logits))
        } else {
            None
        };
        let uss_part = if active {
            let (z, mask, valid) =
                self.uss_logits(&inp.x, &inp.labels_t, &inp.labels, ctx.train)?;
            // Unfilled columns: z = 0 there, then both BCE terms are replaced by 0.
            let zero = z.zeros_like()?;
            let zv = valid.where_cond(&z, &zero)?;
            let clamp = self.cfg.clamp_logits.then_some(self.cfg.scale);
            let per_pair_mask = valid.mul(&mask)?;
            let loss = masked_pair_bce(&zv, &per_pair_mask, &valid, clamp)?;
            stats.insert("uss_loss".to_string(), common::scalar(&loss)?);
            Some(((loss * self.cfg.uss_weight)?, z))
        } else {
            None
        };
        let bias = as_dtype_of(self.bias.as_tensor(), &inp.x)?;
        let (loss, logits) = match (cos_part, uss_part) {
            (Some((lc, logits)), Some((lu, _))) => ((lc + lu)?, logits),
            (None, Some((lu, z))) => (lu, z),
            // USS inactive: attach the bias with a zero coefficient (a tensor: candle prunes an
            // affine map with factor 0 from the graph).
            (Some((lc, logits)), None) => ((lc + bias.mul(&bias.zeros_like()?)?)?, logits),
            (None, None) => unreachable!("CosFace runs whenever USS is inactive"),
        };
        if ctx.train {
            self.update_memory(&inp.x, &inp.labels)?;
        }
        stats.insert("loss".to_string(), common::scalar(&loss)?);
        stats.insert("bias".to_string(), common::scalar(self.bias.as_tensor())?);
        let filled = self.filled.iter().filter(|&&f| f).count();
        stats.insert(
            "memory_filled".to_string(),
            filled as f64 / self.num_classes as f64,
        );
        Ok(HeadOutput {
            loss,
            logits,
            stats,
        })
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let filled: Vec<u8> = self.filled.iter().map(|&f| u8::from(f)).collect();
        Ok(vec![
            (MEMORY_KEY.to_string(), self.memory.clone()),
            (
                FILLED_KEY.to_string(),
                Tensor::from_vec(filled, self.num_classes, &Device::Cpu)?,
            ),
            (
                BIAS_INIT_KEY.to_string(),
                Tensor::new(u8::from(self.bias_initialized), &Device::Cpu)?,
            ),
        ])
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let get = |key: &str, dims: &[usize]| common::state_tensor(state, key, dims).cloned();
        let memory = get(MEMORY_KEY, &[self.num_classes, self.embedding_size])?;
        let filled = get(FILLED_KEY, &[self.num_classes])?;
        let init = get(BIAS_INIT_KEY, &[])?;
        let filled: Vec<f64> = filled.to_dtype(DType::F64)?.to_vec1()?;
        self.memory = memory
            .to_dtype(self.memory.dtype())?
            .to_device(self.memory.device())?;
        self.filled = filled.iter().map(|&f| f != 0.0).collect();
        self.bias_initialized = common::scalar(&init)? != 0.0;
        Ok(())
    }
}

/// The per-pair BCE of [`crate::uniface`] restricted to the `valid` pairs: `softplus(−z)` where `pos` is set,
/// `softplus(z)` on the other valid pairs, 0 elsewhere; summed over classes, averaged over the
/// batch.
fn masked_pair_bce(z: &Tensor, pos: &Tensor, valid: &Tensor, clamp: Option<f64>) -> Result<Tensor> {
    let z = match clamp {
        Some(s) => z.clamp(-s, s)?,
        None => z.clone(),
    };
    let sp_pos = crate::uniface::softplus(&z.neg()?)?;
    let sp_neg = crate::uniface::softplus(&z)?;
    let per = pos.where_cond(&sp_pos, &sp_neg)?;
    let per = valid.where_cond(&per, &per.zeros_like()?)?;
    Ok(per.sum(1)?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use crate::Error;
    use candle_nn::{VarBuilder, VarMap};

    fn head(vm: &VarMap, cfg: &UniTsFaceConfig) -> Result<UniTsFace> {
        let vb = VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu);
        UniTsFace::new(cfg, 6, 5, vb)
    }

    fn data() -> (Tensor, Tensor) {
        let v: Vec<f64> = (0..42).map(|i| (i as f64 * 1.7 + 0.3).sin()).collect();
        let x = Tensor::from_vec(v, (7, 6), &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 1, 2, 3, 1, 0, 2], &Device::Cpu).unwrap();
        (x, y)
    }

    /// Fill the memory with one batch (classes 0–3; class 4 stays empty), then check the
    /// combined loss's gradients by finite differences at epoch 1 in eval mode.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let (x, y) = data();
        let vm = VarMap::new();
        let mut h = head(&vm, &UniTsFaceConfig::default())?;
        let warm = (x.flip(&[0])? * 2.0)?; // any batch, rows reversed
        h.forward(&warm, &y, &StepContext::train(0, 0))?;
        assert_eq!(h.filled(), [true, true, true, true, false]);
        assert!(!h.bias_initialized);
        // First USS step initialises b (from the filled negatives only).
        h.forward(&x, &y, &StepContext::train(1, 1))?;
        assert!(h.bias_initialized);
        let b = common::scalar(h.bias.as_tensor())?;
        assert!(b > 0.0 && b == b as f32 as f64, "bias {b}");
        for cfg in [
            UniTsFaceConfig::default(),
            UniTsFaceConfig {
                cosface_weight: 0.0,
                scale: 16.0,
                ..UniTsFaceConfig::reference()
            },
        ] {
            let mut g = h.clone();
            g.cfg = cfg.clone();
            g.cosface = CosFace::new(
                &cfg.cosface(),
                6,
                5,
                VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
            )?;
            let ctx = StepContext {
                step: 2,
                epoch: 1,
                train: false,
            };
            let err = fd_check(&x, |x| Ok(g.clone().forward(x, &y, &ctx)?.loss))?;
            assert!(err < 1e-6, "x fd error {err:e}");
            let b0 = g.bias.as_tensor().copy()?;
            let err = fd_check(&b0, |b| {
                let mut k = g.clone();
                k.bias = Var::from_tensor(b)?;
                Ok(k.forward(&x, &y, &ctx)?.loss)
            })?;
            assert!(err < 1e-6, "bias fd error {err:e}");
        }
        Ok(())
    }

    #[test]
    fn memory_update_last_duplicate_wins_and_only_in_training() -> Result<()> {
        let (x, y) = data();
        let vm = VarMap::new();
        let mut h = head(&vm, &UniTsFaceConfig::default())?;
        h.forward(&x, &y, &StepContext::default())?;
        assert!(h.filled().iter().all(|f| !f));
        h.forward(&x, &y, &StepContext::train(0, 0))?;
        let mem: Vec<Vec<f64>> = h.memory().to_vec2()?;
        let xs: Vec<Vec<f64>> = x.to_vec2()?;
        // Class 0: rows 0 and 5 → 5; class 1: rows 1, 4 → 4; class 2: rows 2, 6 → 6; 3: row 3.
        for (class, row) in [(0, 5), (1, 4), (2, 6), (3, 3)] {
            assert_eq!(mem[class], xs[row]);
        }
        assert!(mem[4].iter().all(|&v| v == 0.0));
        Ok(())
    }

    #[test]
    fn state_round_trip_and_errors() -> Result<()> {
        let (x, y) = data();
        let vm = VarMap::new();
        let mut h = head(&vm, &UniTsFaceConfig::default())?;
        h.forward(&x, &y, &StepContext::train(0, 0))?;
        h.forward(&x, &y, &StepContext::train(1, 1))?;
        let state: BTreeMap<String, Tensor> = h.state()?.into_iter().collect();
        let mut g = head(&VarMap::new(), &UniTsFaceConfig::default())?;
        g.load_state(&state)?;
        assert_eq!(g.filled(), h.filled());
        assert!(g.bias_initialized);
        let d = (g.memory() - h.memory())?.abs()?.max_all()?;
        assert_eq!(common::scalar(&d)?, 0.0);
        for key in [MEMORY_KEY, FILLED_KEY, BIAS_INIT_KEY] {
            let mut missing = state.clone();
            missing.remove(key);
            assert!(
                matches!(g.load_state(&missing), Err(Error::State { key: ref k, .. }) if k == key)
            );
        }
        let mut bad = state.clone();
        bad.insert(
            MEMORY_KEY.into(),
            Tensor::zeros((5, 7), DType::F64, &Device::Cpu)?,
        );
        assert!(g.load_state(&bad).is_err());
        let mut bad = state;
        bad.insert(
            FILLED_KEY.into(),
            Tensor::zeros(4, DType::U8, &Device::Cpu)?,
        );
        assert!(g.load_state(&bad).is_err());
        Ok(())
    }

    #[test]
    fn validation_names_the_key() {
        for (cfg, key) in [
            (
                UniTsFaceConfig {
                    scale: -1.0,
                    ..Default::default()
                },
                "scale",
            ),
            (
                UniTsFaceConfig {
                    cosface_margin: 2.0,
                    ..Default::default()
                },
                "cosface_margin",
            ),
            (
                UniTsFaceConfig {
                    uss_weight: f64::NAN,
                    ..Default::default()
                },
                "uss_weight",
            ),
        ] {
            assert!(matches!(cfg.validate(), Err(Error::Config { key: ref k, .. }) if k == key));
        }
    }
}
