//! UniFace (unified cross-entropy, UCE) and the uniform-classification BCE: a binary
//! cross-entropy per (sample, class) pair with one learnable threshold `b` shared by all
//! samples, so that a single global threshold separates every positive pair from every
//! negative pair.
//!
//! With `c_j = ŵ_j·x̂` (x `(B, D)`, class centres `W` `(C, D)`):
//! - logits `z_y = s·(c_y − m) − b`, `z_j = s·c_j − b` (j ≠ y), `(B, C)`;
//! - `L = mean_i [ softplus(−z_{i,y_i}) + λ·Σ_{j≠y_i} softplus(z_{ij}) ]` (a sum over classes,
//!   a mean over the batch), with the stable, **unclamped** softplus
//!   `softplus(z) = max(z, 0) + ln(1 + e^{−|z|})`;
//! - `b` is a learnable scalar `bias` `()` created through the `VarBuilder` (initialised to
//!   `b0 = ln(10·r·C)`, r = the Partial-FC sampling rate, 1 without Partial FC), or, with
//!   `bias = "per_class"`, a vector `bias` `(C,)` (every entry initialised to `b0`): the
//!   diverse-threshold variant.
//!
//! Two registered heads share this implementation:
//! - `uniface` ([`UniFace`], [`UniFaceConfig`]): Zhou, Li, Liu, Jia, Shen, "UniFace: Unified
//!   Cross-Entropy Loss for Deep Face Recognition", ICCV 2023; reference code CVI-SZU/UniFace
//!   `head.py` (`Unified_Cross_Entropy_Loss`): s = 64, m = 0.4, λ = 1, r = 1.
//! - `uniform_bce` ([`UniformBce`], [`UniformBceConfig`]): Li, Jia, Zhou, Shen, Duan,
//!   "Rediscovering BCE Loss for Uniform Classification", arXiv 2403.07289: the same BCE with a
//!   unified bias (`L_bce-u`) or per-class biases (`L_bce-d`). The paper's exact face-recognition
//!   settings could not be pinned to code *(unverified)*: the defaults here are the UniFace
//!   ones without margin (s = 64, m = 0, λ = 1), and `normalize = false` switches the metric
//!   from the cosine to the raw inner product `w_j·x` (the paper also trains un-normalised
//!   classifiers).
//!
//! [`uniform_accuracy`] is the paper's "uniform classification accuracy" (one threshold for
//! all samples). The specification records no headline numbers for this family.
//!
//! Deviation from the reference: the reference clamps every logit to `[−s, s]` before the
//! softplus, which zeroes the gradient of any pair outside that range — in particular of a
//! badly misclassified positive (`s·(c_y − m) − b < −s`, e.g. `c_y ≈ −1`), which then stops
//! learning and contributes a capped loss value. The default here is the unclamped softplus;
//! `clamp_logits = true` reproduces the reference exactly (tests/golden/uniface_uce.json).
//! The reference also normalises with `eps = 1e-5` where this crate floors norms at 1e-12 and
//! clamps cosines to `[−1 + ε, 1 − ε]`; neither matters away from zero-norm inputs.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::common::{self, as_dtype_of, DEFAULT_COS_EPS};
use crate::{Error, Head, HeadOutput, Result, StepContext};

/// Stable softplus `ln(1 + e^z) = max(z, 0) + ln(1 + e^{−|z|})`, elementwise, unclamped,
/// with the exact gradient `σ(z)` (also at `z = 0`). Built from `where_cond`, so no `exp` of a
/// positive number is ever taken.
pub fn softplus(z: &Tensor) -> Result<Tensor> {
    let pos = z.gt(0.0)?;
    let zero = z.zeros_like()?;
    let zp = pos.where_cond(z, &zero)?; // max(z, 0)
    let zn = pos.where_cond(&zero, z)?; // min(z, 0)
    let abs = (&zp - &zn)?;
    Ok((zp + (abs.neg()?.exp()? + 1.0)?.log()?)?)
}

/// One threshold for all classes, or one per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasMode {
    /// One learnable scalar `bias` `()`: the unified threshold (UniFace, `L_bce-u`).
    #[default]
    Unified,
    /// A learnable vector `bias` `(C,)`: one threshold per class (`L_bce-d`).
    PerClass,
}

