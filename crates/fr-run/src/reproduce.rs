//! `cargo xtask reproduce <paper>`: train the paper's method and its baselines with one seed,
//! backbone and budget, evaluate them on the same pairs, and write the report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::progress::progress_bar;
use crate::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use fr_data::loader::{BatchLoader, LoaderConfig};
use fr_data::recordio::RecordIoDataset;
use fr_data::synthetic::{DepthMap, SyntheticConfig, SyntheticFaces};
use fr_data::transform::images_to_chw;
use fr_data::verification_bin::load_bin_sized;
use fr_data::{FaceDataset, InMemoryDataset, Quality};
use fr_eval::{
    embed_with_flip_progress, evaluate, Embedder, VerificationConfig, VerificationReport,
};
use fr_render::{resize_bilinear, to_rgb8, JointConfig, ReconstructionBranch};
use fr_train::{SeededVarMap, Trainer};
use image::RgbImage;
use ndarray::{Array2, Array4, ArrayView4};
use serde::Serialize;
use tracing::{info, warn};

use crate::config::{KdSchedule, Preset, Scoring};
use crate::config_file::ConfigSource;
use crate::embed::BackboneEmbedder;
use crate::fit::{fit, FitConfig, OnEpoch};
use crate::model::{assemble, Model, ModelSpec};
use crate::presets::Presets;
use crate::report::{self, Curve, Row, Written};

mod inversion;
mod quantface;
mod student;

/// Below this many pairs per fold, verification is scored as a single fold.
pub(crate) const MIN_PAIRS_PER_FOLD: usize = 10;

/// Options of `reproduce` (`fr reproduce`, `cargo xtask reproduce`): which preset, its
/// overrides, the data, the output folder.
#[derive(Debug, Clone, Default)]
pub struct ReproduceOptions {
    /// The paper preset (`configs/<paper>.toml`), or `compare` followed by the heads to train
    /// side by side.
    pub paper: Option<String>,
    /// After `compare`: registry head names or preset names (a preset contributes its paper's
    /// head with the preset's settings), e.g. `compare arcface cosface adaface`.
    pub names: Vec<String>,
    /// Use this config file instead of `configs/<paper>.toml`.
    pub config: Option<PathBuf>,
    /// Override a config value: `--set train.epochs=3` (repeatable; value parsed as TOML).
    pub sets: Vec<String>,
    /// Train on an insightface RecordIO folder (train.rec, train.idx, property) instead of
    /// the synthetic identities.
    pub train_rec: Option<PathBuf>,
    /// Verification sets (.bin) to evaluate on; required with --train-rec.
    pub val_bin: Vec<PathBuf>,
    /// Output folder (default `target/reproduce/<paper>`).
    pub out: Option<PathBuf>,
}

/// Images to embed once, and the pair protocols scored on those embeddings.
pub(crate) struct EvalSet {
    /// `(N, 3, S, S)` normalised images.
    images: Array4<f32>,
    protocols: Vec<Protocol>,
}

/// One verification protocol over an [`EvalSet`]'s images.
struct Protocol {
    name: String,
    /// Row indices into the set's images, pair by pair.
    pairs: Vec<(usize, usize)>,
    issame: Vec<bool>,
}

/// What one method produced, for metrics.json.
#[derive(Debug, Serialize)]
pub(crate) struct MethodResult {
    method: String,
    head: fr_heads::HeadConfig,
    pub(crate) train_seconds: f64,
    pub(crate) images_per_second: f64,
    pub(crate) steps: u64,
    pub(crate) skipped_steps: u64,
    /// Mean loss of each epoch.
    pub(crate) epoch_loss: Vec<f64>,
    /// Images per step actually used (the preset's, or the whole set when it is smaller).
    pub(crate) batch_size: usize,
    /// Training images skipped because they failed to decode.
    pub(crate) skipped_images: usize,
    pub(crate) protocols: Vec<(String, VerificationReport)>,
    /// With `eval.scoring = "qmagface"`: the fitted ω and the quality-aware reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    qmagface: Option<QmagfaceResult>,
    /// For sub-center heads: the drop step on the training set.
    #[serde(skip_serializing_if = "Option::is_none")]
    subcenter_drop: Option<DropSummary>,
    /// For methods trained with the reconstruction branch: what it learnt.
    #[serde(skip_serializing_if = "Option::is_none")]
    render: Option<RenderResult>,
}

/// The reconstruction branch of one method after training.
#[derive(Debug, Serialize)]
struct RenderResult {
    /// The joint objective it trained with.
    joint: JointConfig,
    /// Means over the last epoch's steps: `head_loss` (L_FR), `l_reco`, `l_canon`, `l_view`
    /// (unweighted) and `render_loss` (the weighted sum of the branch's terms).
    last_epoch: BTreeMap<String, f64>,
    /// Canonical depth against the ground truth (synthetic data only).
    #[serde(skip_serializing_if = "Option::is_none")]
    depth_correlation: Option<DepthCorrelation>,
    /// The picture grid: input, canonical face, canonical depth, re-rendered view.
    grid: PathBuf,
}

/// Pearson correlation between the branch's canonical depth and the identity's ground-truth
/// canonical depth, inside the ground-truth face mask, per held-out test image.
#[derive(Debug, Serialize)]
struct DepthCorrelation {
    /// Test images the statistics are over.
    images: usize,
    /// The trained branch (eval mode).
    trained: MeanStd,
    /// The same branch before training (same seed, initial weights): the reference.
    untrained: MeanStd,
    /// A fixed head shape — the true canonical depth of training identity 0 — for every
    /// image: what knowing "a face is an ellipsoid" alone scores.
    template: MeanStd,
}

/// Mean and population standard deviation.
#[derive(Debug, Clone, Copy, Serialize)]
struct MeanStd {
    mean: f64,
    std: f64,
}

impl MeanStd {
    fn of(v: &[f64]) -> Self {
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean,
            std: var.sqrt(),
        }
    }
}

/// Ground truth for the depth correlation: the held-out test identities (in the evaluation
/// set's order) and the template shape.
pub(crate) struct DepthTruth {
    test: SyntheticFaces,
    template: DepthMap,
}

/// Held-out test images in the branch's correlation statistic (the first ones, in set order).
const DEPTH_IMAGES: usize = 256;
/// Rows of the picture grid.
const GRID_ROWS: usize = 8;

/// QMagFace scoring of one method.
#[derive(Debug, Serialize)]
struct QmagfaceResult {
    /// ω(s) = min(0, β·s − α).
    alpha: f64,
    beta: f64,
    /// Where ω comes from: fitted on validation pairs, or the published values.
    omega_source: String,
    protocols: Vec<(String, VerificationReport)>,
}

/// Sub-center ArcFace's drop step on the training set.
#[derive(Debug, Serialize)]
struct DropSummary {
    kept: usize,
    total: usize,
    /// The cleaned sample list (one kept dataset index per line).
    list: PathBuf,
}

#[derive(Debug, Serialize)]
struct Metrics<'a> {
    preset: &'a Preset,
    data: String,
    raw_pixels: Vec<(String, VerificationReport)>,
    methods: Vec<MethodResult>,
    rows: Vec<Row>,
    /// QuantFace's step (`[quant]`): sizes and the students' reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    quant: Option<quantface::QuantResult>,
    /// The `[[student]]` runs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    students: Vec<student::StudentResult>,
    /// The `[inversion]` step.
    #[serde(skip_serializing_if = "Option::is_none")]
    inversion: Option<inversion::InversionSummary>,
    total_seconds: f64,
}

/// The "raw pixels" baseline: the normalised image itself is the embedding.
struct PixelEmbedder;

impl Embedder for PixelEmbedder {
    type Error = std::convert::Infallible;

    fn embed(&mut self, images: ArrayView4<f32>) -> Result<Array2<f32>, Self::Error> {
        let n = images.shape()[0];
        let d = images.len() / n.max(1);
        Ok(
            Array2::from_shape_vec((n, d), images.iter().copied().collect())
                .expect("n·d elements by construction"),
        )
    }
}

fn to_array(images: &[RgbImage], size: u32) -> Result<Array4<f32>> {
    let s = size as usize;
    let data = images_to_chw(images, size, false);
    Ok(Array4::from_shape_vec((images.len(), 3, s, s), data)?)
}

/// Held-out synthetic identities: every image rendered and embedded once; the pairs of each
/// subset index into them.
pub(crate) fn synthetic_eval(preset: &Preset, size: u32) -> Result<EvalSet> {
    let syn = &preset.synthetic;
    let test = synthetic_test_faces(preset)?;
    let rendered = InMemoryDataset::from_dataset(&test, size)?;
    let subsets = [
        ("all", None),
        ("hq_hard", Some(Quality::HighQualityHard)),
        ("low_quality", Some(Quality::LowQuality)),
    ];
    let mut protocols = Vec::new();
    for (k, (name, subset)) in subsets.into_iter().enumerate() {
        let pairs = test.pairs(syn.pairs_per_subset, subset, preset.seed + 17 + k as u64)?;
        protocols.push(Protocol {
            name: name.to_string(),
            pairs: pairs.iter().map(|&(a, b, _)| (a, b)).collect(),
            issame: pairs.iter().map(|p| p.2).collect(),
        });
    }
    Ok(EvalSet {
        images: to_array(rendered.images(), size)?,
        protocols,
    })
}

