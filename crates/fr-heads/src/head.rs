//! The one trait every loss head implements, and what a head returns.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::Result;

/// Where the training loop is when it calls a head. Heads with schedules (EPL from epoch 4,
/// L-Softmax annealing) read it; stateless heads ignore it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepContext {
    /// Global optimiser step, 0-based.
    pub step: u64,
    /// Epoch, 0-based.
    pub epoch: usize,
    /// `true` while training: heads update their running state (EMA buffers, memories) only then.
    pub train: bool,
}

impl StepContext {
    /// A training-mode context at `step` of `epoch`.
    pub fn train(step: u64, epoch: usize) -> Self {
        Self {
            step,
            epoch,
            train: true,
        }
    }
}

/// What a head returns for one batch.
#[derive(Debug, Clone)]
pub struct HeadOutput {
    /// Scalar loss `()` to back-propagate (mean over the batch unless the head says otherwise).
    pub loss: Tensor,
    /// The matrix handed to the final cross-entropy after margin and scale, `(B, C)`.
    pub logits: Tensor,
    /// Named scalars for logs (mean target cosine, margin, running statistics, sub-losses).
    pub stats: BTreeMap<String, f64>,
}

/// A face-recognition loss head: embeddings `(B, D)` and integer labels `(B,)` (u32 class ids)
/// in, loss + logits + statistics out.
///
/// A head owns its class centres (proxies), created through the `VarBuilder` it was built with
/// (so they live in the caller's `VarMap` and are trained and checkpointed with the backbone),
/// and may hold non-trainable state (EMA statistics, memories) that [`Head::state`] exposes for
/// checkpoints.
pub trait Head: Send {
    /// Short registry name, e.g. `"arcface"`.
    fn name(&self) -> &'static str;

    /// Compute the loss for one batch. `embeddings`: `(B, D)` f32 or f64 (the head computes in
    /// that dtype); `labels`: `(B,)` u32 class ids in `0..num_classes`.
    ///
    /// # Errors
    /// Shape mismatches, labels of a non-integer dtype, and candle errors.
    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput>;

    /// Non-trainable state (running statistics, memories) by name, for checkpoints.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// Restore what [`Head::state`] returned.
    ///
    /// # Errors
    /// A missing key or a shape mismatch.
    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let _ = state;
        Ok(())
    }
}
