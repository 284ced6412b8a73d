//! `cargo xtask train` end to end on the CPU with tiny settings: the launcher starts one
//! process per rank (`--nproc`), the ranks meet over TCP, train data-parallel and stay in sync
//! (equal weight checksums); model-parallel Partial FC saves every rank's shard; mixed
//! precision runs; a failing rank stops the run with its rank named; `--gpus` without the NCCL
//! build says how to build.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Tiny data and budget: 20 identities × 8 images, batch 8 per rank, 2 epochs.
const TINY: &[&str] = &[
    "--set",
    "train.batch_size=8",
    "--set",
    "synthetic.train.num_identities=20",
    "--set",
    "synthetic.train.images_per_identity=8",
    "--set",
    "train.epochs=2",
];

/// The `fr` binary, run from the workspace root (where `configs/` is).
fn fr() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fr"));
    c.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    c
}

fn out_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("train")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn train(out: &Path, extra: &[&str]) -> Output {
    fr().args(["train", "arcface", "--out", out.to_str().unwrap()])
        .args(TINY)
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running the fr binary")
}

fn summary(out: &Path, run: &Output) -> Value {
    assert!(
        run.status.success(),
        "train failed\nstderr:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = std::fs::read_to_string(out.join("train.json")).expect("train.json");
    serde_json::from_str(&text).unwrap()
}

fn checksums(s: &Value) -> Vec<f64> {
    s["weight_checksums"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn two_processes_train_in_sync() {
    let out = out_dir("dp2");
    let s = summary(&out, &train(&out, &["--nproc", "2"]));
    assert_eq!(s["world_size"], 2);
    assert_eq!(s["backend"], "tcp");
    assert_eq!(s["global_batch_size"], 16);
    // 160 images / 16 per global batch = 10 steps per epoch.
    assert_eq!(s["steps"], 20);
    let sums = checksums(&s);
    assert_eq!(sums.len(), 2);
    assert_eq!(
        sums[0].to_bits(),
        sums[1].to_bits(),
        "replicas out of sync: {sums:?}"
    );
    let loss: Vec<f64> = s["epoch_loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(loss.iter().all(|l| l.is_finite()), "{loss:?}");
    assert!(loss[1] < loss[0], "the loss falls: {loss:?}");
    // Rank 0 wrote a loadable checkpoint with its model card; no other rank wrote one.
    let ckpt = PathBuf::from(s["checkpoint"].as_str().unwrap());
    assert!(ckpt.join("config.json").is_file(), "{}", ckpt.display());
    assert!(!out.join("checkpoints").join("rank-1").exists());
}

#[test]
fn sharded_partial_fc_saves_every_shard() {
    let out = out_dir("pfc2");
    let s = summary(
        &out,
        &train(&out, &["--nproc", "2", "--partial-fc-sample-rate", "0.5"]),
    );
    assert_eq!(s["partial_fc_sample_rate"], 0.5);
    let sums = checksums(&s);
    assert_eq!(
        sums[0].to_bits(),
        sums[1].to_bits(),
        "backbones out of sync: {sums:?}"
    );
    assert!(out
        .join("checkpoints")
        .join("rank-1")
        .join("latest")
        .exists());
    // A head outside the ArcFace family is refused, naming the flag.
    let bad = fr()
        .args(["train", "adaface", "--partial-fc-sample-rate", "0.5"])
        .args(TINY)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--partial-fc-sample-rate"));
}

#[test]
fn mixed_precision_single_process() {
    let out = out_dir("bf16");
    let s = summary(
        &out,
        &train(&out, &["--precision", "bf16", "--max-steps", "4"]),
    );
    assert_eq!(s["precision"], "bf16");
    assert_eq!(s["world_size"], 1);
    assert_eq!(s["steps"], 4);
    assert!(s["step_loss"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v.as_f64().unwrap().is_finite()));
}

#[test]
fn a_failing_rank_is_named_and_gpus_need_the_nccl_build() {
    let out = out_dir("fail");
    // A folder without train.rec: every worker fails opening it.
    let empty = out_dir("empty-rec");
    std::fs::create_dir_all(&empty).unwrap();
    let run = train(
        &out,
        &["--nproc", "2", "--train-rec", empty.to_str().unwrap()],
    );
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("failed") && err.contains("rank"), "{err}");
    // A missing folder is refused before any worker starts.
    let run = train(
        &out,
        &["--nproc", "2", "--train-rec", "/nonexistent-fr-rec"],
    );
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("--train-rec /nonexistent-fr-rec: not a folder"),
        "{err}"
    );
    assert!(!err.contains("rank"), "{err}");
    if !cfg!(feature = "nccl") {
        let run = train(&out, &["--gpus", "2"]);
        assert!(!run.status.success());
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains("--features cuda,cudnn,nccl"), "{err}");
    }
}

/// A run stopped by `--max-steps` inside an epoch and continued with `--resume` ends with the
/// weights of the uninterrupted run, bit for bit, having trained the same remaining steps; a
/// folder with an earlier run is refused without `--resume`.
#[test]
fn a_stopped_run_resumes_to_the_same_weights() {
    let full = out_dir("full");
    let whole = summary(&full, &train(&full, &["--nproc", "2"]));
    let part = out_dir("part");
    let first = summary(&part, &train(&part, &["--nproc", "2", "--max-steps", "7"]));
    assert_eq!(first["steps"], 7);
    let refused = train(&part, &["--nproc", "2"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--resume continues it"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let rest = summary(&part, &train(&part, &["--nproc", "2", "--resume"]));
    assert_eq!(rest["steps"], 20);
    let bits = |s: &Value| -> Vec<u64> { checksums(s).iter().map(|c| c.to_bits()).collect() };
    assert_eq!(
        bits(&rest),
        bits(&whole),
        "resumed weights differ from the whole run"
    );
    let losses = |s: &Value| -> Vec<f64> {
        s["step_loss"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses(&first), losses(&whole)[..7]);
    assert_eq!(losses(&rest), losses(&whole)[7..]);
}

/// Two "nodes" started with different flags are refused with the setting named; a run resumed
/// with another world size is refused; resuming a finished run trains nothing and keeps its
/// train.json.
#[test]
fn mismatched_settings_are_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let node = |rank: &str, extra: &[&str]| {
        let out = out_dir(&format!("node{rank}"));
        fr().args(["train", "arcface", "--out", out.to_str().unwrap()])
            .args(TINY)
            .args(["--nproc", "1", "--nnodes", "2", "--node-rank", rank])
            .args(["--master-port", &port, "--rendezvous-timeout", "60"])
            .args(extra)
            .env("FR_RUN_ID", "mismatch-test")
            .env("RUST_BACKTRACE", "0")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (node("0", &[]), node("1", &["--precision", "bf16"]));
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("the ranks do not train the same thing") && err.contains("--precision"),
            "{err}"
        );
    }
    let out = out_dir("resume-world");
    let _ = summary(&out, &train(&out, &["--nproc", "2", "--max-steps", "3"]));
    let changed = train(&out, &["--resume"]);
    assert!(!changed.status.success());
    let err = String::from_utf8_lossy(&changed.stderr);
    assert!(err.contains("the world size changed"), "{err}");
    let done = summary(&out, &train(&out, &["--nproc", "2", "--resume"]));
    assert_eq!(
        (done["first_step"].as_u64(), done["steps"].as_u64()),
        (Some(3), Some(20))
    );
    let again = train(&out, &["--nproc", "2", "--resume"]);
    assert!(again.status.success());
    let kept = summary(&out, &again);
    assert_eq!(
        kept["first_step"], 3,
        "train.json of the finished run is kept"
    );
}

/// `--val-bin` verifies every `--verbose` steps into train.json; `--frequent` writes a log line
/// every N steps into log.jsonl (the mean loss of those steps, lr, img/s, time left).
#[test]
fn verification_and_step_log_during_training() {
    let out = out_dir("val");
    let bin = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fr-data/tests/data/bin/pairs_py2_str.bin"
    );
    let run = train(
        &out,
        &["--val-bin", bin, "--verbose", "10", "--frequent", "5"],
    );
    let s = summary(&out, &run);
    let steps = s["steps"].as_u64().unwrap();
    assert_eq!(steps, 40, "20 identities × 8 images, batch 8, 2 epochs");
    let verified: Vec<(u64, String)> = s["verification"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v[0].as_u64().unwrap(), v[1].as_str().unwrap().to_string()))
        .collect();
    let expected: Vec<(u64, String)> = (1..=steps / 10)
        .map(|k| (10 * k, "pairs_py2_str".to_string()))
        .collect();
    assert_eq!(verified, expected);
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let logged: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(logged, (1..=steps / 5).map(|k| 5 * k).collect::<Vec<_>>());
    // Each line's loss is the mean of its 5 steps' losses in train.json.
    let step_loss: Vec<f64> = s["step_loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (k, l) in lines.iter().enumerate() {
        let mean = step_loss[5 * k..5 * k + 5].iter().sum::<f64>() / 5.0;
        let got = l["loss"].as_f64().unwrap();
        assert!(
            (got - mean).abs() <= 1e-9 * mean.abs(),
            "line {k}: {got} vs {mean}"
        );
        assert!(l["images_per_second"].as_f64().unwrap() > 0.0);
    }
}
