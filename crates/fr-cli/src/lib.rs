//! The `fr` command line: each subcommand parses its arguments, calls the workflow in
//! [`fr_run`] and prints. `cargo xtask <command>` in the fr repository runs the same commands.

use std::path::Path;

use clap::Subcommand;

pub mod cmd {
    //! One module per subcommand: its arguments (clap) and what it prints.
    pub mod eval;
    pub mod info;
    pub mod pack;
    pub mod reproduce;
    pub mod study;
    pub mod train;
    pub mod weights;
}
pub mod launch;

/// The subcommands of `fr` (and of `cargo xtask`, which adds its developer chores).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Reproduce a paper preset (`configs/<paper>.toml`): train, evaluate, report.
    Reproduce(cmd::reproduce::ReproduceArgs),
    /// Evaluate a checkpoint on .bin sets, an image folder + pairs file, IJB-B/C.
    Eval(cmd::eval::EvalArgs),
    /// Pack an image folder or `path label` list into train.rec / train.idx / property.
    Pack(cmd::pack::PackArgs),
    /// Convert PyTorch checkpoints to safetensors; describe weights files and Hub repositories.
    Weights(cmd::weights::WeightsArgs),
    /// Parameters, MACs, input and embedding size of a backbone (a name or a config file).
    Info(cmd::info::InfoArgs),
    /// Studies on top of the trainer: `backbone-size` (IResNet depth) or `data-distribution`
    /// (identities × images per identity, balanced vs long-tailed).
    Study(cmd::study::StudyArgs),
    /// Train one method of a preset, on one process or data-parallel over several
    /// (`--gpus N` over NCCL, `--nproc N` on the CPU over TCP; `--nnodes` for several nodes).
    Train(cmd::train::TrainArgs),
}

/// Sets up the process as every fr command wants it: candle's CPU runtime tuned
/// ([`fr_kernels::tune_cpu_runtime`]) and `tracing` logs on stderr (`RUST_LOG`, default
/// `info`).
pub fn init_process() {
    fr_kernels::tune_cpu_runtime();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Runs `command` with `root` as the project folder (`configs/` is read from it, `target/`
/// written under it).
///
/// # Errors
/// The workflow's error, with its context.
pub fn run(command: Command, root: &Path) -> anyhow::Result<()> {
    match command {
        Command::Reproduce(args) => cmd::reproduce::run(args, root),
        Command::Eval(args) => cmd::eval::run(args, root),
        Command::Pack(args) => cmd::pack::run(args),
        Command::Weights(args) => cmd::weights::run(args),
        Command::Info(args) => cmd::info::run(args),
        Command::Study(args) => cmd::study::run(args, root),
        Command::Train(args) => cmd::train::run(args, root),
    }
}
