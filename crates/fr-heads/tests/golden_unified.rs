mod support;

// Golden tests and properties of the unified-threshold heads (UniFace UCE, UniTSFace USS),
// against tests/golden/uniface_uce.json and tests/golden/unitsface_uss.json (B = 8, D = 16,
// C = 10, float64 references).
//
// Tolerances as in tests/golden.rs: f64 within 1e-12 relative (floor 1e-3), f32 within 1e-5 of
// each quantity's largest magnitude. Quantities the reference keeps in float32 (UniTSFace's
// bias gradient and memory) are compared at float32 resolution (2e-7 relative).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use fr_heads::uniface::UniFaceConfig;
use fr_heads::unitsface::UniTsFaceConfig;
use fr_heads::{build_head, HeadConfig, StepContext};
use serde_json::Value;
use support::{flat, golden, matrix, max_err, num, values};

/// Compare `got` with `want` at the f64 or f32 tolerance; returns the error for the report.
fn close(what: &str, got: &[f64], want: &[f64], dtype: DType) -> f64 {
    let (e, tol) = if dtype == DType::F64 {
        (max_err(got, want, 1e-3), 1e-12)
    } else {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        (max_err(got, want, scale), 1e-5)
    };
    assert!(e <= tol, "{what} {dtype:?}: error {e:e}");
    e
}

fn labels_of(case: &Value) -> Tensor {
    let labels: Vec<u32> = flat(&case["inputs"]["labels"])
        .iter()
        .map(|&l| l as u32)
        .collect();
    Tensor::new(labels.as_slice(), &Device::Cpu).unwrap()
}

fn var(vm: &VarMap, name: &str) -> Var {
    vm.data().lock().unwrap()[name].clone()
}

struct UniOut {
    loss: f64,
    logits: Vec<f64>,
    grad_x: Vec<f64>,
    grad_w: Vec<f64>,
    grad_bias: f64,
    bias_after: f64,
}

fn run_uniface(cfg: UniFaceConfig, dtype: DType) -> UniOut {
    let case = golden("uniface_uce");
    let x0 = matrix(&case["inputs"]["x"], dtype);
    let w0 = matrix(&case["inputs"]["W"], dtype);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let mut head = build_head(&HeadConfig::UniFace(cfg), 16, 10, vb).unwrap();
    var(&vm, "weight").set(&w0).unwrap();
    let x = Var::from_tensor(&x0).unwrap();
    let out = head
        .forward(x.as_tensor(), &labels_of(&case), &StepContext::train(0, 0))
        .unwrap();
    let grads = out.loss.backward().unwrap();
    let (w, b) = (var(&vm, "weight"), var(&vm, "bias"));
    UniOut {
        loss: values(&out.loss)[0],
        logits: values(&out.logits),
        grad_x: values(grads.get(&x).unwrap()),
        grad_w: values(grads.get(&w).unwrap()),
        grad_bias: values(grads.get(&b).unwrap())[0],
        bias_after: values(b.as_tensor())[0],
    }
}

/// The reference (logits clamped to [−s, s]): loss, logits, dL/dx, dL/dW, dL/db, bias init.
#[test]
fn uniface_matches_reference() {
    let case = golden("uniface_uce");
    let out = &case["outputs"];
    let settings = &case["settings"];
    assert_eq!(
        fr_heads::uniface::UniFace::bias_init(10, num(&settings["r"])),
        num(&settings["bias_init"])
    );
    let mut report = String::from("uniface_uce:");
    for dtype in [DType::F64, DType::F32] {
        let r = run_uniface(UniFaceConfig::reference(), dtype);
        let e = [
            close("loss", &[r.loss], &[num(&out["loss"])], dtype),
            close("logits", &r.logits, &flat(&out["logits"]), dtype),
            close("grad_x", &r.grad_x, &flat(&out["grad_x"]), dtype),
            close("grad_W", &r.grad_w, &flat(&out["grad_W"]), dtype),
            close(
                "grad_bias",
                &[r.grad_bias],
                &[num(&out["grad_bias"])],
                dtype,
            ),
            close(
                "bias",
                &[r.bias_after],
                &[num(&out["state_after"]["bias"])],
                dtype,
            ),
        ];
        report += &format!(" {dtype:?} {:?}", e.map(|v| format!("{v:.1e}")));
    }
    eprintln!("{report}");
}

/// The default (unclamped softplus) differs from the reference only where a logit leaves
/// [−s, s]; its loss equals a host evaluation of the unclamped formula on the golden logits.
#[test]
fn uniface_unclamped_default_matches_host_formula() {
    let case = golden("uniface_uce");
    let logits = flat(&case["outputs"]["logits"]);
    let labels = flat(&case["inputs"]["labels"]);
    let sp = |z: f64| z.max(0.0) + (-z.abs()).exp().ln_1p();
    let mut want = 0.0;
    let mut outside = 0;
    for (i, &y) in labels.iter().enumerate() {
        for j in 0..10 {
            let z = logits[i * 10 + j];
            outside += usize::from(z.abs() > 64.0);
            want += if j == y as usize { sp(-z) } else { sp(z) };
        }
    }
    want /= 8.0;
    assert!(outside > 0, "the case must exercise the clamp");
    let r = run_uniface(UniFaceConfig::default(), DType::F64);
    assert!(
        (r.loss - want).abs() <= 1e-12 * want,
        "{} vs {want}",
        r.loss
    );
    assert!(r.loss > num(&case["outputs"]["loss"]) + 1.0);
    close("logits", &r.logits, &logits, DType::F64);
}

