//! The `[inversion]` step of `reproduce` (ArcFace inversion, Deng et al., TPAMI): images
//! generated from a trained method's held-out test embeddings and class centres by optimising
//! the input of its frozen backbone (fr-train's [`fr_train::invert`]: `1 − cos` to the target
//! plus DeepInversion's BatchNorm-statistics and image priors).
//!
//! What the report measures, on top of `cos(f(x̂), target)`:
//! - embedding targets: whether an image generated from identity k's first test image is
//!   recognised as k: its cosine to k's other test images (genuine) against the other
//!   identities' images (impostor), and rank-1 identification among the inverted identities by
//!   their mean embedding over the images that were not the target;
//! - class-centre targets: rank-1 classification of the generated image among all class
//!   centres of the head (does the model "see" the class it was generated from).

use std::path::Path;

use crate::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use fr_backbone::build_bn_stats_backbone;
use fr_train::{invert, save_png_grid};
use ndarray::{s, Array2, Axis};
use serde::Serialize;
use tracing::info;

use super::EvalSet;
use crate::config::{InversionSection, Preset};

/// What the inversion step measured, for metrics.json and the report.
#[derive(Debug, Serialize)]
pub(super) struct InversionSummary {
    /// The inverted method.
    pub method: String,
    /// The section it ran with (`config.image_size` set to the backbone's).
    pub config: InversionSection,
    /// Embedding targets: `cos(f(x̂_k), target_k)`.
    pub embedding_cosines: Vec<f32>,
    /// Mean cosine of each generated image to the other test images of its identity.
    pub genuine_cosine: Vec<f64>,
    /// Mean cosine of each generated image to the test images of the other inverted identities.
    pub impostor_cosine: Vec<f64>,
    /// Fraction of generated images whose nearest identity (mean embedding of its non-target
    /// images) among the inverted ones is their own.
    pub embedding_rank1: f64,
    /// Class-centre targets: `cos(f(x̂_j), w_j)`.
    pub centre_cosines: Vec<f32>,
    /// Fraction of centre-generated images classified as their class among all centres.
    pub centre_rank1: f64,
    /// Identity loss `mean(1 − cos)` at the first and last step (embeddings, centres).
    pub identity_first_last: Vec<(f64, f64)>,
    /// Wall time of the optimisation.
    pub seconds: f64,
}

fn rows_normalized(x: &Array2<f32>) -> Array2<f32> {
    let mut y = x.clone();
    for mut r in y.rows_mut() {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        r.mapv_inplace(|v| v / n);
    }
    y
}

fn to_array2(t: &Tensor) -> Result<Array2<f32>> {
    let (n, d) = t.dims2()?;
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(Array2::from_shape_vec((n, d), v)?)
}

fn embed<M: ModuleT + ?Sized>(model: &M, x: &Tensor) -> Result<Array2<f32>> {
    let y = fr_kernels::no_grad(|| model.forward_t(x, false))?;
    to_array2(&y)
}

