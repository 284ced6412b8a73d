//! Golden tests and properties of the adaptive and multiplicative angular heads: AdaFace and
//! MagFace against their reference implementations (tests/golden/adaface_*.json,
//! tests/golden/magface*.json, inputs B = 8, D = 16, C = 10, float64), and properties of
//! sub-center ArcFace, L-Softmax, SphereFace and MagFace.

mod support;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use fr_heads::adaface::AdaFaceConfig;
use fr_heads::arcface::{ArcFaceConfig, Fallback};
use fr_heads::cosface::CosFaceConfig;
use fr_heads::lsoftmax::LSoftmaxConfig;
use fr_heads::magface::MagFaceConfig;
use fr_heads::sphereface::SphereFaceConfig;
use fr_heads::subcenter::SubCenterArcFaceConfig;
use fr_heads::{build_head, HeadConfig, StepContext};
use proptest::prelude::*;
use support::{check, flat, golden, matrix, num};

/// Build `cfg` for the golden case `name`, load its class centres, run one training step in
/// f64 and return the head's statistics after it.
fn golden_stats(name: &str, cfg: &HeadConfig) -> std::collections::BTreeMap<String, f64> {
    let case = golden(name);
    let inputs = &case["inputs"];
    let (x, w0) = (
        matrix(&inputs["x"], DType::F64),
        matrix(&inputs["W"], DType::F64),
    );
    let labels: Vec<u32> = flat(&inputs["labels"]).iter().map(|&l| l as u32).collect();
    let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    let vm = VarMap::new();
    let mut head = build_head(
        cfg,
        16,
        10,
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )
    .unwrap();
    vm.data().lock().unwrap()["weight"].set(&w0).unwrap();
    let out = head
        .forward(&x, &labels, &StepContext::train(0, 0))
        .unwrap();
    let mut stats = out.stats;
    for (k, v) in head.state().unwrap() {
        let v: f64 = v.to_dtype(DType::F64).unwrap().to_scalar().unwrap();
        stats.insert(format!("state.{k}"), v);
    }
    stats
}

fn close(got: f64, want: f64, rtol: f64, what: &str) {
    let e = (got - want).abs() / want.abs().max(1e-300);
    assert!(e <= rtol, "{what}: {got} vs {want} (relative error {e:e})");
}

fn adaface(t_alpha: f64) -> HeadConfig {
    HeadConfig::AdaFace(AdaFaceConfig {
        t_alpha,
        ..AdaFaceConfig::default()
    })
}

#[test]
fn adaface_matches_the_reference() {
    for (name, t_alpha) in [("adaface_talpha_0.01", 0.01), ("adaface_talpha_1.0", 1.0)] {
        let case = golden(name);
        assert_eq!(num(&case["settings"]["t_alpha"]), t_alpha);
        check(name, adaface(t_alpha), "loss");
        let stats = golden_stats(name, &adaface(t_alpha));
        let after = &case["outputs"]["state_after"];
        for key in ["batch_mean", "batch_std"] {
            let want = num(&after[key]);
            close(stats[&format!("state.{key}")], want, 1e-13, key);
            close(stats[key], want, 1e-13, key);
        }
    }
    // The paper's default is the slow EMA.
    assert_eq!(AdaFaceConfig::default().t_alpha, 0.01);
}

/// With α = 1 one sample's angle is clipped at π − ε (its gradient through the angle is 0);
/// the check above covers it.
#[test]
fn adaface_golden_case_exercises_the_angle_clip() {
    let case = golden("adaface_talpha_1.0");
    let clipped = flat(&case["outputs"]["diagnostics"]["theta_clip_samples"]);
    assert_eq!(clipped, vec![3.0]);
}

fn magface(easy_margin: bool) -> HeadConfig {
    HeadConfig::MagFace(MagFaceConfig {
        easy_margin,
        ..MagFaceConfig::default()
    })
}

#[test]
fn magface_matches_the_reference() {
    for (name, easy_margin) in [("magface", true), ("magface_hard_margin", false)] {
        let case = golden(name);
        assert_eq!(case["settings"]["easy_margin"].as_bool(), Some(easy_margin));
        check(name, magface(easy_margin), "loss");
        let stats = golden_stats(name, &magface(easy_margin));
        let out = &case["outputs"];
        for key in ["loss_id", "loss_g"] {
            close(stats[key], num(&out[key]), 1e-13, key);
        }
        let norms = flat(&out["x_norm_clamped"]);
        let margins = flat(&out["margin"]);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        close(stats["norm_mean"], mean(&norms), 1e-13, "norm_mean");
        close(stats["margin_mean"], mean(&margins), 1e-13, "margin_mean");
        let cfg = MagFaceConfig::default();
        for (a, m) in norms.iter().zip(&margins) {
            close(cfg.margin_at(*a), *m, 1e-14, "margin_at");
        }
    }
    // The defaults are the easy-margin reference, and the two cases really differ.
    assert!(MagFaceConfig::default().easy_margin);
    let (easy, hard) = (
        num(&golden("magface")["outputs"]["loss"]),
        num(&golden("magface_hard_margin")["outputs"]["loss"]),
    );
    assert!((easy - hard).abs() > 1.0);
}

