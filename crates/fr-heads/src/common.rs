//! Building blocks shared by the heads: input checks, normalisation, cosine matrices, target
//! masks (no `scatter`), a stable cross-entropy, and host-computed functions with an exact
//! gradient attached (`acos`, vMF normaliser).
//!
//! Everything here has a correct backward pass in candle 0.11 (checked by finite differences in
//! the unit tests below): `where_cond`, `maximum`/`minimum`, `max_keepdim`, `index_select` and
//! `gather` are used; `scatter`, `scatter_add` and the fused softmax are not.

use candle_core::{DType, Device, Tensor, D};

use crate::{Error, Result};

/// Default clamp of cosines to `[-1 + ε, 1 - ε]` before `acos` / `sqrt(1 - c²)`.
pub const DEFAULT_COS_EPS: f64 = 1e-7;

/// Smallest row norm used when normalising (as `torch.nn.functional.normalize`).
pub const NORM_EPS: f64 = 1e-12;

/// Checked inputs of a head's forward pass.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Embeddings `(B, D)` in the compute dtype (f32 for f16/bf16 inputs, else unchanged).
    pub x: Tensor,
    /// Labels on the host, `B` entries in `0..num_classes`.
    pub labels: Vec<u32>,
    /// Labels `(B,)` u32 on the device of `x`.
    pub labels_t: Tensor,
}

/// The dtype a head computes in: f32 for half-precision inputs (cosines, margins and losses
/// are never computed in f16/bf16), the input dtype otherwise.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Check `embeddings` `(B, embedding_size)` (float) and `labels` `(B,)` u32 in
/// `0..num_classes`, and cast the embeddings to the compute dtype.
///
/// # Errors
/// [`Error::Shape`] for a wrong rank, size or dtype, [`Error::Label`] for an out-of-range label.
pub fn check_inputs(
    embeddings: &Tensor,
    labels: &Tensor,
    embedding_size: usize,
    num_classes: usize,
) -> Result<Inputs> {
    let dims = embeddings.dims();
    let float = matches!(
        embeddings.dtype(),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64
    );
    if dims.len() != 2 || dims[1] != embedding_size || dims[0] == 0 || !float {
        return Err(Error::Shape {
            what: "embeddings".into(),
            expected: format!("(B, {embedding_size}) with B > 0, a float dtype"),
            got: format!("{:?} {:?}", dims, embeddings.dtype()),
        });
    }
    let b = dims[0];
    if labels.dims() != [b] || labels.dtype() != DType::U32 {
        return Err(Error::Shape {
            what: "labels".into(),
            expected: format!("({b},) U32, one class id per embedding"),
            got: format!("{:?} {:?}", labels.dims(), labels.dtype()),
        });
    }
    let host: Vec<u32> = labels.to_vec1()?;
    if let Some((index, &label)) = host
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= num_classes)
    {
        return Err(Error::Label {
            index,
            label: i64::from(label),
            num_classes,
        });
    }
    let x = embeddings.to_dtype(compute_dtype(embeddings.dtype()))?;
    let labels_t = labels.to_device(x.device())?;
    Ok(Inputs {
        x,
        labels: host,
        labels_t,
    })
}

/// Row norms `(B,)` of `x` `(B, D)`, floored at [`NORM_EPS`] (so the gradient stays finite
/// for a zero row).
pub fn row_norms(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?
        .sum(D::Minus1)?
        .maximum(NORM_EPS * NORM_EPS)?
        .sqrt()?)
}

/// Rows of `x` `(N, D)` divided by their norms.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&row_norms(x)?.unsqueeze(1)?)?)
}

/// Cosine matrix `(B, C)` = x̂·ŵᵀ, clamped to `[-1 + eps, 1 - eps]`.
pub fn cosine(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let xn = l2_normalize(x)?;
    let wn = l2_normalize(weight)?;
    clamp_cos(&xn.matmul(&wn.t()?)?, eps)
}

