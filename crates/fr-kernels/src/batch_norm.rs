//! Batch normalisation over `(B, C, *)` (BatchNorm1d on `(B, C)`, BatchNorm2d on `(B, C, H, W)`)
//! as one fused candle custom op per pass, instead of the dozen broadcast ops (and saved
//! intermediates) of the composed form.
//!
//! Train mode (Ioffe & Szegedy 2015, as `torch.nn.functional.batch_norm(training=True)`):
//! `y = γ·(x − μ)/√(σ² + ε) + β` with the biased batch variance σ², statistics accumulated in
//! f64. Its input gradient is the closed form
//! `dx = γ/√(σ²+ε) · (dy − mean(dy) − x̂·mean(dy·x̂))`, `dγ = Σ dy·x̂`, `dβ = Σ dy`.
//! Eval mode uses the running statistics and is a per-channel affine map.
//! The batch mean and (biased) variance of a train pass are handed back to the caller, which
//! updates the running statistics (see [`crate::nn::BatchNorm`]).

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{dispatch_float, lane_sum, slice, split_grads, uninit_vec, Elem};

/// Per-channel statistics of a batch, in f64: mean and biased variance over `B·H·W` values.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// `μ_c`, shape `(C,)`.
    pub mean: Vec<f64>,
    /// `σ²_c` (divided by the count, not count − 1), shape `(C,)`.
    pub var: Vec<f64>,
    /// Values per channel, `B·H·W`.
    pub count: usize,
}

/// `(B, C, S)`: batch, channels, and spatial positions per channel (1 for `(B, C)` input).
pub(crate) fn dims(shape: &[usize]) -> Result<(usize, usize, usize)> {
    match shape {
        [b, c, rest @ ..] if *c > 0 && rest.iter().all(|&d| d > 0) => {
            Ok((*b, *c, rest.iter().product()))
        }
        _ => bail!(
            "batch_norm expects (B, C, ...) input with C and the spatial sizes ≥ 1, got {shape:?}"
        ),
    }
}

/// Per-channel mean and biased variance, in parallel over channels (each in order).
pub(crate) fn stats<T: Elem>(x: &[T], b: usize, c: usize, s: usize) -> BatchStats {
    let (mean, var) = (0..c)
        .into_par_iter()
        .map(|ch| {
            // Per plane in T with vectorised lanes, across planes in f64.
            let (mut sum, mut sq) = (0f64, 0f64);
            for bi in 0..b {
                let plane = &x[(bi * c + ch) * s..][..s];
                sum += lane_sum(plane, plane, |v, _| v).to_f64();
                sq += lane_sum(plane, plane, |v, _| v * v).to_f64();
            }
            let n = (b * s) as f64;
            let mean = sum / n;
            (mean, (sq / n - mean * mean).max(0.0))
        })
        .unzip();
    BatchStats {
        mean,
        var,
        count: b * s,
    }
}

/// `out = a_c·x + k_c` per channel, in parallel over images.
fn affine<T: Elem>(x: &[T], c: usize, s: usize, a: &[f64], k: &[f64]) -> Vec<T> {
    let mut out = uninit_vec::<T>(x.len()); // every element written below
    out.par_chunks_mut(c * s)
        .zip(x.par_chunks(c * s))
        .for_each(|(o, xi)| {
            for ch in 0..c {
                let (ac, kc) = (T::from_f64(a[ch]), T::from_f64(k[ch]));
                for (ov, xv) in o[ch * s..][..s].iter_mut().zip(&xi[ch * s..][..s]) {
                    *ov = ac * *xv + kc;
                }
            }
        });
    out
}