/// The held-out test identities (the evaluation set, in its order).
fn synthetic_test_faces(preset: &Preset) -> Result<SyntheticFaces> {
    let syn = &preset.synthetic;
    Ok(SyntheticFaces::new(SyntheticConfig {
        num_identities: syn.test_identities,
        images_per_identity: syn.test_images_per_identity,
        // Far past the training identities: disjoint by construction.
        first_identity: syn.train.first_identity + 1_000_000,
        ..syn.train.clone()
    })?)
}

/// Held-out validation identities (disjoint from training and test) with one pair protocol:
/// what QMagFace's ω is fitted on.
fn synthetic_validation(preset: &Preset, size: u32) -> Result<EvalSet> {
    let syn = &preset.synthetic;
    let val = SyntheticFaces::new(SyntheticConfig {
        num_identities: syn.test_identities,
        images_per_identity: syn.test_images_per_identity,
        first_identity: syn.train.first_identity + 2_000_000,
        ..syn.train.clone()
    })?;
    let rendered = InMemoryDataset::from_dataset(&val, size)?;
    let pairs = val.pairs(syn.pairs_per_subset, None, preset.seed + 31)?;
    Ok(EvalSet {
        images: to_array(rendered.images(), size)?,
        protocols: vec![Protocol {
            name: "validation".into(),
            pairs: pairs.iter().map(|&(a, b, _)| (a, b)).collect(),
            issame: pairs.iter().map(|p| p.2).collect(),
        }],
    })
}

/// Verification .bin files: one set each, pair i = images 2i and 2i+1.
pub(crate) fn bin_eval(paths: &[PathBuf], size: u32) -> Result<Vec<EvalSet>> {
    paths
        .iter()
        .map(|p| {
            let set = load_bin_sized(p, size)?;
            let n = set.issame.len();
            Ok(EvalSet {
                images: to_array(&set.images, size)?,
                protocols: vec![Protocol {
                    name: set.name.clone(),
                    pairs: (0..n).map(|i| (2 * i, 2 * i + 1)).collect(),
                    issame: set.issame,
                }],
            })
        })
        .collect()
}

/// One verification report per protocol, by protocol name.
pub(crate) type Reports = Vec<(String, VerificationReport)>;

/// Embeds every set once and runs its protocols; returns the reports and each set's
/// embeddings (for further scorings such as QMagFace).
pub(crate) fn evaluate_all<E: Embedder>(
    embedder: &mut E,
    sets: &[EvalSet],
    preset: &Preset,
    label: &str,
) -> Result<(Reports, Vec<Array2<f32>>)> {
    let vcfg = VerificationConfig {
        n_folds: preset.eval.folds,
        far_targets: preset.eval.far.clone(),
        ..VerificationConfig::default()
    };
    let (mut out, mut embeddings) = (Vec::new(), Vec::new());
    for set in sets {
        let n = set.images.shape()[0] as u64;
        let pb = progress_bar(n, "eval");
        pb.set_message(label.to_string());
        let emb = embed_with_flip_progress(
            embedder,
            set.images.view(),
            preset.eval.batch_size,
            |d, _| pb.set_position(d as u64),
        )
        .with_context(|| format!("embedding the evaluation images for {label}"))?;
        pb.finish_and_clear();
        for p in &set.protocols {
            // Pair i = rows 2i and 2i+1, as the verification protocol expects.
            let rows: Vec<usize> = p.pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
            let paired = emb.select(ndarray::Axis(0), &rows);
            let vcfg = folds_for(&vcfg, p);
            let report = evaluate(paired.view(), &p.issame, &vcfg)
                .with_context(|| format!("evaluating {label} on {}", p.name))?;
            info!(
                method = label,
                protocol = %p.name,
                accuracy = format!("{:.4}", report.accuracy_mean),
                "evaluated"
            );
            out.push((p.name.clone(), report));
        }
        embeddings.push(emb);
    }
    Ok((out, embeddings))
}

/// `vcfg` for protocol `p`: k-fold needs both classes in every fold, so a tiny set (a fixture,
/// a smoke test) is scored as one fold, train = test, and the report says so.
fn folds_for(vcfg: &VerificationConfig, p: &Protocol) -> VerificationConfig {
    let mut vcfg = vcfg.clone();
    if p.issame.len() < MIN_PAIRS_PER_FOLD * vcfg.n_folds {
        warn!(
            protocol = %p.name,
            pairs = p.issame.len(),
            "too few pairs for {}-fold verification: scoring as one fold",
            vcfg.n_folds
        );
        vcfg.n_folds = 1;
    }
    vcfg
}

/// Optional additions to one method's training run ([`run_method_with`]).
#[derive(Default)]
pub(crate) struct MethodExtras<'a> {
    /// An extra objective added to the head's loss each step (distillation); not combinable
    /// with the reconstruction branch, which is one too.
    pub auxiliary: Option<Box<dyn fr_train::AuxiliaryLoss>>,
    /// Called after every epoch with the number of epochs done and the run's variables (a
    /// teacher's per-epoch snapshots for multi-step distillation).
    pub on_epoch: Option<&'a mut EpochHook<'a>>,
}

/// A callback after each epoch: epochs done, the run's variables.
pub(crate) type EpochHook<'a> = dyn FnMut(usize, &candle_nn::VarMap) -> Result<()> + 'a;

/// A method's training loader: the preset's batches (the whole set as one batch when it is
/// smaller than one), identity-balanced when the preset says so; and the batch size.
///
/// # Errors
/// A loader that cannot be built, or an empty training set.
fn method_loader(
    preset: &Preset,
    train_set: &Arc<dyn FaceDataset>,
    input_size: u32,
    device: &Device,
) -> Result<(BatchLoader, usize)> {
    let batch_size = if train_set.len() < preset.train.batch_size
        && preset.train.identities_per_batch.is_none()
    {
        warn!(
            images = train_set.len(),
            batch_size = preset.train.batch_size,
            "training set smaller than one batch: using the whole set as the batch"
        );
        train_set.len()
    } else {
        preset.train.batch_size
    };
    let loader = BatchLoader::new(
        train_set.clone(),
        LoaderConfig {
            identities_per_batch: preset.train.identities_per_batch,
            ..preset.loader_config(batch_size, input_size)
        },
    )?
    .with_device(device.clone());
    if loader.batches_per_epoch() == 0 {
        bail!("the training set is empty");
    }
    Ok((loader, batch_size))
}

/// `checkpoints/<method>`, emptied: a reproduction starts from scratch, and checkpoints of an
/// earlier run in this folder would mix with this run's (`latest` would point across runs).
fn fresh_checkpoints(checkpoints: &Path, method: &str) -> Result<PathBuf> {
    let ckpt_dir = checkpoints.join(method);
    if ckpt_dir.exists() {
        info!(path = %ckpt_dir.display(), "removing the previous run's checkpoints");
        std::fs::remove_dir_all(&ckpt_dir)
            .with_context(|| format!("removing {}", ckpt_dir.display()))?;
    }
    Ok(ckpt_dir)
}

