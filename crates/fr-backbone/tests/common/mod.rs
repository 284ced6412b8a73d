//! Shared by the integration tests: the tiny IResNet fixture (made with PyTorch from
//! insightface's iresnet.py, copied from the shared fixtures) and its expected output.

#![allow(dead_code)] // each test file uses a subset

use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use fr_backbone::IResNetConfig;

pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

pub fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(data("iresnet_tiny.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The architecture the fixture's `architecture` field describes.
pub fn tiny_config() -> IResNetConfig {
    let arch = fixture()["architecture"].as_str().unwrap().to_string();
    assert!(arch.contains("layers [1,2,1,1], widths [8,16,16,32], input 3x112x112, embedding 16"));
    IResNetConfig {
        layers: [1, 2, 1, 1],
        widths: [8, 16, 16, 32],
        embedding_size: 16,
        input_size: 112,
        dropout: 0.0,
        kernels: Default::default(),
    }
}

/// `sin(37 * linspace(-1, 1, 2*3*112*112))` in f32, with torch's two-sided linspace.
pub fn fixture_input() -> Tensor {
    let n = 2 * 3 * 112 * 112;
    let step = 2.0f32 / (n - 1) as f32;
    let values: Vec<f32> = (0..n)
        .map(|i| {
            let t = if i < n / 2 {
                -1.0 + step * i as f32
            } else {
                1.0 - step * (n - 1 - i) as f32
            };
            (37.0f32 * t).sin()
        })
        .collect();
    Tensor::from_vec(values, (2, 3, 112, 112), &Device::Cpu).unwrap()
}

pub fn max_abs_diff_to_pytorch(out: &Tensor) -> f32 {
    let expected: Vec<Vec<f32>> =
        serde_json::from_value(fixture()["output_eval_mode"].clone()).unwrap();
    let got = out.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(got.len(), expected.len());
    let mut max = 0f32;
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g.len(), e.len());
        for (a, b) in g.iter().zip(e) {
            max = max.max((a - b).abs());
        }
    }
    max
}

/// Asserts that every variable of `varmap` that `is_trainable` accepts has a finite, non-zero
/// gradient in `grads`, and that every other one is a BatchNorm running statistic; returns the
/// number of trainable tensors checked.
pub fn assert_trainable_gradients(
    varmap: &VarMap,
    grads: &GradStore,
    is_trainable: impl Fn(&str) -> bool,
) -> usize {
    let data = varmap.data().lock().unwrap();
    let mut trained = 0;
    for (name, var) in data.iter() {
        if !is_trainable(name) {
            assert!(name.contains("running_"), "{name}");
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{name}: |grad|² = {norm}");
        trained += 1;
    }
    trained
}

/// Asserts, for each `(a, b, what)`, that the largest `|a_i − b_i|` is below `tol` (the fused
/// CPU kernels against candle's reference path).
pub fn assert_max_abs_diff_below(pairs: &[(&[f64], &[f64], &str)], tol: f64) {
    for (a, b, what) in pairs {
        assert_eq!(a.len(), b.len(), "{what}: length");
        let d = a
            .iter()
            .zip(b.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(d < tol, "{what}: max difference {d}");
    }
}
