//! ArcFace inversion on a tiny IResNet (32×32 input, widths 8–32) whose BatchNorm running
//! statistics come from training-mode forwards on structured random images.

use candle_core::{DType, Device, ModuleT, Tensor};
use fr_backbone::{IResNet, IResNetConfig};
use fr_train::{
    invert, save_png_grid, InversionConfig, InversionResult, LrSchedule, SeededVarMap, GRID_GAP,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: usize = 32;
const EMB: usize = 32;

fn backbone_config() -> IResNetConfig {
    IResNetConfig {
        layers: [1, 1, 1, 1],
        widths: [8, 16, 16, 32],
        embedding_size: EMB,
        input_size: SIZE,
        ..IResNetConfig::r18()
    }
}

/// `n` smooth "faces": a per-image colour, a vertical and a horizontal ramp, and a little
/// noise, in [−1, 1]. Their statistics differ from the optimiser's uniform-noise start.
fn structured_images(n: usize, rng: &mut ChaCha8Rng) -> Tensor {
    let mut v = Vec::with_capacity(n * 3 * SIZE * SIZE);
    for _ in 0..n {
        let base: [f32; 3] = [
            rng.random_range(0.1..0.6),
            0.0,
            rng.random_range(-0.6..-0.1),
        ];
        let (gy, gx) = (
            rng.random_range(-0.4f32..0.4),
            rng.random_range(-0.4f32..0.4),
        );
        for b in base {
            for y in 0..SIZE {
                for x in 0..SIZE {
                    let (fy, fx) = (y as f32 / SIZE as f32 - 0.5, x as f32 / SIZE as f32 - 0.5);
                    let noise: f32 = rng.random_range(-0.1..0.1);
                    v.push((b + gy * fy + gx * fx + noise).clamp(-1.0, 1.0));
                }
            }
        }
    }
    Tensor::from_vec(v, (n, 3, SIZE, SIZE), &Device::Cpu).unwrap()
}

/// The frozen backbone (BN running statistics set by 40 training forwards of 8 images, so
/// that `features` centres the embeddings and distinct images get distinct directions) and 3 reference
/// images with their embeddings as targets.
fn setup() -> (IResNet, Tensor, Tensor) {
    let params = SeededVarMap::new(7);
    let net = IResNet::new(
        &backbone_config(),
        params.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for _ in 0..40 {
        let batch = structured_images(8, &mut rng);
        net.forward_t(&batch, true).unwrap();
    }
    let refs = structured_images(3, &mut rng);
    let targets = net.forward_t(&refs, false).unwrap().detach();
    (net, refs, targets)
}

fn config(steps: usize) -> InversionConfig {
    InversionConfig {
        steps,
        lr: 0.1,
        schedule: LrSchedule::Cosine {
            min_lr: 0.0,
            warmup_steps: 10,
        },
        bn_weight: 0.05,
        image_size: SIZE,
        seed: 3,
        ..InversionConfig::default()
    }
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

fn run(net: &IResNet, targets: &Tensor, cfg: &InversionConfig) -> InversionResult {
    invert(net, targets, cfg).unwrap()
}

#[test]
fn forward_with_bn_stats_matches_eval_forward() {
    let (net, refs, targets) = setup();
    let (emb, stats) = net.forward_with_bn_stats(&refs).unwrap();
    let diff = (emb - &targets)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "tapped forward differs by {diff}");
    // stem bn1, 4 blocks × (bn1, bn2, bn3, downsample.1), bn2; not `features`.
    assert_eq!(stats.len(), 18);
    assert_eq!(stats[0].name, "bn1");
    assert_eq!(stats[4].name, "layer1.0.downsample.1");
    assert_eq!(stats[17].name, "bn2");
    assert_eq!(stats[0].mean.dims(), &[8]);
    assert!(stats
        .iter()
        .all(|st| st.var.min_all().unwrap().to_scalar::<f32>().unwrap() >= 0.0));
    // The statistics carry gradients back to the input image.
    let x = candle_core::Var::from_tensor(&refs).unwrap();
    let (_, stats_x) = net.forward_with_bn_stats(x.as_tensor()).unwrap();
    let grads = stats_x[5].var.sum_all().unwrap().backward().unwrap();
    let g = grads
        .get(x.as_tensor())
        .expect("no gradient reaches the image");
    assert!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    // Running statistics were moved away from the (0, 1) initialisation.
    let rm = stats[0].running_mean.to_vec1::<f32>().unwrap();
    assert!(
        rm.iter().any(|m| m.abs() > 1e-2),
        "running mean untouched: {rm:?}"
    );
}

#[test]
fn inverted_images_match_their_targets() {
    let (net, _refs, targets) = setup();
    assert!(
        net.forward_with_bn_stats(&targets).is_err(),
        "a non-image input is rejected"
    );
    let running_before = net
        .forward_with_bn_stats(
            &Tensor::zeros((1, 3, SIZE, SIZE), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap()
        .1[0]
        .running_var
        .to_vec1::<f32>()
        .unwrap();

    let cfg = config(150);
    let out = run(&net, &targets, &cfg);
    assert_eq!(out.images.dims(), &[3, 3, SIZE, SIZE]);
    assert_eq!(out.history.len(), 150);

    // The reported cosines are those of the generated images' embeddings.
    let emb = net.forward_t(&out.images, false).unwrap();
    let emb = emb.to_vec2::<f32>().unwrap();
    let tgt = targets.to_vec2::<f32>().unwrap();
    let first = &out.history[0];
    let last = out.history.last().unwrap();
    eprintln!(
        "initial mean cos {:.4}; final cosines {:?}; bn prior {:.4} → {:.4}",
        1.0 - first.identity,
        out.cosines,
        first.bn_prior,
        last.bn_prior
    );
    for (i, (e, t)) in emb.iter().zip(&tgt).enumerate() {
        let c = cos(e, t);
        assert!(
            (c - out.cosines[i]).abs() < 1e-3,
            "image {i}: {c} vs {}",
            out.cosines[i]
        );
        assert!(c > 0.8, "image {i}: cos {c} ≤ 0.8");
        // Each image carries its own identity: it is nearest to its own target.
        for (j, u) in tgt.iter().enumerate().filter(|(j, _)| *j != i) {
            assert!(cos(e, u) < c - 0.2, "image {i} is as close to target {j}");
        }
    }
    assert!(
        1.0 - first.identity < 0.5,
        "the start already matches the targets: the test would prove nothing"
    );
    // The BatchNorm-statistics prior falls over the optimisation.
    assert!(
        last.bn_prior < 0.5 * first.bn_prior,
        "bn prior {} → {}",
        first.bn_prior,
        last.bn_prior
    );
    // Images stay in the valid range; the backbone's running statistics are untouched.
    let max = out
        .images
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max <= 1.0);
    let running_after = net.forward_with_bn_stats(&out.images).unwrap().1[0]
        .running_var
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(running_before, running_after);
}

#[test]
fn inversion_is_deterministic_for_a_seed() {
    let (net, _refs, targets) = setup();
    let cfg = config(15);
    let a = run(&net, &targets, &cfg);
    let b = run(&net, &targets, &cfg);
    let (va, vb) = (
        a.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    assert_eq!(va, vb);
    assert_eq!(a.history, b.history);
    let c = run(&net, &targets, &InversionConfig { seed: 4, ..cfg });
    let vc = c.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(va, vc, "another seed gives another start");
}

#[test]
fn bad_inputs_are_rejected() {
    let (net, _refs, targets) = setup();
    let wrong_size = InversionConfig {
        image_size: 112,
        ..config(1)
    };
    let err = invert(&net, &targets, &wrong_size).unwrap_err().to_string();
    assert!(err.contains("image_size"), "{err}");
    let wrong_dim = Tensor::zeros((2, EMB + 1), DType::F32, &Device::Cpu).unwrap();
    let err = invert(&net, &wrong_dim, &config(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("targets"), "{err}");
    let err = invert(
        &net,
        &targets,
        &InversionConfig {
            steps: 0,
            ..config(1)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("steps"), "{err}");
    let toml_like: InversionConfig = serde_json::from_str(r#"{"steps": 5, "lr": 0.3}"#).unwrap();
    assert_eq!(toml_like.steps, 5);
    assert_eq!(toml_like.bn_weight, InversionConfig::default().bn_weight);
    assert!(serde_json::from_str::<InversionConfig>(r#"{"stpes": 5}"#).is_err());
}

#[test]
fn png_grid_is_written_and_decodes() {
    let (net, refs, targets) = setup();
    let out = run(&net, &targets, &config(3));
    let dir = std::env::temp_dir().join(format!("fr-inversion-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("grid.png");
    save_png_grid(&path, &out.images, Some(&refs)).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    // 3 images → 2 columns × 2 rows of (reference | generated) tiles.
    let (w, h) = (2 * 2 * SIZE + 3 * GRID_GAP, 2 * SIZE + 3 * GRID_GAP);
    assert_eq!((img.width() as usize, img.height() as usize), (w, h));
    // The first reference's top-left pixel, mapped back to 8 bits.
    let r0 = refs.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    let expect = (r0 * 127.5 + 127.5).round().clamp(0.0, 255.0) as u8;
    assert_eq!(img.get_pixel(GRID_GAP as u32, GRID_GAP as u32)[0], expect);
    // Without references: one image per tile; no temporary file left behind.
    save_png_grid(&path, &out.images, None).unwrap();
    let img = image::open(&path).unwrap();
    assert_eq!(img.width() as usize, 2 * SIZE + 3 * GRID_GAP);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(save_png_grid(&path, &out.images, Some(&targets)).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn class_centres_can_be_inverted() {
    // Targets that are no image's embedding: random directions, as class centres of a head.
    let (net, _refs, _targets) = setup();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let v: Vec<f32> = (0..2 * EMB).map(|_| rng.random_range(-1.0..1.0)).collect();
    let centres = Tensor::from_vec(v, (2, EMB), &Device::Cpu).unwrap();
    let out = run(&net, &centres, &config(150));
    eprintln!("class-centre cosines {:?}", out.cosines);
    assert!(out.cosines.iter().all(|&c| c > 0.8), "{:?}", out.cosines);
}
