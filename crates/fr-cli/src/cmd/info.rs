//! `fr info <backbone | config.toml>`: parameters, MACs, input and embedding size of a
//! backbone ([`fr_run::info`]).

use anyhow::Result;
use fr_run::info::{describe, render, resolve, InfoOptions};

/// Arguments of `cargo xtask info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// A short name (`r50`, `mbf`, …; an unknown name lists them) or a TOML file: a preset
    /// (its `[backbone]` table is used) or a backbone table alone (`type = "iresnet"`, …).
    pub backbone: String,
    /// Override a key of the backbone table, `key=value` (e.g. `embedding_size=128`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl From<InfoArgs> for InfoOptions {
    fn from(a: InfoArgs) -> Self {
        Self {
            backbone: a.backbone,
            sets: a.sets,
            json: a.json,
        }
    }
}
/// Describes the backbone and prints it (text or JSON).
///
/// # Errors
/// An unknown backbone or a bad config file or override, named.
pub fn run(args: InfoArgs) -> Result<()> {
    let json = args.json;
    let opts = InfoOptions::from(args);
    let info = describe(&resolve(&opts)?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", render(&opts.backbone, &info));
    }
    Ok(())
}
