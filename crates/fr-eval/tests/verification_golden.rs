//! insightface `eval/verification.py` (`evaluate`, 10 folds) on 600 synthetic pairs; the
//! expected numbers come from running the reference (see tests/golden/verification.json).

use fr_eval::verification::{
    evaluate, evaluate_scores, pair_scores, PairScores, VerificationConfig, VerificationReport,
};
use ndarray::Array2;
use serde_json::Value;

struct Golden {
    embeddings: Array2<f64>,
    issame: Vec<bool>,
    out: Value,
}

fn golden() -> Golden {
    let text = include_str!("golden/verification.json");
    let v: Value = serde_json::from_str(text).unwrap();
    let e1 = v["inputs"]["embeddings1"].as_array().unwrap();
    let e2 = v["inputs"]["embeddings2"].as_array().unwrap();
    let dim = v["inputs"]["dim"].as_u64().unwrap() as usize;
    let n = e1.len();
    // Interleaved as the reference receives them: row 2i = embeddings1[i], 2i+1 = embeddings2[i].
    let embeddings = Array2::from_shape_fn((2 * n, dim), |(r, c)| {
        let src = if r % 2 == 0 { e1 } else { e2 };
        src[r / 2][c].as_f64().unwrap()
    });
    let issame = v["inputs"]["actual_issame"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() == 1)
        .collect();
    Golden {
        embeddings,
        issame,
        out: v["outputs"].clone(),
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Checks every reference output; returns the largest absolute difference seen.
fn check(report: &VerificationReport, out: &Value, tol: f64) -> f64 {
    let idx: Vec<usize> = out["best_threshold_index_per_fold"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(report.best_threshold_indices, idx);
    let pairs: [(&str, &[f64]); 9] = [
        ("accuracy_per_fold", &report.accuracy_per_fold),
        ("best_threshold_per_fold", &report.best_thresholds),
        ("tpr_curve", &report.tpr_curve),
        ("fpr_curve", &report.fpr_curve),
        ("val_threshold_per_fold", &report.val_thresholds),
        ("val_per_fold", &report.val_per_fold),
        ("far_per_fold", &report.far_per_fold),
        ("accuracy_mean", std::slice::from_ref(&report.accuracy_mean)),
        ("accuracy_std", std::slice::from_ref(&report.accuracy_std)),
    ];
    let mut worst = 0.0f64;
    for (key, ours) in pairs {
        let want = match &out[key] {
            Value::Array(_) => floats(&out[key]),
            x => vec![x.as_f64().unwrap()],
        };
        let err = max_abs_diff(ours, &want);
        assert!(err <= tol, "{key}: max |error| {err:e} > {tol:e}");
        worst = worst.max(err);
    }
    for (key, ours) in [
        ("val_mean", report.val_mean),
        ("val_std", report.val_std),
        ("far_mean", report.far_mean),
    ] {
        let err = (ours - out[key].as_f64().unwrap()).abs();
        assert!(err <= tol, "{key}: |error| {err:e} > {tol:e}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn squared_distances_match_reference() {
    let g = golden();
    let scores = pair_scores(g.embeddings.view()).unwrap();
    let want = floats(&g.out["squared_l2_distance"]);
    // The reference's `evaluate` receives these (already unit) vectors as they are; we
    // normalise again (as its `test` does), and their norms differ from 1 by up to 5.6e-16,
    // which moves the distances by a few ulps (measured 1.3e-15). Without that step the sum is
    // numpy's bit for bit (see `reference_distances_reproduce_every_output_exactly`).
    let err = max_abs_diff(&scores.squared_distance, &want);
    println!("squared distance max |error| = {err:e}");
    assert!(err <= 2e-15, "{err:e}");
    // Unit vectors: ‖a − b‖² = 2 − 2 cos.
    let err_cos = scores
        .cosine
        .iter()
        .zip(&want)
        .map(|(c, d)| (2.0 - 2.0 * c - d).abs())
        .fold(0.0, f64::max);
    assert!(err_cos <= 1e-14, "{err_cos:e}");
}

#[test]
fn reference_distances_reproduce_every_output_exactly() {
    let g = golden();
    let d = floats(&g.out["squared_l2_distance"]);
    let report = evaluate_scores(
        PairScores::SquaredDistance(&d),
        &g.issame,
        &VerificationConfig::default(),
    )
    .unwrap();
    let worst = check(&report, &g.out, 0.0);
    assert_eq!(worst, 0.0);
    assert_eq!(report.n_pairs, 600);
    assert_eq!(report.n_genuine, 300);
}

#[test]
fn embeddings_reproduce_every_output() {
    let g = golden();
    let report = evaluate(
        g.embeddings.view(),
        &g.issame,
        &VerificationConfig::default(),
    )
    .unwrap();
    // The few-ulp distance differences move no pair across a threshold, so every output is
    // identical here; 1e-12 leaves room for other platforms' sqrt/division of the norms.
    let worst = check(&report, &g.out, 1e-12);
    println!("embeddings path: max |error| over all outputs = {worst:e}");
    // f32 embeddings (what a model gives) still land on the same folds' choices here.
    let e32 = g.embeddings.mapv(|x| x as f32);
    let r32 = evaluate(e32.view(), &g.issame, &VerificationConfig::default()).unwrap();
    assert_eq!(r32.best_threshold_indices, report.best_threshold_indices);
    assert_eq!(r32.accuracy_per_fold, report.accuracy_per_fold);
}

#[test]
fn fold_layout_matches_kfold() {
    let g = golden();
    let folds = g.out["fold_test_indices"].as_array().unwrap();
    assert_eq!(folds.len(), 10);
    for (f, fold) in folds.iter().enumerate() {
        let idx: Vec<u64> = fold
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let want: Vec<u64> = (60 * f as u64..60 * (f as u64 + 1)).collect();
        assert_eq!(idx, want, "fold {f}");
    }
}

#[test]
fn roc_extras_are_consistent() {
    let g = golden();
    let cfg = VerificationConfig {
        far_targets: vec![1e-3, 1e-2, 1e-1],
        max_roc_points: 50,
        ..VerificationConfig::default()
    };
    let report = evaluate(g.embeddings.view(), &g.issame, &cfg).unwrap();
    assert_eq!(
        report.tar_at_far.iter().map(|p| p.0).collect::<Vec<_>>(),
        cfg.far_targets
    );
    // TAR grows with FAR; AUC and EER agree with ~90 % accuracy.
    assert!(report.tar_at_far.windows(2).all(|w| w[0].1 <= w[1].1));
    assert!(report.auc > 0.9 && report.auc < 1.0, "{}", report.auc);
    assert!(report.eer > 0.05 && report.eer < 0.15, "{}", report.eer);
    assert!(report.roc_fpr.len() <= 50 && report.roc_fpr.len() == report.roc_tpr.len());
    assert_eq!(
        (report.roc_fpr[0], *report.roc_tpr.last().unwrap()),
        (0.0, 1.0)
    );
    // Cosine input gives the same ROC quantities.
    let s = pair_scores(g.embeddings.view()).unwrap();
    let by_cos = evaluate_scores(PairScores::Cosine(&s.cosine), &g.issame, &cfg).unwrap();
    assert_eq!(by_cos.auc, report.auc);
    assert_eq!(by_cos.tar_at_far, report.tar_at_far);
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["accuracy_mean"].is_f64() && json["tar_at_far"][0][1].is_f64());
}
