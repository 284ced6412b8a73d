//! Evaluate a checkpoint (default: the one `train_arcface` wrote) on a pairs folder: an image
//! folder plus a `path1 path2 label` file, here made of held-out synthetic identities.
//!
//! ```sh
//! cargo run --release -p fr-run --example eval_pairs -- [CHECKPOINT]
//! ```
use std::path::PathBuf;

use fr_data::synthetic::{SyntheticConfig, SyntheticFaces};
use fr_data::FaceDataset;
use fr_run::evaluate::{run, EvalOptions};

fn main() -> fr_run::Result<()> {
    let checkpoint = std::env::args()
        .nth(1)
        .unwrap_or("target/examples/arcface".into());
    let preset = fr_run::Presets::builtin().load("arcface", &[])?;
    // A pairs folder: 8 unseen identities, 2 images each; one genuine and one impostor pair each.
    let dir = PathBuf::from("target/examples/pairs");
    let faces = SyntheticFaces::new(SyntheticConfig {
        num_identities: 8,
        images_per_identity: 2,
        first_identity: 5_000_000,
        ..preset.synthetic.train.clone()
    })?;
    let mut pairs = String::new();
    for i in 0..faces.len() {
        std::fs::create_dir_all(dir.join(format!("id{}", i / 2)))?;
        faces
            .image(i)?
            .save(dir.join(format!("id{}/{}.png", i / 2, i % 2)))?;
        let (id, other) = (i / 2, (i / 2 + 1) % 8);
        pairs += &match i % 2 {
            0 => format!("id{id}/0.png id{id}/1.png 1\n"),
            _ => format!("id{id}/1.png id{other}/0.png 0\n"),
        };
    }
    std::fs::write(dir.join("pairs.txt"), pairs)?;
    let evaluation = run(
        &EvalOptions {
            config: "arcface".into(),
            checkpoint: checkpoint.into(),
            pairs_folder: Some(dir.clone()),
            pairs: Some(dir.join("pairs.txt")),
            ..EvalOptions::default()
        },
        std::path::Path::new("."),
    )?;
    for set in &evaluation.pair_sets {
        println!("{}: accuracy {:.4}", set.name, set.cosine.accuracy_mean);
    }
    println!(
        "report: {}",
        evaluation.written.out_dir.join("report.md").display()
    );
    Ok(())
}
