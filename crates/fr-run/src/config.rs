//! The typed form of a paper preset (`configs/<paper>.toml`).

use std::collections::BTreeMap;

use crate::{bail, Result};
use fr_backbone::{BackboneConfig, QuantBits};
use fr_data::loader::LoaderConfig;
use fr_data::synthetic::SyntheticConfig;
use fr_heads::HeadConfig;
use fr_render::JointConfig;
use fr_train::TrainerConfig;
use serde::{Deserialize, Serialize};

/// A reproduction preset: the paper's method and its baselines, trained with one seed,
/// backbone and budget, then evaluated on the same protocols.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Short name; outputs go to `target/reproduce/<name>/`.
    pub name: String,
    /// The paper, for the report's title.
    pub paper: String,
    /// The published headline number the full-scale preset aims at (setting, benchmark,
    /// metric), shown by `reproduce --list` and in the report.
    pub headline: String,
    /// Seed of everything random: initialisation, data order, flips, synthetic identities.
    pub seed: u64,
    /// Methods to train, keys of `heads`; the first is the paper's.
    pub methods: Vec<String>,
    /// The shared backbone.
    pub backbone: BackboneConfig,
    /// One head config per method.
    pub heads: BTreeMap<String, HeadConfig>,
    /// The shared training budget.
    pub train: TrainSection,
    /// The embedded default data: synthetic identities.
    pub synthetic: SyntheticSection,
    /// Evaluation settings.
    #[serde(default)]
    pub eval: EvalSection,
    /// LH2Face's reconstruction branch: which methods train with it, and how. Absent: none.
    #[serde(default)]
    pub render: Option<RenderSection>,
    /// QuantFace's step: quantised copies of a trained method's backbone, calibrated and then
    /// fine-tuned by label-free distillation from it. Absent: none.
    #[serde(default)]
    pub quant: Option<QuantSection>,
    /// Students trained after the methods, each from scratch, with a head and / or
    /// distillation from a trained method (`[[student]]` tables: SFace's CLS / KT / CL,
    /// PocketNet's KD and multi-step KD). Absent: none.
    #[serde(default, rename = "student")]
    pub students: Vec<StudentSection>,
    /// The students' own training identities (SFace: synthetic faces, while the teacher saw
    /// the "real" `[synthetic.train]` ones). Absent: the methods' training set.
    #[serde(default)]
    pub student_data: Option<SyntheticConfig>,
    /// ArcFace inversion of a trained method: images generated from embeddings and class
    /// centres. Absent: none.
    #[serde(default)]
    pub inversion: Option<InversionSection>,
}

/// How a distilling student picks its teacher (fr-train's [`fr_train::TeacherSchedule`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KdSchedule {
    /// The teacher at the end of its training, for every student epoch.
    #[default]
    Fixed,
    /// PocketNet's multi-step KD: student epoch e (1-based) learns from the teacher's
    /// checkpoint of epoch e + 1 (the last one once the teacher's run is exhausted).
    MultiStep,
}

/// One `[[student]]` table: a backbone trained from scratch after the methods, with
/// `L = L_head + kd_weight · MSE(normalise(f_s), normalise(f_t))` (fr-heads `kd`), or with the
/// MSE alone when it has no head (label-free, SFace's KT).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSection {
    /// Row label in the report, and its checkpoint folder name.
    pub name: String,
    /// The student's backbone. Default: the preset's `[backbone]` (input size must match it).
    #[serde(default)]
    pub backbone: Option<BackboneConfig>,
    /// Its classification head: a key of `[heads]`. Absent: label-free distillation only.
    #[serde(default)]
    pub head: Option<String>,
    /// The teacher: one of `methods`, trained before the students. Needed when `kd_weight` > 0
    /// or without a head.
    #[serde(default)]
    pub teacher: Option<String>,
    /// λ of the MSE term (SFace CL: 10000, PocketNet: 100; 0 = no distillation). Without a
    /// head the loss is `λ·MSE` and λ must be > 0 (with plain SGD it scales the step like a
    /// learning-rate factor, weight decay aside).
    #[serde(default)]
    pub kd_weight: f64,
    /// Which teacher checkpoint each student epoch learns from.
    #[serde(default)]
    pub schedule: KdSchedule,
    /// Base learning rate of the label-free run (no head). Default: the preset's.
    #[serde(default)]
    pub lr: Option<f64>,
}