/// Clamp cosines to `[-1 + eps, 1 - eps]` (zero gradient outside).
pub fn clamp_cos(c: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(c.clamp(-1.0 + eps, 1.0 - eps)?)
}

/// The class weights in the compute dtype of `x` (a no-op when they agree).
pub fn as_dtype_of(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(w.to_dtype(x.dtype())?.to_device(x.device())?)
}

/// Target mask `(B, C)` u8: 1 at `(i, labels[i])`, built by comparing the labels with an
/// `arange` (no scatter).
pub fn target_mask(labels: &Tensor, num_classes: usize) -> Result<Tensor> {
    let classes = Tensor::arange(0u32, num_classes as u32, labels.device())?;
    Ok(labels.unsqueeze(1)?.broadcast_eq(&classes.unsqueeze(0)?)?)
}

/// The target entries `(B,)` of `m` `(B, C)`: the sum of each row under `mask` (exact: one
/// non-zero term per labelled row; 0 for a row without a label).
pub fn target_values(m: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let zeros = m.zeros_like()?;
    Ok(mask.where_cond(m, &zeros)?.sum(1)?)
}

/// `m` `(B, C)` with its target entries replaced by `values` `(B,)`; rows without a label are
/// left unchanged.
pub fn replace_target(m: &Tensor, mask: &Tensor, values: &Tensor) -> Result<Tensor> {
    let v = values.unsqueeze(1)?.broadcast_as(m.shape())?;
    Ok(mask.where_cond(&v, m)?)
}

/// Stable `logsumexp` over the last dimension: `(B, C)` → `(B,)`. The row maximum is detached
/// (its gradient cancels exactly).
pub fn logsumexp(z: &Tensor) -> Result<Tensor> {
    let max = z.max_keepdim(D::Minus1)?.detach();
    let lse = z
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)?;
    Ok(lse.squeeze(D::Minus1)?)
}

/// Per-sample cross-entropy `(B,)`: `logsumexp(z_i) - z_{i,y_i}`.
///
/// `p_floor`: when set, the *value* of each term is capped at `-ln(p_floor)` (insightface clamps
/// the target probability at 1e-30 before the log); the gradient ignores the cap, as in the
/// reference.
pub fn cross_entropy_per_sample(z: &Tensor, mask: &Tensor, p_floor: Option<f64>) -> Result<Tensor> {
    let ce = logsumexp(z)?.sub(&target_values(z, mask)?)?;
    match p_floor {
        None => Ok(ce),
        Some(p) => {
            let capped = ce.minimum(-p.ln())?;
            Ok(ce.add(&capped.sub(&ce)?.detach())?)
        }
    }
}

/// Mean cross-entropy over the batch, a scalar `()`; see [`cross_entropy_per_sample`].
pub fn cross_entropy(z: &Tensor, mask: &Tensor, p_floor: Option<f64>) -> Result<Tensor> {
    Ok(cross_entropy_per_sample(z, mask, p_floor)?.mean_all()?)
}

/// The usual ending of a softmax-family head: mean cross-entropy of `logits` `(B, C)` against
/// the one-hot `mask` (with insightface's optional `p_floor` clamp of the loss value), and
/// statistics `loss` plus `extra` (name, value) pairs.
///
/// # Errors
/// Candle errors.
pub fn ce_output(
    logits: Tensor,
    mask: &Tensor,
    p_floor: Option<f64>,
    extra: &[(&str, f64)],
) -> Result<crate::HeadOutput> {
    let loss = cross_entropy(&logits, mask, p_floor)?;
    head_output(loss, logits, extra)
}

/// A head's output from its scalar `loss` `()` and final `logits`, with statistics `loss` plus
/// the `extra` (name, value) pairs.
///
/// # Errors
/// Candle errors.
pub fn head_output(
    loss: Tensor,
    logits: Tensor,
    extra: &[(&str, f64)],
) -> Result<crate::HeadOutput> {
    let mut stats = std::collections::BTreeMap::new();
    stats.insert("loss".to_string(), scalar(&loss)?);
    for (name, value) in extra {
        stats.insert((*name).to_string(), *value);
    }
    Ok(crate::HeadOutput {
        loss,
        logits,
        stats,
    })
}

