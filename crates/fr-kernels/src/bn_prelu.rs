//! Train-mode BatchNorm followed by PReLU as one op (IResNet's `bn2 → prelu` and its stem):
//! `y = prelu_a(γ·x̂ + β)`, `x̂ = (x − μ)/√(σ² + ε)` over the batch. The BatchNorm output is
//! never stored: backward recomputes it from `x` and the batch statistics, so one activation
//! per block less stays alive for backward, and the autograd graph has one node less.
//!
//! Backward: with `z = γ·x̂ + β` and `g = dy·(z > 0 ? 1 : a_c)`, `da_c = Σ_{z ≤ 0} dy·z`, and
//! `dx`, `dγ`, `dβ` are BatchNorm's closed form applied to `g`.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::batch_norm::{dims, dx_coefficients, inv_std, stats, BatchStats, StatsCell};
use crate::elem::{dispatch_float, slice, split_grads, uninit_vec, Elem};

/// Per-channel `(a, k, slope)` of `z = a·x + k` and the PReLU, from the packed
/// parameters `[γ (C), β (C), slope (C)]` and the statistics.
fn coefficients<T: Elem>(params: &[T], st: &BatchStats, eps: f64) -> Vec<(T, T, T)> {
    let c = st.mean.len();
    let inv = inv_std(&st.var, eps);
    (0..c)
        .map(|ch| {
            let a = params[ch].to_f64() * inv[ch];
            let k = params[c + ch].to_f64() - st.mean[ch] * a;
            (T::from_f64(a), T::from_f64(k), params[2 * c + ch])
        })
        .collect()
}

struct BnPreluOp {
    eps: f64,
    stats: StatsCell,
}

