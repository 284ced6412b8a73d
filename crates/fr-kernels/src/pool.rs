//! 3×3 max and average pooling with padding 1 (the `max_pool_3x3` / `avg_pool_3x3` primitives
//! of the DARTS search space, `ops.py` of DARTS and PocketNet) as CPU custom ops with their own
//! backward.
//!
//! Semantics are PyTorch's `nn.MaxPool2d(3, stride, padding=1)` and
//! `nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)` (floor mode):
//! - output side `Ho = (H − 1) / stride + 1` (integer division), window of output `(oy, ox)`
//!   the input rows `oy·s − 1 ..= oy·s + 1` and columns `ox·s − 1 ..= ox·s + 1` that lie inside
//!   the image (every window holds at least its centre pixel);
//! - max: the padding is never selected (as `−∞` padding). The window is scanned row by row,
//!   left to right, and a value replaces the running maximum when it is greater or NaN, as
//!   PyTorch's CPU kernel: the gradient of an output goes to one input only, the *first*
//!   maximum in that order on ties (the *last* NaN when the window holds NaNs, whose output
//!   is then NaN). candle's `max` reduction, used by the windowed reference path of
//!   [`crate::nn::Pool3x3`], instead gives the full gradient to every tied maximum;
//! - average: the sum over the window's valid pixels divided by their count (4, 6 or 9 in the
//!   interior of a map of at least 2×2), and the gradient `dy / count` to each of them.
//!
//! Forward and backward run in parallel over the `B·C` planes; each plane is computed by one
//! thread in a fixed order, so results are deterministic.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::elem::{dispatch_float, slice, uninit_vec, Elem};

/// Which reduction a [`pool3x3`] applies over each 3×3 window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    /// Maximum (`nn.MaxPool2d(3, stride, padding=1)`).
    Max,
    /// Mean over the pixels inside the image (`nn.AvgPool2d(3, stride, padding=1,
    /// count_include_pad=False)`).
    Avg,
}

/// Shapes of one pooling, checked: `planes = B·C` maps of `h × w` → `ho × wo`.
#[derive(Debug, Clone, Copy)]
struct Geom {
    planes: usize,
    h: usize,
    w: usize,
    stride: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &[usize], stride: usize, op: &str) -> Result<Self> {
        let &[b, c, h, w] = x else {
            bail!("{op} expects x (B, C, H, W), got {x:?}")
        };
        if h == 0 || w == 0 {
            bail!("{op}: empty spatial size {h}x{w}");
        }
        if stride == 0 {
            bail!("{op}: stride must be at least 1");
        }
        Ok(Self {
            planes: b * c,
            h,
            w,
            stride,
            ho: (h - 1) / stride + 1,
            wo: (w - 1) / stride + 1,
        })
    }

    /// The input rows (or columns) `lo..hi` of the window of output index `o` along a side of
    /// `n` pixels.
    fn span(&self, o: usize, n: usize) -> (usize, usize) {
        let centre = o * self.stride;
        (centre.saturating_sub(1), (centre + 2).min(n))
    }

    /// The column spans of every output column.
    fn col_spans(&self) -> Vec<(usize, usize)> {
        (0..self.wo).map(|ox| self.span(ox, self.w)).collect()
    }
}

/// NaN test for the generic element type (`partial_cmp` of a value with itself fails only
/// for NaN).
#[inline(always)]
fn is_nan<T: PartialOrd>(v: T) -> bool {
    v.partial_cmp(&v).is_none()
}

/// PyTorch's max-pooling scan rule: `v` replaces the running maximum `m` when it is greater
/// or NaN.
#[inline(always)]
fn takes<T: Elem>(m: T, v: T) -> bool {
    (v > m) | is_nan(v)
}

/// The first maximum of three values in scan order, by [`takes`]: `(value, position 0..=2)`.
/// The position is computed from the comparison bits rather than selected: a selected index
/// made LLVM turn the value selects into data-dependent branches too (the forward pass was
/// about 10x slower on random data).
#[inline(always)]
fn max3<T: Elem>(a: T, b: T, d: T) -> (T, usize) {
    let t1 = takes(a, b);
    let m = if t1 { b } else { a };
    let t2 = takes(m, d);
    (
        if t2 { d } else { m },
        2 * usize::from(t2) + usize::from(t1 & !t2),
    )
}

