//! Partial FC: each step, a margin head sees only a sample of the class centres — every
//! positive class of the batch plus random negatives up to `sample_rate · C` — with the labels
//! remapped into the sample.
//!
//! An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW 2021;
//! "Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs
//! by Partial FC", CVPR 2022. Reference: insightface `recognition/arcface_torch/partial_fc_v2.py`
//! (`PartialFC_V2.sample`). Published: sampling 10% of the centres of Glint360K costs no
//! accuracy (R100, IJB-C 1e-4: 97.3 at rate 1.0 and 0.1).
//!
//! What matches arcface_torch:
//! - positives are always kept; when they alone reach `num_sample = ⌊sample_rate·C⌋` the sample
//!   is exactly the positives (it can then exceed `num_sample`);
//! - the sampled indices are sorted ascending and labels are remapped by their rank;
//! - the full class-centre matrix is one trainable parameter and the head uses
//!   `weight[index]` (an `index_select`), so rows left out of a step get a zero gradient and the
//!   optimiser still applies momentum and weight decay to them, as PyTorch's SGD does on the
//!   full parameter.
//!
//! What differs: the random negatives come from a ChaCha8 stream keyed by `(seed, step)`
//! (arcface_torch draws `torch.rand` scores and keeps the top-k), so a run is reproducible and
//! resumes without extra state. In eval mode (`StepContext::train == false`) every centre is
//! used. The single-process form is implemented here; [`sample_classes`] takes shard-local
//! labels (−1 = "no positive in this shard") so the model-parallel form reuses it unchanged.
//!
//! Heads with per-class parameters other than `weight` (UniFace's per-class bias) or per-class
//! state (EPL's prototype bank, USS's memory, center loss) cannot be sampled this way: building
//! [`PartialFc`] around one is a [`crate::Error::Config`] naming `head`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{build_head, Error, Head, HeadConfig, HeadOutput, Result, StepContext};

/// Hyperparameters of [`PartialFc`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartialFcConfig {
    /// Fraction of the class centres used per step, in `(0, 1]`. Default 0.1 (the paper's
    /// headline setting; arcface_torch configs use 0.1–0.3, and 1.0 disables sampling).
    pub sample_rate: f64,
    /// Seed of the negative sampling (combined with the step).
    pub seed: u64,
    /// The margin head applied to the sampled centres. Default insightface ArcFace
    /// (s = 64, m = 0.5).
    pub head: Box<HeadConfig>,
}

impl Default for PartialFcConfig {
    fn default() -> Self {
        Self {
            sample_rate: 0.1,
            seed: 0,
            head: Box::new(HeadConfig::default()),
        }
    }
}

impl PartialFcConfig {
    /// Check `sample_rate` in `(0, 1]` and the inner head's config (which must not itself be
    /// Partial FC).
    pub fn validate(&self) -> Result<()> {
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(Error::config(
                "sample_rate",
                format!("must be in (0, 1], got {}", self.sample_rate),
            ));
        }
        if matches!(*self.head, HeadConfig::PartialFc(_)) {
            return Err(Error::config("head", "Partial FC cannot wrap Partial FC"));
        }
        // The inner head's keys are under `head.` in the config.
        self.head.validate().map_err(|e| match e {
            Error::Config { key, reason } => Error::config(format!("head.{key}"), reason),
            e => e,
        })
    }

    /// The inner head's margin softmax ([`HeadConfig::margin_softmax`]): Partial FC changes
    /// which centres a step sees, not the margin.
    ///
    /// # Errors
    /// [`Error::Config`] naming `type` when the inner head has no target-logit margin.
    pub fn margin_softmax(&self) -> Result<crate::margin::MarginSoftmax> {
        self.head.margin_softmax()
    }

    /// Centres sampled per step out of `num_classes` (before adding positives beyond it).
    pub fn num_sample(&self, num_classes: usize) -> usize {
        ((self.sample_rate * num_classes as f64) as usize).min(num_classes)
    }
}

/// The class centres one step uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSample {
    /// Sampled class indices, ascending, into the (local) centre matrix.
    pub index: Vec<u32>,
    /// Labels remapped into `index` (position of the label's class); −1 stays −1.
    pub labels: Vec<i64>,
}

