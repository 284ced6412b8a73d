//! `cargo xtask study data-distribution`: one image budget split as many identities × few
//! images and few identities × many images, with balanced and long-tailed (Zipf-like) class
//! sizes; each split trains the same head, backbone and number of steps.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{bail, Context as _, Result};
use fr_data::recordio::RecordIoDataset;
use fr_data::synthetic::SyntheticFaces;
use fr_data::{FaceDataset, InMemoryDataset, Quality};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use tracing::info;

use super::{
    accuracy_cell, plot_panels, preset_for_head, tar_cell, Context, Data, Metric, Outcome, Panel,
    Plan, Point, Series, Study, StudyOptions, TrainingData,
};
use crate::config::Preset;
use crate::report::Written;

/// Fewest images any identity of a split gets.
pub(crate) const MIN_PER_IDENTITY: usize = 2;

/// Default exponent of the long-tailed splits (Zipf's law).
pub(crate) const DEFAULT_ZIPF: f64 = 1.0;

/// How a split's images are spread over its identities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Shape {
    /// Every identity gets `budget / identities` images (the remainder one each to the first).
    Balanced,
    /// The identity of rank r (1-based) gets `max(MIN_PER_IDENTITY, c / r^zipf)` images, `c`
    /// chosen so that the sizes sum to the budget (rounded by largest remainder).
    LongTailed {
        /// The exponent `a` of `1 / r^a`.
        zipf: f64,
    },
}

/// One training split: identities, budget, shape and the resulting class sizes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Split {
    /// `balanced-300x18`, `longtail-300`.
    pub(crate) name: String,
    /// Identities (classes).
    pub(crate) identities: usize,
    /// Images in all.
    pub(crate) budget: usize,
    /// How they are spread.
    pub(crate) shape: Shape,
    /// The class sizes, largest first, as `(images, identities with that many)` runs.
    pub(crate) class_sizes: Vec<(usize, usize)>,
    /// The class sizes, largest first, one per identity (class id = rank − 1).
    #[serde(skip)]
    pub(crate) sizes: Vec<usize>,
}

impl Split {
    /// The split of `budget` images over `identities` identities in `shape`.
    ///
    /// # Errors
    /// As [`class_sizes`].
    pub(crate) fn new(identities: usize, budget: usize, shape: Shape) -> Result<Self> {
        let sizes = class_sizes(identities, budget, shape)?;
        let name = match shape {
            Shape::Balanced if budget.is_multiple_of(identities) => {
                format!("balanced-{identities}x{}", budget / identities)
            }
            Shape::Balanced => format!("balanced-{identities}"),
            Shape::LongTailed { .. } => format!("longtail-{identities}"),
        };
        let mut class_sizes: Vec<(usize, usize)> = Vec::new();
        for &s in &sizes {
            match class_sizes.last_mut() {
                Some((size, n)) if *size == s => *n += 1,
                _ => class_sizes.push((s, 1)),
            }
        }
        Ok(Self {
            name,
            identities,
            budget,
            shape,
            class_sizes,
            sizes,
        })
    }

    /// Median class size.
    pub(crate) fn median(&self) -> usize {
        self.sizes[self.sizes.len() / 2]
    }

    /// Share of the images held by the largest 10 % of identities (at least one).
    pub(crate) fn head_share(&self) -> f64 {
        let k = (self.identities / 10).max(1);
        self.sizes[..k].iter().sum::<usize>() as f64 / self.budget as f64
    }
}