/// The first maximum of `v[lo..hi]` in scan order, by [`takes`]: `(value, index)` (the
/// windows cut by the border).
#[inline(always)]
fn max_span<T: Elem>(v: impl Fn(usize) -> T, lo: usize, hi: usize) -> (T, usize) {
    let (mut m, mut k) = (v(lo), lo);
    for j in lo + 1..hi {
        if takes(m, v(j)) {
            (m, k) = (v(j), j);
        }
    }
    (m, k)
}

/// Row pass of max pooling over one input row: `hv[ox]` is the maximum of the row's window
/// columns around `ox·stride` and, with `IDX`, `hc[ox]` its column, by [`takes`] in scan order.
/// The stride is a constant for 1 and 2 (`S`; 0: `g.stride` at run time), so that the compiler
/// can vectorise the loop over the full-width windows.
#[inline(always)]
fn row_max<T: Elem, const IDX: bool, const S: usize>(
    g: &Geom,
    row: &[T],
    hv: &mut [T],
    hc: &mut [u32],
) {
    let s = if S == 0 { g.stride } else { S };
    // Outputs `1..full` have all three columns inside the row.
    let full = if g.w >= 2 {
        ((g.w - 2) / s + 1).min(g.wo)
    } else {
        1
    }
    .max(1);
    for ox in (0..1).chain(full..g.wo) {
        let (lo, hi) = g.span(ox, g.w);
        let (m, k) = max_span(|j| row[j], lo, hi);
        hv[ox] = m;
        if IDX {
            hc[ox] = k as u32;
        }
    }
    if full <= 1 {
        return;
    }
    // Slicing up front lets LLVM drop the bounds checks inside the loop.
    let row = &row[..(full - 1) * s + 2];
    let hv = &mut hv[..full];
    let hc = if IDX { &mut hc[..full] } else { hc };
    for ox in 1..full {
        let c = ox * s;
        let (m, k) = max3(row[c - 1], row[c], row[c + 1]);
        hv[ox] = m;
        if IDX {
            hc[ox] = (c - 1 + k) as u32;
        }
    }
}

/// Max pooling of one plane `xp (h, w)`: the window maxima into `yp (ho, wo)` and, with `IDX`,
/// each window's arg-max as its row offset `vk (ho, wo)` (0..=2 from the window's first row)
/// and the columns `hc (h, wo)` of the row pass (see [`arg_max`]). Separable: [`row_max`] into
/// `hv (h, wo)`, then the same rule down the rows; scanning row by row and taking each row's
/// first maximum is PyTorch's row-major scan.
fn plane_max<T: Elem, const IDX: bool>(
    g: &Geom,
    xp: &[T],
    yp: &mut [T],
    vk: &mut [u8],
    hv: &mut [T],
    hc: &mut [u32],
) {
    let wo = g.wo;
    for r in 0..g.h {
        let row = &xp[r * g.w..][..g.w];
        let hvr = &mut hv[r * wo..][..wo];
        let hcr = if IDX {
            &mut hc[r * wo..][..wo]
        } else {
            &mut [][..]
        };
        match g.stride {
            1 => row_max::<T, IDX, 1>(g, row, hvr, hcr),
            2 => row_max::<T, IDX, 2>(g, row, hvr, hcr),
            _ => row_max::<T, IDX, 0>(g, row, hvr, hcr),
        }
    }
    for oy in 0..g.ho {
        let (r0, r1) = g.span(oy, g.h);
        let y = &mut yp[oy * wo..][..wo];
        let k = if IDX {
            &mut vk[oy * wo..][..wo]
        } else {
            &mut [][..]
        };
        if r1 - r0 == 3 {
            let (v0, rest) = hv[r0 * wo..].split_at(wo);
            let (v1, v2) = rest.split_at(wo);
            let v2 = &v2[..wo];
            for ox in 0..wo {
                let (m, kk) = max3(v0[ox], v1[ox], v2[ox]);
                y[ox] = m;
                if IDX {
                    k[ox] = kk as u8;
                }
            }
        } else {
            for ox in 0..wo {
                let (m, r) = max_span(|r| hv[r * wo + ox], r0, r1);
                y[ox] = m;
                if IDX {
                    k[ox] = (r - r0) as u8;
                }
            }
        }
    }
}

