//! `fr`: face-recognition research from the command line (see [`fr_cli`]).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "fr",
    version,
    about = "fr: paper presets, training, evaluation and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: fr_cli::Command,
}

fn main() -> anyhow::Result<()> {
    fr_cli::init_process();
    let cli = Cli::parse();
    let root = std::env::current_dir()?;
    fr_cli::run(cli.command, &root)
}
