//! IJB-B/C metadata readers and loose-crop alignment, on hand-written fixtures in
//! `tests/data/ijb` (an `IJBC/meta` folder and malformed files under `bad/`).

mod common;

use std::path::PathBuf;

use common::data;
use fr_data::align::{Similarity, ARCFACE_TEMPLATE_112};
use fr_data::ijb::{
    read_face_tid_mid, read_name_5pts_score, read_template_pair_label, read_template_subject_list,
    FaceTidMid, IjbLayout, IjbLooseCrops, IjbMeta, IjbSubset, TemplatePair, TemplateSubject,
};
use fr_data::Error;
use image::{Rgb, RgbImage};

fn layout() -> IjbLayout {
    IjbLayout::new(data("ijb/IJBC"), IjbSubset::C)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fr-data-ijb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn err_text(r: Result<impl std::fmt::Debug, Error>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn layout_paths_follow_insightface_names() {
    let c = IjbLayout::new("/d/IJBC", IjbSubset::C);
    assert_eq!(
        c.face_tid_mid(),
        PathBuf::from("/d/IJBC/meta/ijbc_face_tid_mid.txt")
    );
    assert_eq!(
        c.name_5pts_score(),
        PathBuf::from("/d/IJBC/meta/ijbc_name_5pts_score.txt")
    );
    assert_eq!(
        c.template_pair_label(),
        PathBuf::from("/d/IJBC/meta/ijbc_template_pair_label.txt")
    );
    assert_eq!(c.loose_crop(), PathBuf::from("/d/IJBC/loose_crop"));
    assert_eq!(
        c.galleries(),
        [
            PathBuf::from("/d/IJBC/meta/ijbc_1N_gallery_G1.csv"),
            PathBuf::from("/d/IJBC/meta/ijbc_1N_gallery_G2.csv")
        ]
    );
    assert_eq!(
        c.probe_mixed(),
        PathBuf::from("/d/IJBC/meta/ijbc_1N_probe_mixed.csv")
    );
    let b = IjbLayout::new("/d/IJBB", IjbSubset::B);
    assert_eq!(
        b.galleries()[1],
        PathBuf::from("/d/IJBB/meta/ijbb_1N_gallery_S2.csv")
    );
    assert_eq!(
        b.face_tid_mid(),
        PathBuf::from("/d/IJBB/meta/ijbb_face_tid_mid.txt")
    );
}

#[test]
fn reads_face_tid_mid() {
    // Trailing spaces on line 1 and a blank final line are tolerated.
    let rows = read_face_tid_mid(layout().face_tid_mid()).unwrap();
    let row = |name: &str, template_id, media_id| FaceTidMid {
        name: name.into(),
        template_id,
        media_id,
    };
    assert_eq!(
        rows,
        [
            row("1.jpg", 1, 69544),
            row("2.jpg", 1, 69544),
            row("3.jpg", 2, 3864),
            row("4.jpg", 5, 3865)
        ]
    );
}

#[test]
fn reads_name_5pts_score() {
    // Line 3 ends in "\r\n".
    let rows = read_name_5pts_score(layout().name_5pts_score()).unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0].name, "1.jpg");
    assert_eq!(rows[0].landmarks[0], [108.9028, 125.3015]);
    assert_eq!(rows[0].landmarks[4], [143.1511, 200.9385]);
    assert_eq!(rows[0].score, 0.999766);
    assert_eq!(
        rows[2].landmarks,
        [
            [40.5, 50.25],
            [80.75, 49.5],
            [61.0, 70.0],
            [45.0, 90.0],
            [78.5, 89.75]
        ]
    );
    assert_eq!(rows[2].score, 0.5);
    assert_eq!(rows[3].score, 0.0123);
}

#[test]
fn reads_template_pairs() {
    let pairs = read_template_pair_label(layout().template_pair_label()).unwrap();
    let p = |t1, t2, genuine| TemplatePair { t1, t2, genuine };
    assert_eq!(
        pairs,
        [p(1, 2, false), p(1, 5, true), p(2, 5, false), p(5, 1, true)]
    );
}

#[test]
fn reads_one_to_n_csvs() {
    let l = layout();
    let [g1, g2] = l
        .galleries()
        .map(|p| read_template_subject_list(p).unwrap());
    let row = |t, s, f: &str| TemplateSubject {
        template_id: t,
        subject_id: s,
        filename: Some(f.into()),
    };
    assert_eq!(
        g1,
        [
            row(1, 7, "img/11.jpg"),
            row(1, 7, "img/12.jpg"),
            row(2, 9, "frames/20_1.png")
        ]
    );
    assert_eq!(g2, [row(3, 11, "img/31.jpg")]);
    let probes = read_template_subject_list(l.probe_mixed()).unwrap();
    assert_eq!(
        probes,
        [row(5, 7, "img/51.jpg"), row(6, 12, "frames/60_3.png")]
    );

    // Columns are found by header name, in any order and case; FILENAME is optional.
    let dir = temp_dir("csv");
    let p = dir.join("reordered.csv");
    std::fs::write(&p, "\u{feff}subject_id , template_id\r\n4,40\r\n5,50 \r\n").unwrap();
    let rows = read_template_subject_list(&p).unwrap();
    assert_eq!(
        rows,
        [
            TemplateSubject {
                template_id: 40,
                subject_id: 4,
                filename: None
            },
            TemplateSubject {
                template_id: 50,
                subject_id: 5,
                filename: None
            }
        ]
    );
    std::fs::write(&p, "\n\n").unwrap();
    let err = err_text(read_template_subject_list(&p));
    assert!(
        err.contains("reordered.csv") && err.contains("empty file"),
        "{err}"
    );
}

