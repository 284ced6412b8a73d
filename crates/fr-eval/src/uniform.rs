//! Uniform classification accuracy (Li, Jia, Zhou, Shen, Duan, "Rediscovering BCE Loss for
//! Uniform Classification", arXiv 2403.07289) on host arrays: one global threshold `t` for all
//! samples. Sample `i` with label `y_i` is uniformly correct at `t` when its positive score is
//! above the threshold and all its negative scores are not:
//! `score[i, y_i] > t ≥ max_{j≠y_i} score[i, j]`.
//! The uniform accuracy is the best fraction over all `t`. The usual (sample-wise) accuracy
//! only asks `score[i, y_i] > max_{j≠y_i} score[i, j]` per sample, so it is never lower.
//!
//! This is the definition of `fr_heads::uniface::uniform_accuracy` (candle tensors), computed
//! the same way: one `O(N·C)` pass for each sample's positive and largest negative score, then
//! an exact sweep over the `N` intervals `[max negative, positive)`.
//!
//! ```
//! use fr_eval::uniform::uniform_accuracy;
//! use ndarray::array;
//!
//! // Sample 0 is right at any t in [0.2, 0.9), sample 1 in [0.5, 0.6): one t serves both.
//! let scores = array![[0.9, 0.2], [0.5, 0.6]];
//! let u = uniform_accuracy(scores.view(), &[0, 1]).unwrap();
//! assert_eq!((u.accuracy, u.sample_accuracy), (1.0, 1.0));
//! // Sample 1's interval [0.95, 0.97) misses sample 0's [0.2, 0.9): one of them is lost.
//! let scores = array![[0.9, 0.2], [0.95, 0.97]];
//! let u = uniform_accuracy(scores.view(), &[0, 1]).unwrap();
//! assert_eq!((u.accuracy, u.sample_accuracy), (0.5, 1.0));
//! ```

use ndarray::ArrayView2;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{check_len, EvalError, Result};

/// The result of [`uniform_accuracy`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct UniformAccuracy {
    /// Fraction of samples classified correctly by the best single threshold, in `[0, 1]`.
    pub accuracy: f64,
    /// A threshold attaining it (the largest negative score of one of the samples it
    /// classifies correctly); `None` when no threshold classifies any sample correctly.
    pub threshold: Option<f64>,
    /// The usual per-sample (arg-max) accuracy, for comparison: `score[i, y_i]` strictly above
    /// every other score of row `i`.
    pub sample_accuracy: f64,
    /// Number of samples.
    pub n: usize,
}

/// Each row's `(positive score, largest negative score)`.
fn positive_and_max_negative(scores: ArrayView2<f64>, labels: &[usize]) -> Result<Vec<(f64, f64)>> {
    check_len("scores rows", scores.nrows(), "labels", labels.len())?;
    if labels.is_empty() {
        return Err(EvalError::Empty { what: "scores" });
    }
    let c = scores.ncols();
    if c < 2 {
        return Err(EvalError::InvalidParameter {
            name: "scores",
            reason: format!("need at least 2 classes (columns), got {c}"),
        });
    }
    (0..labels.len())
        .into_par_iter()
        .map(|i| {
            let y = labels[i];
            if y >= c {
                return Err(EvalError::InvalidParameter {
                    name: "labels",
                    reason: format!("labels[{i}] = {y} is not below the {c} classes"),
                });
            }
            let row = scores.row(i);
            let mut neg = f64::NEG_INFINITY;
            for (j, &v) in row.iter().enumerate() {
                if !v.is_finite() {
                    return Err(EvalError::NonFinite {
                        what: "scores",
                        index: i * c + j,
                        value: v,
                    });
                }
                if j != y {
                    neg = neg.max(v);
                }
            }
            Ok((row[y], neg))
        })
        .collect()
}

/// Uniform classification at a given threshold `t`: the fraction of samples with
/// `score[i, y_i] > t` and `score[i, j] ≤ t` for every `j ≠ y_i`.
///
/// # Errors
/// As [`uniform_accuracy`].
pub fn uniform_accuracy_at(scores: ArrayView2<f64>, labels: &[usize], t: f64) -> Result<f64> {
    let pairs = positive_and_max_negative(scores, labels)?;
    let correct = pairs.iter().filter(|&&(p, n)| p > t && n <= t).count();
    Ok(correct as f64 / pairs.len() as f64)
}

/// The uniform classification accuracy of `scores` `(N, C)` (any per-class similarity, e.g. the
/// cosine of each embedding to each class centre) with `labels` `N` class indices: the best
/// accuracy over all single global thresholds (see the module docs), exact.
///
/// # Errors
/// Row / label count mismatch, no sample, fewer than 2 classes, a label out of range, a
/// non-finite score.
pub fn uniform_accuracy(scores: ArrayView2<f64>, labels: &[usize]) -> Result<UniformAccuracy> {
    let pairs = positive_and_max_negative(scores, labels)?;
    // Events: +1 at the interval start (inclusive), −1 at its end (exclusive); at equal
    // positions ends come first.
    let mut events: Vec<(f64, i32)> = pairs
        .iter()
        .filter(|&&(p, n)| n < p)
        .flat_map(|&(p, n)| [(n, 1), (p, -1)])
        .collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut count, mut best, mut threshold) = (0i64, 0i64, None);
    for (pos, delta) in events {
        count += i64::from(delta);
        if count > best {
            best = count;
            threshold = Some(pos);
        }
    }
    let n = pairs.len();
    let sample_correct = pairs.iter().filter(|&&(p, n)| p > n).count();
    Ok(UniformAccuracy {
        accuracy: best as f64 / n as f64,
        threshold,
        sample_accuracy: sample_correct as f64 / n as f64,
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2};

    /// The sweep agrees with a brute force over every candidate threshold.
    #[test]
    fn sweep_matches_brute_force() {
        let (n, c) = (60, 5);
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
        };
        let labels: Vec<usize> = (0..n).map(|i| i % c).collect();
        let mut scores = Array2::from_shape_fn((n, c), |_| next());
        for (i, &y) in labels.iter().enumerate() {
            scores[[i, y]] += 0.8;
        }
        let u = uniform_accuracy(scores.view(), &labels).unwrap();
        let mut best = 0.0f64;
        for &t in scores.iter() {
            best = best.max(uniform_accuracy_at(scores.view(), &labels, t).unwrap());
        }
        assert_eq!(u.accuracy, best);
        let t = u.threshold.unwrap();
        assert_eq!(
            uniform_accuracy_at(scores.view(), &labels, t).unwrap(),
            u.accuracy
        );
        assert!(u.sample_accuracy >= u.accuracy && u.n == n);
    }

    #[test]
    fn nothing_right_and_bad_input() {
        let scores = array![[0.1, 0.5], [0.7, 0.2]];
        let u = uniform_accuracy(scores.view(), &[0, 1]).unwrap();
        assert_eq!(
            (u.accuracy, u.threshold, u.sample_accuracy),
            (0.0, None, 0.0)
        );
        let err = uniform_accuracy(scores.view(), &[0, 2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("labels[1] = 2"), "{err}");
        assert!(uniform_accuracy(scores.view(), &[0]).is_err());
        let nan = array![[f64::NAN, 0.5]];
        assert!(uniform_accuracy(nan.view(), &[0]).is_err());
    }
}
