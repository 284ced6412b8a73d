//! `cargo xtask`: fr's orchestrator.
//!
//! - `cargo xtask reproduce lh2face` — train LH2Face and its baselines (ArcFace, CosFace) with
//!   one seed, backbone and budget; evaluate them side by side; write
//!   `target/reproduce/lh2face/{report.md, metrics.json, roc.png}`.
//! - `cargo xtask bench train|infer --model r18` — images/s and peak RSS of one IResNet.
//! - `cargo xtask eval --config configs/<preset>.toml --checkpoint <run|step dir|weights>
//!   [--bin ...] [--ijb DIR --ijb-subset C] [--pairs-folder DIR --pairs FILE] [--qmagface]` —
//!   evaluate a checkpoint (or a Hub repository, `--checkpoint hf://owner/name`); write
//!   `report.md`, `metrics.json`, `roc.png`, `det.png`.
//! - `cargo xtask pack --from <folder or list> --out <dir>` — an insightface `train.rec`.
//! - `cargo xtask weights convert <in.pth> <out.safetensors>` / `weights info <file | dir |
//!   hf://owner/name>` — pretrained weights (insightface `.pth` read natively, Hub repositories).
//! - `cargo xtask info <backbone | config.toml>` — parameters, MACs, input and embedding size.
//! - `cargo xtask train <preset> [--method M] [--gpus N | --nproc N] [--nnodes M --node-rank R
//!   --master-addr A --master-port P] [--precision bf16]` — train one method of a preset on one
//!   process or data-parallel over several (NCCL on GPUs, TCP on the CPU); rank 0 writes
//!   `target/train/<preset>-<method>/{checkpoints, train.json}`.
//! - `cargo xtask study backbone-size | data-distribution [--head NAME,...]` — the survey's
//!   studies on IResNet depth and on the training data's identities × images and long tail;
//!   write `target/study/<study>/{report.md, metrics.json, <study>.png}` (resumable).

mod bench;
mod config_file;
mod eval;
mod info;
mod pack;
mod preset;
mod report;
mod reproduce;
mod study;
mod train;
mod weights;

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
    /// Reproduce a paper preset (`configs/<paper>.toml`): train, evaluate, report.
    Reproduce(reproduce::ReproduceArgs),
    /// Measure training or inference throughput and peak memory of one IResNet.
    Bench(bench::BenchArgs),
    /// Evaluate a checkpoint on .bin sets, an image folder + pairs file, IJB-B/C.
    Eval(eval::EvalArgs),
    /// Pack an image folder or `path label` list into train.rec / train.idx / property.
    Pack(pack::PackArgs),
    /// Convert PyTorch checkpoints to safetensors; describe weights files and Hub repositories.
    Weights(weights::WeightsArgs),
    /// Parameters, MACs, input and embedding size of a backbone (a name or a config file).
    Info(info::InfoArgs),
    /// Studies on top of the trainer: `backbone-size` (IResNet depth) or `data-distribution`
    /// (identities × images per identity, balanced vs long-tailed).
    Study(study::StudyArgs),
    /// Train one method of a preset, on one process or data-parallel over several
    /// (`--gpus N` over NCCL, `--nproc N` on the CPU over TCP; `--nnodes` for several nodes).
    Train(train::TrainArgs),
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn main() -> anyhow::Result<()> {
    // Reuse freed activations instead of mmap/munmap-ing each one, and keep candle's idle
    // workers off the cores (see fr_kernels::tune_cpu_runtime).
    fr_kernels::tune_cpu_runtime();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Reproduce(args) => reproduce::run(&args, &workspace_root()),
        Command::Bench(args) => bench::run(&args, &workspace_root()),
        Command::Eval(args) => eval::run(&args, &workspace_root()),
        Command::Pack(args) => pack::run(&args),
        Command::Weights(args) => weights::run(&args),
        Command::Info(args) => info::run(&args),
        Command::Study(args) => study::run(&args, &workspace_root()),
        Command::Train(args) => train::run(&args, &workspace_root()),
    }
}
