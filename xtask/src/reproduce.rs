//! `cargo xtask reproduce <paper>`: train the paper's method and its baselines with one seed,
//! backbone and budget, evaluate them on the same pairs, and write the report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use fr_backbone::{build_backbone, Backbone};
use fr_data::loader::{BatchLoader, LoaderConfig};
use fr_data::recordio::RecordIoDataset;
use fr_data::synthetic::{SyntheticConfig, SyntheticFaces};
use fr_data::transform::images_to_chw;
use fr_data::verification_bin::load_bin_sized;
use fr_data::{FaceDataset, InMemoryDataset, Quality};
use fr_eval::{
    embed_with_flip_progress, evaluate, Embedder, VerificationConfig, VerificationReport,
};
use fr_heads::build_head;
use fr_train::{SeededVarMap, Trainer};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, Array4, ArrayView4};
use serde::Serialize;
use tracing::{info, warn};

use crate::preset::{Preset, Scoring};
use crate::report::{self, Curve, Row};

/// Below this many pairs per fold, verification is scored as a single fold.
const MIN_PAIRS_PER_FOLD: usize = 10;

/// Command-line options of `reproduce`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReproduceArgs {
    /// The paper preset (`configs/<paper>.toml`), or `compare` followed by the heads to train
    /// side by side.
    pub paper: Option<String>,
    /// After `compare`: registry head names or preset names (a preset contributes its paper's
    /// head with the preset's settings), e.g. `compare arcface cosface adaface`.
    #[arg(value_name = "HEAD")]
    pub names: Vec<String>,
    /// List the presets: paper, default config and the published number each aims at.
    #[arg(long)]
    pub list: bool,
    /// Use this config file instead of `configs/<paper>.toml`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value: `--set train.epochs=3` (repeatable; value parsed as TOML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Train on an insightface RecordIO folder (train.rec, train.idx, property) instead of
    /// the synthetic identities.
    #[arg(long, value_name = "DIR")]
    pub train_rec: Option<PathBuf>,
    /// Verification sets (.bin) to evaluate on; required with --train-rec.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub val_bin: Vec<PathBuf>,
    /// Output folder (default `target/reproduce/<paper>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Images to embed once, and the pair protocols scored on those embeddings.
struct EvalSet {
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
struct MethodResult {
    method: String,
    head: fr_heads::HeadConfig,
    train_seconds: f64,
    images_per_second: f64,
    steps: u64,
    skipped_steps: u64,
    /// Mean loss of each epoch.
    epoch_loss: Vec<f64>,
    /// Images per step actually used (the preset's, or the whole set when it is smaller).
    batch_size: usize,
    /// Training images skipped because they failed to decode.
    skipped_images: usize,
    protocols: Vec<(String, VerificationReport)>,
    /// With `eval.scoring = "qmagface"`: the fitted ω and the quality-aware reports.
    #[serde(skip_serializing_if = "Option::is_none")]
    qmagface: Option<QmagfaceResult>,
    /// For sub-center heads: the drop step on the training set.
    #[serde(skip_serializing_if = "Option::is_none")]
    subcenter_drop: Option<DropSummary>,
}

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
    total_seconds: f64,
}

/// Runs a backbone in eval mode over host batches.
struct BackboneEmbedder<'a> {
    model: &'a dyn ModuleT,
    device: Device,
}

