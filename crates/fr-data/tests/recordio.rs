//! RecordIO fixtures written by mxnet 1.9.1: both insightface layouts, multi-part records and
//! damaged files.

mod common;

use std::sync::Arc;

use common::{assert_mean_rgb, data, manifest};
use fr_data::recordio::{RecordIoDataset, RecordIoReader, RecordLayout, MAGIC};
use fr_data::{BatchLoader, Error, FaceDataset, LoaderConfig};

/// Tolerance on the mean RGB: JPEG q95 moves it by well under this, BGR by tens.
const TOL: f64 = 3.0;

fn check_against_manifest(ds: &RecordIoDataset, dir: &str) {
    let m = manifest(dir);
    let images = m["images"].as_array().unwrap();
    assert_eq!(ds.len(), images.len());
    assert_eq!(
        ds.num_classes(),
        m["num_classes"].as_u64().unwrap() as usize
    );
    for (i, want) in images.iter().enumerate() {
        assert_eq!(
            ds.key(i).unwrap(),
            want["key"].as_u64().unwrap(),
            "index {i}"
        );
        assert_eq!(
            u64::from(ds.label(i).unwrap()),
            want["label"].as_u64().unwrap(),
            "label of key {}",
            want["key"]
        );
        let img = ds.image(i).unwrap();
        assert_eq!(img.dimensions(), (112, 112));
        assert_mean_rgb(
            &img,
            &want["mean_rgb"],
            TOL,
            &format!("{dir} key {}", want["key"]),
        );
    }
    assert!(matches!(
        ds.image(images.len()),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn layout_a_header_identities_and_property() {
    let ds = RecordIoDataset::open(data("rec_layout_a")).unwrap();
    assert_eq!(
        ds.layout(),
        RecordLayout::Insightface {
            first_identity_key: 13,
            end_identity_key: 17
        }
    );
    let p = ds.property().unwrap();
    assert_eq!((p.num_classes, p.height, p.width), (4, 112, 112));
    check_against_manifest(&ds, "rec_layout_a");
    // Identity records hold [img_start, img_end) of each class, consistent with the labels.
    for (class, key) in (13..17).enumerate() {
        let rec = ds.reader().read_record(key).unwrap();
        assert!(rec.image.is_empty());
        let (start, end) = (rec.labels[0] as usize, rec.labels[1] as usize);
        for k in start..end {
            assert_eq!(ds.label(k - 1).unwrap() as usize, class);
        }
    }
}

#[test]
fn loader_batches_of_layout_a_carry_the_record_labels() {
    let ds = Arc::new(RecordIoDataset::open(data("rec_layout_a")).unwrap());
    let config = LoaderConfig {
        batch_size: 5,
        drop_last: false,
        ..LoaderConfig::default()
    };
    let loader = BatchLoader::new(ds, config).unwrap();
    let mut n = 0;
    for b in loader.epoch(0) {
        let b = b.unwrap();
        let labels = b.labels.to_vec1::<u32>().unwrap();
        // Keys 1..=12 hold classes 0,0,0,1,1,1,...: index i has class i / 3.
        let want: Vec<u32> = b.indices.iter().map(|&i| (i / 3) as u32).collect();
        assert_eq!(labels, want);
        assert_eq!(b.images.dims(), [b.indices.len(), 3, 112, 112]);
        n += b.indices.len();
    }
    assert_eq!(n, 12);
}

#[test]
fn layout_a_opens_from_rec_path_and_prefix() {
    let by_rec = RecordIoDataset::open(data("rec_layout_a/train.rec")).unwrap();
    let by_prefix = RecordIoDataset::open(data("rec_layout_a/train")).unwrap();
    assert_eq!(by_rec.len(), 12);
    assert_eq!(by_prefix.len(), 12);
    assert_eq!(by_prefix.num_classes(), 4);
}

#[test]
fn layout_b_without_key_0_uses_idx_keys_and_first_array_label() {
    let ds = RecordIoDataset::open(data("rec_layout_b")).unwrap();
    assert_eq!(ds.layout(), RecordLayout::Flat);
    // No property file: the class count is max label + 1.
    assert!(ds.property().is_none());
    check_against_manifest(&ds, "rec_layout_b");
    // Key 2 carries the array label [0, 1]: the class is the first entry.
    let rec = ds.record(1).unwrap();
    assert_eq!(rec.header.flag, 2);
    assert_eq!(rec.labels, vec![0.0, 1.0]);
    assert_eq!(rec.label(), 0.0);
}

#[test]
fn multipart_records_reinsert_the_magic() {
    let m = manifest("rec_multipart");
    let r = RecordIoReader::open(
        data("rec_multipart/data.rec"),
        data("rec_multipart/data.idx"),
    )
    .unwrap();
    let records = m["records"].as_array().unwrap();
    assert_eq!(r.len(), records.len());
    let magic = MAGIC.to_le_bytes();
    let mut with_magic = 0;
    for want in records {
        let key = want["key"].as_u64().unwrap();
        let raw = r.read_raw(key).unwrap();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, want["hex"].as_str().unwrap(), "key {key}");
        assert_eq!(raw.len() as u64, want["len"].as_u64().unwrap());
        with_magic += usize::from(raw.windows(4).any(|w| w == magic));
    }
    assert_eq!(with_magic, 3, "three records contain the magic");
}

fn format_message(e: Error) -> String {
    assert!(
        matches!(e, Error::Format { .. }),
        "expected a format error, got {e:?}"
    );
    e.to_string()
}

#[test]
fn bad_magic_names_file_and_offset() {
    let err = RecordIoDataset::open_files(
        data("rec_damaged/bad_magic.rec"),
        data("rec_damaged/train.idx"),
        None,
    )
    .unwrap_err();
    let msg = format_message(err);
    assert!(msg.contains("bad_magic.rec"), "{msg}");
    assert!(msg.contains("key 0"), "{msg}");
    assert!(msg.contains("byte offset 0"), "{msg}");
    assert!(msg.contains("bad magic"), "{msg}");
}

#[test]
fn truncated_rec_fails_past_the_cut_and_reads_before_it() {
    let ds = RecordIoDataset::open_files(
        data("rec_damaged/truncated.rec"),
        data("rec_damaged/train.idx"),
        None,
    )
    .unwrap();
    let file_len = std::fs::metadata(data("rec_damaged/truncated.rec"))
        .unwrap()
        .len();
    assert_eq!(ds.len(), 12);
    assert_eq!(ds.num_classes(), 4);
    let (mut ok, mut failed) = (0, 0);
    for i in 0..ds.len() {
        let key = ds.key(i).unwrap();
        let offset = ds.reader().offset(key).unwrap();
        match ds.image(i) {
            Ok(img) => {
                assert!(offset < file_len);
                assert_eq!(img.dimensions(), (112, 112));
                ok += 1;
            }
            Err(e) => {
                let msg = format_message(e);
                assert!(msg.contains("truncated.rec"), "{msg}");
                assert!(msg.contains(&format!("key {key}")), "{msg}");
                assert!(msg.contains(&format!("byte offset {offset}")), "{msg}");
                assert!(msg.contains("truncated"), "{msg}");
                assert!(ds.label(i).is_err(), "label of a cut record");
                failed += 1;
            }
        }
    }
    // Cut at 2/3 of 62,932 bytes (41,954): keys 1..8 are whole, key 9 (at 41,248) is cut.
    assert_eq!((ok, failed), (8, 4));
}

#[test]
fn corrupt_jpeg_is_an_error_naming_the_record() {
    let ds = RecordIoDataset::open_files(
        data("rec_damaged/corrupt_jpeg.rec"),
        data("rec_damaged/corrupt_jpeg.idx"),
        None,
    )
    .unwrap();
    assert_eq!(ds.len(), 6);
    assert_eq!(ds.num_classes(), 2);
    for i in 0..6 {
        let r = ds.image(i);
        if ds.key(i).unwrap() == 5 {
            let msg = format_message(r.unwrap_err());
            assert!(msg.contains("corrupt_jpeg.rec"), "{msg}");
            assert!(msg.contains("key 5"), "{msg}");
            assert!(msg.contains("byte offset 13060"), "{msg}");
        } else {
            r.unwrap();
        }
    }
}

#[test]
fn loader_skips_and_counts_the_corrupt_jpeg() {
    let ds = RecordIoDataset::open_files(
        data("rec_damaged/corrupt_jpeg.rec"),
        data("rec_damaged/corrupt_jpeg.idx"),
        None,
    )
    .unwrap();
    let ds: Arc<dyn FaceDataset> = Arc::new(ds);
    let config = LoaderConfig {
        batch_size: 4,
        drop_last: false,
        skip_corrupt: true,
        ..LoaderConfig::default()
    };
    let loader = BatchLoader::new(ds.clone(), config.clone()).unwrap();
    let mut seen: Vec<usize> = Vec::new();
    for b in loader.epoch(0) {
        let b = b.unwrap();
        assert_eq!(b.images.dims4().unwrap().0, b.indices.len());
        seen.extend(&b.indices);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 3, 5]);
    let stats = loader.stats();
    assert_eq!(stats.skipped, 1);
    assert_eq!(stats.skipped_indices, vec![4]);
    assert_eq!(stats.images, 5);

    // Without skip_corrupt the epoch reports the error (naming the record) and stops.
    let strict = BatchLoader::new(
        ds,
        LoaderConfig {
            skip_corrupt: false,
            ..config
        },
    )
    .unwrap();
    let results: Vec<_> = strict.epoch(0).collect();
    let err = results.into_iter().find_map(Result::err).expect("an error");
    let msg = err.to_string();
    assert!(
        msg.contains("corrupt_jpeg.rec") && msg.contains("key 5"),
        "{msg}"
    );
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fr-data-rec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn writer_reproduces_mxnet_files_byte_for_byte() {
    use fr_data::recordio::{ImageRecord, RecordIoWriter};
    let dir = temp_dir("writer");
    // Multi-part splitting at aligned magics, as dmlc's writer does.
    let r = RecordIoReader::open(
        data("rec_multipart/data.rec"),
        data("rec_multipart/data.idx"),
    )
    .unwrap();
    let mut w = RecordIoWriter::create(dir.join("m.rec"), dir.join("m.idx")).unwrap();
    for &(key, _) in r.entries() {
        w.write(key, &r.read_raw(key).unwrap()).unwrap();
    }
    w.finish().unwrap();
    let read = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    assert_eq!(
        read(dir.join("m.rec")),
        read(data("rec_multipart/data.rec"))
    );
    assert_eq!(
        read(dir.join("m.idx")),
        read(data("rec_multipart/data.idx"))
    );

    // Header, identity and image records re-packed from their parsed form.
    let r = RecordIoReader::open(
        data("rec_layout_a/train.rec"),
        data("rec_layout_a/train.idx"),
    )
    .unwrap();
    let mut w = RecordIoWriter::create(dir.join("a.rec"), dir.join("a.idx")).unwrap();
    for &(key, _) in r.entries() {
        let rec: ImageRecord = r.read_record(key).unwrap();
        w.write(key, &rec.pack()).unwrap();
    }
    w.finish().unwrap();
    assert_eq!(
        read(dir.join("a.rec")),
        read(data("rec_layout_a/train.rec"))
    );
    assert_eq!(
        read(dir.join("a.idx")),
        read(data("rec_layout_a/train.idx"))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A tiny layout-A set: `n_ids` identities of `per_id` 8×8 PNGs, header labels as given.
fn write_layout_a(dir: &std::path::Path, n_ids: u64, per_id: u64, header: [f32; 2], ids: bool) {
    use fr_data::recordio::{ImageRecord, RecordIoWriter};
    let mut w = RecordIoWriter::create(dir.join("train.rec"), dir.join("train.idx")).unwrap();
    let head = ImageRecord::with_labels(header.to_vec(), 0, Vec::new());
    w.write(0, &head.pack()).unwrap();
    let mut png = Vec::new();
    image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let n = n_ids * per_id;
    for key in 1..=n {
        let label = ((key - 1) / per_id) as f32;
        w.write(key, &ImageRecord::new(label, key, png.clone()).pack())
            .unwrap();
    }
    if ids {
        for c in 0..n_ids {
            let range = vec![(1 + c * per_id) as f32, (1 + (c + 1) * per_id) as f32];
            let rec = ImageRecord::with_labels(range, n + 1 + c, Vec::new());
            w.write(n + 1 + c, &rec.pack()).unwrap();
        }
    }
    w.finish().unwrap();
}

#[test]
fn layout_a_boundary_found_from_an_inexact_header() {
    let dir = temp_dir("inexact");
    // 3 ids x 4 images: images are keys 1..=12, identity records 13..16. A header off by two
    // (as f32 rounding does past 2^24) must still give exactly 12 images.
    write_layout_a(&dir, 3, 4, [15.0, 16.0], true);
    let ds = RecordIoDataset::open(&dir).unwrap();
    assert_eq!(ds.len(), 12);
    assert!(matches!(
        ds.layout(),
        RecordLayout::Insightface {
            first_identity_key: 13,
            ..
        }
    ));
    assert_eq!(ds.label(11).unwrap(), 2);
    assert_eq!(ds.image(11).unwrap().get_pixel(0, 0).0, [1, 2, 3]);

    // Without identity records the header's (exact) value is trusted, as insightface does.
    write_layout_a(&dir, 2, 3, [7.0, 9.0], false);
    let ds = RecordIoDataset::open(&dir).unwrap();
    assert_eq!((ds.len(), ds.num_classes()), (6, 2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn key_0_image_record_is_not_a_header() {
    use fr_data::recordio::{ImageRecord, RecordIoWriter};
    let dir = temp_dir("key0");
    let mut png = Vec::new();
    image::RgbImage::new(4, 4)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut w = RecordIoWriter::create(dir.join("train.rec"), dir.join("train.idx")).unwrap();
    // flag 2 like a header, but with an image: an im2rec record with an array label.
    w.write(
        0,
        &ImageRecord::with_labels(vec![1.0, 0.0], 0, png.clone()).pack(),
    )
    .unwrap();
    w.write(1, &ImageRecord::new(0.0, 1, png).pack()).unwrap();
    w.finish().unwrap();
    let ds = RecordIoDataset::open(&dir).unwrap();
    assert_eq!(ds.layout(), RecordLayout::Flat);
    assert_eq!((ds.len(), ds.num_classes()), (2, 2));
    assert_eq!(ds.label(0).unwrap(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn idx_offset_past_the_end_names_index_rec_and_key() {
    use fr_data::recordio::{ImageRecord, RecordIoWriter};
    let dir = temp_dir("past-end");
    let mut png = Vec::new();
    image::RgbImage::new(4, 4)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut w = RecordIoWriter::create(dir.join("train.rec"), dir.join("train.idx")).unwrap();
    w.write(1, &ImageRecord::new(0.0, 1, png.clone()).pack())
        .unwrap();
    w.write(2, &ImageRecord::new(1.0, 2, png).pack()).unwrap();
    w.finish().unwrap();
    // An index line pointing far past the end of the data file.
    let mut idx = std::fs::read_to_string(dir.join("train.idx")).unwrap();
    idx.push_str("3\t999999\n");
    std::fs::write(dir.join("train.idx"), idx).unwrap();
    std::fs::write(dir.join("property"), "3,4,4").unwrap();
    let ds = RecordIoDataset::open(&dir).unwrap();
    assert_eq!(ds.len(), 3);
    ds.image(1).unwrap();
    let msg = format_message(ds.image(2).unwrap_err());
    assert!(msg.contains("train.rec"), "{msg}");
    assert!(msg.contains("train.idx"), "{msg}");
    assert!(msg.contains("key 3"), "{msg}");
    assert!(msg.contains("byte offset 999999"), "{msg}");
    assert!(msg.contains("past the end"), "{msg}");

    // Without a property file the class count needs every label: the error says so and
    // names the record.
    std::fs::remove_file(dir.join("property")).unwrap();
    let msg = format_message(RecordIoDataset::open(&dir).unwrap_err());
    assert!(msg.contains("property"), "{msg}");
    assert!(msg.contains("key 3"), "{msg}");
    assert!(msg.contains("past the end"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn epoch_reports_the_corrupt_images_it_skipped() {
    let ds = RecordIoDataset::open_files(
        data("rec_damaged/corrupt_jpeg.rec"),
        data("rec_damaged/corrupt_jpeg.idx"),
        None,
    )
    .unwrap();
    let loader = BatchLoader::new(
        Arc::new(ds),
        LoaderConfig {
            batch_size: 2,
            drop_last: false,
            skip_corrupt: true,
            ..LoaderConfig::default()
        },
    )
    .unwrap();
    for epoch in 0..2 {
        let mut it = loader.epoch(epoch);
        let images: usize = it.by_ref().map(|b| b.unwrap().indices.len()).sum();
        assert_eq!(images, 5);
        // Per epoch, not cumulative.
        assert_eq!(it.skipped(), 1);
    }
    assert_eq!(loader.stats().skipped, 2);
}
