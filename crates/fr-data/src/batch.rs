//! One training batch, as the loader hands it to the model.

use candle_core::Tensor;

use crate::dataset::Quality;

/// A batch of normalised images and their labels.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(B, 3, H, W)` f32, RGB, normalised as (x/255 − 0.5)/0.5.
    pub images: Tensor,
    /// `(B,)` u32 class ids.
    pub labels: Tensor,
    /// Dataset indices of the images, in batch order.
    pub indices: Vec<usize>,
    /// Quality level per image where the dataset knows it.
    pub quality: Option<Vec<Quality>>,
}
