//! Data-parallel training with one rank per thread over the TCP collective (each rank has its
//! own sockets and trainer, as one process per rank would): `K` ranks with batch `B` train to
//! the weights of one process with batch `K·B` (f64, BatchNorm-free backbone, ArcFace head,
//! SGD with momentum and weight decay, clipping), the replicas stay bit-identical, gradient
//! buckets and presence flags behave, and a non-finite loss on one rank makes every rank skip.
//! Model-parallel Partial FC over TCP gives the loss and gradients of the simulated ranks, and
//! trains like one process under the data-parallel trainer.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};
use fr_dist::{DistEnv, TcpCollective, DEFAULT_OP_TIMEOUT};
use fr_heads::{build_head, HeadConfig};
use fr_train::{
    DataParallel, DataParallelConfig, GradReduction, LrSchedule, OptimizerConfig, SeededVarMap,
    SgdConfig, Trainer, TrainerConfig,
};

const IN: usize = 12; // images (B, 3, 2, 2)
const EMB: usize = 8;
const CLASSES: usize = 10;
const B: usize = 4;
const STEPS: usize = 4;

/// Flatten → Linear: no batch statistics, so `K` slices give the gradient of the whole batch.
struct Linear2 {
    fc: Linear,
}

impl ModuleT for Linear2 {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        self.fc.forward(&xs.flatten_from(1)?)
    }
}

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

fn connect(rank: usize, k: usize, port: u16) -> TcpCollective {
    let env = DistEnv {
        rank,
        world_size: k,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        run_id: "test".into(),
    };
    TcpCollective::connect(&env, Duration::from_secs(20), DEFAULT_OP_TIMEOUT).unwrap()
}

/// SGD with momentum and weight decay, a warm-up, and a clip small enough to trigger (the clip
/// must see the global norm).
fn trainer_config() -> TrainerConfig {
    TrainerConfig {
        optimizer: OptimizerConfig::Sgd(SgdConfig {
            lr: 0.2,
            momentum: 0.9,
            weight_decay: 5e-4,
            ..SgdConfig::default()
        }),
        schedule: LrSchedule::Poly {
            power: 1.0,
            warmup_steps: 1,
        },
        clip_max_norm: Some(0.5),
        ..TrainerConfig::default()
    }
}

