//! Verification `.bin` files of insightface (lfw, cfp_fp, agedb_30, calfw, cplfw, ...): a
//! pickle of `(bins, issame_list)` where `bins` holds the encoded images and pair `i` is images
//! `2i` and `2i + 1`.
//!
//! Three generations of files are accepted: Python-2 protocol-2 pickles of `str` (the original
//! lfw.bin), Python-3 `bytes` (protocol 2 via `_codecs.encode`, or 3–5), and 1-D uint8 numpy
//! arrays (`cv2.imencode` output). Images are sniffed as JPEG or PNG, decoded to RGB and resized
//! to the evaluation size when they differ (insightface's `load_bin` does the same).

use std::path::Path;

use image::RgbImage;
use rayon::prelude::*;

use crate::recordio::decode_rgb;
use crate::transform::resize_rgb;
use crate::{pickle, Error, Result};

/// The image size of every insightface evaluation set.
pub const VERIFICATION_IMAGE_SIZE: u32 = 112;

/// A verification set: `images[2i]` and `images[2i + 1]` form pair `i`, same identity when
/// `issame[i]`.
#[derive(Debug, Clone)]
pub struct VerificationSet {
    /// The file stem (`lfw`, `cfp_fp`, ...).
    pub name: String,
    /// Decoded RGB images, `2 · issame.len()` of them.
    pub images: Vec<RgbImage>,
    /// Pair labels.
    pub issame: Vec<bool>,
}

impl VerificationSet {
    /// Number of pairs.
    pub fn num_pairs(&self) -> usize {
        self.issame.len()
    }

    /// The pairs: `(first, second, issame)`.
    pub fn pairs(&self) -> impl Iterator<Item = (&RgbImage, &RgbImage, bool)> + '_ {
        self.images
            .chunks_exact(2)
            .zip(&self.issame)
            .map(|(p, &same)| (&p[0], &p[1], same))
    }
}

/// The encoded images and pair labels of a `.bin`, not decoded.
///
/// # Errors
/// An unreadable file, not a pickle, a truncated pickle, an unexpected structure, or an image
/// count other than twice the pair count; each naming the file.
pub fn read_bin_encoded(path: impl AsRef<Path>) -> Result<(Vec<Vec<u8>>, Vec<bool>)> {
    let path = path.as_ref();
    let data = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_bin_encoded(&data).map_err(|what| Error::Format {
        path: path.to_path_buf(),
        what,
    })
}

/// [`read_bin_encoded`] on the bytes of a `.bin`; `Err` holds what is wrong. Never panics on
/// malformed input, and allocates no more than the input's size for the byte strings it
/// reads, whatever their length fields claim.
///
/// # Errors
/// As [`read_bin_encoded`].
pub fn parse_bin_encoded(data: &[u8]) -> std::result::Result<(Vec<Vec<u8>>, Vec<bool>), String> {
    let value = pickle::load(data)?;
    let top = value
        .items()
        .map_err(|e| format!("top level: {e}; expected (bins, issame_list)"))?;
    if top.len() != 2 {
        return Err(format!(
            "top level has {} items, expected (bins, issame_list)",
            top.len()
        ));
    }
    let shared = top[0]
        .items()
        .map_err(|e| format!("bins: {e}"))?
        .iter()
        .enumerate()
        .map(|(i, b)| b.bytes().map_err(|e| format!("image {i}: {e}")))
        .collect::<std::result::Result<Vec<_>, String>>()?;
    // Every image of a real file is its own byte string in the pickle; one string referenced
    // many times (the memo) would multiply the memory of the copies below.
    let total: usize = shared.iter().map(|b| b.len()).sum();
    if total > data.len() {
        return Err(format!(
            "the images total {total} bytes, more than the {} bytes of the file: repeated \
             references to one byte string are not a verification set",
            data.len()
        ));
    }
    let bins: Vec<Vec<u8>> = shared.iter().map(|b| b.to_vec()).collect();
    let issame = top[1].truths().map_err(|e| format!("issame_list: {e}"))?;
    if bins.len() != 2 * issame.len() {
        return Err(format!(
            "{} images for {} pairs, expected twice as many images as pairs",
            bins.len(),
            issame.len()
        ));
    }
    Ok((bins, issame))
}

/// Load a `.bin` with images resized to 112×112 where they differ.
///
/// # Errors
/// As [`read_bin_encoded`], and an undecodable image (naming its index).
pub fn load_bin(path: impl AsRef<Path>) -> Result<VerificationSet> {
    load_bin_sized(path, VERIFICATION_IMAGE_SIZE)
}

/// Load a `.bin` with images resized to `size`×`size` where they differ (bilinear).
///
/// # Errors
/// As [`load_bin`].
pub fn load_bin_sized(path: impl AsRef<Path>, size: u32) -> Result<VerificationSet> {
    let path = path.as_ref();
    let (bins, issame) = read_bin_encoded(path)?;
    let images = bins
        .par_iter()
        .enumerate()
        .map(|(i, b)| {
            let img = decode_rgb(b).map_err(|what| Error::Format {
                path: path.to_path_buf(),
                what: format!("image {i}: {what}"),
            })?;
            Ok(resize_rgb(img, size, size))
        })
        .collect::<Result<Vec<_>>>()?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    tracing::info!(name, pairs = issame.len(), "loaded verification set");
    Ok(VerificationSet {
        name,
        images,
        issame,
    })
}
