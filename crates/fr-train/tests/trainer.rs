//! The training step end to end on a tiny linear backbone and a plain softmax head.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{Init, Linear, VarBuilder, VarMap};
use fr_data::Batch;
use fr_heads::{Head, HeadOutput, StepContext};
use fr_train::{
    not_running_stat, AuxiliaryBatch, AuxiliaryLoss, AuxiliaryOutput, LrSchedule, OptimizerConfig,
    SeededVarMap, SgdConfig, Trainer, TrainerConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const IN: usize = 12; // images (B, 3, 2, 2)
const EMB: usize = 4;
const CLASSES: usize = 3;

/// Flatten → Linear, with a BatchNorm-like running mean of the embeddings.
struct TinyBackbone {
    fc: Linear,
    running_mean: Var,
}

impl ModuleT for TinyBackbone {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let e = self.fc.forward(&xs.flatten_from(1)?)?;
        if train {
            let batch_mean = e.detach().mean(0)?;
            let ema = ((self.running_mean.as_tensor() * 0.9)? + (batch_mean * 0.1)?)?;
            self.running_mean.set(&ema)?;
        }
        Ok(e)
    }
}

/// Softmax cross-entropy over a linear classifier, with an EMA of the loss as head state.
struct SoftmaxHead {
    weight: Tensor,
    ema_loss: Tensor,
}

impl Head for SoftmaxHead {
    fn name(&self) -> &'static str {
        "test_softmax"
    }

    fn forward(
        &mut self,
        embeddings: &Tensor,
        labels: &Tensor,
        ctx: &StepContext,
    ) -> fr_heads::Result<HeadOutput> {
        let logits = embeddings.matmul(&self.weight.t()?)?;
        let classes = Tensor::arange(0u32, CLASSES as u32, embeddings.device())?;
        let one_hot = labels
            .unsqueeze(1)?
            .broadcast_eq(&classes.unsqueeze(0)?)?
            .to_dtype(logits.dtype())?;
        let log_p = candle_nn::ops::log_softmax(&logits, 1)?;
        let loss = (log_p * one_hot)?.sum(1)?.mean_all()?.neg()?;
        if ctx.train {
            self.ema_loss = ((&self.ema_loss * 0.9)? + (loss.detach() * 0.1)?)?;
        }
        let stats = [(
            "ema_loss".to_string(),
            self.ema_loss.to_scalar::<f32>()? as f64,
        )]
        .into();
        Ok(HeadOutput {
            loss,
            logits,
            stats,
        })
    }

    fn state(&self) -> fr_heads::Result<Vec<(String, Tensor)>> {
        Ok(vec![("ema_loss".into(), self.ema_loss.clone())])
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> fr_heads::Result<()> {
        if let Some(t) = state.get("ema_loss") {
            self.ema_loss = t.clone();
        }
        Ok(())
    }
}

fn config() -> TrainerConfig {
    TrainerConfig {
        optimizer: OptimizerConfig::Sgd(SgdConfig {
            lr: 0.5,
            ..SgdConfig::default()
        }),
        schedule: LrSchedule::Poly {
            power: 1.0,
            warmup_steps: 2,
        },
        seed: 7,
        ..TrainerConfig::default()
    }
}

fn trainer(seed: u64, config: TrainerConfig) -> Trainer {
    trainer_with(seed, config, |_| ())
}

