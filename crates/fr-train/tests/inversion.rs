//! ArcFace inversion on a tiny IResNet (32×32 input, widths 8–32), a small MobileFaceNet and a
//! small PocketNet whose BatchNorm running statistics come from training-mode forwards on
//! structured random images, and on a SphereNet with non-square input (no BatchNorm).

use candle_core::{DType, Device, ModuleT, Tensor};
use fr_backbone::{
    BnStatsForward, IResNet, IResNetConfig, MobileFaceNet, MobileFaceNetConfig, PocketNet,
    PocketNetConfig, SphereNet, SphereNetConfig,
};
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

/// `n` smooth square "faces" of side [`SIZE`] ([`structured_images_hw`]).
fn structured_images(n: usize, rng: &mut ChaCha8Rng) -> Tensor {
    structured_images_hw(n, SIZE, SIZE, rng)
}

/// `n` smooth `h × w` "faces": a per-image colour, a vertical and a horizontal ramp, and a
/// little noise, in [−1, 1]. Their statistics differ from the optimiser's uniform-noise start.
fn structured_images_hw(n: usize, h: usize, w: usize, rng: &mut ChaCha8Rng) -> Tensor {
    let mut v = Vec::with_capacity(n * 3 * h * w);
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
            for y in 0..h {
                for x in 0..w {
                    let (fy, fx) = (y as f32 / h as f32 - 0.5, x as f32 / w as f32 - 0.5);
                    let noise: f32 = rng.random_range(-0.1..0.1);
                    v.push((b + gy * fy + gx * fx + noise).clamp(-1.0, 1.0));
                }
            }
        }
    }
    Tensor::from_vec(v, (n, 3, h, w), &Device::Cpu).unwrap()
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

// ---------------------------------------------------------------------------------------------
// Other backbones through `BnStatsForward`.
// ---------------------------------------------------------------------------------------------

/// MobileFaceNet with one block per stage at 16×16 (1×1 GDC; its expansions stay 128–512
/// wide whatever the scale, so a larger input costs most of the test's time).
fn mobilefacenet_config() -> MobileFaceNetConfig {
    MobileFaceNetConfig {
        blocks: [1, 1, 1, 1],
        scale: 1,
        embedding_size: EMB,
        input_size: 16,
        ..MobileFaceNetConfig::mbf()
    }
}

/// PocketNetS scaled down by the overrides: C = 4, 4 cells, 32×32.
fn pocketnet_config() -> PocketNetConfig {
    PocketNetConfig::s()
        .with_channels(4)
        .with_cells(4)
        .with_input_size(SIZE)
        .with_embedding_size(EMB)
}

/// Settles the BatchNorm running statistics of `net` with `rounds` training forwards of 8
/// structured images (no gradients recorded); returns 3 reference images and their eval
/// embeddings as targets.
fn settle(net: &dyn BnStatsForward, rounds: usize) -> (Tensor, Tensor) {
    let (h, w) = net.input_shape();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for _ in 0..rounds {
        let batch = structured_images_hw(8, h, w, &mut rng);
        fr_kernels::no_grad(|| net.forward_t(&batch, true)).unwrap();
    }
    let refs = structured_images_hw(3, h, w, &mut rng);
    let targets = net.forward_t(&refs, false).unwrap().detach();
    (refs, targets)
}

/// [`config`] for the lightweight backbones: the image shape from the backbone, and a 10×
/// smaller BatchNorm weight, as the prior sums over many more BatchNorm layers (about 20 in
/// the small MobileFaceNet, 60 in the small PocketNet, against 18 in the tiny IResNet) and
/// would otherwise outweigh the identity term.
fn light_config(steps: usize) -> InversionConfig {
    InversionConfig {
        bn_weight: 0.005,
        image_size: 0,
        ..config(steps)
    }
}