/// Class sizes of `budget` images over `identities` identities, largest first: balanced, or
/// Zipf-like (`∝ 1/rank^a`, at least [`MIN_PER_IDENTITY`] each) scaled to the budget exactly.
///
/// # Errors
/// Fewer than 2 identities, a budget under [`MIN_PER_IDENTITY`] images per identity, or an
/// exponent that is not positive and finite.
pub(crate) fn class_sizes(identities: usize, budget: usize, shape: Shape) -> Result<Vec<usize>> {
    if identities < 2 {
        bail!("a split needs at least 2 identities, got {identities}");
    }
    if budget < MIN_PER_IDENTITY * identities {
        bail!(
            "a budget of {budget} images is too small for {identities} identities with at least \
{MIN_PER_IDENTITY} images each (--budget, --identities)"
        );
    }
    match shape {
        Shape::Balanced => {
            let (q, r) = (budget / identities, budget % identities);
            Ok((0..identities).map(|i| q + usize::from(i < r)).collect())
        }
        Shape::LongTailed { zipf } => {
            if !(zipf > 0.0 && zipf.is_finite()) {
                bail!("--zipf {zipf}: the exponent must be positive");
            }
            let w: Vec<f64> = (1..=identities).map(|r| (r as f64).powf(-zipf)).collect();
            let (m, b) = (MIN_PER_IDENTITY as f64, budget as f64);
            let total = |c: f64| w.iter().map(|&wi| (c * wi).max(m)).sum::<f64>();
            // total(c) is continuous and non-decreasing, total(0) = m·N ≤ B and
            // total(B / w_N) ≥ N·B ≥ B: bisect for the largest c with total(c) ≤ B.
            let (mut lo, mut hi) = (0.0f64, b / w[identities - 1]);
            for _ in 0..200 {
                let mid = 0.5 * (lo + hi);
                if total(mid) <= b {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let x: Vec<f64> = w.iter().map(|&wi| (lo * wi).max(m)).collect();
            let mut sizes: Vec<usize> = x.iter().map(|v| v.floor() as usize).collect();
            let mut deficit = budget
                .checked_sub(sizes.iter().sum())
                .context("long-tailed class sizes overshoot the budget")?;
            // Largest remainder first, ties to the larger class: keeps the sizes non-increasing.
            let frac = |i: usize| x[i] - x[i].floor();
            let mut order: Vec<usize> = (0..identities).collect();
            order.sort_by(|&i, &j| frac(j).total_cmp(&frac(i)).then(i.cmp(&j)));
            for &i in order.iter().cycle() {
                if deficit == 0 {
                    break;
                }
                sizes[i] += 1;
                deficit -= 1;
            }
            Ok(sizes)
        }
    }
}

/// The splits of the study: for every identity count, a balanced and a long-tailed split of
/// the same budget (ordered as given, balanced first).
///
/// # Errors
/// As [`class_sizes`]; an identity count named twice.
pub(crate) fn splits(identities: &[usize], budget: usize, zipf: f64) -> Result<Vec<Split>> {
    let mut out = Vec::new();
    for (k, &n) in identities.iter().enumerate() {
        if identities[..k].contains(&n) {
            bail!("--identities {n} is named twice");
        }
        out.push(Split::new(n, budget, Shape::Balanced)?);
        out.push(Split::new(n, budget, Shape::LongTailed { zipf })?);
    }
    Ok(out)
}

/// The study's budget and identity counts: the flags, or from the base config's synthetic
/// training set of n identities × k images: budget n·k, identities 3n, n and n/3.
pub(crate) fn defaults(base: &Preset, args: &StudyOptions) -> (usize, Vec<usize>) {
    let t = &base.synthetic.train;
    let budget = args
        .budget
        .unwrap_or(t.num_identities * t.images_per_identity);
    let identities = if args.identities.is_empty() {
        let n = t.num_identities;
        [3 * n, n, n / 3]
            .into_iter()
            .filter(|&k| k >= 2)
            .fold(Vec::new(), |mut v, k| {
                if !v.contains(&k) {
                    v.push(k);
                }
                v
            })
    } else {
        args.identities.clone()
    };
    (budget, identities)
}

/// Every (split, head) run: splits in order, then heads (so consecutive runs share a split's
/// rendered images).
///
/// # Errors
/// A preset or spec that fails to serialise.
pub(crate) fn plans(base: &Preset, data: &Data, splits: &[Split]) -> Result<Vec<Plan<Split>>> {
    let mut out = Vec::new();
    for split in splits {
        for head in &base.methods {
            let mut preset = preset_for_head(base, head);
            if let Data::Synthetic = data {
                // The synthetic source the split is drawn from: identity c's first n_c images.
                preset.synthetic.train.num_identities = split.identities;
                preset.synthetic.train.images_per_identity = split.sizes[0];
            }
            out.push(Plan::new(
                Study::DataDistribution,
                head,
                &split.name,
                preset,
                split.clone(),
                data,
            )?);
        }
    }
    Ok(out)
}

/// A subset of a dataset: the images of `classes[c]` relabelled as class `c`.
pub(crate) struct Subset {
    source: Arc<dyn FaceDataset>,
    indices: Vec<usize>,
    labels: Vec<u32>,
    num_classes: usize,
}

impl Subset {
    /// Class `c` of the subset holds the source images `classes[c]`.
    pub(crate) fn new(source: Arc<dyn FaceDataset>, classes: &[Vec<usize>]) -> Self {
        let mut indices = Vec::new();
        let mut labels = Vec::new();
        for (c, members) in classes.iter().enumerate() {
            indices.extend_from_slice(members);
            labels.extend(std::iter::repeat_n(c as u32, members.len()));
        }
        Self {
            source,
            indices,
            labels,
            num_classes: classes.len(),
        }
    }

    fn source_index(&self, index: usize) -> fr_data::Result<usize> {
        self.indices
            .get(index)
            .copied()
            .ok_or(fr_data::Error::OutOfRange {
                index,
                len: self.indices.len(),
            })
    }
}

impl FaceDataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn label(&self, index: usize) -> fr_data::Result<u32> {
        self.source_index(index)?;
        Ok(self.labels[index])
    }

    fn image(&self, index: usize) -> fr_data::Result<RgbImage> {
        self.source.image(self.source_index(index)?)
    }

    fn sample(&self, index: usize) -> fr_data::Result<(RgbImage, u32)> {
        let (img, _) = self.source.sample(self.source_index(index)?)?;
        Ok((img, self.labels[index]))
    }

    fn quality(&self, index: usize) -> Option<Quality> {
        self.source.quality(*self.indices.get(index)?)
    }
}

/// The synthetic source images of a split: identity c (global id `first_identity + c`) gives
/// its first `sizes[c]` images, where the source has `sizes[0]` images per identity.
pub(crate) fn synthetic_classes(sizes: &[usize]) -> Vec<Vec<usize>> {
    let per = sizes.first().copied().unwrap_or(0);
    sizes
        .iter()
        .enumerate()
        .map(|(c, &n)| (c * per..c * per + n).collect())
        .collect()
}

/// Subsample a labelled set (`labels[i]` = identity of image i) into classes of `sizes`
/// (largest first): identities are visited in a seeded random order, and the class of rank r
/// takes the first unused identity with at least `sizes[r]` images, then a seeded random
/// choice of that many of its images (in dataset order).
///
/// # Errors
/// No unused identity has enough images for some rank (the message says how many do).
pub(crate) fn select_from_labels(
    labels: &[u32],
    sizes: &[usize],
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    let mut by_id: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_id.entry(l).or_default().push(i);
    }
    let mut ids: Vec<Vec<usize>> = by_id.into_values().collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_d157);
    ids.shuffle(&mut rng);
    let mut used = vec![false; ids.len()];
    let mut out = Vec::with_capacity(sizes.len());
    for (rank, &size) in sizes.iter().enumerate() {
        let Some(k) = (0..ids.len()).find(|&k| !used[k] && ids[k].len() >= size) else {
            let enough = ids.iter().filter(|m| m.len() >= size).count();
            bail!(
                "--train-rec: class {} of the split needs an identity with at least {size} images; \
{} ({} identities in all); lower --budget or --identities",
                rank + 1,
                if enough == 0 {
                    "the set has none".to_string()
                } else {
                    format!("the set's {enough} such identities are taken by larger classes")
                },
                ids.len()
            );
        };
        used[k] = true;
        let mut members = ids[k].clone();
        members.shuffle(&mut rng);
        members.truncate(size);
        members.sort_unstable();
        out.push(members);
    }
    Ok(out)
}

