//! IJB-B / IJB-C template protocols: 1:1 verification (insightface `eval_ijbc.py`) and 1:N
//! open-set identification (insightface `ijb_evals.py` with the corrected open-set rule).
//!
//! # 1:1
//! 1. Per-image features `(N, 2D)`: each row is the embedding of the image followed by the
//!    embedding of its horizontal flip (as `eval_ijbc.py` stores them).
//! 2. [`IjbFlags`]: F adds the flip half (else only the first half is used), N keeps the norm
//!    (else every image feature is L2-normalised), D multiplies by the detector's faceness score.
//!    insightface's defaults are all three on ([`IjbFlags::default`]).
//! 3. [`templates`]: within a template, features of the same media are averaged (a media with
//!    one image keeps it), the media features are summed, and the template feature is
//!    L2-normalised. Sums and means run in f32 in numpy's order (the reference's float32
//!    arrays), the normalisation in f64.
//! 4. [`pair_scores`]: dot products of the two templates' normalised features, in parallel.
//! 5. [`verify_1to1`]: the ROC over the pair scores and TAR at each FAR by the nearest-point rule
//!    ([`crate::tar_at_far`]), plus the linearly interpolated TAR as a second, clearly named
//!    column.
//!
//! # 1:N
//! [`identify_1toN`]: gallery templates and probe templates with subject ids. Mated probes (whose
//! subject is in the gallery) give the CMC (top-1/5/10); non-mated probes set the open-set
//! threshold at each FPIR: their best gallery scores sorted in descending order, entry
//! `max(⌊n·FPIR⌋ − 1, 0)`. TPIR counts mated probes whose rank-1 gallery subject is right AND
//! whose score is above that threshold. IJB-C has two disjoint galleries (G1 / G2, IJB-B: S1 /
//! S2); evaluate each and average ([`average_1toN`]).

use std::collections::{BTreeMap, HashMap};

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{check_len, EvalError, Result};
use crate::roc::{roc_curve, tar_at_far, Roc};

/// The N / D / F switches of `eval_ijbc.py`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct IjbFlags {
    /// F: add the flipped image's embedding (`use_flip_test`).
    pub flip: bool,
    /// N: keep each image feature's norm (`use_norm_score`); `false` L2-normalises them.
    pub keep_norm: bool,
    /// D: multiply by the faceness score (`use_detector_score`).
    pub detector_score: bool,
}

impl Default for IjbFlags {
    /// insightface's defaults: flip added, norm kept, detector score on.
    fn default() -> Self {
        Self {
            flip: true,
            keep_norm: true,
            detector_score: true,
        }
    }
}

/// The per-image features after the flags, `(N, D)` f32 (the reference's `img_input_feats`).
///
/// `features` `(N, 2D)`: image embedding then flipped-image embedding per row; `faceness` `N`
/// detector scores.
///
/// # Errors
/// Odd width, length mismatch, non-finite values.
pub fn image_features(
    features: ArrayView2<f32>,
    faceness: &[f32],
    flags: IjbFlags,
) -> Result<Array2<f32>> {
    let (n, w) = features.dim();
    check_len("features rows", n, "faceness", faceness.len())?;
    if w == 0 || w % 2 != 0 {
        return Err(EvalError::InvalidParameter {
            name: "features",
            reason: format!(
                "each row must hold the image and flip embeddings (even width), got {w}"
            ),
        });
    }
    let d = w / 2;
    let mut out = Array2::<f32>::zeros((n, d));
    for (r, (row, mut o)) in features.outer_iter().zip(out.outer_iter_mut()).enumerate() {
        for k in 0..d {
            let v = if flags.flip {
                row[k] + row[d + k]
            } else {
                row[k]
            };
            if !v.is_finite() {
                return Err(EvalError::NonFinite {
                    what: "features",
                    index: r * w + k,
                    value: f64::from(v),
                });
            }
            o[k] = v;
        }
        if !flags.keep_norm {
            let squares: Vec<f32> = o.iter().map(|v| v * v).collect();
            let norm = crate::numeric::np_sum_f32(&squares).sqrt();
            o.mapv_inplace(|v| v / norm);
        }
        if flags.detector_score {
            let s = faceness[r];
            o.mapv_inplace(|v| v * s);
        }
    }
    Ok(out)
}

