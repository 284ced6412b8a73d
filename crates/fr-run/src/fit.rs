//! The epoch loop: every training run of fr (a preset's methods, `fr train` on one process or
//! many, the students, QuantFace's distillation) goes through [`fit`].
//!
//! It follows arcface_torch's `train_v2.py` loop: for each epoch, for each batch, one step; a
//! checkpoint at the end of every epoch; the schedule spans every epoch. What a workflow adds
//! (averaging the reconstruction branch's terms, a teacher's per-epoch snapshots, evaluation
//! during training, [`crate::evaluate::VerificationCallback`]) plugs in through [`FitHooks`].
//!
//! ```no_run
//! # fn demo(trainer: &mut fr_train::Trainer, loader: &fr_data::BatchLoader) -> fr_run::Result<()> {
//! use fr_run::fit::{fit, FitConfig};
//! let report = fit(trainer, loader, &FitConfig::new("arcface", 8), &mut ())?;
//! println!("last epoch's mean loss: {:?}", report.epoch_loss.last());
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fr_data::Batch;
use fr_data::BatchLoader;
use fr_train::{StepOutcome, Trainer};
use indicatif::ProgressBar;
use tracing::info;

use crate::progress::progress_bar;
use crate::{bail, Result};

/// What [`fit`] drives: one optimisation step per batch. [`Trainer`] is one (backbone + head,
/// optionally with an auxiliary loss, data parallelism, mixed precision); label-free
/// distillation (`reproduce`'s students and QuantFace) is another.
pub trait Learner {
    /// Called before the first step of every epoch (0-based): schedules that depend on the
    /// epoch (a sub-center drop, a multi-step teacher) switch here.
    fn set_epoch(&mut self, epoch: usize);

    /// One step on `batch` of a run of `total_steps` steps (the LR schedule's horizon).
    ///
    /// # Errors
    /// A failed forward or backward pass (a non-finite loss is a skipped step, not an error).
    fn step(&mut self, batch: &Batch, total_steps: u64) -> Result<StepOutcome>;

    /// Steps taken so far, skipped ones included (a resumed run starts above 0).
    fn steps_done(&self) -> u64;

    /// Writes a checkpoint under `dir` and returns its folder.
    ///
    /// # Errors
    /// An unwritable folder.
    fn save(&mut self, dir: &Path) -> Result<PathBuf>;
}

impl Learner for Trainer {
    fn set_epoch(&mut self, epoch: usize) {
        Trainer::set_epoch(self, epoch);
    }

    fn step(&mut self, batch: &Batch, total_steps: u64) -> Result<StepOutcome> {
        Ok(Trainer::step(self, batch, total_steps)?)
    }

    fn steps_done(&self) -> u64 {
        self.state().step
    }

    fn save(&mut self, dir: &Path) -> Result<PathBuf> {
        Ok(Trainer::save(self, dir)?)
    }
}

/// Callbacks of [`fit`]. Every method has an empty default; `()` is the hook that does
/// nothing.
pub trait FitHooks<L: ?Sized> {
    /// After every step (skipped ones too), with the 0-based epoch.
    ///
    /// # Errors
    /// Whatever the hook fails with stops the run.
    fn after_step(
        &mut self,
        _learner: &mut L,
        _epoch: usize,
        _outcome: &StepOutcome,
    ) -> Result<()> {
        Ok(())
    }

    /// After every epoch and its checkpoint, with the number of epochs done (1-based).
    ///
    /// # Errors
    /// Whatever the hook fails with stops the run.
    fn after_epoch(&mut self, _learner: &mut L, _epochs_done: usize) -> Result<()> {
        Ok(())
    }
}

impl<L: ?Sized> FitHooks<L> for () {}

/// An optional hook: nothing when `None`.
impl<L: ?Sized, H: FitHooks<L>> FitHooks<L> for Option<H> {
    fn after_step(&mut self, learner: &mut L, epoch: usize, outcome: &StepOutcome) -> Result<()> {
        match self {
            Some(h) => h.after_step(learner, epoch, outcome),
            None => Ok(()),
        }
    }

    fn after_epoch(&mut self, learner: &mut L, epochs_done: usize) -> Result<()> {
        match self {
            Some(h) => h.after_epoch(learner, epochs_done),
            None => Ok(()),
        }
    }
}

/// Two hooks in one: `a`'s callbacks, then `b`'s.
impl<L: ?Sized, A: FitHooks<L>, B: FitHooks<L>> FitHooks<L> for (A, B) {
    fn after_step(&mut self, learner: &mut L, epoch: usize, outcome: &StepOutcome) -> Result<()> {
        self.0.after_step(learner, epoch, outcome)?;
        self.1.after_step(learner, epoch, outcome)
    }

