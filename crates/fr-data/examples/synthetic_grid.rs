//! Render a contact sheet of synthetic identities: one row per identity.
//!
//! `cargo run --release -p fr-data --example synthetic_grid -- out.png [identities] [images]`

use fr_data::synthetic::{SyntheticConfig, SyntheticFaces};
use fr_data::FaceDataset;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = args.next().unwrap_or_else(|| "synthetic_grid.png".into());
    let rows: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(8);
    let cols: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let set = SyntheticFaces::new(SyntheticConfig {
        num_identities: rows,
        images_per_identity: cols,
        ..SyntheticConfig::default()
    })?;
    let size = set.config().image_size;
    let mut sheet = image::RgbImage::new(size * cols as u32, size * rows as u32);
    for i in 0..set.len() {
        let img = set.image(i)?;
        let (r, c) = ((i / cols) as u32, (i % cols) as u32);
        image::imageops::replace(&mut sheet, &img, (c * size) as i64, (r * size) as i64);
    }
    sheet.save(&out)?;
    println!("wrote {out}");
    Ok(())
}
