//! QuantFace fake quantisation: the quantiser against the reference's golden values
//! (`tests/data/quantface.json`, produced by running fdbtrs/QuantFace's quant_utils.py /
//! quant_modules.py), model sizes, and fake-quantised backbones.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::quant::{
    backbone_size_bytes, fake_quantize_weight, quantize_per_channel, quantize_with_range,
    QuantFloat, Quantized,
};
use fr_backbone::{
    model_size_bytes, BackboneConfig, IResNet, MobileFaceNet, MobileFaceNetConfig, QuantAct,
    QuantBits,
};
use fr_kernels::Kernels;
use fr_train::SeededVarMap;
use serde_json::Value;

fn golden() -> Value {
    let text = std::fs::read_to_string(common::data("quantface.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        other => panic!("not a number: {other}"),
    }
}

/// Largest relative error of `got` against `want` (absolute where `want` is 0).
fn max_rel(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(f64::MIN_POSITIVE))
        .map(|r| if r.is_nan() { 0.0 } else { r })
        .fold(0.0, f64::max)
}

struct Check {
    tol: f64,
    worst: f64,
    values: usize,
}

impl Check {
    fn floats(&mut self, what: &str, got: &[f64], want: &Value) {
        let want = flat(want);
        let r = max_rel(what, got, &want);
        assert!(
            r <= self.tol,
            "{what}: relative error {r:e} > {:e}",
            self.tol
        );
        self.worst = self.worst.max(r);
        self.values += want.len();
    }

    fn codes(&mut self, what: &str, got: &[i64], want: &Value) {
        let want: Vec<i64> = flat(want).iter().map(|&v| v as i64).collect();
        assert_eq!(got, &want[..], "{what}: integer codes");
        self.values += want.len();
    }

    fn quantized<T: QuantFloat>(
        &mut self,
        what: &str,
        q: &Quantized<T>,
        want: &Value,
        range: bool,
    ) {
        let f = |v: &[T]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
        if range {
            self.floats(
                &format!("{what}.per_channel_min"),
                &f(&q.min),
                &want["per_channel_min"],
            );
            self.floats(
                &format!("{what}.per_channel_max"),
                &f(&q.max),
                &want["per_channel_max"],
            );
        }
        self.floats(&format!("{what}.scale"), &f(&q.scale), &want["scale"]);
        self.floats(
            &format!("{what}.zero_point"),
            &f(&q.zero_point),
            &want["zero_point"],
        );
        self.codes(&format!("{what}.codes"), &q.codes, &want["codes"]);
        self.floats(
            &format!("{what}.dequantized"),
            &f(&q.dequantized),
            &want["dequantized"],
        );
    }
}

fn run_dtype<T: QuantFloat>(g: &Value, dtype: &str, tol: f64) -> Check {
    let inputs = &g["inputs"][dtype];
    let outputs = &g["outputs"][dtype];
    let conv: Vec<T> = flat(&inputs["conv_weight"])
        .into_iter()
        .map(T::from_f64)
        .collect();
    let linear: Vec<T> = flat(&inputs["linear_weight"])
        .into_iter()
        .map(T::from_f64)
        .collect();
    let act: Vec<T> = flat(&inputs["activation"])
        .into_iter()
        .map(T::from_f64)
        .collect();
    let mut c = Check {
        tol,
        worst: 0.0,
        values: 0,
    };
    for bits in [8u32, 6] {
        let q = quantize_per_channel(bits, &linear, 8).unwrap();
        c.quantized(
            &format!("{dtype} linear_w{bits}"),
            &q,
            &outputs[format!("linear_w{bits}")],
            true,
        );
        let q = quantize_per_channel(bits, &conv, 4).unwrap();
        c.quantized(
            &format!("{dtype} conv_w{bits}"),
            &q,
            &outputs[format!("conv_w{bits}")],
            true,
        );
        let want = &outputs[format!("act_given_range_a{bits}")];
        let (lo, hi) = (want["lo"].as_f64().unwrap(), want["hi"].as_f64().unwrap());
        let q = quantize_with_range(bits, &act, T::from_f64(lo), T::from_f64(hi)).unwrap();
        c.quantized(&format!("{dtype} act_given_range_a{bits}"), &q, want, false);
    }
    c
}

#[test]
fn quantiser_matches_the_reference_golden_values() {
    let g = golden();
    // f32 is the reference's precision: every value within 1e-6 relative, codes exact.
    let c32 = run_dtype::<f32>(&g, "float32", 1e-6);
    // f64 results of the same formula.
    let c64 = run_dtype::<f64>(&g, "float64", 1e-12);
    println!(
        "golden: f32 {} values, worst relative error {:e}; f64 {} values, worst {:e}",
        c32.values, c32.worst, c64.values, c64.worst
    );
    assert!(c32.values > 1000 && c64.values > 1000);
}