/// Run `f(rank, its data-parallel layer)` on `k` ranks, one thread and TCP connection each,
/// with `config`; the results in rank order.
fn on_ranks<R: Send + 'static>(
    k: usize,
    config: DataParallelConfig,
    f: impl Fn(usize, DataParallel) -> R + Send + Clone + 'static,
) -> Vec<R> {
    let port = free_port();
    let handles: Vec<_> = (0..k)
        .map(|rank| {
            let (f, config) = (f.clone(), config.clone());
            thread::spawn(move || {
                let dp = DataParallel::new(Box::new(connect(rank, k, port)), config).unwrap();
                f(rank, dp)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn trainer() -> Trainer {
    let seeded = SeededVarMap::new(9);
    let vb = seeded.var_builder(DType::F64, &Device::Cpu);
    let fc = candle_nn::linear(IN, EMB, vb.pp("fc")).unwrap();
    let head = build_head(
        &HeadConfig::default_for("arcface").unwrap(),
        EMB,
        CLASSES,
        vb.pp("head"),
    )
    .unwrap();
    Trainer::new(
        Box::new(Linear2 { fc }),
        head,
        seeded.varmap().clone(),
        trainer_config(),
        |_| true,
    )
    .unwrap()
}

/// Global batch `step`: `(K·B, 3, 2, 2)` images and labels.
fn global_batch(step: usize, k: usize) -> (Tensor, Tensor) {
    let n = k * B;
    let v: Vec<f64> = (0..n * IN)
        .map(|i| ((i as f64) * 0.37 + step as f64 * 1.3).sin())
        .collect();
    let labels: Vec<u32> = (0..n).map(|i| ((i * 3 + step) % CLASSES) as u32).collect();
    (
        Tensor::from_vec(v, (n, 3, 2, 2), &Device::Cpu).unwrap(),
        Tensor::new(labels.as_slice(), &Device::Cpu).unwrap(),
    )
}

fn weights(t: &Trainer) -> BTreeMap<String, Vec<f64>> {
    let data = t.varmap().data().lock().unwrap();
    data.iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn k_ranks_train_like_one_process_with_the_global_batch() {
    let k = 3;
    let mut single = trainer();
    let mut want_loss = Vec::new();
    for s in 0..STEPS {
        let (x, y) = global_batch(s, k);
        let o = single.step_tensors(&x, &y, STEPS as u64).unwrap();
        assert!(!o.skipped);
        want_loss.push(o.loss);
    }
    let want = weights(&single);

    let got = on_ranks(k, DataParallelConfig::default(), move |rank, dp| {
        let mut t = trainer().with_data_parallel(dp).unwrap();
        let mut losses = Vec::new();
        for s in 0..STEPS {
            let (x, y) = global_batch(s, k);
            let x = x.narrow(0, rank * B, B).unwrap();
            let y = y.narrow(0, rank * B, B).unwrap();
            let o = t.step_tensors(&x, &y, STEPS as u64).unwrap();
            assert!(!o.skipped);
            assert_eq!(o.stats.get("dp_buckets"), Some(&1.0));
            losses.push(o.loss);
        }
        (losses, weights(&t))
    });
    for (rank, (losses, w)) in got.iter().enumerate() {
        // Every rank reports the global loss and holds the same weights, bit for bit.
        assert_eq!(losses, &got[0].0, "losses on rank {rank}");
        assert_eq!(w, &got[0].1, "weights on rank {rank}");
    }
    for (s, (a, b)) in got[0].0.iter().zip(&want_loss).enumerate() {
        assert!(
            (a - b).abs() < 1e-12,
            "step {s}: loss {a} vs one process {b}"
        );
    }
    let mut worst = 0f64;
    for (name, w) in &want {
        for (a, b) in got[0].1[name].iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst < 1e-12,
        "weights differ from one process by {worst:e}"
    );
    // Training moved the weights (the comparison is not between two initial states).
    let init = weights(&trainer());
    assert!(init.iter().any(|(n, w)| w != &want[n]));
}

/// What one rank of [`buckets_presence_flags_and_broadcast`] sees: its bucket plan (names),
/// its values of `a`, `h`, `head.local` after the broadcast, its reduced gradients of `a`,
/// `b`, `c`, `h`, `head.local`, and the reduction's statistics.
#[allow(clippy::type_complexity)]
fn buckets_rank(
    rank: usize,
    k: usize,
    port: u16,
) -> (
    Vec<Vec<String>>,
    (f64, f64, f64),
    (
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    ),
    fr_train::data_parallel::ReduceStats,
) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    // Different values per rank: the broadcast must make them rank 0's.
    let init = candle_nn::Init::Const(rank as f64 + 1.0);
    let a = vb.get_with_hints((300, 2), "a", init).unwrap();
    let b = vb.get_with_hints(100, "b", init).unwrap();
    let c = vb.get_with_hints(50, "c", init).unwrap();
    let local = vb.get_with_hints(7, "head.local", init).unwrap();
    let _ = &local;
    let h = VarBuilder::from_varmap(&vm, DType::F64, &dev)
        .get_with_hints(10, "h", init)
        .unwrap();
    let vars: Vec<(String, Var)> = {
        let data = vm.data().lock().unwrap();
        let mut v: Vec<_> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let _ = (&a, &b, &c, &h);
    let dp = DataParallel::new(
        Box::new(connect(rank, k, port)),
        DataParallelConfig {
            // 1.2 KiB: `a` (2400 B) alone, `b` + `c` (600 B) together.
            bucket_cap_mb: 1200.0 / (1024.0 * 1024.0),
            reduction: GradReduction::Mean,
            broadcast_buffers: true,
            compression: fr_train::GradCompression::None,
        },
    )
    .unwrap()
    .with_local_variables(|n| n.starts_with("head."));
    let names = |bs: Vec<Vec<usize>>| -> Vec<Vec<String>> {
        bs.iter()
            .map(|b| b.iter().map(|&i| vars[i].0.clone()).collect())
            .collect()
    };
    let plan = names(dp.buckets(&vars));
    dp.broadcast_from_rank0(&vars).unwrap();
    let value = |name: &str| -> f64 {
        let v = &vars.iter().find(|(n, _)| n == name).unwrap().1;
        v.as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let after = (value("a"), value("h"), value("head.local"));
    // Gradients: `a` on both ranks, `b` on rank 1 only, `c` nowhere, the local
    // variable on both (it must stay this rank's own).
    let mut grads = candle_core::backprop::GradStore::default();
    let get = |name: &str| vars.iter().find(|(n, _)| n == name).unwrap().1.clone();
    grads.insert(
        get("a").as_tensor(),
        Tensor::full(rank as f32 + 1.0, (300, 2), &dev).unwrap(),
    );
    if rank == 1 {
        grads.insert(get("b").as_tensor(), Tensor::full(4f32, 100, &dev).unwrap());
    }
    grads.insert(
        get("h").as_tensor(),
        Tensor::full(rank as f64 * 2.0, 10, &dev).unwrap(),
    );
    grads.insert(
        get("head.local").as_tensor(),
        Tensor::full(rank as f32 + 5.0, 7, &dev).unwrap(),
    );
    let stats = dp.reduce_gradients(&mut grads, &vars).unwrap();
    let g = |name: &str| -> Option<f64> {
        grads.get(get(name).as_tensor()).map(|t| {
            t.to_dtype(DType::F64)
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
    };
    let reduced = (g("a"), g("b"), g("c"), g("h"), g("head.local"));
    (plan, after, reduced, stats)
}

#[test]
fn buckets_presence_flags_and_broadcast() {
    let k = 2;
    let port = free_port();
    let ranks: Vec<_> = (0..k)
        .map(|rank| thread::spawn(move || buckets_rank(rank, k, port)))
        .collect();
    let got: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    for (rank, (plan, after, reduced, stats)) in got.iter().enumerate() {
        // Reverse name order, one dtype per bucket, the cap respected, local names left out.
        assert_eq!(
            plan,
            &vec![
                vec!["h".to_string()],
                vec!["c".into(), "b".into()],
                vec!["a".into()]
            ],
            "rank {rank}"
        );
        assert_eq!(
            (after.0, after.1),
            (1.0, 1.0),
            "rank 0's values on rank {rank}"
        );
        assert_eq!(
            after.2,
            rank as f64 + 1.0,
            "a local variable is not broadcast"
        );
        assert_eq!(reduced.0, Some(1.5), "mean of 1 and 2");
        assert_eq!(reduced.1, Some(2.0), "present on one rank: (4 + 0) / 2");
        assert_eq!(reduced.2, None, "no gradient anywhere stays absent");
        assert_eq!(reduced.3, Some(1.0), "f64 bucket: mean of 0 and 2");
        assert_eq!(
            reduced.4,
            Some(rank as f64 + 5.0),
            "a local gradient is not reduced"
        );
        assert_eq!((stats.buckets, stats.tensors), (3, 3));
    }
}

#[test]
fn bad_data_parallel_configs_are_refused() {
    assert!(
        DataParallel::new(
            Box::new(fr_dist::SimulatedCollective::new(2).unwrap()),
            DataParallelConfig::default()
        )
        .is_err(),
        "a collective holding two ranks is refused"
    );
    let bad = DataParallelConfig {
        bucket_cap_mb: 0.0,
        ..DataParallelConfig::default()
    };
    assert!(
        matches!(bad.validate(), Err(fr_train::Error::Config { key, .. }) if key == "bucket_cap_mb")
    );
}

#[test]
fn a_non_finite_loss_on_one_rank_skips_the_step_everywhere() {
    let k = 2;
    let got = on_ranks(k, DataParallelConfig::default(), move |rank, dp| {
        let mut t = trainer().with_data_parallel(dp).unwrap();
        let before = weights(&t);
        let (x, y) = global_batch(0, k);
        let mut x = x.narrow(0, rank * B, B).unwrap();
        if rank == 1 {
            x = (x * f64::NAN).unwrap();
        }
        let o = t
            .step_tensors(&x, &y.narrow(0, rank * B, B).unwrap(), 2)
            .unwrap();
        let skipped = (o.skipped, o.loss.is_nan(), weights(&t) == before);
        // The next (finite) step goes through on both.
        let (x, y) = global_batch(1, k);
        let o = t
            .step_tensors(
                &x.narrow(0, rank * B, B).unwrap(),
                &y.narrow(0, rank * B, B).unwrap(),
                2,
            )
            .unwrap();
        (skipped, o.skipped, t.state().skipped_steps)
    });
    for (rank, (skipped, next_skipped, count)) in got.into_iter().enumerate() {
        assert_eq!(
            skipped,
            (true, true, true),
            "rank {rank} skipped with unchanged weights"
        );
        assert!(!next_skipped, "rank {rank}");
        assert_eq!(count, 1);
    }
}

/// Model-parallel Partial FC with one rank per "process" over TCP: the same loss and gradients
/// as all ranks simulated in one process.
#[test]
fn partial_fc_over_tcp_equals_simulated_ranks() {
    use fr_heads::sharded::{ShardedPartialFc, ShardedPartialFcConfig};

    let (k, b, d, c) = (3usize, 4usize, 8usize, 20usize);
    let cfg = ShardedPartialFcConfig {
        sample_rate: 0.5,
        seed: 5,
        ..Default::default()
    };
    let emb = move |rank: usize| -> Tensor {
        let v: Vec<f64> = (0..b * d)
            .map(|i| ((i as f64) * 0.91 + rank as f64 * 3.1).sin())
            .collect();
        Tensor::from_vec(v, (b, d), &Device::Cpu).unwrap()
    };
    let lab = move |rank: usize| -> Tensor {
        let v: Vec<u32> = (0..b).map(|i| ((rank * b + i) * 7 % c) as u32).collect();
        Tensor::new(v.as_slice(), &Device::Cpu).unwrap()
    };
    // The class centres `(C, D)`; each rank holds its shard's rows.
    let centres = move || -> Tensor {
        let v: Vec<f64> = (0..c * d).map(|i| ((i as f64) * 0.37).cos()).collect();
        Tensor::from_vec(v, (c, d), &Device::Cpu).unwrap()
    };
    let set_shard = move |vm: &VarMap, classes: &std::ops::Range<usize>| {
        let rows = centres().narrow(0, classes.start, classes.len()).unwrap();
        vm.data().lock().unwrap()["weight"].set(&rows).unwrap();
    };
    let ctx = fr_heads::StepContext::train(3, 0);
    let port = free_port();
    let threads: Vec<_> = (0..k)
        .map(|rank| {
            let cfg = cfg.clone();
            thread::spawn(move || {
                let col = connect(rank, k, port);
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
                let pfc = ShardedPartialFc::new(&cfg, d, c, col, &[vb]).unwrap();
                set_shard(&vm, &pfc.shards()[0].classes);
                let out = pfc.forward(&[emb(rank)], &[lab(rank)], &ctx).unwrap();
                let g = pfc.backward(&out).unwrap();
                let w = &pfc.shards()[0].weight;
                let gw = g.centres[0]
                    .get(w)
                    .cloned()
                    .unwrap_or(w.zeros_like().unwrap());
                (
                    out.loss,
                    g.embeddings[0].to_vec2::<f64>().unwrap(),
                    gw.to_vec2::<f64>().unwrap(),
                )
            })
        })
        .collect();
    let over_tcp: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    let vms: Vec<VarMap> = (0..k).map(|_| VarMap::new()).collect();
    let vbs: Vec<VarBuilder> = vms
        .iter()
        .map(|vm| VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu))
        .collect();
    let pfc = ShardedPartialFc::new(
        &cfg,
        d,
        c,
        fr_dist::SimulatedCollective::new(k).unwrap(),
        &vbs,
    )
    .unwrap();
    for (shard, vm) in pfc.shards().iter().zip(&vms) {
        set_shard(vm, &shard.classes);
    }
    let xs: Vec<Tensor> = (0..k).map(emb).collect();
    let ys: Vec<Tensor> = (0..k).map(lab).collect();
    let out = pfc.forward(&xs, &ys, &ctx).unwrap();
    let g = pfc.backward(&out).unwrap();
    for (rank, (loss, gx, gw)) in over_tcp.iter().enumerate() {
        assert_eq!(*loss, out.loss, "loss on rank {rank}");
        assert_eq!(
            gx,
            &g.embeddings[rank].to_vec2::<f64>().unwrap(),
            "dL/dx on rank {rank}"
        );
        let w = &pfc.shards()[rank].weight;
        let want = g.centres[rank]
            .get(w)
            .cloned()
            .unwrap_or(w.zeros_like().unwrap());
        assert_eq!(gw, &want.to_vec2::<f64>().unwrap(), "dL/dW on rank {rank}");
    }
    assert!(out.loss.is_finite() && out.loss > 0.0);
}

/// Model-parallel Partial FC (class centres sharded over the ranks, every centre used) under
/// the data-parallel trainer: `K` ranks train the backbone to the weights of one process with
/// the ArcFace head over the global batch, and each rank's centres to its rows of that head's.
#[test]
fn sharded_partial_fc_ranks_train_like_one_process() {
    use fr_heads::arcface::ArcFaceConfig;
    use fr_heads::sharded::{shard_range, ShardedPartialFc, ShardedPartialFcConfig};
    use std::sync::Arc;

    let k = 3;
    let mut single = trainer();
    let init = weights(&single);
    let mut want_loss = Vec::new();
    for s in 0..STEPS {
        let (x, y) = global_batch(s, k);
        want_loss.push(single.step_tensors(&x, &y, STEPS as u64).unwrap().loss);
    }
    let want = weights(&single);

    let port = free_port();
    let ranks: Vec<_> = (0..k)
        .map(|rank| {
            let init = init.clone();
            thread::spawn(move || {
                let col = Arc::new(connect(rank, k, port));
                let seeded = SeededVarMap::new(9);
                let vb = seeded.var_builder(DType::F64, &Device::Cpu);
                let fc = candle_nn::linear(IN, EMB, vb.pp("fc")).unwrap();
                let cfg = ShardedPartialFcConfig {
                    sample_rate: 1.0,
                    margin: ArcFaceConfig::default().margin_softmax(),
                    ..Default::default()
                };
                let head = ShardedPartialFc::new(&cfg, EMB, CLASSES, col.clone(), &[vb.pp("head")])
                    .unwrap();
                // The shard starts from its rows of the single process's centres.
                let rows = shard_range(CLASSES, k, rank);
                let full =
                    Tensor::from_vec(init["head.weight"].clone(), (CLASSES, EMB), &Device::Cpu)
                        .unwrap();
                seeded.varmap().data().lock().unwrap()["head.weight"]
                    .set(&full.narrow(0, rows.start, rows.len()).unwrap())
                    .unwrap();
                let dp = DataParallel::new(
                    Box::new(col),
                    DataParallelConfig {
                        reduction: GradReduction::Sum,
                        ..DataParallelConfig::default()
                    },
                )
                .unwrap()
                .with_local_variables(|n| n.starts_with("head."));
                let mut t = Trainer::new(
                    Box::new(Linear2 { fc }),
                    Box::new(head),
                    seeded.varmap().clone(),
                    trainer_config(),
                    |_| true,
                )
                .unwrap()
                .with_data_parallel(dp)
                .unwrap();
                let mut losses = Vec::new();
                for s in 0..STEPS {
                    let (x, y) = global_batch(s, k);
                    let o = t
                        .step_tensors(
                            &x.narrow(0, rank * B, B).unwrap(),
                            &y.narrow(0, rank * B, B).unwrap(),
                            STEPS as u64,
                        )
                        .unwrap();
                    assert!(!o.skipped);
                    losses.push(o.loss);
                }
                (losses, weights(&t), rows)
            })
        })
        .collect();
    let got: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    let close = |a: &[f64], b: &[f64], what: &str| {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-12, "{what}: {worst:e}");
    };
    for (rank, (losses, w, rows)) in got.iter().enumerate() {
        close(losses, &want_loss, &format!("losses on rank {rank}"));
        for name in ["fc.weight", "fc.bias"] {
            assert_eq!(w[name], got[0].1[name], "{name} identical on every rank");
            close(&w[name], &want[name], &format!("{name} on rank {rank}"));
        }
        let full = &want["head.weight"];
        close(
            &w["head.weight"],
            &full[rows.start * EMB..rows.end * EMB],
            &format!("centres of rank {rank}"),
        );
    }
    assert_ne!(
        want["head.weight"], init["head.weight"],
        "the centres trained"
    );
}

/// bf16 and f16 compression (DDP's communication hooks): half the bytes of the f32 all-reduce,
/// the mean within the half type's rounding, identical on every rank.
#[test]
fn compressed_all_reduce_halves_the_bytes() {
    use fr_train::GradCompression;
    let k = 2;
    for (compression, tol) in [
        (GradCompression::None, 0.0),
        (GradCompression::Bf16, 1e-2),
        (GradCompression::F16, 1e-3),
    ] {
        let config = DataParallelConfig {
            compression,
            ..DataParallelConfig::default()
        };
        let got = on_ranks(k, config, |rank, dp| {
            let dev = Device::Cpu;
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let w = vb
                .get_with_hints(64, "w", candle_nn::Init::Const(0.0))
                .unwrap();
            let vars = vec![("w".to_string(), Var::from_tensor(&w).unwrap())];
            let g: Vec<f32> = (0..64)
                .map(|i| ((i + 7 * rank) as f32 * 0.731).sin() * 1e3)
                .collect();
            let mut grads = candle_core::backprop::GradStore::default();
            grads.insert(
                vars[0].1.as_tensor(),
                Tensor::new(g.as_slice(), &dev).unwrap(),
            );
            let stats = dp.reduce_gradients(&mut grads, &vars).unwrap();
            let got = grads.get(vars[0].1.as_tensor()).unwrap().clone();
            assert_eq!(got.dtype(), DType::F32);
            (stats.bytes, got.to_vec1::<f32>().unwrap())
        });
        let want: Vec<f32> = (0..64)
            .map(|i| {
                let a = (i as f32 * 0.731).sin() * 1e3;
                let b = ((i + 7) as f32 * 0.731).sin() * 1e3;
                (a + b) / 2.0
            })
            .collect();
        let f32_bytes = (64 + 1) * 4;
        let expect_bytes = if compression == GradCompression::None {
            f32_bytes
        } else {
            f32_bytes / 2
        };
        for (bytes, g) in &got {
            assert_eq!(*bytes, expect_bytes, "{compression:?}");
            assert_eq!(g, &got[0].1, "{compression:?}: identical on every rank");
            let worst = g
                .iter()
                .zip(&want)
                .map(|(a, b)| ((a - b) / 1e3).abs())
                .fold(0f32, f32::max);
            assert!(worst <= tol, "{compression:?}: {worst}");
            if compression != GradCompression::None {
                assert!(worst > 0.0, "{compression:?} rounds");
            }
        }
    }
}
