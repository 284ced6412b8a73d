//! Depthwise convolution (groups = Cin = Cout, one filter per channel) computed directly, plane
//! by plane: the per-group GEMMs of [`crate::conv2d`] would be 1-row matrices. Used by
//! MobileFaceNet- and PocketNet-style blocks.
//!
//! Forward and input gradient run in parallel over `(image, channel)` planes, the weight
//! gradient in parallel over channels (each channel sums its images in order: deterministic).

use rayon::prelude::*;

use crate::conv2d::{valid_range, Geom};
use crate::elem::{lane_sum, Elem};

/// Calls `f(oy, iy, lo, hi, off_x, weight index)` for every kernel tap and every output row
/// whose input row lies inside the image; `lo..hi` are the valid output columns.
fn for_each_tap(g: &Geom, mut f: impl FnMut(usize, usize, usize, usize, isize, usize)) {
    let (s, d, p) = (g.p.stride, g.p.dilation, g.p.padding as isize);
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let off_x = (kx * d) as isize - p;
            let (lo, hi) = valid_range(off_x, s, g.w, g.wo);
            for oy in 0..g.ho {
                let iy = (oy * s + ky * d) as isize - p;
                if iy >= 0 && iy < g.h as isize {
                    f(oy, iy as usize, lo, hi, off_x, ky * g.kw + kx);
                }
            }
        }
    }
}

pub(crate) fn forward<T: Elem>(g: &Geom, x: &[T], weight: &[T]) -> Vec<T> {
    let (hw, hwo, kk) = (g.hw(), g.hwo(), g.kh * g.kw);
    let mut y = vec![T::zero(); g.b * g.cout * hwo];
    y.par_chunks_mut(hwo).enumerate().for_each(|(plane, yp)| {
        let c = plane % g.cin;
        let xp = &x[plane * hw..][..hw];
        let wc = &weight[c * kk..][..kk];
        let s = g.p.stride;
        for_each_tap(g, |oy, iy, lo, hi, off_x, k| {
            let wv = wc[k];
            let src = &xp[iy * g.w..][..g.w];
            let dst = &mut yp[oy * g.wo..][lo..hi];
            if s == 1 {
                let start = (lo as isize + off_x) as usize;
                for (o, v) in dst.iter_mut().zip(&src[start..start + hi - lo]) {
                    *o += wv * *v;
                }
            } else {
                for (i, o) in dst.iter_mut().enumerate() {
                    *o += wv * src[(((lo + i) * s) as isize + off_x) as usize];
                }
            }
        });
    });
    y
}

pub(crate) fn backward<T: Elem>(
    g: &Geom,
    x: &[T],
    weight: &[T],
    dy: &[T],
    need_dx: bool,
    need_dw: bool,
) -> (Vec<T>, Vec<T>) {
    let (hw, hwo, kk, s) = (g.hw(), g.hwo(), g.kh * g.kw, g.p.stride);
    let mut dx = Vec::new();
    if need_dx {
        dx = vec![T::zero(); g.b * g.cin * hw];
        dx.par_chunks_mut(hw).enumerate().for_each(|(plane, dxp)| {
            let c = plane % g.cin;
            let dyp = &dy[plane * hwo..][..hwo];
            let wc = &weight[c * kk..][..kk];
            for_each_tap(g, |oy, iy, lo, hi, off_x, k| {
                let wv = wc[k];
                let src = &dyp[oy * g.wo..][lo..hi];
                let dst = &mut dxp[iy * g.w..][..g.w];
                if s == 1 {
                    let start = (lo as isize + off_x) as usize;
                    for (o, v) in dst[start..start + hi - lo].iter_mut().zip(src) {
                        *o += wv * *v;
                    }
                } else {
                    for (i, v) in src.iter().enumerate() {
                        dst[(((lo + i) * s) as isize + off_x) as usize] += wv * *v;
                    }
                }
            });
        });
    }
    let mut dw = Vec::new();
    if need_dw {
        dw = vec![T::zero(); g.cin * kk];
        dw.par_chunks_mut(kk).enumerate().for_each(|(c, dwc)| {
            for b in 0..g.b {
                let plane = b * g.cin + c;
                let xp = &x[plane * hw..][..hw];
                let dyp = &dy[plane * hwo..][..hwo];
                for_each_tap(g, |oy, iy, lo, hi, off_x, k| {
                    let grad = &dyp[oy * g.wo..][lo..hi];
                    let src = &xp[iy * g.w..][..g.w];
                    let mut acc = T::zero();
                    if s == 1 {
                        let start = (lo as isize + off_x) as usize;
                        acc = lane_sum(grad, &src[start..start + hi - lo], |a, v| a * v);
                    } else {
                        for (i, a) in grad.iter().enumerate() {
                            acc += *a * src[(((lo + i) * s) as isize + off_x) as usize];
                        }
                    }
                    dwc[k] += acc;
                });
            }
        });
    }
    (dx, dw)
}
