//! Fuzzing of every parser that reads untrusted bytes: the RecordIO chunk and IRHeader parsers,
//! the `.idx` parser, whole `.rec`/`.idx` pairs through the dataset and the loader's batch
//! path, the verification `.bin` pickle reader and the image decoder. Inputs are the fixtures
//! of `tests/data` mutated (bits flipped, bytes and 32-bit words overwritten with edge values,
//! truncated, extended, spliced) and plain random bytes. Each target asserts only that the
//! parser returns `Ok` or a clean `Err` — never a panic — and that no single allocation grows
//! past a bound set by the input size (a length field claiming 4 GiB must not allocate it).
//!
//! ```sh
//! cargo test -p fr-data --test fuzz                                    # CI: 256 cases per target
//! FR_FUZZ_CASES=200000 cargo test --release -p fr-data --test fuzz -- --nocapture
//! FR_FUZZ_SECONDS=600 cargo test --release -p fr-data --test fuzz -- --nocapture  # per target
//! ```
//!
//! With `FR_FUZZ_SECONDS` each target runs rounds of `FR_FUZZ_CASES` inputs until that many
//! seconds have passed.
//!
//! Each target prints how many inputs it tried (`--nocapture` shows it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fr_data::recordio::{decode_rgb, parse_idx, parse_record, ImageRecord, RecordIoDataset};
use fr_data::verification_bin::parse_bin_encoded;
use fr_data::FaceDataset;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Records the largest single allocation request, so that a target can check that no length
/// field made the parser allocate what it claims.
struct PeakAlloc;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// The targets run one at a time, so that the allocation peak belongs to one target.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `f` on inputs of `strategy`; `FR_FUZZ_CASES` sets the count (default 256), repeated in
/// rounds until `FR_FUZZ_SECONDS` have passed when that is set. `bound` gives the largest
/// allocation allowed for an input. Prints the number of inputs tried.
fn fuzz<S: Strategy>(
    name: &str,
    strategy: S,
    bound: impl Fn(&S::Value) -> usize,
    f: impl Fn(&S::Value),
) {
    let _guard = serial();
    let cases: u32 = std::env::var("FR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let seconds: Option<u64> = std::env::var("FR_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok());
    let tried = AtomicUsize::new(0);
    let start = std::time::Instant::now();
    let result = loop {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&strategy, |input| {
            tried.fetch_add(1, Ordering::Relaxed);
            LARGEST.store(0, Ordering::Relaxed);
            f(&input);
            let peak = LARGEST.load(Ordering::Relaxed);
            let limit = bound(&input);
            prop_assert!(
                peak <= limit,
                "largest allocation {peak} bytes, bound {limit}"
            );
            Ok(())
        });
        if result.is_err() || seconds.is_none_or(|s| start.elapsed().as_secs() >= s) {
            break result;
        }
    };
    let (tried, secs) = (tried.load(Ordering::Relaxed), start.elapsed().as_secs_f64());
    if let Err(e) = result {
        panic!("fuzz {name}: failed after {tried} inputs: {e}");
    }
    println!("fuzz {name}: {tried} inputs tried in {secs:.1} s, none panicked");
}

/// A change to a fixture's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip bit `bit` of byte `pos`.
    FlipBit { pos: usize, bit: u8 },
    /// Overwrite byte `pos`.
    SetByte { pos: usize, value: u8 },
    /// Overwrite the 4-aligned little-endian u32 at `pos` (length fields, magics, flags).
    SetWord { pos: usize, value: u32 },
    /// Keep the first `len` bytes.
    Truncate { len: usize },
    /// Append bytes.
    Extend(Vec<u8>),
    /// Insert bytes at `pos`.
    Insert { pos: usize, bytes: Vec<u8> },
    /// Remove `n` bytes at `pos`.
    Remove { pos: usize, n: usize },
    /// Copy `n` bytes from `from` over `to`.
    Splice { from: usize, to: usize, n: usize },
}

