//! IJB-B / IJB-C metadata and loose crops, laid out as insightface's IJB evaluation
//! (`recognition/_evaluation_/ijb`, `arcface_torch/eval_ijbc.py`) expects them:
//!
//! ```text
//! IJBC/
//!   loose_crop/<name>.jpg                 detector crops, landmarks in their pixel frame
//!   meta/ijbc_face_tid_mid.txt            "name template_id media_id"
//!   meta/ijbc_name_5pts_score.txt         "name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score"
//!   meta/ijbc_template_pair_label.txt     "t1 t2 label"            (1:1 protocol)
//!   meta/ijbc_1N_gallery_G1.csv, _G2.csv  TEMPLATE_ID,SUBJECT_ID,FILENAME,...  (1:N)
//!   meta/ijbc_1N_probe_mixed.csv          same columns
//! ```
//!
//! IJB-B uses the `ijbb_` prefix and names its galleries `S1`/`S2`. The text files are
//! whitespace-separated without a header; the CSVs are comma-separated with a header row (the
//! NIST protocol files, whose first columns are `TEMPLATE_ID,SUBJECT_ID,FILENAME`). Row `i` of
//! `face_tid_mid` and of `name_5pts_score` describe the same image (insightface pairs them by
//! position); [`IjbMeta::open`] checks that.
//!
//! Every reader skips blank lines and trailing whitespace (including `\r`), and reports a
//! malformed line as [`Error::Format`] naming the file, the 1-based line and the field.
//!
//! ```no_run
//! use fr_data::ijb::{IjbLayout, IjbLooseCrops, IjbMeta, IjbSubset};
//!
//! let layout = IjbLayout::new("IJB_release/IJBC", IjbSubset::C);
//! let meta = IjbMeta::open(&layout)?; // 469,375 faces, 15,658,489 pairs
//! let crops = IjbLooseCrops::from_layout(&layout)?;
//! let first: Vec<usize> = (0..256).collect();
//! for (i, face) in crops.load_aligned(&first).into_iter().enumerate() {
//!     let _face = face?; // 112×112 RGB, aligned to the ArcFace template
//!     let _template = meta.faces[i].template_id;
//! }
//! # Ok::<(), fr_data::Error>(())
//! ```

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use image::RgbImage;
use rayon::prelude::*;

use crate::align::{align_face, arcface_template};
use crate::recordio::decode_rgb;
use crate::{Error, Result};

/// Which benchmark: the file-name prefix and the 1:N gallery names differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IjbSubset {
    /// IJB-B: `ijbb_*` files, galleries `S1`/`S2`; 12,115 templates, 8,010,270 pairs.
    B,
    /// IJB-C: `ijbc_*` files, galleries `G1`/`G2`; 23,124 templates, 15,658,489 pairs.
    C,
}

impl IjbSubset {
    /// The file-name prefix, `ijbb` or `ijbc`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::B => "ijbb",
            Self::C => "ijbc",
        }
    }

    /// The suffixes of the two 1:N gallery files: `S1`/`S2` (IJB-B) or `G1`/`G2` (IJB-C).
    pub fn gallery_names(self) -> [&'static str; 2] {
        match self {
            Self::B => ["S1", "S2"],
            Self::C => ["G1", "G2"],
        }
    }
}

/// The paths of one IJB release folder (`IJBB/` or `IJBC/`), as in the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IjbLayout {
    /// The folder holding `loose_crop/` and `meta/`.
    pub root: PathBuf,
    /// IJB-B or IJB-C.
    pub subset: IjbSubset,
}

impl IjbLayout {
    /// The layout under `root`.
    pub fn new(root: impl AsRef<Path>, subset: IjbSubset) -> Self {
        Self {
            root: root.as_ref().to_path_buf(),
            subset,
        }
    }

    fn meta(&self, name: &str) -> PathBuf {
        self.root
            .join("meta")
            .join(format!("{}_{name}", self.subset.prefix()))
    }

    /// `loose_crop/`.
    pub fn loose_crop(&self) -> PathBuf {
        self.root.join("loose_crop")
    }

    /// `meta/<x>_face_tid_mid.txt`.
    pub fn face_tid_mid(&self) -> PathBuf {
        self.meta("face_tid_mid.txt")
    }

