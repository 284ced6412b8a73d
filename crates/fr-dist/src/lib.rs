//! Multi-process training for fr, the way `torchrun` + `torch.distributed` do it: one process
//! per rank (per GPU), positions read from the torchrun environment variables ([`DistEnv`]),
//! a TCP rendezvous hosted by rank 0 ([`rendezvous`]), and the [`Collective`] operations
//! ([`collective`]: the trait, [`ReduceOp`], the in-process [`SimulatedCollective`]) with
//! their backends across processes:
//!
//! - [`TcpCollective`]: CPU tensors over TCP through rank 0 (the role of PyTorch's gloo
//!   backend). Rank 0 reduces in rank order with the same arithmetic as
//!   [`SimulatedCollective`] ([`collective::fold`]), so `K` processes give bit-identical results to
//!   `K` simulated ranks; the star topology moves `K ×` the data through rank 0, which is fine
//!   for CPU runs and tests, not for GPU-scale training.
//! - `NcclCollective` (feature `nccl`): GPU tensors over NCCL (candle's cudarc bindings), one
//!   communicator per process created from the unique id rank 0 shares in the rendezvous, as
//!   `torch.distributed.init_process_group("nccl")` does.
//!
//! The users of the collectives are the model-parallel Partial FC (`fr_heads::sharded`) and
//! the data-parallel step with its gradient bucketing (`fr_train::data_parallel`); the
//! launcher is `cargo xtask train`.

pub mod collective;
mod env;
mod error;
#[cfg(feature = "nccl")]
mod nccl;
pub mod rendezvous;
mod tcp;
mod wire;

pub use collective::{Collective, ReduceOp, SimulatedCollective};
pub use env::{DistEnv, DEFAULT_MASTER_PORT};
pub use error::{Error, Result};
#[cfg(feature = "nccl")]
pub use nccl::NcclCollective;
pub use rendezvous::{rendezvous, Peers, Rendezvous, DEFAULT_TIMEOUT};
pub use tcp::{TcpCollective, DEFAULT_OP_TIMEOUT};