/// Hyperparameters of [`UniFace`] (registry name `uniface`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UniFaceConfig {
    /// Scale `s`. Default 64.
    pub scale: f64,
    /// Additive cosine margin `m` on the positive pair, in `[0, 1]`. Default 0.4.
    pub margin: f64,
    /// Weight `λ` of the negative pairs. Default 1.
    pub negative_weight: f64,
    /// Partial-FC sampling rate `r` in `(0, 1]`, used only in the bias initialisation
    /// `ln(10·r·C)`. Default 1.
    pub sample_rate: f64,
    /// Unified (default) or per-class bias.
    pub bias: BiasMode,
    /// Clamp every logit to `[−s, s]` before the softplus as the reference does (zero gradient
    /// outside). Default `false` (unclamped; see the module docs).
    pub clamp_logits: bool,
    /// Cosines are clamped to `[−1 + cos_eps, 1 − cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for UniFaceConfig {
    fn default() -> Self {
        Self {
            scale: 64.0,
            margin: 0.4,
            negative_weight: 1.0,
            sample_rate: 1.0,
            bias: BiasMode::Unified,
            clamp_logits: false,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl UniFaceConfig {
    /// The reference implementation exactly: logits clamped to `[−s, s]`.
    pub fn reference() -> Self {
        Self {
            clamp_logits: true,
            ..Self::default()
        }
    }

    /// Check `scale > 0`, `margin` in `[0, 1]`, `negative_weight ≥ 0`, `sample_rate` in
    /// `(0, 1]`, `cos_eps` in `[0, 0.1]`.
    pub fn validate(&self) -> Result<()> {
        common::check_positive("scale", self.scale)?;
        common::check_range("margin", self.margin, 0.0, 1.0)?;
        common::check_range("negative_weight", self.negative_weight, 0.0, f64::MAX)?;
        common::check_positive("sample_rate", self.sample_rate)?;
        common::check_range("sample_rate", self.sample_rate, 0.0, 1.0)?;
        common::check_range("cos_eps", self.cos_eps, 0.0, 0.1)
    }

    fn settings(&self) -> Settings {
        Settings {
            scale: self.scale,
            margin: self.margin,
            negative_weight: self.negative_weight,
            normalize: true,
            bias: self.bias,
            bias_init: None,
            sample_rate: self.sample_rate,
            clamp_logits: self.clamp_logits,
            cos_eps: self.cos_eps,
        }
    }
}

/// Hyperparameters of [`UniformBce`] (registry name `uniform_bce`), arXiv 2403.07289.
/// Defaults are *(unverified)*: see the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UniformBceConfig {
    /// Scale `s` of the metric. Default 64.
    pub scale: f64,
    /// Additive margin `m` on the positive metric, in `[0, 1]`. Default 0.
    pub margin: f64,
    /// Cosine metric (`true`, default) or raw inner product `w_j·x` (`false`).
    pub normalize: bool,
    /// Unified (`L_bce-u`, default) or per-class (`L_bce-d`) bias.
    pub bias: BiasMode,
    /// Initial bias; `None` (default) means `ln(10·C)`.
    pub bias_init: Option<f64>,
    /// Clamp logits to `[−s, s]` as the UniFace reference does. Default `false`.
    pub clamp_logits: bool,
    /// Cosines are clamped to `[−1 + cos_eps, 1 − cos_eps]`. Default 1e-7.
    pub cos_eps: f64,
}

impl Default for UniformBceConfig {
    fn default() -> Self {
        Self {
            scale: 64.0,
            margin: 0.0,
            normalize: true,
            bias: BiasMode::Unified,
            bias_init: None,
            clamp_logits: false,
            cos_eps: DEFAULT_COS_EPS,
        }
    }
}

impl UniformBceConfig {
    /// Check `scale > 0`, `margin` in `[0, 1]`, a finite `bias_init`, `cos_eps` in `[0, 0.1]`.
    pub fn validate(&self) -> Result<()> {
        common::check_positive("scale", self.scale)?;
        common::check_range("margin", self.margin, 0.0, 1.0)?;
        if let Some(b) = self.bias_init {
            if !b.is_finite() {
                return Err(Error::config(
                    "bias_init",
                    format!("must be finite, got {b}"),
                ));
            }
        }
        common::check_range("cos_eps", self.cos_eps, 0.0, 0.1)
    }

    fn settings(&self) -> Settings {
        Settings {
            scale: self.scale,
            margin: self.margin,
            negative_weight: 1.0,
            normalize: self.normalize,
            bias: self.bias,
            bias_init: self.bias_init,
            sample_rate: 1.0,
            clamp_logits: self.clamp_logits,
            cos_eps: self.cos_eps,
        }
    }
}

/// What both configs reduce to.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    scale: f64,
    margin: f64,
    negative_weight: f64,
    normalize: bool,
    bias: BiasMode,
    bias_init: Option<f64>,
    sample_rate: f64,
    clamp_logits: bool,
    cos_eps: f64,
}

