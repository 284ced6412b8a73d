//! `cargo xtask bench loader`: images/s of [`BatchLoader`] over a `.rec` of 112×112 JPEG records
//! (read, decode, random flip, normalise into `(B, 3, 112, 112)` f32), the work insightface's
//! `MXFaceDataset` + `DataLoader` does; `benchmarks/python_loader.py` is its Python peer.
//!
//! The `.rec` is generated once (synthetic identities rendered by
//! [`SyntheticFaces`], JPEG quality 95, packed with [`pack_records`] in layout A) into `--data`,
//! and reused when it is already there.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fr_data::recordio_writer::{encode_jpeg, pack_records, PackConfig, PackItem};
use fr_data::synthetic::{SyntheticConfig, SyntheticFaces};
use fr_data::{BatchLoader, FaceDataset, LoaderConfig, RecordIoDataset};
use rayon::prelude::*;

use super::BenchArgs;

/// Images per synthetic identity of the generated set.
const IMAGES_PER_IDENTITY: usize = 20;

/// Write `images` synthetic 112×112 faces as JPEG records into `dir` (train.rec, train.idx,
/// property), unless `dir/train.rec` exists.
pub fn ensure_rec(dir: &Path, images: usize) -> Result<()> {
    if dir.join("train.rec").is_file() && dir.join("train.idx").is_file() {
        return Ok(());
    }
    let identities = images.div_ceil(IMAGES_PER_IDENTITY).max(1);
    let faces = SyntheticFaces::new(SyntheticConfig {
        num_identities: identities,
        images_per_identity: IMAGES_PER_IDENTITY,
        image_size: 112,
        ..SyntheticConfig::default()
    })?;
    let jpegs = dir.join("jpeg");
    std::fs::create_dir_all(&jpegs).with_context(|| format!("creating {}", jpegs.display()))?;
    eprintln!(
        "rendering {images} synthetic 112x112 faces into {}",
        dir.display()
    );
    let items = (0..images)
        .into_par_iter()
        .map(|i| -> Result<PackItem> {
            let (img, label) = faces.sample(i)?;
            let path = jpegs.join(format!("{i:06}.jpg"));
            std::fs::write(&path, encode_jpeg(&img, 95)?)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(PackItem { path, label })
        })
        .collect::<Result<Vec<_>>>()?;
    let config = PackConfig {
        image_size: 112,
        quality: 95,
        overwrite: true,
        ..PackConfig::default()
    };
    let summary = pack_records(&items, faces.num_classes(), dir, &config, &mut |_| {})?;
    std::fs::remove_dir_all(&jpegs).with_context(|| format!("removing {}", jpegs.display()))?;
    eprintln!(
        "packed {} images of {} identities ({} MiB)",
        summary.images,
        summary.identities,
        summary.rec_bytes >> 20
    );
    Ok(())
}

/// Median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Time `args.warmup` untimed and `args.steps` timed epochs; print one Markdown row with the
/// median images/s of the timed epochs.
///
/// # Errors
/// No `--data`, a generation or read failure.
pub fn run(args: &BenchArgs) -> Result<()> {
    let Some(dir) = &args.data else {
        bail!("bench loader needs --data <dir> (train.rec is generated there when missing)");
    };
    ensure_rec(dir, args.images)?;
    let dataset = Arc::new(RecordIoDataset::open(dir)?);
    if args.decode_only {
        return decode_only(&dataset, args);
    }
    let config = LoaderConfig {
        batch_size: args.batch,
        image_size: 112,
        shuffle: true,
        seed: 0,
        flip_prob: 0.5,
        drop_last: true,
        prefetch: 2,
        ..LoaderConfig::default()
    };
    let loader = BatchLoader::new(dataset.clone(), config)?;
    let mut rates = Vec::with_capacity(args.steps);
    for epoch in 0..(args.warmup + args.steps) {
        let start = Instant::now();
        let mut images = 0usize;
        let mut checksum = 0f32;
        for batch in loader.epoch(epoch as u64) {
            let batch = batch?;
            images += batch.indices.len();
            // Touch the batch as a consumer would (first pixel), so nothing is optimised away.
            checksum += batch.images.flatten_all()?.get(0)?.to_scalar::<f32>()?;
        }
        let secs = start.elapsed().as_secs_f64();
        if epoch >= args.warmup {
            rates.push(images as f64 / secs.max(1e-9));
        }
        tracing::debug!(epoch, images, secs, checksum, "loader epoch");
    }
    let ips = median(&mut rates);
    println!("| loader | images | batch | threads | images/s |");
    println!("|---|---|---|---|---|");
    println!(
        "| fr BatchLoader | {} | {} | {} | {ips:.1} |",
        dataset.len(),
        args.batch,
        rayon::current_num_threads()
    );
    Ok(())
}

/// `--decode-only`: microseconds per image of [`fr_data::recordio::decode_rgb`] on one thread, over the
/// first `args.decode_images` records held in memory (median of `args.steps` passes after
/// `args.warmup`); the decode-only mode of `benchmarks/python_loader.py` is its peer.
fn decode_only(dataset: &RecordIoDataset, args: &BenchArgs) -> Result<()> {
    let n = args.decode_images.min(dataset.len());
    if n == 0 {
        bail!("no records to decode");
    }
    let payloads: Vec<Vec<u8>> = (0..n)
        .map(|i| Ok(dataset.record(i)?.image))
        .collect::<Result<_>>()?;
    let mut times = Vec::with_capacity(args.steps);
    for pass in 0..(args.warmup + args.steps.max(1)) {
        let start = Instant::now();
        let mut checksum = 0u64;
        for p in &payloads {
            let img = fr_data::recordio::decode_rgb(p).map_err(|e| anyhow::anyhow!(e))?;
            checksum += u64::from(img.as_raw()[0]);
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        if pass >= args.warmup {
            times.push(us);
        }
        tracing::debug!(pass, us, checksum, "decode pass");
    }
    let us = median(&mut times);
    println!("| decoder | images | threads | µs/image | images/s |");
    println!("|---|---|---|---|---|");
    println!(
        "| fr decode_rgb (zune-jpeg) | {n} | 1 | {us:.1} | {:.0} |",
        1e6 / us
    );
    Ok(())
}