#[test]
fn errors_name_file_line_and_field() {
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "bad/face_tid_mid_bad_media.txt",
            err_text(read_face_tid_mid(data(
                "ijb/bad/face_tid_mid_bad_media.txt",
            ))),
            &["line 3", "column 3 `media_id`", "\"x3864\""],
        ),
        (
            "bad/face_tid_mid_short.txt",
            err_text(read_face_tid_mid(data("ijb/bad/face_tid_mid_short.txt"))),
            &["line 2", "expected 3 fields", "found 2"],
        ),
        (
            "bad/name_5pts_bad_x3.txt",
            err_text(read_name_5pts_score(data("ijb/bad/name_5pts_bad_x3.txt"))),
            &["line 2", "column 6 `x3`", "\"abc\""],
        ),
        (
            "bad/name_5pts_nan_score.txt",
            err_text(read_name_5pts_score(data(
                "ijb/bad/name_5pts_nan_score.txt",
            ))),
            &["line 1", "column 12 `score`", "finite"],
        ),
        (
            // A blank line 2 still counts: the bad label is on line 4.
            "bad/template_pair_bad_label.txt",
            err_text(read_template_pair_label(data(
                "ijb/bad/template_pair_bad_label.txt",
            ))),
            &["line 4", "column 3 `label`", "expected 0 or 1", "\"2\""],
        ),
        (
            "bad/gallery_no_header.csv",
            err_text(read_template_subject_list(data(
                "ijb/bad/gallery_no_header.csv",
            ))),
            &["line 1", "TEMPLATE_ID and SUBJECT_ID"],
        ),
        (
            "bad/gallery_short_row.csv",
            err_text(read_template_subject_list(data(
                "ijb/bad/gallery_short_row.csv",
            ))),
            &["line 3", "1 columns, expected at least 3"],
        ),
        (
            "bad/gallery_bad_subject.csv",
            err_text(read_template_subject_list(data(
                "ijb/bad/gallery_bad_subject.csv",
            ))),
            &["line 3", "column 2 `SUBJECT_ID`", "\"s9\""],
        ),
        (
            "missing.txt",
            err_text(read_template_pair_label(data("ijb/missing.txt"))),
            &[],
        ),
    ];
    for (file, err, wants) in cases {
        assert!(err.contains(file), "{file}: {err}");
        for want in wants {
            assert!(err.contains(want), "{file}: want {want:?} in {err}");
        }
    }
}

#[test]
fn meta_checks_that_the_two_image_lists_agree() {
    let meta = IjbMeta::open(&layout()).unwrap();
    assert_eq!(
        (meta.faces.len(), meta.landmarks.len(), meta.pairs.len()),
        (4, 4, 4)
    );
    assert_eq!(meta.pairs.iter().filter(|p| p.genuine).count(), 2);

    let dir = temp_dir("meta");
    std::fs::create_dir_all(dir.join("meta")).unwrap();
    let copy = |name: &str| {
        std::fs::copy(
            data("ijb/IJBC/meta").join(name),
            dir.join("meta").join(name),
        )
        .unwrap();
    };
    copy("ijbc_name_5pts_score.txt");
    copy("ijbc_template_pair_label.txt");
    let tid = dir.join("meta/ijbc_face_tid_mid.txt");
    std::fs::write(
        &tid,
        "1.jpg 1 69544\n2.jpg 1 69544\n9.jpg 2 3864\n4.jpg 5 3865\n",
    )
    .unwrap();
    let l = IjbLayout::new(&dir, IjbSubset::C);
    let err = err_text(IjbMeta::open(&l));
    assert!(
        err.contains("ijbc_name_5pts_score.txt")
            && err.contains("line 3")
            && err.contains("\"9.jpg\""),
        "{err}"
    );
    std::fs::write(&tid, "1.jpg 1 69544\n").unwrap();
    let err = err_text(IjbMeta::open(&l));
    assert!(err.contains("4 images") && err.contains("lists 1"), "{err}");
}

/// The smooth "face" the loose crop is made of, in aligned (112×112 template) coordinates:
/// gradients in R and G, bright blue spots (σ = 3 px) on the five template points.
fn face_pattern(x: f64, y: f64) -> [f64; 3] {
    let mut blue = 60.0;
    for [tx, ty] in ARCFACE_TEMPLATE_112 {
        let d2 = (x - f64::from(tx)).powi(2) + (y - f64::from(ty)).powi(2);
        blue += 180.0 * (-d2 / 18.0).exp();
    }
    [40.0 + 1.5 * x, 30.0 + y, blue]
}