impl StudentSection {
    /// Whether a teacher is involved (a positive `kd_weight`, or no head).
    pub fn distills(&self) -> bool {
        self.head.is_none() || self.kd_weight > 0.0
    }
}

/// The `[inversion]` section: after training `method`, images are generated from `embeddings`
/// held-out test embeddings and from `centres` class centres of its head by optimising the
/// input of the frozen backbone (fr-train's [`fr_train::invert`]; any registered backbone).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InversionSection {
    /// The method whose backbone is inverted. Default: the first method.
    #[serde(default)]
    pub method: Option<String>,
    /// Held-out test identities whose first image's embedding is a target.
    pub embeddings: usize,
    /// Training classes whose class centre (the head's weight row) is a target.
    pub centres: usize,
    /// Optimiser and prior settings (fr-train's `InversionConfig`; `image_size` is the
    /// backbone's).
    #[serde(default)]
    pub config: fr_train::InversionConfig,
}

impl InversionSection {
    /// The inverted method's name.
    pub fn method<'a>(&'a self, preset: &'a Preset) -> &'a str {
        self.method.as_deref().unwrap_or(&preset.methods[0])
    }
}

/// The `[quant]` section (QuantFace, ICPR 2022): after training, each bit setting quantises a
/// deep copy of the teacher's backbone (weights per output channel, activations per tensor),
/// calibrates the activation ranges on training images, evaluates it, fine-tunes it with
/// `L = MSE(normalise(f_q), normalise(f_fp))` against the frozen teacher (labels unused) and
/// evaluates it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSection {
    /// The full-precision teacher: a method of `methods`. Default: the first method.
    #[serde(default)]
    pub teacher: Option<String>,
    /// Bit settings, `w<weight bits>a<activation bits>` (QuantFace: `w8a8`, `w6a6`).
    pub bits: Vec<String>,
    /// Training forwards (calibration and distillation together) during which the activation
    /// ranges are updated, then frozen (QuantFace: 300).
    pub freeze_after: usize,
    /// Training-mode forwards without a gradient step that set the activation ranges before
    /// distillation (the "calibration only" rows).
    pub calibration_batches: usize,
    /// Distillation epochs over the training images.
    pub epochs: usize,
    /// Base learning rate of the distillation (the preset's optimiser and schedule otherwise).
    pub lr: f64,
}

impl QuantSection {
    /// The teacher's method name.
    pub fn teacher<'a>(&'a self, preset: &'a Preset) -> &'a str {
        self.teacher.as_deref().unwrap_or(&preset.methods[0])
    }

    /// The bit settings, parsed, each with this section's `freeze_after`.
    ///
    /// # Errors
    /// A setting that is not `w<k>a<k>` with widths in 2..=16 (the message names the key).
    pub fn settings(&self) -> Result<Vec<(String, QuantBits)>> {
        self.bits
            .iter()
            .map(|name| {
                let parsed = name
                    .strip_prefix('w')
                    .and_then(|r| r.split_once('a'))
                    .and_then(|(w, a)| Some((w.parse::<u32>().ok()?, a.parse::<u32>().ok()?)));
                let Some((weight, activation)) = parsed else {
                    bail!("config key `quant.bits`: `{name}` is not of the form w8a8");
                };
                let bits = QuantBits {
                    weight,
                    activation,
                    freeze_after: self.freeze_after,
                };
                if let Err(e) = bits.validate() {
                    bail!("config key `quant.bits`: `{name}`: {e}");
                }
                Ok((name.clone(), bits))
            })
            .collect()
    }
}

/// The `[render]` section: the methods trained with the joint objective
/// `L_FR + λ_reco·L_reco + λ_canon·L_FR^canon + λ_view·L_view` (fr-render's
/// [`JointConfig`] under `[render.joint]`, the branch itself under `[render.joint.branch]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenderSection {
    /// The switch: `false` trains every method without the branch
    /// (`--set render.enabled=false`). Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Methods (keys of `heads`) trained with the branch when `methods` runs them. Default
    /// none.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Loss weights, sub-batch and the branch's configuration.
    #[serde(default)]
    pub joint: JointConfig,
}

