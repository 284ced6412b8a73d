//! The `[[student]]` step of `reproduce`: backbones trained from scratch after the methods,
//! with a classification head, distillation from a trained method, or both:
//!
//! - SFace (Boutros et al., IJCB 2022): on synthetic identities, CLS (CosFace alone), KT (the
//!   label-free `MSE(normalise(f_s), normalise(f_t))` against a teacher trained on real faces)
//!   and CL (`CE_CosFace + 10000·MSE`);
//! - PocketNet (Boutros et al., IEEE Access 2022): a small student with ArcFace alone, with
//!   `+ 100·MSE` against the final teacher, and with multi-step KD (student epoch e learns
//!   from the teacher's checkpoint of epoch e + 1).
//!
//! A student with a head trains through the same loop as the methods ([`super::run_method_with`]
//! with fr-train's [`Distillation`] as its auxiliary loss); one without a head runs the
//! label-free loop [`distill_label_free`], which QuantFace's fine-tuning shares.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{bail, Context, Result};
use candle_core::{DType, Device, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use fr_backbone::{build_backbone, Backbone, BackboneConfig};
use fr_data::loader::BatchLoader;
use fr_data::Batch;
use fr_data::FaceDataset;
use fr_train::optim::AnyOptimizer;
use fr_train::{
    clip_grad_norm, grad_norm, Distillation, SeededVarMap, StepOutcome, Teacher, TeacherSchedule,
};
use serde::Serialize;
use tracing::info;

use super::{evaluate_all, run_method_with, EvalSet, MethodExtras, Reports};
use crate::config::{KdSchedule, Preset, StudentSection};
use crate::embed::BackboneEmbedder;
use crate::fit::{fit, FitConfig, Learner};

/// A deep copy of the backbone variables of `vars` (everything but `head.` and `render.`), so
/// that a student or a snapshot never aliases a trained model's variables.
pub(super) fn copy_backbone_vars(vars: &VarMap) -> Result<VarMap> {
    let copy = VarMap::new();
    {
        let src = vars.data().lock().expect("VarMap lock");
        let mut dst = copy.data().lock().expect("fresh VarMap lock");
        for (name, var) in src.iter() {
            if name.starts_with("head.") || name.starts_with("render.") {
                continue;
            }
            dst.insert(name.clone(), Var::from_tensor(&var.as_tensor().copy()?)?);
        }
    }
    Ok(copy)
}

/// A trained backbone frozen as a distillation teacher (eval mode only).
struct Frozen(Box<dyn Backbone>);

impl ModuleT for Frozen {
    fn forward_t(
        &self,
        xs: &candle_core::Tensor,
        _train: bool,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.0.forward_t(xs, false)
    }
}

/// `cfg`'s backbone over (a view of) `vars`, as a teacher.
pub(super) fn teacher_from(
    cfg: &BackboneConfig,
    vars: &VarMap,
    device: &Device,
) -> Result<Teacher> {
    let vb = VarBuilder::from_varmap(vars, DType::F32, device);
    Ok(Box::new(Frozen(build_backbone(cfg, vb)?)))
}

/// The trained methods a student may learn from: final variables, and per-epoch snapshots of
/// the backbone for multi-step distillation (`snapshots[k]` after `k + 1` epochs).
#[derive(Default)]
pub(super) struct Teachers {
    pub finals: BTreeMap<String, VarMap>,
    pub snapshots: BTreeMap<String, Vec<VarMap>>,
}

/// What a label-free distillation run did.
#[derive(Debug, Clone, Serialize)]
pub(super) struct DistillRun {
    /// Mean loss of each epoch.
    pub epoch_loss: Vec<f64>,
    /// Optimiser steps taken (non-finite steps are skipped and not counted).
    pub steps: u64,
    /// Images seen.
    pub images: usize,
    /// Wall time.
    pub train_seconds: f64,
}

/// Label-free distillation, `L = weight · MSE(normalise(student(x)), normalise(teacher(x)))`
/// (labels unused), with the preset's optimiser, schedule and clipping at base learning rate
/// `lr`; student epoch `e` uses `teachers[schedule.teacher_index(e, n)]`. A step whose loss or
/// gradient norm is not finite is skipped (no update, the schedule still advances).
struct LabelFree<'a> {
    student: &'a dyn ModuleT,
    params: Vec<Var>,
    optimizer: AnyOptimizer,
    teachers: &'a [&'a dyn ModuleT],
    schedule: TeacherSchedule,
    teacher: usize,
    preset: &'a Preset,
    lr: f64,
    weight: f64,
    tick: u64,
}

