//! Every head gives a finite loss, finite logits and finite gradients when an embedding is
//! exactly parallel (cos θ = +1) or antiparallel (cos θ = −1) to its class centre, in f32 and
//! f64.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use fr_heads::arcface::{ArcFaceConfig, Fallback, MarginMode};
use fr_heads::cosface::CosFaceConfig;
use fr_heads::lh2face::{Lh2FaceConfig, ProxySet, ProxySimilarity, UamMode};
use fr_heads::normface::NormFaceConfig;
use fr_heads::softmax::SoftmaxConfig;
use fr_heads::{build_head, HeadConfig, StepContext};

const D: usize = 8;
const C: usize = 5;

fn configs() -> Vec<HeadConfig> {
    let arc = ArcFaceConfig::default();
    let lh = Lh2FaceConfig::default();
    vec![
        HeadConfig::Softmax(SoftmaxConfig::default()),
        HeadConfig::Softmax(SoftmaxConfig { bias: false }),
        HeadConfig::NormFace(NormFaceConfig::default()),
        HeadConfig::NormFace(NormFaceConfig {
            learnable_scale: false,
            ..Default::default()
        }),
        HeadConfig::CosFace(CosFaceConfig::default()),
        HeadConfig::CosFace(CosFaceConfig::insightface()),
        HeadConfig::ArcFace(arc.clone()),
        HeadConfig::ArcFace(ArcFaceConfig::insightface()),
        HeadConfig::ArcFace(ArcFaceConfig::facexzoo()),
        HeadConfig::ArcFace(ArcFaceConfig {
            easy_margin: true,
            ..arc.clone()
        }),
        HeadConfig::ArcFace(ArcFaceConfig {
            fallback: Fallback::None,
            ..arc.clone()
        }),
        HeadConfig::ArcFace(ArcFaceConfig {
            m1: 1.35,
            margin: 0.3,
            m3: 0.2,
            ..arc.clone()
        }),
        HeadConfig::ArcFace(ArcFaceConfig {
            m1: 1.35,
            margin: 0.3,
            m3: 0.2,
            margin_mode: MarginMode::StraightThrough,
            ..arc
        }),
        HeadConfig::Lh2Face(lh.clone()),
        HeadConfig::Lh2Face(Lh2FaceConfig {
            proxy_similarity: ProxySimilarity::Vmf,
            pns_proxies: ProxySet::All,
            nll_weight: 1.0,
            norm_ema: Some(0.1),
            ..lh.clone()
        }),
        HeadConfig::Lh2Face(Lh2FaceConfig {
            margin_mode: UamMode::PerSample,
            vmf_dim: 3,
            ..lh
        }),
    ]
    .into_iter()
    // Every registered head with its paper defaults.
    .chain(
        HeadConfig::NAMES
            .iter()
            .map(|n| HeadConfig::default_for(n).unwrap()),
    )
    .collect()
}

/// Set the class centres `weight` `(C, D)` when the head has them in that shape (sub-center
/// heads have `(C·K, D)`, the simplex classifier has fixed centres).
fn set_centres(vm: &VarMap, w0: &Tensor) {
    if let Some(w) = vm.data().lock().unwrap().get("weight") {
        if w.dims() == w0.dims() {
            w.set(w0).unwrap();
        }
    }
}

fn all_finite(t: &Tensor) -> bool {
    let v: Vec<f64> = t
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v.iter().all(|a| a.is_finite())
}

/// Centres along the axes (so the cosines are exactly ±1 in any precision) or random, and
/// embeddings ±k times their own centre.
fn inputs(axis_aligned: bool, dtype: DType) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let w = if axis_aligned {
        (Tensor::eye(D, DType::F64, &dev)
            .unwrap()
            .narrow(0, 0, C)
            .unwrap()
            * 0.5)
            .unwrap()
    } else {
        let v: Vec<f64> = (0..C * D)
            .map(|i| ((i * 37 % 17) as f64 - 8.0) / 10.0)
            .collect();
        Tensor::from_vec(v, (C, D), &dev).unwrap()
    };
    let labels = [0u32, 1, 2, 1, 3, 4];
    // Ordinary, antiparallel, large, small, zero-norm-adjacent and very large embeddings.
    let factors = [3.0, -2.0, 40.0, -0.05, 1e-6, 1e4];
    let rows: Vec<Tensor> = labels
        .iter()
        .zip(factors)
        .map(|(&l, f)| (w.get(l as usize).unwrap() * f).unwrap())
        .collect();
    let x = Tensor::stack(&rows, 0).unwrap();
    let labels = Tensor::new(&labels, &dev).unwrap();
    (
        x.to_dtype(dtype).unwrap(),
        w.to_dtype(dtype).unwrap(),
        labels,
    )
}

#[test]
fn loss_and_gradients_are_finite_at_cos_plus_and_minus_one() {
    for dtype in [DType::F64, DType::F32] {
        for axis_aligned in [true, false] {
            let (x0, w0, labels) = inputs(axis_aligned, dtype);
            for cfg in configs() {
                let what = format!("{cfg:?} {dtype:?} axis_aligned={axis_aligned}");
                let vm = VarMap::new();
                let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
                let mut head = build_head(&cfg, D, C, vb).unwrap();
                set_centres(&vm, &w0);
                let x = Var::from_tensor(&x0).unwrap();
                let out = head
                    .forward(x.as_tensor(), &labels, &StepContext::train(0, 0))
                    .unwrap();
                assert!(
                    all_finite(&out.loss) && all_finite(&out.logits),
                    "{what}: loss/logits"
                );
                assert!(
                    out.stats.values().all(|v| v.is_finite()),
                    "{what}: stats {:?}",
                    out.stats
                );
                let grads = out.loss.backward().unwrap();
                assert!(all_finite(grads.get(&x).unwrap()), "{what}: grad x");
                for var in vm.all_vars() {
                    let g = grads.get(&var).expect("every parameter gets a gradient");
                    assert!(all_finite(g), "{what}: parameter gradient");
                }
            }
        }
    }
}

/// Half-precision embeddings (bf16 / f16, as under autocast) into an f32 head: the head
/// computes in f32 and the loss and the embedding gradient are finite. The zero-norm-adjacent
/// rows are left out: their gradient (~1/‖x‖ = 1e6) is beyond f16's range in any framework.
#[test]
fn half_precision_embeddings_give_finite_loss_and_gradients() {
    let (x32, w0, labels) = inputs(false, DType::F32);
    let (x32, labels) = (
        x32.narrow(0, 0, 4).unwrap(),
        labels.narrow(0, 0, 4).unwrap(),
    );
    for half in [DType::BF16, DType::F16] {
        let x0 = (x32.clamp(-60.0, 60.0).unwrap()).to_dtype(half).unwrap();
        for cfg in configs() {
            let what = format!("{cfg:?} {half:?}");
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let mut head = build_head(&cfg, D, C, vb).unwrap();
            set_centres(&vm, &w0);
            let x = Var::from_tensor(&x0).unwrap();
            let out = head
                .forward(x.as_tensor(), &labels, &StepContext::train(0, 0))
                .unwrap();
            assert_eq!(out.loss.dtype(), DType::F32, "{what}");
            assert!(all_finite(&out.loss), "{what}: loss");
            let grads = out.loss.backward().unwrap();
            let g = grads
                .get(&x)
                .expect("gradient reaches the half-precision input");
            assert!(all_finite(g), "{what}: grad x");
        }
    }
}
