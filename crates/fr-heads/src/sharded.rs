//! Model-parallel Partial FC: the class centres are sharded over `K` ranks, embeddings and
//! labels are all-gathered, each rank samples its own shard, and the softmax cross-entropy is
//! computed with its row maximum and exponential sum all-reduced across ranks.
//!
//! An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW 2021;
//! "Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition CNNs
//! by Partial FC", CVPR 2022. Reference: insightface `recognition/arcface_torch/partial_fc_v2.py`
//! (`PartialFC_V2`, `DistCrossEntropyFunc`, `AllGatherFunc`).
//!
//! One step, for a global batch of `B = Σ_k B_k` samples, `C` classes and embedding size `D`:
//! 1. all-gather the per-rank embeddings `(B_k, D)` into `(B, D)` and the labels into `(B,)`;
//! 2. rank `r` owns classes `[start_r, start_r + n_r)` with `n_r = ⌊C/K⌋ + [r < C mod K]`,
//!    `start_r = ⌊C/K⌋·r + min(r, C mod K)` ([`shard_range`]); labels outside the shard become
//!    −1 locally, the others are made shard-local;
//! 3. each rank samples its shard with [`sample_classes`] (positives plus uniform negatives up
//!    to `⌊sample_rate · n_r⌋`), keyed by `(seed, step, rank)`;
//! 4. rank `r` computes `z^r = s · margin(x̂ · ŵ^rᵀ)` `(B, n'_r)` with the target-logit margin
//!    (any [`MarginSoftmax`]: ArcFace, the combined margin, CosFace; [`crate::margin`])
//!    applied where the rank owns the label;
//! 5. `M_i = max_r max_j z^r_ij` (all-reduce max), `S_i = Σ_r Σ_j exp(z^r_ij − M_i)`
//!    (all-reduce sum), `T_i = Σ_r z^r_{i,y_i}` (all-reduce sum; exactly one rank contributes);
//!    `L = mean_i (M_i + ln S_i − T_i)`;
//! 6. rank `r`'s gradient is `∂L/∂z^r = (exp(z^r − M)/S − onehot^r) / B`, back-propagated by
//!    candle through the rank's local graph to its centres and its copy of the gathered
//!    embeddings; the embedding gradients `(B, D)` are summed over ranks and each rank keeps
//!    its own rows (reduce-scatter).
//!
//! As in arcface_torch, the loss *value* on every rank is the global `L` and only the gradients
//! are additive across ranks. arcface_torch additionally multiplies the embedding gradient by
//! `K` because DDP averages backbone gradients over ranks; [`ShardedGrads::embeddings`] is the
//! plain `∂L/∂x_k` and leaves that factor to the data-parallel layer.
//!
//! The ranks talk through `fr_dist`'s [`Collective`] trait (communication lives there, the
//! math here). `fr_dist::SimulatedCollective` runs all `K` ranks in one process (CPU or one
//! device), which is how the sharding math is tested: `K` ranks give the same loss and
//! gradients as the single-process ArcFace head. `fr_dist` also implements the trait across
//! processes (one rank per process): over TCP for CPU ranks and over NCCL for GPUs.
//!
//! What differs from arcface_torch: negatives come from a ChaCha8 stream keyed by
//! `(seed, step, rank)` rather than `torch.rand` + top-k; in eval mode
//! (`StepContext::train == false`) every centre is used; per-rank batch sizes may differ.

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use candle_nn::VarBuilder;
use fr_dist::{Collective, ReduceOp};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::common::{self, as_dtype_of};
use crate::margin::MarginSoftmax;
use crate::partial_fc::{sample_classes, ClassSample};
use crate::{Error, Head, HeadOutput, Result, StepContext};

/// One rank's part of a step (see `ShardedPartialFc::local_part`): sample, gathered
/// embeddings, logits, target mask, targets owned, their cosines.
type LocalPart = (ClassSample, Var, Tensor, Tensor, Tensor, Tensor);

