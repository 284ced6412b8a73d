//! `fr train <preset>`: one method of a preset on one process, or data-parallel over
//! `--gpus N` / `--nproc N` processes and `--nnodes` nodes ([`fr_run::train`]; the launcher is
//! [`crate::launch`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use fr_run::train::{launches, run_rank, validate, TrainOptions};
use fr_train::Precision;

/// Command-line options of `train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The preset (`configs/<preset>.toml`) whose backbone, head, data and budget to use.
    pub preset: String,
    /// The method (a key of the preset's `[heads]`); default: the preset's name when it is
    /// one, else its first method.
    #[arg(long)]
    pub method: Option<String>,
    /// Use this config file instead of `configs/<preset>.toml`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value: `--set train.epochs=3` (repeatable; value parsed as TOML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Train on an insightface RecordIO folder (train.rec, train.idx, property) instead of the
    /// preset's synthetic identities.
    #[arg(long, value_name = "DIR")]
    pub train_rec: Option<PathBuf>,
    /// Output folder (default `target/train/<preset>-<method>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Verification sets (insightface `.bin`) evaluated on rank 0 during training, every
    /// `--verbose` steps (arcface_torch's verification callback); results in the log and
    /// train.json.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub val_bin: Vec<PathBuf>,
    /// Steps between two verifications on `--val-bin` (0: never).
    #[arg(long, default_value_t = 2000)]
    pub verbose: u64,
    /// Steps between two log lines (loss, lr, img/s, time left) on rank 0, also appended to
    /// log.jsonl in the output folder (0: never).
    #[arg(long, default_value_t = 50)]
    pub frequent: u64,
    /// GPUs on this node: one process per GPU (`cuda:LOCAL_RANK`), NCCL collectives. Needs a
    /// `--features cuda,nccl` build.
    #[arg(long, conflicts_with = "nproc")]
    pub gpus: Option<usize>,
    /// CPU processes on this node (collectives over TCP): data parallelism without a GPU.
    #[arg(long)]
    pub nproc: Option<usize>,
    /// Nodes taking part (same `--gpus`/`--nproc` on each).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, `0..nnodes` (node 0 hosts rank 0).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, reachable from every node.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rendezvous port on node 0 (default: 29500 with several nodes, a free port on one).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Backbone precision, overriding `train.trainer.precision`: f32, bf16 or f16 (f16 with a
    /// dynamic loss scaler); the head and the loss stay in f32.
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Model-parallel Partial FC (arcface_torch's PartialFC_V2): shard the class centres over
    /// the ranks and sample this fraction of each shard per step (1.0: every centre). The
    /// method's head must be ArcFace-family (arcface, cosface); ranks `1..K` save their shard
    /// under `checkpoints/rank-<r>`.
    #[arg(long, value_name = "RATE")]
    pub partial_fc_sample_rate: Option<f64>,
    /// The dtype gradients are all-reduced in: `none` (their own, f32), `bf16` or `f16` (half
    /// the bytes; DDP's `bf16_compress_hook` / `fp16_compress_hook`).
    #[arg(long, default_value = "none")]
    pub grad_compression: String,
    /// Largest gradient bucket in MiB (DDP's `bucket_cap_mb`).
    #[arg(long, default_value_t = 25.0)]
    pub bucket_cap_mb: f64,
    /// Stop after this many steps in all (all epochs otherwise); the learning-rate schedule
    /// still spans every epoch, so a stopped run can be continued with `--resume`.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Continue the run in the output folder from its newest checkpoint (weights, optimiser,
    /// loss scaler, head state, step): rank 0 and every rank of a non-sharded run read
    /// `checkpoints/`, a sharded rank `r > 0` reads `checkpoints/rank-<r>/` (several nodes
    /// need a shared filesystem). The run goes on inside the epoch where it stopped.
    #[arg(long)]
    pub resume: bool,
    /// Seconds the ranks wait for each other at the rendezvous.
    #[arg(long, default_value_t = 900)]
    pub rendezvous_timeout: u64,
    /// Set by the launcher on the processes it starts.
    #[arg(long, hide = true)]
    pub worker: bool,
}

impl From<TrainArgs> for TrainOptions {
    fn from(a: TrainArgs) -> Self {
        Self {
            preset: a.preset,
            method: a.method,
            config: a.config,
            sets: a.sets,
            train_rec: a.train_rec,
            out: a.out,
            val_bin: a.val_bin,
            verbose: a.verbose,
            frequent: a.frequent,
            gpus: a.gpus,
            nproc: a.nproc,
            nnodes: a.nnodes,
            node_rank: a.node_rank,
            master_addr: a.master_addr,
            master_port: a.master_port,
            precision: a.precision,
            partial_fc_sample_rate: a.partial_fc_sample_rate,
            grad_compression: a.grad_compression,
            bucket_cap_mb: a.bucket_cap_mb,
            max_steps: a.max_steps,
            resume: a.resume,
            rendezvous_timeout: a.rendezvous_timeout,
            worker: a.worker,
        }
    }
}
/// Checks the flags once, then starts the workers or trains as one of them.
///
/// # Errors
/// A bad flag (named), a failed rank (named), a failed run.
pub fn run(args: TrainArgs, root: &Path) -> Result<()> {
    let opts = TrainOptions::from(args);
    let per_node = validate(&opts)?;
    if launches(&opts, per_node) {
        return crate::launch::launch(&opts, per_node);
    }
    Ok(run_rank(&opts, root)?)
}
