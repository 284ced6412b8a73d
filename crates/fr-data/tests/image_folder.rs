//! Image folders: identities sorted by name → class index, JPEG and PNG, RGB order.

mod common;

use std::path::PathBuf;

use common::mean_rgb;
use fr_data::{FaceDataset, ImageFolder};
use image::{Rgb, RgbImage};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fr-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn folder_classes_sorted_by_name() {
    let root = temp_dir("folder");
    // Written out of order; colours identify the class: pure R, G, B per identity.
    let ids = [
        ("zed", [200u8, 10, 10]),
        ("amy", [10, 200, 10]),
        ("bob", [10, 10, 200]),
    ];
    for (name, colour) in ids {
        std::fs::create_dir_all(root.join(name)).unwrap();
        let img = RgbImage::from_pixel(20, 16, Rgb(colour));
        img.save(root.join(name).join("b.png")).unwrap();
        img.save(root.join(name).join("a.jpg")).unwrap();
    }
    std::fs::write(root.join("zed/notes.txt"), "not an image").unwrap();
    std::fs::write(root.join("README"), "ignored").unwrap();

    let ds = ImageFolder::open(&root).unwrap();
    assert_eq!(ds.classes(), ["amy", "bob", "zed"]);
    assert_eq!(ds.num_classes(), 3);
    assert_eq!(ds.len(), 6);
    let labels: Vec<u32> = (0..6).map(|i| ds.label(i).unwrap()).collect();
    assert_eq!(labels, [0, 0, 1, 1, 2, 2]);
    assert!(ds.path(0).unwrap().ends_with("amy/a.jpg"));
    for i in 0..6 {
        let img = ds.image(i).unwrap();
        assert_eq!(img.dimensions(), (20, 16));
        let m = mean_rgb(&img);
        let dominant = (0..3).max_by(|&a, &b| m[a].total_cmp(&m[b])).unwrap();
        // amy green (1), bob blue (2), zed red (0): the channel order survives decoding.
        assert_eq!(dominant, [1, 2, 0][labels[i] as usize], "image {i}: {m:?}");
    }
    assert!(ds.label(6).is_err());

    // A broken file is an error naming it.
    std::fs::write(root.join("amy/c.jpg"), b"\xff\xd8\xff garbage").unwrap();
    let ds = ImageFolder::open(&root).unwrap();
    let err = ds.image(2).unwrap_err().to_string();
    assert!(err.contains("c.jpg"), "{err}");

    // The FaceX-Zoo list-file alternative.
    std::fs::write(root.join("list.txt"), "zed/a.jpg 2\namy/b.png 0\n").unwrap();
    let listed = ImageFolder::from_list(&root, root.join("list.txt")).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed.num_classes(), 3);
    assert_eq!(listed.label(0).unwrap(), 2);
    assert_eq!(mean_rgb(&listed.image(1).unwrap())[1].round(), 200.0);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn empty_folder_is_an_error() {
    let root = temp_dir("empty");
    assert!(ImageFolder::open(&root).is_err());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn pgm_images_and_list_file_label_errors() {
    let root = temp_dir("pgm");
    std::fs::create_dir_all(root.join("a")).unwrap();
    // Binary PGM (P5) and ASCII PGM (P2).
    let mut p5 = b"P5\n3 2\n255\n".to_vec();
    p5.extend_from_slice(&[0, 100, 200, 50, 150, 250]);
    std::fs::write(root.join("a/x.pgm"), p5).unwrap();
    std::fs::write(root.join("a/y.PGM"), "P2\n2 1\n255\n7 9\n").unwrap();
    let ds = ImageFolder::open(&root).unwrap();
    assert_eq!(ds.len(), 2);
    let img = ds.image(0).unwrap();
    assert_eq!(img.dimensions(), (3, 2));
    assert_eq!(img.get_pixel(1, 0).0, [100, 100, 100]);
    assert_eq!(img.get_pixel(2, 1).0, [250, 250, 250]);
    assert_eq!(ds.image(1).unwrap().get_pixel(1, 0).0, [9, 9, 9]);

    // Labels must be integer class ids; errors name the list and the line.
    let list = root.join("list.txt");
    for (text, line, what) in [
        ("a/x.pgm 0\na/y.PGM 1.0\n", 2, "not an integer class id"),
        ("a/x.pgm -1\n", 1, "not an integer class id"),
        ("\na/x.pgm person_3\n", 2, "not an integer class id"),
        ("a/x.pgm\n", 1, "expected \"path label\""),
    ] {
        std::fs::write(&list, text).unwrap();
        let err = ImageFolder::from_list(&root, &list)
            .unwrap_err()
            .to_string();
        assert!(err.contains("list.txt"), "{err}");
        assert!(err.contains(&format!("line {line}:")), "{err}");
        assert!(err.contains(what), "{err}");
    }
    // With a known class count, ids must be below it.
    std::fs::write(&list, "a/x.pgm 0\na/y.PGM 3\n").unwrap();
    let err = ImageFolder::from_list_with_classes(&root, &list, 3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("list.txt") && err.contains("line 2:"), "{err}");
    assert!(
        err.contains("class id 3") && err.contains("number of classes 3"),
        "{err}"
    );
    let ds = ImageFolder::from_list_with_classes(&root, &list, 10).unwrap();
    assert_eq!((ds.len(), ds.num_classes()), (2, 10));
    assert_eq!(
        ImageFolder::from_list(&root, &list).unwrap().num_classes(),
        4
    );
    std::fs::remove_dir_all(&root).unwrap();
}