/// Inverts `targets` through the `dyn` interface and checks every generated image: cos > 0.8
/// to its target, nearer to it than to the others, the reported cosines; and that the
/// BatchNorm prior fell.
fn assert_inverts(what: &str, net: &dyn BnStatsForward, targets: &Tensor, steps: usize) {
    let started = std::time::Instant::now();
    let out = invert(net, targets, &light_config(steps)).unwrap();
    let emb = net
        .forward_t(&out.images, false)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let tgt = targets.to_vec2::<f32>().unwrap();
    let (first, last) = (&out.history[0], out.history.last().unwrap());
    eprintln!(
        "{what}: {steps} steps in {:.1} s; initial mean cos {:.3}; final cosines {:?}; \
         bn prior {:.3} → {:.3}",
        started.elapsed().as_secs_f64(),
        1.0 - first.identity,
        out.cosines,
        first.bn_prior,
        last.bn_prior
    );
    assert!(
        1.0 - first.identity < 0.5,
        "{what}: the start already matches"
    );
    for (i, (e, t)) in emb.iter().zip(&tgt).enumerate() {
        let c = cos(e, t);
        assert!(
            (c - out.cosines[i]).abs() < 1e-3,
            "{what} {i}: {c} vs {}",
            out.cosines[i]
        );
        assert!(c > 0.8, "{what}: image {i}: cos {c} ≤ 0.8");
        for (j, u) in tgt.iter().enumerate().filter(|(j, _)| *j != i) {
            assert!(cos(e, u) < c, "{what}: image {i} is nearer to target {j}");
        }
    }
    assert!(
        last.bn_prior < first.bn_prior,
        "{what}: bn prior {} → {}",
        first.bn_prior,
        last.bn_prior
    );
}

