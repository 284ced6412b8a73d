//! `cargo xtask study <study>`: the practical-FR survey's experiments on backbone size and on
//! the shape of the training data, as one command on top of the trainer.
//!
//! - `study backbone-size`: one head, one data set, IResNet depths 18 / 34 / 50 (insightface's
//!   block counts at the base config's widths and input size) → accuracy, TAR@FAR, parameters,
//!   MACs and training images/s per depth.
//! - `study data-distribution`: one image budget split as many identities × few images, few
//!   identities × many images, balanced and long-tailed (Zipf-like class sizes), from the
//!   synthetic identities or by subsampling a RecordIO set → accuracy per split.
//!
//! Every run goes through `reproduce`'s training loop and evaluation ([`run_method`]), so its
//! numbers are comparable with `cargo xtask reproduce` on the same base config. A run is one
//! (head, variant) pair; each writes `runs/<head>-<variant>.json` atomically when it finishes,
//! holding its full config (preset with seed, variant, data source) and its result. A rerun
//! reuses a finished run whose stored config equals the current one and retrains it otherwise
//! (`--fresh` retrains everything), so an interrupted study resumes at the first unfinished
//! run and several `--head` invocations share one output folder.
//!
//! [`run_method`]: crate::reproduce::run_method_with

mod backbone;
mod distribution;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::{bail, Context as _, Result};
use candle_core::Device;
use fr_data::FaceDataset;
use fr_eval::VerificationReport;
use fr_heads::HeadConfig;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use crate::config::Preset;
use crate::presets::Presets;
use crate::report::{self, Row, Written};
use crate::reproduce::{self, EvalSet};

/// Options of `study`.
#[derive(Debug, Clone)]
pub struct StudyOptions {
    /// The study: `backbone-size` or `data-distribution`.
    pub study: Option<String>,
    /// Heads to train: registry head names or preset names (a preset contributes its paper's
    /// head with the preset's settings); repeat the flag or separate names with commas. Every
    /// variant of the study is trained once per head.
    pub heads: Vec<String>,
    /// Base config (default `configs/_base.toml`): backbone, budget, data and evaluation.
    pub config: Option<PathBuf>,
    /// Override a base config value: `--set train.epochs=3` (repeatable; value parsed as TOML).
    pub sets: Vec<String>,
    /// Seed of initialisation, data order, augmentation, evaluation pairs and .rec subsampling
    /// (the config's `seed`; the synthetic identities' pixels follow
    /// `synthetic.train.seed`).
    pub seed: Option<u64>,
    /// Output folder (default `target/study/<study>`).
    pub out: Option<PathBuf>,
    /// Retrain every run, ignoring finished runs stored in the output folder.
    pub fresh: bool,
    /// Train on an insightface RecordIO folder (train.rec, train.idx, property) instead of the
    /// synthetic identities (`data-distribution` subsamples it by identity).
    pub train_rec: Option<PathBuf>,
    /// Verification sets (.bin) to evaluate on; required with --train-rec.
    pub val_bin: Vec<PathBuf>,
    /// `backbone-size`: IResNet depths to train (18, 34, 50, 100, 200; default 18,34,50).
    pub depths: Vec<u32>,
    /// `data-distribution`: training images of every split (default: the base config's
    /// synthetic training set, identities × images per identity).
    pub budget: Option<usize>,
    /// `data-distribution`: identity counts; each gets a balanced and a long-tailed split
    /// (default: 3n, n and n/3 for the base config's n training identities).
    pub identities: Vec<usize>,
    /// `data-distribution`: exponent `a` of the long-tailed class sizes, size ∝ 1/rank^a
    /// (default 1, Zipf's law).
    pub zipf: Option<f64>,
}

impl Default for StudyOptions {
    /// No study named yet; ArcFace on the base config's synthetic identities.
    fn default() -> Self {
        Self {
            study: None,
            heads: vec!["arcface".into()],
            config: None,
            sets: Vec::new(),
            seed: None,
            out: None,
            fresh: false,
            train_rec: None,
            val_bin: Vec::new(),
            depths: Vec::new(),
            budget: None,
            identities: Vec::new(),
            zipf: None,
        }
    }
}

/// The studies `cargo xtask study` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Study {
    /// IResNet depth → accuracy, parameters, MACs, throughput.
    BackboneSize,
    /// Identities × images per identity and class-size shape → accuracy.
    DataDistribution,
}

impl Study {
    /// Every study, in the order the help lists them.
    pub(crate) const ALL: [Study; 2] = [Study::BackboneSize, Study::DataDistribution];

    /// The command-line name (also the default output folder and the plot's file stem).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Study::BackboneSize => "backbone-size",
            Study::DataDistribution => "data-distribution",
        }
    }

    /// The study named `name`.
    ///
    /// # Errors
    /// No name, or an unknown one; the message lists the studies.
    pub(crate) fn parse(name: Option<&str>) -> Result<Self> {
        let names = || {
            Self::ALL
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(name) = name else {
            bail!(
                "name a study: `cargo xtask study backbone-size` (studies: {})",
                names()
            );
        };
        Self::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .with_context(|| format!("no study `{name}` (studies: {})", names()))
    }
}

/// Where the training and evaluation data come from.
#[derive(Debug, Clone)]
pub(crate) enum Data {
    /// The embedded default: synthetic identities, evaluated on held-out synthetic identities
    /// (subsets all / hq_hard / low_quality).
    Synthetic,
    /// A RecordIO folder, evaluated on verification `.bin` sets.
    Rec {
        /// The folder holding train.rec, train.idx (and property).
        dir: PathBuf,
        /// The verification sets.
        val_bin: Vec<PathBuf>,
    },
}

