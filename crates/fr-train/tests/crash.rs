//! Crash safety: a training process killed with SIGKILL (in the middle of a step, or in the
//! middle of a checkpoint write) leaves its last complete checkpoint intact, and a resumed
//! run continues with exactly the losses of an uninterrupted run with the same seed, bit for
//! bit, on CPU.
//!
//! The test binary is its own child process: `crash_child` is a no-op unless
//! `FR_TRAIN_CRASH_DIR` is set, in which case it trains a small model (a linear backbone with
//! a running mean, AdaFace, SGD with momentum, poly schedule with warm-up) on seeded synthetic
//! batches, prints one `loss <step> <f64 bits>` line per step, checkpoints every
//! [`SAVE_EVERY`] steps, and can stop itself ([`PAUSE_VAR`]) inside a step or at a point of a
//! checkpoint write, after creating a marker file; the parent waits for the marker and kills
//! it with SIGKILL.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{Init, Linear, VarBuilder, VarMap};
use fr_heads::{Head, HeadConfig};
use fr_train::checkpoint::{set_save_hook, SavePoint, LATEST_FILE, MODEL_FILE};
use fr_train::{
    not_running_stat, AuxiliaryBatch, AuxiliaryLoss, AuxiliaryOutput, LrSchedule, OptimizerConfig,
    SeededVarMap, SgdConfig, Trainer, TrainerConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The run directory of a child run; unset: `crash_child` does nothing.
const DIR_VAR: &str = "FR_TRAIN_CRASH_DIR";
/// Set to resume from the run directory's newest good checkpoint.
const RESUME_VAR: &str = "FR_TRAIN_CRASH_RESUME";
/// `step:N` (inside step N, after the forward pass), `staged:K` or `renamed:K` (at that
/// [`SavePoint`] of this process's K-th save, 1-based): create the marker file and sleep.
const PAUSE_VAR: &str = "FR_TRAIN_CRASH_PAUSE";
/// The marker file created at the pause.
const MARKER_VAR: &str = "FR_TRAIN_CRASH_MARKER";

const TOTAL_STEPS: u64 = 12;
const SAVE_EVERY: u64 = 3;
const IN: usize = 12;
const EMB: usize = 8;
const CLASSES: usize = 4;

/// Flatten → Linear, with a running mean of the embeddings (saved and restored like
/// BatchNorm's).
struct Backbone {
    fc: Linear,
    running_mean: Var,
}

impl ModuleT for Backbone {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let e = self.fc.forward(&xs.flatten_from(1)?)?;
        if train {
            let m = ((self.running_mean.as_tensor() * 0.9)? + (e.detach().mean(0)? * 0.1)?)?;
            self.running_mean.set(&m)?;
        }
        Ok(e)
    }
}

/// Adds a zero (the loss is unchanged, bit for bit) and, at the step [`PAUSE_VAR`] names,
/// stops the process inside the step.
struct PauseInStep(Option<u64>);

impl AuxiliaryLoss for PauseInStep {
    fn name(&self) -> &'static str {
        "pause_in_step"
    }

    fn loss(
        &mut self,
        batch: &AuxiliaryBatch<'_>,
        _backbone: &dyn ModuleT,
        _head: &mut dyn Head,
    ) -> Result<AuxiliaryOutput, Box<dyn std::error::Error + Send + Sync>> {
        if self.0 == Some(batch.ctx.step) {
            pause();
        }
        Ok(AuxiliaryOutput {
            loss: Tensor::zeros((), batch.embeddings.dtype(), batch.embeddings.device())?,
            stats: BTreeMap::new(),
        })
    }
}

/// Create the marker file and wait to be killed.
fn pause() {
    let marker = std::env::var(MARKER_VAR).expect("marker path");
    std::fs::write(marker, b"paused").expect("marker written");
    std::thread::sleep(Duration::from_secs(120));
    panic!("the parent did not kill this process");
}

fn pause_at_save(point: SavePoint, _path: &Path) {
    static AT: OnceLock<SavePoint> = OnceLock::new();
    let at =
        *AT.get_or_init(
            || match std::env::var(PAUSE_VAR).unwrap().split(':').next().unwrap() {
                "staged" => SavePoint::Staged,
                _ => SavePoint::Renamed,
            },
        );
    if point == at {
        pause();
    }
}