/// Sample the centres of one step (arcface_torch `PartialFC_V2.sample`): every class in
/// `labels` (entries in `0..num_local`, or −1 for "not in this shard", which are ignored) plus
/// uniformly drawn other classes up to `num_sample`, sorted, with the labels remapped.
///
/// # Errors
/// [`Error::Label`] for a label outside `-1..num_local`.
pub fn sample_classes(
    labels: &[i64],
    num_local: usize,
    num_sample: usize,
    rng: &mut ChaCha8Rng,
) -> Result<ClassSample> {
    let mut is_positive = vec![false; num_local];
    for (index, &l) in labels.iter().enumerate() {
        if l == -1 {
            continue;
        }
        if l < 0 || l as usize >= num_local {
            return Err(Error::Label {
                index,
                label: l,
                num_classes: num_local,
            });
        }
        is_positive[l as usize] = true;
    }
    let positives = is_positive.iter().filter(|&&p| p).count();
    let mut chosen = is_positive.clone();
    if num_sample > positives {
        let negatives: Vec<usize> = (0..num_local).filter(|&j| !is_positive[j]).collect();
        for k in sample(rng, negatives.len(), num_sample - positives) {
            chosen[negatives[k]] = true;
        }
    }
    let index: Vec<u32> = (0..num_local as u32)
        .filter(|&j| chosen[j as usize])
        .collect();
    let labels = labels
        .iter()
        .map(|&l| {
            if l == -1 {
                -1
            } else {
                // Present by construction: every positive is in `index`.
                index.partition_point(|&j| i64::from(j) < l) as i64
            }
        })
        .collect();
    Ok(ClassSample { index, labels })
}

/// Records every tensor the wrapped head asks for at construction, creating it through the
/// caller's `VarBuilder` (so it lives in the caller's `VarMap`).
struct Recorder<'a> {
    vb: VarBuilder<'a>,
    seen: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.vb.get_with_hints_dtype(s, name, h, dtype)?;
        self.seen
            .lock()
            .expect("recorder lock")
            .insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.vb.get_unchecked_dtype(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }
}

/// A margin head over a per-step sample of the class centres.
///
/// Built around any head whose only per-class parameter is `weight` `(C·K, D)` (K rows per
/// class, 1 except for sub-center heads) and whose state has no per-class entries. Scalar
/// state (CurricularFace's `t`, AdaFace's statistics, GB-CosFace's `P`) carries over between
/// steps and is checkpointed through [`Head::state`].
pub struct PartialFc {
    cfg: PartialFcConfig,
    /// The full centre matrix `(C·K, D)` and the inner head's other parameters, as created in
    /// the caller's `VarMap`.
    params: HashMap<String, Tensor>,
    rows_per_class: usize,
    embedding_size: usize,
    num_classes: usize,
    /// The inner head's non-trainable state between steps.
    state: BTreeMap<String, Tensor>,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for PartialFc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartialFc")
            .field("cfg", &self.cfg)
            .field("rows_per_class", &self.rows_per_class)
            .field("num_classes", &self.num_classes)
            .finish_non_exhaustive()
    }
}

