//! `cargo xtask train <preset>`: train one method of a preset, on one process or data-parallel
//! over several (`--gpus N` on GPUs over NCCL, `--nproc N` on the CPU over TCP), on one node
//! or several (`--nnodes`, `--node-rank`, `--master-addr`, `--master-port`, as torchrun).
//!
//! With `--gpus N` / `--nproc N` this process is the launcher: it starts `N` copies of itself
//! with the torchrun variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`) set, waits for them, and stops them all as soon as one fails, naming the
//! rank. Every worker reads its position from those variables, meets the others at rank 0's
//! TCP rendezvous, loads its slice of every global batch (`train.batch_size` images per rank,
//! as arcface_torch's `batch_size` per GPU), and trains with its gradients all-reduced in
//! buckets. Rank 0 writes the checkpoints (one per epoch) and `train.json`.
//!
//! Started by torchrun or a cluster scheduler that sets those variables itself, every process
//! is a worker (no second launch); `--gpus` then only selects the GPU path.
//!
//! Evaluate the result with `cargo xtask eval --config <preset> --checkpoint <out>/checkpoints`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use fr_backbone::{build_backbone, Backbone};
use fr_data::loader::{BatchLoader, LoaderConfig};
use fr_data::recordio::RecordIoDataset;
use fr_data::synthetic::SyntheticFaces;
use fr_data::{FaceDataset, InMemoryDataset};
use fr_dist::{Collective, DistEnv, SimulatedCollective};
use fr_heads::build_head;
use fr_heads::sharded::{ShardedPartialFc, ShardedPartialFcConfig};
use fr_train::{
    DataParallel, DataParallelConfig, GradCompression, GradReduction, Precision, SeededVarMap,
    Trainer,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tracing::{info, warn};

use crate::preset::Preset;

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

/// What rank 0 writes to `train.json`.
#[derive(Debug, Serialize)]
struct Summary {
    preset: String,
    method: String,
    world_size: usize,
    backend: String,
    precision: String,
    /// `Some(rate)`: model-parallel Partial FC with this sample rate.
    partial_fc_sample_rate: Option<f64>,
    /// The dtype of the gradient all-reduce (`none`: the gradients' own, or one process).
    grad_compression: String,
    /// The step this invocation started from (0, or where `--resume` picked the run up);
    /// `step_loss` and `epoch_loss` cover this invocation's steps only.
    first_step: u64,
    /// Images the loader skipped as corrupt (`train.skip_corrupt`), on this rank.
    skipped_images: usize,
    batch_size_per_rank: usize,
    global_batch_size: usize,
    steps: u64,
    skipped_steps: u64,
    epoch_loss: Vec<f64>,
    step_loss: Vec<f64>,
    train_seconds: f64,
    /// Images per second over all ranks.
    images_per_second: f64,
    /// Per rank: the sum of every replicated trainable weight (f64; a sharded head's centres
    /// are left out). Equal on all ranks when the replicas stayed in sync.
    weight_checksums: Vec<f64>,
    gradient_buckets: usize,
    checkpoint: Option<PathBuf>,
}

/// Run `train`: launch workers, or be one.
pub fn run(args: &TrainArgs, root: &Path) -> Result<()> {
    let per_node = args.gpus.or(args.nproc).unwrap_or(1);
    if per_node == 0 || args.nnodes == 0 {
        bail!("--gpus / --nproc and --nnodes must be at least 1");
    }
    if args.node_rank >= args.nnodes {
        bail!(
            "--node-rank {} is not below --nnodes {}",
            args.node_rank,
            args.nnodes
        );
    }
    if args.gpus.is_some() && !cfg!(feature = "nccl") {
        bail!(
            "--gpus needs the GPU build with NCCL: cargo run --release -p xtask --features \
cuda,cudnn,nccl -- train ... (use --nproc N for CPU processes)"
        );
    }
    // Flags every worker would refuse: refuse them once, before anything starts.
    compression_of(args)?;
    if let Some(r) = args.partial_fc_sample_rate {
        if !(r > 0.0 && r <= 1.0) {
            bail!("--partial-fc-sample-rate {r}: must be in (0, 1]");
        }
    }
    if !(args.bucket_cap_mb.is_finite() && args.bucket_cap_mb > 0.0) {
        bail!("--bucket-cap-mb {}: must be > 0", args.bucket_cap_mb);
    }
    if args.rendezvous_timeout == 0 {
        bail!("--rendezvous-timeout must be at least 1 second");
    }
    if args.nnodes > 1 && args.master_port == Some(0) {
        bail!("--master-port 0: the nodes need one fixed port to meet on");
    }
    if let Some(dir) = &args.train_rec {
        if !dir.is_dir() {
            bail!(
                "--train-rec {}: not a folder (expected train.rec, train.idx and property inside)",
                dir.display()
            );
        }
    }
    // Under torchrun or a scheduler that already set the variables, this process is a worker.
    let launched = args.worker || std::env::var_os("WORLD_SIZE").is_some();
    if !launched && per_node * args.nnodes > 1 {
        return launch(args, per_node);
    }
    worker(args, root)
}

/// A stable 32-bit digest of `text` (FNV-1a: the same in every process and build).
fn digest(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Every rank must train the same thing: gather each setting's digest from every rank and
/// name the settings (and ranks) that differ from rank 0's.
fn check_same_settings(
    collective: &dyn Collective,
    rank: usize,
    settings: &[(&str, String)],
) -> Result<()> {
    let mine: Vec<u32> = settings.iter().map(|(_, v)| digest(v)).collect();
    let device = Device::Cpu;
    let t = candle_core::Tensor::new(mine.as_slice(), &device)?.unsqueeze(0)?;
    let all = collective
        .all_gather(&[t])
        .map_err(|e| anyhow::anyhow!("comparing the ranks' settings: {e}"))?
        .remove(0)
        .to_vec2::<u32>()?;
    let mut differ: Vec<String> = Vec::new();
    for (i, (name, _)) in settings.iter().enumerate() {
        let ranks: Vec<usize> = (0..all.len()).filter(|&r| all[r][i] != all[0][i]).collect();
        if !ranks.is_empty() {
            differ.push(format!("{name} (ranks {ranks:?} differ from rank 0)"));
        }
    }
    if !differ.is_empty() {
        bail!(
            "rank {rank}: the ranks do not train the same thing: {}; start every node with the \
same preset, --set values and flags",
            differ.join(", ")
        );
    }
    Ok(())
}

/// `run.json` in the output folder records the settings of the run (rank 0 writes it when a
/// run starts); `--resume` refuses to continue with other ones, naming them.
fn check_run_record(
    out: &Path,
    rank: usize,
    resume: bool,
    settings: &[(&str, String)],
) -> Result<()> {
    let path = out.join("run.json");
    let now: std::collections::BTreeMap<String, String> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    if resume {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let then: std::collections::BTreeMap<String, String> = serde_json::from_str(&text)
                .with_context(|| format!("reading {}", path.display()))?;
            let changed: Vec<&str> = now
                .iter()
                .filter(|(k, v)| then.get(*k).is_some_and(|old| old != *v))
                .map(|(k, _)| k.as_str())
                .collect();
            if !changed.is_empty() {
                bail!(
                    "--resume: {} changed since the run started ({}); resume with the same \
settings, or start a new run in another --out",
                    changed.join(", "),
                    path.display()
                );
            }
        }
    } else if rank == 0 {
        let tmp = out.join("run.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&now)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `--grad-compression` parsed.
fn compression_of(args: &TrainArgs) -> Result<GradCompression> {
    serde_json::from_value(serde_json::json!(args.grad_compression)).map_err(|_| {
        anyhow::anyhow!(
            "--grad-compression {}: expected none, bf16 or f16",
            args.grad_compression
        )
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Start one worker per local rank and wait for all of them.
fn launch(args: &TrainArgs, per_node: usize) -> Result<()> {
    let world_size = per_node * args.nnodes;
    let master_port = match args.master_port {
        Some(p) => p,
        None if args.nnodes == 1 => free_port()?,
        None => fr_dist::DEFAULT_MASTER_PORT,
    };
    let exe = std::env::current_exe().context("finding this program to start the workers")?;
    // torchrun's --rdzv-id: this node's workers refuse ranks of another run on the same port.
    // Several nodes must agree on it: FR_RUN_ID from the environment, else one derived from
    // the rendezvous address (the same on every node).
    let run_id = std::env::var("FR_RUN_ID").unwrap_or_else(|_| {
        if args.nnodes == 1 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            format!("{}-{nanos}", std::process::id())
        } else {
            format!("{}:{master_port}", args.master_addr)
        }
    });
    let forwarded: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    info!(
        world_size,
        per_node,
        node_rank = args.node_rank,
        master = %format!("{}:{master_port}", args.master_addr),
        "starting workers"
    );
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(per_node);
    for local_rank in 0..per_node {
        let env = DistEnv {
            rank: args.node_rank * per_node + local_rank,
            world_size,
            local_rank,
            master_addr: args.master_addr.clone(),
            master_port,
            run_id: run_id.clone(),
        };
        let mut cmd = Command::new(&exe);
        cmd.args(&forwarded)
            .arg("--worker")
            .env("FR_LAUNCHER_PID", std::process::id().to_string());
        for (k, v) in env.to_vars() {
            cmd.env(k, v);
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                bail!("starting rank {}: {e}", env.rank);
            }
        };
        children.push((env.rank, child));
    }
    // Wait; the first failure stops the others (torchrun does the same).
    let mut done = vec![false; children.len()];
    while done.iter().any(|d| !d) {
        let mut failed = Vec::new();
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    done[i] = true;
                    if !status.success() {
                        failed.push((*rank, status));
                    }
                }
                Ok(None) => {}
                Err(e) => bail!("waiting for rank {rank}: {e}"),
            }
        }
        if !failed.is_empty() {
            // A rank that dies takes its peers' collectives down with it a moment later: give
            // them that moment, then name the cause first (a rank killed by a signal, else
            // the lowest failed rank) and the others after it.
            std::thread::sleep(Duration::from_millis(300));
            for (i, (rank, child)) in children.iter_mut().enumerate() {
                if !done[i] {
                    if let Ok(Some(status)) = child.try_wait() {
                        done[i] = true;
                        if !status.success() {
                            failed.push((*rank, status));
                        }
                    }
                }
            }
            stop(&mut children);
            failed.sort_by_key(|(rank, status)| (signal_of(status).is_none(), *rank));
            let (rank, status) = &failed[0];
            let others: Vec<String> = failed[1..]
                .iter()
                .map(|(r, st)| format!("rank {r} ({})", describe(st)))
                .collect();
            let also = if others.is_empty() {
                String::new()
            } else {
                format!("; then {}", others.join(", "))
            };
            bail!(
                "rank {rank} failed ({}){also}; the other ranks were stopped",
                describe(status)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    info!(ranks = children.len(), "all ranks of this node finished");
    Ok(())
}

/// The signal that ended a process, if one did.
fn signal_of(status: &std::process::ExitStatus) -> Option<i32> {
    #[cfg(unix)]
    {
        std::os::unix::process::ExitStatusExt::signal(status)
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        None
    }
}

fn describe(status: &std::process::ExitStatus) -> String {
    match signal_of(status) {
        Some(9) => "killed by signal 9, SIGKILL: out of memory?".into(),
        Some(sig) => format!("killed by signal {sig}"),
        None => status.to_string(),
    }
}

/// In a worker the launcher started: exit when the launcher is gone (killed), as torchrun's
/// workers do, instead of training on unwatched.
fn watch_launcher() {
    #[cfg(unix)]
    if let Some(launcher) = std::env::var("FR_LAUNCHER_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        std::thread::spawn(move || loop {
            if std::os::unix::process::parent_id() != launcher {
                tracing::error!(launcher, "the launcher is gone: stopping this worker");
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(500));
        });
    }
}

fn stop(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn method_of(args: &TrainArgs, preset: &Preset) -> Result<String> {
    let method = match &args.method {
        Some(m) => m.clone(),
        None if preset.heads.contains_key(&preset.name) => preset.name.clone(),
        None => preset
            .methods
            .first()
            .cloned()
            .context("the preset has no methods: pass --method")?,
    };
    if !preset.heads.contains_key(&method) {
        bail!(
            "--method {method}: not a head of preset {} (heads: {})",
            preset.name,
            preset.heads.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(method)
}

/// A collective shared by the data-parallel layer and a model-parallel head.
type Shared = Arc<dyn Collective + Send + Sync>;

/// The collective of this rank, and its name; `None` for one process.
fn collective(
    env: &DistEnv,
    device: &Device,
    timeout: Duration,
) -> Result<Option<(Shared, &'static str)>> {
    if !env.is_distributed() {
        return Ok(None);
    }
    if device.is_cuda() {
        #[cfg(feature = "nccl")]
        {
            let c = fr_dist::NcclCollective::connect(env, timeout)?;
            return Ok(Some((Arc::new(c), "nccl")));
        }
        #[cfg(not(feature = "nccl"))]
        bail!("several GPU processes need the NCCL build (--features cuda,nccl)");
    }
    let c = fr_dist::TcpCollective::connect(env, timeout, fr_dist::DEFAULT_OP_TIMEOUT)?;
    Ok(Some((Arc::new(c), "tcp")))
}

fn device_for(args: &TrainArgs, env: &DistEnv) -> Result<Device> {
    if args.gpus.is_some() {
        return Device::new_cuda(env.local_rank)
            .with_context(|| format!("opening cuda:{}", env.local_rank));
    }
    if args.nproc.is_some() {
        return Ok(Device::Cpu);
    }
    // One process: the first GPU of a CUDA build when there is one, as `reproduce`.
    #[cfg(feature = "cuda")]
    return Ok(Device::cuda_if_available(0)?);
    #[cfg(not(feature = "cuda"))]
    Ok(Device::Cpu)
}

fn worker(args: &TrainArgs, root: &Path) -> Result<()> {
    watch_launcher();
    let env = DistEnv::from_env()?;
    let (rank, world_size) = (env.rank, env.world_size);
    let config_path = args
        .config
        .clone()
        .unwrap_or_else(|| root.join("configs").join(format!("{}.toml", args.preset)));
    if !config_path.exists() {
        bail!(
            "no preset {}: {} does not exist (presets: {})",
            args.preset,
            config_path.display(),
            crate::reproduce::list_presets(&root.join("configs")).join(", ")
        );
    }
    let mut preset: Preset = crate::config_file::load(&config_path, &args.sets)?;
    preset.validate()?;
    if let Some(p) = args.precision {
        preset.train.trainer.precision = p;
    }
    let precision = preset.train.trainer.precision;
    let method = method_of(args, &preset)?;
    let out = args.out.clone().unwrap_or_else(|| {
        root.join("target")
            .join("train")
            .join(format!("{}-{method}", preset.name))
    });
    let device = device_for(args, &env)?;
    let timeout = Duration::from_secs(args.rendezvous_timeout);
    let collective = collective(&env, &device, timeout)?;
    let backend = collective.as_ref().map_or("none", |(_, b)| *b);
    info!(rank, world_size, backend, device = ?device, %precision, method, "worker ready");
    if rank == 0 {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        fr_train::check_output_dir(&out.join("checkpoints"))?;
    }
    if !args.resume && out.join("checkpoints").join("latest").exists() {
        bail!(
            "{} holds the checkpoints of an earlier run: --resume continues it, or remove the \
folder (or pick another --out) to start over",
            out.join("checkpoints").display()
        );
    }

    // Data: every rank opens the same set; the loader gives each its slice of every batch.
    let size = crate::reproduce::input_size(&preset);
    let train_set: Arc<dyn FaceDataset> = match &args.train_rec {
        Some(dir) => Arc::new(
            RecordIoDataset::open(dir)
                .with_context(|| format!("opening RecordIO {}", dir.display()))?,
        ),
        None => Arc::new(InMemoryDataset::from_dataset(
            &SyntheticFaces::new(preset.synthetic.train.clone())?,
            size,
        )?),
    };
    let loader = BatchLoader::new(
        train_set.clone(),
        LoaderConfig {
            batch_size: preset.train.batch_size,
            image_size: size,
            shuffle: true,
            seed: preset.seed,
            drop_last: true,
            skip_corrupt: preset.train.skip_corrupt,
            prefetch: preset.train.prefetch.unwrap_or(2),
            rank,
            world_size,
            ..LoaderConfig::default()
        },
    )?
    .with_device(device.clone());
    let per_epoch = loader.batches_per_epoch() as u64;
    if per_epoch == 0 {
        bail!(
            "the training set ({} images) is smaller than one global batch ({} ranks × {})",
            train_set.len(),
            world_size,
            preset.train.batch_size
        );
    }
    // What every rank must agree on, and what a resumed run must keep.
    let settings: Vec<(&str, String)> = vec![
        (
            "the preset and its --set values",
            serde_json::to_string(&preset)?,
        ),
        ("--method", method.clone()),
        ("--precision", precision.to_string()),
        ("--grad-compression", args.grad_compression.clone()),
        (
            "--partial-fc-sample-rate",
            format!("{:?}", args.partial_fc_sample_rate),
        ),
        ("--bucket-cap-mb", args.bucket_cap_mb.to_string()),
        (
            "the training data",
            format!(
                "{} images, {} identities",
                train_set.len(),
                train_set.num_classes()
            ),
        ),
        ("the world size", world_size.to_string()),
    ];
    if let Some((c, _)) = &collective {
        check_same_settings(c.as_ref(), rank, &settings)?;
    }
    check_run_record(&out, rank, args.resume, &settings)?;

    // Model: the backbone in the training precision, the head in f32 (same seeded VarMap, so
    // every rank starts from the same weights; rank 0's are broadcast anyway).
    let seeded = SeededVarMap::new(preset.seed);
    let backbone: Box<dyn Backbone> = build_backbone(
        &preset.backbone,
        seeded.var_builder(precision.backbone_dtype(), &device),
    )
    .context("building the backbone")?;
    let head_cfg = preset.heads[&method].clone();
    let head_vb = seeded.var_builder(DType::F32, &device).pp("head");
    let head: Box<dyn fr_heads::Head> = match args.partial_fc_sample_rate {
        None => build_head(
            &head_cfg,
            backbone.embedding_size(),
            train_set.num_classes(),
            head_vb,
        )
        .with_context(|| format!("building head {method}"))?,
        Some(sample_rate) => {
            let cfg = ShardedPartialFcConfig {
                sample_rate,
                seed: preset.seed,
                margin: head_cfg
                    .margin_softmax()
                    .with_context(|| format!("--partial-fc-sample-rate: method {method}"))?,
            };
            let shared: Shared = match &collective {
                Some((c, _)) => c.clone(),
                None => Arc::new(SimulatedCollective::new(1)?),
            };
            Box::new(
                ShardedPartialFc::new(
                    &cfg,
                    backbone.embedding_size(),
                    train_set.num_classes(),
                    shared,
                    &[head_vb],
                )
                .with_context(|| format!("building model-parallel Partial FC for {method}"))?,
            )
        }
    };
    let frozen: Vec<String> = {
        let data = seeded.varmap().data().lock().expect("fresh VarMap lock");
        data.keys()
            .filter(|n| !n.starts_with("head.") && !backbone.is_trainable(n))
            .cloned()
            .collect()
    };
    let mut trainer_cfg = preset.train.trainer.clone();
    trainer_cfg.seed = preset.seed;
    let mut trainer = Trainer::new(
        backbone,
        head,
        seeded.varmap().clone(),
        trainer_cfg,
        move |n: &str| !frozen.iter().any(|f| f == n),
    )?
    .with_model_card(
        fr_backbone::ModelCard::new(preset.backbone.clone())
            .with_head(
                &method,
                serde_json::to_value(&head_cfg).ok(),
                Some(train_set.num_classes()),
            )
            .with_training_set(
                args.train_rec.as_ref().map_or_else(
                    || "synthetic identities".to_string(),
                    |d| d.display().to_string(),
                ),
                Some(train_set.num_classes()),
                Some(train_set.len()),
            ),
    );
    let sharded = args.partial_fc_sample_rate.is_some();
    let compression = compression_of(args)?;
    // With sharded centres every rank saves (its shard); otherwise rank 0 alone.
    let saves = rank == 0 || sharded;
    let ckpt_dir = if rank == 0 || !sharded {
        out.join("checkpoints")
    } else {
        out.join("checkpoints").join(format!("rank-{rank}"))
    };
    if args.resume {
        trainer
            .resume(&ckpt_dir)
            .with_context(|| format!("--resume: rank {rank} from {}", ckpt_dir.display()))?;
        info!(rank, step = trainer.state().step, "resumed");
    }
    if let Some((c, _)) = collective {
        let mut dp = DataParallel::new(
            Box::new(c),
            DataParallelConfig {
                bucket_cap_mb: args.bucket_cap_mb,
                // The sharded head's loss is already the global one: its per-rank backbone
                // gradients add up (see fr_train::data_parallel).
                reduction: if sharded {
                    GradReduction::Sum
                } else {
                    GradReduction::Mean
                },
                compression,
                ..DataParallelConfig::default()
            },
        )?;
        if sharded {
            dp = dp.with_local_variables(|n| n.starts_with("head."));
        }
        trainer = trainer.with_data_parallel(dp)?;
    }

    // The schedule spans every epoch; --max-steps only stops early.
    let total = per_epoch * preset.train.epochs as u64;
    let stop_at = args.max_steps.map_or(total, |m| m.min(total));
    let first_step = trainer.state().step;
    if first_step >= stop_at {
        info!(
            step = first_step,
            of = stop_at,
            "nothing to train: the run is already there (train.json left as it is)"
        );
        return Ok(());
    }
    let pb = if rank == 0 {
        let pb = ProgressBar::new(stop_at);
        pb.set_position(first_step.min(stop_at));
        pb.set_style(
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                .expect("static template"),
        );
        pb.set_prefix(method.clone());
        pb
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    let (mut step_loss, mut epoch_loss) = (Vec::new(), Vec::new());
    let (mut images, mut buckets, mut last_ckpt) = (0usize, 0usize, None);
    let mut saved_step = None;
    let first_epoch = (first_step / per_epoch) as usize;
    'epochs: for epoch in first_epoch..preset.train.epochs {
        trainer.set_epoch(epoch);
        let (mut sum, mut count) = (0.0, 0usize);
        // A resumed run goes on inside the epoch where it stopped.
        let skip = if epoch == first_epoch {
            (first_step % per_epoch) as usize
        } else {
            0
        };
        for batch in loader.epoch_from(epoch as u64, skip) {
            if trainer.state().step >= stop_at {
                break 'epochs;
            }
            let batch = batch?;
            images += batch.indices.len() * world_size;
            let o = trainer.step(&batch, total)?;
            buckets = o.stats.get("dp_buckets").map_or(buckets, |b| *b as usize);
            step_loss.push(o.loss);
            if !o.skipped {
                sum += o.loss;
                count += 1;
            }
            pb.set_message(format!(
                "epoch {} loss {:.3} lr {:.4}",
                epoch + 1,
                o.loss,
                o.lr
            ));
            pb.inc(1);
        }
        epoch_loss.push(if count > 0 {
            sum / count as f64
        } else {
            f64::NAN
        });
        if saves {
            last_ckpt = Some(trainer.save(&ckpt_dir)?);
            saved_step = Some(trainer.state().step);
        }
        info!(
            rank,
            epoch = epoch + 1,
            loss = format!("{:.4}", epoch_loss.last().copied().unwrap_or(f64::NAN)),
            "epoch done"
        );
    }
    if saves && saved_step != Some(trainer.state().step) && trainer.state().step > first_step {
        // Stopped inside an epoch by --max-steps: keep that state too.
        last_ckpt = Some(trainer.save(&ckpt_dir)?);
    }
    pb.finish_and_clear();
    let train_seconds = start.elapsed().as_secs_f64();

    // Are the replicas still identical? Every rank's weight sum, gathered.
    let mut checksum = 0f64;
    let replicated = |name: &str| !trainer.data_parallel().is_some_and(|dp| dp.is_local(name));
    for name in trainer.trainable_names().filter(|n| replicated(n)) {
        let data = trainer.varmap().data().lock().expect("VarMap lock");
        let v = data[name]
            .as_tensor()
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        checksum += v;
    }
    let weight_checksums = match trainer.data_parallel() {
        Some(dp) => dp.all_gather_f64(checksum, &device)?,
        None => vec![checksum],
    };
    if weight_checksums
        .iter()
        .any(|c| c.to_bits() != weight_checksums[0].to_bits())
    {
        warn!(
            ?weight_checksums,
            "the ranks' weights differ: the replicas are out of sync"
        );
    }
    if rank == 0 {
        let summary = Summary {
            preset: preset.name.clone(),
            method: method.clone(),
            world_size,
            backend: backend.to_string(),
            precision: precision.to_string(),
            partial_fc_sample_rate: args.partial_fc_sample_rate,
            grad_compression: if world_size > 1 {
                args.grad_compression.clone()
            } else {
                "none".into()
            },
            first_step,
            skipped_images: loader.stats().skipped,
            batch_size_per_rank: preset.train.batch_size,
            global_batch_size: preset.train.batch_size * world_size,
            steps: trainer.state().step,
            skipped_steps: trainer.state().skipped_steps,
            epoch_loss,
            step_loss,
            train_seconds,
            images_per_second: images as f64 / train_seconds.max(1e-9),
            weight_checksums,
            gradient_buckets: buckets,
            checkpoint: last_ckpt,
        };
        let path = out.join("train.json");
        let tmp = out.join("train.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        info!(
            path = %path.display(),
            images_per_second = format!("{:.1}", summary.images_per_second),
            "trained"
        );
    }
    Ok(())
}
