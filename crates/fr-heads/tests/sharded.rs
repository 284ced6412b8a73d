//! Model-parallel Partial FC over K simulated ranks equals the single-process ArcFace head:
//! loss, the gradient with respect to every rank's embeddings and to every shard's centres
//! (f64, ≤ 1e-12), with and without sampling.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use fr_dist::{Collective, SimulatedCollective};
use fr_heads::arcface::{ArcFaceConfig, MarginMode};
use fr_heads::sharded::{shard_range, ShardedPartialFc, ShardedPartialFcConfig};
use fr_heads::{build_head, HeadConfig, StepContext};

const D: usize = 8;
const B: usize = 4;
const TOL: f64 = 1e-12;

/// A deterministic `(rows, D)` f64 matrix.
fn matrix(rows: usize, phase: f64) -> Tensor {
    let v: Vec<f64> = (0..rows * D)
        .map(|k| ((k as f64) * 1.37 + phase).sin() + 0.3 * ((k as f64) * 0.51 + phase).cos())
        .collect();
    Tensor::from_vec(v, (rows, D), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Loss, dL/dx per rank and dL/dW of the registry's `arcface` over `w` `(C', D)`, with the
/// ranks' batches concatenated.
fn reference(
    cfg: &ArcFaceConfig,
    xs: &[Tensor],
    labels: &[u32],
    w: &Tensor,
) -> (f64, Vec<Tensor>, Tensor) {
    let (c, d) = w.dims2().unwrap();
    let vm = VarMap::new();
    let mut head = build_head(
        &HeadConfig::ArcFace(cfg.clone()),
        d,
        c,
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )
    .unwrap();
    let wv = vm.data().lock().unwrap()["weight"].clone();
    wv.set(w).unwrap();
    let xv: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let x = Tensor::cat(&xv.iter().map(|v| v.as_tensor()).collect::<Vec<_>>(), 0).unwrap();
    let y = Tensor::new(labels, &Device::Cpu).unwrap();
    let out = head.forward(&x, &y, &StepContext::train(0, 0)).unwrap();
    let g = out.loss.backward().unwrap();
    let loss = out.loss.to_scalar::<f64>().unwrap();
    let gx = xv.iter().map(|v| g.get(v).unwrap().clone()).collect();
    (loss, gx, g.get(&wv).unwrap().clone())
}

struct ShardedRun {
    loss: f64,
    gx: Vec<Tensor>,
    /// dL/dW over all C classes, the shards' gradients stacked.
    gw: Tensor,
    /// Global ids of the sampled classes, ascending (the union of the per-shard samples).
    union: Vec<u32>,
    sampled_per_rank: Vec<Vec<u32>>,
}

fn sharded(
    cfg: &ShardedPartialFcConfig,
    k: usize,
    xs: &[Tensor],
    labels: &[u32],
    w: &Tensor,
    ctx: &StepContext,
) -> ShardedRun {
    let c = w.dim(0).unwrap();
    let vms: Vec<VarMap> = (0..k).map(|_| VarMap::new()).collect();
    let vbs: Vec<VarBuilder> = vms
        .iter()
        .map(|vm| VarBuilder::from_varmap(vm, DType::F64, &Device::Cpu))
        .collect();
    let col = SimulatedCollective::new(k).unwrap();
    let pfc = ShardedPartialFc::new(cfg, D, c, col, &vbs).unwrap();
    for (shard, vm) in pfc.shards().iter().zip(&vms) {
        assert_eq!(shard.classes, shard_range(c, k, shard.rank));
        let rows = w
            .narrow(0, shard.classes.start, shard.classes.len())
            .unwrap();
        vm.data().lock().unwrap()["weight"].set(&rows).unwrap();
        assert_eq!(shard.weight.dims(), &[shard.classes.len(), D]);
    }
    let ys: Vec<Tensor> = labels
        .chunks(B)
        .map(|l| Tensor::new(l, &Device::Cpu).unwrap())
        .collect();
    let out = pfc.forward(xs, &ys, ctx).unwrap();
    assert_eq!(out.batch_sizes, vec![B; k]);
    let grads = pfc.backward(&out).unwrap();
    // Every rank reports the global loss value.
    for r in &out.ranks {
        assert_eq!(r.loss.to_scalar::<f64>().unwrap(), out.loss);
        assert_eq!(r.gathered.as_tensor().dims(), &[B * k, D]);
        assert_eq!(r.logits.dims(), &[B * k, r.sample.index.len()]);
    }
    let gw: Vec<Tensor> = pfc
        .shards()
        .iter()
        .zip(&grads.centres)
        .map(|(s, g)| {
            g.get(&s.weight)
                .cloned()
                .unwrap_or_else(|| s.weight.zeros_like().unwrap())
        })
        .collect();
    let mut union = Vec::new();
    let mut sampled_per_rank = Vec::new();
    for (r, s) in out.ranks.iter().zip(pfc.shards()) {
        let global: Vec<u32> = r
            .sample
            .index
            .iter()
            .map(|&j| j + s.classes.start as u32)
            .collect();
        union.extend_from_slice(&global);
        sampled_per_rank.push(global);
    }
    assert!(union.windows(2).all(|p| p[0] < p[1]));
    ShardedRun {
        loss: out.loss,
        gx: grads.embeddings,
        gw: Tensor::cat(&gw, 0).unwrap(),
        union,
        sampled_per_rank,
    }
}

fn data(k: usize, c: usize, phase: f64) -> (Vec<Tensor>, Vec<u32>, Tensor) {
    let xs: Vec<Tensor> = (0..k).map(|r| matrix(B, phase + 10.0 * r as f64)).collect();
    let labels: Vec<u32> = (0..B * k).map(|i| ((i * 7 + 3) % c) as u32).collect();
    (xs, labels, matrix(c, phase + 100.0))
}

fn margins() -> Vec<(&'static str, ArcFaceConfig)> {
    vec![
        ("default", ArcFaceConfig::default()),
        ("insightface", ArcFaceConfig::insightface()),
        (
            "combined",
            ArcFaceConfig {
                m1: 1.35,
                margin: 0.25,
                m3: 0.1,
                scale: 32.0,
                ..Default::default()
            },
        ),
    ]
}

#[test]
fn k_ranks_equal_single_process_arcface() {
    let c = 10;
    let mut worst = [0f64; 3];
    for k in 1..=3 {
        let (xs, labels, w) = data(k, c, 0.4);
        for (name, margin) in margins() {
            let cfg = ShardedPartialFcConfig {
                sample_rate: 1.0,
                seed: 3,
                margin: margin.margin_softmax(),
            };
            let run = sharded(&cfg, k, &xs, &labels, &w, &StepContext::train(5, 0));
            assert_eq!(run.union, (0..c as u32).collect::<Vec<_>>());
            let (loss, gx, gw) = reference(&margin, &xs, &labels, &w);
            let dl = (run.loss - loss).abs();
            let dx = gx
                .iter()
                .zip(&run.gx)
                .map(|(a, b)| max_diff(a, b))
                .fold(0f64, f64::max);
            let dw = max_diff(&gw, &run.gw);
            println!("K={k} {name}: loss {loss:.6} |Δloss| {dl:.1e} |Δdx| {dx:.1e} |Δdw| {dw:.1e}");
            assert!(dl <= TOL && dx <= TOL && dw <= TOL, "K={k} {name}");
            worst = [worst[0].max(dl), worst[1].max(dx), worst[2].max(dw)];
        }
    }
    println!(
        "max differences: loss {:.1e}, dL/dx {:.1e}, dL/dW {:.1e}",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn sampled_k_ranks_equal_single_rank_over_the_union() {
    let c = 20;
    let mut worst = 0f64;
    for k in 1..=3 {
        let (xs, _, w) = data(k, c, 1.1);
        // Few distinct classes, so every shard draws negatives.
        let labels: Vec<u32> = (0..B * k).map(|i| [2u32, 9, 15][i % 3]).collect();
        for (name, margin) in margins() {
            let cfg = ShardedPartialFcConfig {
                sample_rate: 0.4,
                seed: 11,
                margin: margin.margin_softmax(),
            };
            let mut samples = Vec::new();
            for step in 0..4 {
                let ctx = StepContext::train(step, 0);
                let run = sharded(&cfg, k, &xs, &labels, &w, &ctx);
                // Deterministic per (seed, step, rank).
                let again = sharded(&cfg, k, &xs, &labels, &w, &ctx);
                assert_eq!(run.sampled_per_rank, again.sampled_per_rank);
                for (r, s) in run.sampled_per_rank.iter().enumerate() {
                    let range = shard_range(c, k, r);
                    let n = range.len();
                    let positives = labels
                        .iter()
                        .filter(|&&l| range.contains(&(l as usize)))
                        .collect::<std::collections::BTreeSet<_>>()
                        .len();
                    assert_eq!(s.len(), ((0.4 * n as f64) as usize).max(positives));
                    assert!(s.iter().all(|&j| range.contains(&(j as usize))));
                }
                for &l in &labels {
                    assert!(run.union.contains(&l), "positive {l} missing");
                }
                // The single-rank computation over the union of the per-shard samples.
                let index = Tensor::new(run.union.as_slice(), &Device::Cpu).unwrap();
                let w_sub = w.index_select(&index, 0).unwrap();
                let remapped: Vec<u32> = labels
                    .iter()
                    .map(|l| run.union.iter().position(|u| u == l).unwrap() as u32)
                    .collect();
                let (loss, gx, gw_sub) = reference(&margin, &xs, &remapped, &w_sub);
                let dl = (run.loss - loss).abs();
                let dx = gx
                    .iter()
                    .zip(&run.gx)
                    .map(|(a, b)| max_diff(a, b))
                    .fold(0f64, f64::max);
                let dw = max_diff(&gw_sub, &run.gw.index_select(&index, 0).unwrap());
                // Centres outside the sample get exactly zero gradient.
                let rest: Vec<u32> = (0..c as u32).filter(|j| !run.union.contains(j)).collect();
                let rest_t = Tensor::new(rest.as_slice(), &Device::Cpu).unwrap();
                let rest_max = run
                    .gw
                    .index_select(&rest_t, 0)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert_eq!(rest_max, 0.0);
                assert!(
                    dl <= TOL && dx <= TOL && dw <= TOL,
                    "K={k} {name} step {step}: {dl} {dx} {dw}"
                );
                worst = worst.max(dl).max(dx).max(dw);
                samples.push(run.union);
            }
            assert!(
                samples.windows(2).any(|p| p[0] != p[1]),
                "K={k}: the sample never changes with the step"
            );
        }
    }
    println!("sampled: max difference (loss, dL/dx, dL/dW) {worst:.1e}");
}

#[test]
fn eval_mode_uses_every_centre() {
    let (xs, labels, w) = data(2, 10, 0.2);
    let cfg = ShardedPartialFcConfig {
        sample_rate: 0.1,
        ..Default::default()
    };
    let eval = StepContext {
        train: false,
        ..Default::default()
    };
    let run = sharded(&cfg, 2, &xs, &labels, &w, &eval);
    assert_eq!(run.union, (0..10).collect::<Vec<_>>());
    let (loss, ..) = reference(&ArcFaceConfig::default(), &xs, &labels, &w);
    assert!((run.loss - loss).abs() <= TOL);
}

#[test]
fn large_logits_stay_finite_and_exact() {
    // s = 64 and every embedding within 1e-6 of a centre: logits near 64 on every rank (the
    // all-reduced maximum keeps exp() in range); also s = 2000, where a plain exp overflows.
    let c = 10;
    let k = 3;
    let w = matrix(c, 0.7);
    let labels: Vec<u32> = (0..B * k).map(|i| (i % c) as u32).collect();
    let xs: Vec<Tensor> = labels
        .chunks(B)
        .map(|l| {
            let idx = Tensor::new(l, &Device::Cpu).unwrap();
            (w.index_select(&idx, 0).unwrap() + 1e-6).unwrap()
        })
        .collect();
    for scale in [64.0, 2000.0] {
        for mode in [MarginMode::Exact, MarginMode::StraightThrough] {
            let margin = ArcFaceConfig {
                scale,
                margin_mode: mode,
                ..Default::default()
            };
            let cfg = ShardedPartialFcConfig {
                sample_rate: 1.0,
                seed: 0,
                margin: margin.margin_softmax(),
            };
            let run = sharded(&cfg, k, &xs, &labels, &w, &StepContext::train(0, 0));
            assert!(run.loss.is_finite());
            let (loss, gx, gw) = reference(&margin, &xs, &labels, &w);
            let rel = (run.loss - loss).abs() / loss.abs().max(1.0);
            let dx = gx
                .iter()
                .zip(&run.gx)
                .map(|(a, b)| max_diff(a, b))
                .fold(0f64, f64::max);
            let dw = max_diff(&gw, &run.gw);
            println!("s={scale} {mode:?}: loss {loss:.4} rel Δloss {rel:.1e} |Δdx| {dx:.1e} |Δdw| {dw:.1e}");
            assert!(rel <= TOL, "s={scale}: {rel}");
            // Gradients scale with s: compare relative to it.
            assert!(
                dx / scale <= TOL && dw / scale <= TOL,
                "s={scale}: {dx} {dw}"
            );
            assert!(run.gx.iter().all(|g| g
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite())));
        }
    }
}

#[test]
fn simulated_collective_reports_its_ranks() {
    // Usable as a trait object, as a backend chosen at run time would be.
    let col = SimulatedCollective::new(3).unwrap();
    let dynamic: &dyn Collective = &col;
    assert_eq!(dynamic.world_size(), 3);
    assert_eq!(dynamic.local_ranks(), vec![0, 1, 2]);
}
