//! Data-parallel training over a [`Collective`] with one rank per process, as PyTorch's
//! `DistributedDataParallel` (DDP) in arcface_torch's `train_v2.py`: rank 0's initial weights
//! and running statistics are broadcast to every rank, each rank runs forward and backward on
//! its slice of the global batch, and the gradients are all-reduced in buckets before the
//! clip and the optimiser step, so every rank applies the same update.
//!
//! Buckets: the gradients are flattened into buckets of at most
//! [`DataParallelConfig::bucket_cap_mb`] (DDP's default is 25 MiB), in reverse parameter
//! order as DDP, one all-reduce per bucket instead of one per tensor. Unlike DDP the
//! all-reduce runs after the whole backward pass, not overlapped with it: candle's backward
//! has no per-gradient hook. A presence flag per tensor travels in the bucket, so a variable
//! that got a gradient on some ranks only (a class centre sampled on one rank) still gets the
//! reduced one on all, and one that got none anywhere stays without.
//!
//! Reduction: [`GradReduction::Mean`] (DDP) divides the sum by `K`: each rank's loss is the
//! mean over its own batch, so the mean of the `K` gradients is the gradient of the mean over
//! the global batch. [`GradReduction::Sum`] is for a loss whose value is already global (the
//! model-parallel Partial FC of `fr_heads::sharded`, whose per-rank gradients add up to
//! `∂L/∂θ`; arcface_torch multiplies them by `K` before DDP's mean instead).
//!
//! Compression ([`GradCompression`], DDP's `bf16_compress_hook` / `fp16_compress_hook`): the
//! buckets travel in bf16 or f16, halving the bytes of an f32 all-reduce.
//!
//! Variables named by [`DataParallel::with_local_variables`] (the class-centre shard of a
//! model-parallel head) are neither broadcast nor reduced: each rank owns different ones.

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use fr_dist::{Collective, ReduceOp};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the per-rank gradients are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradReduction {
    /// Sum over ranks divided by `K` (DDP): per-rank losses are local means.
    #[default]
    Mean,
    /// Sum over ranks: the loss value is already the global one (sharded Partial FC).
    Sum,
}

/// The dtype gradients travel in (PyTorch DDP's communication hooks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GradCompression {
    /// The gradients' own dtype (f32 masters in mixed precision): no rounding.
    #[default]
    None,
    /// bf16 on the wire (`bf16_compress_hook`): half the bytes, ~3 significant digits.
    Bf16,
    /// f16 on the wire (`fp16_compress_hook`): half the bytes; gradients are divided by `K`
    /// before the cast, as the hook does, to keep the sum inside f16's range.
    F16,
}

/// Settings of [`DataParallel`]; defaults are DDP's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataParallelConfig {
    /// Largest bucket in MiB (DDP's `bucket_cap_mb`, 25); a tensor larger than the cap gets a
    /// bucket of its own.
    pub bucket_cap_mb: f64,
    /// Mean (DDP) or sum of the per-rank gradients.
    pub reduction: GradReduction,
    /// Broadcast rank 0's running statistics before every step (DDP's `broadcast_buffers`,
    /// on by default), so BatchNorm statistics and checkpoints agree on every rank.
    pub broadcast_buffers: bool,
    /// The dtype of the gradient all-reduce (default: the gradients' own).
    pub compression: GradCompression,
}

impl Default for DataParallelConfig {
    fn default() -> Self {
        Self {
            bucket_cap_mb: 25.0,
            reduction: GradReduction::Mean,
            broadcast_buffers: true,
            compression: GradCompression::None,
        }
    }
}

impl DataParallelConfig {
    /// Check every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming `bucket_cap_mb` when it is not finite and > 0.
    pub fn validate(&self) -> Result<()> {
        if !(self.bucket_cap_mb.is_finite() && self.bucket_cap_mb > 0.0) {
            return Err(Error::config(
                "bucket_cap_mb",
                format!("must be finite and > 0, got {}", self.bucket_cap_mb),
            ));
        }
        Ok(())
    }
}

/// What one [`DataParallel::reduce_gradients`] moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReduceStats {
    /// All-reduce calls (buckets).
    pub buckets: usize,
    /// Gradient tensors reduced.
    pub tensors: usize,
    /// Bytes of gradient per rank sent into the all-reduces.
    pub bytes: usize,
}

