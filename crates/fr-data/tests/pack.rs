//! Packing image folders into insightface RecordIO: byte-identical to the layout-A fixture,
//! read back by our reader, the shuffled images-only variant, skipped sources, atomic output.

mod common;

use std::path::{Path, PathBuf};

use common::data;
use fr_data::recordio::{RecordIoReader, RecordLayout, RecordProperty, MAGIC};
use fr_data::recordio_writer::{encode_jpeg, pack_records, PackConfig, PackItem};
use fr_data::{Error, FaceDataset, ImageFolder, RecordIoDataset};
use image::{Rgb, RgbImage};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fr-data-pack-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn no_progress() -> impl FnMut(usize) {
    |_| {}
}

/// The layout-A fixture's images written out as `root/<class>/<key>.jpg`.
fn fixture_images_as_folder(root: &Path) {
    let ds = RecordIoDataset::open(data("rec_layout_a")).unwrap();
    for i in 0..ds.len() {
        let rec = ds.record(i).unwrap();
        let dir = root.join(format!("id{}", ds.label(i).unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("{:02}.jpg", ds.key(i).unwrap())),
            &rec.image,
        )
        .unwrap();
    }
}

#[test]
fn repacking_the_layout_a_fixture_gives_the_same_bytes() {
    let dir = temp_dir("fixture");
    let src = dir.join("src");
    fixture_images_as_folder(&src);
    let folder = ImageFolder::open(&src).unwrap();
    let items = PackItem::from_folder(&folder).unwrap();
    let mut calls = Vec::new();
    let out = dir.join("out");
    let summary = pack_records(
        &items,
        folder.num_classes(),
        &out,
        &PackConfig::default(),
        &mut |n| calls.push(n),
    )
    .unwrap();
    assert_eq!(
        (summary.images, summary.identities, summary.num_classes),
        (12, 4, 4)
    );
    // 112x112 JPEG sources are stored as they are.
    assert_eq!((summary.passed_through, summary.encoded), (12, 0));
    assert!(summary.skipped.is_empty());
    assert_eq!(calls.last(), Some(&12));
    // Header, image records, identity records, .idx and property: the fixture's bytes.
    for name in ["train.rec", "train.idx", "property"] {
        assert_eq!(
            read(out.join(name)),
            read(data("rec_layout_a").join(name)),
            "{name}"
        );
    }
    assert_eq!(summary.rec_bytes, read(out.join("train.rec")).len() as u64);
    // Nothing but the three files is left in the output folder.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["property", "train.idx", "train.rec"]);

    // Existing output is refused without overwrite, replaced with it.
    let err = pack_records(&items, 4, &out, &PackConfig::default(), &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.rec") && err.contains("already exists"),
        "{err}"
    );
    let cfg = PackConfig {
        overwrite: true,
        ..PackConfig::default()
    };
    pack_records(&items, 4, &out, &cfg, &mut no_progress()).unwrap();
    assert_eq!(
        read(out.join("train.rec")),
        read(data("rec_layout_a/train.rec"))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Three identities in mixed formats and sizes, one corrupt file.
fn mixed_folder(root: &Path) {
    let colour = |c: u32| Rgb([(60 * c + 30) as u8, (200 - 50 * c) as u8, 90]);
    for c in 0..3u32 {
        let dir = root.join(format!("person{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        let img = RgbImage::from_fn(112, 112, |x, y| {
            let mut p = colour(c);
            p[2] = ((x + 2 * y) % 256) as u8;
            p
        });
        std::fs::write(dir.join("a.jpg"), encode_jpeg(&img, 90).unwrap()).unwrap();
        img.save(dir.join("b.png")).unwrap();
        // Another size: resized to 112 and re-encoded.
        RgbImage::from_pixel(64, 80, colour(c))
            .save(dir.join("c.jpg"))
            .unwrap();
    }
    // A PGM (binary grey) image and a corrupt JPEG.
    let mut pgm = b"P5\n112 112\n255\n".to_vec();
    pgm.extend((0..112 * 112).map(|i| (i % 200) as u8));
    std::fs::write(root.join("person1/d.pgm"), pgm).unwrap();
    std::fs::write(root.join("person2/broken.jpg"), b"\xff\xd8\xff\xe0 cut").unwrap();
}

#[test]
fn packed_folder_reads_back_with_labels_and_pixels() {
    let dir = temp_dir("mixed");
    let src = dir.join("src");
    mixed_folder(&src);
    let folder = ImageFolder::open(&src).unwrap();
    assert_eq!(folder.len(), 11);
    let items = PackItem::from_folder(&folder).unwrap();
    let out = dir.join("out");
    let summary =
        pack_records(&items, 3, &out, &PackConfig::default(), &mut no_progress()).unwrap();
    assert_eq!((summary.images, summary.identities), (10, 3));
    assert_eq!(summary.passed_through, 3, "the three 112x112 JPEGs");
    assert_eq!(summary.encoded, 7);
    assert_eq!(summary.skipped.len(), 1);
    assert!(summary.skipped[0].path.ends_with("person2/broken.jpg"));
    assert!(!summary.skipped[0].reason.is_empty());

    let ds = RecordIoDataset::open(&out).unwrap();
    assert_eq!(
        ds.layout(),
        RecordLayout::Insightface {
            first_identity_key: 11,
            end_identity_key: 14
        }
    );
    assert_eq!((ds.len(), ds.num_classes()), (10, 3));
    assert_eq!(
        ds.property(),
        Some(RecordProperty {
            num_classes: 3,
            height: 112,
            width: 112
        })
    );
    let labels: Vec<u32> = (0..10).map(|i| ds.label(i).unwrap()).collect();
    assert_eq!(labels, [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]);
    // Identity records hold [start, end) of their images.
    let r = ds.reader();
    for (key, range) in [(11, [1.0, 4.0]), (12, [4.0, 8.0]), (13, [8.0, 11.0])] {
        let rec = r.read_record(key).unwrap();
        assert_eq!((rec.header.flag, rec.labels.clone()), (2, range.to_vec()));
        assert!(rec.image.is_empty());
        assert_eq!(rec.header.id, key);
    }
    let sources: Vec<Vec<u8>> = (0..11).map(|j| read(folder.path(j).unwrap())).collect();
    let mut passed = 0;
    for i in 0..10 {
        let rec = ds.record(i).unwrap();
        assert_eq!(rec.header.flag, 0);
        assert_eq!(rec.header.id, ds.key(i).unwrap());
        assert_eq!(rec.header.id2, 0);
        // Decoded pixels are those of the stored JPEG.
        let img = ds.image(i).unwrap();
        assert_eq!(img.dimensions(), (112, 112));
        let direct = image::load_from_memory_with_format(&rec.image, image::ImageFormat::Jpeg)
            .unwrap()
            .to_rgb8();
        assert_eq!(img, direct);
        passed += usize::from(sources.contains(&rec.image));
    }
    assert_eq!(passed, 3, "passed-through JPEGs keep their bytes");
    // The PGM (key 7: person1's fourth image) is grey.
    let grey = ds.image(6).unwrap();
    assert!(grey
        .pixels()
        .all(|p| p[0].abs_diff(p[1]) <= 3 && p[1].abs_diff(p[2]) <= 3));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shuffled_variant_has_only_image_records_in_seeded_order() {
    let dir = temp_dir("shuffled");
    let src = dir.join("src");
    fixture_images_as_folder(&src);
    let folder = ImageFolder::open(&src).unwrap();
    let items = PackItem::from_folder(&folder).unwrap();
    let pack = |name: &str, seed: u64| {
        let cfg = PackConfig {
            shuffle: true,
            seed,
            ..PackConfig::default()
        };
        let out = dir.join(name);
        let s = pack_records(&items, 4, &out, &cfg, &mut no_progress()).unwrap();
        assert!(s.shuffled);
        assert_eq!((s.images, s.identities), (12, 4));
        out
    };
    let a = pack("a", 7);
    let ds = RecordIoDataset::open(&a).unwrap();
    assert_eq!(ds.layout(), RecordLayout::Flat);
    assert_eq!((ds.len(), ds.num_classes()), (12, 4));
    let keys: Vec<u64> = ds.reader().entries().iter().map(|e| e.0).collect();
    assert_eq!(keys, (0..12).collect::<Vec<u64>>());
    // Every record is an image record (flag 0, id = key); together they are the sources.
    let mut got = Vec::new();
    for i in 0..12 {
        let rec = ds.record(i).unwrap();
        assert_eq!((rec.header.flag, rec.header.id), (0, i as u64));
        assert!(!rec.image.is_empty());
        got.push((ds.label(i).unwrap(), rec.image));
    }
    let mut want: Vec<(u32, Vec<u8>)> = items.iter().map(|it| (it.label, read(&it.path))).collect();
    let labels_in_order: Vec<u32> = got.iter().map(|g| g.0).collect();
    assert_ne!(
        labels_in_order,
        [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3],
        "not shuffled"
    );
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // Same seed, same bytes; another seed, another order.
    let b = pack("b", 7);
    assert_eq!(read(a.join("train.rec")), read(b.join("train.rec")));
    assert_eq!(read(a.join("train.idx")), read(b.join("train.idx")));
    let c = pack("c", 8);
    assert_ne!(read(a.join("train.rec")), read(c.join("train.rec")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn image_holding_the_magic_is_written_as_a_multipart_record() {
    let dir = temp_dir("multipart");
    // A 112x112 JPEG with a comment segment right after SOI holding the RecordIO magic at a
    // 4-aligned payload offset (24-byte IRHeader + 8), so it is stored as is and split.
    let img = RgbImage::from_fn(112, 112, |x, y| Rgb([x as u8, y as u8, 77]));
    let jpeg = encode_jpeg(&img, 95).unwrap();
    let mut with_magic = jpeg[..2].to_vec();
    let comment = [0u8, 0, 0x0A, 0x23, 0xD7, 0xCE, 1, 2];
    with_magic.extend_from_slice(&[0xFF, 0xFE, 0, (comment.len() + 2) as u8]);
    with_magic.extend_from_slice(&comment);
    with_magic.extend_from_slice(&jpeg[2..]);
    assert_eq!(&with_magic[8..12], &MAGIC.to_le_bytes());
    std::fs::create_dir_all(dir.join("src/a")).unwrap();
    std::fs::write(dir.join("src/a/x.jpg"), &with_magic).unwrap();
    let folder = ImageFolder::open(dir.join("src")).unwrap();
    let items = PackItem::from_folder(&folder).unwrap();
    let out = dir.join("out");
    let s = pack_records(&items, 1, &out, &PackConfig::default(), &mut no_progress()).unwrap();
    assert_eq!(s.passed_through, 1);
    let r = RecordIoReader::open(out.join("train.rec"), out.join("train.idx")).unwrap();
    let offset = r.offset(1).unwrap();
    let rec = read(out.join("train.rec"));
    let lrec = u32::from_le_bytes(
        rec[offset as usize + 4..offset as usize + 8]
            .try_into()
            .unwrap(),
    );
    assert_eq!(lrec >> 29, 1, "first part of a multi-part record");
    assert_eq!(r.read_record(1).unwrap().image, with_magic);
    let ds = RecordIoDataset::open(&out).unwrap();
    assert_eq!(ds.image(0).unwrap(), img_decoded(&with_magic));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn img_decoded(bytes: &[u8]) -> RgbImage {
    image::load_from_memory(bytes).unwrap().to_rgb8()
}

#[test]
fn bad_inputs_are_errors_and_leave_no_files() {
    let dir = temp_dir("bad");
    std::fs::create_dir_all(dir.join("src/a")).unwrap();
    std::fs::write(dir.join("src/a/x.jpg"), b"not an image").unwrap();
    let folder = ImageFolder::open(dir.join("src")).unwrap();
    let items = PackItem::from_folder(&folder).unwrap();
    let out = dir.join("out");
    // Nothing decodable: an error, and no output files (not even temporary ones).
    let err = pack_records(&items, 1, &out, &PackConfig::default(), &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no decodable image"), "{err}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    // A class id past the class count names the file.
    let err =
        pack_records(&items, 0, &out, &PackConfig::default(), &mut no_progress()).unwrap_err();
    assert!(matches!(err, Error::Format { .. }));
    assert!(err.to_string().contains("x.jpg"), "{err}");
    // Bad options name the key.
    for (cfg, key) in [
        (
            PackConfig {
                quality: 0,
                ..PackConfig::default()
            },
            "quality",
        ),
        (
            PackConfig {
                image_size: 0,
                ..PackConfig::default()
            },
            "image_size",
        ),
    ] {
        let e = pack_records(&items, 1, &out, &cfg, &mut no_progress()).unwrap_err();
        assert!(e.to_string().contains(key), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