    /// `meta/<x>_name_5pts_score.txt`.
    pub fn name_5pts_score(&self) -> PathBuf {
        self.meta("name_5pts_score.txt")
    }

    /// `meta/<x>_template_pair_label.txt`.
    pub fn template_pair_label(&self) -> PathBuf {
        self.meta("template_pair_label.txt")
    }

    /// The two 1:N galleries, `meta/<x>_1N_gallery_{S1,S2|G1,G2}.csv`.
    pub fn galleries(&self) -> [PathBuf; 2] {
        self.subset
            .gallery_names()
            .map(|g| self.meta(&format!("1N_gallery_{g}.csv")))
    }

    /// The 1:N mixed probes, `meta/<x>_1N_probe_mixed.csv`.
    pub fn probe_mixed(&self) -> PathBuf {
        self.meta("1N_probe_mixed.csv")
    }
}

/// A row of `<x>_face_tid_mid.txt`: which template and media an image belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaceTidMid {
    /// Image file name inside `loose_crop/` (`"1.jpg"`).
    pub name: String,
    /// Template id (column 2).
    pub template_id: u32,
    /// Media id (column 3): images of one still or one video share it.
    pub media_id: u32,
}

/// A row of `<x>_name_5pts_score.txt`: detector landmarks and faceness score of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct FaceLandmarks {
    /// Image file name inside `loose_crop/`.
    pub name: String,
    /// Left eye, right eye, nose, left mouth corner, right mouth corner: `(x, y)` pixels of the
    /// loose crop.
    pub landmarks: [[f32; 2]; 5],
    /// Detector faceness score (insightface multiplies embeddings by it, flag D).
    pub score: f32,
}

/// A row of `<x>_template_pair_label.txt`: a 1:1 comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplatePair {
    /// First template id.
    pub t1: u32,
    /// Second template id.
    pub t2: u32,
    /// Label 1 (same subject) or 0.
    pub genuine: bool,
}

/// A data row of a 1:N gallery or probe CSV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSubject {
    /// `TEMPLATE_ID`.
    pub template_id: u32,
    /// `SUBJECT_ID`.
    pub subject_id: u32,
    /// `FILENAME` (`img/123.jpg`, `frames/456.png`) when the header has that column.
    pub filename: Option<String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Calls `parse` on every non-blank line (trailing whitespace removed) with its 1-based number;
/// an `Err(what)` becomes a format error naming `path` and the line.
fn for_each_line(
    path: &Path,
    mut parse: impl FnMut(usize, &str) -> std::result::Result<(), String>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io_err(path))? == 0 {
            return Ok(());
        }
        line_no += 1;
        let fail = |what: String| Error::Format {
            path: path.to_path_buf(),
            what: format!("line {line_no}: {what}"),
        };
        let text = std::str::from_utf8(&buf)
            .map_err(|e| fail(format!("not UTF-8 ({e})")))?
            .trim_end();
        let text = if line_no == 1 {
            text.trim_start_matches('\u{feff}')
        } else {
            text
        };
        if !text.trim_start().is_empty() {
            parse(line_no, text).map_err(fail)?;
        }
    }
}

fn parse_field<T: FromStr>(
    value: &str,
    column: usize,
    name: &str,
    kind: &str,
) -> std::result::Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("column {column} `{name}`: expected {kind}, found {value:?}"))
}

fn parse_finite(value: &str, column: usize, name: &str) -> std::result::Result<f32, String> {
    let v: f32 = parse_field(value, column, name, "a number")?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!(
            "column {column} `{name}`: expected a finite number, found {value:?}"
        ))
    }
}

/// The whitespace-separated fields of `line`, exactly as many as `names`.
fn split_exact<'a>(line: &'a str, names: &[&str]) -> std::result::Result<Vec<&'a str>, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() != names.len() {
        return Err(format!(
            "expected {} fields `{}`, found {}: {line:?}",
            names.len(),
            names.join(" "),
            fields.len()
        ));
    }
    Ok(fields)
}

const TID_MID: [&str; 3] = ["name", "template_id", "media_id"];
const PAIR: [&str; 3] = ["t1", "t2", "label"];
const NAME_5PTS_SCORE: [&str; 12] = [
    "name", "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4", "x5", "y5", "score",
];

