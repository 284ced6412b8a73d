//! fr-kernels conv2d against candle's own convolution and against finite differences.

mod common;

use candle_core::{DType, Result, Tensor};
use common::{finite_difference_error, grads, max_rel, rand};
use fr_kernels::{conv2d, ConvParams};
use proptest::prelude::*;

/// (B, Cin, H, W, Cout, k, stride, padding, groups)
type Case = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

const CASES: &[Case] = &[
    (2, 3, 7, 7, 4, 3, 1, 1, 1),   // stem-like 3x3/1
    (3, 4, 9, 9, 6, 3, 2, 1, 1),   // odd size, stride 2 (IBasicBlock conv2)
    (2, 4, 9, 7, 4, 1, 2, 0, 1),   // 1x1 stride 2 (downsample), non-square odd
    (2, 4, 6, 6, 5, 1, 1, 0, 1),   // 1x1 stride 1 (pointwise fast path)
    (2, 6, 7, 7, 6, 3, 1, 1, 6),   // depthwise
    (2, 6, 9, 9, 6, 3, 2, 1, 6),   // depthwise, odd size, stride 2
    (1, 4, 5, 5, 4, 3, 1, 1, 2),   // two groups, batch 1 (GEMM-parallel path)
    (5, 2, 3, 3, 3, 3, 2, 0, 1),   // no padding, 3x3 input
    (3, 2, 8, 8, 4, 3, 3, 2, 1),   // stride 3, padding 2
    (2, 4, 6, 6, 8, 3, 1, 1, 4),   // grouped, 2 outputs per group
    (2, 3, 15, 15, 4, 7, 2, 3, 1), // candle #1212: 7x7/2 pad 3 on an odd size, (H + 2p − k) % s ≠ 0
    (1, 2, 3, 3, 2, 2, 1, 0, 1),   // candle #3735: 2x2 kernel on 3x3 (strided kernel below)
    (2, 3, 1, 1, 4, 3, 1, 1, 1),   // 1x1 map, 3x3 "same" kernel (the kernel reaches past the plane)
    (2, 3, 2, 2, 4, 3, 1, 1, 1),   // 2x2 map, 3x3 "same"
    (1, 2, 1, 5, 3, 3, 1, 1, 1),   // one-row map
    (2, 2, 2, 2, 3, 5, 1, 2, 1),   // 5x5 "same" on 2x2
];

fn params(c: &Case) -> ConvParams {
    ConvParams {
        stride: c.6,
        padding: c.7,
        dilation: 1,
        groups: c.8,
    }
}

fn inputs(c: &Case, dtype: DType, seed: u64) -> (Tensor, Tensor) {
    let &(b, cin, h, w, cout, k, _, _, g) = c;
    (
        rand(&[b, cin, h, w], dtype, seed),
        rand(&[cout, cin / g, k, k], dtype, seed + 1),
    )
}

fn ours(p: ConvParams) -> impl Fn(&[Tensor]) -> Result<Tensor> {
    move |t: &[Tensor]| conv2d(&t[0], &t[1], p)
}

fn candle(p: ConvParams) -> impl Fn(&[Tensor]) -> Result<Tensor> {
    move |t: &[Tensor]| t[0].conv2d(&t[1], p.padding, p.stride, p.dilation, p.groups)
}

#[test]
fn matches_candle_forward_and_gradients_f64() {
    for (i, c) in CASES.iter().enumerate() {
        let p = params(c);
        let (x, w) = inputs(c, DType::F64, 10 * i as u64);
        let (y, g) = grads(&[x.clone(), w.clone()], &ours(p), 7);
        let (y_ref, g_ref) = grads(&[x, w], &candle(p), 7);
        assert!(max_rel(&y, &y_ref) < 1e-12, "forward {c:?}");
        assert!(max_rel(&g[0], &g_ref[0]) < 1e-12, "dx {c:?}");
        assert!(max_rel(&g[1], &g_ref[1]) < 1e-12, "dw {c:?}");
    }
}

#[test]
fn gradients_match_finite_differences() {
    for (i, c) in CASES.iter().enumerate() {
        let (x, w) = inputs(c, DType::F64, 100 + i as u64);
        let err = finite_difference_error(&[x, w], &ours(params(c)), 40, i as u64);
        assert!(err < 1e-7, "{c:?}: finite-difference error {err:e}");
    }
}

