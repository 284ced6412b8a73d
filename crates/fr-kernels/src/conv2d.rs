//! 2-D convolution (NCHW, OIHW weights) as a candle custom op with its own backward.
//!
//! Forward: per chunk of images, im2col into a reused per-thread buffer, then one GEMM per group
//! (`weight (Cout/g, Cin/g·kh·kw) · cols (Cin/g·kh·kw, n·Ho·Wo)`). Backward, in one pass over the
//! same chunks: the weight gradient `dy · colsᵀ` from a freshly rebuilt im2col (nothing is kept
//! from the forward pass), and the input gradient `weightᵀ · dy` scattered back with col2im.
//! 1×1 stride-1 convolutions skip im2col, depthwise convolutions (groups = Cin = Cout) use the
//! direct kernel of [`crate::depthwise`].
//!
//! Images are split into one contiguous slot per rayon thread; each slot accumulates its own
//! weight gradient and the slots are summed in order, so results do not depend on scheduling.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::elem::{
    dispatch_float, matmul, slice, split_grads, uninit_vec, with_scratch, Elem, MatRef,
};

/// GEMM width (columns = images · output pixels) a chunk aims for: small maps such as 7×7 are
/// batched over several images so the GEMMs stay large.
const TARGET_COLS: usize = 1024;

/// Convolution hyper-parameters, as in `torch.nn.functional.conv2d` (square stride, padding and
/// dilation, in pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvParams {
    /// Stride in pixels (≥ 1).
    pub stride: usize,
    /// Zero padding on every side, in pixels.
    pub padding: usize,
    /// Dilation in pixels (≥ 1).
    pub dilation: usize,
    /// Number of groups (divides `Cin` and `Cout`); `Cin` for depthwise convolution.
    pub groups: usize,
}

impl Default for ConvParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

/// Shapes of one convolution, checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub b: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub p: ConvParams,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    /// Checks `x (B, Cin, H, W)` against `weight (Cout, Cin/groups, kh, kw)`.
    pub fn new(x: &[usize], weight: &[usize], p: ConvParams) -> Result<Self> {
        let (&[b, cin, h, w], &[cout, cin_g, kh, kw]) = (x, weight) else {
            bail!("conv2d expects x (B, Cin, H, W) and weight (Cout, Cin/groups, kh, kw), got {x:?} and {weight:?}")
        };
        if cin == 0 || cout == 0 {
            bail!("conv2d: zero channels in x {x:?} or weight {weight:?}");
        }
        if p.stride == 0 || p.dilation == 0 || p.groups == 0 {
            bail!("conv2d: stride, dilation and groups must be at least 1, got {p:?}");
        }
        if cin_g * p.groups != cin || cout % p.groups != 0 {
            bail!(
                "conv2d: groups {} do not fit x {x:?} and weight {weight:?} (Cin = groups·weight[1], groups | Cout)",
                p.groups
            );
        }
        let span = |k: usize| (k.max(1) - 1) * p.dilation + 1;
        if kh == 0 || kw == 0 || span(kh) > h + 2 * p.padding || span(kw) > w + 2 * p.padding {
            bail!(
                "conv2d: kernel {kh}x{kw} (dilation {}) does not fit input {h}x{w} with padding {}",
                p.dilation,
                p.padding
            );
        }
        Ok(Self {
            b,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            p,
            ho: (h + 2 * p.padding - span(kh)) / p.stride + 1,
            wo: (w + 2 * p.padding - span(kw)) / p.stride + 1,
        })
    }

    pub fn cin_g(&self) -> usize {
        self.cin / self.p.groups
    }

    pub fn cout_g(&self) -> usize {
        self.cout / self.p.groups
    }

    /// im2col rows of one group: `Cin/g · kh · kw`.
    pub fn kg(&self) -> usize {
        self.cin_g() * self.kh * self.kw
    }

    pub fn hw(&self) -> usize {
        self.h * self.w
    }

    pub fn hwo(&self) -> usize {
        self.ho * self.wo
    }

    /// Depthwise: one input and one output channel per group.
    pub fn is_depthwise(&self) -> bool {
        self.p.groups > 1 && self.p.groups == self.cin && self.cout == self.cin
    }

    /// 1×1, stride 1, no padding: the im2col matrix of an image is the image itself.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.p.stride == 1 && self.p.padding == 0
    }
}

