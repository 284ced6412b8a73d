//! Pair verification (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) with the semantics of insightface
//! `recognition/arcface_torch/eval/verification.py` (`test` → `evaluate` → `calculate_roc`,
//! `calculate_val`):
//!
//! * pair `i` = embedding rows `2i` and `2i+1`, each L2-normalised (zero rows stay zero);
//! * distance = squared L2; a pair is predicted "same" when `distance < threshold` (strict);
//! * `n_folds` contiguous folds (KFold without shuffle: the first `n mod k` folds are one pair
//!   larger; with one fold, train = test = all pairs);
//! * accuracy: thresholds `i·0.01` for `i` in `0..400`; per fold the first threshold with the
//!   best training accuracy scores the test fold; mean ± population std over folds;
//! * VAL@FAR: thresholds `i·0.001` for `i` in `0..4000`; the training FAR curve is inverted by
//!   scipy 1.8 `interp1d(kind="slinear")` (between the last threshold with a lower-or-equal FAR
//!   and the first with a higher FAR; threshold 0 when no training FAR reaches the target).
//!
//! On top of the reference it reports TAR@FAR, AUC and EER of the ROC over all pairs
//! ([`crate::roc`]), scored by cosine similarity.
//!
//! Sums and means follow numpy's order: from the same float64 distances every output equals the
//! reference's bit for bit; from embeddings, the row normalisation (sequential sum of squares)
//! can move distances by a few ulps. insightface computes distances in float32 when its
//! embeddings are float32; this port always works in float64.

use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

use crate::error::{check_finite, check_len, EvalError, Result};
use crate::numeric::{np_mean, np_std, np_sum};
use crate::roc::{auc, eer, roc_curve, tar_at_far};

/// Number of accuracy thresholds (`numpy.arange(0, 4, 0.01)`).
pub const ROC_THRESHOLDS: usize = 400;
/// Step of the accuracy thresholds.
pub const ROC_THRESHOLD_STEP: f64 = 0.01;
/// Number of VAL thresholds (`numpy.arange(0, 4, 0.001)`).
pub const VAL_THRESHOLDS: usize = 4000;
/// Step of the VAL thresholds.
pub const VAL_THRESHOLD_STEP: f64 = 0.001;

/// Protocol settings; the defaults are insightface's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerificationConfig {
    /// Number of folds (10).
    pub n_folds: usize,
    /// Target FAR of VAL (1e-3).
    pub val_far: f64,
    /// Target FARs of the TAR@FAR table, read off the ROC over all pairs (1e-3, 1e-4).
    pub far_targets: Vec<f64>,
    /// At most this many ROC points are kept in the report for plotting (200).
    pub max_roc_points: usize,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        Self {
            n_folds: 10,
            val_far: 1e-3,
            far_targets: vec![1e-3, 1e-4],
            max_roc_points: 200,
        }
    }
}