/// Edge values of a 32-bit field, and random ones.
fn word() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(u32::MAX),
        Just(0x1FFF_FFFF), // largest RecordIO length
        Just(0x2000_0000), // cflag 1, length 0
        Just(0x6000_0000), // cflag 3, length 0
        Just(0xCED7_230A), // the RecordIO magic
        Just(0x8000_0000),
        Just(0x7FFF_FFFF),
        Just(0x0000_FFFF),
        Just(0xFFFF_0000),
        (0u32..64),
        any::<u32>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let pos = any::<usize>();
    prop_oneof![
        4 => (pos, 0u8..8).prop_map(|(pos, bit)| Mutation::FlipBit { pos, bit }),
        3 => (pos, any::<u8>()).prop_map(|(pos, value)| Mutation::SetByte { pos, value }),
        3 => (pos, word()).prop_map(|(pos, value)| Mutation::SetWord { pos, value }),
        1 => pos.prop_map(|len| Mutation::Truncate { len }),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        1 => (pos, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(pos, bytes)| Mutation::Insert { pos, bytes }),
        1 => (pos, 1usize..64).prop_map(|(pos, n)| Mutation::Remove { pos, n }),
        1 => (pos, pos, 1usize..256)
            .prop_map(|(from, to, n)| Mutation::Splice { from, to, n }),
    ]
}

fn apply(base: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut v = base.to_vec();
    for m in mutations {
        let len = v.len();
        let at = |p: usize| if len == 0 { 0 } else { p % len };
        match m {
            Mutation::FlipBit { pos, bit } if len > 0 => v[at(*pos)] ^= 1 << bit,
            Mutation::SetByte { pos, value } if len > 0 => v[at(*pos)] = *value,
            Mutation::SetWord { pos, value } if len >= 4 => {
                let p = at(*pos) / 4 * 4;
                let p = p.min(len - 4);
                v[p..p + 4].copy_from_slice(&value.to_le_bytes());
            }
            Mutation::Truncate { len: n } => v.truncate(if len == 0 { 0 } else { n % (len + 1) }),
            Mutation::Extend(bytes) => v.extend_from_slice(bytes),
            Mutation::Insert { pos, bytes } => {
                let p = if len == 0 { 0 } else { pos % (len + 1) };
                v.splice(p..p, bytes.iter().copied());
            }
            Mutation::Remove { pos, n } if len > 0 => {
                let p = at(*pos);
                v.drain(p..(p + n).min(len));
            }
            Mutation::Splice { from, to, n } if len > 0 => {
                let (f, t) = (at(*from), at(*to));
                let n = (*n).min(len - f).min(len - t);
                v.copy_within(f..f + n, t);
            }
            _ => {}
        }
    }
    v
}

/// A fixture (chosen by index) with up to 8 mutations, or (1 in 8) random bytes.
fn mutated(fixtures: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        7 => (0..fixtures.len(), prop::collection::vec(mutation(), 1..8))
            .prop_map(move |(i, m)| apply(fixtures[i], &m)),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}

const REC_FILES: &[&[u8]] = &[
    include_bytes!("data/rec_layout_a/train.rec"),
    include_bytes!("data/rec_layout_b/train.rec"),
    include_bytes!("data/rec_multipart/data.rec"),
    include_bytes!("data/rec_damaged/corrupt_jpeg.rec"),
];
const IDX_FILES: &[&[u8]] = &[
    include_bytes!("data/rec_layout_a/train.idx"),
    include_bytes!("data/rec_layout_b/train.idx"),
    include_bytes!("data/rec_multipart/data.idx"),
    include_bytes!("data/rec_damaged/corrupt_jpeg.idx"),
];
const BIN_FILES: &[&[u8]] = &[
    include_bytes!("data/bin/pairs_bytes_p2.bin"),
    include_bytes!("data/bin/pairs_bytes_p4.bin"),
    include_bytes!("data/bin/pairs_numpy_p4.bin"),
    include_bytes!("data/bin/pairs_py2_str.bin"),
    include_bytes!("data/bin/truncated.bin"),
];
const PNG_FILES: &[&[u8]] = &[
    include_bytes!("data/align/source.png"),
    include_bytes!("data/align/aligned_112.png"),
];

/// The JPEG of the first image record of layout A (key 1, at the `.idx` offset 40).
fn fixture_jpegs() -> &'static [&'static [u8]] {
    static JPEGS: std::sync::OnceLock<Vec<&'static [u8]>> = std::sync::OnceLock::new();
    JPEGS.get_or_init(|| {
        let rec = REC_FILES[0];
        let idx = parse_idx(std::str::from_utf8(IDX_FILES[0]).unwrap()).unwrap();
        let mut out = Vec::new();
        for &(_, offset) in idx.iter().take(4) {
            let (payload, _) = parse_record(&rec[offset as usize..]).unwrap().unwrap();
            let rec = ImageRecord::parse(&payload).unwrap();
            if !rec.image.is_empty() {
                out.push(&*Vec::leak(rec.image));
            }
        }
        out.extend_from_slice(PNG_FILES);
        assert!(out.len() >= 4);
        out
    })
}

