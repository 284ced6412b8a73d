//! QMagFace: quality-aware comparison scores for MagFace embeddings (not a training head).
//!
//! A MagFace embedding's norm is its quality. For a pair with cosine similarity `s` and
//! qualities `q1`, `q2` (the embedding norms, or any quality scores), the quality-aware score
//! is `S = s + ω(s)·min(q1, q2)` with `ω(s) = min(0, β·s − α)`. The published fit
//! ([`ALPHA`], [`BETA`]) is the default.
//!
//! Fitting ω ([`fit`]): for 50 log-spaced false match rates in `[1e-5, 1e-2]` and 20 candidate
//! weights ω evenly spaced in `[−ω_max, ω_max]` (`ω_max = 0.5/max(q)`), score every pair with
//! `s + ω·q`, find the threshold `t` that reaches the FMR on the impostor pairs and the
//! resulting FNMR on the genuine pairs; keep, per FMR, the ω with the lowest FNMR (the first
//! candidate among ties) and its threshold; then fit the least-squares line `ω = β·t − α`
//! through the 50 `(t, ω)` points. Everything runs on the host in f64.
//!
//! Terhörst, Ihlefeld, Huber, Damer, Kirchbuchner, Raja, Kuijper, "QMagFace: Simple and
//! Accurate Quality-Aware Face Recognition", WACV 2023; reference code pterhoer/QMagFace
//! `similarity/qmagface.py`. Reported (MagFace-100 + QMagFace): AgeDB 98.50, XQLFW 83.95,
//! CFP-FP 98.74 (verification accuracy, %).
//!
//! Differences from the reference fit, on purpose:
//! - It reads the thresholds after squashing the scores with a logistic sigmoid, so its line
//!   relates ω to `sigmoid(S)` while the score function applies ω to the raw cosine. Here the
//!   thresholds are on the raw score scale by default; `FitConfig::sigmoid_thresholds`
//!   reproduces the reference.
//! - The threshold for an FMR is computed exactly from the sorted impostor scores (the
//!   largest FMR strictly below the target, accepting `S > t`) rather than read off a
//!   thinned ROC curve; the chosen ω is the same up to ties.

use crate::{Error, Result};

/// The published `α` of `ω(s) = min(0, β·s − α)` (MagFace-100 on MS1MV2).
pub const ALPHA: f64 = 0.077428;
/// The published `β` of `ω(s) = min(0, β·s − α)`.
pub const BETA: f64 = 0.125926;

/// The quality weight function `ω(s) = min(0, β·s − α)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QualityWeight {
    /// Offset `α`.
    pub alpha: f64,
    /// Slope `β`.
    pub beta: f64,
}

impl Default for QualityWeight {
    /// The published fit: α = 0.077428, β = 0.125926.
    fn default() -> Self {
        Self {
            alpha: ALPHA,
            beta: BETA,
        }
    }
}

impl QualityWeight {
    /// `ω(s) = min(0, β·s − α)`.
    pub fn omega(&self, s: f64) -> f64 {
        (self.beta * s - self.alpha).min(0.0)
    }

    /// The quality-aware score of a pair: [`score`] with this ω.
    pub fn score(&self, cos: f64, q1: f64, q2: f64) -> f64 {
        score(cos, q1, q2, |s| self.omega(s))
    }
}

/// Quality-aware comparison score `S = cos + ω(cos)·min(q1, q2)`.
pub fn score(cos: f64, q1: f64, q2: f64, omega_fn: impl Fn(f64) -> f64) -> f64 {
    cos + omega_fn(cos) * q1.min(q2)
}

/// Settings of [`fit`]; the defaults are the paper's.
#[derive(Debug, Clone, PartialEq)]
pub struct FitConfig {
    /// Number of FMR operating points. Default 50.
    pub fmr_num: usize,
    /// Smallest FMR. Default 1e-5.
    pub fmr_min: f64,
    /// Largest FMR. Default 1e-2.
    pub fmr_max: f64,
    /// Number of candidate ω. Default 20.
    pub omega_num: usize,
    /// `ω_max = max_ratio / max(q)`. Default 0.5.
    pub max_ratio: f64,
    /// Read thresholds on `sigmoid(S)` as the reference code does. Default `false`.
    pub sigmoid_thresholds: bool,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            fmr_num: 50,
            fmr_min: 1e-5,
            fmr_max: 1e-2,
            omega_num: 20,
            max_ratio: 0.5,
            sigmoid_thresholds: false,
        }
    }
}

