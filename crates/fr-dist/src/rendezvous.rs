//! The TCP rendezvous: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, every other rank connects
//! and announces its rank and world size, rank 0 checks that each rank `1..K` came exactly once
//! with the same world size and answers every rank with a payload it chose (the NCCL unique id
//! for GPU runs, as `torch.distributed`'s TCPStore shares it; nothing for the TCP collective).
//!
//! Ranks may start in any order: a rank that finds nobody listening retries until the timeout,
//! so rank 0 can come up last. The connections stay open afterwards and are what
//! [`crate::TcpCollective`] talks over.
//!
//! Wire format (little-endian): hello `b"FRDV"`, version `u32`, rank `u32`, world size `u32`,
//! run-id length `u32` and the run id ([`DistEnv::run_id`]; a rank of another run is refused);
//! answer `b"FRDV"`, status `u8` (0 accepted, 1 refused), length `u32`, then the payload
//! (accepted) or a UTF-8 reason (refused).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{DistEnv, Error, Result};

/// How long ranks wait for each other at the rendezvous when nothing else is said (torchrun's
/// default rendezvous timeout is 900 s; a job whose ranks start minutes apart needs that much).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);

const MAGIC: &[u8; 4] = b"FRDV";
const VERSION: u32 = 1;
/// Largest payload or refusal accepted from the wire (the NCCL id is 128 bytes).
const MAX_PAYLOAD: u32 = 1 << 20;

/// The connections of this rank after the rendezvous.
#[derive(Debug)]
pub enum Peers {
    /// Rank 0: one stream per rank `1..K`, at index `rank − 1`.
    Root(Vec<TcpStream>),
    /// Any other rank: its stream to rank 0.
    Worker(TcpStream),
    /// A single-process run: nobody to talk to.
    Alone,
}

/// What [`rendezvous`] established.
#[derive(Debug)]
pub struct Rendezvous {
    /// This process's position.
    pub env: DistEnv,
    /// The open connections.
    pub peers: Peers,
    /// The payload rank 0 chose (the same bytes on every rank).
    pub payload: Vec<u8>,
}

fn fail(env: &DistEnv, reason: impl Into<String>) -> Error {
    Error::Rendezvous {
        addr: format!("{}:{}", env.master_addr, env.master_port),
        rank: env.rank,
        world_size: env.world_size,
        reason: reason.into(),
    }
}

/// Meet the other ranks of `env`. Rank 0 calls `payload` once and sends its bytes to everyone;
/// every rank returns them. A single-process `env` returns at once with [`Peers::Alone`].
///
/// # Errors
/// [`Error::Rendezvous`] when rank 0 cannot listen on the address, when the other ranks have
/// not all arrived (or rank 0 did not answer) within `timeout`, when a rank announces a rank
/// outside `1..K`, one already taken or another world size (rank 0 names it and refuses it;
/// the refused rank gets the reason), and on connection failures; errors of `payload`.
pub fn rendezvous(
    env: &DistEnv,
    payload: impl FnOnce() -> Result<Vec<u8>>,
    timeout: Duration,
) -> Result<Rendezvous> {
    if !env.is_distributed() {
        return Ok(Rendezvous {
            env: env.clone(),
            peers: Peers::Alone,
            payload: payload()?,
        });
    }
    if env.rank == 0 {
        root(env, payload, timeout)
    } else {
        worker(env, timeout)
    }
}