impl CustomOp2 for BnPreluOp {
    fn name(&self) -> &'static str {
        "fr-batch-norm-prelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, s) = dims(l1.dims())?;
        if l2.dims() != [3 * c] || b == 0 {
            bail!(
                "{}: x {:?} needs B ≥ 1 and parameters (3·{c},), got {:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let out = dispatch_float!(self.name(), s1, T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let params = slice::<T>(s2, l2, self.name())?;
            let st = stats(x, b, c, s);
            let coef = coefficients(params, &st, self.eps);
            self.stats.set(st)?;
            let mut y = uninit_vec::<T>(x.len()); // every element written below
            y.par_chunks_mut(c * s).zip(x.par_chunks(c * s)).for_each(|(yi, xi)| {
                for (ch, &(a, k, sl)) in coef.iter().enumerate() {
                    let r = ch * s..(ch + 1) * s;
                    for (o, v) in yi[r.clone()].iter_mut().zip(&xi[r]) {
                        let z = a * *v + k;
                        *o = if z > T::zero() { z } else { sl * z };
                    }
                }
            });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let need_dx = x.track_op();
        if !need_dx && !params.track_op() {
            return Ok((None, None));
        }
        let op = BnPreluBackwardOp {
            eps: self.eps,
            stats: self.stats.get(self.name())?,
            need_dx,
        };
        let flat = x.apply_op3_no_bwd(params, &dy.contiguous()?, &op)?;
        let [dx, dparams] = split_grads(&flat, [(x, need_dx), (params, true)])?;
        Ok((dx, dparams))
    }
}

/// `[dx, dγ, dβ, da]` flattened (dx left out unless asked for).
struct BnPreluBackwardOp {
    eps: f64,
    stats: BatchStats,
    need_dx: bool,
}

impl CustomOp3 for BnPreluBackwardOp {
    fn name(&self) -> &'static str {
        "fr-batch-norm-prelu-backward"
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
        if l3.dims() != l1.dims() || l2.dims() != [3 * c] {
            bail!(
                "{}: shapes x {:?}, parameters {:?}, dy {:?}",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let st = &self.stats;
        let inv = inv_std(&st.var, self.eps);
        let n = (b * s) as f64;
        let out = dispatch_float!(self.name(), s1, T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let params = slice::<T>(s2, l2, self.name())?;
            let dy = slice::<T>(s3, l3, self.name())?;
            let coef = coefficients(params, st, self.eps);
            // Per channel, in order: Σ g, Σ g·(x − μ), Σ_{z ≤ 0} dy·z, in 16 vectorisable lanes.
            const L: usize = 16;
            let sums: Vec<[f64; 3]> = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let (a, k, sl) = coef[ch];
                    let mu = T::from_f64(st.mean[ch]);
                    let mut tot = [0f64; 3];
                    for bi in 0..b {
                        let r = (bi * c + ch) * s..(bi * c + ch + 1) * s;
                        let (xs, gs) = (&x[r.clone()], &dy[r]);
                        let zero = T::zero();
                        let (mut s0, mut s1, mut s2) = ([zero; L], [zero; L], [zero; L]);
                        let mut cx = xs.chunks_exact(L);
                        let mut cg = gs.chunks_exact(L);
                        for (qx, qg) in (&mut cx).zip(&mut cg) {
                            for lane in 0..L {
                                let (v, d) = (qx[lane], qg[lane]);
                                let z = a * v + k;
                                let pos = z > zero;
                                let g = if pos { d } else { sl * d };
                                s0[lane] += g;
                                s1[lane] += g * (v - mu);
                                s2[lane] += if pos { zero } else { d * z };
                            }
                        }
                        for (&v, &d) in cx.remainder().iter().zip(cg.remainder()) {
                            let z = a * v + k;
                            let pos = z > zero;
                            let g = if pos { d } else { sl * d };
                            s0[0] += g;
                            s1[0] += g * (v - mu);
                            s2[0] += if pos { zero } else { d * z };
                        }
                        let acc = [s0, s1, s2];
                        for (t, lanes) in tot.iter_mut().zip(&acc) {
                            *t += lanes.iter().fold(T::zero(), |s, v| s + *v).to_f64();
                        }
                    }
                    tot
                })
                .collect();
            let mut out = Vec::with_capacity(usize::from(self.need_dx) * x.len() + 3 * c);
            if self.need_dx {
                // dx = a·g + kx·x + k0 per channel (BatchNorm's closed form on g).
                let dcoef: Vec<(T, T)> = (0..c)
                    .map(|ch| {
                        let a = params[ch].to_f64() * inv[ch];
                        let (kx, k0) =
                            dx_coefficients(a, inv[ch], st.mean[ch], sums[ch][0], sums[ch][1], n);
                        (T::from_f64(kx), T::from_f64(k0))
                    })
                    .collect();
                // SAFETY: capacity ≥ x.len(); every element is written by the loop below.
                unsafe { out.set_len(x.len()) };
                out.par_chunks_mut(c * s)
                    .zip(x.par_chunks(c * s).zip(dy.par_chunks(c * s)))
                    .for_each(|(o, (xi, gi))| {
                        for (ch, (&(a, k, sl), &(kx, k0))) in coef.iter().zip(&dcoef).enumerate() {
                            let r = ch * s..(ch + 1) * s;
                            for ((ov, v), d) in o[r.clone()].iter_mut().zip(&xi[r.clone()]).zip(&gi[r]) {
                                let z = a * *v + k;
                                let g = if z > T::zero() { *d } else { sl * *d };
                                *ov = a * g + kx * *v + k0;
                            }
                        }
                    });
            }
            out.extend((0..c).map(|ch| T::from_f64(sums[ch][1] * inv[ch])));
            out.extend((0..c).map(|ch| T::from_f64(sums[ch][0])));
            out.extend((0..c).map(|ch| T::from_f64(sums[ch][2])));
            T::to_cpu_storage_owned(out)
        });
        let len = usize::from(self.need_dx) * b * c * s + 3 * c;
        Ok((out, len.into()))
    }
}

/// Train-mode BatchNorm of `x (B, C, *)` (weight γ, bias β `(C,)`) followed by PReLU with
/// slopes `a` (`(C,)` or one shared `(1,)`), as one op: returns `y` and the batch statistics.
/// Gradients flow to `x`, γ, β and `a`. Equals [`crate::batch_norm_train`] then
/// [`crate::prelu`] without storing the BatchNorm output.
///
/// # Errors
/// Shape mismatches, an empty batch, a non-CPU device or a dtype other than f32 / f64.
pub fn batch_norm_prelu_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    slope: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    let (_, c, _) = dims(x.dims())?;
    let slope = match slope.elem_count() {
        1 => slope.flatten_all()?.broadcast_as(c)?,
        n if n == c => slope.flatten_all()?,
        n => bail!("batch_norm_prelu: {n} slopes for {c} channels (expects 1 or {c})"),
    };
    let params = Tensor::cat(&[weight.flatten_all()?, bias.flatten_all()?, slope], 0)?;
    let stats = StatsCell::default();
    let op = BnPreluOp {
        eps,
        stats: stats.clone(),
    };
    let y = x.contiguous()?.apply_op2(&params, op)?;
    Ok((y, stats.get("fr-batch-norm-prelu")?))
}