/// Apply a scalar function `f` computed on the host to every element of `x`, with the exact
/// derivative attached: `f(x)` in the forward pass, `f'(x)·grad` in the backward pass.
///
/// `f` returns `(value, derivative)`. The result is `sg(v) + (x - sg(x))·sg(d)`, whose value is
/// `v` exactly (`x - sg(x)` is 0) and whose gradient is `d`. Meant for small tensors (one value
/// per sample): the data travel to the host and back.
pub fn host_map_with_grad(x: &Tensor, f: impl Fn(f64) -> (f64, f64)) -> Result<Tensor> {
    let xs: Vec<f64> = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let (v, d): (Vec<f64>, Vec<f64>) = xs.into_iter().map(f).unzip();
    let dev = x.device();
    let to_t = |v: Vec<f64>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, x.shape(), &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(dev)?)
    };
    let (v, d) = (to_t(v)?, to_t(d)?);
    Ok(v.add(&x.sub(&x.detach())?.mul(&d)?)?)
}

/// `acos` (radians) with derivative `-1/sqrt(1 - c²)`. Inputs are clamped to `[-1, 1]`; the
/// derivative is finite as long as the caller clamps away from ±1 (as every head does).
pub fn acos(c: &Tensor) -> Result<Tensor> {
    host_map_with_grad(c, |c| {
        let c = c.clamp(-1.0, 1.0);
        (c.acos(), -1.0 / (1.0 - c * c).max(f64::MIN_POSITIVE).sqrt())
    })
}

/// `log(1 + Σ_{i ∈ mask} exp(a_i))` over dimension 0: `a`, `mask` `(N, M)` → `(M,)`. Stable
/// (the largest exponent, at least 0, is factored out and detached); masked-out entries get no
/// gradient; a column with an empty mask gives 0.
pub fn log1p_sum_exp_masked(a: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let very_negative = Tensor::full(-1e30f64, a.shape(), a.device())?.to_dtype(a.dtype())?;
    let am = mask.where_cond(a, &very_negative)?;
    let m = am.max_keepdim(0)?.maximum(0.0)?.detach();
    let s = am
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(0)?
        .add(&m.neg()?.exp()?)?;
    Ok(s.log()?.add(&m)?.squeeze(0)?)
}

/// The checkpointed state entry `key` of a head, which must have shape `dims`.
///
/// # Errors
/// [`Error::State`] naming `key` when it is missing or of another shape.
pub fn state_tensor<'a>(
    state: &'a std::collections::BTreeMap<String, Tensor>,
    key: &str,
    dims: &[usize],
) -> Result<&'a Tensor> {
    match state.get(key) {
        Some(t) if t.dims() == dims => Ok(t),
        Some(t) => Err(Error::State {
            key: key.into(),
            reason: format!("expected shape {dims:?}, got {:?}", t.dims()),
        }),
        None => Err(Error::State {
            key: key.into(),
            reason: "missing from the checkpoint".into(),
        }),
    }
}

/// A scalar state entry `key` (any shape holding one element) as f64.
///
/// # Errors
/// [`Error::State`] naming `key` when it is missing or not a single value.
pub fn state_scalar(state: &std::collections::BTreeMap<String, Tensor>, key: &str) -> Result<f64> {
    match state.get(key) {
        Some(t) if t.elem_count() == 1 => {
            Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
        }
        Some(t) => Err(Error::State {
            key: key.into(),
            reason: format!("expected a scalar, got shape {:?}", t.dims()),
        }),
        None => Err(Error::State {
            key: key.into(),
            reason: "missing from the checkpoint".into(),
        }),
    }
}

