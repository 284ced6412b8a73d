//! Pretrained weights: safetensors and PyTorch `.pth` state dicts under insightface's names.
//!
//! Two ways in:
//! - inference: [`load_safetensors`] / [`load_pth`] give a [`VarBuilder`] to build a model from;
//! - training: build the model on a [`VarMap`], then [`varmap_from_safetensors`] overwrites
//!   its `Var`s with the file's values (the optimiser keeps the same `Var`s).
//!
//! [`backbone_from_tensors`] builds a registered backbone from a state dict and reports every
//! missing, wrong-shaped and unexpected key in one [`Error::Weights`]; [`varmap_from_tensors`]
//! does the same check before it touches a `Var`. Other layouts (DDP's `module.`, CVLface,
//! AdaFace) are renamed by [`crate::keymap`]; files, directories and Hub repositories are
//! opened by [`crate::pretrained`].
//!
//! `num_batches_tracked` entries are ignored: candle's BatchNorm uses a fixed momentum.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::error::{Error, Misshapen, Result};
use crate::registry::{build_backbone, Backbone, BackboneConfig};

/// Keys under which training scripts nest the model's state dict inside a checkpoint
/// (PyTorch Lightning and AdaFace `state_dict`, arcface_torch's `checkpoint_gpu_*.pt`
/// `state_dict_backbone`, others `model`), tried in this order when the top level holds none.
pub const NESTED_STATE_DICT_KEYS: [&str; 4] = ["state_dict", "state_dict_backbone", "model", "net"];

/// A weights file's format, from its extension or, failing that, its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// safetensors (`.safetensors`).
    Safetensors,
    /// A PyTorch zip checkpoint (`.pth`, `.pt`, `.bin`, `.ckpt`; `torch.save` since 1.6).
    Pth,
}

impl WeightsFormat {
    /// The format of `path`: by extension, else by content (a zip container is a PyTorch
    /// checkpoint, anything else is taken for safetensors).
    ///
    /// # Errors
    /// [`Error::Io`] when the extension is unknown and the file cannot be read.
    pub fn of(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => return Ok(Self::Safetensors),
            Some("pth" | "pt" | "bin" | "ckpt" | "tar") => return Ok(Self::Pth),
            _ => {}
        }
        let mut magic = [0u8; 4];
        let n = std::io::Read::read(
            &mut std::fs::File::open(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?,
            &mut magic,
        )
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(if n == 4 && magic == *b"PK\x03\x04" {
            Self::Pth
        } else {
            Self::Safetensors
        })
    }
}

/// Reads every tensor of a safetensors file or a PyTorch checkpoint (format by
/// [`WeightsFormat::of`]) onto the CPU, in the file's dtypes; a checkpoint's nested state dict
/// is found as in [`read_pth`].
///
/// # Errors
/// [`Error::Io`] for an unreadable file, [`Error::Format`] for one that is not of its format.
pub fn read_weights(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    match WeightsFormat::of(path)? {
        WeightsFormat::Safetensors => read_safetensors(path),
        WeightsFormat::Pth => read_pth(path, None),
    }
}

/// Reads every tensor of a safetensors file onto the CPU, in the file's dtypes.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let data = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    candle_core::safetensors::load_buffer(&data, &Device::Cpu).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        reason: format!("not a readable safetensors file: {e}"),
    })
}

/// Reads a PyTorch checkpoint (`torch.save(model.state_dict())`, zip container) onto the CPU
/// with candle's pickle reader (no Python). `key` selects a nested state dict (e.g.
/// `Some("state_dict")`); with `None` the top level is read, and when it holds no tensor the
/// [`NESTED_STATE_DICT_KEYS`] are tried in turn.
///
/// # Errors
/// [`Error::Io`] for a missing file; [`Error::Format`] for a file that is not a zip-container
/// checkpoint (the legacy pre-1.6 format must be re-saved with a current `torch.save`), a
/// missing `key`, or a checkpoint with no tensor at the top level or under any nested key.
pub fn read_pth(path: impl AsRef<Path>, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let read = |key: Option<&str>| {
        candle_core::pickle::read_all_with_key(path, key).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            reason: format!(
                "not a readable PyTorch checkpoint{}: {e} (the zip container of torch.save \
since PyTorch 1.6 is read)",
                key.map(|k| format!(" (key `{k}`)")).unwrap_or_default()
            ),
        })
    };
    if key.is_some() {
        return Ok(read(key)?.into_iter().collect());
    }
    let top = read(None)?;
    if !top.is_empty() {
        return Ok(top.into_iter().collect());
    }
    for nested in NESTED_STATE_DICT_KEYS {
        if let Ok(tensors) = read(Some(nested)) {
            if !tensors.is_empty() {
                tracing::debug!(path = %path.display(), key = nested, "nested state dict");
                return Ok(tensors.into_iter().collect());
            }
        }
    }
    Err(Error::Format {
        path: path.to_path_buf(),
        reason: format!(
            "no tensor at the top level nor under any of the keys {}",
            NESTED_STATE_DICT_KEYS.join(", ")
        ),
    })
}