/// The data-parallel layer of one rank: a collective holding exactly this process's rank.
pub struct DataParallel {
    collective: Box<dyn Collective>,
    config: DataParallelConfig,
    rank: usize,
    local: Box<dyn Fn(&str) -> bool>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.rank)
            .field("world_size", &self.collective.world_size())
            .field("config", &self.config)
            .finish()
    }
}

fn comm(e: fr_dist::Error) -> Error {
    Error::Collective(e)
}

impl DataParallel {
    /// Data parallelism over `collective`, which must hold exactly one rank (one process per
    /// rank: `fr_dist::TcpCollective`, `fr_dist::NcclCollective`).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config or a collective holding several ranks.
    pub fn new(collective: Box<dyn Collective>, config: DataParallelConfig) -> Result<Self> {
        config.validate()?;
        let ranks = collective.local_ranks();
        let [rank] = ranks[..] else {
            return Err(Error::config(
                "collective",
                format!(
                    "data parallelism needs one rank per process, this collective holds {ranks:?}"
                ),
            ));
        };
        Ok(Self {
            collective,
            config,
            rank,
            local: Box::new(|_| false),
        })
    }

    /// Leave the variables whose names pass `local` out of broadcasts and reductions (each
    /// rank owns different ones: a model-parallel head's class-centre shard).
    pub fn with_local_variables(mut self, local: impl Fn(&str) -> bool + 'static) -> Self {
        self.local = Box::new(local);
        self
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks `K`.
    pub fn world_size(&self) -> usize {
        self.collective.world_size()
    }

    /// The settings.
    pub fn config(&self) -> &DataParallelConfig {
        &self.config
    }

    /// Whether `name` is rank-local (see [`DataParallel::with_local_variables`]).
    pub fn is_local(&self, name: &str) -> bool {
        (self.local)(name)
    }

    /// The buckets of `vars` (indices into it): reverse order, one dtype per bucket, at most
    /// `bucket_cap_mb` each (a larger tensor alone); rank-local variables are left out.
    pub fn buckets(&self, vars: &[(String, Var)]) -> Vec<Vec<usize>> {
        let cap = (self.config.bucket_cap_mb * 1024.0 * 1024.0) as usize;
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let (mut current, mut bytes, mut dtype) = (Vec::new(), 0usize, None::<DType>);
        for (i, (name, var)) in vars.iter().enumerate().rev() {
            if self.is_local(name) {
                continue;
            }
            let size = var.elem_count() * var.dtype().size_in_bytes();
            let fits = dtype == Some(var.dtype()) && bytes + size <= cap;
            if !current.is_empty() && !fits {
                buckets.push(std::mem::take(&mut current));
                bytes = 0;
            }
            current.push(i);
            bytes += size;
            dtype = Some(var.dtype());
        }
        if !current.is_empty() {
            buckets.push(current);
        }
        buckets
    }

    /// Replace every (non-local) variable of `vars` by rank 0's value, bucket by bucket.
    ///
    /// # Errors
    /// Collective failures (naming the operation and rank), candle errors.
    pub fn broadcast_from_rank0(&self, vars: &[(String, Var)]) -> Result<()> {
        for bucket in self.buckets(vars) {
            let flat = bucket
                .iter()
                .map(|&i| vars[i].1.as_tensor().flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let flat = Tensor::cat(&flat, 0)?;
            let got = self
                .collective
                .broadcast(&[flat], 0)
                .map_err(comm)?
                .remove(0);
            if self.rank == 0 {
                // Rank 0 keeps its own values (the result may share their storage).
                continue;
            }
            let mut offset = 0;
            for &i in &bucket {
                let var = &vars[i].1;
                let n = var.elem_count();
                var.set(&got.narrow(0, offset, n)?.reshape(var.shape())?.copy()?)?;
                offset += n;
            }
        }
        Ok(())
    }

    /// All-reduce the gradients of `vars` in `grads` (mean or sum over ranks, see
    /// [`GradReduction`]) in place. Every rank must call it with the same variables (names,
    /// shapes, dtypes, order).
    ///
    /// # Errors
    /// Collective failures (a rank with other shapes is named by the collective), candle
    /// errors.
    pub fn reduce_gradients(
        &self,
        grads: &mut GradStore,
        vars: &[(String, Var)],
    ) -> Result<ReduceStats> {
        let k = self.world_size();
        let mean = self.config.reduction == GradReduction::Mean && k > 1;
        let mut stats = ReduceStats::default();
        for bucket in self.buckets(vars) {
            let dtype = vars[bucket[0]].1.dtype();
            let device = vars[bucket[0]].1.device().clone();
            // The mean divides by K after the sum, or with compression before the cast (DDP's
            // hooks).
            let wire = match self.config.compression {
                GradCompression::None => dtype,
                GradCompression::Bf16 => DType::BF16,
                GradCompression::F16 => DType::F16,
            };
            let k_div = if mean { k as f64 } else { 1.0 };
            let (pre, post) = if wire == dtype {
                (1.0, k_div)
            } else {
                (k_div, 1.0)
            };
            let mut flat = Vec::with_capacity(bucket.len() + 1);
            let mut present = Vec::with_capacity(bucket.len());
            for &i in &bucket {
                let var = &vars[i].1;
                match grads.get(var.as_tensor()) {
                    Some(g) => {
                        let g = g.to_dtype(dtype)?.flatten_all()?;
                        let g = if pre == 1.0 { g } else { (g / pre)? };
                        flat.push(g.to_dtype(wire)?);
                        present.push(1f32);
                    }
                    None => {
                        flat.push(Tensor::zeros(var.elem_count(), wire, &device)?);
                        present.push(0f32);
                    }
                }
            }
            // The presence flags (≤ K after the sum: exact in every float dtype for K ≤ 256).
            flat.push(Tensor::new(present.as_slice(), &device)?.to_dtype(wire)?);
            let flat = Tensor::cat(&flat, 0)?;
            stats.bytes += flat.elem_count() * wire.size_in_bytes();
            let sum = self
                .collective
                .all_reduce(&[flat], ReduceOp::Sum)
                .map_err(comm)?
                .remove(0);
            let total: usize = bucket.iter().map(|&i| vars[i].1.elem_count()).sum();
            let counts = sum
                .narrow(0, total, bucket.len())?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            let mut offset = 0;
            for (j, &i) in bucket.iter().enumerate() {
                let var = &vars[i].1;
                let n = var.elem_count();
                if counts[j] > 0.0 {
                    let mut g = sum
                        .narrow(0, offset, n)?
                        .reshape(var.shape())?
                        .to_dtype(dtype)?;
                    if post != 1.0 {
                        g = (g / post)?;
                    }
                    grads.insert(var.as_tensor(), g);
                    stats.tensors += 1;
                } else {
                    grads.remove(var.as_tensor());
                }
                offset += n;
            }
            stats.buckets += 1;
        }
        Ok(stats)
    }

    /// The mean of `value` over ranks (f64), the same on every rank: the step's loss for
    /// logging and for the decision to skip a non-finite step, which all ranks must take
    /// together.
    ///
    /// # Errors
    /// Collective failures, candle errors.
    pub fn mean(&self, value: f64, device: &candle_core::Device) -> Result<f64> {
        Ok(self.sum(value, device)? / self.world_size() as f64)
    }

    /// The sum of `value` over ranks (f64, rank order), the same on every rank.
    ///
    /// # Errors
    /// Collective failures, candle errors.
    pub fn sum(&self, value: f64, device: &candle_core::Device) -> Result<f64> {
        let t = Tensor::new(&[value], device)?;
        let sum = self
            .collective
            .all_reduce(&[t], ReduceOp::Sum)
            .map_err(comm)?
            .remove(0);
        Ok(sum.to_vec1::<f64>()?[0])
    }

    /// Every rank's `value` (f64), in rank order, on every rank.
    ///
    /// # Errors
    /// Collective failures, candle errors.
    pub fn all_gather_f64(&self, value: f64, device: &candle_core::Device) -> Result<Vec<f64>> {
        let t = Tensor::new(&[value], device)?;
        let all = self.collective.all_gather(&[t]).map_err(comm)?.remove(0);
        Ok(all.to_vec1::<f64>()?)
    }
}