    fn after_epoch(&mut self, learner: &mut L, epochs_done: usize) -> Result<()> {
        self.0.after_epoch(learner, epochs_done)?;
        self.1.after_epoch(learner, epochs_done)
    }
}

/// One line per `every` steps, as arcface_torch's `CallBackLogging`: step, epoch, the mean loss
/// over those steps (skipped ones left out), the learning rate, images/s over them and the time
/// left, logged (`tracing`, target `fr_run::fit`) and, with a file, appended to it as JSON lines
/// (`{"step":…,"epoch":…,"loss":…,"lr":…,"images_per_second":…,"eta_seconds":…}`).
pub struct StepLog {
    every: u64,
    images_per_step: usize,
    total_steps: u64,
    file: Option<std::io::BufWriter<std::fs::File>>,
    window: (f64, usize, Instant),
}

impl StepLog {
    /// A line every `every` steps (0: never) of a run of `total_steps` steps of
    /// `images_per_step` images (all ranks), written to `jsonl` as well when given (created,
    /// or appended to when it exists: a resumed run goes on in the same file).
    ///
    /// # Errors
    /// A file that cannot be opened, named.
    pub fn new(
        every: u64,
        images_per_step: usize,
        total_steps: u64,
        jsonl: Option<&Path>,
    ) -> Result<Self> {
        let file = jsonl
            .map(|path| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map(std::io::BufWriter::new)
                    .map_err(|e| {
                        crate::Error::from(e).context(format!("opening {}", path.display()))
                    })
            })
            .transpose()?;
        Ok(Self {
            every,
            images_per_step,
            total_steps,
            file,
            window: (0.0, 0, Instant::now()),
        })
    }
}

impl<L: ?Sized> FitHooks<L> for StepLog {
    fn after_step(&mut self, _: &mut L, epoch: usize, outcome: &StepOutcome) -> Result<()> {
        if !outcome.skipped {
            self.window.0 += outcome.loss;
            self.window.1 += 1;
        }
        let done = outcome.step + 1;
        if self.every == 0 || done % self.every != 0 {
            return Ok(());
        }
        let (sum, count, since) = std::mem::replace(&mut self.window, (0.0, 0, Instant::now()));
        let seconds = since.elapsed().as_secs_f64().max(1e-9);
        let loss = if count > 0 {
            sum / count as f64
        } else {
            f64::NAN
        };
        let images_per_second = (self.every as usize * self.images_per_step) as f64 / seconds;
        let eta_seconds =
            self.total_steps.saturating_sub(done) as f64 * seconds / self.every as f64;
        info!(
            step = done,
            epoch = epoch + 1,
            loss = format!("{loss:.4}"),
            lr = format!("{:.6}", outcome.lr),
            images_per_second = format!("{images_per_second:.1}"),
            eta_seconds = format!("{eta_seconds:.0}"),
            "training"
        );
        if let Some(f) = self.file.as_mut() {
            use std::io::Write;
            let line = serde_json::json!({
                "step": done,
                "epoch": epoch + 1,
                "loss": loss,
                "lr": outcome.lr,
                "images_per_second": images_per_second,
                "eta_seconds": eta_seconds,
            });
            writeln!(f, "{line}").and_then(|()| f.flush())?;
        }
        Ok(())
    }
}

/// A hook that calls its closure after every epoch with the epochs done and the learner (a
/// teacher's per-epoch snapshots for multi-step distillation, say).
pub struct OnEpoch<F>(pub F);

impl<L: ?Sized, F: FnMut(usize, &mut L) -> Result<()>> FitHooks<L> for OnEpoch<F> {
    fn after_epoch(&mut self, learner: &mut L, epochs_done: usize) -> Result<()> {
        (self.0)(epochs_done, learner)
    }
}

/// How long to train and where checkpoints go.
#[derive(Debug, Clone, PartialEq)]
pub struct FitConfig {
    /// The run's name in the progress bar and the logs.
    pub label: String,
    /// Epochs of the run; the LR schedule spans all of them.
    pub epochs: usize,
    /// Stop after this many steps in all (counting a resumed run's earlier ones); the
    /// schedule is not shortened. `None`: every epoch.
    pub max_steps: Option<u64>,
    /// Save a checkpoint here at the end of every epoch, and where `max_steps` stops inside
    /// one. `None`: no checkpoints.
    pub checkpoints: Option<PathBuf>,
    /// Images one step sees in all: the batch times this factor (the world size of a
    /// data-parallel run, whose per-rank batches are a slice of the global one).
    pub world_size: usize,
    /// Show a progress bar (only rank 0 of a data-parallel run should).
    pub progress: bool,
}