/// Runs the inversion of method `method` (its trained variables `vars`) against the held-out
/// `test` set (synthetic identities, identity-major order) and writes
/// `inversion_embeddings.png` (source image | generated) and `inversion_centres.png`.
///
/// # Errors
/// A missing head weight, fewer test identities than asked, or an optimisation failure.
pub(super) fn run(
    preset: &Preset,
    section: &InversionSection,
    method: &str,
    vars: &VarMap,
    test: &EvalSet,
    device: &Device,
    out_dir: &Path,
) -> Result<InversionSummary> {
    let backbone = build_bn_stats_backbone(
        &preset.backbone,
        VarBuilder::from_varmap(vars, DType::F32, device),
    )?;
    let backbone = backbone.as_ref();
    // The generated images take the backbone's input shape.
    let mut config = section.config.clone();
    config.image_size = 0;
    let start = std::time::Instant::now();
    let per = preset.synthetic.test_images_per_identity;
    let n_test = test.images.shape()[0];
    let (e, c) = (section.embeddings, section.centres);
    if e * per > n_test {
        bail!("config key `inversion.embeddings`: {e} identities × {per} images > {n_test} test images");
    }
    let all = Tensor::from_vec(
        test.images.iter().copied().collect::<Vec<f32>>(),
        test.images.shape(),
        device,
    )?;
    let mut identity_first_last = Vec::new();

    // Embedding targets: the first image of each of the first `e` test identities.
    let (mut embedding_cosines, mut genuine_cosine, mut impostor_cosine, mut embedding_rank1) =
        (Vec::new(), Vec::new(), Vec::new(), f64::NAN);
    if e > 0 {
        let sources: Vec<u32> = (0..e).map(|k| (k * per) as u32).collect();
        let sources = all.index_select(&Tensor::new(sources, device)?, 0)?;
        let targets = fr_kernels::no_grad(|| backbone.forward_t(&sources, false))?;
        info!(
            method,
            images = e,
            steps = config.steps,
            "inverting test embeddings"
        );
        let result = invert(backbone, &targets, &config)?;
        save_png_grid(
            &out_dir.join("inversion_embeddings.png"),
            &result.images,
            Some(&sources),
        )?;
        embedding_cosines = result.cosines.clone();
        identity_first_last.push(first_last(&result.history));
        // Recognition of the generated images against the identities' other images.
        let generated = rows_normalized(&embed(backbone, &result.images)?);
        let rest: Vec<u32> = (0..e * per)
            .filter(|i| i % per != 0)
            .map(|i| i as u32)
            .collect();
        let rest_emb = rows_normalized(&embed(
            backbone,
            &all.index_select(&Tensor::new(rest, device)?, 0)?,
        )?);
        (genuine_cosine, impostor_cosine, embedding_rank1) =
            identity_scores(&generated, &rest_emb, e, per - 1)?;
    }

    // Class-centre targets: the head's first `c` weight rows.
    let (mut centre_cosines, mut centre_rank1) = (Vec::new(), f64::NAN);
    if c > 0 {
        let weight = vars
            .data()
            .lock()
            .expect("VarMap lock")
            .get("head.weight")
            .map(|v| v.as_tensor().clone())
            .with_context(|| {
                format!("method {method}: its head has no `head.weight` class centres to invert")
            })?;
        let classes = weight.dims2()?.0;
        if c > classes {
            bail!("config key `inversion.centres`: {c} > the head's {classes} classes");
        }
        let targets = weight.narrow(0, 0, c)?.detach();
        info!(
            method,
            images = c,
            steps = config.steps,
            "inverting class centres"
        );
        let result = invert(backbone, &targets, &config)?;
        save_png_grid(&out_dir.join("inversion_centres.png"), &result.images, None)?;
        centre_cosines = result.cosines.clone();
        identity_first_last.push(first_last(&result.history));
        let generated = rows_normalized(&embed(backbone, &result.images)?);
        let centres = rows_normalized(&to_array2(&weight)?);
        centre_rank1 = rank1(&generated.dot(&centres.t()));
    }
    let summary = InversionSummary {
        method: method.to_string(),
        config: InversionSection {
            config,
            ..section.clone()
        },
        embedding_cosines,
        genuine_cosine,
        impostor_cosine,
        embedding_rank1,
        centre_cosines,
        centre_rank1,
        identity_first_last,
        seconds: start.elapsed().as_secs_f64(),
    };
    info!(
        method,
        embedding_rank1 = summary.embedding_rank1,
        centre_rank1 = summary.centre_rank1,
        "inversion done"
    );
    Ok(summary)
}

/// How the `e` generated images (rows of `generated`, L2-normalised) score against the test
/// identities' other images (`rest`, `others` per identity, identity-major): each one's mean
/// cosine to its own identity's images and to the other identities' images, and the rank-1
/// rate of identifying it among the identities' mean embeddings.
///
/// # Errors
/// An identity with no other image.
#[allow(clippy::type_complexity)]
fn identity_scores(
    generated: &Array2<f32>,
    rest_emb: &Array2<f32>,
    e: usize,
    others: usize,
) -> Result<(Vec<f64>, Vec<f64>, f64)> {
    let (mut genuine_cosine, mut impostor_cosine, mut correct) = (Vec::new(), Vec::new(), 0usize);
    let mut means = Array2::<f32>::zeros((e, generated.ncols()));
    for k in 0..e {
        let block = rest_emb.slice(s![k * others..(k + 1) * others, ..]);
        means
            .row_mut(k)
            .assign(&block.mean_axis(Axis(0)).context("no other image")?);
    }
    let means = rows_normalized(&means);
    for k in 0..e {
        let g = generated.row(k);
        let sims = rest_emb.dot(&g);
        let own: f64 = sims
            .slice(s![k * others..(k + 1) * others])
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>()
            / others as f64;
        let other_count = (e - 1) * others;
        let other: f64 = if other_count == 0 {
            f64::NAN
        } else {
            (sims.iter().map(|&v| v as f64).sum::<f64>() - own * others as f64) / other_count as f64
        };
        genuine_cosine.push(own);
        impostor_cosine.push(other);
        let scores = means.dot(&g);
        let best = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        correct += usize::from(best == Some(k));
    }
    Ok((genuine_cosine, impostor_cosine, correct as f64 / e as f64))
}

