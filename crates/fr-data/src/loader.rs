//! The batch loader: per-epoch shuffle, rayon-parallel decode, resize, seeded random flip,
//! normalisation into `(B, 3, H, W)` f32, and prefetch of the next batch on a background thread
//! while the consumer trains on the current one.
//!
//! Determinism: the order of epoch `e` is a Fisher–Yates shuffle seeded with `seed + e`, and the
//! flip of image `i` in epoch `e` is a hash of `(seed, e, i)`, so a batch is the same whatever
//! the thread count or scheduling; so are the optional augmentations ([`AugmentConfig`], applied
//! after the resize and before the flip and normalisation). Reshuffling every epoch matters: a pre-shuffled `.rec` read in
//! one fixed order gives a periodic training loss.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::augment::AugmentConfig;
use crate::dataset::FaceDataset;
use crate::sampler::PkSampler;
use crate::transform::{flip_coin, normalise_flip_into, resize_rgb};
use crate::{Batch, Error, Result};

/// Loader settings; defaults are arcface_torch's (128 images, 112×112, shuffle, flip 0.5,
/// drop_last).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Output side in pixels; sources of another size are resized (bilinear).
    pub image_size: u32,
    /// Reshuffle every epoch with the seed `seed + epoch`.
    pub shuffle: bool,
    /// Seed of the shuffle and the flips.
    pub seed: u64,
    /// Probability of a horizontal flip (0 disables).
    pub flip_prob: f32,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// Skip (and count) images whose record is malformed or undecodable instead of failing.
    pub skip_corrupt: bool,
    /// Batches decoded ahead on a background thread (0: decode in the consumer's thread).
    pub prefetch: usize,
    /// Identities per batch `P` of a P x K identity sampler (batch-hard triplet losses need
    /// several images of each identity in a batch): each batch is `P` identities ×
    /// `K = batch_size / P` images, see [`crate::sampler::PkSampler`]. `None` (default): the
    /// dataset order, shuffled per epoch when `shuffle` is set.
    pub identities_per_batch: Option<usize>,
    /// CVLface / AdaFace augmentations (crop with zero padding, low resolution, colour
    /// jitter, grayscale), seeded per `(seed, epoch, index)`; all off by default.
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Data-parallel training: this process's rank among `world_size` (arcface_torch's
    /// `DistributedSampler`). Every rank shuffles the same order; each global batch of
    /// `batch_size × world_size` images is cut in rank order and rank `r` loads slice `r`, so
    /// `K` ranks with `batch_size` B see exactly the batches one process with `batch_size`
    /// `K·B` would, and an epoch has `⌊N / (K·B)⌋` steps. Needs `drop_last` (every rank must
    /// take the same number of equal-sized steps) and no `identities_per_batch`. Default 0.
    pub rank: usize,
    /// Number of data-parallel ranks; 1 (default) is single-process loading.
    pub world_size: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            image_size: 112,
            shuffle: true,
            seed: 0,
            flip_prob: 0.5,
            drop_last: true,
            skip_corrupt: false,
            prefetch: 2,
            identities_per_batch: None,
            augment: AugmentConfig::default(),
            rank: 0,
            world_size: 1,
        }
    }
}

/// Counters of a loader, over all epochs so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoaderStats {
    /// Images decoded into batches.
    pub images: usize,
    /// Batches produced.
    pub batches: usize,
    /// Images skipped as corrupt (`skip_corrupt`).
    pub skipped: usize,
    /// Dataset indices of the skipped images, in the order they were met.
    pub skipped_indices: Vec<usize>,
}

#[derive(Debug, Default)]
struct Counters {
    images: AtomicUsize,
    batches: AtomicUsize,
    skipped: Mutex<Vec<usize>>,
}

/// Batches of a [`FaceDataset`].
#[derive(Clone)]
pub struct BatchLoader {
    dataset: Arc<dyn FaceDataset>,
    config: LoaderConfig,
    device: Device,
    counters: Arc<Counters>,
    /// The P x K sampler when `identities_per_batch` is set.
    pk: Option<Arc<PkSampler>>,
}

