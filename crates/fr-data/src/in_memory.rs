//! A dataset decoded (or rendered) once and kept in memory at the training size.
//!
//! Small sets (the synthetic default, a fixture, a debugging subset) are read for several
//! epochs and by several methods of one reproduction; decoding each image once and keeping the
//! resized RGB bytes trades `len × 3 × size²` bytes of memory for all later decode work.

use image::RgbImage;
use rayon::prelude::*;

use crate::dataset::{FaceDataset, Quality};
use crate::error::{Error, Result};
use crate::transform::resize_rgb;

/// Every image of a source dataset, resized to `size`×`size` and held in memory.
#[derive(Debug, Clone)]
pub struct InMemoryDataset {
    images: Vec<RgbImage>,
    labels: Vec<u32>,
    quality: Vec<Option<Quality>>,
    num_classes: usize,
}

impl InMemoryDataset {
    /// Decode every image of `source` in parallel, resized to `size` (bilinear).
    ///
    /// # Errors
    /// The first image that fails to decode, as the source reports it.
    pub fn from_dataset(source: &dyn FaceDataset, size: u32) -> Result<Self> {
        let items = (0..source.len())
            .into_par_iter()
            .map(|i| {
                let (img, label) = source.sample(i)?;
                Ok((resize_rgb(img, size, size), label, source.quality(i)))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Self {
            images: Vec::with_capacity(items.len()),
            labels: Vec::with_capacity(items.len()),
            quality: Vec::with_capacity(items.len()),
            num_classes: source.num_classes(),
        };
        for (img, label, q) in items {
            out.images.push(img);
            out.labels.push(label);
            out.quality.push(q);
        }
        Ok(out)
    }

    /// The cached images, in dataset order.
    pub fn images(&self) -> &[RgbImage] {
        &self.images
    }

    fn check(&self, index: usize) -> Result<()> {
        if index >= self.images.len() {
            return Err(Error::OutOfRange {
                index,
                len: self.images.len(),
            });
        }
        Ok(())
    }
}

impl FaceDataset for InMemoryDataset {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn label(&self, index: usize) -> Result<u32> {
        self.check(index)?;
        Ok(self.labels[index])
    }

    fn image(&self, index: usize) -> Result<RgbImage> {
        self.check(index)?;
        Ok(self.images[index].clone())
    }

    fn quality(&self, index: usize) -> Option<Quality> {
        self.quality.get(index).copied().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{SyntheticConfig, SyntheticFaces};

    #[test]
    fn caches_resized_images_labels_and_quality() {
        let src = SyntheticFaces::new(SyntheticConfig {
            num_identities: 3,
            images_per_identity: 4,
            image_size: 64,
            ..SyntheticConfig::default()
        })
        .unwrap();
        let mem = InMemoryDataset::from_dataset(&src, 32).unwrap();
        assert_eq!(mem.len(), 12);
        assert_eq!(mem.num_classes(), 3);
        for i in 0..12 {
            assert_eq!(mem.label(i).unwrap(), src.label(i).unwrap());
            assert_eq!(mem.quality(i), src.quality(i));
            let expected = resize_rgb(src.image(i).unwrap(), 32, 32);
            assert_eq!(mem.image(i).unwrap(), expected);
        }
        assert!(mem.image(12).is_err());
    }
}
