//! Shared helpers: seeded random tensors, finite differences, closeness.

#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Uniform(−1, 1) tensor of `dtype` from `seed`.
pub fn rand(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Largest |a − b| / (1 + |b|).
pub fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max)
}

/// `loss = Σ f(inputs) · r` for a fixed random `r`, and the gradient of each input.
pub fn grads(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    seed: u64,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let r = rand(y.dims(), y.dtype(), seed);
    let loss = (&y * &r).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let gs = vars
        .iter()
        .map(|v| g.get(v.as_tensor()).expect("no gradient").clone())
        .collect();
    (y, gs)
}

/// Checks analytic gradients (f64) against central differences of `Σ f(inputs) · r` on up to
/// `probes` coordinates of each input; returns the largest absolute error.
pub fn finite_difference_error(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    probes: usize,
    seed: u64,
) -> f64 {
    let (y, analytic) = grads(inputs, f, seed);
    let r = rand(y.dims(), DType::F64, seed);
    let loss = |ts: &[Tensor]| -> f64 {
        (f(ts).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-6;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut worst = 0f64;
    for (i, input) in inputs.iter().enumerate() {
        let base = input.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let ga = analytic[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for _ in 0..probes.min(base.len()) {
            let k = rng.random_range(0..base.len());
            let shifted = |d: f64| {
                let mut v = base.clone();
                v[k] += d;
                let mut ts = inputs.to_vec();
                ts[i] = Tensor::from_vec(v, input.dims(), &Device::Cpu).unwrap();
                loss(&ts)
            };
            let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
            worst = worst.max((numeric - ga[k]).abs() / (1.0 + numeric.abs()));
        }
    }
    worst
}