/// 64 MiB plus a multiple of the input: what a parser of `n` bytes may allocate at once.
fn small_bound(n: usize) -> usize {
    (64 << 20) + 16 * n
}

#[test]
fn fuzz_recordio_chunks_and_irheader() {
    fuzz(
        "recordio chunk + IRHeader parser",
        (mutated(REC_FILES), any::<prop::sample::Index>()),
        |(bytes, _)| small_bound(bytes.len()),
        |(bytes, at)| {
            // From the start, and from a random 4-aligned position (a chunk boundary or not).
            for start in [0, at.index(bytes.len().max(1)) / 4 * 4] {
                if let Ok(Some((payload, used))) = parse_record(&bytes[start.min(bytes.len())..]) {
                    assert!(used <= bytes.len() - start.min(bytes.len()));
                    assert!(payload.len() <= bytes.len());
                    if let Ok(rec) = ImageRecord::parse(&payload) {
                        // The pack of a parsed record parses back to the same record.
                        assert_eq!(ImageRecord::parse(&rec.pack()).unwrap().image, rec.image);
                    }
                }
            }
        },
    );
}

#[test]
fn fuzz_irheader() {
    fuzz(
        "IRHeader parser",
        (prop::collection::vec(any::<u8>(), 0..96), word()).prop_map(|(mut v, flag)| {
            if v.len() >= 4 {
                v[..4].copy_from_slice(&flag.to_le_bytes());
            }
            v
        }),
        |v| small_bound(v.len()),
        |payload| {
            if let Ok(rec) = ImageRecord::parse(payload) {
                assert!(rec.image.len() <= payload.len());
                assert!(!rec.labels.is_empty());
            }
        },
    );
}

#[test]
fn fuzz_idx_parser() {
    fuzz(
        ".idx parser",
        mutated(IDX_FILES),
        |v| small_bound(v.len()),
        |bytes| {
            if let Ok(entries) = parse_idx(&String::from_utf8_lossy(bytes)) {
                assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
            }
        },
    );
}