impl Data {
    /// The data source of `args`.
    ///
    /// # Errors
    /// `--train-rec` without `--val-bin` or the reverse, or a `--train-rec` that is not a
    /// folder.
    pub(crate) fn from_args(args: &StudyOptions) -> Result<Self> {
        match (&args.train_rec, args.val_bin.is_empty()) {
            (Some(_), true) => {
                bail!("--train-rec needs at least one --val-bin FILE to evaluate on")
            }
            (None, false) => bail!("--val-bin is for real data: pass --train-rec DIR as well"),
            (None, true) => Ok(Data::Synthetic),
            (Some(dir), false) => {
                if !dir.is_dir() {
                    bail!(
                        "--train-rec {}: not a folder (expected train.rec, train.idx and property inside)",
                        dir.display()
                    );
                }
                Ok(Data::Rec {
                    dir: dir.clone(),
                    val_bin: args.val_bin.clone(),
                })
            }
        }
    }

    /// The data source as it enters a run's stored config: absolute paths, so that another
    /// folder retrains.
    pub(crate) fn config_value(&self) -> Value {
        let abs = |p: &Path| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        };
        match self {
            Data::Synthetic => serde_json::json!({ "source": "synthetic" }),
            Data::Rec { dir, val_bin } => serde_json::json!({
                "source": "recordio",
                "train_rec": abs(dir),
                "val_bin": val_bin.iter().map(|p| abs(p)).collect::<Vec<_>>(),
            }),
        }
    }

    /// The evaluation sets: the held-out synthetic identities of `preset`, or the `.bin`
    /// sets, at `size` pixels.
    ///
    /// # Errors
    /// An unreadable `.bin` or a bad synthetic config.
    fn eval_sets(&self, preset: &Preset, size: u32) -> Result<Vec<EvalSet>> {
        match self {
            Data::Synthetic => {
                info!("rendering the held-out test identities");
                Ok(vec![reproduce::synthetic_eval(preset, size)?])
            }
            Data::Rec { val_bin, .. } => reproduce::bin_eval(val_bin, size),
        }
    }

    /// One line on the evaluation data, for the report.
    pub(crate) fn eval_desc(&self, preset: &Preset) -> String {
        match self {
            Data::Synthetic => format!(
                "{} held-out synthetic identities × {} images (disjoint from every training \
identity), {} pairs per subset: all, hq_hard (large pose, sharp), low_quality (blurred, noisy)",
                preset.synthetic.test_identities,
                preset.synthetic.test_images_per_identity,
                preset.synthetic.pairs_per_subset
            ),
            Data::Rec { val_bin, .. } => format!(
                "verification sets {}",
                val_bin
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// The head named `name`: a preset of `configs` contributes its paper's head as the preset
/// configures it; any other name is a registry head with its paper defaults.
///
/// # Errors
/// A name that is neither (the message lists both), or an unreadable preset.
pub(crate) fn resolve_head(name: &str, configs: &Presets) -> Result<HeadConfig> {
    match configs.head(name)? {
        Some(h) => Ok(h),
        None => bail!(
            "--head `{name}` is neither a head ({}) nor a preset ({})",
            HeadConfig::NAMES.join(", "),
            configs.names().join(", ")
        ),
    }
}

/// The base preset of a study: the base config with one method per `--head` (resolved by
/// [`resolve_head`]), `--set` overrides and then `--seed` applied, validated.
///
/// # Errors
/// An unknown or repeated head, a bad config or override (naming the key).
pub(crate) fn base_preset(args: &StudyOptions, study: Study, configs: &Presets) -> Result<Preset> {
    if args.heads.is_empty() {
        bail!("--head: name at least one head, e.g. --head arcface");
    }
    let (mut tree, base_src) = match &args.config {
        Some(path) => (
            crate::config_file::read_tree(path, 0)?,
            crate::config_file::ConfigSource::File(path.clone()),
        ),
        None => configs.tree("_base")?,
    };
    let mut heads = toml::Table::new();
    for name in &args.heads {
        let head = resolve_head(name, configs)?;
        if heads.contains_key(name) {
            bail!("--head `{name}` is named twice");
        }
        heads.insert(name.clone(), toml::Value::try_from(&head)?);
    }
    let table = tree
        .as_table_mut()
        .context("the study's base config is not a TOML table")?;
    table.insert("name".into(), format!("study-{}", study.name()).into());
    table.insert(
        "paper".into(),
        match study {
            Study::BackboneSize => "Study: backbone size (IResNet depth)",
            Study::DataDistribution => "Study: training-data distribution",
        }
        .into(),
    );
    table.insert(
        "headline".into(),
        "a study, not a paper: no published headline".into(),
    );
    table.insert(
        "methods".into(),
        toml::Value::Array(args.heads.iter().map(|n| n.clone().into()).collect()),
    );
    table.insert("heads".into(), toml::Value::Table(heads));
    let mut sets = args.sets.clone();
    if let Some(seed) = args.seed {
        sets.push(format!("seed={seed}"));
    }
    let preset: Preset = crate::config_file::finish(tree, &sets, &base_src.to_string())?;
    preset.validate()?;
    Ok(preset)
}

/// `base` reduced to one method, `head` (what one run trains).
pub(crate) fn preset_for_head(base: &Preset, head: &str) -> Preset {
    let mut p = base.clone();
    p.methods = vec![head.to_string()];
    p.heads.retain(|k, _| k == head);
    p
}

/// One run of a study: one head on one variant (a depth, a data split).
#[derive(Debug, Clone)]
pub(crate) struct Plan<S> {
    /// File stem of its result: `runs/<name>.json`, checkpoints under `runs/<name>/`.
    pub(crate) name: String,
    /// The head (method) it trains.
    pub(crate) head: String,
    /// The variant's short name (`r18`, `balanced-300x18`).
    pub(crate) variant: String,
    /// The preset it trains with (one method, the variant applied).
    pub(crate) preset: Preset,
    /// What the variant is, beyond the preset (depth, class sizes).
    pub(crate) spec: S,
    /// Everything the result depends on, as stored beside it: a finished run is reused only
    /// when this equals the stored one.
    pub(crate) config: Value,
}

impl<S: Serialize> Plan<S> {
    /// A run of `head` on `variant`: `preset` already carries the variant.
    ///
    /// # Errors
    /// The preset or spec fails to serialise.
    pub(crate) fn new(
        study: Study,
        head: &str,
        variant: &str,
        preset: Preset,
        spec: S,
        data: &Data,
    ) -> Result<Self> {
        let config = serde_json::json!({
            "study": study.name(),
            "variant": variant,
            "spec": serde_json::to_value(&spec)?,
            "data": data.config_value(),
            "preset": serde_json::to_value(&preset)?,
        });
        Ok(Self {
            name: format!("{head}-{variant}"),
            head: head.to_string(),
            variant: variant.to_string(),
            preset,
            spec,
            config,
        })
    }
}

/// `f64` fields that may be NaN or infinite: stored as `null`, read back as NaN (JSON has no
/// NaN, and a stored run must read back).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// One protocol's scores of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Score {
    /// Protocol or subset name (`all`, `hq_hard`, `low_quality`, a `.bin` set's name).
    pub(crate) subset: String,
    /// Pairs scored.
    pub(crate) pairs: usize,
    /// Impostor pairs among them (the resolution of TAR@FAR).
    pub(crate) impostors: usize,
    /// k-fold verification accuracy, mean over folds (0..1).
    #[serde(with = "nan_as_null")]
    pub(crate) accuracy_mean: f64,
    /// Population std of the fold accuracies.
    #[serde(with = "nan_as_null")]
    pub(crate) accuracy_std: f64,
    /// Folds the accuracy is over.
    pub(crate) folds: usize,
    /// `(FAR, TAR)` by the nearest-point rule.
    pub(crate) tar_at_far: Vec<(f64, f64)>,
    /// Area under the ROC.
    #[serde(with = "nan_as_null")]
    pub(crate) auc: f64,
    /// Equal error rate.
    #[serde(with = "nan_as_null")]
    pub(crate) eer: f64,
}

impl Score {
    fn from_report(subset: &str, r: &VerificationReport) -> Self {
        Self {
            subset: subset.to_string(),
            pairs: r.n_pairs,
            impostors: r.n_pairs - r.n_genuine,
            accuracy_mean: r.accuracy_mean,
            accuracy_std: r.accuracy_std,
            folds: r.accuracy_per_fold.len(),
            tar_at_far: r.tar_at_far.clone(),
            auc: r.auc,
            eer: r.eer,
        }
    }

    /// TAR at `far` (0..1), if evaluated.
    pub(crate) fn tar(&self, far: f64) -> Option<f64> {
        self.tar_at_far
            .iter()
            .find(|(f, _)| (f - far).abs() <= 1e-12 * far.abs().max(1.0))
            .map(|&(_, t)| t)
    }
}

/// What a finished run produced (stored in `runs/<name>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunResult {
    /// Wall-clock training time.
    #[serde(with = "nan_as_null")]
    pub(crate) train_seconds: f64,
    /// Training images per second (loading included).
    #[serde(with = "nan_as_null")]
    pub(crate) images_per_second: f64,
    /// Optimiser steps.
    pub(crate) steps: u64,
    /// Steps skipped for a non-finite loss or gradient.
    pub(crate) skipped_steps: u64,
    /// Mean loss of each epoch (`null`: every step of the epoch was skipped).
    pub(crate) epoch_loss: Vec<Option<f64>>,
    /// Images per step.
    pub(crate) batch_size: usize,
    /// Training images skipped because they failed to decode.
    pub(crate) skipped_images: usize,
    /// Training images and identities of the run's training set.
    pub(crate) train_images: usize,
    /// Identities (classes) of the run's training set.
    pub(crate) train_identities: usize,
    /// One entry per evaluation protocol, in evaluation order.
    pub(crate) protocols: Vec<Score>,
}

/// A finished run as stored on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredRun {
    /// The run's name.
    pub(crate) name: String,
    /// The config it was trained with ([`Plan::config`]).
    pub(crate) config: Value,
    /// Its result.
    pub(crate) result: RunResult,
}

