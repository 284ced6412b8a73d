//! Golden tests: each head against the reference implementation's loss, logits and gradients
//! (tests/golden/*.json, inputs B = 8, D = 16, C = 10, computed in float64).
//!
//! f64: every entry within 1e-12 relative (1e-15 absolute near zero), tighter than the 1e-9 the
//! golden files suggest; measured: loss ≤ 2e-16, logits ≤ 3e-14, gradients ≤ 1.4e-13.
//! f32: within 1e-5 of each quantity's largest magnitude (measured ≤ 7e-7; s = 64 amplifies
//! f32 rounding, and the suggested f32 tolerance is 1e-4).

mod support;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use fr_heads::arcface::{ArcFaceConfig, Fallback, MarginMode};
use fr_heads::cosface::CosFaceConfig;
use fr_heads::curricularface::CurricularFaceConfig;
use fr_heads::softmax::SoftmaxConfig;
use fr_heads::{build_head, HeadConfig, StepContext};
use support::{check, flat, golden, matrix, num};

#[test]
fn softmax_without_bias_matches_pytorch() {
    check(
        "softmax_ce",
        HeadConfig::Softmax(SoftmaxConfig { bias: false }),
        "loss",
    );
}

#[test]
fn cosface_matches_insightface() {
    let cfg = CosFaceConfig::insightface();
    assert_eq!((cfg.scale, cfg.margin), (64.0, 0.4));
    check(
        "insightface_cosface",
        HeadConfig::CosFace(cfg.clone()),
        "loss",
    );
    let plain = CosFaceConfig {
        clamp_p_target: false,
        ..cfg
    };
    check(
        "insightface_cosface",
        HeadConfig::CosFace(plain),
        "loss_without_p_clamp",
    );
}

#[test]
fn am_softmax_matches_facexzoo() {
    check(
        "facexzoo_am_softmax",
        HeadConfig::CosFace(CosFaceConfig::am_softmax()),
        "loss",
    );
}

#[test]
fn arcface_straight_through_matches_insightface() {
    let cfg = ArcFaceConfig::insightface();
    assert_eq!(cfg.margin_mode, MarginMode::StraightThrough);
    check(
        "insightface_arcface",
        HeadConfig::ArcFace(cfg.clone()),
        "loss",
    );
    let plain = ArcFaceConfig {
        clamp_p_target: false,
        ..cfg
    };
    check(
        "insightface_arcface",
        HeadConfig::ArcFace(plain),
        "loss_without_p_clamp",
    );
}

#[test]
fn arcface_defaults_match_the_classic_th_mm_form() {
    // One sample (cos ≈ −0.997) takes the th/mm fallback in this case.
    let case = golden("arcface_classic");
    assert_eq!(flat(&case["outputs"]["fallback_samples"]).len(), 1);
    check(
        "arcface_classic",
        HeadConfig::ArcFace(ArcFaceConfig::default()),
        "loss",
    );
}

#[test]
fn arcface_cosine_fallback_matches_facexzoo() {
    let cfg = ArcFaceConfig {
        scale: 64.0,
        margin: 0.5,
        fallback: Fallback::Cosine,
        fallback_margin: 0.0,
        ..ArcFaceConfig::default()
    };
    check("facexzoo_arcface", HeadConfig::ArcFace(cfg), "loss");
}

/// The three ArcFace variants really differ on this case (so the checks above discriminate).
#[test]
fn arcface_variants_differ_on_the_fallback_sample() {
    let classic = num(&golden("arcface_classic")["outputs"]["loss"]);
    let facexzoo = num(&golden("facexzoo_arcface")["outputs"]["loss"]);
    let insight =
        num(&golden("insightface_arcface")["outputs"]["diagnostics"]["loss_without_p_clamp"]);
    assert!((classic - facexzoo).abs() > 1.0 && (classic - insight).abs() > 1.0);
}

#[test]
fn curricularface_matches_the_reference() {
    check(
        "curricularface",
        HeadConfig::CurricularFace(CurricularFaceConfig::default()),
        "loss",
    );
    // The curriculum parameter after the step, and the hard negatives the reference found.
    let case = golden("curricularface");
    let inputs = &case["inputs"];
    let (x, w0) = (
        matrix(&inputs["x"], DType::F64),
        matrix(&inputs["W"], DType::F64),
    );
    let labels: Vec<u32> = flat(&inputs["labels"]).iter().map(|&l| l as u32).collect();
    let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
    let vm = VarMap::new();
    let cfg = HeadConfig::CurricularFace(CurricularFaceConfig::default());
    let mut head = build_head(
        &cfg,
        16,
        10,
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )
    .unwrap();
    vm.data().lock().unwrap()["weight"].set(&w0).unwrap();
    let out = head
        .forward(&x, &labels, &StepContext::train(0, 0))
        .unwrap();
    let want_t = num(&case["outputs"]["state_after"]["t"]);
    assert!(
        (out.stats["t"] - want_t).abs() < 1e-15,
        "t {} vs {want_t}",
        out.stats["t"]
    );
    let state = head.state().unwrap();
    assert_eq!(state[0].0, "t");
    let want_hard: f64 = flat(&case["outputs"]["hard_negative_mask"]).iter().sum();
    assert!(want_hard > 0.0, "the case has hard negatives");
    assert_eq!(out.stats["hard_negatives"], want_hard);
    // Eval mode leaves t alone.
    let before = out.stats["t"];
    let eval = head.forward(&x, &labels, &StepContext::default()).unwrap();
    assert_eq!(eval.stats["t"], before);
}
