//! SphereNet-20 / 64 (SphereFace's CNN): names, shapes, counts, gradients.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::{parameter_shapes, BackboneConfig, Error, SphereNet, SphereNetConfig};
use fr_train::SeededVarMap;

fn state_dict(cfg: SphereNetConfig) -> BTreeMap<String, Vec<usize>> {
    parameter_shapes(&BackboneConfig::Spherenet(cfg))
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect()
}

#[test]
fn sphere20_names_and_counts() {
    let sd = state_dict(SphereNetConfig::sphere20());
    for (key, shape) in [
        ("conv1_1.weight", vec![64, 3, 3, 3]),
        ("relu1_1.weight", vec![64]),
        ("conv1_3.bias", vec![64]),
        ("conv2_5.weight", vec![128, 128, 3, 3]),
        ("conv3_9.weight", vec![256, 256, 3, 3]),
        ("relu4_3.weight", vec![512]),
        ("fc5.weight", vec![512, 512 * 7 * 6]),
        ("fc5.bias", vec![512]),
    ] {
        assert_eq!(sd.get(key), Some(&shape), "{key}");
    }
    // 20 convolutions (weight, bias, PReLU: the "20" of SphereNet-20) + fc5 (weight, bias).
    assert_eq!(sd.len(), 20 * 3 + 2);
    assert!(!sd.contains_key("conv3_10.weight"));
    let sd64 = state_dict(SphereNetConfig::sphere64());
    assert_eq!(sd64.len(), 64 * 3 + 2);
    assert_eq!(sd64.get("conv3_33.weight"), Some(&vec![256, 256, 3, 3]));
    assert_eq!(sd64.get("conv4_7.weight"), Some(&vec![512, 512, 3, 3]));

    // Counted by hand from the layer list: Σ 9·Cin·Cout + Cout (conv) + Cout (PReLU), plus
    // 21504·512 + 512 (fc5).
    let conv = |cin: u64, cout: u64| 9 * cin * cout + 2 * cout;
    let by_hand = conv(3, 64)
        + 2 * conv(64, 64)
        + conv(64, 128)
        + 4 * conv(128, 128)
        + conv(128, 256)
        + 8 * conv(256, 256)
        + conv(256, 512)
        + 2 * conv(512, 512)
        + 21504 * 512
        + 512;
    let c20 = SphereNetConfig::sphere20().complexity().unwrap();
    assert_eq!(c20.params, by_hand);
    assert_eq!(
        c20.params,
        sd.values()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum::<u64>()
    );
    let c64 = SphereNetConfig::sphere64().complexity().unwrap();
    assert_eq!(
        c64.params,
        sd64.values()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum::<u64>()
    );
    // As stated in the module documentation: 22.7 M / 48.2 M, 1.75 G / 6.12 G.
    let r = |x: u64, unit: f64, digits: f64| (x as f64 / unit * digits).round() / digits;
    assert_eq!(
        (r(c20.params, 1e6, 10.0), r(c20.ptflops_macs(), 1e9, 100.0)),
        (22.7, 1.75)
    );
    assert_eq!(
        (r(c64.params, 1e6, 10.0), r(c64.ptflops_macs(), 1e9, 100.0)),
        (48.2, 6.12)
    );
}

#[test]
fn forward_shapes_and_gradients() {
    let cfg = SphereNetConfig {
        widths: [4, 8, 8, 16],
        embedding_size: 12,
        input_size: [32, 24],
        ..SphereNetConfig::sphere20()
    };
    let varmap = VarMap::new();
    let net = SphereNet::new(
        &cfg,
        SeededVarMap::with_varmap(varmap.clone(), 1).var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1f32, (3, 3, 32, 24), &Device::Cpu).unwrap();
    let y = net.forward_t(&x, true).unwrap();
    assert_eq!(y.dims(), &[3, 12]);
    // No BatchNorm: train and eval agree, also under no_grad.
    let e = fr_kernels::no_grad(|| net.forward_t(&x, false)).unwrap();
    let d = (&y - &e).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    // No BatchNorm: every variable trains.
    let trained = common::assert_trainable_gradients(&varmap, &grads, SphereNet::is_trainable);
    assert_eq!(trained, varmap.all_vars().len());
    // Square 112 input is not SphereFace's 112×96: rejected with the expected shape.
    let bad = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let err = net.forward_t(&bad, false).unwrap_err().to_string();
    assert!(err.contains("32, 24"), "{err}");
}

#[test]
fn config_from_toml_and_names() {
    let cfg: BackboneConfig =
        toml::from_str("type = \"spherenet\"\nunits = [3, 8, 16, 3]").unwrap();
    assert_eq!(cfg, BackboneConfig::named("sphere64").unwrap());
    assert_eq!(cfg.input_shape(), (112, 96));
    let bad = SphereNetConfig::sphere20()
        .with_input_size(8, 96)
        .validate();
    assert!(matches!(bad, Err(Error::Config { ref key, .. }) if key == "input_size"));
}
