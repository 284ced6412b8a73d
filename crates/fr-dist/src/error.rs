//! Errors of fr-dist: each names the variable, rank or operation that failed.

/// Result alias of fr-dist.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong setting up or running a multi-process group.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A torchrun environment variable is missing or malformed.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
        var: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The rendezvous failed: rank 0 could not listen, a rank could not reach it in time, or a
    /// rank announced a wrong rank or world size.
    #[error("rendezvous at {addr} (rank {rank} of {world_size}): {reason}")]
    Rendezvous {
        /// `MASTER_ADDR:MASTER_PORT`.
        addr: String,
        /// The rank that reports the failure.
        rank: usize,
        /// The world size it expected.
        world_size: usize,
        /// What went wrong.
        reason: String,
    },
    /// A collective operation between ranks failed: a lost connection, a peer calling another
    /// operation, a timeout, an NCCL error.
    #[error("collective `{op}` on rank {rank}: {reason}")]
    Collective {
        /// The operation (`all_reduce`, `all_gather`, `broadcast`, `init`, …).
        op: String,
        /// The rank that reports the failure.
        rank: usize,
        /// What went wrong, naming the peer rank where there is one.
        reason: String,
    },
    /// Tensors handed to a collective that do not fit: a wrong number of them, shapes or
    /// dtypes that differ between ranks, counts or a root rank out of range.
    #[error("`{what}`: expected {expected}, got {got}")]
    Shape {
        /// Which input (the operation, with the rank where known).
        what: String,
        /// What was expected, e.g. `[4, 3] F32 as on rank 0`.
        expected: String,
        /// What was received.
        got: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An [`Error::Env`] for `var`.
    pub fn env(var: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Env {
            var: var.into(),
            reason: reason.into(),
        }
    }
}
