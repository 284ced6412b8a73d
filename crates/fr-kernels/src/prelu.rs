//! PReLU (He et al. 2015), `y = x` for `x > 0`, `y = a_c·x` otherwise, with one slope per
//! channel (`a (C,)`) or one shared slope (`a (1,)`), as `torch.nn.PReLU`, as one fused custom op.
//! Gradients: `dx = dy·(x > 0 ? 1 : a_c)`, `da_c = Σ_{x ≤ 0} dy·x`.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{dispatch_float, lane_sum, slice, split_grads, uninit_vec};

/// `(B, C, S)` of `x (B, C, *)` and whether the slope is shared.
fn dims(x: &[usize], a: &[usize]) -> Result<(usize, usize, usize, bool)> {
    let (b, c, s) = match x {
        [b, c, rest @ ..] if *c > 0 && rest.iter().all(|&d| d > 0) => {
            (*b, *c, rest.iter().product::<usize>())
        }
        _ => bail!("prelu expects (B, C, ...) input with C and the spatial sizes ≥ 1, got {x:?}"),
    };
    match a.iter().product::<usize>() {
        1 => Ok((b, c, s, true)),
        n if n == c => Ok((b, c, s, false)),
        n => bail!("prelu: {n} slopes for {c} channels (expects 1 or {c})"),
    }
}

struct PReluOp;

impl CustomOp2 for PReluOp {
    fn name(&self) -> &'static str {
        "fr-prelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, s, shared) = dims(l1.dims(), l2.dims())?;
        let out = dispatch_float!(self.name(), s1, T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let a = slice::<T>(s2, l2, self.name())?;
            let mut y = uninit_vec::<T>(x.len()); // every element written below
            y.par_chunks_mut(c * s).zip(x.par_chunks(c * s)).for_each(|(yi, xi)| {
                for ch in 0..c {
                    let slope = a[if shared { 0 } else { ch }];
                    for (o, v) in yi[ch * s..][..s].iter_mut().zip(&xi[ch * s..][..s]) {
                        *o = if *v > T::zero() { *v } else { slope * *v };
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
        a: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let need_dx = x.track_op();
        if !need_dx && !a.track_op() {
            return Ok((None, None));
        }
        let flat = x.apply_op3_no_bwd(a, &dy.contiguous()?, &PReluBackwardOp { need_dx })?;
        let [dx, da] = split_grads(&flat, [(x, need_dx), (a, true)])?;
        Ok((dx, da))
    }
}

/// `[dx, da]` flattened; per-image partial slope gradients are summed in image order.
struct PReluBackwardOp {
    need_dx: bool,
}

impl CustomOp3 for PReluBackwardOp {
    fn name(&self) -> &'static str {
        "fr-prelu-backward"
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
        let (_, c, s, shared) = dims(l1.dims(), l2.dims())?;
        if l3.dims() != l1.dims() {
            bail!(
                "{}: output gradient {:?} does not match the input {:?}",
                self.name(),
                l3.dims(),
                l1.dims()
            );
        }
        let na = if shared { 1 } else { c };
        let out = dispatch_float!(self.name(), s1, T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let a = slice::<T>(s2, l2, self.name())?;
            let dy = slice::<T>(s3, l3, self.name())?;
            // dx, then the slope gradients appended (capacity for both: no reallocation).
            let mut dx = Vec::with_capacity(if self.need_dx { x.len() } else { 0 } + na);
            if self.need_dx {
                // SAFETY: capacity ≥ x.len(); every element is written by `per_image`.
                unsafe { dx.set_len(x.len()) };
            }
            let per_image = |(xi, gi): (&[T], &[T]), dxi: Option<&mut [T]>| -> Vec<f64> {
                let mut da = vec![0f64; na];
                let mut dxi = dxi;
                let zero = T::zero();
                for ch in 0..c {
                    let (slope, slot) = if shared { (a[0], 0) } else { (a[ch], ch) };
                    let r = ch * s..(ch + 1) * s;
                    let (xs, gs) = (&xi[r.clone()], &gi[r.clone()]);
                    // Branch-free so that both loops vectorise.
                    let acc = lane_sum(xs, gs, |v, g| if v <= zero { v * g } else { zero });
                    da[slot] += acc.to_f64();
                    if let Some(d) = dxi.as_deref_mut() {
                        for ((o, v), g) in d[r].iter_mut().zip(xs).zip(gs) {
                            *o = if *v > zero { *g } else { slope * *g };
                        }
                    }
                }
                da
            };
            let inputs = x.par_chunks(c * s).zip(dy.par_chunks(c * s));
            let partials: Vec<Vec<f64>> = if self.need_dx {
                inputs.zip(dx.par_chunks_mut(c * s)).map(|(xg, d)| per_image(xg, Some(d))).collect()
            } else {
                inputs.map(|xg| per_image(xg, None)).collect()
            };
            let mut da = vec![0f64; na];
            for p in &partials {
                for (t, v) in da.iter_mut().zip(p) {
                    *t += v;
                }
            }
            dx.extend(da.iter().map(|&v| T::from_f64(v)));
            T::to_cpu_storage_owned(dx)
        });
        let len = usize::from(self.need_dx) * l1.shape().elem_count() + na;
        Ok((out, len.into()))
    }
}

/// PReLU of `x (B, C, *)` with slopes `a` of `C` elements (per channel) or 1 (shared), on the
/// CPU with its own backward.
///
/// # Errors
/// A slope count other than 1 or `C`, a non-CPU device or a dtype other than f32 / f64.
pub fn prelu(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    dims(x.dims(), a.dims())?;
    x.contiguous()?.apply_op2(&a.contiguous()?, PReluOp)
}
