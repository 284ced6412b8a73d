//! LH2Face's joint objective: the reconstruction branch trained beside the recognition model,
//! as an [`AuxiliaryLoss`] of fr-train's trainer.
//!
//! `L_train = L_FR + λ_reco·L_reco + λ_canon·L_FR^canon + λ_view·L_view` (LH2Face, arXiv
//! 2506.23555; defaults λ_reco 1, λ_canon 0.5, λ_view 0.1, branch at 64×64). The trainer
//! computes L_FR; [`RenderObjective`] adds the rest on the first [`JointConfig::batch`] images
//! of each batch:
//!
//! - the sub-batch (recognition normalisation `(x − 0.5)/0.5`, e.g. 56×56) is mapped back to
//!   [0, 1] and resized to the branch's size ([`resize_bilinear`], pixel centres aligned);
//! - **L_reco**: the branch's confidence-weighted L1 plus `lam_flip` × the flipped one, plus
//!   the frame and face-in-front terms ([`ReconstructionOutput::loss`]); the branch's own
//!   BatchNorm layers run in training mode;
//! - **L_FR^canon**: the canonical face (albedo × shading) is resized back to the
//!   recognition size, normalised, embedded by the backbone and scored by the head with the
//!   batch's labels. Its gradient flows through the backbone into the albedo, depth and light
//!   networks (and into the backbone and head);
//! - **L_view** \[R\]: `mean_i (1 − cos(sg(e_i), e'_i))` between the training embedding `e_i`
//!   of input `i` (stop-gradient: the input's embedding is the target) and the embedding `e'_i`
//!   of its re-rendered view (the reconstruction, resized and normalised like the canonical
//!   face). The paper only names "embedding consistency between the input view and the
//!   re-rendered view"; a cosine matches the recognition geometry (heads score cosines), and
//!   the stop-gradient keeps the term from pulling real embeddings towards blurry renders.
//!
//! Our readings \[R\] for the extra recognition passes: the backbone runs them with
//! `forward_t(x, false)` — BatchNorm with its running statistics, so canonical and re-rendered
//! images never enter the statistics used at evaluation (gradients still flow through the
//! fixed affine normalisation) — and the head is called with `StepContext { train: false, .. }`
//! so that its running state (EMAs, memories) is updated by the real batch only. Canonical
//! and re-rendered faces are both embedded in one backbone pass.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, D};
use candle_nn::{ModuleT, VarBuilder};
use fr_heads::{Head, StepContext};
use fr_train::{AuxiliaryBatch, AuxiliaryLoss, AuxiliaryOutput};
use serde::{Deserialize, Serialize};

use crate::branch::ReconstructionBranch;
use crate::config::RenderConfig;
use crate::loss::ReconstructionOutput;
use crate::sample::resize_bilinear;
use crate::{Error, Result};

/// Weights and sub-batch of the joint objective, plus the branch's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JointConfig {
    /// λ_reco, weight of L_reco. Default 1 \[R\].
    pub lambda_reco: f64,
    /// λ_canon, weight of L_FR^canon. Default 0.5 \[R\].
    pub lambda_canon: f64,
    /// λ_view, weight of L_view. Default 0.1 \[R\].
    pub lambda_view: f64,
    /// Images of each training batch run through the branch (its first `batch` images, or the
    /// whole batch when smaller). Default 16: one branch forward + backward at 64×64 costs
    /// about 8 ms per image on 2 CPU cores, so the whole batch would multiply the step time.
    pub batch: usize,
    /// The reconstruction branch (image size 64 by default).
    pub branch: RenderConfig,
}

impl Default for JointConfig {
    fn default() -> Self {
        Self {
            lambda_reco: 1.0,
            lambda_canon: 0.5,
            lambda_view: 0.1,
            batch: 16,
            branch: RenderConfig::default(),
        }
    }
}

impl JointConfig {
    /// Check every field.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key (`branch.<key>` for the branch's own keys).
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("lambda_reco", self.lambda_reco),
            ("lambda_canon", self.lambda_canon),
            ("lambda_view", self.lambda_view),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::config(key, format!("{v}: need a finite value ≥ 0")));
            }
        }
        if self.batch == 0 {
            return Err(Error::config("batch", "0: need at least 1 image"));
        }
        self.branch.validate().map_err(|e| match e {
            Error::Config { key, reason } => Error::config(format!("branch.{key}"), reason),
            e => e,
        })
    }
}

/// The joint objective: owns the [`ReconstructionBranch`] and computes
/// `λ_reco·L_reco + λ_canon·L_FR^canon + λ_view·L_view` for the trainer (see the module
/// documentation). Statistics of each step: `l_reco`, `l_canon`, `l_view` (unweighted; the
/// last two only when their λ is non-zero) and `render_loss` (the weighted sum).
#[derive(Debug, Clone)]
pub struct RenderObjective {
    cfg: JointConfig,
    branch: ReconstructionBranch,
}