/// As [`trainer`], after `extra` has created more variables in the same map.
fn trainer_with(seed: u64, config: TrainerConfig, extra: impl FnOnce(&VarBuilder)) -> Trainer {
    let params = SeededVarMap::new(seed);
    let vb: VarBuilder = params.var_builder(DType::F32, &Device::Cpu);
    extra(&vb);
    let fc = candle_nn::linear(IN, EMB, vb.pp("fc")).unwrap();
    vb.get_with_hints(EMB, "running_mean", Init::Const(0.0))
        .unwrap();
    let weight = vb
        .get_with_hints(
            (CLASSES, EMB),
            "head.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )
        .unwrap();
    let varmap: VarMap = params.varmap().clone();
    let running_mean = varmap.data().lock().unwrap()["running_mean"].clone();
    let backbone = TinyBackbone { fc, running_mean };
    let head = SoftmaxHead {
        weight,
        ema_loss: Tensor::new(0f32, &Device::Cpu).unwrap(),
    };
    Trainer::new(
        Box::new(backbone),
        Box::new(head),
        varmap,
        config,
        not_running_stat,
    )
    .unwrap()
}

/// Batch `i` of a fixed synthetic set: class c has mean +2 on feature c.
fn batch(i: u64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + i % 4);
    let b = 12;
    let labels: Vec<u32> = (0..b).map(|j| (j % CLASSES) as u32).collect();
    let mut images = vec![0f32; b * IN];
    for (j, &y) in labels.iter().enumerate() {
        for k in 0..IN {
            let signal = if k == y as usize { 2.0 } else { 0.0 };
            images[j * IN + k] = signal + rng.random_range(-0.5..0.5);
        }
    }
    Batch {
        images: Tensor::from_vec(images, (b, 3, 2, 2), &Device::Cpu).unwrap(),
        labels: Tensor::new(labels, &Device::Cpu).unwrap(),
        indices: (0..b).collect(),
        quality: None,
    }
}