impl FitConfig {
    /// `epochs` epochs with a progress bar labelled `label`, no checkpoints, one process.
    pub fn new(label: impl Into<String>, epochs: usize) -> Self {
        Self {
            label: label.into(),
            epochs,
            max_steps: None,
            checkpoints: None,
            world_size: 1,
            progress: true,
        }
    }
}

/// What a [`fit`] run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FitReport {
    /// The step the run started at (above 0 when it resumed).
    pub first_step: u64,
    /// Mean loss of each epoch this run trained, over its steps that were not skipped (NaN
    /// when all were).
    pub epoch_loss: Vec<f64>,
    /// The loss of every step this run took, skipped ones included.
    pub step_loss: Vec<f64>,
    /// Steps that were not skipped.
    pub good_steps: u64,
    /// Images seen by all ranks.
    pub images: usize,
    /// Wall-clock training time, seconds.
    pub train_seconds: f64,
    /// The newest checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Mean of every step statistic over the last epoch's steps that were not skipped (the
    /// reconstruction branch's terms, a head's statistics).
    pub last_epoch_stats: BTreeMap<String, f64>,
}

impl FitReport {
    /// Images per second of wall-clock training time.
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.train_seconds.max(1e-9)
    }
}

/// Trains `learner` on `loader` for `config.epochs` epochs, from the step it is at (a resumed
/// run goes on inside the epoch where it stopped, without decoding the batches before).
///
/// Per epoch: [`Learner::set_epoch`], one [`Learner::step`] per batch
/// ([`FitHooks::after_step`] after each), a checkpoint when `config.checkpoints` is set, then
/// [`FitHooks::after_epoch`]. The LR schedule's horizon is every epoch's steps.
///
/// # Errors
/// An empty loader, a failed batch, step, checkpoint or hook.
pub fn fit<L: Learner + ?Sized>(
    learner: &mut L,
    loader: &BatchLoader,
    config: &FitConfig,
    hooks: &mut dyn FitHooks<L>,
) -> Result<FitReport> {
    let per_epoch = loader.batches_per_epoch() as u64;
    if per_epoch == 0 {
        bail!("{}: the training set is empty", config.label);
    }
    let total = per_epoch * config.epochs as u64;
    let stop_at = config.max_steps.map_or(total, |m| m.min(total));
    let first_step = learner.steps_done();
    let pb = if config.progress {
        let pb = progress_bar(stop_at, &config.label);
        pb.set_position(first_step.min(stop_at));
        pb
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    let mut report = FitReport {
        first_step,
        ..FitReport::default()
    };
    let mut saved_step = None;
    let first_epoch = (first_step / per_epoch) as usize;
    'epochs: for epoch in first_epoch..config.epochs {
        learner.set_epoch(epoch);
        let (mut sum, mut count) = (0.0, 0usize);
        let mut stats: BTreeMap<String, f64> = BTreeMap::new();
        // A resumed run goes on inside the epoch where it stopped.
        let skip = if epoch == first_epoch {
            (first_step % per_epoch) as usize
        } else {
            0
        };
        for batch in loader.epoch_from(epoch as u64, skip) {
            if learner.steps_done() >= stop_at {
                break 'epochs;
            }
            let batch = batch?;
            report.images += batch.indices.len() * config.world_size;
            let out = learner.step(&batch, total)?;
            report.step_loss.push(out.loss);
            if !out.skipped {
                sum += out.loss;
                count += 1;
                for (k, v) in &out.stats {
                    *stats.entry(k.clone()).or_default() += v;
                }
            }
            hooks.after_step(learner, epoch, &out)?;
            pb.set_message(format!(
                "epoch {} loss {:.3} lr {:.4}",
                epoch + 1,
                out.loss,
                out.lr
            ));
            pb.inc(1);
        }
        report.good_steps += count as u64;
        let mean = if count > 0 {
            sum / count as f64
        } else {
            f64::NAN
        };
        report.epoch_loss.push(mean);
        report.last_epoch_stats = stats
            .into_iter()
            .map(|(k, v)| (k, v / count.max(1) as f64))
            .collect();
        if let Some(dir) = &config.checkpoints {
            report.last_checkpoint = Some(learner.save(dir)?);
            saved_step = Some(learner.steps_done());
        }
        info!(
            run = %config.label,
            epoch = epoch + 1,
            loss = format!("{mean:.4}"),
            "epoch done"
        );
        hooks.after_epoch(learner, epoch + 1)?;
    }
    let done = learner.steps_done();
    if let Some(dir) = &config.checkpoints {
        if saved_step != Some(done) && done > first_step {
            // Stopped inside an epoch by max_steps: keep that state too.
            report.last_checkpoint = Some(learner.save(dir)?);
        }
    }
    pb.finish_and_clear();
    report.train_seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