/// Output columns `ox` whose input column `ox·stride + off` lies in `[0, w)`, as a range.
pub(crate) fn valid_range(off: isize, stride: usize, w: usize, wo: usize) -> (usize, usize) {
    let hi_incl = w as isize - 1 - off;
    if hi_incl < 0 {
        return (0, 0);
    }
    let hi = wo.min(hi_incl as usize / stride + 1);
    let lo = if off >= 0 {
        0
    } else {
        ((-off) as usize).div_ceil(stride)
    };
    (lo.min(hi), hi)
}

/// How the batch is split: `n_slots` contiguous image ranges run in parallel, each processed in
/// chunks of `chunk_imgs` images; `gemm_threads` > 1 when there are fewer images than threads.
struct Plan {
    n_slots: usize,
    slot_imgs: usize,
    chunk_imgs: usize,
    gemm_threads: usize,
}

fn plan(b: usize, hwo: usize) -> Plan {
    let threads = rayon::current_num_threads().max(1);
    let slot_imgs = b.div_ceil(threads.min(b).max(1)).max(1);
    let n_slots = b.div_ceil(slot_imgs);
    Plan {
        n_slots,
        slot_imgs,
        chunk_imgs: TARGET_COLS.div_ceil(hwo.max(1)).clamp(1, slot_imgs),
        gemm_threads: if n_slots < threads { threads } else { 1 },
    }
}

/// For stride 1 with `Wo = W` ("same" padding, e.g. 3×3 with padding 1), the im2col row of a
/// kernel tap is the input plane shifted by a constant `delta`: output position `t = oy·W + ox`
/// reads input `t + delta`. Returns `(delta, a, b, oy_lo, oy_hi)`: rows `oy_lo..oy_hi` have an
/// input row, and `a..b` is the part of them whose shifted index lies inside the plane; every
/// other position of those rows is an out-of-image column.
fn shifted_span(g: &Geom, ky: usize, off_x: isize) -> (isize, usize, usize, usize, usize) {
    let (w, d, p) = (g.w as isize, g.p.dilation, g.p.padding as isize);
    let dy = (ky * d) as isize - p;
    let oy_lo = ((-dy).max(0) as usize).min(g.ho);
    let oy_hi = ((g.h as isize - dy).clamp(0, g.ho as isize) as usize).max(oy_lo);
    let delta = dy * w + off_x;
    // `a..b`: output positions (row stride w) whose source `pos + delta` lies in the plane.
    // Both stay within the valid output rows, so a map narrower than the kernel's reach (a
    // 1-pixel-wide plane with a 3x3 kernel) gives an empty span instead of running past it.
    let end = oy_hi * g.w;
    let a = (oy_lo * g.w).max((-delta).max(0) as usize).min(end);
    let b = end.min((g.hw() as isize - delta).max(0) as usize);
    (delta, a, b.max(a), oy_lo, oy_hi)
}