#[test]
fn matches_candle_f32_at_block_size() {
    // An IResNet block's shapes at batch 8 (more images than threads, several per chunk).
    for c in [
        (8, 16, 14, 14, 32, 3, 2, 1, 1),
        (8, 16, 14, 14, 16, 3, 1, 1, 1),
        (8, 16, 14, 14, 32, 1, 2, 0, 1),
    ] {
        let p = params(&c);
        let (x, w) = inputs(&c, DType::F32, 3);
        let (y, g) = grads(&[x.clone(), w.clone()], &ours(p), 1);
        let (y_ref, g_ref) = grads(&[x, w], &candle(p), 1);
        assert!(max_rel(&y, &y_ref) < 1e-5, "forward {c:?}");
        assert!(max_rel(&g[0], &g_ref[0]) < 1e-5, "dx {c:?}");
        assert!(max_rel(&g[1], &g_ref[1]) < 1e-4, "dw {c:?}");
    }
}

#[test]
fn strided_inputs_and_kernels() {
    // x as a permuted NHWC buffer and the weight as a transposed (Cin, Cout, k, k) buffer:
    // neither is contiguous.
    let p = ConvParams {
        stride: 2,
        padding: 1,
        ..Default::default()
    };
    let x_nhwc = rand(&[2, 9, 9, 3], DType::F64, 1);
    let w_io = rand(&[3, 5, 3, 3], DType::F64, 2);
    let x = x_nhwc.permute((0, 3, 1, 2)).unwrap();
    let w = w_io.transpose(0, 1).unwrap();
    assert!(!x.is_contiguous() && !w.is_contiguous());
    let y = conv2d(&x, &w, p).unwrap();
    let y_ref = x
        .contiguous()
        .unwrap()
        .conv2d(&w.contiguous().unwrap(), 1, 2, 1, 1)
        .unwrap();
    assert!(max_rel(&y, &y_ref) < 1e-12);
    let f = |t: &[Tensor]| conv2d(&t[0].permute((0, 3, 1, 2))?, &t[1].transpose(0, 1)?, p);
    assert!(finite_difference_error(&[x_nhwc, w_io], &f, 30, 3) < 1e-7);
}

/// candle #3735 / #3736: a transposed 2x2 kernel, and a 1x1 kernel that is a channel slice of a
/// larger weight (non-zero storage offset), give the results of their contiguous copies.
#[test]
fn transposed_and_offset_kernels() {
    let x = rand(&[1, 2, 3, 3], DType::F64, 4);
    let k = rand(&[2, 2, 2, 2], DType::F64, 5);
    let p = ConvParams::default();
    let f = |t: &[Tensor]| conv2d(&t[0], &t[1].transpose(0, 1)?, p);
    let g = |t: &[Tensor]| conv2d(&t[0], &t[1].transpose(0, 1)?.contiguous()?, p);
    let (y, gr) = grads(&[x.clone(), k.clone()], &f, 6);
    let (y_ref, gr_ref) = grads(&[x.clone(), k.clone()], &g, 6);
    assert_eq!(max_rel(&y, &y_ref), 0.0);
    assert_eq!(max_rel(&gr[0], &gr_ref[0]), 0.0);
    assert_eq!(max_rel(&gr[1], &gr_ref[1]), 0.0);
    assert!(finite_difference_error(&[x, k], &f, 20, 7) < 1e-7);

    let x = rand(&[2, 4, 5, 5], DType::F64, 8);
    let big = rand(&[6, 4, 1, 1], DType::F64, 9);
    let f = |t: &[Tensor]| conv2d(&t[0], &t[1].narrow(0, 2, 3)?, p);
    let g = |t: &[Tensor]| t[0].conv2d(&t[1].narrow(0, 2, 3)?.contiguous()?, 0, 1, 1, 1);
    let (y, gr) = grads(&[x.clone(), big.clone()], &f, 10);
    let (y_ref, gr_ref) = grads(&[x.clone(), big.clone()], &g, 10);
    assert!(max_rel(&y, &y_ref) < 1e-12);
    assert!(max_rel(&gr[0], &gr_ref[0]) < 1e-12);
    assert!(max_rel(&gr[1], &gr_ref[1]) < 1e-12);
    // Rows 0, 1 and 5 of the big weight are not used: their gradient is zero.
    let unused = (gr[1]
        .narrow(0, 0, 2)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap())
    .to_scalar::<f64>()
    .unwrap();
    assert_eq!(unused, 0.0);
    assert!(finite_difference_error(&[x, big], &f, 20, 11) < 1e-7);
}

#[test]
fn deterministic_across_runs() {
    let c = (9, 8, 11, 11, 16, 3, 2, 1, 1);
    let (x, w) = inputs(&c, DType::F32, 5);
    let run = || {
        let (y, g) = grads(&[x.clone(), w.clone()], &ours(params(&c)), 2);
        [y, g[0].clone(), g[1].clone()].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    };
    assert_eq!(run(), run());
}