fn trainer(pause_step: Option<u64>) -> Trainer {
    let params = SeededVarMap::new(11);
    let vb: VarBuilder = params.var_builder(DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(IN, EMB, vb.pp("fc")).unwrap();
    vb.get_with_hints(EMB, "running_mean", Init::Const(0.0))
        .unwrap();
    let head_cfg = HeadConfig::default_for("adaface").unwrap();
    let head = fr_heads::build_head(&head_cfg, EMB, CLASSES, vb.pp("head")).unwrap();
    let varmap: VarMap = params.varmap().clone();
    let running_mean = varmap.data().lock().unwrap()["running_mean"].clone();
    let config = TrainerConfig {
        optimizer: OptimizerConfig::Sgd(SgdConfig {
            lr: 0.2,
            momentum: 0.9,
            ..SgdConfig::default()
        }),
        schedule: LrSchedule::Poly {
            power: 1.0,
            warmup_steps: 2,
        },
        seed: 11,
        ..TrainerConfig::default()
    };
    Trainer::new(
        Box::new(Backbone { fc, running_mean }),
        head,
        varmap,
        config,
        not_running_stat,
    )
    .unwrap()
    .with_auxiliary(Box::new(PauseInStep(pause_step)))
    .unwrap()
}

/// Batch `i` (a function of the step alone, so a resumed run sees the same data).
fn batch(i: u64) -> (Tensor, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(500 + i);
    let b = 16;
    let labels: Vec<u32> = (0..b).map(|j| (j % CLASSES) as u32).collect();
    let mut images = vec![0f32; b * IN];
    for (j, &y) in labels.iter().enumerate() {
        for k in 0..IN {
            let signal = if k % CLASSES == y as usize { 1.5 } else { 0.0 };
            images[j * IN + k] = signal + rng.random_range(-0.5..0.5);
        }
    }
    (
        Tensor::from_vec(images, (b, 3, 2, 2), &Device::Cpu).unwrap(),
        Tensor::new(labels, &Device::Cpu).unwrap(),
    )
}

/// The child process's training run (a no-op in the parent's test run).
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let pause = std::env::var(PAUSE_VAR).ok();
    let (kind, n) = match pause.as_deref().and_then(|p| p.split_once(':')) {
        Some((k, n)) => (k.to_string(), Some(n.parse::<u64>().unwrap())),
        None => (String::new(), None),
    };
    let mut t = trainer(if kind == "step" { n } else { None });
    if std::env::var(RESUME_VAR).is_ok() {
        t.resume(&dir).unwrap();
        println!("resumed {}", t.state().step);
    }
    let mut saves = 0;
    while t.state().step < TOTAL_STEPS {
        let step = t.state().step;
        let (images, labels) = batch(step);
        let out = t.step_tensors(&images, &labels, TOTAL_STEPS).unwrap();
        assert!(!out.skipped);
        println!("loss {step} {:016x}", out.loss.to_bits());
        if t.state().step % SAVE_EVERY == 0 {
            saves += 1;
            if (kind == "staged" || kind == "renamed") && Some(saves) == n {
                set_save_hook(Some(pause_at_save));
            }
            t.save(&dir).unwrap();
        }
    }
}

/// What a child printed: the step it resumed at, and `step → loss bits`.
#[derive(Debug, Default)]
struct ChildOutput {
    resumed: Option<u64>,
    losses: BTreeMap<u64, u64>,
}

fn spawn(dir: &Path, resume: bool, pause: Option<&str>, marker: &Path) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(DIR_VAR, dir)
        .env(MARKER_VAR, marker)
        .env_remove(RESUME_VAR)
        .env_remove(PAUSE_VAR)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if resume {
        cmd.env(RESUME_VAR, "1");
    }
    if let Some(p) = pause {
        cmd.env(PAUSE_VAR, p);
    }
    cmd.spawn().expect("child process started")
}

/// Read the child's stdout to its end (its exit or its death).
fn collect(child: &mut Child) -> ChildOutput {
    let mut out = ChildOutput::default();
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest prints `test crash_child ... ` without a newline before the test's output.
        let line = ["loss ", "resumed "]
            .iter()
            .find_map(|tag| line.find(tag).map(|i| &line[i..]))
            .unwrap_or("");
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["loss", step, bits] => {
                out.losses.insert(
                    step.parse().unwrap(),
                    u64::from_str_radix(bits, 16).unwrap(),
                );
            }
            ["resumed", step] => out.resumed = Some(step.parse().unwrap()),
            _ => {}
        }
    }
    out
}

