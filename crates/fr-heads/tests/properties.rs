//! Properties across heads: every margin head with its margin set to 0 is NormFace with a
//! fixed scale, in loss, logits and both gradients (random shapes, embeddings and centres).

mod support;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use fr_heads::arcface::{ArcFaceConfig, MarginMode};
use fr_heads::cosface::CosFaceConfig;
use fr_heads::magface::MagFaceConfig;
use fr_heads::normface::NormFaceConfig;
use fr_heads::partial_fc::PartialFcConfig;
use fr_heads::subcenter::SubCenterArcFaceConfig;
use fr_heads::{build_head, HeadConfig, StepContext};
use proptest::prelude::*;
use support::{max_err, values};

/// Loss, logits, dL/dx and dL/dW of one f64 step.
fn step(cfg: &HeadConfig, x: &Tensor, w: &Tensor, y: &Tensor) -> [Vec<f64>; 4] {
    let (c, d) = w.dims2().unwrap();
    let vm = VarMap::new();
    let mut head = build_head(
        cfg,
        d,
        c,
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )
    .unwrap();
    let wv = vm.data().lock().unwrap()["weight"].clone();
    wv.set(w).unwrap();
    let xv = Var::from_tensor(x).unwrap();
    let out = head
        .forward(xv.as_tensor(), y, &StepContext::train(0, 0))
        .unwrap();
    let g = out.loss.backward().unwrap();
    [
        values(&out.loss),
        values(&out.logits),
        values(g.get(&xv).unwrap()),
        values(g.get(&wv).unwrap()),
    ]
}

fn case() -> impl Strategy<Value = (Tensor, Tensor, Tensor, f64)> {
    (2usize..6, 2usize..6, 2usize..7, 1.0f64..64.0).prop_flat_map(|(b, d, c, s)| {
        (
            prop::collection::vec(-3.0f64..3.0, b * d),
            prop::collection::vec(-1.0f64..1.0, c * d),
            prop::collection::vec(0u32..c as u32, b),
        )
            .prop_map(move |(x, w, y)| {
                (
                    Tensor::from_vec(x, (b, d), &Device::Cpu).unwrap(),
                    Tensor::from_vec(w, (c, d), &Device::Cpu).unwrap(),
                    Tensor::new(y.as_slice(), &Device::Cpu).unwrap(),
                    s,
                )
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn zero_margin_heads_equal_normface((x, w, y, s) in case()) {
        let normface = HeadConfig::NormFace(NormFaceConfig {
            scale: s,
            learnable_scale: false,
            ..Default::default()
        });
        let arc = ArcFaceConfig { scale: s, margin: 0.0, ..Default::default() };
        let zero_margin = [
            HeadConfig::CosFace(CosFaceConfig { scale: s, margin: 0.0, ..Default::default() }),
            HeadConfig::ArcFace(arc.clone()),
            HeadConfig::ArcFace(ArcFaceConfig {
                margin_mode: MarginMode::StraightThrough,
                ..arc.clone()
            }),
            HeadConfig::SubCenterArcFace(SubCenterArcFaceConfig {
                sub_centers: 1,
                arcface: arc.clone(),
                ..Default::default()
            }),
            HeadConfig::MagFace(MagFaceConfig {
                scale: s,
                l_margin: 0.0,
                u_margin: 0.0,
                lambda_g: 0.0,
                ..Default::default()
            }),
            HeadConfig::PartialFc(PartialFcConfig {
                sample_rate: 1.0,
                seed: 0,
                head: Box::new(HeadConfig::ArcFace(arc)),
            }),
        ];
        let want = step(&normface, &x, &w, &y);
        for cfg in &zero_margin {
            let got = step(cfg, &x, &w, &y);
            for (what, (g, v)) in ["loss", "logits", "grad_x", "grad_W"].iter().zip(got.iter().zip(&want)) {
                let e = max_err(g, v, 1.0);
                prop_assert!(e < 1e-12, "{} {}: {:e}", cfg.name(), what, e);
            }
        }
    }
}
