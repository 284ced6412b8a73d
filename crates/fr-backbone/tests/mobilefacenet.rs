//! MobileFaceNet (insightface `mbf` / `mbf_large`): state-dict names, shapes, counts,
//! gradients, and the fused kernels against candle's reference path.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::{parameter_shapes, BackboneConfig, Error, MobileFaceNet, MobileFaceNetConfig};
use fr_kernels::Kernels;
use fr_train::SeededVarMap;

fn build(cfg: &MobileFaceNetConfig, dtype: DType, seed: u64) -> (MobileFaceNet, VarMap) {
    let varmap = VarMap::new();
    let net = MobileFaceNet::new(
        cfg,
        SeededVarMap::with_varmap(varmap.clone(), seed).var_builder(dtype, &Device::Cpu),
    )
    .unwrap();
    (net, varmap)
}

fn state_dict(cfg: MobileFaceNetConfig) -> BTreeMap<String, Vec<usize>> {
    parameter_shapes(&BackboneConfig::Mobilefacenet(cfg))
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect()
}

/// A small network for the numerical tests: 32×32 input (2×2 GDC), scale 1.
fn small() -> MobileFaceNetConfig {
    MobileFaceNetConfig {
        blocks: [2, 1, 1, 1],
        scale: 1,
        embedding_size: 16,
        input_size: 32,
        kernels: Kernels::Auto,
    }
}

#[test]
fn mbf_state_dict_names_are_insightfaces() {
    let sd = state_dict(MobileFaceNetConfig::mbf());
    // Keys and shapes of arcface_torch's get_mbf(False, 512).state_dict().
    for (key, shape) in [
        ("layers.0.layers.0.weight", vec![128, 3, 3, 3]),
        ("layers.0.layers.2.weight", vec![128]),
        // blocks[0] = 1: one ConvBlock with 64 groups (2 channels each), not depthwise.
        ("layers.1.layers.0.weight", vec![128, 2, 3, 3]),
        ("layers.2.layers.0.layers.0.weight", vec![128, 128, 1, 1]),
        ("layers.2.layers.1.layers.0.weight", vec![128, 1, 3, 3]),
        ("layers.2.layers.2.layers.1.running_var", vec![128]),
        (
            "layers.3.layers.3.layers.2.layers.0.weight",
            vec![128, 128, 1, 1],
        ),
        ("layers.4.layers.0.layers.0.weight", vec![256, 128, 1, 1]),
        ("layers.4.layers.2.layers.0.weight", vec![256, 256, 1, 1]),
        (
            "layers.5.layers.5.layers.1.layers.0.weight",
            vec![256, 1, 3, 3],
        ),
        ("layers.6.layers.1.layers.0.weight", vec![512, 1, 3, 3]),
        ("layers.7.layers.1.layers.1.layers.2.weight", vec![256]),
        ("conv_sep.layers.0.weight", vec![512, 256, 1, 1]),
        ("conv_sep.layers.2.weight", vec![512]),
        ("features.layers.0.layers.0.weight", vec![512, 1, 7, 7]),
        ("features.layers.0.layers.1.bias", vec![512]),
        ("features.layers.2.weight", vec![512, 512]),
        ("features.layers.3.running_mean", vec![512]),
    ] {
        assert_eq!(sd.get(key), Some(&shape), "{key}");
    }
    // ConvBlock 6 tensors, LinearBlock 5, DepthWise 17: 6 + 6 + 3·17 + 12·17 + 6 + 5 + 1 + 4.
    assert_eq!(sd.len(), 283);
    assert!(!sd.contains_key("layers.8.layers.0.weight"));

    let large = state_dict(MobileFaceNetConfig::mbf_large());
    // blocks[0] = 2: a Residual of DepthWise blocks with expansion 128 on 256 channels.
    assert_eq!(
        large.get("layers.1.layers.1.layers.0.layers.0.weight"),
        Some(&vec![128, 256, 1, 1])
    );
    assert_eq!(
        large.get("layers.7.layers.3.layers.2.layers.0.weight"),
        Some(&vec![512, 256, 1, 1])
    );
    assert_eq!(
        large.get("conv_sep.layers.0.weight"),
        Some(&vec![512, 512, 1, 1])
    );
}

