//! Inference convolution with its eval-mode BatchNorm, PReLU and residual add fused into the
//! GEMM epilogue: `y = prelu(conv(x, W)·scale + shift) + residual`, one pass over the output
//! instead of four. Forward only (no autograd node): for embedding extraction inside
//! [`crate::no_grad`]. The layers of [`crate::nn`] derive `scale` and `shift` from the
//! BatchNorm's running statistics (`scale = γ/√(var + ε)`, `shift = β − mean·scale`).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::conv2d::{forward, ConvParams, Epilogue, Geom};
use crate::elem::{dispatch_float, slice, Elem};

/// Per-output-channel parameters, in f64 on the host.
struct ConvEvalOp {
    p: ConvParams,
    scale: Vec<f64>,
    shift: Vec<f64>,
    slope: Option<Vec<f64>>,
}

impl ConvEvalOp {
    fn run<T: Elem>(&self, g: &Geom, x: &[T], w: &[T], residual: Option<&[T]>) -> Vec<T> {
        let cast = |v: &[f64]| v.iter().map(|&a| T::from_f64(a)).collect::<Vec<T>>();
        let epi = Epilogue {
            scale: cast(&self.scale),
            shift: cast(&self.shift),
            slope: self.slope.as_deref().map(cast),
            residual,
        };
        forward(g, x, w, Some(&epi))
    }

    fn geom(&self, l1: &Layout, l2: &Layout) -> Result<Geom> {
        let g = Geom::new(l1.dims(), l2.dims(), self.p)?;
        let ok = |v: &[f64]| v.len() == g.cout;
        if !ok(&self.scale) || !ok(&self.shift) || !self.slope.as_deref().is_none_or(ok) {
            bail!(
                "conv2d_eval_fused: scale, shift and slope need {} values",
                g.cout
            );
        }
        Ok(g)
    }
}

impl CustomOp2 for ConvEvalOp {
    fn name(&self) -> &'static str {
        "fr-conv2d-eval"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geom(l1, l2)?;
        let name = CustomOp2::name(self);
        let out = dispatch_float!(name, s1, T => {
            let (x, w) = (slice::<T>(s1, l1, name)?, slice::<T>(s2, l2, name)?);
            T::to_cpu_storage_owned(self.run(&g, x, w, None))
        });
        Ok((out, (g.b, g.cout, g.ho, g.wo).into()))
    }
}

impl CustomOp3 for ConvEvalOp {
    fn name(&self) -> &'static str {
        "fr-conv2d-eval-residual"
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
        let g = self.geom(l1, l2)?;
        if l3.dims() != [g.b, g.cout, g.ho, g.wo] {
            bail!(
                "conv2d_eval_fused: residual {:?} does not match the output ({}, {}, {}, {})",
                l3.dims(),
                g.b,
                g.cout,
                g.ho,
                g.wo
            );
        }
        let out = dispatch_float!(CustomOp3::name(self), s1, T => {
            let name = CustomOp3::name(self);
            let (x, w) = (slice::<T>(s1, l1, name)?, slice::<T>(s2, l2, name)?);
            let r = slice::<T>(s3, l3, name)?;
            T::to_cpu_storage_owned(self.run(&g, x, w, Some(r)))
        });
        Ok((out, (g.b, g.cout, g.ho, g.wo).into()))
    }
}

/// Inference convolution with a fused epilogue:
/// `prelu(conv2d(x, weight)·scale + shift) + residual` for `x (B, Cin, H, W)` and
/// `weight (Cout, Cin/groups, kh, kw)`, with per-output-channel `scale`, `shift` and PReLU
/// `slope` (`Cout` values each; no PReLU when `None`) and an optional `residual` of the
/// output's shape `(B, Cout, Ho, Wo)`. No gradient flows through the result.
///
/// # Errors
/// Shape mismatches (including parameter lengths other than `Cout`), a non-CPU device or a
/// dtype other than f32 / f64.
pub fn conv2d_eval_fused(
    x: &Tensor,
    weight: &Tensor,
    params: ConvParams,
    scale: Vec<f64>,
    shift: Vec<f64>,
    slope: Option<Vec<f64>>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    Geom::new(x.dims(), weight.dims(), params)?;
    let op = ConvEvalOp {
        p: params,
        scale,
        shift,
        slope,
    };
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match residual {
        Some(r) => x.apply_op3_no_bwd(&w, &r.contiguous()?, &op),
        None => x.apply_op2_no_bwd(&w, &op),
    }
}