/// A mutated `.rec` with a (possibly mutated) `.idx`, through the public reader: open, labels,
/// every image one by one and as one batch, the batch path agreeing with the one-by-one path.
#[test]
fn fuzz_recordio_dataset_files() {
    let dir = std::env::temp_dir().join(format!("fr-data-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (rec_path, idx_path) = (dir.join("f.rec"), dir.join("f.idx"));
    let pair = (0..REC_FILES.len())
        .prop_flat_map(|i| {
            (
                Just(i),
                prop::collection::vec(mutation(), 0..6),
                prop::collection::vec(mutation(), 0..3),
            )
        })
        .prop_map(|(i, rm, im)| (apply(REC_FILES[i], &rm), apply(IDX_FILES[i], &im)));
    fuzz(
        ".rec + .idx files through RecordIoDataset",
        pair,
        |(rec, idx)| small_bound(rec.len() + idx.len()),
        |(rec, idx)| {
            let write = |p: &std::path::Path, b: &[u8]| {
                std::fs::File::create(p).unwrap().write_all(b).unwrap();
            };
            write(&rec_path, rec);
            write(&idx_path, idx);
            let Ok(ds) = RecordIoDataset::open_files(&rec_path, &idx_path, None) else {
                return;
            };
            let ds = Arc::new(ds);
            let n = ds.len().min(64);
            let one: Vec<_> = (0..n).map(|i| ds.sample(i)).collect();
            let indices: Vec<usize> = (0..n).rev().collect();
            let batch = ds.samples(&indices);
            for (&i, b) in indices.iter().zip(&batch) {
                match (&one[i], b) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "index {i}"),
                    (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "index {i}"),
                    (a, b) => panic!("index {i}: one by one {a:?}, batch {b:?}"),
                }
            }
            for i in 0..n {
                let _ = ds.label(i);
            }
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuzz_verification_bin() {
    fuzz(
        "verification .bin pickle reader",
        mutated(BIN_FILES),
        |v| small_bound(v.len()),
        |bytes| {
            if let Ok((bins, issame)) = parse_bin_encoded(bytes) {
                assert_eq!(bins.len(), 2 * issame.len());
                assert!(bins.iter().map(Vec::len).sum::<usize>() <= bytes.len());
            }
        },
    );
}

#[test]
fn fuzz_image_decoder() {
    let jpegs = fixture_jpegs();
    fuzz(
        "image decoder (JPEG, PNG, PNM)",
        (0..jpegs.len(), prop::collection::vec(mutation(), 1..6))
            .prop_map(|(i, m)| apply(jpegs[i], &m)),
        // The decode limit: 512 MiB of pixels, whatever the input size.
        |v| (512 << 20) + small_bound(v.len()),
        |bytes| {
            if let Ok(img) = decode_rgb(bytes) {
                assert!(img.width() > 0 && img.height() > 0);
            }
        },
    );
}

// Regression tests: crafted inputs whose length fields claim far more than the input holds.

#[test]
fn record_length_field_of_512_mib_allocates_nothing_of_it() {
    let _guard = serial();
    // Magic, cflag 0 with the largest length, 16 bytes of payload.
    let mut bytes = 0xCED7_230Au32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&0x1FFF_FFFFu32.to_le_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    LARGEST.store(0, Ordering::Relaxed);
    assert_eq!(parse_record(&bytes).unwrap(), None);
    // IRHeader flag 2^32 − 1: labels announced past the payload.
    let mut payload = u32::MAX.to_le_bytes().to_vec();
    payload.extend_from_slice(&[0u8; 40]);
    assert!(ImageRecord::parse(&payload).is_err());
    assert!(LARGEST.load(Ordering::Relaxed) < 1 << 20);
}

#[test]
fn rec_file_claiming_huge_record_is_a_clean_error() {
    let _guard = serial();
    let dir = std::env::temp_dir().join(format!("fr-data-fuzz-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rec = 0xCED7_230Au32.to_le_bytes().to_vec();
    rec.extend_from_slice(&0x1FFF_FFFFu32.to_le_bytes());
    rec.extend_from_slice(&[0u8; 64]);
    std::fs::write(dir.join("t.rec"), &rec).unwrap();
    std::fs::write(dir.join("t.idx"), "0\t0\n1\t4294967296\n").unwrap();
    LARGEST.store(0, Ordering::Relaxed);
    let ds = RecordIoDataset::open_files(dir.join("t.rec"), dir.join("t.idx"), None);
    // Counting classes reads the labels: the first record is truncated, the second past the end.
    let err = ds.unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    assert!(LARGEST.load(Ordering::Relaxed) < 1 << 20);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pickle_length_fields_of_4_gib_allocate_nothing_of_them() {
    let _guard = serial();
    // PROTO 4, BINBYTES8 with a length of 2^32 and 4 bytes of data; BINBYTES with 2^32 − 1;
    // SHORT_BINUNICODE... the reader must fail on the missing bytes, not allocate them.
    let cases: [&[u8]; 3] = [
        b"\x80\x04\x8e\x00\x00\x00\x00\x01\x00\x00\x00abcd.",
        b"\x80\x04B\xff\xff\xff\xffabcd.",
        b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xffabcd.",
    ];
    for bytes in cases {
        LARGEST.store(0, Ordering::Relaxed);
        let err = parse_bin_encoded(bytes).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        assert!(LARGEST.load(Ordering::Relaxed) < 1 << 20);
    }
}

#[test]
fn pickle_memo_repeating_one_image_is_refused_not_copied() {
    let _guard = serial();
    // ((b"x" * 1000 memoised, then fetched 20000 times), [True] * 10000): 20 MB of copies from
    // a 41 kB file.
    let mut p = b"\x80\x04(".to_vec();
    p.push(b'B');
    p.extend_from_slice(&1000u32.to_le_bytes());
    p.extend_from_slice(&[0xAB; 1000]);
    p.extend_from_slice(b"q\x00");
    for _ in 0..19_999 {
        p.extend_from_slice(b"h\x00");
    }
    p.push(b'l');
    p.extend_from_slice(b"(");
    p.extend(std::iter::repeat_n(0x88u8, 10_000));
    p.extend_from_slice(b"l\x86.");
    LARGEST.store(0, Ordering::Relaxed);
    let err = parse_bin_encoded(&p).unwrap_err();
    assert!(err.contains("more than the"), "{err}");
    assert!(LARGEST.load(Ordering::Relaxed) < 4 << 20);
}

#[test]
fn jpeg_claiming_65535_squared_pixels_is_refused_before_allocating() {
    let _guard = serial();
    let jpeg = fixture_jpegs()[0].to_vec();
    // The SOF0 marker (FF C0): length (2), precision (1), height (2), width (2).
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    let mut big = jpeg.clone();
    big[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    LARGEST.store(0, Ordering::Relaxed);
    let err = decode_rgb(&big).unwrap_err();
    assert!(err.contains("decode limit"), "{err}");
    assert!(LARGEST.load(Ordering::Relaxed) < 64 << 20);
}
