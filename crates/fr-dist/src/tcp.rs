//! [`Collective`] across processes over TCP, through rank 0 (star topology), for CPU ranks.

use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use crate::collective::{check_counts, check_root, fold, scatter_rows, Collective, ReduceOp};
use candle_core::Tensor;

use crate::rendezvous::{rendezvous, Peers, Rendezvous};
use crate::wire::{self, Frame, Op};
use crate::{DistEnv, Error, Result};

/// How long a collective waits for a peer before failing (PyTorch's default process-group
/// timeout is also 30 minutes).
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// One rank of a multi-process group whose collectives go over TCP through rank 0.
///
/// Every rank sends its tensor to rank 0; rank 0 gathers or reduces in rank order
/// ([`crate::collective::fold`], the arithmetic of [`crate::SimulatedCollective`] too, so
/// results are bit-identical to `K` simulated
/// ranks and the same on every rank) and sends each rank its result. Each call holds exactly
/// one rank ([`Collective::local_ranks`] is `[rank]`), takes one tensor and returns one.
/// Tensors travel as host copies: meant for CPU ranks (PyTorch's gloo role); GPU ranks use
/// the NCCL collective. All ranks must call the same operations in the same order, as with
/// any collective library: a rank calling another operation is reported by rank 0 with both
/// names.
#[derive(Debug)]
pub struct TcpCollective {
    rank: usize,
    world_size: usize,
    peers: Mutex<Peers>,
}

impl TcpCollective {
    /// Meet the other ranks of `env` (see [`crate::rendezvous`]) and keep the connections;
    /// collectives then wait at most `op_timeout` for a peer.
    ///
    /// # Errors
    /// [`crate::Error::Rendezvous`] as [`rendezvous`].
    pub fn connect(
        env: &DistEnv,
        rendezvous_timeout: Duration,
        op_timeout: Duration,
    ) -> Result<Self> {
        let r = rendezvous(env, || Ok(Vec::new()), rendezvous_timeout)?;
        Self::from_rendezvous(r, op_timeout)
    }

    /// The collective over the connections of a finished rendezvous.
    ///
    /// # Errors
    /// [`crate::Error::Rendezvous`] when the read timeout cannot be set on a connection.
    pub fn from_rendezvous(r: Rendezvous, op_timeout: Duration) -> Result<Self> {
        let set = |s: &TcpStream| s.set_read_timeout(Some(op_timeout));
        let ok = match &r.peers {
            Peers::Root(streams) => streams.iter().try_for_each(set),
            Peers::Worker(s) => set(s),
            Peers::Alone => Ok(()),
        };
        ok.map_err(|e| Error::Rendezvous {
            addr: format!("{}:{}", r.env.master_addr, r.env.master_port),
            rank: r.env.rank,
            world_size: r.env.world_size,
            reason: format!("setting the operation timeout: {e}"),
        })?;
        Ok(Self {
            rank: r.env.rank,
            world_size: r.env.world_size,
            peers: Mutex::new(r.peers),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Wait until every rank has called `barrier`.
    ///
    /// # Errors
    /// As [`Collective::all_reduce`].
    pub fn barrier(&self) -> Result<()> {
        let one = Tensor::ones(1, candle_core::DType::U8, &candle_core::Device::Cpu)?;
        self.all_reduce(&[one], ReduceOp::Max).map(|_| ())
    }

    fn err(&self, op: Op, reason: impl Into<String>) -> Error {
        Error::Collective {
            op: op.name().into(),
            rank: self.rank,
            reason: reason.into(),
        }
    }

    fn single<'a>(&self, op: Op, parts: &'a [Tensor]) -> Result<&'a Tensor> {
        match parts {
            [t] => Ok(t),
            _ => Err(Error::Shape {
                what: op.name().into(),
                expected: "one tensor (this process holds one rank)".into(),
                got: format!("{} tensors", parts.len()),
            }),
        }
    }

    /// Run `op` for this rank: a worker sends `mine` (`shape_only`: its header alone) and
    /// receives its result; rank 0 collects every rank's frame in rank order, lets `combine`
    /// turn them (its own first) into one result per rank, and sends them out.
    fn run(
        &self,
        op: Op,
        mine: &Tensor,
        shape_only: bool,
        combine: impl FnOnce(Vec<Frame>) -> Result<Vec<Tensor>>,
    ) -> Result<Tensor> {
        let mut peers = self
            .peers
            .lock()
            .map_err(|_| self.err(op, "connection lock poisoned by an earlier panic"))?;
        match &mut *peers {
            Peers::Alone => {
                let frame = Frame {
                    op,
                    dtype: mine.dtype(),
                    dims: mine.dims().to_vec(),
                    tensor: Some(mine.detach()),
                };
                Ok(combine(vec![frame])?.remove(0))
            }
            Peers::Worker(s) => {
                wire::send(s, op, mine, shape_only)
                    .map_err(|e| self.err(op, format!("sending to rank 0: {e}")))?;
                let f = wire::recv(s, mine.device())
                    .map_err(|e| self.err(op, format!("receiving from rank 0: {e}")))?;
                if f.op != op {
                    return Err(self.err(op, format!("rank 0 answered {}", f.op.name())));
                }
                f.tensor
                    .ok_or_else(|| self.err(op, "rank 0 answered a shape without elements"))
            }
            Peers::Root(streams) => {
                let mut frames = Vec::with_capacity(streams.len() + 1);
                frames.push(Frame {
                    op,
                    dtype: mine.dtype(),
                    dims: mine.dims().to_vec(),
                    tensor: (!shape_only).then(|| mine.detach()),
                });
                for (i, s) in streams.iter_mut().enumerate() {
                    let f = wire::recv(s, mine.device())
                        .map_err(|e| self.err(op, format!("receiving from rank {}: {e}", i + 1)))?;
                    if f.op != op {
                        return Err(self.err(
                            op,
                            format!("rank {} called {} at the same time", i + 1, f.op.name()),
                        ));
                    }
                    frames.push(f);
                }
                let mut results = combine(frames)?;
                if results.len() != self.world_size {
                    return Err(self.err(op, "internal: one result per rank expected"));
                }
                for (i, s) in streams.iter_mut().enumerate() {
                    wire::send(s, op, &results[i + 1], false)
                        .map_err(|e| self.err(op, format!("sending to rank {}: {e}", i + 1)))?;
                }
                Ok(results.swap_remove(0))
            }
        }
    }
}

/// The tensors of `frames`, all with `dtype` and `same(dims)`, or the error naming a rank.
fn tensors(
    op: Op,
    frames: Vec<Frame>,
    same: impl Fn(&[usize], &[usize]) -> bool,
) -> Result<Vec<Tensor>> {
    let (dtype, dims) = (frames[0].dtype, frames[0].dims.clone());
    frames
        .into_iter()
        .enumerate()
        .map(|(rank, f)| {
            if f.dtype != dtype || !same(&f.dims, &dims) {
                return Err(Error::Shape {
                    what: format!("{} (rank {rank})", op.name()),
                    expected: format!("{dims:?} {dtype:?} as on rank 0"),
                    got: format!("{:?} {:?}", f.dims, f.dtype),
                });
            }
            f.tensor.ok_or_else(|| Error::Collective {
                op: op.name().into(),
                rank: 0,
                reason: format!("rank {rank} sent a shape without elements"),
            })
        })
        .collect()
}

impl Collective for TcpCollective {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn local_ranks(&self) -> Vec<usize> {
        vec![self.rank]
    }

