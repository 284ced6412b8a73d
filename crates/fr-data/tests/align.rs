//! Alignment against insightface's reference path: `tests/data/align` holds a noise image,
//! five landmarks, and what scikit-image's `SimilarityTransform.estimate` and OpenCV's
//! `cv2.warpAffine(..., borderValue=0.0)` produced from them (`norm_crop` at 112 and 128).

mod common;

use common::{data, manifest};
use fr_data::align::{align_face, estimate_norm, warp_affine, Similarity};
use image::RgbImage;

fn load(name: &str) -> RgbImage {
    image::open(data("align").join(name)).unwrap().to_rgb8()
}

fn landmarks(m: &serde_json::Value) -> [[f32; 2]; 5] {
    let v: Vec<Vec<f64>> = serde_json::from_value(m["landmarks"].clone()).unwrap();
    std::array::from_fn(|i| [v[i][0] as f32, v[i][1] as f32])
}

/// (max |Δ|, number of channel values that differ, mean |Δ|).
fn compare(a: &RgbImage, b: &RgbImage) -> (u8, usize, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut max, mut n, mut sum) = (0u8, 0usize, 0u64);
    for (p, q) in a.pixels().zip(b.pixels()) {
        for c in 0..3 {
            let d = p.0[c].abs_diff(q.0[c]);
            max = max.max(d);
            n += usize::from(d > 0);
            sum += u64::from(d);
        }
    }
    (max, n, sum as f64 / (3 * a.width() * a.height()) as f64)
}

#[test]
fn matches_skimage_and_opencv() {
    let m = manifest("align");
    let src = load("source.png");
    let lmk = landmarks(&m);
    for size in [112u32, 128] {
        let reference = &m["sizes"][size.to_string()];
        let want: Vec<Vec<f64>> = serde_json::from_value(reference["matrix"].clone()).unwrap();
        let got = estimate_norm(lmk, size).unwrap();
        let err = got
            .matrix
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!("{size}: matrix vs scikit-image: max error {err:e}");
        assert!(err < 1e-5, "{size}: {got:?} vs {want:?}");

        let cv = load(reference["image"].as_str().unwrap());
        let exact = Similarity {
            matrix: [
                [want[0][0], want[0][1], want[0][2]],
                [want[1][0], want[1][1], want[1][2]],
            ],
        };
        let (max, n, mean) = compare(&warp_affine(&src, &exact, size, size), &cv);
        eprintln!("{size}: warp_affine vs cv2.warpAffine: max |Δ| {max}, {n} values differ, mean |Δ| {mean:.4}");
        // OpenCV rounds coordinates to 1/32 pixel and weights to 15 bits; we evaluate in f64.
        let budget = (3 * size * size / 1000) as usize; // 0.1 % of the values
        assert!(max <= 1 && n <= budget, "{size}: warp differs from OpenCV");
        let (max2, n2, mean2) = compare(&align_face(&src, lmk, size).unwrap(), &cv);
        eprintln!("{size}: align_face vs norm_crop: max |Δ| {max2}, {n2} values differ, mean |Δ| {mean2:.4}");
        assert!(
            max2 <= 1 && n2 <= budget,
            "{size}: align_face differs from norm_crop"
        );
    }
}
