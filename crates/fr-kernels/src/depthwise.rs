//! Depthwise convolution (groups = Cin = Cout, one filter per channel) computed directly, plane
//! by plane: the per-group GEMMs of [`crate::conv2d`] would be 1-row matrices. Used by
//! MobileFaceNet- and PocketNet-style blocks.
//!
//! Each `(image, channel)` plane is first copied, zero-padded, into `stride²` *phase* planes:
//! phase `(a, b)` holds the padded pixels `(i·s + a, j·s + b)`, `hq × wq` of them. Output
//! `(oy, ox)` then reads tap `(ky, kx)` at phase `(ky·d mod s, kx·d mod s)`, position
//! `(oy + ⌊ky·d/s⌋, ox + ⌊kx·d/s⌋)`: on a "wide" output grid of row length `wq` every tap is a
//! single contiguous multiply-add of length `(Ho − 1)·wq + Wo` with a constant offset, whatever
//! the stride, padding or map size (the columns `Wo..wq` of the wide grid are scratch and
//! dropped). Strided and small maps (PocketNet's 7×7 stride-2 taps on 8×8 maps) run as long
//! vectorised loops instead of short strided rows. The backward pass is the transpose: the
//! output gradient on the wide grid (zeros in the scratch columns) is multiplied into the phase
//! planes of the input gradient, which are then copied back; the weight gradient of a tap is
//! the dot product of the wide output gradient with the shifted input phase.
//!
//! Forward and backward run in parallel over planes; the weight gradient is summed per plane
//! and then over the images in order, so results do not depend on scheduling.

use rayon::prelude::*;

use crate::conv2d::{valid_range, Geom};
use crate::elem::{lane_sum, uninit_vec, Elem};

/// Phase decomposition of one padded plane (see the module notes).
struct Phases {
    s: usize,
    p: isize,
    h: usize,
    w: usize,
    /// Rows and columns of a phase plane.
    hq: usize,
    wq: usize,
    /// Length of the wide output grid that the taps touch: `(Ho − 1)·wq + Wo`.
    len: usize,
    /// `(phase, offset)` of every tap, row-major over `(ky, kx)`.
    taps: Vec<(usize, usize)>,
    /// Whether a tap reads phase `a·s + b`: only those are filled.
    used: Vec<bool>,
    /// A 1×1 kernel without padding: `y = w·x` on the strided pixels, done directly.
    pointwise: bool,
}

impl Phases {
    fn new(g: &Geom) -> Self {
        let (s, d) = (g.p.stride, g.p.dilation);
        let hq = g.ho + (g.kh - 1) * d / s;
        let wq = g.wo + (g.kw - 1) * d / s;
        let taps: Vec<(usize, usize)> = (0..g.kh)
            .flat_map(|ky| (0..g.kw).map(move |kx| (ky * d, kx * d)))
            .map(|(dy, dx)| ((dy % s) * s + dx % s, (dy / s) * wq + dx / s))
            .collect();
        let mut used = vec![false; s * s];
        for &(phase, _) in &taps {
            used[phase] = true;
        }
        Self {
            s,
            p: g.p.padding as isize,
            h: g.h,
            w: g.w,
            hq,
            wq,
            len: (g.ho - 1) * wq + g.wo,
            taps,
            used,
            pointwise: g.kh == 1 && g.kw == 1 && g.p.padding == 0,
        }
    }

    /// Elements of one phase plane.
    fn plane(&self) -> usize {
        self.hq * self.wq
    }