/// Trains one method and evaluates it, with `extras`; also returns the trained variables.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_method_with(
    preset: &Preset,
    method: &str,
    train_set: Arc<dyn FaceDataset>,
    sets: &[EvalSet],
    fit_set: Option<&EvalSet>,
    device: &Device,
    input_size: u32,
    out_dir: &Path,
    depth_truth: Option<&DepthTruth>,
    grid_path: &Path,
    data_desc: &str,
    mut extras: MethodExtras<'_>,
) -> Result<(MethodResult, candle_nn::VarMap)> {
    let checkpoints = out_dir.join("checkpoints");
    let head_cfg = preset.heads[method].clone();
    let Model {
        mut trainer,
        seeded,
        render: joint,
    } = assemble(ModelSpec {
        auxiliary: extras.auxiliary.take(),
        ..ModelSpec::new(preset, method, train_set.as_ref(), data_desc, device)
    })?;
    let (loader, batch_size) = method_loader(preset, &train_set, input_size, device)?;
    let ckpt_dir = fresh_checkpoints(&checkpoints, method)?;
    let fit_config = FitConfig {
        checkpoints: Some(ckpt_dir),
        ..FitConfig::new(method, preset.train.epochs)
    };
    let fitted = match extras.on_epoch.as_mut() {
        Some(f) => fit(
            &mut trainer,
            &loader,
            &fit_config,
            &mut OnEpoch(|done, t: &mut Trainer| f(done, t.varmap())),
        )?,
        None => fit(&mut trainer, &loader, &fit_config, &mut ())?,
    };
    // The reconstruction branch's terms, averaged over the last epoch.
    let last_epoch_terms: BTreeMap<String, f64> = match joint {
        Some(_) => fitted
            .last_epoch_stats
            .iter()
            .filter(|(k, _)| RENDER_TERMS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        None => BTreeMap::new(),
    };
    let (train_seconds, images_per_second) = (fitted.train_seconds, fitted.images_per_second());
    let epoch_loss = fitted.epoch_loss;
    info!(
        method,
        train_seconds = format!("{train_seconds:.1}"),
        images_per_second = format!("{images_per_second:.1}"),
        "trained"
    );

    let backbone: &dyn ModuleT = trainer.backbone();
    let mut embedder = BackboneEmbedder::new(backbone, device);
    let (protocols, set_embeddings) = evaluate_all(&mut embedder, sets, preset, method)?;
    let qmagface = match preset.eval.scoring {
        Scoring::Cosine => None,
        Scoring::Qmagface => Some(qmagface_eval(
            &mut embedder,
            sets,
            &set_embeddings,
            fit_set,
            preset,
            method,
        )?),
    };
    let subcenter_drop = match &head_cfg {
        fr_heads::HeadConfig::SubCenterArcFace(c) => Some(subcenter_drop(
            &mut embedder,
            &train_set,
            seeded.varmap(),
            c,
            input_size,
            &out_dir.join(format!("clean_list_{method}.txt")),
        )?),
        _ => None,
    };
    let render = match joint {
        None => None,
        Some(joint) => Some(render_outputs(
            &joint,
            &seeded,
            &sets[0],
            depth_truth,
            preset,
            device,
            last_epoch_terms,
            grid_path,
        )?),
    };
    let result = MethodResult {
        method: method.to_string(),
        head: head_cfg,
        train_seconds,
        images_per_second,
        steps: trainer.state().step,
        skipped_steps: trainer.state().skipped_steps,
        epoch_loss,
        batch_size,
        skipped_images: loader.stats().skipped,
        protocols,
        qmagface,
        subcenter_drop,
        render,
    };
    Ok((result, seeded.varmap().clone()))
}

/// The step statistics of the reconstruction branch that the report averages over the last
/// epoch.
const RENDER_TERMS: [&str; 5] = ["head_loss", "l_reco", "l_canon", "l_view", "render_loss"];

/// Images `indices` of `set` as branch input: back from the recognition normalisation to
/// [0, 1], resized to the branch's size.
fn branch_input(set: &EvalSet, indices: &[usize], size: usize, device: &Device) -> Result<Tensor> {
    let picked = set.images.select(ndarray::Axis(0), indices);
    let shape = picked.shape().to_vec();
    let x = Tensor::from_vec(picked.iter().copied().collect::<Vec<f32>>(), shape, device)?;
    Ok(resize_bilinear(&x.affine(0.5, 0.5)?, size)?)
}

/// Pearson correlation of `a` and `b` over the pixels where `mask` holds (0 when either is
/// constant there).
fn pearson(a: &[f32], b: &[f32], mask: &[bool]) -> f64 {
    let pairs: Vec<(f64, f64)> = a
        .iter()
        .zip(b)
        .zip(mask)
        .filter(|(_, &m)| m)
        .map(|((&x, &y), _)| (f64::from(x), f64::from(y)))
        .collect();
    let n = pairs.len().max(1) as f64;
    let (mx, my) = pairs
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x / n, sy + y / n));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in &pairs {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx).powi(2);
        syy += (y - my).powi(2);
    }
    if sxx > 0.0 && syy > 0.0 {
        sxy / (sxx * syy).sqrt()
    } else {
        0.0
    }
}

/// Per-image correlation of `branch`'s canonical depth (eval mode) with the ground truth,
/// over the first `n` images of `set` (identity = index / images per identity).
fn depth_correlations(
    branch: &ReconstructionBranch,
    set: &EvalSet,
    truth: &DepthTruth,
    n: usize,
    device: &Device,
) -> Result<Vec<f64>> {
    let s = branch.config().image_size;
    let per = truth.test.config().images_per_identity;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(64) {
        let idx: Vec<usize> = (start..(start + 64).min(n)).collect();
        let x = branch_input(set, &idx, s, device)?;
        let depth = fr_kernels::no_grad(|| branch.forward(&x, false))?.canonical_depth;
        for (k, &i) in idx.iter().enumerate() {
            let pred: Vec<f32> = depth.get(k)?.flatten_all()?.to_vec1()?;
            let gt = truth.test.canonical_depth(i / per, s as u32)?;
            out.push(pearson(&pred, &gt.depth, &gt.mask));
        }
    }
    Ok(out)
}

/// After training a method with the branch: the last epoch's loss terms, the picture grid and
/// (synthetic data) the depth correlation against the untrained branch and the template.
#[allow(clippy::too_many_arguments)]
fn render_outputs(
    joint: &JointConfig,
    seeded: &SeededVarMap,
    set: &EvalSet,
    truth: Option<&DepthTruth>,
    preset: &Preset,
    device: &Device,
    last_epoch: BTreeMap<String, f64>,
    grid_path: &Path,
) -> Result<RenderResult> {
    // The trained branch: its variables already exist in the map, so this returns them.
    let trained = ReconstructionBranch::new(
        &joint.branch,
        seeded.var_builder(DType::F32, device).pp("render"),
    )?;
    let n_images = set.images.shape()[0];
    let per = truth.map_or(1, |t| t.test.config().images_per_identity);
    // One image of each of the first identities, at varying positions within the identity
    // (so poses and qualities vary).
    let rows: Vec<usize> = (0..GRID_ROWS)
        .map(|k| k * per + k % per)
        .filter(|&i| i < n_images)
        .collect();
    render_grid(&trained, set, &rows, device, grid_path)?;
    let depth_correlation = match truth {
        None => None,
        Some(truth) => {
            let n = n_images.min(DEPTH_IMAGES);
            let untrained = ReconstructionBranch::new(
                &joint.branch,
                SeededVarMap::new(preset.seed)
                    .var_builder(DType::F32, device)
                    .pp("render"),
            )?;
            let s = joint.branch.image_size;
            let fill = truth.template.depth.iter().copied().fold(0f32, f32::max);
            let template: Vec<f32> = truth
                .template
                .depth
                .iter()
                .zip(&truth.template.mask)
                .map(|(&d, &m)| if m { d } else { fill })
                .collect();
            let template_r: Vec<f64> = (0..n)
                .map(|i| {
                    let gt = truth.test.canonical_depth(i / per, s as u32)?;
                    Ok(pearson(&template, &gt.depth, &gt.mask))
                })
                .collect::<Result<_>>()?;
            let c = DepthCorrelation {
                images: n,
                trained: MeanStd::of(&depth_correlations(&trained, set, truth, n, device)?),
                untrained: MeanStd::of(&depth_correlations(&untrained, set, truth, n, device)?),
                template: MeanStd::of(&template_r),
            };
            info!(
                trained = format!("{:.3}", c.trained.mean),
                untrained = format!("{:.3}", c.untrained.mean),
                template = format!("{:.3}", c.template.mean),
                "canonical depth vs ground truth (Pearson)"
            );
            Some(c)
        }
    };
    Ok(RenderResult {
        joint: joint.clone(),
        last_epoch,
        depth_correlation,
        grid: grid_path.to_path_buf(),
    })
}

/// Write the grid: one row per image of `rows`, columns input, canonical face (albedo ×
/// shading), canonical depth (grey, normalised per image, nearer = brighter) and the
/// re-rendered view, each tile the branch's size scaled ×2.
fn render_grid(
    branch: &ReconstructionBranch,
    set: &EvalSet,
    rows: &[usize],
    device: &Device,
    path: &Path,
) -> Result<()> {
    let s = branch.config().image_size;
    let tile = 2 * s as u32;
    let mut grid = RgbImage::new(4 * tile, tile * rows.len().max(1) as u32);
    if !rows.is_empty() {
        let x = branch_input(set, rows, s, device)?;
        let out = fr_kernels::no_grad(|| branch.forward(&x, false))?;
        for r in 0..rows.len() {
            let d = out.canonical_depth.get(r)?;
            let (lo, hi) = (
                d.min_all()?.to_scalar::<f32>()?,
                d.max_all()?.to_scalar::<f32>()?,
            );
            let grey = d
                .affine(
                    -1.0 / f64::from((hi - lo).max(1e-6)),
                    f64::from(hi / (hi - lo).max(1e-6)),
                )?
                .unsqueeze(0)?;
            let tiles = [
                x.get(r)?,
                out.canonical_image.get(r)?,
                grey,
                out.reconstruction.get(r)?,
            ];
            for (c, t) in tiles.iter().enumerate() {
                let img = image::imageops::resize(
                    &to_rgb8(t)?,
                    tile,
                    tile,
                    image::imageops::FilterType::Nearest,
                );
                image::imageops::replace(
                    &mut grid,
                    &img,
                    i64::from(c as u32 * tile),
                    i64::from(r as u32 * tile),
                );
            }
        }
    }
    let mut bytes = Vec::new();
    grid.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .with_context(|| format!("encoding {}", path.display()))?;
    report::write_atomic(path, &bytes)
}

