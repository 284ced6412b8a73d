//! Train ArcFace for one epoch on the synthetic identities with the `arcface` preset
//! (`configs/arcface.toml`), keep its checkpoint, and verify it on an insightface `.bin` set.
//!
//! ```sh
//! cargo run --release -p fr-run --example train_arcface -- lfw.bin
//! ```
use std::sync::Arc;

use candle_core::Device;
use fr_data::{synthetic::SyntheticFaces, BatchLoader, InMemoryDataset};
use fr_run::embed::BackboneEmbedder;
use fr_run::fit::{fit, FitConfig};
use fr_run::model::{assemble, ModelSpec};

fn main() -> fr_run::Result<()> {
    let bin = std::env::args()
        .nth(1)
        .expect("usage: train_arcface SET.bin");
    let preset = fr_run::Presets::builtin().load("arcface", &["train.epochs=1".into()])?;
    let size = preset.input_size();
    let faces = SyntheticFaces::new(preset.synthetic.train.clone())?;
    let train = Arc::new(InMemoryDataset::from_dataset(&faces, size)?);
    let device = Device::Cpu;
    let spec = ModelSpec::new(&preset, "arcface", train.as_ref(), "synthetic", &device);
    let mut model = assemble(spec)?;
    let loader = BatchLoader::new(train, preset.loader_config(preset.train.batch_size, size))?;
    let config = FitConfig {
        checkpoints: Some("target/examples/arcface".into()),
        ..FitConfig::new("arcface", preset.train.epochs)
    };
    let report = fit(&mut model.trainer, &loader, &config, &mut ())?;
    println!("epoch loss {:.3}", report.epoch_loss[0]);
    let mut embedder = BackboneEmbedder::new(model.trainer.backbone(), &device);
    for (set, r) in fr_run::evaluate::verify_bins(&mut embedder, &[bin.into()], &preset)? {
        println!("{set}: accuracy {:.4}", r.accuracy_mean);
    }
    Ok(())
}
