//! `cargo xtask bench gpu`: images/s of IResNet training and inference on one GPU, in the
//! configuration of insightface arcface_torch's `configs/ms1mv3_r50.py` (batch 128 per GPU,
//! 112×112 inputs, 512-d embeddings, ArcFace s 64 m 0.5 over 93,431 classes, SGD lr 0.1
//! momentum 0.9 weight decay 5e-4, gradient-norm clip 5, mixed precision).
//!
//! - Training: the full [`Trainer`] step (backbone forward, head loss, backward, clip, SGD) on
//!   one fixed batch already on the device, timed over `--steps` after `--warmup`.
//! - Inference: the eval-mode forward of the backbone in the same precision, batch
//!   `--infer-batch`, with weights that are plain tensors (no autograd graph is recorded, as
//!   under PyTorch's `inference_mode`).
//!
//! The device is synchronised before the clock is read at both ends. Rows are printed as
//! Markdown (date, device, model, mode, precision, batch, images/s) and, with `--json`,
//! written as JSON with the same fields; `benchmarks/gpu_bench.py` runs the same
//! configuration in PyTorch, prints the same rows and the fr / PyTorch ratio.
//!
//! `--device cpu` runs the same code on the CPU: for smoke tests in a tiny configuration.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder};
use fr_backbone::{IResNet, IResNetConfig};
use fr_heads::arcface::{ArcFaceConfig, Fallback, MarginMode};
use fr_heads::{build_head, HeadConfig};
use fr_train::{SeededVarMap, Trainer, TrainerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::BenchArgs;

/// Numeric precision of the backbone (the command-line face of [`fr_train::Precision`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// bfloat16 backbone (f32 master weights and head when training).
    Bf16,
    /// float16 backbone (f32 master weights and head, loss scaling when training).
    #[value(alias = "fp16")]
    F16,
    /// float32 everywhere.
    #[value(alias = "fp32")]
    F32,
}

impl Precision {
    /// The trainer's precision.
    fn train(self) -> fr_train::Precision {
        match self {
            Self::Bf16 => fr_train::Precision::Bf16,
            Self::F16 => fr_train::Precision::F16,
            Self::F32 => fr_train::Precision::F32,
        }
    }

    /// The dtype the backbone computes in.
    fn backbone_dtype(self) -> DType {
        self.train().backbone_dtype()
    }

    /// The name used in the rows (and by `benchmarks/gpu_bench.py`): bf16, f16 or f32.
    fn name(self) -> &'static str {
        self.train().name()
    }
}

/// Where `bench gpu` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// The first CUDA GPU (needs a `--features cuda` build).
    Cuda,
    /// The CPU (smoke tests in a tiny configuration).
    Cpu,
}

/// What `bench gpu` measures for each model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// Full training step: forward, ArcFace loss, backward, clip, SGD.
    Train,
    /// Eval-mode forward.
    Infer,
}

impl Phase {
    /// `train` or `infer`.
    fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Infer => "infer",
        }
    }
}

/// Options of `bench gpu` (the shared `--batch`, `--steps`, `--warmup`, `--input-size` and
/// `--kernels` apply too; in `gpu` mode they default to 128, 50, 10, 112 and `auto`).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "gpu mode")]
pub struct GpuArgs {
    /// `gpu`: models to measure, comma separated (r18, r34, r50, r100, default).
    #[arg(long, value_delimiter = ',', default_value = "r50,r100")]
    pub models: Vec<String>,
    /// `gpu`: classes of the ArcFace head (MS1MV3: 93,431).
    #[arg(long, default_value_t = 93_431)]
    pub classes: usize,
    /// `gpu`: images per inference forward.
    #[arg(long, default_value_t = 512)]
    pub infer_batch: usize,
    /// `gpu`: backbone precision (training keeps f32 master weights and an f32 head).
    #[arg(long, value_enum, default_value = "bf16")]
    pub precision: Precision,
    /// `gpu`: `cuda` (default; needs a `--features cuda` build) or `cpu` (smoke tests).
    #[arg(long, value_enum)]
    pub device: Option<DeviceKind>,
    /// `gpu`: what to measure per model, comma separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "train,infer")]
    pub phases: Vec<Phase>,
    /// `gpu`: also write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One measurement: a Markdown row and a JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// UTC date of the run, `YYYY-MM-DD`.
    pub date: String,
    /// `fr`.
    pub framework: &'static str,
    /// The device's name (GPU model, or the CPU model and thread count).
    pub device: String,
    /// Model name (`r50`, `r100`, …).
    pub model: String,
    /// `train` or `infer`.
    pub mode: &'static str,
    /// `bf16`, `f16` or `f32`.
    pub precision: &'static str,
    /// Images per step.
    pub batch: usize,
    /// Input side in pixels.
    pub input_size: usize,
    /// Head classes (training only).
    pub classes: Option<usize>,
    /// Untimed steps before the timed ones.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// Seconds of the timed steps.
    pub seconds: f64,
    /// Timed training steps the trainer skipped (non-finite gradients, e.g. while an f16 loss
    /// scaler backs off): they ran no optimiser step. `None` for inference.
    pub skipped_steps: Option<usize>,
    /// Images per second over the timed steps.
    pub images_per_s: f64,
}

