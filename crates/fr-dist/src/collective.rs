//! The collective operations between ranks, as `torch.distributed`'s: the [`Collective`]
//! trait, [`ReduceOp`], the in-process [`SimulatedCollective`] (all `K` ranks in one process,
//! how the sharding math of `fr_heads::sharded` is tested) and the arithmetic every backend
//! shares ([`fold`], [`scatter_rows`]) so that processes and simulated ranks give
//! bit-identical results. The backends across processes are [`crate::TcpCollective`] and
//! `NcclCollective` (feature `nccl`).

use candle_core::Tensor;

use crate::{Error, Result};

/// The reduction every collective of fr computes, in rank order:
/// `((parts[0] ⊕ parts[1]) ⊕ parts[2]) ⊕ …` (the same arithmetic on every backend, so that
/// processes and simulated ranks give bit-identical results). `parts` is not empty.
///
/// # Errors
/// Mismatched shapes or dtypes (candle).
pub fn fold(parts: &[Tensor], op: ReduceOp) -> Result<Tensor> {
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        acc = match op {
            ReduceOp::Sum => acc.add(p)?,
            ReduceOp::Max => acc.maximum(p)?,
        };
    }
    Ok(acc)
}

/// The reduce-scatter's split: rank `k` gets rows `[Σ_{j<k} c_j, Σ_{j≤k} c_j)` of `sum`,
/// after checking that `counts` has `world_size` entries adding up to `sum`'s rows.
///
/// # Errors
/// [`Error::Shape`] for other counts; candle errors.
pub fn scatter_rows(sum: &Tensor, counts: &[usize], world_size: usize) -> Result<Vec<Tensor>> {
    check_counts(counts, world_size, sum.dims().first().copied().unwrap_or(0))?;
    let mut offset = 0;
    let mut out = Vec::with_capacity(counts.len());
    for &n in counts {
        out.push(sum.narrow(0, offset, n)?);
        offset += n;
    }
    Ok(out)
}

/// [`Error::Shape`] unless `counts` has `world_size` entries adding up to `rows`.
///
/// # Errors
/// As said.
pub fn check_counts(counts: &[usize], world_size: usize, rows: usize) -> Result<()> {
    if counts.len() != world_size || counts.iter().sum::<usize>() != rows {
        return Err(Error::Shape {
            what: "reduce_scatter counts".into(),
            expected: format!("{world_size} counts adding up to {rows}"),
            got: format!("{counts:?}"),
        });
    }
    Ok(())
}

/// [`Error::Shape`] unless `root` is a rank of `world_size`.
///
/// # Errors
/// As said.
pub fn check_root(root: usize, world_size: usize) -> Result<()> {
    if root >= world_size {
        return Err(Error::Shape {
            what: "broadcast root".into(),
            expected: format!("a rank below {world_size}"),
            got: format!("{root}"),
        });
    }
    Ok(())
}

/// Reduction of an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum over ranks.
    Sum,
    /// Element-wise maximum over ranks.
    Max,
}

/// The collective operations of multi-rank training: the model-parallel Partial FC's sharded
/// softmax (`fr_heads::sharded`) and the data-parallel gradient all-reduce
/// (`fr_train::data_parallel`).
///
/// Every method takes one input per rank *held by this process* (in the order of
/// [`Collective::local_ranks`]) and returns one output per held rank: all `K` ranks for
/// [`SimulatedCollective`], exactly one for a multi-process backend ([`crate::TcpCollective`]
/// and `NcclCollective`, one process per rank). Values cross ranks without autograd (as
/// `torch.distributed` collectives): gradients are moved explicitly with
/// [`Collective::reduce_scatter`].
pub trait Collective {
    /// Number of ranks `K`.
    fn world_size(&self) -> usize;

    /// The global ranks this process holds, ascending.
    fn local_ranks(&self) -> Vec<usize>;