    /// Calls `f(phase offset, image offset, n, step)` for every run of phase-plane elements
    /// `phase offset..+n` that holds image pixels `image offset, +step, …` (`step` = stride,
    /// within one image row). Every image pixel that any tap reads appears once; the other
    /// phase elements are padding.
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        let s = self.s;
        for a in 0..s {
            for b in 0..s {
                if !self.used[a * s + b] {
                    continue;
                }
                let base = (a * s + b) * self.plane();
                let (j0, j1) = valid_range(b as isize - self.p, s, self.w, self.wq);
                if j0 == j1 {
                    continue;
                }
                let (i0, i1) = valid_range(a as isize - self.p, s, self.h, self.hq);
                for i in i0..i1 {
                    let r = (i * s + a) as isize - self.p;
                    let c = (j0 * s + b) as isize - self.p;
                    let img = r as usize * self.w + c as usize;
                    f(base + i * self.wq + j0, img, j1 - j0, s);
                }
            }
        }
    }

    /// Copies the plane `xp (h, w)` into the zero-padded phase planes `ph`.
    fn gather<T: Elem>(&self, xp: &[T], ph: &mut [T]) {
        ph.fill(T::zero());
        self.for_each_run(|at, img, n, step| {
            let dst = &mut ph[at..][..n];
            if step == 1 {
                dst.copy_from_slice(&xp[img..][..n]);
            } else {
                for (o, v) in dst.iter_mut().zip(xp[img..].iter().step_by(step)) {
                    *o = *v;
                }
            }
        });
    }

    /// Copies the image pixels of the phase planes `ph` back into `xp (h, w)`; pixels no tap
    /// reads keep their value (zero for a fresh gradient).
    fn scatter<T: Elem>(&self, ph: &[T], xp: &mut [T]) {
        self.for_each_run(|at, img, n, step| {
            let src = &ph[at..][..n];
            if step == 1 {
                xp[img..][..n].copy_from_slice(src);
            } else {
                for (v, o) in src.iter().zip(xp[img..].iter_mut().step_by(step)) {
                    *o = *v;
                }
            }
        });
    }
}

/// `dst[i] += a · src[i]`.
#[inline(always)]
fn axpy<T: Elem>(dst: &mut [T], a: T, src: &[T]) {
    for (o, v) in dst.iter_mut().zip(src) {
        *o += a * *v;
    }
}

/// Per-task scratch: phase planes (input and its gradient) and the wide output grid.
struct Scratch<T> {
    ph: Vec<T>,
    dph: Vec<T>,
    wide: Vec<T>,
}

impl<T: Elem> Scratch<T> {
    fn new(q: &Phases, g: &Geom, need_dph: bool) -> Self {
        let n = q.s * q.s * q.plane();
        Self {
            ph: vec![T::zero(); n],
            dph: vec![T::zero(); if need_dph { n } else { 0 }],
            wide: vec![T::zero(); g.ho * q.wq],
        }
    }
}

pub(crate) fn forward<T: Elem>(g: &Geom, x: &[T], weight: &[T]) -> Vec<T> {
    let (hw, hwo, kk) = (g.hw(), g.hwo(), g.kh * g.kw);
    let q = Phases::new(g);
    let mut y = uninit_vec::<T>(g.b * g.cout * hwo); // every element written below
    if q.pointwise {
        y.par_chunks_mut(hwo).enumerate().for_each(|(plane, yp)| {
            let wv = weight[plane % g.cin];
            let xp = &x[plane * hw..][..hw];
            for (oy, row) in yp.chunks_exact_mut(g.wo).enumerate() {
                let src = xp[oy * q.s * g.w..].iter().step_by(q.s);
                for (o, v) in row.iter_mut().zip(src) {
                    *o = wv * *v;
                }
            }
        });
        return y;
    }
    y.par_chunks_mut(hwo).enumerate().for_each_init(
        || Scratch::new(&q, g, false),
        |sc, (plane, yp)| {
            let wc = &weight[(plane % g.cin) * kk..][..kk];
            q.gather(&x[plane * hw..][..hw], &mut sc.ph);
            let wide = &mut sc.wide[..q.len];
            wide.fill(T::zero());
            for (&(phase, off), &wv) in q.taps.iter().zip(wc) {
                axpy(wide, wv, &sc.ph[phase * q.plane() + off..][..q.len]);
            }
            for (oy, row) in yp.chunks_exact_mut(g.wo).enumerate() {
                row.copy_from_slice(&wide[oy * q.wq..][..g.wo]);
            }
        },
    );
    y
}