    fn all_gather(&self, parts: &[Tensor]) -> Result<Vec<Tensor>> {
        let op = Op::AllGather;
        let mine = self.single(op, parts)?;
        let k = self.world_size;
        let out = self.run(op, mine, false, |frames| {
            let ts = tensors(op, frames, |a, b| a.get(1..) == b.get(1..))?;
            Ok(vec![Tensor::cat(&ts, 0)?; k])
        })?;
        Ok(vec![out])
    }

    fn all_reduce(&self, parts: &[Tensor], reduce: ReduceOp) -> Result<Vec<Tensor>> {
        let op = match reduce {
            ReduceOp::Sum => Op::AllReduceSum,
            ReduceOp::Max => Op::AllReduceMax,
        };
        let mine = self.single(op, parts)?;
        let k = self.world_size;
        let out = self.run(op, mine, false, |frames| {
            let ts = tensors(op, frames, |a, b| a == b)?;
            Ok(vec![fold(&ts, reduce)?; k])
        })?;
        Ok(vec![out])
    }

    fn reduce_scatter(&self, parts: &[Tensor], counts: &[usize]) -> Result<Vec<Tensor>> {
        let op = Op::ReduceScatter;
        let mine = self.single(op, parts)?;
        let rows = mine.dims().first().copied().unwrap_or(0);
        check_counts(counts, self.world_size, rows)?;
        let k = self.world_size;
        let out = self.run(op, mine, false, |frames| {
            let sum = fold(&tensors(op, frames, |a, b| a == b)?, ReduceOp::Sum)?;
            scatter_rows(&sum, counts, k)
        })?;
        Ok(vec![out])
    }

    fn broadcast(&self, parts: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
        let op = Op::Broadcast;
        let mine = self.single(op, parts)?;
        check_root(root, self.world_size)?;
        let k = self.world_size;
        let out = self.run(op, mine, self.rank != root, |frames| {
            let (dtype, dims) = (frames[0].dtype, frames[0].dims.clone());
            if let Some((rank, f)) = frames
                .iter()
                .enumerate()
                .find(|(_, f)| f.dtype != dtype || f.dims != dims)
            {
                return Err(Error::Shape {
                    what: format!("broadcast (rank {rank})"),
                    expected: format!("{dims:?} {dtype:?} as on rank 0"),
                    got: format!("{:?} {:?}", f.dims, f.dtype),
                });
            }
            let source = frames
                .into_iter()
                .nth(root)
                .and_then(|f| f.tensor)
                .ok_or_else(|| Error::Collective {
                    op: op.name().into(),
                    rank: 0,
                    reason: format!("the root rank {root} sent no elements"),
                })?;
            Ok(vec![source; k])
        })?;
        Ok(vec![out])
    }
}