/// Budget and optimiser shared by every method.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Optimiser, schedule, clipping.
    #[serde(default)]
    pub trainer: TrainerConfig,
    /// Skip (and count) images that fail to decode instead of stopping the run; the count is
    /// in the report. Default true.
    #[serde(default = "yes")]
    pub skip_corrupt: bool,
    /// Batches the loader decodes ahead of the one being trained on (default 2; 0 = none).
    #[serde(default)]
    pub prefetch: Option<usize>,
    /// Identities per batch `P` of a P x K identity sampler (`K = batch_size / P`), for
    /// batch-hard triplet objectives; unset: shuffled batches.
    #[serde(default)]
    pub identities_per_batch: Option<usize>,
}

/// Synthetic identities for the embedded default run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSection {
    /// The training identities (`first_identity` is where test identities are kept away from).
    pub train: SyntheticConfig,
    /// Held-out identities for evaluation.
    pub test_identities: usize,
    /// Images per held-out identity.
    pub test_images_per_identity: usize,
    /// Pairs per evaluation subset (all, hq_hard, low_quality); even.
    pub pairs_per_subset: usize,
}

/// Evaluation settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Images per forward pass when embedding.
    pub batch_size: usize,
    /// FARs at which TAR is reported.
    pub far: Vec<f64>,
    /// Folds of the accuracy protocol.
    pub folds: usize,
    /// How pairs are scored: `cosine` (default), or `qmagface` to add QMagFace's
    /// quality-aware score (cosine + ω(cosine)·min(‖x1‖, ‖x2‖)) next to the cosine rows.
    pub scoring: Scoring,
}

/// Pair scoring of the evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scoring {
    /// Cosine similarity of the (flip-summed) embeddings.
    #[default]
    Cosine,
    /// Cosine rows plus QMagFace rows: ω fitted on held-out validation identities (synthetic
    /// data) or the published ω (real data).
    Qmagface,
}

fn yes() -> bool {
    true
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            batch_size: 128,
            far: vec![1e-3, 1e-4],
            folds: 10,
            scoring: Scoring::Cosine,
        }
    }
}

impl Preset {
    /// The side of the backbone's input in pixels (its input height).
    pub fn input_size(&self) -> u32 {
        self.backbone.input_shape().0 as u32
    }

