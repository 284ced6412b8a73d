//! Batch-hard triplet loss, and the joint head of an angular-margin softmax + batch-hard
//! triplet (+ attribute BCE) used for re-identification (ISVC 2022).
//!
//! Batch-hard triplet on embeddings x `(B, D)` (raw, or L2-normalised with `normalize`),
//! Euclidean distances `d_ij = ‖x_i − x_j‖` (floored at 1e-12 under the square root):
//! - `d_ap(i) = max_{j ≠ i, y_j = y_i} d_ij` (hardest positive), `d_an(i) = min_{y_j ≠ y_i} d_ij`
//!   (hardest negative);
//! - soft margin `ℓ_i = softplus(d_ap − d_an)` or hinge `ℓ_i = max(0, μ + d_ap − d_an)`;
//! - `L_tri = mean of ℓ_i over the rows that have a positive and a negative in the batch`.
//!   Rows whose class has no other sample, or a batch of one class, contribute nothing (and a
//!   batch without any such row gives 0 with a zero gradient): use a P x K sampler
//!   (`fr_data::sampler`) so that every row has both.
//!
//! Joint head `triplet_joint` ([`TripletJoint`]): `L = L_angular + w·L_tri`, `L_angular` a
//! CosFace (`m ≥ 0`, m = 0 is NormFace) or ArcFace head from [`crate::cosface`] /
//! [`crate::arcface`] (with its class centres `weight` `(C, D)`); its `logits` are the angular
//! head's. The attribute term `Σ L_attr` needs attribute labels, which the [`Head`] trait does
//! not carry: compute it with [`attribute_bce`] and add it to the head's loss in the training
//! loop. The paper's weights could not be pinned *(unverified)*: `triplet_weight` (default 1),
//! `kind` (default soft margin) and `margin` (μ, default 0.3, the usual re-id value) are config
//! keys. The specification records no headline numbers.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::arcface::{ArcFace, ArcFaceConfig};
use crate::common;
use crate::cosface::{CosFace, CosFaceConfig};
use crate::uniface::softplus;
use crate::{Error, Head, HeadOutput, Result, StepContext};

/// Soft-margin or hinge triplet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TripletKind {
    /// `softplus(d_ap − d_an)`.
    #[default]
    SoftMargin,
    /// `max(0, μ + d_ap − d_an)`.
    Hinge,
}

/// Options of [`batch_hard_triplet`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TripletOptions {
    /// L2-normalise the embeddings before the distances. Default `true`.
    pub normalize: bool,
    /// Soft margin (default) or hinge.
    pub kind: TripletKind,
    /// Hinge margin μ ≥ 0 (ignored by the soft margin). Default 0.3.
    pub margin: f64,
}

impl Default for TripletOptions {
    fn default() -> Self {
        Self {
            normalize: true,
            kind: TripletKind::SoftMargin,
            margin: 0.3,
        }
    }
}

/// The batch-hard triplet loss `()` of `x` `(B, D)` with host labels, and the number of rows
/// that contributed (see the module docs).
///
/// # Errors
/// A label count different from `B`, candle errors.
pub fn batch_hard_triplet(
    x: &Tensor,
    labels: &[u32],
    opts: &TripletOptions,
) -> Result<(Tensor, usize)> {
    let (b, _) = x.dims2()?;
    if labels.len() != b {
        return Err(Error::Shape {
            what: "labels".into(),
            expected: format!("{b} labels"),
            got: format!("{}", labels.len()),
        });
    }
    let x = if opts.normalize {
        common::l2_normalize(x)?
    } else {
        x.clone()
    };
    let sq = x.sqr()?.sum_keepdim(1)?; // (B, 1)
    let d2 = sq
        .broadcast_add(&sq.t()?)?
        .sub(&(x.matmul(&x.t()?)? * 2.0)?)?;
    let dist = d2.maximum(1e-24)?.sqrt()?;
    let (mut pos, mut neg, mut valid) = (vec![0u8; b * b], vec![0u8; b * b], vec![0u8; b]);
    for i in 0..b {
        for j in 0..b {
            let same = labels[i] == labels[j];
            pos[i * b + j] = u8::from(same && i != j);
            neg[i * b + j] = u8::from(!same);
        }
        let row = i * b..(i + 1) * b;
        valid[i] = u8::from(pos[row.clone()].contains(&1) && neg[row].contains(&1));
    }
    let dev = x.device();
    let pos = Tensor::from_vec(pos, (b, b), dev)?;
    let neg = Tensor::from_vec(neg, (b, b), dev)?;
    let n_valid = valid.iter().filter(|&&v| v == 1).count();
    let valid = Tensor::from_vec(valid, b, dev)?;
    let big = (dist.ones_like()? * 1e6)?;
    let d_ap = pos.where_cond(&dist, &big.neg()?)?.max(D::Minus1)?;
    let d_an = neg.where_cond(&dist, &big)?.min(D::Minus1)?;
    let gap = (d_ap - d_an)?;
    let zero = gap.zeros_like()?;
    // Invalid rows: the gap is replaced by 0 before the loss, then the loss by 0.
    let gap = valid.where_cond(&gap, &zero)?;
    let per = match opts.kind {
        TripletKind::SoftMargin => softplus(&gap)?,
        TripletKind::Hinge => (gap + opts.margin)?.relu()?,
    };
    let per = valid.where_cond(&per, &zero)?;
    Ok(((per.sum_all()? / n_valid.max(1) as f64)?, n_valid))
}

