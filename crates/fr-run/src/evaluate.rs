//! `cargo xtask eval`: evaluate a trained checkpoint (or a weights file, or a Hugging Face Hub
//! repository) on verification `.bin` sets, an image folder with a pairs file, IJB-B / IJB-C,
//! and (with class centres and a labelled folder) uniform classification accuracy; write
//! `report.md`, `metrics.json`, `roc.png` and `det.png`.
//!
//! Weights are opened by `fr_backbone::pretrained`: `.pth` natively, the key layouts of
//! insightface, DDP, CVLface and AdaFace, and `hf://owner/name[@revision][/file]` through the
//! Hub cache (`--offline` or `HF_HUB_OFFLINE=1`: cache only). When the weights have a model card
//! (`config.json` beside them: fr checkpoints, and what was uploaded from them) its backbone,
//! input size, colour order and normalisation are used, with `--set backbone.*` applied on top;
//! otherwise the preset's `[backbone]` (and RGB in [−1, 1], or a CVLface repository's
//! `color_space`).
//!
//! Embeddings (image and horizontally flipped image, `(N, 2D)` f32) are cached on disk, keyed by
//! the weights file (path, size, modification time), the dataset file or folder (path, size,
//! modification time), the input size and the flip; a second run on the same inputs reuses them.
//!
//! Scoring:
//! * pair sets (`.bin`, image folder + pairs file): cosine of the flip-summed embeddings,
//!   insightface 10-fold accuracy, TAR@FAR (nearest ROC point), AUC, EER;
//! * IJB: eval_ijbc.py's image flags N, D, F all on, media pooling and template aggregation,
//!   1:1 TAR at FAR 1e-6 .. 1e-1 (nearest point, the published column, and interpolated), and
//!   when the 1:N CSVs exist, open-set 1:N over the two galleries (averaged): top-1/5/10 and
//!   TPIR at FPIR 0.01 / 0.1;
//! * `--qmagface`: QMagFace's quality-aware score `cos + ω(cos)·min(q1, q2)` with the published
//!   ω (α = 0.077428, β = 0.125926). The quality of an image is its MagFace magnitude, the norm
//!   of the flip-averaged embedding `‖(e + e_flip)/2‖`. Pair sets: `q` per image. IJB: the
//!   template cosine of the standard protocol, and a template's quality is the mean of its
//!   images' magnitudes (a template aggregates many images of varying quality; the minimum over a
//!   pair follows QMagFace's `min(q1, q2)`);
//! * `--labelled DIR`: an image folder of the training identities (one sub-folder per class, in
//!   the class order of training, i.e. sorted names); with a checkpoint holding the head's
//!   class centres `head.weight` `(C, D)`, the cosine of every embedding to every centre gives
//!   the uniform classification accuracy (one global threshold) and the per-sample accuracy.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::{bail, Context, Result};
use candle_core::{DType, Device};
use fr_backbone::hub::HubOptions;
use fr_backbone::pretrained::{ConfigOrigin, LoadOptions, Pretrained, Source, HUB_SCHEME};
use fr_backbone::{Backbone, BackboneConfig};
use fr_data::ijb::{read_template_subject_list, IjbLayout, IjbLooseCrops, IjbMeta, IjbSubset};
use fr_data::image_folder::ImageFolder;
use fr_data::transform::images_to_chw;
use fr_data::verification_bin::load_bin_sized;
use fr_data::FaceDataset;
use fr_eval::ijb::{self, IjbFlags, OneToNReport, OneToOneReport, TemplateSet, IJB_FARS};
use fr_eval::{Embedder, PairScores, VerificationConfig, VerificationReport};
use fr_heads::qmagface::QualityWeight;
use image::RgbImage;
use ndarray::{s, Array2, Array4, ArrayView2};
use serde::Serialize;
use tracing::info;

use crate::config::Preset;
use crate::embed::{fingerprint, BackboneEmbedder, CachedEmbedder, EmbedInfo, InputTransform};

/// The checkpoint's embedder with its cache, as every protocol of [`run`] uses it.
type Ctx = CachedEmbedder<Box<dyn Backbone>>;
use crate::presets::Presets;
use crate::report::{self, Curve, Row, Written};

/// Below this many pairs per fold, a pair set is scored as a single fold.
const MIN_PAIRS_PER_FOLD: usize = 10;
/// FPIRs of the 1:N report.
const FPIRS: [f64; 2] = [0.01, 0.1];
/// Points per curve in the plots (the ROC of IJB-C has up to millions).
const PLOT_POINTS: usize = 4000;

/// Options of `eval`.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The preset the checkpoint was trained with (`configs/<preset>.toml`, or just the preset
    /// name): the backbone and evaluation settings come from it.
    pub config: PathBuf,
    /// Override a config value: `--set backbone.input_size=112` (repeatable; TOML value).
    pub sets: Vec<String>,
    /// A run directory (`latest` + `step-N/`), one step directory, a reproduce output folder
    /// (with `--method`), a weights file (`.safetensors`, `.pth`), or a Hugging Face Hub
    /// repository `hf://owner/name[@revision][/file]`. A model card (`config.json`) beside the
    /// weights sets the backbone (then `--set backbone.*` edits it), input size and colour order.
    pub checkpoint: PathBuf,
    /// Hub checkpoints: the local Hub cache only, never the network (also `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Hub cache folder (default: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    pub hub_cache: Option<PathBuf>,
    /// The method (sub-folder of the run's `checkpoints/`) to evaluate; also the label in the
    /// report (default: the checkpoint's folder or file name).
    pub method: Option<String>,
    /// Verification sets (insightface `.bin`).
    pub bin: Vec<PathBuf>,
    /// An IJB release folder (holding `loose_crop/` and `meta/`).
    pub ijb: Option<PathBuf>,
    /// Which IJB: `B` or `C`.
    pub ijb_subset: IjbSubset,
    /// An image folder the pairs file's paths are relative to (aligned crops).
    pub pairs_folder: Option<PathBuf>,
    /// Pairs file: `path1 path2 label` lines (label 1 same, 0 different), or LFW's
    /// `pairs.txt` (`name i j` / `name1 i name2 j`, images `name/name_000i.jpg`).
    pub pairs: Option<PathBuf>,
    /// A labelled image folder (training identities as sub-folders) for the uniform
    /// classification accuracy against the checkpoint's class centres.
    pub labelled: Option<PathBuf>,
    /// Add QMagFace quality-aware rows (published ω).
    pub qmagface: bool,
    /// Output folder (default `target/eval/<label>`).
    pub out: Option<PathBuf>,
    /// Embedding cache folder (default `target/eval/cache`).
    pub cache: Option<PathBuf>,
    /// Images per forward pass (default: the preset's `eval.batch_size`).
    pub batch_size: Option<usize>,
}

