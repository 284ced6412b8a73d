//! fr-kernels BatchNorm and PReLU against candle-nn's layers and finite differences.

mod common;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{finite_difference_error, grads, max_rel, rand};
use fr_kernels::nn::{BatchNorm, PReLU};
use fr_kernels::{batch_norm_eval, batch_norm_train, prelu, Kernels};

const SHAPES: &[&[usize]] = &[
    &[4, 3, 5, 5],
    &[3, 5, 7, 9],
    &[6, 8],
    &[1, 2, 3, 3],
    &[5, 4, 1, 1],
];

#[test]
fn batch_norm_train_matches_candle_and_finite_differences() {
    for (i, shape) in SHAPES.iter().enumerate() {
        let c = shape[1];
        let x = rand(shape, DType::F64, i as u64);
        let gamma = (rand(&[c], DType::F64, 50 + i as u64) + 1.5).unwrap();
        let beta = rand(&[c], DType::F64, 60 + i as u64);
        let ours = |t: &[Tensor]| batch_norm_train(&t[0], &t[1], &t[2], 1e-5).map(|(y, _)| y);
        let reference = |t: &[Tensor]| {
            let bn = candle_nn::BatchNorm::new(
                c,
                Tensor::zeros(c, DType::F64, &Device::Cpu)?,
                Tensor::ones(c, DType::F64, &Device::Cpu)?,
                t[1].clone(),
                t[2].clone(),
                1e-5,
            )?;
            bn.forward_t(&t[0], true)
        };
        let inputs = [x, gamma, beta];
        let (y, g) = grads(&inputs, &ours, 3);
        let (y_ref, g_ref) = grads(&inputs, &reference, 3);
        assert!(max_rel(&y, &y_ref) < 1e-10, "forward {shape:?}");
        for k in 0..3 {
            assert!(max_rel(&g[k], &g_ref[k]) < 1e-9, "grad {k} {shape:?}");
        }
        let err = finite_difference_error(&inputs, &ours, 30, i as u64);
        assert!(err < 1e-6, "{shape:?}: finite-difference error {err:e}");
    }
}

#[test]
fn batch_norm_statistics_are_the_batch_mean_and_biased_variance() {
    let x = Tensor::new(&[[1.0f64, 10.0], [3.0, 20.0], [5.0, 60.0]], &Device::Cpu).unwrap();
    let ones = Tensor::ones(2, DType::F64, &Device::Cpu).unwrap();
    let (_, st) = batch_norm_train(&x, &ones, &ones.zeros_like().unwrap(), 1e-5).unwrap();
    assert_eq!(st.mean, vec![3.0, 30.0]);
    assert!((st.var[0] - 8.0 / 3.0).abs() < 1e-12 && (st.var[1] - 1400.0 / 3.0).abs() < 1e-9);
    assert_eq!(st.count, 3);
}

#[test]
fn batch_norm_eval_matches_finite_differences() {
    let x = rand(&[3, 4, 5, 5], DType::F64, 9);
    let gamma = rand(&[4], DType::F64, 10);
    let beta = rand(&[4], DType::F64, 11);
    let f = |t: &[Tensor]| {
        batch_norm_eval(
            &t[0],
            &t[1],
            &t[2],
            vec![0.1, -0.2, 0.3, 0.0],
            vec![0.5, 1.0, 2.0, 0.01],
            1e-5,
        )
    };
    assert!(finite_difference_error(&[x, gamma, beta], &f, 30, 4) < 1e-6);
}

/// The layer: fused and candle paths give the same outputs, gradients and running statistics
/// (f32, several steps in train mode, then eval).
#[test]
fn batch_norm_layer_fused_equals_candle() {
    let run = |kernels: Kernels| -> Result<Vec<Vec<f32>>> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let bn = BatchNorm::load(6, 1e-5, vb.pp("bn"), kernels)?;
        let mut out = Vec::new();
        for step in 0..3 {
            let x = rand(&[4, 6, 7, 7], DType::F32, step).affine(3.0, 1.0)?;
            let (y, g) = grads(&[x], &|t: &[Tensor]| bn.forward_t(&t[0], true), step);
            out.push(y.flatten_all()?.to_vec1()?);
            out.push(g[0].flatten_all()?.to_vec1()?);
        }
        out.push(bn.running_mean().to_vec1()?);
        out.push(bn.running_var().to_vec1()?);
        let data = vm.data().lock().unwrap();
        out.push(data["bn.running_var"].as_tensor().to_vec1()?);
        drop(data);
        out.push(
            bn.forward_t(&rand(&[2, 6, 3, 3], DType::F32, 9), false)?
                .flatten_all()?
                .to_vec1()?,
        );
        Ok(out)
    };
    let (a, b) = (run(Kernels::Fused).unwrap(), run(Kernels::Candle).unwrap());
    assert_eq!(a.len(), b.len());
    for (i, (u, v)) in a.iter().zip(&b).enumerate() {
        let worst = u
            .iter()
            .zip(v)
            .map(|(p, q)| (p - q).abs() / (1.0 + q.abs()))
            .fold(0f32, f32::max);
        assert!(worst < 2e-5, "output {i}: {worst:e}");
    }
    // The running statistics moved (and are the VarMap's own).
    assert!(a[a.len() - 3].iter().any(|&v| (v - 1.0).abs() > 0.1));
    assert_eq!(a[a.len() - 3], a[a.len() - 2]);
}

