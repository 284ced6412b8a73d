//! `fr pack --from <folder | list> --out <dir>`: an insightface training set
//! (`train.rec`, `train.idx`, `property`) from an image folder or a `path label` list
//! ([`fr_run::pack`]).

use std::path::PathBuf;

use anyhow::Result;
use fr_run::pack::{pack, summary_text, PackOptions};

/// Command-line options of `pack`.
#[derive(Debug, Clone, clap::Args)]
pub struct PackArgs {
    /// An image folder (`<root>/<identity>/<image>.{jpg,png,pgm,...}`, identities sorted by
    /// name) or a list file of `path label` lines.
    #[arg(long)]
    pub from: PathBuf,
    /// Output folder for train.rec, train.idx and property.
    #[arg(long)]
    pub out: PathBuf,
    /// Write the shuffled images-only variant (no header or identity records), as DALI needs.
    #[arg(long)]
    pub shuffle: bool,
    /// Side of the stored images in pixels.
    #[arg(long, default_value_t = 112)]
    pub size: u32,
    /// JPEG quality of re-encoded images (same-size JPEG sources are copied unchanged).
    #[arg(long, default_value_t = 95)]
    pub quality: u8,
    /// Seed of the shuffled order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder the paths of a list file are relative to (default: the list file's folder).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Number of classes of a list file: labels must be below it (default: largest + 1).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Replace train.rec / train.idx / property already in --out.
    #[arg(long)]
    pub force: bool,
}

impl From<PackArgs> for PackOptions {
    fn from(a: PackArgs) -> Self {
        Self {
            from: a.from,
            out: a.out,
            shuffle: a.shuffle,
            size: a.size,
            quality: a.quality,
            seed: a.seed,
            root: a.root,
            num_classes: a.num_classes,
            force: a.force,
        }
    }
}
/// Packs and prints what was packed and skipped.
///
/// # Errors
/// An unreadable source, an unwritable or occupied output folder (without `--force`).
pub fn run(args: PackArgs) -> Result<()> {
    print!("{}", summary_text(&pack(&args.into())?));
    Ok(())
}
