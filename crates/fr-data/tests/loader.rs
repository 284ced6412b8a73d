//! The batch loader: determinism, per-epoch reshuffle, flips, normalisation, prefetch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fr_data::{BatchLoader, Error, FaceDataset, LoaderConfig, Quality};
use image::{Rgb, RgbImage};

/// Images whose left half is red and right half blue (so a flip is visible), green channel =
/// index, 20×16 (so the loader must resize); counts decodes.
struct Halves {
    n: usize,
    decoded: AtomicUsize,
}

impl Halves {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            n,
            decoded: AtomicUsize::new(0),
        })
    }
}

impl FaceDataset for Halves {
    fn len(&self) -> usize {
        self.n
    }
    fn num_classes(&self) -> usize {
        5
    }
    fn label(&self, index: usize) -> fr_data::Result<u32> {
        Ok((index % 5) as u32)
    }
    fn image(&self, index: usize) -> fr_data::Result<RgbImage> {
        self.decoded.fetch_add(1, Ordering::SeqCst);
        let g = index as u8;
        Ok(RgbImage::from_fn(20, 16, |x, _| {
            if x < 10 {
                Rgb([255, g, 0])
            } else {
                Rgb([0, g, 255])
            }
        }))
    }
    fn quality(&self, index: usize) -> Option<Quality> {
        Some(if index.is_multiple_of(2) {
            Quality::Normal
        } else {
            Quality::LowQuality
        })
    }
}

fn config(seed: u64) -> LoaderConfig {
    LoaderConfig {
        batch_size: 8,
        image_size: 8,
        seed,
        drop_last: false,
        ..LoaderConfig::default()
    }
}

