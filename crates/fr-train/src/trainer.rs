//! One training step, in the order of insightface arcface_torch's `train_v2.py`:
//! backbone `forward_t(images, train = true)` → head loss → backward → clip the global
//! gradient norm (5 by default) → optimiser step with the scheduled learning rate.
//!
//! With an [`AuxiliaryLoss`] ([`Trainer::with_auxiliary`]) its loss is added to the head's
//! before the backward pass; without one the step is exactly the above.
//!
//! A step whose loss or gradient norm is non-finite is skipped: no parameter moves, the
//! running statistics (variables named `*running_*`) and the head's state are restored to
//! their values before the step, the skip is counted and logged, and the step counter still
//! advances (the batch was consumed; the schedule counts batches). After
//! [`TrainerConfig::max_consecutive_skips`] skips in a row the step returns
//! [`Error::Diverged`] with the learning rate, the last finite loss and the head's name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use candle_nn::{ModuleT, VarMap};
use fr_data::Batch;
use fr_heads::{Head, StepContext};
use serde::{Deserialize, Serialize};

use crate::auxiliary::{AuxiliaryBatch, AuxiliaryLoss};
use crate::checkpoint::{load_checkpoint, prune_checkpoints, save_checkpoint, TrainState};
use crate::clip::{grad_norm, scale_grads};
use crate::optim::{AnyOptimizer, OptimizerConfig};
use crate::schedule::LrSchedule;
use crate::{Error, Result};

/// How a [`Trainer`] optimises; defaults are arcface_torch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Optimiser and base learning rate.
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule over the run's steps.
    pub schedule: LrSchedule,
    /// Global gradient-norm clip; `None` disables clipping.
    pub clip_max_norm: Option<f64>,
    /// The run's seed, recorded in checkpoints.
    pub seed: u64,
    /// Saves kept by [`Trainer::save`] (older ones are deleted); 0 keeps all.
    pub keep_checkpoints: usize,
    /// Non-finite steps skipped in a row after which [`Trainer::step`] stops the run with
    /// [`Error::Diverged`]; 0 never stops.
    pub max_consecutive_skips: u64,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            optimizer: OptimizerConfig::default(),
            schedule: LrSchedule::default(),
            clip_max_norm: Some(5.0),
            seed: 0,
            keep_checkpoints: 2,
            max_consecutive_skips: 10,
        }
    }
}

impl TrainerConfig {
    /// Check every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key and its allowed range.
    pub fn validate(&self) -> Result<()> {
        // Keys as paths inside this config: `optimizer.lr`, `schedule.power`.
        let prefixed = |section: &str, e: Error| match e {
            Error::Config { key, reason } => Error::config(format!("{section}.{key}"), reason),
            e => e,
        };
        self.optimizer
            .validate()
            .map_err(|e| prefixed("optimizer", e))?;
        self.schedule
            .validate()
            .map_err(|e| prefixed("schedule", e))?;
        match self.clip_max_norm {
            Some(c) if !(c.is_finite() && c > 0.0) => Err(Error::config(
                "clip_max_norm",
                format!("must be finite and > 0 (or absent: no clipping), got {c}"),
            )),
            _ => Ok(()),
        }
    }
}

/// The default trainable-parameter rule: everything except running statistics.
pub fn not_running_stat(name: &str) -> bool {
    !name.contains("running_")
}

/// What one [`Trainer::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// Index of this step, 0-based.
    pub step: u64,
    /// The loss that was back-propagated: the head's, plus the auxiliary loss when one is set
    /// (non-finite when the step was skipped for it).
    pub loss: f64,
    /// Learning rate used (or that would have been used).
    pub lr: f64,
    /// Global gradient norm before clipping; `None` when the loss was non-finite.
    pub grad_norm: Option<f64>,
    /// Whether the step was skipped (non-finite loss or gradient).
    pub skipped: bool,
    /// The head's statistics; with an auxiliary loss also its statistics and `head_loss`
    /// (the head's loss alone).
    pub stats: BTreeMap<String, f64>,
}

