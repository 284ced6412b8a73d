//! Finite-difference checks (f64) of the gradients training relies on.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::{IResNet, IResNetConfig};
use fr_train::SeededVarMap;

const EPS: f64 = 1e-6;

/// Deterministic pseudo-random values in [-1, 1).
fn pattern(shape: &[usize], seed: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| ((i as f64 * 12.9898 + seed * 78.233).sin() * 43758.5453).fract())
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Central difference of `loss` with respect to element `idx` (flat) of `var`.
fn finite_difference(var: &Var, idx: usize, loss: &dyn Fn() -> f64) -> f64 {
    let orig = var.as_tensor().copy().unwrap();
    let shape = orig.shape().clone();
    let bump = |delta: f64| {
        let mut v = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        v[idx] += delta;
        var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
            .unwrap();
        loss()
    };
    let g = (bump(EPS) - bump(-EPS)) / (2.0 * EPS);
    var.set(&orig).unwrap();
    g
}

fn rel_err(analytic: f64, numeric: f64) -> f64 {
    (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-3)
}

/// Regression pin: conv2d 3x3, stride 2, padding 1 on an even input needs `output_padding` in
/// the transposed convolution of its input gradient.
#[test]
fn conv2d_stride2_backward_matches_finite_differences() {
    for size in [8usize, 7] {
        let x = Var::from_tensor(&pattern(&[2, 3, size, size], 1.0)).unwrap();
        let w = Var::from_tensor(&pattern(&[4, 3, 3, 3], 2.0)).unwrap();
        let out = size.div_ceil(2);
        let r = pattern(&[2, 4, out, out], 3.0);
        let loss = || {
            let y = x.as_tensor().conv2d(w.as_tensor(), 1, 2, 1, 1).unwrap();
            (y * &r).unwrap().sum_all().unwrap()
        };
        let grads = loss().backward().unwrap();
        let mut max_err = 0f64;
        for (var, n) in [(&x, 2 * 3 * size * size), (&w, 4 * 3 * 9)] {
            let g = grads.get(var.as_tensor()).unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for (idx, &analytic) in g.iter().enumerate().take(n) {
                let numeric = finite_difference(var, idx, &|| scalar(&loss()));
                max_err = max_err.max(rel_err(analytic, numeric));
            }
        }
        println!("conv2d s2 p1 on {size}x{size}: max relative gradient error {max_err:.2e}");
        assert!(max_err < 1e-6, "size {size}: {max_err}");
    }
}

/// A tiny IResNet in training mode: one stride-2 conv weight and PReLU weights.
#[test]
fn iresnet_train_gradients_match_finite_differences() {
    let cfg = IResNetConfig {
        layers: [1, 1, 1, 1],
        widths: [3, 4, 5, 6],
        embedding_size: 5,
        input_size: 32,
        dropout: 0.0,
        kernels: Default::default(),
    };
    let varmap = VarMap::new();
    let net = IResNet::new(
        &cfg,
        SeededVarMap::with_varmap(varmap.clone(), 3).var_builder(DType::F64, &Device::Cpu),
    )
    .unwrap();
    let x = pattern(&[3, 3, 32, 32], 4.0);
    let r = pattern(&[3, 5], 5.0);
    let loss = || {
        (net.forward_t(&x, true).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss().backward().unwrap();
    let var = |name: &str| varmap.data().lock().unwrap()[name].clone();

    let mut report = Vec::new();
    // layer2.0.conv2: 3x3 stride 2 padding 1 on a 16x16 input; layer1.0.prelu; the stem PReLU.
    for (name, indices) in [
        ("layer2.0.conv2.weight", vec![0usize, 17, 40, 143]),
        ("layer1.0.prelu.weight", vec![0, 1, 2]),
        ("prelu.weight", vec![0, 1, 2]),
    ] {
        let v = var(name);
        let g = grads.get(v.as_tensor()).unwrap();
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut max_err = 0f64;
        for idx in indices {
            let numeric = finite_difference(&v, idx, &|| scalar(&loss()));
            assert!(g[idx].abs() > 1e-6, "{name}[{idx}]: vanishing gradient");
            max_err = max_err.max(rel_err(g[idx], numeric));
        }
        report.push(format!("{name} {max_err:.2e}"));
        assert!(max_err < 1e-5, "{name}: relative error {max_err}");
    }
    println!("max relative gradient error: {}", report.join(", "));
    // Running statistics and the fixed features.weight take no part in the gradient step.
    assert!(grads.get(var("bn1.running_mean").as_tensor()).is_none());
}