/// Builds each split's training set (in memory at the input size), keeping the last one for
/// the next head on the same split.
struct SplitData<'a> {
    ctx: &'a Context,
    /// The RecordIO set and every record's label, read on first use.
    rec: Option<(Arc<RecordIoDataset>, Vec<u32>)>,
    last: Option<(String, Arc<dyn FaceDataset>, String)>,
}

impl SplitData<'_> {
    /// The RecordIO set and its labels, read on first use.
    fn rec(&mut self, dir: &std::path::Path) -> Result<&(Arc<RecordIoDataset>, Vec<u32>)> {
        if self.rec.is_none() {
            let ds = RecordIoDataset::open(dir)
                .with_context(|| format!("opening RecordIO {}", dir.display()))?;
            info!(images = ds.len(), "reading every record's label");
            let labels = (0..ds.len())
                .into_par_iter()
                .map(|i| ds.label(i))
                .collect::<fr_data::Result<Vec<u32>>>()?;
            self.rec = Some((Arc::new(ds), labels));
        }
        Ok(self.rec.as_ref().expect("read above"))
    }

    /// With `--train-rec`: check that every split can be drawn from the set before anything
    /// trains (a split that cannot fails now, not after the runs before it).
    fn check(&mut self, splits: &[Split]) -> Result<()> {
        let Data::Rec { dir, .. } = &self.ctx.data else {
            return Ok(());
        };
        let seed = self.ctx.base.seed;
        let (_, labels) = self.rec(dir)?;
        for split in splits {
            select_from_labels(labels, &split.sizes, seed)
                .with_context(|| format!("split {}", split.name))?;
        }
        Ok(())
    }
}