/// Template features: one L2-normalised row per distinct template id, ids ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct Templates {
    /// Distinct template ids, ascending (`np.unique`).
    pub ids: Vec<i64>,
    /// `(T, D)` f64, unit rows (a zero template stays zero).
    pub features: Array2<f64>,
}

impl Templates {
    /// Row of template `id`, if present.
    pub fn row_of(&self, id: i64) -> Option<usize> {
        self.ids.binary_search(&id).ok()
    }
}

/// Aggregate image features `(N, D)` into template features (`image2template_feature`):
/// mean within a media, sum over the template's media, L2-normalise.
///
/// # Errors
/// Length mismatches, empty input.
pub fn templates(
    image_features: ArrayView2<f32>,
    template_ids: &[i64],
    media_ids: &[i64],
) -> Result<Templates> {
    let (n, d) = image_features.dim();
    check_len("image features", n, "template ids", template_ids.len())?;
    check_len("image features", n, "media ids", media_ids.len())?;
    if n == 0 {
        return Err(EvalError::Empty {
            what: "image features",
        });
    }
    // template → media → image rows (BTreeMaps: numpy's sorted unique order).
    let mut groups: BTreeMap<i64, BTreeMap<i64, Vec<usize>>> = BTreeMap::new();
    for (i, (&t, &m)) in template_ids.iter().zip(media_ids).enumerate() {
        groups.entry(t).or_default().entry(m).or_default().push(i);
    }
    let ids: Vec<i64> = groups.keys().copied().collect();
    let rows: Vec<Vec<f64>> = groups
        .par_iter()
        .map(|(_, medias)| {
            let mut sum = vec![0f32; d];
            for rows in medias.values() {
                let media: Vec<f32> = if rows.len() == 1 {
                    image_features.row(rows[0]).to_vec()
                } else {
                    let mut acc = vec![0f32; d];
                    for &r in rows {
                        for (a, v) in acc.iter_mut().zip(image_features.row(r)) {
                            *a += v;
                        }
                    }
                    acc.iter().map(|a| a / rows.len() as f32).collect()
                };
                for (s, v) in sum.iter_mut().zip(media) {
                    *s += v;
                }
            }
            let sum: Vec<f64> = sum.into_iter().map(f64::from).collect();
            let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 0.0 {
                sum.iter().map(|v| v / norm).collect()
            } else {
                sum
            }
        })
        .collect();
    let mut features = Array2::<f64>::zeros((ids.len(), d));
    for (mut dst, src) in features.outer_iter_mut().zip(rows) {
        dst.assign(&ndarray::ArrayView1::from(&src));
    }
    Ok(Templates { ids, features })
}

/// Score of each template pair `(p1[i], p2[i])`: the dot product of their normalised features.
///
/// Vectorised and cache-blocked, so that IJB-C's 15.6 M pairs of 512-d f64 templates score in
/// about a second on two cores: template ids become `u32` rows, the pairs are counting-sorted by
/// the (row block, row block) tile they fall in, with blocks sized so that a tile's two blocks
/// stay in the last-level cache, and the tiles are scored in parallel, eight independent f64
/// accumulators per dot product. Scores are f64 from f64 features, as the reference's
/// `np.sum(feat1 * feat2, -1)` on its float64 template features (the summation order differs,
/// so scores agree to about 1e-15, not bit for bit). Memory: about 28 bytes per pair besides the
/// output.
///
/// # Errors
/// Length mismatch, or a template id absent from `templates` (named with its pair index).
pub fn pair_scores(templates: &Templates, p1: &[i64], p2: &[i64]) -> Result<Vec<f64>> {
    check_len("p1", p1.len(), "p2", p2.len())?;
    let rows = TemplateRows::new(&templates.ids);
    let to_rows = |ids: &[i64]| -> Result<Vec<u32>> {
        ids.par_iter()
            .with_min_len(1 << 16)
            .enumerate()
            .map(|(i, &id)| {
                rows.get(id).ok_or_else(|| EvalError::InvalidParameter {
                    name: "template pairs",
                    reason: format!("pair {i}: template {id} has no image"),
                })
            })
            .collect()
    };
    let (r1, r2) = rayon::join(|| to_rows(p1), || to_rows(p2));
    let f = &templates.features;
    let flat = f.as_slice().expect("standard layout");
    Ok(tiled_dots(flat, f.ncols(), &r1?, &r2?))
}

