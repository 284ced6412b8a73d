//! `fr train`'s launcher (torchrun's role): one worker process per local rank, each this
//! program again with the same arguments plus `--worker` and the torchrun environment
//! variables; the first failure stops the others and is named.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fr_dist::DistEnv;
use fr_run::train::TrainOptions;
use tracing::info;

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Start one worker per local rank and wait for all of them.
pub fn launch(args: &TrainOptions, per_node: usize) -> Result<()> {
    let world_size = per_node * args.nnodes;
    let master_port = match args.master_port {
        Some(p) => p,
        None if args.nnodes == 1 => free_port()?,
        None => fr_dist::DEFAULT_MASTER_PORT,
    };
    let exe = std::env::current_exe().context("finding this program to start the workers")?;
    // torchrun's --rdzv-id: this node's workers refuse ranks of another run on the same port.
    // Several nodes must agree on it: FR_RUN_ID from the environment, else one derived from
    // the rendezvous address (the same on every node).
    let run_id = std::env::var("FR_RUN_ID").unwrap_or_else(|_| {
        if args.nnodes == 1 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            format!("{}-{nanos}", std::process::id())
        } else {
            format!("{}:{master_port}", args.master_addr)
        }
    });
    let forwarded: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    info!(
        world_size,
        per_node,
        node_rank = args.node_rank,
        master = %format!("{}:{master_port}", args.master_addr),
        "starting workers"
    );
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(per_node);
    for local_rank in 0..per_node {
        let env = DistEnv {
            rank: args.node_rank * per_node + local_rank,
            world_size,
            local_rank,
            master_addr: args.master_addr.clone(),
            master_port,
            run_id: run_id.clone(),
        };
        let mut cmd = Command::new(&exe);
        cmd.args(&forwarded)
            .arg("--worker")
            .env("FR_LAUNCHER_PID", std::process::id().to_string());
        for (k, v) in env.to_vars() {
            cmd.env(k, v);
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                bail!("starting rank {}: {e}", env.rank);
            }
        };
        children.push((env.rank, child));
    }
    // Wait; the first failure stops the others (torchrun does the same).
    let mut done = vec![false; children.len()];
    while done.iter().any(|d| !d) {
        let mut failed = Vec::new();
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    done[i] = true;
                    if !status.success() {
                        failed.push((*rank, status));
                    }
                }
                Ok(None) => {}
                Err(e) => bail!("waiting for rank {rank}: {e}"),
            }
        }
        if !failed.is_empty() {
            // A rank that dies takes its peers' collectives down with it a moment later: give
            // them that moment, then name the cause first (a rank killed by a signal, else
            // the lowest failed rank) and the others after it.
            std::thread::sleep(Duration::from_millis(300));
            for (i, (rank, child)) in children.iter_mut().enumerate() {
                if !done[i] {
                    if let Ok(Some(status)) = child.try_wait() {
                        done[i] = true;
                        if !status.success() {
                            failed.push((*rank, status));
                        }
                    }
                }
            }
            stop(&mut children);
            failed.sort_by_key(|(rank, status)| (signal_of(status).is_none(), *rank));
            let (rank, status) = &failed[0];
            let others: Vec<String> = failed[1..]
                .iter()
                .map(|(r, st)| format!("rank {r} ({})", describe(st)))
                .collect();
            let also = if others.is_empty() {
                String::new()
            } else {
                format!("; then {}", others.join(", "))
            };
            bail!(
                "rank {rank} failed ({}){also}; the other ranks were stopped",
                describe(status)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    info!(ranks = children.len(), "all ranks of this node finished");
    Ok(())
}

/// The signal that ended a process, if one did.
fn signal_of(status: &std::process::ExitStatus) -> Option<i32> {
    #[cfg(unix)]
    {
        std::os::unix::process::ExitStatusExt::signal(status)
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        None
    }
}

fn describe(status: &std::process::ExitStatus) -> String {
    match signal_of(status) {
        Some(9) => "killed by signal 9, SIGKILL: out of memory?".into(),
        Some(sig) => format!("killed by signal {sig}"),
        None => status.to_string(),
    }
}

fn stop(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