/// Precomputed per-pair scores.
#[derive(Debug, Clone, Copy)]
pub enum PairScores<'a> {
    /// Squared L2 distances of the normalised embeddings (in `[0, 4]`). The ROC is built on
    /// `−distance`, so its thresholds are negative distances.
    SquaredDistance(&'a [f64]),
    /// Cosine similarities. Folds use `max(2 − 2·s, 0)` (the squared distance of unit vectors);
    /// the ROC uses `s`.
    Cosine(&'a [f64]),
}

/// Everything the protocol measures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerificationReport {
    /// Number of pairs.
    pub n_pairs: usize,
    /// Number of genuine pairs.
    pub n_genuine: usize,
    /// Mean test accuracy over folds.
    pub accuracy_mean: f64,
    /// Population standard deviation of the fold accuracies.
    pub accuracy_std: f64,
    /// Test accuracy of each fold.
    pub accuracy_per_fold: Vec<f64>,
    /// Index into the accuracy thresholds chosen on each fold's training part.
    pub best_threshold_indices: Vec<usize>,
    /// The chosen squared-distance thresholds.
    pub best_thresholds: Vec<f64>,
    /// Mean VAL (TAR at the interpolated threshold) over folds.
    pub val_mean: f64,
    /// Population standard deviation of VAL.
    pub val_std: f64,
    /// Mean test FAR at the VAL thresholds.
    pub far_mean: f64,
    /// VAL of each fold.
    pub val_per_fold: Vec<f64>,
    /// Test FAR of each fold.
    pub far_per_fold: Vec<f64>,
    /// The interpolated VAL threshold of each fold.
    pub val_thresholds: Vec<f64>,
    /// Fold-averaged test TPR at each accuracy threshold (400 values).
    pub tpr_curve: Vec<f64>,
    /// Fold-averaged test FPR at each accuracy threshold (400 values).
    pub fpr_curve: Vec<f64>,
    /// `(target FAR, TAR)` from the ROC over all pairs, one per configured target.
    pub tar_at_far: Vec<(f64, f64)>,
    /// Area under the ROC over all pairs.
    pub auc: f64,
    /// Equal error rate of the ROC over all pairs.
    pub eer: f64,
    /// FPR of at most `max_roc_points` ROC points (evenly spaced by index, ends kept).
    pub roc_fpr: Vec<f64>,
    /// TPR of the same points.
    pub roc_tpr: Vec<f64>,
}

/// Runs the protocol on raw embeddings `(2N, D)` (rows `2i`, `2i+1` form pair `i`) and the
/// `N` labels `issame`. Any float element type that widens to `f64` is accepted.
///
/// # Errors
/// Odd or zero rows, zero columns, `issame.len() != N`, non-finite values, too few pairs for the
/// folds, or a fold without genuine or impostor pairs.
pub fn evaluate<A: Copy + Into<f64>>(
    embeddings: ArrayView2<A>,
    issame: &[bool],
    config: &VerificationConfig,
) -> Result<VerificationReport> {
    let scores = pair_scores(embeddings)?;
    check_len(
        "embedding pairs (rows / 2)",
        scores.squared_distance.len(),
        "issame",
        issame.len(),
    )?;
    run(&scores.squared_distance, &scores.cosine, issame, config)
}

/// Per-pair scores of L2-normalised embeddings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairScoreVectors {
    /// Squared L2 distance of pair `i` (summed in numpy's order).
    pub squared_distance: Vec<f64>,
    /// Cosine similarity (dot product of the normalised rows).
    pub cosine: Vec<f64>,
}

/// L2-normalises every row of `(2N, D)` embeddings (zero rows stay zero, as
/// `sklearn.preprocessing.normalize` leaves them) and scores pair `i` = rows `2i`, `2i+1`.
///
/// # Errors
/// Zero or odd rows, zero columns, non-finite values.
pub fn pair_scores<A: Copy + Into<f64>>(embeddings: ArrayView2<A>) -> Result<PairScoreVectors> {
    let (rows, dim) = embeddings.dim();
    if rows == 0 {
        return Err(EvalError::Empty { what: "embeddings" });
    }
    if rows % 2 != 0 {
        return Err(EvalError::OddEmbeddings { rows });
    }
    if dim == 0 {
        return Err(EvalError::Empty {
            what: "embedding dimension",
        });
    }

    let mut unit = vec![0.0f64; dim * rows];
    for (r, row) in embeddings.outer_iter().enumerate() {
        let out = &mut unit[r * dim..(r + 1) * dim];
        for (o, &v) in out.iter_mut().zip(row.iter()) {
            *o = v.into();
        }
        check_finite("embeddings (row-major)", out).map_err(|e| match e {
            EvalError::NonFinite { what, index, value } => EvalError::NonFinite {
                what,
                index: r * dim + index,
                value,
            },
            e => e,
        })?;
        // sklearn.preprocessing.normalize: divide by the norm, leave zero rows alone.
        let norm = out.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm != 0.0 {
            out.iter_mut().for_each(|v| *v /= norm);
        }
    }
    let n = rows / 2;
    let mut dist = Vec::with_capacity(n);
    let mut cosine = Vec::with_capacity(n);
    let mut buf = vec![0.0f64; dim];
    for i in 0..n {
        let a = &unit[2 * i * dim..(2 * i + 1) * dim];
        let b = &unit[(2 * i + 1) * dim..(2 * i + 2) * dim];
        for ((o, x), y) in buf.iter_mut().zip(a).zip(b) {
            let d = x - y;
            *o = d * d;
        }
        dist.push(np_sum(&buf));
        for ((o, x), y) in buf.iter_mut().zip(a).zip(b) {
            *o = x * y;
        }
        cosine.push(np_sum(&buf));
    }
    Ok(PairScoreVectors {
        squared_distance: dist,
        cosine,
    })
}