/// Owns a backbone, a head, their variables and the optimiser, and runs training steps.
pub struct Trainer {
    backbone: Box<dyn ModuleT + Send>,
    head: Box<dyn Head>,
    varmap: VarMap,
    params: Vec<(String, Var)>,
    vars: Vec<Var>,
    buffers: Vec<(String, Var)>,
    optimizer: AnyOptimizer,
    config: TrainerConfig,
    state: TrainState,
    auxiliary: Option<Box<dyn AuxiliaryLoss>>,
    /// Variables in the VarMap at construction (an auxiliary must not add any later).
    known_vars: usize,
}

impl Trainer {
    /// A trainer over every variable of `varmap` whose name passes `trainable` (for example
    /// [`not_running_stat`], or a backbone's own rule that also freezes `features.weight`).
    /// The backbone and head must have created all their variables in `varmap` already.
    ///
    /// # Errors
    /// An invalid config, or no trainable variable.
    pub fn new(
        backbone: Box<dyn ModuleT + Send>,
        head: Box<dyn Head>,
        varmap: VarMap,
        config: TrainerConfig,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        config.validate()?;
        let (mut params, mut buffers) = (Vec::new(), Vec::new());
        let known_vars = {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| Error::config("varmap", "VarMap lock poisoned"))?;
            for (name, var) in data.iter() {
                if trainable(name) {
                    params.push((name.clone(), var.clone()));
                } else if name.contains("running_") {
                    buffers.push((name.clone(), var.clone()));
                }
            }
            data.len()
        };
        if params.is_empty() {
            return Err(Error::config(
                "trainable",
                "no trainable variable in the VarMap",
            ));
        }
        // A fixed order: sums over parameters (the gradient norm) are then reproducible.
        params.sort_by(|a, b| a.0.cmp(&b.0));
        buffers.sort_by(|a, b| a.0.cmp(&b.0));
        let vars = params.iter().map(|(_, v)| v.clone()).collect();
        let optimizer = config.optimizer.build(params.clone())?;
        let state = TrainState {
            seed: config.seed,
            schedule: Some(config.schedule.clone()),
            optimizer: Some(config.optimizer.clone()),
            ..TrainState::default()
        };
        Ok(Self {
            backbone,
            head,
            varmap,
            params,
            vars,
            buffers,
            optimizer,
            config,
            state,
            auxiliary: None,
            known_vars,
        })
    }

    /// Add `auxiliary`'s loss to every step. Its variables must already be in the VarMap
    /// given to [`Trainer::new`] (created there before the trainer, so that the trainable rule
    /// saw them).
    ///
    /// # Errors
    /// [`Error::Config`] (`auxiliary`) when the VarMap gained variables after
    /// [`Trainer::new`]: they would be silently left out of the optimiser.
    pub fn with_auxiliary(mut self, auxiliary: Box<dyn AuxiliaryLoss>) -> Result<Self> {
        let now = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::config("varmap", "VarMap lock poisoned"))?
            .len();
        if now != self.known_vars {
            return Err(Error::config(
                "auxiliary",
                format!(
                    "`{}` created {} variables after Trainer::new; build it in the VarMap first",
                    auxiliary.name(),
                    now.saturating_sub(self.known_vars)
                ),
            ));
        }
        self.auxiliary = Some(auxiliary);
        Ok(self)
    }

    /// Write `card` (the backbone configuration, input size, colour order, normalisation, head,
    /// training set) as `config.json` with every checkpoint [`Trainer::save`] makes; the step,
    /// epoch and latest metrics are filled in at each save, and the head's name when the card
    /// has no head. Without a card, checkpoints get one with only those.
    pub fn with_model_card(mut self, card: fr_backbone::ModelCard) -> Self {
        self.state.model_card = Some(card);
        self
    }

    /// Whether an auxiliary loss is set.
    pub fn has_auxiliary(&self) -> bool {
        self.auxiliary.is_some()
    }

    /// One step on a loader batch; see [`Trainer::step_tensors`].
    ///
    /// # Errors
    /// As [`Trainer::step_tensors`].
    pub fn step(&mut self, batch: &Batch, total_steps: u64) -> Result<StepOutcome> {
        self.step_tensors(&batch.images, &batch.labels, total_steps)
    }

    /// One step on `images` `(B, …)` and u32 `labels` `(B,)`, at the learning rate the
    /// schedule gives this step of `total_steps`.
    ///
    /// # Errors
    /// Backbone or head failures ([`Error::Head`]), candle errors. A non-finite loss or
    /// gradient is not an error: the step is skipped and reported as such, until
    /// [`TrainerConfig::max_consecutive_skips`] steps in a row were: then [`Error::Diverged`]
    /// (the step is counted as skipped first).
    pub fn step_tensors(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        total_steps: u64,
    ) -> Result<StepOutcome> {
        let step = self.state.step;
        let base_lr = self.config.optimizer.lr();
        let lr = self.config.schedule.lr_at(base_lr, step, total_steps);
        self.optimizer.set_learning_rate(lr);
        self.state.total_steps = total_steps;

        let buffers: Vec<Tensor> = self
            .buffers
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        let head_state = self.head.state().map_err(|e| self.head_error(e))?;

        let embeddings = self.backbone.forward_t(images, true)?;
        let ctx = StepContext::train(step, self.state.epoch);
        let out = self
            .head
            .forward(&embeddings, labels, &ctx)
            .map_err(|e| self.head_error(e))?;
        let mut stats = out.stats;
        let total = match self.auxiliary.as_mut() {
            None => out.loss,
            Some(aux) => {
                let batch = AuxiliaryBatch {
                    images,
                    labels,
                    embeddings: &embeddings,
                    ctx: &ctx,
                };
                let name = aux.name();
                let extra = aux
                    .loss(&batch, self.backbone.as_ref(), self.head.as_mut())
                    .map_err(|source| Error::Auxiliary {
                        name: name.to_string(),
                        source,
                    })?;
                stats.insert("head_loss".into(), self.scalar_loss(&out.loss)?);
                stats.extend(extra.stats);
                let extra = extra
                    .loss
                    .to_dtype(out.loss.dtype())?
                    .reshape(out.loss.shape())?;
                (out.loss + extra)?
            }
        };
        let loss = self.scalar_loss(&total)?;
        let mut outcome = StepOutcome {
            step,
            loss,
            lr,
            grad_norm: None,
            skipped: true,
            stats,
        };
        if !loss.is_finite() {
            tracing::warn!(step, loss, "non-finite loss: step skipped");
            self.skip(&buffers, head_state, "loss", lr)?;
            return Ok(outcome);
        }
        self.state.last_finite_loss = Some((step, loss));

        let mut grads = total.backward()?;
        let norm = grad_norm(&grads, &self.vars)?;
        outcome.grad_norm = Some(norm);
        if !norm.is_finite() {
            tracing::warn!(
                step,
                loss,
                grad_norm = norm,
                "non-finite gradient: step skipped"
            );
            self.skip(&buffers, head_state, "gradient norm", lr)?;
            return Ok(outcome);
        }
        if let Some(max) = self.config.clip_max_norm {
            if norm > max {
                scale_grads(&mut grads, &self.vars, max / (norm + 1e-6))?;
            }
        }
        self.optimizer.step(&grads)?;
        self.state.step += 1;
        self.state.lr = lr;
        self.state.consecutive_skips = 0;
        outcome.skipped = false;
        Ok(outcome)
    }

    /// Save a checkpoint under `dir` (weights, optimiser buffers, head state, position), then
    /// prune to [`TrainerConfig::keep_checkpoints`] saves; returns this save's directory.
    ///
    /// # Errors
    /// I/O and serialisation errors, naming the file.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let mut state = self.state.clone();
        state.optimizer_state = self.optimizer.state()?;
        state.head_state = self.head.state().map_err(|e| self.head_error(e))?;
        let card = state.model_card.get_or_insert_with(Default::default);
        if card.head.is_none() {
            card.head = Some(fr_backbone::model_card::HeadInfo {
                name: self.head.name().to_string(),
                config: None,
                classes: None,
            });
        }
        let path = save_checkpoint(dir, &self.varmap, &state)?;
        if self.config.keep_checkpoints > 0 {
            prune_checkpoints(dir, self.config.keep_checkpoints)?;
        }
        Ok(path)
    }

    /// Restore weights, optimiser buffers, head state and position from `dir` (a run
    /// directory's latest save, or one save); the next step continues the saved run exactly.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the file and key that do not fit this trainer.
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let mut state = load_checkpoint(dir, &self.varmap)?;
        if state.schedule.as_ref() != Some(&self.config.schedule)
            || state.optimizer.as_ref() != Some(&self.config.optimizer)
        {
            tracing::warn!(
                path = %dir.display(),
                "resuming with a different optimiser or schedule than the checkpoint's"
            );
        }
        let optimizer_state: BTreeMap<_, _> = state.optimizer_state.drain(..).collect();
        self.optimizer.load_state(&optimizer_state)?;
        let head_state: BTreeMap<_, _> = state.head_state.drain(..).collect();
        self.head
            .load_state(&head_state)
            .map_err(|e| self.head_error(e))?;
        state.schedule = Some(self.config.schedule.clone());
        state.optimizer = Some(self.config.optimizer.clone());
        // The card given to this trainer describes the model being trained; the saved one is
        // only a fallback.
        if self.state.model_card.is_some() {
            state.model_card = self.state.model_card.take();
        }
        self.state = state;
        Ok(())
    }

    /// Set the epoch heads see in their [`StepContext`].
    pub fn set_epoch(&mut self, epoch: usize) {
        self.state.epoch = epoch;
    }

    /// Append `(current step, value)` to the metric series `name`, saved with checkpoints.
    /// Non-finite values are ignored (JSON cannot hold them).
    pub fn record_metric(&mut self, name: &str, value: f64) {
        if value.is_finite() {
            let step = self.state.step;
            self.state
                .metrics
                .entry(name.to_string())
                .or_default()
                .push((step, value));
        }
    }

    /// Position, counters and metrics (without tensors).
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// Mutable access to the position and `extra` entries (e.g. a data-loader cursor).
    pub fn state_mut(&mut self) -> &mut TrainState {
        &mut self.state
    }

    /// The configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// All variables (trainable, running statistics, head centres).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Names of the optimised variables, sorted.
    pub fn trainable_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|(n, _)| n.as_str())
    }

    /// The backbone (for evaluation: `forward_t(x, false)`).
    pub fn backbone(&self) -> &(dyn ModuleT + Send) {
        self.backbone.as_ref()
    }

    /// The head.
    pub fn head(&self) -> &dyn Head {
        self.head.as_ref()
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &AnyOptimizer {
        &self.optimizer
    }

    /// Undo a step's side effects, count it as skipped, and stop the run after too many in a
    /// row. `what` was non-finite; `lr` is the step's learning rate.
    fn skip(
        &mut self,
        buffers: &[Tensor],
        head_state: Vec<(String, Tensor)>,
        what: &str,
        lr: f64,
    ) -> Result<()> {
        for ((_, var), old) in self.buffers.iter().zip(buffers) {
            var.set(old)?;
        }
        let head_state: BTreeMap<_, _> = head_state.into_iter().collect();
        self.head
            .load_state(&head_state)
            .map_err(|e| self.head_error(e))?;
        let step = self.state.step;
        self.state.skipped_steps += 1;
        self.state.consecutive_skips += 1;
        self.state.step += 1;
        let max = self.config.max_consecutive_skips;
        if max > 0 && self.state.consecutive_skips >= max {
            return Err(Error::Diverged {
                step,
                skipped: self.state.consecutive_skips,
                what: what.to_string(),
                head: self.head.name().to_string(),
                lr,
                last_finite_loss: self.state.last_finite_loss,
            });
        }
        Ok(())
    }

    fn scalar_loss(&self, loss: &Tensor) -> Result<f64> {
        if loss.elem_count() != 1 {
            return Err(self.head_error(format!(
                "the loss must be a scalar, got shape {:?}",
                loss.dims()
            )));
        }
        Ok(loss.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0])
    }

    fn head_error(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Head {
            head: self.head.name().to_string(),
            source: e.into(),
        }
    }
}