#[test]
fn prelu_matches_candle_and_finite_differences() {
    for (i, shape) in SHAPES.iter().enumerate() {
        let c = shape[1];
        let x = rand(shape, DType::F64, 20 + i as u64);
        for a in [
            rand(&[c], DType::F64, 30 + i as u64),
            rand(&[1], DType::F64, 40),
        ] {
            let ours = |t: &[Tensor]| prelu(&t[0], &t[1]);
            let reference = |t: &[Tensor]| {
                candle_nn::PReLU::new(t[1].clone(), t[1].elem_count() == 1).forward(&t[0])
            };
            let inputs = [x.clone(), a];
            let (y, g) = grads(&inputs, &ours, 5);
            let (y_ref, g_ref) = grads(&inputs, &reference, 5);
            assert!(max_rel(&y, &y_ref) < 1e-14, "forward {shape:?}");
            assert!(max_rel(&g[0], &g_ref[0]) < 1e-14, "dx {shape:?}");
            assert!(max_rel(&g[1], &g_ref[1]) < 1e-12, "da {shape:?}");
            assert!(finite_difference_error(&inputs, &ours, 30, i as u64) < 1e-7);
        }
    }
}

#[test]
fn prelu_layer_paths_agree_and_bad_slopes_are_errors() {
    let x = rand(&[2, 3, 4, 4], DType::F32, 1);
    let a = rand(&[3], DType::F32, 2);
    let fused = PReLU::new(a.clone(), Kernels::Fused).forward(&x).unwrap();
    let reference = PReLU::new(a, Kernels::Candle).forward(&x).unwrap();
    assert!(max_rel(&fused, &reference) < 1e-7);
    assert!(prelu(&x, &rand(&[2], DType::F32, 3)).is_err());
    // Empty channel or spatial dimensions, and an empty batch in train mode: errors, not panics.
    let (a3, empty_c) = (
        rand(&[3], DType::F32, 3),
        rand(&[2, 0, 4, 4], DType::F32, 4),
    );
    assert!(prelu(&empty_c, &rand(&[1], DType::F32, 3)).is_err());
    assert!(prelu(&rand(&[2, 3, 0, 4], DType::F32, 4), &a3).is_err());
    assert!(batch_norm_train(&rand(&[0, 3, 4, 4], DType::F32, 4), &a3, &a3, 1e-5).is_err());
    assert!(batch_norm_train(&rand(&[2, 3, 4, 0], DType::F32, 4), &a3, &a3, 1e-5).is_err());
    assert_eq!(
        prelu(&rand(&[0, 3, 4, 4], DType::F32, 4), &a3)
            .unwrap()
            .dims(),
        &[0, 3, 4, 4]
    );
    assert!(batch_norm_train(
        &x,
        &rand(&[2], DType::F32, 3),
        &rand(&[3], DType::F32, 3),
        1e-5
    )
    .is_err());
    assert!(batch_norm_train(
        &x.flatten_all().unwrap(),
        &rand(&[3], DType::F32, 3),
        &rand(&[3], DType::F32, 3),
        1e-5
    )
    .is_err());
}

