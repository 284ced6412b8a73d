//! fr-kernels 3×3 pooling against a direct computation, candle's windowed reference path and
//! finite differences.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use common::{finite_difference_error, grads, max_rel, rand};
use fr_kernels::nn::Pool3x3;
use fr_kernels::{pool3x3, Kernels, PoolKind};

/// (B, C, H, W): odd and even sizes, 1-pixel and 2-pixel sides.
const SHAPES: &[[usize; 4]] = &[
    [2, 3, 6, 6],
    [1, 2, 5, 7],
    [3, 2, 8, 3],
    [2, 2, 1, 1],
    [1, 3, 1, 5],
    [1, 1, 2, 2],
    [2, 4, 9, 11],
];

const KINDS: [PoolKind; 2] = [PoolKind::Max, PoolKind::Avg];

/// Direct pooling of one plane: per output, the value and (max) the first arg-max in
/// row-major window order, PyTorch's rule (`v > m || isnan(v)`).
fn direct_plane(
    x: &[f64],
    h: usize,
    w: usize,
    stride: usize,
    kind: PoolKind,
) -> Vec<(f64, Vec<(usize, f64)>)> {
    let (ho, wo) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
    let mut out = Vec::new();
    for oy in 0..ho {
        for ox in 0..wo {
            let mut cells = Vec::new();
            for dy in 0..3 {
                for dx in 0..3 {
                    let (r, c) = (
                        (oy * stride + dy) as isize - 1,
                        (ox * stride + dx) as isize - 1,
                    );
                    if r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w {
                        cells.push(r as usize * w + c as usize);
                    }
                }
            }
            // (value, [(input index, d value / d input)])
            out.push(match kind {
                PoolKind::Max => {
                    let (mut m, mut best) = (f64::NEG_INFINITY, cells[0]);
                    for &k in &cells {
                        if x[k] > m || x[k].is_nan() {
                            (m, best) = (x[k], k);
                        }
                    }
                    (m, vec![(best, 1.0)])
                }
                PoolKind::Avg => {
                    let n = cells.len() as f64;
                    let s: f64 = cells.iter().map(|&k| x[k]).sum();
                    (s / n, cells.iter().map(|&k| (k, 1.0 / n)).collect())
                }
            });
        }
    }
    out
}