/// Writes the im2col matrix of images `img0 .. img0 + nb` into `cols`
/// (`Cin·kh·kw` rows × `nb·Ho·Wo` columns, row-major).
fn im2col<T: Elem>(g: &Geom, x: &[T], img0: usize, nb: usize, cols: &mut [T]) {
    let (hwo, n) = (g.hwo(), nb * g.hwo());
    let (s, d, p) = (g.p.stride, g.p.dilation, g.p.padding as isize);
    let shifted = s == 1 && g.wo == g.w;
    for ci in 0..g.cin {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = (ci * g.kh + ky) * g.kw + kx;
                let dst_row = &mut cols[row * n..(row + 1) * n];
                let off_x = (kx * d) as isize - p;
                let (lo, hi) = valid_range(off_x, s, g.w, g.wo);
                if shifted {
                    // One block copy per plane, then zero the out-of-image rows and columns.
                    let (delta, a, b, oy_lo, oy_hi) = shifted_span(g, ky, off_x);
                    for j in 0..nb {
                        let plane = &x[((img0 + j) * g.cin + ci) * g.hw()..][..g.hw()];
                        let dst = &mut dst_row[j * hwo..][..hwo];
                        dst[..a].fill(T::zero());
                        dst[b..].fill(T::zero());
                        if b > a {
                            let start = (a as isize + delta) as usize;
                            dst[a..b].copy_from_slice(&plane[start..start + (b - a)]);
                        }
                        if lo > 0 || hi < g.w {
                            for r in dst[oy_lo * g.w..oy_hi * g.w].chunks_exact_mut(g.w) {
                                r[..lo].fill(T::zero());
                                r[hi..].fill(T::zero());
                            }
                        }
                    }
                    continue;
                }
                for j in 0..nb {
                    let plane = &x[((img0 + j) * g.cin + ci) * g.hw()..][..g.hw()];
                    for oy in 0..g.ho {
                        let dst = &mut dst_row[j * hwo + oy * g.wo..][..g.wo];
                        let iy = (oy * s + ky * d) as isize - p;
                        if iy < 0 || iy >= g.h as isize {
                            dst.fill(T::zero());
                            continue;
                        }
                        let src = &plane[iy as usize * g.w..][..g.w];
                        dst[..lo].fill(T::zero());
                        dst[hi..].fill(T::zero());
                        if s == 1 {
                            let start = (lo as isize + off_x) as usize;
                            dst[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                        } else {
                            for (ox, v) in dst[lo..hi].iter_mut().enumerate() {
                                *v = src[(((lo + ox) * s) as isize + off_x) as usize];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds the columns of `cols` (as written by [`im2col`]) back into the images `dx`
/// (`nb` images, `(nb, Cin, H, W)`).
/// `cols` is scratch: the stride-1 path zeroes its out-of-image columns in place.
fn col2im<T: Elem>(g: &Geom, cols: &mut [T], nb: usize, dx: &mut [T]) {
    let (hwo, n) = (g.hwo(), nb * g.hwo());
    let (s, d, p) = (g.p.stride, g.p.dilation, g.p.padding as isize);
    let shifted = s == 1 && g.wo == g.w;
    for ci in 0..g.cin {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = (ci * g.kh + ky) * g.kw + kx;
                let src_row = &mut cols[row * n..(row + 1) * n];
                let off_x = (kx * d) as isize - p;
                let (lo, hi) = valid_range(off_x, s, g.w, g.wo);
                if shifted {
                    // Zero the out-of-image columns, then one block add per plane.
                    let (delta, a, b, oy_lo, oy_hi) = shifted_span(g, ky, off_x);
                    for j in 0..nb {
                        let src = &mut src_row[j * hwo..][..hwo];
                        if lo > 0 || hi < g.w {
                            for r in src[oy_lo * g.w..oy_hi * g.w].chunks_exact_mut(g.w) {
                                r[..lo].fill(T::zero());
                                r[hi..].fill(T::zero());
                            }
                        }
                        let plane = &mut dx[(j * g.cin + ci) * g.hw()..][..g.hw()];
                        if b > a {
                            let start = (a as isize + delta) as usize;
                            for (o, v) in plane[start..start + (b - a)].iter_mut().zip(&src[a..b]) {
                                *o += *v;
                            }
                        }
                    }
                    continue;
                }
                let src_row = &*src_row;
                for j in 0..nb {
                    let plane = &mut dx[(j * g.cin + ci) * g.hw()..][..g.hw()];
                    for oy in 0..g.ho {
                        let iy = (oy * s + ky * d) as isize - p;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let src = &src_row[j * hwo + oy * g.wo..][..g.wo];
                        let dst = &mut plane[iy as usize * g.w..][..g.w];
                        if s == 1 {
                            let start = (lo as isize + off_x) as usize;
                            for (o, v) in dst[start..start + hi - lo].iter_mut().zip(&src[lo..hi]) {
                                *o += *v;
                            }
                        } else {
                            for ox in lo..hi {
                                dst[((ox * s) as isize + off_x) as usize] += src[ox];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Forward pass on contiguous `x (B, Cin, H, W)` and `weight (Cout, Cin/g, kh, kw)`.
/// What an inference convolution applies to each output row `(image, channel)` right after
/// its GEMM, while the row is still in cache: `v·scale + shift` (an eval-mode BatchNorm and the
/// bias), then PReLU with `slope`, then `+ residual`. See [`crate::conv2d_eval_fused`].
pub(crate) struct Epilogue<'a, T> {
    pub scale: Vec<T>,
    pub shift: Vec<T>,
    pub slope: Option<Vec<T>>,
    /// `(B, Cout, Ho, Wo)`, contiguous.
    pub residual: Option<&'a [T]>,
}

impl<T: Elem> Epilogue<'_, T> {
    /// Applies the epilogue to `row`, the output of channel `co` of image `img` (`Ho·Wo`).
    #[inline]
    fn apply(&self, row: &mut [T], img: usize, co: usize, cout: usize) {
        let (a, k) = (self.scale[co], self.shift[co]);
        match &self.slope {
            Some(slope) => {
                let sl = slope[co];
                for v in row.iter_mut() {
                    let z = *v * a + k;
                    *v = if z > T::zero() { z } else { sl * z };
                }
            }
            None => {
                for v in row.iter_mut() {
                    *v = *v * a + k;
                }
            }
        }
        if let Some(res) = self.residual {
            let r = &res[(img * cout + co) * row.len()..][..row.len()];
            for (v, r) in row.iter_mut().zip(r) {
                *v += *r;
            }
        }
    }
}

pub(crate) fn forward<T: Elem>(
    g: &Geom,
    x: &[T],
    weight: &[T],
    epi: Option<&Epilogue<'_, T>>,
) -> Vec<T> {
    if g.is_depthwise() {
        let mut y = crate::depthwise::forward(g, x, weight);
        if let Some(epi) = epi {
            let hwo = g.hwo();
            y.par_chunks_mut(hwo).enumerate().for_each(|(plane, row)| {
                epi.apply(row, plane / g.cout, plane % g.cout, g.cout);
            });
        }
        return y;
    }
    let plane_out = g.cout * g.hwo();
    // Every element is written by a GEMM (read_dst = false) or by the copy out of `tmp`.
    let mut y = uninit_vec::<T>(g.b * plane_out);
    let pl = plan(g.b, g.hwo());
    let run = |slot: usize, ys: &mut [T]| {
        let nimg = ys.len() / plane_out;
        let mut j = 0;
        while j < nimg {
            let nb = pl.chunk_imgs.min(nimg - j);
            let img0 = slot * pl.slot_imgs + j;
            let dst = &mut ys[j * plane_out..(j + nb) * plane_out];
            forward_chunk(g, x, weight, img0, nb, dst, pl.gemm_threads, epi);
            j += nb;
        }
    };
    if pl.n_slots == 1 {
        run(0, &mut y);
    } else {
        y.par_chunks_mut(pl.slot_imgs * plane_out)
            .enumerate()
            .for_each(|(slot, ys)| run(slot, ys));
    }
    y
}

#[allow(clippy::too_many_arguments)]
fn forward_chunk<T: Elem>(
    g: &Geom,
    x: &[T],
    weight: &[T],
    img0: usize,
    nb: usize,
    y: &mut [T],
    threads: usize,
    epi: Option<&Epilogue<'_, T>>,
) {
    let (hwo, n, kg, cout_g) = (g.hwo(), nb * g.hwo(), g.kg(), g.cout_g());
    let direct = nb == 1;
    let pointwise = direct && g.is_pointwise();
    let cols_len = if pointwise { 0 } else { g.p.groups * kg * n };
    let tmp_len = if direct { 0 } else { g.cout * n };
    with_scratch(cols_len + tmp_len, |buf: &mut [T]| {
        let (cols, tmp) = buf.split_at_mut(cols_len);
        let cols: &[T] = if pointwise {
            &x[img0 * g.cin * g.hw()..][..g.cin * g.hw()]
        } else {
            im2col(g, x, img0, nb, cols);
            cols
        };
        let (dst, dst_cols): (&mut [T], usize) = if direct { (y, hwo) } else { (tmp, n) };
        for gi in 0..g.p.groups {
            // SAFETY: the slices hold the (cout_g × kg), (kg × n) and (cout_g × n) blocks.
            unsafe {
                matmul(
                    cout_g,
                    n,
                    kg,
                    &mut dst[gi * cout_g * dst_cols..],
                    dst_cols,
                    false,
                    MatRef::rows(&weight[gi * cout_g * kg..], kg),
                    MatRef::rows(&cols[gi * kg * n..], n),
                    threads,
                );
            }
        }
        for j in 0..nb {
            for co in 0..g.cout {
                let row = &mut y[(j * g.cout + co) * hwo..][..hwo];
                if !direct {
                    row.copy_from_slice(&tmp[co * n + j * hwo..][..hwo]);
                }
                if let Some(epi) = epi {
                    epi.apply(row, img0 + j, co, g.cout);
                }
            }
        }
    });
}

/// Backward pass: `(dx, dweight)` for the output gradient `dy (B, Cout, Ho, Wo)`; a gradient
/// that is not asked for comes back empty.
pub(crate) fn backward<T: Elem>(
    g: &Geom,
    x: &[T],
    weight: &[T],
    dy: &[T],
    need_dx: bool,
    need_dw: bool,
) -> (Vec<T>, Vec<T>) {
    if g.is_depthwise() {
        return crate::depthwise::backward(g, x, weight, dy, need_dx, need_dw);
    }
    let plane_in = g.cin * g.hw();
    let wlen = g.cout * g.kg();
    let pl = plan(g.b, g.hwo());
    // dx, with room for the weight gradient that the custom op appends (no reallocation).
    let mut dx = Vec::with_capacity(usize::from(need_dx) * g.b * plane_in + wlen);
    if need_dx {
        dx.resize(g.b * plane_in, T::zero());
    }
    let dx_slots: Vec<Option<&mut [T]>> = if need_dx {
        dx.chunks_mut(pl.slot_imgs * plane_in).map(Some).collect()
    } else {
        (0..pl.n_slots).map(|_| None).collect()
    };
    let work = |(slot, mut dxs): (usize, Option<&mut [T]>)| -> Vec<T> {
        let img_start = slot * pl.slot_imgs;
        let nimg = pl.slot_imgs.min(g.b - img_start);
        let mut dw = if need_dw {
            vec![T::zero(); wlen]
        } else {
            Vec::new()
        };
        let mut j = 0;
        while j < nimg {
            let nb = pl.chunk_imgs.min(nimg - j);
            let dx_chunk = dxs
                .as_deref_mut()
                .map(|d| &mut d[j * plane_in..(j + nb) * plane_in]);
            let dw_acc = need_dw.then_some(dw.as_mut_slice());
            backward_chunk(
                g,
                x,
                weight,
                dy,
                img_start + j,
                nb,
                dx_chunk,
                dw_acc,
                pl.gemm_threads,
            );
            j += nb;
        }
        dw
    };
    let partials: Vec<Vec<T>> = if pl.n_slots == 1 {
        dx_slots.into_iter().enumerate().map(work).collect()
    } else {
        dx_slots.into_par_iter().enumerate().map(work).collect()
    };
    let mut parts = partials.into_iter();
    // An empty batch has no slots: its weight gradient is zero.
    let mut dw = parts
        .next()
        .unwrap_or_else(|| vec![T::zero(); usize::from(need_dw) * wlen]);
    for part in parts {
        for (a, b) in dw.iter_mut().zip(&part) {
            *a += *b;
        }
    }
    (dx, dw)
}

#[allow(clippy::too_many_arguments)]
fn backward_chunk<T: Elem>(
    g: &Geom,
    x: &[T],
    weight: &[T],
    dy: &[T],
    img0: usize,
    nb: usize,
    dx: Option<&mut [T]>,
    dw: Option<&mut [T]>,
    threads: usize,
) {
    let (hwo, n, kg, cout_g) = (g.hwo(), nb * g.hwo(), g.kg(), g.cout_g());
    let plane_in = g.cin * g.hw();
    let plane_out = g.cout * hwo;
    let direct = nb == 1;
    let pointwise = direct && g.is_pointwise();
    let cols_len = if pointwise { 0 } else { g.p.groups * kg * n };
    let dyc_len = if direct { 0 } else { g.cout * n };
    with_scratch(cols_len + dyc_len, |buf: &mut [T]| {
        let (cols, dyc) = buf.split_at_mut(cols_len);
        // The output gradient of the chunk as a (Cout × n) matrix.
        let dyv: &[T] = if direct {
            &dy[img0 * plane_out..][..plane_out]
        } else {
            for j in 0..nb {
                for co in 0..g.cout {
                    dyc[co * n + j * hwo..][..hwo]
                        .copy_from_slice(&dy[((img0 + j) * g.cout + co) * hwo..][..hwo]);
                }
            }
            dyc
        };
        if let Some(dw) = dw {
            let colsv: &[T] = if pointwise {
                &x[img0 * plane_in..][..plane_in]
            } else {
                im2col(g, x, img0, nb, cols);
                cols
            };
            for gi in 0..g.p.groups {
                // SAFETY: (cout_g × n) · (n × kg) into the (cout_g × kg) block of group gi.
                unsafe {
                    matmul(
                        cout_g,
                        kg,
                        n,
                        &mut dw[gi * cout_g * kg..],
                        kg,
                        true,
                        MatRef::rows(&dyv[gi * cout_g * n..], n),
                        MatRef::rows_t(&colsv[gi * kg * n..], n),
                        threads,
                    );
                }
            }
        }
        if let Some(dx) = dx {
            // Column gradients weightᵀ · dy, straight into dx for 1×1 stride-1 convolutions.
            let col_grads = |dst: &mut [T]| {
                for gi in 0..g.p.groups {
                    // SAFETY: (kg × cout_g) · (cout_g × n) into the (kg × n) block of group gi.
                    unsafe {
                        matmul(
                            kg,
                            n,
                            cout_g,
                            &mut dst[gi * kg * n..],
                            n,
                            false,
                            MatRef::rows_t(&weight[gi * cout_g * kg..], kg),
                            MatRef::rows(&dyv[gi * cout_g * n..], n),
                            threads,
                        );
                    }
                }
            };
            if pointwise {
                col_grads(dx);
            } else {
                col_grads(cols);
                col2im(g, cols, nb, dx);
            }
        }
    });
}

/// `conv2d(x, weight)` on the CPU with the backward pass above; see [`conv2d`].
struct Conv2dOp {
    p: ConvParams,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "fr-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.p)?;
        let out = dispatch_float!(self.name(), s1, T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let w = slice::<T>(s2, l2, self.name())?;
            T::to_cpu_storage_owned(forward(&g, x, w, None))
        });
        Ok((out, (g.b, g.cout, g.ho, g.wo).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_dw) = (x.track_op(), weight.track_op());
        if !need_dx && !need_dw {
            return Ok((None, None));
        }
        let op = Conv2dBackwardOp {
            p: self.p,
            need_dx,
            need_dw,
        };
        let flat = x.apply_op3_no_bwd(weight, &dy.contiguous()?, &op)?;
        let [dx, dw] = split_grads(&flat, [(x, need_dx), (weight, need_dw)])?;
        Ok((dx, dw))
    }
}

/// Both gradients of a convolution in one pass, flattened as `[dx, dweight]`.
struct Conv2dBackwardOp {
    p: ConvParams,
    need_dx: bool,
    need_dw: bool,
}

impl CustomOp3 for Conv2dBackwardOp {
    fn name(&self) -> &'static str {
        "fr-conv2d-backward"
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
        let g = Geom::new(l1.dims(), l2.dims(), self.p)?;
        if l3.dims() != [g.b, g.cout, g.ho, g.wo] {
            bail!(
                "{}: output gradient {:?} does not match the output ({}, {}, {}, {})",
                self.name(),
                l3.dims(),
                g.b,
                g.cout,
                g.ho,
                g.wo
            );
        }
        let out = dispatch_float!(self.name(), s1, T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let w = slice::<T>(s2, l2, self.name())?;
            let dy = slice::<T>(s3, l3, self.name())?;
            let (mut dx, dw) = backward(&g, x, w, dy, self.need_dx, self.need_dw);
            dx.extend_from_slice(&dw);
            T::to_cpu_storage_owned(dx)
        });
        let len = usize::from(self.need_dx) * g.b * g.cin * g.hw()
            + usize::from(self.need_dw) * g.cout * g.kg();
        Ok((out, len.into()))
    }
}

/// 2-D convolution `x (B, Cin, H, W)` ⊛ `weight (Cout, Cin/groups, kh, kw)` →
/// `(B, Cout, Ho, Wo)`, `Ho = (H + 2·padding − dilation·(kh − 1) − 1) / stride + 1`, with the
/// CPU kernels of this crate and their own backward (gradients for `x` and `weight`). Same
/// semantics as `torch.nn.functional.conv2d` without bias. Strided inputs are made
/// contiguous first.
///
/// # Errors
/// Mismatched shapes or groups, a kernel larger than the padded input, a device other than the
/// CPU, or a dtype other than f32 / f64.
pub fn conv2d(x: &Tensor, weight: &Tensor, params: ConvParams) -> Result<Tensor> {
    Geom::new(x.dims(), weight.dims(), params)?;
    if x.dtype() != weight.dtype() {
        bail!(
            "conv2d: x is {:?} but weight is {:?}",
            x.dtype(),
            weight.dtype()
        );
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Conv2dOp { p: params })
}