#[test]
fn aligns_a_loose_crop() {
    // Loose crop 1.jpg: the pattern seen through the similarity whose image of the template is
    // line 1 of the 5-point fixture (scale 1.6, rotation 0.25 rad, translation (70, 30)),
    // evaluated directly at every crop pixel and saved as JPEG.
    let place = Similarity::new(1.6, 0.25, 70.0, 30.0);
    let to_face = place.inverse().unwrap();
    let crop = RgbImage::from_fn(280, 260, |x, y| {
        let [u, v] = to_face.apply([f64::from(x), f64::from(y)]);
        let inside = (-2.0..114.0).contains(&u) && (-2.0..114.0).contains(&v);
        let c = if inside { face_pattern(u, v) } else { [0.0; 3] };
        Rgb(c.map(|c| c.round().clamp(0.0, 255.0) as u8))
    });
    let dir = temp_dir("crops");
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
        .encode_image(&crop)
        .unwrap();
    std::fs::write(dir.join("1.jpg"), &jpeg).unwrap();
    std::fs::write(dir.join("2.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    // 3.jpg is missing; 4.jpg is fine but its landmarks coincide.
    RgbImage::from_pixel(100, 100, Rgb([9, 9, 9]))
        .save(dir.join("4.jpg"))
        .unwrap();

    let crops = IjbLooseCrops::open(&dir, layout().name_5pts_score()).unwrap();
    assert_eq!((crops.len(), crops.size()), (4, 112));
    assert_eq!(crops.path(2).unwrap(), dir.join("3.jpg"));
    let out = crops.load_aligned(&[0, 1, 2, 3, 0]);
    assert_eq!(out.len(), 5);

    let face = out[0].as_ref().unwrap();
    assert_eq!(face.dimensions(), (112, 112));
    assert_eq!(out[4].as_ref().unwrap(), face, "same index, same pixels");
    // Pixel-wise against the pattern: one bilinear resampling of a JPEG of a smooth image.
    let (mut sum, mut worst, mut n) = (0.0, 0.0f64, 0.0);
    for (x, y, px) in face.enumerate_pixels() {
        let want = face_pattern(f64::from(x), f64::from(y));
        for (&got, want) in px.0.iter().zip(want) {
            let d = (f64::from(got) - want.round()).abs();
            sum += d;
            worst = worst.max(d);
            n += 1.0;
        }
    }
    let mean = sum / n;
    eprintln!("aligned loose crop vs pattern: mean |Δ| {mean:.3}, max |Δ| {worst}");
    assert!(mean < 1.0 && worst < 16.0, "mean {mean}, max {worst}");
    // Each blue spot lands on its template point.
    for [tx, ty] in ARCFACE_TEMPLATE_112 {
        let (tx, ty) = (f64::from(tx), f64::from(ty));
        let (mut wx, mut wy, mut w) = (0.0, 0.0, 0.0);
        for y in (ty as u32 - 8)..=(ty as u32 + 8) {
            for x in (tx as u32 - 8)..=(tx as u32 + 8) {
                let b = (f64::from(face.get_pixel(x, y).0[2]) - 60.0).max(0.0);
                wx += b * f64::from(x);
                wy += b * f64::from(y);
                w += b;
            }
        }
        let (cx, cy) = (wx / w, wy / w);
        let err = (cx - tx).hypot(cy - ty);
        eprintln!("spot ({tx}, {ty}) found at ({cx:.3}, {cy:.3}), off by {err:.3} px");
        assert!(err < 0.15, "spot ({tx}, {ty}) at ({cx}, {cy})");
    }

    // Failures stay in their slots and name what failed.
    let corrupt = out[1].as_ref().unwrap_err().to_string();
    assert!(corrupt.contains("2.jpg"), "{corrupt}");
    let missing = out[2].as_ref().unwrap_err();
    assert!(
        matches!(missing, Error::Io { path, .. } if path.ends_with("3.jpg")),
        "{missing}"
    );
    let degenerate = out[3].as_ref().unwrap_err().to_string();
    assert!(
        degenerate.contains("ijbc_name_5pts_score.txt")
            && degenerate.contains("line 4")
            && degenerate.contains("4.jpg")
            && degenerate.contains("degenerate"),
        "{degenerate}"
    );
    assert!(matches!(
        crops.load_aligned_one(4),
        Err(Error::OutOfRange { index: 4, len: 4 })
    ));

    // Other sizes follow estimate_norm's template rule.
    let big = IjbLooseCrops::open(&dir, layout().name_5pts_score())
        .unwrap()
        .with_size(224)
        .unwrap();
    assert_eq!(big.load_aligned_one(0).unwrap().dimensions(), (224, 224));
    let err = err_text(
        IjbLooseCrops::from_layout(&layout())
            .unwrap()
            .with_size(100),
    );
    assert!(err.contains("size"), "{err}");
}