/// What the output folder holds for a planned run.
#[derive(Debug)]
pub(crate) enum Stored {
    /// No result file.
    Missing,
    /// A result trained with exactly this config: reused.
    Finished(RunResult),
    /// A result of another config (another seed, budget, head setting...): retrained.
    Changed,
    /// A result file that does not parse: retrained.
    Unreadable(String),
}

/// Look up the stored result of a run at `path` and compare its config with `config`.
pub(crate) fn stored_run(path: &Path, config: &Value) -> Stored {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Stored::Missing,
        Err(e) => return Stored::Unreadable(e.to_string()),
    };
    match serde_json::from_str::<StoredRun>(&text) {
        Ok(s) if &s.config == config => Stored::Finished(s.result),
        Ok(_) => Stored::Changed,
        Err(e) => Stored::Unreadable(e.to_string()),
    }
}

/// Provides each run's training set (built on demand, shared where runs share data).
pub(crate) trait TrainingData<S> {
    /// The training set of `plan` and a one-line description of it.
    ///
    /// # Errors
    /// Unreadable or insufficient data.
    fn train_set(&mut self, plan: &Plan<S>) -> Result<(Arc<dyn FaceDataset>, String)>;
}

/// A planned run with its result.
#[derive(Debug)]
pub(crate) struct Outcome<S> {
    /// The run.
    pub(crate) plan: Plan<S>,
    /// What it produced.
    pub(crate) result: RunResult,
    /// `true` when the result was reused from an earlier invocation.
    pub(crate) reused: bool,
}