impl Learner for LabelFree<'_> {
    fn set_epoch(&mut self, epoch: usize) {
        self.teacher = self.schedule.teacher_index(epoch, self.teachers.len());
    }

    fn step(&mut self, batch: &Batch, total_steps: u64) -> Result<StepOutcome> {
        let trainer = &self.preset.train.trainer;
        let lr = trainer.schedule.lr_at(self.lr, self.tick, total_steps);
        self.optimizer.set_learning_rate(lr);
        let teacher = self.teachers[self.teacher];
        let target = fr_kernels::no_grad(|| teacher.forward_t(&batch.images, false))?;
        let out = self.student.forward_t(&batch.images, true)?;
        let loss = (fr_heads::kd::normalized_mse(&out, &target)? * self.weight)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut grads = loss.backward()?;
        let norm = grad_norm(&grads, &self.params)?;
        let skipped = !(value.is_finite() && norm.is_finite());
        if !skipped {
            if let Some(max) = trainer.clip_max_norm {
                clip_grad_norm(&mut grads, &self.params, max)?;
            }
            self.optimizer.step(&grads)?;
        }
        let step = self.tick;
        self.tick += 1;
        Ok(StepOutcome {
            step,
            loss: value,
            lr,
            grad_norm: norm.is_finite().then_some(norm),
            skipped,
            stats: BTreeMap::new(),
        })
    }

    fn steps_done(&self) -> u64 {
        self.tick
    }

    fn save(&mut self, dir: &std::path::Path) -> Result<std::path::PathBuf> {
        bail!(
            "label-free distillation keeps no checkpoints (asked to save into {})",
            dir.display()
        )
    }
}

/// Trains `student` by label-free distillation ([`LabelFree`]) over `epochs` passes of
/// `loader`, through [`fit`].
///
/// # Errors
/// Forward / backward failures, an empty loader or no teacher.
#[allow(clippy::too_many_arguments)]
pub(super) fn distill_label_free(
    preset: &Preset,
    student: &dyn ModuleT,
    params: Vec<(String, Var)>,
    teachers: &[&dyn ModuleT],
    schedule: TeacherSchedule,
    loader: &BatchLoader,
    epochs: usize,
    lr: f64,
    weight: f64,
    label: &str,
) -> Result<DistillRun> {
    if teachers.is_empty() {
        bail!("{label}: no teacher to distil from");
    }
    let plain: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut learner = LabelFree {
        student,
        params: plain,
        optimizer: preset.train.trainer.optimizer.build(params)?,
        teachers,
        schedule,
        teacher: 0,
        preset,
        lr,
        weight,
        tick: 0,
    };
    let run = fit(
        &mut learner,
        loader,
        &FitConfig::new(label, epochs),
        &mut (),
    )?;
    Ok(DistillRun {
        steps: run.good_steps,
        images: run.images,
        train_seconds: run.train_seconds,
        epoch_loss: run.epoch_loss,
    })
}

/// One trained student, for metrics.json and the report.
#[derive(Debug, Serialize)]
pub(super) struct StudentResult {
    /// Its `[[student]]` table.
    pub config: StudentSection,
    /// The backbone it trained (the preset's when the table names none).
    pub backbone: BackboneConfig,
    /// Backbone parameters and multiply-accumulates per image.
    pub params: u64,
    pub macs: u64,
    /// The training data it saw.
    pub data: String,
    /// Mean loss of each epoch (head + λ·MSE, or the MSE alone).
    pub epoch_loss: Vec<f64>,
    pub train_seconds: f64,
    pub images_per_second: f64,
    /// Images per step.
    pub batch_size: usize,
    pub protocols: Reports,
}

