//! Verification `.bin` fixtures pickled four ways, plus a non-pickle and a truncated file.

mod common;

use common::{assert_mean_rgb, data, manifest};
use fr_data::verification_bin::{load_bin_sized, read_bin_encoded};
use fr_data::{load_bin, Error};

const VARIANTS: [&str; 4] = [
    "pairs_py2_str.bin",
    "pairs_bytes_p2.bin",
    "pairs_bytes_p4.bin",
    "pairs_numpy_p4.bin",
];

#[test]
fn every_variant_matches_the_manifest() {
    let m = manifest("bin");
    let want_issame: Vec<bool> = m["issame"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let images = m["images"].as_array().unwrap();
    for file in VARIANTS {
        let set = load_bin(data("bin").join(file)).unwrap();
        assert_eq!(set.name, file.trim_end_matches(".bin"));
        assert_eq!(set.issame, want_issame, "{file}");
        assert_eq!(set.num_pairs(), 4);
        assert_eq!(set.images.len(), images.len(), "{file}");
        for (i, (img, want)) in set.images.iter().zip(images).enumerate() {
            assert_eq!(img.dimensions(), (112, 112));
            assert_mean_rgb(img, &want["mean_rgb"], 3.0, &format!("{file} image {i}"));
        }
        // Pair i is images 2i and 2i+1: same-identity pairs have the same manifest label.
        for (i, (a, b, same)) in set.pairs().enumerate() {
            assert!(std::ptr::eq(a, &set.images[2 * i]) && std::ptr::eq(b, &set.images[2 * i + 1]));
            let (la, lb) = (&images[2 * i]["label"], &images[2 * i + 1]["label"]);
            assert_eq!(la == lb, same, "{file} pair {i}");
        }
    }
}

#[test]
fn variants_hold_the_same_encoded_images() {
    let (ref_bins, ref_issame) = read_bin_encoded(data("bin/pairs_bytes_p4.bin")).unwrap();
    assert!(ref_bins[5].starts_with(b"\x89PNG"));
    assert!(ref_bins[0].starts_with(&[0xFF, 0xD8, 0xFF]));
    for file in VARIANTS {
        let (bins, issame) = read_bin_encoded(data("bin").join(file)).unwrap();
        assert_eq!(issame, ref_issame, "{file}");
        assert_eq!(bins.len(), ref_bins.len(), "{file}");
        for (i, (b, r)) in bins.iter().zip(&ref_bins).enumerate() {
            assert_eq!(b[..4], r[..4], "{file} image {i} format");
        }
    }
}

#[test]
fn resizes_to_the_requested_size() {
    let set = load_bin_sized(data("bin/pairs_numpy_p4.bin"), 56).unwrap();
    assert!(set.images.iter().all(|i| i.dimensions() == (56, 56)));
}

fn assert_format_error(file: &str, needle: &str) {
    let err = load_bin(data("bin").join(file)).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(file), "{msg}");
    assert!(msg.contains(needle), "{msg}");
}

#[test]
fn not_a_pickle_is_rejected_naming_the_file() {
    assert_format_error("not_a_pickle.bin", "not a pickle");
}

#[test]
fn truncated_pickle_is_rejected_naming_the_file() {
    assert_format_error("truncated.bin", "truncated pickle");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let err = load_bin(data("bin/lfw_missing.bin")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("lfw_missing.bin"));
}