/// The unified-threshold BCE head (UniFace UCE). See the module docs.
#[derive(Debug, Clone)]
pub struct UniFace {
    name: &'static str,
    st: Settings,
    weight: Tensor,
    bias: Tensor,
    embedding_size: usize,
    num_classes: usize,
}

impl UniFace {
    /// Create the head; `weight` `(C, D)` and `bias` (`()` or `(C,)`) come from `vb`.
    pub fn new(
        cfg: &UniFaceConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        Self::build("uniface", cfg.settings(), embedding_size, num_classes, vb)
    }

    fn build(
        name: &'static str,
        st: Settings,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        let weight = common::class_centres(&vb, embedding_size, num_classes)?;
        let b0 = st
            .bias_init
            .unwrap_or_else(|| (10.0 * st.sample_rate * num_classes as f64).ln());
        let init = candle_nn::Init::Const(b0);
        let bias = match st.bias {
            BiasMode::Unified => vb.get_with_hints((), "bias", init)?,
            BiasMode::PerClass => vb.get_with_hints(num_classes, "bias", init)?,
        };
        Ok(Self {
            name,
            st,
            weight,
            bias,
            embedding_size,
            num_classes,
        })
    }

    /// The bias initialisation `ln(10·r·C)` of the reference.
    pub fn bias_init(num_classes: usize, sample_rate: f64) -> f64 {
        (10.0 * sample_rate * num_classes as f64).ln()
    }

    /// Logits `(B, C)` (`s·(metric − m·onehot) − b`, before any clamp) and the target mask.
    fn logits(&self, x: &Tensor, labels_t: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let w = as_dtype_of(&self.weight, x)?;
        let metric = if self.st.normalize {
            common::cosine(x, &w, self.st.cos_eps)?
        } else {
            x.matmul(&w.t()?)?
        };
        let mask = common::target_mask(labels_t, self.num_classes)?;
        let onehot = mask.to_dtype(metric.dtype())?;
        let bias = as_dtype_of(&self.bias, x)?;
        let z = ((&metric - (&onehot * self.st.margin)?)? * self.st.scale)?.broadcast_sub(&bias)?;
        Ok((z, mask, metric))
    }
}

/// Per-pair BCE with the target mask: `softplus(−z)` on targets, `λ·softplus(z)` elsewhere,
/// summed over classes, averaged over the batch. `z` is clamped to `[−clamp, clamp]` first when
/// `clamp` is `Some`.
fn pair_bce(z: &Tensor, mask: &Tensor, negative_weight: f64, clamp: Option<f64>) -> Result<Tensor> {
    let z = match clamp {
        Some(s) => z.clamp(-s, s)?,
        None => z.clone(),
    };
    let pos = softplus(&z.neg()?)?;
    let neg = (softplus(&z)? * negative_weight)?;
    Ok(mask.where_cond(&pos, &neg)?.sum(1)?.mean_all()?)
}

