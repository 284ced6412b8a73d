//! ROC curve, TAR at FAR, AUC and EER with scikit-learn / insightface semantics.
//!
//! [`roc_curve`] reproduces `sklearn.metrics.roc_curve(y_true, y_score)` with its default
//! `drop_intermediate=True`: one candidate point per distinct score (descending), points lying
//! on a straight run of both false- and true-positive counts are dropped, and a point with no
//! accepted pair is prepended. Its threshold is `+inf`, as scikit-learn ≥ 1.3 writes it
//! (scikit-learn ≤ 1.2 wrote `max(score) + 1`); fpr, tpr and every other threshold are the same
//! in both versions.
//!
//! [`tar_at_far`] is the rule of insightface `recognition/arcface_torch/eval_ijbc.py`: reverse
//! the curve and take the first point minimising `|fpr − target|` (no interpolation), i.e. among
//! points at equal distance the one with the highest index of the original curve.
//!
//! Cost: two sorts of the score vector (genuine and impostor scores separately, in parallel),
//! then one linear pass; 15.6 M IJB-C pairs take a few seconds and ~8 bytes per score.

use rayon::slice::ParallelSliceMut;
use serde::Serialize;

use crate::error::{check_finite, check_len, EvalError, Result};
use crate::numeric::np_sum;

/// A ROC curve: `fpr[i]`/`tpr[i]` are the rates of pairs with `score >= thresholds[i]`,
/// thresholds strictly decreasing, `thresholds[0] = +inf` (fpr = tpr = 0).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Roc {
    /// False positive rate (FAR) per point, non-decreasing from 0 to 1.
    pub fpr: Vec<f64>,
    /// True positive rate (TAR) per point, non-decreasing from 0 to 1.
    pub tpr: Vec<f64>,
    /// Score threshold per point (accept when `score >= threshold`); the first is `+inf`.
    pub thresholds: Vec<f64>,
    /// Number of genuine pairs (label `true`).
    pub n_genuine: usize,
    /// Number of impostor pairs (label `false`).
    pub n_impostor: usize,
}

impl Roc {
    /// Number of points.
    pub fn len(&self) -> usize {
        self.fpr.len()
    }

    /// Never true for a curve built by [`roc_curve`] (it has at least two points).
    pub fn is_empty(&self) -> bool {
        self.fpr.is_empty()
    }
}

/// The operating point chosen for one target FAR.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TarAtFar {
    /// The requested FAR.
    pub far: f64,
    /// TAR (tpr) at the chosen point.
    pub tar: f64,
    /// The actual FAR (fpr) of the chosen point.
    pub fpr: f64,
    /// Its score threshold (`+inf` for the first point, serialised by serde_json as `null`).
    pub threshold: f64,
    /// Its index in the (non-reversed) [`Roc`] arrays.
    pub index: usize,
}

#[derive(Clone, Copy)]
struct Point {
    fps: u64,
    tps: u64,
    threshold: f64,
}