/// What every study shares: where it writes, what it evaluates on, the base preset.
pub(crate) struct Context {
    /// The study.
    pub(crate) study: Study,
    /// The base preset (every head).
    pub(crate) base: Preset,
    /// The data source.
    pub(crate) data: Data,
    /// The output folder.
    pub(crate) out: PathBuf,
    /// Retrain finished runs.
    pub(crate) fresh: bool,
    /// Input side of the backbone, in pixels.
    pub(crate) size: u32,
    /// The base config file, for the report.
    pub(crate) base_path: PathBuf,
    /// The `--set` overrides (and `--seed`), for the report.
    pub(crate) sets: Vec<String>,
    /// When the command started.
    pub(crate) started: Instant,
}

impl Context {
    /// Train every plan that has no matching stored result (in order), reuse the others.
    ///
    /// # Errors
    /// A training or evaluation failure, or an unwritable output folder.
    pub(crate) fn execute<S: Serialize + Clone>(
        &self,
        plans: Vec<Plan<S>>,
        data: &mut dyn TrainingData<S>,
    ) -> Result<Vec<Outcome<S>>> {
        let runs = self.out.join("runs");
        std::fs::create_dir_all(&runs).with_context(|| format!("creating {}", runs.display()))?;
        #[cfg(feature = "cuda")]
        let device = Device::cuda_if_available(0)?;
        #[cfg(not(feature = "cuda"))]
        let device = Device::Cpu;
        let mut sets: Option<Vec<EvalSet>> = None;
        let mut out = Vec::with_capacity(plans.len());
        let total = plans.len();
        for (k, plan) in plans.into_iter().enumerate() {
            let path = runs.join(format!("{}.json", plan.name));
            if !self.fresh {
                match stored_run(&path, &plan.config) {
                    Stored::Finished(result) => {
                        info!(run = %plan.name, "finished earlier with this config: reused");
                        out.push(Outcome {
                            plan,
                            result,
                            reused: true,
                        });
                        continue;
                    }
                    Stored::Changed => info!(
                        run = %plan.name,
                        "stored result has another config (seed, settings or data): retraining"
                    ),
                    Stored::Unreadable(e) => warn!(
                        run = %plan.name,
                        error = %e,
                        "stored result unreadable: retraining"
                    ),
                    Stored::Missing => {}
                }
            }
            info!(run = %plan.name, "run {} of {total}", k + 1);
            if sets.is_none() {
                sets = Some(self.data.eval_sets(&self.base, self.size)?);
            }
            let sets = sets.as_deref().expect("built above");
            let (train_set, desc) = data.train_set(&plan)?;
            let run_dir = runs.join(&plan.name);
            fr_train::check_output_dir(&run_dir.join("checkpoints"))?;
            let (m, _vars) = reproduce::run_method_with(
                &plan.preset,
                &plan.head,
                train_set.clone(),
                sets,
                None,
                &device,
                self.size,
                &run_dir,
                None,
                &run_dir.join("render_grid.png"),
                &desc,
                reproduce::MethodExtras::default(),
            )
            .with_context(|| format!("study run {}", plan.name))?;
            let result = RunResult {
                train_seconds: m.train_seconds,
                images_per_second: m.images_per_second,
                steps: m.steps,
                skipped_steps: m.skipped_steps,
                epoch_loss: m
                    .epoch_loss
                    .iter()
                    .map(|&l| l.is_finite().then_some(l))
                    .collect(),
                batch_size: m.batch_size,
                skipped_images: m.skipped_images,
                train_images: train_set.len(),
                train_identities: train_set.num_classes(),
                protocols: m
                    .protocols
                    .iter()
                    .map(|(n, r)| Score::from_report(n, r))
                    .collect(),
            };
            report::write_json(
                &path,
                &StoredRun {
                    name: plan.name.clone(),
                    config: plan.config.clone(),
                    result: result.clone(),
                },
            )?;
            out.push(Outcome {
                plan,
                result,
                reused: false,
            });
        }
        Ok(out)
    }