/// Multi-label attribute loss: the mean over all `B·A` entries of the binary cross-entropy
/// with logits, `softplus(z) − t·z` (stable for any `z`), for logits `(B, A)` and targets
/// `(B, A)` in `[0, 1]`.
///
/// # Errors
/// Shape mismatch, candle errors.
pub fn attribute_bce(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.dims() != targets.dims() || logits.rank() != 2 {
        return Err(Error::Shape {
            what: "attribute targets".into(),
            expected: format!("(B, A) = {:?}", logits.dims()),
            got: format!("{:?}", targets.dims()),
        });
    }
    let t = targets.to_dtype(logits.dtype())?;
    Ok((softplus(logits)? - (logits * t)?)?.mean_all()?)
}

/// The angular softmax part of [`TripletJointConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AngularConfig {
    /// CosFace / AM-Softmax (`margin = 0` allowed).
    CosFace(CosFaceConfig),
    /// ArcFace (`margin = 0` allowed).
    ArcFace(ArcFaceConfig),
}

impl Default for AngularConfig {
    fn default() -> Self {
        Self::CosFace(CosFaceConfig::default())
    }
}

/// Hyperparameters of [`TripletJoint`] (weights *(unverified)*).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TripletJointConfig {
    /// The angular softmax. Default CosFace (s = 64, m = 0.35).
    pub angular: AngularConfig,
    /// Weight `w` of the triplet term, `≥ 0`. Default 1.
    pub triplet_weight: f64,
    /// The triplet loss options.
    pub triplet: TripletOptions,
}

impl Default for TripletJointConfig {
    fn default() -> Self {
        Self {
            angular: AngularConfig::default(),
            triplet_weight: 1.0,
            triplet: TripletOptions::default(),
        }
    }
}

impl TripletJointConfig {
    /// Check the angular head's keys, `triplet_weight ≥ 0`, the hinge `margin ≥ 0`.
    pub fn validate(&self) -> Result<()> {
        match &self.angular {
            AngularConfig::CosFace(c) => c.validate()?,
            AngularConfig::ArcFace(c) => c.validate()?,
        }
        common::check_range("triplet_weight", self.triplet_weight, 0.0, f64::MAX)?;
        common::check_range("margin", self.triplet.margin, 0.0, f64::MAX)
    }
}

/// Angular softmax + weighted batch-hard triplet.
pub struct TripletJoint {
    cfg: TripletJointConfig,
    angular: Box<dyn Head>,
    embedding_size: usize,
    num_classes: usize,
}

impl std::fmt::Debug for TripletJoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TripletJoint")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl TripletJoint {
    /// Create the head; the angular head's `weight` `(C, D)` comes from `vb`.
    pub fn new(
        cfg: &TripletJointConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let angular: Box<dyn Head> = match &cfg.angular {
            AngularConfig::CosFace(c) => {
                Box::new(CosFace::new(c, embedding_size, num_classes, vb)?)
            }
            AngularConfig::ArcFace(c) => {
                Box::new(ArcFace::new(c, embedding_size, num_classes, vb)?)
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            angular,
            embedding_size,
            num_classes,
        })
    }
}

