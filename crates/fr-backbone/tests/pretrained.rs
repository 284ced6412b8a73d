//! Pretrained weights: native `.pth`, the key maps of the public layouts, a Hugging Face Hub
//! cache used offline, checkpoints with a model card, and mismatch reports.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::hub::HubOptions;
use fr_backbone::{
    read_safetensors, BackboneConfig, ColourOrder, ConfigOrigin, Error, IResNet, IResNetConfig,
    KeyLayout, KeyMap, LoadOptions, ModelCard, Pretrained, Source,
};
use fr_train::{save_checkpoint, SeededVarMap, TrainState};

mod common;

use common::{data, fixture_input, max_abs_diff_to_pytorch, tiny_config};

fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fr-backbone-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load(source: &str, options: &LoadOptions) -> fr_backbone::Result<Pretrained> {
    Pretrained::load(&Source::parse(source)?, options)
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Eval-mode output of the backbone the weights and `cfg` make, on the fixture input.
fn output(p: &Pretrained, cfg: &BackboneConfig) -> Tensor {
    let (net, _) = p.build(cfg, DType::F32, &Device::Cpu).unwrap();
    net.forward_t(&fixture_input(), false).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn tiny() -> BackboneConfig {
    BackboneConfig::Iresnet(tiny_config())
}

#[test]
fn pth_loads_natively_and_reproduces_pytorch() {
    let p = load(
        &path_str(&data("iresnet_tiny.pth")),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(p.key_map, KeyMap::insightface());
    assert!(p.card.is_none() && p.dropped.is_empty());
    // Without a card the architecture comes from the shapes: the fixture's exactly.
    let (cfg, from) = p.config(None).unwrap();
    assert_eq!((cfg.clone(), from), (tiny(), ConfigOrigin::Inferred));
    let (net, report) = p.build(&cfg, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(report.loaded, 133 - 22);
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    let out = net.forward_t(&fixture_input(), false).unwrap();
    let err = max_abs_diff_to_pytorch(&out);
    assert!(err < 1e-4, "max abs error {err}");

    // The same state dict nested in a training checkpoint ({"state_dict": ..., "epoch": 3}).
    let nested = load(
        &path_str(&data("iresnet_tiny_nested.pth")),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(nested.tensors.len(), p.tensors.len());
    assert_eq!(max_diff(&output(&nested, &cfg), &out), 0.0);
}

/// The fixture's state dict, every key under `prefix`, plus a head's key outside it.
fn prefixed(prefix: &str) -> HashMap<String, Tensor> {
    let mut t: HashMap<String, Tensor> = read_safetensors(data("iresnet_tiny.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect();
    t.insert(
        "head.kernel".into(),
        Tensor::zeros((16, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    t
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

#[test]
fn ddp_and_cvlface_prefixes_are_detected_and_stripped() {
    let dir = temp("prefix");
    for prefix in ["module.", "model.net."] {
        let path = dir.join(format!("{}safetensors", prefix.replace('.', "_")));
        save(&prefixed(prefix), &path);
        let p = load(&path_str(&path), &LoadOptions::default()).unwrap();
        assert_eq!(p.key_map, KeyMap::new(prefix, KeyLayout::Insightface));
        assert_eq!(p.dropped, ["head.kernel"]);
        let err = max_abs_diff_to_pytorch(&output(&p, &tiny()));
        assert!(err < 1e-4, "{prefix}: max abs error {err}");
    }
    // An explicit key map wins over detection.
    let path = dir.join("module_safetensors");
    let forced = LoadOptions {
        key_map: Some(KeyMap::insightface()),
        ..LoadOptions::default()
    };
    let p = load(&path_str(&path), &forced).unwrap();
    let msg = p
        .build(&tiny(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("111 missing") && msg.contains("module.*"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// insightface names → AdaFace / CVLface IR names (`input_layer`, `body`, `output_layer`)
/// for the fixture's layers `[1, 2, 1, 1]`.
fn to_adaface(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let layers = [1, 2, 1, 1];
    let res = ["bn1", "conv1", "bn2", "prelu", "conv2", "bn3"];
    let rename = |k: &str| -> String {
        let (head, leaf) = k.split_once('.').unwrap();
        match head {
            "conv1" => return format!("input_layer.0.{leaf}"),
            "bn1" => return format!("input_layer.1.{leaf}"),
            "prelu" => return format!("input_layer.2.{leaf}"),
            "bn2" => return format!("output_layer.0.{leaf}"),
            "fc" => return format!("output_layer.3.{leaf}"),
            "features" => return format!("output_layer.4.{leaf}"),
            _ => {}
        }
        let s: usize = head.strip_prefix("layer").unwrap().parse().unwrap();
        let (j, rest) = leaf.split_once('.').unwrap();
        let n: usize = layers[..s - 1].iter().sum::<usize>() + j.parse::<usize>().unwrap();
        let (module, leaf) = rest.split_once('.').unwrap();
        if module == "downsample" {
            return format!("body.{n}.shortcut_layer.{leaf}");
        }
        let i = res.iter().position(|r| *r == module).unwrap();
        format!("body.{n}.res_layer.{i}.{leaf}")
    };
    tensors
        .iter()
        .map(|(k, v)| (format!("{prefix}{}", rename(k)), v.clone()))
        .collect()
}

#[test]
fn adaface_ir_layout_reproduces_pytorch() {
    let dir = temp("adaface");
    let insight = read_safetensors(data("iresnet_tiny.safetensors")).unwrap();
    let path = dir.join("model.safetensors");
    save(&to_adaface(&insight, "model.net."), &path);
    let p = load(&path_str(&path), &LoadOptions::default()).unwrap();
    assert_eq!(p.key_map, KeyMap::new("model.net.", KeyLayout::AdafaceIr));
    assert!(p.synthesized.is_empty(), "{:?}", p.synthesized);
    let (cfg, from) = p.config(None).unwrap();
    assert_eq!((cfg.clone(), from), (tiny(), ConfigOrigin::Inferred));
    let err = max_abs_diff_to_pytorch(&output(&p, &cfg));
    assert!(err < 1e-4, "max abs error {err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// AdaFace's first unit has a `MaxPool2d(1, 2)` shortcut (64 → 64 channels): the key map
/// makes it an identity 1×1 stride-2 convolution with an identity BatchNorm, and its
/// affine-free output BatchNorm gets weight 1, bias 0. Both are exact.
#[test]
fn adaface_max_pool_shortcut_is_an_exact_identity() {
    let dev = Device::Cpu;
    // x[:, :, ::2, ::2] is what the identity stride-2 convolution computes.
    let x = Tensor::randn(0f32, 1f32, (1, 8, 6, 6), &dev).unwrap();
    let eye = Tensor::eye(8, DType::F32, &dev)
        .unwrap()
        .reshape((8, 8, 1, 1))
        .unwrap();
    let y = x
        .conv2d(&eye, 0, 2, 1, 1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let xv = x.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
    for c in 0..8 {
        for i in 0..3 {
            for j in 0..3 {
                assert_eq!(y[c][i][j], xv[c][2 * i][2 * j]);
            }
        }
    }

    // The fixture with an identity shortcut in layer1.0 and an affine-free features BN ...
    let mut t = read_safetensors(data("iresnet_tiny.safetensors")).unwrap();
    let c = 8;
    t.insert(
        "layer1.0.downsample.0.weight".into(),
        Tensor::eye(c, DType::F32, &dev)
            .unwrap()
            .reshape((c, c, 1, 1))
            .unwrap(),
    );
    for (k, v) in [
        ("weight", 1.0),
        ("bias", 0.0),
        ("running_mean", 0.0),
        ("running_var", 1.0 - 1e-5),
    ] {
        let v = Tensor::full(v as f32, c, &dev).unwrap();
        t.insert(format!("layer1.0.downsample.1.{k}"), v);
    }
    t.insert(
        "features.weight".into(),
        Tensor::ones(16, DType::F32, &dev).unwrap(),
    );
    t.insert(
        "features.bias".into(),
        Tensor::zeros(16, DType::F32, &dev).unwrap(),
    );
    let dir = temp("maxpool");
    let explicit = dir.join("explicit.safetensors");
    save(&t, &explicit);
    let expected = output(
        &load(&path_str(&explicit), &LoadOptions::default()).unwrap(),
        &tiny(),
    );
    // ... equals AdaFace's layout without those parameters.
    let mut ada = to_adaface(&t, "");
    for k in [
        "body.0.shortcut_layer.0.weight",
        "output_layer.4.weight",
        "output_layer.4.bias",
    ] {
        ada.remove(k).unwrap();
    }
    ada.retain(|k, _| !k.starts_with("body.0.shortcut_layer.1."));
    let path = dir.join("adaface.safetensors");
    save(&ada, &path);
    let p = load(&path_str(&path), &LoadOptions::default()).unwrap();
    assert_eq!(p.synthesized.len(), 7, "{:?}", p.synthesized);
    let got = output(&p, &tiny());
    let diff = max_diff(&got, &expected);
    assert!(diff < 1e-6, "max abs difference {diff}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A Hub cache as hf-hub and huggingface_hub lay it out: `refs/main` → commit,
/// `snapshots/<commit>/<file>` → `../../blobs/<etag>`.
fn fake_hub_repo(cache: &Path, repo: &str, files: &[(&str, Vec<u8>)]) -> String {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = root.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), commit).unwrap();
    for (i, (name, bytes)) in files.iter().enumerate() {
        let blob = root.join("blobs").join(format!("etag{i}"));
        std::fs::write(&blob, bytes).unwrap();
        let link = snapshot.join(name);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        // Relative to the link's folder: up to the repository folder, then into blobs/.
        #[cfg(unix)]
        std::os::unix::fs::symlink(
            format!(
                "{}blobs/etag{i}",
                "../".repeat(2 + name.matches('/').count())
            ),
            &link,
        )
        .unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).unwrap();
    }
    commit.to_string()
}

fn offline(cache: &Path) -> LoadOptions {
    LoadOptions {
        hub: HubOptions {
            offline: true,
            cache_dir: Some(cache.to_path_buf()),
            ..HubOptions::default()
        },
        ..LoadOptions::default()
    }
}

#[test]
fn fake_hub_cache_resolves_offline() {
    let dir = temp("hub");
    let cache = dir.join("hub");
    let weights = std::fs::read(data("iresnet_tiny.safetensors")).unwrap();
    let card = ModelCard::new(tiny());
    let commit = fake_hub_repo(
        &cache,
        "fr-test/iresnet-tiny",
        &[
            ("config.json", card.to_json()),
            ("model.safetensors", weights.clone()),
        ],
    );
    let opts = offline(&cache);
    let p = load("hf://fr-test/iresnet-tiny", &opts).unwrap();
    assert_eq!(p.origin, "hf://fr-test/iresnet-tiny@main");
    assert_eq!(p.card.as_ref(), Some(&card));
    assert!(p.weights_file.starts_with(&cache));
    let (cfg, from) = p.config(Some(&BackboneConfig::default())).unwrap();
    assert_eq!((cfg.clone(), from), (tiny(), ConfigOrigin::Card));
    let err = max_abs_diff_to_pytorch(&output(&p, &cfg));
    assert!(err < 1e-4, "max abs error {err}");

    // A commit hash as the revision resolves without a ref; an explicit file too.
    let at_commit = load(
        &format!("hf://fr-test/iresnet-tiny@{commit}/model.safetensors"),
        &opts,
    )
    .unwrap();
    assert_eq!(at_commit.tensors.len(), p.tensors.len());

    // Without a card, a CVLface repository: the `model.net.` prefix and model.yaml's BGR.
    let cvl = to_adaface(
        &read_safetensors(data("iresnet_tiny.safetensors")).unwrap(),
        "model.net.",
    );
    let cvl_path = dir.join("cvl.safetensors");
    save(&cvl, &cvl_path);
    fake_hub_repo(
        &cache,
        "fr-test/cvlface-tiny",
        &[
            (
                "config.json",
                br#"{"architectures": ["CVLFaceRecognitionModel"]}"#.to_vec(),
            ),
            ("model.safetensors", std::fs::read(&cvl_path).unwrap()),
            (
                "pretrained_model/model.yaml",
                b"name: ir18\ncolor_space: BGR\n".to_vec(),
            ),
        ],
    );
    let p = load("hf://fr-test/cvlface-tiny", &opts).unwrap();
    assert!(p.card.is_none());
    assert_eq!(p.colour_order, ColourOrder::Bgr);
    assert_eq!(p.key_map, KeyMap::new("model.net.", KeyLayout::AdafaceIr));
    let err = max_abs_diff_to_pytorch(&output(&p, &tiny()));
    assert!(err < 1e-4, "max abs error {err}");

    // Missing files: the error names the repository, the file and where it looked.
    let msg = load("hf://fr-test/absent", &opts).err().unwrap();
    assert!(matches!(msg, Error::HubFileMissing { offline: true, .. }));
    let msg = msg.to_string();
    assert!(
        msg.contains("hf://fr-test/absent@main")
            && msg.contains("model.safetensors")
            && msg.contains(&path_str(&cache.join("models--fr-test--absent/refs/main"))),
        "{msg}"
    );
    let msg = load("hf://fr-test/iresnet-tiny/backbone.pth", &opts)
        .err()
        .unwrap()
        .to_string();
    let snapshot = cache
        .join("models--fr-test--iresnet-tiny/snapshots")
        .join(&commit);
    assert!(
        msg.contains("`backbone.pth`") && msg.contains(&path_str(&snapshot)),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn checkpoint_with_model_card_round_trips() {
    let dir = temp("roundtrip");
    let cfg = IResNetConfig {
        layers: [1, 1, 1, 1],
        widths: [4, 8, 8, 16],
        embedding_size: 8,
        input_size: 32,
        dropout: 0.0,
        kernels: Default::default(),
    };
    let varmap = VarMap::new();
    let vb = SeededVarMap::with_varmap(varmap.clone(), 11).var_builder(DType::F32, &Device::Cpu);
    let net = IResNet::new(&cfg, vb.clone()).unwrap();
    vb.pp("head").get((5, 8), "weight").unwrap();
    let x = Tensor::randn(0f32, 1f32, (3, 3, 32, 32), &Device::Cpu).unwrap();
    // Non-trivial running statistics, as after training.
    net.forward_t(&(&x + 0.3).unwrap(), true).unwrap();
    let before = net.forward_t(&x, false).unwrap();

    let card = ModelCard::new(BackboneConfig::Iresnet(cfg.clone()))
        .with_head("arcface", None, Some(5))
        .with_training_set("synthetic", Some(5), Some(20));
    let state = TrainState {
        step: 7,
        model_card: Some(card),
        ..TrainState::default()
    };
    let saved = save_checkpoint(&dir.join("run"), &varmap, &state).unwrap();

    // By the step directory, by its weights file (the card beside it is read), and uploaded
    // to the Hub as it is (the step directory's files), by repository id.
    let cache = dir.join("hub");
    let files: Vec<(&str, Vec<u8>)> = ["config.json", "model.safetensors"]
        .into_iter()
        .map(|f| (f, std::fs::read(saved.join(f)).unwrap()))
        .collect();
    fake_hub_repo(&cache, "me/tiny-face", &files);
    for source in [
        path_str(&saved),
        path_str(&saved.join("model.safetensors")),
        "hf://me/tiny-face".to_string(),
    ] {
        let p = load(&source, &offline(&cache)).unwrap();
        let card = p.card.as_ref().expect("the card is found");
        assert_eq!(card.step, Some(7));
        assert_eq!(card.head.as_ref().unwrap().name, "arcface");
        let (got_cfg, from) = p.config(None).unwrap();
        assert_eq!(
            (got_cfg.clone(), from),
            (BackboneConfig::Iresnet(cfg.clone()), ConfigOrigin::Card)
        );
        let (model, report) = p.build(&got_cfg, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(report.unused, ["head.weight"]);
        let after = model.forward_t(&x, false).unwrap();
        let diff = max_diff(&before, &after);
        assert!(diff < 1e-6, "{source}: max abs difference {diff}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn mismatched_weights_list_every_offending_key() {
    let mut p = load(
        &path_str(&data("iresnet_tiny.safetensors")),
        &LoadOptions::default(),
    )
    .unwrap();
    // A configuration that does not fit: every fc / features key is wrong at once.
    let small = BackboneConfig::Iresnet(tiny_config().with_embedding_size(8));
    match p.build(&small, DType::F32, &Device::Cpu).err().unwrap() {
        Error::Weights {
            missing,
            misshapen,
            file,
            ..
        } => {
            assert!(missing.is_empty());
            let keys: Vec<&str> = misshapen.iter().map(|m| m.key.as_str()).collect();
            assert_eq!(
                keys,
                [
                    "fc.bias",
                    "fc.weight",
                    "features.bias",
                    "features.running_mean",
                    "features.running_var",
                    "features.weight"
                ]
            );
            assert!(file.unwrap().ends_with("iresnet_tiny.safetensors"));
        }
        other => panic!("expected Weights, got {other:?}"),
    }
    // Missing keys and a renamed one, all in one message.
    p.tensors.remove("layer3.0.bn2.running_var");
    p.tensors.remove("conv1.weight");
    let v = p.tensors.remove("prelu.weight").unwrap();
    p.tensors.insert("prelu.alpha".into(), v);
    let msg = p
        .build(&tiny(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    for needle in [
        "3 missing",
        "1 unexpected",
        "conv1.weight",
        "layer3.0.bn2.running_var",
        "prelu.weight",
        "unexpected: prelu.alpha",
        "iresnet_tiny.safetensors",
    ] {
        assert!(msg.contains(needle), "{needle} not in {msg}");
    }
}
