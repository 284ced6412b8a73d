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
use std::sync::Arc;
use std::time::Duration;

use crate::{bail, Context, Result};
use candle_core::{DType, Device};
use fr_data::loader::{BatchLoader, LoaderConfig};
use fr_data::recordio::RecordIoDataset;
use fr_data::synthetic::SyntheticFaces;
use fr_data::{FaceDataset, InMemoryDataset};
use fr_dist::{Collective, DistEnv, SimulatedCollective};
use fr_heads::sharded::{ShardedPartialFc, ShardedPartialFcConfig};
use fr_train::{
    DataParallel, DataParallelConfig, GradCompression, GradReduction, Precision, StepOutcome,
    Trainer,
};
use serde::Serialize;
use tracing::{info, warn};

use crate::config::Preset;
use crate::evaluate::VerificationCallback;
use crate::fit::{fit, FitConfig, FitHooks, StepLog};
use crate::model::{assemble, HeadBuilder, ModelSpec};
use crate::presets::Presets;

/// Options of `train`.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The preset (`configs/<preset>.toml`) whose backbone, head, data and budget to use.
    pub preset: String,
    /// The method (a key of the preset's `[heads]`); default: the preset's name when it is
    /// one, else its first method.
    pub method: Option<String>,
    /// Use this config file instead of `configs/<preset>.toml`.
    pub config: Option<PathBuf>,
    /// Override a config value: `--set train.epochs=3` (repeatable; value parsed as TOML).
    pub sets: Vec<String>,
    /// Train on an insightface RecordIO folder (train.rec, train.idx, property) instead of the
    /// preset's synthetic identities.
    pub train_rec: Option<PathBuf>,
    /// Output folder (default `target/train/<preset>-<method>`).
    pub out: Option<PathBuf>,
    /// Verification sets (insightface `.bin`) evaluated on rank 0 during training (arcface_torch's
    /// `CallBackVerification`); results in the log and `train.json`.
    pub val_bin: Vec<PathBuf>,
    /// Evaluate `val_bin` every this many steps (arcface_torch's `verbose`; 0: never).
    pub verbose: u64,
    /// A log line (loss, lr, images/s, time left) every this many steps on rank 0, also
    /// appended to `log.jsonl` in the output folder (arcface_torch's `frequent`; 0: never).
    pub frequent: u64,
    /// GPUs on this node: one process per GPU (`cuda:LOCAL_RANK`), NCCL collectives. Needs a
    /// `--features cuda,nccl` build.
    pub gpus: Option<usize>,
    /// CPU processes on this node (collectives over TCP): data parallelism without a GPU.
    pub nproc: Option<usize>,
    /// Nodes taking part (same `--gpus`/`--nproc` on each).
    pub nnodes: usize,
    /// This node's index, `0..nnodes` (node 0 hosts rank 0).
    pub node_rank: usize,
    /// Address of node 0, reachable from every node.
    pub master_addr: String,
    /// Rendezvous port on node 0 (default: 29500 with several nodes, a free port on one).
    pub master_port: Option<u16>,
    /// Backbone precision, overriding `train.trainer.precision`: f32, bf16 or f16 (f16 with a
    /// dynamic loss scaler); the head and the loss stay in f32.
    pub precision: Option<Precision>,
    /// Model-parallel Partial FC (arcface_torch's PartialFC_V2): shard the class centres over
    /// the ranks and sample this fraction of each shard per step (1.0: every centre). The
    /// method's head must be ArcFace-family (arcface, cosface); ranks `1..K` save their shard
    /// under `checkpoints/rank-<r>`.
    pub partial_fc_sample_rate: Option<f64>,
    /// The dtype gradients are all-reduced in: `none` (their own, f32), `bf16` or `f16` (half
    /// the bytes; DDP's `bf16_compress_hook` / `fp16_compress_hook`).
    pub grad_compression: String,
    /// Largest gradient bucket in MiB (DDP's `bucket_cap_mb`).
    pub bucket_cap_mb: f64,
    /// Stop after this many steps in all (all epochs otherwise); the learning-rate schedule
    /// still spans every epoch, so a stopped run can be continued with `--resume`.
    pub max_steps: Option<u64>,
    /// Continue the run in the output folder from its newest checkpoint (weights, optimiser,
    /// loss scaler, head state, step): rank 0 and every rank of a non-sharded run read
    /// `checkpoints/`, a sharded rank `r > 0` reads `checkpoints/rank-<r>/` (several nodes
    /// need a shared filesystem). The run goes on inside the epoch where it stopped.
    pub resume: bool,
    /// Seconds the ranks wait for each other at the rendezvous.
    pub rendezvous_timeout: u64,
    /// Set by the launcher on the processes it starts.
    pub worker: bool,
}

