//! Helpers shared by the integration tests: fixture paths, manifests, image statistics.
#![allow(dead_code)]

use std::path::PathBuf;

use image::RgbImage;

/// `tests/data/<rel>`.
pub fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// A fixture folder's manifest.json.
pub fn manifest(dir: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(data(dir).join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Mean of each channel, in channel order of the image (R, G, B for an `RgbImage`).
pub fn mean_rgb(img: &RgbImage) -> [f64; 3] {
    let mut sum = [0f64; 3];
    for p in img.pixels() {
        for (s, &v) in sum.iter_mut().zip(&p.0) {
            *s += f64::from(v);
        }
    }
    let n = f64::from(img.width() * img.height());
    sum.map(|s| s / n)
}

/// Asserts the decoded image's mean RGB is within `tol` of the manifest's (pre-encoding) mean.
pub fn assert_mean_rgb(img: &RgbImage, want: &serde_json::Value, tol: f64, what: &str) {
    let got = mean_rgb(img);
    let want: Vec<f64> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for c in 0..3 {
        assert!(
            (got[c] - want[c]).abs() <= tol,
            "{what}: mean RGB {got:?}, manifest {want:?}"
        );
    }
}