/// The fused inference convolution equals conv → eval BatchNorm → PReLU → + residual, for a
/// plain, a strided 1×1, a grouped and a depthwise convolution, with and without each part.
#[test]
fn conv_eval_fused_equals_the_separate_layers() {
    use fr_kernels::nn::{BatchNorm as Bn, Conv2d};
    use fr_kernels::ConvParams;
    let cases: &[(usize, usize, usize, usize, usize, usize)] = &[
        // (Cin, Cout, k, stride, padding, groups)
        (4, 6, 3, 1, 1, 1),
        (4, 6, 1, 2, 0, 1),
        (4, 6, 3, 2, 1, 2),
        (6, 6, 3, 1, 1, 6),
    ];
    for (i, &(cin, cout, k, stride, padding, groups)) in cases.iter().enumerate() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let bn = Bn::load(cout, 1e-5, vb.pp("bn"), Kernels::Fused).unwrap();
        // Non-trivial running statistics and affine parameters.
        for (name, seed) in [("running_mean", 1), ("weight", 2), ("bias", 3)] {
            vm.data().lock().unwrap()[&format!("bn.{name}")]
                .set(&rand(&[cout], DType::F64, seed + i as u64))
                .unwrap();
        }
        let rv = (rand(&[cout], DType::F64, 4).abs().unwrap() + 0.5).unwrap();
        vm.data().lock().unwrap()["bn.running_var"]
            .set(&rv)
            .unwrap();
        let params = ConvParams {
            stride,
            padding,
            dilation: 1,
            groups,
        };
        let w = rand(&[cout, cin / groups, k, k], DType::F64, 5);
        let bias = rand(&[cout], DType::F64, 6);
        let conv = Conv2d::new(w, Some(bias), params, Kernels::Fused);
        let prelu = PReLU::new(rand(&[cout], DType::F64, 7), Kernels::Fused);
        let x = rand(&[3, cin, 9, 9], DType::F64, 8);
        let y0 = conv.forward(&x).unwrap();
        let residual = rand(y0.dims(), DType::F64, 9);
        for (with_prelu, with_residual) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            let p = with_prelu.then_some(&prelu);
            let r = with_residual.then_some(&residual);
            let separate = conv.forward_eval_fused(&x, &bn, p, r).unwrap();
            let fused = fr_kernels::no_grad(|| conv.forward_eval_fused(&x, &bn, p, r)).unwrap();
            assert!(!fused.track_op());
            let err = max_rel(&fused, &separate);
            assert!(
                err < 1e-12,
                "case {i}, prelu {with_prelu}, residual {with_residual}: {err:e}"
            );
        }
        let wrong = fr_kernels::conv2d_eval_fused(
            &x,
            conv.weight(),
            params,
            vec![1.0; cout + 1],
            vec![0.0; cout],
            None,
            None,
        );
        assert!(wrong.is_err());
    }
}

/// BatchNorm + PReLU as one op equals the two ops (outputs, statistics and every gradient,
/// per-channel and shared slope) and finite differences.
#[test]
fn batch_norm_prelu_equals_the_two_ops() {
    use fr_kernels::batch_norm_prelu_train;
    for (i, shape) in SHAPES.iter().enumerate() {
        let c = shape[1];
        let x = rand(shape, DType::F64, 70 + i as u64);
        let gamma = (rand(&[c], DType::F64, 71) + 1.5).unwrap();
        let beta = rand(&[c], DType::F64, 72);
        for a in [rand(&[c], DType::F64, 73), rand(&[1], DType::F64, 74)] {
            let fused = |t: &[Tensor]| {
                batch_norm_prelu_train(&t[0], &t[1], &t[2], &t[3], 1e-5).map(|(y, _)| y)
            };
            let separate =
                |t: &[Tensor]| prelu(&batch_norm_train(&t[0], &t[1], &t[2], 1e-5)?.0, &t[3]);
            let inputs = [x.clone(), gamma.clone(), beta.clone(), a];
            let (y, g) = grads(&inputs, &fused, 8);
            let (y_ref, g_ref) = grads(&inputs, &separate, 8);
            assert!(max_rel(&y, &y_ref) < 1e-12, "forward {shape:?}");
            for k in 0..4 {
                assert!(max_rel(&g[k], &g_ref[k]) < 1e-10, "grad {k} {shape:?}");
            }
            let (_, st) = batch_norm_prelu_train(&x, &gamma, &beta, &inputs[3], 1e-5).unwrap();
            assert_eq!(st, batch_norm_train(&x, &gamma, &beta, 1e-5).unwrap().1);
            assert!(finite_difference_error(&inputs, &fused, 25, i as u64) < 1e-6);
        }
    }
    let x = rand(&[2, 3, 4, 4], DType::F32, 1);
    let a3 = rand(&[3], DType::F32, 2);
    assert!(batch_norm_prelu_train(&x, &a3, &a3, &rand(&[2], DType::F32, 3), 1e-5).is_err());
    assert!(
        batch_norm_prelu_train(&rand(&[0, 3, 4, 4], DType::F32, 1), &a3, &a3, &a3, 1e-5).is_err()
    );
}

