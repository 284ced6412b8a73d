//! `cargo xtask bench train|infer`: IResNet throughput (images/s) and peak memory on this
//! machine, one model per process so that peak RSS belongs to that model alone.
//! `cargo xtask bench loader`: images/s of the RecordIO batch loader (see [`loader`]).
//! `cargo xtask bench gpu`: images/s of IResNet-50 / -100 training and inference on one GPU in
//! arcface_torch's configuration (see [`gpu`]).
//!
//! Prints one Markdown row per run; benchmarks/README.md collects them beside the PyTorch
//! numbers of the same model, batch and thread count.

mod gpu;
mod loader;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use fr_backbone::{BackboneConfig, IResNet, IResNetConfig};
use fr_heads::{build_head, HeadConfig};
use fr_train::{SeededVarMap, Trainer, TrainerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use fr_run::Preset;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Forward, ArcFace loss, backward and an SGD step.
    Train,
    /// Eval-mode forward only (embedding extraction).
    Infer,
    /// The batch loader over a generated `.rec` of 112x112 JPEGs: read, decode, flip,
    /// normalise (`--data`, `--images`; `--steps`/`--warmup` count epochs).
    Loader,
    /// IResNet training and inference images/s on one GPU in arcface_torch's ms1mv3_r50
    /// configuration (`--models`, `--precision`, `--device`, `--json`; see the `gpu mode`
    /// options).
    Gpu,
}

/// Command-line options of `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Train or infer.
    #[arg(value_enum)]
    pub mode: Mode,
    /// Model: r18, r34, r50, r100, or `default` (the lh2face CPU preset's backbone).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Input side in pixels (default: 112, or 56 for `default`).
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Images per step (`gpu`: 128, training only).
    #[arg(long, default_value_t = 32, default_value_if("mode", "gpu", "128"))]
    pub batch: usize,
    /// Timed steps (`gpu`: 50).
    #[arg(long, default_value_t = 3, default_value_if("mode", "gpu", "50"))]
    pub steps: usize,
    /// Untimed warm-up steps (`gpu`: 10).
    #[arg(long, default_value_t = 1, default_value_if("mode", "gpu", "10"))]
    pub warmup: usize,
    /// Kernels: `auto` (fr-kernels on the CPU), `fused`, or `candle` (candle's own ops, the
    /// reference path) for an A/B comparison.
    #[arg(long, default_value = "auto")]
    pub kernels: String,
    /// `loader`: folder of the benchmark's train.rec (generated there when missing).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// `loader`: images of the generated train.rec.
    #[arg(long, default_value_t = 20_000)]
    pub images: usize,
    /// `loader`: time JPEG decoding alone instead of the loader: the first `--decode-images`
    /// records' payloads held in memory, decoded to RGB on one thread (microseconds per image).
    #[arg(long)]
    pub decode_only: bool,
    /// `loader --decode-only`: records decoded per pass.
    #[arg(long, default_value_t = 3000)]
    pub decode_images: usize,
    /// Options of `gpu`.
    #[command(flatten)]
    pub gpu: gpu::GpuArgs,
}

fn model_config(name: &str, input_size: Option<usize>, root: &Path) -> Result<IResNetConfig> {
    let cfg = match name {
        "r18" => IResNetConfig::r18(),
        "r34" => IResNetConfig::r34(),
        "r50" => IResNetConfig::r50(),
        "r100" => IResNetConfig::r100(),
        "default" => {
            // The backbone of the lh2face preset, read from the preset itself.
            let path = root.join("configs").join("lh2face.toml");
            let preset: Preset = fr_run::config_file::load(&path, &[])?;
            match preset.backbone {
                BackboneConfig::Iresnet(c) => c,
                other => bail!("the bench measures IResNets; lh2face.toml has {other:?}"),
            }
        }
        other => bail!("unknown model `{other}` (r18, r34, r50, r100, default)"),
    };
    Ok(match input_size {
        Some(s) => cfg.with_input_size(s),
        None => cfg,
    })
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`); `None` elsewhere.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Run the benchmark and print its Markdown row.
///
/// # Errors
/// A bad model name or size, or a candle failure.
pub fn run(args: &BenchArgs, root: &Path) -> Result<()> {
    if args.batch == 0 || args.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    if args.mode == Mode::Loader {
        return loader::run(args);
    }
    if args.mode == Mode::Gpu {
        return gpu::run(args, root);
    }
    let kernels: fr_kernels::Kernels = serde_json::from_value(serde_json::json!(args.kernels))
        .with_context(|| format!("--kernels {}: expected auto, fused or candle", args.kernels))?;
    let cfg = model_config(&args.model, args.input_size, root)?.with_kernels(kernels);
    cfg.validate()?;
    let device = Device::Cpu;
    let seeded = SeededVarMap::new(0);
    let vb = seeded.var_builder(DType::F32, &device);
    let backbone = IResNet::new(&cfg, vb.clone())?;
    let n_classes = 1000;
    let s = cfg.input_size;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let pixels: Vec<f32> = (0..args.batch * 3 * s * s)
        .map(|_| rng.random_range(-1.0..1.0f32))
        .collect();
    let images = Tensor::from_vec(pixels, (args.batch, 3, s, s), &device)?;
    let labels: Vec<u32> = (0..args.batch)
        .map(|_| rng.random_range(0..n_classes as u32))
        .collect();
    let labels = Tensor::from_vec(labels, args.batch, &device)?;

    let total = args.warmup + args.steps;
    let elapsed = match args.mode {
        Mode::Infer => {
            let mut start = Instant::now();
            for i in 0..total {
                if i == args.warmup {
                    start = Instant::now();
                }
                fr_kernels::no_grad(|| backbone.forward_t(&images, false))?.to_vec2::<f32>()?;
            }
            start.elapsed()
        }
        Mode::Train => {
            let head = build_head(
                &HeadConfig::ArcFace(Default::default()),
                cfg.embedding_size,
                n_classes,
                vb.pp("head"),
            )?;
            let mut trainer = Trainer::new(
                Box::new(backbone),
                head,
                seeded.varmap().clone(),
                TrainerConfig::default(),
                IResNet::is_trainable,
            )
            .context("building the trainer")?;
            let mut start = Instant::now();
            for i in 0..total {
                if i == args.warmup {
                    start = Instant::now();
                }
                trainer.step_tensors(&images, &labels, total as u64)?;
            }
            start.elapsed()
        }
        Mode::Loader | Mode::Gpu => unreachable!("handled above"),
    };
    let ips = (args.batch * args.steps) as f64 / elapsed.as_secs_f64().max(1e-9);
    let rss = peak_rss_mib()
        .map(|m| format!("{m:.0}"))
        .unwrap_or_else(|| "–".into());
    println!("| model | input | batch | mode | threads | images/s | peak RSS (MiB) |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {s} | {} | {:?} | {} | {ips:.2} | {rss} |",
        args.model,
        args.batch,
        args.mode,
        rayon::current_num_threads()
    );
    Ok(())
}
