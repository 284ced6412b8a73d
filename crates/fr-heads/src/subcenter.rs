//! Sub-center ArcFace: K sub-centres per class, the class cosine is the best of them, so
//! noisy samples can gather around a non-dominant sub-centre instead of pulling the class
//! centre; and the drop step that cleans the training set with the trained sub-centres.
//!
//! `weight` is `(C·K, D)`, row `j·K + k` holding sub-centre k of class j. With
//! `c_jk = ŵ_jk·x̂`, the class cosine is `c_j = max_k c_jk`, then ArcFace as in
//! [`crate::arcface`] (same config, same margin, fallback, easy-margin and straight-through
//! options): `z_y = s·cos(θ_y + m)`, `z_j = s·c_j`, `L = mean_i CE(z_i, y_i)`. Shapes:
//! embeddings `(B, D)`, labels `(B,)`, logits `(B, C)`. With K = 1 it is ArcFace exactly.
//! The gradient of the max goes to the winning sub-centre.
//!
//! Drop step ([`drop_noisy_samples`], [`write_clean_list`]): each training sample is assigned
//! to the nearest sub-centre of its class; the class's dominant sub-centre is the most
//! populated one; samples with `cos(x, dominant) > cos(drop_angle_degrees)` (75°) are kept,
//! the others and the non-dominant sub-centres are dropped; training continues with K = 1 on
//! the cleaned list, starting from the dominant centres.
//!
//! Defaults: K = 3, ArcFace s = 64, m = 0.5 (the crate's ArcFace defaults, classic th/mm
//! fallback), drop angle 75°.
//! Deng, Guo, Liu, Zafeiriou, "Sub-center ArcFace: Boosting Face Recognition by Large-scale
//! Noisy Web Faces", ECCV 2020; reference code deepinsight/insightface
//! `recognition/SubCenter-ArcFace` (mxnet: `loss_K` sub-centre max in the training symbol,
//! `drop.py` for the cleaning step).

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::arcface::ArcFaceConfig;
use crate::common::{self, as_dtype_of};
use crate::{Error, Head, HeadOutput, Result, StepContext};

/// Hyperparameters of [`SubCenterArcFace`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubCenterArcFaceConfig {
    /// Sub-centres per class `K`, in `1..=64`. Default 3.
    pub sub_centers: usize,
    /// Angle (degrees) to the dominant sub-centre beyond which the drop step discards a
    /// sample, in `(0, 180)`. Default 75.
    pub drop_angle_degrees: f64,
    /// The ArcFace applied to the class cosines. Default: [`ArcFaceConfig::default`].
    pub arcface: ArcFaceConfig,
}

impl Default for SubCenterArcFaceConfig {
    fn default() -> Self {
        Self {
            sub_centers: 3,
            drop_angle_degrees: 75.0,
            arcface: ArcFaceConfig::default(),
        }
    }
}

impl SubCenterArcFaceConfig {
    /// Check `sub_centers`, `drop_angle_degrees` and the ArcFace part (keys as in ArcFace).
    pub fn validate(&self) -> Result<()> {
        if !(1..=64).contains(&self.sub_centers) {
            return Err(Error::config(
                "sub_centers",
                format!("must be in 1..=64, got {}", self.sub_centers),
            ));
        }
        let a = self.drop_angle_degrees;
        if !(a.is_finite() && a > 0.0 && a < 180.0) {
            return Err(Error::config(
                "drop_angle_degrees",
                format!("must be in (0, 180), got {a}"),
            ));
        }
        self.arcface.validate()
    }
}

/// ArcFace over the best of K sub-centres per class.
#[derive(Debug, Clone)]
pub struct SubCenterArcFace {
    cfg: SubCenterArcFaceConfig,
    weight: Tensor,
    embedding_size: usize,
    num_classes: usize,
}

impl SubCenterArcFace {
    /// Create the head; `weight` `(C·K, D)` comes from `vb`, N(0, 0.01).
    pub fn new(
        cfg: &SubCenterArcFaceConfig,
        embedding_size: usize,
        num_classes: usize,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        common::check_sizes(embedding_size, num_classes)?;
        let weight = common::class_centres(&vb, embedding_size, num_classes * cfg.sub_centers)?;
        Ok(Self {
            cfg: cfg.clone(),
            weight,
            embedding_size,
            num_classes,
        })
    }