/// Mixed precision: a BatchNorm over bf16 / f16 input trains (statistics in f32, output in the
/// input's dtype) and matches the f64 layer within the half format's rounding, in output,
/// gradients and running statistics; eval mode uses the running statistics.
#[test]
fn batch_norm_half_input_matches_f64() {
    for dtype in [DType::BF16, DType::F16] {
        let c = 4;
        let build = |dt: DType| {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, dt, &Device::Cpu);
            let bn = BatchNorm::load(c, 1e-5, vb, Kernels::Auto).unwrap();
            // γ, β away from their 1 / 0 initial values.
            let data = vm.data().lock().unwrap();
            data["weight"]
                .set(
                    &(rand(&[c], DType::F64, 7) + 1.5)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap(),
                )
                .unwrap();
            data["bias"]
                .set(&rand(&[c], DType::F64, 8).to_dtype(dt).unwrap())
                .unwrap();
            drop(data);
            (vm, bn)
        };
        let (vm64, bn64) = build(DType::F64);
        let (vmh, bnh) = build(dtype);
        // Running statistics stay f32 in a half-precision model (autocast's rule).
        assert_eq!(bnh.running_mean().dtype(), DType::F32);
        assert_eq!(bnh.running_var().dtype(), DType::F32);
        assert_eq!(vmh.data().lock().unwrap()["weight"].dtype(), dtype);
        // The half layer's inputs, widened: both layers see the same values.
        let x = ((rand(&[6, c, 3, 3], DType::F64, 9) * 2.0).unwrap() + 0.5)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let x64 = candle_core::Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let xh = candle_core::Var::from_tensor(&x).unwrap();
        let y64 = bn64.forward_t(x64.as_tensor(), true).unwrap();
        let yh = bnh.forward_t(xh.as_tensor(), true).unwrap();
        assert_eq!(yh.dtype(), dtype);
        let tol = if dtype == DType::BF16 { 2e-2 } else { 3e-3 };
        let err = max_rel(&yh.to_dtype(DType::F64).unwrap(), &y64);
        // Statistics kept in f32 track the f64 ones far closer than the half type's ulp.
        let stats_tol: f64 = 1e-5;
        assert!(err < tol, "{dtype:?} output: {err}");
        // Gradients of a weighted sum with respect to x, γ and β.
        let r = rand(&[6, c, 3, 3], DType::F64, 10);
        let g64 = (y64 * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gh = (yh.to_dtype(DType::F64).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let pick = |vm: &VarMap, g: &candle_core::backprop::GradStore, name: &str| {
            let v = vm.data().lock().unwrap()[name].clone();
            g.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap()
        };
        for name in ["weight", "bias"] {
            let err = max_rel(&pick(&vmh, &gh, name), &pick(&vm64, &g64, name));
            assert!(err < tol * 3.0, "{dtype:?} d/d{name}: {err}");
        }
        let err = max_rel(
            &gh.get(xh.as_tensor())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
            g64.get(x64.as_tensor()).unwrap(),
        );
        assert!(err < tol * 5.0, "{dtype:?} d/dx: {err}");
        // Running statistics moved like the f64 layer's, and eval mode uses them.
        for (a, b) in [
            (bnh.running_mean(), bn64.running_mean()),
            (bnh.running_var(), bn64.running_var()),
        ] {
            let err = max_rel(&a.to_dtype(DType::F64).unwrap(), b);
            assert!(err < stats_tol, "{dtype:?} running statistics: {err}");
        }
        assert_ne!(
            bnh.running_mean()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            vec![0.0; c]
        );
        let e64 = bn64.forward_t(x64.as_tensor(), false).unwrap();
        let eh = bnh.forward_t(xh.as_tensor(), false).unwrap();
        let err = max_rel(&eh.to_dtype(DType::F64).unwrap(), &e64);
        assert!(err < tol * 2.0, "{dtype:?} eval: {err}");
    }
}

/// A bf16 convolution on the CPU (which candle cannot run in bf16) equals the f32 convolution
/// of the same values rounded to bf16, with gradients.
#[test]
fn conv2d_bf16_on_cpu_runs_in_f32() {
    use fr_kernels::nn::Conv2d;
    use fr_kernels::ConvParams;
    let x = rand(&[2, 3, 6, 6], DType::BF16, 1);
    let w = rand(&[4, 3, 3, 3], DType::BF16, 2);
    let p = ConvParams {
        stride: 2,
        padding: 1,
        ..ConvParams::default()
    };
    let wv = candle_core::Var::from_tensor(&w).unwrap();
    let conv = Conv2d::new(wv.as_tensor().clone(), None, p, Kernels::Auto);
    let y = conv.forward(&x).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let want = x
        .to_dtype(DType::F32)
        .unwrap()
        .conv2d(&w.to_dtype(DType::F32).unwrap(), 1, 2, 1, 1)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(
        y.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        want.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(g.get(wv.as_tensor()).unwrap().dtype(), DType::BF16);
}
