//! Where this process sits in a multi-process run, read from the environment variables
//! `torchrun` (PyTorch's `torch.distributed.run`) sets: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`, and `FR_RUN_ID` (torchrun's `--rdzv-id`: ranks of other runs
//! that reach the same port are refused). A launcher (`cargo xtask train --gpus N`) sets them for every
//! process it starts; a cluster scheduler can set them the same way.

use std::collections::BTreeMap;

use crate::{Error, Result};

/// `MASTER_PORT` when the variable is absent (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// The position of this process in a run of `world_size` processes (one rank per process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world_size`; rank 0 hosts the rendezvous and writes checkpoints.
    pub rank: usize,
    /// Number of processes (ranks) over all nodes.
    pub world_size: usize,
    /// Rank within this node: the GPU ordinal this process uses.
    pub local_rank: usize,
    /// Host name or address of rank 0, reachable from every node.
    pub master_addr: String,
    /// TCP port rank 0 listens on for the rendezvous.
    pub master_port: u16,
    /// The run's id (`FR_RUN_ID`, empty by default): a rank announcing another id at the
    /// rendezvous is refused, so two runs that meet on one port do not mix.
    pub run_id: String,
}

impl DistEnv {
    /// A single-process run (rank 0 of 1, loopback address).
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
            run_id: String::new(),
        }
    }

    /// Read the torchrun variables from the process environment. Without `WORLD_SIZE` the run
    /// is single-process ([`DistEnv::single`]); with it, `RANK` is required, `LOCAL_RANK`
    /// defaults to `RANK`, `MASTER_ADDR` to `127.0.0.1` and `MASTER_PORT` to 29500.
    ///
    /// # Errors
    /// [`Error::Env`] naming the variable that is not a number, out of range or missing.
    pub fn from_env() -> Result<Self> {
        let vars: BTreeMap<String, String> = [
            "FR_RUN_ID",
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        ]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
        Self::from_vars(&vars)
    }

    /// [`DistEnv::from_env`] over an explicit map of variables.
    ///
    /// # Errors
    /// As [`DistEnv::from_env`].
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<Self> {
        let Some(world) = vars.get("WORLD_SIZE") else {
            return Ok(Self::single());
        };
        let number = |var: &str, text: &str| -> Result<usize> {
            text.trim()
                .parse::<usize>()
                .map_err(|_| Error::env(var, format!("`{text}` is not a non-negative integer")))
        };
        let world_size = number("WORLD_SIZE", world)?;
        if world_size == 0 {
            return Err(Error::env("WORLD_SIZE", "must be at least 1"));
        }
        let rank = match vars.get("RANK") {
            Some(r) => number("RANK", r)?,
            None => return Err(Error::env("RANK", "missing (WORLD_SIZE is set)")),
        };
        if rank >= world_size {
            return Err(Error::env(
                "RANK",
                format!("{rank} is not below WORLD_SIZE {world_size}"),
            ));
        }
        let local_rank = match vars.get("LOCAL_RANK") {
            Some(r) => number("LOCAL_RANK", r)?,
            None => rank,
        };
        let master_addr = vars
            .get("MASTER_ADDR")
            .cloned()
            .unwrap_or_else(|| "127.0.0.1".into());
        if master_addr.trim().is_empty() {
            return Err(Error::env("MASTER_ADDR", "is empty"));
        }
        let master_port = match vars.get("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .map_err(|_| Error::env("MASTER_PORT", format!("`{p}` is not a TCP port")))?,
            None => DEFAULT_MASTER_PORT,
        };
        let run_id = vars.get("FR_RUN_ID").cloned().unwrap_or_default();
        if run_id.len() > 256 {
            return Err(Error::env("FR_RUN_ID", "longer than 256 bytes"));
        }
        Ok(Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            run_id,
        })
    }

    /// The variables that describe this position, for a launcher to set on a child process.
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("FR_RUN_ID", self.run_id.clone()),
        ]
    }

    /// Whether more than one process takes part.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_torchrun_variables() {
        assert_eq!(DistEnv::from_vars(&vars(&[])).unwrap(), DistEnv::single());
        let e = DistEnv::from_vars(&vars(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
            ("FR_RUN_ID", "job-7"),
        ]))
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (5, 8, 1));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("node0", 29400));
        assert_eq!(e.run_id, "job-7");
        let back: BTreeMap<String, String> = e
            .to_vars()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(DistEnv::from_vars(&back).unwrap(), e);
        let d = DistEnv::from_vars(&vars(&[("RANK", "1"), ("WORLD_SIZE", "2")])).unwrap();
        assert_eq!((d.local_rank, d.master_port), (1, DEFAULT_MASTER_PORT));
    }

    #[test]
    fn names_the_bad_variable() {
        let bad = [
            (vec![("WORLD_SIZE", "2")], "RANK"),
            (vec![("WORLD_SIZE", "two"), ("RANK", "0")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "0"), ("RANK", "0")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "RANK"),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")],
                "MASTER_PORT",
            ),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "-1")],
                "LOCAL_RANK",
            ),
        ];
        for (pairs, key) in bad {
            match DistEnv::from_vars(&vars(&pairs)) {
                Err(Error::Env { var, .. }) => assert_eq!(var, key, "{pairs:?}"),
                other => panic!("{pairs:?}: expected an error naming {key}, got {other:?}"),
            }
        }
    }
}
