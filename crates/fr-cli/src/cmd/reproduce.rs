//! `fr reproduce <paper>`: train a preset's methods, evaluate them side by side, write the
//! report ([`fr_run::reproduce`]); `fr reproduce --list`; `fr reproduce compare HEAD...`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use fr_run::reproduce::{list_table, ReproduceOptions};
use fr_run::Presets;

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

impl From<ReproduceArgs> for ReproduceOptions {
    fn from(a: ReproduceArgs) -> Self {
        Self {
            paper: a.paper,
            names: a.names,
            config: a.config,
            sets: a.sets,
            train_rec: a.train_rec,
            val_bin: a.val_bin,
            out: a.out,
        }
    }
}
/// Lists the presets, or reproduces one and prints its results table.
///
/// # Errors
/// A bad preset or override (naming the key), unreadable data, a failed run.
pub fn run(args: ReproduceArgs, root: &Path) -> Result<()> {
    if args.list {
        print!("{}", list_table(&Presets::with_dir(root.join("configs")))?);
        return Ok(());
    }
    println!("{}", fr_run::reproduce::run(&args.into(), root)?);
    Ok(())
}