fn root(
    env: &DistEnv,
    payload: impl FnOnce() -> Result<Vec<u8>>,
    timeout: Duration,
) -> Result<Rendezvous> {
    let k = env.world_size;
    let listener = TcpListener::bind((env.master_addr.as_str(), env.master_port))
        .map_err(|e| fail(env, format!("cannot listen: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(env, format!("listener: {e}")))?;
    tracing::info!(
        addr = %format!("{}:{}", env.master_addr, env.master_port),
        world_size = k,
        "rank 0 waiting for the other ranks"
    );
    let deadline = Instant::now() + timeout;
    let mut slots: Vec<Option<TcpStream>> = (1..k).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|_| stream.set_nodelay(true))
                    .and_then(|_| stream.set_read_timeout(Some(timeout)))
                    .map_err(|e| fail(env, format!("connection from {from}: {e}")))?;
                let (rank, world, run_id) = read_hello(&mut stream)
                    .map_err(|e| fail(env, format!("hello from {from}: {e}")))?;
                let problem = if run_id != env.run_id {
                    Some(format!(
                        "{from} belongs to run `{run_id}`, this is run `{}` (FR_RUN_ID)",
                        env.run_id
                    ))
                } else if world != k {
                    Some(format!(
                        "rank {rank} at {from} announced world size {world}, expected {k}"
                    ))
                } else if rank == 0 || rank >= k {
                    Some(format!("{from} announced rank {rank}, outside 1..{k}"))
                } else if slots[rank - 1].is_some() {
                    Some(format!("rank {rank} connected twice (again from {from})"))
                } else {
                    None
                };
                if let Some(reason) = problem {
                    // Best effort: tell the refused rank why before failing here.
                    let _ = write_answer(&mut stream, 1, reason.as_bytes());
                    return Err(fail(env, reason));
                }
                tracing::debug!(rank, %from, "rank arrived");
                slots[rank - 1] = Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.is_none())
                        .map(|(i, _)| i + 1)
                        .collect();
                    return Err(fail(
                        env,
                        format!("ranks {missing:?} did not arrive within {timeout:?}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(fail(env, format!("accept: {e}"))),
        }
    }
    let bytes = payload()?;
    let mut streams: Vec<TcpStream> = slots.into_iter().flatten().collect();
    for (i, s) in streams.iter_mut().enumerate() {
        write_answer(s, 0, &bytes)
            .map_err(|e| fail(env, format!("answering rank {}: {e}", i + 1)))?;
    }
    tracing::info!(world_size = k, "rendezvous complete");
    Ok(Rendezvous {
        env: env.clone(),
        peers: Peers::Root(streams),
        payload: bytes,
    })
}

fn worker(env: &DistEnv, timeout: Duration) -> Result<Rendezvous> {
    let deadline = Instant::now() + timeout;
    let addrs: Vec<_> = (env.master_addr.as_str(), env.master_port)
        .to_socket_addrs()
        .map_err(|e| fail(env, format!("cannot resolve MASTER_ADDR: {e}")))?
        .collect();
    let mut stream = loop {
        let attempt = addrs
            .iter()
            .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(5)).ok());
        match attempt {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                return Err(fail(
                    env,
                    format!("rank 0 not reachable within {timeout:?}"),
                ))
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    stream
        .set_nodelay(true)
        .and_then(|_| stream.set_read_timeout(Some(timeout)))
        .map_err(|e| fail(env, format!("connection: {e}")))?;
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&(env.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(env.world_size as u32).to_le_bytes());
    hello.extend_from_slice(&(env.run_id.len() as u32).to_le_bytes());
    hello.extend_from_slice(env.run_id.as_bytes());
    stream
        .write_all(&hello)
        .map_err(|e| fail(env, format!("sending hello: {e}")))?;
    let (status, body) =
        read_answer(&mut stream).map_err(|e| fail(env, format!("waiting for rank 0: {e}")))?;
    if status != 0 {
        return Err(fail(
            env,
            format!("refused by rank 0: {}", String::from_utf8_lossy(&body)),
        ));
    }
    Ok(Rendezvous {
        env: env.clone(),
        peers: Peers::Worker(stream),
        payload: body,
    })
}

fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_hello(s: &mut TcpStream) -> std::io::Result<(usize, usize, String)> {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(std::io::Error::other("not an fr rendezvous hello"));
    }
    let version = read_u32(s)?;
    if version != VERSION {
        return Err(std::io::Error::other(format!(
            "protocol version {version}, this build speaks {VERSION}"
        )));
    }
    let (rank, world) = (read_u32(s)? as usize, read_u32(s)? as usize);
    let len = read_u32(s)?;
    if len > 256 {
        return Err(std::io::Error::other(format!("run id of {len} bytes")));
    }
    let mut id = vec![0u8; len as usize];
    s.read_exact(&mut id)?;
    Ok((rank, world, String::from_utf8_lossy(&id).into_owned()))
}

fn write_answer(s: &mut TcpStream, status: u8, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(9 + body.len());
    msg.extend_from_slice(MAGIC);
    msg.push(status);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    s.write_all(&msg)
}

fn read_answer(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    if &head[..4] != MAGIC {
        return Err(std::io::Error::other("not an fr rendezvous answer"));
    }
    let len = read_u32(s)?;
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::other(format!(
            "answer of {len} bytes is too large"
        )));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)?;
    Ok((head[4], body))
}
