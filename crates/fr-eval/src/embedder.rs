//! Anything that maps face images to embeddings.

/// A face embedder: a batch of normalised images `(N, 3, H, W)` (RGB, (x/255 − 0.5)/0.5) in,
/// raw (not normalised) embeddings `(N, D)` out. fr-eval adds the flipped view itself.
pub trait Embedder {
    /// Error type of the model behind it.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Embed one batch.
    ///
    /// # Errors
    /// Whatever the model reports.
    fn embed(
        &mut self,
        images: ndarray::ArrayView4<f32>,
    ) -> Result<ndarray::Array2<f32>, Self::Error>;
}