impl TrainingData<Split> for SplitData<'_> {
    fn train_set(&mut self, plan: &Plan<Split>) -> Result<(Arc<dyn FaceDataset>, String)> {
        let split = &plan.spec;
        if let Some((name, ds, desc)) = &self.last {
            if *name == split.name {
                return Ok((ds.clone(), desc.clone()));
            }
        }
        let size = self.ctx.size;
        let (ds, desc) = match &self.ctx.data {
            Data::Synthetic => {
                let t = &plan.preset.synthetic.train;
                let source: Arc<dyn FaceDataset> = Arc::new(SyntheticFaces::new(t.clone())?);
                let subset = Subset::new(source, &synthetic_classes(&split.sizes));
                info!(split = %split.name, images = subset.len(), "rendering the split");
                (
                    InMemoryDataset::from_dataset(&subset, size)?,
                    format!(
                        "synthetic split {}: identities {}..{} (first {} .. {} images each), {} images",
                        split.name,
                        t.first_identity,
                        t.first_identity + split.identities as u64,
                        split.sizes[split.sizes.len() - 1],
                        split.sizes[0],
                        split.budget
                    ),
                )
            }
            Data::Rec { dir, .. } => {
                let (ds, labels) = self.rec(dir)?;
                let classes = select_from_labels(labels, &split.sizes, plan.preset.seed)
                    .with_context(|| format!("split {}", split.name))?;
                let source: Arc<dyn FaceDataset> = ds.clone();
                let subset = Subset::new(source, &classes);
                info!(split = %split.name, images = subset.len(), "decoding the split");
                (
                    InMemoryDataset::from_dataset(&subset, size)?,
                    format!(
                        "RecordIO {} subsampled (seed {}): split {}, {} identities, {} images",
                        dir.display(),
                        plan.preset.seed,
                        split.name,
                        split.identities,
                        split.budget
                    ),
                )
            }
        };
        let ds: Arc<dyn FaceDataset> = Arc::new(ds);
        self.last = Some((split.name.clone(), ds.clone(), desc.clone()));
        Ok((ds, desc))
    }
}

/// A run in metrics.json.
#[derive(Debug, Serialize)]
struct RunEntry<'a> {
    name: &'a str,
    head: &'a str,
    split: &'a Split,
    reused: bool,
    median_class_size: usize,
    head_share: f64,
    result: &'a super::RunResult,
    config: &'a serde_json::Value,
}