/// Embeddings (flip-summed, as for verification) of every image of `set`.
fn embed_set<E: Embedder>(embedder: &mut E, set: &EvalSet, preset: &Preset) -> Result<Array2<f32>> {
    fr_eval::embed_with_flip(embedder, set.images.view(), preset.eval.batch_size)
        .context("embedding images for QMagFace scoring")
}

/// Cosine and quality `min(q1, q2)` of each pair of `protocol`, q = the embedding norm (half
/// the norm of the flip-summed embedding).
fn cos_and_quality(emb: &Array2<f32>, protocol: &Protocol) -> (Vec<f64>, Vec<f64>) {
    let norm = |i: usize| -> f64 {
        emb.row(i)
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    };
    protocol
        .pairs
        .iter()
        .map(|&(a, b)| {
            let (na, nb) = (norm(a), norm(b));
            let dot: f64 = emb
                .row(a)
                .iter()
                .zip(emb.row(b).iter())
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            let cos = if na > 0.0 && nb > 0.0 {
                dot / (na * nb)
            } else {
                0.0
            };
            (cos, 0.5 * na.min(nb))
        })
        .unzip()
}

/// QMagFace: fit ω on the validation pairs (or take the published ω without them), then
/// score every protocol of `sets` (embedded as `set_embeddings`) with
/// `cos + ω(cos)·min(q1, q2)`.
fn qmagface_eval<E: Embedder>(
    embedder: &mut E,
    sets: &[EvalSet],
    set_embeddings: &[Array2<f32>],
    fit_set: Option<&EvalSet>,
    preset: &Preset,
    method: &str,
) -> Result<QmagfaceResult> {
    use fr_heads::qmagface::{fit, FitConfig, Pairs, QualityWeight};
    let (weight, omega_source) = match fit_set {
        Some(set) => {
            let emb = embed_set(embedder, set, preset)?;
            let p = &set.protocols[0];
            let (cos, q) = cos_and_quality(&emb, p);
            let split = |same: bool| -> (Vec<f64>, Vec<f64>) {
                cos.iter()
                    .zip(&q)
                    .zip(&p.issame)
                    .filter(|(_, &s)| s == same)
                    .map(|((&c, &q), _)| (c, q))
                    .unzip()
            };
            let (gc, gq) = split(true);
            let (ic, iq) = split(false);
            let f = fit(
                Pairs {
                    scores: &gc,
                    qualities: &gq,
                },
                Pairs {
                    scores: &ic,
                    qualities: &iq,
                },
                &FitConfig::default(),
            )
            .with_context(|| format!("fitting QMagFace's ω for {method}"))?;
            (
                f.weight,
                format!(
                    "fitted on {} held-out validation pairs ({} identities)",
                    p.issame.len(),
                    preset.synthetic.test_identities
                ),
            )
        }
        None => (
            QualityWeight::default(),
            "published fit (MagFace-100, MS1MV2)".to_string(),
        ),
    };
    info!(
        method,
        alpha = weight.alpha,
        beta = weight.beta,
        source = %omega_source,
        "QMagFace ω"
    );
    let vcfg = VerificationConfig {
        n_folds: preset.eval.folds,
        far_targets: preset.eval.far.clone(),
        ..VerificationConfig::default()
    };
    let mut protocols = Vec::new();
    for (set, emb) in sets.iter().zip(set_embeddings) {
        for p in &set.protocols {
            let (cos, q) = cos_and_quality(emb, p);
            let scores: Vec<f64> = cos
                .iter()
                .zip(&q)
                .map(|(&c, &q)| weight.score(c, q, q))
                .collect();
            let vcfg = folds_for(&vcfg, p);
            let report =
                fr_eval::evaluate_scores(fr_eval::PairScores::Cosine(&scores), &p.issame, &vcfg)
                    .with_context(|| format!("QMagFace scoring of {method} on {}", p.name))?;
            protocols.push((p.name.clone(), report));
        }
    }
    Ok(QmagfaceResult {
        alpha: weight.alpha,
        beta: weight.beta,
        omega_source,
        protocols,
    })
}

/// Sub-center ArcFace's drop step: embed every training image (no flip), keep the samples
/// within the drop angle of their class's dominant sub-centre, write the cleaned list.
fn subcenter_drop(
    embedder: &mut BackboneEmbedder<&dyn ModuleT>,
    train_set: &Arc<dyn FaceDataset>,
    varmap: &candle_nn::VarMap,
    cfg: &fr_heads::subcenter::SubCenterArcFaceConfig,
    input_size: u32,
    path: &Path,
) -> Result<DropSummary> {
    let loader = BatchLoader::new(
        train_set.clone(),
        LoaderConfig {
            batch_size: 256,
            image_size: input_size,
            shuffle: false,
            flip_prob: 0.0,
            drop_last: false,
            skip_corrupt: true,
            prefetch: 0,
            ..LoaderConfig::default()
        },
    )?;
    let (mut rows, mut labels, mut indices) = (Vec::new(), Vec::new(), Vec::new());
    for batch in loader.epoch(0) {
        let batch = batch?;
        let images = batch.images.to_device(&embedder.device)?;
        let emb = fr_kernels::no_grad(|| embedder.model.forward_t(&images, false))?;
        rows.push(emb.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        labels.extend(batch.labels.to_vec1::<u32>()?);
        indices.extend(batch.indices);
    }
    if rows.is_empty() {
        bail!("sub-center drop step: no decodable training image");
    }
    let embeddings = Tensor::cat(&rows, 0)?;
    let weight = varmap
        .data()
        .lock()
        .expect("VarMap lock")
        .get("head.weight")
        .context("sub-center drop step: no head.weight")?
        .as_tensor()
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let result = fr_heads::subcenter::drop_noisy_samples(
        &embeddings,
        &labels,
        &weight,
        cfg.sub_centers,
        cfg.drop_angle_degrees,
    )?;
    let kept: Vec<usize> = result.kept.iter().map(|&i| indices[i]).collect();
    let header = format!(
        "sub-center ArcFace drop step (K = {}, drop beyond {}° of the dominant sub-centre)\n\
kept {} of {} training samples; one dataset index per line",
        cfg.sub_centers,
        cfg.drop_angle_degrees,
        kept.len(),
        indices.len()
    );
    fr_heads::subcenter::write_clean_list(path, &kept, &header)
        .with_context(|| format!("writing {}", path.display()))?;
    info!(
        kept = kept.len(),
        total = indices.len(),
        path = %path.display(),
        "sub-center drop step"
    );
    Ok(DropSummary {
        kept: kept.len(),
        total: indices.len(),
        list: path.to_path_buf(),
    })
}

/// Entry point of `cargo xtask reproduce`.
///
/// # Errors
/// A bad config (naming the key), unreadable data (naming the file), or a training failure.
pub fn run(args: &ReproduceOptions, root: &Path) -> Result<Written> {
    let started = Instant::now();
    let configs = Presets::with_dir(root.join("configs"));
    let preset = resolve_preset(args, &configs)?;
    preset.validate()?;
    check_data_flags(args, &preset)?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target").join("reproduce").join(&preset.name));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    fr_train::check_output_dir(&out_dir.join("checkpoints"))?;
    // CPU by default; a `--features cuda` build trains on the first GPU when there is one.
    #[cfg(feature = "cuda")]
    let device = Device::cuda_if_available(0)?;
    #[cfg(not(feature = "cuda"))]
    let device = Device::Cpu;
    let size = preset.input_size();
    let (train_set, sets, data_desc) = load_data(args, &preset, size)?;
    info!(data = %data_desc, "data ready");
    let ctx = RunContext {
        preset: &preset,
        train_rec: args.train_rec.is_some(),
        device,
        size,
        out_dir,
        train_set,
        sets,
        data_desc,
    };
    let (raw_pixels, _) = evaluate_all(&mut PixelEmbedder, &ctx.sets, &preset, "raw pixels")?;
    let trained = train_methods(&ctx)?;
    let students = train_students(&ctx, &trained.teachers)?;
    let rows = result_rows(&trained, &students, &raw_pixels);
    let table = report::markdown_table(&rows, &preset.eval.far);
    plot_roc_of(&ctx, &trained.methods, &students, &raw_pixels)?;
    let total_seconds = started.elapsed().as_secs_f64();
    let md = report_markdown(
        &ctx,
        &trained,
        &students,
        &raw_pixels,
        &rows,
        &table,
        total_seconds,
    )?;
    let out_dir = ctx.out_dir;
    report::write_atomic(&out_dir.join("report.md"), md.as_bytes())?;
    report::write_json(
        &out_dir.join("metrics.json"),
        &Metrics {
            preset: &preset,
            data: ctx.data_desc,
            raw_pixels,
            methods: trained.methods,
            rows,
            quant: trained.quant,
            students,
            inversion: trained.inverted,
            total_seconds,
        },
    )?;
    Ok(Written {
        table,
        out_dir,
        files: "report.md, metrics.json, roc.png, checkpoints/".into(),
        seconds: total_seconds,
    })
}

/// What every step of one reproduction shares.
struct RunContext<'a> {
    preset: &'a Preset,
    /// Training on a RecordIO folder (`--train-rec`) rather than the synthetic identities.
    train_rec: bool,
    device: Device,
    /// Input side, pixels.
    size: u32,
    out_dir: PathBuf,
    train_set: Arc<dyn FaceDataset>,
    /// The evaluation sets (held-out synthetic identities, or the `--val-bin` sets).
    sets: Vec<EvalSet>,
    /// The training data as the report names it.
    data_desc: String,
}

