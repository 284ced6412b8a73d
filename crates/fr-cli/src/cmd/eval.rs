//! `fr eval --config <preset> --checkpoint <run | weights | hf://...>`: a checkpoint on
//! `.bin` sets, a pairs folder, IJB-B/C and uniform accuracy ([`fr_run::evaluate`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use fr_data::ijb::IjbSubset;
use fr_run::evaluate::EvalOptions;

/// Command-line options of `eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// The preset the checkpoint was trained with (`configs/<preset>.toml`, or just the preset
    /// name): the backbone and evaluation settings come from it.
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value: `--set backbone.input_size=112` (repeatable; TOML value).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// A run directory (`latest` + `step-N/`), one step directory, a reproduce output folder
    /// (with `--method`), a weights file (`.safetensors`, `.pth`), or a Hugging Face Hub
    /// repository `hf://owner/name[@revision][/file]`. A model card (`config.json`) beside the
    /// weights sets the backbone (then `--set backbone.*` edits it), input size and colour order.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Hub checkpoints: the local Hub cache only, never the network (also `HF_HUB_OFFLINE=1`).
    #[arg(long)]
    pub offline: bool,
    /// Hub cache folder (default: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`).
    #[arg(long, value_name = "DIR")]
    pub hub_cache: Option<PathBuf>,
    /// The method (sub-folder of the run's `checkpoints/`) to evaluate; also the label in the
    /// report (default: the checkpoint's folder or file name).
    #[arg(long)]
    pub method: Option<String>,
    /// Verification sets (insightface `.bin`).
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub bin: Vec<PathBuf>,
    /// An IJB release folder (holding `loose_crop/` and `meta/`).
    #[arg(long, value_name = "DIR")]
    pub ijb: Option<PathBuf>,
    /// Which IJB: `B` or `C`.
    #[arg(long, default_value = "C", value_parser = parse_subset)]
    pub ijb_subset: IjbSubset,
    /// An image folder the pairs file's paths are relative to (aligned crops).
    #[arg(long, value_name = "DIR", requires = "pairs")]
    pub pairs_folder: Option<PathBuf>,
    /// Pairs file: `path1 path2 label` lines (label 1 same, 0 different), or LFW's
    /// `pairs.txt` (`name i j` / `name1 i name2 j`, images `name/name_000i.jpg`).
    #[arg(long, value_name = "FILE", requires = "pairs_folder")]
    pub pairs: Option<PathBuf>,
    /// A labelled image folder (training identities as sub-folders) for the uniform
    /// classification accuracy against the checkpoint's class centres.
    #[arg(long, value_name = "DIR")]
    pub labelled: Option<PathBuf>,
    /// Add QMagFace quality-aware rows (published ω).
    #[arg(long)]
    pub qmagface: bool,
    /// Output folder (default `target/eval/<label>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Embedding cache folder (default `target/eval/cache`).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Images per forward pass (default: the preset's `eval.batch_size`).
    #[arg(long)]
    pub batch_size: Option<usize>,
}

fn parse_subset(s: &str) -> std::result::Result<IjbSubset, String> {
    match s.to_ascii_uppercase().as_str() {
        "B" | "IJBB" | "IJB-B" => Ok(IjbSubset::B),
        "C" | "IJBC" | "IJB-C" => Ok(IjbSubset::C),
        _ => Err(format!("expected B or C, got {s:?}")),
    }
}

impl From<EvalArgs> for EvalOptions {
    fn from(a: EvalArgs) -> Self {
        Self {
            config: a.config,
            sets: a.sets,
            checkpoint: a.checkpoint,
            offline: a.offline,
            hub_cache: a.hub_cache,
            method: a.method,
            bin: a.bin,
            ijb: a.ijb,
            ijb_subset: a.ijb_subset,
            pairs_folder: a.pairs_folder,
            pairs: a.pairs,
            labelled: a.labelled,
            qmagface: a.qmagface,
            out: a.out,
            cache: a.cache,
            batch_size: a.batch_size,
        }
    }
}
/// Evaluates and prints the report.
///
/// # Errors
/// A bad config or checkpoint, unreadable or malformed data (naming the file and line).
pub fn run(args: EvalArgs, root: &Path) -> Result<()> {
    println!("{}", fr_run::evaluate::run(&args.into(), root)?.written);
    Ok(())
}