#[test]
fn mobilefacenet_inversion_matches_its_targets() {
    let params = SeededVarMap::new(7);
    let net = MobileFaceNet::new(
        &mobilefacenet_config(),
        params.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    // 100 rounds: the running mean of the last BatchNorm (1-D) has to cancel an offset common
    // to all images before their embeddings point in different directions.
    let (_refs, targets) = settle(&net, 100);
    assert_inverts("MobileFaceNet", &net, &targets, 100);
}

#[test]
fn pocketnet_inversion_matches_its_targets() {
    let params = SeededVarMap::new(7);
    let net = PocketNet::new(
        &pocketnet_config(),
        params.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let (_refs, targets) = settle(&net, 20);
    assert_inverts("PocketNet", &net, &targets, 120);
}

#[test]
fn spherenet_inversion_runs_on_non_square_images() {
    let (h, w) = (32, 24);
    let cfg = SphereNetConfig {
        units: [1, 0, 0, 0],
        widths: [4, 8, 8, 16],
        embedding_size: 16,
        ..SphereNetConfig::sphere20()
    }
    .with_input_size(h, w);
    let net = SphereNet::new(
        &cfg,
        SeededVarMap::new(3).var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let (refs, _) = settle(&net, 0);
    // Random directions as targets: this untrained network maps every image to nearly the
    // same direction, so its own embeddings would be matched from the start.
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let v: Vec<f32> = (0..3 * 16).map(|_| rng.random_range(-1.0..1.0)).collect();
    let targets = Tensor::from_vec(v, (3, 16), &Device::Cpu).unwrap();
    let (_, stats) = net.forward_with_bn_stats(&refs).unwrap();
    assert!(stats.is_empty(), "SphereNet has no BatchNorm");
    let mut cfg = config(20);
    cfg.image_size = 0; // from the backbone: 32×24
    let out = invert(&net, &targets, &cfg).unwrap();
    assert_eq!(out.images.dims(), &[3, 3, h, w]);
    let (first, last) = (&out.history[0], out.history.last().unwrap());
    eprintln!(
        "SphereNet 32x24: total {:.4} → {:.4}, mean cos {:.3} → cosines {:?}",
        first.total,
        last.total,
        1.0 - first.identity,
        out.cosines
    );
    assert!(last.total < first.total && last.identity < first.identity - 0.05);
    assert!(out.history.iter().all(|s| s.bn_prior == 0.0));
    // A square image size cannot describe a 32×24 input.
    cfg.image_size = h;
    let err = invert(&net, &targets, &cfg).unwrap_err().to_string();
    assert!(err.contains("image_size"), "{err}");

    // The PNG grid keeps H ≠ W apart: 3 (reference | generated) tiles, 2 columns × 2 rows.
    let dir = std::env::temp_dir().join(format!("fr-inversion-hw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("grid.png");
    save_png_grid(&path, &out.images, Some(&refs)).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    let (gw, gh) = (2 * 2 * w + 3 * GRID_GAP, 2 * h + 3 * GRID_GAP);
    assert_eq!((img.width() as usize, img.height() as usize), (gw, gh));
    // The bottom-right pixel of generated image 1 (top row, second column, right half): with
    // H and W swapped anywhere in the layout it would be read from elsewhere.
    let flat = out.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let plane = h * w;
    for (ch, c) in [0usize, 1, 2].into_iter().enumerate() {
        let v = flat[3 * plane + c * plane + (h - 1) * w + (w - 1)];
        let expect = (v * 127.5 + 127.5).round().clamp(0.0, 255.0) as u8;
        let (x, y) = (
            GRID_GAP + (2 * w + GRID_GAP) + w + (w - 1),
            GRID_GAP + (h - 1),
        );
        assert_eq!(img.get_pixel(x as u32, y as u32)[ch], expect, "channel {c}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Per-channel mean and biased variance over (B, H, W) of a `(B, C, H, W)` tensor, on the host.
fn manual_stats(t: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let (b, c, h, w) = t.dims4().unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (mut mean, mut var) = (vec![0f64; c], vec![0f64; c]);
    for ch in 0..c {
        let vals: Vec<f64> = (0..b)
            .flat_map(|i| {
                let start = (i * c + ch) * h * w;
                v[start..start + h * w].iter().map(|&x| x as f64)
            })
            .collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        mean[ch] = m;
        var[ch] = vals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / vals.len() as f64;
    }
    (mean, var)
}

/// The taps of `net`: the first one (the stem's BatchNorm, on the stem convolution's output)
/// equals the manual statistics of `conv2d(x, stem_weight, stride 2, padding 1)`, the running
/// statistics are the variables', every BatchNorm2d is tapped once, the embedding is the eval
/// forward's, and the last tap carries a gradient back to the image.
fn check_taps(
    what: &str,
    net: &dyn BnStatsForward,
    varmap: &candle_nn::VarMap,
    stem: (&str, &str),
    batch_norms_1d: usize,
) {
    let (h, w) = net.input_shape();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = candle_core::Var::from_tensor(&structured_images_hw(4, h, w, &mut rng)).unwrap();
    let (emb, stats) = net.forward_with_bn_stats(x.as_tensor()).unwrap();
    let eval = fr_kernels::no_grad(|| net.forward_t(x.as_tensor(), false)).unwrap();
    let d = (&emb - &eval)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "{what}: tapped forward differs from eval by {d}");

    let data = varmap.data().lock().unwrap();
    let (conv_name, bn_name) = stem;
    assert_eq!(stats[0].name, bn_name, "{what}");
    let weight = data[&format!("{conv_name}.weight")].as_tensor().clone();
    let y = x.as_tensor().conv2d(&weight, 1, 2, 1, 1).unwrap();
    let (mean, var) = manual_stats(&y);
    let got_mean = stats[0].mean.to_vec1::<f32>().unwrap();
    let got_var = stats[0].var.to_vec1::<f32>().unwrap();
    assert_eq!(got_mean.len(), mean.len());
    for c in 0..mean.len() {
        let tol = 1e-5 * (1.0 + mean[c].abs().max(var[c]));
        assert!(
            (got_mean[c] as f64 - mean[c]).abs() < tol,
            "{what} mean {c}"
        );
        assert!((got_var[c] as f64 - var[c]).abs() < tol, "{what} var {c}");
    }
    for st in &stats {
        let rm = data[&format!("{}.running_mean", st.name)].as_tensor();
        let rv = data[&format!("{}.running_var", st.name)].as_tensor();
        assert_eq!(
            st.running_mean.to_vec1::<f32>().unwrap(),
            rm.to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            st.running_var.to_vec1::<f32>().unwrap(),
            rv.to_vec1::<f32>().unwrap()
        );
        assert_eq!(st.mean.dims(), rm.dims(), "{what} {}", st.name);
    }
    let bn_layers = data.keys().filter(|k| k.ends_with(".running_mean")).count();
    assert_eq!(
        stats.len() + batch_norms_1d,
        bn_layers,
        "{what}: one tap per BatchNorm2d"
    );
    let mut names: Vec<&str> = stats.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        stats.len(),
        "{what}: each BatchNorm tapped once"
    );
    drop(data);
    let grads = stats
        .last()
        .unwrap()
        .var
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads
        .get(x.as_tensor())
        .expect("no gradient reaches the image");
    let g = g
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(g > 0.0, "{what}: zero gradient from the last tap");
}

#[test]
fn bn_taps_of_mobilefacenet_and_pocketnet_equal_a_manual_computation() {
    let params = SeededVarMap::new(5);
    let mbf = MobileFaceNet::new(
        &mobilefacenet_config(),
        params.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    settle(&mbf, 3);
    check_taps(
        "MobileFaceNet",
        &mbf,
        params.varmap(),
        ("layers.0.layers.0", "layers.0.layers.1"),
        1, // features.layers.3
    );
    let params = SeededVarMap::new(5);
    let pocket = PocketNet::new(
        &pocketnet_config(),
        params.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    settle(&pocket, 3);
    check_taps(
        "PocketNet",
        &pocket,
        params.varmap(),
        ("stem.0", "stem.1"),
        0,
    );
}