/// An empty batch gives an empty output and a zero weight gradient, not an error or a panic.
#[test]
fn empty_batch() {
    let x = rand(&[0, 3, 5, 5], DType::F32, 0);
    for (w, p) in [
        (
            rand(&[4, 3, 3, 3], DType::F32, 1),
            ConvParams {
                padding: 1,
                ..Default::default()
            },
        ),
        (
            rand(&[3, 1, 3, 3], DType::F32, 1),
            ConvParams {
                padding: 1,
                groups: 3,
                ..Default::default()
            },
        ),
    ] {
        let (y, g) = grads(&[x.clone(), w.clone()], &ours(p), 0);
        assert_eq!(y.dims(), &[0, w.dim(0).unwrap(), 5, 5]);
        assert_eq!(g[0].dims(), x.dims());
        assert_eq!(
            g[1].abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}

#[test]
fn bad_shapes_and_dtypes_are_errors() {
    let x = rand(&[2, 4, 5, 5], DType::F32, 0);
    let p = ConvParams::default();
    // Cin mismatch, groups not dividing, kernel larger than the input, rank 3, f16, zero stride.
    assert!(conv2d(&x, &rand(&[4, 3, 3, 3], DType::F32, 1), p).is_err());
    assert!(conv2d(
        &x,
        &rand(&[3, 2, 3, 3], DType::F32, 1),
        ConvParams { groups: 2, ..p }
    )
    .is_err());
    assert!(conv2d(&x, &rand(&[4, 4, 7, 7], DType::F32, 1), p).is_err());
    assert!(conv2d(
        &x.flatten_from(2).unwrap(),
        &rand(&[4, 4, 3, 3], DType::F32, 1),
        p
    )
    .is_err());
    let h = x.to_dtype(DType::F16).unwrap();
    assert!(conv2d(&h, &rand(&[4, 4, 3, 3], DType::F16, 1), p).is_err());
    assert!(conv2d(
        &x,
        &rand(&[4, 4, 3, 3], DType::F32, 1),
        ConvParams { stride: 0, ..p }
    )
    .is_err());
    assert!(conv2d(&x, &rand(&[4, 4, 3, 3], DType::F64, 1), p).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random shapes: forward equals candle's, gradients equal finite differences.
    #[test]
    fn random_shapes(
        b in 1usize..4, cin_g in 1usize..4, cout_g in 1usize..4, groups in 1usize..3,
        h in 3usize..10, w in 3usize..10, k in prop::sample::select(vec![1usize, 3]),
        stride in 1usize..3, padding in 0usize..2, depthwise in any::<bool>(), seed in 0u64..1000,
    ) {
        let (cin, cout, groups) = if depthwise {
            (cin_g * groups + 1, cin_g * groups + 1, cin_g * groups + 1)
        } else {
            (cin_g * groups, cout_g * groups, groups)
        };
        let p = ConvParams { stride, padding, dilation: 1, groups };
        let c = (b, cin, h, w, cout, k, stride, padding, groups);
        let (x, wt) = inputs(&c, DType::F64, seed);
        let y = conv2d(&x, &wt, p).unwrap();
        let y_ref = candle(p)(&[x.clone(), wt.clone()]).unwrap();
        prop_assert!(max_rel(&y, &y_ref) < 1e-12);
        let err = finite_difference_error(&[x, wt], &ours(p), 12, seed);
        prop_assert!(err < 1e-7, "{:?}: finite-difference error {:e}", c, err);
    }
}

/// Dilated 3×3 convolutions: padding 2 keeps the size (the shifted-copy im2col path),
/// padding 1 shrinks it (the general path); both against candle and finite differences.
#[test]
fn dilated_kernels() {
    for padding in [2, 1] {
        let p = ConvParams {
            stride: 1,
            padding,
            dilation: 2,
            groups: 1,
        };
        let x = rand(&[3, 3, 8, 7], DType::F64, 20 + padding as u64);
        let w = rand(&[4, 3, 3, 3], DType::F64, 30);
        let (y, g) = grads(&[x.clone(), w.clone()], &ours(p), 1);
        let (y_ref, g_ref) = grads(&[x.clone(), w.clone()], &candle(p), 1);
        assert!(max_rel(&y, &y_ref) < 1e-12, "padding {padding}");
        assert!(max_rel(&g[0], &g_ref[0]) < 1e-12, "padding {padding}");
        assert!(max_rel(&g[1], &g_ref[1]) < 1e-12, "padding {padding}");
        assert!(finite_difference_error(&[x, w], &ours(p), 30, 2) < 1e-7);
    }
}