// ---------------------------------------------------------------------------------------
// Properties (B = 4, D = 5, C = 3, f64).

const B: usize = 4;
const DIM: usize = 5;
const C: usize = 3;

/// Loss, logits, dL/dx and dL/dW of one training step of `cfg` at step `step`.
struct Step {
    loss: f64,
    logits: Vec<f64>,
    grad_x: Vec<f64>,
    grad_w: Vec<f64>,
}

fn step(cfg: &HeadConfig, x: &[f64], w: &[f64], labels: &[u32], step: u64) -> Step {
    let dev = Device::Cpu;
    let x0 = Tensor::from_vec(x.to_vec(), (B, DIM), &dev).unwrap();
    let w0 = Tensor::from_vec(w.to_vec(), (w.len() / DIM, DIM), &dev).unwrap();
    let labels = Tensor::new(labels, &dev).unwrap();
    let vm = VarMap::new();
    let mut head = build_head(cfg, DIM, C, VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
    let wv = vm.data().lock().unwrap()["weight"].clone();
    wv.set(&w0).unwrap();
    let xv = Var::from_tensor(&x0).unwrap();
    let out = head
        .forward(xv.as_tensor(), &labels, &StepContext::train(step, 0))
        .unwrap();
    let g = out.loss.backward().unwrap();
    let v = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
    Step {
        loss: out.loss.to_scalar().unwrap(),
        logits: v(&out.logits),
        grad_x: v(g.get(&xv).unwrap()),
        grad_w: v(g.get(&wv).unwrap()),
    }
}

/// Every entry within `tol` (relative to the entry, absolute below 1).
fn near(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= tol * y.abs().max(1.0))
}

fn same_step(a: &Step, b: &Step, tol: f64) -> bool {
    near(&[a.loss], &[b.loss], tol)
        && near(&a.logits, &b.logits, tol)
        && near(&a.grad_x, &b.grad_x, tol)
        && near(&a.grad_w, &b.grad_w, tol)
}

fn x_strategy() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-3.0f64..3.0, B * DIM)
}

fn w_strategy(rows: usize) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-1.0f64..1.0, rows * DIM)
}

fn labels_strategy() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(0u32..C as u32, B)
}

