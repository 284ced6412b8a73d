//! The TCP rendezvous and collective with ranks in threads of one test process (the same code
//! path as one process per rank: every rank has its own sockets): results are bit-identical to
//! `SimulatedCollective`, and bad rendezvous or mismatched calls fail with errors naming the
//! rank. (Model-parallel Partial FC over TCP is tested in `fr-train`, which uses both crates.)

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use fr_dist::{
    rendezvous, Collective, DistEnv, Error, Peers, ReduceOp, SimulatedCollective, TcpCollective,
};

const T: Duration = Duration::from_secs(20);

/// A free port no other test of this process was given (`bind(0)` may hand a just-released
/// port out again, and tests run in parallel; the run id keeps other processes out).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn env(rank: usize, world_size: usize, port: u16) -> DistEnv {
    DistEnv {
        rank,
        world_size,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        run_id: "test".into(),
    }
}

/// Run `f(rank, collective)` on `k` ranks, one thread each; results in rank order.
fn on_ranks<R: Send + 'static>(
    k: usize,
    f: impl Fn(usize, TcpCollective) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let port = free_port();
    let handles: Vec<_> = (0..k)
        .map(|rank| {
            let f = f.clone();
            thread::spawn(move || {
                let col = TcpCollective::connect(&env(rank, k, port), T, T).unwrap();
                assert_eq!(col.rank(), rank);
                assert_eq!(col.local_ranks(), vec![rank]);
                assert_eq!(col.world_size(), k);
                f(rank, col)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Rank `r`'s input: `(rows, 3)` values whose f32 sums depend on the order of addition.
fn input(rank: usize, rows: usize) -> Tensor {
    let v: Vec<f32> = (0..rows * 3)
        .map(|i| ((i as f32 + 1.0) * (rank as f32 + 0.3)).sin() * 10f32.powi((i % 7) as i32 - 3))
        .collect();
    Tensor::from_vec(v, (rows, 3), &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn rendezvous_shares_rank_zeros_payload() {
    let k = 4;
    let port = free_port();
    let handles: Vec<_> = (0..k)
        .map(|rank| {
            thread::spawn(move || {
                // Rank 0 comes last: the others must keep retrying.
                if rank == 0 {
                    thread::sleep(Duration::from_millis(300));
                }
                let r = rendezvous(&env(rank, k, port), || Ok(b"nccl-id".to_vec()), T).unwrap();
                let links = match &r.peers {
                    Peers::Root(s) => s.len(),
                    Peers::Worker(_) => 1,
                    Peers::Alone => 0,
                };
                (r.payload, links)
            })
        })
        .collect();
    let got: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(got[0], (b"nccl-id".to_vec(), k - 1));
    for g in &got[1..] {
        assert_eq!(g, &(b"nccl-id".to_vec(), 1));
    }
    // A single process needs no network.
    let alone = rendezvous(&DistEnv::single(), || Ok(vec![1]), T).unwrap();
    assert!(matches!(alone.peers, Peers::Alone));
}

#[test]
fn rendezvous_refuses_bad_ranks_and_times_out() {
    // Rank 1 announces another world size: rank 0 names it, rank 1 hears why.
    let port = free_port();
    let root = thread::spawn(move || rendezvous(&env(0, 2, port), || Ok(vec![]), T));
    let bad = rendezvous(&env(1, 3, port), || Ok(vec![]), T).unwrap_err();
    let root = root.join().unwrap().unwrap_err();
    assert!(
        root.to_string().contains("world size 3, expected 2"),
        "{root}"
    );
    assert!(
        matches!(&bad, Error::Rendezvous { rank: 1, reason, .. } if reason.contains("refused")),
        "{bad}"
    );
    // The same rank twice.
    let port = free_port();
    let root = thread::spawn(move || rendezvous(&env(0, 3, port), || Ok(vec![]), T));
    let first = thread::spawn(move || rendezvous(&env(1, 3, port), || Ok(vec![]), T));
    thread::sleep(Duration::from_millis(200));
    let _ = rendezvous(&env(1, 3, port), || Ok(vec![]), T);
    let root = root.join().unwrap().unwrap_err();
    assert!(
        root.to_string().contains("rank 1 connected twice"),
        "{root}"
    );
    let _ = first.join();
    // Nobody comes: rank 0 lists the missing ranks; a worker without rank 0 gives up.
    let short = Duration::from_millis(300);
    let e = rendezvous(&env(0, 3, free_port()), || Ok(vec![]), short).unwrap_err();
    assert!(e.to_string().contains("ranks [1, 2] did not arrive"), "{e}");
    let e = rendezvous(&env(2, 3, free_port()), || Ok(vec![]), short).unwrap_err();
    assert!(e.to_string().contains("rank 0 not reachable"), "{e}");
}

#[test]
fn tcp_collectives_equal_simulated_ranks_bit_for_bit() {
    let k = 3;
    let rows = [2usize, 4, 1];
    let results = on_ranks(k, move |rank, col| {
        let x = input(rank, rows[rank]);
        let gathered = col.all_gather(std::slice::from_ref(&x)).unwrap().remove(0);
        let same = input(rank, 4);
        let sum = col
            .all_reduce(std::slice::from_ref(&same), ReduceOp::Sum)
            .unwrap()
            .remove(0);
        let max = col
            .all_reduce(std::slice::from_ref(&same), ReduceOp::Max)
            .unwrap()
            .remove(0);
        let scattered = col
            .reduce_scatter(std::slice::from_ref(&gathered), &rows)
            .unwrap()
            .remove(0);
        let from2 = col
            .broadcast(std::slice::from_ref(&same), 2)
            .unwrap()
            .remove(0);
        let from0 = col.broadcast(&[same], 0).unwrap().remove(0);
        let bf = col
            .all_reduce(
                &[x.to_dtype(DType::BF16).unwrap().sum_all().unwrap()],
                ReduceOp::Sum,
            )
            .unwrap()
            .remove(0);
        col.barrier().unwrap();
        (gathered, sum, max, scattered, from2, from0, bf)
    });
    let sim = SimulatedCollective::new(k).unwrap();
    let xs: Vec<Tensor> = (0..k).map(|r| input(r, rows[r])).collect();
    let same: Vec<Tensor> = (0..k).map(|r| input(r, 4)).collect();
    let g = sim.all_gather(&xs).unwrap();
    let s = sim.all_reduce(&same, ReduceOp::Sum).unwrap();
    let m = sim.all_reduce(&same, ReduceOp::Max).unwrap();
    let rs = sim.reduce_scatter(&g, &rows).unwrap();
    let b2 = sim.broadcast(&same, 2).unwrap();
    for (rank, r) in results.iter().enumerate() {
        assert_eq!(bits(&r.0), bits(&g[rank]), "all_gather on rank {rank}");
        assert_eq!(bits(&r.1), bits(&s[rank]), "all_reduce sum on rank {rank}");
        assert_eq!(bits(&r.2), bits(&m[rank]), "all_reduce max on rank {rank}");
        assert_eq!(bits(&r.3), bits(&rs[rank]), "reduce_scatter on rank {rank}");
        assert_eq!(r.3.dims(), &[rows[rank], 3]);
        assert_eq!(
            bits(&r.4),
            bits(&same[2]),
            "broadcast from 2 on rank {rank}"
        );
        assert_eq!(bits(&b2[rank]), bits(&same[2]));
        assert_eq!(
            bits(&r.5),
            bits(&same[0]),
            "broadcast from 0 on rank {rank}"
        );
        assert_eq!(r.6.dtype(), DType::BF16);
        assert_eq!(
            r.6.to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            results[0]
                .6
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        );
    }
    // The order of addition matters for these inputs: a different order gives other bits.
    let reversed = same[2].add(&same[1]).unwrap().add(&same[0]).unwrap();
    assert_ne!(
        bits(&reversed),
        bits(&s[0]),
        "the inputs do not test the order"
    );
}

#[test]
fn mismatched_calls_and_shapes_name_the_rank() {
    let errors = on_ranks(2, |rank, col| {
        let x = input(rank, 2);
        if rank == 1 {
            col.all_gather(&[x]).err().map(|e| e.to_string())
        } else {
            col.all_reduce(&[x], ReduceOp::Sum)
                .err()
                .map(|e| e.to_string())
        }
    });
    let root = errors[0].as_deref().unwrap();
    assert!(root.contains("rank 1 called all_gather"), "{root}");
    assert!(errors[1].is_some(), "rank 1 must fail when rank 0 gives up");
    let errors = on_ranks(2, |rank, col| {
        col.all_reduce(&[input(rank, 2 + rank)], ReduceOp::Sum)
            .err()
            .map(|e| e.to_string())
    });
    let root = errors[0].as_deref().unwrap();
    assert!(
        root.contains("all_reduce(sum) (rank 1)") && root.contains("[3, 3]"),
        "{root}"
    );
    // Two tensors handed to a one-rank process.
    let e = on_ranks(1, |_, col| {
        col.all_gather(&[input(0, 1), input(0, 1)])
            .unwrap_err()
            .to_string()
    });
    assert!(e[0].contains("one tensor"), "{}", e[0]);
}

#[test]
fn a_rank_of_another_run_is_refused() {
    let port = free_port();
    let root = thread::spawn(move || rendezvous(&env(0, 2, port), || Ok(vec![]), T));
    let stranger = DistEnv {
        run_id: "another".into(),
        ..env(1, 2, port)
    };
    let bad = rendezvous(&stranger, || Ok(vec![]), T).unwrap_err();
    let root = root.join().unwrap().unwrap_err();
    assert!(
        root.to_string()
            .contains("belongs to run `another`, this is run `test`"),
        "{root}"
    );
    assert!(bad.to_string().contains("refused"), "{bad}");
}
