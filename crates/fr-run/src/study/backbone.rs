//! `cargo xtask study backbone-size`: one head and one data set, IResNet depths 18 / 34 / 50
//! with insightface's block counts at the base config's widths and input size.

use std::sync::Arc;

use crate::{bail, Result};
use fr_backbone::BackboneConfig;
use fr_data::recordio::RecordIoDataset;
use fr_data::synthetic::SyntheticFaces;
use fr_data::{FaceDataset, InMemoryDataset};
use serde::Serialize;
use tracing::info;

use super::{
    accuracy_cell, plot_panels, preset_for_head, tar_cell, Context, Data, Metric, Outcome, Panel,
    Plan, Point, Series, Study, StudyOptions, TrainingData,
};
use crate::config::Preset;
use crate::report::Written;

/// IResNet depths and their blocks per stage (insightface's `iresnet18` ... `iresnet200`).
pub(crate) const DEPTHS: [(u32, [usize; 4]); 5] = [
    (18, [2, 2, 2, 2]),
    (34, [3, 4, 6, 3]),
    (50, [3, 4, 14, 3]),
    (100, [3, 13, 30, 3]),
    (200, [6, 26, 60, 6]),
];

/// The depths trained without `--depths`.
pub(crate) const DEFAULT_DEPTHS: [u32; 3] = [18, 34, 50];

/// One depth of the study: what a run varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Depth {
    /// The IResNet depth (18, 34, ...).
    pub(crate) depth: u32,
    /// Blocks per stage.
    pub(crate) layers: [usize; 4],
}

/// The depths `requested` (default [`DEFAULT_DEPTHS`]), in the order given.
///
/// # Errors
/// A depth IResNet does not define, or one named twice.
pub(crate) fn depths(requested: &[u32]) -> Result<Vec<Depth>> {
    let requested = if requested.is_empty() {
        &DEFAULT_DEPTHS[..]
    } else {
        requested
    };
    let mut out: Vec<Depth> = Vec::new();
    for &d in requested {
        let Some(&(depth, layers)) = DEPTHS.iter().find(|(k, _)| *k == d) else {
            bail!(
                "--depths {d}: IResNet depths are {}",
                DEPTHS
                    .iter()
                    .map(|(k, _)| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if out.iter().any(|x| x.depth == d) {
            bail!("--depths {d} is named twice");
        }
        out.push(Depth { depth, layers });
    }
    Ok(out)
}

/// `preset` with its IResNet's blocks per stage set to `depth`'s (widths, embedding, input
/// size and everything else unchanged).
///
/// # Errors
/// A base backbone that is not an IResNet.
pub(crate) fn depth_preset(preset: &Preset, depth: Depth) -> Result<Preset> {
    let mut p = preset.clone();
    match &mut p.backbone {
        BackboneConfig::Iresnet(c) => c.layers = depth.layers,
        other => bail!(
            "study backbone-size varies the depth of an IResNet; the base config's backbone is \
`{}` (set `backbone.type = \"iresnet\"`)",
            serde_json::to_value(&*other)
                .ok()
                .and_then(|v| v["type"].as_str().map(str::to_string))
                .unwrap_or_default()
        ),
    }
    Ok(p)
}

/// Every (head, depth) run: heads in `--head` order, then depths.
///
/// # Errors
/// As [`depths`] and [`depth_preset`].
pub(crate) fn plans(base: &Preset, data: &Data, requested: &[u32]) -> Result<Vec<Plan<Depth>>> {
    let depths = depths(requested)?;
    let mut out = Vec::new();
    for head in &base.methods {
        for &d in &depths {
            let preset = depth_preset(&preset_for_head(base, head), d)?;
            out.push(Plan::new(
                Study::BackboneSize,
                head,
                &format!("r{}", d.depth),
                preset,
                d,
                data,
            )?);
        }
    }
    Ok(out)
}

/// The one training set every depth shares, built on first use.
struct SharedData<'a> {
    ctx: &'a Context,
    built: Option<(Arc<dyn FaceDataset>, String)>,
}

impl TrainingData<Depth> for SharedData<'_> {
    fn train_set(&mut self, _plan: &Plan<Depth>) -> Result<(Arc<dyn FaceDataset>, String)> {
        if let Some(b) = &self.built {
            return Ok(b.clone());
        }
        let built: (Arc<dyn FaceDataset>, String) = match &self.ctx.data {
            Data::Synthetic => {
                let t = &self.ctx.base.synthetic.train;
                info!("rendering the training identities");
                let ds =
                    InMemoryDataset::from_dataset(&SyntheticFaces::new(t.clone())?, self.ctx.size)?;
                (Arc::new(ds), train_desc(&self.ctx.base, &self.ctx.data))
            }
            Data::Rec { dir, .. } => {
                let ds = RecordIoDataset::open(dir)?;
                let desc = format!(
                    "RecordIO {} ({} images, {} identities)",
                    dir.display(),
                    ds.len(),
                    ds.num_classes()
                );
                (Arc::new(ds), desc)
            }
        };
        self.built = Some(built.clone());
        Ok(built)
    }
}

/// The training data, described for the report without building it.
fn train_desc(base: &Preset, data: &Data) -> String {
    match data {
        Data::Synthetic => {
            let t = &base.synthetic.train;
            format!(
                "synthetic identities, {} ids × {} images (rendered at {} px, seed {}, {:.0} % \
large-pose sharp, {:.0} % blurred/noisy)",
                t.num_identities,
                t.images_per_identity,
                t.image_size,
                t.seed,
                100.0 * t.hard_fraction,
                100.0 * t.low_quality_fraction
            )
        }
        Data::Rec { dir, .. } => format!("RecordIO {}", dir.display()),
    }
}

/// Per-run numbers of the report beyond the scores.
#[derive(Debug, Serialize)]
struct Details {
    depth: u32,
    layers: [usize; 4],
    widths: Option<[usize; 4]>,
    /// Backbone parameters (head excluded).
    params: u64,
    /// MACs of one image as `cargo xtask info` and arcface_torch's `flops.py` (ptflops) count
    /// them: `conv_fc_macs` plus per-element operations of BatchNorm, PReLU, biases, pooling.
    macs: u64,
    /// Multiply-accumulates of the convolutions and fully connected layers alone.
    conv_fc_macs: u64,
}

/// A run in metrics.json.
#[derive(Debug, Serialize)]
struct RunEntry<'a> {
    name: &'a str,
    head: &'a str,
    backbone: &'a str,
    reused: bool,
    details: Details,
    result: &'a super::RunResult,
    config: &'a serde_json::Value,
}

