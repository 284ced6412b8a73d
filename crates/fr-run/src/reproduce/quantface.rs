//! QuantFace's step of `reproduce` (Boutros et al., ICPR 2022): quantised copies of a trained
//! backbone, calibrated on training images, then fine-tuned label-free by distillation from the
//! frozen full-precision model, `L = MSE(normalise(f_q), normalise(f_fp))`.

use std::sync::Arc;

use crate::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use fr_backbone::{BackboneConfig, IResNet, MobileFaceNet, QuantBits};
use fr_data::loader::BatchLoader;
use fr_data::FaceDataset;
use fr_train::TeacherSchedule;
use serde::Serialize;
use tracing::info;

use super::student::{copy_backbone_vars, distill_label_free};
use super::{evaluate_all, EvalSet, Reports};
use crate::config::{Preset, QuantSection};
use crate::embed::BackboneEmbedder;

/// One bit setting of the QuantFace step.
#[derive(Debug, Serialize)]
pub(super) struct QuantSetting {
    /// `w8a8`, `w6a6`, …
    pub name: String,
    /// Weight and activation widths, and the forwards after which the ranges freeze.
    pub bits: QuantBits,
    /// Backbone parameters at the weight width, in bytes.
    pub size_bytes: u64,
    /// After calibrating the activation ranges only (no gradient step).
    pub calibrated: Reports,
    /// After the distillation fine-tuning.
    pub distilled: Reports,
    /// Mean distillation loss of each epoch.
    pub epoch_loss: Vec<f64>,
    /// Distillation steps run.
    pub steps: u64,
    /// Wall time of the distillation.
    pub train_seconds: f64,
}

/// What the QuantFace step produced, for metrics.json and the report.
#[derive(Debug, Serialize)]
pub(super) struct QuantResult {
    /// The full-precision method whose backbone is quantised.
    pub teacher: String,
    /// The section it ran with.
    pub config: QuantSection,
    /// Backbone parameters.
    pub params: u64,
    /// The float model's size (32 bits per parameter), in bytes.
    pub float_size_bytes: u64,
    /// One entry per bit setting, in the order of `quant.bits`.
    pub settings: Vec<QuantSetting>,
}

/// A float or fake-quantised backbone over `varmap`'s variables, with its trainable rule.
type Built = (Box<dyn ModuleT + Send>, fn(&str) -> bool);

fn build(
    cfg: &BackboneConfig,
    varmap: &VarMap,
    device: &Device,
    bits: Option<QuantBits>,
) -> Result<Built> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
    Ok(match (cfg, bits) {
        (BackboneConfig::Iresnet(c), None) => {
            (Box::new(IResNet::new(c, vb)?), IResNet::is_trainable)
        }
        (BackboneConfig::Iresnet(c), Some(b)) => (
            Box::new(IResNet::new(c, vb)?.quantize(b)?),
            IResNet::is_trainable,
        ),
        (BackboneConfig::Mobilefacenet(c), None) => (
            Box::new(MobileFaceNet::new(c, vb)?),
            MobileFaceNet::is_trainable,
        ),
        (BackboneConfig::Mobilefacenet(c), Some(b)) => (
            Box::new(MobileFaceNet::new(c, vb)?.quantize(b)?),
            MobileFaceNet::is_trainable,
        ),
        _ => bail!("config key `backbone.type`: quantisation needs iresnet or mobilefacenet"),
    })
}

