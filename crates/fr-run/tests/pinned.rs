//! Tiny runs of every training path pinned to the numbers of the code before the workflows
//! moved into this crate: `data/pinned_tiny_runs.json` holds what `cargo xtask reproduce` and
//! `cargo xtask train` printed into `metrics.json` / `train.json` at commit d235b44 (the last
//! commit before the move) for the overrides below. The runs cover the four epoch loops that
//! became one `fit`: a preset's methods with and without the reconstruction branch
//! (`lh2face`), the students with a head and label-free (`sface`), QuantFace's calibration and
//! distillation (`quantface`), and `train` on one process.
//!
//! On the machine that produced the file the numbers are bit-identical; the tolerances leave
//! room only for another CPU's matrix kernels summing in another order (relative 1e-4 on a
//! loss, one pair of 20 on an accuracy).

use std::path::{Path, PathBuf};

use fr_run::reproduce::ReproduceOptions;
use fr_run::train::TrainOptions;
use serde_json::Value;

const TINY: &[&str] = &[
    "train.epochs=2",
    "train.batch_size=16",
    "synthetic.train.num_identities=12",
    "synthetic.train.images_per_identity=4",
    "synthetic.test_identities=6",
    "synthetic.test_images_per_identity=3",
    "synthetic.pairs_per_subset=20",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn pinned() -> Value {
    serde_json::from_str(include_str!("data/pinned_tiny_runs.json")).unwrap()
}

fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("pinned")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn close_losses(what: &str, got: &Value, want: &Value) {
    let (got, want) = (got.as_array().unwrap(), want.as_array().unwrap());
    assert_eq!(got.len(), want.len(), "{what}: number of losses");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "{what}[{k}]: {g} (pinned {w})"
        );
    }
}

fn close_accuracy(what: &str, protocols: &Value, want: &Value) {
    for p in protocols.as_array().unwrap() {
        let name = p[0].as_str().unwrap();
        let got = p[1]["accuracy_mean"].as_f64().unwrap();
        let w = want[name].as_f64().unwrap();
        assert!(
            (got - w).abs() <= 0.05 + 1e-9,
            "{what} {name}: {got} (pinned {w})"
        );
    }
}

fn reproduce(paper: &str, extra: &[&str]) -> Value {
    let out = out_dir(paper);
    let options = ReproduceOptions {
        paper: Some(paper.into()),
        sets: TINY.iter().chain(extra).map(|s| s.to_string()).collect(),
        out: Some(out.clone()),
        ..ReproduceOptions::default()
    };
    fr_run::reproduce::run(&options, &root()).unwrap();
    read(&out.join("metrics.json"))
}

fn check_methods(paper: &str, metrics: &Value, want: &Value) {
    let methods = metrics["methods"].as_array().unwrap();
    assert_eq!(methods.len(), want.as_object().unwrap().len(), "{paper}");
    for m in methods {
        let name = m["method"].as_str().unwrap();
        let w = &want[name];
        close_losses(
            &format!("{paper} {name}"),
            &m["epoch_loss"],
            &w["epoch_loss"],
        );
        assert_eq!(m["steps"], w["steps"], "{paper} {name} steps");
        close_accuracy(&format!("{paper} {name}"), &m["protocols"], &w["accuracy"]);
    }
}

#[test]
fn methods_with_and_without_the_reconstruction_branch() {
    let want = &pinned()["reproduce"]["lh2face"];
    let metrics = reproduce("lh2face", &[]);
    check_methods("lh2face", &metrics, &want["methods"]);
}

#[test]
fn students_with_a_head_and_label_free() {
    let want = &pinned()["reproduce"]["sface"];
    let metrics = reproduce(
        "sface",
        &[
            "student_data.num_identities=12",
            "student_data.images_per_identity=4",
        ],
    );
    check_methods("sface", &metrics, &want["methods"]);
    for s in metrics["students"].as_array().unwrap() {
        let name = s["config"]["name"].as_str().unwrap();
        let w = &want["students"][name];
        close_losses(&format!("sface {name}"), &s["epoch_loss"], &w["epoch_loss"]);
        close_accuracy(&format!("sface {name}"), &s["protocols"], &w["accuracy"]);
    }
}

#[test]
fn quantface_calibration_and_distillation() {
    let want = &pinned()["reproduce"]["quantface"];
    let metrics = reproduce(
        "quantface",
        &["quant.epochs=1", "quant.calibration_batches=2"],
    );
    check_methods("quantface", &metrics, &want["methods"]);
    for s in metrics["quant"]["settings"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let w = &want["quant"][name];
        close_losses(
            &format!("quantface {name}"),
            &s["epoch_loss"],
            &w["epoch_loss"],
        );
        assert_eq!(s["steps"], w["steps"], "quantface {name} steps");
        close_accuracy(
            &format!("{name} calibrated"),
            &s["calibrated"],
            &w["calibrated"],
        );
        close_accuracy(
            &format!("{name} distilled"),
            &s["distilled"],
            &w["distilled"],
        );
    }
}

#[test]
fn train_on_one_process() {
    let want = &pinned()["train"];
    let out = out_dir("train");
    let options = TrainOptions {
        preset: "arcface".into(),
        sets: [
            "train.batch_size=8",
            "synthetic.train.num_identities=20",
            "synthetic.train.images_per_identity=8",
            "train.epochs=2",
        ]
        .map(String::from)
        .to_vec(),
        out: Some(out.clone()),
        ..TrainOptions::default()
    };
    fr_run::train::run_rank(&options, &root()).unwrap();
    let summary = read(&out.join("train.json"));
    assert_eq!(summary["steps"], want["steps"]);
    close_losses("train epoch", &summary["epoch_loss"], &want["epoch_loss"]);
    close_losses("train step", &summary["step_loss"], &want["step_loss"]);
}