    /// The sub-centres `(C·K, D)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Class cosines `(B, C)`: the largest sub-centre cosine of each class.
    fn class_cosines(&self, x: &Tensor) -> Result<Tensor> {
        let all = common::cosine(x, &as_dtype_of(&self.weight, x)?, self.cfg.arcface.cos_eps)?;
        let b = all.dim(0)?;
        Ok(all
            .reshape((b, self.num_classes, self.cfg.sub_centers))?
            .max(D::Minus1)?)
    }
}

impl Head for SubCenterArcFace {
    fn name(&self) -> &'static str {
        "subcenter_arcface"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        _ctx: &StepContext,
    ) -> Result<HeadOutput> {
        let inp = common::check_inputs(embeddings, labels, self.embedding_size, self.num_classes)?;
        let cos = self.class_cosines(&inp.x)?;
        let mask = common::target_mask(&inp.labels_t, self.num_classes)?;
        self.cfg.arcface.margin_softmax().head_output(&cos, &mask)
    }
}

/// What the drop step decided.
#[derive(Debug, Clone)]
pub struct DropResult {
    /// Indices (into the embeddings handed in, ascending) of the samples kept.
    pub kept: Vec<usize>,
    /// The dominant sub-centre `k` of each class (0 for a class without samples).
    pub dominant: Vec<usize>,
    /// The dominant sub-centres `(C, D)` (rows of the weight as they are, not normalised):
    /// the class centres to continue training with K = 1.
    pub centres: Tensor,
}

/// Samples per chunk in [`drop_noisy_samples`] (bounds the `(n, K, D)` temporary).
const DROP_CHUNK: usize = 1024;