#[derive(Debug, Serialize)]
struct Metrics<'a> {
    study: &'static str,
    heads: &'a [String],
    seed: u64,
    data: String,
    runs: Vec<RunEntry<'a>>,
    rows: Vec<crate::report::Row>,
    total_seconds: f64,
}

fn details(o: &Outcome<Depth>) -> Result<Details> {
    let c = o.plan.preset.backbone.complexity()?;
    let widths = match &o.plan.preset.backbone {
        BackboneConfig::Iresnet(i) => Some(i.widths),
        _ => None,
    };
    Ok(Details {
        depth: o.plan.spec.depth,
        layers: o.plan.spec.layers,
        widths,
        params: c.params,
        macs: c.ptflops_macs(),
        conv_fc_macs: c.macs,
    })
}

/// The summary table: one row per run (head, depth, size, accuracy per protocol, TAR@FAR on
/// the first, throughput, training time).
fn summary_table(
    outcomes: &[Outcome<Depth>],
    details: &[Details],
    protocols: &[String],
    fars: &[f64],
) -> String {
    let first = protocols.first().cloned().unwrap_or_default();
    let mut t = String::from("| head | backbone | layers | params (M) | MACs (M) |");
    for p in protocols {
        t += &format!(" accuracy {p} (%) |");
    }
    for far in fars {
        t += &format!(" TAR@FAR={far:.0e} {first} (%) |");
    }
    t += " train images/s | train time (s) |\n|---|---|---|---|---|";
    for _ in protocols.iter().chain(fars.iter().map(|_| &first)) {
        t += "---|";
    }
    t += "---|---|\n";
    for (o, d) in outcomes.iter().zip(details) {
        t += &format!(
            "| {} | IResNet-{} | {:?} | {:.3} | {:.1} |",
            o.plan.head,
            d.depth,
            d.layers,
            d.params as f64 / 1e6,
            d.macs as f64 / 1e6
        );
        for p in protocols {
            t += &format!(" {} |", accuracy_cell(o, p));
        }
        for &far in fars {
            t += &format!(" {} |", tar_cell(o, far));
        }
        t += &format!(
            " {:.0} | {:.1} |\n",
            o.result.images_per_second, o.result.train_seconds
        );
    }
    t
}