/// What [`fit`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    /// The fitted line, `ω = β·t − α`.
    pub weight: QualityWeight,
    /// The FMR operating points (log-spaced).
    pub fmrs: Vec<f64>,
    /// The best ω at each FMR.
    pub omegas: Vec<f64>,
    /// The threshold of the best ω at each FMR.
    pub thresholds: Vec<f64>,
    /// The FNMR of the best ω at each FMR.
    pub fnmrs: Vec<f64>,
}

/// Genuine or impostor pairs: cosine similarities and pair qualities `min(q1, q2)`.
#[derive(Debug, Clone, Copy)]
pub struct Pairs<'a> {
    /// Cosine similarity of each pair.
    pub scores: &'a [f64],
    /// Quality of each pair, `min(q1, q2)`.
    pub qualities: &'a [f64],
}

impl Pairs<'_> {
    fn check(&self, what: &str) -> Result<()> {
        let ok = !self.scores.is_empty()
            && self.scores.len() == self.qualities.len()
            && self
                .scores
                .iter()
                .chain(self.qualities)
                .all(|v| v.is_finite());
        if ok {
            Ok(())
        } else {
            Err(Error::Shape {
                what: what.into(),
                expected: "as many finite qualities as finite scores, at least one".into(),
                got: format!(
                    "{} scores, {} qualities",
                    self.scores.len(),
                    self.qualities.len()
                ),
            })
        }
    }

    fn weighted(&self, omega: f64) -> Vec<f64> {
        self.scores
            .iter()
            .zip(self.qualities)
            .map(|(s, q)| s + omega * q)
            .collect()
    }
}

/// Threshold `t` with the largest impostor acceptance rate `#{S > t}/N` strictly below `fmr`
/// (impostor scores sorted in descending order), and the genuine rejection rate
/// `#{S ≤ t}/N` there.
fn operating_point(impostors_desc: &[f64], genuine: &[f64], fmr: f64) -> (f64, f64) {
    let n = impostors_desc.len();
    // The most false accepts allowed: the largest a with a/n < fmr.
    let allowed = ((fmr * n as f64).ceil() as usize)
        .saturating_sub(1)
        .min(n - 1);
    // Accepting S > t with t = the (allowed + 1)-th largest impostor score admits at most
    // `allowed` impostors (ties included).
    let t = impostors_desc[allowed];
    let rejected = genuine.iter().filter(|&&s| s <= t).count();
    (t, rejected as f64 / genuine.len() as f64)
}

/// Least-squares line `y = slope·x + intercept`; a constant `x` gives slope 0.
pub fn fit_line(x: &[f64], y: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxx: f64 = x.iter().map(|v| (v - mx).powi(2)).sum();
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (slope, my - slope * mx)
}

