//! Mixed-precision training: bf16 / f16 backbones with f32 master weights, an f32 ArcFace head,
//! and the dynamic loss scaler.
//!
//! The backbone is a tiny conv → fc → PReLU → fc network with a BatchNorm-like running mean,
//! not an IResNet: with candle 0.11.1 an IResNet cannot take a half-precision training step on
//! the CPU (its conv2d has no bf16 kernel, and candle-nn's BatchNorm training forward fails on
//! bf16 and f16 running statistics; see the "Mixed precision" section of docs/scale.md).

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{Init, Linear, PReLU, VarMap};
use fr_heads::{Head, HeadConfig, HeadOutput, StepContext};
use fr_train::{
    load_checkpoint, not_running_stat, LossScalerConfig, LrSchedule, OptimizerConfig, Precision,
    SeededVarMap, SgdConfig, TrainState, Trainer, TrainerConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIDE: usize = 8; // images (B, 3, 8, 8)
const CONV: usize = 4; // conv channels, stride 2: (B, 4, 4, 4)
const HIDDEN: usize = 16;
const EMB: usize = 8;
const CLASSES: usize = 4;
const BATCH: usize = 16;

/// conv 3×3/2 → flatten → fc1 → PReLU → fc2, with a running mean of the embeddings kept, like
/// a BatchNorm statistic, in the backbone's dtype.
struct TinyNet {
    conv: Tensor,
    fc1: Linear,
    prelu: PReLU,
    fc2: Linear,
    running_mean: Var,
}

/// candle 0.11.1's CPU conv2d has no bf16 kernel ("unsupported dtype BF16 for op matmul"): a
/// bf16 convolution here widens its operands to f32 and rounds the output back to bf16, as
/// candle's own bf16 matmul does on the CPU.
fn conv2d(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::BF16 {
        x.to_dtype(DType::F32)?
            .conv2d(&w.to_dtype(DType::F32)?, 1, 2, 1, 1)?
            .to_dtype(DType::BF16)
    } else {
        x.conv2d(w, 1, 2, 1, 1)
    }
}

impl ModuleT for TinyNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = conv2d(x, &self.conv)?.flatten_from(1)?;
        let e = self
            .fc2
            .forward(&self.prelu.forward(&self.fc1.forward(&h)?)?)?;
        if train {
            let rm = self.running_mean.as_tensor();
            let batch = e.detach().to_dtype(DType::F32)?.mean(0)?;
            let ema = ((rm.to_dtype(DType::F32)? * 0.9)? + (batch * 0.1)?)?;
            self.running_mean.set(&ema.to_dtype(rm.dtype())?)?;
        }
        Ok(e)
    }
}

/// The backbone in `dtype` from `params` (variables created there if missing).
fn tiny_net(params: &SeededVarMap, dtype: DType) -> TinyNet {
    let vb = params.var_builder(dtype, &Device::Cpu);
    let conv = vb
        .get_with_hints(
            (CONV, 3, 3, 3),
            "conv.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.3,
            },
        )
        .unwrap();
    let fc1 = candle_nn::linear(CONV * (SIDE / 2) * (SIDE / 2), HIDDEN, vb.pp("fc1")).unwrap();
    let prelu = candle_nn::prelu(Some(HIDDEN), vb.pp("prelu")).unwrap();
    let fc2 = candle_nn::linear(HIDDEN, EMB, vb.pp("fc2")).unwrap();
    vb.get_with_hints(EMB, "running_mean", Init::Const(0.0))
        .unwrap();
    let running_mean = params.varmap().data().lock().unwrap()["running_mean"].clone();
    TinyNet {
        conv,
        fc1,
        prelu,
        fc2,
        running_mean,
    }
}

/// A head that reports, as the statistic `embeddings_f32` (1 or 0), whether it was given f32
/// embeddings: fr's heads compute in their input's dtype, so without the trainer's cast they
/// would run in bf16 / f16 silently.
struct DtypeProbe(Box<dyn Head>);

impl Head for DtypeProbe {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> fr_heads::Result<HeadOutput> {
        let mut out = self.0.forward(embeddings, labels, ctx)?;
        let f32_in = f64::from(u8::from(embeddings.dtype() == DType::F32));
        out.stats.insert("embeddings_f32".into(), f32_in);
        Ok(out)
    }