/// The JSON file `--json` writes.
#[derive(Debug, Serialize)]
struct Report<'a> {
    framework: &'static str,
    version: &'static str,
    date: &'a str,
    device: &'a str,
    rows: &'a [Row],
}

/// Open the device `--device` asks for.
fn open_device(kind: Option<DeviceKind>) -> Result<Device> {
    match kind {
        Some(DeviceKind::Cpu) => Ok(Device::Cpu),
        Some(DeviceKind::Cuda) | None => open_cuda(),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<Device> {
    Device::new_cuda(0).context(
        "opening CUDA device 0 (does `nvidia-smi` list a GPU?); `--device cpu` runs on the CPU",
    )
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<Device> {
    bail!(
        "this xtask was built without CUDA: build and run it with \
         `cargo run --release -p xtask --features cuda,cudnn -- bench gpu` \
         (needs nvcc to compile), or pass `--device cpu` for a smoke test"
    )
}

/// A human-readable name of `device`.
fn device_name(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|e| format!("CUDA device 0 (name unavailable: {e:?})")),
        Device::Cpu => {
            let model = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("model name"))
                        .and_then(|l| l.split(':').nth(1))
                        .map(|m| m.trim().to_string())
                })
                .unwrap_or_else(|| "CPU".into());
            format!("{model} ({} threads)", rayon::current_num_threads())
        }
        #[allow(unreachable_patterns)]
        other => format!("{:?}", other.location()),
    }
}

/// Today's UTC date as `YYYY-MM-DD` (civil-from-days, H. Hinnant's algorithm).
fn utc_date() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `n` f32 images `(n, 3, s, s)` uniform in [−1, 1) from a fixed seed, on `device`.
fn random_images(n: usize, s: usize, device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let pixels: Vec<f32> = (0..n * 3 * s * s)
        .map(|_| rng.random_range(-1.0..1.0f32))
        .collect();
    Ok(Tensor::from_vec(pixels, (n, 3, s, s), device)?)
}

/// Run `step` `warmup` times untimed and `steps` times timed (its argument says which), with
/// the device synchronised before each clock reading; the timed seconds.
fn time_steps(
    device: &Device,
    warmup: usize,
    steps: usize,
    mut step: impl FnMut(bool) -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        step(false)?;
    }
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..steps {
        step(true)?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64())
}

/// The head of arcface_torch's ms1mv3 configs: `CombinedMarginLoss(64, 1.0, 0.5, 0.0)`, whose
/// margin edits the target logit under `no_grad` (straight-through) without a fallback.
fn arcface_torch_head() -> HeadConfig {
    HeadConfig::ArcFace(ArcFaceConfig {
        scale: 64.0,
        margin: 0.5,
        margin_mode: MarginMode::StraightThrough,
        fallback: Fallback::None,
        ..ArcFaceConfig::default()
    })
}