/// Direct forward `(B, C, Ho, Wo)` and the input gradient of `Σ y·r` for output weights `r`.
fn direct(x: &Tensor, r: &Tensor, stride: usize, kind: PoolKind) -> (Vec<f64>, Vec<f64>) {
    let (b, c, h, w) = x.dims4().unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let rs = r.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (mut y, mut dx) = (Vec::new(), vec![0.0; xs.len()]);
    for p in 0..b * c {
        let plane = &xs[p * h * w..][..h * w];
        for (value, taps) in direct_plane(plane, h, w, stride, kind) {
            let weight = rs[y.len()];
            y.push(value);
            for (k, d) in taps {
                dx[p * h * w + k] += d * weight;
            }
        }
    }
    (y, dx)
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn forward_and_gradient_equal_the_direct_computation() {
    for (i, shape) in SHAPES.iter().enumerate() {
        for stride in [1, 2, 3] {
            for kind in KINDS {
                let x = rand(shape, DType::F64, i as u64);
                let f = |t: &[Tensor]| pool3x3(&t[0], kind, stride);
                let (y, g) = grads(std::slice::from_ref(&x), &f, 7);
                let (ho, wo) = ((shape[2] - 1) / stride + 1, (shape[3] - 1) / stride + 1);
                assert_eq!(y.dims(), &[shape[0], shape[1], ho, wo]);
                let r = rand(y.dims(), DType::F64, 7); // the weights `grads` used
                let (y_want, g_want) = direct(&x, &r, stride, kind);
                assert_eq!(
                    (y.elem_count(), g[0].elem_count()),
                    (y_want.len(), g_want.len())
                );
                for (a, b) in flat(&y).iter().zip(&y_want) {
                    assert!(
                        (a - b).abs() < 1e-12,
                        "{shape:?} s{stride} {kind:?}: y {a} vs {b}"
                    );
                }
                for (a, b) in flat(&g[0]).iter().zip(&g_want) {
                    assert!(
                        (a - b).abs() < 1e-12,
                        "{shape:?} s{stride} {kind:?}: dx {a} vs {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn kernels_equal_the_windowed_candle_path() {
    for (i, shape) in SHAPES.iter().enumerate() {
        for stride in [1, 2] {
            for kind in KINDS {
                let x = rand(shape, DType::F64, 100 + i as u64);
                let run = |kernels: Kernels| {
                    let layer = Pool3x3::new(kind, stride, kernels);
                    grads(std::slice::from_ref(&x), &|t| layer.forward(&t[0]), 3)
                };
                let (y, g) = run(Kernels::Fused);
                let (y_ref, g_ref) = run(Kernels::Candle);
                // Random inputs have no ties, where the two max backwards differ.
                assert!(max_rel(&y, &y_ref) < 1e-12, "{shape:?} s{stride} {kind:?}");
                assert!(
                    max_rel(&g[0], &g_ref[0]) < 1e-12,
                    "{shape:?} s{stride} {kind:?}"
                );
                // Auto picks the kernels for f64 CPU tensors.
                let (y_auto, _) = run(Kernels::Auto);
                assert!(max_rel(&y_auto, &y) == 0.0);
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    for (i, shape) in SHAPES.iter().enumerate() {
        for stride in [1, 2] {
            for kind in KINDS {
                let x = rand(shape, DType::F64, 200 + i as u64);
                let f = |t: &[Tensor]| pool3x3(&t[0], kind, stride);
                let err = finite_difference_error(&[x], &f, 40, i as u64);
                assert!(err < 1e-7, "{shape:?} s{stride} {kind:?}: error {err:e}");
            }
        }
    }
}

#[test]
fn f32_matches_f64() {
    for stride in [1, 2] {
        for kind in KINDS {
            let x = rand(&[4, 5, 13, 10], DType::F64, 9);
            let (y64, g64) = grads(
                std::slice::from_ref(&x),
                &|t| pool3x3(&t[0], kind, stride),
                1,
            );
            let x32 = x.to_dtype(DType::F32).unwrap();
            let (y32, g32) = grads(&[x32], &|t| pool3x3(&t[0], kind, stride), 1);
            assert_eq!(y32.dtype(), DType::F32);
            assert!(max_rel(&y32, &y64) < 1e-6, "{kind:?} s{stride}");
            assert!(max_rel(&g32[0], &g64[0]) < 1e-6, "{kind:?} s{stride}");
        }
    }
}

#[test]
fn max_ties_send_the_gradient_to_the_first_maximum_in_row_major_order() {
    // A constant map: every element ties, so each window's gradient goes to its top-left
    // valid pixel (PyTorch's CPU max_pool2d). On a 4×4 map with stride 1 the windows' first
    // pixels are rows/columns {0, 0, 1, 2}: (0,0) gets 4, (0,1), (0,2), (1,0), (2,0) get 2
    // each, (1,1), (1,2), (2,1), (2,2) 1 each.
    let v = candle_core::Var::ones((1, 1, 4, 4), DType::F64, &Device::Cpu).unwrap();
    let y = pool3x3(v.as_tensor(), PoolKind::Max, 1).unwrap();
    assert_eq!(flat(&y), vec![1.0; 16]);
    let g = y.sum_all().unwrap().backward().unwrap();
    #[rustfmt::skip]
    let expected = [
        4.0, 2.0, 2.0, 0.0,
        2.0, 1.0, 1.0, 0.0,
        2.0, 1.0, 1.0, 0.0,
        0.0, 0.0, 0.0, 0.0,
    ];
    assert_eq!(flat(g.get(v.as_tensor()).unwrap()), expected);

    // A tie inside one window at a later row: [[1, 5], [5, 0]] with stride 2 has one window
    // (the whole map); 5 first appears at (0, 1), which takes the whole gradient. candle's
    // windowed path gives it to both fives.
    let x = Tensor::new(&[[[[1.0f64, 5.0], [5.0, 0.0]]]], &Device::Cpu).unwrap();
    for (kernels, want) in [
        (Kernels::Fused, [0.0, 1.0, 0.0, 0.0]),
        (Kernels::Candle, [0.0, 1.0, 1.0, 0.0]),
    ] {
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let y = Pool3x3::new(PoolKind::Max, 2, kernels)
            .forward(v.as_tensor())
            .unwrap();
        assert_eq!(flat(&y), [5.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(flat(g.get(v.as_tensor()).unwrap()), want, "{kernels:?}");
    }
}

#[test]
fn max_ties_nans_and_infinities_follow_pytorchs_scan_on_random_maps() {
    // Values from {−∞, 0, 1, 2, NaN}: most windows hold ties, some NaNs. Forward and gradient
    // equal the direct row-major scan (first maximum, last NaN) for every size and stride.
    let mut nan_outputs = 0;
    for (i, shape) in SHAPES.iter().enumerate() {
        for stride in [1, 2, 3] {
            let u = flat(&rand(shape, DType::F64, 300 + i as u64));
            let v: Vec<f64> = u
                .iter()
                .map(|&u| match ((u + 1.0) * 10.0) as usize {
                    0 => f64::NAN,
                    1 => f64::NEG_INFINITY,
                    k => (k % 3) as f64,
                })
                .collect();
            let x = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap();
            let f = |t: &[Tensor]| pool3x3(&t[0], PoolKind::Max, stride);
            let (y, g) = grads(std::slice::from_ref(&x), &f, 5);
            let r = rand(y.dims(), DType::F64, 5);
            let (y_want, g_want) = direct(&x, &r, stride, PoolKind::Max);
            let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
            for (a, b) in flat(&y).iter().zip(&y_want) {
                assert!(same(*a, *b), "{shape:?} s{stride}: y {a} vs {b}");
            }
            assert_eq!(flat(&g[0]), g_want, "{shape:?} s{stride}");
            nan_outputs += y_want.iter().filter(|v| v.is_nan()).count();
        }
    }
    assert!(nan_outputs > 10, "{nan_outputs} NaN outputs");
}

#[test]
fn max_pooling_propagates_nan_and_never_selects_the_padding() {
    // NaN wins (the last NaN of the window takes the gradient), as PyTorch's CPU kernel.
    let nan = f64::NAN;
    let x = Tensor::new(&[[[[nan, 2.0], [nan, 1.0]]]], &Device::Cpu).unwrap();
    let v = candle_core::Var::from_tensor(&x).unwrap();
    let y = pool3x3(v.as_tensor(), PoolKind::Max, 2).unwrap();
    assert!(flat(&y)[0].is_nan());
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(flat(g.get(v.as_tensor()).unwrap()), [0.0, 0.0, 1.0, 0.0]);

    // An all −∞ map: the output is −∞ (not a padding value) and the gradient goes to the
    // window's first pixel.
    let x = Tensor::full(f64::NEG_INFINITY, (1, 1, 2, 3), &Device::Cpu).unwrap();
    let v = candle_core::Var::from_tensor(&x).unwrap();
    let y = pool3x3(v.as_tensor(), PoolKind::Max, 2).unwrap();
    assert_eq!(flat(&y), [f64::NEG_INFINITY, f64::NEG_INFINITY]);
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        flat(g.get(v.as_tensor()).unwrap()),
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    );
}

#[test]
fn average_pooling_does_not_count_the_padding() {
    // 3×3 map of ones: every output is 1 (the padding would pull border outputs down).
    let ones = Tensor::ones((1, 1, 3, 3), DType::F64, &Device::Cpu).unwrap();
    let y = pool3x3(&ones, PoolKind::Avg, 1).unwrap();
    assert_eq!(flat(&y), vec![1.0; 9]);
    // d Σy / dx = Σ over the windows containing x of 1 / count: corner 1/4 + 2·1/6 + 1/9.
    let v = candle_core::Var::from_tensor(&ones).unwrap();
    let g = pool3x3(v.as_tensor(), PoolKind::Avg, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = flat(g.get(v.as_tensor()).unwrap());
    let corner = 1.0 / 4.0 + 2.0 / 6.0 + 1.0 / 9.0;
    assert!((g[0] - corner).abs() < 1e-15, "{}", g[0]);
    assert!((g.iter().sum::<f64>() - 9.0).abs() < 1e-12);
}

#[test]
fn strided_inputs_and_errors() {
    let x = rand(&[2, 3, 7, 5], DType::F32, 4);
    let xt = x.transpose(2, 3).unwrap(); // (2, 3, 5, 7), not contiguous
    for kind in KINDS {
        let got = pool3x3(&xt, kind, 2).unwrap();
        let want = pool3x3(&xt.contiguous().unwrap(), kind, 2).unwrap();
        assert_eq!(max_rel(&got, &want), 0.0);
    }
    let err = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    assert!(err(pool3x3(&x.to_dtype(DType::BF16).unwrap(), PoolKind::Max, 1)).contains("f32"));
    assert!(err(pool3x3(&x.flatten_to(1).unwrap(), PoolKind::Max, 1)).contains("(B, C, H, W)"));
    assert!(err(pool3x3(&x, PoolKind::Avg, 0)).contains("stride"));
    let empty = Tensor::zeros((1, 1, 0, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(err(pool3x3(&empty, PoolKind::Avg, 1)).contains("empty"));
    // An empty batch is fine.
    let none = Tensor::zeros((0, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        pool3x3(&none, PoolKind::Max, 2).unwrap().dims(),
        &[0, 2, 2, 2]
    );
}
