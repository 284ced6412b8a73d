//! Image folders (CASIA-WebFace, WebFace260M style): `root/<identity>/<image>.{jpg,jpeg,png}`,
//! identities sorted by name → class index; or a FaceX-Zoo list file of `path label` lines.

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
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
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
    /// `.jpg`/`.jpeg`/`.png` inside it an image (sorted by name).
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
                what: "no <identity>/<image>.{jpg,jpeg,png} files found".into(),
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

    /// Read a list file of `path label` lines (paths relative to `root`), FaceX-Zoo style.
    ///
    /// # Errors
    /// An unreadable list or a line that is not `path label`.
    pub fn from_list(root: impl AsRef<Path>, list: impl AsRef<Path>) -> Result<Self> {
        let (root, list) = (root.as_ref().to_path_buf(), list.as_ref());
        let text = std::fs::read_to_string(list).map_err(io(list))?;
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let parsed = line
                .rsplit_once(char::is_whitespace)
                .and_then(|(p, l)| Some((p.trim(), l.parse::<u32>().ok()?)));
            let Some((p, label)) = parsed else {
                return Err(Error::Format {
                    path: list.to_path_buf(),
                    what: format!("line {}: expected \"path label\", found {line:?}", n + 1),
                });
            };
            files.push(root.join(p));
            labels.push(label);
        }
        let n_classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
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
