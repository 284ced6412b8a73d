//! [`Collective`] across GPUs over NCCL (candle's cudarc bindings), one rank per process.
//!
//! Built with `--features nccl`; libnccl is loaded when the program starts. This code is
//! compiled in CI but has not run on a GPU yet (no GPU machine was available): see
//! `docs/scale.md`.

use std::sync::Mutex;
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp as NcclOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::collective::{check_root, Collective, ReduceOp};
use crate::rendezvous::rendezvous;
use crate::{DistEnv, Error, Result};

/// One rank of an NCCL communicator: its GPU (`cuda:LOCAL_RANK`) and the communicator, created
/// on candle's stream of that GPU so that collectives are ordered with the kernels around them.
///
/// Rank 0 creates the NCCL unique id and shares it in the TCP rendezvous, as
/// `torch.distributed.init_process_group("nccl")` does through its TCPStore. Tensors must be
/// on this rank's GPU. NCCL's all-gather and reduce-scatter move equal-sized blocks: every
/// rank must gather `(B, …)` with the same `B` (checked; data-parallel training with
/// `drop_last` always has it) and reduce-scatter with equal counts.
pub struct NcclCollective {
    comm: Mutex<SendComm>,
    rank: usize,
    world_size: usize,
    device: Device,
}

/// The communicator, movable to another thread.
struct SendComm(Comm);

// SAFETY: NCCL allows a communicator to be used from any thread as long as no two threads use
// it at the same time; `NcclCollective` only reaches it through a `Mutex`, so calls are
// serialised. (cudarc leaves `Comm` `!Send` because it holds a raw pointer.)
unsafe impl Send for SendComm {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

fn nccl_err(op: &str, rank: usize, e: impl std::fmt::Debug) -> Error {
    Error::Collective {
        op: op.into(),
        rank,
        reason: format!("NCCL: {e:?}"),
    }
}

impl NcclCollective {
    /// Open GPU `env.local_rank`, meet the other ranks over TCP (rank 0 sends the NCCL unique
    /// id), and create this rank's communicator.
    ///
    /// # Errors
    /// [`Error::Rendezvous`] as [`rendezvous`]; [`Error::Collective`] when the GPU cannot be
    /// opened or NCCL fails to create the id or the communicator.
    pub fn connect(env: &DistEnv, timeout: Duration) -> Result<Self> {
        let device = Device::new_cuda(env.local_rank).map_err(|e| Error::Collective {
            op: "init".into(),
            rank: env.rank,
            reason: format!("opening cuda:{}: {e}", env.local_rank),
        })?;
        let Device::Cuda(cuda) = &device else {
            unreachable!("Device::new_cuda returns a CUDA device")
        };
        let r = rendezvous(
            env,
            || {
                let id = Id::new().map_err(|e| nccl_err("init", 0, e))?;
                Ok(id.internal().iter().map(|&c| c as u8).collect())
            },
            timeout,
        )?;
        if r.payload.len() != 128 {
            return Err(Error::Rendezvous {
                addr: format!("{}:{}", env.master_addr, env.master_port),
                rank: env.rank,
                world_size: env.world_size,
                reason: format!("NCCL unique id of {} bytes, 128 expected", r.payload.len()),
            });
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&r.payload) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            env.rank,
            env.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| nccl_err("init", env.rank, e))?;
        tracing::info!(
            rank = env.rank,
            world_size = env.world_size,
            gpu = env.local_rank,
            "NCCL communicator ready"
        );
        Ok(Self {
            comm: Mutex::new(SendComm(comm)),
            rank: env.rank,
            world_size: env.world_size,
            device,
        })
    }

    /// This rank's GPU.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    fn single<'a>(&self, what: &str, parts: &'a [Tensor]) -> Result<&'a Tensor> {
        match parts {
            [t] => Ok(t),
            _ => Err(Error::Shape {
                what: what.into(),
                expected: "one tensor (this process holds one rank)".into(),
                got: format!("{} tensors", parts.len()),
            }),
        }
    }
}

/// Which NCCL call a [`NcclOpOnStorage`] makes.
#[derive(Clone, Copy)]
enum Call {
    AllReduce(ReduceOp),
    AllGather,
    ReduceScatter,
    Broadcast(usize),
}

/// A candle custom op that runs one NCCL collective on a contiguous CUDA tensor and returns a
/// new tensor of `out_shape` (the pattern of candle's multi-process llama example).
struct NcclOpOnStorage<'a> {
    comm: &'a Comm,
    call: Call,
    out_shape: Shape,
}