/// `backbone-size.png`: accuracy (and TAR) against MACs, one panel per metric, one line per
/// head. Returns the file name.
fn plot_against_macs(
    ctx: &Context,
    outcomes: &[Outcome<Depth>],
    details: &[Details],
    protocols: &[String],
) -> Result<String> {
    let fars = &ctx.base.eval.far;
    let panels: Vec<Panel> = Metric::panels(protocols, fars)
        .iter()
        .map(|m| Panel {
            title: m.title(),
            y_desc: m.y_desc(),
            series: ctx
                .base
                .methods
                .iter()
                .enumerate()
                .map(|(k, head)| Series {
                    label: head.clone(),
                    colour: k,
                    dashed: false,
                    points: outcomes
                        .iter()
                        .zip(details)
                        .filter(|(o, _)| &o.plan.head == head)
                        .filter_map(|(o, d)| {
                            let (y, err) = m.value(&o.result)?;
                            Some(Point {
                                x: d.macs as f64 / 1e6,
                                y,
                                err,
                                label: Some(o.plan.variant.clone()),
                            })
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    let plot = format!("{}.png", Study::BackboneSize.name());
    plot_panels(
        &ctx.out.join(&plot),
        "Backbone size: accuracy against MACs (IResNet depth)",
        "MACs per image (millions, log scale)",
        &panels,
    )?;
    Ok(plot)
}

/// Entry point of `study backbone-size`.
///
/// # Errors
/// A bad depth or base backbone, a training failure, an unwritable output folder.
pub(crate) fn run(ctx: &Context, args: &StudyOptions) -> Result<Written> {
    let plans = plans(&ctx.base, &ctx.data, &args.depths)?;
    let mut data = SharedData { ctx, built: None };
    let outcomes = ctx.execute(plans, &mut data)?;
    let details: Vec<Details> = outcomes.iter().map(details).collect::<Result<_>>()?;
    let protocols = Context::protocols(&outcomes);
    let fars = &ctx.base.eval.far;
    let t = summary_table(&outcomes, &details, &protocols, fars);

    let plot = plot_against_macs(ctx, &outcomes, &details, &protocols)?;

    let (full, rows) = ctx.full_table(&outcomes);
    let widths = details
        .first()
        .and_then(|d| d.widths)
        .map(|w| format!("{w:?}"))
        .unwrap_or_default();
    let embedding = ctx.base.backbone.embedding_size();
    let md = format!(
        "# Study: backbone size\n\n\
How does accuracy change with the depth of the backbone, at fixed head, data and budget? Each \
run trains an IResNet with insightface's blocks per stage for its depth ({}) and everything \
else from the base config: widths {widths}, {embedding}-d embedding.\n\n{}\n\n{t}\n\
![accuracy against MACs]({plot})\n\n\
Columns: `layers` blocks per stage; `params` backbone parameters (the head's class centres \
excluded); `MACs` multiply-accumulates of one image at the input size as `cargo xtask info` and \
arcface_torch's `flops.py` count them (convolutions and fully connected layer plus the per-element \
operations; the convolution and fc part alone is `conv_fc_macs` in metrics.json; FLOPs = 2 × \
MACs); `accuracy <subset>` the verification accuracy on \
that protocol; `TAR@FAR` on the first protocol; `train images/s` training throughput including \
data loading, measured on the machine that ran it (runs reused from an earlier invocation keep \
their own); `train time` wall time of the training loop (evaluation excluded). The plot has one \
accuracy panel per protocol and a TAR@FAR panel (the first FAR, first protocol), one line per \
head; each point is a depth, its bar ± the std of the accuracy over folds.\n\n\
CPU-scale caveat: these are insightface's depths at a CPU budget (narrow widths, small input, \
few epochs, synthetic identities by default), not the survey's full-scale setting (IResNet \
widths [64, 128, 256, 512] at 112×112 on MS1M / WebFace for 20+ epochs). A deeper network \
trained for the same few epochs is further from convergence, so at this budget the curve shows \
capacity and optimisation speed together; with `--set train.epochs=...`, `--set \
'backbone.widths=[...]'` or `--train-rec` the same command scales up.\n\n\
## Every run and protocol\n\n{full}",
        depths(&args.depths)?
            .iter()
            .map(|d| format!("IResNet-{} {:?}", d.depth, d.layers))
            .collect::<Vec<_>>()
            .join(", "),
        ctx.shared_text(&outcomes, &train_desc(&ctx.base, &ctx.data)),
    );
    let metrics = Metrics {
        study: Study::BackboneSize.name(),
        heads: &ctx.base.methods,
        seed: ctx.base.seed,
        data: train_desc(&ctx.base, &ctx.data),
        runs: outcomes
            .iter()
            .zip(details)
            .map(|(o, details)| RunEntry {
                name: &o.plan.name,
                head: &o.plan.head,
                backbone: &o.plan.variant,
                reused: o.reused,
                details,
                result: &o.result,
                config: &o.plan.config,
            })
            .collect(),
        rows,
        total_seconds: ctx.started.elapsed().as_secs_f64(),
    };
    ctx.write_outputs(&md, &metrics, &t)
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;
    use super::*;

    #[test]
    fn default_depths_are_insightfaces() {
        let d = depths(&[]).unwrap();
        assert_eq!(
            d,
            [
                Depth {
                    depth: 18,
                    layers: [2, 2, 2, 2]
                },
                Depth {
                    depth: 34,
                    layers: [3, 4, 6, 3]
                },
                Depth {
                    depth: 50,
                    layers: [3, 4, 14, 3]
                },
            ]
        );
        assert_eq!(depths(&[100]).unwrap()[0].layers, [3, 13, 30, 3]);
        let e = depths(&[18, 42]).unwrap_err().to_string();
        assert!(
            e.contains("42") && e.contains("18, 34, 50, 100, 200"),
            "{e}"
        );
        assert!(depths(&[18, 18]).is_err());
    }

    /// Each depth's preset differs from the base only in `backbone.layers`; every run of a head
    /// shares seed, head, data and budget; complexity grows with depth.
    #[test]
    fn configs_derive_from_the_base() {
        let args = parse(&[
            "backbone-size",
            "--head",
            "arcface,cosface",
            "--depths",
            "18,50",
        ]);
        let configs = crate::Presets::with_dir(crate::workspace_root().join("configs"));
        let base = super::super::base_preset(&args, Study::BackboneSize, &configs).unwrap();
        let plans = plans(&base, &Data::Synthetic, &args.depths).unwrap();
        let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["arcface-r18", "arcface-r50", "cosface-r18", "cosface-r50"]
        );
        let BackboneConfig::Iresnet(b) = &base.backbone else {
            panic!("base is an IResNet")
        };
        let mut macs = Vec::new();
        for p in &plans[..2] {
            let BackboneConfig::Iresnet(c) = &p.preset.backbone else {
                panic!()
            };
            assert_eq!(c.layers, p.spec.layers);
            assert_eq!(
                (c.widths, c.input_size, c.embedding_size),
                (b.widths, b.input_size, b.embedding_size)
            );
            assert_eq!(p.preset.methods, ["arcface"]);
            assert_eq!(p.preset.seed, base.seed);
            assert_eq!(p.preset.train.epochs, base.train.epochs);
            assert_eq!(
                p.config["preset"]["backbone"]["layers"][2],
                p.spec.layers[2]
            );
            macs.push(p.preset.backbone.complexity().unwrap().macs);
        }
        assert!(macs[0] < macs[1], "{macs:?}");
        assert_ne!(plans[0].config, plans[2].config);
        // A base backbone that is not an IResNet is refused with the key to change.
        let mut mbf = base.clone();
        mbf.backbone = BackboneConfig::Mobilefacenet(Default::default());
        let e = depth_preset(&mbf, depths(&[]).unwrap()[0])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mobilefacenet") && e.contains("backbone.type"),
            "{e}"
        );
    }
}