impl Head for UniFace {
    fn name(&self) -> &'static str {
        self.name
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        _ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let (logits, mask, metric) = self.logits(&inp.x, &inp.labels_t)?;
        let clamp = self.st.clamp_logits.then_some(self.st.scale);
        let loss = pair_bce(&logits, &mask, self.st.negative_weight, clamp)?;
        let mut stats = std::collections::BTreeMap::new();
        stats.insert("loss".to_string(), common::scalar(&loss)?);
        stats.insert(
            "bias".to_string(),
            common::scalar(&self.bias.to_dtype(DType::F64)?.mean_all()?)?,
        );
        let target = common::target_values(&metric, &mask)?;
        stats.insert(
            "cos_target_mean".to_string(),
            common::scalar(&target.mean_all()?)?,
        );
        Ok(HeadOutput {
            loss,
            logits,
            stats,
        })
    }
}

/// The uniform-classification BCE head of arXiv 2403.07289 (registry name `uniform_bce`): the
/// [`UniFace`] computation with [`UniformBceConfig`].
#[derive(Debug, Clone)]
pub struct UniformBce(UniFace);

impl UniformBce {
    /// Create the head; `weight` `(C, D)` and `bias` (`()` or `(C,)`) come from `vb`.
    pub fn new(
        cfg: &UniformBceConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        Ok(Self(UniFace::build(
            "uniform_bce",
            cfg.settings(),
            embedding_size,
            num_classes,
            vb,
        )?))
    }
}

impl Head for UniformBce {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        self.0.forward(embeddings, labels, ctx)
    }
}

/// The uniform classification accuracy of [`uniform_accuracy`] and a threshold attaining it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UniformAccuracy {
    /// Fraction of samples classified correctly by the best single threshold, in `[0, 1]`.
    pub accuracy: f64,
    /// A threshold attaining it (the largest negative score of one of the samples it
    /// classifies correctly); `None` when no threshold classifies any sample correctly.
    pub threshold: Option<f64>,
}

fn positive_and_max_negative(scores: &Tensor, labels: &[u32]) -> Result<Vec<(f64, f64)>> {
    let rows: Vec<Vec<f64>> = scores.to_dtype(DType::F64)?.to_vec2()?;
    if rows.len() != labels.len() {
        return Err(Error::Shape {
            what: "scores".into(),
            expected: format!("({}, C), one row per label", labels.len()),
            got: format!("{:?}", scores.dims()),
        });
    }
    rows.iter()
        .zip(labels)
        .enumerate()
        .map(|(index, (row, &y))| {
            let y = y as usize;
            if y >= row.len() {
                return Err(Error::Label {
                    index,
                    label: i64::from(y as u32),
                    num_classes: row.len(),
                });
            }
            let neg = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != y)
                .map(|(_, &v)| v)
                .fold(f64::NEG_INFINITY, f64::max);
            Ok((row[y], neg))
        })
        .collect()
}

/// Uniform classification at a given threshold `t`: the fraction of samples `i` with
/// `score_{i,y_i} > t` and `score_{i,j} ≤ t` for every `j ≠ y_i`. `scores` `(B, C)` are any
/// per-class metric (cosines, or the head's logits with `t = 0` to use its learned bias).
///
/// # Errors
/// A shape mismatch with `labels`, an out-of-range label.
pub fn uniform_accuracy_at(scores: &Tensor, labels: &[u32], t: f64) -> Result<f64> {
    let pairs = positive_and_max_negative(scores, labels)?;
    let correct = pairs.iter().filter(|&&(p, n)| p > t && n <= t).count();
    Ok(correct as f64 / pairs.len().max(1) as f64)
}

