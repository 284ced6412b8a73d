//! Embedding distillation as an [`AuxiliaryLoss`]: the student's training-mode embeddings are
//! pulled towards a frozen teacher's embeddings of the same images,
//!
//! ```text
//! L = L_head + λ · (1/(B·D)) Σ_i ‖ŝ_i − t̂_i‖²,     x̂ = x / ‖x‖,  t = teacher(images), detached
//! ```
//!
//! ([`fr_heads::kd::normalized_mse`]). Two teacher schedules:
//!
//! - [`TeacherSchedule::Fixed`]: one teacher for the whole run, SFace's CL strategy
//!   (`CE_CosFace + 10000·MSE`; Boutros et al., "SFace: Privacy-friendly and Accurate Face
//!   Recognition using Synthetic Data", IJCB 2022) and PocketNet's single-step KD
//!   (`CE_ArcFace + 100·MSE`).
//! - [`TeacherSchedule::MultiStep`]: PocketNet's multi-step KD (Boutros et al., "PocketNet:
//!   Extreme Lightweight Face Recognition Network using Neural Architecture Search and
//!   Multi-Step Knowledge Distillation", IEEE Access 2022; reference `fdbtrs/PocketNet`). The
//!   teachers are the teacher run's per-epoch checkpoints, `teachers[k]` the model after `k + 1`
//!   epochs; during its epoch `e` (1-based) the student learns from the teacher of epoch `e + 1`,
//!   so the gap between the two stays one epoch of training instead of the whole run; after the
//!   teacher's last checkpoint the last one is kept.
//!
//! The teachers run in eval mode under [`fr_kernels::no_grad`]; nothing of theirs is trained or
//! updated. Label-free distillation (SFace's KT, QuantFace) has no head loss and does not go
//! through the trainer; it uses [`fr_heads::kd::normalized_mse`] directly.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use candle_nn::ModuleT;
use fr_heads::Head;

use crate::auxiliary::{AuxiliaryBatch, AuxiliaryLoss, AuxiliaryOutput};
use crate::{Error, Result};

/// A frozen teacher backbone: images `(B, 3, H, W)` → embeddings `(B, D)`.
pub type Teacher = Box<dyn ModuleT + Send>;

/// Which teacher a student epoch distils from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeacherSchedule {
    /// Always the first teacher.
    Fixed,
    /// Student epoch `e` (0-based, as [`fr_heads::StepContext::epoch`]) uses
    /// `teachers[min(e + 1, n − 1)]`, with `teachers[k]` the teacher after `k + 1` epochs:
    /// PocketNet's "epoch e learns from the teacher of epoch e + 1".
    MultiStep,
}

impl TeacherSchedule {
    /// Index into `n ≥ 1` teachers for the student's 0-based `epoch`.
    pub fn teacher_index(self, epoch: usize, n: usize) -> usize {
        match self {
            TeacherSchedule::Fixed => 0,
            TeacherSchedule::MultiStep => (epoch + 1).min(n.saturating_sub(1)),
        }
    }
}

/// `λ · normalized_mse(student, teacher)` added to the head's loss each training step (module
/// documentation: formula, schedules, sources).
pub struct Distillation {
    teachers: Vec<Teacher>,
    schedule: TeacherSchedule,
    weight: f64,
}

impl std::fmt::Debug for Distillation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distillation")
            .field("teachers", &self.teachers.len())
            .field("schedule", &self.schedule)
            .field("weight", &self.weight)
            .finish()
    }
}

impl Distillation {
    /// One teacher for the whole run, weight `λ = weight` (SFace CL: 10000, PocketNet KD: 100).
    ///
    /// # Errors
    /// [`Error::Config`] (`kd_weight`) for a negative or non-finite weight.
    pub fn new(teacher: Teacher, weight: f64) -> Result<Self> {
        Self::with_schedule(vec![teacher], TeacherSchedule::Fixed, weight)
    }

    /// PocketNet's multi-step KD over the teacher's per-epoch checkpoints, `teachers[k]` the
    /// model after `k + 1` epochs (see [`TeacherSchedule::MultiStep`]).
    ///
    /// # Errors
    /// [`Error::Config`]: no teacher (`teachers`), a bad weight (`kd_weight`).
    pub fn multi_step(teachers: Vec<Teacher>, weight: f64) -> Result<Self> {
        Self::with_schedule(teachers, TeacherSchedule::MultiStep, weight)
    }

    /// `teachers` under `schedule`, weight `λ`.
    ///
    /// # Errors
    /// [`Error::Config`]: no teacher (`teachers`), a negative or non-finite weight
    /// (`kd_weight`).
    pub fn with_schedule(
        teachers: Vec<Teacher>,
        schedule: TeacherSchedule,
        weight: f64,
    ) -> Result<Self> {
        if teachers.is_empty() {
            return Err(Error::config("teachers", "at least one teacher is needed"));
        }
        if !weight.is_finite() || weight < 0.0 {
            return Err(Error::config(
                "kd_weight",
                format!("{weight} is not a finite weight ≥ 0"),
            ));
        }
        Ok(Self {
            teachers,
            schedule,
            weight,
        })
    }

    /// The weight λ of the MSE term.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// Number of teachers (per-epoch checkpoints for the multi-step schedule).
    pub fn num_teachers(&self) -> usize {
        self.teachers.len()
    }

    /// The schedule.
    pub fn schedule(&self) -> TeacherSchedule {
        self.schedule
    }

    /// The teacher's eval-mode embeddings `(B, D)` of `images` for the student's 0-based
    /// `epoch`, without a graph.
    ///
    /// # Errors
    /// The teacher's forward errors.
    pub fn teacher_embeddings(&self, images: &Tensor, epoch: usize) -> Result<Tensor> {
        let k = self.schedule.teacher_index(epoch, self.teachers.len());
        Ok(fr_kernels::no_grad(|| {
            self.teachers[k].forward_t(images, false)
        })?)
    }
}

impl AuxiliaryLoss for Distillation {
    fn name(&self) -> &'static str {
        "distill"
    }

    fn loss(
        &mut self,
        batch: &AuxiliaryBatch<'_>,
        _backbone: &dyn ModuleT,
        _head: &mut dyn Head,
    ) -> std::result::Result<AuxiliaryOutput, Box<dyn std::error::Error + Send + Sync>> {
        let epoch = batch.ctx.epoch;
        let target = self.teacher_embeddings(batch.images, epoch)?;
        let mse = fr_heads::kd::normalized_mse(batch.embeddings, &target)?;
        let value = mse.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut stats = BTreeMap::new();
        stats.insert("kd_mse".to_string(), value);
        stats.insert(
            "kd_teacher".to_string(),
            self.schedule.teacher_index(epoch, self.teachers.len()) as f64,
        );
        Ok(AuxiliaryOutput {
            loss: (mse * self.weight)?,
            stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_step_uses_the_next_epoch_and_clamps() {
        let s = TeacherSchedule::MultiStep;
        // Teachers after 1, 2, 3, 4 epochs: student epoch 0 (the first) learns from the
        // teacher of epoch 2, ..., the last student epochs from the last teacher.
        assert_eq!(
            (0..6).map(|e| s.teacher_index(e, 4)).collect::<Vec<_>>(),
            vec![1, 2, 3, 3, 3, 3]
        );
        assert_eq!(s.teacher_index(0, 1), 0);
        assert_eq!(TeacherSchedule::Fixed.teacher_index(5, 4), 0);
    }
}
