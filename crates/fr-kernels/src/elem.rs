//! The element types the kernels run on (f32 for training, f64 for gradient checks), their
//! per-thread scratch buffers, and a strided GEMM on top of the `gemm` crate (the one candle's
//! own matmul uses).

use std::cell::RefCell;
use std::thread::LocalKey;

use candle_core::WithDType;

/// A float type the kernels support: `f32` or `f64`.
pub trait Elem: WithDType + Copy + Send + Sync + 'static {
    /// This thread's reusable scratch buffer for this type.
    fn scratch() -> &'static LocalKey<RefCell<Vec<Self>>>;

    /// `sqrt` in this type.
    fn sqrt(self) -> Self {
        Self::from_f64(self.to_f64().sqrt())
    }
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

impl Elem for f32 {
    fn scratch() -> &'static LocalKey<RefCell<Vec<Self>>> {
        &SCRATCH_F32
    }
}

impl Elem for f64 {
    fn scratch() -> &'static LocalKey<RefCell<Vec<Self>>> {
        &SCRATCH_F64
    }
}

/// Runs `f` on a scratch slice of `len` elements (contents unspecified) that is kept by this
/// thread between calls, so the large im2col buffers are not reallocated (and page-faulted in)
/// by every convolution. Falls back to a fresh allocation if the buffer is already in use on
/// this thread (re-entrant calls through rayon work stealing).
pub(crate) fn with_scratch<T: Elem, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    T::scratch().with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::zero());
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::zero(); len]),
    })
}

/// Splits the flat output `[g_0, g_1, …]` of a backward op into the gradients of its
/// arguments. Each part is `(arg, in_buffer)`: a block in the buffer has `arg`'s element count
/// and comes back with `arg`'s shape when `arg` records gradients; a block not in the buffer
/// takes no space and comes back `None`.
pub(crate) fn split_grads<const N: usize>(
    flat: &candle_core::Tensor,
    parts: [(&candle_core::Tensor, bool); N],
) -> candle_core::Result<[Option<candle_core::Tensor>; N]> {
    let mut out: [Option<candle_core::Tensor>; N] = std::array::from_fn(|_| None);
    let mut offset = 0;
    for (slot, (arg, in_buffer)) in out.iter_mut().zip(parts) {
        if !in_buffer {
            continue;
        }
        let n = arg.elem_count();
        if arg.track_op() {
            *slot = Some(flat.narrow(0, offset, n)?.reshape(arg.shape())?);
        }
        offset += n;
    }
    Ok(out)
}

/// A read-only strided matrix: element `(r, c)` is at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> MatRef<T> {
    /// Row-major matrix with `cols` columns starting at `data[0]`.
    pub fn rows(data: &[T], cols: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of the row-major matrix with `cols` columns starting at `data[0]`.
    pub fn rows_t(data: &[T], cols: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, `dst` row-major with `dst_cols` columns.
///
/// # Safety
/// `lhs` and `rhs` must address valid `m×k` and `k×n` matrices and `dst` must hold at least
/// `(m−1)·dst_cols + n` elements, none of them aliased by `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_cols: usize,
    accumulate: bool,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    threads: usize,
) {
    debug_assert!(m == 0 || n == 0 || dst.len() >= (m - 1) * dst_cols + n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_cols..r * dst_cols + n].fill(T::zero());
            }
        }
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // gemm computes dst = alpha·dst + beta·lhs·rhs, reading dst only when asked to.
    gemm::gemm(
        m,
        n,
        k,
        dst.as_mut_ptr(),
        1,
        dst_cols as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        T::one(),
        T::one(),
        false,
        false,
        false,
        parallelism,
    );
}

/// The contiguous elements of `layout` in `storage`.
///
/// # Errors
/// If the layout is strided (the public wrappers make their inputs contiguous first) or the
/// storage is not of type `T`.
pub(crate) fn slice<'a, T: Elem>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!(
            "{op}: expects contiguous inputs, got strides {:?}",
            layout.stride()
        ),
    }
}

/// Runs the body with `$t` bound to the element type of `$storage` (f32 or f64).
macro_rules! dispatch_float {
    ($op:expr, $storage:expr, $t:ident => $body:expr) => {{
        #[allow(unused_imports)]
        use candle_core::WithDType as _;
        #[allow(unused_imports)]
        use num_traits::{One as _, Zero as _};
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("{}: supports f32 and f64 tensors only", $op),
        }
    }};
}
pub(crate) use dispatch_float;

/// Independent partial sums of [`lane_sum`]: one AVX-512 register of f32.
const LANES: usize = 16;

/// `Σ_i f(a_i, b_i)` with [`LANES`] independent accumulators, so the loop vectorises (a plain
/// float reduction is a serial chain of adds). The order of additions is fixed: the result
/// is deterministic.
#[inline(always)]
pub(crate) fn lane_sum<T: Elem>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (qa, qb) in (&mut ca).zip(&mut cb) {
        for k in 0..LANES {
            acc[k] += f(qa[k], qb[k]);
        }
    }
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        acc[0] += f(*x, *y);
    }
    acc.iter().fold(T::zero(), |s, v| s + *v)
}

/// A vector of `len` elements with unspecified contents, for outputs that the caller writes
/// in full before anything reads them (as candle's own `alloc_uninit`): saves a memset pass
/// over every activation.
#[allow(clippy::uninit_vec)] // the same pattern as candle's `CpuDevice::alloc_uninit`
pub(crate) fn uninit_vec<T: Elem>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 and f64 have no invalid bit patterns, and every caller overwrites all
    // `len` elements before reading any of them.
    unsafe { v.set_len(len) };
    v
}