fn parse_tid_mid(line: &str) -> std::result::Result<FaceTidMid, String> {
    let f = split_exact(line, &TID_MID)?;
    Ok(FaceTidMid {
        name: f[0].to_string(),
        template_id: parse_field(f[1], 2, TID_MID[1], "an unsigned integer")?,
        media_id: parse_field(f[2], 3, TID_MID[2], "an unsigned integer")?,
    })
}

fn parse_5pts(line: &str) -> std::result::Result<FaceLandmarks, String> {
    let f = split_exact(line, &NAME_5PTS_SCORE)?;
    let mut landmarks = [[0f32; 2]; 5];
    for (k, p) in landmarks.iter_mut().enumerate() {
        for (c, v) in p.iter_mut().enumerate() {
            let col = 2 + 2 * k + c;
            *v = parse_finite(f[col - 1], col, NAME_5PTS_SCORE[col - 1])?;
        }
    }
    Ok(FaceLandmarks {
        name: f[0].to_string(),
        landmarks,
        score: parse_finite(f[11], 12, "score")?,
    })
}

fn parse_pair(line: &str) -> std::result::Result<TemplatePair, String> {
    let f = split_exact(line, &PAIR)?;
    let genuine = match f[2] {
        "1" => true,
        "0" => false,
        other => {
            return Err(format!(
                "column 3 `label`: expected 0 or 1, found {other:?}"
            ))
        }
    };
    Ok(TemplatePair {
        t1: parse_field(f[0], 1, PAIR[0], "an unsigned integer")?,
        t2: parse_field(f[1], 2, PAIR[1], "an unsigned integer")?,
        genuine,
    })
}

/// Read `<x>_face_tid_mid.txt`: `name template_id media_id` per line.
///
/// # Errors
/// An unreadable file ([`Error::Io`]), or a line without exactly three fields or with a
/// non-integer id ([`Error::Format`] naming the line and column).
pub fn read_face_tid_mid(path: impl AsRef<Path>) -> Result<Vec<FaceTidMid>> {
    let mut rows = Vec::new();
    for_each_line(path.as_ref(), |_, line| {
        rows.push(parse_tid_mid(line)?);
        Ok(())
    })?;
    Ok(rows)
}

fn read_5pts_numbered(path: &Path) -> Result<(Vec<FaceLandmarks>, Vec<usize>)> {
    let (mut rows, mut lines) = (Vec::new(), Vec::new());
    for_each_line(path, |n, line| {
        rows.push(parse_5pts(line)?);
        lines.push(n);
        Ok(())
    })?;
    Ok((rows, lines))
}

/// Read `<x>_name_5pts_score.txt`: `name x1 y1 … x5 y5 score` per line, landmarks in loose-crop
/// pixels (insightface parses them as f32, as here).
///
/// # Errors
/// An unreadable file, or a line without exactly 12 fields or with a field that is not a finite
/// number ([`Error::Format`] naming the line and column, e.g. `x3`).
pub fn read_name_5pts_score(path: impl AsRef<Path>) -> Result<Vec<FaceLandmarks>> {
    Ok(read_5pts_numbered(path.as_ref())?.0)
}

/// Read `<x>_template_pair_label.txt`: `t1 t2 label` per line, label 1 genuine, 0 impostor.
/// IJB-C has 15.7 M lines: the file is streamed, 12 bytes a row in memory.
///
/// # Errors
/// An unreadable file, or a line without exactly three fields, a non-integer template id, or a
/// label other than 0/1 ([`Error::Format`] naming the line and column).
pub fn read_template_pair_label(path: impl AsRef<Path>) -> Result<Vec<TemplatePair>> {
    let mut rows = Vec::new();
    for_each_line(path.as_ref(), |_, line| {
        rows.push(parse_pair(line)?);
        Ok(())
    })?;
    Ok(rows)
}