/// Run a child to its end; it must succeed.
fn run_to_end(dir: &Path, resume: bool) -> ChildOutput {
    let marker = dir.with_extension("marker");
    let mut child = spawn(dir, resume, None, &marker);
    let out = collect(&mut child);
    let status = child.wait().unwrap();
    assert!(status.success(), "child run failed: {status}");
    out
}

/// Run a child until it pauses at `pause`, then SIGKILL it; returns what it printed.
fn run_and_kill(dir: &Path, pause: &str) -> ChildOutput {
    let marker = dir.with_extension("marker");
    let _ = std::fs::remove_file(&marker);
    let mut child = spawn(dir, false, Some(pause), &marker);
    let start = Instant::now();
    while !marker.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("child exited ({status}) before pausing at {pause}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "child never paused"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // `Child::kill` is SIGKILL on Unix: no destructor, no flush, no cleanup runs.
    child.kill().unwrap();
    let out = collect(&mut child);
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed child reported success");
    let _ = std::fs::remove_file(&marker);
    out
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fr-train-crash-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The uninterrupted run's losses, computed once.
fn reference() -> &'static BTreeMap<u64, u64> {
    static REF: OnceLock<BTreeMap<u64, u64>> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tmpdir("reference");
        let out = run_to_end(&dir, false);
        assert_eq!(out.losses.len() as u64, TOTAL_STEPS);
        let _ = std::fs::remove_dir_all(&dir);
        out.losses
    })
}

fn latest(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(LATEST_FILE))
        .unwrap()
        .trim()
        .to_string()
}

/// The losses printed before the kill and after the resume equal the reference, and the resume
/// started at `from` and ran to the end.
fn assert_continues_exactly(before: &ChildOutput, after: &ChildOutput, from: u64) {
    let reference = reference();
    for (step, bits) in &before.losses {
        assert_eq!(reference[step], *bits, "step {step} before the kill");
    }
    assert_eq!(after.resumed, Some(from));
    let steps: Vec<u64> = after.losses.keys().copied().collect();
    assert_eq!(steps, (from..TOTAL_STEPS).collect::<Vec<_>>());
    for (step, bits) in &after.losses {
        assert_eq!(
            reference[step],
            *bits,
            "step {step} after resuming at {from}: {} vs {}",
            f64::from_bits(*bits),
            f64::from_bits(reference[step])
        );
    }
}

#[test]
fn killed_during_a_step_resumes_bit_identically() {
    let dir = tmpdir("step");
    // Inside step 7 (after the forward pass): saves at steps 3 and 6 are complete.
    let before = run_and_kill(&dir, "step:7");
    assert_eq!(
        before.losses.keys().copied().collect::<Vec<_>>(),
        (0..7).collect::<Vec<_>>()
    );
    assert_eq!(latest(&dir), "step-00000006");
    let after = run_to_end(&dir, true);
    assert_continues_exactly(&before, &after, 6);

    // Then damage the newest save of the finished run: the resume refuses it and uses the
    // previous one (step 9), again bit-identical to the reference.
    assert_eq!(latest(&dir), "step-00000012");
    let model = dir.join("step-00000012").join(MODEL_FILE);
    let mut bytes = std::fs::read(&model).unwrap();
    let at = bytes.len() - 2;
    bytes[at] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();
    let again = run_to_end(&dir, true);
    assert_continues_exactly(&after, &again, 9);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn killed_while_staging_a_checkpoint_resumes_from_the_previous_one() {
    let dir = tmpdir("staged");
    // The second save (step 6) is fully written in its staging directory, not renamed.
    let before = run_and_kill(&dir, "staged:2");
    assert_eq!(before.losses.len(), 6);
    assert_eq!(latest(&dir), "step-00000003");
    assert!(dir.join(".step-00000006.tmp").is_dir());
    assert!(!dir.join("step-00000006").exists());
    let after = run_to_end(&dir, true);
    assert_continues_exactly(&before, &after, 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn killed_before_latest_switches_resumes_from_the_previous_one() {
    let dir = tmpdir("renamed");
    // The second save (step 6) is in place, but `latest` still names the first.
    let before = run_and_kill(&dir, "renamed:2");
    assert_eq!(before.losses.len(), 6);
    assert_eq!(latest(&dir), "step-00000003");
    assert!(dir.join("step-00000006").is_dir());
    let after = run_to_end(&dir, true);
    assert_continues_exactly(&before, &after, 3);
    // The resumed run's own save of step 6 went beside the orphan.
    assert!(dir.join("step-00000006.1").is_dir() || latest(&dir) == "step-00000012");
    std::fs::remove_dir_all(&dir).unwrap();
}