impl PartialFc {
    /// Create the inner head once over all `num_classes` centres (so its parameters are made in
    /// `vb`'s `VarMap` under the usual names), then check that it can be sampled.
    ///
    /// # Errors
    /// [`Error::Config`] naming `sample_rate` or `head` (a head with per-class parameters or
    /// state other than `weight`), and the inner head's own errors.
    pub fn new(
        cfg: &PartialFcConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let recorder = Recorder {
            vb,
            seen: seen.clone(),
        };
        let inner = build_head(
            &cfg.head,
            embedding_size,
            num_classes,
            VarBuilder::from_backend(Box::new(recorder), dtype, device.clone()),
        )?;
        let state: BTreeMap<String, Tensor> = inner.state()?.into_iter().collect();
        drop(inner);
        let params = std::mem::take(&mut *seen.lock().expect("recorder lock"));
        let rows = match params.get("weight") {
            Some(w) => w.dims()[0],
            None => {
                return Err(Error::config(
                    "head",
                    format!(
                        "`{}` has no class centres `weight` to sample",
                        cfg.head.name()
                    ),
                ))
            }
        };
        if rows % num_classes != 0 {
            return Err(Error::config(
                "head",
                format!(
                    "`{}`: {rows} centre rows are not a multiple of {num_classes} classes",
                    cfg.head.name()
                ),
            ));
        }
        let pfc = Self {
            cfg: cfg.clone(),
            params,
            rows_per_class: rows / num_classes,
            embedding_size,
            num_classes,
            state,
            dtype,
            device,
        };
        // A dry run on a 2-class sample: per-class parameters or state fail here, at build time.
        if num_classes >= 2 {
            let probe = ClassSample {
                index: vec![0, 1],
                labels: vec![],
            };
            pfc.build_inner(&probe).map_err(|e| {
                Error::config(
                    "head",
                    format!(
                        "`{}` cannot be used with Partial FC (only `weight` may be per-class): {e}",
                        cfg.head.name()
                    ),
                )
            })?;
        }
        Ok(pfc)
    }

    /// The inner head over the centres of `sample`, with the carried state loaded.
    fn build_inner(&self, sample: &ClassSample) -> Result<Box<dyn Head>> {
        let k = self.rows_per_class as u32;
        let rows: Vec<u32> = sample
            .index
            .iter()
            .flat_map(|&j| (j * k)..(j * k + k))
            .collect();
        let full = &self.params["weight"];
        let rows = Tensor::new(rows.as_slice(), full.device())?;
        let mut tensors = self.params.clone();
        tensors.insert("weight".into(), full.index_select(&rows, 0)?);
        let vb = VarBuilder::from_tensors(tensors, self.dtype, &self.device);
        let mut inner = build_head(&self.cfg.head, self.embedding_size, sample.index.len(), vb)?;
        inner.load_state(&self.state)?;
        Ok(inner)
    }

    /// The centres a training step at `step` would use for `labels`.
    ///
    /// # Errors
    /// [`Error::Label`] for an out-of-range label.
    pub fn sample(&self, labels: &[u32], step: u64) -> Result<ClassSample> {
        let labels: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed);
        rng.set_stream(step);
        sample_classes(
            &labels,
            self.num_classes,
            self.cfg.num_sample(self.num_classes),
            &mut rng,
        )
    }
}

