//! Fuzzing of checkpoint loading: a real save's files (`state.json`, the three safetensors
//! files, `config.json`, `checksums.sha256`, `latest`) with bits flipped, bytes overwritten,
//! truncated or extended, then loaded through [`load_checkpoint`]. Half of the inputs get
//! their checksums recomputed after the mutation, so that the parsers behind the checksum
//! check (JSON state, safetensors, model card) see the damaged bytes too. A load must return
//! `Ok` or a clean `Err`, never panic; a load that succeeds on re-signed bytes must give a
//! state whose step is the saved one or the value the mutated JSON holds.
//!
//! ```sh
//! cargo test -p fr-train --test fuzz                                   # CI: 64 cases per target
//! FR_FUZZ_CASES=5000 cargo test --release -p fr-train --test fuzz -- --nocapture
//! FR_FUZZ_SECONDS=600 cargo test --release -p fr-train --test fuzz -- --nocapture  # time-bounded
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};
use fr_train::checkpoint::{
    CHECKSUMS_FILE, HEAD_FILE, LATEST_FILE, MODEL_CARD_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
};
use fr_train::{load_checkpoint, save_checkpoint, TrainState};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sha2::{Digest, Sha256};

/// Run `f` on inputs of `strategy`: `FR_FUZZ_CASES` per round (default `default_cases`), one
/// round, or rounds until `FR_FUZZ_SECONDS` have passed. Prints the number of inputs tried.
fn fuzz<S: Strategy>(name: &str, default_cases: u32, strategy: S, f: impl Fn(&S::Value)) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("FR_FUZZ_CASES").map_or(default_cases, |c| c as u32);
    let seconds = env("FR_FUZZ_SECONDS");
    let tried = AtomicUsize::new(0);
    let start = std::time::Instant::now();
    loop {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&strategy, |input| {
            tried.fetch_add(1, Ordering::Relaxed);
            f(&input);
            Ok(())
        });
        if let Err(e) = result {
            let n = tried.load(Ordering::Relaxed);
            panic!("fuzz {name}: failed after {n} inputs: {e}");
        }
        if seconds.is_none_or(|s| start.elapsed().as_secs() >= s) {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz {name}: {} inputs tried in {secs:.1} s, none panicked",
        tried.load(Ordering::Relaxed)
    );
}

/// A change to a file's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit { pos: usize, bit: u8 },
    SetByte { pos: usize, value: u8 },
    Truncate { len: usize },
    Extend(Vec<u8>),
    Remove { pos: usize, n: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let pos = any::<usize>();
    prop_oneof![
        4 => (pos, 0u8..8).prop_map(|(pos, bit)| Mutation::FlipBit { pos, bit }),
        3 => (pos, any::<u8>()).prop_map(|(pos, value)| Mutation::SetByte { pos, value }),
        1 => pos.prop_map(|len| Mutation::Truncate { len }),
        1 => prop::collection::vec(any::<u8>(), 1..32).prop_map(Mutation::Extend),
        1 => (pos, 1usize..16).prop_map(|(pos, n)| Mutation::Remove { pos, n }),
    ]
}

fn apply(base: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut v = base.to_vec();
    for m in mutations {
        let len = v.len();
        match m {
            Mutation::FlipBit { pos, bit } if len > 0 => v[pos % len] ^= 1 << bit,
            Mutation::SetByte { pos, value } if len > 0 => v[pos % len] = *value,
            Mutation::Truncate { len: n } => v.truncate(n % (len + 1)),
            Mutation::Extend(bytes) => v.extend_from_slice(bytes),
            Mutation::Remove { pos, n } if len > 0 => {
                let p = pos % len;
                v.drain(p..(p + n).min(len));
            }
            _ => {}
        }
    }
    v
}

fn model() -> VarMap {
    let vm = VarMap::new();
    for (name, shape) in [("fc.weight", vec![4, 3]), ("bn.running_mean", vec![4])] {
        vm.get(shape, name, Init::Const(0.5), DType::F32, &Device::Cpu)
            .unwrap();
    }
    vm
}

const FILES: [&str; 7] = [
    STATE_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    HEAD_FILE,
    MODEL_CARD_FILE,
    CHECKSUMS_FILE,
    LATEST_FILE,
];

/// The files of one save (and `latest`), by name.
fn base_save(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let state = TrainState {
        step: 7,
        seed: 3,
        metrics: [("loss".to_string(), vec![(7, 1.5)])].into(),
        optimizer_state: vec![(
            "fc.weight.momentum_buffer".into(),
            Tensor::full(0.25f32, (4, 3), &Device::Cpu).unwrap(),
        )],
        head_state: vec![("ema".into(), Tensor::new(&[2.0f32], &Device::Cpu).unwrap())],
        ..TrainState::default()
    };
    let save = save_checkpoint(dir, &model(), &state).unwrap();
    FILES
        .iter()
        .map(|f| {
            let path = if *f == LATEST_FILE {
                dir.join(f)
            } else {
                save.join(f)
            };
            (f.to_string(), std::fs::read(path).unwrap())
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn fuzz_checkpoint_loading() {
    let root = std::env::temp_dir().join(format!("fr-train-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let base = base_save(&root.join("base"));
    let run: PathBuf = root.join("run");
    let save = run.join("step-00000007");
    let input = (
        0..FILES.len(),
        prop::collection::vec(mutation(), 1..6),
        any::<bool>(),
    );
    fuzz(
        "checkpoint loading",
        64,
        input,
        |(which, mutations, resign)| {
            std::fs::create_dir_all(&save).unwrap();
            let mut files = base.clone();
            files[*which].1 = apply(&files[*which].1, mutations);
            let changed = files[*which].1 != base[*which].1;
            if *resign && FILES[*which] != CHECKSUMS_FILE && FILES[*which] != LATEST_FILE {
                let sums: String = files
                    .iter()
                    .filter(|(f, _)| f != CHECKSUMS_FILE && f != LATEST_FILE)
                    .map(|(f, b)| format!("{}  {f}\n", sha256_hex(b)))
                    .collect();
                let i = FILES.iter().position(|f| *f == CHECKSUMS_FILE).unwrap();
                files[i].1 = sums.into_bytes();
            }
            for (f, bytes) in &files {
                let dir = if f == LATEST_FILE { &run } else { &save };
                std::fs::write(dir.join(f), bytes).unwrap();
            }
            let vm = model();
            if let Ok(state) = load_checkpoint(&run, &vm) {
                // Only a change the checksums were recomputed for, or one that no reader sees
                // (trailing whitespace of `latest`), loads.
                assert!(
                    !changed || *resign || FILES[*which] == LATEST_FILE,
                    "{} damaged without new checksums, yet loaded",
                    FILES[*which]
                );
                if FILES[*which] != STATE_FILE {
                    assert_eq!(state.step, 7);
                }
            }
        },
    );
    let _ = std::fs::remove_dir_all(&root);
}
