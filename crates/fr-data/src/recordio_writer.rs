//! Pack images into an insightface training set: `train.rec`, `train.idx` and `property`.
//!
//! Layout A (the default), as insightface's `RecBuilder` / `face2rec2` pack MS1M and as our
//! reader expects it:
//! - key 0: the header record, `IRHeader { flag: 2, label: 0, id: 0, id2: 0 }` followed by the
//!   f32 labels `[first_identity_key, end_identity_key]` and no image; it is the first record
//!   of the `.rec` (offset 0), its labels filled in once the image count is known;
//! - keys `1..first_identity_key`: one record per image, grouped by identity in ascending class
//!   order: `IRHeader { flag: 0, label: class id as f32, id: key, id2: 0 }` then the JPEG;
//! - keys `first_identity_key..end_identity_key`: one identity record per class that has
//!   images, `IRHeader { flag: 2, label: 0, id: key, id2: 0 }` with the f32 labels
//!   `[first image key, end image key)` and no image;
//! - `.idx`: one `key<TAB>offset` line per record in file order; `property`:
//!   `num_classes,height,width` without a trailing newline.
//!
//! These are the bytes of the layout-A files in this crate's test data. insightface's own
//! `RecBuilder` differs in two places no reader looks at: it writes record 0 last (its `.idx`
//! line comes last) and sets the header's `id2` to 1; its `property` ends with a newline.
//! Keys past 2^24 are inexact as f32 labels, as in the published packs (WebFace42M);
//! [`RecordIoDataset`](crate::RecordIoDataset) finds the exact boundary from the records.
//!
//! The shuffled variant (`shuffle: true`) is what arcface_torch's `scripts/shuffle_rec.py`
//! makes for DALI's `readers.mxnet`, which decodes every record of the `.idx` as an image: no
//! header and no identity records, the image records in a seeded random order under keys
//! `0..n` (`id` = key, as im2rec writes it). A `property` file is still written, so our reader
//! gets the class count without scanning the labels.
//!
//! Images are stored as JPEG: a source JPEG already of the target size is copied unchanged
//! (after checking that it decodes), anything else (another size, PNG, PNM) is resized
//! bilinearly to `image_size`×`image_size` and encoded at `quality`. Undecodable sources are
//! skipped and listed in the [`PackSummary`]. Records are chunked as dmlc's writer does
//! ([`encode_record`]). The files are written under temporary
//! names in the output folder and renamed into place at the end (`.rec`, `.idx`, then
//! `property`), so a failed or interrupted pack never leaves a half-written `train.rec`.

use std::fs::File;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::dataset::FaceDataset;
use crate::image_folder::ImageFolder;
use crate::recordio::{decode_rgb, encode_record, sniff_format, ImageRecord, RecordIoWriter};
use crate::transform::resize_rgb;
use crate::{Error, Result};

/// Images decoded and encoded in parallel before their records are written in order.
const CHUNK: usize = 512;

/// One source image: a file and its class id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackItem {
    /// The image file (JPEG, PNG or PNM).
    pub path: PathBuf,
    /// Class id, `< num_classes`.
    pub label: u32,
}

impl PackItem {
    /// The images of an [`ImageFolder`] (a folder of identities or a list file), in its order.
    ///
    /// # Errors
    /// A label the folder cannot give (never for a folder that opened).
    pub fn from_folder(folder: &ImageFolder) -> Result<Vec<Self>> {
        (0..folder.len())
            .map(|i| {
                Ok(Self {
                    path: folder.path(i)?.to_path_buf(),
                    label: folder.label(i)?,
                })
            })
            .collect()
    }
}

/// Packing options.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PackConfig {
    /// Side of the stored images in pixels (insightface: 112); written to `property`.
    pub image_size: u32,
    /// JPEG quality 1..=100 of re-encoded images (insightface packs use 95).
    pub quality: u8,
    /// Write the shuffled images-only variant (DALI, `shuffle_rec.py`) instead of layout A.
    pub shuffle: bool,
    /// Seed of the shuffled order.
    pub seed: u64,
    /// Replace `train.rec` / `train.idx` / `property` already in the output folder.
    pub overwrite: bool,
}

impl Default for PackConfig {
    fn default() -> Self {
        Self {
            image_size: 112,
            quality: 95,
            shuffle: false,
            seed: 0,
            overwrite: false,
        }
    }
}

impl PackConfig {
    /// Check the values.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key: `image_size` 0, `quality` outside 1..=100.
    pub fn validate(&self) -> Result<()> {
        if self.image_size == 0 {
            return Err(Error::Config {
                key: "image_size".into(),
                reason: "must be at least 1".into(),
            });
        }
        if !(1..=100).contains(&self.quality) {
            return Err(Error::Config {
                key: "quality".into(),
                reason: format!("JPEG quality must be in 1..=100, got {}", self.quality),
            });
        }
        Ok(())
    }
}

