//! fr-eval: face-recognition evaluation protocols on host arrays (`ndarray`).
//!
//! * [`verification`]: insightface's 10-fold pair verification (LFW, CFP-FP, AgeDB-30, …):
//!   accuracy ± std, VAL@FAR, plus TAR@FAR, AUC and EER.
//! * [`roc`]: scikit-learn-compatible ROC curve, eval_ijbc.py TAR@FAR rule, AUC, EER.
//! * [`embed`]: flip-added embeddings from any [`Embedder`].
//! * [`ijb`]: IJB-B / IJB-C template aggregation, 1:1 TAR@FAR and open-set 1:N (TPIR@FPIR, CMC).
//! * [`uniform`]: uniform classification accuracy (one global threshold for all samples).
//!
//! ```
//! use fr_eval::verification::{evaluate, VerificationConfig};
//! use ndarray::Array2;
//!
//! // 40 pairs of 4-d embeddings: pair i = rows 2i, 2i+1; even pairs genuine (near-copies).
//! let emb = Array2::from_shape_fn((80, 4), |(r, c)| {
//!     let pair = r / 2;
//!     let id = if pair % 2 == 0 || r % 2 == 0 { pair } else { pair + 17 };
//!     ((id * 7 + c * 3) % 11) as f32 - 5.0 + if r % 2 == 1 { 0.1 } else { 0.0 }
//! });
//! let issame: Vec<bool> = (0..40).map(|i| i % 2 == 0).collect();
//! let report = evaluate(emb.view(), &issame, &VerificationConfig::default()).unwrap();
//! assert!(report.accuracy_mean > 0.9 && report.auc > 0.9);
//! println!("acc {:.4} ± {:.4}, TAR@FAR {:?}", report.accuracy_mean, report.accuracy_std, report.tar_at_far);
//! ```

pub mod embed;
pub mod embedder;
pub mod error;
pub mod ijb;
mod numeric;
pub mod roc;
pub mod uniform;
pub mod verification;

pub use embed::{embed_with_flip, embed_with_flip_progress};
pub use embedder::Embedder;
pub use error::{EvalError, Result};
pub use roc::{auc, eer, roc_curve, tar_at_far, Roc, TarAtFar};
pub use uniform::{uniform_accuracy, UniformAccuracy};
pub use verification::{
    evaluate, evaluate_scores, pair_scores, PairScoreVectors, PairScores, VerificationConfig,
    VerificationReport,
};
