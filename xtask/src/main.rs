//! `cargo xtask`: fr's developer chores, plus every command of the `fr` binary (`fr-cli`) so
//! that `cargo xtask reproduce lh2face` in the repository is `fr reproduce lh2face`.
//!
//! - `cargo xtask bench train|infer|loader|gpu` — throughput and peak memory against the
//!   PyTorch / Python peers (`benchmarks/`).
//! - `cargo xtask reproduce | train | eval | study | pack | weights | info ...` — the `fr`
//!   commands (`fr --help`), with the repository's `configs/` and `target/`.

mod bench;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "fr's paper presets and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure training or inference throughput and peak memory of one IResNet.
    Bench(bench::BenchArgs),
    /// Every command of the `fr` binary.
    #[command(flatten)]
    Fr(fr_cli::Command),
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn main() -> anyhow::Result<()> {
    fr_cli::init_process();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(&args, &workspace_root()),
        Command::Fr(command) => fr_cli::run(command, &workspace_root()),
    }
}