impl Head for PartialFc {
    fn name(&self) -> &'static str {
        "partial_fc"
    }

    /// `logits` are `(B, C')` over the sampled centres (all `C` in eval mode); statistics are
    /// the inner head's plus `sampled_classes`.
    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let host =
            crate::common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?
                .labels;
        let sample = if ctx.train && self.cfg.sample_rate < 1.0 {
            self.sample(&host, ctx.step)?
        } else {
            ClassSample {
                index: (0..self.num_classes as u32).collect(),
                labels: host.iter().map(|&l| i64::from(l)).collect(),
            }
        };
        let mut inner = self.build_inner(&sample)?;
        let remapped: Vec<u32> = sample.labels.iter().map(|&l| l as u32).collect();
        let remapped = Tensor::new(remapped.as_slice(), labels.device())?;
        let mut out = inner.forward(embeddings, &remapped, ctx)?;
        self.state = inner.state()?.into_iter().collect();
        out.stats
            .insert("sampled_classes".into(), sample.index.len() as f64);
        Ok(out)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .state
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        for key in self.state.keys() {
            if !state.contains_key(key) {
                return Err(Error::State {
                    key: key.clone(),
                    reason: "missing from the checkpoint".into(),
                });
            }
        }
        self.state = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arcface::ArcFaceConfig;
    use crate::common::tests::fd_check;
    use crate::curricularface::CurricularFaceConfig;
    use candle_core::Var;
    use candle_nn::VarMap;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn positives_always_kept_sorted_and_remapped() -> Result<()> {
        let labels = [7i64, 3, 7, -1, 12];
        let s = sample_classes(&labels, 20, 6, &mut rng(1))?;
        assert_eq!(s.index.len(), 6);
        assert!(s.index.windows(2).all(|w| w[0] < w[1]));
        for (&l, &r) in labels.iter().zip(&s.labels) {
            if l == -1 {
                assert_eq!(r, -1);
            } else {
                assert_eq!(i64::from(s.index[r as usize]), l);
            }
        }
        // More positives than num_sample: exactly the positives.
        let s = sample_classes(&labels, 20, 2, &mut rng(1))?;
        assert_eq!(s.index, vec![3, 7, 12]);
        assert_eq!(s.labels, vec![1, 0, 1, -1, 2]);
        // Deterministic per rng state; all classes when num_sample = C.
        assert_eq!(
            sample_classes(&labels, 20, 6, &mut rng(5))?,
            sample_classes(&labels, 20, 6, &mut rng(5))?
        );
        assert_eq!(
            sample_classes(&labels, 20, 20, &mut rng(5))?.index.len(),
            20
        );
        assert!(matches!(
            sample_classes(&[20], 20, 5, &mut rng(0)),
            Err(Error::Label { label: 20, .. })
        ));
        Ok(())
    }

    /// Negatives are drawn uniformly: over many steps every negative class is picked about
    /// equally often.
    #[test]
    fn negatives_are_uniform() -> Result<()> {
        let mut counts = [0usize; 10];
        let mut r = rng(3);
        for _ in 0..4000 {
            for j in sample_classes(&[0], 10, 4, &mut r)?.index {
                counts[j as usize] += 1;
            }
        }
        assert_eq!(counts[0], 4000);
        for &c in &counts[1..] {
            // Expected 4000·3/9 ≈ 1333.
            assert!((1200..1470).contains(&c), "{counts:?}");
        }
        Ok(())
    }

    fn setup(cfg: &PartialFcConfig, c: usize) -> Result<(VarMap, PartialFc)> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let pfc = PartialFc::new(cfg, 4, c, vb.pp("head"))?;
        Ok((vm, pfc))
    }

    fn inputs() -> Result<(Tensor, Tensor)> {
        let v: Vec<f64> = (0..24).map(|i| (i as f64 * 0.9 + 0.2).sin()).collect();
        Ok((
            Tensor::from_vec(v, (6, 4), &Device::Cpu)?,
            Tensor::new(&[1u32, 4, 4, 9, 0, 1], &Device::Cpu)?,
        ))
    }

    /// The sampled head equals the inner head built on `weight[index]` with remapped labels,
    /// in value and in the gradient reaching the full centre matrix (zero on unsampled rows).
    #[test]
    fn equals_inner_head_on_the_sampled_rows() -> Result<()> {
        let cfg = PartialFcConfig {
            sample_rate: 0.6,
            seed: 9,
            head: Box::new(HeadConfig::ArcFace(ArcFaceConfig::default())),
        };
        let (vm, mut pfc) = setup(&cfg, 10)?;
        let (x, y) = inputs()?;
        let ctx = StepContext::train(3, 0);
        let out = pfc.forward(&x, &y, &ctx)?;
        let sample = pfc.sample(&y.to_vec1()?, 3)?;
        assert_eq!(sample.index.len(), 6);
        assert_eq!(out.logits.dims(), [6, 6]);
        let full: Var = vm.data().lock().unwrap()["head.weight"].clone();
        let grads = out.loss.backward()?;
        let g = grads.get(&full).expect("gradient on the full centres");
        let gi: Vec<Vec<f64>> = g.to_vec2()?;
        for (j, row) in gi.iter().enumerate() {
            let sampled = sample.index.contains(&(j as u32));
            assert_eq!(row.iter().any(|v| *v != 0.0), sampled, "row {j}");
        }
        // Reference: ArcFace on the sub-matrix.
        let idx = Tensor::new(sample.index.as_slice(), &Device::Cpu)?;
        let sub = full.as_tensor().index_select(&idx, 0)?;
        let vm2 = VarMap::new();
        let mut arc = build_head(
            &cfg.head,
            4,
            6,
            VarBuilder::from_varmap(&vm2, DType::F64, &Device::Cpu),
        )?;
        vm2.data().lock().unwrap()["weight"].set(&sub)?;
        let remapped: Vec<u32> = sample.labels.iter().map(|&l| l as u32).collect();
        let want = arc.forward(&x, &Tensor::new(remapped.as_slice(), &Device::Cpu)?, &ctx)?;
        let (a, b) = (
            crate::common::scalar(&out.loss)?,
            crate::common::scalar(&want.loss)?,
        );
        assert!((a - b).abs() < 1e-14, "{a} vs {b}");
        // Gradient with respect to the embeddings by finite differences.
        let pfc = std::cell::RefCell::new(pfc);
        let err = fd_check(&x, |x| Ok(pfc.borrow_mut().forward(x, &y, &ctx)?.loss))?;
        assert!(err < 1e-6, "{err:e}");
        Ok(())
    }

    /// Rate 1 (or eval mode) uses every centre and equals the plain head.
    #[test]
    fn full_rate_and_eval_use_every_centre() -> Result<()> {
        let (x, y) = inputs()?;
        for (rate, ctx) in [
            (1.0, StepContext::train(0, 0)),
            (0.2, StepContext::default()),
        ] {
            let cfg = PartialFcConfig {
                sample_rate: rate,
                ..Default::default()
            };
            let (_, mut pfc) = setup(&cfg, 10)?;
            let out = pfc.forward(&x, &y, &ctx)?;
            assert_eq!(out.logits.dims(), [6, 10]);
            assert_eq!(out.stats["sampled_classes"], 10.0);
        }
        Ok(())
    }

    /// Scalar state (CurricularFace's t) carries across steps and through state/load_state.
    #[test]
    fn scalar_state_carries_over() -> Result<()> {
        let cfg = PartialFcConfig {
            sample_rate: 0.5,
            seed: 0,
            head: Box::new(HeadConfig::CurricularFace(CurricularFaceConfig::default())),
        };
        let (_, mut pfc) = setup(&cfg, 10)?;
        let (x, y) = inputs()?;
        let t1 = pfc.forward(&x, &y, &StepContext::train(0, 0))?.stats["t"];
        let t2 = pfc.forward(&x, &y, &StepContext::train(1, 0))?.stats["t"];
        assert!(t1 != 0.0 && t2 != t1, "{t1} {t2}");
        let saved: BTreeMap<String, Tensor> = pfc.state()?.into_iter().collect();
        let (_, mut other) = setup(&cfg, 10)?;
        other.load_state(&saved)?;
        let t3 = other.forward(&x, &y, &StepContext::default())?.stats["t"];
        assert_eq!(t3, t2);
        assert!(other.load_state(&BTreeMap::new()).is_err());
        Ok(())
    }

    #[test]
    fn config_errors_name_the_key() {
        let bad = PartialFcConfig {
            sample_rate: 0.0,
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(Error::Config { key, .. }) if key == "sample_rate"));
        let nested = PartialFcConfig {
            head: Box::new(HeadConfig::PartialFc(PartialFcConfig::default())),
            ..Default::default()
        };
        assert!(matches!(nested.validate(), Err(Error::Config { key, .. }) if key == "head"));
        // The inner head's keys come back as paths under `head`.
        let json = r#"{"type": "partial_fc", "head": {"type": "cosface", "margin": -0.1}}"#;
        let inner: HeadConfig = serde_json::from_str(json).unwrap();
        assert!(matches!(inner.validate(), Err(Error::Config { key, .. }) if key == "head.margin"));
        // Softmax has a per-class bias besides the centres: rejected at build time.
        let softmax = PartialFcConfig {
            head: Box::new(HeadConfig::default_for("softmax").unwrap()),
            ..Default::default()
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let err = PartialFc::new(&softmax, 4, 10, vb).unwrap_err();
        assert!(
            matches!(&err, Error::Config { key, .. } if key == "head"),
            "{err}"
        );
        let json = r#"{"type": "partial_fc", "sample_rate": 0.2, "head": {"type": "cosface", "margin": 0.4}}"#;
        let cfg: HeadConfig = serde_json::from_str(json).unwrap();
        assert!(cfg.validate().is_ok());
    }
}