/// scikit-learn's `roc_curve(labels, scores)` with `drop_intermediate=True`; `true` = genuine.
///
/// # Errors
/// Length mismatch, empty input, a non-finite score, or no genuine / no impostor pair
/// (scikit-learn warns and returns NaN rates there).
pub fn roc_curve(labels: &[bool], scores: &[f64]) -> Result<Roc> {
    check_len("labels", labels.len(), "scores", scores.len())?;
    if scores.is_empty() {
        return Err(EvalError::Empty { what: "scores" });
    }
    check_finite("scores", scores)?;
    let n_genuine = labels.iter().filter(|&&l| l).count();
    let n_impostor = labels.len() - n_genuine;
    for (count, missing) in [(n_genuine, "genuine"), (n_impostor, "impostor")] {
        if count == 0 {
            return Err(EvalError::MissingClass {
                what: "ROC input".into(),
                missing,
                n: labels.len(),
            });
        }
    }
    // `+ 0.0` turns -0.0 into 0.0 (numpy's diff treats them as one value).
    let mut genuine = Vec::with_capacity(n_genuine);
    let mut impostor = Vec::with_capacity(n_impostor);
    for (&l, &s) in labels.iter().zip(scores) {
        if l { &mut genuine } else { &mut impostor }.push(s + 0.0);
    }
    rayon::join(
        || genuine.par_sort_unstable_by(|a, b| b.total_cmp(a)),
        || impostor.par_sort_unstable_by(|a, b| b.total_cmp(a)),
    );

    // Walk the distinct scores in descending order; keep a point unless both counts are in
    // arithmetic progression with their neighbours (numpy: diff(fps, 2) or diff(tps, 2) != 0).
    let mut kept = vec![Point {
        fps: 0,
        tps: 0,
        threshold: f64::INFINITY,
    }];
    let (mut i, mut j) = (0usize, 0usize);
    let mut window: Vec<Point> = Vec::with_capacity(2); // last two candidates, not yet decided
    let mut n_candidates = 0usize;
    while i < genuine.len() || j < impostor.len() {
        let v = match (genuine.get(i), impostor.get(j)) {
            (Some(&g), Some(&m)) => g.max(m),
            (Some(&g), None) => g,
            (None, Some(&m)) => m,
            (None, None) => unreachable!(),
        };
        while i < genuine.len() && genuine[i] == v {
            i += 1;
        }
        while j < impostor.len() && impostor[j] == v {
            j += 1;
        }
        let p = Point {
            fps: j as u64,
            tps: i as u64,
            threshold: v,
        };
        n_candidates += 1;
        if n_candidates == 1 {
            kept.push(p);
            window.push(p);
            continue;
        }
        if window.len() == 2 {
            let (a, b) = (window[0], window[1]);
            let d2 = |x: u64, y: u64, z: u64| x as i128 - 2 * y as i128 + z as i128;
            if d2(a.fps, b.fps, p.fps) != 0 || d2(a.tps, b.tps, p.tps) != 0 {
                kept.push(b);
            }
            window.remove(0);
        }
        window.push(p);
    }
    if n_candidates > 1 {
        kept.push(*window.last().expect("at least two candidates"));
    }

    let (nf, nt) = (n_impostor as f64, n_genuine as f64);
    Ok(Roc {
        fpr: kept.iter().map(|p| p.fps as f64 / nf).collect(),
        tpr: kept.iter().map(|p| p.tps as f64 / nt).collect(),
        thresholds: kept.iter().map(|p| p.threshold).collect(),
        n_genuine,
        n_impostor,
    })
}

/// TAR at one target FAR by the eval_ijbc.py nearest-point rule (see the module docs).
///
/// # Errors
/// A target outside `[0, 1]` or NaN.
pub fn tar_at_far(roc: &Roc, far: f64) -> Result<TarAtFar> {
    if !(0.0..=1.0).contains(&far) {
        return Err(EvalError::InvalidParameter {
            name: "far",
            reason: format!("target FAR {far} is outside [0, 1]"),
        });
    }
    if roc.is_empty() {
        return Err(EvalError::Empty { what: "ROC curve" });
    }
    // Reversed order, first strict minimum wins.
    let mut best = roc.len() - 1;
    let mut best_gap = (roc.fpr[best] - far).abs();
    for idx in (0..roc.len() - 1).rev() {
        let gap = (roc.fpr[idx] - far).abs();
        if gap < best_gap {
            best_gap = gap;
            best = idx;
        }
    }
    Ok(TarAtFar {
        far,
        tar: roc.tpr[best],
        fpr: roc.fpr[best],
        threshold: roc.thresholds[best],
        index: best,
    })
}

/// Area under the curve by the trapezoid rule (`sklearn.metrics.auc`, summed in numpy's order).
pub fn auc(roc: &Roc) -> f64 {
    trapezoid(&roc.fpr, &roc.tpr)
}