#[derive(Debug, Serialize)]
struct Metrics<'a> {
    study: &'static str,
    heads: &'a [String],
    seed: u64,
    budget: usize,
    zipf: f64,
    data: String,
    runs: Vec<RunEntry<'a>>,
    rows: Vec<crate::report::Row>,
    total_seconds: f64,
}

/// The summary table: one row per run (head, split shape, class sizes, accuracy per protocol,
/// TAR@FAR on the first, training time).
fn summary_table(outcomes: &[Outcome<Split>], protocols: &[String], fars: &[f64]) -> String {
    let first = protocols.first().cloned().unwrap_or_default();
    let mut t = String::from(
        "| head | split | identities | images | images per identity (max / median / min) | top 10 % identities' share |",
    );
    for p in protocols {
        t += &format!(" accuracy {p} (%) |");
    }
    for far in fars {
        t += &format!(" TAR@FAR={far:.0e} {first} (%) |");
    }
    t += " train time (s) |\n|---|---|---|---|---|---|";
    for _ in protocols.iter().chain(fars.iter().map(|_| &first)) {
        t += "---|";
    }
    t += "---|\n";
    for o in outcomes {
        let s = &o.plan.spec;
        t += &format!(
            "| {} | {} | {} | {} | {} / {} / {} | {:.1} % |",
            o.plan.head,
            s.name,
            s.identities,
            s.budget,
            s.sizes[0],
            s.median(),
            s.sizes[s.sizes.len() - 1],
            100.0 * s.head_share()
        );
        for p in protocols {
            t += &format!(" {} |", accuracy_cell(o, p));
        }
        for &far in fars {
            t += &format!(" {} |", tar_cell(o, far));
        }
        t += &format!(" {:.1} |\n", o.result.train_seconds);
    }
    t
}

/// `data-distribution.png`: accuracy (and TAR) against identities, one panel per metric; per
/// head a solid (balanced) and a dashed (long-tailed) line. Returns the file name.
fn plot_against_identities(
    ctx: &Context,
    outcomes: &[Outcome<Split>],
    protocols: &[String],
    budget: usize,
) -> Result<String> {
    let fars = &ctx.base.eval.far;
    let panels: Vec<Panel> = Metric::panels(protocols, fars)
        .iter()
        .map(|m| {
            let mut series = Vec::new();
            for (k, head) in ctx.base.methods.iter().enumerate() {
                for dashed in [false, true] {
                    let mut points: Vec<Point> = outcomes
                        .iter()
                        .filter(|o| {
                            &o.plan.head == head
                                && matches!(o.plan.spec.shape, Shape::LongTailed { .. }) == dashed
                        })
                        .filter_map(|o| {
                            let (y, err) = m.value(&o.result)?;
                            let (b, n) = (o.plan.spec.budget, o.plan.spec.identities);
                            let label = (!dashed).then(|| {
                                if b.is_multiple_of(n) {
                                    format!("×{}", b / n)
                                } else {
                                    format!("×{:.1}", b as f64 / n as f64)
                                }
                            });
                            Some(Point {
                                x: n as f64,
                                y,
                                err,
                                label,
                            })
                        })
                        .collect();
                    points.sort_by(|a, b| a.x.total_cmp(&b.x));
                    series.push(Series {
                        label: format!(
                            "{head} {}",
                            if dashed { "long-tailed" } else { "balanced" }
                        ),
                        colour: k,
                        dashed,
                        points,
                    });
                }
            }
            Panel {
                title: m.title(),
                y_desc: m.y_desc(),
                series,
            }
        })
        .collect();
    let plot = format!("{}.png", Study::DataDistribution.name());
    plot_panels(
        &ctx.out.join(&plot),
        &format!("Training-data distribution: accuracy at {budget} training images"),
        "identities (log scale)",
        &panels,
    )?;
    Ok(plot)
}

