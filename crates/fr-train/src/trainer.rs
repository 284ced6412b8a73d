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
//!
//! With [`TrainerConfig::precision`] bf16 or f16 ([`crate::precision`]) the images are cast to
//! the backbone's dtype and its embeddings to f32 before the head, so the head, its softmax and
//! the loss run in f32; the optimiser updates f32 master copies of the half-precision
//! variables ([`MasterWeights`]), which are copied back, rounded, after each step; checkpoints
//! hold the f32 masters. With a [`LossScaler`] (on by default for f16) the backward pass runs
//! on `loss · scale` and the gradients are unscaled in f32; a step whose gradients overflow is
//! skipped like a non-finite one (buffers and head state restored) but halves the scale and
//! does not count towards [`TrainerConfig::max_consecutive_skips`], as with PyTorch's
//! `GradScaler`. An [`AuxiliaryLoss`] then sees the images in the backbone's dtype and the
//! f32 embeddings; what it computes through the backbone itself comes out in the backbone's
//! dtype.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::{ModuleT, VarMap};
use fr_data::Batch;
use fr_heads::{Head, StepContext};
use serde::{Deserialize, Serialize};

use crate::auxiliary::{AuxiliaryBatch, AuxiliaryLoss};
use crate::checkpoint::{
    load_checkpoint_with, prune_checkpoints, save_checkpoint_with, TrainState, STATE_FILE,
};
use crate::clip::{grad_norm, scale_grads};
use crate::data_parallel::DataParallel;
use crate::optim::{AnyOptimizer, OptimizerConfig};
use crate::precision::{LossScaler, LossScalerConfig, MasterWeights, Precision};
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
    /// [`Error::Diverged`]; 0 never stops. Loss-scaler overflows do not count.
    pub max_consecutive_skips: u64,
    /// The backbone's floating-point type (`"f32"`, `"bf16"`, `"f16"`); the head and loss
    /// are f32 in every case. The caller builds the backbone in
    /// [`Precision::backbone_dtype`]. Default f32.
    #[serde(default)]
    pub precision: Precision,
    /// The dynamic loss scaler (on by default for f16 only).
    #[serde(default)]
    pub loss_scaler: LossScalerConfig,
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
            precision: Precision::F32,
            loss_scaler: LossScalerConfig::default(),
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
        // Its keys are already `loss_scaler.*`.
        self.loss_scaler.validate()?;
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
    /// (the head's loss alone); with a loss scaler `loss_scale`, the scale this step's
    /// backward pass used.
    pub stats: BTreeMap<String, f64>,
}

/// Owns a backbone, a head, their variables and the optimiser, and runs training steps.
pub struct Trainer {
    backbone: Box<dyn ModuleT + Send>,
    head: Box<dyn Head>,
    varmap: VarMap,
    /// The trainable model variables, sorted by name.
    params: Vec<(String, Var)>,
    /// The variables the optimiser updates, in the order of `params`: the model variables
    /// themselves, or in mixed precision their f32 masters.
    vars: Vec<Var>,
    /// f32 masters of the half-precision trainable variables; `None` in plain f32 training.
    masters: Option<MasterWeights>,
    scaler: Option<LossScaler>,
    buffers: Vec<(String, Var)>,
    optimizer: AnyOptimizer,
    config: TrainerConfig,
    state: TrainState,
    auxiliary: Option<Box<dyn AuxiliaryLoss>>,
    /// Variables in the VarMap at construction (an auxiliary must not add any later).
    known_vars: usize,
    /// Data parallelism: the gradient all-reduce of this rank.
    dp: Option<DataParallel>,
    /// `self.vars` with their names, for the gradient all-reduce (built once, with `dp`).
    dp_vars: Vec<(String, Var)>,
}

