//! Test-time flip augmentation: embed each image and its mirror image, add the raw embeddings
//! (insightface `verification.py` `test`: `embeddings_list[0] + embeddings_list[1]`; the
//! normalisation happens afterwards, in [`crate::verification::evaluate`]).

use ndarray::{s, Array2, ArrayView4, Axis};

use crate::embedder::Embedder;
use crate::error::{EvalError, Result};

/// Embeds `images` `(N, 3, H, W)` and their horizontal flips (along `W`) in batches of
/// `batch_size` and returns `embed(x) + embed(flip(x))`, `(N, D)`.
///
/// # Errors
/// No images, `batch_size == 0`, an embedder failure, or an embedder answer that is not
/// `(batch, D)` with the same `D` for every batch.
pub fn embed_with_flip<E: Embedder>(
    embedder: &mut E,
    images: ArrayView4<f32>,
    batch_size: usize,
) -> Result<Array2<f32>> {
    embed_with_flip_progress(embedder, images, batch_size, |_, _| {})
}

/// [`embed_with_flip`], calling `progress(done, total)` (images) after every batch.
///
/// # Errors
/// As [`embed_with_flip`].
pub fn embed_with_flip_progress<E: Embedder>(
    embedder: &mut E,
    images: ArrayView4<f32>,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Array2<f32>> {
    let n = images.len_of(Axis(0));
    if n == 0 {
        return Err(EvalError::Empty { what: "images" });
    }
    if batch_size == 0 {
        return Err(EvalError::InvalidParameter {
            name: "batch_size",
            reason: "must be at least 1".into(),
        });
    }
    let mut out: Option<Array2<f32>> = None;
    let mut start = 0;
    while start < n {
        let end = (start + batch_size).min(n);
        let batch = images.slice(s![start..end, .., .., ..]);
        let flipped = batch
            .slice(s![.., .., .., ..;-1])
            .as_standard_layout()
            .into_owned();
        let mut call = |view: ArrayView4<f32>| {
            embedder.embed(view).map_err(|e| EvalError::Embedder {
                start,
                end,
                source: Box::new(e),
            })
        };
        let mut emb = call(batch)?;
        let emb_flip = call(flipped.view())?;
        let dim = out.as_ref().map_or(emb.ncols(), |o| o.ncols());
        for (what, e) in [
            ("embedding of a batch", &emb),
            ("embedding of a flipped batch", &emb_flip),
        ] {
            if e.dim() != (end - start, dim) {
                return Err(EvalError::ShapeMismatch {
                    what,
                    expected: vec![end - start, dim],
                    got: e.shape().to_vec(),
                });
            }
        }
        emb += &emb_flip;
        out.get_or_insert_with(|| Array2::zeros((n, dim)))
            .slice_mut(s![start..end, ..])
            .assign(&emb);
        progress(end, n);
        start = end;
    }
    Ok(out.expect("at least one batch"))
}