    /// Concatenate every rank's tensor `(B_k, …)` along dimension 0, in rank order; every held
    /// rank receives the `(Σ_k B_k, …)` result.
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong number of inputs or mismatched trailing dimensions or
    /// dtypes; backend errors.
    fn all_gather(&self, parts: &[Tensor]) -> Result<Vec<Tensor>>;

    /// Element-wise reduction of same-shaped tensors over all ranks; every held rank receives
    /// the result.
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong number of inputs or mismatched shapes; backend errors.
    fn all_reduce(&self, parts: &[Tensor], op: ReduceOp) -> Result<Vec<Tensor>>;

    /// Sum same-shaped tensors `(Σ_k B_k, …)` over all ranks, then give rank `k` rows
    /// `[Σ_{j<k} B_j, Σ_{j≤k} B_j)` of the sum, `counts[k] = B_k` (`counts` has `K` entries).
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong number of inputs, mismatched shapes or counts that do not
    /// add up to the first dimension; backend errors.
    fn reduce_scatter(&self, parts: &[Tensor], counts: &[usize]) -> Result<Vec<Tensor>>;

    /// Every held rank receives rank `root`'s tensor (the parts of the other ranks only give
    /// the shape and dtype). The default sends zeros from every rank but `root` through an
    /// [`ReduceOp::Sum`] all-reduce, which is exact (`x + 0 = x`); backends with a native
    /// broadcast override it.
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong number of inputs, mismatched shapes or `root ≥ K`;
    /// backend errors.
    fn broadcast(&self, parts: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
        check_root(root, self.world_size())?;
        let ranks = self.local_ranks();
        let masked = parts
            .iter()
            .zip(ranks.iter().chain(std::iter::repeat(&usize::MAX)))
            .map(|(p, &r)| {
                if r == root {
                    Ok(p.detach())
                } else {
                    p.zeros_like()
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.all_reduce(&masked, ReduceOp::Sum)
    }
}

/// All `K` ranks in one process: gather is a concatenation, all-reduce a fold, reduce-scatter
/// a sum followed by row slices. Inputs are detached (no autograd crosses ranks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimulatedCollective {
    world_size: usize,
}

impl SimulatedCollective {
    /// `world_size` simulated ranks.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `world_size` when it is 0.
    pub fn new(world_size: usize) -> Result<Self> {
        if world_size == 0 {
            return Err(Error::Shape {
                what: "world_size".into(),
                expected: "at least one rank".into(),
                got: "0".into(),
            });
        }
        Ok(Self { world_size })
    }

    fn check_count(&self, what: &str, parts: &[Tensor]) -> Result<()> {
        if parts.len() != self.world_size {
            return Err(Error::Shape {
                what: what.into(),
                expected: format!("one tensor per rank ({})", self.world_size),
                got: format!("{} tensors", parts.len()),
            });
        }
        Ok(())
    }

    fn check_same_shape(&self, what: &str, parts: &[Tensor]) -> Result<()> {
        self.check_count(what, parts)?;
        for p in &parts[1..] {
            if p.dims() != parts[0].dims() || p.dtype() != parts[0].dtype() {
                return Err(Error::Shape {
                    what: what.into(),
                    expected: format!("{:?} {:?} on every rank", parts[0].dims(), parts[0].dtype()),
                    got: format!("{:?} {:?}", p.dims(), p.dtype()),
                });
            }
        }
        Ok(())
    }

    fn reduce(&self, parts: &[Tensor], op: ReduceOp) -> Result<Tensor> {
        let detached: Vec<Tensor> = parts.iter().map(Tensor::detach).collect();
        fold(&detached, op)
    }
}

impl Collective for SimulatedCollective {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn local_ranks(&self) -> Vec<usize> {
        (0..self.world_size).collect()
    }

    fn all_gather(&self, parts: &[Tensor]) -> Result<Vec<Tensor>> {
        self.check_count("all_gather", parts)?;
        for p in &parts[1..] {
            if p.dims().get(1..) != parts[0].dims().get(1..) || p.dtype() != parts[0].dtype() {
                return Err(Error::Shape {
                    what: "all_gather".into(),
                    expected: format!(
                        "(B_k, {:?}) {:?} on every rank",
                        parts[0].dims().get(1..),
                        parts[0].dtype()
                    ),
                    got: format!("{:?} {:?}", p.dims(), p.dtype()),
                });
            }
        }
        let detached: Vec<Tensor> = parts.iter().map(Tensor::detach).collect();
        let gathered = Tensor::cat(&detached, 0)?;
        Ok(vec![gathered; self.world_size])
    }

    fn all_reduce(&self, parts: &[Tensor], op: ReduceOp) -> Result<Vec<Tensor>> {
        self.check_same_shape("all_reduce", parts)?;
        Ok(vec![self.reduce(parts, op)?; self.world_size])
    }

    fn reduce_scatter(&self, parts: &[Tensor], counts: &[usize]) -> Result<Vec<Tensor>> {
        self.check_same_shape("reduce_scatter", parts)?;
        let rows = parts[0].dims().first().copied().unwrap_or(0);
        check_counts(counts, self.world_size, rows)?;
        scatter_rows(&self.reduce(parts, ReduceOp::Sum)?, counts, self.world_size)
    }
}

/// A shared collective (the data-parallel layer and a model-parallel head over the same
/// communicator).
impl<C: Collective + ?Sized> Collective for std::sync::Arc<C> {
    fn world_size(&self) -> usize {
        (**self).world_size()
    }

    fn local_ranks(&self) -> Vec<usize> {
        (**self).local_ranks()
    }

    fn all_gather(&self, parts: &[Tensor]) -> Result<Vec<Tensor>> {
        (**self).all_gather(parts)
    }

    fn all_reduce(&self, parts: &[Tensor], op: ReduceOp) -> Result<Vec<Tensor>> {
        (**self).all_reduce(parts, op)
    }

    fn reduce_scatter(&self, parts: &[Tensor], counts: &[usize]) -> Result<Vec<Tensor>> {
        (**self).reduce_scatter(parts, counts)
    }

    fn broadcast(&self, parts: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
        (**self).broadcast(parts, root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn simulated_collective_ops() -> Result<()> {
        let dev = Device::Cpu;
        let col = SimulatedCollective::new(2)?;
        let a = Tensor::new(&[[1f64, 2.], [3., 4.]], &dev)?;
        let b = Tensor::new(&[[5f64, -6.]], &dev)?;
        let g = col.all_gather(&[a.clone(), b.clone()])?;
        assert_eq!(g.len(), 2);
        assert_eq!(
            g[1].to_vec2::<f64>()?,
            vec![vec![1., 2.], vec![3., 4.], vec![5., -6.]]
        );
        let u = Tensor::new(&[1f64, 7.], &dev)?;
        let v = Tensor::new(&[3f64, -2.], &dev)?;
        let mx = col.all_reduce(&[u.clone(), v.clone()], ReduceOp::Max)?;
        assert_eq!(mx[0].to_vec1::<f64>()?, vec![3., 7.]);
        let sm = col.all_reduce(&[u, v], ReduceOp::Sum)?;
        assert_eq!(sm[1].to_vec1::<f64>()?, vec![4., 5.]);
        let rs = col.reduce_scatter(&[g[0].clone(), g[1].clone()], &[2, 1])?;
        assert_eq!(rs[0].to_vec2::<f64>()?, vec![vec![2., 4.], vec![6., 8.]]);
        assert_eq!(rs[1].to_vec2::<f64>()?, vec![vec![10., -12.]]);
        assert!(matches!(
            col.reduce_scatter(&[g[0].clone(), g[1].clone()], &[1, 1]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(col.all_gather(&[a]), Err(Error::Shape { .. })));
        assert!(SimulatedCollective::new(0).is_err());
        Ok(())
    }
}