impl Default for TrainOptions {
    /// One process, one node (rendezvous on 127.0.0.1), the preset's precision, dense head,
    /// gradients all-reduced in f32 in 25 MiB buckets, every epoch, a 900 s rendezvous.
    fn default() -> Self {
        Self {
            preset: String::new(),
            method: None,
            config: None,
            sets: Vec::new(),
            train_rec: None,
            out: None,
            val_bin: Vec::new(),
            verbose: 2000,
            frequent: 50,
            gpus: None,
            nproc: None,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            precision: None,
            partial_fc_sample_rate: None,
            grad_compression: "none".into(),
            bucket_cap_mb: 25.0,
            max_steps: None,
            resume: false,
            rendezvous_timeout: 900,
            worker: false,
        }
    }
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
    /// `(step, set, accuracy)` of every verification during training (`--val-bin`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    verification: Vec<(u64, String, f64)>,
}

impl Summary {
    /// Writes `train.json` into `out` (through a temporary file).
    fn write(&self, out: &Path) -> Result<()> {
        let path = out.join("train.json");
        let tmp = out.join("train.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        info!(
            path = %path.display(),
            images_per_second = format!("{:.1}", self.images_per_second),
            "trained"
        );
        Ok(())
    }
}

/// Keeps the number of gradient buckets the data-parallel all-reduce used (`dp_buckets`).
struct GradientBuckets(usize);

impl FitHooks<Trainer> for GradientBuckets {
    fn after_step(&mut self, _: &mut Trainer, _: usize, outcome: &StepOutcome) -> Result<()> {
        if let Some(b) = outcome.stats.get("dp_buckets") {
            self.0 = *b as usize;
        }
        Ok(())
    }
}

/// Checks `args` as every rank would, once, before any process starts; returns the processes
/// per node (`--gpus` or `--nproc`, else 1).
///
/// # Errors
/// A flag out of range or inconsistent with another, or a missing `--train-rec` folder; the
/// message names the flag.
pub fn validate(args: &TrainOptions) -> Result<usize> {
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
    if let Some(bin) = args.val_bin.iter().find(|b| !b.is_file()) {
        bail!("--val-bin {}: no such file", bin.display());
    }
    if let Some(dir) = &args.train_rec {
        if !dir.is_dir() {
            bail!(
                "--train-rec {}: not a folder (expected train.rec, train.idx and property inside)",
                dir.display()
            );
        }
    }
    Ok(per_node)
}