/// The flat input index (in its plane) of the arg-max of output `(oy, ox)` from the buffers of
/// [`plane_max`].
#[inline(always)]
fn arg_max(g: &Geom, oy: usize, ox: usize, vk: &[u8], hc: &[u32]) -> usize {
    let r = g.span(oy, g.h).0 + vk[oy * g.wo + ox] as usize;
    r * g.w + hc[r * g.wo + ox] as usize
}

/// Per-task scratch of [`plane_max`]: `hv`, `hc`, `vk` and `yp`, sized for one plane.
type MaxScratch<T> = (Vec<T>, Vec<u32>, Vec<u8>, Vec<T>);

fn max_scratch<T: Elem>(g: &Geom, idx: bool) -> MaxScratch<T> {
    let n = |len: usize| if idx { len } else { 0 };
    (
        vec![T::zero(); g.h * g.wo],
        vec![0; n(g.h * g.wo)],
        vec![0; n(g.ho * g.wo)],
        vec![T::zero(); n(g.ho * g.wo)],
    )
}

/// Forward pass on contiguous `x (planes, h, w)` → `(planes, ho, wo)`.
fn forward<T: Elem>(g: &Geom, kind: PoolKind, x: &[T]) -> Vec<T> {
    let (hw, hwo) = (g.h * g.w, g.ho * g.wo);
    let cols = g.col_spans();
    let mut y = uninit_vec::<T>(g.planes * hwo); // every element written below
    let planes = y.par_chunks_mut(hwo).enumerate();
    match kind {
        PoolKind::Max => planes.for_each_init(
            || max_scratch::<T>(g, false),
            |(hv, ..), (plane, yp)| {
                let xp = &x[plane * hw..][..hw];
                plane_max::<T, false>(g, xp, yp, &mut [], hv, &mut []);
            },
        ),
        PoolKind::Avg => planes.for_each(|(plane, yp)| {
            let xp = &x[plane * hw..][..hw];
            for (oy, yrow) in yp.chunks_exact_mut(g.wo).enumerate() {
                let (r0, r1) = g.span(oy, g.h);
                for (o, &(c0, c1)) in yrow.iter_mut().zip(&cols) {
                    let mut sum = T::zero();
                    for r in r0..r1 {
                        for &v in &xp[r * g.w..][c0..c1] {
                            sum += v;
                        }
                    }
                    *o = sum / T::from_f64(((r1 - r0) * (c1 - c0)) as f64);
                }
            }
        }),
    }
    y
}

/// Input gradient `(planes, h, w)` from the output gradient `dy (planes, ho, wo)`: of max
/// pooling when the input `x` is given (each window's arg-max is found again), else of
/// average pooling.
fn backward<T: Elem>(g: &Geom, x: Option<&[T]>, dy: &[T]) -> Vec<T> {
    let (hw, hwo) = (g.h * g.w, g.ho * g.wo);
    let cols = g.col_spans();
    let mut dx = vec![T::zero(); g.planes * hw];
    let planes = dx.par_chunks_mut(hw).enumerate();
    if let Some(x) = x {
        planes.for_each_init(
            || max_scratch::<T>(g, true),
            |(hv, hc, vk, y), (plane, dxp)| {
                let xp = &x[plane * hw..][..hw];
                plane_max::<T, true>(g, xp, y, vk, hv, hc);
                let dyp = &dy[plane * hwo..][..hwo];
                for (oy, dyrow) in dyp.chunks_exact(g.wo).enumerate() {
                    for (ox, &d) in dyrow.iter().enumerate() {
                        dxp[arg_max(g, oy, ox, vk, hc)] += d;
                    }
                }
            },
        );
        return dx;
    }
    planes.for_each(|(plane, dxp)| {
        let dyp = &dy[plane * hwo..][..hwo];
        for (oy, dyrow) in dyp.chunks_exact(g.wo).enumerate() {
            let (r0, r1) = g.span(oy, g.h);
            for (&d, &(c0, c1)) in dyrow.iter().zip(&cols) {
                let share = d / T::from_f64(((r1 - r0) * (c1 - c0)) as f64);
                for r in r0..r1 {
                    for v in &mut dxp[r * g.w..][c0..c1] {
                        *v += share;
                    }
                }
            }
        }
    });
    dx
}

