//! `cargo xtask bench gpu` end to end, on the CPU in a tiny configuration (the narrow
//! `default` IResNet at 16×16, 10 classes, batch 4): the binary runs training and inference,
//! prints the Markdown rows and writes the JSON that `benchmarks/gpu_bench.py --fr-json` reads.
//! Also in bf16 and f16 (the mixed-precision trainer paths), and the error of a build without
//! CUDA.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

/// Run the xtask binary with `args`; panics with its output when it fails to start.
fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running the xtask binary")
}

/// Tiny `bench gpu --device cpu` options, writing JSON to `json`.
fn tiny_args<'a>(json: &'a str, precision: &'a str) -> Vec<&'a str> {
    vec![
        "bench",
        "gpu",
        "--device",
        "cpu",
        "--models",
        "default",
        "--input-size",
        "16",
        "--batch",
        "4",
        "--infer-batch",
        "4",
        "--classes",
        "10",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--precision",
        precision,
        "--json",
        json,
    ]
}

/// Run the tiny benchmark in `precision`; check the printed rows and the JSON.
fn check_tiny_run(precision: &str) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench_gpu");
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join(format!("fr-{precision}.json"));
    let _ = std::fs::remove_file(&json);
    let out = xtask(&tiny_args(json.to_str().unwrap(), precision));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench gpu failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains(
            "| date | framework | device | model | mode | precision | batch | images/s |"
        ),
        "no Markdown header in:\n{stdout}"
    );
    for mode in ["train", "infer"] {
        assert!(
            stdout.contains(&format!("| default | {mode} | {precision} | 4 |")),
            "no {mode} row in:\n{stdout}"
        );
    }

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["framework"], "fr");
    assert!(report["device"].as_str().is_some_and(|d| !d.is_empty()));
    let rows = report["rows"].as_array().expect("rows array");
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["train", "infer"]);
    for row in rows {
        for key in ["date", "framework", "device", "model", "mode", "precision"] {
            assert!(
                row[key].as_str().is_some_and(|v| !v.is_empty()),
                "{key} missing in {row}"
            );
        }
        let date = row["date"].as_str().unwrap();
        assert!(
            date.len() == 10 && date.as_bytes()[4] == b'-' && date.starts_with("20"),
            "date {date}"
        );
        assert_eq!(row["model"], "default");
        assert_eq!(row["precision"], precision);
        assert_eq!(row["batch"], 4);
        assert_eq!(row["input_size"], 16);
        assert_eq!(row["steps"], 2);
        let ips = row["images_per_s"].as_f64().expect("images_per_s");
        assert!(ips.is_finite() && ips > 0.0, "images/s {ips} in {row}");
        assert!(row["seconds"].as_f64().is_some_and(|s| s > 0.0));
    }
    assert_eq!(rows[0]["classes"], 10);
    assert!(rows[0]["skipped_steps"].as_u64().is_some_and(|n| n <= 2));
    assert!(rows[1]["classes"].is_null());
    assert!(rows[1]["skipped_steps"].is_null());
}

#[test]
fn bench_gpu_on_the_cpu_prints_rows_and_writes_json() {
    check_tiny_run("f32");
}

/// The default, mixed-precision path: bf16 backbone, f32 master weights and head.
#[test]
fn bench_gpu_bf16_runs_on_the_cpu() {
    check_tiny_run("bf16");
}

/// f16 backbone with the dynamic loss scaler (its first steps may be skipped as the scale
/// backs off; the row counts them).
#[test]
fn bench_gpu_f16_runs_on_the_cpu() {
    check_tiny_run("f16");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn bench_gpu_without_cuda_explains_how_to_build() {
    let out = xtask(&["bench", "gpu", "--models", "r18"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--features cuda") && stderr.contains("--device cpu"),
        "{stderr}"
    );
}
