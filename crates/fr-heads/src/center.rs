//! Center loss combined with a classification head (Knot Magnify by default, or softmax):
//! the classifier separates the classes, the center term pulls each embedding towards a
//! running centre of its class.
//!
//! Embeddings `x` `(B, D)`, centres `c` `(C, D)` (a buffer, no gradient):
//! `L = L_cls + λ·(1/(2B))·Σ_i ‖x_i − c_{y_i}‖²`, so `∂L/∂x_i` gains `(λ/B)(x_i − c_{y_i})`.
//! After the loss (training only) the centres of the batch's classes move with the rule of
//! Wen et al.: `Δc_j = Σ_i 1[y_i = j](c_j − x_i) / (1 + Σ_i 1[y_i = j])`,
//! `c_j ← c_j − α·Δc_j` (from the centres before the batch; classes absent from the batch are
//! unchanged). The loss of the batch uses the centres before the update.
//!
//! Normalisation: the spec writes `λ·½·Σ_i ‖x_i − c_{y_i}‖²`; the reference layer
//! (ydwen/caffe-face `center_loss_layer.cpp`) divides the sum by the batch size and by 2
//! (`dot / M / 2`), which is what is computed here (a mean over the batch, so λ does not
//! depend on B).
//!
//! Registered as `center`; the classifier is the `classifier` table of the config, tagged by
//! `type`: `km` (default, [`crate::km`]: "KM + center", the seed poster's best setting) or
//! `softmax` ([`crate::softmax`]: the original softmax + center loss). The classifier's
//! parameters (`weight`, `bias`) come from the same `VarBuilder`.
//!
//! Wen, Zhang, Li, Qiao, "A Discriminative Feature Learning Approach for Deep Face
//! Recognition", ECCV 2016; reference ydwen/caffe-face `src/caffe/layers/center_loss_layer.cpp`.
//! Defaults λ = 0.003, α = 0.5. Centres start at 0 (the reference fills them with a Xavier
//! filler; with the update rule the first batch of a class moves its centre to
//! `α·n/(1 + n)` times the class mean). Published: seed poster (3.7M images) LFW softmax 99.10,
//! KM 99.31, KM + center 99.53; Wen et al. LFW 99.28, YTF 94.9 (0.7M images).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of};
use crate::epl::replace_rows;
use crate::km::{Km, KmConfig};
use crate::softmax::{Softmax, SoftmaxConfig};
use crate::{Head, HeadOutput, Result, StepContext};

/// Checkpoint key of the centres.
const CENTRES_KEY: &str = "centres";

/// The classification part of [`Center`], tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CenterClassifier {
    /// Knot Magnify (default).
    Km(KmConfig),
    /// Linear softmax cross-entropy.
    Softmax(SoftmaxConfig),
}

impl Default for CenterClassifier {
    fn default() -> Self {
        Self::Km(KmConfig::default())
    }
}

/// Hyperparameters of [`Center`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CenterConfig {
    /// Weight `λ ≥ 0` of the center term. Default 0.003.
    pub lambda: f64,
    /// Centre update rate `α`, in `[0, 1]`. Default 0.5.
    pub alpha: f64,
    /// The classification head. Default KM with its defaults.
    pub classifier: CenterClassifier,
}

impl Default for CenterConfig {
    fn default() -> Self {
        Self {
            lambda: 0.003,
            alpha: 0.5,
            classifier: CenterClassifier::default(),
        }
    }
}

impl CenterConfig {
    /// Check `lambda ≥ 0`, `alpha` in `[0, 1]` and the classifier's keys.
    pub fn validate(&self) -> Result<()> {
        common::check_range("lambda", self.lambda, 0.0, f64::MAX)?;
        common::check_range("alpha", self.alpha, 0.0, 1.0)?;
        match &self.classifier {
            CenterClassifier::Km(c) => c.validate(),
            CenterClassifier::Softmax(c) => c.validate(),
        }
    }
}

#[derive(Debug, Clone)]
enum Classifier {
    Km(Km),
    Softmax(Softmax),
}

/// Classification head + center loss.
#[derive(Debug, Clone)]
pub struct Center {
    cfg: CenterConfig,
    cls: Classifier,
    embedding_size: usize,
    num_classes: usize,
    /// The class centres `(C, D)`, in the dtype and on the device of `vb`.
    centres: Tensor,
}