/// The class range `[start, start + n)` rank `rank` of `world_size` owns out of `num_classes`
/// (arcface_torch: `num_local = C // K + int(rank < C % K)`,
/// `class_start = C // K * rank + min(rank, C % K)`).
pub fn shard_range(num_classes: usize, world_size: usize, rank: usize) -> Range<usize> {
    let (base, rem) = (num_classes / world_size, num_classes % world_size);
    let start = base * rank + rank.min(rem);
    start..start + base + usize::from(rank < rem)
}

/// Hyperparameters of [`ShardedPartialFc`]. Built in code (the margin from the method's head
/// config, [`crate::HeadConfig::margin_softmax`]), not read from a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardedPartialFcConfig {
    /// Fraction of each shard's centres used per training step, in `(0, 1]`. Default 0.1.
    pub sample_rate: f64,
    /// Seed of the negative sampling (combined with the step and the rank).
    pub seed: u64,
    /// The margin softmax (scale, target-logit margin, cosine clamp, loss cap), as
    /// arcface_torch's `PartialFC_V2(margin_loss, …)`. Default ArcFace (s = 64, m = 0.5).
    pub margin: MarginSoftmax,
}

impl Default for ShardedPartialFcConfig {
    fn default() -> Self {
        Self {
            sample_rate: 0.1,
            seed: 0,
            margin: MarginSoftmax::default(),
        }
    }
}

impl ShardedPartialFcConfig {
    /// Check `sample_rate` in `(0, 1]` and the margin (its keys, as spelled in the head config
    /// it came from, under `margin.`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the key.
    pub fn validate(&self) -> Result<()> {
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(Error::config(
                "sample_rate",
                format!("must be in (0, 1], got {}", self.sample_rate),
            ));
        }
        self.margin.validate().map_err(|e| match e {
            Error::Config { key, reason } => Error::config(format!("margin.{key}"), reason),
            e => e,
        })
    }

    /// Centres sampled per step out of a shard of `num_local` (before adding positives beyond
    /// it): `⌊sample_rate · num_local⌋`, as arcface_torch's `num_sample`.
    pub fn num_sample(&self, num_local: usize) -> usize {
        ((self.sample_rate * num_local as f64) as usize).min(num_local)
    }
}

/// One rank's slice of the class centres.
#[derive(Debug, Clone)]
pub struct Shard {
    /// Global rank.
    pub rank: usize,
    /// Global class ids this shard owns.
    pub classes: Range<usize>,
    /// The shard's centres `(classes.len(), D)`, a trainable tensor.
    pub weight: Tensor,
}

/// Model-parallel Partial FC with a target-logit margin ([`MarginSoftmax`]) over the ranks a
/// [`Collective`] holds.
#[derive(Debug)]
pub struct ShardedPartialFc<C: Collective> {
    cfg: ShardedPartialFcConfig,
    collective: C,
    embedding_size: usize,
    num_classes: usize,
    shards: Vec<Shard>,
}

/// What one held rank computed in a step.
#[derive(Debug)]
pub struct RankStep {
    /// Global rank.
    pub rank: usize,
    /// The sampled centres (shard-local indices) and the gathered labels remapped into them
    /// (−1 where the label belongs to another shard).
    pub sample: ClassSample,
    /// Logits `(B, n'_r)` of the gathered batch against the sampled centres, margin applied.
    pub logits: Tensor,
    /// Scalar `()`: its value is the global loss `L`; its gradient is this rank's part of
    /// `∂L` (with respect to [`RankStep::gathered`] and the shard's centres).
    pub loss: Tensor,
    /// This rank's copy of the gathered embeddings `(B, D)`, a leaf of the rank's graph.
    pub gathered: Var,
}

/// The result of [`ShardedPartialFc::forward`].
#[derive(Debug)]
pub struct ShardedOutput {
    /// The global loss `L` (the same on every rank).
    pub loss: f64,
    /// Per held rank, in [`Collective::local_ranks`] order.
    pub ranks: Vec<RankStep>,
    /// Batch size of every rank, `K` entries.
    pub batch_sizes: Vec<usize>,
    /// `loss`, `sampled_classes` (summed over the held ranks) and `cos_target_mean`.
    pub stats: BTreeMap<String, f64>,
}