/// USS alone (`cosface_weight = 0`, epoch 1), memory = W, all slots filled, bias 0 and not yet
/// initialised: the bias is initialised from the batch (rounded to f32), then loss, USS
/// logits, dL/dx, dL/db; afterwards the memory holds each class's last sample.
#[test]
fn unitsface_uss_matches_reference() {
    let case = golden("unitsface_uss");
    let out = &case["outputs"];
    assert_eq!(num(&case["settings"]["bias_before"]), 0.0);
    let mut report = String::from("unitsface_uss:");
    for dtype in [DType::F64, DType::F32] {
        let x0 = matrix(&case["inputs"]["x"], dtype);
        let w0 = matrix(&case["inputs"]["W"], dtype);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
        let cfg = UniTsFaceConfig {
            cosface_weight: 0.0,
            ..UniTsFaceConfig::reference()
        };
        let mut head = build_head(&HeadConfig::UniTsFace(cfg), 16, 10, vb).unwrap();
        let state = BTreeMap::from([
            ("memory".to_string(), w0),
            (
                "filled".to_string(),
                Tensor::ones(10, DType::U8, &Device::Cpu).unwrap(),
            ),
            (
                "bias_initialized".to_string(),
                Tensor::new(0u8, &Device::Cpu).unwrap(),
            ),
        ]);
        head.load_state(&state).unwrap();
        let x = Var::from_tensor(&x0).unwrap();
        let r = head
            .forward(x.as_tensor(), &labels_of(&case), &StepContext::train(0, 1))
            .unwrap();
        let b = var(&vm, "bias");
        let grads = r.loss.backward().unwrap();
        let grad_bias = values(grads.get(&b).unwrap())[0];
        let bias_after = values(b.as_tensor())[0];
        let mut e = vec![
            close("loss", &values(&r.loss), &[num(&out["loss"])], dtype),
            close("logits", &values(&r.logits), &flat(&out["logits"]), dtype),
            close(
                "grad_x",
                &values(grads.get(&x).unwrap()),
                &flat(&out["grad_x"]),
                dtype,
            ),
        ];
        // The reference's bias and its gradient are float32 values.
        let want_b = num(&out["state_after"]["bias"]);
        let want_gb = num(&out["grad_bias"]);
        let eb = (bias_after - want_b).abs() / want_b.abs();
        let egb = (grad_bias - want_gb).abs() / want_gb.abs();
        let tol = if dtype == DType::F64 { 2e-7 } else { 1e-5 };
        assert!(
            eb <= tol && egb <= tol,
            "{dtype:?}: bias {eb:e}, grad {egb:e}"
        );
        if dtype == DType::F64 {
            assert_eq!(bias_after, want_b, "f64: the f32-rounded init is exact");
        }
        let state = head.state().unwrap();
        let mem = values(&state.iter().find(|(k, _)| k == "memory").unwrap().1);
        let want_mem = flat(&out["state_after"]["feat_mem"]);
        let emem = max_err(&mem, &want_mem, 1e-3);
        assert!(emem <= 2e-7, "{dtype:?}: feat_mem {emem:e}");
        e.extend([eb, egb, emem]);
        let e: Vec<String> = e.iter().map(|v| format!("{v:.1e}")).collect();
        report += &format!(" {dtype:?} {e:?}");
    }
    eprintln!("{report}");
}

/// UniTSFace over two epochs with extreme embeddings (antiparallel, 1e-6 and 1e4 norms): the
/// bias gets a zero gradient before the USS start epoch, a non-zero one after, and the loss and
/// gradients stay finite once the memory holds those embeddings.
#[test]
fn unitsface_two_epochs_stay_finite() {
    let dev = Device::Cpu;
    let w: Vec<f64> = (0..40)
        .map(|i| ((i * 37 % 17) as f64 - 8.0) / 10.0)
        .collect();
    let w = Tensor::from_vec(w, (5, 8), &dev).unwrap();
    let y = [0u32, 1, 2, 1, 3, 4];
    let rows: Vec<Tensor> = y
        .iter()
        .zip([3.0, -2.0, 40.0, -0.05, 1e-6, 1e4])
        .map(|(&l, f)| (w.get(l as usize).unwrap() * f).unwrap())
        .collect();
    let labels = Tensor::new(&y, &dev).unwrap();
    for dtype in [DType::F64, DType::F32] {
        let x0 = Tensor::stack(&rows, 0).unwrap().to_dtype(dtype).unwrap();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dtype, &dev);
        let cfg = HeadConfig::default_for("unitsface").unwrap();
        let mut head = build_head(&cfg, 8, 5, vb).unwrap();
        for epoch in [0, 1, 1] {
            let x = Var::from_tensor(&x0).unwrap();
            let out = head
                .forward(x.as_tensor(), &labels, &StepContext::train(0, epoch))
                .unwrap();
            let grads = out.loss.backward().unwrap();
            let gb = values(grads.get(&var(&vm, "bias")).unwrap())[0];
            assert!(values(&out.loss)[0].is_finite(), "{dtype:?} {epoch}");
            assert!(values(grads.get(&x).unwrap()).iter().all(|v| v.is_finite()));
            assert!(out.stats.values().all(|v| v.is_finite()), "{:?}", out.stats);
            if epoch == 0 {
                assert_eq!(gb, 0.0);
            } else {
                assert!(gb.is_finite() && gb != 0.0, "{dtype:?}: bias gradient {gb}");
                assert!(out.stats["bias"] > 0.0 && out.stats["uss_loss"] > 0.0);
            }
        }
    }
}
