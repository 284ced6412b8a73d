//! Helpers shared by the integration tests: golden-file access and error measures.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// A golden file of tests/golden, parsed (embedded at compile time).
pub fn golden(name: &str) -> Value {
    let text = match name {
        "softmax_ce" => include_str!("../golden/softmax_ce.json"),
        "insightface_cosface" => include_str!("../golden/insightface_cosface.json"),
        "facexzoo_am_softmax" => include_str!("../golden/facexzoo_am_softmax.json"),
        "insightface_arcface" => include_str!("../golden/insightface_arcface.json"),
        "arcface_classic" => include_str!("../golden/arcface_classic.json"),
        "facexzoo_arcface" => include_str!("../golden/facexzoo_arcface.json"),
        "curricularface" => include_str!("../golden/curricularface.json"),
        "vmf" => include_str!("../golden/vmf.json"),
        other => panic!("no golden file {other}"),
    };
    serde_json::from_str(text).expect("golden JSON")
}

/// A JSON number (or one of the strings "inf", "-inf", "nan").
pub fn num(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) => s.parse().unwrap(),
        other => panic!("not a number: {other}"),
    }
}

/// A JSON list of numbers, or a matrix flattened row-major.
pub fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(flat).collect(),
        other => vec![num(other)],
    }
}

/// A JSON matrix as a tensor of `dtype`.
pub fn matrix(v: &Value, dtype: DType) -> Tensor {
    let rows = v.as_array().unwrap().len();
    let data = flat(v);
    let cols = data.len() / rows;
    Tensor::from_vec(data, (rows, cols), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Values of a tensor as f64.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest `|a − b| / (|b| + floor)` over the entries: `≤ rtol` means
/// `|a − b| ≤ rtol·|b| + rtol·floor` everywhere.
pub fn max_err(got: &[f64], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter()
        .zip(want)
        .map(|(a, b)| {
            let e = (a - b).abs() / (b.abs() + floor);
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}
