//! Multi-process training for fr, the way `torchrun` + `torch.distributed` do it: one process
//! per rank (per GPU), positions read from the torchrun environment variables ([`DistEnv`]),
//! a TCP rendezvous hosted by rank 0 ([`rendezvous`]), and collectives implementing
//! [`fr_heads::sharded::Collective`] across processes:
//!
//! - [`TcpCollective`]: CPU tensors over TCP through rank 0 (the role of PyTorch's gloo
//!   backend). Rank 0 reduces in rank order with the same arithmetic as
//!   [`fr_heads::sharded::SimulatedCollective`], so `K` processes give bit-identical results to
//!   `K` simulated ranks; the star topology moves `K ×` the data through rank 0, which is fine
//!   for CPU runs and tests, not for GPU-scale training.
//! - `NcclCollective` (feature `nccl`): GPU tensors over NCCL (candle's cudarc bindings), one
//!   communicator per process created from the unique id rank 0 shares in the rendezvous, as
//!   `torch.distributed.init_process_group("nccl")` does.
//!
//! The gradient bucketing and the data-parallel step are in `fr-train` (`data_parallel`), the
//! launcher in `cargo xtask train`.

mod env;
mod error;
#[cfg(feature = "nccl")]
mod nccl;
pub mod rendezvous;
mod tcp;
mod wire;

pub use env::{DistEnv, DEFAULT_MASTER_PORT};
pub use error::{Error, Result};
#[cfg(feature = "nccl")]
pub use nccl::NcclCollective;
pub use rendezvous::{rendezvous, Peers, Rendezvous, DEFAULT_TIMEOUT};
pub use tcp::{TcpCollective, DEFAULT_OP_TIMEOUT};
