//! Test helpers: a central finite-difference gradient check and seeded random tensors.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Result;

/// Largest `|numeric − analytic| / (1 + |numeric|)` over the entries of `x0` (f64) for the
/// scalar function `f`, with central differences of step 1e-6.
pub fn fd_check(x0: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
    let var = Var::from_tensor(x0)?;
    let grads = f(var.as_tensor())?.backward()?;
    let g: Vec<f64> = match grads.get(&var) {
        Some(g) => g.flatten_all()?.to_vec1()?,
        None => vec![0.0; x0.elem_count()],
    };
    let base: Vec<f64> = x0.flatten_all()?.to_vec1()?;
    let h = 1e-6;
    let mut worst = 0f64;
    for k in 0..base.len() {
        let eval = |delta: f64| -> Result<f64> {
            let mut v = base.clone();
            v[k] += delta;
            let t = Tensor::from_vec(v, x0.shape(), x0.device())?;
            Ok(f(&t)?.to_scalar::<f64>()?)
        };
        let num = (eval(h)? - eval(-h)?) / (2.0 * h);
        worst = worst.max((num - g[k]).abs() / (1.0 + num.abs()));
    }
    Ok(worst)
}

/// f64 tensor of `shape` with entries uniform in `[0, 1)`, from a ChaCha8 generator.
pub fn rand_tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>()).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}