/// Runs the protocol on precomputed per-pair scores.
///
/// # Errors
/// As [`evaluate`]; also negative squared distances.
pub fn evaluate_scores(
    scores: PairScores<'_>,
    issame: &[bool],
    config: &VerificationConfig,
) -> Result<VerificationReport> {
    match scores {
        PairScores::SquaredDistance(d) => {
            check_len("distances", d.len(), "issame", issame.len())?;
            check_finite("distances", d)?;
            if let Some(i) = d.iter().position(|&v| v < 0.0) {
                return Err(EvalError::InvalidParameter {
                    name: "distances",
                    reason: format!("squared distance {i} is negative ({})", d[i]),
                });
            }
            let neg: Vec<f64> = d.iter().map(|&v| -v).collect();
            run(d, &neg, issame, config)
        }
        PairScores::Cosine(s) => {
            check_len("similarities", s.len(), "issame", issame.len())?;
            check_finite("similarities", s)?;
            let d: Vec<f64> = s.iter().map(|&v| (2.0 - 2.0 * v).max(0.0)).collect();
            run(&d, s, issame, config)
        }
    }
}

/// Test ranges of KFold(n_splits = k, shuffle = False).
fn folds(n: usize, k: usize) -> Vec<std::ops::Range<usize>> {
    let (base, extra) = (n / k, n % k);
    let mut start = 0;
    (0..k)
        .map(|f| {
            let len = base + usize::from(f < extra);
            start += len;
            start - len..start
        })
        .collect()
}

/// Genuine and impostor distances of one pair set, sorted, for counting `d < threshold`.
struct Sorted {
    genuine: Vec<f64>,
    impostor: Vec<f64>,
}

impl Sorted {
    fn new(dist: &[f64], issame: &[bool], idx: impl Iterator<Item = usize>) -> Self {
        let (mut genuine, mut impostor) = (Vec::new(), Vec::new());
        for i in idx {
            if issame[i] {
                &mut genuine
            } else {
                &mut impostor
            }
            .push(dist[i]);
        }
        genuine.sort_unstable_by(f64::total_cmp);
        impostor.sort_unstable_by(f64::total_cmp);
        Self { genuine, impostor }
    }

    fn len(&self) -> usize {
        self.genuine.len() + self.impostor.len()
    }

    /// (true accepts, false accepts) at `threshold`.
    fn accepts(&self, threshold: f64) -> (usize, usize) {
        (
            self.genuine.partition_point(|&d| d < threshold),
            self.impostor.partition_point(|&d| d < threshold),
        )
    }

    /// verification.py `calculate_accuracy`: (tpr, fpr, accuracy).
    fn accuracy(&self, threshold: f64) -> (f64, f64, f64) {
        let (tp, fp) = self.accepts(threshold);
        let (p, m) = (self.genuine.len(), self.impostor.len());
        let tpr = if p == 0 { 0.0 } else { tp as f64 / p as f64 };
        let fpr = if m == 0 { 0.0 } else { fp as f64 / m as f64 };
        let acc = (tp + (m - fp)) as f64 / self.len() as f64;
        (tpr, fpr, acc)
    }

    /// verification.py `calculate_val_far`: (val, far).
    fn val_far(&self, threshold: f64) -> (f64, f64) {
        let (ta, fa) = self.accepts(threshold);
        (
            ta as f64 / self.genuine.len() as f64,
            fa as f64 / self.impostor.len() as f64,
        )
    }