impl std::fmt::Debug for BatchLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchLoader")
            .field("len", &self.dataset.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl BatchLoader {
    /// A loader producing CPU tensors.
    ///
    /// # Errors
    /// `batch_size` or `image_size` of 0, `flip_prob` outside [0, 1], an invalid `augment`
    /// value (see [`AugmentConfig::validate`]); with
    /// `identities_per_batch`: a batch size that is not a multiple of it, fewer identities than
    /// it, or a label that cannot be read.
    pub fn new(dataset: Arc<dyn FaceDataset>, config: LoaderConfig) -> Result<Self> {
        let bad = |key: &str, reason: &str| Error::Config {
            key: key.into(),
            reason: reason.into(),
        };
        if config.batch_size == 0 {
            return Err(bad("batch_size", "must be at least 1"));
        }
        if config.world_size == 0 || config.rank >= config.world_size {
            return Err(bad(
                "rank",
                &format!(
                    "must be below world_size ({} of {})",
                    config.rank, config.world_size
                ),
            ));
        }
        if config.world_size > 1 && !config.drop_last {
            return Err(bad(
                "drop_last",
                "must be true with world_size > 1 (every rank takes equal-sized steps)",
            ));
        }
        if config.world_size > 1 && config.identities_per_batch.is_some() {
            return Err(bad(
                "identities_per_batch",
                "cannot be combined with world_size > 1 yet",
            ));
        }
        if config.image_size == 0 {
            return Err(bad("image_size", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&config.flip_prob) {
            return Err(bad("flip_prob", "must be in [0, 1]"));
        }
        config.augment.validate()?;
        let pk = match config.identities_per_batch {
            None => None,
            Some(p) => {
                if p == 0 || !config.batch_size.is_multiple_of(p) {
                    return Err(Error::Config {
                        key: "identities_per_batch".into(),
                        reason: format!(
                            "must divide batch_size {} (K = batch_size / P images per identity), got {p}",
                            config.batch_size
                        ),
                    });
                }
                let labels = (0..dataset.len())
                    .map(|i| dataset.label(i))
                    .collect::<Result<Vec<u32>>>()?;
                Some(Arc::new(PkSampler::new(
                    &labels,
                    p,
                    config.batch_size / p,
                    config.seed,
                )?))
            }
        };
        Ok(Self {
            dataset,
            config,
            device: Device::Cpu,
            counters: Arc::default(),
            pk,
        })
    }

    /// Create the batch tensors on `device` instead of the CPU.
    #[must_use]
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn FaceDataset> {
        &self.dataset
    }

    /// Batches per epoch (with `skip_corrupt`, a batch whose images are all corrupt is left
    /// out, so an epoch may yield fewer).
    pub fn batches_per_epoch(&self) -> usize {
        if let Some(pk) = &self.pk {
            return pk.epoch(0).len();
        }
        let (n, b) = (
            self.dataset.len(),
            self.config.batch_size * self.config.world_size,
        );
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The dataset indices of `epoch` in visiting order.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed.wrapping_add(epoch));
            order.shuffle(&mut rng);
        }
        order
    }

    /// Counters so far (images, batches, skipped corrupt images).
    pub fn stats(&self) -> LoaderStats {
        let skipped_indices = self
            .counters
            .skipped
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        LoaderStats {
            images: self.counters.images.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
            skipped: skipped_indices.len(),
            skipped_indices,
        }
    }

    /// Decode the images `indices` of `epoch` into a batch (parallel over the images). With
    /// `skip_corrupt`, malformed images are left out and counted; `Ok(None)` when none is left.
    ///
    /// # Errors
    /// The first failing image (unless skipped), or a tensor error.
    pub fn load_batch(&self, epoch: u64, indices: &[usize]) -> Result<Option<Batch>> {
        let s = self.config.image_size as usize;
        let per = 3 * s * s;
        let ds = &*self.dataset;
        // Read and decode (the dataset's batch path: RecordIO reads in file order), then
        // resize, augment, flip and normalise straight into the batch buffer; slots of
        // skipped images are squeezed out afterwards. The buffer is zeroed on the pool beside
        // the decoding, not before it: a 19 MB memset on this thread would leave the pool idle.
        let (mut data, decoded) =
            rayon::join(|| vec![0f32; per * indices.len()], || ds.samples(indices));
        let done: Vec<Result<u32>> = data
            .par_chunks_mut(per.max(1))
            .zip(decoded.into_par_iter())
            .zip(indices.par_iter())
            .map(|((dst, r), &i)| {
                let (img, label) = r?;
                let mut img = resize_rgb(img, s as u32, s as u32);
                if !self.config.augment.is_identity() {
                    img = self
                        .config
                        .augment
                        .apply(img, self.config.seed, epoch, i as u64);
                }
                let flip = self.config.flip_prob > 0.0
                    && flip_coin(self.config.seed, epoch, i as u64, self.config.flip_prob);
                normalise_flip_into(&img, flip, dst)?;
                Ok(label)
            })
            .collect();
        let mut labels = Vec::with_capacity(indices.len());
        let mut kept = Vec::with_capacity(indices.len());
        let mut quality = Vec::with_capacity(indices.len());
        for (slot, (&i, r)) in indices.iter().zip(done).enumerate() {
            match r {
                Ok(label) => {
                    let to = kept.len();
                    if to != slot {
                        data.copy_within(slot * per..(slot + 1) * per, to * per);
                    }
                    labels.push(label);
                    kept.push(i);
                    quality.push(ds.quality(i));
                }
                Err(e @ Error::Format { .. }) if self.config.skip_corrupt => {
                    tracing::warn!(index = i, error = %e, "skipping corrupt image");
                    if let Ok(mut s) = self.counters.skipped.lock() {
                        s.push(i);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if kept.is_empty() {
            return Ok(None);
        }
        let b = kept.len();
        data.truncate(b * per);
        let images = Tensor::from_vec(data, (b, 3, s, s), &self.device)?;
        let labels = Tensor::from_vec(labels, b, &self.device)?;
        let quality = quality.into_iter().collect::<Option<Vec<_>>>();
        self.counters.images.fetch_add(b, Ordering::Relaxed);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Batch {
            images,
            labels,
            indices: kept,
            quality,
        }))
    }

    /// The batches of `epoch`. With `prefetch > 0` a background thread decodes up to
    /// `prefetch` batches ahead; dropping the iterator stops it.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on (0-based), without reading the ones
    /// before: where a resumed run continues inside an epoch. The batches are those
    /// [`BatchLoader::epoch`] yields from position `first` (with `skip_corrupt`, positions
    /// count index batches, including any left out for being all corrupt).
    pub fn epoch_from(&self, epoch: u64, first: usize) -> EpochIter {
        let mut chunks: Vec<Vec<usize>> = match &self.pk {
            Some(pk) => pk.epoch(epoch as usize),
            None => {
                let order = self.epoch_order(epoch);
                let n_batches = self.batches_per_epoch();
                let (b, rank) = (self.config.batch_size, self.config.rank);
                order
                    .chunks(b * self.config.world_size)
                    .take(n_batches)
                    .map(|global| {
                        // This rank's slice of the global batch (the whole chunk on one rank).
                        let end = ((rank + 1) * b).min(global.len());
                        global[(rank * b).min(end)..end].to_vec()
                    })
                    .collect()
            }
        };
        chunks.drain(..first.min(chunks.len()));
        if self.config.prefetch == 0 {
            return self.epoch_iter(
                epoch,
                Inner::Sync {
                    loader: self.clone(),
                    epoch,
                    chunks: chunks.into_iter(),
                },
            );
        }
        let (tx, rx) = sync_channel(self.config.prefetch);
        let loader = self.clone();
        let handle = std::thread::Builder::new()
            .name(format!("fr-data-prefetch-{epoch}"))
            .spawn(move || {
                for chunk in chunks {
                    let r = loader.load_batch(epoch, &chunk).transpose();
                    let Some(r) = r else { continue };
                    let stop = r.is_err();
                    if tx.send(r).is_err() || stop {
                        return;
                    }
                }
            });
        let inner = match handle {
            Ok(handle) => Inner::Prefetch {
                rx: Some(rx),
                handle: Some(handle),
            },
            Err(source) => Inner::Failed(Some(Error::Io {
                path: "prefetch thread".into(),
                source,
            })),
        };
        self.epoch_iter(epoch, inner)
    }

    fn skipped_so_far(&self) -> usize {
        self.counters.skipped.lock().map_or(0, |s| s.len())
    }

    fn epoch_iter(&self, epoch: u64, inner: Inner) -> EpochIter {
        EpochIter {
            inner,
            counters: self.counters.clone(),
            epoch,
            skipped_at_start: self.skipped_so_far(),
            skip_corrupt: self.config.skip_corrupt,
            finished: false,
        }
    }
}

enum Inner {
    Sync {
        loader: BatchLoader,
        epoch: u64,
        chunks: std::vec::IntoIter<Vec<usize>>,
    },
    Prefetch {
        rx: Option<Receiver<Result<Batch>>>,
        handle: Option<JoinHandle<()>>,
    },
    Failed(Option<Error>),
}

/// The batches of one epoch; see [`BatchLoader::epoch`]. Stops after the first error. When
/// the epoch ends with `skip_corrupt` set, it logs how many corrupt images it skipped.
pub struct EpochIter {
    inner: Inner,
    counters: Arc<Counters>,
    epoch: u64,
    /// The loader's skipped count when the epoch started.
    skipped_at_start: usize,
    skip_corrupt: bool,
    finished: bool,
}

impl EpochIter {
    /// Corrupt images skipped since this epoch started (`skip_corrupt`). While the
    /// iteration runs it may count images of batches prefetched but not yet returned.
    pub fn skipped(&self) -> usize {
        let now = self.counters.skipped.lock().map_or(0, |s| s.len());
        now.saturating_sub(self.skipped_at_start)
    }

    fn next_inner(&mut self) -> Option<Result<Batch>> {
        match &mut self.inner {
            Inner::Sync {
                loader,
                epoch,
                chunks,
            } => {
                for chunk in chunks.by_ref() {
                    match loader.load_batch(*epoch, &chunk) {
                        Ok(Some(b)) => return Some(Ok(b)),
                        Ok(None) => continue,
                        Err(e) => {
                            chunks.by_ref().for_each(drop);
                            return Some(Err(e));
                        }
                    }
                }
                None
            }
            Inner::Prefetch { rx, .. } => rx.as_ref()?.recv().ok(),
            Inner::Failed(e) => e.take().map(Err),
        }
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.next_inner();
        if item.is_none() && !self.finished {
            self.finished = true;
            if self.skip_corrupt {
                let skipped = self.skipped();
                if skipped > 0 {
                    tracing::warn!(
                        epoch = self.epoch,
                        skipped,
                        "epoch finished: skipped {skipped} corrupt images"
                    );
                } else {
                    tracing::info!(epoch = self.epoch, "epoch finished: no corrupt images");
                }
            }
        }
        item
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        if let Inner::Prefetch { rx, handle } = &mut self.inner {
            // Closing the channel makes the producer's next send fail, so it returns.
            drop(rx.take());
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}