/// The data sentence of the report: synthetic splits or RecordIO subsamples at `budget` images.
fn data_description(ctx: &Context, budget: usize) -> String {
    match &ctx.data {
        Data::Synthetic => format!(
            "{budget} synthetic images per split; a split of N identities takes the synthetic \
generator's N identities from global id {first} on (seed {seed}) and identity c's first n_c \
images, so a balanced split of the base config's shape is exactly `reproduce`'s training set",
            first = ctx.base.synthetic.train.first_identity,
            seed = ctx.base.synthetic.train.seed
        ),
        Data::Rec { dir, .. } => format!(
            "{budget} images per split subsampled from RecordIO {} by identity with seed {}",
            dir.display(),
            ctx.base.seed
        ),
    }
}

/// Entry point of `study data-distribution`.
///
/// # Errors
/// Bad split settings, insufficient data, a training failure, an unwritable output folder.
pub(crate) fn run(ctx: &Context, args: &StudyOptions) -> Result<Written> {
    let (budget, identities) = defaults(&ctx.base, args);
    let zipf = args.zipf.unwrap_or(DEFAULT_ZIPF);
    let splits = splits(&identities, budget, zipf)?;
    let plans = plans(&ctx.base, &ctx.data, &splits)?;
    let mut data = SplitData {
        ctx,
        rec: None,
        last: None,
    };
    data.check(&splits)?;
    let mut outcomes = ctx.execute(plans, &mut data)?;
    // Report order: heads as given, then splits.
    let head_rank = |h: &str| ctx.base.methods.iter().position(|m| m == h);
    outcomes.sort_by_key(|o| head_rank(&o.plan.head));
    let protocols = Context::protocols(&outcomes);
    let fars = &ctx.base.eval.far;
    let t = summary_table(&outcomes, &protocols, fars);

    let plot = plot_against_identities(ctx, &outcomes, &protocols, budget)?;

    let (full, rows) = ctx.full_table(&outcomes);
    let data_desc = data_description(ctx, budget);
    let md = format!(
        "# Study: training-data distribution\n\n\
At a fixed image budget, is it better to have many identities with few images each or few \
identities with many, and how much does a long tail of class sizes cost? Every split holds \
{budget} training images, so every run takes the same number of optimiser steps with the same \
head, backbone and seed. Identity counts: {}. For each, a **balanced** split (every identity \
budget / N images) and a **long-tailed** one (the identity of rank r gets ∝ 1/r^{zipf} images, \
at least {MIN_PER_IDENTITY}, scaled to the budget exactly).\n\n{}\n\n{t}\n\
![accuracy against identities]({plot})\n\n\
Columns: `split` balanced-N×k or longtail-N; `images per identity` the largest, median and \
smallest class; `top 10 % identities' share` the fraction of the budget held by the largest \
⌊N/10⌋ identities (at least one; about 10 % when balanced); `accuracy <subset>` the verification accuracy on \
that protocol{}; `TAR@FAR` on the first protocol; `train time` wall time of the training loop. \
In the plot, solid lines are the balanced splits (labelled with images per identity), dashed \
lines the long-tailed ones; one accuracy panel per protocol and a TAR@FAR panel (the first FAR, first protocol), one \
colour per head, bars ± the std of the accuracy over folds.\n\n\
CPU-scale caveat: the survey's question is asked of MS1M / WebFace-size data (millions of \
images, tens of thousands of identities) with full-width backbones; here the budget is a few \
thousand synthetic images, a narrow IResNet at a small input and a few epochs, so the numbers \
show the direction of the effects at CPU scale, not their published size. The same command \
takes `--train-rec DIR --val-bin FILE...` and `--budget` for real data.\n\n\
## Every run and protocol\n\n{full}",
        identities
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        ctx.shared_text(&outcomes, &data_desc),
        if matches!(ctx.data, Data::Synthetic) {
            " (`all` every test pair, `hq_hard` pairs whose first image is a large-pose sharp \
face, `low_quality` pairs whose first image is blurred and noisy)"
        } else {
            ""
        },
    );
    let metrics = Metrics {
        study: Study::DataDistribution.name(),
        heads: &ctx.base.methods,
        seed: ctx.base.seed,
        budget,
        zipf,
        data: data_desc,
        runs: outcomes
            .iter()
            .map(|o| RunEntry {
                name: &o.plan.name,
                head: &o.plan.head,
                split: &o.plan.spec,
                reused: o.reused,
                median_class_size: o.plan.spec.median(),
                head_share: o.plan.spec.head_share(),
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

    fn non_increasing(v: &[usize]) -> bool {
        v.windows(2).all(|w| w[0] >= w[1])
    }

    #[test]
    fn balanced_splits_respect_the_budget() {
        assert_eq!(class_sizes(300, 5400, Shape::Balanced).unwrap(), [18; 300]);
        let s = class_sizes(7, 100, Shape::Balanced).unwrap();
        assert_eq!(s, [15, 15, 14, 14, 14, 14, 14]);
        assert_eq!(s.iter().sum::<usize>(), 100);
        let names: Vec<String> = splits(&[900, 300, 100], 5400, 1.0)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "balanced-900x6",
                "longtail-900",
                "balanced-300x18",
                "longtail-300",
                "balanced-100x54",
                "longtail-100"
            ]
        );
        assert_eq!(
            Split::new(7, 100, Shape::Balanced).unwrap().name,
            "balanced-7"
        );
    }

    #[test]
    fn long_tailed_splits_are_zipf_like_and_exact() {
        for (n, budget, a) in [
            (300, 5400, 1.0),
            (900, 5400, 1.0),
            (100, 5400, 1.0),
            (50, 1000, 0.5),
            (1000, 2000, 2.0),
            (3, 7, 1.0),
        ] {
            let s = class_sizes(n, budget, Shape::LongTailed { zipf: a }).unwrap();
            assert_eq!(s.len(), n);
            assert_eq!(s.iter().sum::<usize>(), budget, "{n} {budget} {a}");
            assert!(non_increasing(&s), "{n} {budget} {a}: {s:?}");
            assert!(s.iter().all(|&k| k >= MIN_PER_IDENTITY));
            // Where no floor binds, rank r holds about s[0] / r^a.
            if s[1] > MIN_PER_IDENTITY + 1 {
                let expect = s[0] as f64 / 2f64.powf(a);
                assert!((s[1] as f64 - expect).abs() <= 1.0 + 0.01 * expect, "{s:?}");
            }
            // Deterministic: no randomness in the sizes.
            assert_eq!(
                s,
                class_sizes(n, budget, Shape::LongTailed { zipf: a }).unwrap()
            );
        }
        let s = Split::new(300, 5400, Shape::LongTailed { zipf: 1.0 }).unwrap();
        assert!(s.sizes[0] > 10 * s.median(), "{:?}", s.class_sizes);
        assert!(s.head_share() > 0.3);
        assert_eq!(
            s.class_sizes.iter().map(|(k, n)| k * n).sum::<usize>(),
            5400
        );
        assert_eq!(s.class_sizes.iter().map(|(_, n)| n).sum::<usize>(), 300);
        // The budget exactly covering the floor: every identity at the minimum.
        assert_eq!(
            class_sizes(4, 8, Shape::LongTailed { zipf: 1.0 }).unwrap(),
            [2; 4]
        );
    }

    #[test]
    fn impossible_splits_are_refused() {
        let e = class_sizes(3000, 5400, Shape::Balanced)
            .unwrap_err()
            .to_string();
        assert!(e.contains("5400") && e.contains("3000"), "{e}");
        assert!(class_sizes(1, 10, Shape::Balanced).is_err());
        let e = class_sizes(10, 100, Shape::LongTailed { zipf: 0.0 })
            .unwrap_err()
            .to_string();
        assert!(e.contains("--zipf"), "{e}");
        assert!(splits(&[100, 100], 5400, 1.0).is_err());
    }

    #[test]
    fn defaults_follow_the_base_config() {
        let configs = crate::Presets::with_dir(crate::workspace_root().join("configs"));
        let args = parse(&["data-distribution"]);
        let base = super::super::base_preset(&args, Study::DataDistribution, &configs).unwrap();
        assert_eq!(defaults(&base, &args), (5400, vec![900, 300, 100]));
        let args = parse(&[
            "data-distribution",
            "--budget",
            "1000",
            "--identities",
            "50,10",
        ]);
        assert_eq!(defaults(&base, &args), (1000, vec![50, 10]));
    }

    /// Synthetic plans: the source has `sizes[0]` images per identity and the split's classes
    /// take each identity's first images; balanced-300x18 is reproduce's training set.
    #[test]
    fn synthetic_plans_and_subsets() {
        let configs = crate::Presets::with_dir(crate::workspace_root().join("configs"));
        let args = parse(&["data-distribution", "--head", "arcface,adaface"]);
        let base = super::super::base_preset(&args, Study::DataDistribution, &configs).unwrap();
        let splits = splits(&[300], 5400, 1.0).unwrap();
        let plans = plans(&base, &Data::Synthetic, &splits).unwrap();
        let names: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "arcface-balanced-300x18",
                "adaface-balanced-300x18",
                "arcface-longtail-300",
                "adaface-longtail-300"
            ]
        );
        assert_eq!(plans[0].preset.synthetic.train, base.synthetic.train);
        let lt = &plans[2].preset.synthetic.train;
        assert_eq!(
            (lt.num_identities, lt.images_per_identity),
            (300, splits[1].sizes[0])
        );
        assert_ne!(plans[0].config, plans[2].config);
        // A tiny synthetic source: classes of sizes 3, 2 from 2 identities × 3 images.
        let src = SyntheticFaces::new(fr_data::synthetic::SyntheticConfig {
            num_identities: 2,
            images_per_identity: 3,
            image_size: 24,
            ..Default::default()
        })
        .unwrap();
        let classes = synthetic_classes(&[3, 2]);
        assert_eq!(classes, [vec![0, 1, 2], vec![3, 4]]);
        let src: Arc<dyn FaceDataset> = Arc::new(src);
        let sub = Subset::new(src.clone(), &classes);
        assert_eq!((sub.len(), sub.num_classes()), (5, 2));
        assert_eq!(sub.label(4).unwrap(), 1);
        assert_eq!(sub.image(4).unwrap(), src.image(4).unwrap());
        assert_eq!(sub.quality(3), src.quality(3));
        assert!(sub.image(5).is_err() && sub.label(5).is_err());
    }

    /// Subsampling a labelled set: exact class sizes, distinct identities, every image of a
    /// class from one identity, deterministic for a seed, a clear error when it cannot be done.
    #[test]
    fn rec_subsampling_by_identity() {
        // 20 identities: identity i has 2 + i images, interleaved in the set.
        let mut labels = Vec::new();
        for k in 0..25 {
            for i in 0..20u32 {
                if k < 2 + i as usize {
                    labels.push(i);
                }
            }
        }
        let sizes = class_sizes(8, 40, Shape::LongTailed { zipf: 1.0 }).unwrap();
        let a = select_from_labels(&labels, &sizes, 7).unwrap();
        assert_eq!(a, select_from_labels(&labels, &sizes, 7).unwrap());
        assert_ne!(a, select_from_labels(&labels, &sizes, 8).unwrap());
        let mut seen = std::collections::BTreeSet::new();
        for (members, &size) in a.iter().zip(&sizes) {
            assert_eq!(members.len(), size);
            let id = labels[members[0]];
            assert!(members.iter().all(|&i| labels[i] == id));
            assert!(members.windows(2).all(|w| w[0] < w[1]));
            assert!(seen.insert(id), "identity {id} used twice");
        }
        let e = select_from_labels(&labels, &[30, 2], 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("at least 30 images") && e.contains("has none"),
            "{e}"
        );
        let e = select_from_labels(&labels, &[2; 21], 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("class 21") && e.contains("taken by larger"),
            "{e}"
        );
    }
}