    fn require_both(&self, what: impl Fn() -> String) -> Result<()> {
        for (count, missing) in [
            (self.genuine.len(), "genuine"),
            (self.impostor.len(), "impostor"),
        ] {
            if count == 0 {
                return Err(EvalError::MissingClass {
                    what: what(),
                    missing,
                    n: self.len(),
                });
            }
        }
        Ok(())
    }
}

/// scipy 1.8 `interp1d(x, y, kind="slinear")(xval)` for non-decreasing `x` that may repeat,
/// `x[0] <= xval <= x[last]`: a degree-1 B-spline with knots `[x0, x0, .., x_last, x_last]`
/// and coefficients `y`, evaluated on the knot interval `t[l] <= xval < t[l+1]` (the last
/// interval for `xval = x_last`). A zero-width interval evaluates to 0, as scipy's de Boor does.
fn slinear(x: &[f64], y: &[f64], xval: f64) -> f64 {
    let m = x.len();
    let t = |i: usize| x[i.saturating_sub(1).min(m - 1)];
    let mut l = 2;
    while l != m && xval >= t(l) {
        l += 1;
    }
    let ell = l - 1;
    let (xa, xb) = (t(ell), t(ell + 1));
    if xa == xb {
        return 0.0;
    }
    let w = 1.0 / (xb - xa);
    let h0 = w * (xb - xval);
    let h1 = w * (xval - xa);
    0.0 + y[ell - 1] * h0 + y[ell] * h1
}

fn run(
    dist: &[f64],
    roc_scores: &[f64],
    issame: &[bool],
    config: &VerificationConfig,
) -> Result<VerificationReport> {
    let n = issame.len();
    let k = config.n_folds;
    if n == 0 {
        return Err(EvalError::Empty { what: "pairs" });
    }
    if k == 0 || k > n {
        return Err(EvalError::InvalidParameter {
            name: "n_folds",
            reason: format!("{k} folds for {n} pairs (need 1 ≤ folds ≤ pairs)"),
        });
    }
    if !(config.val_far > 0.0 && config.val_far <= 1.0) {
        return Err(EvalError::InvalidParameter {
            name: "val_far",
            reason: format!("{} is outside (0, 1]", config.val_far),
        });
    }
    if config.max_roc_points < 2 {
        return Err(EvalError::InvalidParameter {
            name: "max_roc_points",
            reason: format!("{} (need at least 2)", config.max_roc_points),
        });
    }
    let roc_thr: Vec<f64> = (0..ROC_THRESHOLDS)
        .map(|i| i as f64 * ROC_THRESHOLD_STEP)
        .collect();
    let val_thr: Vec<f64> = (0..VAL_THRESHOLDS)
        .map(|i| i as f64 * VAL_THRESHOLD_STEP)
        .collect();

    let mut accuracy = Vec::with_capacity(k);
    let mut best_idx = Vec::with_capacity(k);
    let mut tpr_sum = vec![0.0; ROC_THRESHOLDS];
    let mut fpr_sum = vec![0.0; ROC_THRESHOLDS];
    let (mut val, mut far, mut val_t) = (Vec::new(), Vec::new(), Vec::new());
    for (f, test) in folds(n, k).into_iter().enumerate() {
        let train = if k == 1 {
            Sorted::new(dist, issame, 0..n)
        } else {
            Sorted::new(dist, issame, (0..test.start).chain(test.end..n))
        };
        let test = Sorted::new(dist, issame, test);

        // calculate_roc: first argmax of training accuracy.
        let mut best = 0;
        let mut best_acc = f64::NEG_INFINITY;
        for (i, &t) in roc_thr.iter().enumerate() {
            let acc = train.accuracy(t).2;
            if acc > best_acc {
                best_acc = acc;
                best = i;
            }
        }
        for (i, &t) in roc_thr.iter().enumerate() {
            let (tpr, fpr, _) = test.accuracy(t);
            tpr_sum[i] += tpr;
            fpr_sum[i] += fpr;
        }
        accuracy.push(test.accuracy(roc_thr[best]).2);
        best_idx.push(best);

        // calculate_val.
        train.require_both(|| format!("fold {f} (training part)"))?;
        test.require_both(|| format!("fold {f} (test part)"))?;
        let far_train: Vec<f64> = val_thr.iter().map(|&t| train.val_far(t).1).collect();
        let max_far = far_train.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let threshold = if max_far >= config.val_far {
            slinear(&far_train, &val_thr, config.val_far)
        } else {
            0.0
        };
        let (v, fa) = test.val_far(threshold);
        val.push(v);
        far.push(fa);
        val_t.push(threshold);
    }
    let kf = k as f64;

    let roc = roc_curve(issame, roc_scores)?;
    let tar = config
        .far_targets
        .iter()
        .map(|&target| tar_at_far(&roc, target).map(|p| (target, p.tar)))
        .collect::<Result<Vec<_>>>()?;
    let keep = downsample(roc.len(), config.max_roc_points);

    Ok(VerificationReport {
        n_pairs: n,
        n_genuine: issame.iter().filter(|&&s| s).count(),
        accuracy_mean: np_mean(&accuracy),
        accuracy_std: np_std(&accuracy),
        best_thresholds: best_idx.iter().map(|&i| roc_thr[i]).collect(),
        best_threshold_indices: best_idx,
        accuracy_per_fold: accuracy,
        val_mean: np_mean(&val),
        val_std: np_std(&val),
        far_mean: np_mean(&far),
        val_per_fold: val,
        far_per_fold: far,
        val_thresholds: val_t,
        tpr_curve: tpr_sum.iter().map(|s| s / kf).collect(),
        fpr_curve: fpr_sum.iter().map(|s| s / kf).collect(),
        tar_at_far: tar,
        auc: auc(&roc),
        eer: eer(&roc),
        roc_fpr: keep.iter().map(|&i| roc.fpr[i]).collect(),
        roc_tpr: keep.iter().map(|&i| roc.tpr[i]).collect(),
    })
}