impl Center {
    /// Create the head: the classifier's parameters come from `vb`, the centres start at 0.
    pub fn new(
        cfg: &CenterConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let centres = Tensor::zeros((num_classes, embedding_size), vb.dtype(), vb.device())?;
        let cls = match &cfg.classifier {
            CenterClassifier::Km(c) => Classifier::Km(Km::new(c, embedding_size, num_classes, vb)?),
            CenterClassifier::Softmax(c) => {
                Classifier::Softmax(Softmax::new(c, embedding_size, num_classes, vb)?)
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            cls,
            embedding_size,
            num_classes,
            centres,
        })
    }

    /// The class centres `(C, D)`.
    pub fn centres(&self) -> &Tensor {
        &self.centres
    }

    /// The centres after Wen et al.'s update with the batch `x` `(B, D)`, host labels.
    fn updated_centres(&self, x: &Tensor, labels: &[u32]) -> Result<Tensor> {
        let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
        let mut unique = Vec::new();
        let slot_of: Vec<usize> = labels
            .iter()
            .map(|&l| {
                *slots.entry(l).or_insert_with(|| {
                    unique.push(l);
                    unique.len() - 1
                })
            })
            .collect();
        let idx = Tensor::new(unique.as_slice(), self.centres.device())?;
        let host = |t: &Tensor| -> Result<Vec<Vec<f64>>> {
            Ok(t.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.to_vec2()?)
        };
        let old = host(&self.centres.index_select(&idx, 0)?)?;
        let xs = host(x)?;
        let d = self.embedding_size;
        let mut diff = vec![vec![0f64; d]; unique.len()];
        let mut count = vec![0f64; unique.len()];
        for (i, &u) in slot_of.iter().enumerate() {
            count[u] += 1.0;
            for k in 0..d {
                diff[u][k] += old[u][k] - xs[i][k];
            }
        }
        let alpha = self.cfg.alpha;
        let new: Vec<f64> = (0..unique.len())
            .flat_map(|u| {
                let (old, diff, n) = (&old[u], &diff[u], count[u]);
                (0..d).map(move |k| old[k] - alpha * diff[k] / (1.0 + n))
            })
            .collect();
        let new = Tensor::from_vec(new, (unique.len(), d), &Device::Cpu)?
            .to_dtype(self.centres.dtype())?
            .to_device(self.centres.device())?;
        replace_rows(&self.centres, &unique, &new)
    }
}

