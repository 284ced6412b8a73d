//! IResNet configuration, shapes, BatchNorm statistics and the registry.

use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::{build_backbone, BackboneConfig, Error, IResNet, IResNetConfig};
use fr_train::SeededVarMap;

fn build(cfg: &IResNetConfig, seed: u64) -> (IResNet, VarMap) {
    let varmap = VarMap::new();
    let net = IResNet::new(
        cfg,
        SeededVarMap::with_varmap(varmap.clone(), seed).var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    (net, varmap)
}

fn param(varmap: &VarMap, name: &str) -> Tensor {
    varmap.data().lock().unwrap()[name]
        .as_tensor()
        .copy()
        .unwrap()
}

fn images(b: usize, s: usize) -> Tensor {
    Tensor::randn(0f32, 1f32, (b, 3, s, s), &Device::Cpu).unwrap()
}

fn tiny() -> IResNetConfig {
    IResNetConfig {
        layers: [1, 1, 1, 1],
        widths: [4, 8, 8, 16],
        embedding_size: 8,
        input_size: 32,
        dropout: 0.0,
        kernels: Default::default(),
    }
}

#[test]
fn presets_and_builders() {
    assert_eq!(IResNetConfig::default(), IResNetConfig::r50());
    let r50 = IResNetConfig::r50();
    assert_eq!(
        (r50.layers, r50.widths),
        ([3, 4, 14, 3], [64, 128, 256, 512])
    );
    assert_eq!(
        (r50.embedding_size, r50.input_size, r50.dropout),
        (512, 112, 0.0)
    );
    assert_eq!(IResNetConfig::r18().layers, [2, 2, 2, 2]);
    assert_eq!(IResNetConfig::r34().layers, [3, 4, 6, 3]);
    assert_eq!(IResNetConfig::r100().layers, [3, 13, 30, 3]);
    assert_eq!(IResNetConfig::r200().layers, [6, 26, 60, 6]);
    assert_eq!(r50.final_size(), 7);
    assert_eq!(r50.fc_in_features(), 512 * 49);
    assert_eq!(r50.clone().with_input_size(56).final_size(), 4);
    assert_eq!(r50.clone().with_width_mult(0.5).widths, [32, 64, 128, 256]);
    assert_eq!(r50.clone().with_width_mult(1e-6).widths, [1, 1, 1, 1]);
    assert_eq!(r50.with_embedding_size(128).embedding_size, 128);
}

#[test]
fn r18_eighth_width_at_56_shapes() {
    let cfg = IResNetConfig::r18()
        .with_width_mult(0.125)
        .with_input_size(56);
    assert_eq!(cfg.widths, [8, 16, 32, 64]);
    let (net, varmap) = build(&cfg, 0);
    let shape = |n: &str| param(&varmap, n).dims().to_vec();
    assert_eq!(shape("conv1.weight"), [8, 3, 3, 3]);
    assert_eq!(shape("layer1.0.downsample.0.weight"), [8, 8, 1, 1]);
    assert_eq!(shape("layer2.0.conv1.weight"), [16, 8, 3, 3]);
    assert_eq!(shape("layer4.1.conv2.weight"), [64, 64, 3, 3]);
    assert_eq!(shape("layer4.1.prelu.weight"), [64]);
    assert_eq!(shape("bn2.running_var"), [64]);
    assert_eq!(shape("fc.weight"), [512, 64 * 4 * 4]);
    assert_eq!(shape("features.bias"), [512]);
    assert!(!varmap
        .data()
        .lock()
        .unwrap()
        .contains_key("layer1.1.downsample.0.weight"));
    // Stem (conv, 4 BN, PReLU); 8 blocks with 3 BN, 2 convs, 1 PReLU; 4 downsamples (conv, BN);
    // bn2, fc, features.
    let n_vars = varmap.data().lock().unwrap().len();
    assert_eq!(n_vars, 6 + 8 * (3 * 4 + 2 + 1) + 4 * (1 + 4) + 4 + 2 + 4);
    for train in [false, true] {
        let out = net.forward_t(&images(2, 56), train).unwrap();
        assert_eq!(out.dims(), &[2, 512]);
    }
    assert_eq!(net.embedding_size(), 512);
    // A wrong input size is an error, not a panic.
    assert!(net.forward_t(&images(2, 112), false).is_err());
}

#[test]
fn train_forward_updates_running_stats_and_eval_does_not() {
    let (net, varmap) = build(&tiny(), 0);
    let names = [
        "bn1.running_mean",
        "layer2.0.bn3.running_var",
        "features.running_mean",
    ];
    let before: Vec<Vec<f32>> = names
        .iter()
        .map(|n| param(&varmap, n).to_vec1().unwrap())
        .collect();
    let x = (images(4, 32) + 0.5).unwrap();
    net.forward_t(&x, false).unwrap();
    for (n, b) in names.iter().zip(&before) {
        assert_eq!(
            &param(&varmap, n).to_vec1::<f32>().unwrap(),
            b,
            "{n} changed in eval"
        );
    }
    net.forward_t(&x, true).unwrap();
    for (n, b) in names.iter().zip(&before) {
        assert_ne!(
            &param(&varmap, n).to_vec1::<f32>().unwrap(),
            b,
            "{n} not updated"
        );
    }
    // Momentum 0.1 towards the batch mean of the stem output.
    let rm = param(&varmap, "bn1.running_mean").to_vec1::<f32>().unwrap();
    assert!(rm.iter().any(|v| v.abs() > 1e-4));
}

#[test]
fn trainable_filter() {
    for fixed in [
        "bn1.running_mean",
        "layer1.0.bn2.running_var",
        "layer1.0.downsample.1.num_batches_tracked",
        "features.weight",
        "backbone.features.weight",
        "backbone.bn2.running_mean",
    ] {
        assert!(!IResNet::is_trainable(fixed), "{fixed}");
    }
    for free in [
        "conv1.weight",
        "features.bias",
        "fc.weight",
        "layer1.0.prelu.weight",
        "bn2.weight",
    ] {
        assert!(IResNet::is_trainable(free), "{free}");
    }
}

#[test]
fn seeded_init_is_deterministic() {
    let (_, a) = build(&tiny(), 7);
    let (_, b) = build(&tiny(), 7);
    let (_, c) = build(&tiny(), 8);
    let v = |m: &VarMap| {
        param(m, "layer3.0.conv2.weight")
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(v(&a), v(&b));
    assert_ne!(v(&a), v(&c));
    // insightface's init: conv N(0, 0.1²), PReLU 0.25, BN (1, 0), features.weight 1.
    let w = v(&a);
    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    assert!((0.07..0.13).contains(&std), "conv std {std}");
    let prelu = param(&a, "prelu.weight").to_vec1::<f32>().unwrap();
    assert!(prelu.iter().all(|&p| p == 0.25));
    let fw = param(&a, "features.weight").to_vec1::<f32>().unwrap();
    assert!(fw.iter().all(|&p| p == 1.0));
}

#[test]
fn bad_configs_are_rejected_naming_the_key() {
    let cases: [(IResNetConfig, &str); 6] = [
        (
            IResNetConfig {
                layers: [2, 0, 2, 2],
                ..tiny()
            },
            "layers",
        ),
        (
            IResNetConfig {
                widths: [4, 8, 0, 16],
                ..tiny()
            },
            "widths",
        ),
        (tiny().with_embedding_size(0), "embedding_size"),
        (tiny().with_input_size(8), "input_size"),
        (tiny().with_dropout(1.0), "dropout"),
        (tiny().with_dropout(f32::NAN), "dropout"),
    ];
    for (cfg, expected_key) in cases {
        assert!(cfg.validate().is_err());
        let varmap = VarMap::new();
        match IResNet::new(
            &cfg,
            SeededVarMap::with_varmap(varmap.clone(), 0).var_builder(DType::F32, &Device::Cpu),
        ) {
            Err(Error::Config { key, .. }) => assert_eq!(key, expected_key),
            other => panic!("{cfg:?}: expected Config error, got {:?}", other.err()),
        }
    }
    // Unknown fields and unknown backbone types do not deserialize.
    assert!(toml::from_str::<BackboneConfig>("type = \"iresnet\"\nlayer = [1, 1, 1, 1]").is_err());
    assert!(toml::from_str::<BackboneConfig>("type = \"resnet\"").is_err());
    assert!(toml::from_str::<IResNetConfig>("widths = [1, 2, 3]").is_err());
}

#[test]
fn registry_builds_from_toml() {
    let text = "type = \"iresnet\"\nlayers = [1, 1, 1, 1]\nwidths = [4, 8, 8, 16]\ninput_size = 56\nembedding_size = 8\n";
    let cfg: BackboneConfig = toml::from_str(text).unwrap();
    let BackboneConfig::Iresnet(inner) = &cfg else {
        panic!("not an iresnet: {cfg:?}")
    };
    assert_eq!(inner.dropout, 0.0); // unspecified fields take r50's defaults
    assert_eq!(inner.layers, [1, 1, 1, 1]);
    // Round trip.
    let again: BackboneConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(again, cfg);
    let varmap = VarMap::new();
    let net = build_backbone(
        &cfg,
        SeededVarMap::with_varmap(varmap.clone(), 0).var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    assert_eq!(net.embedding_size(), 8);
    assert!(!net.is_trainable("features.weight"));
    assert_eq!(net.forward_t(&images(2, 56), true).unwrap().dims(), &[2, 8]);
    // The same network as a BatchNorm-statistics backbone (inversion), over the same variables:
    // same eval embeddings, one tap per BatchNorm2d.
    let taps = fr_backbone::build_bn_stats_backbone(
        &cfg,
        SeededVarMap::with_varmap(varmap.clone(), 0).var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    assert_eq!(taps.input_shape(), (56, 56));
    let x = images(2, 56);
    let (emb, stats) = taps.forward_with_bn_stats(&x).unwrap();
    let plain = net.forward_t(&x, false).unwrap();
    let diff = (emb - plain).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    // bn1, three per block (4 blocks), one downsample BN per stage, bn2.
    assert_eq!(
        stats.len(),
        1 + 4 * 3 + 4 + 1,
        "{:?}",
        stats.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(
        BackboneConfig::default(),
        BackboneConfig::Iresnet(IResNetConfig::r50())
    );
}

/// The CPU kernels (`kernels = "fused"`) and candle's own ops (`"candle"`) give the same
/// embeddings, parameter gradients and BatchNorm running statistics over two training steps,
/// and the same eval-mode embeddings, with and without `no_grad` (the fused inference path).
#[test]
fn fused_kernels_equal_the_candle_reference_path() {
    use fr_kernels::Kernels;
    // f64, so that only real differences (not summation order) show.
    let x = images(3, 32).to_dtype(DType::F64).unwrap();
    let run = |kernels: Kernels| {
        let varmap = VarMap::new();
        let net = IResNet::new(
            &tiny().with_kernels(kernels),
            SeededVarMap::with_varmap(varmap.clone(), 5).var_builder(DType::F64, &Device::Cpu),
        )
        .unwrap();
        let mut out: Vec<(String, Vec<f64>)> = Vec::new();
        for step in 0..2 {
            let y = net.forward_t(&x, true).unwrap();
            let loss = (&y * &y).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            out.push((
                format!("y{step}"),
                y.flatten_all().unwrap().to_vec1().unwrap(),
            ));
            let data = varmap.data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            for name in names {
                let v = data[name].as_tensor();
                if let Some(g) = grads.get(v) {
                    out.push((
                        format!("d{name}{step}"),
                        g.flatten_all().unwrap().to_vec1().unwrap(),
                    ));
                }
                if name.contains("running_") {
                    out.push((format!("{name}{step}"), v.to_vec1().unwrap()));
                }
            }
        }
        let eval = net.forward_t(&x, false).unwrap();
        let eval_ng = fr_kernels::no_grad(|| net.forward_t(&x, false)).unwrap();
        assert!(!eval_ng.track_op(), "no_grad output is still in a graph");
        // no_grad runs the fused inference convolutions: equal up to rounding.
        let diff = (&eval - &eval_ng)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
        out.push((
            "eval".into(),
            eval.flatten_all().unwrap().to_vec1().unwrap(),
        ));
        out
    };
    let (fused, reference) = (run(Kernels::Fused), run(Kernels::Candle));
    assert_eq!(fused.len(), reference.len());
    assert!(
        fused.len() > 40,
        "too few gradients compared: {}",
        fused.len()
    );
    for ((name, a), (name_ref, b)) in fused.iter().zip(&reference) {
        assert_eq!(name, name_ref);
        // Relative to the tensor's largest entry, floored at 1e-4: some gradients are zero up to
        // rounding (the fc bias feeds the features BatchNorm, which cancels it), and their
        // ~1e-13 rounding noise depends on the reduction order of the threads.
        let scale = b.iter().fold(1e-4f64, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f64, f64::max)
            / scale;
        assert!(worst < 1e-7, "{name}: relative difference {worst:e}");
    }
}