/// A source image left out of the pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedImage {
    /// The file.
    pub path: PathBuf,
    /// Why (unreadable, undecodable).
    pub reason: String,
}

/// What [`pack_records`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackSummary {
    /// The output folder (holding `train.rec`, `train.idx`, `property`).
    pub out_dir: PathBuf,
    /// Image records written.
    pub images: usize,
    /// Identities with at least one image (= identity records in layout A).
    pub identities: usize,
    /// Class count written to `property`.
    pub num_classes: usize,
    /// Images stored as their source JPEG bytes.
    pub passed_through: usize,
    /// Images re-encoded to JPEG.
    pub encoded: usize,
    /// Sources left out, in source order.
    pub skipped: Vec<SkippedImage>,
    /// Size of `train.rec` in bytes.
    pub rec_bytes: u64,
    /// `true` for the shuffled images-only variant.
    pub shuffled: bool,
}

/// One image ready to be written.
struct Encoded {
    jpeg: Vec<u8>,
    passed_through: bool,
}

/// Read, decode, resize and encode one source; `Err` is the reason to skip it.
fn encode_one(path: &Path, size: u32, quality: u8) -> std::result::Result<Encoded, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("unreadable: {e}"))?;
    let img = decode_rgb(&bytes)?;
    if sniff_format(&bytes) == Some(image::ImageFormat::Jpeg) && img.dimensions() == (size, size) {
        return Ok(Encoded {
            jpeg: bytes,
            passed_through: true,
        });
    }
    let img = resize_rgb(img, size, size);
    Ok(Encoded {
        jpeg: encode_jpeg(&img, quality).map_err(|e| format!("JPEG encoding failed: {e}"))?,
        passed_through: false,
    })
}

/// Encode `img` as a baseline JPEG at `quality` (1..=100) with the image crate.
///
/// # Errors
/// An encoder error (an image of zero size).
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> image::ImageResult<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(img)?;
    Ok(out)
}

/// Temporary output files, removed on drop unless renamed into place.
struct TempFiles {
    pairs: Vec<(PathBuf, PathBuf)>,
    committed: bool,
}

impl TempFiles {
    fn new(dir: &Path, names: &[&str]) -> Self {
        let pid = std::process::id();
        let pairs = names
            .iter()
            .map(|n| (dir.join(format!(".{n}.tmp-{pid}")), dir.join(n)))
            .collect();
        Self {
            pairs,
            committed: false,
        }
    }

    fn temp(&self, i: usize) -> &Path {
        &self.pairs[i].0
    }

