//! The depthwise path of fr-kernels' conv2d (groups = Cin = Cout) against a direct loop
//! implementation and finite differences, over strides, dilations, paddings, kernel shapes and
//! small maps (PocketNet's 7×7 stride-2 taps on 8×8 and smaller maps). candle's grouped
//! convolution is no reference here: its backward fails with a shape error on some strided
//! shapes (a 1×1 stride-2 kernel on a 5×6 map).

mod common;

use candle_core::{DType, Result, Tensor, Var};
use common::{finite_difference_error, grads, max_rel, rand};
use fr_kernels::{conv2d, ConvParams};

/// (B, C, H, W, kh, kw, stride, padding, dilation)
const CASES: &[[usize; 9]] = &[
    [2, 3, 8, 8, 7, 7, 2, 3, 1],
    [2, 3, 8, 8, 5, 5, 2, 2, 1],
    [1, 4, 4, 4, 7, 7, 2, 3, 1],
    [2, 2, 9, 7, 3, 3, 2, 1, 1],
    [2, 2, 6, 5, 3, 3, 1, 1, 1],
    [1, 3, 5, 6, 1, 1, 2, 0, 1],
    [2, 2, 7, 7, 1, 1, 1, 0, 1],
    [1, 2, 7, 9, 3, 3, 3, 1, 1],
    [1, 2, 9, 8, 3, 3, 1, 2, 2],
    [1, 2, 9, 8, 3, 3, 2, 1, 2],
    [2, 2, 5, 7, 3, 5, 1, 2, 1],
    [1, 2, 6, 6, 3, 3, 1, 0, 1],
    [1, 1, 1, 1, 3, 3, 1, 1, 1],
    [1, 2, 2, 3, 5, 5, 2, 2, 1],
    [1, 2, 3, 3, 3, 3, 2, 3, 1],
];

fn params(c: usize, stride: usize, padding: usize, dilation: usize) -> ConvParams {
    ConvParams {
        stride,
        padding,
        dilation,
        groups: c,
    }
}

/// Direct depthwise convolution: `y` and the gradients of `Σ y·r` with respect to `x` and the
/// weight, by plain loops over every output and tap.
#[allow(clippy::type_complexity)]
fn direct(
    x: &Tensor,
    wt: &Tensor,
    r: &Tensor,
    (s, p, d): (usize, usize, usize),
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b, c, h, w) = x.dims4().unwrap();
    let (_, _, kh, kw) = wt.dims4().unwrap();
    let (ho, wo) = (
        (h + 2 * p - d * (kh - 1) - 1) / s + 1,
        (w + 2 * p - d * (kw - 1) - 1) / s + 1,
    );
    let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let ws: Vec<f64> = wt.flatten_all().unwrap().to_vec1().unwrap();
    let rs: Vec<f64> = r.flatten_all().unwrap().to_vec1().unwrap();
    let (mut y, mut dx, mut dw) = (
        vec![0.0; b * c * ho * wo],
        vec![0.0; xs.len()],
        vec![0.0; ws.len()],
    );
    for n in 0..b * c {
        let ch = n % c;
        for oy in 0..ho {
            for ox in 0..wo {
                let o = (n * ho + oy) * wo + ox;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy = (oy * s + ky * d) as isize - p as isize;
                        let ix = (ox * s + kx * d) as isize - p as isize;
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let i = (n * h + iy as usize) * w + ix as usize;
                        let k = (ch * kh + ky) * kw + kx;
                        y[o] += ws[k] * xs[i];
                        dx[i] += ws[k] * rs[o];
                        dw[k] += xs[i] * rs[o];
                    }
                }
            }
        }
    }
    (y, dx, dw)
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-12 * (1.0 + y.abs()))
}

#[test]
fn matches_the_direct_computation_and_finite_differences() {
    for (i, &[b, c, h, w, kh, kw, s, p, d]) in CASES.iter().enumerate() {
        let case = CASES[i];
        let x = rand(&[b, c, h, w], DType::F64, i as u64);
        let wt = rand(&[c, 1, kh, kw], DType::F64, 50 + i as u64);
        let cp = params(c, s, p, d);
        let ours = move |t: &[Tensor]| conv2d(&t[0], &t[1], cp);
        let inputs = [x.clone(), wt.clone()];
        let (y, g) = grads(&inputs, &ours, 3);
        let r = rand(y.dims(), DType::F64, 3); // the output weights `grads` used
        let (y_want, dx_want, dw_want) = direct(&x, &wt, &r, (s, p, d));
        assert!(close(&flat(&y), &y_want), "forward {case:?}");
        assert!(close(&flat(&g[0]), &dx_want), "dx {case:?}");
        assert!(close(&flat(&g[1]), &dw_want), "dw {case:?}");
        let err = finite_difference_error(&inputs, &ours, 30, i as u64);
        assert!(err < 1e-7, "{case:?}: finite-difference error {err:e}");
    }
}

#[test]
fn one_sided_gradients_equal_the_full_backward() {
    let (b, c, h, w, k, s, p) = (3, 4, 8, 8, 7, 2, 3);
    let x = rand(&[b, c, h, w], DType::F64, 1);
    let wt = rand(&[c, 1, k, k], DType::F64, 2);
    let r = rand(&[b, c, 4, 4], DType::F64, 3);
    let cp = params(c, s, p, 1);
    let loss = |x: &Tensor, wt: &Tensor| -> Result<Tensor> { (conv2d(x, wt, cp)? * &r)?.sum_all() };
    let (xv, wv) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&wt).unwrap(),
    );
    let both = loss(xv.as_tensor(), wv.as_tensor())
        .unwrap()
        .backward()
        .unwrap();
    let only_x = loss(xv.as_tensor(), &wt).unwrap().backward().unwrap();
    let only_w = loss(&x, wv.as_tensor()).unwrap().backward().unwrap();
    assert!(only_x.get(&wt).is_none() && only_w.get(&x).is_none());
    let get = |g: &candle_core::backprop::GradStore, t: &Var| g.get(t.as_tensor()).unwrap().clone();
    assert_eq!(max_rel(&get(&only_x, &xv), &get(&both, &xv)), 0.0);
    assert_eq!(max_rel(&get(&only_w, &wv), &get(&both, &wv)), 0.0);
}

#[test]
fn f32_matches_f64_and_is_deterministic() {
    let (b, c, h, w) = (8, 16, 16, 16);
    for (k, s) in [(3, 1), (5, 1), (7, 2), (3, 2), (1, 2)] {
        let x = rand(&[b, c, h, w], DType::F64, k as u64);
        let wt = rand(&[c, 1, k, k], DType::F64, 10 + s as u64);
        let cp = params(c, s, k / 2, 1);
        let f = move |t: &[Tensor]| conv2d(&t[0], &t[1], cp);
        let (y64, g64) = grads(&[x.clone(), wt.clone()], &f, 4);
        let inputs32 = [
            x.to_dtype(DType::F32).unwrap(),
            wt.to_dtype(DType::F32).unwrap(),
        ];
        let (y32, g32) = grads(&inputs32, &f, 4);
        let (y32b, g32b) = grads(&inputs32, &f, 4);
        assert!(max_rel(&y32, &y64) < 1e-5, "k{k} s{s}");
        assert!(max_rel(&g32[0], &g64[0]) < 1e-5, "k{k} s{s}");
        assert!(max_rel(&g32[1], &g64[1]) < 1e-4, "k{k} s{s}");
        assert_eq!(max_rel(&y32, &y32b), 0.0);
        assert_eq!(max_rel(&g32[1], &g32b[1]), 0.0);
    }
}