impl Embedder for BackboneEmbedder<'_> {
    type Error = candle_core::Error;

    fn embed(&mut self, images: ArrayView4<f32>) -> Result<Array2<f32>, Self::Error> {
        let shape = images.shape().to_vec();
        let data: Vec<f32> = images.iter().copied().collect();
        let x = Tensor::from_vec(data, shape, &self.device)?;
        let y = fr_kernels::no_grad(|| self.model.forward_t(&x, false))?;
        let (n, d) = y.dims2()?;
        let v = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Array2::from_shape_vec((n, d), v).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
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

fn progress_bar(len: u64, prefix: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (eta {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix.to_string());
    pb
}

fn to_array(images: &[RgbImage], size: u32) -> Result<Array4<f32>> {
    let s = size as usize;
    let data = images_to_chw(images, size, false);
    Ok(Array4::from_shape_vec((images.len(), 3, s, s), data)?)
}

/// Held-out synthetic identities: every image rendered and embedded once; the pairs of each
/// subset index into them.
fn synthetic_eval(preset: &Preset, size: u32) -> Result<EvalSet> {
    let syn = &preset.synthetic;
    let test = SyntheticFaces::new(SyntheticConfig {
        num_identities: syn.test_identities,
        images_per_identity: syn.test_images_per_identity,
        // Far past the training identities: disjoint by construction.
        first_identity: syn.train.first_identity + 1_000_000,
        ..syn.train.clone()
    })?;
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
fn bin_eval(paths: &[PathBuf], size: u32) -> Result<Vec<EvalSet>> {
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

fn evaluate_all<E: Embedder>(
    embedder: &mut E,
    sets: &[EvalSet],
    preset: &Preset,
    label: &str,
) -> Result<Vec<(String, VerificationReport)>> {
    let vcfg = VerificationConfig {
        n_folds: preset.eval.folds,
        far_targets: preset.eval.far.clone(),
        ..VerificationConfig::default()
    };
    let mut out = Vec::new();
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
            // k-fold needs both classes in every fold: a tiny set (a fixture, a smoke test) is
            // scored as one fold, train = test, and the report says so.
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
    }
    Ok(out)
}

fn row(method: &str, subset: &str, r: &VerificationReport, train: Option<(f64, f64)>) -> Row {
    Row {
        method: method.to_string(),
        subset: subset.to_string(),
        pairs: r.n_pairs,
        accuracy_mean: r.accuracy_mean,
        accuracy_std: r.accuracy_std,
        folds: r.accuracy_per_fold.len(),
        tar_at_far: r.tar_at_far.clone(),
        auc: r.auc,
        eer: r.eer,
        train_seconds: train.map(|t| t.0),
        images_per_second: train.map(|t| t.1),
    }
}

/// Train one method and evaluate it.
#[allow(clippy::too_many_arguments)]
fn run_method(
    preset: &Preset,
    method: &str,
    train_set: Arc<dyn FaceDataset>,
    sets: &[EvalSet],
    fit_set: Option<&EvalSet>,
    device: &Device,
    input_size: u32,
    out_dir: &Path,
) -> Result<MethodResult> {
    let checkpoints = out_dir.join("checkpoints");
    let head_cfg = preset.heads[method].clone();
    let seeded = SeededVarMap::new(preset.seed);
    let vb = seeded.var_builder(DType::F32, device);
    let backbone: Box<dyn Backbone> = build_backbone(&preset.backbone, vb.clone())
        .with_context(|| format!("building the backbone for {method}"))?;
    let head = build_head(
        &head_cfg,
        backbone.embedding_size(),
        train_set.num_classes(),
        vb.pp("head"),
    )
    .with_context(|| format!("building head {method}"))?;
    // Head parameters live under `head.`; the backbone decides for its own names.
    let frozen: Vec<String> = {
        let data = seeded.varmap().data().lock().expect("fresh VarMap lock");
        data.keys()
            .filter(|n| !n.starts_with("head.") && !backbone.is_trainable(n))
            .cloned()
            .collect()
    };
    let mut trainer_cfg = preset.train.trainer.clone();
    trainer_cfg.seed = preset.seed;
    let mut trainer = Trainer::new(
        backbone,
        head,
        seeded.varmap().clone(),
        trainer_cfg,
        move |n: &str| !frozen.iter().any(|f| f == n),
    )?;
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
            batch_size,
            image_size: input_size,
            shuffle: true,
            seed: preset.seed,
            drop_last: true,
            skip_corrupt: preset.train.skip_corrupt,
            prefetch: preset.train.prefetch.unwrap_or(2),
            identities_per_batch: preset.train.identities_per_batch,
            ..LoaderConfig::default()
        },
    )?
    .with_device(device.clone());
    let per_epoch = loader.batches_per_epoch() as u64;
    if per_epoch == 0 {
        bail!("the training set is empty");
    }
    // A reproduction starts from scratch: checkpoints of an earlier run in this folder would
    // mix with this run's (and `latest` would point across runs).
    let ckpt_dir = checkpoints.join(method);
    if ckpt_dir.exists() {
        info!(path = %ckpt_dir.display(), "removing the previous run's checkpoints");
        std::fs::remove_dir_all(&ckpt_dir)
            .with_context(|| format!("removing {}", ckpt_dir.display()))?;
    }
    let total = per_epoch * preset.train.epochs as u64;
    let pb = progress_bar(total, method);
    let start = Instant::now();
    let mut images = 0usize;
    let mut epoch_loss = Vec::new();
    for epoch in 0..preset.train.epochs {
        trainer.set_epoch(epoch);
        let (mut sum, mut count) = (0.0, 0usize);
        for batch in loader.epoch(epoch as u64) {
            let batch = batch?;
            images += batch.indices.len();
            let out = trainer.step(&batch, total)?;
            if !out.skipped {
                sum += out.loss;
                count += 1;
            }
            pb.set_message(format!(
                "epoch {} loss {:.3} lr {:.4}",
                epoch + 1,
                out.loss,
                out.lr
            ));
            pb.inc(1);
        }
        // One checkpoint per epoch (atomic; the trainer keeps the newest few).
        let ckpt = trainer.save(&ckpt_dir)?;
        tracing::debug!(path = %ckpt.display(), "checkpoint written");
        let mean = if count > 0 {
            sum / count as f64
        } else {
            f64::NAN
        };
        info!(
            method,
            epoch = epoch + 1,
            loss = format!("{mean:.4}"),
            "epoch done"
        );
        epoch_loss.push(mean);
    }
    pb.finish_and_clear();
    let train_seconds = start.elapsed().as_secs_f64();
    let images_per_second = images as f64 / train_seconds.max(1e-9);
    info!(
        method,
        train_seconds = format!("{train_seconds:.1}"),
        images_per_second = format!("{images_per_second:.1}"),
        "trained"
    );

    let mut embedder = BackboneEmbedder {
        model: trainer.backbone(),
        device: device.clone(),
    };
    let protocols = evaluate_all(&mut embedder, sets, preset, method)?;
    let qmagface = match preset.eval.scoring {
        Scoring::Cosine => None,
        Scoring::Qmagface => Some(qmagface_eval(&mut embedder, sets, fit_set, preset, method)?),
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
    Ok(MethodResult {
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
    })
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
/// score every protocol with `cos + ω(cos)·min(q1, q2)`.
fn qmagface_eval<E: Embedder>(
    embedder: &mut E,
    sets: &[EvalSet],
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
    for set in sets {
        let emb = embed_set(embedder, set, preset)?;
        for p in &set.protocols {
            let (cos, q) = cos_and_quality(&emb, p);
            let scores: Vec<f64> = cos
                .iter()
                .zip(&q)
                .map(|(&c, &q)| weight.score(c, q, q))
                .collect();
            let mut vcfg = vcfg.clone();
            if p.issame.len() < MIN_PAIRS_PER_FOLD * vcfg.n_folds {
                vcfg.n_folds = 1;
            }
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
    embedder: &mut BackboneEmbedder<'_>,
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

fn input_size(preset: &Preset) -> u32 {
    match &preset.backbone {
        fr_backbone::BackboneConfig::Iresnet(c) => c.input_size as u32,
    }
}

/// Entry point of `cargo xtask reproduce`.
///
/// # Errors
/// A bad config (naming the key), unreadable data (naming the file), or a training failure.
pub fn run(args: &ReproduceArgs, root: &Path) -> Result<()> {
    let started = Instant::now();
    let configs = root.join("configs");
    if args.list {
        print!("{}", list_table(&configs)?);
        return Ok(());
    }
    let preset = resolve_preset(args, &configs)?;
    preset.validate()?;
    match (&args.train_rec, args.val_bin.is_empty()) {
        (Some(_), true) => bail!("--train-rec needs at least one --val-bin FILE to evaluate on"),
        (None, false) => bail!("--val-bin is for real data: pass --train-rec DIR as well"),
        _ => {}
    }
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target").join("reproduce").join(&preset.name));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // CPU by default; a `--features cuda` build trains on the first GPU when there is one.
    #[cfg(feature = "cuda")]
    let device = Device::cuda_if_available(0)?;
    #[cfg(not(feature = "cuda"))]
    let device = Device::Cpu;
    let size = input_size(&preset);

    let (train_set, sets, data_desc): (Arc<dyn FaceDataset>, Vec<EvalSet>, String) = match &args
        .train_rec
    {
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
            (Arc::new(ds), vec![synthetic_eval(&preset, size)?], desc)
        }
    };
    info!(data = %data_desc, "data ready");

    // QMagFace's ω is fitted on held-out validation identities (synthetic data only; real data
    // uses the published ω).
    let fit_set = match (preset.eval.scoring, &args.train_rec) {
        (Scoring::Qmagface, None) => Some(synthetic_validation(&preset, size)?),
        _ => None,
    };
    let raw_pixels = evaluate_all(&mut PixelEmbedder, &sets, &preset, "raw pixels")?;
    let mut methods = Vec::new();
    for method in &preset.methods {
        methods.push(run_method(
            &preset,
            method,
            train_set.clone(),
            &sets,
            fit_set.as_ref(),
            &device,
            size,
            &out_dir,
        )?);
    }

    let mut rows = Vec::new();
    for m in &methods {
        for (name, r) in &m.protocols {
            rows.push(row(
                &m.method,
                name,
                r,
                Some((m.train_seconds, m.images_per_second)),
            ));
        }
    }
    for m in &methods {
        if let Some(q) = &m.qmagface {
            for (name, r) in &q.protocols {
                rows.push(row(&format!("{} + QMagFace", m.method), name, r, None));
            }
        }
    }
    for (name, r) in &raw_pixels {
        rows.push(row("raw pixels", name, r, None));
    }
    let table = report::markdown_table(&rows, &preset.eval.far);
    let curves: Vec<Curve> = methods
        .iter()
        .map(|m| (m.method.clone(), &m.protocols[0].1))
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
        &out_dir.join("roc.png"),
        &format!("{} — ROC on {}", preset.name, sets[0].protocols[0].name),
        &curves,
    )?;
    let total_seconds = started.elapsed().as_secs_f64();
    let min_impostors = raw_pixels
        .iter()
        .map(|(_, r)| r.n_pairs - r.n_genuine)
        .min()
        .unwrap_or(0);
    let batch = methods.iter().map(|m| m.batch_size).min().unwrap_or(0);
    let skipped: usize = methods.iter().map(|m| m.skipped_images).sum();
    let folds = rows.iter().map(|r| r.folds).min().unwrap_or(0);
    let caveat = if args.train_rec.is_none() {
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
    let lh2face_note = if preset
        .methods
        .iter()
        .any(|m| matches!(preset.heads[m], fr_heads::HeadConfig::Lh2Face(_)))
    {
        " LH2Face is trained with its recognition loss L_FR only (the reconstruction branch needs \
fr-render, see docs/lh2face.md)."
    } else {
        ""
    };
    let md = format!(
        "# Reproduction: {}\n\n{}\n\nPublished headline (full scale): {}\n\nData: {}.{}\n\n\
Every method is trained with the same seed ({}), backbone and budget ({} epochs, batch {}; {} \
undecodable training images skipped). Accuracy: insightface {}-fold verification (mean ± \
population std over folds; sets under {} pairs per fold are scored as one fold). TAR@FAR: ROC over \
the same pairs, nearest point (eval_ijbc.py rule); with {} impostor pairs, FARs below {:.1e} are not \
resolved (the value is the TAR at zero false accepts). `raw pixels`: the normalised image itself as \
the embedding, same pairs and protocol.{} Total wall time {:.0} s.\n\n{}\n![ROC](roc.png)\n",
        preset.name,
        preset.paper,
        preset.headline,
        data_desc,
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
        table
    );
    report::write_atomic(&out_dir.join("report.md"), md.as_bytes())?;
    report::write_json(
        &out_dir.join("metrics.json"),
        &Metrics {
            preset: &preset,
            data: data_desc,
            raw_pixels,
            methods,
            rows,
            total_seconds,
        },
    )?;
    println!("\n{table}");
    println!(
        "wrote {} (report.md, metrics.json, roc.png, checkpoints/) in {:.0} s",
        out_dir.display(),
        total_seconds
    );
    Ok(())
}

/// The preset named by `args`: `configs/<paper>.toml` (or `--config`), or for `compare` the
/// shared base with one method per name; `--set` overrides applied.
fn resolve_preset(args: &ReproduceArgs, configs: &Path) -> Result<Preset> {
    let Some(paper) = args.paper.as_deref() else {
        bail!(
            "name a preset (`cargo xtask reproduce lh2face`), `compare HEAD...`, or --list \
(presets: {})",
            list_presets(configs).join(", ")
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
    let config_path = args
        .config
        .clone()
        .unwrap_or_else(|| configs.join(format!("{paper}.toml")));
    if !config_path.exists() {
        bail!(
            "no preset {paper}: {} does not exist (presets: {})",
            config_path.display(),
            list_presets(configs).join(", ")
        );
    }
    let preset: Preset = crate::config_file::load(&config_path, &args.sets)?;
    Ok(preset)
}

/// The word that turns `reproduce` into a comparison of heads.
const COMPARE: &str = "compare";

/// A comparison: the shared base (`configs/_base.toml`, or `--config`) with one method per
/// name. A name that is a preset contributes its paper's head as that preset configures it
/// (tuned for the CPU default); any other name is a registry head with its paper defaults.
fn compare_preset(args: &ReproduceArgs, configs: &Path) -> Result<Preset> {
    if args.names.is_empty() {
        bail!(
            "`compare` needs the heads to train, e.g. `compare arcface cosface adaface` \
(heads: {}; presets: {})",
            fr_heads::HeadConfig::NAMES.join(", "),
            list_presets(configs).join(", ")
        );
    }
    let base_path = args
        .config
        .clone()
        .unwrap_or_else(|| configs.join("_base.toml"));
    let mut tree = crate::config_file::read_tree(&base_path, 0)?;
    let mut heads = toml::Table::new();
    for name in &args.names {
        let preset_path = configs.join(format!("{name}.toml"));
        let head = if preset_path.is_file() && !name.starts_with('_') {
            let p: Preset = crate::config_file::load(&preset_path, &[])?;
            p.heads[&p.methods[0]].clone()
        } else if let Some(h) = fr_heads::HeadConfig::default_for(name) {
            h
        } else {
            bail!(
                "compare: `{name}` is neither a head ({}) nor a preset ({})",
                fr_heads::HeadConfig::NAMES.join(", "),
                list_presets(configs).join(", ")
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
    crate::config_file::finish(tree, &args.sets, &base_path.display().to_string())
}

/// `--list`: one row per preset.
fn list_table(configs: &Path) -> Result<String> {
    let mut out = String::from(
        "| preset | paper | default config (methods; the first is the paper's) | published headline the full preset aims at |\n|---|---|---|---|\n",
    );
    for name in list_presets(configs) {
        let path = configs.join(format!("{name}.toml"));
        let p: Preset = crate::config_file::load(&path, &[])?;
        let methods: Vec<String> = p
            .methods
            .iter()
            .map(|m| format!("{m} ({})", p.heads[m].name()))
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

fn list_presets(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let p = e.path();
                    if p.extension()? != "toml" {
                        return None;
                    }
                    let stem = p.file_stem()?.to_string_lossy().into_owned();
                    // `_base.toml` and friends are shared bases, not presets.
                    (!stem.starts_with('_')).then_some(stem)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
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
        let args = ReproduceArgs {
            paper: Some("lh2face".into()),
            names: vec![],
            list: false,
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
        assert_eq!(methods.len(), 3);
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
        let args = ReproduceArgs {
            paper: Some("lh2face".into()),
            names: vec![],
            list: false,
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

    fn args(paper: &str, names: &[&str], sets: Vec<String>, out: &Path) -> ReproduceArgs {
        ReproduceArgs {
            paper: Some(paper.into()),
            names: names.iter().map(|s| s.to_string()).collect(),
            list: false,
            config: None,
            sets,
            train_rec: None,
            val_bin: vec![],
            out: Some(out.to_path_buf()),
        }
    }

    /// Every shipped preset runs end to end (on a tiny budget) and writes its report; the
    /// paper-specific outputs appear: QMagFace rows, the sub-center cleaned list.
    #[test]
    fn every_preset_runs_and_reports() {
        let root = crate::workspace_root();
        let presets = list_presets(&root.join("configs"));
        assert!(presets.len() >= 19, "{presets:?}");
        for name in presets {
            let out = std::env::temp_dir().join(format!("fr-preset-{name}-{}", std::process::id()));
            let mut extra = vec![];
            if name == "triplet-joint" {
                extra.push("train.identities_per_batch=4");
            }
            if name == "epl" {
                extra.push("heads.epl.start_vp_epoch=1");
            }
            run(&args(&name, &[], tiny(&extra), &out), &root)
                .unwrap_or_else(|e| panic!("preset {name}: {e:#}"));
            let report = std::fs::read_to_string(out.join("report.md")).unwrap();
            assert!(report.contains("Published headline"), "{name}");
            if name == "qmagface" {
                assert!(report.contains("| magface + QMagFace | all |"), "{report}");
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
        let table = list_table(&root.join("configs")).unwrap();
        for name in list_presets(&root.join("configs")) {
            assert!(table.contains(&format!("| {name} |")), "{name} missing");
        }
        assert!(table.contains("96.37") && !table.contains("| _base |"));
    }

    #[test]
    fn unknown_preset_lists_the_available_ones() {
        let args = ReproduceArgs {
            paper: Some("no_such_paper".into()),
            names: vec![],
            list: false,
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
        let args = ReproduceArgs {
            paper: Some("lh2face".into()),
            names: vec![],
            list: false,
            config: None,
            sets: vec![],
            train_rec: Some(root.join("crates/fr-data/tests/data/rec_layout_a")),
            val_bin: vec![],
            out: Some(std::env::temp_dir().join("fr-reproduce-never-written")),
        };
        let err = run(&args, &root).unwrap_err().to_string();
        assert!(err.contains("--val-bin"), "{err}");
    }
}