impl Trainer {
    /// A trainer over every variable of `varmap` whose name passes `trainable` (for example
    /// [`not_running_stat`], or a backbone's own rule that also freezes `features.weight`).
    /// The backbone and head must have created all their variables in `varmap` already.
    ///
    /// For [`TrainerConfig::precision`] bf16 / f16, build the backbone with a `VarBuilder` of
    /// [`Precision::backbone_dtype`] and the head with an f32 one on the same VarMap
    /// (`seeded.var_builder(DType::F32, &device).pp("head")`); every trainable variable that
    /// is not f32 then gets an f32 master copy.
    ///
    /// # Errors
    /// An invalid config, no trainable variable, or (`precision`) a bf16 / f16 precision
    /// with no trainable variable of that dtype.
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
        let precision = config.precision;
        let dtype = precision.backbone_dtype();
        if precision.is_mixed() && params.iter().all(|(_, v)| v.dtype() != dtype) {
            return Err(Error::config(
                "precision",
                format!(
                    "{precision} training, but no trainable variable is {dtype:?}: build the \
                     backbone with a VarBuilder of precision.backbone_dtype()"
                ),
            ));
        }
        let scaler = config
            .loss_scaler
            .enabled_for(precision)
            .then(|| LossScaler::new(config.loss_scaler.clone()));
        let masters = if precision.is_mixed() || scaler.is_some() {
            Some(MasterWeights::new(&params)?)
        } else {
            None
        };
        let optimised = match &masters {
            Some(m) => m.optimised(),
            None => params.clone(),
        };
        let vars = optimised.iter().map(|(_, v)| v.clone()).collect();
        let optimizer = config.optimizer.build(optimised)?;
        let state = TrainState {
            seed: config.seed,
            schedule: Some(config.schedule.clone()),
            optimizer: Some(config.optimizer.clone()),
            loss_scaler: scaler.as_ref().map(LossScaler::state),
            ..TrainState::default()
        };
        Ok(Self {
            backbone,
            head,
            varmap,
            params,
            vars,
            masters,
            scaler,
            buffers,
            optimizer,
            config,
            state,
            auxiliary: None,
            known_vars,
            dp: None,
            dp_vars: Vec::new(),
        })
    }

    /// Train data-parallel as one rank of `dp` (PyTorch DDP): rank 0's weights (the f32
    /// masters in mixed precision) and running statistics are broadcast to every rank now;
    /// then every step broadcasts rank 0's running statistics (when
    /// [`DataParallelConfig::broadcast_buffers`](crate::DataParallelConfig) is on), averages the
    /// loss over ranks (so all ranks skip a non-finite step together), all-reduces the
    /// gradients in buckets before the clip, and applies the same update on every rank. The
    /// gradient norm is the global one; with rank-local variables
    /// ([`DataParallel::with_local_variables`]) their squared norms are summed over ranks.
    ///
    /// # Errors
    /// Collective failures ([`Error::Collective`]), candle errors.
    pub fn with_data_parallel(mut self, dp: DataParallel) -> Result<Self> {
        self.dp_vars = self
            .params
            .iter()
            .zip(&self.vars)
            .map(|((n, _), v)| (n.clone(), v.clone()))
            .collect();
        dp.broadcast_from_rank0(&self.dp_vars)?;
        if let Some(masters) = &self.masters {
            masters.sync_model()?;
        }
        dp.broadcast_from_rank0(&self.buffers)?;
        self.dp = Some(dp);
        Ok(self)
    }

    /// The data-parallel layer, when training data-parallel.
    pub fn data_parallel(&self) -> Option<&DataParallel> {
        self.dp.as_ref()
    }

    /// The global gradient norm over `self.vars`: with rank-local variables, the squared
    /// norms of the local part are summed over ranks.
    fn global_grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let Some(dp) = self
            .dp
            .as_ref()
            .filter(|dp| self.params.iter().any(|(n, _)| dp.is_local(n)))
        else {
            return grad_norm(grads, &self.vars);
        };
        let (mut shared, mut local) = (Vec::new(), Vec::new());
        for ((name, _), var) in self.params.iter().zip(&self.vars) {
            if dp.is_local(name) {
                local.push(var.clone());
            } else {
                shared.push(var.clone());
            }
        }
        let device = self.vars[0].device();
        let local_sq = grad_norm(grads, &local)?.powi(2);
        let total_local = dp.sum(local_sq, device)?;
        Ok((grad_norm(grads, &shared)?.powi(2) + total_local).sqrt())
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
    /// schedule gives this step of `total_steps`. In mixed precision `images` may be of any
    /// float dtype: they are cast to the backbone's.
    ///
    /// # Errors
    /// Backbone or head failures ([`Error::Head`]), candle errors. A non-finite loss or
    /// gradient is not an error: the step is skipped and reported as such, until
    /// [`TrainerConfig::max_consecutive_skips`] steps in a row were: then [`Error::Diverged`]
    /// (the step is counted as skipped first). A loss-scaler overflow is skipped too, but
    /// never counted towards that limit.
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

        if let Some(dp) = self.dp.as_ref().filter(|dp| dp.config().broadcast_buffers) {
            // DDP's broadcast_buffers: every replica starts the step from rank 0's statistics.
            dp.broadcast_from_rank0(&self.buffers)?;
        }
        let buffers: Vec<Tensor> = self
            .buffers
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        let head_state = self.head.state().map_err(|e| self.head_error(e))?;

        // Mixed precision: the backbone in its dtype, the head and loss in f32.
        let images = self.backbone_input(images)?;
        let embeddings = self.backbone.forward_t(&images, true)?;
        let embeddings = self.head_input(embeddings)?;
        let ctx = StepContext::train(step, self.state.epoch);
        let out = self
            .head
            .forward(&embeddings, labels, &ctx)
            .map_err(|e| self.head_error(e))?;
        let mut stats = out.stats;
        if let Some(scaler) = &self.scaler {
            stats.insert("loss_scale".into(), scaler.scale());
        }
        let total = self.add_auxiliary(out.loss, &images, labels, &embeddings, &ctx, &mut stats)?;
        let loss = self.scalar_loss(&total)?;
        // Data parallel: the mean over ranks, so that every rank takes the same decision.
        let loss = match &self.dp {
            Some(dp) => dp.mean(loss, total.device())?,
            None => loss,
        };
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

        // Keyed by `self.vars`: in mixed precision the f32 masters, already unscaled.
        let mut grads = self.gradients(&total)?;
        if let Some(dp) = &self.dp {
            let moved = dp.reduce_gradients(&mut grads, &self.dp_vars)?;
            outcome
                .stats
                .insert("dp_buckets".into(), moved.buckets as f64);
        }
        let norm = self.global_grad_norm(&grads)?;
        outcome.grad_norm = Some(norm);
        if !norm.is_finite() {
            // A loss-scaler overflow: expected while the scale adapts, not a divergence.
            if self.scaler.as_ref().is_some_and(|s| s.absorbs_overflow()) {
                self.skip_overflow(&buffers, head_state)?;
                return Ok(outcome);
            }
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
        if let Some(masters) = &self.masters {
            masters.sync_model()?;
        }
        if let Some(scaler) = &mut self.scaler {
            scaler.update(false);
            self.state.loss_scaler = Some(scaler.state());
        }
        self.state.step += 1;
        self.state.lr = lr;
        self.state.consecutive_skips = 0;
        outcome.skipped = false;
        Ok(outcome)
    }

    /// The head's `loss` plus the auxiliary loss when one is set; its statistics and the head's
    /// loss alone (`head_loss`) go into `stats`.
    fn add_auxiliary(
        &mut self,
        loss: Tensor,
        images: &Tensor,
        labels: &Tensor,
        embeddings: &Tensor,
        ctx: &StepContext,
        stats: &mut BTreeMap<String, f64>,
    ) -> Result<Tensor> {
        let Some(aux) = self.auxiliary.as_mut() else {
            return Ok(loss);
        };
        let batch = AuxiliaryBatch {
            images,
            labels,
            embeddings,
            ctx,
        };
        let name = aux.name();
        let extra = aux
            .loss(&batch, self.backbone.as_ref(), self.head.as_mut())
            .map_err(|source| Error::Auxiliary {
                name: name.to_string(),
                source,
            })?;
        stats.insert("head_loss".into(), self.scalar_loss(&loss)?);
        stats.extend(extra.stats);
        let extra = extra.loss.to_dtype(loss.dtype())?.reshape(loss.shape())?;
        Ok((loss + extra)?)
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
        state.loss_scaler = self.scaler.as_ref().map(LossScaler::state);
        // Mixed precision: the f32 masters (and widened half buffers) under the model's names.
        let weights = match &self.masters {
            Some(m) => m.checkpoint_weights(&self.varmap)?,
            None => Default::default(),
        };
        let path = save_checkpoint_with(dir, &self.varmap, &weights, &state)?;
        if self.config.keep_checkpoints > 0 {
            prune_checkpoints(dir, self.config.keep_checkpoints)?;
        }
        Ok(path)
    }

    /// Restore weights, optimiser buffers, head state, loss-scaler state and position from
    /// `dir` (a run directory's latest save, or one save); the next step continues the saved
    /// run exactly. In mixed precision the f32 masters get the saved (f32) weights and the
    /// model variables those weights rounded to their dtype; a save of either precision
    /// resumes in the other.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the file and key that do not fit this trainer.
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let masters: Vec<(String, Var)> = self
            .masters
            .iter()
            .flat_map(|m| m.masters().map(|(n, v)| (n.to_string(), v.clone())))
            .collect();
        let mut state = load_checkpoint_with(dir, &self.varmap, &masters)?;
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
        match (&mut self.scaler, state.loss_scaler) {
            (Some(scaler), Some(saved)) => scaler.load_state(saved).map_err(|e| {
                Error::checkpoint(dir.join(STATE_FILE), format!("`loss_scaler`: {e}"))
            })?,
            (Some(scaler), None) => {
                tracing::warn!(
                    path = %dir.display(),
                    loss_scale = scaler.scale(),
                    "the checkpoint has no loss-scaler state: the scaler keeps its current scale"
                );
                state.loss_scaler = Some(scaler.state());
            }
            (None, Some(_)) => {
                tracing::info!("the checkpoint's loss-scaler state is ignored: no scaler in use");
                state.loss_scaler = None;
            }
            (None, None) => {}
        }
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

    /// The backbone's precision.
    pub fn precision(&self) -> Precision {
        self.config.precision
    }

    /// The f32 master weights; `None` in plain f32 training.
    pub fn master_weights(&self) -> Option<&MasterWeights> {
        self.masters.as_ref()
    }

    /// The dynamic loss scaler, when one is on.
    pub fn loss_scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    /// `images` in the backbone's dtype (unchanged in f32 training).
    fn backbone_input(&self, images: &Tensor) -> Result<Tensor> {
        let precision = self.config.precision;
        Ok(if precision.is_mixed() {
            images.to_dtype(precision.backbone_dtype())?
        } else {
            images.clone()
        })
    }

    /// The backbone's `embeddings` in f32 for the head (unchanged in f32 training).
    fn head_input(&self, embeddings: Tensor) -> Result<Tensor> {
        Ok(if self.config.precision.is_mixed() {
            embeddings.to_dtype(DType::F32)?
        } else {
            embeddings
        })
    }

    /// The gradients the optimiser uses, keyed by `self.vars`: those of `total`, or in mixed
    /// precision those of `total · scale` cast to f32 and divided by the scale, keyed by the
    /// masters.
    fn gradients(&self, total: &Tensor) -> Result<GradStore> {
        let Some(masters) = &self.masters else {
            return Ok(total.backward()?);
        };
        let scale = self.scaler.as_ref().map_or(1.0, LossScaler::scale);
        let grads = if scale == 1.0 {
            total.backward()?
        } else {
            total.affine(scale, 0.0)?.backward()?
        };
        masters.master_grads(&grads, 1.0 / scale)
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
        self.undo(buffers, head_state)?;
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

    /// A loss-scaler overflow: undo the step's side effects, back the scale off, and count the
    /// step as skipped but not towards divergence (GradScaler skips such steps silently).
    fn skip_overflow(
        &mut self,
        buffers: &[Tensor],
        head_state: Vec<(String, Tensor)>,
    ) -> Result<()> {
        self.undo(buffers, head_state)?;
        if let Some(scaler) = &mut self.scaler {
            let scale = scaler.scale();
            scaler.update(true);
            tracing::info!(
                step = self.state.step,
                loss_scale = scale,
                new_loss_scale = scaler.scale(),
                "gradient overflow: step skipped, loss scale backed off"
            );
            self.state.loss_scaler = Some(scaler.state());
        }
        self.state.skipped_steps += 1;
        self.state.step += 1;
        Ok(())
    }

    /// Restore the running statistics and the head's state saved before the step.
    fn undo(&mut self, buffers: &[Tensor], head_state: Vec<(String, Tensor)>) -> Result<()> {
        for ((_, var), old) in self.buffers.iter().zip(buffers) {
            var.set(old)?;
        }
        let head_state: BTreeMap<_, _> = head_state.into_iter().collect();
        self.head
            .load_state(&head_state)
            .map_err(|e| self.head_error(e))
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
