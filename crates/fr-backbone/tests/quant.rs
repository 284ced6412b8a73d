//! QuantFace fake quantisation: the quantiser against the reference's golden values
//! (`tests/data/quantface.json`, produced by running fdbtrs/QuantFace's quant_utils.py /
//! quant_modules.py), model sizes, and fake-quantised backbones.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::quant::{
    backbone_size_bytes, dequantize, fake_quantize_prelu_slopes, fake_quantize_range,
    fake_quantize_weight, quant_params, quantize, quantize_per_channel, quantize_with_range,
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

// ---------------------------------------------------------------------------------------------
// PReLU slopes (QuantFace's `QuantActPreLu`): one range over the slope vector, activation bits.
// ---------------------------------------------------------------------------------------------

/// Slopes `(C,)` that differ per channel (and per layer through `layer`), in about [0.05, 0.45].
fn distinct_slopes(c: usize, layer: usize) -> Vec<f64> {
    (0..c)
        .map(|i| 0.25 + 0.2 * (1.7 * i as f64 + 0.9 * layer as f64).sin())
        .collect()
}

/// The quantised slopes by the scalar functions of `quant`: one range `[min, max]` over the
/// vector; checks that the extremes get the extreme codes.
fn hand_quantised_slopes(slopes: &[f64], bits: u32) -> Vec<f64> {
    let lo = slopes.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = slopes.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let (s, z) = quant_params(bits, lo, hi);
    let half = 1i64 << (bits - 1);
    let codes: Vec<i64> = slopes.iter().map(|&a| quantize(bits, a, s, z)).collect();
    assert_eq!(
        *codes.iter().min().unwrap(),
        -half,
        "the minimum gets the lowest code"
    );
    assert_eq!(
        *codes.iter().max().unwrap(),
        half - 1,
        "the maximum the highest"
    );
    codes.iter().map(|&q| dequantize(q, s, z)).collect()
}

