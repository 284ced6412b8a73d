//! One embedder: a backbone in eval mode over host image batches, with the model card's input
//! transform (colour order and normalisation), for fr-eval's protocols (which flip-add and
//! batch through [`fr_eval::embed_with_flip_progress`]).
//!
//! fr-data gives every image as RGB `(p/255 − 0.5)/0.5`; a checkpoint trained elsewhere may
//! want BGR or other mean / std ([`fr_backbone::ModelCard`]): [`InputTransform`] maps one to
//! the other.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use fr_backbone::{ColourOrder, Normalisation};
use fr_eval::Embedder;
use ndarray::{s, Array2, Array4, ArrayView4};
use serde::Serialize;
use tracing::info;

use crate::progress::progress_bar;
use crate::{bail, Context, Result};

/// Bump when the cached layout changes.
const CACHE_VERSION: u32 = 1;

/// How the model's input differs from fr-data's (RGB, `(p/255 − MEAN)/STD`): channel order
/// and per-channel affine map, from the model card.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputTransform {
    bgr: bool,
    /// Per model channel: `y = x·scale + shift`.
    scale: [f32; 3],
    shift: [f32; 3],
}

impl Default for InputTransform {
    /// fr's own input: nothing to change.
    fn default() -> Self {
        Self::new(ColourOrder::Rgb, Normalisation::default())
    }
}

impl InputTransform {
    /// fr-data gives `x = (p/255 − MEAN)/STD`; the model wants `(p/255 − m)/s` =
    /// `x·STD/s + (MEAN − m)/s`, channels reversed for BGR.
    pub fn new(colour: ColourOrder, norm: Normalisation) -> Self {
        use fr_data::transform::{MEAN, STD};
        Self {
            bgr: colour == ColourOrder::Bgr,
            scale: std::array::from_fn(|c| STD / norm.std[c]),
            shift: std::array::from_fn(|c| (MEAN - norm.mean[c]) / norm.std[c]),
        }
    }

    /// Whether the model takes BGR input.
    pub fn is_bgr(&self) -> bool {
        self.bgr
    }

    /// Whether the transform changes nothing.
    pub fn is_identity(&self) -> bool {
        !self.bgr && self.scale == [1.0; 3] && self.shift == [0.0; 3]
    }

    /// For cache keys and the report.
    pub fn describe(&self) -> String {
        format!(
            "{} scale {:?} shift {:?}",
            if self.bgr { "BGR" } else { "RGB" },
            self.scale,
            self.shift
        )
    }

    /// `images` `(N, 3, H, W)` as the model wants them.
    pub fn apply(&self, images: ArrayView4<f32>) -> Array4<f32> {
        let mut out = Array4::<f32>::zeros(images.raw_dim());
        for c in 0..3 {
            let src = if self.bgr { 2 - c } else { c };
            let (scale, shift) = (self.scale[c], self.shift[c]);
            out.slice_mut(s![.., c, .., ..])
                .zip_mut_with(&images.slice(s![.., src, .., ..]), |o, &x| {
                    *o = x * scale + shift
                });
        }
        out
    }
}

/// Runs a backbone (`Box<dyn Backbone>`, `&dyn ModuleT`, ...) in eval mode over host batches
/// `(N, 3, H, W)` → embeddings `(N, D)` (f32, not normalised), without building a graph.
pub struct BackboneEmbedder<M> {
    /// The backbone.
    pub model: M,
    /// Where it runs.
    pub device: Device,
    /// Applied to every batch first.
    pub input: InputTransform,
}

impl<M> BackboneEmbedder<M> {
    /// `model` on `device`, fed fr-data's input unchanged.
    pub fn new(model: M, device: &Device) -> Self {
        Self {
            model,
            device: device.clone(),
            input: InputTransform::default(),
        }
    }
}

impl<M: Deref> Embedder for BackboneEmbedder<M>
where
    M::Target: ModuleT,
{
    type Error = candle_core::Error;

    fn embed(&mut self, images: ArrayView4<f32>) -> Result<Array2<f32>, Self::Error> {
        let transformed;
        let images = if self.input.is_identity() {
            images.view()
        } else {
            transformed = self.input.apply(images);
            transformed.view()
        };
        let shape = images.shape().to_vec();
        let data: Vec<f32> = images.iter().copied().collect();
        let x = Tensor::from_vec(data, shape, &self.device)?;
        let model: &M::Target = &self.model;
        let y = fr_kernels::no_grad(|| model.forward_t(&x, false))?;
        let (n, d) = y.dims2()?;
        let v = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Array2::from_shape_vec((n, d), v).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `path|size|mtime` of a file or folder (for cache keys).
///
/// # Errors
/// An unreadable path, named.
pub fn fingerprint(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    Ok(format!("{}|{}|{mtime}", canonical.display(), meta.len()))
}

/// Where one dataset's embeddings under one model are cached.
struct CacheEntry {
    path: PathBuf,
    /// The key's text (stored in the file's metadata, checked on load).
    key: String,
}

impl CacheEntry {
    fn new(dir: &Path, weights: &str, dataset: &Path, what: &str, size: u32) -> Result<Self> {
        let key = format!(
            "v{CACHE_VERSION}|weights {weights}|data {}|{what}|size {size}|flip 1",
            fingerprint(dataset)?
        );
        let stem: String = dataset
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        Ok(Self {
            path: dir.join(format!("{stem}-{:016x}.safetensors", fnv1a(key.as_bytes()))),
            key,
        })
    }

    fn load(&self, n: usize) -> Result<Option<Array2<f32>>> {
        if !self.path.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("{}: not a readable safetensors file", self.path.display()))?;
        let (Some(emb), Some(key)) = (tensors.get("embeddings"), tensors.get("key")) else {
            return Ok(None);
        };
        let key: Vec<u8> = key.to_vec1()?;
        if key != self.key.as_bytes() {
            return Ok(None);
        }
        let (rows, cols) = emb.dims2()?;
        if rows != n {
            return Ok(None);
        }
        let v = emb.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(Array2::from_shape_vec((rows, cols), v)?))
    }

    fn store(&self, emb: &Array2<f32>) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let t = Tensor::from_slice(
            emb.as_standard_layout()
                .as_slice()
                .expect("standard layout"),
            emb.dim(),
            &Device::Cpu,
        )?;
        let key = Tensor::from_slice(self.key.as_bytes(), self.key.len(), &Device::Cpu)?;
        let tmp = self.path.with_extension("tmp");
        candle_core::safetensors::save(
            &HashMap::from([("embeddings".to_string(), t), ("key".to_string(), key)]),
            &tmp,
        )
        .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("renaming to {}", self.path.display()))?;
        Ok(())
    }
}

