//! Flip-add embedding with toy embedders, and the error cases of every entry point.

use fr_eval::{
    embed_with_flip, embed_with_flip_progress, evaluate, evaluate_scores, Embedder, EvalError,
    PairScores, VerificationConfig,
};
use ndarray::{Array2, Array4, ArrayView4, Axis};

/// embedding = W · vec(image), W (D, 3·H·W) with no symmetry, so a flip changes the result.
struct Linear {
    w: Array2<f32>,
    calls: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("toy failure")]
struct ToyError;

impl Embedder for Linear {
    type Error = ToyError;
    fn embed(&mut self, images: ArrayView4<f32>) -> Result<Array2<f32>, ToyError> {
        self.calls.push(images.len_of(Axis(0)));
        let n = images.len_of(Axis(0));
        let flat = images
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((n, self.w.ncols()))
            .unwrap();
        Ok(flat.dot(&self.w.t()))
    }
}

fn images(n: usize, h: usize, w: usize) -> Array4<f32> {
    Array4::from_shape_fn((n, 3, h, w), |(i, c, y, x)| {
        ((i * 31 + c * 7 + y * 5 + x * x * 3) % 17) as f32 / 8.0 - 1.0
    })
}

fn toy(d: usize, len: usize) -> Linear {
    Linear {
        w: Array2::from_shape_fn((d, len), |(r, k)| ((r * 13 + k * 7) % 11) as f32 - 5.0),
        calls: Vec::new(),
    }
}

#[test]
fn flip_add_equals_manual_sum_and_batching_is_invisible() {
    let (n, h, w) = (7, 4, 5);
    let imgs = images(n, h, w);
    let mut model = toy(6, 3 * h * w);
    let mut seen = Vec::new();
    let got =
        embed_with_flip_progress(&mut model, imgs.view(), 3, |d, t| seen.push((d, t))).unwrap();
    assert_eq!(seen, vec![(3, 7), (6, 7), (7, 7)]);
    // original and flipped batch per step
    assert_eq!(model.calls, vec![3, 3, 3, 3, 1, 1]);

    // Manual: flip along W by index, embed both, add.
    let flipped = Array4::from_shape_fn((n, 3, h, w), |(i, c, y, x)| imgs[[i, c, y, w - 1 - x]]);
    let mut plain = toy(6, 3 * h * w);
    let a = plain.embed(imgs.view()).unwrap();
    let b = plain.embed(flipped.view()).unwrap();
    let want = &a + &b;
    let err = (&got - &want).iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(err <= 1e-5, "{err}");
    // The flip matters for this map, so flip-add is not 2 × the plain embedding.
    assert!((&got - &(&a * 2.0)).iter().any(|v| v.abs() > 1e-3));
    // Batch size does not change the result beyond float rounding.
    let one_batch = embed_with_flip(&mut toy(6, 3 * h * w), imgs.view(), 100).unwrap();
    let err = (&got - &one_batch)
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(err <= 1e-5, "{err}");
}

#[test]
fn symmetric_images_give_twice_the_embedding() {
    // Images symmetric in W: flip-add = 2 × embed, exactly.
    let (h, w) = (3, 4);
    let imgs = Array4::from_shape_fn((2, 3, h, w), |(i, c, y, x)| {
        let m = x.min(w - 1 - x);
        (i + c + y * m) as f32
    });
    let mut model = toy(5, 3 * h * w);
    let got = embed_with_flip(&mut model, imgs.view(), 2).unwrap();
    let plain = toy(5, 3 * h * w).embed(imgs.view()).unwrap();
    assert_eq!(got, &plain * 2.0);
}

struct Failing {
    fail_at_call: usize,
    calls: usize,
    rows: Option<usize>,
}

impl Embedder for Failing {
    type Error = ToyError;
    fn embed(&mut self, images: ArrayView4<f32>) -> Result<Array2<f32>, ToyError> {
        self.calls += 1;
        if self.calls == self.fail_at_call {
            return Err(ToyError);
        }
        let n = self.rows.unwrap_or(images.len_of(Axis(0)));
        Ok(Array2::zeros((n, 4)))
    }
}