#[test]
fn counts_match_arcface_torch() {
    // arcface_torch lists mbf as "mobilefacenet-0.45G" (ptflops MACs at 112x112).
    let mbf = MobileFaceNetConfig::mbf().complexity().unwrap();
    assert_eq!((mbf.ptflops_macs() as f64 / 1e7).round() / 100.0, 0.45);
    // PyTorch's parameter count of get_mbf(False, 512), pinned; equal to the module walk.
    assert_eq!(mbf.params, 2_059_520);
    let large = MobileFaceNetConfig::mbf_large().complexity().unwrap();
    assert_eq!(large.params, 6_314_880);
    assert_eq!(
        (large.ptflops_macs() as f64 / 1e7).round() / 100.0,
        1.84,
        "{large:?}"
    );
    for cfg in [
        MobileFaceNetConfig::mbf(),
        MobileFaceNetConfig::mbf_large(),
        small(),
        MobileFaceNetConfig::mbf().with_embedding_size(128),
    ] {
        let walked: u64 = parameter_shapes(&BackboneConfig::Mobilefacenet(cfg.clone()))
            .unwrap()
            .iter()
            .filter(|p| p.is_parameter())
            .map(|p| p.numel())
            .sum();
        assert_eq!(cfg.complexity().unwrap().params, walked, "{cfg:?}");
    }
}

#[test]
fn mbf_forward_shapes_at_112() {
    let (net, _) = build(
        &MobileFaceNetConfig::mbf().with_embedding_size(64),
        DType::F32,
        1,
    );
    let x = Tensor::randn(0f32, 1f32, (2, 3, 112, 112), &Device::Cpu).unwrap();
    let y = fr_kernels::no_grad(|| net.forward_t(&x, false)).unwrap();
    assert_eq!(y.dims(), &[2, 64]);
    let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    // The wrong input size is an error naming the expected shape.
    let bad = Tensor::zeros((1, 3, 96, 96), DType::F32, &Device::Cpu).unwrap();
    let err = net.forward_t(&bad, false).unwrap_err().to_string();
    assert!(err.contains("112"), "{err}");
}

#[test]
fn every_trainable_parameter_gets_a_gradient() {
    let (net, varmap) = build(&small(), DType::F32, 3);
    let x = Tensor::randn(0f32, 1f32, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let y = net.forward_t(&x, true).unwrap();
    assert_eq!(y.dims(), &[4, 16]);
    let target = Tensor::randn(0f32, 1f32, (4, 16), &Device::Cpu).unwrap();
    let loss = (&y * &target).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let trained = common::assert_trainable_gradients(&varmap, &grads, MobileFaceNet::is_trainable);
    // The final BatchNorm1d trains its scale (unlike IResNet's `features.weight`).
    assert!(MobileFaceNet::is_trainable("features.layers.3.weight"));
    assert!(trained > 50);
}

#[test]
fn fused_kernels_equal_the_candle_reference_path() {
    // f64, so that only real differences show. Also covers the grouped (non-depthwise)
    // ConvBlock of blocks[0] = 1.
    let cfg = MobileFaceNetConfig {
        blocks: [1, 1, 1, 1],
        scale: 1,
        ..small()
    };
    let x = Tensor::randn(0f64, 1f64, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let run = |kernels: Kernels| {
        let (net, varmap) = build(&cfg.clone().with_kernels(kernels), DType::F64, 7);
        let y = net.forward_t(&x, true).unwrap();
        let grads = (&y * &y).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(varmap.data().lock().unwrap()["layers.1.layers.0.weight"].as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eval = fr_kernels::no_grad(|| net.forward_t(&x, false)).unwrap();
        let eval_graph = net.forward_t(&x, false).unwrap();
        let d = (&eval - &eval_graph)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-9, "{kernels:?}: fused eval differs by {d}");
        let y: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        let e: Vec<f64> = eval.flatten_all().unwrap().to_vec1().unwrap();
        (y, g, e)
    };
    let (fused, candle) = (run(Kernels::Fused), run(Kernels::Candle));
    common::assert_max_abs_diff_below(
        &[
            (&fused.0, &candle.0, "train output"),
            (&fused.1, &candle.1, "grouped conv gradient"),
            (&fused.2, &candle.2, "eval output"),
        ],
        1e-8,
    );
}

#[test]
fn bad_configs_and_toml() {
    let err = MobileFaceNetConfig::mbf().with_input_size(100).validate();
    assert!(matches!(err, Err(Error::Config { ref key, .. }) if key == "input_size"));
    let cfg = MobileFaceNetConfig {
        blocks: [1, 0, 1, 1],
        ..MobileFaceNetConfig::mbf()
    };
    assert!(matches!(cfg.validate(), Err(Error::Config { ref key, .. }) if key == "blocks"));
    let cfg: BackboneConfig =
        toml::from_str("type = \"mobilefacenet\"\nembedding_size = 128").unwrap();
    assert_eq!(
        cfg,
        BackboneConfig::Mobilefacenet(MobileFaceNetConfig::mbf().with_embedding_size(128))
    );
    assert_eq!(
        BackboneConfig::named("mbf_large"),
        Some(BackboneConfig::Mobilefacenet(
            MobileFaceNetConfig::mbf_large()
        ))
    );
    assert!(toml::from_str::<BackboneConfig>("type = \"mobilefacenet\"\nscal = 2").is_err());
}