/// The fraction of rows of `scores` `(N, C)` whose largest entry is on the diagonal.
fn rank1(scores: &Array2<f32>) -> f64 {
    let correct = scores
        .rows()
        .into_iter()
        .enumerate()
        .filter(|(j, row)| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                == Some(*j)
        })
        .count();
    correct as f64 / scores.nrows() as f64
}

fn first_last(history: &[fr_train::InversionStep]) -> (f64, f64) {
    (
        history.first().map_or(f64::NAN, |h| h.identity),
        history.last().map_or(f64::NAN, |h| h.identity),
    )
}

fn mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (s, n) = v
        .into_iter()
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

fn min(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(f64::NAN, f64::min)
}

/// The report's inversion section.
pub(super) fn section(s: &InversionSummary) -> String {
    let c = &s.config.config;
    let mut md = format!(
        "\n## ArcFace inversion of `{}`\n\n\
Images optimised from noise against the frozen backbone (eval mode): `{} · (1 − cos(f(x), t)) + {} · BN-statistics prior \
(first layer ×{}) + {} · TV-ℓ2 + {} · ℓ2`, Adam (lr {}, β = ({}, {})), {} steps, seed {}. The targets are \
never shown to the optimiser as images, only as embeddings.\n\n\
| targets | images | cos(f(x̂), target) mean / min | 1 − cos, first → last step | recognised as the source (rank-1) | cos to own identity's other images | cos to other identities' images |\n\
|---|---|---|---|---|---|---|\n",
        s.method,
        c.identity_weight,
        c.bn_weight,
        c.first_bn_multiplier,
        c.tv_l2_weight,
        c.l2_weight,
        c.lr,
        c.beta1,
        c.beta2,
        c.steps,
        c.seed,
    );
    let mut k = 0;
    if !s.embedding_cosines.is_empty() {
        let (a, b) = s
            .identity_first_last
            .get(k)
            .copied()
            .unwrap_or((f64::NAN, f64::NAN));
        k += 1;
        md += &format!(
            "| test embeddings (held-out identities' first image) | {} | {:.3} / {:.3} | {:.3} → {:.3} | {:.1} % among {} identities | {:.3} | {:.3} |\n",
            s.embedding_cosines.len(),
            mean(s.embedding_cosines.iter().map(|&x| x as f64)),
            min(s.embedding_cosines.iter().map(|&x| x as f64)),
            a,
            b,
            100.0 * s.embedding_rank1,
            s.embedding_cosines.len(),
            mean(s.genuine_cosine.iter().copied()),
            mean(s.impostor_cosine.iter().copied()),
        );
    }
    if !s.centre_cosines.is_empty() {
        let (a, b) = s
            .identity_first_last
            .get(k)
            .copied()
            .unwrap_or((f64::NAN, f64::NAN));
        md += &format!(
            "| class centres (head weight rows) | {} | {:.3} / {:.3} | {:.3} → {:.3} | {:.1} % among all class centres | — | — |\n",
            s.centre_cosines.len(),
            mean(s.centre_cosines.iter().map(|&x| x as f64)),
            min(s.centre_cosines.iter().map(|&x| x as f64)),
            a,
            b,
            100.0 * s.centre_rank1,
        );
    }
    md += &format!("\nTotal inversion time {:.0} s.\n", s.seconds);
    if !s.embedding_cosines.is_empty() {
        md += "\nSource test image | generated image:\n\n![inversion of test embeddings](inversion_embeddings.png)\n";
    }
    if !s.centre_cosines.is_empty() {
        md += "\nGenerated from class centres 0, 1, …:\n\n![inversion of class centres](inversion_centres.png)\n";
    }
    md
}