/// Whether this process should start the workers (several ranks, and neither a launcher nor
/// torchrun / a scheduler set the rank variables) rather than be one.
pub fn launches(args: &TrainOptions, per_node: usize) -> bool {
    let launched = args.worker || std::env::var_os("WORLD_SIZE").is_some();
    !launched && per_node * args.nnodes > 1
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
        .map_err(|e| crate::err!("comparing the ranks' settings: {e}"))?
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
fn compression_of(args: &TrainOptions) -> Result<GradCompression> {
    serde_json::from_value(serde_json::json!(args.grad_compression)).map_err(|_| {
        crate::err!(
            "--grad-compression {}: expected none, bf16 or f16",
            args.grad_compression
        )
    })
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

fn method_of(args: &TrainOptions, preset: &Preset) -> Result<String> {
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

fn device_for(args: &TrainOptions, env: &DistEnv) -> Result<Device> {
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

/// What every rank must agree on, and what a resumed run must keep: the preset with its
/// overrides, the method, precision, communication settings, the data's size, the world size.
fn run_settings(
    args: &TrainOptions,
    preset: &Preset,
    method: &str,
    train_set: &dyn FaceDataset,
    world_size: usize,
) -> Result<Vec<(&'static str, String)>> {
    let precision = preset.train.trainer.precision;
    Ok(vec![
        (
            "the preset and its --set values",
            serde_json::to_string(&preset)?,
        ),
        ("--method", method.to_string()),
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
    ])
}

/// With `--partial-fc-sample-rate`, the model-parallel Partial FC head over `collective` (one
/// simulated rank without one) with the method's margin; `None`: the preset's head.
fn sharded_head(
    args: &TrainOptions,
    preset: &Preset,
    method: &str,
    collective: Option<&Shared>,
) -> Result<Option<HeadBuilder<'static>>> {
    let head_cfg = &preset.heads[method];
    Ok(match args.partial_fc_sample_rate {
        None => None,
        Some(sample_rate) => {
            let cfg = ShardedPartialFcConfig {
                sample_rate,
                seed: preset.seed,
                margin: head_cfg
                    .margin_softmax()
                    .with_context(|| format!("--partial-fc-sample-rate: method {method}"))?,
            };
            let shared: Shared = match collective {
                Some(c) => c.clone(),
                None => Arc::new(SimulatedCollective::new(1)?),
            };
            let method = method.to_string();
            Some(Box::new(move |d, c, vb| {
                let head = ShardedPartialFc::new(&cfg, d, c, shared, &[vb])
                    .with_context(|| format!("building model-parallel Partial FC for {method}"))?;
                Ok(Box::new(head) as Box<dyn fr_heads::Head>)
            }))
        }
    })
}

/// DDP over `collective`: gradients averaged over ranks, or summed for the sharded head (whose
/// loss is already the global one), its centres left rank-local.
fn data_parallel(collective: Shared, args: &TrainOptions, sharded: bool) -> Result<DataParallel> {
    let compression = compression_of(args)?;
    let mut dp = DataParallel::new(
        Box::new(collective),
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
    Ok(dp)
}

/// Are the replicas still identical? Every rank's sum of its replicated weights, gathered (a
/// warning when they differ).
fn weight_checksums(trainer: &Trainer, device: &Device) -> Result<Vec<f64>> {
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
        Some(dp) => dp.all_gather_f64(checksum, device)?,
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
    Ok(weight_checksums)
}

/// This rank's training set (a RecordIO folder, or the preset's synthetic identities rendered at
/// the input size) and its loader (its slice of every global batch).
fn rank_data(
    args: &TrainOptions,
    preset: &Preset,
    env: &DistEnv,
    device: &Device,
) -> Result<(Arc<dyn FaceDataset>, BatchLoader)> {
    let size = preset.input_size();
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
            rank: env.rank,
            world_size: env.world_size,
            ..preset.loader_config(preset.train.batch_size, size)
        },
    )?
    .with_device(device.clone());
    if loader.batches_per_epoch() == 0 {
        bail!(
            "the training set ({} images) is smaller than one global batch ({} ranks × {})",
            train_set.len(),
            env.world_size,
            preset.train.batch_size
        );
    }
    Ok((train_set, loader))
}

/// The preset `args` names (`--config` file, else a preset of `root/configs` or built in) with
/// its overrides, validated, `--precision` applied.
fn rank_preset(args: &TrainOptions, root: &Path) -> Result<Preset> {
    let mut preset: Preset = match &args.config {
        Some(path) => crate::config_file::load(path, &args.sets)?,
        None => Presets::with_dir(root.join("configs")).load(&args.preset, &args.sets)?,
    };
    preset.validate()?;
    if let Some(p) = args.precision {
        preset.train.trainer.precision = p;
    }
    Ok(preset)
}

/// Rank 0 creates the output folder and checks it is writable; every rank refuses a folder that
/// holds an earlier run's checkpoints unless it resumes.
fn prepare_output(out: &Path, rank: usize, resume: bool) -> Result<()> {
    if rank == 0 {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        fr_train::check_output_dir(&out.join("checkpoints"))?;
    }
    if !resume && out.join("checkpoints").join("latest").exists() {
        bail!(
            "{} holds the checkpoints of an earlier run: --resume continues it, or remove the \
folder (or pick another --out) to start over",
            out.join("checkpoints").display()
        );
    }
    Ok(())
}

/// The hooks of one rank's `fit`: the gradient bucket count, and on rank 0 the step log
/// (`--frequent`, into `log.jsonl`) and the verification on `--val-bin` (`--verbose`).
fn rank_hooks<'a>(
    args: &TrainOptions,
    preset: &'a Preset,
    env: &DistEnv,
    total_steps: u64,
    out: &Path,
    device: &Device,
) -> Result<RankHooks<'a>> {
    let rank0 = env.rank == 0;
    let log_file = rank0.then(|| out.join("log.jsonl"));
    let step_log = StepLog::new(
        if rank0 { args.frequent } else { 0 },
        preset.train.batch_size * env.world_size,
        total_steps,
        log_file.as_deref(),
    )?;
    let verify = (rank0 && !args.val_bin.is_empty())
        .then(|| VerificationCallback::new(preset, &args.val_bin, args.verbose, device))
        .transpose()?;
    Ok(((GradientBuckets(0), step_log), verify))
}