#[test]
fn prelu_slopes_use_one_range_over_the_vector_and_a_straight_through_gradient() {
    for bits in [8u32, 6, 4] {
        let slopes = distinct_slopes(13, bits as usize);
        let want = hand_quantised_slopes(&slopes, bits);
        // f64: bit-exact against the scalar functions.
        let a = candle_core::Var::from_vec(slopes.clone(), 13, &Device::Cpu).unwrap();
        let q = fake_quantize_prelu_slopes(a.as_tensor(), bits).unwrap();
        assert_eq!(q.to_vec1::<f64>().unwrap(), want, "{bits} bits");
        // At most 2^bits distinct values; not per-channel ranges (those would reproduce the
        // slopes exactly, one value per channel).
        assert_ne!(want, slopes);
        // Straight-through: d(Σ c·q)/da = c.
        let coef = Tensor::from_vec(
            (0..13).map(|i| i as f64 - 6.0).collect::<Vec<_>>(),
            13,
            &Device::Cpu,
        )
        .unwrap();
        let grads = (&q * &coef).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(a.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(g, coef.to_vec1::<f64>().unwrap());
        // f32: the same codes computed in f32 (the reference's precision).
        let s32: Vec<f32> = slopes.iter().map(|&v| v as f32).collect();
        let (lo, hi) = s32
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        let want32 = quantize_with_range(bits, &s32, lo, hi).unwrap().dequantized;
        let t32 = Tensor::from_vec(s32, 13, &Device::Cpu).unwrap();
        let q32 = fake_quantize_prelu_slopes(&t32, bits).unwrap();
        assert_eq!(q32.to_vec1::<f32>().unwrap(), want32, "f32, {bits} bits");
    }
    // A shared slope (1,) is a degenerate range: it stays (almost) where it is.
    let one = Tensor::from_vec(vec![0.25f64], 1, &Device::Cpu).unwrap();
    let q = fake_quantize_prelu_slopes(&one, 8)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!((q[0] - 0.25).abs() < 1e-7, "{q:?}");
    assert!(fake_quantize_prelu_slopes(&one, 1).is_err());
}

/// A hand-written training-mode forward of a fake-quantised network from its variables, on
/// candle's own ops (not the crate's kernels): convolution / linear weights through
/// `fake_quantize_weight`, BatchNorm with batch statistics, PReLU with slopes quantised by the
/// scalar functions (held as fresh variables, so their gradients can be read), and every
/// activation quantiser's first training forward (range `[min(0, min x), max(0, max x)]`).
struct Reference {
    params: std::collections::HashMap<String, Tensor>,
    bits: QuantBits,
    /// Quantise the slopes (false: the float slopes, to show the test can tell).
    quantise_slopes: bool,
    slopes: std::cell::RefCell<Vec<(String, candle_core::Var)>>,
}

impl Reference {
    fn new(varmap: &VarMap, bits: QuantBits, quantise_slopes: bool) -> Self {
        let params = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        Self {
            params,
            bits,
            quantise_slopes,
            slopes: Default::default(),
        }
    }

    fn p(&self, name: &str) -> &Tensor {
        self.params
            .get(name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    }

    fn conv(&self, x: &Tensor, name: &str, stride: usize, pad: usize, groups: usize) -> Tensor {
        let w = fake_quantize_weight(self.p(&format!("{name}.weight")), self.bits.weight).unwrap();
        x.conv2d(&w, pad, stride, 1, groups).unwrap()
    }

    fn bn(&self, x: &Tensor, name: &str) -> Tensor {
        let c = x.dim(1).unwrap();
        let shape: Vec<usize> = (0..x.rank()).map(|d| if d == 1 { c } else { 1 }).collect();
        let dims: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
        let mean = x.mean_keepdim(dims.clone()).unwrap();
        let centred = x.broadcast_sub(&mean).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(dims).unwrap();
        let g = self
            .p(&format!("{name}.weight"))
            .reshape(shape.clone())
            .unwrap();
        let b = self.p(&format!("{name}.bias")).reshape(shape).unwrap();
        centred
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&g)
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
    }

    fn prelu(&self, x: &Tensor, name: &str) -> Tensor {
        let name = format!("{name}.weight");
        let a: Vec<f64> = self.p(&name).to_vec1().unwrap();
        let a = if self.quantise_slopes {
            hand_quantised_slopes(&a, self.bits.activation)
        } else {
            a
        };
        let c = a.len();
        let var = candle_core::Var::from_vec(a, c, &Device::Cpu).unwrap();
        let slope = var.as_tensor().reshape((1, c, 1, 1)).unwrap();
        self.slopes.borrow_mut().push((name, var));
        // x · (1 if x > 0 else a): PyTorch's subgradient, slope a at x = 0 (a zero-variance
        // BatchNorm channel with β = 0 gives exact zeros).
        let pos = x.gt(0.0).unwrap().to_dtype(DType::F64).unwrap();
        let factor = (pos.ones_like().unwrap() - &pos)
            .unwrap()
            .broadcast_mul(&slope)
            .unwrap()
            .add(&pos)
            .unwrap();
        (x * factor).unwrap()
    }

    fn act(&self, x: &Tensor) -> Tensor {
        let d = x.detach();
        let lo = d.min_all().unwrap().to_scalar::<f64>().unwrap().min(0.0);
        let hi = d.max_all().unwrap().to_scalar::<f64>().unwrap().max(0.0);
        fake_quantize_range(x, self.bits.activation, lo, hi).unwrap()
    }

    fn linear(&self, x: &Tensor, name: &str, bias: bool) -> Tensor {
        let w = fake_quantize_weight(self.p(&format!("{name}.weight")), self.bits.weight).unwrap();
        let y = x.matmul(&w.t().unwrap()).unwrap();
        if bias {
            y.broadcast_add(self.p(&format!("{name}.bias"))).unwrap()
        } else {
            y
        }
    }

    /// IResNet with stride-2 first blocks (downsample in every layer).
    fn iresnet(&self, x: &Tensor, layers: [usize; 4]) -> Tensor {
        let mut x = self.conv(x, "conv1", 1, 1, 1);
        x = self.act(&self.prelu(&self.bn(&x, "bn1"), "prelu"));
        for (li, &n) in layers.iter().enumerate() {
            for bi in 0..n {
                let p = format!("layer{}.{bi}", li + 1);
                let stride = if bi == 0 { 2 } else { 1 };
                let out = self.bn(&x, &format!("{p}.bn1"));
                let out = self.conv(&out, &format!("{p}.conv1"), 1, 1, 1);
                let out = self.prelu(&self.bn(&out, &format!("{p}.bn2")), &format!("{p}.prelu"));
                let out = self.act(&out);
                let out = self.conv(&out, &format!("{p}.conv2"), stride, 1, 1);
                let out = self.bn(&out, &format!("{p}.bn3"));
                let identity = if bi == 0 {
                    let y = self.conv(&x, &format!("{p}.downsample.0"), stride, 0, 1);
                    self.bn(&y, &format!("{p}.downsample.1"))
                } else {
                    x.clone()
                };
                x = self.act(&(out + identity).unwrap());
            }
        }
        let x = self.bn(&x, "bn2").flatten_from(1).unwrap();
        let x = self.linear(&x, "fc", true);
        self.bn(&x, "features")
    }

    /// MobileFaceNet ConvBlock (`prelu`) / LinearBlock under `name`, `+ residual`.
    #[allow(clippy::too_many_arguments)]
    fn conv_block(
        &self,
        x: &Tensor,
        name: &str,
        stride: usize,
        pad: usize,
        groups: usize,
        prelu: bool,
        residual: Option<&Tensor>,
    ) -> Tensor {
        let y = self.conv(x, &format!("{name}.layers.0"), stride, pad, groups);
        let y = self.bn(&y, &format!("{name}.layers.1"));
        let y = if prelu {
            self.prelu(&y, &format!("{name}.layers.2"))
        } else {
            y
        };
        match residual {
            Some(r) => self.act(&(y + r).unwrap()),
            None if prelu => self.act(&y),
            None => y,
        }
    }

    fn depthwise(&self, x: &Tensor, name: &str, e: usize, stride: usize, residual: bool) -> Tensor {
        let y = self.conv_block(x, &format!("{name}.layers.0"), 1, 0, 1, true, None);
        let y = self.conv_block(&y, &format!("{name}.layers.1"), stride, 1, e, true, None);
        let r = residual.then_some(x);
        self.conv_block(&y, &format!("{name}.layers.2"), 1, 0, 1, false, r)
    }

    /// MobileFaceNet with blocks `[1, 1, 1, 1]` (grouped ConvBlock as `layers.1`).
    fn mobilefacenet(&self, x: &Tensor) -> Tensor {
        let mut x = self.conv_block(x, "layers.0", 2, 1, 1, true, None);
        x = self.conv_block(&x, "layers.1", 1, 1, 64, true, None);
        for (i, e) in [(2, 128), (3, 128), (4, 256), (5, 256), (6, 512), (7, 256)] {
            x = if i % 2 == 0 {
                self.depthwise(&x, &format!("layers.{i}"), e, 2, false)
            } else {
                self.depthwise(&x, &format!("layers.{i}.layers.0"), e, 1, true)
            };
        }
        let x = self.conv_block(&x, "conv_sep", 1, 0, 1, true, None);
        let c = x.dim(1).unwrap();
        let x = self.conv_block(&x, "features.layers.0", 1, 0, c, false, None);
        let x = self.linear(&x.flatten_from(1).unwrap(), "features.layers.2", false);
        self.bn(&x, "features.layers.3")
    }
}

/// Sets every slope vector selected by `is_prelu` to [`distinct_slopes`]; returns how many.
/// Also moves every bias off zero: a PReLU input that is exactly 0 (a BatchNorm output
/// `γ·x̂ + β` with `β = 0` where `x = mean`) sits on the kink, where implementations may
/// round to either side and so take different subgradients.
fn set_distinct_slopes(varmap: &VarMap, is_prelu: impl Fn(&str, &Tensor) -> bool) -> usize {
    let data = varmap.data().lock().unwrap();
    for (k, var) in data.iter() {
        if k.ends_with(".bias") && var.as_tensor().rank() == 1 {
            let c = var.as_tensor().elem_count();
            let v: Vec<f64> = (0..c)
                .map(|i| 0.05 + 0.1 * (0.7 * i as f64 + k.len() as f64).cos().abs())
                .collect();
            var.set(&Tensor::from_vec(v, c, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let mut names: Vec<&String> = data
        .keys()
        .filter(|k| is_prelu(k, data[*k].as_tensor()))
        .collect();
    names.sort();
    for (layer, name) in names.iter().enumerate() {
        let var = &data[*name];
        let c = var.as_tensor().elem_count();
        let t = Tensor::from_vec(distinct_slopes(c, layer), c, &Device::Cpu).unwrap();
        var.set(&t).unwrap();
    }
    names.len()
}

/// The fresh quantised model's first training forward against the reference: outputs and
/// the gradients of every PReLU slope of `Σ coef · y`.
fn check_against_reference(
    what: &str,
    varmap: &VarMap,
    model: &dyn Fn(&Tensor) -> Tensor,
    reference: &dyn Fn(&Reference, &Tensor) -> Tensor,
    x: &Tensor,
    bits: QuantBits,
) {
    let y = model(x);
    let coef = Tensor::from_vec(
        (0..y.elem_count())
            .map(|i| ((i * 7 % 11) as f64 - 5.0) / 5.0)
            .collect::<Vec<_>>(),
        y.dims(),
        &Device::Cpu,
    )
    .unwrap();
    let grads = (&y * &coef).unwrap().sum_all().unwrap().backward().unwrap();

    let r = Reference::new(varmap, bits, true);
    let want = reference(&r, x);
    let d = max_abs_f64(&y, &want);
    let scale = max_abs_f64(&want, &want.zeros_like().unwrap());
    println!("{what}: output max |model − reference| {d:e} (output scale {scale:.3})");
    assert!(d < 1e-9 * scale.max(1.0), "{what}: output differs by {d}");
    // The same reference with float slopes is measurably different: the test can tell.
    let float = Reference::new(varmap, bits, false);
    let d_float = max_abs_f64(&y, &reference(&float, x));
    assert!(
        d_float > 1e-5,
        "{what}: float slopes give the same output ({d_float})"
    );

    let rgrads = (&want * &coef)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let data = varmap.data().lock().unwrap();
    let slopes = r.slopes.borrow();
    assert!(slopes.len() >= 5, "{what}: {} PReLUs", slopes.len());
    for (name, var) in slopes.iter() {
        let g_model = grads
            .get(data[name].as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        let g_ref = rgrads.get(var.as_tensor()).unwrap();
        let scale = max_abs_f64(g_ref, &g_ref.zeros_like().unwrap());
        assert!(scale > 0.0, "{what}: zero slope gradient for {name}");
        let d = max_abs_f64(g_model, g_ref);
        assert!(
            d <= 1e-8 * scale.max(1.0),
            "{what} {name}: gradient differs by {d} (scale {scale})"
        );
    }
}

fn max_abs_f64(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn quantised_iresnet_prelus_use_quantised_slopes() {
    let layers = [1, 2, 1, 1];
    let cfg = fr_backbone::IResNetConfig {
        layers,
        widths: [6, 8, 8, 12],
        embedding_size: 8,
        input_size: 16,
        dropout: 0.0,
        kernels: Kernels::Auto,
    };
    for bits in [QuantBits::w8a8(), QuantBits::w6a6()] {
        let varmap = VarMap::new();
        let vb =
            SeededVarMap::with_varmap(varmap.clone(), 21).var_builder(DType::F64, &Device::Cpu);
        let net = IResNet::new(&cfg, vb).unwrap();
        let n = set_distinct_slopes(&varmap, |name, _| name.ends_with("prelu.weight"));
        assert_eq!(n, 6);
        let q = net.quantize(bits).unwrap();
        let x = pseudo_random_images(4, 16, 9).to_dtype(DType::F64).unwrap();
        check_against_reference(
            &format!("IResNet w{}a{}", bits.weight, bits.activation),
            &varmap,
            &|x| q.forward_t(x, true).unwrap(),
            &|r, x| r.iresnet(x, layers),
            &x,
            bits,
        );
        assert_fused_eval_equals_unfused(&q, &x);
    }
}

/// Evaluation inside `no_grad` (BatchNorm and PReLU fused into the convolutions) equals the
/// unfused evaluation: the fused path takes the quantised slopes too.
fn assert_fused_eval_equals_unfused(net: &dyn ModuleT, x: &Tensor) {
    let fused = fr_kernels::no_grad(|| net.forward_t(x, false)).unwrap();
    let unfused = net.forward_t(x, false).unwrap();
    let d = max_abs_f64(&fused, &unfused);
    assert!(d < 1e-9, "fused evaluation differs by {d}");
}

#[test]
fn quantised_mobilefacenet_prelus_use_quantised_slopes() {
    let cfg = MobileFaceNetConfig {
        blocks: [1, 1, 1, 1],
        scale: 1,
        embedding_size: 8,
        input_size: 16,
        kernels: Kernels::Auto,
    };
    let bits = QuantBits::w6a6();
    let varmap = VarMap::new();
    let vb = SeededVarMap::with_varmap(varmap.clone(), 4).var_builder(DType::F64, &Device::Cpu);
    let net = MobileFaceNet::new(&cfg, vb).unwrap();
    // ConvBlocks' PReLUs are `….layers.2.weight` of rank 1 (LinearBlocks have no `layers.2`,
    // the GDC's linear layer `features.layers.2.weight` has rank 2).
    let n = set_distinct_slopes(&varmap, |name, t| {
        name.ends_with("layers.2.weight") && t.rank() == 1
    });
    assert_eq!(n, 2 + 2 * 6 + 1);
    let q = net.quantize(bits).unwrap();
    let x = pseudo_random_images(4, 16, 5).to_dtype(DType::F64).unwrap();
    check_against_reference(
        "MobileFaceNet w6a6",
        &varmap,
        &|x| q.forward_t(x, true).unwrap(),
        &|r, x| r.mobilefacenet(x),
        &x,
        bits,
    );
    assert_fused_eval_equals_unfused(&q, &x);
}