#[test]
fn quant_act_module_matches_the_reference() {
    let g = golden();
    for (dtype, dt, tol) in [
        ("float32", DType::F32, 1e-6),
        ("float64", DType::F64, 1e-12),
    ] {
        let x = Tensor::from_vec(
            flat(&g["inputs"][dtype]["activation"]),
            (2, 3, 4, 4),
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(dt)
        .unwrap();
        for bits in [8u32, 6] {
            let want = &g["outputs"][dtype][format!("act_quantact_module_a{bits}")];
            let act = QuantAct::new(bits, 300);
            let y = act.forward_t(&x, true).unwrap();
            let r = act.range();
            assert_eq!(
                r.min,
                want["state_after"]["x_min"].as_f64().unwrap(),
                "{dtype} a{bits}"
            );
            assert_eq!(
                r.max,
                want["state_after"]["x_max"].as_f64().unwrap(),
                "{dtype} a{bits}"
            );
            let got: Vec<f64> = y
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let e = max_rel("quantact", &got, &flat(&want["dequantized"]));
            assert!(e <= tol, "{dtype} a{bits}: {e:e}");
        }
    }
}

#[test]
fn quant_act_range_freezes_and_is_fixed_in_eval() {
    let act = QuantAct::new(8, 2);
    let t = |v: f32| Tensor::from_vec(vec![-v, v], 2, &Device::Cpu).unwrap();
    act.forward_t(&t(1.0), false).unwrap();
    assert_eq!(
        act.range().updates,
        0,
        "evaluation does not update the range"
    );
    act.forward_t(&t(1.0), true).unwrap();
    act.forward_t(&t(2.0), true).unwrap();
    act.forward_t(&t(5.0), true).unwrap();
    let r = act.range();
    assert_eq!((r.min, r.max, r.updates), (-2.0, 2.0, 2));
    // Outside the frozen range, values saturate at the extreme codes.
    let y: Vec<f32> = act.forward_t(&t(5.0), true).unwrap().to_vec1().unwrap();
    assert!(
        (y[1] - 2.0).abs() < 0.02 && (y[0] + 2.0).abs() < 0.02,
        "{y:?}"
    );
}

#[test]
fn straight_through_gradient_is_the_identity() {
    let w = candle_core::Var::randn(0f32, 1f32, (4, 3, 3, 3), &Device::Cpu).unwrap();
    let q = fake_quantize_weight(w.as_tensor(), 6).unwrap();
    let coef = Tensor::randn(0f32, 1f32, (4, 3, 3, 3), &Device::Cpu).unwrap();
    let grads = (&q * &coef).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(w.as_tensor()).unwrap();
    let d = (g - &coef)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    // At most 2^6 distinct values per output channel.
    let v: Vec<f32> = q.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut distinct = v.clone();
    distinct.sort_by(f32::total_cmp);
    distinct.dedup();
    assert!(distinct.len() <= 64);
}

#[test]
fn model_sizes_at_k_bits() {
    assert_eq!(model_size_bytes(1000, 32), 4000);
    assert_eq!(model_size_bytes(1000, 8), 1000);
    assert_eq!(model_size_bytes(1001, 6), 751); // 6006 bits → 750.75 bytes, rounded up
                                                // QuantFace's ResNet-100: 65.16 M parameters, 260.6 MB at 32 bits, 65.2 / 48.9 MB at 8 / 6.
    let r100 = BackboneConfig::named("r100").unwrap();
    let mb = |bits| backbone_size_bytes(&r100, bits).unwrap() as f64 / 1e6;
    assert!((mb(32) - 260.6).abs() < 0.1, "{}", mb(32));
    assert!((mb(8) - 65.16).abs() < 0.01, "{}", mb(8));
    assert!((mb(6) - 48.87).abs() < 0.01, "{}", mb(6));
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn norm(a: &Tensor) -> f32 {
    a.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `(n, 3, s, s)` images, uniform in [-1, 1) from a fixed linear congruential generator
/// (deterministic, unlike `Tensor::randn`).
fn pseudo_random_images(n: usize, s: usize, seed: u64) -> Tensor {
    let mut state = seed;
    let v: Vec<f32> = (0..n * 3 * s * s)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (n, 3, s, s), &Device::Cpu).unwrap()
}

#[test]
fn quantised_iresnet_tiny_is_close_to_float_and_trains_via_ste() {
    let cfg = common::tiny_config();
    let varmap = VarMap::new();
    let vb = SeededVarMap::with_varmap(varmap.clone(), 11).var_builder(DType::F32, &Device::Cpu);
    let net = IResNet::new(&cfg, vb).unwrap();
    let x = pseudo_random_images(8, 112, 7);
    // BatchNorm running statistics settled on the input (momentum 0.1), so that evaluation
    // mode sees the activations the quantisers are calibrated on.
    for _ in 0..40 {
        fr_kernels::no_grad(|| net.forward_t(&x, true)).unwrap();
    }
    // One training forward calibrates the activation ranges (and moves the shared running
    // statistics a little, so the float output is taken after it); then evaluation mode.
    let calibrated = |bits: QuantBits| {
        let q = net.clone().quantize(bits).unwrap();
        fr_kernels::no_grad(|| q.forward_t(&x, true)).unwrap();
        let fp = fr_kernels::no_grad(|| net.forward_t(&x, false)).unwrap();
        (fp, fr_kernels::no_grad(|| q.forward_t(&x, false)).unwrap())
    };
    let mut errs = Vec::new();
    for bits in [QuantBits::w8a8(), QuantBits::w6a6()] {
        let (fp, y) = calibrated(bits);
        assert_eq!(y.dims(), fp.dims());
        errs.push(norm(&(&y - &fp).unwrap()) / norm(&fp));
    }
    println!(
        "IResNet-tiny relative L2 error: w8a8 {:.4}, w6a6 {:.4}",
        errs[0], errs[1]
    );
    assert!(errs[0] < 0.1, "w8a8 relative error {}", errs[0]);
    assert!(
        errs[1] < 0.4 && errs[1] > errs[0],
        "w6a6 {} vs w8a8 {}",
        errs[1],
        errs[0]
    );
    // Weights only at 8 bits: the activations untouched.
    let (fp, y8) = calibrated(QuantBits {
        activation: 16,
        ..QuantBits::w8a8()
    });
    let e8 = norm(&(&y8 - &fp).unwrap()) / norm(&fp);
    println!(
        "IResNet-tiny w8a16 relative L2 error {e8:.5}, max abs {}",
        max_abs(&y8, &fp)
    );
    assert!(e8 < 0.05 && e8 < errs[0], "{e8}");

    // Gradients reach every trainable parameter through the fake quantisers.
    let q = net.clone().quantize(QuantBits::w8a8()).unwrap();
    let y = q.forward_t(&x, true).unwrap();
    let target = Tensor::randn(0f32, 1f32, y.dims(), &Device::Cpu).unwrap();
    let grads = (&y * &target)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if !IResNet::is_trainable(name) {
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = norm(g);
        assert!(n.is_finite() && n > 0.0, "{name}: |grad| = {n}");
    }
}

#[test]
fn quantised_mobilefacenet_runs_and_trains() {
    let cfg = MobileFaceNetConfig {
        blocks: [2, 1, 1, 1],
        scale: 1,
        embedding_size: 16,
        input_size: 32,
        kernels: Kernels::Auto,
    };
    let varmap = VarMap::new();
    let vb = SeededVarMap::with_varmap(varmap.clone(), 5).var_builder(DType::F32, &Device::Cpu);
    let net = MobileFaceNet::new(&cfg, vb).unwrap();
    let x = pseudo_random_images(8, 32, 3);
    for _ in 0..40 {
        fr_kernels::no_grad(|| net.forward_t(&x, true)).unwrap();
    }
    let q = net.clone().quantize(QuantBits::w8a8()).unwrap();
    let y = q.forward_t(&x, true).unwrap();
    let fp = fr_kernels::no_grad(|| net.forward_t(&x, false)).unwrap();
    let target = Tensor::randn(0f32, 1f32, y.dims(), &Device::Cpu).unwrap();
    let grads = (&y * &target)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        if !MobileFaceNet::is_trainable(name) {
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(norm(g) > 0.0, "{name}");
    }
    // Second forward: ranges already calibrated on this batch; eval-mode BatchNorm.
    let yq = fr_kernels::no_grad(|| q.forward_t(&x, false)).unwrap();
    let e = norm(&(&yq - &fp).unwrap()) / norm(&fp);
    println!("MobileFaceNet (small) w8a8 relative L2 error {e:.4}");
    assert!(e < 0.1, "{e}");
    assert_eq!(yq.dims(), &[8, 16]);
    assert!(QuantBits {
        weight: 1,
        ..QuantBits::w8a8()
    }
    .validate()
    .is_err());
}