    /// The report's common paragraphs: what every run shares, the columns, the resume note.
    pub(crate) fn shared_text<S>(&self, outcomes: &[Outcome<S>], data_desc: &str) -> String {
        let p = &self.base;
        let reused: Vec<&str> = outcomes
            .iter()
            .filter(|o| o.reused)
            .map(|o| o.plan.name.as_str())
            .collect();
        let heads: Vec<String> = p
            .methods
            .iter()
            .map(|m| format!("`{m}` ({})", p.heads[m].name()))
            .collect();
        let folds = outcomes
            .iter()
            .flat_map(|o| o.result.protocols.iter().map(|s| s.folds))
            .min()
            .unwrap_or(0);
        let impostors = outcomes
            .iter()
            .flat_map(|o| o.result.protocols.iter().map(|s| s.impostors))
            .min()
            .unwrap_or(0);
        let mut s = format!(
            "Heads: {}. Base config `{}`{}; seed {}; epochs {}, batch {}, input {}×{} px. Training \
data: {data_desc}. Evaluation: {}.\n\n\
Accuracy: insightface {}-fold verification (mean over folds; sets under {} pairs per fold are \
scored as one fold). TAR@FAR: ROC over the same pairs, nearest point (eval_ijbc.py rule); with {} \
impostor pairs, FARs below {:.1e} are not resolved (the value is the TAR at zero false accepts). \
Every run goes through the training loop and \
evaluation of `cargo xtask reproduce`, so its numbers compare with a reproduction on the same base \
config.",
            heads.join(", "),
            self.base_path.display(),
            if self.sets.is_empty() {
                String::new()
            } else {
                format!(" with `--set {}`", self.sets.join(" --set "))
            },
            p.seed,
            p.train.epochs,
            p.train.batch_size,
            self.size,
            self.size,
            self.data.eval_desc(p),
            folds.max(1),
            reproduce::MIN_PAIRS_PER_FOLD,
            impostors,
            1.0 / impostors.max(1) as f64,
        );
        s += &format!(
            "\n\nEach run's result is in `runs/<run>.json` with the config it was trained with; \
a rerun reuses a run whose stored config (seed included) equals the current one and retrains \
the others (`--fresh` retrains all). {}Wall time of this invocation: {:.0} s.",
            if reused.is_empty() {
                String::new()
            } else {
                format!(
                    "Reused from an earlier invocation: {}. ",
                    reused
                        .iter()
                        .map(|r| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            self.started.elapsed().as_secs_f64()
        );
        s
    }

    /// The full results table (every run × protocol) in `reproduce`'s format, and its rows.
    pub(crate) fn full_table<S>(&self, outcomes: &[Outcome<S>]) -> (String, Vec<Row>) {
        let rows: Vec<Row> = outcomes
            .iter()
            .flat_map(|o| {
                o.result.protocols.iter().map(|s| Row {
                    method: o.plan.name.clone(),
                    subset: s.subset.clone(),
                    pairs: s.pairs,
                    accuracy_mean: s.accuracy_mean,
                    accuracy_std: s.accuracy_std,
                    folds: s.folds,
                    tar_at_far: s.tar_at_far.clone(),
                    auc: s.auc,
                    eer: s.eer,
                    train_seconds: Some(o.result.train_seconds),
                    images_per_second: Some(o.result.images_per_second),
                })
            })
            .collect();
        (report::markdown_table(&rows, &self.base.eval.far), rows)
    }

    /// Protocol names in evaluation order (from the first run).
    pub(crate) fn protocols<S>(outcomes: &[Outcome<S>]) -> Vec<String> {
        outcomes
            .first()
            .map(|o| {
                o.result
                    .protocols
                    .iter()
                    .map(|s| s.subset.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Write `report.md` and `metrics.json` and print the summary table.
    ///
    /// # Errors
    /// An unwritable output folder.
    pub(crate) fn write_outputs<M: Serialize>(
        &self,
        md: &str,
        metrics: &M,
        summary: &str,
    ) -> Result<Written> {
        report::write_atomic(&self.out.join("report.md"), md.as_bytes())?;
        report::write_json(&self.out.join("metrics.json"), metrics)?;
        Ok(Written {
            table: summary.to_string(),
            out_dir: self.out.clone(),
            files: format!("report.md, metrics.json, {}.png, runs/", self.study.name()),
            seconds: self.started.elapsed().as_secs_f64(),
        })
    }
}

/// Accuracy of `o` on protocol `name` in %, formatted, or `–`.
pub(crate) fn accuracy_cell<S>(o: &Outcome<S>, name: &str) -> String {
    o.result
        .protocols
        .iter()
        .find(|s| s.subset == name)
        .map(|s| format!("{:.2}", 100.0 * s.accuracy_mean))
        .unwrap_or_else(|| "–".into())
}

/// TAR at `far` on the first protocol in %, formatted, or `–`.
pub(crate) fn tar_cell<S>(o: &Outcome<S>, far: f64) -> String {
    o.result
        .protocols
        .first()
        .and_then(|s| s.tar(far))
        .map(|t| format!("{:.2}", 100.0 * t))
        .unwrap_or_else(|| "–".into())
}

/// What a plot panel shows, read from each run's result.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Metric {
    /// Verification accuracy on a protocol (with its std over folds as the error bar).
    Accuracy(String),
    /// TAR at a FAR on a protocol.
    Tar(String, f64),
}

impl Metric {
    /// The panels of a study's plot: accuracy on every protocol, then TAR at the first FAR on
    /// the first protocol.
    pub(crate) fn panels(protocols: &[String], fars: &[f64]) -> Vec<Metric> {
        let mut m: Vec<Metric> = protocols.iter().cloned().map(Metric::Accuracy).collect();
        if let (Some(p), Some(&far)) = (protocols.first(), fars.first()) {
            m.push(Metric::Tar(p.clone(), far));
        }
        m
    }

    /// Panel caption.
    pub(crate) fn title(&self) -> String {
        match self {
            Metric::Accuracy(p) => format!("accuracy on {p}"),
            Metric::Tar(p, far) => format!("TAR@FAR={far:.0e} on {p}"),
        }
    }

    /// The y axis' description.
    pub(crate) fn y_desc(&self) -> String {
        match self {
            Metric::Accuracy(_) => "accuracy (%)".into(),
            Metric::Tar(..) => "TAR (%)".into(),
        }
    }

    /// `(value, error bar)` in % for `r`, if it has the protocol.
    pub(crate) fn value(&self, r: &RunResult) -> Option<(f64, f64)> {
        match self {
            Metric::Accuracy(p) => {
                let s = r.protocols.iter().find(|s| &s.subset == p)?;
                Some((100.0 * s.accuracy_mean, 100.0 * s.accuracy_std))
            }
            Metric::Tar(p, far) => {
                let s = r.protocols.iter().find(|s| &s.subset == p)?;
                Some((100.0 * s.tar(*far)?, 0.0))
            }
        }
    }
}

/// One line of a panel.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    /// Legend entry.
    pub(crate) label: String,
    /// Palette index of its colour.
    pub(crate) colour: usize,
    /// Dashed instead of solid.
    pub(crate) dashed: bool,
    /// The points, in x order.
    pub(crate) points: Vec<Point>,
}

/// One point of a [`Series`].
#[derive(Debug, Clone)]
pub(crate) struct Point {
    /// Position.
    pub(crate) x: f64,
    /// Value.
    pub(crate) y: f64,
    /// Half-height of the error bar drawn through it (0: none).
    pub(crate) err: f64,
    /// Text drawn next to it.
    pub(crate) label: Option<String>,
}

/// One chart of a figure.
#[derive(Debug, Clone)]
pub(crate) struct Panel {
    /// Caption.
    pub(crate) title: String,
    /// The y axis' description.
    pub(crate) y_desc: String,
    /// Its lines.
    pub(crate) series: Vec<Series>,
}

/// `(lo, hi)` padded by `pad` (a factor when `log`, else an offset) and never empty.
fn padded_range(values: impl Iterator<Item = f64>, pad: f64, log: bool) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if !lo.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / pad, hi * pad)
    } else {
        (lo - pad, hi + pad)
    }
}

/// Width of the legend column at the right of a figure, in pixels.
const LEGEND_WIDTH: u32 = 230;

/// Draw `panels` side by side (four per row) into one PNG with one legend (the first panel's
/// series) in a column at the right: x on a log scale shared by every panel, y linear per
/// panel (padded around its data), error bars where a point has one. The series of a panel are
/// dodged by a few per cent along x so that points at the same x stay apart.
///
/// # Errors
/// Drawing or writing the file fails.
pub(crate) fn plot_panels(path: &Path, title: &str, x_desc: &str, panels: &[Panel]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| crate::err!("plotting {}: {e}", path.display());
    crate::report::register_font();
    let cols = panels.len().clamp(1, 4);
    let rows = panels.len().div_ceil(cols).max(1);
    let charts_width = 560 * cols as u32;
    let root = BitMapBackend::new(path, (charts_width + LEGEND_WIDTH, 460 * rows as u32 + 50))
        .into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let body = root
        .titled(title, ("sans-serif", 24))
        .map_err(|e| err(&e))?;
    let (charts, legend) = body.split_horizontally(charts_width);
    // Series k of n sits at x · DODGE^(k − (n−1)/2).
    const DODGE: f64 = 1.035;
    let dodge = |k: usize, n: usize| DODGE.powf(k as f64 - (n as f64 - 1.0) / 2.0);
    let all = || {
        panels
            .iter()
            .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter()))
    };
    let n_max = panels.iter().map(|p| p.series.len()).max().unwrap_or(1);
    let (x_lo, x_hi) = padded_range(all().map(|p| p.x), 1.25 * dodge(n_max, n_max), true);
    for (panel, area) in panels.iter().zip(charts.split_evenly((rows, cols))) {
        let (y_lo, y_hi) = padded_range(
            panel
                .series
                .iter()
                .flat_map(|s| s.points.iter())
                .flat_map(|p| [p.y - p.err, p.y + p.err]),
            1.0,
            false,
        );
        let mut chart = ChartBuilder::on(&area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(52)
            .build_cartesian_2d((x_lo..x_hi).log_scale(), y_lo.max(0.0)..y_hi)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(panel.y_desc.as_str())
            .x_label_formatter(&|v| format!("{v:.0}"))
            // Log-scale labels: 10, 20, 30 within a decade, powers of ten beyond.
            .x_labels(if x_hi / x_lo < 30.0 { 10 } else { 6 })
            .max_light_lines(2)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
        let n = panel.series.len();
        for (k, s) in panel.series.iter().enumerate() {
            let colour = Palette99::pick(s.colour).to_rgba();
            let style = colour.stroke_width(2);
            let f = dodge(k, n);
            let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (p.x * f, p.y)).collect();
            if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts, 8, 6, style))
                    .map_err(|e| err(&e))?;
            } else {
                chart
                    .draw_series(LineSeries::new(pts, style))
                    .map_err(|e| err(&e))?;
            }
            chart
                .draw_series(s.points.iter().filter(|p| p.err > 0.0).map(|p| {
                    PathElement::new(vec![(p.x * f, p.y - p.err), (p.x * f, p.y + p.err)], style)
                }))
                .map_err(|e| err(&e))?;
            let marker = marker_style(colour, s.dashed);
            chart
                .draw_series(s.points.iter().map(|p| {
                    EmptyElement::at((p.x * f, p.y))
                        + Circle::new((0, 0), 4, marker)
                        + Text::new(
                            p.label.clone().unwrap_or_default(),
                            (6, -16),
                            ("sans-serif", 13),
                        )
                }))
                .map_err(|e| err(&e))?;
        }
    }
    // The legend: a line sample (two segments, joined when solid), the marker and the label.
    for (k, s) in panels
        .first()
        .map_or(&[][..], |p| &p.series)
        .iter()
        .enumerate()
    {
        let colour = Palette99::pick(s.colour).to_rgba();
        let style = colour.stroke_width(2);
        let y = 60 + 24 * k as i32;
        let gap = if s.dashed { 14 } else { 10 };
        let sample = EmptyElement::at((12, y))
            + PathElement::new(vec![(0, 0), (10, 0)], style)
            + PathElement::new(vec![(gap, 0), (26, 0)], style)
            + Circle::new((13, 0), 4, marker_style(colour, s.dashed))
            + Text::new(s.label.clone(), (34, -8), ("sans-serif", 15));
        legend.draw(&sample).map_err(|e| err(&e))?;
    }
    root.present()
        .map_err(|e| crate::err!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// Filled markers on solid lines, hollow ones on dashed lines.
fn marker_style(colour: RGBAColor, dashed: bool) -> ShapeStyle {
    if dashed {
        colour.stroke_width(2)
    } else {
        colour.filled()
    }
}

/// Checks that the flags of one study are not given to the other.
fn check_flags(args: &StudyOptions, study: Study) -> Result<()> {
    let foreign: Vec<&str> = match study {
        Study::BackboneSize => [
            (args.budget.is_some(), "--budget"),
            (!args.identities.is_empty(), "--identities"),
            (args.zipf.is_some(), "--zipf"),
        ]
        .into_iter()
        .filter_map(|(given, f)| given.then_some(f))
        .collect(),
        Study::DataDistribution => [(!args.depths.is_empty(), "--depths")]
            .into_iter()
            .filter_map(|(given, f)| given.then_some(f))
            .collect(),
    };
    if !foreign.is_empty() {
        let other = Study::ALL
            .into_iter()
            .find(|s| *s != study)
            .expect("two studies");
        bail!(
            "{} {} for `study {}`, not `study {}`",
            foreign.join(", "),
            if foreign.len() == 1 { "is" } else { "are" },
            other.name(),
            study.name()
        );
    }
    let mut seen = BTreeSet::new();
    for h in &args.heads {
        if !h
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || h.is_empty()
        {
            bail!("--head `{h}`: a head or preset name (letters, digits, `-`, `_`)");
        }
        if !seen.insert(h) {
            bail!("--head `{h}` is named twice");
        }
    }
    Ok(())
}

/// Entry point of `cargo xtask study`.
///
/// # Errors
/// An unknown study or head, a bad config (naming the key), unreadable data, or a training
/// failure.
pub fn run(args: &StudyOptions, root: &Path) -> Result<Written> {
    let started = Instant::now();
    let study = Study::parse(args.study.as_deref())?;
    check_flags(args, study)?;
    let configs = Presets::with_dir(root.join("configs"));
    let base = base_preset(args, study, &configs)?;
    let data = Data::from_args(args)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target").join("study").join(study.name()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut sets = args.sets.clone();
    if let Some(seed) = args.seed {
        sets.push(format!("seed={seed}"));
    }
    let ctx = Context {
        study,
        size: base.backbone.input_shape().0 as u32,
        base_path: args
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("configs/_base.toml")),
        base,
        data,
        out,
        fresh: args.fresh,
        sets,
        started,
    };
    match study {
        Study::BackboneSize => backbone::run(&ctx, args),
        Study::DataDistribution => distribution::run(&ctx, args),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    /// The options `fr study ARGV...` gives (the flags these tests use; `fr-cli` tests the
    /// real parser against the same defaults).
    pub(super) fn parse(argv: &[&str]) -> StudyOptions {
        let mut o = StudyOptions::default();
        let (mut heads, mut it) = (Vec::new(), argv.iter());
        let list = |v: &str| -> Vec<String> { v.split(',').map(str::to_string).collect() };
        while let Some(&a) = it.next() {
            if !a.starts_with("--") {
                o.study = Some(a.to_string());
                continue;
            }
            let v = *it.next().expect("a value after the flag");
            match a {
                "--head" => heads.extend(list(v)),
                "--seed" => o.seed = Some(v.parse().unwrap()),
                "--set" => o.sets.push(v.to_string()),
                "--depths" => o.depths = list(v).iter().map(|d| d.parse().unwrap()).collect(),
                "--identities" => {
                    o.identities = list(v).iter().map(|d| d.parse().unwrap()).collect()
                }
                "--budget" => o.budget = Some(v.parse().unwrap()),
                "--zipf" => o.zipf = Some(v.parse().unwrap()),
                "--val-bin" => o.val_bin.push(v.into()),
                other => panic!("flag {other} not known to this test helper"),
            }
        }
        if !heads.is_empty() {
            o.heads = heads;
        }
        o
    }

    fn err(argv: &[&str]) -> String {
        let args = parse(argv);
        format!("{:#}", run(&args, &crate::workspace_root()).unwrap_err())
    }

    #[test]
    fn unknown_or_missing_study_lists_the_studies() {
        let e = err(&["resnet-size"]);
        assert!(
            e.contains("resnet-size")
                && e.contains("backbone-size")
                && e.contains("data-distribution"),
            "{e}"
        );
        let e = err(&[]);
        assert!(e.contains("backbone-size"), "{e}");
    }

    #[test]
    fn unknown_head_names_heads_and_presets() {
        let e = err(&["backbone-size", "--head", "arcfcae"]);
        assert!(
            e.contains("arcfcae") && e.contains("cosface") && e.contains("lh2face"),
            "{e}"
        );
        let e = err(&["data-distribution", "--head", "arcface,arcface"]);
        assert!(e.contains("named twice"), "{e}");
        let e = err(&["data-distribution", "--head", "../x"]);
        assert!(e.contains("../x"), "{e}");
    }

    #[test]
    fn flags_of_the_other_study_are_rejected() {
        let e = err(&["backbone-size", "--zipf", "1.5"]);
        assert!(
            e.contains("--zipf") && e.contains("data-distribution"),
            "{e}"
        );
        let e = err(&["data-distribution", "--depths", "18,50"]);
        assert!(e.contains("--depths") && e.contains("backbone-size"), "{e}");
        let e = err(&["backbone-size", "--val-bin", "x.bin"]);
        assert!(e.contains("--train-rec"), "{e}");
        let e = err(&["backbone-size", "--set", "train.epoks=3"]);
        assert!(e.contains("epoks"), "{e}");
    }

    #[test]
    fn heads_resolve_from_the_registry_and_from_presets() {
        let args = parse(&[
            "backbone-size",
            "--head",
            "cosface,adaface",
            "--head",
            "curricularface",
            "--seed",
            "7",
            "--set",
            "train.epochs=2",
        ]);
        assert_eq!(args.heads, ["cosface", "adaface", "curricularface"]);
        let configs = Presets::with_dir(crate::workspace_root().join("configs"));
        let p = base_preset(&args, Study::BackboneSize, &configs).unwrap();
        assert_eq!(p.methods, ["cosface", "adaface", "curricularface"]);
        assert_eq!((p.seed, p.train.epochs), (7, 2));
        assert_eq!(p.heads["adaface"].name(), "adaface");
        // A preset name contributes the preset's tuned head.
        let preset: Preset = configs.load("curricularface", &[]).unwrap();
        assert_eq!(
            p.heads["curricularface"],
            preset.heads[&preset.methods[0]].clone()
        );
        let one = preset_for_head(&p, "adaface");
        assert_eq!(one.methods, ["adaface"]);
        assert_eq!(one.heads.len(), 1);
        assert_eq!(parse(&["backbone-size"]).heads, ["arcface"]);
    }

    fn result(acc: f64) -> RunResult {
        RunResult {
            train_seconds: 1.0,
            images_per_second: f64::NAN,
            steps: 3,
            skipped_steps: 0,
            epoch_loss: vec![Some(2.0), None],
            batch_size: 4,
            skipped_images: 0,
            train_images: 12,
            train_identities: 3,
            protocols: vec![Score {
                subset: "all".into(),
                pairs: 20,
                impostors: 10,
                accuracy_mean: acc,
                accuracy_std: 0.0,
                folds: 1,
                tar_at_far: vec![(1e-3, 0.5)],
                auc: 0.9,
                eer: 0.1,
            }],
        }
    }

    /// A stored run is reused only when its config equals the planned one; a changed seed or
    /// a damaged file retrains.
    #[test]
    fn resume_reuses_only_matching_configs() {
        let dir = std::env::temp_dir().join(format!("fr-study-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("arcface-r18.json");
        let configs = Presets::with_dir(crate::workspace_root().join("configs"));
        let args = parse(&["backbone-size"]);
        let base = base_preset(&args, Study::BackboneSize, &configs).unwrap();
        let plan = |seed: u64| {
            let mut p = preset_for_head(&base, "arcface");
            p.seed = seed;
            Plan::new(
                Study::BackboneSize,
                "arcface",
                "r18",
                p,
                [2usize, 2, 2, 2],
                &Data::Synthetic,
            )
            .unwrap()
        };
        let a = plan(42);
        assert_eq!(a.name, "arcface-r18");
        assert!(matches!(stored_run(&path, &a.config), Stored::Missing));
        report::write_json(
            &path,
            &StoredRun {
                name: a.name.clone(),
                config: a.config.clone(),
                result: result(0.75),
            },
        )
        .unwrap();
        match stored_run(&path, &plan(42).config) {
            Stored::Finished(r) => {
                assert_eq!(r.protocols[0].accuracy_mean, 0.75);
                assert!(r.images_per_second.is_nan());
                assert_eq!(r.epoch_loss, [Some(2.0), None]);
                assert_eq!(r.protocols[0].tar(1e-3), Some(0.5));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            stored_run(&path, &plan(43).config),
            Stored::Changed
        ));
        // Another data source or variant spec changes the config too.
        let mut p = preset_for_head(&base, "arcface");
        p.seed = 42;
        let other = Plan::new(
            Study::BackboneSize,
            "arcface",
            "r18",
            p,
            [2usize, 2, 2, 3],
            &Data::Synthetic,
        )
        .unwrap();
        assert!(matches!(stored_run(&path, &other.config), Stored::Changed));
        std::fs::write(&path, "{ not json").unwrap();
        assert!(matches!(
            stored_run(&path, &a.config),
            Stored::Unreadable(_)
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn plot_panels_writes_a_png() {
        let path = std::env::temp_dir().join(format!("fr-study-plot-{}.png", std::process::id()));
        let series = |dashed| Series {
            label: "arcface".into(),
            colour: 0,
            dashed,
            points: vec![
                Point {
                    x: 10.0,
                    y: 50.0,
                    err: 1.0,
                    label: Some("r18".into()),
                },
                Point {
                    x: 30.0,
                    y: 60.0,
                    err: 0.0,
                    label: None,
                },
            ],
        };
        let panels = vec![
            Panel {
                title: "all".into(),
                y_desc: "accuracy (%)".into(),
                series: vec![series(false), series(true)],
            },
            Panel {
                title: "one point".into(),
                y_desc: "TAR (%)".into(),
                series: vec![Series {
                    points: vec![Point {
                        x: 5.0,
                        y: 70.0,
                        err: 0.5,
                        label: None,
                    }],
                    ..series(false)
                }],
            },
        ];
        plot_panels(&path, "test", "x", &panels).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!(
            (img.width(), img.height()),
            (2 * 560 + LEGEND_WIDTH, 460 + 50)
        );
        std::fs::remove_file(&path).ok();
    }
}