/// A scalar tensor's value as f64.
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Check that a hyperparameter is finite and strictly positive.
pub fn check_positive(key: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::config(
            key,
            format!("must be finite and > 0, got {v}"),
        ))
    }
}

/// Check that a hyperparameter lies in `[lo, hi]`.
pub fn check_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(Error::config(
            key,
            format!("must be in [{lo}, {hi}], got {v}"),
        ))
    }
}

/// Check the sizes a head is built with.
pub fn check_sizes(embedding_size: usize, num_classes: usize) -> Result<()> {
    if embedding_size == 0 {
        return Err(Error::config("embedding_size", "must be > 0"));
    }
    if num_classes == 0 {
        return Err(Error::config("num_classes", "must be > 0"));
    }
    Ok(())
}

/// The class centres `(num_classes, embedding_size)` under `weight`, initialised N(0, 0.01)
/// as in insightface.
pub fn class_centres(
    vb: &candle_nn::VarBuilder,
    embedding_size: usize,
    num_classes: usize,
) -> Result<Tensor> {
    check_sizes(embedding_size, num_classes)?;
    Ok(vb.get_with_hints(
        (num_classes, embedding_size),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        },
    )?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Var;

    /// Central finite-difference check of `f` (a scalar function of one f64 tensor) against
    /// candle's gradient; returns the largest absolute difference.
    pub(crate) fn fd_check(x0: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
        let var = Var::from_tensor(x0)?;
        let grads = f(var.as_tensor())?.backward()?;
        let g: Vec<f64> = grads
            .get(&var)
            .expect("gradient")
            .flatten_all()?
            .to_vec1()?;
        let base: Vec<f64> = x0.flatten_all()?.to_vec1()?;
        let h = 1e-6;
        let mut worst = 0f64;
        for k in 0..base.len() {
            let eval = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[k] += delta;
                scalar(&f(&Tensor::from_vec(v, x0.shape(), x0.device())?)?)
            };
            let num = (eval(h)? - eval(-h)?) / (2.0 * h);
            worst = worst.max((num - g[k]).abs() / (1.0 + num.abs()));
        }
        Ok(worst)
    }

    fn t(v: &[f64], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn gather_and_mask_have_correct_gradients() -> Result<()> {
        let x = t(&[0.3, -1.2, 2.0, 0.7, 0.1, -0.4], (2, 3));
        let labels = Tensor::new(&[2u32, 0], &Device::Cpu)?;
        let w = t(&[1.0, -2.0, 0.5, 3.0, 0.25, 1.5], (2, 3));
        let mask = target_mask(&labels, 3)?;
        let via_gather = |x: &Tensor| -> Result<Tensor> {
            let g = x.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
            Ok(g.sqr()?.sum_all()?.add(&x.mul(&w)?.sum_all()?)?)
        };
        let via_mask = |x: &Tensor| -> Result<Tensor> {
            let g = target_values(x, &mask)?;
            Ok(g.sqr()?.sum_all()?.add(&x.mul(&w)?.sum_all()?)?)
        };
        assert!(fd_check(&x, via_gather)? < 1e-8);
        assert!(fd_check(&x, via_mask)? < 1e-8);
        assert_eq!(target_values(&x, &mask)?.to_vec1::<f64>()?, vec![2.0, 0.7]);
        Ok(())
    }

    #[test]
    fn replace_target_and_cross_entropy_gradients() -> Result<()> {
        let z = t(&[0.3, -1.2, 2.0, 0.7, 0.1, -0.4], (2, 3));
        let labels = Tensor::new(&[1u32, 2], &Device::Cpu)?;
        let mask = target_mask(&labels, 3)?;
        let f = |z: &Tensor| -> Result<Tensor> {
            let tv = target_values(z, &mask)?;
            let z2 = replace_target(z, &mask, &(tv.sqr()? * 3.0)?)?;
            cross_entropy(&z2, &mask, None)
        };
        assert!(fd_check(&z, f)? < 1e-8);
        // CE value against a direct evaluation.
        let ce = scalar(&cross_entropy(&z, &mask, None)?)?;
        let rows = [[0.3f64, -1.2, 2.0], [0.7, 0.1, -0.4]];
        let want = rows
            .iter()
            .zip([1usize, 2])
            .map(|(r, y)| r.iter().map(|v| v.exp()).sum::<f64>().ln() - r[y])
            .sum::<f64>()
            / 2.0;
        assert!((ce - want).abs() < 1e-14);
        Ok(())
    }

    #[test]
    fn probability_floor_caps_value_not_gradient() -> Result<()> {
        let z = t(&[100.0, 0.0, 0.0, 0.0], (2, 2));
        let labels = Tensor::new(&[1u32, 0], &Device::Cpu)?;
        let mask = target_mask(&labels, 2)?;
        let v = cross_entropy_per_sample(&z, &mask, Some(1e-30))?.to_vec1::<f64>()?;
        assert!((v[0] - 1e-30f64.ln().abs()).abs() < 1e-12);
        assert!((v[1] - 2f64.ln()).abs() < 1e-14);
        let zv = Var::from_tensor(&z)?;
        let g = cross_entropy(zv.as_tensor(), &mask, Some(1e-30))?.backward()?;
        let g: Vec<f64> = g.get(&zv).unwrap().flatten_all()?.to_vec1()?;
        // Row 0: softmax - onehot = (1, -1) (to 1e-43), halved by the batch mean.
        assert!((g[0] - 0.5).abs() < 1e-12 && (g[1] + 0.5).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn host_acos_matches_and_differentiates() -> Result<()> {
        let c = Tensor::new(&[-0.99, -0.3, 0.0, 0.5, 0.999], &Device::Cpu)?;
        let a = acos(&c)?.to_vec1::<f64>()?;
        for (got, want) in a.iter().zip([-0.99f64, -0.3, 0.0, 0.5, 0.999]) {
            assert_eq!(*got, want.acos());
        }
        let err = fd_check(&c, |c| Ok(acos(c)?.mul(c)?.sum_all()?))?;
        assert!(err < 1e-6, "acos fd error {err}");
        Ok(())
    }

    #[test]
    fn masked_log1p_sum_exp() -> Result<()> {
        let a = t(&[500.0, 1.0, -2.0, 3.0, 0.5, 800.0], (3, 2));
        let mask = Tensor::new(&[[1u8, 0], [1, 1], [0, 0]], &Device::Cpu)?;
        let v = log1p_sum_exp_masked(&a, &mask)?.to_vec1::<f64>()?;
        assert!((v[0] - 500.0).abs() < 1e-12);
        assert!((v[1] - (1.0 + 3f64.exp()).ln()).abs() < 1e-12);
        let small = t(&[0.3, 1.0, -2.0, 0.2, 0.5, 0.8], (3, 2));
        assert!(fd_check(&small, |a| Ok(log1p_sum_exp_masked(a, &mask)?.sum_all()?))? < 1e-8);
        Ok(())
    }

    #[test]
    fn input_checks() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let ok = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        assert!(check_inputs(&x, &ok, 4, 3).is_ok());
        assert!(matches!(
            check_inputs(&x, &ok, 5, 3),
            Err(Error::Shape { .. })
        ));
        let bad = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
        assert!(matches!(
            check_inputs(&x, &bad, 4, 3),
            Err(Error::Label {
                index: 1,
                label: 3,
                num_classes: 3
            })
        ));
        let float_labels = Tensor::new(&[0f32, 1.], &Device::Cpu).unwrap();
        assert!(matches!(
            check_inputs(&x, &float_labels, 4, 3),
            Err(Error::Shape { .. })
        ));
        let half = x.to_dtype(DType::BF16).unwrap();
        assert_eq!(
            check_inputs(&half, &ok, 4, 3).unwrap().x.dtype(),
            DType::F32
        );
    }
}