/// Up to `max` indices of `0..len`, evenly spaced, first and last included.
fn downsample(len: usize, max: usize) -> Vec<usize> {
    if len <= max {
        return (0..len).collect();
    }
    let mut idx: Vec<usize> = (0..max)
        .map(|i| ((i as f64) * (len - 1) as f64 / (max - 1) as f64).round() as usize)
        .collect();
    idx.dedup();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kfold_sizes_follow_sklearn() {
        let f = folds(23, 10);
        let sizes: Vec<usize> = f.iter().map(|r| r.len()).collect();
        assert_eq!(sizes, vec![3, 3, 3, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(f[0], 0..3);
        assert_eq!(f[9], 21..23);
    }

    #[test]
    fn slinear_uses_last_lower_and_first_higher_knot() {
        let x = [0.0, 0.0, 0.1, 0.1, 0.1, 0.3, 1.0, 1.0];
        let y = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        // Between x[1] (last 0.0) and x[2] (first 0.1).
        assert!((slinear(&x, &y, 0.05) - 1.5).abs() < 1e-15);
        // Exact hit on a repeated value: the last of them (w·(xb − x) rounds to 1 − 2⁻⁵³ here,
        // as in scipy).
        assert!((slinear(&x, &y, 0.1) - 4.0).abs() < 1e-15);
        assert!((slinear(&x, &y, 0.2) - 4.5).abs() < 1e-15);
        assert_eq!(slinear(&x, &y, 0.0), 1.0);
        // x = x_last on a repeated last value: zero-width knot interval.
        assert_eq!(slinear(&x, &y, 1.0), 0.0);
        assert_eq!(slinear(&[0.0, 0.5, 1.0], &[0.0, 1.0, 2.0], 1.0), 2.0);
    }

    #[test]
    fn downsample_keeps_ends() {
        assert_eq!(downsample(3, 5), vec![0, 1, 2]);
        let d = downsample(1001, 11);
        assert_eq!(d.len(), 11);
        assert_eq!((d[0], d[5], d[10]), (0, 500, 1000));
    }
}
