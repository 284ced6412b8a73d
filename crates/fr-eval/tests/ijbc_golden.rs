//! insightface `eval_ijbc.py` step 5 (sklearn `roc_curve` + nearest-FPR TAR@FAR) on 200,000
//! synthetic float32 scores with many ties; expected values from tests/golden/ijbc_tar_at_far.json.

use fr_eval::roc::{auc, eer, roc_curve, tar_at_far};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn load() -> (Vec<bool>, Vec<f64>, Value) {
    let v: Value = serde_json::from_str(include_str!("golden/ijbc_tar_at_far.json")).unwrap();
    let bytes = base64::decode(v["inputs"]["scores_f32_le_base64"].as_str().unwrap()).unwrap();
    let n = v["inputs"]["n_scores"].as_u64().unwrap() as usize;
    assert_eq!(bytes.len(), 4 * n);
    // float32 little-endian, widened to float64 (exact), as the reference does.
    let scores: Vec<f64> = bytes
        .chunks_exact(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let mut labels = vec![false; n];
    for g in v["inputs"]["genuine_indices"].as_array().unwrap() {
        labels[g.as_u64().unwrap() as usize] = true;
    }
    assert_eq!(labels.iter().filter(|&&l| l).count(), 4000);
    (labels, scores, v["outputs"].clone())
}

#[test]
fn roc_curve_matches_sklearn_exactly() {
    let (labels, scores, out) = load();
    let roc = roc_curve(&labels, &scores).unwrap();
    assert_eq!(roc.len(), out["roc_n_points"].as_u64().unwrap() as usize);
    assert_eq!(roc.len(), 9629);
    assert_eq!(roc.fpr, floats(&out["roc_fpr"]));
    assert_eq!(roc.tpr, floats(&out["roc_tpr"]));
    let want_thr = floats(&out["roc_thresholds"]);
    // sklearn 1.1.3 (the reference run) wrote max(score) + 1 first; we write +inf like
    // sklearn >= 1.3. Every other threshold is the same.
    assert_eq!(roc.thresholds[0], f64::INFINITY);
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(want_thr[0], max + 1.0);
    assert_eq!(roc.thresholds[1..], want_thr[1..]);
    assert_eq!((roc.n_genuine, roc.n_impostor), (4000, 196_000));
}

#[test]
fn tar_at_far_and_auc_match_reference_exactly() {
    let (labels, scores, out) = load();
    let roc = roc_curve(&labels, &scores).unwrap();
    for row in out["tar_at_far"].as_array().unwrap() {
        let far = row["far_target"].as_f64().unwrap();
        let p = tar_at_far(&roc, far).unwrap();
        let idx = row["index_in_roc_curve"].as_u64().unwrap() as usize;
        assert_eq!(p.index, idx, "far {far}");
        assert_eq!(
            roc.len() - 1 - p.index,
            row["index_in_flipped"].as_u64().unwrap() as usize
        );
        assert_eq!(p.tar, row["tar"].as_f64().unwrap(), "far {far}");
        assert_eq!(p.fpr, row["fpr_at_point"].as_f64().unwrap(), "far {far}");
        assert_eq!(p.threshold, row["threshold_at_point"].as_f64().unwrap());
        assert_eq!(
            format!("{:.2}", p.tar * 100.0),
            row["reference_printed_percent"].as_str().unwrap()
        );
    }
    let a = auc(&roc);
    let want = out["auc"].as_f64().unwrap();
    println!("auc {a} reference {want} |error| {:e}", (a - want).abs());
    assert_eq!(a, want);
    // EER: where FAR = 1 − TAR on the curve; check the defining property.
    let e = eer(&roc);
    let k = roc.fpr.iter().position(|&f| f >= e).unwrap();
    assert!(roc.tpr[k] >= 1.0 - e - 1e-12 && roc.tpr[k - 1] <= 1.0 - e + 1e-12);
    assert!(e > 0.0 && e < 0.1, "{e}");
}

#[test]
fn order_of_pairs_does_not_matter() {
    let (labels, scores, _) = load();
    let roc = roc_curve(&labels, &scores).unwrap();
    let (rl, rs): (Vec<bool>, Vec<f64>) = labels.iter().zip(&scores).rev().unzip();
    assert_eq!(roc_curve(&rl, &rs).unwrap(), roc);
}

/// eval_ijbc.py's image flags, media pooling, template sum + normalisation and pair scores
/// (tests/golden/ijbc_template_aggregation.json: 14 images, 5 templates with repeated media,
/// insightface's default flags and all flags off).
#[test]
fn template_aggregation_matches_eval_ijbc() {
    use fr_eval::ijb::{image_features, pair_scores, templates, IjbFlags};
    use ndarray::Array2;
    let v: Value =
        serde_json::from_str(include_str!("golden/ijbc_template_aggregation.json")).unwrap();
    let inp = &v["inputs"];
    let rows: Vec<Vec<f64>> = inp["img_feats"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let (n, w) = (rows.len(), rows[0].len());
    let feats =
        Array2::from_shape_vec((n, w), rows.iter().flatten().map(|&x| x as f32).collect()).unwrap();
    let ints = |k: &str| -> Vec<i64> {
        inp[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let faceness: Vec<f32> = floats(&inp["faceness_scores"])
        .iter()
        .map(|&x| x as f32)
        .collect();
    for (case, flags) in [
        ("insightface_defaults", IjbFlags::default()),
        (
            "all_off",
            IjbFlags {
                flip: false,
                keep_norm: false,
                detector_score: false,
            },
        ),
    ] {
        let out = &v["outputs"][case];
        assert_eq!(out["use_flip_test"].as_bool(), Some(flags.flip));
        assert_eq!(out["use_norm_score"].as_bool(), Some(flags.keep_norm));
        let img = image_features(feats.view(), &faceness, flags).unwrap();
        let want_img: Vec<f64> = out["image_input_features"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(floats)
            .collect();
        let worst_img = img
            .iter()
            .zip(&want_img)
            .map(|(a, b)| (f64::from(*a) - b).abs() / b.abs().max(1.0))
            .fold(0.0, f64::max);
        assert!(worst_img < 1e-12, "{case}: image features {worst_img:e}");
        let t = templates(img.view(), &ints("templates"), &ints("medias")).unwrap();
        let want_ids: Vec<i64> = out["unique_templates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(t.ids, want_ids);
        let want_t: Vec<f64> = out["template_norm_feats"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(floats)
            .collect();
        let worst_t = t
            .features
            .iter()
            .zip(&want_t)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst_t < 1e-12, "{case}: template features {worst_t:e}");
        let s = pair_scores(&t, &ints("pairs_p1"), &ints("pairs_p2")).unwrap();
        let worst_s = s
            .iter()
            .zip(floats(&out["pair_scores"]))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst_s < 1e-12, "{case}: pair scores {worst_s:e}");
        eprintln!("{case}: image {worst_img:.1e}, templates {worst_t:.1e}, scores {worst_s:.1e}");
    }
}