/// The uniform classification accuracy (arXiv 2403.07289): the best accuracy over all single,
/// global thresholds `t`, i.e. `max_t (1/B)·#{i : max_{j≠y_i} score_{ij} ≤ t < score_{i,y_i}}`
/// (see [`uniform_accuracy_at`]). Unlike the usual (sample-wise) accuracy, which only asks
/// `score_{i,y_i} > max_{j≠y_i} score_{ij}` per sample, one threshold must separate every
/// sample's positive score from every sample's negative scores. Computed exactly by a sweep
/// over the `B` intervals `[max negative, positive)`, `O(B log B)` after the `O(B·C)` pass.
///
/// # Errors
/// A shape mismatch with `labels`, an out-of-range label.
pub fn uniform_accuracy(scores: &Tensor, labels: &[u32]) -> Result<UniformAccuracy> {
    let pairs = positive_and_max_negative(scores, labels)?;
    // Events: +1 at the interval start (inclusive), −1 at its end (exclusive); at equal
    // positions ends come first.
    let mut events: Vec<(f64, i32)> = pairs
        .iter()
        .filter(|&&(p, n)| n < p)
        .flat_map(|&(p, n)| [(n, 1), (p, -1)])
        .collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut count, mut best, mut threshold) = (0i64, 0i64, None);
    for (pos, delta) in events {
        count += i64::from(delta);
        if count > best {
            best = count;
            threshold = Some(pos);
        }
    }
    Ok(UniformAccuracy {
        accuracy: best as f64 / pairs.len().max(1) as f64,
        threshold,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tests::fd_check;
    use candle_core::{Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    fn data() -> (Tensor, Tensor) {
        let v: Vec<f64> = (0..42)
            .map(|i| (i as f64 * 1.3 + 0.2).sin() * 2.0)
            .collect();
        let x = Tensor::from_vec(v, (7, 6), &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1], &Device::Cpu).unwrap();
        (x, y)
    }

    #[test]
    fn softplus_is_stable_and_differentiable() -> Result<()> {
        let z = Tensor::new(
            &[-800.0f64, -30.0, -1.0, 0.0, 0.5, 40.0, 900.0],
            &Device::Cpu,
        )?;
        let v = softplus(&z)?.to_vec1::<f64>()?;
        for (got, zz) in v
            .iter()
            .zip([-800.0f64, -30.0, -1.0, 0.0, 0.5, 40.0, 900.0])
        {
            let want = if zz > 0.0 {
                zz + (-zz).exp().ln_1p()
            } else {
                zz.exp().ln_1p()
            };
            assert!((got - want).abs() <= 1e-15 * (1.0 + want.abs()), "{zz}");
        }
        let zv = Var::from_tensor(&z)?;
        let g = softplus(zv.as_tensor())?.sum_all()?.backward()?;
        let g: Vec<f64> = g.get(&zv).unwrap().to_vec1()?;
        assert_eq!(g[3], 0.5);
        assert!(g[0] >= 0.0 && g[0] < 1e-300 && g[6] == 1.0);
        let small = Tensor::new(&[-2.0f64, -0.3, 0.7, 3.0], &Device::Cpu)?;
        assert!(fd_check(&small, |z| Ok(softplus(z)?.sum_all()?))? < 1e-8);
        Ok(())
    }

    /// Embedding, class-centre and bias gradients against finite differences, for the
    /// unified and per-class bias, clamped and unclamped.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let (x, y) = data();
        for (bias, clamp_logits) in [
            (BiasMode::Unified, false),
            (BiasMode::PerClass, false),
            (BiasMode::Unified, true),
        ] {
            let cfg = UniFaceConfig {
                scale: 16.0,
                bias,
                clamp_logits,
                negative_weight: 0.7,
                ..Default::default()
            };
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
            let head = UniFace::new(&cfg, 6, 5, vb)?;
            let err = fd_check(&x, |x| {
                Ok(head.clone().forward(x, &y, &StepContext::default())?.loss)
            })?;
            assert!(err < 1e-6, "{bias:?}: x fd error {err:e}");
            let w0 = head.weight.clone();
            let err = fd_check(&w0, |w| {
                let mut h = head.clone();
                h.weight = w.clone();
                Ok(h.forward(&x, &y, &StepContext::default())?.loss)
            })?;
            assert!(err < 1e-6, "{bias:?}: W fd error {err:e}");
            let b0 = (head.bias.ones_like()? * 3.0)?;
            let err = fd_check(&b0, |b| {
                let mut h = head.clone();
                h.bias = b.clone();
                Ok(h.forward(&x, &y, &StepContext::default())?.loss)
            })?;
            assert!(err < 1e-6, "{bias:?}: bias fd error {err:e}");
        }
        Ok(())
    }

    #[test]
    fn bias_shape_and_init() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let cfg = UniFaceConfig {
            bias: BiasMode::PerClass,
            sample_rate: 0.5,
            ..Default::default()
        };
        let _h = UniFace::new(&cfg, 6, 5, vb)?;
        let b = vm.data().lock().unwrap()["bias"].as_tensor().clone();
        assert_eq!(b.dims(), [5]);
        assert!(b
            .to_vec1::<f64>()?
            .iter()
            .all(|&v| (v - 25f64.ln()).abs() < 1e-15));
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let h = UniformBce::new(&UniformBceConfig::default(), 6, 5, vb)?;
        assert_eq!(h.name(), "uniform_bce");
        let b = vm.data().lock().unwrap()["bias"].as_tensor().clone();
        assert_eq!(b.rank(), 0);
        assert_eq!(common::scalar(&b)?, 50f64.ln());
        Ok(())
    }

    #[test]
    fn raw_inner_product_variant_has_correct_gradients() -> Result<()> {
        let (x, y) = data();
        let cfg = UniformBceConfig {
            normalize: false,
            scale: 1.0,
            margin: 0.2,
            bias: BiasMode::PerClass,
            ..Default::default()
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let head = UniformBce::new(&cfg, 6, 5, vb)?;
        let err = fd_check(&(&x * 20.0)?, |x| {
            Ok(head.clone().forward(x, &y, &StepContext::default())?.loss)
        })?;
        assert!(err < 1e-6, "fd error {err:e}");
        Ok(())
    }

    #[test]
    fn validation_names_the_key() {
        let bad = |cfg: UniFaceConfig, key: &str| {
            assert!(
                matches!(cfg.validate(), Err(Error::Config { key: ref k, .. }) if k == key),
                "{key}"
            );
        };
        let d = UniFaceConfig::default;
        bad(UniFaceConfig { scale: 0.0, ..d() }, "scale");
        bad(UniFaceConfig { margin: 1.5, ..d() }, "margin");
        bad(
            UniFaceConfig {
                negative_weight: -1.0,
                ..d()
            },
            "negative_weight",
        );
        bad(
            UniFaceConfig {
                sample_rate: 0.0,
                ..d()
            },
            "sample_rate",
        );
        bad(
            UniFaceConfig {
                sample_rate: 1.5,
                ..d()
            },
            "sample_rate",
        );
        let b = UniformBceConfig {
            bias_init: Some(f64::NAN),
            ..Default::default()
        };
        assert!(matches!(b.validate(), Err(Error::Config { ref key, .. }) if key == "bias_init"));
    }

    #[test]
    fn uniform_accuracy_sweep() -> Result<()> {
        // Sample 0: [0.1, 0.9), sample 1: [0.5, 0.6), sample 2: [0.7, 0.8), sample 3 wrong
        // (positive below its negative).
        let scores = Tensor::new(
            &[
                [0.9f64, 0.1, -0.2],
                [0.5, 0.6, 0.0],
                [0.2, 0.7, 0.8],
                [0.3, 0.1, 0.4],
            ],
            &Device::Cpu,
        )?;
        let labels = [0u32, 1, 2, 1];
        let u = uniform_accuracy(&scores, &labels)?;
        assert_eq!(u.accuracy, 0.5);
        let t = u.threshold.unwrap();
        assert_eq!(uniform_accuracy_at(&scores, &labels, t)?, 0.5);
        // Brute force over every candidate threshold.
        let mut best = 0f64;
        for t in [-1.0, 0.1, 0.15, 0.5, 0.55, 0.6, 0.7, 0.75, 0.8, 0.9, 2.0] {
            best = best.max(uniform_accuracy_at(&scores, &labels, t)?);
        }
        assert_eq!(best, 0.5);
        // Sample-wise accuracy would be 3/4: the uniform one is stricter.
        let none = uniform_accuracy(&Tensor::new(&[[0.0f64, 1.0]], &Device::Cpu)?, &[0])?;
        assert_eq!((none.accuracy, none.threshold), (0.0, None));
        assert!(uniform_accuracy(&scores, &[0, 1, 3, 0]).is_err());
        Ok(())
    }
}