/// [`rank_hooks`]' hooks, in the order they run.
type RankHooks<'a> = ((GradientBuckets, StepLog), Option<VerificationCallback<'a>>);

/// Trains as one rank of the run `args` describes (rank, world size and rendezvous from the
/// torchrun environment variables, [`DistEnv`]; a single process when they are unset): rank 0
/// writes `checkpoints/` and `train.json` under the output folder (default
/// `root/target/train/<preset>-<method>`).
///
/// # Errors
/// A bad preset or flag, a rendezvous or collective failure, a failed step or checkpoint.
pub fn run_rank(args: &TrainOptions, root: &Path) -> Result<()> {
    watch_launcher();
    let env = DistEnv::from_env()?;
    let (rank, world_size) = (env.rank, env.world_size);
    let preset = rank_preset(args, root)?;
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
    prepare_output(&out, rank, args.resume)?;

    // Data: every rank opens the same set; the loader gives each its slice of every batch.
    let (train_set, loader) = rank_data(args, &preset, &env, &device)?;
    let per_epoch = loader.batches_per_epoch() as u64;
    let settings = run_settings(args, &preset, &method, train_set.as_ref(), world_size)?;
    if let Some((c, _)) = &collective {
        check_same_settings(c.as_ref(), rank, &settings)?;
    }
    check_run_record(&out, rank, args.resume, &settings)?;

    // Model: the backbone in the training precision, the head in f32 (same seeded VarMap, so
    // every rank starts from the same weights; rank 0's are broadcast anyway).
    let head = sharded_head(args, &preset, &method, collective.as_ref().map(|(c, _)| c))?;
    let data = args.train_rec.as_ref().map_or_else(
        || "synthetic identities".to_string(),
        |d| d.display().to_string(),
    );
    let mut trainer = assemble(ModelSpec {
        backbone_dtype: precision.backbone_dtype(),
        render: false,
        head,
        ..ModelSpec::new(&preset, &method, train_set.as_ref(), data, &device)
    })?
    .trainer;
    let sharded = args.partial_fc_sample_rate.is_some();
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
        trainer = trainer.with_data_parallel(data_parallel(c, args, sharded)?)?;
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
    let fit_config = FitConfig {
        label: method.clone(),
        epochs: preset.train.epochs,
        max_steps: args.max_steps,
        checkpoints: saves.then(|| ckpt_dir.clone()),
        world_size,
        progress: rank == 0,
    };
    let mut hooks = rank_hooks(args, &preset, &env, stop_at, &out, &device)?;
    let fitted = fit(&mut trainer, &loader, &fit_config, &mut hooks)?;
    let ((buckets, _), verify) = hooks;
    let (buckets, train_seconds) = (buckets.0, fitted.train_seconds);

    let weight_checksums = weight_checksums(&trainer, &device)?;
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
            images_per_second: fitted.images_per_second(),
            epoch_loss: fitted.epoch_loss,
            step_loss: fitted.step_loss,
            train_seconds,
            weight_checksums,
            gradient_buckets: buckets,
            checkpoint: fitted.last_checkpoint,
            verification: verify.map(|v| v.history).unwrap_or_default(),
        };
        summary.write(&out)?;
    }
    Ok(())
}
