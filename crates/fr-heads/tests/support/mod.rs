//! Helpers shared by the integration tests: golden-file access and error measures.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use fr_heads::{build_head, HeadConfig, StepContext};
use serde_json::Value;

/// A golden file of tests/golden (`<name>.json`), parsed. Panics naming the file when it is
/// missing or malformed.
pub fn golden(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()))
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

/// What a head produced on a golden case.
pub struct Run {
    pub loss: f64,
    pub logits: Vec<f64>,
    pub grad_x: Vec<f64>,
    pub grad_w: Vec<f64>,
}

pub fn run(cfg: &HeadConfig, case: &Value, dtype: DType) -> Run {
    let inputs = &case["inputs"];
    let x0 = matrix(&inputs["x"], dtype);
    let w0 = matrix(&inputs["W"], dtype);
    let labels: Vec<u32> = flat(&inputs["labels"]).iter().map(|&l| l as u32).collect();
    let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    let (b, d) = x0.dims2().unwrap();
    let c = w0.dims()[0];
    assert_eq!((b, d, c), (8, 16, 10));

    let vm = VarMap::new();
    let mut head =
        build_head(cfg, d, c, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
    let w = vm.data().lock().unwrap()["weight"].clone();
    w.set(&w0).unwrap();
    let x = Var::from_tensor(&x0).unwrap();
    let out = head
        .forward(x.as_tensor(), &labels, &StepContext::train(0, 0))
        .unwrap();
    assert_eq!(out.loss.dtype(), dtype);
    let grads = out.loss.backward().unwrap();
    Run {
        loss: values(&out.loss)[0],
        logits: values(&out.logits),
        grad_x: values(grads.get(&x).unwrap()),
        grad_w: values(grads.get(&w).unwrap()),
    }
}

/// Compare one head against one golden file in f64 and f32; `loss_key` picks the reference
/// loss (`loss`, or `loss_without_p_clamp` from the diagnostics).
pub fn check(name: &str, cfg: HeadConfig, loss_key: &str) {
    let case = golden(name);
    let out = &case["outputs"];
    let want_loss = if loss_key == "loss" {
        num(&out["loss"])
    } else {
        num(&out["diagnostics"][loss_key])
    };
    let want = [
        ("logits", flat(&out["logits"])),
        ("grad_x", flat(&out["grad_x"])),
        ("grad_W", flat(&out["grad_W"])),
    ];

    let r = run(&cfg, &case, DType::F64);
    let loss_err = (r.loss - want_loss).abs() / want_loss.abs();
    let mut report = format!("{name} [{loss_key}] f64: loss {loss_err:.1e}");
    assert!(
        loss_err <= 1e-12,
        "{name}: f64 loss {} vs {want_loss}",
        r.loss
    );
    for ((what, w), got) in want.iter().zip([&r.logits, &r.grad_x, &r.grad_w]) {
        let e = max_err(got, w, 1e-3);
        report += &format!(", {what} {e:.1e}");
        assert!(e <= 1e-12, "{name}: f64 {what} error {e:e}");
    }

    let r = run(&cfg, &case, DType::F32);
    let loss_err = (r.loss - want_loss).abs() / want_loss.abs();
    report += &format!(" | f32: loss {loss_err:.1e}");
    assert!(
        loss_err <= 1e-5,
        "{name}: f32 loss {} vs {want_loss}",
        r.loss
    );
    for ((what, w), got) in want.iter().zip([&r.logits, &r.grad_x, &r.grad_w]) {
        let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
        let e = max_err(got, w, scale);
        report += &format!(", {what} {e:.1e}");
        assert!(e <= 1e-5, "{name}: f32 {what} error {e:e}");
    }
    eprintln!("{report}");
}