    fn commit(mut self) -> Result<()> {
        for (tmp, dst) in &self.pairs {
            std::fs::rename(tmp, dst).map_err(|source| Error::Io {
                path: dst.clone(),
                source,
            })?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        if !self.committed {
            for (tmp, _) in &self.pairs {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The payload of the layout-A header record (key 0).
fn header_payload(first_identity_key: u64, end_identity_key: u64) -> Vec<u8> {
    ImageRecord::with_labels(
        vec![first_identity_key as f32, end_identity_key as f32],
        0,
        Vec::new(),
    )
    .pack()
}

/// Pack `items` into `out_dir/{train.rec, train.idx, property}` (layout A, or the shuffled
/// images-only variant; see the module documentation). `progress` is called with the number of
/// sources processed so far (written or skipped) after each chunk of images.
///
/// # Errors
/// An invalid config; an item whose label is `≥ num_classes` (naming the file); existing
/// output files without `overwrite`; no decodable image at all; a write error (naming the
/// file). Undecodable sources are not errors: they are skipped and listed in the summary.
pub fn pack_records(
    items: &[PackItem],
    num_classes: usize,
    out_dir: impl AsRef<Path>,
    config: &PackConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<PackSummary> {
    config.validate()?;
    let out_dir = out_dir.as_ref().to_path_buf();
    let names = ["train.rec", "train.idx", "property"];
    check_inputs(items, num_classes, &out_dir, &names, config.overwrite)?;
    // Layout A groups the images by identity in class order; the sort is stable, so the
    // source order is kept within an identity.
    let mut order: Vec<usize> = (0..items.len()).collect();
    if config.shuffle {
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(config.seed));
    } else {
        order.sort_by_key(|&i| items[i].label);
    }
    let temps = TempFiles::new(&out_dir, &names);
    let mut writer = RecordIoWriter::create(temps.temp(0), temps.temp(1))?;
    let mut next_key = if config.shuffle {
        0
    } else {
        // Reserve the header record at offset 0 (its exact size); its labels are written at the end.
        writer.write(0, &header_payload(0, 0))?;
        1
    };
    let mut summary = PackSummary {
        out_dir: out_dir.clone(),
        images: 0,
        identities: 0,
        num_classes,
        passed_through: 0,
        encoded: 0,
        skipped: Vec::new(),
        rec_bytes: 0,
        shuffled: config.shuffle,
    };
    // (label, first key, end key) of each identity with images, in class order.
    let mut identities: Vec<(u32, u64, u64)> = Vec::new();
    let mut has_images = vec![false; num_classes];
    let mut done = 0;
    for chunk in order.chunks(CHUNK) {
        let encoded: Vec<std::result::Result<Encoded, String>> = chunk
            .par_iter()
            .map(|&i| encode_one(&items[i].path, config.image_size, config.quality))
            .collect();
        for (&i, enc) in chunk.iter().zip(encoded) {
            let item = &items[i];
            match enc {
                Ok(enc) => {
                    let key = next_key;
                    next_key += 1;
                    let record = ImageRecord::new(item.label as f32, key, enc.jpeg);
                    writer.write(key, &record.pack())?;
                    summary.images += 1;
                    if enc.passed_through {
                        summary.passed_through += 1;
                    } else {
                        summary.encoded += 1;
                    }
                    if !has_images[item.label as usize] {
                        has_images[item.label as usize] = true;
                        summary.identities += 1;
                    }
                    if !config.shuffle {
                        match identities.last_mut() {
                            Some((label, _, end)) if *label == item.label => *end = key + 1,
                            _ => identities.push((item.label, key, key + 1)),
                        }
                    }
                }
                Err(reason) => {
                    tracing::warn!(path = %item.path.display(), %reason, "skipping image");
                    summary.skipped.push(SkippedImage {
                        path: item.path.clone(),
                        reason,
                    });
                }
            }
        }
        done += chunk.len();
        progress(done);
    }
    if summary.images == 0 {
        return Err(Error::Format {
            path: out_dir,
            what: format!(
                "no decodable image among the {} sources ({} skipped)",
                items.len(),
                summary.skipped.len()
            ),
        });
    }
    summary.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    if !config.shuffle {
        write_identity_records(writer, &identities, next_key, &temps)?;
        return finish(temps, summary, config, None);
    }
    finish(temps, summary, config, Some(writer))
}

/// Labels below `num_classes` (else the offending file is named) and, unless `overwrite`, no
/// output file already in `out_dir` (created if missing).
fn check_inputs(
    items: &[PackItem],
    num_classes: usize,
    out_dir: &Path,
    names: &[&str],
    overwrite: bool,
) -> Result<()> {
    if let Some(bad) = items.iter().find(|it| it.label as usize >= num_classes) {
        return Err(Error::Format {
            path: bad.path.clone(),
            what: format!(
                "class id {} is not below the number of classes {num_classes}",
                bad.label
            ),
        });
    }
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    if !overwrite {
        if let Some(existing) = names.iter().map(|n| out_dir.join(n)).find(|p| p.exists()) {
            return Err(Error::Format {
                path: existing,
                what: "already exists (set overwrite to replace it)".into(),
            });
        }
    }
    Ok(())
}

/// Layout A's tail: one identity record `[first key, end key)` per identity from key
/// `next_key` on, then the header record at offset 0 filled in (same length as the one
/// reserved) with the identity records' key range.
fn write_identity_records(
    mut writer: RecordIoWriter,
    identities: &[(u32, u64, u64)],
    mut next_key: u64,
    temps: &TempFiles,
) -> Result<()> {
    let first_identity_key = next_key;
    for &(_, start, end) in identities {
        let key = next_key;
        next_key += 1;
        let record = ImageRecord::with_labels(vec![start as f32, end as f32], key, Vec::new());
        writer.write(key, &record.pack())?;
    }
    let end_identity_key = next_key;
    writer.finish()?;
    // Fill in the header record at offset 0 (same length as the reserved one).
    let chunk = encode_record(&header_payload(first_identity_key, end_identity_key))
        .expect("a 32-byte payload");
    let rec_tmp = temps.temp(0);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(rec_tmp)
        .map_err(io_err(rec_tmp))?;
    use std::io::Write;
    f.write_all(&chunk)
        .and_then(|()| f.sync_all())
        .map_err(io_err(rec_tmp))?;
    Ok(())
}

/// Flush, write `property`, rename everything into place.
fn finish(
    temps: TempFiles,
    mut summary: PackSummary,
    config: &PackConfig,
    writer: Option<RecordIoWriter>,
) -> Result<PackSummary> {
    if let Some(w) = writer {
        w.finish()?;
    }
    let prop = temps.temp(2);
    let s = config.image_size;
    std::fs::write(prop, format!("{},{s},{s}", summary.num_classes)).map_err(io_err(prop))?;
    for i in 0..2 {
        let p = temps.temp(i);
        File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(io_err(p))?;
    }
    summary.rec_bytes = std::fs::metadata(temps.temp(0))
        .map_err(io_err(temps.temp(0)))?
        .len();
    temps.commit()?;
    tracing::info!(
        out = %summary.out_dir.display(),
        images = summary.images,
        identities = summary.identities,
        skipped = summary.skipped.len(),
        shuffled = summary.shuffled,
        "packed RecordIO dataset"
    );
    Ok(summary)
}
