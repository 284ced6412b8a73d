//! Image folders (CASIA-WebFace, WebFace260M style):
//! `root/<identity>/<image>.{jpg,jpeg,png,pgm,ppm}`, identities sorted by name → class index;
//! or a FaceX-Zoo list file of `path label` lines (`label` an integer class id). Images are
//! decoded by content (JPEG, PNG or PNM magic), grey ones to R = G = B.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::dataset::FaceDataset;
use crate::recordio::decode_rgb;
use crate::{Error, Result};

/// A folder of identity sub-folders as a [`FaceDataset`].
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    files: Vec<PathBuf>,
    labels: Vec<u32>,
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        matches!(
            e.to_ascii_lowercase().as_str(),
            "jpg" | "jpeg" | "png" | "pgm" | "ppm" | "pnm"
        )
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let is_dir = path.is_dir();
        out.push((name, path, is_dir));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

impl ImageFolder {
    /// Scan `root`: every sub-folder is an identity (class index = rank of its name), every
    /// `.jpg`/`.jpeg`/`.png`/`.pgm`/`.ppm`/`.pnm` inside it an image (sorted by name).
    ///
    /// # Errors
    /// An unreadable folder, or no images at all.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let mut classes = Vec::new();
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for (name, path, is_dir) in sorted_entries(&root)? {
            if !is_dir {
                continue;
            }
            let label = classes.len() as u32;
            let before = files.len();
            for (_, file, is_dir) in sorted_entries(&path)? {
                if !is_dir && is_image(&file) {
                    files.push(file);
                    labels.push(label);
                }
            }
            if files.len() == before {
                tracing::warn!(identity = %name, "identity folder without images");
            }
            classes.push(name);
        }
        if files.is_empty() {
            return Err(Error::Format {
                path: root,
                what: "no <identity>/<image>.{jpg,jpeg,png,pgm,ppm} files found".into(),
            });
        }
        tracing::info!(root = %root.display(), images = files.len(), classes = classes.len(), "opened image folder");
        Ok(Self {
            root,
            classes,
            files,
            labels,
        })
    }

    /// Read a list file of `path label` lines (paths relative to `root`), FaceX-Zoo style; the
    /// class count is the largest label + 1.
    ///
    /// # Errors
    /// An unreadable list, a line without a label, a label that is not an integer class id
    /// (`3.0`, `-1`, `cat`): each names the list file and the line.
    pub fn from_list(root: impl AsRef<Path>, list: impl AsRef<Path>) -> Result<Self> {
        Self::read_list(root.as_ref(), list.as_ref(), None)
    }

    /// As [`Self::from_list`] with a known class count: a label `≥ num_classes` is an error
    /// naming the file and line, and [`FaceDataset::num_classes`] is `num_classes` even when
    /// the last classes have no image in the list.
    ///
    /// # Errors
    /// As [`Self::from_list`], and a class id out of range.
    pub fn from_list_with_classes(
        root: impl AsRef<Path>,
        list: impl AsRef<Path>,
        num_classes: usize,
    ) -> Result<Self> {
        Self::read_list(root.as_ref(), list.as_ref(), Some(num_classes))
    }

    fn read_list(root: &Path, list: &Path, num_classes: Option<usize>) -> Result<Self> {
        let root = root.to_path_buf();
        let text = std::fs::read_to_string(list).map_err(io(list))?;
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad = |what: String| Error::Format {
                path: list.to_path_buf(),
                what: format!("line {}: {what}", n + 1),
            };
            let Some((p, l)) = line.rsplit_once(char::is_whitespace) else {
                return Err(bad(format!("expected \"path label\", found {line:?}")));
            };
            let label = l.parse::<u32>().map_err(|_| {
                bad(format!(
                    "label {l:?} is not an integer class id (expected \"path label\", found {line:?})"
                ))
            })?;
            if let Some(nc) = num_classes {
                if label as usize >= nc {
                    return Err(bad(format!(
                        "class id {label} is not below the number of classes {nc}"
                    )));
                }
            }
            files.push(root.join(p.trim()));
            labels.push(label);
        }
        let n_classes =
            num_classes.unwrap_or_else(|| labels.iter().max().map_or(0, |&m| m as usize + 1));
        Ok(Self {
            root,
            classes: (0..n_classes).map(|c| c.to_string()).collect(),
            files,
            labels,
        })
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Identity names, by class index.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Path of image `index`.
    ///
    /// # Errors
    /// `index` out of range.
    pub fn path(&self, index: usize) -> Result<&Path> {
        self.files
            .get(index)
            .map(PathBuf::as_path)
            .ok_or(Error::OutOfRange {
                index,
                len: self.files.len(),
            })
    }
}

impl FaceDataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn label(&self, index: usize) -> Result<u32> {
        self.labels.get(index).copied().ok_or(Error::OutOfRange {
            index,
            len: self.labels.len(),
        })
    }

    fn image(&self, index: usize) -> Result<RgbImage> {
        let path = self.path(index)?;
        let bytes = std::fs::read(path).map_err(io(path))?;
        decode_rgb(&bytes).map_err(|what| Error::Format {
            path: path.to_path_buf(),
            what,
        })
    }
}