/// Rows of `w` scaled to unit length.
fn unit_rows(w: &[f64]) -> Vec<f64> {
    w.chunks(DIM)
        .flat_map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
            r.iter().map(move |v| v / n).collect::<Vec<_>>()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Sub-center ArcFace with K = 1 is ArcFace, bit for bit.
    #[test]
    fn subcenter_with_one_center_is_arcface(
        x in x_strategy(), w in w_strategy(C), y in labels_strategy(),
        margin in 0.0f64..1.0, easy_margin in any::<bool>(),
    ) {
        let arc = ArcFaceConfig { margin, easy_margin, ..ArcFaceConfig::default() };
        let sub = HeadConfig::SubCenterArcFace(SubCenterArcFaceConfig {
            sub_centers: 1,
            arcface: arc.clone(),
            ..Default::default()
        });
        prop_assert!(same_step(&step(&sub, &x, &w, &y, 0), &step(&HeadConfig::ArcFace(arc), &x, &w, &y, 0), 0.0));
    }

    /// Sub-center ArcFace's class cosine is the best sub-centre: the logits of K = 3 equal
    /// those of ArcFace over the winning rows.
    #[test]
    fn subcenter_logits_use_the_best_sub_center(
        x in x_strategy(), w in w_strategy(3 * C), y in labels_strategy(),
    ) {
        let sub = HeadConfig::SubCenterArcFace(SubCenterArcFaceConfig::default());
        let got = step(&sub, &x, &w, &y, 0);
        // Pick, per sample and class, the sub-centre with the largest cosine; with the
        // target's winner as class weight ArcFace gives the same target logit.
        let wu = unit_rows(&w);
        for i in 0..B {
            let xi = &x[i * DIM..(i + 1) * DIM];
            let xn = xi.iter().map(|v| v * v).sum::<f64>().sqrt();
            for j in 0..C {
                let best = (0..3)
                    .map(|k| {
                        let r = &wu[(j * 3 + k) * DIM..(j * 3 + k + 1) * DIM];
                        r.iter().zip(xi).map(|(a, b)| a * b).sum::<f64>() / xn
                    })
                    .fold(f64::NEG_INFINITY, f64::max)
                    .clamp(-1.0 + 1e-7, 1.0 - 1e-7);
                if j != y[i] as usize {
                    prop_assert!((got.logits[i * C + j] - 64.0 * best).abs() < 1e-10);
                } else {
                    let arc = ArcFaceConfig::default();
                    let want = if best > arc.threshold() {
                        (best.acos() + 0.5).cos()
                    } else {
                        best - (std::f64::consts::PI - 0.5).sin() * 0.5
                    };
                    prop_assert!((got.logits[i * C + j] - 64.0 * want).abs() < 1e-9);
                }
            }
        }
    }

    /// L-Softmax with m = 1 is the plain bias-free softmax: logits x·Wᵀ at any λ.
    #[test]
    fn lsoftmax_m1_is_plain_softmax(
        x in x_strategy(), w in w_strategy(C), y in labels_strategy(), s in 0u64..200_000,
    ) {
        let cfg = HeadConfig::LSoftmax(LSoftmaxConfig { margin: 1, ..Default::default() });
        let got = step(&cfg, &x, &w, &y, s);
        for i in 0..B {
            for j in 0..C {
                let dot: f64 = (0..DIM).map(|d| x[i * DIM + d] * w[j * DIM + d]).sum();
                prop_assert!((got.logits[i * C + j] - dot).abs() < 1e-12 * dot.abs().max(1.0));
            }
        }
    }

    /// Without annealing (λ = 0) the L-Softmax target logit ‖w‖‖x‖ψ(θ) never exceeds w·x
    /// (ψ ≤ cos θ), and the other logits are w·x.
    #[test]
    fn lsoftmax_margin_only_lowers_the_target(
        x in x_strategy(), w in w_strategy(C), y in labels_strategy(), m in 1u32..=4,
    ) {
        let cfg = HeadConfig::LSoftmax(LSoftmaxConfig {
            margin: m, base: 0.0, ..Default::default()
        });
        let got = step(&cfg, &x, &w, &y, 0);
        for i in 0..B {
            for j in 0..C {
                let dot: f64 = (0..DIM).map(|d| x[i * DIM + d] * w[j * DIM + d]).sum();
                let z = got.logits[i * C + j];
                if j == y[i] as usize {
                    prop_assert!(z <= dot + 1e-9, "m={} target {} > {}", m, z, dot);
                } else {
                    prop_assert!((z - dot).abs() < 1e-12 * dot.abs().max(1.0));
                }
            }
        }
    }

    /// With unit class weights SphereFace is L-Softmax with the same m and λ (value and
    /// gradients).
    #[test]
    fn sphereface_is_lsoftmax_on_unit_weights(
        x in x_strategy(), w in w_strategy(C), y in labels_strategy(), m in 1u32..=4,
        s in 0u64..100,
    ) {
        let w = unit_rows(&w);
        let sphere = SphereFaceConfig { margin: m, ..Default::default() };
        let lsoft = LSoftmaxConfig {
            margin: m,
            base: sphere.base,
            gamma: sphere.gamma,
            power: sphere.power,
            lambda_min: sphere.lambda_min,
            ..Default::default()
        };
        let a = step(&HeadConfig::SphereFace(sphere), &x, &w, &y, s);
        let b = step(&HeadConfig::LSoftmax(lsoft), &x, &w, &y, s);
        prop_assert!(same_step(&a, &b, 1e-10));
    }

    /// MagFace with a constant margin (l_m = u_m = m) and λ_g = 0 is ArcFace with margin m:
    /// easy margin ↔ easy margin, hard margin ↔ the classic th/mm fallback.
    #[test]
    fn magface_with_constant_margin_is_arcface(
        x in x_strategy(), w in w_strategy(C), y in labels_strategy(),
        margin in 0.05f64..1.2, easy_margin in any::<bool>(),
    ) {
        let mag = HeadConfig::MagFace(MagFaceConfig {
            l_margin: margin,
            u_margin: margin,
            lambda_g: 0.0,
            easy_margin,
            ..Default::default()
        });
        let arc = HeadConfig::ArcFace(ArcFaceConfig {
            margin,
            easy_margin,
            fallback: Fallback::Classic,
            ..Default::default()
        });
        prop_assert!(same_step(&step(&mag, &x, &w, &y, 0), &step(&arc, &x, &w, &y, 0), 1e-12));
    }

    /// AdaFace with m = 0 is the scaled cosine softmax (CosFace with m = 0, same clamp).
    #[test]
    fn adaface_without_margin_is_normface(
        x in x_strategy(), w in w_strategy(C), y in labels_strategy(),
    ) {
        let ada = HeadConfig::AdaFace(AdaFaceConfig { margin: 0.0, ..Default::default() });
        let cos = HeadConfig::CosFace(CosFaceConfig { margin: 0.0, cos_eps: 1e-3, ..Default::default() });
        prop_assert!(same_step(&step(&ada, &x, &w, &y, 0), &step(&cos, &x, &w, &y, 0), 1e-10));
    }
}