/// Fit `ω(s) = min(0, β·s − α)` from genuine and impostor pairs (see the module docs).
///
/// # Errors
/// [`Error::Shape`] for empty or mismatched inputs or non-finite values, [`Error::Config`]
/// for invalid settings or qualities whose maximum is not positive.
pub fn fit(genuine: Pairs<'_>, impostor: Pairs<'_>, cfg: &FitConfig) -> Result<Fit> {
    genuine.check("genuine pairs")?;
    impostor.check("impostor pairs")?;
    if cfg.fmr_num < 2 {
        return Err(Error::config("fmr_num", "must be at least 2"));
    }
    if cfg.omega_num < 2 {
        return Err(Error::config("omega_num", "must be at least 2"));
    }
    if !(cfg.fmr_min > 0.0 && cfg.fmr_min < cfg.fmr_max && cfg.fmr_max <= 1.0) {
        return Err(Error::config("fmr_min", "need 0 < fmr_min < fmr_max ≤ 1"));
    }
    crate::common::check_positive("max_ratio", cfg.max_ratio)?;
    let max_q = genuine
        .qualities
        .iter()
        .chain(impostor.qualities)
        .fold(f64::NEG_INFINITY, |m, &q| m.max(q));
    if max_q <= 0.0 {
        return Err(Error::config(
            "qualities",
            format!("the largest quality must be > 0, got {max_q}"),
        ));
    }
    let omega_max = cfg.max_ratio / max_q;
    let omegas: Vec<f64> = (0..cfg.omega_num)
        .map(|i| -omega_max + 2.0 * omega_max * i as f64 / (cfg.omega_num - 1) as f64)
        .collect();
    let (lo, hi) = (cfg.fmr_min.log10(), cfg.fmr_max.log10());
    let fmrs: Vec<f64> = (0..cfg.fmr_num)
        .map(|i| 10f64.powf(lo + (hi - lo) * i as f64 / (cfg.fmr_num - 1) as f64))
        .collect();
    let squash = |v: Vec<f64>| -> Vec<f64> {
        if cfg.sigmoid_thresholds {
            v.into_iter().map(|s| 1.0 / (1.0 + (-s).exp())).collect()
        } else {
            v
        }
    };
    // (threshold, fnmr) for every candidate ω (rows) and FMR (columns).
    let table: Vec<Vec<(f64, f64)>> = omegas
        .iter()
        .map(|&w| {
            let gen = squash(genuine.weighted(w));
            let mut imp = squash(impostor.weighted(w));
            imp.sort_by(|a, b| b.total_cmp(a));
            fmrs.iter()
                .map(|&f| operating_point(&imp, &gen, f))
                .collect()
        })
        .collect();
    let mut best_omegas = Vec::with_capacity(fmrs.len());
    let mut thresholds = Vec::with_capacity(fmrs.len());
    let mut fnmrs = Vec::with_capacity(fmrs.len());
    for j in 0..fmrs.len() {
        let (best, &(t, fnmr)) =
            table
                .iter()
                .map(|row| &row[j])
                .enumerate()
                .fold(
                    (0, &table[0][j]),
                    |b, c| if c.1 .1 < b.1 .1 { c } else { b },
                );
        best_omegas.push(omegas[best]);
        thresholds.push(t);
        fnmrs.push(fnmr);
    }
    let (beta, intercept) = fit_line(&thresholds, &best_omegas);
    Ok(Fit {
        weight: QualityWeight {
            alpha: -intercept,
            beta,
        },
        fmrs,
        omegas: best_omegas,
        thresholds,
        fnmrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_weight_and_score() {
        let w = QualityWeight::default();
        assert_eq!((w.alpha, w.beta), (0.077428, 0.125926));
        // ω is 0 above s = α/β ≈ 0.615 and negative below.
        assert_eq!(w.omega(0.7), 0.0);
        assert!((w.omega(0.2) - (0.125926 * 0.2 - 0.077428)).abs() < 1e-15);
        assert!((w.score(0.2, 30.0, 25.0) - (0.2 + w.omega(0.2) * 25.0)).abs() < 1e-15);
        assert_eq!(score(0.5, 3.0, 2.0, |_| 0.1), 0.5 + 0.2);
    }

    #[test]
    fn least_squares_line() {
        let x = [0.1, 0.3, 0.5, 0.9];
        let y: Vec<f64> = x.iter().map(|t| 0.125926 * t - 0.077428).collect();
        let (m, b) = fit_line(&x, &y);
        assert!((m - 0.125926).abs() < 1e-12 && (b + 0.077428).abs() < 1e-12);
        assert_eq!(fit_line(&[1.0, 1.0], &[2.0, 4.0]), (0.0, 3.0));
    }

    #[test]
    fn operating_point_counts_strictly_below_the_fmr() {
        let imp = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0];
        let gen = [0.95, 0.85, 0.75, 0.65];
        // FMR 0.2 on 10 impostors: at most 1 false accept, t = 0.8.
        assert_eq!(operating_point(&imp, &gen, 0.2), (0.8, 0.5));
        // FMR 0.25: 2 false accepts allowed, t = 0.7.
        assert_eq!(operating_point(&imp, &gen, 0.25), (0.7, 0.25));
        // Below 1/N: no false accept, t = the top impostor.
        assert_eq!(operating_point(&imp, &gen, 1e-3), (0.9, 0.75));
    }

    /// A synthetic case where quality matters: high-quality impostors reach the same
    /// cosines as low-quality genuine pairs, so a negative ω (penalising confident pairs
    /// with a low cosine) separates them. The fit picks negative ω, beats ω = 0, and its line
    /// goes through the chosen points.
    #[test]
    fn fit_on_a_case_where_quality_matters() -> Result<()> {
        // Deterministic pseudo-random numbers in [0, 1).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut gs, mut gq, mut is, mut iq) = (vec![], vec![], vec![], vec![]);
        for _ in 0..2000 {
            // Genuine: half good quality (q ≈ 30, s ≈ 0.7), half poor (q ≈ 10, s ≈ 0.35).
            if rand() < 0.5 {
                gs.push(0.6 + 0.2 * rand());
                gq.push(28.0 + 4.0 * rand());
            } else {
                gs.push(0.2 + 0.3 * rand());
                gq.push(8.0 + 4.0 * rand());
            }
        }
        for _ in 0..20000 {
            // Impostors: good quality, cosines up to ≈ 0.45.
            is.push(-0.1 + 0.55 * rand().powi(2));
            iq.push(26.0 + 8.0 * rand());
        }
        let genuine = Pairs {
            scores: &gs,
            qualities: &gq,
        };
        let impostor = Pairs {
            scores: &is,
            qualities: &iq,
        };
        let cfg = FitConfig::default();
        let f = fit(genuine, impostor, &cfg)?;
        assert_eq!((f.fmrs.len(), f.omegas.len()), (50, 50));
        assert!((f.fmrs[0] - 1e-5).abs() < 1e-18 && (f.fmrs[49] - 1e-2).abs() < 1e-15);
        let omega_max = 0.5 / iq.iter().chain(&gq).fold(0.0, |m: f64, &q| m.max(q));
        assert!(f
            .omegas
            .iter()
            .all(|w| w.abs() <= omega_max * (1.0 + 1e-12)));
        assert_eq!(f.omegas[0], -omega_max);
        assert!(f.omegas.iter().all(|&w| w < 0.0), "{:?}", f.omegas);
        // Quality awareness pays: at every FMR the chosen ω does at least as well as the
        // candidate nearest to 0, and strictly better at the loosest FMR.
        let plain = fit(
            genuine,
            impostor,
            &FitConfig {
                omega_num: 2,
                max_ratio: 1e-12,
                ..cfg.clone()
            },
        )?;
        for (a, b) in f.fnmrs.iter().zip(&plain.fnmrs) {
            assert!(a <= b);
        }
        assert!(
            f.fnmrs[49] + 0.05 < plain.fnmrs[49],
            "{} vs {}",
            f.fnmrs[49],
            plain.fnmrs[49]
        );
        // The line is the least-squares fit of the chosen points.
        let (m, b) = fit_line(&f.thresholds, &f.omegas);
        assert_eq!((f.weight.beta, f.weight.alpha), (m, -b));
        // The reference's sigmoid thresholds give thresholds in (0, 1) and the same ω.
        let sig = fit(
            genuine,
            impostor,
            &FitConfig {
                sigmoid_thresholds: true,
                ..cfg
            },
        )?;
        assert!(sig.thresholds.iter().all(|t| *t > 0.0 && *t < 1.0));
        assert_eq!(sig.omegas, f.omegas);
        Ok(())
    }

    #[test]
    fn rejects_bad_inputs() {
        let s = [0.1, 0.2];
        let q = [1.0];
        let bad = Pairs {
            scores: &s,
            qualities: &q,
        };
        let good = Pairs {
            scores: &s,
            qualities: &[1.0, 2.0],
        };
        assert!(matches!(
            fit(bad, good, &FitConfig::default()),
            Err(Error::Shape { .. })
        ));
        let cfg = FitConfig {
            fmr_min: 0.1,
            fmr_max: 0.01,
            ..Default::default()
        };
        assert!(
            matches!(fit(good, good, &cfg), Err(Error::Config { ref key, .. }) if key == "fmr_min")
        );
    }
}