impl NcclOpOnStorage<'_> {
    fn run<T: NcclType + DeviceRepr + CudaDType>(
        &self,
        s: &CudaStorage,
        start: usize,
        end: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s.device().clone();
        let src: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
        let src = src.slice(start..end);
        // SAFETY: every element of `dst` is written by the collective before it is read.
        let mut dst = unsafe { dev.alloc::<T>(self.out_shape.elem_count()) }?;
        let op = |r: ReduceOp| match r {
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Max => NcclOp::Max,
        };
        let res = match self.call {
            Call::AllReduce(r) => self.comm.all_reduce(&src, &mut dst, &op(r)),
            Call::AllGather => self.comm.all_gather(&src, &mut dst),
            Call::ReduceScatter => self.comm.reduce_scatter(&src, &mut dst, &NcclOp::Sum),
            Call::Broadcast(root) => self.comm.broadcast(Some(&src), &mut dst, root as i32),
        };
        res.map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }
}

impl CustomOp1 for NcclOpOnStorage<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives need tensors on the rank's GPU, got a CPU tensor")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL collectives need a contiguous tensor")
        };
        let out = match s.dtype() {
            DType::F32 => self.run::<f32>(s, start, end)?,
            DType::F64 => self.run::<f64>(s, start, end)?,
            DType::BF16 => self.run::<half::bf16>(s, start, end)?,
            DType::F16 => self.run::<half::f16>(s, start, end)?,
            DType::U32 => self.run::<u32>(s, start, end)?,
            DType::I64 => self.run::<i64>(s, start, end)?,
            DType::U8 => self.run::<u8>(s, start, end)?,
            d => candle_core::bail!("dtype {d:?} cannot cross ranks"),
        };
        Ok((out, self.out_shape.clone()))
    }
}

impl NcclCollective {
    fn call(&self, name: &str, t: &Tensor, call: Call, out_shape: Shape) -> Result<Tensor> {
        let t = t.detach().contiguous()?;
        let comm = self.comm.lock().map_err(|_| Error::Collective {
            op: name.into(),
            rank: self.rank,
            reason: "communicator lock poisoned by an earlier panic".into(),
        })?;
        let op = NcclOpOnStorage {
            comm: &comm.0,
            call,
            out_shape,
        };
        t.apply_op1_no_bwd(&op)
            .map_err(|e| nccl_err(name, self.rank, e))
    }
}

impl Collective for NcclCollective {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn local_ranks(&self) -> Vec<usize> {
        vec![self.rank]
    }

    fn all_gather(&self, parts: &[Tensor]) -> Result<Vec<Tensor>> {
        let mine = self.single("all_gather", parts)?;
        let dims = mine.dims().to_vec();
        let rows = dims.first().copied().unwrap_or(1);
        // NCCL gathers equal blocks: check every rank has as many rows as this one.
        let count = Tensor::new(&[rows as u32], mine.device())?;
        let all = self.call(
            "all_gather",
            &count,
            Call::AllGather,
            Shape::from(vec![self.world_size]),
        )?;
        let counts = all.to_vec1::<u32>()?;
        if counts.iter().any(|&c| c as usize != rows) {
            return Err(Error::Shape {
                what: "all_gather (NCCL)".into(),
                expected: "the same number of rows on every rank".into(),
                got: format!("rows per rank {counts:?}"),
            });
        }
        let mut out = dims.clone();
        if out.is_empty() {
            out.push(self.world_size);
        } else {
            out[0] = rows * self.world_size;
        }
        Ok(vec![self.call(
            "all_gather",
            mine,
            Call::AllGather,
            Shape::from(out),
        )?])
    }

    fn all_reduce(&self, parts: &[Tensor], op: ReduceOp) -> Result<Vec<Tensor>> {
        let mine = self.single("all_reduce", parts)?;
        Ok(vec![self.call(
            "all_reduce",
            mine,
            Call::AllReduce(op),
            mine.shape().clone(),
        )?])
    }

    fn reduce_scatter(&self, parts: &[Tensor], counts: &[usize]) -> Result<Vec<Tensor>> {
        let mine = self.single("reduce_scatter", parts)?;
        let dims = mine.dims().to_vec();
        let rows = dims.first().copied().unwrap_or(0);
        let equal = counts.len() == self.world_size
            && counts.iter().sum::<usize>() == rows
            && counts.iter().all(|&c| c == counts[0]);
        if !equal {
            return Err(Error::Shape {
                what: "reduce_scatter counts (NCCL)".into(),
                expected: format!("{} equal counts adding up to {rows}", self.world_size),
                got: format!("{counts:?}"),
            });
        }
        let mut out = dims;
        out[0] = counts[self.rank];
        Ok(vec![self.call(
            "reduce_scatter",
            mine,
            Call::ReduceScatter,
            Shape::from(out),
        )?])
    }

    fn broadcast(&self, parts: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
        let mine = self.single("broadcast", parts)?;
        check_root(root, self.world_size)?;
        Ok(vec![self.call(
            "broadcast",
            mine,
            Call::Broadcast(root),
            mine.shape().clone(),
        )?])
    }
}