    fn state(&self) -> fr_heads::Result<Vec<(String, Tensor)>> {
        self.0.state()
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> fr_heads::Result<()> {
        self.0.load_state(state)
    }
}

fn config(precision: Precision) -> TrainerConfig {
    TrainerConfig {
        optimizer: OptimizerConfig::Sgd(SgdConfig {
            lr: 0.1,
            ..SgdConfig::default()
        }),
        schedule: LrSchedule::Constant { warmup_steps: 0 },
        seed: 7,
        precision,
        ..TrainerConfig::default()
    }
}

/// The tiny backbone in `config.precision` and an ArcFace head (paper defaults) in f32, on
/// one VarMap.
fn trainer(seed: u64, config: TrainerConfig) -> Trainer {
    try_trainer(seed, config).unwrap()
}

fn try_trainer(seed: u64, config: TrainerConfig) -> fr_train::Result<Trainer> {
    let params = SeededVarMap::new(seed);
    let backbone = tiny_net(&params, config.precision.backbone_dtype());
    let head = fr_heads::build_head(
        &HeadConfig::default_for("arcface").unwrap(),
        EMB,
        CLASSES,
        params.var_builder(DType::F32, &Device::Cpu).pp("head"),
    )
    .unwrap();
    Trainer::new(
        Box::new(backbone),
        Box::new(DtypeProbe(head)),
        params.varmap().clone(),
        config,
        not_running_stat,
    )
}

/// A fixed batch: one random prototype image per class plus noise, in f32.
fn batch(seed: u64) -> (Tensor, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = 3 * SIDE * SIDE;
    let protos: Vec<Vec<f32>> = (0..CLASSES)
        .map(|_| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let labels: Vec<u32> = (0..BATCH).map(|i| (i % CLASSES) as u32).collect();
    let images: Vec<f32> = labels
        .iter()
        .flat_map(|&y| {
            let p = protos[y as usize].clone();
            p.into_iter()
                .map(|v| v + rng.random_range(-0.3..0.3))
                .collect::<Vec<_>>()
        })
        .collect();
    (
        Tensor::from_vec(images, (BATCH, 3, SIDE, SIDE), &Device::Cpu).unwrap(),
        Tensor::new(labels, &Device::Cpu).unwrap(),
    )
}

/// Every variable's values, widened to f32 (exact from bf16 / f16).
fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn snapshot(varmap: &VarMap) -> BTreeMap<String, Vec<f32>> {
    let data = varmap.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| (k.clone(), values(v.as_tensor())))
        .collect()
}

fn master_snapshot(t: &Trainer) -> BTreeMap<String, Vec<f32>> {
    t.master_weights()
        .unwrap()
        .masters()
        .map(|(n, v)| (n.to_string(), values(v.as_tensor())))
        .collect()
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fr-train-precision-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

const BACKBONE_PARAMS: [&str; 6] = [
    "conv.weight",
    "fc1.bias",
    "fc1.weight",
    "fc2.bias",
    "fc2.weight",
    "prelu.weight",
];

#[test]
fn config_parses_and_validation_names_the_key() {
    // Configs without the new keys still parse: f32, scaler off.
    let cfg: TrainerConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg.precision, Precision::F32);
    assert_eq!(cfg.loss_scaler, LossScalerConfig::default());
    assert!(!cfg.loss_scaler.enabled_for(cfg.precision));
    let cfg: TrainerConfig = serde_json::from_str(
        r#"{"precision": "f16", "loss_scaler": {"init_scale": 1024, "growth_interval": 10}}"#,
    )
    .unwrap();
    assert_eq!(cfg.precision, Precision::F16);
    assert_eq!(cfg.precision.backbone_dtype(), DType::F16);
    assert_eq!(
        (cfg.loss_scaler.init_scale, cfg.loss_scaler.growth_interval),
        (1024.0, 10)
    );
    assert_eq!(cfg.loss_scaler.growth_factor, 2.0);
    assert!(cfg.loss_scaler.enabled_for(Precision::F16));
    assert!(!cfg.loss_scaler.enabled_for(Precision::Bf16));
    let forced = LossScalerConfig {
        enabled: Some(false),
        ..LossScalerConfig::default()
    };
    assert!(!forced.enabled_for(Precision::F16));
    cfg.validate().unwrap();
    // Names, serde and FromStr agree.
    for (p, name, dtype) in [
        (Precision::F32, "f32", DType::F32),
        (Precision::Bf16, "bf16", DType::BF16),
        (Precision::F16, "f16", DType::F16),
    ] {
        assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{name}\""));
        assert_eq!(name.parse::<Precision>().unwrap(), p);
        assert_eq!(p.to_string(), name);
        assert_eq!(p.backbone_dtype(), dtype);
    }
    assert!(serde_json::from_str::<TrainerConfig>(r#"{"precision": "fp16"}"#).is_err());
    assert!(serde_json::from_str::<TrainerConfig>(r#"{"loss_scaler": {"init_scal": 1}}"#).is_err());
    // Each bad value is refused, naming its key.
    let bad = |f: fn(&mut LossScalerConfig), key: &str| {
        let mut cfg = config(Precision::F16);
        f(&mut cfg.loss_scaler);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
        let err = try_trainer(1, cfg)
            .err()
            .expect("invalid config accepted")
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
    };
    bad(|c| c.init_scale = 0.0, "loss_scaler.init_scale");
    bad(|c| c.init_scale = f64::NAN, "loss_scaler.init_scale");
    bad(|c| c.init_scale = 1e39, "loss_scaler.init_scale");
    bad(|c| c.growth_factor = 1.0, "loss_scaler.growth_factor");
    bad(|c| c.backoff_factor = 1.0, "loss_scaler.backoff_factor");
    bad(|c| c.backoff_factor = 0.0, "loss_scaler.backoff_factor");
    bad(|c| c.growth_interval = 0, "loss_scaler.growth_interval");
    // A bf16 trainer over an f32 backbone is refused, naming the key.
    let params = SeededVarMap::new(1);
    let net = tiny_net(&params, DType::F32);
    let head = fr_heads::build_head(
        &HeadConfig::default_for("arcface").unwrap(),
        EMB,
        CLASSES,
        params.var_builder(DType::F32, &Device::Cpu).pp("head"),
    )
    .unwrap();
    let err = Trainer::new(
        Box::new(net),
        head,
        params.varmap().clone(),
        config(Precision::Bf16),
        not_running_stat,
    )
    .err()
    .expect("an f32 backbone in a bf16 trainer")
    .to_string();
    assert!(err.contains("precision") && err.contains("BF16"), "{err}");
    // Checkpoints from before the scaler have no `loss_scaler` in state.json.
    let old: TrainState = serde_json::from_str(r#"{"step": 5}"#).unwrap();
    assert_eq!((old.step, old.loss_scaler), (5, None));
}

#[test]
fn bf16_backbone_trains_on_f32_masters_and_saves_f32_weights() {
    let mut t = trainer(7, config(Precision::Bf16));
    // Masters for the bf16 backbone's trainable variables only; the f32 head is its own.
    let masters = t.master_weights().expect("bf16 training has masters");
    assert_eq!(
        masters.masters().map(|(n, _)| n).collect::<Vec<_>>(),
        BACKBONE_PARAMS
    );
    assert!(masters.masters().all(|(_, m)| m.dtype() == DType::F32));
    assert!(masters.get("head.weight").is_none());
    {
        let data = t.varmap().data().lock().unwrap();
        for name in BACKBONE_PARAMS.iter().chain(&["running_mean"]) {
            assert_eq!(data[*name].dtype(), DType::BF16, "{name}");
        }
        assert_eq!(data["head.weight"].dtype(), DType::F32);
    }
    assert!(t.loss_scaler().is_none(), "bf16 needs no loss scaler");

    let (images, labels) = batch(1);
    let start = snapshot(t.varmap());
    let mut losses = Vec::new();
    for _ in 0..10 {
        let out = t.step_tensors(&images, &labels, 10).unwrap();
        assert!(
            !out.skipped && out.grad_norm.unwrap().is_finite(),
            "{out:?}"
        );
        assert!(!out.stats.contains_key("loss_scale"));
        assert_eq!(out.stats["embeddings_f32"], 1.0, "the head must run in f32");
        losses.push(out.loss);
        // Each model variable is its master rounded to bf16.
        let data = t.varmap().data().lock().unwrap();
        for (name, m) in t.master_weights().unwrap().masters() {
            let rounded = values(&m.as_tensor().to_dtype(DType::BF16).unwrap());
            assert_eq!(values(data[name].as_tensor()), rounded, "{name}");
        }
    }
    assert!(losses[9] < 0.5 * losses[0], "{losses:?}");
    let end = snapshot(t.varmap());
    assert_ne!(start["running_mean"], end["running_mean"]);
    assert_ne!(start["head.weight"], end["head.weight"]);

    // The checkpoint holds f32 weights: the masters, and the bf16 buffer widened.
    let dir = tmpdir("bf16-save");
    let saved = t.save(&dir).unwrap();
    let file =
        candle_core::safetensors::load(saved.join(fr_train::checkpoint::MODEL_FILE), &Device::Cpu)
            .unwrap();
    assert_eq!(file.len(), end.len());
    assert!(file.values().all(|w| w.dtype() == DType::F32));
    for (name, m) in master_snapshot(&t) {
        assert_eq!(values(&file[&name]), m, "{name}");
        assert_ne!(
            m, end[&name],
            "{name}: the master is finer than its bf16 copy"
        );
    }
    assert_eq!(values(&file["running_mean"]), end["running_mean"]);
    assert_eq!(values(&file["head.weight"]), end["head.weight"]);
    // An f32 model (for evaluation) loads it as it is.
    let f32_params = SeededVarMap::new(99);
    tiny_net(&f32_params, DType::F32);
    fr_heads::build_head(
        &HeadConfig::default_for("arcface").unwrap(),
        EMB,
        CLASSES,
        f32_params.var_builder(DType::F32, &Device::Cpu).pp("head"),
    )
    .unwrap();
    load_checkpoint(&dir, f32_params.varmap()).unwrap();
    let loaded = snapshot(f32_params.varmap());
    for (name, m) in master_snapshot(&t) {
        assert_eq!(loaded[&name], m, "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();

    // Plain f32 training has neither masters nor a scaler.
    let mut plain = trainer(7, config(Precision::F32));
    assert!(plain.master_weights().is_none() && plain.loss_scaler().is_none());
    let out = plain.step_tensors(&images, &labels, 10).unwrap();
    assert!(!out.skipped && !out.stats.contains_key("loss_scale"));
}

/// One SGD step from the same initial weights in bf16 (no scaler) or f16 (loss scale 1024)
/// and in f32: the updates of every parameter (half: of the masters) agree with the f32 ones
/// to 2 % in relative L2 norm (measured: bf16 at most 0.8 %), the losses and the (unscaled)
/// gradient norms to 0.1 %.
#[test]
fn half_precision_step_is_close_to_the_f32_step() {
    let f16 = TrainerConfig {
        loss_scaler: LossScalerConfig {
            init_scale: 1024.0,
            ..LossScalerConfig::default()
        },
        ..config(Precision::F16)
    };
    for cfg in [config(Precision::Bf16), f16] {
        let precision = cfg.precision;
        let mut half = trainer(7, cfg);
        let mut full = trainer(7, config(Precision::F32));
        // Start the f32 model from the half values (the initialisations round differently).
        {
            let h = half.varmap().data().lock().unwrap();
            let f = full.varmap().data().lock().unwrap();
            for (name, var) in f.iter() {
                var.set(&h[name].as_tensor().to_dtype(DType::F32).unwrap())
                    .unwrap();
            }
        }
        let before = snapshot(full.varmap());
        let (images, labels) = batch(2);
        let a = half.step_tensors(&images, &labels, 10).unwrap();
        let b = full.step_tensors(&images, &labels, 10).unwrap();
        assert!(!a.skipped && !b.skipped);
        let close = |x: f64, y: f64| (x - y).abs() < 1e-3 * y.abs();
        assert!(
            close(a.loss, b.loss),
            "{precision}: loss {} vs {}",
            a.loss,
            b.loss
        );
        let (na, nb) = (a.grad_norm.unwrap(), b.grad_norm.unwrap());
        assert!(close(na, nb), "{precision}: gradient norm {na} vs {nb}");
        let mut after_half = master_snapshot(&half);
        after_half.insert(
            "head.weight".into(),
            snapshot(half.varmap())["head.weight"].clone(),
        );
        assert_eq!(after_half.len(), BACKBONE_PARAMS.len() + 1);
        let after_full = snapshot(full.varmap());
        for (name, h) in &after_half {
            let (f, b0) = (&after_full[name], &before[name]);
            let (mut diff, mut norm) = (0.0f64, 0.0f64);
            for ((h, f), b0) in h.iter().zip(f).zip(b0) {
                let (dh, df) = (f64::from(h - b0), f64::from(f - b0));
                diff += (dh - df).powi(2);
                norm += df.powi(2);
            }
            let rel = (diff / norm).sqrt();
            assert!(
                norm > 0.0 && rel < 0.02,
                "{precision} {name}: relative difference {rel}"
            );
        }
    }
}

fn f16_config(init_scale: f64, growth_interval: u64) -> TrainerConfig {
    TrainerConfig {
        loss_scaler: LossScalerConfig {
            init_scale,
            growth_interval,
            ..LossScalerConfig::default()
        },
        max_consecutive_skips: 2,
        ..config(Precision::F16)
    }
}

#[test]
fn f16_overflow_skips_the_step_and_backs_off_without_diverging() {
    let mut t = trainer(7, f16_config(1e38, 100));
    assert_eq!(t.loss_scaler().unwrap().scale(), 1e38);
    let (images, labels) = batch(3);
    let weights = snapshot(t.varmap());
    let masters = master_snapshot(&t);
    // Four overflows in a row: more than max_consecutive_skips, yet no Diverged.
    for i in 0..4 {
        let out = t.step_tensors(&images, &labels, 10).unwrap();
        let used = 1e38 * 0.5f64.powi(i);
        assert!(out.skipped && out.loss.is_finite(), "{out:?}");
        assert!(!out.grad_norm.unwrap().is_finite());
        assert_eq!(out.stats["loss_scale"], used);
        assert_eq!(t.loss_scaler().unwrap().scale(), used * 0.5);
    }
    // Nothing moved: weights, masters, the running mean.
    assert_eq!(snapshot(t.varmap()), weights);
    assert_eq!(master_snapshot(&t), masters);
    let st = t.state();
    assert_eq!((st.step, st.skipped_steps, st.consecutive_skips), (4, 4, 0));
    let scaler = st.loss_scaler.unwrap();
    assert_eq!(
        (scaler.scale, scaler.good_steps, scaler.overflows),
        (6.25e36, 0, 4)
    );

    // A non-finite loss is not an overflow: counted, and the scale stays.
    let nan = images.affine(f64::NAN, 0.0).unwrap();
    let out = t.step_tensors(&nan, &labels, 10).unwrap();
    assert!(out.skipped && out.loss.is_nan());
    assert_eq!(t.state().consecutive_skips, 1);
    assert_eq!(t.loss_scaler().unwrap().scale(), 6.25e36);
    assert!(
        t.step_tensors(&nan, &labels, 10).is_err(),
        "2nd NaN loss diverges"
    );
}

#[test]
fn f16_scale_grows_after_growth_interval_good_steps() {
    let mut t = trainer(7, f16_config(256.0, 3));
    let (images, labels) = batch(4);
    let mut scales = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..7 {
        let out = t.step_tensors(&images, &labels, 10).unwrap();
        assert!(!out.skipped, "{out:?}");
        assert_eq!(out.stats["embeddings_f32"], 1.0, "the head must run in f32");
        scales.push(out.stats["loss_scale"]);
        losses.push(out.loss);
    }
    assert_eq!(scales, [256.0, 256.0, 256.0, 512.0, 512.0, 512.0, 1024.0]);
    assert_eq!(t.loss_scaler().unwrap().state().good_steps, 1);
    assert!(losses[6] < losses[0], "{losses:?}");
    // f16 model variables are their masters rounded to f16.
    let data = t.varmap().data().lock().unwrap();
    for (name, m) in t.master_weights().unwrap().masters() {
        assert_eq!(data[name].dtype(), DType::F16);
        let rounded = values(&m.as_tensor().to_dtype(DType::F16).unwrap());
        assert_eq!(values(data[name].as_tensor()), rounded, "{name}");
    }
}

#[test]
fn f16_resume_restores_scaler_and_masters_exactly() {
    let total = 8;
    let (images, labels) = batch(5);
    let run = |t: &mut Trainer, n: usize| -> (Vec<f64>, Vec<f64>) {
        (0..n)
            .map(|_| {
                let out = t.step_tensors(&images, &labels, total).unwrap();
                (out.loss, out.stats["loss_scale"])
            })
            .unzip()
    };
    let (straight, straight_scales) = run(&mut trainer(7, f16_config(256.0, 3)), 8);

    let dir = tmpdir("f16-resume");
    let mut first = trainer(7, f16_config(256.0, 3));
    run(&mut first, 5);
    let at_save = first.loss_scaler().unwrap().state();
    assert_eq!((at_save.scale, at_save.good_steps), (512.0, 2));
    first.save(&dir).unwrap();
    let masters = master_snapshot(&first);
    drop(first);

    // Another seed and a fresh scaler: everything comes from the checkpoint.
    let mut second = trainer(99, f16_config(256.0, 3));
    second.resume(&dir).unwrap();
    assert_eq!(second.loss_scaler().unwrap().state(), at_save);
    assert_eq!(second.state().loss_scaler, Some(at_save));
    assert_eq!(master_snapshot(&second), masters);
    let (rest, rest_scales) = run(&mut second, 3);
    assert_eq!(bits(&straight[5..]), bits(&rest));
    assert_eq!(straight_scales[5..], rest_scales[..]);
    assert_eq!(rest_scales, [512.0, 1024.0, 1024.0]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bf16_same_seed_gives_bit_identical_losses() {
    let go = |seed: u64| {
        let mut t = trainer(seed, config(Precision::Bf16));
        let (images, labels) = batch(6);
        let losses: Vec<f64> = (0..5)
            .map(|_| t.step_tensors(&images, &labels, 5).unwrap().loss)
            .collect();
        (bits(&losses), master_snapshot(&t))
    };
    let a = go(7);
    assert_eq!(a, go(7));
    assert_ne!(a.0, go(8).0);
}

/// A backbone of fr-backbone that trains in f16 on the CPU: SphereNet (convolutions with bias
/// and PReLU, no BatchNorm). With the default scaler (65536) its first steps overflow; the
/// scale backs off by halves until the gradients fit in f16, without stopping the run, and
/// training then proceeds.
#[test]
fn f16_spherenet_trains_with_the_default_loss_scaler() {
    use fr_backbone::{SphereNet, SphereNetConfig};
    const SIZE: usize = 16;
    let params = SeededVarMap::new(3);
    let net_cfg = SphereNetConfig {
        units: [0, 1, 0, 0],
        widths: [4, 8, 8, 16],
        embedding_size: EMB,
        input_size: [SIZE, SIZE],
        ..SphereNetConfig::default()
    };
    let precision = Precision::F16;
    let vb = params.var_builder(precision.backbone_dtype(), &Device::Cpu);
    let net = SphereNet::new(&net_cfg, vb).unwrap();
    let head = fr_heads::build_head(
        &HeadConfig::default_for("arcface").unwrap(),
        EMB,
        CLASSES,
        params.var_builder(DType::F32, &Device::Cpu).pp("head"),
    )
    .unwrap();
    let config = TrainerConfig {
        max_consecutive_skips: 3,
        ..config(precision)
    };
    assert_eq!(config.loss_scaler, LossScalerConfig::default());
    let mut t = Trainer::new(
        Box::new(net),
        Box::new(DtypeProbe(head)),
        params.varmap().clone(),
        config,
        not_running_stat,
    )
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let n = 3 * SIZE * SIZE;
    let protos: Vec<Vec<f32>> = (0..CLASSES)
        .map(|_| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let labels: Vec<u32> = (0..BATCH).map(|i| (i % CLASSES) as u32).collect();
    let images: Vec<f32> = labels
        .iter()
        .flat_map(|&y| protos[y as usize].clone())
        .map(|v| v + rng.random_range(-0.3..0.3))
        .collect();
    let images = Tensor::from_vec(images, (BATCH, 3, SIZE, SIZE), &Device::Cpu).unwrap();
    let labels = Tensor::new(labels, &Device::Cpu).unwrap();
    let outs: Vec<_> = (0..30)
        .map(|_| t.step_tensors(&images, &labels, 30).unwrap())
        .collect();
    // Measured here: 7 overflows (65536 → 512).
    let overflows = outs.iter().take_while(|o| o.skipped).count();
    assert!((1..16).contains(&overflows), "{overflows} overflows");
    for (i, o) in outs[..overflows].iter().enumerate() {
        assert!(
            o.loss.is_finite() && !o.grad_norm.unwrap().is_finite(),
            "{o:?}"
        );
        assert_eq!(o.stats["loss_scale"], 65536.0 * 0.5f64.powi(i as i32));
    }
    let good = &outs[overflows..];
    assert!(good
        .iter()
        .all(|o| !o.skipped && o.stats["embeddings_f32"] == 1.0));
    assert_eq!(t.state().consecutive_skips, 0);
    let (first, last) = (good[0].loss, good[good.len() - 1].loss);
    assert!(last < 0.3 * first, "loss {first} → {last}");
}