pub(crate) fn inv_std(var: &[f64], eps: f64) -> Vec<f64> {
    var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

/// Train-mode input gradient of one channel as `dx = a·g + kx·x + k0`: the closed form
/// `dx = a·(g − mean(g) − x̂·mean(g·x̂))` expanded, for `a = γ·inv`, `inv = 1/√(σ² + ε)`, batch
/// mean `mu`, and `Σg`, `Σg·(x − μ)` over the channel's `n` values. Returns `(kx, k0)`.
pub(crate) fn dx_coefficients(
    a: f64,
    inv: f64,
    mu: f64,
    sum_g: f64,
    sum_gxc: f64,
    n: f64,
) -> (f64, f64) {
    let kx = -a * inv * (sum_gxc * inv) / n;
    (kx, -a * sum_g / n - kx * mu)
}

/// Batch statistics handed from a forward op to its caller and to its backward pass (the op
/// itself is moved into the graph, so they share this cell).
#[derive(Clone, Default)]
pub(crate) struct StatsCell(Arc<Mutex<Option<BatchStats>>>);

impl StatsCell {
    /// A cell holding `stats` (the running statistics of eval mode).
    pub fn with(stats: BatchStats) -> Self {
        Self(Arc::new(Mutex::new(Some(stats))))
    }

    pub fn set(&self, stats: BatchStats) -> Result<()> {
        match self.0.lock() {
            Ok(mut g) => {
                *g = Some(stats);
                Ok(())
            }
            Err(_) => bail!("batch statistics: poisoned lock"),
        }
    }

    /// The statistics; an error naming `op` if its forward pass has not stored them.
    pub fn get(&self, op: &str) -> Result<BatchStats> {
        match self.0.lock().ok().and_then(|g| g.clone()) {
            Some(s) => Ok(s),
            None => bail!("{op}: no batch statistics (the forward pass did not run)"),
        }
    }
}

/// The forward op. In train mode it computes the batch statistics and leaves them in `stats`
/// for the caller and for the backward pass; in eval mode `stats` holds the running ones.
struct BatchNormOp {
    train: bool,
    eps: f64,
    stats: StatsCell,
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "fr-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, s) = dims(l1.dims())?;
        if l2.dims() != [c] || l3.dims() != [c] {
            bail!(
                "{}: weight {:?} and bias {:?} must be ({c},)",
                self.name(),
                l2.dims(),
                l3.dims()
            );
        }
        let out = dispatch_float!(self.name(), s1, T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let gamma = slice::<T>(s2, l2, self.name())?;
            let beta = slice::<T>(s3, l3, self.name())?;
            let st = if self.train {
                if b == 0 {
                    bail!("batch_norm: train mode needs at least one image, got {:?}", l1.dims());
                }
                let st = stats(x, b, c, s);
                self.stats.set(st.clone())?;
                st
            } else {
                self.stats.get(self.name())?
            };
            let inv = inv_std(&st.var, self.eps);
            let a: Vec<f64> = (0..c).map(|ch| gamma[ch].to_f64() * inv[ch]).collect();
            let k: Vec<f64> = (0..c).map(|ch| beta[ch].to_f64() - st.mean[ch] * a[ch]).collect();
            T::to_cpu_storage_owned(affine(x, c, s, &a, &k))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need_dx = x.track_op();
        if !need_dx && !gamma.track_op() && !beta.track_op() {
            return Ok((None, None, None));
        }
        let op = BatchNormBackwardOp {
            train: self.train,
            eps: self.eps,
            stats: self.stats.get(self.name())?,
            need_dx,
        };
        let flat = x.apply_op3_no_bwd(gamma, &dy.contiguous()?, &op)?;
        let [dx, dgamma, dbeta] = split_grads(&flat, [(x, need_dx), (gamma, true), (beta, true)])?;
        Ok((dx, dgamma, dbeta))
    }
}

/// Gradients `[dx, dγ, dβ]` of [`BatchNormOp`], flattened (dx left out unless asked for).
struct BatchNormBackwardOp {
    train: bool,
    eps: f64,
    stats: BatchStats,
    need_dx: bool,
}

impl CustomOp3 for BatchNormBackwardOp {
    fn name(&self) -> &'static str {
        "fr-batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, s) = dims(l1.dims())?;
        if l3.dims() != l1.dims() {
            bail!(
                "{}: output gradient {:?} does not match the input {:?}",
                self.name(),
                l3.dims(),
                l1.dims()
            );
        }
        let st = &self.stats;
        let inv = inv_std(&st.var, self.eps);
        let n = (b * s) as f64;
        let out = dispatch_float!(self.name(), s1, T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let gamma = slice::<T>(s2, l2, self.name())?;
            let dy = slice::<T>(s3, l3, self.name())?;
            // Σ dy and Σ dy·(x − μ) per channel, each channel in order.
            let (sum_dy, sum_dyxc): (Vec<f64>, Vec<f64>) = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let (mu, mut sd, mut sdx) = (T::from_f64(st.mean[ch]), 0f64, 0f64);
                    for bi in 0..b {
                        let r = (bi * c + ch) * s..(bi * c + ch + 1) * s;
                        let (gs, xs) = (&dy[r.clone()], &x[r]);
                        sd += lane_sum(gs, gs, |g, _| g).to_f64();
                        sdx += lane_sum(gs, xs, |g, v| g * (v - mu)).to_f64();
                    }
                    (sd, sdx)
                })
                .unzip();
            // dx, then dγ and dβ appended (capacity for all: no reallocation).
            let mut dx = Vec::with_capacity(if self.need_dx { x.len() } else { 0 } + 2 * c);
            if self.need_dx {
                // dx = a·dy + kx·x + k0 per channel (the closed forms above, expanded).
                // SAFETY: capacity ≥ x.len(); every element is written by the loop below.
                unsafe { dx.set_len(x.len()) };
                let coef: Vec<(T, T, T)> = (0..c)
                    .map(|ch| {
                        let a = gamma[ch].to_f64() * inv[ch];
                        if self.train {
                            let (kx, k0) =
                                dx_coefficients(a, inv[ch], st.mean[ch], sum_dy[ch], sum_dyxc[ch], n);
                            (T::from_f64(a), T::from_f64(kx), T::from_f64(k0))
                        } else {
                            (T::from_f64(a), T::zero(), T::zero())
                        }
                    })
                    .collect();
                dx.par_chunks_mut(c * s)
                    .zip(x.par_chunks(c * s).zip(dy.par_chunks(c * s)))
                    .for_each(|(o, (xi, gi))| {
                        for (ch, &(a, kx, k0)) in coef.iter().enumerate() {
                            let r = ch * s..(ch + 1) * s;
                            for ((ov, xv), gv) in o[r.clone()].iter_mut().zip(&xi[r.clone()]).zip(&gi[r]) {
                                *ov = a * *gv + kx * *xv + k0;
                            }
                        }
                    });
            }
            dx.extend((0..c).map(|ch| T::from_f64(sum_dyxc[ch] * inv[ch])));
            dx.extend(sum_dy.iter().map(|&v| T::from_f64(v)));
            T::to_cpu_storage_owned(dx)
        });
        let len = usize::from(self.need_dx) * b * c * s + 2 * c;
        Ok((out, len.into()))
    }
}

/// Train-mode batch normalisation of `x (B, C, *)` with weight γ and bias β `(C,)`: returns
/// `y` (same shape as `x`) and the batch statistics. Gradients flow to `x`, γ and β.
///
/// # Errors
/// Shape mismatch, a non-CPU device or a dtype other than f32 / f64.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    let stats = StatsCell::default();
    let op = BatchNormOp {
        train: true,
        eps,
        stats: stats.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    Ok((y, stats.get("fr-batch-norm")?))
}

/// Eval-mode batch normalisation of `x (B, C, *)` with the running mean and variance `(C,)`:
/// `y = γ·(x − mean)/√(var + ε) + β`. Gradients flow to `x`, γ and β.
///
/// # Errors
/// Shape mismatch, a non-CPU device or a dtype other than f32 / f64.
pub fn batch_norm_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: Vec<f64>,
    running_var: Vec<f64>,
    eps: f64,
) -> Result<Tensor> {
    let (b, _, s) = dims(x.dims())?;
    let op = BatchNormOp {
        train: false,
        eps,
        stats: StatsCell::with(BatchStats {
            mean: running_mean,
            var: running_var,
            count: b * s,
        }),
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}