/// Timed seconds of the training steps of `cfg`: the full trainer step on one batch on
/// `device` (backbone in `precision` with f32 master weights, head and loss in f32; a loss
/// scaler for f16).
fn train_seconds(
    cfg: &IResNetConfig,
    args: &BenchArgs,
    precision: Precision,
    device: &Device,
) -> Result<(f64, Option<usize>)> {
    let gpu = &args.gpu;
    let seeded = SeededVarMap::new(0);
    let backbone = IResNet::new(cfg, seeded.var_builder(precision.backbone_dtype(), device))?;
    let head = build_head(
        &arcface_torch_head(),
        cfg.embedding_size,
        gpu.classes,
        seeded.var_builder(DType::F32, device).pp("head"),
    )?;
    let config = TrainerConfig {
        precision: precision.train(),
        ..TrainerConfig::default()
    };
    let mut trainer = Trainer::new(
        Box::new(backbone),
        head,
        seeded.varmap().clone(),
        config,
        IResNet::is_trainable,
    )
    .context("building the trainer")?;
    // f32 images, as a loader delivers them: the trainer casts them to the backbone's dtype
    // (as autocast does in the first convolution).
    let images = random_images(args.batch, cfg.input_size, device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let labels: Vec<u32> = (0..args.batch)
        .map(|_| rng.random_range(0..gpu.classes as u32))
        .collect();
    let labels = Tensor::from_vec(labels, args.batch, device)?;
    let total = (args.warmup + args.steps) as u64;
    let mut skipped = 0;
    let seconds = time_steps(device, args.warmup, args.steps, |timed| {
        let outcome = trainer.step_tensors(&images, &labels, total)?;
        skipped += usize::from(timed && outcome.skipped);
        Ok(())
    })?;
    Ok((seconds, Some(skipped)))
}

/// Timed seconds of the inference forwards of `cfg`: eval mode, `--infer-batch` f32 images
/// cast to the backbone's dtype in each step.
fn infer_seconds(
    cfg: &IResNetConfig,
    args: &BenchArgs,
    precision: Precision,
    device: &Device,
) -> Result<(f64, Option<usize>)> {
    let dtype = precision.backbone_dtype();
    // Seeded weights, then handed to the network as plain tensors: variables would make
    // candle record an autograd graph of every forward.
    let seeded = SeededVarMap::new(0);
    IResNet::new(cfg, seeded.var_builder(DType::F32, device))?;
    let weights: HashMap<String, Tensor> = seeded
        .varmap()
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    let backbone = IResNet::new(cfg, VarBuilder::from_tensors(weights, dtype, device))?;
    let images = random_images(args.gpu.infer_batch, cfg.input_size, device)?;
    let seconds = time_steps(device, args.warmup, args.steps, |_| {
        fr_kernels::no_grad(|| backbone.forward_t(&images.to_dtype(dtype)?, false))?;
        Ok(())
    })?;
    Ok((seconds, None))
}

/// Run `bench gpu`: every model of `--models`, training then inference; print the rows and
/// write `--json`.
///
/// # Errors
/// No usable device, a bad model name or size, a candle failure, an unwritable `--json`.
pub fn run(args: &BenchArgs, root: &Path) -> Result<()> {
    let gpu = &args.gpu;
    if gpu.models.is_empty() || gpu.phases.is_empty() {
        bail!("--models and --phases must name at least one model and one phase");
    }
    if gpu.classes == 0 || gpu.infer_batch == 0 {
        bail!("--classes and --infer-batch must be at least 1");
    }
    let kernels: fr_kernels::Kernels = serde_json::from_value(serde_json::json!(args.kernels))
        .with_context(|| format!("--kernels {}: expected auto, fused or candle", args.kernels))?;
    let configs = gpu
        .models
        .iter()
        .map(|m| {
            let cfg = super::model_config(m, args.input_size, root)?.with_kernels(kernels);
            cfg.validate()?;
            Ok((m.clone(), cfg))
        })
        .collect::<Result<Vec<_>>>()?;
    let precision = gpu.precision;
    let device = open_device(gpu.device)?;
    let device_name = device_name(&device);
    let date = utc_date();
    eprintln!(
        "bench gpu on {device_name}: {} precision, train batch {}, infer batch {}, {} classes, \
         {} warm-up + {} timed steps",
        precision.name(),
        args.batch,
        gpu.infer_batch,
        gpu.classes,
        args.warmup,
        args.steps
    );

    println!("| date | framework | device | model | mode | precision | batch | images/s |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, cfg) in &configs {
        for &phase in &gpu.phases {
            let (batch, seconds) = match phase {
                Phase::Train => (args.batch, train_seconds(cfg, args, precision, &device)),
                Phase::Infer => (
                    gpu.infer_batch,
                    infer_seconds(cfg, args, precision, &device),
                ),
            };
            let (seconds, skipped_steps) = seconds
                .with_context(|| format!("{name} {} ({})", phase.name(), precision.name()))?;
            if let Some(n @ 1..) = skipped_steps {
                eprintln!(
                    "warning: {name} train: {n} of {} timed steps were skipped (non-finite \
                     gradients or loss-scale backoff): they did no optimiser step; raise --warmup",
                    args.steps
                );
            }
            let row = Row {
                date: date.clone(),
                framework: "fr",
                device: device_name.clone(),
                model: name.clone(),
                mode: phase.name(),
                precision: precision.name(),
                batch,
                input_size: cfg.input_size,
                classes: (phase == Phase::Train).then_some(gpu.classes),
                warmup: args.warmup,
                steps: args.steps,
                seconds,
                skipped_steps,
                images_per_s: (batch * args.steps) as f64 / seconds.max(1e-9),
            };
            println!(
                "| {} | fr | {} | {} | {} | {} | {} | {:.1} |",
                row.date,
                row.device,
                row.model,
                row.mode,
                row.precision,
                row.batch,
                row.images_per_s
            );
            std::io::stdout().flush().ok();
            rows.push(row);
        }
    }
    if let Some(path) = &gpu.json {
        let report = Report {
            framework: "fr",
            version: env!("CARGO_PKG_VERSION"),
            date: &date,
            device: &device_name,
            rows: &rows,
        };
        let text = serde_json::to_string_pretty(&report)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
