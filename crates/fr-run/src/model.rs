//! Model assembly: a preset's backbone and one method's head (and, where the preset asks, the
//! reconstruction branch or another auxiliary loss) in one seeded `VarMap`, wrapped in a
//! [`Trainer`] with the preset's optimiser, schedule and clipping and a model card — the one
//! place that decides what trains.
//!
//! What trains: every variable under `head.`; every variable under `render.` but BatchNorm
//! running statistics; the backbone's variables as the backbone says
//! ([`fr_backbone::Backbone::is_trainable`]: a QuantFace backbone freezes its activation
//! ranges, every backbone its running statistics).

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use fr_backbone::{build_backbone, Backbone, ModelCard};
use fr_data::FaceDataset;
use fr_heads::{build_head, Head};
use fr_render::{JointConfig, RenderObjective};
use fr_train::{not_running_stat, AuxiliaryLoss, SeededVarMap, Trainer};

use crate::{bail, Context, Preset, Result};

/// Builds a custom head (`D` embedding size, `C` classes, its `VarBuilder` under `head.`):
/// the model-parallel Partial FC of a data-parallel run, say.
pub type HeadBuilder<'a> =
    Box<dyn FnOnce(usize, usize, VarBuilder<'static>) -> Result<Box<dyn Head>> + 'a>;

/// What to assemble for one method of a preset.
pub struct ModelSpec<'a> {
    /// The preset: backbone, heads, trainer settings, seed.
    pub preset: &'a Preset,
    /// The method (a key of `preset.heads`).
    pub method: &'a str,
    /// Identities `C` and images of the training set.
    pub train_set: &'a dyn FaceDataset,
    /// The training set as the model card names it.
    pub data: String,
    /// Where the variables live.
    pub device: Device,
    /// The backbone's dtype (`F32`, or `BF16` / `F16` under mixed precision); the head and
    /// the reconstruction branch stay in f32.
    pub backbone_dtype: DType,
    /// Build the reconstruction branch when the preset's `[render]` names the method.
    pub render: bool,
    /// An extra objective added to the head's loss (distillation); not combinable with the
    /// reconstruction branch.
    pub auxiliary: Option<Box<dyn AuxiliaryLoss>>,
    /// A custom head in place of the preset's (`None`: `fr_heads::build_head`).
    pub head: Option<HeadBuilder<'a>>,
}

impl<'a> ModelSpec<'a> {
    /// Method `method` of `preset` in f32 on `device`, with the preset's head, its
    /// reconstruction branch where configured, no auxiliary loss.
    pub fn new(
        preset: &'a Preset,
        method: &'a str,
        train_set: &'a dyn FaceDataset,
        data: impl Into<String>,
        device: &Device,
    ) -> Self {
        Self {
            preset,
            method,
            train_set,
            data: data.into(),
            device: device.clone(),
            backbone_dtype: DType::F32,
            render: true,
            auxiliary: None,
            head: None,
        }
    }
}

/// An assembled method: its trainer, and the seeded `VarMap` every variable lives in.
pub struct Model {
    /// Backbone + head (+ auxiliary loss), ready to [`fit`](crate::fit::fit).
    pub trainer: Trainer,
    /// The variables: backbone names as the backbone's state dict, `head.*`, `render.*`.
    pub seeded: SeededVarMap,
    /// The reconstruction branch's settings when the model has one.
    pub render: Option<JointConfig>,
}

/// Assembles `spec` (see the module documentation for what trains).
///
/// # Errors
/// An unknown method, a backbone, head or branch that cannot be built (named), or both a
/// reconstruction branch and another auxiliary loss.
pub fn assemble(spec: ModelSpec<'_>) -> Result<Model> {
    let ModelSpec {
        preset,
        method,
        train_set,
        data,
        device,
        backbone_dtype,
        render,
        auxiliary,
        head,
    } = spec;
    let Some(head_cfg) = preset.heads.get(method) else {
        bail!("method `{method}` has no [heads.{method}] section");
    };
    let classes = train_set.num_classes();
    let seeded = SeededVarMap::new(preset.seed);
    let backbone: Box<dyn Backbone> = build_backbone(
        &preset.backbone,
        seeded.var_builder(backbone_dtype, &device),
    )
    .with_context(|| format!("building the backbone for {method}"))?;
    let vb = seeded.var_builder(DType::F32, &device);
    let head = match head {
        None => build_head(head_cfg, backbone.embedding_size(), classes, vb.pp("head"))
            .with_context(|| format!("building head {method}"))?,
        Some(build) => build(backbone.embedding_size(), classes, vb.pp("head"))?,
    };
    // The reconstruction branch, in the same VarMap (optimised, clipped and checkpointed with
    // everything else) under `render.`.
    let joint = render.then(|| preset.render_for(method).cloned()).flatten();
    let objective = joint
        .as_ref()
        .map(|j| RenderObjective::new(j, vb.pp("render")))
        .transpose()
        .with_context(|| format!("building the reconstruction branch for {method}"))?;
    let frozen: Vec<String> = {
        let data = seeded.varmap().data().lock().expect("fresh VarMap lock");
        data.keys()
            .filter(|n| {
                if n.starts_with("head.") {
                    false
                } else if n.starts_with("render.") {
                    !not_running_stat(n)
                } else {
                    !backbone.is_trainable(n)
                }
            })
            .cloned()
            .collect()
    };
    let mut trainer_cfg = preset.train.trainer.clone();
    trainer_cfg.seed = preset.seed;
    let mut trainer = Trainer::new(
        backbone,
        head,
        seeded.varmap().clone(),
        trainer_cfg,
        move |n: &str| !frozen.iter().any(|f| f == n),
    )?;
    match (objective, auxiliary) {
        (Some(_), Some(_)) => bail!(
            "{method}: the reconstruction branch and distillation cannot be combined in one run"
        ),
        (Some(o), None) => trainer = trainer.with_auxiliary(Box::new(o))?,
        (None, Some(aux)) => trainer = trainer.with_auxiliary(aux)?,
        (None, None) => {}
    }
    // The model card written beside every checkpoint (config.json), so that a step folder
    // loads by path or, uploaded, by Hub repository id.
    trainer = trainer.with_model_card(
        ModelCard::new(preset.backbone.clone())
            .with_head(method, serde_json::to_value(head_cfg).ok(), Some(classes))
            .with_training_set(data, Some(classes), Some(train_set.len())),
    );
    Ok(Model {
        trainer,
        seeded,
        render: joint,
    })
}