/// Gradients of one step, per held rank.
#[derive(Debug)]
pub struct ShardedGrads {
    /// Each rank's gradient store: holds `∂L/∂weight` for the rank's shard (zero rows for
    /// centres not sampled this step).
    pub centres: Vec<GradStore>,
    /// `∂L/∂x_k` `(B_k, D)` for each held rank's own embeddings, summed over all ranks.
    /// Continue into the backbone with e.g. `(x_k · sg(g_k)).sum().backward()`.
    pub embeddings: Vec<Tensor>,
}

impl<C: Collective> ShardedPartialFc<C> {
    /// Create the centres of every held rank: `vbs[i]` (one `VarBuilder` per held rank, in
    /// [`Collective::local_ranks`] order) provides `weight` `(n_r, D)`, initialised N(0, 0.01)
    /// as arcface_torch.
    ///
    /// # Errors
    /// [`Error::Config`] naming `sample_rate`, `margin.*`, `num_classes` (fewer classes than
    /// ranks) or `embedding_size`; [`Error::Shape`] when `vbs` does not match the held ranks.
    pub fn new(
        cfg: &ShardedPartialFcConfig,
        embedding_size: usize,
        num_classes: usize,
        collective: C,
        vbs: &[VarBuilder],
    ) -> Result<Self> {
        cfg.validate()?;
        common::check_sizes(embedding_size, num_classes)?;
        let k = collective.world_size();
        if num_classes < k {
            return Err(Error::config(
                "num_classes",
                format!("{num_classes} classes cannot be sharded over {k} ranks"),
            ));
        }
        let ranks = collective.local_ranks();
        if vbs.len() != ranks.len() {
            return Err(Error::Shape {
                what: "var builders".into(),
                expected: format!("one per held rank ({})", ranks.len()),
                got: format!("{}", vbs.len()),
            });
        }
        let shards = ranks
            .iter()
            .zip(vbs)
            .map(|(&rank, vb)| {
                let classes = shard_range(num_classes, k, rank);
                let weight = common::class_centres(vb, embedding_size, classes.len())?;
                Ok(Shard {
                    rank,
                    classes,
                    weight,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            collective,
            embedding_size,
            num_classes,
            shards,
        })
    }

    /// The held shards, in [`Collective::local_ranks`] order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The collective the ranks talk through.
    pub fn collective(&self) -> &C {
        &self.collective
    }

    /// The centres rank `shard.rank` uses at `step` for the gathered shard-local `labels`
    /// (−1 = another shard's class).
    fn sample(&self, shard: &Shard, labels: &[i64], ctx: &StepContext) -> Result<ClassSample> {
        let n = shard.classes.len();
        if !(ctx.train && self.cfg.sample_rate < 1.0) {
            return Ok(ClassSample {
                index: (0..n as u32).collect(),
                labels: labels.to_vec(),
            });
        }
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.cfg.seed.to_le_bytes());
        key[8..16].copy_from_slice(&(shard.rank as u64).to_le_bytes());
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(ctx.step);
        sample_classes(labels, n, self.cfg.num_sample(n), &mut rng)
    }

    /// The held ranks' embeddings and labels checked and all-gathered: every rank's batch
    /// size, the gathered embeddings `(B, D)` and labels `(B,)` per held rank.
    fn gather(
        &self,
        embeddings: &[Tensor],
        labels: &[Tensor],
    ) -> Result<(Vec<usize>, Vec<Tensor>, Vec<Tensor>)> {
        let mut xs = Vec::with_capacity(embeddings.len());
        let mut sizes = Vec::with_capacity(embeddings.len());
        for (x, y) in embeddings.iter().zip(labels) {
            let inp = common::check_inputs(x, y, self.embedding_size, self.num_classes)?;
            sizes.push(Tensor::new(&[inp.labels.len() as u32], x.device())?);
            xs.push(inp.x);
        }
        let batch_sizes: Vec<usize> = self.collective.all_gather(&sizes)?[0]
            .to_vec1::<u32>()?
            .into_iter()
            .map(|b| b as usize)
            .collect();
        let gathered_x = self.collective.all_gather(&xs)?;
        let gathered_y = self.collective.all_gather(labels)?;
        Ok((batch_sizes, gathered_x, gathered_y))
    }

    /// One rank's part of the step: its sampled centres, the gathered embeddings as a variable,
    /// the margin logits `(B, n')` with the margin on the targets it owns, the target mask,
    /// how many targets it owns per sample and their cosines.
    fn local_part(
        &self,
        shard: &Shard,
        gx: &Tensor,
        gy: &Tensor,
        ctx: &StepContext,
    ) -> Result<LocalPart> {
        let eps = self.cfg.margin.cos_eps;
        let start = shard.classes.start as i64;
        let end = shard.classes.end as i64;
        let local: Vec<i64> = gy
            .to_vec1::<u32>()?
            .into_iter()
            .map(|l| {
                let l = i64::from(l);
                if (start..end).contains(&l) {
                    l - start
                } else {
                    -1
                }
            })
            .collect();
        let sample = self.sample(shard, &local, ctx)?;
        let gathered = Var::from_tensor(gx)?;
        let n = sample.index.len();
        let index = Tensor::new(sample.index.as_slice(), gx.device())?;
        let w = as_dtype_of(&shard.weight, gx)?.index_select(&index, 0)?;
        let cos = common::cosine(gathered.as_tensor(), &w, eps)?;
        // −1 becomes `n`, outside `0..n`: an all-zero mask row.
        let remapped: Vec<u32> = sample
            .labels
            .iter()
            .map(|&l| if l < 0 { n as u32 } else { l as u32 })
            .collect();
        let mask = common::target_mask(&Tensor::new(remapped.as_slice(), gx.device())?, n)?;
        let (logits, c) = self.cfg.margin.logits(&cos, &mask)?;
        let owned = mask.sum(1)?.to_dtype(DType::F64)?;
        let c_owned = (c.to_dtype(DType::F64)? * &owned)?;
        Ok((sample, gathered, logits, mask, owned, c_owned))
    }

    /// One step: `embeddings[i]` `(B_i, D)` and u32 `labels[i]` `(B_i,)` (global class ids) of
    /// each held rank, in [`Collective::local_ranks`] order.
    ///
    /// # Errors
    /// [`Error::Shape`] for wrong shapes or counts, [`Error::Label`] for a label `≥ C`,
    /// candle and collective errors.
    pub fn forward(
        &self,
        embeddings: &[Tensor],
        labels: &[Tensor],
        ctx: &StepContext,
    ) -> Result<ShardedOutput> {
        let held = self.shards.len();
        if embeddings.len() != held || labels.len() != held {
            return Err(Error::Shape {
                what: "embeddings / labels".into(),
                expected: format!("one tensor per held rank ({held})"),
                got: format!("{} / {}", embeddings.len(), labels.len()),
            });
        }
        let (batch_sizes, gathered_x, gathered_y) = self.gather(embeddings, labels)?;
        let b = gathered_x[0].dim(0)?;
        // Local logits, with the margin on the targets this rank owns.
        let mut parts = Vec::with_capacity(held);
        for ((shard, gx), gy) in self.shards.iter().zip(&gathered_x).zip(&gathered_y) {
            parts.push(self.local_part(shard, gx, gy, ctx)?);
        }

        // Distributed softmax: max, exp-sum and target logit all-reduced.
        let dtype = gathered_x[0].dtype();
        let dev = gathered_x[0].device().clone();
        let local_max = parts
            .iter()
            .map(|(s, _, z, ..)| {
                if s.index.is_empty() {
                    Ok(Tensor::full(f64::NEG_INFINITY, b, &dev)?.to_dtype(dtype)?)
                } else {
                    Ok(z.detach().max(1)?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let max = self.collective.all_reduce(&local_max, ReduceOp::Max)?;
        let mut exps = Vec::with_capacity(held);
        let mut sums = Vec::with_capacity(held);
        let mut targets = Vec::with_capacity(held);
        let mut owned = Vec::with_capacity(held);
        let mut cos_t = Vec::with_capacity(held);
        for ((_, _, z, mask, own, c_own), m) in parts.iter().zip(&max) {
            let e = z.detach().broadcast_sub(&m.unsqueeze(1)?)?.exp()?;
            sums.push(e.sum(1)?);
            exps.push(e);
            targets.push(common::target_values(&z.detach(), mask)?);
            owned.push(own.clone());
            cos_t.push(c_own.clone());
        }
        let sum = self.collective.all_reduce(&sums, ReduceOp::Sum)?;
        let target = self.collective.all_reduce(&targets, ReduceOp::Sum)?;
        let owned = self.collective.all_reduce(&owned, ReduceOp::Sum)?;
        let cos_t = self.collective.all_reduce(&cos_t, ReduceOp::Sum)?;
        if let Some(i) = owned[0].to_vec1::<f64>()?.iter().position(|&o| o != 1.0) {
            // Unreachable with a correct collective: every label lies in exactly one shard and
            // sampling keeps every positive.
            return Err(Error::Shape {
                what: "gathered labels".into(),
                expected: "each sample's class on exactly one rank".into(),
                got: format!(
                    "sample {i} owned by {} ranks",
                    owned[0].to_vec1::<f64>()?[i]
                ),
            });
        }
        let cos_target_mean = common::scalar(&cos_t[0].mean_all()?)?;

        // Per-sample loss ln S + M − T, insightface's optional cap of its value.
        let per_sample = (sum[0].log()? + &max[0])?.sub(&target[0])?;
        let per_sample = match self.cfg.margin.p_floor() {
            Some(p) => per_sample.minimum(-p.ln())?,
            None => per_sample,
        };
        let loss_t = per_sample.mean_all()?;
        let loss = common::scalar(&loss_t)?;

        let mut ranks = Vec::with_capacity(held);
        let mut sampled = 0usize;
        for ((((sample, gathered, logits, mask, ..), e), s), shard) in
            parts.into_iter().zip(exps).zip(&sum).zip(&self.shards)
        {
            sampled += sample.index.len();
            // ∂L/∂z^r = (softmax^r − onehot^r)/B, attached through a linear surrogate whose
            // value is cancelled and replaced by the global loss.
            let p = e.broadcast_div(&s.unsqueeze(1)?)?;
            let coef = ((p - mask.to_dtype(dtype)?)? / b as f64)?.detach();
            let surrogate = logits.mul(&coef)?.sum_all()?;
            let loss_r = (surrogate.sub(&surrogate.detach())? + &loss_t)?;
            ranks.push(RankStep {
                rank: shard.rank,
                sample,
                logits,
                loss: loss_r,
                gathered,
            });
        }
        let mut stats = BTreeMap::new();
        stats.insert("loss".to_string(), loss);
        stats.insert("sampled_classes".to_string(), sampled as f64);
        stats.insert("cos_target_mean".to_string(), cos_target_mean);
        Ok(ShardedOutput {
            loss,
            ranks,
            batch_sizes,
            stats,
        })
    }

    /// Back-propagate every held rank's loss through its local graph, then reduce-scatter the
    /// gathered-embedding gradients so each rank gets `∂L/∂x_k` `(B_k, D)` for its own batch.
    ///
    /// # Errors
    /// Candle and collective errors.
    pub fn backward(&self, out: &ShardedOutput) -> Result<ShardedGrads> {
        let mut centres = Vec::with_capacity(out.ranks.len());
        let mut parts = Vec::with_capacity(out.ranks.len());
        for r in &out.ranks {
            let mut grads = r.loss.backward()?;
            let g = match grads.remove(r.gathered.as_tensor()) {
                Some(g) => g,
                // A rank that sampled no centre contributes nothing.
                None => r.gathered.as_tensor().zeros_like()?,
            };
            parts.push(g);
            centres.push(grads);
        }
        let embeddings = self.collective.reduce_scatter(&parts, &out.batch_sizes)?;
        Ok(ShardedGrads {
            centres,
            embeddings,
        })
    }
}

/// One rank per process: the model-parallel head as an ordinary [`Head`] of a data-parallel
/// trainer, for a collective that holds exactly one rank.
///
/// [`Head::forward`] takes this rank's embeddings `(B_k, D)` and labels `(B_k,)`, runs
/// [`ShardedPartialFc::forward`] and [`ShardedPartialFc::backward`] (the collectives happen
/// here: every rank must call it in step), and returns a scalar whose value is the global
/// loss `L` and whose gradient is `∂L/∂x_k` for the embeddings and `∂L/∂W_r` for this rank's
/// centres: `(x_k · sg(g_x)).sum() + (W_r · sg(g_W)).sum()`, minus its own detached value,
/// plus `L`. The backbone gradients of the ranks then add up to `∂L/∂θ` (all-reduce with a
/// sum, not DDP's mean); the centres are this rank's own and are not all-reduced. `logits`
/// of the output are this rank's `(Σ_k B_k, n'_r)` logits over its sampled centres.
///
/// # Errors
/// [`Error::Shape`] when the collective holds more than one rank, and as
/// [`ShardedPartialFc::forward`].
impl<C: Collective + Send> Head for ShardedPartialFc<C> {
    fn name(&self) -> &'static str {
        "sharded_partial_fc"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> Result<HeadOutput> {
        if self.shards.len() != 1 {
            return Err(Error::Shape {
                what: "sharded_partial_fc as a Head".into(),
                expected: "a collective holding one rank (one process per rank)".into(),
                got: format!("{} held ranks", self.shards.len()),
            });
        }
        let out = ShardedPartialFc::forward(
            self,
            std::slice::from_ref(embeddings),
            std::slice::from_ref(labels),
            ctx,
        )?;
        let mut grads = self.backward(&out)?;
        let rank = out.ranks.into_iter().next().expect("one held rank");
        let gx = grads.embeddings.remove(0).detach();
        let mut surrogate = embeddings
            .mul(&gx.to_dtype(embeddings.dtype())?)?
            .sum_all()?;
        let weight = &self.shards[0].weight;
        if let Some(gw) = grads.centres[0].get(weight) {
            let term = weight
                .mul(&gw.detach().to_dtype(weight.dtype())?)?
                .sum_all()?;
            let dtype = surrogate.dtype();
            surrogate = (surrogate + term.to_dtype(dtype)?)?;
        }
        let global = rank.loss.detach().to_dtype(surrogate.dtype())?;
        let loss = (surrogate.sub(&surrogate.detach())? + global)?;
        Ok(HeadOutput {
            loss,
            logits: rank.logits.detach(),
            stats: out.stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use fr_dist::SimulatedCollective;

    #[test]
    fn shard_ranges_follow_arcface_torch() {
        // 10 classes over 3 ranks: 4, 3, 3.
        assert_eq!(shard_range(10, 3, 0), 0..4);
        assert_eq!(shard_range(10, 3, 1), 4..7);
        assert_eq!(shard_range(10, 3, 2), 7..10);
        for (c, k) in [(10, 1), (10, 2), (10, 3), (7, 7), (100, 8), (1001, 16)] {
            let mut next = 0;
            for r in 0..k {
                let range = shard_range(c, k, r);
                assert_eq!(range.start, next);
                assert_eq!(range.len(), c / k + usize::from(r < c % k));
                assert_eq!(range.start, c / k * r + r.min(c % k));
                next = range.end;
            }
            assert_eq!(next, c);
        }
    }

    #[test]
    fn rejects_bad_configs() {
        let bad = ShardedPartialFcConfig {
            sample_rate: 0.0,
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(Error::Config { key, .. }) if key == "sample_rate"));
        let bad = ShardedPartialFcConfig {
            margin: crate::arcface::ArcFaceConfig {
                margin: -1.0,
                ..Default::default()
            }
            .margin_softmax(),
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(Error::Config { key, .. }) if key == "margin.margin"));
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
        let col = SimulatedCollective::new(3).unwrap();
        let err = ShardedPartialFc::new(
            &ShardedPartialFcConfig::default(),
            4,
            2,
            col,
            &[vb.clone(), vb.clone(), vb],
        )
        .unwrap_err();
        assert!(matches!(err, Error::Config { key, .. } if key == "num_classes"));
    }
}