/// The preset's methods, trained and evaluated, with what the later steps need of them.
struct TrainedMethods {
    methods: Vec<MethodResult>,
    teachers: student::Teachers,
    quant: Option<quantface::QuantResult>,
    inverted: Option<inversion::InversionSummary>,
}

/// `--train-rec` / `--val-bin` go together, and inverting test embeddings needs the synthetic
/// held-out identities.
fn check_data_flags(args: &ReproduceOptions, preset: &Preset) -> Result<()> {
    if let (Some(inv), Some(_)) = (&preset.inversion, &args.train_rec) {
        if inv.embeddings > 0 {
            bail!(
                "config key `inversion.embeddings`: inverting test embeddings needs the synthetic \
held-out identities (their other images score the result); with --train-rec set it to 0 and \
invert class centres only"
            );
        }
    }
    match (&args.train_rec, args.val_bin.is_empty()) {
        (Some(_), true) => bail!("--train-rec needs at least one --val-bin FILE to evaluate on"),
        (None, false) => bail!("--val-bin is for real data: pass --train-rec DIR as well"),
        _ => Ok(()),
    }
}

/// The training set, the evaluation sets and the data's description: a RecordIO folder and
/// `.bin` sets, or the synthetic identities rendered once at `size`.
fn load_data(
    args: &ReproduceOptions,
    preset: &Preset,
    size: u32,
) -> Result<(Arc<dyn FaceDataset>, Vec<EvalSet>, String)> {
    Ok(match &args.train_rec {
        Some(dir) => {
            if !dir.is_dir() {
                bail!(
                    "--train-rec {}: not a folder (expected train.rec, train.idx and property inside)",
                    dir.display()
                );
            }
            let ds = RecordIoDataset::open(dir)
                .with_context(|| format!("opening RecordIO {}", dir.display()))?;
            if let Some(p) = ds.property() {
                if (p.height, p.width) != (size, size) {
                    warn!(
                        "{}: images are {}x{}, the backbone takes {size}x{size}: resizing \
(--set backbone.input_size={} trains at the data's size)",
                        dir.display(),
                        p.width,
                        p.height,
                        p.height
                    );
                }
            }
            let desc = format!(
                "RecordIO {} ({} images, {} identities); verification: {}",
                dir.display(),
                ds.len(),
                ds.num_classes(),
                args.val_bin
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            (Arc::new(ds), bin_eval(&args.val_bin, size)?, desc)
        }
        None => {
            let syn = &preset.synthetic;
            // Rendered once at the input size, then shared by every epoch and method.
            info!("rendering training identities");
            let ds = InMemoryDataset::from_dataset(&SyntheticFaces::new(syn.train.clone())?, size)?;
            let desc = format!(
                    "synthetic identities: train {} ids × {} images, test {} held-out ids × {} images, {} pairs per subset",
                    syn.train.num_identities,
                    syn.train.images_per_identity,
                    syn.test_identities,
                    syn.test_images_per_identity,
                    syn.pairs_per_subset
                );
            info!("rendering held-out identities");
            (Arc::new(ds), vec![synthetic_eval(preset, size)?], desc)
        }
    })
}

/// Trains and evaluates every method of the preset in order; after each, the steps that take
/// it as their model: the inversion, QuantFace's students, the teachers' snapshots.
fn train_methods(ctx: &RunContext<'_>) -> Result<TrainedMethods> {
    let preset = ctx.preset;
    let (size, device, out_dir) = (ctx.size, &ctx.device, &ctx.out_dir);
    let (sets, train_set, data_desc) = (&ctx.sets, &ctx.train_set, &ctx.data_desc);
    // QuantFace's ω is fitted on held-out validation identities (synthetic data only; real data
    // uses the published ω).
    let fit_set = match (preset.eval.scoring, ctx.train_rec) {
        (Scoring::Qmagface, false) => Some(synthetic_validation(preset, size)?),
        _ => None,
    };
    // Ground truth of the reconstruction branch's depth (synthetic data only).
    let render_methods: Vec<&String> = preset
        .methods
        .iter()
        .filter(|m| preset.render_for(m).is_some())
        .collect();
    let depth_truth = match (ctx.train_rec, render_methods.is_empty()) {
        (false, false) => Some(DepthTruth {
            test: synthetic_test_faces(preset)?,
            template: SyntheticFaces::new(preset.synthetic.train.clone())?.canonical_depth(
                0,
                preset
                    .render_for(render_methods[0])
                    .map_or(64, |j| j.branch.image_size as u32),
            )?,
        }),
        _ => None,
    };
    let mut methods = Vec::new();
    let mut quant = None;
    let mut inverted = None;
    // Methods that students learn from, and those whose per-epoch snapshots they need.
    let teacher_names: Vec<&str> = preset
        .students
        .iter()
        .filter(|s| s.distills())
        .filter_map(|s| s.teacher.as_deref())
        .collect();
    let multi_step: Vec<&str> = preset
        .students
        .iter()
        .filter(|s| s.distills() && s.schedule == KdSchedule::MultiStep)
        .filter_map(|s| s.teacher.as_deref())
        .collect();
    let mut teachers = student::Teachers::default();
    for method in &preset.methods {
        let grid = if render_methods.len() > 1 {
            format!("render_grid_{method}.png")
        } else {
            "render_grid.png".to_string()
        };
        let mut snapshots = Vec::new();
        let mut snapshot = |_epochs: usize, vars: &candle_nn::VarMap| -> Result<()> {
            snapshots.push(student::copy_backbone_vars(vars)?);
            Ok(())
        };
        let (result, vars) = run_method_with(
            preset,
            method,
            train_set.clone(),
            sets,
            fit_set.as_ref(),
            device,
            size,
            out_dir,
            depth_truth.as_ref(),
            &out_dir.join(grid),
            data_desc,
            MethodExtras {
                auxiliary: None,
                on_epoch: if multi_step.contains(&method.as_str()) {
                    Some(&mut snapshot)
                } else {
                    None
                },
            },
        )?;
        if !snapshots.is_empty() {
            teachers.snapshots.insert(method.clone(), snapshots);
        }
        if teacher_names.contains(&method.as_str()) {
            teachers.finals.insert(method.clone(), vars.clone());
        }
        methods.push(result);
        if let Some(inv) = preset
            .inversion
            .as_ref()
            .filter(|i| i.method(preset) == method)
        {
            inverted = Some(inversion::run(
                preset, inv, method, &vars, &sets[0], device, out_dir,
            )?);
        }
        // QuantFace: the trained method is the teacher of its quantised students.
        if let Some(q) = preset
            .quant
            .as_ref()
            .filter(|q| q.teacher(preset) == method)
        {
            quant = Some(quantface::run(
                preset,
                q,
                method,
                &vars,
                train_set.clone(),
                sets,
                device,
                size,
            )?);
        }
    }

    Ok(TrainedMethods {
        methods,
        teachers,
        quant,
        inverted,
    })
}

/// Trains and evaluates the `[[student]]`s, on their own data when the preset gives one
/// (synthetic runs only).
fn train_students(
    ctx: &RunContext<'_>,
    teachers: &student::Teachers,
) -> Result<Vec<student::StudentResult>> {
    let preset = ctx.preset;
    if preset.students.is_empty() {
        return Ok(Vec::new());
    }
    let (train_set, data_desc) = (&ctx.train_set, &ctx.data_desc);
    let (student_set, student_desc): (Arc<dyn FaceDataset>, String) =
        match (&preset.student_data, ctx.train_rec) {
            (Some(d), false) => {
                info!("rendering the students' training identities");
                (
                    Arc::new(InMemoryDataset::from_dataset(
                        &SyntheticFaces::new(d.clone())?,
                        ctx.size,
                    )?),
                    format!(
                        "students: their own synthetic identities ({} ids × {} images from id {}, \
hard fraction {}, low-quality fraction {})",
                        d.num_identities,
                        d.images_per_identity,
                        d.first_identity,
                        d.hard_fraction,
                        d.low_quality_fraction
                    ),
                )
            }
            (Some(_), true) => {
                warn!("[student_data] is for the synthetic default: students train on --train-rec");
                (train_set.clone(), data_desc.clone())
            }
            (None, _) => (train_set.clone(), data_desc.clone()),
        };
    student::run(
        preset,
        teachers,
        student_set,
        &ctx.sets,
        &ctx.device,
        ctx.size,
        &ctx.out_dir,
        &student_desc,
    )
}

/// The results table's rows: every method, its QMagFace scoring, QuantFace's students, the
/// `[[student]]`s, then the raw-pixels baseline.
fn result_rows(
    trained: &TrainedMethods,
    students: &[student::StudentResult],
    raw_pixels: &Reports,
) -> Vec<Row> {
    let methods = &trained.methods;
    let mut rows = Vec::new();
    for m in methods {
        for (name, r) in &m.protocols {
            rows.push(Row::from_report(
                &m.method,
                name,
                r,
                Some((m.train_seconds, m.images_per_second)),
            ));
        }
    }
    for m in methods {
        if let Some(q) = &m.qmagface {
            for (name, r) in &q.protocols {
                rows.push(Row::from_report(
                    &format!("{} + QMagFace", m.method),
                    name,
                    r,
                    None,
                ));
            }
        }
    }
    if let Some(q) = &trained.quant {
        for st in &q.settings {
            for (suffix, reports) in [
                (" (calibration only)", &st.calibrated),
                (" + KD", &st.distilled),
            ] {
                for (name, r) in reports {
                    let train = (suffix == " + KD").then(|| {
                        let images = st.steps as f64 * batch_of(&methods) as f64;
                        (st.train_seconds, images / st.train_seconds.max(1e-9))
                    });
                    rows.push(Row::from_report(
                        &format!("{} {}{suffix}", q.teacher, st.name),
                        name,
                        r,
                        train,
                    ));
                }
            }
        }
    }
    for st in students {
        for (name, r) in &st.protocols {
            rows.push(Row::from_report(
                &st.config.name,
                name,
                r,
                Some((st.train_seconds, st.images_per_second)),
            ));
        }
    }
    for (name, r) in raw_pixels {
        rows.push(Row::from_report("raw pixels", name, r, None));
    }
    rows
}

/// `roc.png`: every method's and student's ROC on the first protocol, and the raw pixels'.
fn plot_roc_of(
    ctx: &RunContext<'_>,
    methods: &[MethodResult],
    students: &[student::StudentResult],
    raw_pixels: &Reports,
) -> Result<()> {
    let curves: Vec<Curve> = methods
        .iter()
        .map(|m| (m.method.clone(), &m.protocols[0].1))
        .chain(
            students
                .iter()
                .map(|s| (s.config.name.clone(), &s.protocols[0].1)),
        )
        .chain(std::iter::once((
            "raw pixels".to_string(),
            &raw_pixels[0].1,
        )))
        .map(|(label, r)| Curve {
            label,
            fpr: r.roc_fpr.clone(),
            tpr: r.roc_tpr.clone(),
        })
        .collect();
    report::plot_roc(
        &ctx.out_dir.join("roc.png"),
        &format!(
            "{} — ROC on {}",
            ctx.preset.name, ctx.sets[0].protocols[0].name
        ),
        &curves,
    )
}

/// `report.md`: the setting, the results table, the ROC and each paper section.
fn report_markdown(
    ctx: &RunContext<'_>,
    trained: &TrainedMethods,
    students: &[student::StudentResult],
    raw_pixels: &Reports,
    rows: &[Row],
    table: &str,
    total_seconds: f64,
) -> Result<String> {
    let (preset, methods) = (ctx.preset, &trained.methods);
    let min_impostors = raw_pixels
        .iter()
        .map(|(_, r)| r.n_pairs - r.n_genuine)
        .min()
        .unwrap_or(0);
    let batch = methods.iter().map(|m| m.batch_size).min().unwrap_or(0);
    let skipped: usize = methods.iter().map(|m| m.skipped_images).sum();
    let folds = rows.iter().map(|r| r.folds).min().unwrap_or(0);
    let caveat = if !ctx.train_rec {
        format!(
            "\n\nThis embedded default is a CPU-sized check of the pipeline (narrow IResNet at \
56×56, {} epochs on synthetic identities), not a reproduction of the paper's numbers or its \
ranking of methods: at this budget the ranking mostly reflects how fast each loss converges. \
The paper's protocol is in the comments of configs/{}.toml and configs/_base.toml.",
            preset.train.epochs, preset.name
        )
    } else {
        String::new()
    };
    let without_branch: Vec<&str> = preset
        .methods
        .iter()
        .filter(|m| {
            matches!(preset.heads[*m], fr_heads::HeadConfig::Lh2Face(_))
                && preset.render_for(m).is_none()
        })
        .map(String::as_str)
        .collect();
    let lh2face_note = if without_branch.is_empty() {
        String::new()
    } else {
        format!(
            " {} (LH2Face's head) trains with the recognition loss L_FR only, without the \
reconstruction branch.",
            without_branch.join(", ")
        )
    };
    let mut render_md = render_section(methods, preset);
    if let Some(q) = &trained.quant {
        let teacher = methods
            .iter()
            .find(|m| m.method == q.teacher)
            .map(|m| &m.protocols)
            .context("QuantFace teacher missing from the results")?;
        render_md += &quantface::section(q, teacher);
    }
    render_md += &student::section(students, preset);
    if let Some(inv) = &trained.inverted {
        render_md += &inversion::section(inv);
    }
    Ok(format!(
        "# Reproduction: {}\n\n{}\n\nPublished headline (full scale): {}\n\nData: {}.{}\n\n\
Every method is trained with the same seed ({}), backbone and budget ({} epochs, batch {}; {} \
undecodable training images skipped). Accuracy: insightface {}-fold verification (mean ± \
population std over folds; sets under {} pairs per fold are scored as one fold). TAR@FAR: ROC over \
the same pairs, nearest point (eval_ijbc.py rule); with {} impostor pairs, FARs below {:.1e} are not \
resolved (the value is the TAR at zero false accepts). `raw pixels`: the normalised image itself as \
the embedding, same pairs and protocol.{} Total wall time {:.0} s.\n\n{}\n![ROC](roc.png)\n{}",
        preset.name,
        preset.paper,
        preset.headline,
        ctx.data_desc,
        caveat,
        preset.seed,
        preset.train.epochs,
        batch,
        skipped,
        folds.max(1),
        MIN_PAIRS_PER_FOLD,
        min_impostors,
        1.0 / min_impostors.max(1) as f64,
        lh2face_note,
        total_seconds,
        table,
        render_md
    ))
}

/// Images per step of the training runs (the smallest, as the report states it).
fn batch_of(methods: &[MethodResult]) -> usize {
    methods.iter().map(|m| m.batch_size).min().unwrap_or(0)
}

/// The report's section on the reconstruction branch: the ablation (every method with and
/// without the branch, accuracy per protocol), the last epoch's loss terms, the depth
/// correlation and the picture grid. Empty when no method trained with the branch.
fn render_section(methods: &[MethodResult], preset: &Preset) -> String {
    let rendered: Vec<&MethodResult> = methods.iter().filter(|m| m.render.is_some()).collect();
    if rendered.is_empty() {
        return String::new();
    }
    let mut md = String::from("\n## Reconstruction branch\n\n");
    for m in &rendered {
        let j = &m.render.as_ref().expect("filtered").joint;
        md += &format!(
            "`{}` trains with L_train = L_FR + {}·L_reco + {}·L_FR^canon + {}·L_view; the branch \
(Unsup3D-style photo-geometric autoencoder, {}×{}) runs on the first {} images of every batch of {}. \
L_FR^canon and L_view embed the canonical face and the re-rendered view with the backbone in \
eval mode (BatchNorm running statistics untouched) and the head in eval mode (its running state \
untouched); L_view = mean(1 − cos(sg(e_input), e_view)).\n\n",
            m.method,
            j.lambda_reco,
            j.lambda_canon,
            j.lambda_view,
            j.branch.image_size,
            j.branch.image_size,
            j.batch.min(m.batch_size),
            m.batch_size
        );
    }
    // The ablation: accuracy per protocol, with and without the branch.
    let names: Vec<&str> = methods[0]
        .protocols
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    md += "Ablation (same seed, backbone and budget; accuracy %, mean over folds):\n\n| method | head | branch |";
    for n in &names {
        md += &format!(" {n} |");
    }
    md += " train time (s) |\n|---|---|---|";
    for _ in &names {
        md += "---|";
    }
    md += "---|\n";
    for m in methods {
        md += &format!(
            "| {} | {} | {} |",
            m.method,
            m.head.name(),
            if m.render.is_some() { "yes" } else { "no" }
        );
        for n in &names {
            let acc = m
                .protocols
                .iter()
                .find(|(p, _)| p == n)
                .map(|(_, r)| format!("{:.2}", 100.0 * r.accuracy_mean))
                .unwrap_or_else(|| "–".into());
            md += &format!(" {acc} |");
        }
        md += &format!(" {:.1} |\n", m.train_seconds);
    }
    for m in &rendered {
        let r = m.render.as_ref().expect("filtered");
        let t = |k: &str| {
            r.last_epoch
                .get(k)
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "–".into())
        };
        md += &format!(
            "\n`{}`, means over the last epoch's steps: L_FR {}, L_reco {}, L_FR^canon {}, L_view {} \
(unweighted; L_reco is Unsup3D's confidence-weighted Laplacian negative log-likelihood, which \
can be negative).\n",
            m.method,
            t("head_loss"),
            t("l_reco"),
            t("l_canon"),
            t("l_view")
        );
        if let Some(c) = &r.depth_correlation {
            md += &format!(
                "\nCanonical depth against the ground truth (the identity's frontal ellipsoid, \
distance along the viewing ray; Pearson correlation inside the true face mask, mean ± std over \
the first {} held-out test images): trained branch **{:.3} ± {:.3}**; the same branch before \
training (seed {}) {:.3} ± {:.3}; a fixed template head (training identity 0's true depth for \
every image) {:.3} ± {:.3}.\n",
                c.images,
                c.trained.mean,
                c.trained.std,
                preset.seed,
                c.untrained.mean,
                c.untrained.std,
                c.template.mean,
                c.template.std
            );
        }
        let file = r
            .grid
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        md += &format!(
            "\n![reconstruction grid of {}]({file})\n\n`{file}`: one held-out test image per row; \
columns: input, canonical face (albedo × shading), canonical depth (grey, normalised per image, \
nearer = brighter), re-rendered view (the canonical face warped into the input view).\n",
            m.method
        );
    }
    md
}

