//! `cargo xtask pack`: pack an image folder or a `path label` list file into an insightface
//! training set (`train.rec`, `train.idx`, `property`), layout A or the shuffled images-only
//! variant DALI reads. The format is documented in `fr_data::recordio_writer`.

use std::path::{Path, PathBuf};

use crate::{Context, Result};
use fr_data::recordio_writer::{pack_records, PackConfig, PackItem, PackSummary};
use fr_data::{FaceDataset, ImageFolder};
use indicatif::{ProgressBar, ProgressStyle};

/// Skipped files listed in the summary before "... and N more".
const LIST_SKIPPED: usize = 20;

/// Options of `pack`.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// An image folder (`<root>/<identity>/<image>.{jpg,png,pgm,...}`, identities sorted by
    /// name) or a list file of `path label` lines.
    pub from: PathBuf,
    /// Output folder for train.rec, train.idx and property.
    pub out: PathBuf,
    /// Write the shuffled images-only variant (no header or identity records), as DALI needs.
    pub shuffle: bool,
    /// Side of the stored images in pixels.
    pub size: u32,
    /// JPEG quality of re-encoded images (same-size JPEG sources are copied unchanged).
    pub quality: u8,
    /// Seed of the shuffled order.
    pub seed: u64,
    /// Folder the paths of a list file are relative to (default: the list file's folder).
    pub root: Option<PathBuf>,
    /// Number of classes of a list file: labels must be below it (default: largest + 1).
    pub num_classes: Option<usize>,
    /// Replace train.rec / train.idx / property already in --out.
    pub force: bool,
}

impl Default for PackOptions {
    /// No paths; 112-pixel images at JPEG quality 95, layout A, seed 0.
    fn default() -> Self {
        Self {
            from: PathBuf::new(),
            out: PathBuf::new(),
            shuffle: false,
            size: 112,
            quality: 95,
            seed: 0,
            root: None,
            num_classes: None,
            force: false,
        }
    }
}

/// Open `--from` as a folder of identities or as a list file.
fn open_source(args: &PackOptions) -> Result<ImageFolder> {
    let from = &args.from;
    if from.is_dir() {
        return ImageFolder::open(from).with_context(|| format!("reading {}", from.display()));
    }
    let root = match &args.root {
        Some(r) => r.clone(),
        None => from
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let folder = match args.num_classes {
        Some(n) => ImageFolder::from_list_with_classes(&root, from, n),
        None => ImageFolder::from_list(&root, from),
    };
    folder.with_context(|| format!("reading the list file {}", from.display()))
}

/// The summary printed at the end.
/// What a pack did, as `fr pack` prints it: counts, and the skipped files (the first 20).
pub fn summary_text(s: &PackSummary) -> String {
    let mut out = format!(
        "packed {} images of {} identities ({} classes) into {} ({}); {} skipped\n  \
         {} JPEGs copied unchanged, {} encoded; train.rec {:.1} MiB\n",
        s.images,
        s.identities,
        s.num_classes,
        s.out_dir.display(),
        if s.shuffled {
            "shuffled, images only"
        } else {
            "insightface layout"
        },
        s.skipped.len(),
        s.passed_through,
        s.encoded,
        s.rec_bytes as f64 / (1024.0 * 1024.0),
    );
    for k in s.skipped.iter().take(LIST_SKIPPED) {
        out.push_str(&format!("  skipped {}: {}\n", k.path.display(), k.reason));
    }
    if s.skipped.len() > LIST_SKIPPED {
        out.push_str(&format!(
            "  ... and {} more skipped\n",
            s.skipped.len() - LIST_SKIPPED
        ));
    }
    out
}

/// Pack `args.from` into `args.out`; returns the summary (also printed).
pub fn pack(args: &PackOptions) -> Result<PackSummary> {
    let folder = open_source(args)?;
    let items = PackItem::from_folder(&folder)?;
    let config = PackConfig {
        image_size: args.size,
        quality: args.quality,
        shuffle: args.shuffle,
        seed: args.seed,
        overwrite: args.force,
    };
    let bar = ProgressBar::new(items.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} packing [{bar:40}] {pos}/{len} images ({per_sec}, eta {eta})",
        )
        .expect("a valid progress template")
        .progress_chars("=> "),
    );
    let result = pack_records(
        &items,
        folder.num_classes(),
        &args.out,
        &config,
        &mut |done| bar.set_position(done as u64),
    );
    bar.finish_and_clear();
    let summary = result.with_context(|| {
        format!(
            "packing {} into {}",
            args.from.display(),
            args.out.display()
        )
    })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fr_data::RecordIoDataset;
    use image::{Rgb, RgbImage};

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-pack-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_folder(root: &Path) {
        for (c, name) in ["alice", "bob"].iter().enumerate() {
            std::fs::create_dir_all(root.join(name)).unwrap();
            for i in 0..3u8 {
                RgbImage::from_pixel(40, 48, Rgb([50 * c as u8, 30 * i, 100]))
                    .save(root.join(name).join(format!("{i}.png")))
                    .unwrap();
            }
        }
        std::fs::write(root.join("bob/bad.jpg"), b"\xff\xd8\xff broken").unwrap();
    }

    #[test]
    fn pack_folder_with_defaults_and_a_corrupt_file() {
        let dir = temp_dir("folder");
        write_folder(&dir.join("src"));
        let out = dir.join("out");
        let args = PackOptions {
            from: dir.join("src"),
            out: out.clone(),
            ..PackOptions::default()
        };
        assert_eq!((args.size, args.quality, args.shuffle), (112, 95, false));
        let s = pack(&args).unwrap();
        assert_eq!((s.images, s.identities, s.skipped.len()), (6, 2, 1));
        let text = summary_text(&s);
        assert!(text.contains("packed 6 images of 2 identities"), "{text}");
        assert!(text.contains("bad.jpg"), "{text}");
        let ds = RecordIoDataset::open(&out).unwrap();
        assert_eq!((ds.len(), ds.num_classes()), (6, 2));
        assert_eq!(ds.image(0).unwrap().dimensions(), (112, 112));
        // A second run without --force refuses to overwrite, naming the file.
        let err = format!("{:#}", pack(&args).unwrap_err());
        assert!(err.contains("train.rec"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pack_list_file_shuffled_at_another_size() {
        let dir = temp_dir("list");
        write_folder(&dir.join("src"));
        std::fs::write(
            dir.join("src/list.txt"),
            "alice/0.png 1\nbob/1.png 0\nalice/2.png 1\nbob/bad.jpg 0\n",
        )
        .unwrap();
        let out = dir.join("out");
        let args = PackOptions {
            from: dir.join("src/list.txt"),
            out: out.clone(),
            shuffle: true,
            size: 56,
            quality: 90,
            seed: 3,
            ..PackOptions::default()
        };
        let s = pack(&args).unwrap();
        assert!(s.shuffled);
        assert_eq!((s.images, s.identities, s.skipped.len()), (3, 2, 1));
        let ds = RecordIoDataset::open(&out).unwrap();
        assert_eq!((ds.len(), ds.num_classes()), (3, 2));
        assert_eq!(ds.image(0).unwrap().dimensions(), (56, 56));
        assert_eq!(
            std::fs::read_to_string(out.join("property")).unwrap(),
            "2,56,56"
        );

        // A label that is not a class id names the list file and the line.
        std::fs::write(dir.join("src/list.txt"), "alice/0.png 0\nbob/1.png one\n").unwrap();
        let err = format!("{:#}", pack(&args).unwrap_err());
        assert!(err.contains("list.txt") && err.contains("line 2"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
