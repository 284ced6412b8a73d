//! PocketNetS / PocketNetM: published parameter counts, state-dict names, shapes, gradients,
//! and the fused kernels against candle's path (pooling is checked in the module's unit test).

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::{parameter_shapes, BackboneConfig, Error, PocketNet, PocketNetConfig};
use fr_kernels::Kernels;
use fr_train::SeededVarMap;

fn build(cfg: &PocketNetConfig, dtype: DType, seed: u64) -> (PocketNet, VarMap) {
    let varmap = VarMap::new();
    let net = PocketNet::new(
        cfg,
        SeededVarMap::with_varmap(varmap.clone(), seed).var_builder(dtype, &Device::Cpu),
    )
    .unwrap();
    (net, varmap)
}

fn state_dict(cfg: PocketNetConfig) -> BTreeMap<String, Vec<usize>> {
    parameter_shapes(&BackboneConfig::Pocketnet(cfg))
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.shape))
        .collect()
}

fn walked_params(cfg: &PocketNetConfig) -> u64 {
    parameter_shapes(&BackboneConfig::Pocketnet(cfg.clone()))
        .unwrap()
        .iter()
        .filter(|p| p.is_parameter())
        .map(|p| p.numel())
        .sum()
}

/// Within 1% of the paper's parameter count (in millions, two decimals).
fn assert_published(name: &str, cfg: PocketNetConfig, published_m: f64) -> u64 {
    let params = cfg.complexity().unwrap().params;
    let rel = (params as f64 / 1e6 - published_m).abs() / published_m;
    assert!(
        rel <= 0.01,
        "{name}: {params} parameters vs published {published_m} M ({:.2}% off)",
        rel * 100.0
    );
    assert_eq!(params, walked_params(&cfg), "{name}: counter vs module");
    params
}

#[test]
fn pocketnet_s_128_has_the_published_parameter_count() {
    assert_published("PocketNetS-128", PocketNetConfig::s(), 0.92);
}

#[test]
fn pocketnet_s_256_has_the_published_parameter_count() {
    assert_published(
        "PocketNetS-256",
        PocketNetConfig::s().with_embedding_size(256),
        0.99,
    );
}

#[test]
fn pocketnet_m_128_has_the_published_parameter_count() {
    assert_published("PocketNetM-128", PocketNetConfig::m(), 1.68);
}

#[test]
fn pocketnet_m_256_has_the_published_parameter_count() {
    assert_published(
        "PocketNetM-256",
        PocketNetConfig::m().with_embedding_size(256),
        1.75,
    );
}

#[test]
fn counter_equals_the_built_module_for_other_configs() {
    for cfg in [
        PocketNetConfig::s().with_embedding_size(512),
        PocketNetConfig::m().with_input_size(64),
        PocketNetConfig::s()
            .with_input_size(32)
            .with_embedding_size(8),
    ] {
        assert_eq!(
            cfg.complexity().unwrap().params,
            walked_params(&cfg),
            "{cfg:?}"
        );
    }
}

#[test]
fn state_dict_names_are_the_references() {
    let sd = state_dict(PocketNetConfig::s());
    // Keys and shapes of AugmentCNN(C=16, n_layers=18, genotype softmax_casia, emb=128).
    for (key, shape) in [
        ("stem.0.weight", vec![64, 3, 3, 3]),
        ("stem.1.running_var", vec![64]),
        ("cells.0.preproc0.net.0.weight", vec![64]),
        ("cells.0.preproc0.net.1.weight", vec![64, 1, 1, 1]),
        ("cells.0.preproc0.net.2.weight", vec![16, 64, 1, 1]),
        ("cells.0.preproc1.net.3.bias", vec![16]),
        // Normal cell: node 2 = dw3(s0) + dw1(s1); node 5 = dw3(node 4) + skip(s0).
        ("cells.0.dag.0.0.net.1.weight", vec![16, 1, 3, 3]),
        ("cells.0.dag.0.1.net.1.weight", vec![16, 1, 1, 1]),
        ("cells.0.dag.1.1.net.1.weight", vec![16, 1, 5, 5]),
        ("cells.1.preproc0.net.2.weight", vec![16, 64, 1, 1]),
        ("cells.1.preproc1.net.2.weight", vec![16, 64, 1, 1]),
        // Cell 6 = 18/3 is a reduction cell with 32 channels: dw7 from s0, max pools.
        ("cells.6.dag.0.1.net.1.weight", vec![32, 1, 7, 7]),
        ("cells.6.dag.2.0.bn.weight", vec![32]),
        ("cells.6.dag.3.1.bn.running_mean", vec![32]),
        // Cell 7 follows a reduction: FactorizedReduce on cell 5's output (64 channels).
        ("cells.7.preproc0.relu.weight", vec![64]),
        ("cells.7.preproc0.conv11.weight", vec![64, 1, 1, 1]),
        ("cells.7.preproc0.conv12.weight", vec![16, 64, 1, 1]),
        ("cells.7.preproc0.conv22.weight", vec![16, 64, 1, 1]),
        ("cells.7.preproc0.bn.weight", vec![32]),
        ("cells.7.preproc1.net.2.weight", vec![32, 128, 1, 1]),
        ("cells.17.dag.0.0.net.1.weight", vec![128, 1, 3, 3]),
        ("tail.0.weight", vec![512]),
        ("tail.1.weight", vec![512, 512, 1, 1]),
        ("tail.4.weight", vec![512, 1, 7, 7]),
        ("tail.6.weight", vec![128, 512, 1, 1]),
        ("tail.7.running_var", vec![128]),
    ] {
        assert_eq!(sd.get(key), Some(&shape), "{key}");
    }
    // Identity (skip) and pooling edges have no weights of their own.
    assert!(!sd.keys().any(|k| k.starts_with("cells.0.dag.3.1.")));
    assert!(!sd.contains_key("cells.18.preproc1.net.0.weight"));
    // 512-d: the tail widens to 1024 as in the reference.
    let sd512 = state_dict(PocketNetConfig::m().with_embedding_size(512));
    assert_eq!(sd512.get("tail.6.weight"), Some(&vec![512, 1024, 1, 1]));
    assert_eq!(sd512.get("stem.0.weight"), Some(&vec![128, 3, 3, 3]));
    // M: reductions at cells 3, 6 and 8; cell 7 reduces cell 5's 14x14 output.
    assert_eq!(
        sd512.get("cells.7.preproc0.conv12.weight"),
        Some(&vec![64, 256, 1, 1])
    );
    assert_eq!(
        sd512.get("cells.8.dag.0.0.net.1.weight"),
        Some(&vec![256, 1, 3, 3])
    );
}