/// The drop step of sub-center ArcFace.
///
/// `embeddings` `(N, D)` of all training samples (normalised or not), `labels` their `N`
/// classes, `weight` `(C·K, D)` a trained sub-center head's weight, `sub_centers` = K. Each
/// sample goes to the sub-centre of its class with the largest cosine; the most populated
/// sub-centre of a class is its dominant one (ties: the lowest k); a sample is kept when its
/// cosine to its class's dominant sub-centre exceeds `cos(drop_angle_degrees)`.
///
/// # Errors
/// [`Error::Shape`] for inconsistent sizes, [`Error::Label`] for a label out of range,
/// [`Error::Config`] for `sub_centers` = 0 or an angle outside `(0, 180)`; candle errors.
pub fn drop_noisy_samples(
    embeddings: &Tensor,
    labels: &[u32],
    weight: &Tensor,
    sub_centers: usize,
    drop_angle_degrees: f64,
) -> Result<DropResult> {
    let k = sub_centers;
    if k == 0 {
        return Err(Error::config("sub_centers", "must be > 0"));
    }
    if !(drop_angle_degrees > 0.0 && drop_angle_degrees < 180.0) {
        return Err(Error::config(
            "drop_angle_degrees",
            format!("must be in (0, 180), got {drop_angle_degrees}"),
        ));
    }
    let (rows, d) = weight.dims2()?;
    if rows % k != 0 || rows == 0 {
        return Err(Error::Shape {
            what: "weight".into(),
            expected: format!("(C·{k}, D) with C > 0"),
            got: format!("{:?}", weight.dims()),
        });
    }
    let c = rows / k;
    let n = labels.len();
    if embeddings.dims() != [n, d] {
        return Err(Error::Shape {
            what: "embeddings".into(),
            expected: format!("({n}, {d}): one row per label, the weight's width"),
            got: format!("{:?}", embeddings.dims()),
        });
    }
    if let Some((index, &label)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= c) {
        return Err(Error::Label {
            index,
            label: i64::from(label),
            num_classes: c,
        });
    }
    let dtype = common::compute_dtype(weight.dtype());
    let wn = common::l2_normalize(&weight.detach().to_dtype(dtype)?)?;
    let dev = wn.device().clone();
    // cos[i·K + k] = cos(x_i, sub-centre k of class y_i).
    let mut cos = Vec::with_capacity(n * k);
    for start in (0..n).step_by(DROP_CHUNK) {
        let len = DROP_CHUNK.min(n - start);
        let rows: Vec<u32> = labels[start..start + len]
            .iter()
            .flat_map(|&y| (0..k as u32).map(move |j| y * k as u32 + j))
            .collect();
        let rows = Tensor::from_vec(rows, len * k, &dev)?;
        let w = wn.index_select(&rows, 0)?.reshape((len, k, d))?;
        let x = embeddings
            .narrow(0, start, len)?
            .detach()
            .to_dtype(dtype)?
            .to_device(&dev)?;
        let x = common::l2_normalize(&x)?.unsqueeze(1)?;
        let part = w.broadcast_mul(&x)?.sum(D::Minus1)?;
        cos.extend(part.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
    }
    // Nearest sub-centre of each sample, then the most populated one of each class.
    let mut counts = vec![0usize; c * k];
    for (i, &y) in labels.iter().enumerate() {
        let row = &cos[i * k..(i + 1) * k];
        let best = (0..k).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        counts[y as usize * k + best] += 1;
    }
    let dominant: Vec<usize> = (0..c)
        .map(|j| {
            let cnt = &counts[j * k..(j + 1) * k];
            (0..k).fold(0, |b, s| if cnt[s] > cnt[b] { s } else { b })
        })
        .collect();
    let threshold = drop_angle_degrees.to_radians().cos();
    let kept = labels
        .iter()
        .enumerate()
        .filter(|(i, &y)| cos[i * k + dominant[y as usize]] > threshold)
        .map(|(i, _)| i)
        .collect();
    let rows: Vec<u32> = dominant
        .iter()
        .enumerate()
        .map(|(j, &s)| (j * k + s) as u32)
        .collect();
    let rows = Tensor::from_vec(rows, c, weight.device())?;
    let centres = weight.detach().index_select(&rows, 0)?;
    Ok(DropResult {
        kept,
        dominant,
        centres,
    })
}

/// Write the cleaned sample list: a `# header` comment line (each line of `header` prefixed
/// by `# `), then one kept sample index per line. Written to a temporary file next to `path`
/// and renamed over it, so a reader never sees a partial list.
///
/// # Errors
/// I/O errors (the temporary file is removed on failure).
pub fn write_clean_list(path: &Path, kept: &[usize], header: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "clean_list".into());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for line in header.lines() {
            writeln!(f, "# {line}")?;
        }
        for i in kept {
            writeln!(f, "{i}")?;
        }
        f.into_inner()?.sync_all()
    };
    match write().and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arcface::ArcFace;
    use candle_core::{Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    /// K = 1 is ArcFace: same loss, logits and gradients (bit for bit), for several ArcFace
    /// variants.
    #[test]
    fn one_sub_center_is_arcface_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f64, 1.0, (6, 5), &dev)?;
        let w0 = Tensor::randn(0f64, 1.0, (4, 5), &dev)?;
        let y = Tensor::new(&[0u32, 3, 1, 2, 3, 0], &dev)?;
        for arc in [
            ArcFaceConfig::default(),
            ArcFaceConfig::insightface(),
            ArcFaceConfig {
                easy_margin: true,
                m1: 1.2,
                m3: 0.1,
                ..Default::default()
            },
        ] {
            let run = |sub: bool| -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
                let mut head: Box<dyn Head> = if sub {
                    let cfg = SubCenterArcFaceConfig {
                        sub_centers: 1,
                        arcface: arc.clone(),
                        ..Default::default()
                    };
                    Box::new(SubCenterArcFace::new(&cfg, 5, 4, vb)?)
                } else {
                    Box::new(ArcFace::new(&arc, 5, 4, vb)?)
                };
                let w = vm.data().lock().unwrap()["weight"].clone();
                w.set(&w0)?;
                let x = Var::from_tensor(&x0)?;
                let out = head.forward(x.as_tensor(), &y, &StepContext::default())?;
                let g = out.loss.backward()?;
                let flat = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.flatten_all()?.to_vec1()?) };
                let mut v = vec![common::scalar(&out.loss)?];
                v.extend(flat(&out.logits)?);
                Ok((v, flat(g.get(&x).unwrap())?, flat(g.get(&w).unwrap())?))
            };
            assert_eq!(run(true)?, run(false)?);
        }
        Ok(())
    }

    /// With K = 3 the gradient reaches only the winning sub-centre of each class.
    #[test]
    fn max_over_sub_centres_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let mut head = SubCenterArcFace::new(&SubCenterArcFaceConfig::default(), 3, 2, vb)?;
        // Class 0: sub-centres e0, e1, −e0; class 1: e2, −e1, −e2.
        let w0 = Tensor::new(
            &[
                [1.0f64, 0., 0.],
                [0., 1., 0.],
                [-1., 0., 0.],
                [0., 0., 1.],
                [0., -1., 0.],
                [0., 0., -1.],
            ],
            &dev,
        )?;
        let w = vm.data().lock().unwrap()["weight"].clone();
        w.set(&w0)?;
        let x = Tensor::new(&[[0.9f64, 0.3, 0.2]], &dev)?;
        let y = Tensor::new(&[0u32], &dev)?;
        let out = head.forward(&x, &y, &StepContext::default())?;
        let logits: Vec<f64> = out.logits.flatten_all()?.to_vec1()?;
        let n = (0.9f64 * 0.9 + 0.09 + 0.04).sqrt();
        // Class 1's best sub-centre is e2 (cos 0.2/n).
        assert!((logits[1] - 64.0 * 0.2 / n).abs() < 1e-12);
        assert!((logits[0] - 64.0 * ((0.9 / n).acos() + 0.5).cos()).abs() < 1e-12);
        let g = out.loss.backward()?;
        let gw: Vec<Vec<f64>> = g.get(&w).unwrap().to_vec2()?;
        for (row, grad) in gw.iter().enumerate() {
            let nonzero = grad.iter().any(|v| *v != 0.0);
            assert_eq!(nonzero, row == 0 || row == 3, "row {row}: {grad:?}");
        }
        Ok(())
    }

    #[test]
    fn drop_step_on_a_constructed_case() -> Result<()> {
        let dev = Device::Cpu;
        let deg = |a: f64| a.to_radians();
        // Class 0: sub-centres 2·e0, e1, −e0 (dominant: k = 0);
        // class 1: −e1, e0, 3·e2 (dominant: k = 2).
        let w = Tensor::new(
            &[
                [2.0f64, 0., 0.],
                [0., 1., 0.],
                [-1., 0., 0.],
                [0., -1., 0.],
                [1., 0., 0.],
                [0., 0., 3.],
            ],
            &dev,
        )?;
        let at = |a: f64, r: f64| [r * deg(a).cos(), 0.0, r * deg(a).sin()];
        let x = Tensor::new(
            &[
                [1.0, 0.05, 0.0], // 0: class 0, near e0: kept
                at(10.0, 2.0),    // 1: class 0, 10° from e0: kept
                [5.0, -0.2, 0.1], // 2: class 0, near e0: kept
                at(60.0, 0.5),    // 3: class 0, 60° from e0: kept
                at(80.0, 1.0),    // 4: class 0, 80° from e0 (nearest still e0): dropped
                [0.05, 1.0, 0.0], // 5: class 0, at the non-dominant e1: dropped
                [0.1, 0.1, 1.0],  // 6: class 1, near e2: kept
                [0.0, 0.2, 2.0],  // 7: class 1, near e2: kept
                [0.0, -1.0, 0.1], // 8: class 1, at −e1 (84° from e2): dropped
            ],
            &dev,
        )?;
        let labels = [0u32, 0, 0, 0, 0, 0, 1, 1, 1];
        let r = drop_noisy_samples(&x, &labels, &w, 3, 75.0)?;
        assert_eq!(r.dominant, vec![0, 2]);
        assert_eq!(r.kept, vec![0, 1, 2, 3, 6, 7]);
        assert_eq!(
            r.centres.to_vec2::<f64>()?,
            vec![vec![2.0, 0., 0.], vec![0., 0., 3.]]
        );
        // A wider angle keeps sample 4 and sample 8 (84°), not sample 5 (87°).
        let r = drop_noisy_samples(&x, &labels, &w, 3, 85.0)?;
        assert_eq!(r.kept, vec![0, 1, 2, 3, 4, 6, 7, 8]);
        // Errors.
        assert!(matches!(
            drop_noisy_samples(&x, &labels, &w, 4, 75.0),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            drop_noisy_samples(&x, &[0, 0, 0, 0, 0, 0, 1, 1, 2], &w, 3, 75.0),
            Err(Error::Label { index: 8, .. })
        ));

        // The cleaned list: header comment, one index per line, no temporary left behind.
        let dir = std::env::temp_dir().join(format!("subcenter-drop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("clean.txt");
        write_clean_list(&path, &[0, 1, 2, 3, 6, 7], "sub-center drop\n6 of 9 kept").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "# sub-center drop\n# 6 of 9 kept\n0\n1\n2\n3\n6\n7\n");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
        Ok(())
    }

    #[test]
    fn rejects_bad_config() {
        for (cfg, key) in [
            (
                SubCenterArcFaceConfig {
                    sub_centers: 0,
                    ..Default::default()
                },
                "sub_centers",
            ),
            (
                SubCenterArcFaceConfig {
                    drop_angle_degrees: 180.0,
                    ..Default::default()
                },
                "drop_angle_degrees",
            ),
            (
                SubCenterArcFaceConfig {
                    arcface: ArcFaceConfig {
                        margin: -1.0,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                "margin",
            ),
        ] {
            let err = cfg.validate().unwrap_err();
            assert!(
                matches!(err, Error::Config { key: ref k, .. } if k == key),
                "{err}"
            );
        }
    }
}
