//! `fr weights convert | info`: PyTorch checkpoints to safetensors under insightface's names;
//! what a weights file, checkpoint folder or Hub repository holds ([`fr_run::weights`]).

use std::path::PathBuf;

use anyhow::Result;
use fr_run::weights::{convert, info, ConvertOptions, WeightsInfoOptions};

/// Command-line options of `weights`.
#[derive(Debug, clap::Args)]
pub struct WeightsArgs {
    #[command(subcommand)]
    command: WeightsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum WeightsCommand {
    /// Convert a PyTorch checkpoint (or safetensors file) to safetensors under insightface's
    /// names.
    Convert(ConvertArgs),
    /// Describe a weights file, a checkpoint folder or a Hub repository (hf://owner/name).
    Info(InfoArgs),
}

/// Options of `weights convert`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvertArgs {
    /// The input: `.pth` / `.pt` / `.bin` / `.ckpt` (PyTorch zip checkpoint) or `.safetensors`.
    pub input: PathBuf,
    /// The output `.safetensors` file.
    pub output: PathBuf,
    /// Keep the keys as they are (no prefix stripping or renaming).
    #[arg(long)]
    pub keep_names: bool,
    /// Also write a model card (`config.json`) beside the output, for this input size in
    /// pixels (the weights do not record it: 112 for insightface's models).
    #[arg(long, value_name = "PIXELS")]
    pub input_size: Option<usize>,
    /// With `--input-size`: the model takes BGR input (AdaFace and CVLface IR models).
    #[arg(long, requires = "input_size")]
    pub bgr: bool,
}

/// Options of `weights info`.
#[derive(Debug, Clone, clap::Args)]
pub struct InfoArgs {
    /// A weights file, a checkpoint folder, or `hf://owner/name[@revision][/file]`.
    pub source: String,
    /// List every tensor (name, shape, dtype).
    #[arg(long)]
    pub keys: bool,
    /// Hub sources: use the local cache only (also `HF_HUB_OFFLINE=1`).
    #[arg(long)]
    pub offline: bool,
}

impl From<ConvertArgs> for ConvertOptions {
    fn from(a: ConvertArgs) -> Self {
        Self {
            input: a.input,
            output: a.output,
            keep_names: a.keep_names,
            input_size: a.input_size,
            bgr: a.bgr,
        }
    }
}
impl From<InfoArgs> for WeightsInfoOptions {
    fn from(a: InfoArgs) -> Self {
        Self {
            source: a.source,
            keys: a.keys,
            offline: a.offline,
        }
    }
}
/// Converts or describes, and prints what it did or found.
///
/// # Errors
/// Unreadable inputs, unwritable outputs, Hub failures.
pub fn run(args: WeightsArgs) -> Result<()> {
    let text = match args.command {
        WeightsCommand::Convert(a) => convert(&a.into())?,
        WeightsCommand::Info(a) => info(&a.into())?,
    };
    println!("{text}");
    Ok(())
}