#[test]
fn forward_shapes_at_112() {
    for cfg in [
        PocketNetConfig::s(),
        PocketNetConfig::m().with_embedding_size(256),
    ] {
        let (net, _) = build(&cfg, DType::F32, 1);
        let x = Tensor::randn(0f32, 1f32, (2, 3, 112, 112), &Device::Cpu).unwrap();
        let y = fr_kernels::no_grad(|| net.forward_t(&x, false)).unwrap();
        assert_eq!(y.dims(), &[2, cfg.embedding_size]);
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
    }
    let (net, _) = build(&PocketNetConfig::s(), DType::F32, 1);
    let bad = Tensor::zeros((1, 3, 96, 96), DType::F32, &Device::Cpu).unwrap();
    let err = net.forward_t(&bad, false).unwrap_err().to_string();
    assert!(err.contains("112"), "{err}");
}

#[test]
fn every_trainable_parameter_gets_a_gradient() {
    let cfg = PocketNetConfig::s()
        .with_input_size(32)
        .with_embedding_size(16);
    let (net, varmap) = build(&cfg, DType::F32, 3);
    let x = Tensor::randn(0f32, 1f32, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let y = net.forward_t(&x, true).unwrap();
    assert_eq!(y.dims(), &[4, 16]);
    let target = Tensor::randn(0f32, 1f32, (4, 16), &Device::Cpu).unwrap();
    let loss = (&y * &target).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let trained = common::assert_trainable_gradients(&varmap, &grads, PocketNet::is_trainable);
    assert!(trained > 500, "{trained} trainable tensors");
}

#[test]
fn fused_kernels_equal_the_candle_reference_path() {
    let cfg = PocketNetConfig::m()
        .with_input_size(32)
        .with_embedding_size(8);
    let x = Tensor::randn(0f64, 1f64, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let run = |kernels: Kernels| {
        let (net, varmap) = build(&cfg.clone().with_kernels(kernels), DType::F64, 5);
        let y = net.forward_t(&x, true).unwrap();
        let grads = (&y * &y).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(varmap.data().lock().unwrap()["cells.3.dag.0.1.net.1.weight"].as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eval = fr_kernels::no_grad(|| net.forward_t(&x, false)).unwrap();
        let y: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
        let e: Vec<f64> = eval.flatten_all().unwrap().to_vec1().unwrap();
        (y, g, e)
    };
    let (fused, candle) = (run(Kernels::Fused), run(Kernels::Candle));
    common::assert_max_abs_diff_below(
        &[
            (&fused.0, &candle.0, "train output"),
            (&fused.1, &candle.1, "strided 7x7 depthwise gradient"),
            (&fused.2, &candle.2, "eval output"),
        ],
        1e-8,
    );
}

#[test]
fn configs_names_and_toml() {
    let err = PocketNetConfig::s().with_input_size(100).validate();
    assert!(matches!(err, Err(Error::Config { ref key, .. }) if key == "input_size"));
    let cfg: BackboneConfig =
        toml::from_str("type = \"pocketnet\"\nsize = \"m\"\nembedding_size = 256").unwrap();
    assert_eq!(
        cfg,
        BackboneConfig::Pocketnet(PocketNetConfig::m().with_embedding_size(256))
    );
    assert_eq!(
        BackboneConfig::named("pocketnets"),
        Some(BackboneConfig::Pocketnet(PocketNetConfig::s()))
    );
    assert_eq!(
        BackboneConfig::named("pocketnetm"),
        Some(BackboneConfig::Pocketnet(PocketNetConfig::m()))
    );
    assert!(toml::from_str::<BackboneConfig>("type = \"pocketnet\"\nsize = \"l\"").is_err());
    let cfg = PocketNetConfig::s();
    let reductions: Vec<usize> = (0..18).filter(|&i| cfg.is_reduction(i)).collect();
    assert_eq!(reductions, [6, 12, 17]);
    let cfg = PocketNetConfig::m();
    let reductions: Vec<usize> = (0..9).filter(|&i| cfg.is_reduction(i)).collect();
    assert_eq!(reductions, [3, 6, 8]);
}

/// Elements of the learnable variables of a built network (running statistics excluded).
fn varmap_params(varmap: &VarMap) -> u64 {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| PocketNet::is_trainable(name))
        .map(|(_, v)| v.as_tensor().elem_count() as u64)
        .sum()
}

#[test]
fn channel_and_cell_overrides_build_the_smaller_network() {
    let cpu = PocketNetConfig::s()
        .with_channels(8)
        .with_cells(6)
        .with_input_size(64);
    assert_eq!((cpu.channels(), cpu.cells()), (8, 6));
    let reductions: Vec<usize> = (0..6).filter(|&i| cpu.is_reduction(i)).collect();
    assert_eq!(reductions, [2, 4, 5]);
    let (net, varmap) = build(&cpu, DType::F32, 2);
    let params = cpu.complexity().unwrap().params;
    assert_eq!(params, varmap_params(&varmap), "counter vs built module");
    assert_eq!(params, walked_params(&cpu));
    // Smaller than PocketNetS, larger than with fewer cells or channels.
    let s_params = PocketNetConfig::s().complexity().unwrap().params;
    let fewer_cells = cpu.clone().with_cells(4).complexity().unwrap().params;
    let fewer_channels = cpu.clone().with_channels(4).complexity().unwrap().params;
    println!("PocketNet C=8, 6 cells: {params} parameters (S: {s_params})");
    assert!(params < s_params && fewer_cells < params && fewer_channels < params);
    let sd = state_dict(cpu.clone());
    assert_eq!(sd.get("stem.0.weight"), Some(&vec![32, 3, 3, 3]));
    // Cell 2 (= 6/3) reduces to 16 channels; cell 5 is the last (64 channels), no cell 6.
    assert_eq!(
        sd.get("cells.2.dag.0.1.net.1.weight"),
        Some(&vec![16, 1, 7, 7])
    );
    assert_eq!(
        sd.get("cells.5.dag.0.0.net.1.weight"),
        Some(&vec![64, 1, 3, 3])
    );
    assert!(!sd.contains_key("cells.6.preproc1.net.0.weight"));
    assert_eq!(sd.get("tail.0.weight"), Some(&vec![4 * 64]));
    // The forward runs at 64×64 (4×4 tail kernel) and at the smallest cell count.
    let x = Tensor::randn(0f32, 1f32, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let y = fr_kernels::no_grad(|| net.forward_t(&x, false)).unwrap();
    assert_eq!(y.dims(), &[2, 128]);
    let four = cpu.clone().with_cells(4).with_input_size(32);
    let (net4, varmap4) = build(&four, DType::F32, 2);
    assert_eq!(four.complexity().unwrap().params, varmap_params(&varmap4));
    let x = Tensor::randn(0f32, 1f32, (2, 3, 32, 32), &Device::Cpu).unwrap();
    assert_eq!(net4.forward_t(&x, true).unwrap().dims(), &[2, 128]);
}

#[test]
fn overrides_are_optional_keys_and_bad_values_name_the_key() {
    let cfg: BackboneConfig = toml::from_str(
        "type = \"pocketnet\"\nsize = \"s\"\nchannels = 8\ncells = 6\ninput_size = 64",
    )
    .unwrap();
    assert_eq!(
        cfg,
        BackboneConfig::Pocketnet(
            PocketNetConfig::s()
                .with_channels(8)
                .with_cells(6)
                .with_input_size(64)
        )
    );
    // Unset overrides are not written, so existing configs and model cards stay as they were.
    let json = serde_json::to_value(PocketNetConfig::m()).unwrap();
    assert!(
        json.get("channels").is_none() && json.get("cells").is_none(),
        "{json}"
    );
    let explicit = PocketNetConfig::m().with_channels(32).with_cells(9);
    assert_eq!(
        explicit.complexity().unwrap(),
        PocketNetConfig::m().complexity().unwrap(),
        "overrides equal to the size's give the published network"
    );
    for (cfg, key) in [
        (PocketNetConfig::s().with_channels(0), "channels"),
        (PocketNetConfig::s().with_cells(3), "cells"),
        (PocketNetConfig::s().with_cells(0), "cells"),
    ] {
        let err = cfg.validate();
        assert!(
            matches!(err, Err(Error::Config { key: ref k, .. }) if k == key),
            "{cfg:?}: {err:?}"
        );
        let err = cfg.complexity().unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
        let built = PocketNet::new(
            &cfg,
            SeededVarMap::new(1).var_builder(DType::F32, &Device::Cpu),
        );
        assert!(built.is_err());
    }
    assert!(PocketNetConfig::s().with_cells(4).validate().is_ok());
}