/// The pooling itself; see [`pool3x3`].
struct Pool3x3Op {
    kind: PoolKind,
    stride: usize,
}

impl CustomOp1 for Pool3x3Op {
    fn name(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "fr-max-pool3x3",
            PoolKind::Avg => "fr-avg-pool3x3",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l.dims(), self.stride, self.name())?;
        let out = dispatch_float!(self.name(), s, T => {
            let x = slice::<T>(s, l, self.name())?;
            T::to_cpu_storage_owned(forward(&g, self.kind, x))
        });
        let (b, c) = (l.dims()[0], l.dims()[1]);
        Ok((out, (b, c, g.ho, g.wo).into()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let dx = match self.kind {
            PoolKind::Max => x.apply_op2_no_bwd(
                &dy,
                &MaxPoolBackwardOp {
                    stride: self.stride,
                },
            )?,
            PoolKind::Avg => dy.apply_op1_no_bwd(&AvgPoolBackwardOp {
                stride: self.stride,
                h: x.dim(D::Minus2)?,
                w: x.dim(D::Minus1)?,
            })?,
        };
        Ok(Some(dx))
    }
}

/// Checks that `dy` has the output shape of pooling `x_dims`.
fn check_dy(g: &Geom, x_dims: &[usize], dy: &[usize], op: &str) -> Result<()> {
    if dy != [x_dims[0], x_dims[1], g.ho, g.wo] {
        bail!(
            "{op}: output gradient {dy:?} does not match the output ({}, {}, {}, {})",
            x_dims[0],
            x_dims[1],
            g.ho,
            g.wo
        );
    }
    Ok(())
}

/// `dx` of max pooling from `(x, dy)`.
struct MaxPoolBackwardOp {
    stride: usize,
}

impl CustomOp2 for MaxPoolBackwardOp {
    fn name(&self) -> &'static str {
        "fr-max-pool3x3-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), self.stride, self.name())?;
        check_dy(&g, l1.dims(), l2.dims(), self.name())?;
        let out = dispatch_float!(self.name(), s1, T => {
            let x = slice::<T>(s1, l1, self.name())?;
            let dy = slice::<T>(s2, l2, self.name())?;
            T::to_cpu_storage_owned(backward(&g, Some(x), dy))
        });
        Ok((out, l1.shape().clone()))
    }
}

/// `dx (B, C, h, w)` of average pooling from `dy` alone.
struct AvgPoolBackwardOp {
    stride: usize,
    h: usize,
    w: usize,
}

impl CustomOp1 for AvgPoolBackwardOp {
    fn name(&self) -> &'static str {
        "fr-avg-pool3x3-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[b, c, ..] = l.dims() else {
            bail!(
                "{}: expects dy (B, C, Ho, Wo), got {:?}",
                self.name(),
                l.dims()
            )
        };
        let x_dims = [b, c, self.h, self.w];
        let g = Geom::new(&x_dims, self.stride, self.name())?;
        check_dy(&g, &x_dims, l.dims(), self.name())?;
        let out = dispatch_float!(self.name(), s, T => {
            let dy = slice::<T>(s, l, self.name())?;
            T::to_cpu_storage_owned(backward::<T>(&g, None, dy))
        });
        Ok((out, (b, c, self.h, self.w).into()))
    }
}