/// Read a 1:N gallery or probe CSV (`<x>_1N_gallery_*.csv`, `<x>_1N_probe_mixed.csv`). The
/// header row is required and must name `TEMPLATE_ID` and `SUBJECT_ID` (any case, any position;
/// they are columns 1 and 2 in the NIST files, which insightface reads by position after
/// skipping the header); `FILENAME` is read when present, other columns (`SIGHTING_ID`,
/// `FACE_X`, ...) are ignored. Fields are split on commas and trimmed; quoting is not
/// interpreted (the protocol files use none). A template id repeats once per image.
///
/// # Errors
/// An unreadable file, an empty file, a header without `TEMPLATE_ID`/`SUBJECT_ID` (the first
/// line is data, not a header), or a row with too few columns or a non-integer id
/// ([`Error::Format`] naming the line and column).
pub fn read_template_subject_list(path: impl AsRef<Path>) -> Result<Vec<TemplateSubject>> {
    let path = path.as_ref();
    // Column indices of TEMPLATE_ID, SUBJECT_ID, FILENAME once the header is read.
    let mut columns: Option<(usize, usize, Option<usize>)> = None;
    let mut rows = Vec::new();
    for_each_line(path, |_, line| {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let Some((t, s, f)) = columns else {
            let find = |name: &str| fields.iter().position(|h| h.eq_ignore_ascii_case(name));
            let (Some(t), Some(s)) = (find("TEMPLATE_ID"), find("SUBJECT_ID")) else {
                return Err(format!(
                    "header must name TEMPLATE_ID and SUBJECT_ID columns, found {line:?}"
                ));
            };
            columns = Some((t, s, find("FILENAME")));
            return Ok(());
        };
        let need = t.max(s).max(f.unwrap_or(0)) + 1;
        if fields.len() < need {
            return Err(format!(
                "{} columns, expected at least {need}: {line:?}",
                fields.len()
            ));
        }
        rows.push(TemplateSubject {
            template_id: parse_field(fields[t], t + 1, "TEMPLATE_ID", "an unsigned integer")?,
            subject_id: parse_field(fields[s], s + 1, "SUBJECT_ID", "an unsigned integer")?,
            filename: f.map(|f| fields[f].to_string()),
        });
        Ok(())
    })?;
    if columns.is_none() {
        return Err(Error::Format {
            path: path.to_path_buf(),
            what: "empty file, expected a TEMPLATE_ID,SUBJECT_ID,... header".into(),
        });
    }
    Ok(rows)
}

/// The 1:1 protocol metadata of one release: per-image template/media ids and landmarks (same
/// order, checked) and the template pairs.
#[derive(Debug, Clone)]
pub struct IjbMeta {
    /// Rows of `face_tid_mid`, one per image.
    pub faces: Vec<FaceTidMid>,
    /// Rows of `name_5pts_score`, `landmarks[i]` describing the image of `faces[i]`.
    pub landmarks: Vec<FaceLandmarks>,
    /// Rows of `template_pair_label`.
    pub pairs: Vec<TemplatePair>,
}

impl IjbMeta {
    /// Read the three 1:1 files of `layout` and check that `face_tid_mid` and
    /// `name_5pts_score` list the same images in the same order.
    ///
    /// # Errors
    /// As the readers; a row-count mismatch or the first differing image name
    /// ([`Error::Format`] naming both files and the line).
    pub fn open(layout: &IjbLayout) -> Result<Self> {
        let tid_path = layout.face_tid_mid();
        let faces = read_face_tid_mid(&tid_path)?;
        let lmk_path = layout.name_5pts_score();
        let (landmarks, lines) = read_5pts_numbered(&lmk_path)?;
        if faces.len() != landmarks.len() {
            return Err(Error::Format {
                path: lmk_path,
                what: format!(
                    "{} images, but {} lists {}",
                    landmarks.len(),
                    tid_path.display(),
                    faces.len()
                ),
            });
        }
        if let Some(i) = (0..faces.len()).find(|&i| faces[i].name != landmarks[i].name) {
            return Err(Error::Format {
                path: lmk_path,
                what: format!(
                    "line {}: image {:?} where {} has {:?} (row {})",
                    lines[i],
                    landmarks[i].name,
                    tid_path.display(),
                    faces[i].name,
                    i + 1
                ),
            });
        }
        let pairs = read_template_pair_label(layout.template_pair_label())?;
        tracing::info!(
            root = %layout.root.display(),
            images = faces.len(),
            pairs = pairs.len(),
            genuine = pairs.iter().filter(|p| p.genuine).count(),
            "read IJB 1:1 metadata"
        );
        Ok(Self {
            faces,
            landmarks,
            pairs,
        })
    }
}