/// The preset named by `args`: `configs/<paper>.toml` (or `--config`), or for `compare` the
/// shared base with one method per name; `--set` overrides applied.
fn resolve_preset(args: &ReproduceOptions, configs: &Presets) -> Result<Preset> {
    let Some(paper) = args.paper.as_deref() else {
        bail!(
            "name a preset (`cargo xtask reproduce lh2face`), `compare HEAD...`, or --list \
(presets: {})",
            configs.names().join(", ")
        );
    };
    if paper == COMPARE {
        return compare_preset(args, configs);
    }
    if !args.names.is_empty() {
        bail!(
            "unexpected arguments after the preset name: {} (did you mean `compare {paper} {}`?)",
            args.names.join(" "),
            args.names.join(" ")
        );
    }
    match &args.config {
        Some(path) => crate::config_file::load(path, &args.sets),
        None => configs.load(paper, &args.sets),
    }
}

/// The word that turns `reproduce` into a comparison of heads.
const COMPARE: &str = "compare";

/// A comparison: the shared base (`configs/_base.toml`, or `--config`) with one method per
/// name. A name that is a preset contributes its paper's head as that preset configures it
/// (tuned for the CPU default); any other name is a registry head with its paper defaults.
fn compare_preset(args: &ReproduceOptions, configs: &Presets) -> Result<Preset> {
    if args.names.is_empty() {
        bail!(
            "`compare` needs the heads to train, e.g. `compare arcface cosface adaface` \
(heads: {}; presets: {})",
            fr_heads::HeadConfig::NAMES.join(", "),
            configs.names().join(", ")
        );
    }
    let (mut tree, base_src) = match &args.config {
        Some(path) => (
            crate::config_file::read_tree(path, 0)?,
            ConfigSource::File(path.clone()),
        ),
        None => configs.tree("_base")?,
    };
    let mut heads = toml::Table::new();
    for name in &args.names {
        let Some(head) = configs.head(name)? else {
            bail!(
                "compare: `{name}` is neither a head ({}) nor a preset ({})",
                fr_heads::HeadConfig::NAMES.join(", "),
                configs.names().join(", ")
            );
        };
        if heads.contains_key(name) {
            bail!("compare: `{name}` is named twice");
        }
        heads.insert(name.clone(), toml::Value::try_from(&head)?);
    }
    let table = tree
        .as_table_mut()
        .context("the comparison base is not a TOML table")?;
    table.insert(
        "name".into(),
        format!("compare-{}", args.names.join("-")).into(),
    );
    table.insert(
        "paper".into(),
        "Head comparison (one seed, backbone and budget)".into(),
    );
    table.insert(
        "headline".into(),
        "each head's published number: cargo xtask reproduce --list".into(),
    );
    table.insert(
        "methods".into(),
        toml::Value::Array(args.names.iter().map(|n| n.clone().into()).collect()),
    );
    table.insert("heads".into(), toml::Value::Table(heads));
    crate::config_file::finish(tree, &args.sets, &base_src.to_string())
}