    /// The training loader's settings: batches of `batch_size` at `input_size` pixels,
    /// shuffled with the preset's seed, `drop_last`, the preset's corrupt-image policy and
    /// prefetch depth; one process (set `rank` / `world_size` for data parallelism) and no
    /// identity-balanced sampling (set `identities_per_batch` for it).
    pub fn loader_config(&self, batch_size: usize, input_size: u32) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            image_size: input_size,
            shuffle: true,
            seed: self.seed,
            drop_last: true,
            skip_corrupt: self.train.skip_corrupt,
            prefetch: self.train.prefetch.unwrap_or(2),
            ..LoaderConfig::default()
        }
    }

    /// Cross-field checks the types cannot express.
    ///
    /// # Errors
    /// Names the offending key.
    pub fn validate(&self) -> Result<()> {
        if self.methods.is_empty() {
            bail!("config key `methods`: list at least one method");
        }
        for m in &self.methods {
            if !self.heads.contains_key(m) {
                bail!("config key `methods`: `{m}` has no [heads.{m}] section");
            }
        }
        // Every head's hyperparameters and the optimiser, before anything is trained; the
        // message names the key path and the allowed range.
        for (name, head) in &self.heads {
            if let Err(e) = head.validate() {
                match e {
                    fr_heads::Error::Config { key, reason } => {
                        bail!("config key `heads.{name}.{key}`: {reason}")
                    }
                    e => bail!("config key `heads.{name}`: {e}"),
                }
            }
        }
        if let Err(e) = self.train.trainer.validate() {
            match e {
                fr_train::Error::Config { key, reason } => {
                    bail!("config key `train.trainer.{key}`: {reason}")
                }
                e => bail!("config key `train.trainer`: {e}"),
            }
        }
        if self.train.epochs == 0 || self.train.batch_size < 2 {
            bail!("config key `train`: epochs ≥ 1 and batch_size ≥ 2 required");
        }
        if self.synthetic.pairs_per_subset < 20 || self.synthetic.pairs_per_subset % 2 == 1 {
            bail!("config key `synthetic.pairs_per_subset`: an even number ≥ 20 required");
        }
        if self.synthetic.test_identities < 2 || self.synthetic.test_images_per_identity < 2 {
            bail!("config key `synthetic.test_identities`: at least 2 identities × 2 images");
        }
        if self.eval.far.iter().any(|f| !(*f > 0.0 && *f < 1.0)) {
            bail!("config key `eval.far`: every FAR must be in (0, 1)");
        }
        if let Some(r) = &self.render {
            // A key of `heads` (so a typo is caught) that `methods` may leave out of this run.
            for m in &r.methods {
                if !self.heads.contains_key(m) {
                    bail!("config key `render.methods`: `{m}` has no [heads.{m}] section");
                }
            }
            if let Err(e) = r.joint.validate() {
                match e {
                    fr_render::Error::Config { key, reason } => {
                        bail!("config key `render.joint.{key}`: {reason}")
                    }
                    e => bail!("config key `render.joint`: {e}"),
                }
            }
        }
        if let Some(q) = &self.quant {
            let teacher = q.teacher(self);
            if !self.methods.iter().any(|m| m == teacher) {
                bail!("config key `quant.teacher`: `{teacher}` is not one of `methods`");
            }
            if q.bits.is_empty() {
                bail!("config key `quant.bits`: list at least one setting, e.g. [\"w8a8\"]");
            }
            q.settings()?;
            if q.freeze_after == 0 {
                bail!("config key `quant.freeze_after`: must be ≥ 1");
            }
            if q.epochs == 0 {
                bail!("config key `quant.epochs`: must be ≥ 1");
            }
            if !(q.lr > 0.0 && q.lr.is_finite()) {
                bail!("config key `quant.lr`: must be > 0, got {}", q.lr);
            }
            if !matches!(
                self.backbone,
                BackboneConfig::Iresnet(_) | BackboneConfig::Mobilefacenet(_)
            ) {
                bail!("config key `backbone.type`: quantisation needs iresnet or mobilefacenet");
            }
        }
        self.validate_students()?;
        if let Some(inv) = &self.inversion {
            let m = inv.method(self);
            if !self.methods.iter().any(|x| x == m) {
                bail!("config key `inversion.method`: `{m}` is not one of `methods`");
            }
            if inv.embeddings + inv.centres == 0 {
                bail!("config key `inversion.embeddings`: ask for at least one image (embeddings + centres ≥ 1)");
            }
            if inv.embeddings > self.synthetic.test_identities {
                bail!(
                    "config key `inversion.embeddings`: {} > synthetic.test_identities {}",
                    inv.embeddings,
                    self.synthetic.test_identities
                );
            }
            if let Err(e) = inv.config.validate() {
                match e {
                    fr_train::Error::Config { key, reason } => {
                        bail!("config key `inversion.config.{key}`: {reason}")
                    }
                    e => bail!("config key `inversion.config`: {e}"),
                }
            }
        }
        Ok(())
    }

    /// Checks of the `[[student]]` tables and `[student_data]`.
    fn validate_students(&self) -> Result<()> {
        let mut names = std::collections::BTreeSet::new();
        for (i, st) in self.students.iter().enumerate() {
            let key = format!("student[{i}]");
            if st.name.is_empty()
                || !st
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                bail!("config key `{key}.name`: `{}` must be non-empty ASCII letters, digits, `-`, `_` or `.` (it names a folder)", st.name);
            }
            if self.methods.contains(&st.name) || !names.insert(st.name.clone()) {
                bail!(
                    "config key `{key}.name`: `{}` is already a method or student",
                    st.name
                );
            }
            if let Some(h) = &st.head {
                if !self.heads.contains_key(h) {
                    bail!("config key `{key}.head`: `{h}` has no [heads.{h}] section");
                }
            }
            if !(st.kd_weight >= 0.0 && st.kd_weight.is_finite()) {
                bail!(
                    "config key `{key}.kd_weight`: must be finite and ≥ 0, got {}",
                    st.kd_weight
                );
            }
            if st.head.is_none() && st.kd_weight <= 0.0 {
                bail!("config key `{key}.kd_weight`: a student without a head learns from the MSE alone: the weight must be > 0");
            }
            if st.distills() {
                let Some(t) = &st.teacher else {
                    bail!("config key `{key}.teacher`: a student that distils (kd_weight > 0 or no head) needs a teacher method");
                };
                if !self.methods.contains(t) {
                    bail!("config key `{key}.teacher`: `{t}` is not one of `methods`");
                }
            }
            if let Some(lr) = st.lr {
                if !(lr > 0.0 && lr.is_finite()) {
                    bail!("config key `{key}.lr`: must be > 0, got {lr}");
                }
            }
            if let Some(b) = &st.backbone {
                if let Err(e) = b.complexity() {
                    bail!("config key `{key}.backbone`: {e}");
                }
                if b.input_shape() != self.backbone.input_shape() {
                    bail!(
                        "config key `{key}.backbone.input_size`: {:?} differs from the preset backbone's {:?} (teacher and evaluation images are rendered at that size)",
                        b.input_shape(),
                        self.backbone.input_shape()
                    );
                }
                if st.distills() && b.embedding_size() != self.backbone.embedding_size() {
                    bail!("config key `{key}.backbone.embedding_size`: a distilling student needs the teacher's embedding size {}", self.backbone.embedding_size());
                }
            }
        }
        if let Some(d) = &self.student_data {
            if let Err(e) = d.validate() {
                bail!("config key `student_data`: {e}");
            }
        }
        Ok(())
    }

    /// The joint objective `method` trains with, if the branch is on for it.
    pub fn render_for(&self, method: &str) -> Option<&JointConfig> {
        self.render
            .as_ref()
            .filter(|r| r.enabled && r.methods.iter().any(|m| m == method))
            .map(|r| &r.joint)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn preset_path(name: &str) -> PathBuf {
        crate::workspace_root()
            .join("configs")
            .join(format!("{name}.toml"))
    }

    #[test]
    fn shipped_lh2face_preset_parses_and_validates() {
        let p: Preset = crate::config_file::load(&preset_path("lh2face"), &[]).unwrap();
        p.validate().unwrap();
        assert_eq!(p.methods[0], "lh2face");
        assert!(p.methods.iter().any(|m| m == "arcface"));
        assert!(p.methods.iter().any(|m| m == "cosface"));
        // The branch is on for LH2Face, off for its ablation twin, at the paper's weights.
        let joint = p
            .render_for("lh2face")
            .expect("lh2face trains with the branch");
        assert_eq!(
            (joint.lambda_reco, joint.lambda_canon, joint.lambda_view),
            (1.0, 0.5, 0.1)
        );
        assert_eq!(joint.branch.image_size, 64);
        assert!(p.render_for("lh2face_no_render").is_none());
        assert_eq!(p.heads["lh2face_no_render"], p.heads["lh2face"]);
        assert!(p.render_for("arcface").is_none());
        let off: Preset = crate::config_file::load(
            &preset_path("lh2face"),
            &["render.enabled=false".to_string()],
        )
        .unwrap();
        assert!(off.render_for("lh2face").is_none());
    }

    #[test]
    fn bad_render_keys_are_named() {
        let load = |set: &str| {
            let p: Result<Preset> =
                crate::config_file::load(&preset_path("lh2face"), &[set.to_string()]);
            p.and_then(|p| p.validate().map(|_| p))
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let err = load("render.joint.lambda_cannon=1.0");
        assert!(err.contains("lambda_cannon"), "{err}");
        let err = load("render.joint.lambda_view=-1.0");
        assert!(err.contains("render.joint.lambda_view"), "{err}");
        let err = load("render.joint.branch.image_size=48");
        assert!(err.contains("render.joint.branch.image_size"), "{err}");
        let err = load(r#"render.methods=["magface"]"#);
        assert!(
            err.contains("render.methods") && err.contains("magface"),
            "{err}"
        );
    }

    #[test]
    fn shipped_quantface_preset_parses_and_bad_quant_keys_are_named() {
        let load = |sets: &[&str]| -> Result<Preset> {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let p: Preset = crate::config_file::load(&preset_path("quantface"), &sets)?;
            p.validate()?;
            Ok(p)
        };
        let p = load(&[]).unwrap();
        let q = p.quant.as_ref().expect("[quant] section");
        assert_eq!(q.teacher(&p), "arcface");
        let settings = q.settings().unwrap();
        assert_eq!(settings.len(), 2);
        assert_eq!((settings[1].1.weight, settings[1].1.activation), (6, 6));
        assert_eq!(settings[0].1.freeze_after, q.freeze_after);
        let err = |sets: &[&str]| format!("{:#}", load(sets).unwrap_err());
        let e = err(&[r#"quant.bits=["w8"]"#]);
        assert!(e.contains("quant.bits") && e.contains("w8"), "{e}");
        let e = err(&[r#"quant.bits=["w1a8"]"#]);
        assert!(e.contains("quant.bits") && e.contains("2..=16"), "{e}");
        let e = err(&[r#"quant.teacher="cosface""#]);
        assert!(e.contains("quant.teacher"), "{e}");
        let e = err(&["quant.lr=0.0"]);
        assert!(e.contains("quant.lr"), "{e}");
        let e = err(&["quant.epoch=3"]);
        assert!(e.contains("epoch"), "{e}");
    }

    fn load_preset(name: &str) -> Preset {
        let p: Preset = crate::config_file::load(&preset_path(name), &[]).unwrap();
        p.validate().unwrap();
        p
    }

    #[test]
    fn shipped_sface_preset_has_the_three_strategies() {
        let p = load_preset("sface");
        let names: Vec<&str> = p.students.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["sface-cls", "sface-kt", "sface-cl"]);
        let (cls, kt, cl) = (&p.students[0], &p.students[1], &p.students[2]);
        assert!(!cls.distills() && cls.head.as_deref() == Some("cosface"));
        assert!(kt.distills() && kt.head.is_none() && kt.teacher.as_deref() == Some("cosface"));
        assert_eq!(cl.kd_weight, fr_heads::kd::SFACE_CL_WEIGHT);
        let data = p.student_data.as_ref().expect("[student_data]");
        assert!(data.first_identity >= p.synthetic.train.num_identities as u64);
    }

    #[test]
    fn bad_student_tables_are_named() {
        let base = load_preset("sface");
        let err = |f: &dyn Fn(&mut Preset)| {
            let mut p = base.clone();
            f(&mut p);
            format!("{:#}", p.validate().unwrap_err())
        };
        let e = err(&|p| p.students[0].name = "a b".into());
        assert!(e.contains("student[0].name"), "{e}");
        let e = err(&|p| p.students[1].name = "sface-cls".into());
        assert!(
            e.contains("student[1].name") && e.contains("already"),
            "{e}"
        );
        let e = err(&|p| p.students[0].head = Some("arcface".into()));
        assert!(
            e.contains("student[0].head") && e.contains("arcface"),
            "{e}"
        );
        let e = err(&|p| p.students[1].teacher = None);
        assert!(e.contains("student[1].teacher"), "{e}");
        let e = err(&|p| p.students[2].teacher = Some("softmax".into()));
        assert!(
            e.contains("student[2].teacher") && e.contains("softmax"),
            "{e}"
        );
        let e = err(&|p| p.students[2].kd_weight = -1.0);
        assert!(e.contains("student[2].kd_weight"), "{e}");
        let e = err(&|p| p.students[1].kd_weight = 0.0);
        assert!(
            e.contains("student[1].kd_weight") && e.contains("without a head"),
            "{e}"
        );
        let e = err(&|p| p.students[1].lr = Some(0.0));
        assert!(e.contains("student[1].lr"), "{e}");
        let e = err(&|p| {
            let mut b = p.backbone.clone();
            if let BackboneConfig::Iresnet(c) = &mut b {
                c.input_size = 64;
            }
            p.students[0].backbone = Some(b);
        });
        assert!(e.contains("student[0].backbone.input_size"), "{e}");
        let e = err(&|p| {
            let mut b = p.backbone.clone();
            if let BackboneConfig::Iresnet(c) = &mut b {
                c.embedding_size = 64;
            }
            p.students[2].backbone = Some(b);
        });
        assert!(e.contains("student[2].backbone.embedding_size"), "{e}");
        let e = err(&|p| {
            if let Some(d) = p.student_data.as_mut() {
                d.num_identities = 0;
            }
        });
        assert!(e.contains("student_data"), "{e}");
    }

    #[test]
    fn shipped_inversion_preset_and_bad_inversion_keys() {
        let p = load_preset("arcface-inversion");
        let inv = p.inversion.as_ref().expect("[inversion]");
        assert_eq!(inv.method(&p), "arcface");
        assert!(inv.embeddings > 0 && inv.centres > 0);
        let err = |f: &dyn Fn(&mut Preset)| {
            let mut q = p.clone();
            f(&mut q);
            format!("{:#}", q.validate().unwrap_err())
        };
        let e = err(&|q| q.inversion.as_mut().unwrap().method = Some("cosface".into()));
        assert!(e.contains("inversion.method"), "{e}");
        let e = err(&|q| q.inversion.as_mut().unwrap().embeddings = 100_000);
        assert!(e.contains("inversion.embeddings"), "{e}");
        let e = err(&|q| q.inversion.as_mut().unwrap().config.steps = 0);
        assert!(e.contains("inversion.config.steps"), "{e}");
    }

    #[test]
    fn misspelt_key_is_named() {
        let err = crate::config_file::load::<Preset>(
            &preset_path("lh2face"),
            &["heads.arcface.scael=30".to_string()],
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("scael"), "{err:#}");
        let err = crate::config_file::load::<Preset>(
            &preset_path("lh2face"),
            &["train.epoch=3".to_string()],
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("epoch"), "{err:#}");
    }

    #[test]
    fn method_without_head_is_rejected() {
        let p: Preset = crate::config_file::load(
            &preset_path("lh2face"),
            &[r#"methods=["lh2face", "magface"]"#.to_string()],
        )
        .unwrap();
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("magface"), "{err}");
    }

    /// Every value the issue lists is refused by `load` + `validate` (what `reproduce` runs
    /// before training), with the key path and the allowed range in the message.
    #[test]
    fn bad_values_are_refused_with_key_path_and_range() {
        let err = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let p: Result<Preset> = crate::config_file::load(&preset_path("lh2face"), &sets);
            match p.and_then(|p| p.validate().map(|_| p)) {
                Ok(_) => panic!("{sets:?} accepted"),
                Err(e) => format!("{e:#}"),
            }
        };
        let cases: &[(&[&str], &[&str])] = &[
            // Unknown keys, at any depth.
            (&["heads.arcface.scael=30"], &["scael"]),
            (&["train.trainer.max_skips=3"], &["max_skips"]),
            (&["synthetic.train.num_identites=3"], &["num_identites"]),
            // Wrong types.
            (&["train.epochs=\"eight\""], &["eight", "train", "epochs"]),
            (&["heads.arcface.scale=\"big\""], &["big", "f64"]),
            (&["train.trainer.clip_max_norm=[1, 2]"], &["clip_max_norm"]),
            // Out of range.
            (
                &["heads.cosface.margin=-0.1"],
                &["heads.cosface.margin", "must be in [0, 1]", "-0.1"],
            ),
            (
                &["heads.arcface.scale=0"],
                &["heads.arcface.scale", "> 0", "got 0"],
            ),
            (
                &["heads.mf.type=magface", "heads.mf.lambda_g=1.0"],
                &["heads.mf.lambda_g", "must be at least", "got 1"],
            ),
            (
                &["heads.pfc.type=partial_fc", "heads.pfc.sample_rate=1.5"],
                &["heads.pfc.sample_rate", "(0, 1]", "1.5"],
            ),
            (
                &["heads.pfc.type=partial_fc", "heads.pfc.sample_rate=0.0"],
                &["heads.pfc.sample_rate", "(0, 1]"],
            ),
            (
                &[
                    "heads.pfc.type=partial_fc",
                    "heads.pfc.head={type = \"arcface\", margin = -0.5}",
                ],
                &["heads.pfc.head.margin"],
            ),
            (
                &["train.trainer.optimizer.lr=-0.1"],
                &["train.trainer.optimizer.lr"],
            ),
            (
                &["train.trainer.clip_max_norm=0.0"],
                &["train.trainer.clip_max_norm", "> 0"],
            ),
        ];
        for (sets, parts) in cases {
            let e = err(sets);
            for part in *parts {
                assert!(e.contains(part), "{sets:?}: {part:?} not in: {e}");
            }
        }
        // The same values in range pass.
        let ok: Vec<String> = [
            "heads.mf.type=magface",
            "heads.pfc.type=partial_fc",
            "heads.pfc.sample_rate=1.0",
            "heads.cosface.margin=0.0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p: Preset = crate::config_file::load(&preset_path("lh2face"), &ok).unwrap();
        p.validate().unwrap();
    }

    /// Fuzzing of preset parsing: every shipped preset (its `extends` chain resolved, written
    /// back as TOML text) with bytes flipped, overwritten, deleted or inserted and lines
    /// dropped or repeated, through TOML parsing, typing and `validate`: `Ok` or a clean
    /// error, never a panic. `FR_FUZZ_CASES` cases per round (default 64), one round or rounds
    /// until `FR_FUZZ_SECONDS` have passed:
    ///
    /// ```sh
    /// FR_FUZZ_SECONDS=600 cargo test --release -p xtask fuzz_preset_parsing -- --nocapture
    /// ```
    #[test]
    fn fuzz_preset_parsing() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        let dir = preset_path("_base");
        let dir = dir.parent().unwrap();
        let mut texts: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| toml::to_string(&crate::config_file::read_tree(&p, 0).unwrap()).unwrap())
            .collect();
        texts.sort();
        assert!(texts.len() >= 10);
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        let cases = env("FR_FUZZ_CASES").map_or(64, |c| c as u32);
        let seconds = env("FR_FUZZ_SECONDS");
        // (position, kind, byte): 0 flip a bit, 1 set a byte, 2 delete a byte, 3 insert a byte,
        // 4 drop the line at the position, 5 repeat it.
        let edit = (any::<usize>(), 0u8..6, any::<u8>());
        let input = (0..texts.len(), prop::collection::vec(edit, 1..6));
        let (tried, parsed) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
        let start = std::time::Instant::now();
        loop {
            let mut runner = TestRunner::new(Config {
                cases,
                failure_persistence: None,
                ..Config::default()
            });
            runner
                .run(&input, |(which, edits)| {
                    tried.set(tried.get() + 1);
                    let mut bytes = texts[which].clone().into_bytes();
                    for (pos, kind, b) in edits {
                        let at = pos % bytes.len().max(1);
                        let line = |bytes: &[u8]| {
                            let s = bytes[..at]
                                .iter()
                                .rposition(|&c| c == b'\n')
                                .map_or(0, |i| i + 1);
                            let e = bytes[at..]
                                .iter()
                                .position(|&c| c == b'\n')
                                .map_or(bytes.len(), |i| at + i + 1);
                            (s, e)
                        };
                        match kind {
                            _ if bytes.is_empty() => bytes.push(b),
                            0 => bytes[at] ^= 1 << (b % 8),
                            1 => bytes[at] = b,
                            2 => {
                                bytes.remove(at);
                            }
                            3 => bytes.insert(at, b),
                            4 => {
                                let (s, e) = line(&bytes);
                                bytes.drain(s..e);
                            }
                            _ => {
                                let (s, e) = line(&bytes);
                                let copy = bytes[s..e].to_vec();
                                bytes.splice(e..e, copy);
                            }
                        }
                    }
                    let text = String::from_utf8_lossy(&bytes);
                    if let Ok(tree) = toml::from_str::<toml::Value>(&text) {
                        if let Ok(p) = crate::config_file::finish::<Preset>(tree, &[], "fuzz") {
                            parsed.set(parsed.get() + 1);
                            let _ = p.validate();
                        }
                    }
                    Ok(())
                })
                .unwrap_or_else(|e| {
                    panic!(
                        "fuzz preset parsing: failed after {} inputs: {e}",
                        tried.get()
                    )
                });
            if seconds.is_none_or(|s| start.elapsed().as_secs() >= s) {
                break;
            }
        }
        println!(
            "fuzz preset parsing: {} inputs tried ({} typed) in {:.1} s, none panicked",
            tried.get(),
            parsed.get(),
            start.elapsed().as_secs_f64()
        );
    }
}