/// Backward pass of one plane of a 1×1, unpadded depthwise convolution (`y = wv·x` on the
/// pixels `(oy·s, ox·s)`): writes `dxp` if given and returns the plane's weight gradient (zero
/// unless `need_dw`).
fn pointwise_backward<T: Elem>(
    g: &Geom,
    xp: &[T],
    wv: T,
    dyp: &[T],
    mut dxp: Option<&mut [T]>,
    need_dw: bool,
) -> T {
    let s = g.p.stride;
    let mut dw = T::zero();
    for (oy, grad) in dyp.chunks_exact(g.wo).enumerate() {
        let at = oy * s * g.w;
        if need_dw {
            dw += if s == 1 {
                lane_sum(grad, &xp[at..][..g.wo], |a, b| a * b)
            } else {
                let src = xp[at..].iter().step_by(s);
                grad.iter()
                    .zip(src)
                    .fold(T::zero(), |acc, (a, b)| acc + *a * *b)
            };
        }
        if let Some(dxp) = dxp.as_deref_mut() {
            for (o, a) in dxp[at..].iter_mut().step_by(s).zip(grad) {
                *o = wv * *a;
            }
        }
    }
    dw
}

pub(crate) fn backward<T: Elem>(
    g: &Geom,
    x: &[T],
    weight: &[T],
    dy: &[T],
    need_dx: bool,
    need_dw: bool,
) -> (Vec<T>, Vec<T>) {
    let (hw, hwo, kk) = (g.hw(), g.hwo(), g.kh * g.kw);
    let planes = g.b * g.cin;
    let q = Phases::new(g);
    let mut dx = vec![T::zero(); if need_dx { planes * hw } else { 0 }];
    // Weight gradient of every plane, summed over the images in order afterwards.
    let mut partial = vec![T::zero(); if need_dw { planes * kk } else { 0 }];
    let plane_backward =
        |sc: &mut Scratch<T>, plane: usize, dxp: Option<&mut [T]>, dwp: &mut [T]| {
            if q.pointwise {
                let (xp, dyp) = (&x[plane * hw..][..hw], &dy[plane * hwo..][..hwo]);
                let dw = pointwise_backward(g, xp, weight[plane % g.cin], dyp, dxp, need_dw);
                if need_dw {
                    dwp[0] = dw;
                }
                return;
            }
            // The output gradient on the wide grid, zero in the scratch columns.
            let wide = &mut sc.wide[..q.len];
            wide.fill(T::zero());
            for (oy, row) in dy[plane * hwo..][..hwo].chunks_exact(g.wo).enumerate() {
                wide[oy * q.wq..][..g.wo].copy_from_slice(row);
            }
            if need_dw {
                q.gather(&x[plane * hw..][..hw], &mut sc.ph);
                for (&(phase, off), dw) in q.taps.iter().zip(dwp.iter_mut()) {
                    *dw = lane_sum(wide, &sc.ph[phase * q.plane() + off..][..q.len], |a, b| {
                        a * b
                    });
                }
            }
            if let Some(dxp) = dxp {
                let wc = &weight[(plane % g.cin) * kk..][..kk];
                sc.dph.fill(T::zero());
                for (&(phase, off), &wv) in q.taps.iter().zip(wc) {
                    axpy(&mut sc.dph[phase * q.plane() + off..][..q.len], wv, wide);
                }
                q.scatter(&sc.dph, dxp);
            }
        };
    let init = || Scratch::new(&q, g, need_dx);
    match (need_dx, need_dw) {
        (true, true) => dx
            .par_chunks_mut(hw.max(1))
            .zip(partial.par_chunks_mut(kk))
            .enumerate()
            .for_each_init(init, |sc, (plane, (dxp, dwp))| {
                plane_backward(sc, plane, Some(dxp), dwp)
            }),
        (true, false) => dx
            .par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each_init(init, |sc, (plane, dxp)| {
                plane_backward(sc, plane, Some(dxp), &mut [])
            }),
        (false, true) => partial
            .par_chunks_mut(kk)
            .enumerate()
            .for_each_init(init, |sc, (plane, dwp)| {
                plane_backward(sc, plane, None, dwp)
            }),
        (false, false) => {}
    }
    let mut dw = vec![T::zero(); if need_dw { g.cin * kk } else { 0 }];
    for image in partial.chunks_exact(g.cin * kk) {
        for (d, p) in dw.iter_mut().zip(image) {
            *d += *p;
        }
    }
    (dx, dw)
}