impl Head for Center {
    fn name(&self) -> &'static str {
        "center"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let mut out = match &mut self.cls {
            Classifier::Km(h) => h.forward(embeddings, labels, ctx)?,
            Classifier::Softmax(h) => h.forward(embeddings, labels, ctx)?,
        };
        let c = as_dtype_of(&self.centres, &inp.x)?.index_select(&inp.labels_t, 0)?;
        let center = ((&inp.x - &c)?.sqr()?.sum(1)?.mean_all()? * 0.5)?;
        let cls_loss = common::scalar(&out.loss)?;
        out.loss = (&out.loss + (&center * self.cfg.lambda)?)?;
        if ctx.train {
            self.centres = self.updated_centres(&inp.x.detach(), &inp.labels)?;
        }
        out.stats.insert("loss".into(), common::scalar(&out.loss)?);
        out.stats.insert("cls_loss".into(), cls_loss);
        out.stats
            .insert("center_loss".into(), common::scalar(&center)?);
        Ok(out)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(CENTRES_KEY.to_string(), self.centres.copy()?)])
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let t = common::state_tensor(state, CENTRES_KEY, &[self.num_classes, self.embedding_size])?;
        self.centres = t
            .to_dtype(self.centres.dtype())?
            .to_device(self.centres.device())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use crate::Error;
    use candle_nn::{VarBuilder, VarMap};

    fn head(cfg: CenterConfig, vm: &VarMap) -> Result<Center> {
        let vb = VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu);
        let h = Center::new(&cfg, 6, 5, vb)?;
        // Deterministic class weights.
        let w: Vec<f64> = (0..30).map(|i| (i as f64 * 2.3 + 0.1).cos()).collect();
        vm.data().lock().unwrap()["weight"].set(&Tensor::from_vec(w, (5, 6), &Device::Cpu)?)?;
        Ok(h)
    }

    fn x() -> Result<Tensor> {
        let v: Vec<f64> = (0..42)
            .map(|i| (i as f64 * 1.7 + 0.3).sin() * 2.0)
            .collect();
        Ok(Tensor::from_vec(v, (7, 6), &Device::Cpu)?)
    }

    /// Centre update by hand: class 0 twice, class 2 once, class 1 absent.
    #[test]
    fn centre_update_on_a_hand_case() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let mut h = Center::new(&CenterConfig::default(), 2, 3, vb)?;
        let c0 = Tensor::new(&[[1.0f64, 1.0], [5.0, 5.0], [0.0, -2.0]], &dev)?;
        h.load_state(&BTreeMap::from([(CENTRES_KEY.to_string(), c0.clone())]))?;
        let x = Tensor::new(&[[3.0f64, 1.0], [0.0, 4.0], [2.0, 2.0]], &dev)?;
        let y = Tensor::new(&[0u32, 2, 0], &dev)?;
        let out = h.forward(&x, &y, &StepContext::default())?;
        assert_eq!(h.centres().to_vec2::<f64>()?, c0.to_vec2::<f64>()?, "eval");
        // ½·mean ‖x − c‖²: (4 + 0) + (0 + 36) + (1 + 1) = 42 → 42 / 3 / 2 = 7.
        assert!((out.stats["center_loss"] - 7.0).abs() < 1e-14);
        h.forward(&x, &y, &StepContext::train(0, 0))?;
        // Class 0: Δ = ((1−3, 1−1) + (1−2, 1−2)) / 3 = (−1, −1/3); c ← c − ½Δ = (1.5, 7/6).
        // Class 2: Δ = (0 − 0, −2 − 4) / 2 = (0, −3); c ← (0, −0.5).
        let got = h.centres().to_vec2::<f64>()?;
        let want = [[1.5, 7.0 / 6.0], [5.0, 5.0], [0.0, -0.5]];
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-15, "{got:?}");
        }
        Ok(())
    }

    /// Gradients with respect to the embeddings match finite differences for both
    /// classifiers (KM with a differentiated weight), with non-zero centres.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        for classifier in [
            CenterClassifier::Km(KmConfig {
                detach_weight: false,
                gamma: 2.0,
                ..Default::default()
            }),
            CenterClassifier::Softmax(SoftmaxConfig::default()),
        ] {
            let vm = VarMap::new();
            let mut h = head(
                CenterConfig {
                    lambda: 0.5,
                    classifier,
                    ..Default::default()
                },
                &vm,
            )?;
            let v: Vec<f64> = (0..30).map(|i| (i as f64 * 0.7).cos()).collect();
            h.centres = Tensor::from_vec(v, (5, 6), &Device::Cpu)?;
            let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu)?;
            let err = fd_check(&x()?, |x| {
                Ok(h.clone().forward(x, &y, &StepContext::default())?.loss)
            })?;
            assert!(err < 1e-6, "finite-difference error {err:e}");
        }
        Ok(())
    }

    #[test]
    fn state_round_trip_and_errors() -> Result<()> {
        let vm = VarMap::new();
        let mut h = head(CenterConfig::default(), &vm)?;
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu)?;
        h.forward(&x()?, &y, &StepContext::train(0, 0))?;
        let state: BTreeMap<String, Tensor> = h.state()?.into_iter().collect();
        let mut g = head(CenterConfig::default(), &vm)?;
        g.load_state(&state)?;
        assert_eq!(g.centres().to_vec2::<f64>()?, h.centres().to_vec2::<f64>()?);
        assert!(g.load_state(&BTreeMap::new()).is_err());
        let bad = BTreeMap::from([(
            CENTRES_KEY.to_string(),
            Tensor::zeros((5, 7), DType::F64, &Device::Cpu)?,
        )]);
        assert!(matches!(g.load_state(&bad), Err(Error::State { .. })));
        Ok(())
    }

    #[test]
    fn config_serde_and_validation() {
        let cfg: CenterConfig =
            serde_json::from_str(r#"{"lambda": 0.01, "classifier": {"type": "softmax"}}"#).unwrap();
        assert_eq!(
            cfg.classifier,
            CenterClassifier::Softmax(SoftmaxConfig::default())
        );
        assert!(serde_json::from_str::<CenterConfig>(
            r#"{"classifier": {"type": "km", "gamma": 2, "nope": 1}}"#
        )
        .is_err());
        let bad = CenterConfig {
            alpha: 2.0,
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(Error::Config { key, .. }) if key == "alpha"));
        let bad = CenterConfig {
            classifier: CenterClassifier::Km(KmConfig {
                gamma: -1.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(Error::Config { key, .. }) if key == "gamma"));
    }
}