/// What embedding one dataset did.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedInfo {
    /// The dataset (file or folder).
    pub dataset: String,
    /// Images embedded.
    pub images: usize,
    /// Where its embeddings are cached.
    pub cache_file: PathBuf,
    /// `true` when the embeddings came from the cache.
    pub cached: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// A backbone embedder with flip-add and an embedding cache: every dataset's `(n, 2D)`
/// embeddings (image, then flipped image) are stored under `cache_dir` in a safetensors file
/// keyed by the weights, the dataset's path, size and modification time, the input size and
/// the protocol, and reused when the key matches (evaluation's `fr eval` cache).
pub struct CachedEmbedder<M> {
    /// The model and its input transform.
    pub embedder: BackboneEmbedder<M>,
    /// Input side, pixels.
    pub size: u32,
    /// Images per forward pass.
    pub batch: usize,
    /// Where the cache files go.
    pub cache_dir: PathBuf,
    /// What identifies the model in cache keys ([`fingerprint`] of its weights, plus its input
    /// transform).
    pub weights_key: String,
    /// What each [`CachedEmbedder::embed`] call did, in order.
    pub embedded: Vec<EmbedInfo>,
}

impl<M: Deref> CachedEmbedder<M>
where
    M::Target: ModuleT,
{
    /// `(n, 2D)` embeddings (image, then flipped image) of `n` images that `load` produces
    /// batch by batch as `(B, 3, size, size)` normalised arrays; from the cache when present.
    ///
    /// # Errors
    /// An unreadable or unwritable cache file, a failed `load`, a model failure, or a model
    /// that returns the wrong number of rows.
    pub fn embed(
        &mut self,
        dataset: &Path,
        what: &str,
        n: usize,
        load: &dyn Fn(&[usize]) -> Result<Array4<f32>>,
    ) -> Result<Array2<f32>> {
        let start = Instant::now();
        let entry = CacheEntry::new(&self.cache_dir, &self.weights_key, dataset, what, self.size)?;
        if let Some(e) = entry.load(n)? {
            info!(dataset = %dataset.display(), cache = %entry.path.display(), "reusing cached embeddings");
            self.embedded.push(EmbedInfo {
                dataset: dataset.display().to_string(),
                images: n,
                cache_file: entry.path,
                cached: true,
                seconds: start.elapsed().as_secs_f64(),
            });
            return Ok(e);
        }
        if n == 0 {
            bail!("{}: no images to embed", dataset.display());
        }
        let pb = progress_bar(n as u64, "embed");
        pb.set_message("images");
        let mut out: Option<Array2<f32>> = None;
        for begin in (0..n).step_by(self.batch) {
            let idx: Vec<usize> = (begin..(begin + self.batch).min(n)).collect();
            let images = load(&idx)?;
            let flipped = images
                .slice(s![.., .., .., ..;-1])
                .as_standard_layout()
                .into_owned();
            let a = self.embedder.embed(images.view())?;
            let b = self.embedder.embed(flipped.view())?;
            let d = a.ncols();
            let o = out.get_or_insert_with(|| Array2::zeros((n, 2 * d)));
            if a.nrows() != idx.len() || b.dim() != a.dim() || o.ncols() != 2 * d {
                bail!(
                    "the model returned {:?} embeddings for a batch of {}",
                    a.dim(),
                    idx.len()
                );
            }
            o.slice_mut(s![begin..begin + idx.len(), ..d]).assign(&a);
            o.slice_mut(s![begin..begin + idx.len(), d..]).assign(&b);
            pb.set_position((begin + idx.len()) as u64);
        }
        pb.finish_and_clear();
        let out = out.expect("n > 0");
        entry.store(&out)?;
        let seconds = start.elapsed().as_secs_f64();
        info!(
            dataset = %dataset.display(),
            images = n,
            seconds = format!("{seconds:.1}"),
            cache = %entry.path.display(),
            "embedded and cached"
        );
        self.embedded.push(EmbedInfo {
            dataset: dataset.display().to_string(),
            images: n,
            cache_file: entry.path,
            cached: false,
            seconds,
        });
        Ok(out)
    }
}
