//! Global gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_`: the L2 norm over all
//! gradients together; when it exceeds `max_norm` every gradient is scaled by
//! `max_norm/(norm + 1e-6)`. Reference trainers clip at 5.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::Result;

/// Sum of squares of one gradient, accumulated in f64 (f32 for the half types first).
fn sum_sq(g: &Tensor) -> Result<f64> {
    let g = match g.dtype() {
        DType::F16 | DType::BF16 => g.to_dtype(DType::F32)?,
        _ => g.clone(),
    };
    Ok(g.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// The global L2 norm of the gradients of `vars` (those without a gradient count as zero).
/// Non-finite when any gradient is.
///
/// # Errors
/// Candle errors.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut total = 0.0;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += sum_sq(g)?;
        }
    }
    Ok(total.sqrt())
}

/// Multiply the gradients of `vars` by `factor`.
///
/// # Errors
/// Candle errors.
pub fn scale_grads(grads: &mut GradStore, vars: &[Var], factor: f64) -> Result<()> {
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let scaled = g.affine(factor, 0.0)?.detach();
            grads.insert(v.as_tensor(), scaled);
        }
    }
    Ok(())
}

/// Clip the gradients of `vars` to a global L2 norm of `max_norm`; returns the norm before
/// clipping. A non-finite norm is returned without touching the gradients (skip the step).
///
/// # Errors
/// Candle errors.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    if norm.is_finite() && norm > max_norm {
        scale_grads(grads, vars, max_norm / (norm + 1e-6))?;
    }
    Ok(norm)
}

/// Whether every gradient of `vars` is finite (no NaN, no ±inf).
///
/// # Errors
/// Candle errors.
pub fn all_finite(grads: &GradStore, vars: &[Var]) -> Result<bool> {
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            // A sum is non-finite iff some element is (or it overflows, which is as bad).
            let s = g
                .to_dtype(DType::F64)?
                .abs()?
                .sum_all()?
                .to_scalar::<f64>()?;
            if !s.is_finite() {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn setup() -> (Var, Var, GradStore) {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let b = Var::new(&[[1.0f32]], &dev).unwrap();
        // Gradients (3, 0) and (4): total norm 5.
        let ca = Tensor::new(&[3.0f32, 0.0], &dev).unwrap();
        let loss = ((a.as_tensor() * ca).unwrap().sum_all().unwrap()
            + b.as_tensor().affine(4.0, 0.0).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        (a, b, grads)
    }

    #[test]
    fn clips_to_max_norm_like_pytorch() {
        let (a, b, mut grads) = setup();
        let vars = [a.clone(), b.clone()];
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let ga: Vec<f32> = grads.get(a.as_tensor()).unwrap().to_vec1().unwrap();
        let coef = 1.0 / (5.0 + 1e-6);
        assert!((ga[0] as f64 - 3.0 * coef).abs() < 1e-6 && ga[1] == 0.0);
        assert!((grad_norm(&grads, &vars).unwrap() - 1.0).abs() < 1e-5);
        // Below the threshold: untouched.
        let norm = clip_grad_norm(&mut grads, &vars, 5.0).unwrap();
        assert!((norm - 1.0).abs() < 1e-5);
        let again: Vec<f32> = grads.get(a.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(ga, again);
    }

    #[test]
    fn detects_non_finite() {
        let (a, b, mut grads) = setup();
        let vars = [a.clone(), b.clone()];
        assert!(all_finite(&grads, &vars).unwrap());
        let nan = Tensor::new(&[f32::NAN, 0.0], &Device::Cpu).unwrap();
        grads.insert(a.as_tensor(), nan);
        assert!(!all_finite(&grads, &vars).unwrap());
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!(norm.is_nan());
        let inf = Tensor::new(&[[f32::INFINITY]], &Device::Cpu).unwrap();
        grads.insert(b.as_tensor(), inf);
        assert!(!all_finite(&grads, &[b]).unwrap());
    }
}