/// Runs QuantFace on the trained `teacher_vars` (the variables of method `teacher`): for each
/// bit setting, a quantised deep copy is calibrated, evaluated, distilled and evaluated again.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    preset: &Preset,
    q: &QuantSection,
    teacher: &str,
    teacher_vars: &VarMap,
    train_set: Arc<dyn FaceDataset>,
    sets: &[EvalSet],
    device: &Device,
    input_size: u32,
) -> Result<QuantResult> {
    let (teacher_model, _) = build(&preset.backbone, teacher_vars, device, None)
        .context("rebuilding the QuantFace teacher")?;
    let params = preset.backbone.complexity()?.params;
    let batch_size = train_set.len().min(preset.train.batch_size);
    let loader = BatchLoader::new(
        train_set.clone(),
        preset.loader_config(batch_size, input_size),
    )?
    .with_device(device.clone());
    let per_epoch = loader.batches_per_epoch() as u64;
    if per_epoch == 0 {
        bail!("QuantFace: the training set is empty");
    }
    let mut settings = Vec::new();
    for (name, bits) in q.settings()? {
        let label = format!("{teacher} {name}");
        let vars = copy_backbone_vars(teacher_vars)?;
        let (student, trainable) = build(&preset.backbone, &vars, device, Some(bits))
            .with_context(|| format!("building the {name} student"))?;
        let (mut params_t, mut buffers) = (Vec::new(), Vec::new());
        {
            let data = vars.data().lock().expect("student VarMap lock");
            for (n, v) in data.iter() {
                if trainable(n) {
                    params_t.push((n.clone(), v.clone()));
                } else if n.contains("running_") {
                    buffers.push(v.clone());
                }
            }
        }
        params_t.sort_by(|a, b| a.0.cmp(&b.0));

        // Calibration: training-mode forwards set the activation ranges; BatchNorm's running
        // statistics are put back afterwards, so only the ranges change.
        let saved: Vec<Tensor> = buffers
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        let mut forwards = 0usize;
        'calib: for epoch in 0.. {
            for batch in loader.epoch(1000 + epoch as u64) {
                if forwards >= q.calibration_batches.min(q.freeze_after) {
                    break 'calib;
                }
                let batch = batch?;
                fr_kernels::no_grad(|| student.forward_t(&batch.images, true))?;
                forwards += 1;
            }
        }
        for (v, t) in buffers.iter().zip(&saved) {
            v.set(t)?;
        }
        info!(setting = %name, forwards, "activation ranges calibrated");
        let model: &dyn ModuleT = student.as_ref();
        let mut embedder = BackboneEmbedder::new(model, device);
        let (calibrated, _) = evaluate_all(
            &mut embedder,
            sets,
            preset,
            &format!("{label} (calibration)"),
        )?;

        // Distillation from the frozen teacher, labels unused.
        let run = distill_label_free(
            preset,
            student.as_ref(),
            params_t,
            &[teacher_model.as_ref() as &dyn ModuleT],
            TeacherSchedule::Fixed,
            &loader,
            q.epochs,
            q.lr,
            1.0,
            &name,
        )?;
        let (distilled, _) = evaluate_all(&mut embedder, sets, preset, &format!("{label} + KD"))?;
        settings.push(QuantSetting {
            size_bytes: fr_backbone::quant::backbone_size_bytes(&preset.backbone, bits.weight)?,
            name,
            bits,
            calibrated,
            distilled,
            epoch_loss: run.epoch_loss,
            steps: run.steps,
            train_seconds: run.train_seconds,
        });
    }
    Ok(QuantResult {
        teacher: teacher.to_string(),
        config: q.clone(),
        params,
        float_size_bytes: fr_backbone::quant::backbone_size_bytes(&preset.backbone, 32)?,
        settings,
    })
}

/// The report's QuantFace section: model size at 32 bits and at each setting, accuracy of the
/// float teacher, of the calibrated and of the distilled students on the first protocol.
pub(super) fn section(r: &QuantResult, teacher_reports: &Reports) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let acc = |reports: &Reports| {
        reports.first().map_or("—".to_string(), |(_, x)| {
            format!("{:.4}", x.accuracy_mean)
        })
    };
    let protocol = teacher_reports.first().map_or("—", |(n, _)| n.as_str());
    let mut md = format!(
        "\n## QuantFace: model size and accuracy at 32 / {} bits\n\n\
Backbone of `{}` ({} parameters). Each student is a deep copy of it with fake-quantised \
convolution / linear weights (per output channel), PReLU slopes (one range per layer, at the \
activation width) and activations (per tensor, after every PReLU and residual addition; running \
min / max frozen after {} training forwards); BatchNorm stays in float. \"calibration only\": the activation ranges set by {} training-mode forwards, no gradient \
step. \"+ KD\": then {} epochs of label-free distillation, L = MSE(normalise(f_q), \
normalise(f_fp)) against the frozen teacher, lr {}. Size: every parameter at the weight width. \
Accuracy on `{protocol}`.\n\n\
| model | weight / activation bits | size (bytes) | size (MiB) | accuracy, calibration only | accuracy after KD | KD loss, first → last epoch |\n\
|---|---|---|---|---|---|---|\n\
| {} (full precision) | 32 / 32 | {} | {:.3} | {} | — | — |\n",
        r.settings
            .iter()
            .map(|s| s.bits.weight.to_string())
            .collect::<Vec<_>>()
            .join(" / "),
        r.teacher,
        r.params,
        r.config.freeze_after,
        r.config.calibration_batches,
        r.config.epochs,
        r.config.lr,
        r.teacher,
        r.float_size_bytes,
        mib(r.float_size_bytes),
        acc(teacher_reports),
    );
    for s in &r.settings {
        md += &format!(
            "| {} {} | {} / {} | {} | {:.3} | {} | {} | {:.3e} → {:.3e} |\n",
            r.teacher,
            s.name,
            s.bits.weight,
            s.bits.activation,
            s.size_bytes,
            mib(s.size_bytes),
            acc(&s.calibrated),
            acc(&s.distilled),
            s.epoch_loss.first().copied().unwrap_or(f64::NAN),
            s.epoch_loss.last().copied().unwrap_or(f64::NAN),
        );
    }
    md
}