/// Template id → feature row: a direct table over the id range when it is small (IJB ids are
/// below a few hundred thousand), else a binary search over the sorted ids.
enum TemplateRows<'a> {
    Table { min: i64, rows: Vec<u32> },
    Sorted(&'a [i64]),
}

impl<'a> TemplateRows<'a> {
    const NONE: u32 = u32::MAX;

    fn new(ids: &'a [i64]) -> Self {
        let (Some(&min), Some(&max)) = (ids.first(), ids.last()) else {
            return Self::Sorted(ids);
        };
        let span = max.checked_sub(min).and_then(|s| usize::try_from(s).ok());
        match span {
            Some(span) if span < (1 << 26) && ids.len() < Self::NONE as usize => {
                let mut rows = vec![Self::NONE; span + 1];
                for (r, &id) in ids.iter().enumerate() {
                    rows[(id - min) as usize] = r as u32;
                }
                Self::Table { min, rows }
            }
            _ => Self::Sorted(ids),
        }
    }

    fn get(&self, id: i64) -> Option<u32> {
        match self {
            Self::Table { min, rows } => id
                .checked_sub(*min)
                .and_then(|k| usize::try_from(k).ok())
                .and_then(|k| rows.get(k).copied())
                .filter(|&r| r != Self::NONE),
            Self::Sorted(ids) => ids.binary_search(&id).ok().map(|r| r as u32),
        }
    }
}

/// Bytes of feature rows one tile touches (two row blocks): a quarter of a typical server
/// last-level cache, so that two tiles scored at once still fit.
const TILE_BYTES: usize = 8 << 20;