/// `numpy.trapz(y, x)` for the same-length slices `x`, `y` (0 when shorter than 2).
pub fn trapezoid(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return 0.0;
    }
    let terms: Vec<f64> = (1..n)
        .map(|k| (x[k] - x[k - 1]) * (y[k] + y[k - 1]) / 2.0)
        .collect();
    np_sum(&terms)
}

/// Equal error rate: the FAR where FAR = 1 − TAR on the piecewise-linear ROC (the root that
/// `brentq(lambda x: 1 - x - interp1d(fpr, tpr)(x), 0, 1)` finds, computed in closed form).
pub fn eer(roc: &Roc) -> f64 {
    // g = 1 − tpr − fpr is non-increasing along the curve, from 1 to −1.
    let g = |k: usize| 1.0 - roc.tpr[k] - roc.fpr[k];
    let Some(k) = (0..roc.len()).find(|&k| g(k) <= 0.0) else {
        return f64::NAN;
    };
    if k == 0 || g(k) == 0.0 {
        return roc.fpr[k];
    }
    let (g0, g1) = (g(k - 1), g(k));
    let t = g0 / (g0 - g1);
    roc.fpr[k - 1] + t * (roc.fpr[k] - roc.fpr[k - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_curve_matches_sklearn() {
        // sklearn.metrics.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]):
        // fpr [0, 0, 0.5, 0.5, 1], tpr [0, 0.5, 0.5, 1, 1], thresholds [inf, 0.8, 0.4, 0.35, 0.1]
        let roc = roc_curve(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]).unwrap();
        assert_eq!(roc.fpr, vec![0.0, 0.0, 0.5, 0.5, 1.0]);
        assert_eq!(roc.tpr, vec![0.0, 0.5, 0.5, 1.0, 1.0]);
        assert_eq!(roc.thresholds, vec![f64::INFINITY, 0.8, 0.4, 0.35, 0.1]);
        assert_eq!(auc(&roc), 0.75);
        assert_eq!(eer(&roc), 0.5);
    }

    #[test]
    fn collinear_points_are_dropped_and_ties_grouped() {
        // Impostors only between the genuine ones: the middle impostor points are collinear.
        let labels = [true, false, false, false, true];
        let scores = [0.9, 0.5, 0.4, 0.3, 0.1];
        let roc = roc_curve(&labels, &scores).unwrap();
        assert_eq!(roc.thresholds, vec![f64::INFINITY, 0.9, 0.3, 0.1]);
        // A genuine–impostor tie is one point.
        let roc = roc_curve(&[true, false], &[0.5, 0.5]).unwrap();
        assert_eq!(roc.fpr, vec![0.0, 1.0]);
        assert_eq!(roc.tpr, vec![0.0, 1.0]);
        assert_eq!(auc(&roc), 0.5);
    }

    #[test]
    fn tar_at_far_prefers_highest_tpr_among_equal_fpr() {
        let roc = roc_curve(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]).unwrap();
        let p = tar_at_far(&roc, 0.0).unwrap();
        assert_eq!((p.index, p.tar), (1, 0.5));
        let p = tar_at_far(&roc, 0.5).unwrap();
        assert_eq!((p.index, p.tar, p.threshold), (3, 1.0, 0.35));
        assert!(tar_at_far(&roc, 1.5).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(
            roc_curve(&[true], &[0.1, 0.2]),
            Err(EvalError::LengthMismatch {
                left_len: 1,
                right_len: 2,
                ..
            })
        ));
        assert!(matches!(roc_curve(&[], &[]), Err(EvalError::Empty { .. })));
        assert!(matches!(
            roc_curve(&[true, true], &[0.1, 0.2]),
            Err(EvalError::MissingClass {
                missing: "impostor",
                ..
            })
        ));
        assert!(matches!(
            roc_curve(&[true, false], &[0.1, f64::NAN]),
            Err(EvalError::NonFinite { index: 1, .. })
        ));
    }
}