/// Trains and evaluates every `[[student]]` of `preset` on `train_set` (described by
/// `data_desc`), with the trained `teachers`.
///
/// # Errors
/// A missing teacher, a bad backbone or head, training or evaluation failures.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    preset: &Preset,
    teachers: &Teachers,
    train_set: Arc<dyn FaceDataset>,
    sets: &[EvalSet],
    device: &Device,
    input_size: u32,
    out_dir: &std::path::Path,
    data_desc: &str,
) -> Result<Vec<StudentResult>> {
    let mut results = Vec::new();
    for st in &preset.students {
        let backbone_cfg = st
            .backbone
            .clone()
            .unwrap_or_else(|| preset.backbone.clone());
        let complexity = backbone_cfg.complexity()?;
        let teacher_models = teachers_of(st, preset, teachers, device)?;
        let schedule = match st.schedule {
            KdSchedule::Fixed => TeacherSchedule::Fixed,
            KdSchedule::MultiStep => TeacherSchedule::MultiStep,
        };
        info!(student = %st.name, params = complexity.params, teachers = teacher_models.len(), "training student");
        let run = StudentRun {
            preset,
            st,
            backbone: &backbone_cfg,
            teachers: teacher_models,
            schedule,
            train_set: train_set.clone(),
            sets,
            device,
            input_size,
        };
        let (epoch_loss, train_seconds, images_per_second, batch_size, protocols) = match &st.head {
            Some(head) => run.with_head(head, out_dir, data_desc)?,
            None => run.label_free()?,
        };
        results.push(StudentResult {
            config: st.clone(),
            backbone: backbone_cfg,
            params: complexity.params,
            macs: complexity.macs,
            data: data_desc.to_string(),
            epoch_loss,
            train_seconds,
            images_per_second,
            batch_size,
            protocols,
        });
    }
    Ok(results)
}

/// The teachers of student `st`, in schedule order: the final teacher, or its per-epoch
/// snapshots (multi-step KD); none when the student does not distil.
fn teachers_of(
    st: &StudentSection,
    preset: &Preset,
    teachers: &Teachers,
    device: &Device,
) -> Result<Vec<Teacher>> {
    if !st.distills() {
        return Ok(Vec::new());
    }
    let t = st
        .teacher
        .as_deref()
        .context("a distilling student without a teacher (validated before)")?;
    Ok(match st.schedule {
        KdSchedule::Fixed => vec![teacher_from(
            &preset.backbone,
            teachers
                .finals
                .get(t)
                .with_context(|| format!("teacher `{t}` not trained"))?,
            device,
        )?],
        KdSchedule::MultiStep => teachers
            .snapshots
            .get(t)
            .with_context(|| format!("no per-epoch snapshots of teacher `{t}`"))?
            .iter()
            .map(|v| teacher_from(&preset.backbone, v, device))
            .collect::<Result<_>>()?,
    })
}

/// One student's training run: what both kinds of student need.
struct StudentRun<'a> {
    preset: &'a Preset,
    st: &'a StudentSection,
    backbone: &'a BackboneConfig,
    teachers: Vec<Teacher>,
    schedule: TeacherSchedule,
    train_set: Arc<dyn FaceDataset>,
    sets: &'a [EvalSet],
    device: &'a Device,
    input_size: u32,
}

/// A student's epoch losses, training seconds, images/s, batch size and reports.
type StudentOutcome = (Vec<f64>, f64, f64, usize, Reports);