#[test]
fn embedder_failures_and_bad_answers_are_errors() {
    let imgs = images(5, 2, 2);
    let mut m = Failing {
        fail_at_call: 3,
        calls: 0,
        rows: None,
    };
    match embed_with_flip(&mut m, imgs.view(), 2) {
        Err(
            e @ EvalError::Embedder {
                start: 2, end: 4, ..
            },
        ) => {
            assert!(e.to_string().contains("toy failure"));
            assert!(std::error::Error::source(&e).is_some());
        }
        other => panic!("{other:?}"),
    }
    let mut m = Failing {
        fail_at_call: 0,
        calls: 0,
        rows: Some(1),
    };
    assert!(matches!(
        embed_with_flip(&mut m, imgs.view(), 2),
        Err(EvalError::ShapeMismatch { .. })
    ));
    let mut m = toy(2, 12);
    assert!(matches!(
        embed_with_flip(&mut m, imgs.view(), 0),
        Err(EvalError::InvalidParameter {
            name: "batch_size",
            ..
        })
    ));
    assert!(matches!(
        embed_with_flip(&mut m, images(0, 2, 2).view(), 4),
        Err(EvalError::Empty { what: "images" })
    ));
}

#[test]
fn verification_input_errors() {
    let cfg = VerificationConfig::default();
    let emb = Array2::<f32>::from_shape_fn((21, 4), |(r, c)| (r + c) as f32);
    let issame = vec![true; 10];
    assert!(matches!(
        evaluate(emb.view(), &issame, &cfg),
        Err(EvalError::OddEmbeddings { rows: 21 })
    ));
    let emb = Array2::<f32>::from_shape_fn((20, 4), |(r, c)| (r * c) as f32 + 1.0);
    let e = evaluate(emb.view(), &issame[..9], &cfg).unwrap_err();
    assert!(
        matches!(
            e,
            EvalError::LengthMismatch {
                left_len: 10,
                right_len: 9,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("10") && e.to_string().contains('9'));
    assert!(matches!(
        evaluate(Array2::<f32>::zeros((0, 4)).view(), &[], &cfg),
        Err(EvalError::Empty { .. })
    ));
    assert!(matches!(
        evaluate_scores(PairScores::Cosine(&[]), &[], &cfg),
        Err(EvalError::Empty { .. })
    ));
    let mut bad = emb.clone();
    bad[[3, 1]] = f32::NAN;
    assert!(matches!(
        evaluate(bad.view(), &issame, &cfg),
        Err(EvalError::NonFinite { index: 13, .. })
    ));
    // Fewer pairs than folds.
    let nine: Vec<bool> = (0..9).map(|i| i % 2 == 0).collect();
    assert!(matches!(
        evaluate_scores(PairScores::Cosine(&[0.5; 9]), &nine, &cfg),
        Err(EvalError::InvalidParameter {
            name: "n_folds",
            ..
        })
    ));
    // A fold without impostors.
    let all_same = vec![true; 10];
    assert!(matches!(
        evaluate_scores(PairScores::Cosine(&[0.5; 10]), &all_same, &cfg),
        Err(EvalError::MissingClass { .. })
    ));
    assert!(matches!(
        evaluate_scores(PairScores::SquaredDistance(&[-0.1; 10]), &issame, &cfg),
        Err(EvalError::InvalidParameter {
            name: "distances",
            ..
        })
    ));
}

#[test]
fn single_fold_trains_and_tests_on_everything() {
    // insightface LFold(1): train = test = all pairs; a separable set is then 100 % accurate.
    let issame: Vec<bool> = (0..20).map(|i| i < 10).collect();
    let d: Vec<f64> = (0..20).map(|i| if i < 10 { 0.5 } else { 1.5 }).collect();
    let cfg = VerificationConfig {
        n_folds: 1,
        ..VerificationConfig::default()
    };
    let r = evaluate_scores(PairScores::SquaredDistance(&d), &issame, &cfg).unwrap();
    assert_eq!(r.accuracy_per_fold, vec![1.0]);
    assert_eq!(r.best_threshold_indices, vec![51]);
    assert_eq!((r.auc, r.eer), (1.0, 0.0));
}