/// A [`VarBuilder`] over a safetensors state dict, converting to `dtype` on `device`. Building a
/// model from it fails on a missing key or a shape mismatch, naming the key and the file.
pub fn load_safetensors(
    path: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let path = path.as_ref();
    Ok(var_builder_from_tensors(
        read_safetensors(path)?,
        Some(path),
        dtype,
        device,
    ))
}

/// Like [`load_safetensors`], for a PyTorch `.pth` state dict (insightface's release format).
pub fn load_pth(
    path: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let path = path.as_ref();
    Ok(var_builder_from_tensors(
        read_pth(path, None)?,
        Some(path),
        dtype,
        device,
    ))
}

/// A [`VarBuilder`] over an in-memory state dict; `source` names it in errors.
pub fn var_builder_from_tensors(
    tensors: HashMap<String, Tensor>,
    source: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = StateDict {
        tensors,
        file: source.map(Path::to_path_buf),
        checked: None,
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// What [`varmap_from_safetensors`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Number of `Var`s set.
    pub loaded: usize,
    /// Keys of the file the model has no `Var` for (sorted; `num_batches_tracked` left out).
    pub unused: Vec<String>,
}

/// Sets the `Var`s of `varmap` whose names start with `prefix` (e.g. `"backbone"`, or `""` for
/// all) from the safetensors file at `path`, the key being the name with `prefix.` removed.
/// Values are converted to each `Var`'s dtype and device.
///
/// # Errors
/// [`Error::Weights`] listing every missing and wrong-shaped key (and the file's unexpected
/// ones) with the file; nothing is modified then.
pub fn varmap_from_safetensors(
    varmap: &VarMap,
    path: impl AsRef<Path>,
    prefix: &str,
) -> Result<LoadReport> {
    let path = path.as_ref();
    varmap_from_tensors(varmap, &read_safetensors(path)?, Some(path), prefix)
}

/// Like [`varmap_from_safetensors`], from an in-memory state dict; `source` names it in errors.
///
/// # Errors
/// As [`varmap_from_safetensors`].
pub fn varmap_from_tensors(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    source: Option<&Path>,
    prefix: &str,
) -> Result<LoadReport> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    // Check everything first so that a bad file leaves the VarMap untouched.
    let mut plan = Vec::new();
    let (mut missing, mut misshapen) = (Vec::new(), Vec::new());
    for name in names {
        let key = if prefix.is_empty() {
            name.as_str()
        } else {
            match name
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('.'))
            {
                Some(key) => key,
                None => continue,
            }
        };
        let var = &data[name];
        match tensors.get(key) {
            None => missing.push(key.to_string()),
            Some(value) if value.dims() != var.dims() => misshapen.push(Misshapen {
                key: key.to_string(),
                expected: var.dims().to_vec(),
                got: value.dims().to_vec(),
            }),
            Some(value) => plan.push((key, var, value)),
        }
    }
    let used: HashSet<&str> = plan.iter().map(|(k, _, _)| *k).collect();
    let mut unused: Vec<String> = tensors
        .keys()
        .filter(|k| !used.contains(k.as_str()) && !k.ends_with("num_batches_tracked"))
        .cloned()
        .collect();
    unused.sort();
    if !missing.is_empty() || !misshapen.is_empty() {
        // A wrong-shaped key was in the file, so it is not "unexpected".
        let shaped: HashSet<&str> = misshapen.iter().map(|m| m.key.as_str()).collect();
        unused.retain(|k| !shaped.contains(k.as_str()));
        return Err(Error::Weights {
            file: source.map(Path::to_path_buf),
            missing,
            misshapen,
            unexpected: unused,
        });
    }
    for (_, var, value) in &plan {
        let value = value.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&value)?;
    }
    Ok(LoadReport {
        loaded: plan.len(),
        unused,
    })
}