fn snapshot(varmap: &VarMap) -> BTreeMap<String, Vec<f32>> {
    let data = varmap.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

fn run(t: &mut Trainer, steps: std::ops::Range<u64>, total: u64) -> Vec<f64> {
    steps
        .map(|i| {
            let out = t.step(&batch(i), total).unwrap();
            assert!(!out.skipped);
            out.loss
        })
        .collect()
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fr-train-trainer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn loss_decreases() {
    let mut t = trainer(7, config());
    assert_eq!(
        t.trainable_names().collect::<Vec<_>>(),
        ["fc.bias", "fc.weight", "head.weight"]
    );
    let losses = run(&mut t, 0..40, 40);
    assert!(
        (losses[0] - (CLASSES as f64).ln()).abs() < 0.05,
        "{losses:?}"
    );
    assert!(losses[39] < 0.3 * losses[0], "{losses:?}");
    assert_eq!(t.state().step, 40);
    assert_eq!(t.state().skipped_steps, 0);
}

#[test]
fn same_seed_gives_bit_identical_losses() {
    let a = run(&mut trainer(7, config()), 0..10, 10);
    let b = run(&mut trainer(7, config()), 0..10, 10);
    assert_eq!(
        a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let c = run(&mut trainer(8, config()), 0..10, 10);
    assert_ne!(a, c);
}

#[test]
fn nan_batch_is_skipped_without_touching_weights() {
    let mut t = trainer(7, config());
    run(&mut t, 0..3, 10);
    let before = snapshot(t.varmap());
    let head_before = t.head().state().unwrap()[0].1.to_scalar::<f32>().unwrap();
    let mut bad = batch(3);
    bad.images = bad.images.affine(f64::NAN, 0.0).unwrap();
    let out = t.step(&bad, 10).unwrap();
    assert!(out.skipped && out.loss.is_nan() && out.grad_norm.is_none());
    assert_eq!(t.state().skipped_steps, 1);
    assert_eq!(t.state().step, 4);
    // Weights, running statistics and head state are as before the NaN batch.
    assert_eq!(snapshot(t.varmap()), before);
    let head_after = t.head().state().unwrap()[0].1.to_scalar::<f32>().unwrap();
    assert_eq!(head_before.to_bits(), head_after.to_bits());
    // Training goes on.
    let out = t.step(&batch(4), 10).unwrap();
    assert!(!out.skipped && out.loss.is_finite());
}

#[test]
fn consecutive_non_finite_steps_stop_the_run_with_a_diagnosis() {
    let mut t = trainer(
        7,
        TrainerConfig {
            max_consecutive_skips: 3,
            ..config()
        },
    );
    let finite = run(&mut t, 0..2, 20);
    let nan = |i: u64| {
        let mut b = batch(i);
        b.images = b.images.affine(f64::NAN, 0.0).unwrap();
        b
    };
    // Two skips, then a finite step resets the count.
    for i in 2..4 {
        assert!(t.step(&nan(i), 20).unwrap().skipped);
    }
    assert_eq!(t.state().consecutive_skips, 2);
    let last = t.step(&batch(4), 20).unwrap();
    assert!(!last.skipped);
    assert_eq!(t.state().consecutive_skips, 0);
    assert_eq!(t.state().last_finite_loss, Some((4, last.loss)));
    assert_ne!(finite[1], last.loss);
    // Three in a row: the third is an error naming the learning rate, the last finite loss
    // and the head.
    assert!(t.step(&nan(5), 20).unwrap().skipped);
    assert!(t.step(&nan(6), 20).unwrap().skipped);
    let err = t.step(&nan(7), 20).unwrap_err();
    let lr = config().schedule.lr_at(0.5, 7, 20);
    match &err {
        fr_train::Error::Diverged {
            step,
            skipped,
            what,
            head,
            lr: got_lr,
            last_finite_loss,
        } => {
            assert_eq!((*step, *skipped, what.as_str()), (7, 3, "loss"));
            assert_eq!(head, "test_softmax");
            assert_eq!(*got_lr, lr);
            assert_eq!(*last_finite_loss, Some((4, last.loss)));
        }
        e => panic!("expected Diverged, got {e}"),
    }
    let msg = err.to_string();
    for part in [
        "3 consecutive steps".to_string(),
        "test_softmax".to_string(),
        format!("learning rate {lr}"),
        format!("last finite loss {} at step 4", last.loss),
    ] {
        assert!(msg.contains(&part), "{part:?} not in {msg}");
    }
    assert_eq!(t.state().skipped_steps, 5);
    // 0 never stops.
    let mut t = trainer(
        7,
        TrainerConfig {
            max_consecutive_skips: 0,
            ..config()
        },
    );
    for i in 0..30 {
        assert!(t.step(&nan(i), 40).unwrap().skipped);
    }
}

#[test]
fn clipping_bounds_the_update() {
    let mut cfg = config();
    cfg.optimizer = OptimizerConfig::Sgd(SgdConfig {
        lr: 1.0,
        weight_decay: 0.0,
        ..SgdConfig::default()
    });
    cfg.schedule = LrSchedule::Constant { warmup_steps: 0 };
    cfg.clip_max_norm = Some(1e-3);
    let mut t = trainer(7, cfg);
    let before = snapshot(t.varmap());
    let out = t.step(&batch(0), 10).unwrap();
    assert!(out.grad_norm.unwrap() > 1e-3);
    let after = snapshot(t.varmap());
    let moved: f64 = before
        .iter()
        .filter(|(k, _)| not_running_stat(k))
        .flat_map(|(k, v)| {
            v.iter()
                .zip(&after[k])
                .map(|(a, b)| ((a - b) as f64).powi(2))
        })
        .sum::<f64>()
        .sqrt();
    // First step: Δθ = lr·clipped gradient, of norm max_norm.
    assert!((moved - 1e-3).abs() < 1e-5, "{moved}");
}

#[test]
fn resume_continues_exactly() {
    let total = 8;
    let straight = run(&mut trainer(7, config()), 0..total, total);

    let dir = tmpdir("resume");
    let card = fr_backbone::ModelCard::default().with_training_set("toy", Some(CLASSES), None);
    let mut first = trainer(7, config()).with_model_card(card);
    run(&mut first, 0..4, total);
    first.record_metric("loss", 0.5);
    let saved = first.save(&dir).unwrap();
    drop(first);
    // The model card next to the weights: the caller's fields, the head's name, the position
    // and the latest metrics.
    let card = fr_backbone::ModelCard::read(saved.join(fr_train::checkpoint::MODEL_CARD_FILE))
        .unwrap()
        .expect("config.json written with the checkpoint");
    assert_eq!(card.head.as_ref().unwrap().name, "test_softmax");
    assert_eq!(card.training_set.as_ref().unwrap().name, "toy");
    assert_eq!((card.step, card.epoch), (Some(4), Some(0)));
    assert_eq!(card.metrics["loss"], 0.5);

    // A different initial seed: everything must come from the checkpoint.
    let mut second = trainer(99, config());
    second.resume(&dir).unwrap();
    assert_eq!(second.state().step, 4);
    assert_eq!(second.state().metrics["loss"], vec![(4, 0.5)]);
    assert_eq!(second.state().model_card.as_ref(), Some(&card));
    let rest = run(&mut second, 4..total, total);
    assert_eq!(
        straight[4..]
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>(),
        rest.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adamw_from_a_config_file() {
    let cfg: TrainerConfig = serde_json::from_str(
        r#"{"optimizer": {"type": "adamw", "lr": 0.05},
            "schedule": {"type": "cosine", "warmup_steps": 1},
            "clip_max_norm": null}"#,
    )
    .unwrap();
    assert_eq!(cfg.clip_max_norm, None);
    let mut t = trainer(7, cfg);
    let losses = run(&mut t, 0..30, 30);
    assert!(losses[29] < 0.5 * losses[0], "{losses:?}");
    assert_eq!(t.optimizer().state().unwrap().len(), 9);
    assert!(serde_json::from_str::<TrainerConfig>(r#"{"clip": 5}"#).is_err());
}

/// A trainer over the tiny backbone with registry head `cfg` (paper defaults).
fn registry_trainer(seed: u64, cfg: &fr_heads::HeadConfig) -> Trainer {
    let params = SeededVarMap::new(seed);
    let vb: VarBuilder = params.var_builder(DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(IN, EMB, vb.pp("fc")).unwrap();
    vb.get_with_hints(EMB, "running_mean", Init::Const(0.0))
        .unwrap();
    let head = fr_heads::build_head(cfg, EMB, CLASSES, vb.pp("head")).unwrap();
    let varmap: VarMap = params.varmap().clone();
    let running_mean = varmap.data().lock().unwrap()["running_mean"].clone();
    Trainer::new(
        Box::new(TinyBackbone { fc, running_mean }),
        head,
        varmap,
        config(),
        not_running_stat,
    )
    .unwrap()
}

/// Every registered head, stateful ones included (EMA statistics, curriculum parameters,
/// prototype banks, sample memories, centres), resumes bit-identically from a checkpoint: the
/// head's state is saved with the weights and restored on resume.
#[test]
fn every_registered_head_resumes_exactly() {
    let total = 6;
    for name in fr_heads::HeadConfig::NAMES {
        let cfg = fr_heads::HeadConfig::default_for(name).unwrap();
        let losses = |t: &mut Trainer, steps: std::ops::Range<u64>| -> Vec<u64> {
            steps
                .map(|i| t.step(&batch(i), total).unwrap().loss.to_bits())
                .collect()
        };
        let straight = losses(&mut registry_trainer(7, &cfg), 0..total);
        let dir = tmpdir(&format!("resume-{name}"));
        let mut first = registry_trainer(7, &cfg);
        losses(&mut first, 0..3);
        first.save(&dir).unwrap();
        drop(first);
        let mut second = registry_trainer(99, &cfg);
        second.resume(&dir).unwrap();
        assert_eq!(
            straight[3..],
            losses(&mut second, 3..total)[..],
            "head {name} does not resume exactly"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// An auxiliary objective: `scale · ‖w − mean embedding‖²` over its own variable `aux.w`, plus
/// the head's loss on the detached embeddings called in eval mode (to check that the head's
/// state is left to the real batch).
struct PullToMean {
    w: Tensor,
    scale: f64,
}

impl AuxiliaryLoss for PullToMean {
    fn name(&self) -> &'static str {
        "pull_to_mean"
    }

    fn loss(
        &mut self,
        batch: &AuxiliaryBatch<'_>,
        backbone: &dyn ModuleT,
        head: &mut dyn Head,
    ) -> Result<AuxiliaryOutput, Box<dyn std::error::Error + Send + Sync>> {
        let again = backbone.forward_t(batch.images, false)?;
        assert_eq!(again.dims(), batch.embeddings.dims());
        let mean = batch.embeddings.mean(0)?;
        let pull = (&self.w - mean)?
            .sqr()?
            .sum_all()?
            .affine(self.scale, 0.0)?;
        let ctx = StepContext {
            train: false,
            ..*batch.ctx
        };
        let eval_loss = head.forward(&again.detach(), batch.labels, &ctx)?.loss;
        let stats = [("pull".to_string(), f64::from(pull.to_scalar::<f32>()?))].into();
        Ok(AuxiliaryOutput {
            loss: (pull + eval_loss.affine(0.0, 0.0)?)?,
            stats,
        })
    }
}

fn with_pull(seed: u64, scale: f64) -> Trainer {
    let mut w = None;
    let t = trainer_with(seed, config(), |vb| {
        w = Some(vb.get_with_hints(EMB, "aux.w", Init::Const(0.0)).unwrap());
    });
    t.with_auxiliary(Box::new(PullToMean {
        w: w.unwrap(),
        scale,
    }))
    .unwrap()
}

#[test]
fn auxiliary_loss_is_added_and_its_variables_are_optimised() {
    let mut t = with_pull(7, 1.0);
    assert!(t.has_auxiliary());
    assert!(t.trainable_names().any(|n| n == "aux.w"));
    let mut plain = trainer(7, config());
    let out = t.step(&batch(0), 10).unwrap();
    let reference = plain.step(&batch(0), 10).unwrap();
    assert!(!out.skipped);
    // Same head loss as without the auxiliary (same weights at step 0), plus the pull.
    assert_eq!(out.stats["head_loss"].to_bits(), reference.loss.to_bits());
    assert!((out.loss - reference.loss - out.stats["pull"]).abs() < 1e-6);
    assert!(out.stats["pull"] > 0.0);
    // The head saw the eval-mode call too, but its state follows the real batch only.
    let ema = |t: &Trainer| t.head().state().unwrap()[0].1.to_scalar::<f32>().unwrap();
    assert_eq!(ema(&t).to_bits(), ema(&plain).to_bits());
    // The auxiliary's variable moved towards the mean embedding.
    let w: Vec<f32> = snapshot(t.varmap())["aux.w"].clone();
    assert!(w.iter().any(|&x| x != 0.0), "{w:?}");
    let later: Vec<f64> = run(&mut t, 1..30, 30);
    assert!(later.iter().all(|l| l.is_finite()));
}

#[test]
fn auxiliary_training_is_bit_identical_for_a_seed() {
    let go = || {
        let mut t = with_pull(7, 0.5);
        run(&mut t, 0..5, 5)
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(go(), go());
}

#[test]
fn auxiliary_with_variables_created_late_is_rejected() {
    let t = trainer(1, config());
    // Variables added to the trainer's map after Trainer::new would never be optimised.
    let late = SeededVarMap::with_varmap(t.varmap().clone(), 1)
        .var_builder(DType::F32, &Device::Cpu)
        .get_with_hints(EMB, "aux.w", Init::Const(0.0))
        .unwrap();
    let err = t
        .with_auxiliary(Box::new(PullToMean {
            w: late,
            scale: 1.0,
        }))
        .err()
        .expect("late variables must be rejected")
        .to_string();
    assert!(
        err.contains("auxiliary") && err.contains("pull_to_mean"),
        "{err}"
    );
}

#[test]
fn non_finite_auxiliary_loss_skips_the_step() {
    let mut t = with_pull(7, f64::NAN);
    let before = snapshot(t.varmap());
    let out = t.step(&batch(0), 10).unwrap();
    assert!(out.skipped && out.loss.is_nan());
    assert_eq!(snapshot(t.varmap()), before);
    assert_eq!(t.state().skipped_steps, 1);
}

/// A frozen teacher: a fixed random linear map of the flattened images.
fn teacher(seed: u64) -> fr_train::Teacher {
    let params = SeededVarMap::new(seed);
    let fc = candle_nn::linear(
        IN,
        EMB,
        params.var_builder(DType::F32, &Device::Cpu).pp("fc"),
    )
    .unwrap();
    Box::new(TinyBackbone {
        fc,
        running_mean: Var::zeros(EMB, DType::F32, &Device::Cpu).unwrap(),
    })
}

/// MSE of the row-normalised `a` and `b`, computed by hand.
fn normalized_mse_by_hand(a: &Tensor, b: &Tensor) -> f64 {
    let rows = |t: &Tensor| -> Vec<Vec<f64>> {
        t.to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap()
            .into_iter()
            .map(|r| {
                let n = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                r.into_iter().map(|x| x / n).collect()
            })
            .collect()
    };
    let (a, b) = (rows(a), rows(b));
    let (mut sum, mut count) = (0.0, 0);
    for (ra, rb) in a.iter().zip(&b) {
        for (x, y) in ra.iter().zip(rb) {
            sum += (x - y) * (x - y);
            count += 1;
        }
    }
    sum / count as f64
}

#[test]
fn distillation_adds_weighted_normalised_mse_to_the_head_loss() {
    let weight = 100.0;
    let mut t = trainer(7, config())
        .with_auxiliary(Box::new(
            fr_train::Distillation::new(teacher(99), weight).unwrap(),
        ))
        .unwrap();
    let mut plain = trainer(7, config());
    let b = batch(0);
    // The student's embeddings before the step, and the teacher's, by hand.
    let student = t.backbone().forward_t(&b.images, false).unwrap();
    let target = teacher(99).forward_t(&b.images, false).unwrap();
    let expected = normalized_mse_by_hand(&student, &target);
    let out = t.step(&b, 10).unwrap();
    let reference = plain.step(&b, 10).unwrap();
    assert_eq!(out.stats["head_loss"].to_bits(), reference.loss.to_bits());
    assert!(
        (out.stats["kd_mse"] - expected).abs() < 1e-6,
        "{out:?} vs {expected}"
    );
    assert!((out.loss - reference.loss - weight * out.stats["kd_mse"]).abs() < 1e-4);
    // The pull towards the teacher lowers the MSE over a few steps.
    let first = out.stats["kd_mse"];
    let mut last = first;
    for i in 1..20 {
        last = t.step(&batch(i), 20).unwrap().stats["kd_mse"];
    }
    assert!(last < first * 0.5, "kd_mse {first} → {last}");
}

#[test]
fn multi_step_distillation_follows_the_epoch_plus_one_teacher() {
    let teachers = (0..3).map(|k| teacher(200 + k)).collect();
    let mut t = trainer(7, config())
        .with_auxiliary(Box::new(
            fr_train::Distillation::multi_step(teachers, 1.0).unwrap(),
        ))
        .unwrap();
    let b = batch(0);
    for (epoch, want) in [(0usize, 1u64), (1, 2), (2, 2), (5, 2)] {
        t.set_epoch(epoch);
        let student = t.backbone().forward_t(&b.images, false).unwrap();
        let target = teacher(200 + want).forward_t(&b.images, false).unwrap();
        let out = t.step(&b, 10).unwrap();
        assert_eq!(out.stats["kd_teacher"], want as f64, "epoch {epoch}");
        let expected = normalized_mse_by_hand(&student, &target);
        assert!(
            (out.stats["kd_mse"] - expected).abs() < 1e-6,
            "epoch {epoch}"
        );
    }
    assert!(fr_train::Distillation::multi_step(Vec::new(), 1.0).is_err());
    assert!(fr_train::Distillation::new(teacher(1), -1.0).is_err());
    assert!(fr_train::Distillation::new(teacher(1), f64::NAN).is_err());
}
