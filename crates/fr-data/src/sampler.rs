//! P x K identity sampler for batch-hard triplet training: every batch holds `P` distinct
//! identities with `K` images each, so every sample has a positive and a negative in its batch.
//!
//! One epoch, deterministic for `(seed, epoch)` (ChaCha8 seeded with `seed`, stream `epoch`):
//! 1. each identity's images are shuffled and cut into groups of `K`; the last incomplete
//!    group is dropped when the identity has at least `K` images. An identity with fewer than
//!    `K` images gives one group of `K` drawn **with replacement** from its images (so such a
//!    batch repeats images);
//! 2. while at least `P` identities still have a group, `P` of them are drawn uniformly
//!    without replacement and one group of each forms the next batch (identity order as
//!    drawn, images in group order). Groups left when fewer than `P` identities remain are
//!    dropped.
//!
//! Batches are lists of dataset indices (positions in the label slice).
//!
//! ```
//! use fr_data::sampler::PkSampler;
//!
//! let labels = [0u32, 0, 1, 1, 1, 2, 2, 3];
//! let sampler = PkSampler::new(&labels, 2, 2, 7)?;
//! for batch in sampler.epoch(0) {
//!     assert_eq!(batch.len(), 4); // 2 identities x 2 images
//! }
//! # Ok::<(), fr_data::Error>(())
//! ```

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// A P x K identity sampler over per-sample labels.
#[derive(Debug, Clone)]
pub struct PkSampler {
    p: usize,
    k: usize,
    seed: u64,
    /// Dataset indices of each identity, identities in increasing label order.
    identities: Vec<Vec<usize>>,
}

impl PkSampler {
    /// A sampler of batches of `p` identities × `k` images over `labels` (one per dataset
    /// index).
    ///
    /// # Errors
    /// [`Error::Config`] (`p` or `k`) when `p` or `k` is 0, or when the labels hold fewer than
    /// `p` distinct identities.
    pub fn new(labels: &[u32], p: usize, k: usize, seed: u64) -> Result<Self> {
        if k == 0 {
            return Err(Error::Config {
                key: "k".into(),
                reason: "images per identity must be ≥ 1".into(),
            });
        }
        let mut by_label: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, &l) in labels.iter().enumerate() {
            by_label.entry(l).or_default().push(i);
        }
        if p == 0 || by_label.len() < p {
            return Err(Error::Config {
                key: "p".into(),
                reason: format!(
                    "a P x K batch needs P ≥ 1 distinct identities; P = {p}, the labels hold {}",
                    by_label.len()
                ),
            });
        }
        Ok(Self {
            p,
            k,
            seed,
            identities: by_label.into_values().collect(),
        })
    }

    /// Identities per batch `P`.
    pub fn p(&self) -> usize {
        self.p
    }

    /// Images per identity `K`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The batches of `epoch` (each `P·K` dataset indices); see the module docs.
    pub fn epoch(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch as u64);
        let k = self.k;
        // Groups of K per identity.
        let mut groups: Vec<Vec<Vec<usize>>> = self
            .identities
            .iter()
            .map(|imgs| {
                if imgs.len() < k {
                    vec![(0..k)
                        .map(|_| imgs[rng.random_range(0..imgs.len())])
                        .collect()]
                } else {
                    let mut v = imgs.clone();
                    v.shuffle(&mut rng);
                    v.chunks_exact(k).map(<[usize]>::to_vec).collect()
                }
            })
            .collect();
        let mut avail: Vec<usize> = (0..groups.len()).collect();
        let mut batches = Vec::new();
        while avail.len() >= self.p {
            // Partial Fisher–Yates: the first P entries become a uniform draw.
            for i in 0..self.p {
                let j = rng.random_range(i..avail.len());
                avail.swap(i, j);
            }
            let mut batch = Vec::with_capacity(self.p * k);
            for &id in &avail[..self.p] {
                batch.extend(groups[id].pop().expect("available identities have a group"));
            }
            batches.push(batch);
            // Drop exhausted identities (from the back so indices stay valid).
            for i in (0..self.p).rev() {
                if groups[avail[i]].is_empty() {
                    avail.swap_remove(i);
                }
            }
        }
        batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn labels() -> Vec<u32> {
        // 7 identities with 1..=7 images (id i has i + 1 images), interleaved.
        let mut v = Vec::new();
        for round in 0..7 {
            for id in 0..7u32 {
                if round <= id as usize {
                    v.push(id * 10);
                }
            }
        }
        v
    }

    #[test]
    fn batches_have_p_distinct_identities_of_k_images() {
        let labels = labels();
        let s = PkSampler::new(&labels, 3, 4, 11).unwrap();
        let batches = s.epoch(0);
        assert!(!batches.is_empty());
        for b in &batches {
            assert_eq!(b.len(), 12);
            let ids: Vec<u32> = b.iter().map(|&i| labels[i]).collect();
            let distinct: BTreeSet<u32> = ids.iter().copied().collect();
            assert_eq!(distinct.len(), 3, "{ids:?}");
            for chunk in ids.chunks(4) {
                assert!(chunk.iter().all(|&l| l == chunk[0]), "{ids:?}");
            }
            // Identities with ≥ K images never repeat an image within a batch.
            for chunk in b.chunks(4) {
                let n_imgs = labels.iter().filter(|&&l| l == labels[chunk[0]]).count();
                let uniq: BTreeSet<usize> = chunk.iter().copied().collect();
                if n_imgs >= 4 {
                    assert_eq!(uniq.len(), 4);
                }
            }
        }
        // No image is used twice in an epoch by identities with ≥ K images.
        let mut seen = BTreeSet::new();
        for b in &batches {
            for chunk in b.chunks(4) {
                let n_imgs = labels.iter().filter(|&&l| l == labels[chunk[0]]).count();
                if n_imgs >= 4 {
                    for &i in chunk {
                        assert!(seen.insert(i));
                    }
                }
            }
        }
    }

    #[test]
    fn deterministic_per_seed_and_epoch() {
        let labels = labels();
        let s = PkSampler::new(&labels, 2, 2, 5).unwrap();
        assert_eq!(s.epoch(3), s.epoch(3));
        assert_eq!(
            s.epoch(3),
            PkSampler::new(&labels, 2, 2, 5).unwrap().epoch(3)
        );
        assert_ne!(s.epoch(3), s.epoch(4));
        assert_ne!(
            s.epoch(3),
            PkSampler::new(&labels, 2, 2, 6).unwrap().epoch(3)
        );
    }

    #[test]
    fn too_few_identities_is_an_error() {
        let err = PkSampler::new(&[1, 1, 2, 2], 3, 2, 0).unwrap_err();
        assert!(
            matches!(err, Error::Config { ref key, .. } if key == "p"),
            "{err}"
        );
        assert!(err.to_string().contains("P = 3"));
        assert!(PkSampler::new(&[1, 2], 2, 0, 0).is_err());
        assert!(PkSampler::new(&[1, 2], 2, 1, 0).is_ok());
    }
}
