//! What every training source (RecordIO, synthetic identities, image folders) looks like to the loader.

use image::RgbImage;
use rayon::prelude::*;

use crate::Result;

/// Quality level of a sample, where the source knows it (synthetic identities do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    /// Frontal-ish, sharp, clean.
    Normal,
    /// Large pose but sharp: the "hard high-quality" faces LH2Face targets.
    HighQualityHard,
    /// Blurred and noisy.
    LowQuality,
}

/// A labelled face dataset with random access. Implementations must be cheap to share
/// between rayon workers (`Sync`): decoding happens in parallel.
pub trait FaceDataset: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// `true` when there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of identities; labels are in `0..num_classes()`.
    fn num_classes(&self) -> usize;
    /// Class id of image `index`, without decoding it.
    ///
    /// # Errors
    /// `index` out of range or an unreadable record.
    fn label(&self, index: usize) -> Result<u32>;
    /// Decoded RGB image `index` (any size; the loader resizes).
    ///
    /// # Errors
    /// An unreadable or undecodable record, naming the file and record.
    fn image(&self, index: usize) -> Result<RgbImage>;
    /// Image and label of `index` together; sources that store both in one record (RecordIO)
    /// override it to read the record once. The loader calls this.
    ///
    /// # Errors
    /// As [`FaceDataset::image`] and [`FaceDataset::label`].
    fn sample(&self, index: usize) -> Result<(RgbImage, u32)> {
        Ok((self.image(index)?, self.label(index)?))
    }
    /// Images and labels of a batch, in the order of `indices`, decoded in parallel on the
    /// rayon pool. Sources whose reads gain from seeing the whole batch override it (RecordIO
    /// reads the batch's records in file order). The loader calls this once per batch.
    fn samples(&self, indices: &[usize]) -> Vec<Result<(RgbImage, u32)>> {
        indices.par_iter().map(|&i| self.sample(i)).collect()
    }
    /// Quality level of image `index`, if known.
    fn quality(&self, _index: usize) -> Option<Quality> {
        None
    }
}
