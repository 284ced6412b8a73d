//! Pretrained weights: safetensors and PyTorch `.pth` state dicts under insightface's names.
//!
//! Two ways in:
//! - inference: [`load_safetensors`] / [`load_pth`] give a [`VarBuilder`] to build a model from;
//! - training: build the model on a [`VarMap`], then [`varmap_from_safetensors`] overwrites
//!   its `Var`s with the file's values (the optimiser keeps the same `Var`s).
//!
//! `num_batches_tracked` entries are ignored: candle's BatchNorm uses a fixed momentum.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::error::{Error, Result};

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

/// Reads a PyTorch checkpoint (`torch.save(model.state_dict())`, zip container) onto the CPU.
/// `key` selects a nested state dict (e.g. `Some("state_dict")`), `None` the top level.
pub fn read_pth(path: impl AsRef<Path>, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let tensors = candle_core::pickle::read_all_with_key(path, key).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        reason: format!("not a readable PyTorch checkpoint: {e}"),
    })?;
    Ok(tensors.into_iter().collect())
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
/// [`Error::MissingWeight`] / [`Error::ShapeMismatch`] naming the key and the file; nothing is
/// modified then.
pub fn varmap_from_safetensors(
    varmap: &VarMap,
    path: impl AsRef<Path>,
    prefix: &str,
) -> Result<LoadReport> {
    let path = path.as_ref();
    varmap_from_tensors(varmap, &read_safetensors(path)?, Some(path), prefix)
}

/// Like [`varmap_from_safetensors`], from an in-memory state dict; `source` names it in errors.
pub fn varmap_from_tensors(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    source: Option<&Path>,
    prefix: &str,
) -> Result<LoadReport> {
    let file = source.map(Path::to_path_buf);
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    // Check everything first so that a bad file leaves the VarMap untouched.
    let mut plan = Vec::new();
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
        let value = tensors.get(key).ok_or_else(|| Error::MissingWeight {
            key: key.to_string(),
            file: file.clone(),
        })?;
        if value.dims() != var.dims() {
            return Err(Error::ShapeMismatch {
                key: key.to_string(),
                expected: var.dims().to_vec(),
                got: value.dims().to_vec(),
                file: file.clone(),
            });
        }
        plan.push((key, var, value));
    }
    for (_, var, value) in &plan {
        let value = value.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&value)?;
    }
    let used: std::collections::HashSet<&str> = plan.iter().map(|(k, _, _)| *k).collect();
    let mut unused: Vec<String> = tensors
        .keys()
        .filter(|k| !used.contains(k.as_str()) && !k.ends_with("num_batches_tracked"))
        .cloned()
        .collect();
    unused.sort();
    Ok(LoadReport {
        loaded: plan.len(),
        unused,
    })
}

/// A state dict as a [`VarBuilder`] backend: errors name the key and the file.
struct StateDict {
    tensors: HashMap<String, Tensor>,
    file: Option<PathBuf>,
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
        self.lookup(name)?
            .to_dtype(dtype)?
            .to_device(dev)?
            .contiguous()
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