/// All batches of an epoch: (indices, flattened images, labels).
fn run_epoch(loader: &BatchLoader, epoch: u64) -> (Vec<usize>, Vec<f32>, Vec<u32>) {
    let (mut idx, mut px, mut lab) = (Vec::new(), Vec::new(), Vec::new());
    for b in loader.epoch(epoch) {
        let b = b.unwrap();
        idx.extend(&b.indices);
        px.extend(b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        lab.extend(b.labels.to_vec1::<u32>().unwrap());
    }
    (idx, px, lab)
}

#[test]
fn same_seed_same_batches_whatever_the_threads() {
    let a = BatchLoader::new(Halves::new(37), config(3)).unwrap();
    let sync = BatchLoader::new(
        Halves::new(37),
        LoaderConfig {
            prefetch: 0,
            ..config(3)
        },
    )
    .unwrap();
    let first = run_epoch(&a, 2);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let again = pool.install(|| run_epoch(&sync, 2));
    assert_eq!(first, again);
    let other_seed = run_epoch(&BatchLoader::new(Halves::new(37), config(4)).unwrap(), 2);
    assert_ne!(first.0, other_seed.0);
}

#[test]
fn reshuffles_every_epoch() {
    let loader = BatchLoader::new(Halves::new(50), config(11)).unwrap();
    let e0 = loader.epoch_order(0);
    let e1 = loader.epoch_order(1);
    assert_ne!(e0, e1);
    for order in [&e0, &e1] {
        let mut s = order.clone();
        s.sort_unstable();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(*order, s, "shuffled");
    }
    // The batches follow the order.
    assert_eq!(run_epoch(&loader, 1).0, e1);
    let plain = BatchLoader::new(
        Halves::new(50),
        LoaderConfig {
            shuffle: false,
            ..config(11)
        },
    )
    .unwrap();
    assert_eq!(plain.epoch_order(5), (0..50).collect::<Vec<_>>());
}

#[test]
fn normalised_rgb_in_range_with_seeded_flips() {
    let loader = BatchLoader::new(Halves::new(64), config(5)).unwrap();
    let (idx, px, labels) = run_epoch(&loader, 0);
    assert!(px.iter().all(|v| (-1.0..=1.0).contains(v)));
    let (min, max) = px
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert_eq!((min, max), (-1.0, 1.0));
    let per = 3 * 8 * 8;
    let flipped_in = |px: &[f32], k: usize| -> bool {
        let img = &px[k * per..(k + 1) * per];
        // R plane: left column red (+1) unless flipped; B plane the mirror.
        let (r_left, b_left) = (img[0], img[2 * 64]);
        assert_eq!(r_left, -b_left);
        r_left < 0.0
    };
    let mut flips = 0;
    for (k, &i) in idx.iter().enumerate() {
        assert_eq!(labels[k], (i % 5) as u32);
        // Green plane holds the index: (i/255 − 0.5)/0.5.
        let g = px[k * per + 64];
        assert!((g - (i as f32 / 127.5 - 1.0)).abs() < 1e-5);
        flips += usize::from(flipped_in(&px, k));
    }
    assert!((16..=48).contains(&flips), "{flips} of 64 flipped");
    // Flips depend on the epoch too, and vanish with flip_prob 0.
    let (idx1, px1, _) = run_epoch(&loader, 1);
    let flip_of = |idx: &[usize], px: &[f32], i: usize| {
        let k = idx.iter().position(|&x| x == i).unwrap();
        flipped_in(px, k)
    };
    assert!((0..64).any(|i| flip_of(&idx, &px, i) != flip_of(&idx1, &px1, i)));
    let no_flip = BatchLoader::new(
        Halves::new(64),
        LoaderConfig {
            flip_prob: 0.0,
            ..config(5)
        },
    )
    .unwrap();
    let (_, px0, _) = run_epoch(&no_flip, 0);
    assert!((0..64).all(|k| !flipped_in(&px0, k)));
}

#[test]
fn batches_cover_the_epoch_with_and_without_drop_last() {
    let ds = Halves::new(21);
    let loader = BatchLoader::new(ds.clone(), config(1)).unwrap();
    assert_eq!(loader.batches_per_epoch(), 3);
    let batches: Vec<_> = loader.epoch(0).map(Result::unwrap).collect();
    let sizes: Vec<usize> = batches.iter().map(|b| b.indices.len()).collect();
    assert_eq!(sizes, [8, 8, 5]);
    for b in &batches {
        assert_eq!(b.images.dims(), [b.indices.len(), 3, 8, 8]);
        assert_eq!(b.labels.dims(), [b.indices.len()]);
        let q = b.quality.as_ref().unwrap();
        assert!(b
            .indices
            .iter()
            .zip(q)
            .all(|(&i, &q)| q == ds.quality(i).unwrap()));
    }
    let mut all: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    all.sort_unstable();
    assert_eq!(all, (0..21).collect::<Vec<_>>());

    let dropping = BatchLoader::new(
        ds,
        LoaderConfig {
            drop_last: true,
            ..config(1)
        },
    )
    .unwrap();
    assert_eq!(dropping.batches_per_epoch(), 2);
    assert_eq!(dropping.epoch(0).map(Result::unwrap).count(), 2);
    assert_eq!(dropping.stats().batches, 2);
}

#[test]
fn prefetch_decodes_the_next_batch_while_the_consumer_holds_one() {
    let ds = Halves::new(40);
    let loader = BatchLoader::new(ds.clone(), config(2)).unwrap();
    let mut it = loader.epoch(0);
    let first = it.next().unwrap().unwrap();
    assert_eq!(first.indices.len(), 8);
    // Without touching the iterator again, batch 2 gets decoded in the background.
    let start = Instant::now();
    while ds.decoded.load(Ordering::SeqCst) < 16 {
        assert!(start.elapsed() < Duration::from_secs(20), "no prefetch");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Dropping the iterator mid-epoch stops the producer.
    drop(it);

    // Without prefetch nothing is decoded ahead.
    let sync_ds = Halves::new(40);
    let sync = BatchLoader::new(
        sync_ds.clone(),
        LoaderConfig {
            prefetch: 0,
            ..config(2)
        },
    )
    .unwrap();
    let mut it = sync.epoch(0);
    it.next().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(sync_ds.decoded.load(Ordering::SeqCst), 8);
    assert_eq!(it.count(), 4);
}

#[test]
fn rejects_bad_config() {
    for bad in [
        LoaderConfig {
            batch_size: 0,
            ..LoaderConfig::default()
        },
        LoaderConfig {
            image_size: 0,
            ..LoaderConfig::default()
        },
        LoaderConfig {
            flip_prob: 1.5,
            ..LoaderConfig::default()
        },
    ] {
        let err = BatchLoader::new(Halves::new(4), bad).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
    }
}

/// `identities_per_batch = P`: every batch holds P identities × K = batch_size / P images,
/// deterministically per (seed, epoch); a P that does not divide the batch is a config error.
#[test]
fn identity_sampler_gives_p_by_k_batches() {
    let cfg = LoaderConfig {
        batch_size: 6,
        identities_per_batch: Some(3),
        prefetch: 0,
        ..config(5)
    };
    let loader = BatchLoader::new(Halves::new(40), cfg.clone()).unwrap();
    assert!(loader.batches_per_epoch() > 0);
    let mut seen = 0;
    for batch in loader.epoch(0) {
        let batch = batch.unwrap();
        let labels: Vec<u32> = batch.labels.to_vec1().unwrap();
        assert_eq!(labels.len(), 6);
        let mut counts = std::collections::BTreeMap::new();
        for l in labels {
            *counts.entry(l).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3, "{counts:?}");
        assert!(counts.values().all(|&c| c == 2), "{counts:?}");
        seen += 1;
    }
    assert_eq!(seen, loader.batches_per_epoch());
    let again = BatchLoader::new(Halves::new(40), cfg.clone()).unwrap();
    assert_eq!(run_epoch(&loader, 1).0, run_epoch(&again, 1).0);
    let bad = LoaderConfig {
        identities_per_batch: Some(4),
        ..cfg
    };
    let err = BatchLoader::new(Halves::new(40), bad).unwrap_err();
    assert!(err.to_string().contains("identities_per_batch"), "{err}");
}

#[test]
fn augmentations_are_off_by_default_and_applied_before_normalisation() {
    use fr_data::AugmentConfig;
    // Default behaviour unchanged: no augmentation, and configs without the key still parse.
    assert!(LoaderConfig::default().augment.is_identity());
    let parsed: LoaderConfig = serde_json::from_str(r#"{"batch_size": 8}"#).unwrap();
    assert_eq!(
        parsed,
        LoaderConfig {
            batch_size: 8,
            ..LoaderConfig::default()
        }
    );
    let plain = BatchLoader::new(Halves::new(16), config(5)).unwrap();
    let (_, base, _) = run_epoch(&plain, 0);

    // Grayscale with probability 1: the three planes of every image are equal.
    let gray_cfg = LoaderConfig {
        augment: AugmentConfig {
            grayscale_prob: 1.0,
            ..AugmentConfig::default()
        },
        ..config(5)
    };
    let gray = BatchLoader::new(Halves::new(16), gray_cfg.clone()).unwrap();
    let (idx, data, labels) = run_epoch(&gray, 0);
    let plane = 8 * 8;
    for img in data.chunks(3 * plane) {
        assert_eq!(&img[..plane], &img[plane..2 * plane]);
        assert_eq!(&img[..plane], &img[2 * plane..]);
    }
    assert_ne!(data, base);
    // Deterministic: the same epoch again gives the same batches.
    let again = BatchLoader::new(Halves::new(16), gray_cfg).unwrap();
    assert_eq!(run_epoch(&again, 0), (idx, data, labels));

    // A bad value is refused by the loader, naming the key.
    let bad = LoaderConfig {
        augment: AugmentConfig {
            crop_prob: 2.0,
            ..AugmentConfig::default()
        },
        ..config(5)
    };
    let err = BatchLoader::new(Halves::new(4), bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("augment.crop_prob"), "{err}");
}

/// Data-parallel loading: `K` ranks with batch `B` load, step by step, the slices of the
/// batches one process with batch `K·B` loads (same indices, same flipped pixels), and bad
/// rank settings are refused naming the key.
#[test]
fn ranks_split_the_global_batches() {
    let (k, b) = (3usize, 4usize);
    let cfg = |rank, world_size, batch_size| LoaderConfig {
        batch_size,
        image_size: 8,
        seed: 7,
        drop_last: true,
        rank,
        world_size,
        ..LoaderConfig::default()
    };
    let single = BatchLoader::new(Halves::new(50), cfg(0, 1, k * b)).unwrap();
    assert_eq!(single.batches_per_epoch(), 50 / (k * b));
    let whole: Vec<_> = single.epoch(1).map(|x| x.unwrap()).collect();
    let ranks: Vec<Vec<_>> = (0..k)
        .map(|r| {
            let l = BatchLoader::new(Halves::new(50), cfg(r, k, b)).unwrap();
            assert_eq!(l.batches_per_epoch(), whole.len());
            l.epoch(1).map(|x| x.unwrap()).collect()
        })
        .collect();
    for (step, global) in whole.iter().enumerate() {
        let mut indices: Vec<usize> = Vec::new();
        let mut pixels = Vec::new();
        for rank in &ranks {
            let part = &rank[step];
            assert_eq!(part.indices.len(), b);
            indices.extend(&part.indices);
            pixels.extend(part.images.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        assert_eq!(indices, global.indices, "step {step}");
        assert_eq!(
            pixels,
            global
                .images
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
    for (bad, key) in [
        (cfg(3, 3, b), "rank"),
        (cfg(0, 0, b), "rank"),
        (
            LoaderConfig {
                drop_last: false,
                ..cfg(0, 2, b)
            },
            "drop_last",
        ),
        (
            LoaderConfig {
                identities_per_batch: Some(2),
                ..cfg(0, 2, b)
            },
            "identities_per_batch",
        ),
    ] {
        match BatchLoader::new(Halves::new(50), bad) {
            Err(Error::Config { key: k, .. }) => assert_eq!(k, key),
            other => panic!(
                "expected a config error naming {key}, got {:?}",
                other.err()
            ),
        }
    }
}

/// A resumed run continues inside an epoch: `epoch_from(e, k)` yields the batches `epoch(e)`
/// yields from position `k`, without decoding the earlier ones.
#[test]
fn epoch_from_skips_without_decoding() {
    let cfg = LoaderConfig {
        batch_size: 4,
        image_size: 8,
        seed: 3,
        drop_last: true,
        prefetch: 0,
        ..LoaderConfig::default()
    };
    let all: Vec<_> = BatchLoader::new(Halves::new(30), cfg.clone())
        .unwrap()
        .epoch(2)
        .map(|b| b.unwrap())
        .collect();
    for prefetch in [0, 2] {
        let ds = Halves::new(30);
        let loader = BatchLoader::new(
            ds.clone(),
            LoaderConfig {
                prefetch,
                ..cfg.clone()
            },
        )
        .unwrap();
        let rest: Vec<_> = loader.epoch_from(2, 5).map(|b| b.unwrap()).collect();
        assert_eq!(rest.len(), all.len() - 5);
        for (a, b) in rest.iter().zip(&all[5..]) {
            assert_eq!(a.indices, b.indices);
            assert_eq!(
                a.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        assert_eq!(
            ds.decoded.load(Ordering::SeqCst),
            rest.len() * 4,
            "only the rest decoded"
        );
        assert_eq!(loader.epoch_from(2, 99).count(), 0);
    }
}