/// The loose crops of an IJB release with their 5-point landmarks: reads each image and aligns
/// it to the ArcFace template (insightface's `Embedding.get` in the IJB scripts:
/// `cv2.imread`, similarity fit, `cv2.warpAffine`, BGR → RGB). Images come out RGB.
///
/// Decoding uses the image crate rather than libjpeg, so pixels may differ from OpenCV's by a
/// grey level; EXIF orientation is not applied (the IJB crops carry none).
#[derive(Debug, Clone)]
pub struct IjbLooseCrops {
    dir: PathBuf,
    list: PathBuf,
    faces: Vec<FaceLandmarks>,
    lines: Vec<usize>,
    size: u32,
}

impl IjbLooseCrops {
    /// Crops in `loose_crop_dir`, landmarks from `name_5pts_score` (one image per line), aligned
    /// to 112×112. Images are read lazily.
    ///
    /// # Errors
    /// As [`read_name_5pts_score`].
    pub fn open(
        loose_crop_dir: impl AsRef<Path>,
        name_5pts_score: impl AsRef<Path>,
    ) -> Result<Self> {
        let list = name_5pts_score.as_ref().to_path_buf();
        let (faces, lines) = read_5pts_numbered(&list)?;
        tracing::info!(list = %list.display(), images = faces.len(), "opened IJB loose crops");
        Ok(Self {
            dir: loose_crop_dir.as_ref().to_path_buf(),
            list,
            faces,
            lines,
            size: 112,
        })
    }

    /// [`IjbLooseCrops::open`] on `layout.loose_crop()` and `layout.name_5pts_score()`.
    ///
    /// # Errors
    /// As [`IjbLooseCrops::open`].
    pub fn from_layout(layout: &IjbLayout) -> Result<Self> {
        Self::open(layout.loose_crop(), layout.name_5pts_score())
    }

    /// Align to `size`×`size` instead (the template scaled as insightface's `estimate_norm`).
    ///
    /// # Errors
    /// [`Error::Config`] when `size` is not a positive multiple of 112 or 128.
    pub fn with_size(mut self, size: u32) -> Result<Self> {
        arcface_template(size)?;
        self.size = size;
        Ok(self)
    }

    /// Output side length in pixels.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.faces.len()
    }

    /// `true` when the landmark file lists no images.
    pub fn is_empty(&self) -> bool {
        self.faces.is_empty()
    }

    /// Names, landmarks and faceness scores, in file order.
    pub fn faces(&self) -> &[FaceLandmarks] {
        &self.faces
    }

    /// Path of image `index`.
    ///
    /// # Errors
    /// `index` out of range.
    pub fn path(&self, index: usize) -> Result<PathBuf> {
        Ok(self.dir.join(&self.face(index)?.name))
    }

    fn face(&self, index: usize) -> Result<&FaceLandmarks> {
        self.faces.get(index).ok_or(Error::OutOfRange {
            index,
            len: self.faces.len(),
        })
    }

    /// Read image `index` and align it: `size`×`size` RGB.
    ///
    /// # Errors
    /// `index` out of range; a missing or unreadable file ([`Error::Io`] naming it); an image
    /// that is not a decodable JPEG/PNG ([`Error::Format`] naming it); degenerate landmarks
    /// ([`Error::Format`] naming the landmark file, line and image).
    pub fn load_aligned_one(&self, index: usize) -> Result<RgbImage> {
        let face = self.face(index)?;
        let path = self.dir.join(&face.name);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let image = decode_rgb(&bytes).map_err(|what| Error::Format { path, what })?;
        align_face(&image, face.landmarks, self.size).map_err(|e| match e {
            Error::Config { reason, .. } => Error::Format {
                path: self.list.clone(),
                what: format!(
                    "line {} ({}): landmarks {reason}",
                    self.lines[index], face.name
                ),
            },
            other => other,
        })
    }

    /// Read and align `indices` in parallel (rayon), results in the order of `indices`. Each
    /// failure stays in its slot, so the caller decides whether to skip a corrupt image.
    pub fn load_aligned(&self, indices: &[usize]) -> Vec<Result<RgbImage>> {
        indices
            .par_iter()
            .map(|&i| self.load_aligned_one(i))
            .collect()
    }
}