impl Default for EvalOptions {
    /// No config or checkpoint yet; IJB-C when `ijb` is set; nothing else evaluated.
    fn default() -> Self {
        Self {
            config: PathBuf::new(),
            sets: Vec::new(),
            checkpoint: PathBuf::new(),
            offline: false,
            hub_cache: None,
            method: None,
            bin: Vec::new(),
            ijb: None,
            ijb_subset: IjbSubset::C,
            pairs_folder: None,
            pairs: None,
            labelled: None,
            qmagface: false,
            out: None,
            cache: None,
            batch_size: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Weights and model

/// The weights file a `--checkpoint` (and `--method`) names.
///
/// # Errors
/// A path that is none of the accepted forms, naming what was looked for.
pub fn resolve_weights(checkpoint: &Path, method: Option<&str>) -> Result<PathBuf> {
    if checkpoint.is_file() {
        return match checkpoint.extension().and_then(|e| e.to_str()) {
            Some("safetensors" | "pth" | "pt") => Ok(checkpoint.to_path_buf()),
            _ => bail!(
                "--checkpoint {}: expected a .safetensors or .pth weights file",
                checkpoint.display()
            ),
        };
    }
    if !checkpoint.is_dir() {
        bail!(
            "--checkpoint {}: no such file or folder",
            checkpoint.display()
        );
    }
    let mut dir = checkpoint.to_path_buf();
    if let Some(m) = method {
        for candidate in [dir.join("checkpoints").join(m), dir.join(m)] {
            if candidate.is_dir() {
                dir = candidate;
                break;
            }
        }
    }
    if let Some(step) = fr_train::checkpoint::latest_checkpoint(&dir)? {
        let w = step.join(fr_train::checkpoint::MODEL_FILE);
        if !w.is_file() {
            bail!(
                "{}: `latest` names {}, which has no {}",
                dir.display(),
                step.display(),
                fr_train::checkpoint::MODEL_FILE
            );
        }
        return Ok(w);
    }
    let w = dir.join(fr_train::checkpoint::MODEL_FILE);
    if w.is_file() {
        return Ok(w);
    }
    bail!(
        "--checkpoint {}: not a run directory (no `latest`), a step directory (no {}), or a \
weights file{}",
        dir.display(),
        fr_train::checkpoint::MODEL_FILE,
        if method.is_none() && dir.join("checkpoints").is_dir() {
            " (a reproduce output folder: pass --method NAME)"
        } else {
            ""
        }
    )
}

fn to_array(images: &[RgbImage], size: u32) -> Result<Array4<f32>> {
    let s = size as usize;
    Ok(Array4::from_shape_vec(
        (images.len(), 3, s, s),
        images_to_chw(images, size, false),
    )?)
}

/// `e + e_flip` of `(N, 2D)` embeddings.
fn flip_sum(emb: &Array2<f32>) -> Array2<f32> {
    let d = emb.ncols() / 2;
    &emb.slice(s![.., ..d]) + &emb.slice(s![.., d..])
}

fn norm(v: ndarray::ArrayView1<f32>) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

// ---------------------------------------------------------------------------------------------
// Pair sets: .bin and image folder + pairs file

/// One verification protocol: images and the pairs over them.
struct PairSet {
    name: String,
    /// Embeddings `(N, 2D)`.
    emb: Array2<f32>,
    pairs: Vec<(usize, usize)>,
    issame: Vec<bool>,
}

/// A parsed pairs file: distinct image paths, pairs of indices into them, labels.
pub type PairsFile = (Vec<String>, Vec<(usize, usize)>, Vec<bool>);

/// Read a pairs file (see [`EvalOptions::pairs`]): the distinct image paths (relative to the
/// folder) in first-seen order, the pairs as indices into them, and the labels.
///
/// # Errors
/// An unreadable file, or a malformed line (naming the file and the line).
pub fn read_pairs_file(path: &Path) -> Result<PairsFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut paths: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let (mut pairs, mut labels) = (Vec::new(), Vec::new());
    let lfw = |name: &str, i: &str| -> Option<String> {
        let i: u32 = i.parse().ok()?;
        Some(format!("{name}/{name}_{i:04}.jpg"))
    };
    for (k, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let is_int = |s: &str| s.parse::<u64>().is_ok();
        let bad = |what: &str| crate::err!("{} line {}: {what}: {line:?}", path.display(), k + 1);
        let (a, b, same) = match f.as_slice() {
            // LFW header: "10 300" or "6000".
            [x] | [x, _] if k == 0 && is_int(x) && f.iter().all(|s| is_int(s)) => continue,
            [name, i, j] if is_int(i) && is_int(j) => (
                lfw(name, i).ok_or_else(|| bad("bad image number"))?,
                lfw(name, j).ok_or_else(|| bad("bad image number"))?,
                true,
            ),
            [n1, i, n2, j] if is_int(i) && is_int(j) => (
                lfw(n1, i).ok_or_else(|| bad("bad image number"))?,
                lfw(n2, j).ok_or_else(|| bad("bad image number"))?,
                false,
            ),
            [p1, p2, label] => {
                let same = match *label {
                    "1" | "true" | "True" => true,
                    "0" | "false" | "False" => false,
                    _ => return Err(bad("label (3rd field) must be 1 or 0")),
                };
                (p1.to_string(), p2.to_string(), same)
            }
            _ => {
                return Err(bad(
                    "expected `path1 path2 label`, `name i j` or `name1 i name2 j`",
                ))
            }
        };
        let mut id = |p: String| {
            let n = paths.len();
            *index.entry(p.clone()).or_insert_with(|| {
                paths.push(p);
                n
            })
        };
        let (ia, ib) = (id(a), id(b));
        pairs.push((ia, ib));
        labels.push(same);
    }
    if pairs.is_empty() {
        bail!("{}: no pairs", path.display());
    }
    Ok((paths, pairs, labels))
}

fn bin_set(ctx: &mut Ctx, path: &Path) -> Result<PairSet> {
    let set =
        load_bin_sized(path, ctx.size).with_context(|| format!("loading {}", path.display()))?;
    let n_pairs = set.issame.len();
    let images = &set.images;
    let size = ctx.size;
    let emb = ctx.embed(path, "bin", images.len(), &|idx: &[usize]| {
        let picked: Vec<RgbImage> = idx.iter().map(|&i| images[i].clone()).collect();
        to_array(&picked, size)
    })?;
    Ok(PairSet {
        name: set.name.clone(),
        emb,
        pairs: (0..n_pairs).map(|i| (2 * i, 2 * i + 1)).collect(),
        issame: set.issame,
    })
}

fn folder_set(ctx: &mut Ctx, folder: &Path, pairs_file: &Path) -> Result<PairSet> {
    let (paths, pairs, issame) = read_pairs_file(pairs_file)?;
    let size = ctx.size;
    let load = |idx: &[usize]| -> Result<Array4<f32>> {
        use rayon::prelude::*;
        let images: Vec<RgbImage> = idx
            .par_iter()
            .map(|&i| {
                let p = folder.join(&paths[i]);
                let bytes =
                    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                Ok(image::load_from_memory(&bytes)
                    .with_context(|| format!("decoding {}", p.display()))?
                    .to_rgb8())
            })
            .collect::<Result<_>>()?;
        to_array(&images, size)
    };
    let emb = ctx.embed(
        pairs_file,
        &format!("folder {}", fingerprint(folder)?),
        paths.len(),
        &load,
    )?;
    let name = pairs_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pairs".into());
    Ok(PairSet {
        name,
        emb,
        pairs,
        issame,
    })
}

/// Cosine and QMagFace scores of a pair set's pairs.
fn pair_set_scores(set: &PairSet) -> (Vec<f64>, Vec<f64>) {
    let e = flip_sum(&set.emb);
    let norms: Vec<f64> = e.outer_iter().map(norm).collect();
    let w = QualityWeight::default();
    set.pairs
        .iter()
        .map(|&(a, b)| {
            let dot: f64 = e
                .row(a)
                .iter()
                .zip(e.row(b))
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            let (na, nb) = (norms[a], norms[b]);
            let cos = if na > 0.0 && nb > 0.0 {
                dot / (na * nb)
            } else {
                0.0
            };
            // MagFace magnitude of the flip-averaged embedding.
            (cos, w.score(cos, 0.5 * na, 0.5 * nb))
        })
        .unzip()
}

fn verification(
    scores: &[f64],
    issame: &[bool],
    preset: &Preset,
    what: &str,
) -> Result<VerificationReport> {
    let mut cfg = VerificationConfig {
        n_folds: preset.eval.folds,
        far_targets: preset.eval.far.clone(),
        ..VerificationConfig::default()
    };
    if issame.len() < MIN_PAIRS_PER_FOLD * cfg.n_folds {
        cfg.n_folds = 1;
    }
    fr_eval::evaluate_scores(PairScores::Cosine(scores), issame, &cfg)
        .with_context(|| format!("scoring {what}"))
}

// ---------------------------------------------------------------------------------------------
// IJB

/// The IJB-B/C results of one model (insightface's `eval_ijbc.py` protocol).
#[derive(Debug, Clone, Serialize)]
pub struct IjbResult {
    /// The release folder.
    pub root: PathBuf,
    /// `IJB-B` or `IJB-C`.
    pub subset: String,
    /// Face images embedded.
    pub images: usize,
    /// Templates aggregated.
    pub templates: usize,
    /// Which of `eval_ijbc.py`'s flags (norm, detector score, flip) were used.
    pub flags: IjbFlags,
    /// 1:1 verification: TAR@FAR over the template pairs.
    pub one_to_one: OneToOneReport,
    /// `--qmagface`: template cosine + ω(cos)·min(q1, q2), q = mean image magnitude.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_to_one_qmagface: Option<OneToOneReport>,
    /// Open-set 1:N (TPIR@FPIR, rank-k), the two galleries averaged (absent without the CSVs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_to_n: Option<OneToNReport>,
    /// Per gallery.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub one_to_n_galleries: Vec<(String, OneToNReport)>,
    /// Seconds for aggregation + 1:1 scoring + ROC.
    pub scoring_seconds: f64,
}

/// QMagFace on IJB 1:1: each pair's template cosine plus ω(cos)·min(q1, q2), a template's
/// quality q being the mean MagFace magnitude ‖(e + e_flip)/2‖ of its images (published ω).
///
/// # Errors
/// A pair template without images, or a failing ROC.
fn qmagface_1to1(
    emb: &Array2<f32>,
    tids: &[i64],
    scores: &[f64],
    (p1, p2): (&[i64], &[i64]),
    labels: &[bool],
) -> Result<OneToOneReport> {
    let e = flip_sum(emb);
    let mut sum: BTreeMap<i64, (f64, usize)> = BTreeMap::new();
    for (row, &t) in e.outer_iter().zip(tids) {
        let q = sum.entry(t).or_default();
        q.0 += 0.5 * norm(row);
        q.1 += 1;
    }
    let quality: HashMap<i64, f64> = sum
        .into_iter()
        .map(|(t, (s, n))| (t, s / n as f64))
        .collect();
    let w = QualityWeight::default();
    let q: Vec<f64> = scores
        .iter()
        .zip(p1.iter().zip(p2))
        .map(|(&c, (a, b))| w.score(c, quality[a], quality[b]))
        .collect();
    Ok(ijb::verify_1to1(&q, labels, &IJB_FARS)?)
}

/// IJB 1:N (mixed probe against each gallery) when the protocol files are there; empty when
/// not.
///
/// # Errors
/// Unreadable protocol files, a template without images (named), a failing identification.
fn one_to_n_per_gallery(
    layout: &IjbLayout,
    subset: IjbSubset,
    templates: &ijb::Templates,
) -> Result<Vec<(String, OneToNReport)>> {
    let galleries = layout.galleries();
    let probe = layout.probe_mixed();
    let mut per_gallery = Vec::new();
    if probe.is_file() && galleries.iter().all(|g| g.is_file()) {
        let side = |path: &Path| -> Result<(Array2<f64>, Vec<i64>)> {
            let rows = read_template_subject_list(path)?;
            let mut seen: BTreeMap<i64, i64> = BTreeMap::new();
            for r in &rows {
                seen.entry(i64::from(r.template_id))
                    .or_insert(i64::from(r.subject_id));
            }
            let mut feats = Array2::<f64>::zeros((seen.len(), templates.features.ncols()));
            for (k, (&t, _)) in seen.iter().enumerate() {
                let Some(r) = templates.row_of(t) else {
                    bail!(
                        "{}: template {t} has no image in {}",
                        path.display(),
                        layout.face_tid_mid().display()
                    );
                };
                feats.row_mut(k).assign(&templates.features.row(r));
            }
            Ok((feats, seen.into_values().collect()))
        };
        let (pf, ps) = side(&probe)?;
        for (g, name) in galleries.iter().zip(subset.gallery_names()) {
            let (gf, gs) = side(g)?;
            let r = ijb::identify_1toN(
                TemplateSet {
                    features: gf.view(),
                    subjects: &gs,
                },
                TemplateSet {
                    features: pf.view(),
                    subjects: &ps,
                },
                &FPIRS,
            )
            .with_context(|| format!("1:N of {} against {}", probe.display(), g.display()))?;
            per_gallery.push((name.to_string(), r));
        }
    } else {
        info!(
            "no 1:N protocol files under {}: 1:1 only",
            layout.root.display()
        );
    }
    Ok(per_gallery)
}

fn ijb_eval(ctx: &mut Ctx, root: &Path, subset: IjbSubset, qmagface: bool) -> Result<IjbResult> {
    let layout = IjbLayout::new(root, subset);
    let meta = IjbMeta::open(&layout)?;
    let crops = IjbLooseCrops::from_layout(&layout)?;
    // Align at the backbone's size when the ArcFace template scales to it, else at 112 and
    // resize.
    let crops = match crops.clone().with_size(ctx.size) {
        Ok(c) => c,
        Err(_) => crops,
    };
    let size = ctx.size;
    let emb = ctx.embed(
        &layout.name_5pts_score(),
        &format!("ijb {}", fingerprint(&layout.loose_crop())?),
        meta.faces.len(),
        &|idx: &[usize]| {
            let images: Vec<RgbImage> = crops
                .load_aligned(idx)
                .into_iter()
                .collect::<fr_data::Result<_>>()?;
            to_array(&images, size)
        },
    )?;
    let start = Instant::now();
    let faceness: Vec<f32> = meta.landmarks.iter().map(|l| l.score).collect();
    let tids: Vec<i64> = meta
        .faces
        .iter()
        .map(|f| i64::from(f.template_id))
        .collect();
    let mids: Vec<i64> = meta.faces.iter().map(|f| i64::from(f.media_id)).collect();
    let flags = IjbFlags::default();
    let img = ijb::image_features(emb.view(), &faceness, flags)?;
    let templates = ijb::templates(img.view(), &tids, &mids)?;
    let p1: Vec<i64> = meta.pairs.iter().map(|p| i64::from(p.t1)).collect();
    let p2: Vec<i64> = meta.pairs.iter().map(|p| i64::from(p.t2)).collect();
    let labels: Vec<bool> = meta.pairs.iter().map(|p| p.genuine).collect();
    let scores = ijb::pair_scores(&templates, &p1, &p2)
        .with_context(|| format!("scoring {}", layout.template_pair_label().display()))?;
    let one_to_one = ijb::verify_1to1(&scores, &labels, &IJB_FARS)
        .with_context(|| format!("1:1 ROC of {}", layout.template_pair_label().display()))?;
    let one_to_one_qmagface = qmagface
        .then(|| qmagface_1to1(&emb, &tids, &scores, (&p1, &p2), &labels))
        .transpose()?;
    let scoring_seconds = start.elapsed().as_secs_f64();
    info!(
        pairs = scores.len(),
        seconds = format!("{scoring_seconds:.2}"),
        "IJB 1:1 scored"
    );
    let per_gallery = one_to_n_per_gallery(&layout, subset, &templates)?;
    let one_to_n = if per_gallery.is_empty() {
        None
    } else {
        let reports: Vec<OneToNReport> = per_gallery.iter().map(|(_, r)| r.clone()).collect();
        Some(ijb::average_1toN(&reports)?)
    };
    Ok(IjbResult {
        root: root.to_path_buf(),
        subset: format!("IJB-{subset:?}"),
        images: meta.faces.len(),
        templates: templates.ids.len(),
        flags,
        one_to_one,
        one_to_one_qmagface,
        one_to_n,
        one_to_n_galleries: per_gallery,
        scoring_seconds,
    })
}

// ---------------------------------------------------------------------------------------------
// Uniform accuracy

/// Uniform classification on a labelled folder.
#[derive(Debug, Clone, Serialize)]
pub struct UniformResult {
    /// The labelled folder.
    pub folder: PathBuf,
    /// Identities (class centres of the checkpoint's head).
    pub classes: usize,
    /// Uniform (one global threshold) and arg-max accuracy.
    #[serde(flatten)]
    pub accuracy: fr_eval::UniformAccuracy,
}

fn uniform_eval(ctx: &mut Ctx, folder: &Path, weights: &Path) -> Result<UniformResult> {
    let ds = ImageFolder::open(folder).with_context(|| format!("opening {}", folder.display()))?;
    let centres = if weights.extension().is_some_and(|e| e == "safetensors") {
        fr_backbone::weights::read_safetensors(weights)?.remove("head.weight")
    } else {
        None
    };
    let Some(centres) = centres else {
        bail!(
            "--labelled needs class centres: {} has no `head.weight` (a checkpoint written by \
training holds them; a backbone-only weights file does not)",
            weights.display()
        );
    };
    let (c, d) = centres.dims2()?;
    if c != ds.num_classes() {
        bail!(
            "--labelled {}: {} identities, but the head in {} has {c} class centres",
            folder.display(),
            ds.num_classes(),
            weights.display()
        );
    }
    let size = ctx.size;
    let emb = ctx.embed(folder, "labelled folder", ds.len(), &|idx: &[usize]| {
        use rayon::prelude::*;
        let images: Vec<RgbImage> = idx
            .par_iter()
            .map(|&i| ds.image(i))
            .collect::<fr_data::Result<_>>()?;
        to_array(&images, size)
    })?;
    let e = flip_sum(&emb);
    if e.ncols() != d {
        bail!(
            "head.weight in {} is ({c}, {d}), the backbone embeds to {}",
            weights.display(),
            e.ncols()
        );
    }
    let w: Vec<f32> = centres.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let w = Array2::from_shape_vec((c, d), w)?;
    let unit = |m: ArrayView2<f32>| -> Array2<f64> {
        let mut out = m.mapv(f64::from);
        for mut r in out.outer_iter_mut() {
            let n = r.dot(&r).sqrt();
            if n > 0.0 {
                r /= n;
            }
        }
        out
    };
    let scores = unit(e.view()).dot(&unit(w.view()).t());
    let labels: Vec<usize> = (0..ds.len())
        .map(|i| ds.label(i).map(|l| l as usize))
        .collect::<fr_data::Result<_>>()?;
    Ok(UniformResult {
        folder: folder.to_path_buf(),
        classes: c,
        accuracy: fr_eval::uniform_accuracy(scores.view(), &labels)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

/// Verification on one pair set (a `.bin` or a pairs folder).
#[derive(Debug, Clone, Serialize)]
pub struct PairSetResult {
    /// The set's name (the `.bin`'s stem, or `pairs`).
    pub name: String,
    /// 10-fold verification of the cosine of flip-summed embeddings.
    pub cosine: VerificationReport,
    /// The same with QMagFace's quality-aware score (`--qmagface`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qmagface: Option<VerificationReport>,
}

/// What [`run`] measured, typed, and what it wrote.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// `report.md`'s text and the output folder.
    pub written: Written,
    /// One result per `.bin` set, then the pairs folder.
    pub pair_sets: Vec<PairSetResult>,
    /// IJB-B/C 1:1 and 1:N.
    pub ijb: Option<IjbResult>,
    /// Uniform classification accuracy.
    pub uniform: Option<UniformResult>,
}

#[derive(Debug, Serialize)]
struct Metrics<'a> {
    label: &'a str,
    /// `--checkpoint` as given (`hf://owner/name@revision` for the Hub).
    source: &'a str,
    /// The local weights file read.
    weights: PathBuf,
    backbone: &'a BackboneConfig,
    /// Where the backbone configuration came from: `model card` or `preset`.
    backbone_from: &'a str,
    input_size: u32,
    /// Input channel order and normalisation map relative to fr-data's.
    input: String,
    /// QMagFace's ω when `--qmagface`: (α, β), published values.
    #[serde(skip_serializing_if = "Option::is_none")]
    qmagface_omega: Option<(f64, f64)>,
    pair_sets: &'a [PairSetResult],
    #[serde(skip_serializing_if = "Option::is_none")]
    ijb: Option<&'a IjbResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uniform: Option<&'a UniformResult>,
    embedded: Vec<EmbedInfo>,
    total_seconds: f64,
}

/// At most `n` points of a curve, log-spaced in FAR (the plots are log-scale).
fn thin(fpr: &[f64], tpr: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    if fpr.len() <= n {
        return (fpr.to_vec(), tpr.to_vec());
    }
    let lo = fpr.iter().copied().find(|&f| f > 0.0).unwrap_or(1e-12).ln();
    let step = (0f64.max(-lo)) / n as f64;
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    let mut next = f64::NEG_INFINITY;
    for (i, (&f, &t)) in fpr.iter().zip(tpr).enumerate() {
        let keep = i + 1 == fpr.len() || f <= 0.0 || f.ln() >= next;
        if keep {
            xs.push(f);
            ys.push(t);
            if f > 0.0 {
                next = f.ln() + step;
            }
        }
    }
    (xs, ys)
}

fn curve(label: String, fpr: &[f64], tpr: &[f64]) -> Curve {
    let (fpr, tpr) = thin(fpr, tpr, PLOT_POINTS);
    Curve { label, fpr, tpr }
}

fn ijb_tables(label: &str, r: &IjbResult) -> String {
    let mut md = format!(
        "\n## {} ({} images, {} templates, {} pairs, {} genuine)\n\n1:1 verification, \
eval_ijbc.py protocol (flags N, D, F on: norm kept, detector score, flip added). TAR (%) at each FAR: \
the nearest ROC point (the published column) / linear interpolation at exactly that FAR. Scored in \
{:.2} s.\n\n| method | scoring |",
        r.subset,
        r.images,
        r.templates,
        r.one_to_one.n_pairs,
        r.one_to_one.n_genuine,
        r.scoring_seconds
    );
    for far in IJB_FARS {
        md += &format!(" TAR@FAR={far:.0e} |");
    }
    md += " AUC |\n|---|---|";
    for _ in IJB_FARS {
        md += "---|";
    }
    md += "---|\n";
    let mut line = |scoring: &str, o: &OneToOneReport| {
        md += &format!("| {label} | {scoring} |");
        for t in &o.tar {
            md += &format!(
                " {:.2} / {:.2} |",
                100.0 * t.tar_nearest,
                100.0 * t.tar_interpolated
            );
        }
        md += &format!(" {:.4} |\n", o.auc);
    };
    line("cosine", &r.one_to_one);
    if let Some(q) = &r.one_to_one_qmagface {
        line("QMagFace", q);
    }
    if let Some(n) = &r.one_to_n {
        md += &format!(
            "\nOpen-set 1:N (mixed probes; galleries {} averaged; {} mated / {} non-mated probe \
searches in all). TPIR counts a mated probe whose rank-1 gallery subject is right and whose score \
is above the FPIR's threshold.\n\n| method | gallery | top-1 (%) | top-5 (%) | top-10 (%) |",
            r.one_to_n_galleries
                .iter()
                .map(|(g, _)| g.as_str())
                .collect::<Vec<_>>()
                .join(" / "),
            n.n_mated,
            n.n_non_mated
        );
        for f in FPIRS {
            md += &format!(" TPIR@FPIR={f} (%) |");
        }
        md += "\n|---|---|---|---|---|";
        for _ in FPIRS {
            md += "---|";
        }
        md += "\n";
        let all = std::iter::once(("mean".to_string(), n))
            .chain(r.one_to_n_galleries.iter().map(|(g, rep)| (g.clone(), rep)));
        for (g, rep) in all {
            md += &format!(
                "| {label} | {g} | {:.2} | {:.2} | {:.2} |",
                100.0 * rep.top1,
                100.0 * rep.top5,
                100.0 * rep.top10
            );
            for &(_, _, tpir) in &rep.tpir_at_fpir {
                md += &format!(" {:.2} |", 100.0 * tpir);
            }
            md += "\n";
        }
    }
    md
}

// ---------------------------------------------------------------------------------------------
// Entry point

fn load_preset(args: &EvalOptions, root: &Path) -> Result<Preset> {
    let preset = Presets::with_dir(root.join("configs"))
        .load_any(&args.config.to_string_lossy(), &args.sets)?;
    preset.validate()?;
    Ok(preset)
}

/// The backbone configuration: the model card's with `--set backbone.*` applied on top, else
/// the preset's (which already has the overrides).
fn backbone_config(
    pretrained: &Pretrained,
    preset: &Preset,
    sets: &[String],
) -> Result<(BackboneConfig, ConfigOrigin)> {
    let (cfg, from) = pretrained.config(Some(&preset.backbone))?;
    if from != ConfigOrigin::Card {
        return Ok((cfg, from));
    }
    let overrides: Vec<String> = sets
        .iter()
        .filter_map(|s| s.strip_prefix("backbone."))
        .map(str::to_string)
        .collect();
    if overrides.is_empty() {
        return Ok((cfg, from));
    }
    let tree = toml::Value::try_from(&cfg).context("the model card's backbone as TOML")?;
    let cfg = crate::config_file::finish(
        tree,
        &overrides,
        &format!("model card of {}", pretrained.origin),
    )?;
    Ok((cfg, from))
}

/// A weights mismatch under the preset's backbone: add the architecture the shapes describe,
/// as the `--set` flags that select it.
fn with_shape_hint(e: fr_backbone::Error, p: &Pretrained, from: ConfigOrigin) -> crate::Error {
    let hint = match (&e, from, p.inferred()) {
        (fr_backbone::Error::Weights { .. }, ConfigOrigin::Given, Some(i)) => format!(
            "\nthe weights are an IResNet with layers {:?}, widths {:?}, embedding {} and a \
{f}×{f} last feature map; evaluate them with --set 'backbone.layers={:?}' \
--set 'backbone.widths={:?}' --set backbone.embedding_size={} --set backbone.input_size={}",
            i.config.layers,
            i.config.widths,
            i.config.embedding_size,
            i.config.layers,
            i.config.widths,
            i.config.embedding_size,
            i.config.input_size,
            f = i.final_size
        ),
        _ => String::new(),
    };
    crate::err!("{e}{hint}")
}

/// insightface's 10-fold verification of any embedder on `.bin` sets (`lfw.bin`,
/// `cfp_fp.bin`, `agedb_30.bin`, ...): each set's images at the preset's input size, embedded
/// with flip-add in batches of `eval.batch_size`, scored with the preset's folds and FAR
/// targets (one fold for a set too small for them); one report per set, named as the set.
/// This is what arcface_torch's `CallBackVerification` computes during training.
///
/// # Errors
/// An unreadable or malformed `.bin` (named), an embedding failure.
pub fn verify_bins<E: Embedder>(
    embedder: &mut E,
    paths: &[PathBuf],
    preset: &Preset,
) -> Result<Vec<(String, VerificationReport)>> {
    let sets = crate::reproduce::bin_eval(paths, preset.input_size())?;
    Ok(crate::reproduce::evaluate_all(embedder, &sets, preset, "bin")?.0)
}

/// Verification during training, as arcface_torch's `CallBackVerification`: every `every`
/// steps the trainer's backbone (eval mode, no graph) embeds the `.bin` sets loaded once at
/// construction and [`verify_bins`]' protocol scores them; each result is logged and kept in
/// [`VerificationCallback::history`], the best accuracy per set in
/// [`VerificationCallback::best`]. A [`FitHooks`](crate::fit::FitHooks) for
/// [`fit`](crate::fit::fit).
pub struct VerificationCallback<'a> {
    preset: &'a Preset,
    sets: Vec<crate::reproduce::EvalSet>,
    device: Device,
    every: u64,
    /// `(step, set, accuracy)` of every evaluation, in order (`step` counts steps done).
    pub history: Vec<(u64, String, f64)>,
    /// The highest accuracy seen per set.
    pub best: std::collections::BTreeMap<String, f64>,
}

impl<'a> VerificationCallback<'a> {
    /// Verification on `bins` every `every` steps (0: never) with `preset`'s input size, folds
    /// and batch size, the backbone running on `device`.
    ///
    /// # Errors
    /// An unreadable or malformed `.bin`, named.
    pub fn new(preset: &'a Preset, bins: &[PathBuf], every: u64, device: &Device) -> Result<Self> {
        Ok(Self {
            preset,
            sets: crate::reproduce::bin_eval(bins, preset.input_size())?,
            device: device.clone(),
            every,
            history: Vec::new(),
            best: std::collections::BTreeMap::new(),
        })
    }
}

impl crate::fit::FitHooks<fr_train::Trainer> for VerificationCallback<'_> {
    fn after_step(
        &mut self,
        trainer: &mut fr_train::Trainer,
        _epoch: usize,
        outcome: &fr_train::StepOutcome,
    ) -> Result<()> {
        let done = outcome.step + 1;
        if self.every == 0 || done % self.every != 0 {
            return Ok(());
        }
        let mut embedder = BackboneEmbedder::new(trainer.backbone(), &self.device);
        let label = format!("step {done}");
        let (reports, _) =
            crate::reproduce::evaluate_all(&mut embedder, &self.sets, self.preset, &label)?;
        for (set, r) in reports {
            let best = self.best.entry(set.clone()).or_insert(f64::NEG_INFINITY);
            *best = best.max(r.accuracy_mean);
            info!(
                step = done,
                set = %set,
                accuracy = format!("{:.4}", r.accuracy_mean),
                best = format!("{:.4}", *best),
                "verification"
            );
            self.history.push((done, set, r.accuracy_mean));
        }
        Ok(())
    }
}

/// Evaluates the checkpoint `args` names on every protocol it lists (`.bin` sets, a pairs
/// folder, IJB-B/C 1:1 and 1:N, uniform accuracy) and writes `report.md`, `metrics.json`,
/// `roc.png` and `det.png` (default folder `root/target/eval/<label>`); presets are read from
/// `root/configs/` first, then the built-in ones.
///
/// # Errors
/// A bad config or checkpoint, unreadable or malformed data (naming the file and line), a model
/// failure.
pub fn run(args: &EvalOptions, root: &Path) -> Result<Evaluation> {
    let started = Instant::now();
    if args.bin.is_empty() && args.ijb.is_none() && args.pairs.is_none() && args.labelled.is_none()
    {
        bail!("nothing to evaluate: pass --bin FILE..., --ijb DIR, --pairs-folder DIR --pairs FILE, or --labelled DIR");
    }
    let preset = load_preset(args, root)?;
    let (pretrained, label_default) = load_checkpoint(args)?;
    let weights = pretrained.weights_file.clone();
    let label = args.method.clone().unwrap_or(label_default);
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target").join("eval").join(&label));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let cache_dir = args
        .cache
        .clone()
        .unwrap_or_else(|| root.join("target").join("eval").join("cache"));
    let (mut ctx, backbone, backbone_from) =
        model_context(args, &preset, &pretrained, &label, cache_dir)?;
    let size = ctx.size;
    let pair_sets = pair_set_results(&mut ctx, args, &preset)?;
    let ijb = args
        .ijb
        .as_ref()
        .map(|r| ijb_eval(&mut ctx, r, args.ijb_subset, args.qmagface))
        .transpose()?;
    let uniform = args
        .labelled
        .as_ref()
        .map(|f| uniform_eval(&mut ctx, f, &weights))
        .transpose()?;
    let mut curves = Vec::new();
    let mut md = format!(
        "# Evaluation: {label}\n\nWeights: `{}`{} (preset `{}`; backbone from the {backbone_from}, \
input {size}×{size}{}). Embeddings: image + horizontally flipped image, batch {}.\n",
        pretrained.origin,
        if pretrained.origin == weights.display().to_string() {
            String::new()
        } else {
            format!(" (`{}`)", weights.display())
        },
        preset.name,
        if ctx.embedder.input.is_bgr() { ", BGR" } else { "" },
        ctx.batch
    );
    md += &pairs_section(&label, &pair_sets, &preset, args.qmagface, &mut curves);
    if let Some(r) = &ijb {
        md += &ijb_section(&label, r, args.qmagface, &mut curves);
    }
    if let Some(u) = &uniform {
        md += &uniform_section(u);
    }
    md += &plot_curves(&out_dir, &label, &curves)?;
    let reused = ctx.embedded.iter().filter(|e| e.cached).count();
    md += &format!(
        "\nEmbeddings: {} dataset(s), {} from the cache ({}). Total wall time {:.1} s.\n",
        ctx.embedded.len(),
        reused,
        ctx.cache_dir.display(),
        started.elapsed().as_secs_f64()
    );
    report::write_atomic(&out_dir.join("report.md"), md.as_bytes())?;
    report::write_json(
        &out_dir.join("metrics.json"),
        &Metrics {
            label: &label,
            source: &pretrained.origin,
            weights: weights.clone(),
            backbone: &backbone,
            backbone_from,
            input_size: size,
            input: ctx.embedder.input.describe(),
            qmagface_omega: args.qmagface.then(|| {
                let w = QualityWeight::default();
                (w.alpha, w.beta)
            }),
            pair_sets: &pair_sets,
            ijb: ijb.as_ref(),
            uniform: uniform.as_ref(),
            embedded: ctx.embedded,
            total_seconds: started.elapsed().as_secs_f64(),
        },
    )?;
    Ok(Evaluation {
        written: Written {
            table: md,
            out_dir,
            files: "report.md, metrics.json, roc.png, det.png".into(),
            seconds: started.elapsed().as_secs_f64(),
        },
        pair_sets,
        ijb,
        uniform,
    })
}

/// The checkpoint `args` names, loaded (a Hub repository, a run or step folder, a weights
/// file), and the label it gives the report by default (repository or file name).
fn load_checkpoint(args: &EvalOptions) -> Result<(Pretrained, String)> {
    let checkpoint = args.checkpoint.to_string_lossy().into_owned();
    let load_options = LoadOptions {
        hub: HubOptions {
            offline: args.offline,
            cache_dir: args.hub_cache.clone(),
            ..HubOptions::default()
        },
        ..LoadOptions::default()
    };
    Ok(if checkpoint.starts_with(HUB_SCHEME) {
        if args.method.is_some() {
            bail!(
                "--method selects a run in a reproduce folder; it does not apply to {checkpoint}"
            );
        }
        let source = Source::parse(&checkpoint)?;
        let name = match &source {
            Source::Hub { repo, .. } => repo.rsplit('/').next().unwrap_or(repo).to_string(),
            Source::Path(_) => unreachable!("an hf:// source"),
        };
        let p = Pretrained::load(&source, &load_options)
            .with_context(|| format!("--checkpoint {checkpoint}"))?;
        (p, name)
    } else {
        let weights = resolve_weights(&args.checkpoint, args.method.as_deref())?;
        let p = if weights
            .file_name()
            .is_some_and(|f| f == fr_train::checkpoint::MODEL_FILE)
        {
            args.checkpoint.as_path()
        } else {
            weights.as_path()
        };
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        (Pretrained::from_path(&weights, &load_options)?, name)
    })
}

/// The embedder of the checkpoint (the model card's backbone and input transform, else the
/// preset's) in its evaluation context; also the backbone config and where it came from.
fn model_context(
    args: &EvalOptions,
    preset: &Preset,
    pretrained: &Pretrained,
    label: &str,
    cache_dir: PathBuf,
) -> Result<(Ctx, BackboneConfig, &'static str)> {
    let weights = &pretrained.weights_file;
    #[cfg(feature = "cuda")]
    let device = Device::cuda_if_available(0)?;
    #[cfg(not(feature = "cuda"))]
    let device = Device::Cpu;
    let (backbone, backbone_from) = backbone_config(pretrained, preset, &args.sets)?;
    let (model, report) = pretrained
        .build(&backbone, DType::F32, &device)
        .map_err(|e| with_shape_hint(e, pretrained, backbone_from))
        .with_context(|| {
            format!(
                "building the {} backbone from {}",
                match backbone_from {
                    ConfigOrigin::Card => "model card's",
                    _ => "preset's",
                },
                pretrained.origin
            )
        })?;
    if !report.unused.is_empty() {
        tracing::debug!(
            keys = report.unused.len(),
            "weights the backbone does not use (head, …)"
        );
    }
    let size = backbone.input_shape().0 as u32;
    let input = InputTransform::new(pretrained.colour_order, pretrained.normalisation);
    let backbone_from = match backbone_from {
        ConfigOrigin::Card => "model card",
        _ => "preset",
    };
    info!(source = %pretrained.origin, weights = %weights.display(), label, size, backbone_from, "model loaded");
    let mut weights_key = fingerprint(weights)?;
    if !input.is_identity() {
        weights_key += &format!("|input {}", input.describe());
    }
    let ctx = CachedEmbedder {
        embedder: BackboneEmbedder {
            model,
            device,
            input,
        },
        size,
        batch: args.batch_size.unwrap_or(preset.eval.batch_size).max(1),
        cache_dir,
        weights_key,
        embedded: Vec::new(),
    };
    Ok((ctx, backbone, backbone_from))
}

/// The `.bin` sets and the pairs folder of `args`, embedded and scored (cosine, and QMagFace
/// with `--qmagface`).
fn pair_set_results(
    ctx: &mut Ctx,
    args: &EvalOptions,
    preset: &Preset,
) -> Result<Vec<PairSetResult>> {
    let mut sets = Vec::new();
    for b in &args.bin {
        sets.push(bin_set(ctx, b)?);
    }
    if let (Some(folder), Some(pairs)) = (&args.pairs_folder, &args.pairs) {
        sets.push(folder_set(ctx, folder, pairs)?);
    }
    let mut pair_sets = Vec::new();
    for set in &sets {
        let (cos, q) = pair_set_scores(set);
        pair_sets.push(PairSetResult {
            name: set.name.clone(),
            cosine: verification(&cos, &set.issame, preset, &set.name)?,
            qmagface: if args.qmagface {
                Some(verification(&q, &set.issame, preset, &set.name)?)
            } else {
                None
            },
        });
    }
    Ok(pair_sets)
}

/// The report's verification table (and its curves, appended to `curves`); empty without
/// pair sets.
fn pairs_section(
    label: &str,
    pair_sets: &[PairSetResult],
    preset: &Preset,
    qmagface: bool,
    curves: &mut Vec<Curve>,
) -> String {
    // Tables, curves.
    let mut rows = Vec::new();
    for p in pair_sets {
        rows.push(Row::from_report(label, &p.name, &p.cosine, None));
        curves.push(curve(
            format!("{label} · {}", p.name),
            &p.cosine.roc_fpr,
            &p.cosine.roc_tpr,
        ));
        if let Some(q) = &p.qmagface {
            rows.push(Row::from_report(
                &format!("{label} + QMagFace"),
                &p.name,
                q,
                None,
            ));
            curves.push(curve(
                format!("{label} + QMagFace · {}", p.name),
                &q.roc_fpr,
                &q.roc_tpr,
            ));
        }
    }
    if rows.is_empty() {
        return String::new();
    }
    format!(
            "\n## Verification pairs\n\nCosine of the flip-summed embeddings; accuracy: insightface \
{}-fold verification (sets under {} pairs per fold as one fold); TAR@FAR: nearest ROC point.{}\n\n{}",
            preset.eval.folds,
            MIN_PAIRS_PER_FOLD,
            if qmagface {
                " `+ QMagFace`: cos + ω(cos)·min(q1, q2), q the MagFace magnitude ‖(e + e_flip)/2‖, \
published ω (α 0.077428, β 0.125926)."
            } else {
                ""
            },
            report::markdown_table(&rows, &preset.eval.far)
        )
}

/// The report's IJB tables (and its curves, appended to `curves`).
fn ijb_section(label: &str, r: &IjbResult, qmagface: bool, curves: &mut Vec<Curve>) -> String {
    let mut md = ijb_tables(label, r);
    if qmagface {
        md += "\nQMagFace on IJB: the template cosine of the protocol above plus \
ω(cos)·min(q1, q2), where a template's quality q is the mean MagFace magnitude \
‖(e + e_flip)/2‖ of its images; published ω.\n";
    }
    curves.push(curve(
        format!("{label} · {}", r.subset),
        &r.one_to_one.roc.fpr,
        &r.one_to_one.roc.tpr,
    ));
    if let Some(q) = &r.one_to_one_qmagface {
        curves.push(curve(
            format!("{label} + QMagFace · {}", r.subset),
            &q.roc.fpr,
            &q.roc.tpr,
        ));
    }
    md
}

/// The report's uniform-classification paragraph.
fn uniform_section(u: &UniformResult) -> String {
    format!(
        "\n## Uniform classification\n\n`{}`: {} images of {} identities, cosine of each \
flip-summed embedding to each class centre of the checkpoint's head. Uniform accuracy (one global \
threshold for every sample): **{:.2} %** (threshold {}); per-sample (arg-max) accuracy {:.2} %.\n",
        u.folder.display(),
        u.accuracy.n,
        u.classes,
        100.0 * u.accuracy.accuracy,
        u.accuracy
            .threshold
            .map_or("none".to_string(), |t| format!("{t:.4}")),
        100.0 * u.accuracy.sample_accuracy
    )
}

/// `roc.png` and `det.png` of `curves`, and the report's lines showing them; nothing without
/// curves.
fn plot_curves(out_dir: &Path, label: &str, curves: &[Curve]) -> Result<String> {
    if curves.is_empty() {
        return Ok(String::new());
    }
    let lo = curves
        .iter()
        .filter_map(|c| c.fpr.iter().copied().find(|&f| f > 0.0))
        .fold(1e-4f64, f64::min)
        .max(1e-6);
    report::plot_roc_from(
        &out_dir.join("roc.png"),
        &format!("{label} — ROC"),
        curves,
        lo,
    )?;
    report::plot_det(
        &out_dir.join("det.png"),
        &format!("{label} — DET"),
        curves,
        lo,
    )?;
    Ok("\n![ROC](roc.png)\n\n![DET: FNMR against FMR](det.png)\n".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The callback evaluates at every `every`-th step only, keeps each result and the best.
    #[test]
    fn verification_callback_runs_every_n_steps() {
        use crate::fit::{fit, FitConfig};
        use crate::model::{assemble, ModelSpec};
        let root = crate::workspace_root();
        let sets = [
            "train.epochs=1",
            "train.batch_size=8",
            "synthetic.train.num_identities=6",
            "synthetic.train.images_per_identity=4",
        ];
        let preset = crate::Presets::builtin()
            .load("arcface", &sets.map(String::from))
            .unwrap();
        let size = preset.input_size();
        let faces = SyntheticFaces::new(preset.synthetic.train.clone()).unwrap();
        let train =
            std::sync::Arc::new(fr_data::InMemoryDataset::from_dataset(&faces, size).unwrap());
        let mut model = assemble(ModelSpec::new(
            &preset,
            "arcface",
            train.as_ref(),
            "test",
            &Device::Cpu,
        ))
        .unwrap();
        let loader = fr_data::BatchLoader::new(train, preset.loader_config(8, size)).unwrap();
        assert_eq!(loader.batches_per_epoch(), 3);
        let bin = root.join("crates/fr-data/tests/data/bin/pairs_py2_str.bin");
        let mut callback = VerificationCallback::new(&preset, &[bin], 2, &Device::Cpu).unwrap();
        fit(
            &mut model.trainer,
            &loader,
            &FitConfig {
                progress: false,
                ..FitConfig::new("arcface", 1)
            },
            &mut callback,
        )
        .unwrap();
        let steps: Vec<u64> = callback.history.iter().map(|h| h.0).collect();
        assert_eq!(steps, [2], "3 steps, every 2nd evaluated");
        let (_, set, accuracy) = &callback.history[0];
        assert_eq!(set, "pairs_py2_str");
        assert!((0.0..=1.0).contains(accuracy));
        assert_eq!(callback.best[set], *accuracy);
    }
    use fr_backbone::build_backbone;
    use fr_backbone::{ColourOrder, Normalisation};
    use fr_data::synthetic::{SyntheticConfig, SyntheticFaces};

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fr-eval-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const IDS: usize = 8;
    const PER_ID: usize = 4;

    /// A synthetic IJB-C tree under `root/IJBC`: 8 identities × 4 loose crops (rendered 112×112
    /// faces, landmarks = the ArcFace template, so alignment is the identity), two templates
    /// per identity (the first two images one media, the other two one media each), every
    /// template pair in the 1:1 list, galleries G1 (identities 0–3) and G2 (4–7) from the first
    /// templates, the second templates as mixed probes. Also `root/labelled/id<k>/<j>.png`
    /// (the same images as a labelled folder) and `root/pairs.txt` over it.
    fn write_tree(root: &Path) -> PathBuf {
        let faces = SyntheticFaces::new(SyntheticConfig {
            num_identities: IDS,
            images_per_identity: PER_ID,
            image_size: 112,
            seed: 7,
            hard_fraction: 0.0,
            low_quality_fraction: 0.0,
            ..SyntheticConfig::default()
        })
        .unwrap();
        let ijb = root.join("IJBC");
        std::fs::create_dir_all(ijb.join("loose_crop")).unwrap();
        std::fs::create_dir_all(ijb.join("meta")).unwrap();
        let lmk = fr_data::align::arcface_template(112).unwrap();
        let lmk: Vec<String> = lmk.iter().flatten().map(|v| format!("{v:.4}")).collect();
        let (mut tid_mid, mut pts) = (String::new(), String::new());
        let template = |i: usize| 100 + 2 * (i / PER_ID) + (i % PER_ID) / 2;
        for i in 0..IDS * PER_ID {
            let img = faces.image(i).unwrap();
            let name = format!("{}.jpg", i + 1);
            img.save(ijb.join("loose_crop").join(&name)).unwrap();
            let dir = root.join("labelled").join(format!("id{}", i / PER_ID));
            std::fs::create_dir_all(&dir).unwrap();
            img.save(dir.join(format!("{}.png", i % PER_ID))).unwrap();
            let media = if i % PER_ID < 2 {
                500 + i / PER_ID
            } else {
                1000 + i
            };
            tid_mid += &format!("{name} {} {media}\n", template(i));
            pts += &format!("{name} {} 0.9{}\n", lmk.join(" "), i % 10);
        }
        std::fs::write(ijb.join("meta/ijbc_face_tid_mid.txt"), tid_mid).unwrap();
        std::fs::write(ijb.join("meta/ijbc_name_5pts_score.txt"), pts).unwrap();
        let mut pairs = String::new();
        for a in 0..2 * IDS {
            for b in a + 1..2 * IDS {
                pairs += &format!("{} {} {}\n", 100 + a, 100 + b, u8::from(a / 2 == b / 2));
            }
        }
        std::fs::write(ijb.join("meta/ijbc_template_pair_label.txt"), pairs).unwrap();
        let csv = |ids: std::ops::Range<usize>, second: usize| {
            let mut s = String::from("TEMPLATE_ID,SUBJECT_ID,FILENAME\n");
            for k in ids {
                for j in 0..2 {
                    s += &format!(
                        "{},{k},img/{}.jpg\n",
                        100 + 2 * k + second,
                        k * PER_ID + 2 * second + j + 1
                    );
                }
            }
            s
        };
        std::fs::write(ijb.join("meta/ijbc_1N_gallery_G1.csv"), csv(0..4, 0)).unwrap();
        std::fs::write(ijb.join("meta/ijbc_1N_gallery_G2.csv"), csv(4..8, 0)).unwrap();
        std::fs::write(ijb.join("meta/ijbc_1N_probe_mixed.csv"), csv(0..8, 1)).unwrap();
        let mut lines = String::from("# path1 path2 label\n");
        for k in 0..IDS {
            lines += &format!("id{k}/0.png id{k}/1.png 1\n");
            lines += &format!("id{k}/2.png id{}/3.png 0\n", (k + 1) % IDS);
        }
        std::fs::write(root.join("pairs.txt"), lines).unwrap();
        ijb
    }

    /// A freshly initialised backbone of the preset plus an ArcFace head over `classes`,
    /// saved as one safetensors file (the layout of a training checkpoint's weights).
    fn write_weights(preset: &Preset, classes: usize, path: &Path) {
        let seeded = fr_train::SeededVarMap::new(3);
        let vb = seeded.var_builder(DType::F32, &Device::Cpu);
        let bb = build_backbone(&preset.backbone, vb.clone()).unwrap();
        let head = fr_heads::HeadConfig::default_for("arcface").unwrap();
        fr_heads::build_head(&head, bb.embedding_size(), classes, vb.pp("head")).unwrap();
        seeded.varmap().save(path).unwrap();
    }

    fn args(dir: &Path, ijb: &Path, weights: &Path) -> EvalOptions {
        let root = crate::workspace_root();
        EvalOptions {
            config: root.join("configs/lh2face.toml"),
            sets: vec![],
            checkpoint: weights.to_path_buf(),
            offline: false,
            hub_cache: None,
            method: None,
            bin: vec![root.join("crates/fr-data/tests/data/bin/pairs_py2_str.bin")],
            ijb: Some(ijb.parent().unwrap().join("IJBC")),
            ijb_subset: IjbSubset::C,
            pairs_folder: Some(dir.join("labelled")),
            pairs: Some(dir.join("pairs.txt")),
            labelled: Some(dir.join("labelled")),
            qmagface: true,
            out: Some(dir.join("out")),
            cache: Some(dir.join("cache")),
            batch_size: Some(12),
        }
    }

    fn metrics(dir: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/metrics.json")).unwrap())
            .unwrap()
    }

    /// The synthetic IJB tree, the .bin fixture, a folder + pairs file and a labelled folder,
    /// end to end with a fresh model; the second run reuses every cached embedding and gives
    /// the same numbers.
    #[test]
    fn synthetic_ijb_tree_end_to_end_and_cache_reuse() {
        let root = crate::workspace_root();
        let dir = temp("e2e");
        let ijb = write_tree(&dir);
        let preset: Preset =
            crate::config_file::load(&root.join("configs/lh2face.toml"), &[]).unwrap();
        let weights = dir.join("model.safetensors");
        write_weights(&preset, IDS, &weights);
        let a = args(&dir, &ijb, &weights);
        run(&a, &root).unwrap();
        for f in ["report.md", "metrics.json", "roc.png", "det.png"] {
            assert!(dir.join("out").join(f).is_file(), "{f} missing");
        }
        let m = metrics(&dir);
        let unit = |v: &serde_json::Value| {
            let x = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
            assert!((0.0..=1.0).contains(&x), "{x}");
            x
        };
        let o = &m["ijb"]["one_to_one"];
        assert_eq!(o["n_pairs"], 120);
        assert_eq!(o["n_genuine"], 8);
        assert_eq!(o["tar"].as_array().unwrap().len(), 6);
        for t in o["tar"].as_array().unwrap() {
            unit(&t["tar_nearest"]);
            unit(&t["tar_interpolated"]);
        }
        let auc = unit(&o["auc"]);
        unit(&m["ijb"]["one_to_one_qmagface"]["auc"]);
        let n = &m["ijb"]["one_to_n"];
        assert_eq!(n["n_mated"], 8);
        assert_eq!(n["n_non_mated"], 8);
        for k in ["top1", "top5", "top10"] {
            unit(&n[k]);
        }
        assert_eq!(m["ijb"]["templates"], 16);
        let sets = m["pair_sets"].as_array().unwrap();
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[0]["name"], "pairs_py2_str");
        assert_eq!(sets[1]["name"], "pairs");
        for s in sets {
            unit(&s["cosine"]["accuracy_mean"]);
            unit(&s["qmagface"]["accuracy_mean"]);
        }
        assert_eq!(m["uniform"]["classes"], IDS);
        let ua = unit(&m["uniform"]["accuracy"]);
        assert!(unit(&m["uniform"]["sample_accuracy"]) >= ua);
        let embedded = m["embedded"].as_array().unwrap();
        assert_eq!(embedded.len(), 4);
        assert!(embedded.iter().all(|e| e["cached"] == false));
        let report = std::fs::read_to_string(dir.join("out/report.md")).unwrap();
        assert!(
            report.contains("## IJB-C (32 images, 16 templates, 120 pairs, 8 genuine)"),
            "{report}"
        );
        assert!(
            report.contains("| model | QMagFace |") && report.contains("| model | G1 |"),
            "{report}"
        );
        assert!(
            report.contains("| model + QMagFace | pairs_py2_str |"),
            "{report}"
        );
        assert!(report.contains("## Uniform classification"), "{report}");

        // Second run: every embedding from the cache, same numbers.
        run(&a, &root).unwrap();
        let m2 = metrics(&dir);
        assert!(m2["embedded"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["cached"] == true));
        assert_eq!(m2["ijb"]["one_to_one"]["auc"].as_f64().unwrap(), auc);
        assert_eq!(m2["uniform"], m["uniform"]);
        // New weights (rewritten file: new modification time) are a different key.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_weights(&preset, IDS, &weights);
        let mut b = a.clone();
        b.bin.clear();
        b.pairs = None;
        b.pairs_folder = None;
        b.labelled = None;
        b.qmagface = false;
        run(&b, &root).unwrap();
        assert!(metrics(&dir)["embedded"][0]["cached"] == false);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A malformed meta line fails the run with the file and the line number.
    #[test]
    fn malformed_meta_line_names_file_and_line() {
        let root = crate::workspace_root();
        let dir = temp("malformed");
        let ijb = write_tree(&dir);
        let preset: Preset =
            crate::config_file::load(&root.join("configs/lh2face.toml"), &[]).unwrap();
        let weights = dir.join("model.safetensors");
        write_weights(&preset, IDS, &weights);
        let mut a = args(&dir, &ijb, &weights);
        a.bin.clear();
        a.pairs = None;
        a.pairs_folder = None;
        a.labelled = None;
        let path = ijb.join("meta/ijbc_face_tid_mid.txt");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[2] = "3.jpg 101 not-a-media";
        std::fs::write(&path, lines.join("\n")).unwrap();
        let err = format!("{:#}", run(&a, &root).unwrap_err());
        assert!(
            err.contains("ijbc_face_tid_mid.txt") && err.contains("line 3"),
            "{err}"
        );
        assert!(err.contains("media_id"), "{err}");
        // Same for the pair list.
        std::fs::write(&path, text).unwrap();
        let pairs = ijb.join("meta/ijbc_template_pair_label.txt");
        let mut t = std::fs::read_to_string(&pairs).unwrap();
        t += "100 101 2\n";
        std::fs::write(&pairs, t).unwrap();
        let err = format!("{:#}", run(&a, &root).unwrap_err());
        assert!(
            err.contains("ijbc_template_pair_label.txt") && err.contains("line 121"),
            "{err}"
        );
        // And for a pairs file.
        let bad = dir.join("bad_pairs.txt");
        std::fs::write(&bad, "a.png b.png 1\na.png b.png maybe\n").unwrap();
        let err = read_pairs_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad_pairs.txt line 2"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn pairs_file_formats() {
        let dir = temp("pairs");
        let p = dir.join("pairs.txt");
        std::fs::write(&p, "10 300\nAbel 1 2\nAbel 1 Zed 3\nx/a.png x/b.png 0\n").unwrap();
        let (paths, pairs, labels) = read_pairs_file(&p).unwrap();
        assert_eq!(
            paths,
            [
                "Abel/Abel_0001.jpg",
                "Abel/Abel_0002.jpg",
                "Zed/Zed_0003.jpg",
                "x/a.png",
                "x/b.png"
            ]
        );
        assert_eq!(pairs, [(0, 1), (0, 2), (3, 4)]);
        assert_eq!(labels, [true, false, false]);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// fr-data's input to a BGR model with ImageNet-style normalisation: channels reversed,
    /// then `(p/255 − m)/s` per model channel.
    #[test]
    fn input_transform_reorders_and_renormalises() {
        let norm = Normalisation {
            mean: [0.4, 0.5, 0.6],
            std: [0.2, 0.25, 0.5],
        };
        let t = InputTransform::new(ColourOrder::Bgr, norm);
        assert!(!t.is_identity());
        assert!(InputTransform::new(ColourOrder::Rgb, Normalisation::default()).is_identity());
        // One pixel with RGB values p = (51, 102, 204): fr-data's x = (p/255 − 0.5)/0.5.
        let p = [51.0f32, 102.0, 204.0];
        let x = Array4::from_shape_fn((1, 3, 1, 1), |(_, c, _, _)| (p[c] / 255.0 - 0.5) / 0.5);
        let y = t.apply(x.view());
        for c in 0..3 {
            let want = (p[2 - c] / 255.0 - norm.mean[c]) / norm.std[c];
            assert!((y[[0, c, 0, 0]] - want).abs() < 1e-6, "channel {c}");
        }
    }

    /// A model uploaded with its card, evaluated by repository id from a Hub cache used
    /// offline: the card's backbone wins over the preset's, `--set backbone.*` edits it, and
    /// the card's colour order reaches the input. Without a card, a preset that does not fit
    /// gets the architecture of the weights as `--set` flags in the error.
    #[test]
    fn hub_checkpoint_with_model_card() {
        let root = crate::workspace_root();
        let dir = temp("hub");
        let preset: Preset =
            crate::config_file::load(&root.join("configs/lh2face.toml"), &[]).unwrap();
        let BackboneConfig::Iresnet(c) = &preset.backbone else {
            panic!("the lh2face preset uses an IResNet")
        };
        let card_cfg = BackboneConfig::Iresnet(c.clone().with_embedding_size(24));
        let seeded = fr_train::SeededVarMap::new(5);
        build_backbone(&card_cfg, seeded.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let plain = dir.join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        seeded.varmap().save(plain.join("w.safetensors")).unwrap();
        let mut card = fr_backbone::ModelCard::new(card_cfg);
        card.colour_order = ColourOrder::Bgr;
        // The layout hf-hub and huggingface_hub share: refs/main → snapshots/<commit>/.
        let commit = "89abcdef0123456789abcdef0123456789abcdef";
        let repo = dir.join("hub/models--fr-test--eval-tiny");
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        std::fs::copy(
            plain.join("w.safetensors"),
            snapshot.join("model.safetensors"),
        )
        .unwrap();
        std::fs::write(snapshot.join("config.json"), card.to_json()).unwrap();

        let mut a = EvalOptions {
            config: root.join("configs/lh2face.toml"),
            sets: vec!["backbone.kernels=\"candle\"".into()],
            checkpoint: PathBuf::from("hf://fr-test/eval-tiny"),
            offline: true,
            hub_cache: Some(dir.join("hub")),
            method: None,
            bin: vec![root.join("crates/fr-data/tests/data/bin/pairs_py2_str.bin")],
            ijb: None,
            ijb_subset: IjbSubset::C,
            pairs_folder: None,
            pairs: None,
            labelled: None,
            qmagface: false,
            out: Some(dir.join("out")),
            cache: Some(dir.join("cache")),
            batch_size: Some(12),
        };
        run(&a, &root).unwrap();
        let m = metrics(&dir);
        assert_eq!(m["source"], "hf://fr-test/eval-tiny@main");
        assert_eq!(m["label"], "eval-tiny");
        assert_eq!(m["backbone_from"], "model card");
        assert_eq!(m["backbone"]["embedding_size"], 24);
        assert_eq!(m["backbone"]["kernels"], "candle");
        assert!(
            m["input"].as_str().unwrap().starts_with("BGR"),
            "{}",
            m["input"]
        );
        let acc = m["pair_sets"][0]["cosine"]["accuracy_mean"]
            .as_f64()
            .unwrap();
        assert!((0.0..=1.0).contains(&acc));

        // Not in the cache: the error names the repository and where it looked.
        a.checkpoint = PathBuf::from("hf://fr-test/not-cached");
        let err = format!("{:#}", run(&a, &root).unwrap_err());
        assert!(
            err.contains("fr-test/not-cached") && err.contains("models--fr-test--not-cached"),
            "{err}"
        );
        // The same weights without a card: the preset does not fit, the error says what does.
        a.checkpoint = plain.join("w.safetensors");
        a.sets.clear();
        let err = format!("{:#}", run(&a, &root).unwrap_err());
        assert!(
            err.contains("fc.weight") && err.contains("--set backbone.embedding_size=24"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Run directories, step directories, reproduce output folders with --method, files.
    #[test]
    fn checkpoint_paths_resolve_to_the_weights() {
        let dir = temp("resolve");
        let run_dir = dir.join("out/checkpoints/arcface");
        let step = run_dir.join("step-00000004");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("model.safetensors"), b"x").unwrap();
        std::fs::write(run_dir.join("latest"), "step-00000004\n").unwrap();
        let want = step.join("model.safetensors");
        assert_eq!(resolve_weights(&run_dir, None).unwrap(), want);
        assert_eq!(resolve_weights(&step, None).unwrap(), want);
        assert_eq!(resolve_weights(&want, None).unwrap(), want);
        assert_eq!(
            resolve_weights(&dir.join("out"), Some("arcface")).unwrap(),
            want
        );
        let err = resolve_weights(&dir.join("out"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--method"), "{err}");
        assert!(resolve_weights(&dir.join("nope"), None).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
