//! IJB-C-size 1:1 scoring benchmark: [`fr_eval::ijb::pair_scores`] + [`fr_eval::ijb::verify_1to1`]
//! on 23,000 random 512-d unit template features and 15.6 M template pairs (~20 k genuine).
//!
//! ```sh
//! cargo run --release -p fr-eval --example ijb_scoring -- target/ijb-bench
//! python benchmarks/ijb_scoring.py target/ijb-bench        # the numpy + sklearn side
//! ```
//!
//! The first run writes the arrays the Python side reads (`features.npy` f32 `(T, D)`,
//! `p1.npy` / `p2.npy` int64, `label.npy` int64) into the folder; later runs reuse them. Then it
//! times three repetitions of scoring + ROC + TAR@FAR and prints the median, the TARs and a
//! checksum of the scores as one JSON line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fr_eval::ijb::{pair_scores, verify_1to1, Templates, IJB_FARS};
use ndarray::Array2;

/// Templates, as IJB-C.
const TEMPLATES: usize = 23_000;
/// Feature width.
const DIM: usize = 512;
/// Pairs, as IJB-C's 15,658,489.
const PAIRS: usize = 15_658_489;
/// Templates per subject (genuine pairs are drawn within a subject).
const PER_SUBJECT: usize = 6;
/// Genuine pairs (IJB-C has 19,557).
const GENUINE: usize = 19_557;

/// splitmix64: a small, seedable generator (the arrays only need to be reproducible).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Write a little-endian `.npy` (format 1.0) with dtype `descr` and `shape`.
fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) -> std::io::Result<()> {
    let shape_str = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Magic (6) + version (2) + header length (2) + header + '\n', padded to 64 bytes.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let tmp = path.with_extension("tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    f.write_all(data)?;
    f.into_inner()?.sync_all()?;
    std::fs::rename(tmp, path)
}

/// Read the payload of a `.npy` written by [`write_npy`].
fn read_npy_payload(path: &Path) -> std::io::Result<Vec<u8>> {
    let bytes = std::fs::read(path)?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(std::io::Error::other(format!(
            "{}: not a .npy file",
            path.display()
        )));
    }
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    Ok(bytes[10 + header_len..].to_vec())
}

/// The benchmark arrays: unit f32 features, pair template ids, labels.
struct Data {
    features: Vec<f32>,
    p1: Vec<i64>,
    p2: Vec<i64>,
    labels: Vec<bool>,
}

fn generate() -> Data {
    let mut rng = SplitMix(20_240_611);
    // Subject centre + noise, normalised: genuine pairs score higher than impostors.
    let subjects = TEMPLATES.div_ceil(PER_SUBJECT);
    let centres: Vec<f64> = (0..subjects * DIM).map(|_| rng.normal()).collect();
    let mut features = vec![0f32; TEMPLATES * DIM];
    for t in 0..TEMPLATES {
        let c = &centres[(t / PER_SUBJECT) * DIM..][..DIM];
        let row: Vec<f64> = c.iter().map(|&m| m + 1.5 * rng.normal()).collect();
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (dst, v) in features[t * DIM..][..DIM].iter_mut().zip(row) {
            *dst = (v / norm) as f32;
        }
    }
    let (mut p1, mut p2, mut labels) = (
        Vec::with_capacity(PAIRS),
        Vec::with_capacity(PAIRS),
        Vec::with_capacity(PAIRS),
    );
    for i in 0..PAIRS {
        let a = rng.below(TEMPLATES);
        // Genuine pairs spread evenly through the list.
        let genuine = (i as u64 * GENUINE as u64) / PAIRS as u64
            != ((i as u64 + 1) * GENUINE as u64) / PAIRS as u64;
        let b = if genuine {
            let s = a / PER_SUBJECT;
            let mut b = s * PER_SUBJECT + rng.below(PER_SUBJECT);
            if b == a || b >= TEMPLATES {
                b = s * PER_SUBJECT + (a + 1) % PER_SUBJECT;
            }
            b.min(TEMPLATES - 1)
        } else {
            loop {
                let b = rng.below(TEMPLATES);
                if b / PER_SUBJECT != a / PER_SUBJECT {
                    break b;
                }
            }
        };
        p1.push(a as i64);
        p2.push(b as i64);
        labels.push(genuine && a / PER_SUBJECT == b / PER_SUBJECT);
    }
    Data {
        features,
        p1,
        p2,
        labels,
    }
}

fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data slices (f32 / i64) viewed as bytes; the length is exact.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn from_bytes<T: Copy + Default>(b: &[u8]) -> Vec<T> {
    let n = b.len() / std::mem::size_of::<T>();
    let mut v = vec![T::default(); n];
    // SAFETY: `v` holds exactly `n * size_of::<T>()` bytes; T is plain old data.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), v.as_mut_ptr().cast::<u8>(), n * size_of::<T>())
    };
    v
}

fn load_or_generate(dir: &Path) -> std::io::Result<Data> {
    let names = ["features.npy", "p1.npy", "p2.npy", "label.npy"];
    if names.iter().all(|n| dir.join(n).is_file()) {
        let features: Vec<f32> = from_bytes(&read_npy_payload(&dir.join(names[0]))?);
        let p1: Vec<i64> = from_bytes(&read_npy_payload(&dir.join(names[1]))?);
        let p2: Vec<i64> = from_bytes(&read_npy_payload(&dir.join(names[2]))?);
        let label: Vec<i64> = from_bytes(&read_npy_payload(&dir.join(names[3]))?);
        if features.len() == TEMPLATES * DIM && p1.len() == PAIRS && p2.len() == PAIRS {
            eprintln!("reusing the arrays in {}", dir.display());
            return Ok(Data {
                features,
                p1,
                p2,
                labels: label.iter().map(|&l| l == 1).collect(),
            });
        }
    }
    eprintln!("writing the arrays to {}", dir.display());
    std::fs::create_dir_all(dir)?;
    let d = generate();
    write_npy(
        &dir.join(names[0]),
        "<f4",
        &[TEMPLATES, DIM],
        as_bytes(&d.features),
    )?;
    write_npy(&dir.join(names[1]), "<i8", &[PAIRS], as_bytes(&d.p1))?;
    write_npy(&dir.join(names[2]), "<i8", &[PAIRS], as_bytes(&d.p2))?;
    let label: Vec<i64> = d.labels.iter().map(|&l| i64::from(l)).collect();
    write_npy(&dir.join(names[3]), "<i8", &[PAIRS], as_bytes(&label))?;
    Ok(d)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/ijb-bench"));
    let reps: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let data = load_or_generate(&dir)?;
    // The reference's template features are float64 (`np.zeros` then sklearn's normalize).
    let templates = Templates {
        ids: (0..TEMPLATES as i64).collect(),
        features: Array2::from_shape_fn((TEMPLATES, DIM), |(r, c)| {
            f64::from(data.features[r * DIM + c])
        }),
    };
    let mut times = Vec::new();
    let mut score_times = Vec::new();
    let mut last = None;
    for _ in 0..reps {
        let start = Instant::now();
        let scores = pair_scores(&templates, &data.p1, &data.p2)?;
        let scored = start.elapsed().as_secs_f64();
        let report = verify_1to1(&scores, &data.labels, &IJB_FARS)?;
        times.push(start.elapsed().as_secs_f64());
        score_times.push(scored);
        last = Some((scores.iter().sum::<f64>(), report));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (checksum, report) = last.expect("at least one repetition");
    let tars: Vec<f64> = report.tar.iter().map(|r| r.tar_nearest).collect();
    println!(
        "{{\"side\": \"rust\", \"pairs\": {}, \"genuine\": {}, \"threads\": {}, \
\"median_s\": {:.4}, \"median_scoring_s\": {:.4}, \"times_s\": {:?}, \"score_sum\": {checksum:.6}, \
\"tar_nearest\": {tars:?}}}",
        data.p1.len(),
        report.n_genuine,
        rayon::current_num_threads(),
        median(&mut times.clone()),
        median(&mut score_times),
        times
    );
    Ok(())
}