impl RenderObjective {
    /// Build the branch's networks from `vb` — the trainer's VarMap, under a prefix such as
    /// `render`, before `Trainer::new` so that they are optimised with everything else.
    ///
    /// # Errors
    /// [`Error::Config`] from [`JointConfig::validate`]; variable creation failures.
    pub fn new(cfg: &JointConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg: cfg.clone(),
            branch: ReconstructionBranch::new(&cfg.branch, vb)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &JointConfig {
        &self.cfg
    }

    /// The reconstruction branch.
    pub fn branch(&self) -> &ReconstructionBranch {
        &self.branch
    }

    /// The joint loss terms for `batch`; see [`AuxiliaryLoss::loss`].
    ///
    /// # Errors
    /// Images that are not `(B, 3, S, S)` floats ([`Error::Shape`]), backbone or head failures.
    pub fn losses(
        &self,
        batch: &AuxiliaryBatch<'_>,
        backbone: &dyn ModuleT,
        head: &mut dyn Head,
    ) -> std::result::Result<JointLosses, Box<dyn std::error::Error + Send + Sync>> {
        let images = batch.images;
        let dims = images.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != dims[3] || dims[0] == 0 {
            return Err(Error::shape("images", "(B, 3, S, S) recognition batch", images).into());
        }
        let (b, size) = (dims[0], dims[2]);
        let n = self.cfg.batch.min(b);
        let s = self.cfg.branch.image_size;
        // Recognition normalisation (x − 0.5)/0.5 → [0, 1], at the branch's size.
        let x = resize_bilinear(&images.narrow(0, 0, n)?.affine(0.5, 0.5)?, s)?;
        let output = self.branch.forward(&x, true)?;
        let reco = output.loss(&x, &self.cfg.branch)?.total;
        let mut total = reco.affine(self.cfg.lambda_reco, 0.0)?;

        let (want_canon, want_view) = (self.cfg.lambda_canon > 0.0, self.cfg.lambda_view > 0.0);
        let (mut canon, mut view) = (None, None);
        if want_canon || want_view {
            let to_input =
                |t: &Tensor| -> Result<Tensor> { Ok(resize_bilinear(t, size)?.affine(2.0, -1.0)?) };
            let mut parts = Vec::new();
            if want_canon {
                parts.push(to_input(&output.canonical_image)?);
            }
            if want_view {
                parts.push(to_input(&output.reconstruction)?);
            }
            // Eval-mode BatchNorm: the running statistics stay those of real images.
            let emb = backbone.forward_t(&Tensor::cat(&parts, 0)?, false)?;
            let mut offset = 0;
            if want_canon {
                let ctx = StepContext {
                    train: false,
                    ..*batch.ctx
                };
                let labels = batch.labels.narrow(0, 0, n)?;
                let l = head.forward(&emb.narrow(0, 0, n)?, &labels, &ctx)?.loss;
                let l = l.to_dtype(reco.dtype())?.reshape(())?;
                total = (total + l.affine(self.cfg.lambda_canon, 0.0)?)?;
                canon = Some(l);
                offset = n;
            }
            if want_view {
                let target = batch.embeddings.narrow(0, 0, n)?.detach();
                let l = one_minus_cosine(&target, &emb.narrow(0, offset, n)?)?;
                let l = l.to_dtype(reco.dtype())?;
                total = (total + l.affine(self.cfg.lambda_view, 0.0)?)?;
                view = Some(l);
            }
        }
        Ok(JointLosses {
            total,
            reco,
            canon,
            view,
            output,
        })
    }
}

/// The terms of one joint step (scalars `()` with their graphs) and the branch's output on the
/// sub-batch.
#[derive(Debug, Clone)]
pub struct JointLosses {
    /// `λ_reco·reco + λ_canon·canon + λ_view·view`.
    pub total: Tensor,
    /// L_reco.
    pub reco: Tensor,
    /// L_FR^canon (`None` when λ_canon = 0: not computed).
    pub canon: Option<Tensor>,
    /// L_view (`None` when λ_view = 0: not computed).
    pub view: Option<Tensor>,
    /// Everything the branch computed for the sub-batch.
    pub output: ReconstructionOutput,
}

/// `mean_i (1 − cos(a_i, b_i))` over rows of `(N, D)` matrices, a scalar.
fn one_minus_cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let norm = |t: &Tensor| -> Result<Tensor> {
        Ok(t.sqr()?
            .sum_keepdim(D::Minus1)?
            .affine(1.0, 1e-12)?
            .sqrt()?)
    };
    let a = a.broadcast_div(&norm(a)?)?;
    let b = b.broadcast_div(&norm(b)?)?;
    let cos = a.mul(&b)?.sum(D::Minus1)?;
    Ok(cos.affine(-1.0, 1.0)?.mean_all()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl AuxiliaryLoss for RenderObjective {
    fn name(&self) -> &'static str {
        "render"
    }

    fn loss(
        &mut self,
        batch: &AuxiliaryBatch<'_>,
        backbone: &dyn ModuleT,
        head: &mut dyn Head,
    ) -> std::result::Result<AuxiliaryOutput, Box<dyn std::error::Error + Send + Sync>> {
        let l = self.losses(batch, backbone, head)?;
        let mut stats = BTreeMap::new();
        stats.insert("l_reco".to_string(), scalar(&l.reco)?);
        if let Some(c) = &l.canon {
            stats.insert("l_canon".to_string(), scalar(c)?);
        }
        if let Some(v) = &l.view {
            stats.insert("l_view".to_string(), scalar(v)?);
        }
        stats.insert("render_loss".to_string(), scalar(&l.total)?);
        Ok(AuxiliaryOutput {
            loss: l.total,
            stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use fr_backbone::{build_backbone, BackboneConfig, IResNet, IResNetConfig};
    use fr_heads::{build_head, HeadConfig};
    use fr_train::{OptimizerConfig, SeededVarMap, SgdConfig, StepOutcome, Trainer, TrainerConfig};

    use super::*;

    const CLASSES: usize = 4;

    fn small(lambdas: [f64; 3]) -> JointConfig {
        JointConfig {
            lambda_reco: lambdas[0],
            lambda_canon: lambdas[1],
            lambda_view: lambdas[2],
            batch: 4,
            branch: RenderConfig {
                image_size: 32,
                depth_width: 4,
                albedo_width: 4,
                confidence_width: 2,
                encoder_width: 4,
                zdim: 8,
                ..RenderConfig::default()
            },
        }
    }

    /// A narrow IResNet at 24×24 (so the branch's 32×32 needs resizing both ways), an LH2Face
    /// head and, with `joint`, the render objective, all in one seeded VarMap.
    fn trainer(seed: u64, joint: Option<&JointConfig>) -> Trainer {
        let params = SeededVarMap::new(seed);
        let vb = params.var_builder(DType::F32, &Device::Cpu);
        let backbone = build_backbone(
            &BackboneConfig::Iresnet(IResNetConfig {
                layers: [1, 1, 1, 1],
                widths: [4, 8, 8, 8],
                embedding_size: 16,
                input_size: 24,
                ..IResNetConfig::default()
            }),
            vb.clone(),
        )
        .unwrap();
        let head = build_head(
            &HeadConfig::default_for("lh2face").unwrap(),
            16,
            CLASSES,
            vb.pp("head"),
        )
        .unwrap();
        let objective = joint.map(|c| RenderObjective::new(c, vb.pp("render")).unwrap());
        let config = TrainerConfig {
            optimizer: OptimizerConfig::Sgd(SgdConfig {
                lr: 0.05,
                ..SgdConfig::default()
            }),
            seed,
            ..TrainerConfig::default()
        };
        let t = Trainer::new(
            backbone,
            head,
            params.varmap().clone(),
            config,
            IResNet::is_trainable,
        )
        .unwrap();
        match objective {
            Some(o) => t.with_auxiliary(Box::new(o)).unwrap(),
            None => t,
        }
    }

    /// Batch `i`: 6 images (more than the sub-batch of 4) in the recognition normalisation.
    fn batch(i: u64) -> (Tensor, Tensor) {
        let x = crate::testutil::rand_tensor(&[6, 3, 24, 24], 100 + i)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(2.0, -1.0)
            .unwrap();
        let labels = Tensor::new(&[0u32, 1, 2, 3, 0, 1], &Device::Cpu).unwrap();
        (x, labels)
    }

    fn steps(t: &mut Trainer, n: u64) -> Vec<StepOutcome> {
        (0..n)
            .map(|i| {
                let (x, y) = batch(i);
                t.step_tensors(&x, &y, n).unwrap()
            })
            .collect()
    }

    fn values(t: &Trainer, prefix: &str) -> BTreeMap<String, Vec<f32>> {
        let data = t.varmap().data().lock().unwrap();
        data.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    }

    #[test]
    fn defaults_are_the_papers_and_keys_are_checked() {
        let cfg = JointConfig::default();
        assert_eq!(
            (cfg.lambda_reco, cfg.lambda_canon, cfg.lambda_view),
            (1.0, 0.5, 0.1)
        );
        assert_eq!(cfg.branch.image_size, 64);
        cfg.validate().unwrap();
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(toml::from_str::<JointConfig>(&text).unwrap(), cfg);
        let partial: JointConfig = toml::from_str("batch = 8\n[branch]\nimage_size = 32").unwrap();
        assert_eq!((partial.batch, partial.branch.image_size), (8, 32));
        let err = toml::from_str::<JointConfig>("lambda_canonical = 1.0").unwrap_err();
        assert!(err.to_string().contains("lambda_canonical"), "{err}");
        let bad = |f: fn(&mut JointConfig), key: &str| {
            let mut c = JointConfig::default();
            f(&mut c);
            match c.validate() {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        };
        bad(|c| c.lambda_view = -0.1, "lambda_view");
        bad(|c| c.lambda_reco = f64::NAN, "lambda_reco");
        bad(|c| c.batch = 0, "batch");
        bad(|c| c.branch.image_size = 48, "branch.image_size");
    }

    /// The joint step is deterministic for a seed: same seed → bit-identical losses and
    /// sub-losses over a few steps; another seed → different ones.
    #[test]
    fn joint_step_is_bit_identical_for_a_seed() {
        let cfg = small([1.0, 0.5, 0.1]);
        let run = |seed: u64| -> Vec<u64> {
            steps(&mut trainer(seed, Some(&cfg)), 3)
                .iter()
                .flat_map(|o| {
                    assert!(!o.skipped && o.loss.is_finite(), "{o:?}");
                    ["l_reco", "l_canon", "l_view", "head_loss"]
                        .iter()
                        .map(|k| o.stats[*k].to_bits())
                        .chain([o.loss.to_bits()])
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let a = run(3);
        assert_eq!(a, run(3));
        assert_ne!(a, run(4));
    }

    #[test]
    fn total_loss_is_the_weighted_sum() {
        let cfg = small([1.0, 0.5, 0.1]);
        let o = &steps(&mut trainer(5, Some(&cfg)), 1)[0];
        let s = &o.stats;
        let want = s["head_loss"] + s["l_reco"] + 0.5 * s["l_canon"] + 0.1 * s["l_view"];
        assert!((o.loss - want).abs() < 1e-5 * want.abs().max(1.0), "{o:?}");
        assert!((0.0..=2.0).contains(&s["l_view"]), "{s:?}");
        assert!(s["l_canon"] > 0.0);
    }

    /// L_FR^canon alone trains the networks the canonical face depends on (albedo, depth,
    /// light), not the view network; with every λ at 0 no branch weight moves.
    #[test]
    fn canonical_recognition_loss_reaches_the_reconstruction_nets() {
        let moved = |lambdas: [f64; 3]| -> Vec<String> {
            let mut t = trainer(6, Some(&small(lambdas)));
            let before = values(&t, "render.");
            steps(&mut t, 1);
            let after = values(&t, "render.");
            before
                .iter()
                .filter(|(k, v)| !k.contains("running_") && after[*k] != **v)
                .map(|(k, _)| k.split('.').nth(1).unwrap().to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        assert_eq!(
            moved([0.0, 1.0, 0.0]),
            ["albedo_net", "depth_net", "light_net"]
        );
        assert!(moved([0.0, 0.0, 0.0]).is_empty());
        assert_eq!(
            moved([1.0, 0.0, 0.0]),
            [
                "albedo_net",
                "confidence_net",
                "depth_net",
                "light_net",
                "view_net"
            ]
        );
    }

    /// The extra recognition passes run the backbone in eval mode: its BatchNorm running
    /// statistics after a step equal those of a step without the branch, and the head's state
    /// follows the real batch only.
    #[test]
    fn extra_passes_leave_running_statistics_and_head_state_alone() {
        let mut joint = trainer(7, Some(&small([1.0, 0.5, 0.1])));
        let mut plain = trainer(7, None);
        steps(&mut joint, 1);
        steps(&mut plain, 1);
        let stats = |t: &Trainer| -> BTreeMap<String, Vec<f32>> {
            values(t, "")
                .into_iter()
                .filter(|(k, _)| k.contains("running_") && !k.starts_with("render."))
                .collect()
        };
        let (a, b) = (stats(&joint), stats(&plain));
        assert!(!a.is_empty());
        assert_eq!(a, b);
        let head_state = |t: &Trainer| -> Vec<Vec<f32>> {
            t.head()
                .state()
                .unwrap()
                .iter()
                .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        assert_eq!(head_state(&joint), head_state(&plain));
    }

    #[test]
    fn wrong_images_are_rejected_naming_them() {
        let mut t = trainer(8, Some(&small([1.0, 0.5, 0.1])));
        let x = Tensor::zeros((2, 3, 24, 20), DType::F32, &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        assert!(t.step_tensors(&x, &y, 1).is_err());
    }
}
