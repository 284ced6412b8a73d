//! One embedder: a backbone in eval mode over host image batches, with the model card's input
//! transform (colour order and normalisation), for fr-eval's protocols (which flip-add and
//! batch through [`fr_eval::embed_with_flip_progress`]).
//!
//! fr-data gives every image as RGB `(p/255 − 0.5)/0.5`; a checkpoint trained elsewhere may
//! want BGR or other mean / std ([`fr_backbone::ModelCard`]): [`InputTransform`] maps one to
//! the other.

use std::ops::Deref;

use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use fr_backbone::{ColourOrder, Normalisation};
use fr_eval::Embedder;
use ndarray::{s, Array2, Array4, ArrayView4};

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
