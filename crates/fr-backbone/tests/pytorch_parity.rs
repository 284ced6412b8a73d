//! The tiny IResNet fixture (made with PyTorch from insightface's iresnet.py): weights load by
//! name and reproduce PyTorch's eval-mode output.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::{
    load_pth, load_safetensors, read_safetensors, varmap_from_safetensors, varmap_from_tensors,
    Error, IResNet,
};
use fr_train::SeededVarMap;

mod common;

use common::{data, fixture, fixture_input, max_abs_diff_to_pytorch, tiny_config};

#[test]
fn safetensors_reproduces_pytorch_eval_output() {
    let vb = load_safetensors(data("iresnet_tiny.safetensors"), DType::F32, &Device::Cpu).unwrap();
    let net = IResNet::new(&tiny_config(), vb).unwrap();
    let out = net.forward_t(&fixture_input(), false).unwrap();
    assert_eq!(out.dims(), &[2, 16]);
    let err = max_abs_diff_to_pytorch(&out);
    println!("safetensors f32: max |candle - pytorch| = {err:.3e}");
    assert!(err < 1e-4, "max abs error {err}");
}

#[test]
fn pth_reproduces_pytorch_eval_output() {
    let vb = load_pth(data("iresnet_tiny.pth"), DType::F32, &Device::Cpu).unwrap();
    let net = IResNet::new(&tiny_config(), vb).unwrap();
    let err = max_abs_diff_to_pytorch(&net.forward_t(&fixture_input(), false).unwrap());
    println!("pth f32: max |candle - pytorch| = {err:.3e}");
    assert!(err < 1e-4, "max abs error {err}");
}

#[test]
fn varmap_loaded_in_f64_reproduces_pytorch_eval_output() {
    let varmap = VarMap::new();
    let vb = SeededVarMap::with_varmap(varmap.clone(), 0).var_builder(DType::F64, &Device::Cpu);
    let net = IResNet::new(&tiny_config(), vb).unwrap();
    let report = varmap_from_safetensors(&varmap, data("iresnet_tiny.safetensors"), "").unwrap();
    assert_eq!(report.loaded, 133 - 22);
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    let x = fixture_input().to_dtype(DType::F64).unwrap();
    let err = max_abs_diff_to_pytorch(&net.forward_t(&x, false).unwrap());
    println!("VarMap f64: max |candle - pytorch| = {err:.3e}");
    assert!(err < 1e-4, "max abs error {err}");
}

#[test]
fn parameter_names_equal_the_state_dict_keys() {
    let varmap = VarMap::new();
    IResNet::new(
        &tiny_config(),
        SeededVarMap::with_varmap(varmap.clone(), 0).var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let ours: BTreeSet<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    let keys: Vec<String> = serde_json::from_value(fixture()["keys"].clone()).unwrap();
    let expected: BTreeSet<String> = keys
        .into_iter()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .collect();
    assert_eq!(ours, expected);
    // And the shapes are the file's.
    let file = read_safetensors(data("iresnet_tiny.safetensors")).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        assert_eq!(var.dims(), file[name].dims(), "{name}");
    }
}

#[test]
fn missing_or_misshapen_weights_are_named() {
    let path = data("iresnet_tiny.safetensors");
    let varmap = VarMap::new();
    IResNet::new(
        &tiny_config(),
        SeededVarMap::with_varmap(varmap.clone(), 0).var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let before = varmap.data().lock().unwrap()["conv1.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();

    // Every offending key in one error: two missing, one wrong shape, one unexpected.
    let mut tensors = read_safetensors(&path).unwrap();
    tensors.remove("layer2.1.prelu.weight");
    tensors.remove("bn1.running_mean");
    tensors.insert(
        "fc.bias".into(),
        Tensor::zeros(17, DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "fc.bias_typo".into(),
        Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = varmap_from_tensors(&varmap, &tensors, Some(&path), "").unwrap_err();
    let msg = err.to_string();
    match err {
        Error::Weights {
            file,
            missing,
            misshapen,
            unexpected,
        } => {
            assert_eq!(missing, ["bn1.running_mean", "layer2.1.prelu.weight"]);
            assert_eq!(misshapen.len(), 1);
            assert_eq!(
                (
                    misshapen[0].key.as_str(),
                    &misshapen[0].expected,
                    &misshapen[0].got
                ),
                ("fc.bias", &vec![16], &vec![17])
            );
            assert_eq!(unexpected, ["fc.bias_typo"]);
            assert_eq!(file.as_deref(), Some(path.as_path()));
        }
        other => panic!("expected Weights, got {other:?}"),
    }
    for needle in [
        "bn1.running_mean",
        "layer2.1.prelu.weight",
        "fc.bias (weights [17], model [16])",
        "fc.bias_typo",
        "iresnet_tiny.safetensors",
    ] {
        assert!(msg.contains(needle), "{needle} not in {msg}");
    }
    // A failed load leaves the VarMap as it was.
    let after = varmap.data().lock().unwrap()["conv1.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(before, after);

    // Building from a VarBuilder names the key and the file.
    let mut tensors = read_safetensors(&path).unwrap();
    tensors.remove("layer3.0.bn2.running_var");
    let vb = fr_backbone::var_builder_from_tensors(tensors, Some(&path), DType::F32, &Device::Cpu);
    let msg = IResNet::new(&tiny_config(), vb).unwrap_err().to_string();
    assert!(
        msg.contains("layer3.0.bn2.running_var") && msg.contains("iresnet_tiny.safetensors"),
        "{msg}"
    );

    // Wrong architecture for the file.
    let vb = load_safetensors(&path, DType::F32, &Device::Cpu).unwrap();
    let msg = IResNet::new(&tiny_config().with_embedding_size(8), vb)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("fc.weight"), "{msg}");

    // Unreadable files name the file.
    let err = load_safetensors(data("nonexistent.safetensors"), DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("nonexistent.safetensors"));
    let err = load_safetensors(data("iresnet_tiny.json"), DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(err, Error::Format { .. }) && err.to_string().contains("iresnet_tiny.json"));
}

#[test]
fn prefixed_varmap_loads_only_its_part() {
    let varmap = VarMap::new();
    let vb = SeededVarMap::with_varmap(varmap.clone(), 1).var_builder(DType::F32, &Device::Cpu);
    let net = IResNet::new(&tiny_config(), vb.pp("backbone")).unwrap();
    // Another module's parameter in the same map is left alone.
    vb.pp("head").get((4, 16), "weight").unwrap();
    let report =
        varmap_from_safetensors(&varmap, data("iresnet_tiny.safetensors"), "backbone").unwrap();
    assert_eq!(report.loaded, 111);
    let err = max_abs_diff_to_pytorch(&net.forward_t(&fixture_input(), false).unwrap());
    assert!(err < 1e-4, "max abs error {err}");
}