/// `x · y` with eight independent accumulators (vectorises; f64 throughout).
#[inline]
fn dot(x: &[f64], y: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    let mut tail = 0.0;
    for (a, b) in xr.iter().zip(yr) {
        tail += a * b;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Dot products of rows `r1[i]` and `r2[i]` of the row-major `(rows, d)` matrix `flat`.
fn tiled_dots(flat: &[f64], d: usize, r1: &[u32], r2: &[u32]) -> Vec<f64> {
    let n = r1.len();
    let row = |r: u32| &flat[r as usize * d..(r as usize + 1) * d];
    let n_rows = flat.len() / d.max(1);
    let block = (TILE_BYTES / (2 * 8 * d.max(1))).max(1);
    let nb = n_rows.div_ceil(block).max(1);
    if nb == 1 || n < 1 << 16 || n > u32::MAX as usize {
        return r1
            .par_iter()
            .zip(r2)
            .with_min_len(4096)
            .map(|(&a, &b)| dot(row(a), row(b)))
            .collect();
    }
    // Counting sort of the pairs by tile; the dot product is symmetric, so (i, j) and (j, i)
    // share a tile.
    let tile = |a: u32, b: u32| {
        let (x, y) = (a as usize / block, b as usize / block);
        x.min(y) * nb + x.max(y)
    };
    let mut start = vec![0usize; nb * nb + 1];
    for (&a, &b) in r1.iter().zip(r2) {
        start[tile(a, b) + 1] += 1;
    }
    for t in 0..nb * nb {
        start[t + 1] += start[t];
    }
    let mut next = start.clone();
    let mut order = vec![0u32; n];
    let mut sorted = vec![(0u32, 0u32); n];
    for (i, (&a, &b)) in r1.iter().zip(r2).enumerate() {
        let t = tile(a, b);
        let k = next[t];
        next[t] += 1;
        order[k] = i as u32;
        sorted[k] = (a, b);
    }
    // Score tile by tile (each tile a contiguous run of `sorted`), in parallel.
    let mut sorted_scores = vec![0f64; n];
    type Piece<'p> = (&'p [(u32, u32)], &'p mut [f64]);
    let mut chunks: Vec<Piece<'_>> = Vec::new();
    let (mut rest_p, mut rest_s) = (sorted.as_slice(), sorted_scores.as_mut_slice());
    for t in 0..nb * nb {
        // Large tiles in pieces, so that both threads can work on one tile.
        let mut len = start[t + 1] - start[t];
        while len > 0 {
            let piece = len.min(1 << 15);
            let (p, rp) = rest_p.split_at(piece);
            let (s, rs) = rest_s.split_at_mut(piece);
            chunks.push((p, s));
            (rest_p, rest_s) = (rp, rs);
            len -= piece;
        }
    }
    chunks.into_par_iter().for_each(|(pairs, out)| {
        for (o, &(a, b)) in out.iter_mut().zip(pairs) {
            *o = dot(row(a), row(b));
        }
    });
    drop(sorted);
    let mut scores = vec![0f64; n];
    for (&i, &s) in order.iter().zip(&sorted_scores) {
        scores[i as usize] = s;
    }
    scores
}

/// TAR at one FAR, two ways.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TarRow {
    /// Requested FAR.
    pub far: f64,
    /// TAR at the ROC point nearest in FAR (eval_ijbc.py's rule; the published numbers).
    pub tar_nearest: f64,
    /// FAR actually achieved at that point.
    pub far_nearest: f64,
    /// TAR linearly interpolated on the ROC at exactly `far` (a second reading, not the
    /// published one).
    pub tar_interpolated: f64,
}

/// Result of [`verify_1to1`].
#[derive(Debug, Clone, Serialize)]
pub struct OneToOneReport {
    /// Pairs scored.
    pub n_pairs: usize,
    /// Genuine pairs.
    pub n_genuine: usize,
    /// One row per requested FAR.
    pub tar: Vec<TarRow>,
    /// Area under the ROC.
    pub auc: f64,
    /// The ROC (for plotting).
    #[serde(skip)]
    pub roc: Roc,
}

/// The FARs eval_ijbc.py reports.
pub const IJB_FARS: [f64; 6] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1];

/// TAR at each FAR of `fars` from pair `scores` and `labels` (`true` = genuine).
///
/// # Errors
/// As [`roc_curve`]; a FAR outside (0, 1].
pub fn verify_1to1(scores: &[f64], labels: &[bool], fars: &[f64]) -> Result<OneToOneReport> {
    let roc = roc_curve(labels, scores)?;
    let tar = fars
        .iter()
        .map(|&far| {
            if !(far > 0.0 && far <= 1.0) {
                return Err(EvalError::InvalidParameter {
                    name: "far",
                    reason: format!("must be in (0, 1], got {far}"),
                });
            }
            let p = tar_at_far(&roc, far)?;
            Ok(TarRow {
                far,
                tar_nearest: p.tar,
                far_nearest: p.fpr,
                tar_interpolated: interpolate(&roc.fpr, &roc.tpr, far),
            })
        })
        .collect::<Result<_>>()?;
    Ok(OneToOneReport {
        n_pairs: scores.len(),
        n_genuine: roc.n_genuine,
        tar,
        auc: crate::roc::auc(&roc),
        roc,
    })
}

/// `np.interp(x, xs, ys)` for non-decreasing `xs` (first match of equal xs on the right).
fn interpolate(xs: &[f64], ys: &[f64], x: f64) -> f64 {
    let i = xs.partition_point(|&v| v <= x);
    if i == 0 {
        return ys[0];
    }
    if i == xs.len() {
        return ys[xs.len() - 1];
    }
    let (x0, x1, y0, y1) = (xs[i - 1], xs[i], ys[i - 1], ys[i]);
    if x1 == x0 {
        y1
    } else {
        y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    }
}