/// Builds the backbone `cfg` describes from a state dict under its own names (after any
/// [`crate::keymap::KeyMap`]), converting to `dtype` on `device`; `source` names the file in
/// errors.
///
/// Unlike a plain [`var_builder_from_tensors`], which stops at the first bad key, every key the
/// model asks for is checked, so one error lists them all. Keys the model does not use (a
/// training checkpoint's head, for example) are returned in [`LoadReport::unused`].
///
/// # Errors
/// [`Error::Weights`] listing every missing and wrong-shaped key, plus the unexpected ones;
/// [`Error::Config`] for an invalid `cfg`.
pub fn backbone_from_tensors(
    cfg: &BackboneConfig,
    tensors: HashMap<String, Tensor>,
    source: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<(Box<dyn Backbone>, LoadReport)> {
    let checked = std::sync::Arc::new(Checked::default());
    let backend = StateDict {
        tensors,
        file: source.map(Path::to_path_buf),
        checked: Some(checked.clone()),
    };
    let keys: Vec<String> = backend.tensors.keys().cloned().collect();
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let built = build_backbone(cfg, vb);
    let (requested, mut missing, mut misshapen) = {
        let c = checked.inner.lock().expect("checked lock poisoned");
        (c.requested.clone(), c.missing.clone(), c.misshapen.clone())
    };
    missing.sort();
    missing.dedup();
    misshapen.sort_by(|a, b| a.key.cmp(&b.key));
    misshapen.dedup_by(|a, b| a.key == b.key);
    let mut unused: Vec<String> = keys
        .into_iter()
        .filter(|k| !requested.contains(k) && !k.ends_with("num_batches_tracked"))
        .collect();
    unused.sort();
    if !missing.is_empty() || !misshapen.is_empty() {
        return Err(Error::Weights {
            file: source.map(Path::to_path_buf),
            missing,
            misshapen,
            unexpected: unused,
        });
    }
    let loaded = requested.len();
    Ok((built?, LoadReport { loaded, unused }))
}

/// What a checking [`StateDict`] saw while a model was built from it.
#[derive(Default)]
struct Checked {
    inner: Mutex<CheckedInner>,
}

#[derive(Default)]
struct CheckedInner {
    requested: HashSet<String>,
    missing: Vec<String>,
    misshapen: Vec<Misshapen>,
}

/// A state dict as a [`VarBuilder`] backend: errors name the key and the file. With `checked`
/// set, a missing or wrong-shaped key is recorded there and answered with zeros of the
/// requested shape, so that building goes on and every bad key is found in one pass.
struct StateDict {
    tensors: HashMap<String, Tensor>,
    file: Option<PathBuf>,
    checked: Option<std::sync::Arc<Checked>>,
}

impl StateDict {
    fn lookup(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::msg(Error::MissingWeight {
                key: name.to_string(),
                file: self.file.clone(),
            })
        })
    }
}

impl SimpleBackend for StateDict {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(checked) = &self.checked {
            let mut c = checked.inner.lock().expect("checked lock poisoned");
            c.requested.insert(name.to_string());
            match self.tensors.get(name) {
                None => c.missing.push(name.to_string()),
                Some(t) if t.shape() != &s => c.misshapen.push(Misshapen {
                    key: name.to_string(),
                    expected: s.dims().to_vec(),
                    got: t.dims().to_vec(),
                }),
                Some(t) => return t.to_dtype(dtype)?.to_device(dev)?.contiguous(),
            }
            return Tensor::zeros(s, dtype, dev);
        }
        let t = self.lookup(name)?;
        if t.shape() != &s {
            return Err(candle_core::Error::msg(Error::ShapeMismatch {
                key: name.to_string(),
                expected: s.dims().to_vec(),
                got: t.dims().to_vec(),
                file: self.file.clone(),
            }));
        }
        t.to_dtype(dtype)?.to_device(dev)?.contiguous()
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(checked) = &self.checked {
            let mut c = checked.inner.lock().expect("checked lock poisoned");
            c.requested.insert(name.to_string());
        }
        self.lookup(name)?
            .to_dtype(dtype)?
            .to_device(dev)?
            .contiguous()
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
