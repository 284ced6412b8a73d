//! [`AuxiliaryLoss`]: an extra objective added to the head's loss inside
//! [`Trainer::step_tensors`](crate::Trainer::step_tensors), before the backward pass — for
//! example a reconstruction branch whose outputs are also fed back through the backbone and
//! the head (LH2Face's L_reco, L_FR^canon and L_view).
//!
//! The step then is: backbone `forward_t(images, true)` → head loss L_FR → auxiliary loss
//! L_aux (which may call the backbone and the head again) → backward of `L_FR + L_aux` → clip →
//! optimiser. The auxiliary's variables must live in the trainer's `VarMap` and be created
//! before [`Trainer::new`](crate::Trainer::new), so that they are optimised, clipped,
//! checkpointed and (for `*running_*` buffers) restored on a skipped step with everything else.

use std::collections::BTreeMap;

use candle_core::Tensor;
use candle_nn::ModuleT;
use fr_heads::{Head, StepContext};

/// What an [`AuxiliaryLoss`] sees of the current step.
#[derive(Debug, Clone, Copy)]
pub struct AuxiliaryBatch<'a> {
    /// The batch `(B, 3, S, S)` exactly as the backbone received it (normalised images).
    pub images: &'a Tensor,
    /// u32 class ids `(B,)`.
    pub labels: &'a Tensor,
    /// The backbone's training-mode embeddings of `images` `(B, D)`, with their graph (detach
    /// them for a stop-gradient target).
    pub embeddings: &'a Tensor,
    /// The step's context as the head saw it (`train: true`).
    pub ctx: &'a StepContext,
}

/// An extra scalar loss and its named statistics.
#[derive(Debug, Clone)]
pub struct AuxiliaryOutput {
    /// Scalar `()` in the embeddings' dtype, added to the head's loss before backward.
    pub loss: Tensor,
    /// Named scalars for logs (sub-losses, ...); merged into the step's statistics.
    pub stats: BTreeMap<String, f64>,
}

/// An extra objective of a training step; see the module documentation.
pub trait AuxiliaryLoss: Send {
    /// Short name, used in errors (e.g. `"render"`).
    fn name(&self) -> &'static str;

    /// The extra loss of one step. `backbone` is the trainer's backbone (call `forward_t`
    /// with `train = false` to leave its BatchNorm running statistics to the real batch);
    /// `head` the trainer's head (call it with a [`StepContext`] whose `train` is false so
    /// that its running state is updated by the real batch only).
    ///
    /// # Errors
    /// Whatever the objective's own computation reports; the step fails with
    /// [`Error::Auxiliary`](crate::Error::Auxiliary).
    fn loss(
        &mut self,
        batch: &AuxiliaryBatch<'_>,
        backbone: &dyn ModuleT,
        head: &mut dyn Head,
    ) -> Result<AuxiliaryOutput, Box<dyn std::error::Error + Send + Sync>>;
}