/// One side of a 1:N evaluation: L2-normalised template features `(T, D)` and their subject ids.
#[derive(Debug, Clone, Copy)]
pub struct TemplateSet<'a> {
    /// `(T, D)` unit-norm template features.
    pub features: ArrayView2<'a, f64>,
    /// Subject id of each template.
    pub subjects: &'a [i64],
}

/// Result of [`identify_1toN`] (or the mean of several, [`average_1toN`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OneToNReport {
    /// Mated probes (subject in the gallery).
    pub n_mated: usize,
    /// Non-mated probes (set the open-set thresholds).
    pub n_non_mated: usize,
    /// Closed-set identification rate at rank 1, 5 and 10 over mated probes.
    pub top1: f64,
    /// Rank-5 rate.
    pub top5: f64,
    /// Rank-10 rate.
    pub top10: f64,
    /// `(FPIR, threshold, TPIR)` for each requested FPIR.
    pub tpir_at_fpir: Vec<(f64, f64, f64)>,
}

/// Open-set 1:N identification of `probes` against `gallery` (see the module docs).
///
/// # Errors
/// Size mismatches, an empty side, no mated probe, no non-mated probe, an FPIR outside (0, 1].
#[allow(non_snake_case)]
pub fn identify_1toN(
    gallery: TemplateSet<'_>,
    probes: TemplateSet<'_>,
    fpirs: &[f64],
) -> Result<OneToNReport> {
    check_len(
        "gallery features",
        gallery.features.nrows(),
        "gallery subjects",
        gallery.subjects.len(),
    )?;
    check_len(
        "probe features",
        probes.features.nrows(),
        "probe subjects",
        probes.subjects.len(),
    )?;
    if gallery.features.nrows() == 0 || probes.features.nrows() == 0 {
        return Err(EvalError::Empty {
            what: "gallery or probes",
        });
    }
    if gallery.features.ncols() != probes.features.ncols() {
        return Err(EvalError::ShapeMismatch {
            what: "probe feature width",
            expected: vec![gallery.features.ncols()],
            got: vec![probes.features.ncols()],
        });
    }
    let in_gallery: HashMap<i64, ()> = gallery.subjects.iter().map(|&s| (s, ())).collect();
    // Per probe: (mated, rank of the first correct gallery template (0-based) or None, best score,
    // rank-1 subject correct).
    let per_probe: Vec<(bool, Option<usize>, f64)> = (0..probes.features.nrows())
        .into_par_iter()
        .map(|i| {
            let (p, subject) = (probes.features.row(i), probes.subjects[i]);
            let mut scored: Vec<(f64, i64)> = gallery
                .features
                .outer_iter()
                .zip(gallery.subjects)
                .map(|(g, &s)| (g.dot(&p), s))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            let rank = scored.iter().position(|&(_, s)| s == subject);
            (in_gallery.contains_key(&subject), rank, scored[0].0)
        })
        .collect();
    let mated: Vec<&(bool, Option<usize>, f64)> = per_probe.iter().filter(|p| p.0).collect();
    let mut non_mated: Vec<f64> = per_probe.iter().filter(|p| !p.0).map(|p| p.2).collect();
    if mated.is_empty() {
        return Err(EvalError::MissingClass {
            what: "1:N probes".into(),
            missing: "mated",
            n: per_probe.len(),
        });
    }
    if non_mated.is_empty() {
        return Err(EvalError::MissingClass {
            what: "1:N probes".into(),
            missing: "non-mated",
            n: per_probe.len(),
        });
    }
    non_mated.sort_by(|a, b| b.total_cmp(a));
    let top = |k: usize| {
        mated.iter().filter(|p| p.1.is_some_and(|r| r < k)).count() as f64 / mated.len() as f64
    };
    let tpir_at_fpir = fpirs
        .iter()
        .map(|&fpir| {
            if !(fpir > 0.0 && fpir <= 1.0) {
                return Err(EvalError::InvalidParameter {
                    name: "fpir",
                    reason: format!("must be in (0, 1], got {fpir}"),
                });
            }
            let k = ((non_mated.len() as f64 * fpir) as usize)
                .saturating_sub(1)
                .min(non_mated.len() - 1);
            let threshold = non_mated[k];
            let hits = mated
                .iter()
                .filter(|p| p.1 == Some(0) && p.2 > threshold)
                .count();
            Ok((fpir, threshold, hits as f64 / mated.len() as f64))
        })
        .collect::<Result<_>>()?;
    Ok(OneToNReport {
        n_mated: mated.len(),
        n_non_mated: non_mated.len(),
        top1: top(1),
        top5: top(5),
        top10: top(10),
        tpir_at_fpir,
    })
}

