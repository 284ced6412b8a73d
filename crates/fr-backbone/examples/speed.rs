//! Training and inference throughput of small IResNets on the CPU.
//!
//! ```text
//! cargo run --release -p fr-backbone --example speed -- [--batch 64] [--steps 5] [--input 56]
//! ```
//!
//! One training step = train-mode forward + backward of a scalar loss on the embeddings
//! (no optimiser update); inference = eval-mode forward.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarMap};
use fr_backbone::{IResNet, IResNetConfig};
use fr_train::SeededVarMap;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> fr_backbone::Result<()> {
    let batch = arg("--batch", 64);
    let steps = arg("--steps", 5).max(1);
    let input = arg("--input", 56);
    let dev = Device::Cpu;
    println!("batch {batch}, input {input}, {steps} timed steps after one warm-up");
    println!("| layers | widths | params | train img/s | inference img/s |");
    println!("|---|---|---|---|---|");
    for widths in [[16, 32, 64, 128], [8, 16, 32, 64]] {
        let cfg = IResNetConfig {
            layers: [1, 1, 1, 1],
            widths,
            embedding_size: 512,
            input_size: input,
            dropout: 0.0,
            kernels: Default::default(),
        };
        let varmap = VarMap::new();
        let net = IResNet::new(
            &cfg,
            SeededVarMap::with_varmap(varmap.clone(), 0).var_builder(DType::F32, &dev),
        )?;
        let params: usize = varmap
            .data()
            .lock()
            .expect("VarMap lock")
            .iter()
            .filter(|(name, _)| IResNet::is_trainable(name))
            .map(|(_, v)| v.elem_count())
            .sum();
        let x = Tensor::randn(0f32, 1f32, (batch, 3, input, input), &dev)?;
        let target = Tensor::randn(0f32, 1f32, (batch, cfg.embedding_size), &dev)?;

        let train_step = || -> fr_backbone::Result<()> {
            let emb = net.forward_t(&x, true)?;
            let loss = (emb - &target)?.sqr()?.mean_all()?;
            let grads = loss.backward()?;
            std::hint::black_box(grads);
            Ok(())
        };
        train_step()?;
        let t = Instant::now();
        for _ in 0..steps {
            train_step()?;
        }
        let train = (steps * batch) as f64 / t.elapsed().as_secs_f64();

        std::hint::black_box(net.forward_t(&x, false)?);
        let t = Instant::now();
        for _ in 0..steps {
            std::hint::black_box(net.forward_t(&x, false)?);
        }
        let infer = (steps * batch) as f64 / t.elapsed().as_secs_f64();
        println!("| [1,1,1,1] | {widths:?} | {params} | {train:.1} | {infer:.1} |");
    }
    Ok(())
}