impl StudentRun<'_> {
    /// A student with a head: the methods' loop on a derived preset (its backbone, its head
    /// under its name), with [`Distillation`] as the auxiliary loss when `kd_weight` > 0.
    fn with_head(
        self,
        head: &str,
        out_dir: &std::path::Path,
        data_desc: &str,
    ) -> Result<StudentOutcome> {
        let (preset, st, backbone_cfg, device) = (self.preset, self.st, self.backbone, self.device);
        let mut p = preset.clone();
        p.backbone = backbone_cfg.clone();
        p.heads.insert(st.name.clone(), preset.heads[head].clone());
        p.render = None;
        let auxiliary: Option<Box<dyn fr_train::AuxiliaryLoss>> = if st.kd_weight > 0.0 {
            Some(Box::new(Distillation::with_schedule(
                self.teachers,
                self.schedule,
                st.kd_weight,
            )?))
        } else {
            None
        };
        let (r, _) = run_method_with(
            &p,
            &st.name,
            self.train_set.clone(),
            self.sets,
            None,
            device,
            self.input_size,
            out_dir,
            None,
            &out_dir.join("unused_render_grid.png"),
            data_desc,
            MethodExtras {
                auxiliary,
                on_epoch: None,
            },
        )?;
        Ok((
            r.epoch_loss,
            r.train_seconds,
            r.images_per_second,
            r.batch_size,
            r.protocols,
        ))
    }

    /// A student without a head: label-free distillation ([`distill_label_free`]) from its
    /// teachers, then evaluation.
    fn label_free(self) -> Result<StudentOutcome> {
        let (preset, st, backbone_cfg, device) = (self.preset, self.st, self.backbone, self.device);
        let seeded = SeededVarMap::new(preset.seed);
        let model = build_backbone(&backbone_cfg, seeded.var_builder(DType::F32, device))
            .with_context(|| format!("building student {}", st.name))?;
        let mut params: Vec<(String, Var)> = {
            let data = seeded.varmap().data().lock().expect("student VarMap lock");
            data.iter()
                .filter(|(n, _)| model.is_trainable(n))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect()
        };
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let batch_size = self.train_set.len().min(preset.train.batch_size);
        let loader = BatchLoader::new(
            self.train_set.clone(),
            preset.loader_config(batch_size, self.input_size),
        )?
        .with_device(device.clone());
        let refs: Vec<&dyn ModuleT> = self
            .teachers
            .iter()
            .map(|t| t.as_ref() as &dyn ModuleT)
            .collect();
        let run = distill_label_free(
            preset,
            model.as_ref(),
            params,
            &refs,
            self.schedule,
            &loader,
            preset.train.epochs,
            st.lr.unwrap_or(preset.train.trainer.optimizer.lr()),
            st.kd_weight,
            &st.name,
        )?;
        let model: &dyn ModuleT = model.as_ref();
        let mut embedder = BackboneEmbedder::new(model, device);
        let (protocols, _) = evaluate_all(&mut embedder, self.sets, preset, &st.name)?;
        Ok((
            run.epoch_loss,
            run.train_seconds,
            run.images as f64 / run.train_seconds.max(1e-9),
            batch_size,
            protocols,
        ))
    }
}

/// The report's student section: one row per student with its backbone size, objective,
/// teacher schedule and accuracy on each protocol.
pub(super) fn section(results: &[StudentResult], preset: &Preset) -> String {
    if results.is_empty() {
        return String::new();
    }
    let protocols: Vec<&str> = results[0]
        .protocols
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    let mut md = format!(
        "\n## Students\n\nEach student is trained from scratch (seed {}) for {} epochs after the \
methods. Objective: `L_head + λ·MSE(normalise(f_s), normalise(f_t))` with the teacher frozen in eval \
mode, or the MSE alone when the student has no head (label-free). Multi-step: student epoch e \
learns from the teacher's checkpoint of epoch e + 1 (PocketNet). Data: {}.\n\n\
| student | backbone | params | MACs | objective | teacher | schedule | {} | train s | img/s |\n\
|---|---|---|---|---|---|---|{}---|---|\n",
        preset.seed,
        preset.train.epochs,
        results[0].data,
        protocols
            .iter()
            .map(|p| format!("accuracy {p}"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(protocols.len()),
    );
    for r in results {
        let c = &r.config;
        let objective = match (&c.head, c.kd_weight) {
            (Some(h), w) if w > 0.0 => format!("{h} + {w}·MSE"),
            (Some(h), _) => h.clone(),
            (None, w) => format!("{w}·MSE (label-free)"),
        };
        let teacher = if c.distills() {
            c.teacher.clone().unwrap_or_default()
        } else {
            "—".to_string()
        };
        let schedule = if c.distills() {
            match c.schedule {
                KdSchedule::Fixed => "final teacher",
                KdSchedule::MultiStep => "multi-step",
            }
        } else {
            "—"
        };
        let accs: Vec<String> = r
            .protocols
            .iter()
            .map(|(_, x)| format!("{:.4} ± {:.4}", x.accuracy_mean, x.accuracy_std))
            .collect();
        md += &format!(
            "| {} | {} | {} | {:.1} M | {objective} | {teacher} | {schedule} | {} | {:.0} | {:.0} |\n",
            c.name,
            backbone_name(&r.backbone),
            r.params,
            r.macs as f64 / 1e6,
            accs.join(" | "),
            r.train_seconds,
            r.images_per_second,
        );
    }
    md
}

/// A short description of a backbone config for tables.
fn backbone_name(cfg: &BackboneConfig) -> String {
    serde_json::to_value(cfg)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| "backbone".to_string())
}