/// The mean of several galleries' reports (G1 / G2): rates averaged, counts summed.
///
/// # Errors
/// No report, or reports with different FPIR lists.
#[allow(non_snake_case)]
pub fn average_1toN(reports: &[OneToNReport]) -> Result<OneToNReport> {
    let Some(first) = reports.first() else {
        return Err(EvalError::Empty { what: "reports" });
    };
    let n = reports.len() as f64;
    let mean = |f: &dyn Fn(&OneToNReport) -> f64| reports.iter().map(f).sum::<f64>() / n;
    let mut tpir = Vec::new();
    for (i, &(fpir, _, _)) in first.tpir_at_fpir.iter().enumerate() {
        if reports
            .iter()
            .any(|r| r.tpir_at_fpir.get(i).map(|t| t.0) != Some(fpir))
        {
            return Err(EvalError::InvalidParameter {
                name: "reports",
                reason: "different FPIR lists".into(),
            });
        }
        tpir.push((
            fpir,
            mean(&|r| r.tpir_at_fpir[i].1),
            mean(&|r| r.tpir_at_fpir[i].2),
        ));
    }
    Ok(OneToNReport {
        n_mated: reports.iter().map(|r| r.n_mated).sum(),
        n_non_mated: reports.iter().map(|r| r.n_non_mated).sum(),
        top1: mean(&|r| r.top1),
        top5: mean(&|r| r.top5),
        top10: mean(&|r| r.top10),
        tpir_at_fpir: tpir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn flags_and_media_pooling() {
        // Two images of template 7: media 1 twice (averaged), media 2 once.
        let feats = array![
            [1.0f32, 0.0, 1.0, 0.0],
            [3.0, 0.0, 1.0, 0.0],
            [0.0, 2.0, 0.0, 2.0],
        ];
        let img = image_features(feats.view(), &[1.0, 0.5, 1.0], IjbFlags::default()).unwrap();
        assert_eq!(img, array![[2.0f32, 0.0], [2.0, 0.0], [0.0, 4.0]]);
        let t = templates(img.view(), &[7, 7, 7], &[1, 1, 2]).unwrap();
        // media 1: mean (2, 0); media 2: (0, 4); sum (2, 4) normalised.
        let s = 20f64.sqrt();
        assert_eq!(t.ids, vec![7]);
        assert!((t.features[[0, 0]] - 2.0 / s).abs() < 1e-15);
        assert!((t.features[[0, 1]] - 4.0 / s).abs() < 1e-15);
        let plain = image_features(
            feats.view(),
            &[1.0, 0.5, 1.0],
            IjbFlags {
                flip: false,
                keep_norm: false,
                detector_score: false,
            },
        )
        .unwrap();
        assert_eq!(plain, array![[1.0f32, 0.0], [1.0, 0.0], [0.0, 1.0]]);
        assert!(image_features(feats.view(), &[1.0], IjbFlags::default()).is_err());
    }

    #[test]
    fn pair_scores_name_a_missing_template() {
        let img = array![[1.0f32, 0.0], [0.0, 1.0]];
        let t = templates(img.view(), &[1, 2], &[1, 2]).unwrap();
        assert_eq!(pair_scores(&t, &[1, 1], &[1, 2]).unwrap(), vec![1.0, 0.0]);
        let err = pair_scores(&t, &[1], &[9]).unwrap_err().to_string();
        assert!(err.contains("template 9"), "{err}");
    }

    /// The cache-blocked path (enough pairs and rows for several tiles) gives the plain dot
    /// products in the original pair order.
    #[test]
    fn tiled_pair_scores_match_plain_dots() {
        let (t, d, n) = (2500usize, 512usize, 70_000usize);
        let mut state = 99u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        let feats = Array2::from_shape_fn((t, d), |_| (next() % 2001) as f64 / 1000.0 - 1.0);
        let ids: Vec<i64> = (0..t as i64).map(|i| 10 + 3 * i).collect();
        let templates = Templates {
            ids: ids.clone(),
            features: feats.clone(),
        };
        let p1: Vec<i64> = (0..n).map(|_| ids[next() as usize % t]).collect();
        let p2: Vec<i64> = (0..n).map(|_| ids[next() as usize % t]).collect();
        let got = pair_scores(&templates, &p1, &p2).unwrap();
        for i in (0..n).step_by(97) {
            let (a, b) = ((p1[i] - 10) as usize / 3, (p2[i] - 10) as usize / 3);
            let want = feats.row(a).dot(&feats.row(b));
            assert!(
                (got[i] - want).abs() < 1e-9,
                "pair {i}: {} vs {want}",
                got[i]
            );
        }
        let err = pair_scores(&templates, &p1[..3], &[10, 11, 13]).unwrap_err();
        assert!(err.to_string().contains("pair 1: template 11"), "{err}");
    }

    #[test]
    fn interpolated_and_nearest_tar() {
        let scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4];
        let labels = [true, false, true, false, true, false];
        let r = verify_1to1(&scores, &labels, &[0.5]).unwrap();
        assert_eq!(r.n_genuine, 3);
        let row = r.tar[0];
        assert!(row.tar_interpolated >= 0.0 && row.tar_interpolated <= 1.0);
        assert!((interpolate(&[0.0, 1.0], &[0.0, 2.0], 0.25) - 0.5).abs() < 1e-15);
        assert!(verify_1to1(&scores, &labels, &[0.0]).is_err());
    }

    /// Hand-checked 1:N: three gallery subjects on the axes; two mated probes (one right at
    /// rank 1, one at rank 2) and two non-mated probes.
    #[test]
    fn open_set_identification() {
        let g = array![[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let gs = [10, 20, 30];
        let s = 0.5f64.sqrt();
        let p = array![
            [0.96, 0.28, 0.0], // subject 10, rank 1, score 0.96
            [0.8, 0.6, 0.0],   // subject 20, rank 2
            [s, 0.0, s],       // non-mated, best 0.707
            [0.0, 0.6, 0.8],   // non-mated, best 0.8
        ];
        let ps = [10, 20, 99, 98];
        let r = identify_1toN(
            TemplateSet {
                features: g.view(),
                subjects: &gs,
            },
            TemplateSet {
                features: p.view(),
                subjects: &ps,
            },
            &[0.5, 1.0],
        )
        .unwrap();
        assert_eq!((r.n_mated, r.n_non_mated), (2, 2));
        assert_eq!((r.top1, r.top5), (0.5, 1.0));
        // FPIR 0.5: threshold = sorted non-mated [0.8, 0.707][max(1 − 1, 0)] = 0.8.
        assert_eq!(r.tpir_at_fpir[0].1, 0.8);
        assert_eq!(r.tpir_at_fpir[0].2, 0.5);
        // FPIR 1: threshold 0.707; still only the rank-1 probe counts.
        assert_eq!(r.tpir_at_fpir[1].2, 0.5);
        let avg = average_1toN(&[r.clone(), r.clone()]).unwrap();
        assert_eq!(avg.top1, 0.5);
        assert_eq!(avg.n_mated, 4);
    }
}