impl Head for TripletJoint {
    fn name(&self) -> &'static str {
        "triplet_joint"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let mut out = self.angular.forward(&inp.x, labels, ctx)?;
        let (tri, n_valid) = batch_hard_triplet(&inp.x, &inp.labels, &self.cfg.triplet)?;
        let angular_loss = out.stats["loss"];
        out.loss = (out.loss + (&tri * self.cfg.triplet_weight)?)?;
        out.stats.insert("angular_loss".to_string(), angular_loss);
        out.stats
            .insert("triplet_loss".to_string(), common::scalar(&tri)?);
        out.stats.insert("triplet_rows".to_string(), n_valid as f64);
        out.stats.insert(
            "loss".to_string(),
            common::scalar(&out.loss.to_dtype(DType::F64)?)?,
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use candle_core::Device;
    use candle_nn::{VarBuilder, VarMap};

    fn data() -> (Tensor, Vec<u32>) {
        let v: Vec<f64> = (0..40)
            .map(|i| (i as f64 * 2.3 + 0.7).sin() * 1.5)
            .collect();
        // Class 3 has a single sample (no positive): it contributes nothing.
        (
            Tensor::from_vec(v, (8, 5), &Device::Cpu).unwrap(),
            vec![0, 1, 0, 2, 1, 2, 3, 0],
        )
    }

    fn brute(x: &[Vec<f64>], y: &[u32], o: &TripletOptions) -> (f64, usize) {
        let x: Vec<Vec<f64>> = x
            .iter()
            .map(|r| {
                let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
                r.iter()
                    .map(|v| if o.normalize { v / n } else { *v })
                    .collect()
            })
            .collect();
        let d = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(p, q)| (p - q).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let (mut sum, mut n) = (0.0, 0);
        for i in 0..x.len() {
            let ap = (0..x.len())
                .filter(|&j| j != i && y[j] == y[i])
                .map(|j| d(&x[i], &x[j]))
                .fold(f64::NAN, f64::max);
            let an = (0..x.len())
                .filter(|&j| y[j] != y[i])
                .map(|j| d(&x[i], &x[j]))
                .fold(f64::NAN, f64::min);
            if ap.is_nan() || an.is_nan() {
                continue;
            }
            n += 1;
            sum += match o.kind {
                TripletKind::SoftMargin => (ap - an).exp().ln_1p(),
                TripletKind::Hinge => (o.margin + ap - an).max(0.0),
            };
        }
        (sum / n.max(1) as f64, n)
    }

    #[test]
    fn matches_brute_force_and_finite_differences() -> Result<()> {
        let (x, y) = data();
        let rows: Vec<Vec<f64>> = x.to_vec2()?;
        for normalize in [true, false] {
            for kind in [TripletKind::SoftMargin, TripletKind::Hinge] {
                let o = TripletOptions {
                    normalize,
                    kind,
                    margin: 0.5,
                };
                let (loss, n) = batch_hard_triplet(&x, &y, &o)?;
                let (want, wn) = brute(&rows, &y, &o);
                assert_eq!((n, wn), (7, 7));
                assert!((common::scalar(&loss)? - want).abs() < 1e-12, "{o:?}");
                let err = fd_check(&x, |x| Ok(batch_hard_triplet(x, &y, &o)?.0))?;
                assert!(err < 1e-6, "{o:?}: fd error {err:e}");
            }
        }
        // One class only: no negatives, loss 0, zero gradient.
        let (loss, n) = batch_hard_triplet(&x, &[4; 8], &TripletOptions::default())?;
        assert_eq!((common::scalar(&loss)?, n), (0.0, 0));
        Ok(())
    }

    #[test]
    fn attribute_bce_matches_host_and_differentiates() -> Result<()> {
        let z = Tensor::new(&[[0.3f64, -2.0, 40.0], [-50.0, 1.0, 0.0]], &Device::Cpu)?;
        let t = Tensor::new(&[[1.0f64, 0.0, 1.0], [0.0, 1.0, 0.5]], &Device::Cpu)?;
        let got = common::scalar(&attribute_bce(&z, &t)?)?;
        let zs = [0.3f64, -2.0, 40.0, -50.0, 1.0, 0.0];
        let ts = [1.0f64, 0.0, 1.0, 0.0, 1.0, 0.5];
        let want = zs
            .iter()
            .zip(ts)
            .map(|(&z, t)| z.max(0.0) + (-z.abs()).exp().ln_1p() - t * z)
            .sum::<f64>()
            / 6.0;
        assert!((got - want).abs() < 1e-14);
        let small = Tensor::new(&[[0.3f64, -2.0, 1.5], [-0.5, 1.0, 0.0]], &Device::Cpu)?;
        assert!(fd_check(&small, |z| attribute_bce(z, &t))? < 1e-8);
        assert!(attribute_bce(&z, &t.narrow(1, 0, 2)?).is_err());
        Ok(())
    }

    #[test]
    fn joint_head_gradients_and_sum() -> Result<()> {
        let (x, y) = data();
        let yt = Tensor::new(y.as_slice(), &Device::Cpu)?;
        for angular in [
            AngularConfig::CosFace(CosFaceConfig {
                margin: 0.0,
                scale: 16.0,
                ..Default::default()
            }),
            AngularConfig::ArcFace(ArcFaceConfig {
                scale: 16.0,
                ..Default::default()
            }),
        ] {
            let cfg = TripletJointConfig {
                angular,
                triplet_weight: 0.7,
                ..Default::default()
            };
            let vm = VarMap::new();
            let build = || {
                TripletJoint::new(
                    &cfg,
                    5,
                    4,
                    VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
                )
            };
            let out = build()?.forward(&x, &yt, &StepContext::default())?;
            let s = &out.stats;
            assert!((s["loss"] - s["angular_loss"] - 0.7 * s["triplet_loss"]).abs() < 1e-12);
            let err = fd_check(&x, |x| {
                Ok(build()?.forward(x, &yt, &StepContext::default())?.loss)
            })?;
            assert!(err < 1e-6, "fd error {err:e}");
        }
        let bad = TripletJointConfig {
            triplet_weight: -1.0,
            ..Default::default()
        };
        assert!(
            matches!(bad.validate(), Err(Error::Config { ref key, .. }) if key == "triplet_weight")
        );
        Ok(())
    }
}