/// `reproduce --list`: one markdown row per preset of `configs` (paper, methods, the published
/// headline it aims at).
///
/// # Errors
/// A preset that does not load.
pub fn list_table(configs: &Presets) -> Result<String> {
    let mut out = String::from(
        "| preset | paper | default config (methods; the first is the paper's) | published headline the full preset aims at |\n|---|---|---|---|\n",
    );
    for name in configs.names() {
        let p = configs.load(&name, &[])?;
        let methods: Vec<String> = p
            .methods
            .iter()
            .map(|m| format!("{m} ({})", p.heads[m].name()))
            .chain(p.students.iter().map(|s| format!("student {}", s.name)))
            .collect();
        out += &format!(
            "| {name} | {} | configs/{name}.toml: {} | {} |\n",
            p.paper,
            methods.join(", "),
            p.headline
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real-data path end to end on the RecordIO and .bin fixtures: trains every method of
    /// the shipped preset for one epoch and writes the three report files.
    #[test]
    fn real_data_path_runs_to_the_report() {
        let root = crate::workspace_root();
        let data = root.join("crates/fr-data/tests/data");
        let out = std::env::temp_dir().join(format!("fr-reproduce-test-{}", std::process::id()));
        let args = ReproduceOptions {
            paper: Some("lh2face".into()),
            names: vec![],
            config: None,
            sets: vec!["train.epochs=1".into()],
            train_rec: Some(data.join("rec_layout_a")),
            val_bin: vec![data.join("bin/pairs_py2_str.bin")],
            out: Some(out.clone()),
        };
        run(&args, &root).unwrap();
        for f in ["report.md", "metrics.json", "roc.png"] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap())
                .unwrap();
        let methods = metrics["methods"].as_array().unwrap();
        assert_eq!(methods.len(), 4);
        // The branch trains with lh2face only; on real data the grid is drawn, no depth truth.
        assert!(methods[0]["render"]["depth_correlation"].is_null());
        assert!(methods[1]["render"].is_null());
        assert!(out.join("render_grid.png").is_file());
        for m in methods {
            let acc = m["protocols"][0][1]["accuracy_mean"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc), "accuracy {acc}");
            assert_eq!(m["protocols"][0][0], "pairs_py2_str");
        }
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(
            report.contains("| raw pixels | pairs_py2_str | 4 |"),
            "{report}"
        );
        std::fs::remove_dir_all(&out).ok();
    }

    /// A record whose JPEG is damaged is skipped and counted, not fatal, and the report says so.
    #[test]
    fn corrupt_training_image_is_skipped_and_counted() {
        let root = crate::workspace_root();
        let data = root.join("crates/fr-data/tests/data");
        let dir = std::env::temp_dir().join(format!("fr-corrupt-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            data.join("rec_damaged/corrupt_jpeg.rec"),
            dir.join("train.rec"),
        )
        .unwrap();
        std::fs::copy(
            data.join("rec_damaged/corrupt_jpeg.idx"),
            dir.join("train.idx"),
        )
        .unwrap();
        let out = dir.join("out");
        let args = ReproduceOptions {
            paper: Some("lh2face".into()),
            names: vec![],
            config: None,
            sets: vec!["train.epochs=1".into(), r#"methods=["arcface"]"#.into()],
            train_rec: Some(dir.clone()),
            val_bin: vec![data.join("bin/pairs_bytes_p4.bin")],
            out: Some(out.clone()),
        };
        run(&args, &root).unwrap();
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap())
                .unwrap();
        assert_eq!(metrics["methods"][0]["skipped_images"], 1);
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(report.contains("1 undecodable"), "{report}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Overrides that shrink any preset to a few seconds: 12 identities, 1 epoch, 20 pairs.
    fn tiny(extra: &[&str]) -> Vec<String> {
        [
            "train.epochs=1",
            "train.batch_size=16",
            "synthetic.train.num_identities=12",
            "synthetic.train.images_per_identity=4",
            "synthetic.test_identities=6",
            "synthetic.test_images_per_identity=3",
            "synthetic.pairs_per_subset=20",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    }

    fn args(paper: &str, names: &[&str], sets: Vec<String>, out: &Path) -> ReproduceOptions {
        ReproduceOptions {
            paper: Some(paper.into()),
            names: names.iter().map(|s| s.to_string()).collect(),
            config: None,
            sets,
            train_rec: None,
            val_bin: vec![],
            out: Some(out.to_path_buf()),
        }
    }

    /// What a preset needs beyond [`tiny`] to run in seconds.
    fn tiny_extras(name: &str) -> &'static [&'static str] {
        match name {
            "triplet-joint" => &["train.identities_per_batch=4"],
            "epl" => &["heads.epl.start_vp_epoch=1"],
            "quantface" => &["quant.epochs=1", "quant.calibration_batches=2"],
            "arcface-inversion" => &[
                "inversion.embeddings=3",
                "inversion.centres=2",
                "inversion.config.steps=5",
            ],
            // Two epochs: the multi-step student switches teacher checkpoints.
            "sface" | "pocketnet" => &[
                "student_data.num_identities=12",
                "student_data.images_per_identity=4",
                "train.epochs=2",
            ],
            _ => &[],
        }
    }

    /// Every shipped preset runs end to end (on a tiny budget) and writes its report; the
    /// paper-specific outputs appear: QMagFace rows, the sub-center cleaned list, QuantFace's
    /// quantised rows and model sizes.
    #[test]
    fn every_preset_runs_and_reports() {
        let root = crate::workspace_root();
        let presets = Presets::with_dir(root.join("configs")).names();
        assert!(presets.len() >= 19, "{presets:?}");
        for name in presets {
            let out = std::env::temp_dir().join(format!("fr-preset-{name}-{}", std::process::id()));
            run(&args(&name, &[], tiny(tiny_extras(&name)), &out), &root)
                .unwrap_or_else(|e| panic!("preset {name}: {e:#}"));
            let report = std::fs::read_to_string(out.join("report.md")).unwrap();
            assert!(report.contains("Published headline"), "{name}");
            if name == "qmagface" {
                assert!(report.contains("| magface + QMagFace | all |"), "{report}");
            }
            if name == "lh2face" {
                assert!(report.contains("## Reconstruction branch"), "{report}");
                assert!(
                    report.contains("| lh2face_no_render | lh2face | no |"),
                    "{report}"
                );
                assert!(report.contains("![reconstruction grid of lh2face](render_grid.png)"));
                let grid = image::open(out.join("render_grid.png")).unwrap();
                // 6 test identities: 6 rows of 4 tiles of 2 × 64 pixels.
                assert_eq!((grid.width(), grid.height()), (4 * 128, 6 * 128));
                let metrics: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(out.join("metrics.json")).unwrap(),
                )
                .unwrap();
                let r = &metrics["methods"][0]["render"];
                for k in ["trained", "untrained", "template"] {
                    let v = r["depth_correlation"][k]["mean"].as_f64().unwrap();
                    assert!((-1.0..=1.0).contains(&v), "{k} {v}");
                }
                assert!(r["last_epoch"]["l_reco"].as_f64().unwrap().is_finite());
                // The template is a true ellipsoid: it correlates strongly with every truth.
                assert!(r["depth_correlation"]["template"]["mean"].as_f64().unwrap() > 0.8);
            } else {
                assert!(!report.contains("Reconstruction branch"), "{name}");
            }
            if name == "quantface" {
                assert!(
                    report.contains("## QuantFace: model size and accuracy at 32 / 8 / 6 bits"),
                    "{report}"
                );
                for r in [
                    "| arcface | all |",
                    "| arcface w8a8 (calibration only) | all |",
                    "| arcface w8a8 + KD | all |",
                    "| arcface w6a6 (calibration only) | all |",
                    "| arcface w6a6 + KD | all |",
                    "| arcface (full precision) | 32 / 32 |",
                ] {
                    assert!(report.contains(r), "{r} missing: {report}");
                }
                let metrics: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(out.join("metrics.json")).unwrap(),
                )
                .unwrap();
                let q = &metrics["quant"];
                let float = q["float_size_bytes"].as_u64().unwrap();
                assert_eq!(float, q["params"].as_u64().unwrap() * 4);
                let settings = q["settings"].as_array().unwrap();
                assert_eq!(settings.len(), 2);
                assert_eq!(settings[0]["size_bytes"].as_u64().unwrap(), float / 4);
                assert_eq!(settings[1]["bits"]["weight"], 6);
                for s in settings {
                    for k in ["calibrated", "distilled"] {
                        let acc = s[k][0][1]["accuracy_mean"].as_f64().unwrap();
                        assert!((0.0..=1.0).contains(&acc), "{k} {acc}");
                    }
                    assert!(s["epoch_loss"][0].as_f64().unwrap().is_finite());
                }
            } else {
                assert!(!report.contains("## QuantFace"), "{name}");
            }
            if name == "arcface-inversion" {
                assert!(
                    report.contains("## ArcFace inversion of `arcface`"),
                    "{report}"
                );
                assert!(report.contains("| test embeddings"), "{report}");
                assert!(report.contains("| class centres"), "{report}");
                let grid = image::open(out.join("inversion_embeddings.png")).unwrap();
                // 3 images with their sources: 2 columns × 2 rows of (2 × 56)-pixel tiles.
                assert_eq!(grid.width() as usize, 2 * 2 * 56 + 3 * fr_train::GRID_GAP);
                assert!(out.join("inversion_centres.png").is_file());
            } else {
                assert!(!report.contains("## ArcFace inversion"), "{name}");
            }
            if name == "sface" || name == "pocketnet" {
                let metrics: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(out.join("metrics.json")).unwrap(),
                )
                .unwrap();
                let students = metrics["students"].as_array().unwrap();
                assert_eq!(students.len(), 3, "{name}");
                for st in students {
                    let n = st["config"]["name"].as_str().unwrap();
                    assert!(report.contains(&format!("| {n} | all |")), "{n}: {report}");
                    assert!(st["epoch_loss"][1].as_f64().unwrap().is_finite(), "{n}");
                }
                assert!(report.contains("## Students"), "{report}");
            } else {
                assert!(!report.contains("## Students"), "{name}");
            }
            if name == "subcenter-arcface" {
                let list =
                    std::fs::read_to_string(out.join("clean_list_subcenter_arcface.txt")).unwrap();
                assert!(list.starts_with("# sub-center ArcFace drop step"), "{list}");
                // 12 identities × 4 images; after 3 steps few samples are near a sub-centre.
                assert!(list.contains(" of 48 training samples"), "{list}");
            }
            std::fs::remove_dir_all(&out).ok();
        }
    }

    /// `compare` trains registry heads and preset heads side by side into one table; bad names
    /// are rejected with the lists of both.
    #[test]
    fn compare_trains_several_heads_into_one_table() {
        let root = crate::workspace_root();
        let out = std::env::temp_dir().join(format!("fr-compare-{}", std::process::id()));
        run(
            &args("compare", &["cosface", "adaface"], tiny(&[]), &out),
            &root,
        )
        .unwrap();
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(report.contains("| cosface | all |") && report.contains("| adaface | all |"));
        std::fs::remove_dir_all(&out).ok();
        let err = run(&args("compare", &["arcface", "nope"], vec![], &out), &root)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope") && err.contains("magface") && err.contains("lh2face"),
            "{err}"
        );
        let err = run(&args("compare", &[], vec![], &out), &root)
            .unwrap_err()
            .to_string();
        assert!(err.contains("compare arcface"), "{err}");
    }

    #[test]
    fn list_shows_every_preset_with_its_headline() {
        let root = crate::workspace_root();
        let configs = Presets::with_dir(root.join("configs"));
        let table = list_table(&configs).unwrap();
        for name in configs.names() {
            assert!(table.contains(&format!("| {name} |")), "{name} missing");
        }
        assert!(table.contains("96.37") && !table.contains("| _base |"));
    }

    #[test]
    fn unknown_preset_lists_the_available_ones() {
        let args = ReproduceOptions {
            paper: Some("no_such_paper".into()),
            names: vec![],
            config: None,
            sets: vec![],
            train_rec: None,
            val_bin: vec![],
            out: None,
        };
        let err = run(&args, &crate::workspace_root())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no_such_paper") && err.contains("lh2face"),
            "{err}"
        );
    }

    #[test]
    fn train_rec_without_val_bin_is_an_error() {
        let root = crate::workspace_root();
        let args = ReproduceOptions {
            paper: Some("lh2face".into()),
            names: vec![],
            config: None,
            sets: vec![],
            train_rec: Some(root.join("crates/fr-data/tests/data/rec_layout_a")),
            val_bin: vec![],
            out: Some(std::env::temp_dir().join("fr-reproduce-never-written")),
        };
        let err = run(&args, &root).unwrap_err().to_string();
        assert!(err.contains("--val-bin"), "{err}");
        // Inverting test embeddings scores them against the synthetic identities' other images.
        let args = ReproduceOptions {
            paper: Some("arcface-inversion".into()),
            ..args
        };
        let err = run(&args, &root).unwrap_err().to_string();
        assert!(err.contains("inversion.embeddings"), "{err}");
    }
}
