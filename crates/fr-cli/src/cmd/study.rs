//! `fr study backbone-size | data-distribution`: the survey's studies on IResNet depth and on
//! the training data's identities × images and long tail ([`fr_run::study`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use fr_run::study::StudyOptions;

/// Command-line options of `study`.
#[derive(Debug, Clone, clap::Args)]
pub struct StudyArgs {
    /// The study: `backbone-size` or `data-distribution`.
    pub study: Option<String>,
    /// Heads to train: registry head names or preset names (a preset contributes its paper's
    /// head with the preset's settings); repeat the flag or separate names with commas. Every
    /// variant of the study is trained once per head.
    #[arg(
        long = "head",
        value_name = "NAME",
        value_delimiter = ',',
        default_value = "arcface"
    )]
    pub heads: Vec<String>,
    /// Base config (default `configs/_base.toml`): backbone, budget, data and evaluation.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a base config value: `--set train.epochs=3` (repeatable; value parsed as TOML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Seed of initialisation, data order, augmentation, evaluation pairs and .rec subsampling
    /// (the config's `seed`; the synthetic identities' pixels follow
    /// `synthetic.train.seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output folder (default `target/study/<study>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Retrain every run, ignoring finished runs stored in the output folder.
    #[arg(long)]
    pub fresh: bool,
    /// Train on an insightface RecordIO folder (train.rec, train.idx, property) instead of the
    /// synthetic identities (`data-distribution` subsamples it by identity).
    #[arg(long, value_name = "DIR")]
    pub train_rec: Option<PathBuf>,
    /// Verification sets (.bin) to evaluate on; required with --train-rec.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub val_bin: Vec<PathBuf>,
    /// `backbone-size`: IResNet depths to train (18, 34, 50, 100, 200; default 18,34,50).
    #[arg(long, value_name = "N", value_delimiter = ',')]
    pub depths: Vec<u32>,
    /// `data-distribution`: training images of every split (default: the base config's
    /// synthetic training set, identities × images per identity).
    #[arg(long, value_name = "IMAGES")]
    pub budget: Option<usize>,
    /// `data-distribution`: identity counts; each gets a balanced and a long-tailed split
    /// (default: 3n, n and n/3 for the base config's n training identities).
    #[arg(long, value_name = "N", value_delimiter = ',')]
    pub identities: Vec<usize>,
    /// `data-distribution`: exponent `a` of the long-tailed class sizes, size ∝ 1/rank^a
    /// (default 1, Zipf's law).
    #[arg(long, value_name = "A")]
    pub zipf: Option<f64>,
}

impl From<StudyArgs> for StudyOptions {
    fn from(a: StudyArgs) -> Self {
        Self {
            study: a.study,
            heads: a.heads,
            config: a.config,
            sets: a.sets,
            seed: a.seed,
            out: a.out,
            fresh: a.fresh,
            train_rec: a.train_rec,
            val_bin: a.val_bin,
            depths: a.depths,
            budget: a.budget,
            identities: a.identities,
            zipf: a.zipf,
        }
    }
}
/// Runs (or resumes) the study and prints its summary table.
///
/// # Errors
/// An unknown study or head, a flag of the other study, a failed run.
pub fn run(args: StudyArgs, root: &Path) -> Result<()> {
    println!("{}", fr_run::study::run(&args.into(), root)?);
    Ok(())
}