/// 3×3 pooling with padding 1 of `x (B, C, H, W)` → `(B, C, (H − 1)/stride + 1,
/// (W − 1)/stride + 1)` on the CPU, with its own backward: PyTorch's
/// `max_pool2d(x, 3, stride, padding=1)` or `avg_pool2d(x, 3, stride, padding=1,
/// count_include_pad=False)` (DARTS' `max_pool_3x3` / `avg_pool_3x3`). Max pooling routes each
/// output's gradient to the first maximum of its window in row-major order (see the module
/// notes). Any stride ≥ 1 (DARTS cells use 1 and 2). Strided inputs are made contiguous first.
/// The backward is not itself differentiable (no second derivatives).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fr_kernels::{pool3x3, PoolKind};
///
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::arange(0f32, 25.0, &Device::Cpu)?.reshape((1, 1, 5, 5))?;
/// let y = pool3x3(&x, PoolKind::Max, 2)?; // (1, 1, 3, 3)
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [6., 8., 9., 16., 18., 19., 21., 23., 24.]);
/// let a = pool3x3(&x, PoolKind::Avg, 2)?; // corner window: (0 + 1 + 5 + 6) / 4
/// assert_eq!(a.flatten_all()?.to_vec1::<f32>()?[0], 3.0);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// A shape other than 4-D, an empty spatial size, stride 0, a device other than the CPU
/// (use [`crate::nn::Pool3x3`], which falls back to candle's ops there), or a dtype other than
/// f32 / f64.
pub fn pool3x3(x: &Tensor, kind: PoolKind, stride: usize) -> Result<Tensor> {
    let op = Pool3x3Op { kind, stride };
    Geom::new(x.dims(), stride, op.name())?;
    if !x.device().is_cpu() {
        bail!(
            "{}: CPU tensors only, got one on {:?} (fr_kernels::nn::Pool3x3 uses candle's ops there)",
            op.name(),
            x.device().location()
        );
    }
    x.contiguous()?.apply_op1(op)
}

/// The same pooling from candle's own ops (the reference path of [`crate::nn::Pool3x3`], and
/// the one used on GPUs): the nine shifted, strided views of the padded input are stacked to
/// `(B, C, Ho, Wo, 9)` and reduced. Max pooling pads with `−∞` and its gradient goes to every
/// tied maximum (candle's `max` backward); average pooling divides by the count of valid
/// pixels. Slow on the CPU (many copies) but differentiable on every device.
pub(crate) fn pool3x3_windowed(x: &Tensor, kind: PoolKind, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    Geom::new(x.dims(), stride, "pool3x3")?;
    let max = kind == PoolKind::Max;
    let stacked = Tensor::stack(&windows3(x, stride, max)?, D::Minus1)?;
    if max {
        return stacked.max(D::Minus1);
    }
    let ones = Tensor::ones((1, 1, h, w), x.dtype(), x.device())?;
    let count = Tensor::stack(&windows3(&ones, stride, false)?, D::Minus1)?.sum(D::Minus1)?;
    stacked.sum(D::Minus1)?.broadcast_div(&count)
}

/// The nine shifted (strided) views of a 3×3, padding-1 window over `x (B, C, H, W)`, each
/// `(B, C, Ho, Wo)`; the padding is `−∞` for max pooling, zeros otherwise.
fn windows3(x: &Tensor, stride: usize, neg_inf_pad: bool) -> Result<Vec<Tensor>> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
    // Padding 1 before, and enough after that every view has `stride · out` rows.
    let (after_h, after_w) = (stride * ho + 1 - h, stride * wo + 1 - w);
    let pad = |x: &Tensor, dim: usize, after: usize| -> Result<Tensor> {
        if !neg_inf_pad {
            return x.pad_with_zeros(dim, 1, after);
        }
        let mut dims = x.dims().to_vec();
        dims[dim] = 1;
        let lo = Tensor::full(f32::NEG_INFINITY, dims.clone(), x.device())?.to_dtype(x.dtype())?;
        dims[dim] = after;
        let hi = Tensor::full(f32::NEG_INFINITY, dims, x.device())?.to_dtype(x.dtype())?;
        Tensor::cat(&[&lo, x, &hi], dim)
    };
    let xp = pad(&pad(x, 2, after_h)?, 3, after_w)?;
    let mut views = Vec::with_capacity(9);
    for di in 0..3 {
        for dj in 0..3 {
            let v = xp.narrow(2, di, stride * ho)?.narrow(3, dj, stride * wo)?;
            views.push(if stride == 1 {
                v
            } else {
                v.reshape((b, c, ho, stride, wo, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((b, c, ho, wo))?
            });
        }
    }
    Ok(views)
}
