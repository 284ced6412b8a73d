//! Crash-safe checkpoints: weights, optimiser buffers, head state and loop position.
//!
//! A checkpoint directory holds one sub-directory per save and a `latest` pointer:
//!
//! ```text
//! <dir>/latest                      the name of the newest complete save, e.g. "step-00001200"
//! <dir>/step-00001200/model.safetensors      every VarMap variable (BN running stats, centres)
//!                                            (mixed precision: f32, from the master weights)
//! <dir>/step-00001200/optimizer.safetensors  optimiser state by "{param}.{buffer}"
//! <dir>/step-00001200/head.safetensors       the head's non-trainable state
//! <dir>/step-00001200/state.json             epoch, step, schedule, seed, metrics
//! <dir>/step-00001200/config.json            the model card (fr_backbone::ModelCard)
//! <dir>/step-00001200/checksums.sha256       SHA-256 of every file above (`sha256sum -c`)
//! ```
//!
//! The model card says how to rebuild and feed the backbone (configuration, embedding and
//! input size, colour order, normalisation), and records the head, the training set and the
//! latest metrics, so that a step directory can be uploaded to the Hugging Face Hub as it is
//! and loaded back with `fr_backbone::pretrained` (`hf://owner/name`). It is the caller's
//! [`TrainState::model_card`] (see `Trainer::with_model_card`) with `step`, `epoch` and the
//! last value of every metric series filled in; without one, a card with only those.
//!
//! A save writes and fsyncs everything in a hidden staging directory, renames it into place,
//! then replaces `latest` through a fsynced temporary file and a rename. A crash at any point
//! leaves `latest` naming the previous complete save; leftovers of the interrupted one are
//! ignored by loads and replaced by the next save.
//!
//! Every save (format version 2) lists the SHA-256 of each of its files in
//! `checksums.sha256`, written last. A load verifies every file against it before reading
//! anything, and refuses a save with a missing, extra-short or altered file with an
//! [`Error::Checkpoint`] naming the file. Loading a run directory uses the newest save that
//! verifies: when the one `latest` names is damaged, the previous saves are tried newest
//! first, with a warning naming what was wrong ([`newest_good_checkpoint`]). Saves of format
//! version 1 (no checksums) are still read, unverified.
//!
//! [`check_output_dir`] checks before a run starts that its checkpoint directory can be
//! created and written (a read-only or full file system fails there, not at the first save).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use fr_backbone::ModelCard;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::optim::OptimizerConfig;
use crate::precision::LossScalerState;
use crate::schedule::LrSchedule;
use crate::{Error, Result};

/// Weights of every VarMap variable.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimiser state.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Head state.
pub const HEAD_FILE: &str = "head.safetensors";
/// Loop position and metrics.
pub const STATE_FILE: &str = "state.json";
/// Pointer to the newest complete save.
pub const LATEST_FILE: &str = "latest";
/// The model card ([`fr_backbone::ModelCard`]).
pub const MODEL_CARD_FILE: &str = fr_backbone::model_card::MODEL_CARD_FILE;
/// SHA-256 of every other file of a save, one `<64 hex digits>  <file name>` line each (the
/// format of `sha256sum`), written last.
pub const CHECKSUMS_FILE: &str = "checksums.sha256";

/// The format written by [`save_checkpoint`]: 2 added [`CHECKSUMS_FILE`].
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format [`load_checkpoint`] still reads (version 1: no checksums).
pub const MIN_FORMAT_VERSION: u32 = 1;

/// Files every save of format version 2 lists in [`CHECKSUMS_FILE`].
const CHECKED_FILES: [&str; 5] = [
    MODEL_FILE,
    OPTIMIZER_FILE,
    HEAD_FILE,
    STATE_FILE,
    MODEL_CARD_FILE,
];

/// Where a training run is, besides its weights.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainState {
    /// Epoch, 0-based.
    pub epoch: usize,
    /// Optimiser steps taken (batches consumed, skipped ones included): the next step's index.
    pub step: u64,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: u64,
    /// Steps skipped in a row up to now (0 after a step that updated the weights).
    pub consecutive_skips: u64,
    /// `(step, loss)` of the last step whose loss was finite, for the diagnosis of a run that
    /// stops on non-finite steps.
    pub last_finite_loss: Option<(u64, f64)>,
    /// The run's seed (data order, initialisation).
    pub seed: u64,
    /// Total steps of the run, for the schedule.
    pub total_steps: u64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// The schedule in use.
    pub schedule: Option<LrSchedule>,
    /// The optimiser in use (its `lr` is the base rate).
    pub optimizer: Option<OptimizerConfig>,
    /// Metric series by name: `(step, value)`; values must be finite.
    pub metrics: BTreeMap<String, Vec<(u64, f64)>>,
    /// Anything else the caller needs to resume (data-loader position, ...).
    pub extra: BTreeMap<String, serde_json::Value>,
    /// The dynamic loss scaler's scale and counters, when the run uses one
    /// ([`crate::LossScalerConfig`]); absent in older saves.
    pub loss_scaler: Option<LossScalerState>,
    /// Optimiser state tensors, saved to `optimizer.safetensors`.
    #[serde(skip)]
    pub optimizer_state: Vec<(String, Tensor)>,
    /// Head state tensors, saved to `head.safetensors`.
    #[serde(skip)]
    pub head_state: Vec<(String, Tensor)>,
    /// The model card, saved to `config.json` (with `step`, `epoch` and the latest metrics
    /// filled in by [`save_checkpoint`]); read back by [`load_checkpoint`] when present.
    #[serde(skip)]
    pub model_card: Option<ModelCard>,
}

impl TrainState {
    /// The card [`save_checkpoint`] writes: [`TrainState::model_card`] (or an empty card) with
    /// this state's step, epoch and the last value of each metric series.
    pub fn card_to_save(&self) -> ModelCard {
        let mut card = self.model_card.clone().unwrap_or_default();
        card.step = Some(self.step);
        card.epoch = Some(self.epoch);
        for (name, series) in &self.metrics {
            if let Some(&(_, v)) = series.last() {
                card.set_metric(name.clone(), v);
            }
        }
        card
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    #[serde(flatten)]
    state: TrainState,
}

/// A point inside [`save_checkpoint`] where a crash test can stop a save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavePoint {
    /// Every file, checksums included, is written and synced in the hidden staging
    /// directory (the hook gets its path); nothing is renamed yet.
    Staged,
    /// The save directory is in place (the hook gets its path); `latest` still names the
    /// previous save.
    Renamed,
}

/// A function [`save_checkpoint`] calls at each [`SavePoint`] with the directory concerned.
pub type SaveHook = fn(SavePoint, &Path);

static SAVE_HOOK: RwLock<Option<SaveHook>> = RwLock::new(None);

/// Install (`Some`) or remove (`None`) a process-wide hook that [`save_checkpoint`] calls at
/// each [`SavePoint`], on the saving thread. For fault-injection tests: a hook that blocks lets
/// a test kill the process at exactly that point of a save. No hook is installed by default.
pub fn set_save_hook(hook: Option<SaveHook>) {
    *SAVE_HOOK.write().unwrap_or_else(|e| e.into_inner()) = hook;
}

fn run_save_hook(point: SavePoint, path: &Path) {
    let hook = *SAVE_HOOK.read().unwrap_or_else(|e| e.into_inner());
    if let Some(hook) = hook {
        hook(point, path);
    }
}

/// Save `varmap` and `state` as a new checkpoint under `dir` (created if needed); returns the
/// directory of this save.
///
/// # Errors
/// [`Error::Io`] naming the file that could not be written; candle errors serialising tensors.
pub fn save_checkpoint(dir: &Path, varmap: &VarMap, state: &TrainState) -> Result<PathBuf> {
    save_checkpoint_with(dir, varmap, &HashMap::new(), state)
}

/// [`save_checkpoint`], writing the tensors of `overrides` instead of the values of the
/// VarMap variables of the same names. Mixed-precision training saves its f32 master weights
/// this way ([`crate::MasterWeights::checkpoint_weights`]), so that the file holds f32 weights
/// under the model's names.
///
/// # Errors
/// As [`save_checkpoint`]; [`Error::Checkpoint`] for an override that names no VarMap
/// variable or does not have its shape.
pub fn save_checkpoint_with(
    dir: &Path,
    varmap: &VarMap,
    overrides: &HashMap<String, Tensor>,
    state: &TrainState,
) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = free_name(dir, state.step);
    let stage = dir.join(format!(".{name}.tmp"));
    if stage.exists() {
        fs::remove_dir_all(&stage).map_err(|e| Error::io(&stage, e))?;
    }
    fs::create_dir(&stage).map_err(|e| Error::io(&stage, e))?;

    let weights: HashMap<String, Tensor> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| Error::checkpoint(dir, "VarMap lock poisoned"))?;
        for (name, t) in overrides {
            match data.get(name) {
                Some(v) if v.dims() == t.dims() => {}
                Some(v) => {
                    return Err(Error::checkpoint(
                        dir,
                        format!(
                            "weight `{name}` to save has shape {:?}, the variable {:?}",
                            t.dims(),
                            v.dims()
                        ),
                    ))
                }
                None => {
                    return Err(Error::checkpoint(
                        dir,
                        format!("weight `{name}` to save names no variable of the model"),
                    ))
                }
            }
        }
        data.iter()
            .map(|(k, v)| {
                let t = overrides.get(k).unwrap_or_else(|| v.as_tensor());
                (k.clone(), t.detach())
            })
            .collect()
    };
    write_tensors(&stage.join(MODEL_FILE), &weights)?;
    write_tensors(
        &stage.join(OPTIMIZER_FILE),
        &state.optimizer_state.iter().cloned().collect(),
    )?;
    write_tensors(
        &stage.join(HEAD_FILE),
        &state.head_state.iter().cloned().collect(),
    )?;
    let json = serde_json::to_vec_pretty(&StateFile {
        format_version: FORMAT_VERSION,
        state: state.clone(),
    })
    .map_err(|e| Error::checkpoint(stage.join(STATE_FILE), e.to_string()))?;
    write_synced(&stage.join(STATE_FILE), &json)?;
    write_synced(
        &stage.join(MODEL_CARD_FILE),
        &state.card_to_save().to_json(),
    )?;
    // Last: the checksums of what is on disk now.
    let mut sums = String::new();
    for file in CHECKED_FILES {
        let path = stage.join(file);
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        sums.push_str(&format!("{}  {file}\n", sha256_hex(&bytes)));
    }
    write_synced(&stage.join(CHECKSUMS_FILE), sums.as_bytes())?;
    sync_dir(&stage)?;
    run_save_hook(SavePoint::Staged, &stage);

    let target = dir.join(&name);
    fs::rename(&stage, &target).map_err(|e| Error::io(&target, e))?;
    sync_dir(dir)?;
    run_save_hook(SavePoint::Renamed, &target);
    // The commit point: `latest` switches to the new save in one rename.
    let tmp = dir.join(format!(".{LATEST_FILE}.tmp"));
    write_synced(&tmp, format!("{name}\n").as_bytes())?;
    fs::rename(&tmp, dir.join(LATEST_FILE)).map_err(|e| Error::io(dir.join(LATEST_FILE), e))?;
    sync_dir(dir)?;
    tracing::info!(path = %target.display(), step = state.step, "checkpoint saved");
    Ok(target)
}

/// The newest complete save under `dir`, if any.
///
/// # Errors
/// An unreadable or malformed `latest` file.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let latest = dir.join(LATEST_FILE);
    let text = match fs::read_to_string(&latest) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(latest, e)),
    };
    let name = text.trim();
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(Error::checkpoint(latest, format!("bad entry {name:?}")));
    }
    Ok(Some(dir.join(name)))
}

/// Check every file of the save directory `save` against its [`CHECKSUMS_FILE`] and read its
/// format version; returns the version. A save of format version 1 has no checksums and
/// passes unverified (with a warning).
///
/// # Errors
/// [`Error::Checkpoint`] naming the file that is missing, unlisted or whose SHA-256 differs
/// from the listed one, a malformed checksum or state file, or a format version outside
/// [`MIN_FORMAT_VERSION`]`..=`[`FORMAT_VERSION`]; [`Error::Io`] for an unreadable file.
pub fn verify_checkpoint(save: &Path) -> Result<u32> {
    let sums_path = save.join(CHECKSUMS_FILE);
    let state_path = save.join(STATE_FILE);
    match fs::read(&sums_path) {
        Ok(bytes) => {
            let listed = parse_checksums(&sums_path, &bytes)?;
            for file in CHECKED_FILES {
                if !listed.contains_key(file) {
                    return Err(Error::checkpoint(
                        &sums_path,
                        format!("`{file}` is not listed: the checksum file is damaged"),
                    ));
                }
            }
            for (file, want) in &listed {
                let path = save.join(file);
                let data = match fs::read(&path) {
                    Ok(d) => d,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(Error::checkpoint(
                            &path,
                            format!("file missing (listed in {CHECKSUMS_FILE})"),
                        ))
                    }
                    Err(e) => return Err(Error::io(&path, e)),
                };
                let got = sha256_hex(&data);
                if got != *want {
                    return Err(Error::checkpoint(
                        &path,
                        format!(
                            "damaged: SHA-256 {got} differs from {want} in {CHECKSUMS_FILE} \
                             ({} bytes)",
                            data.len()
                        ),
                    ));
                }
            }
            let version = read_state_file(&state_path)?.format_version;
            if version < 2 {
                return Err(Error::checkpoint(
                    &state_path,
                    format!(
                        "format_version {version} with a {CHECKSUMS_FILE}: not a save fr wrote"
                    ),
                ));
            }
            Ok(version)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let version = read_state_file(&state_path)?.format_version;
            if version >= 2 {
                return Err(Error::checkpoint(
                    &sums_path,
                    format!("file missing (format_version {version} saves have one): the save is damaged"),
                ));
            }
            tracing::warn!(
                path = %save.display(),
                "checkpoint of format version {version} has no checksums: loaded unverified"
            );
            Ok(version)
        }
        Err(e) => Err(Error::io(&sums_path, e)),
    }
}

/// The newest save under the run directory `dir` that passes [`verify_checkpoint`]: the one
/// `latest` names, else (with a warning naming what is wrong with it) the older saves, newest
/// first. When `latest` itself is unreadable or malformed every save is a candidate. `None`
/// when no save was ever completed (no `latest`).
///
/// # Errors
/// The error of the save `latest` names (or of reading `latest`) when no save verifies;
/// [`Error::Io`] for a directory that cannot be listed.
pub fn newest_good_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let saves = list_saves(dir)?;
    let (mut first_error, candidates): (Option<Error>, Vec<PathBuf>) = match latest_checkpoint(dir)
    {
        Ok(None) => return Ok(None),
        Ok(Some(latest)) => {
            let key = latest
                .file_name()
                .and_then(|n| parse_name(&n.to_string_lossy()));
            let older = saves
                .iter()
                .rev()
                .filter(|(k, _)| key.is_some_and(|key| *k < key))
                .map(|(_, p)| p.clone());
            (None, std::iter::once(latest).chain(older).collect())
        }
        Err(e) => {
            tracing::warn!(error = %e, "unreadable `latest`: trying every save, newest first");
            (
                Some(e),
                saves.iter().rev().map(|(_, p)| p.clone()).collect(),
            )
        }
    };
    for save in candidates {
        let result = if save.is_dir() {
            verify_checkpoint(&save).map(|_| ())
        } else {
            Err(Error::checkpoint(&save, "save directory missing"))
        };
        match result {
            Ok(()) => {
                if let Some(e) = &first_error {
                    tracing::warn!(
                        path = %save.display(),
                        error = %e,
                        "the newest checkpoint is damaged: using an older one"
                    );
                }
                return Ok(Some(save));
            }
            Err(e) => {
                tracing::warn!(path = %save.display(), error = %e, "checkpoint refused");
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| Error::checkpoint(dir.join(LATEST_FILE), "no save to load")))
}

/// Load a checkpoint into the existing variables of `varmap` and return the loop state
/// (optimiser and head tensors on the variables' device). `dir` is either a run directory
/// (its newest save that verifies is loaded, see [`newest_good_checkpoint`]) or one save's
/// directory (loaded only if it verifies, see [`verify_checkpoint`]).
///
/// Every variable of `varmap` must be in the checkpoint with the same shape, and the
/// checkpoint must hold no other weights; nothing is modified unless all of them fit. Saved
/// tensors are cast to each variable's dtype (f32 weights load into a bf16 model and back).
///
/// # Errors
/// [`Error::Checkpoint`] naming the file (and the key) that is damaged, missing or does not
/// fit; [`Error::Io`] for unreadable files.
pub fn load_checkpoint(dir: &Path, varmap: &VarMap) -> Result<TrainState> {
    load_checkpoint_with(dir, varmap, &[])
}

/// [`load_checkpoint`], also setting each of `extra` — variables outside the VarMap named
/// like one of its variables, such as the f32 master weights of mixed-precision training — to
/// the saved tensor of its name, cast to its own dtype (so an f32 master gets the saved f32
/// value, not the value rounded to its model variable's half type).
///
/// # Errors
/// As [`load_checkpoint`]; an `extra` variable whose name is not a saved weight of the model
/// or whose shape differs is an [`Error::Checkpoint`] too, and nothing is modified.
pub fn load_checkpoint_with(
    dir: &Path,
    varmap: &VarMap,
    extra: &[(String, Var)],
) -> Result<TrainState> {
    let save = if dir.join(STATE_FILE).is_file() || dir.join(CHECKSUMS_FILE).is_file() {
        verify_checkpoint(dir)?;
        dir.to_path_buf()
    } else {
        newest_good_checkpoint(dir)?.ok_or_else(|| {
            Error::checkpoint(dir.join(LATEST_FILE), "no checkpoint in this directory")
        })?
    };
    let mut state = read_state_file(&save.join(STATE_FILE))?.state;

    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::checkpoint(&save, "VarMap lock poisoned"))?;
    let device = data
        .values()
        .next()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let model_path = save.join(MODEL_FILE);
    let mut weights = read_tensors(&model_path, &device)?;
    let mut updates = Vec::with_capacity(data.len() + extra.len());
    let mut saved = HashMap::with_capacity(data.len());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let t = weights
            .remove(name.as_str())
            .ok_or_else(|| Error::checkpoint(&model_path, format!("missing tensor `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(Error::checkpoint(
                &model_path,
                format!(
                    "tensor `{name}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        updates.push((var.clone(), t.to_dtype(var.dtype())?));
        saved.insert(name.as_str(), t);
    }
    for (name, var) in extra {
        let t = saved
            .get(name.as_str())
            .ok_or_else(|| Error::checkpoint(&model_path, format!("missing tensor `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(Error::checkpoint(
                &model_path,
                format!(
                    "tensor `{name}` has shape {:?}, its master copy {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        updates.push((var.clone(), t.to_dtype(var.dtype())?));
    }
    if !weights.is_empty() {
        let mut extra: Vec<_> = weights.keys().cloned().collect();
        extra.sort();
        return Err(Error::checkpoint(
            &model_path,
            format!("tensors not in the model: {}", extra.join(", ")),
        ));
    }
    for (var, t) in updates {
        var.set(&t)?;
    }
    drop(data);

    state.optimizer_state = sorted(read_tensors(&save.join(OPTIMIZER_FILE), &device)?);
    state.head_state = sorted(read_tensors(&save.join(HEAD_FILE), &device)?);
    // Saves made before model cards existed have none.
    let card_path = save.join(MODEL_CARD_FILE);
    state.model_card =
        ModelCard::read(&card_path).map_err(|e| Error::checkpoint(&card_path, e.to_string()))?;
    tracing::info!(path = %save.display(), step = state.step, "checkpoint loaded");
    Ok(state)
}

/// Delete all but the newest `keep` saves under `dir` (never the one `latest` names, nor
/// hidden staging directories); returns the deleted directories.
///
/// # Errors
/// [`Error::Io`] for a directory that cannot be listed or removed.
pub fn prune_checkpoints(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let latest = latest_checkpoint(dir)?;
    let saves = list_saves(dir)?;
    let n = saves.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, path) in saves.into_iter().take(n) {
        if Some(&path) == latest.as_ref() {
            continue;
        }
        fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Bytes [`check_output_dir`] writes and syncs to probe a directory.
pub const PROBE_BYTES: usize = 1 << 20;

/// Check, before a run starts, that checkpoints can be written under `dir`: create it (and its
/// parents), then create, write [`PROBE_BYTES`] bytes to, fsync and delete a hidden probe file
/// in it. A read-only or full file system, a path through a regular file or a directory
/// without write permission fails here rather than at the first save, hours into a run.
///
/// # Errors
/// [`Error::OutputDir`] naming the directory and what failed.
pub fn check_output_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::OutputDir {
        path: dir.to_path_buf(),
        reason: format!("cannot create it: {e}"),
    })?;
    let probe = dir.join(format!(".fr-write-probe-{}", std::process::id()));
    let file = File::create(&probe).map_err(|e| Error::OutputDir {
        path: dir.to_path_buf(),
        reason: format!("cannot create a file in it ({e}): is it read-only?"),
    })?;
    let result = write_probe(file, dir);
    let removed = fs::remove_file(&probe).map_err(|e| Error::OutputDir {
        path: dir.to_path_buf(),
        reason: format!("cannot delete the probe file {}: {e}", probe.display()),
    });
    result.and(removed)
}

/// Write and sync [`PROBE_BYTES`] zero bytes to `file` (opened in `dir`).
fn write_probe(mut file: File, dir: &Path) -> Result<()> {
    file.write_all(&vec![0u8; PROBE_BYTES])
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::OutputDir {
            path: dir.to_path_buf(),
            reason: format!(
                "cannot write and sync {PROBE_BYTES} bytes ({e}): is the disk full or the \
                 file system read-only?"
            ),
        })
}

/// Save directories under `dir` by `(step, k)`, oldest first.
fn list_saves(dir: &Path) -> Result<Vec<((u64, u64), PathBuf)>> {
    let mut saves = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(key) = parse_name(&name) {
            if entry.path().is_dir() {
                saves.push((key, entry.path()));
            }
        }
    }
    saves.sort();
    Ok(saves)
}

/// Parse `state.json`, accepting format versions [`MIN_FORMAT_VERSION`]..=[`FORMAT_VERSION`].
fn read_state_file(path: &Path) -> Result<StateFile> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::checkpoint(path, "file missing"))
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    let file: StateFile =
        serde_json::from_slice(&bytes).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    if file.format_version > FORMAT_VERSION {
        return Err(Error::checkpoint(
            path,
            format!(
                "format_version {} is newer than this fr reads ({MIN_FORMAT_VERSION} to \
                 {FORMAT_VERSION}): update fr",
                file.format_version
            ),
        ));
    }
    if file.format_version < MIN_FORMAT_VERSION {
        return Err(Error::checkpoint(
            path,
            format!(
                "format_version {} is not one fr reads ({MIN_FORMAT_VERSION} to {FORMAT_VERSION})",
                file.format_version
            ),
        ));
    }
    Ok(file)
}

/// Parse a `sha256sum`-format checksum file: `<64 lowercase hex digits>  <file>` lines (a
/// `*` before the name, binary mode, is accepted); every file must be one a save holds, once.
fn parse_checksums(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Error::checkpoint(path, "not UTF-8 text: the file is damaged"))?;
    let mut listed = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| Error::checkpoint(path, format!("line {}: {why}", i + 1));
        let (hex, rest) = line
            .split_at_checked(64)
            .ok_or_else(|| bad("expected `<64 hex digits>  <file>`"))?;
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad("the checksum is not 64 lowercase hex digits"));
        }
        let file = rest
            .strip_prefix("  ")
            .or_else(|| rest.strip_prefix(" *"))
            .ok_or_else(|| bad("expected two spaces between checksum and file"))?;
        if !CHECKED_FILES.contains(&file) {
            return Err(bad(&format!("`{file}` is not a checkpoint file")));
        }
        if listed.insert(file.to_string(), hex.to_string()).is_some() {
            return Err(bad(&format!("`{file}` is listed twice")));
        }
    }
    Ok(listed)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `step-{step:08}`, or `step-{step:08}.{k}` when a save of that step already exists.
fn free_name(dir: &Path, step: u64) -> String {
    let base = format!("step-{step:08}");
    if !dir.join(&base).exists() {
        return base;
    }
    (1u64..)
        .map(|k| format!("{base}.{k}"))
        .find(|n| !dir.join(n).exists())
        .unwrap_or(base)
}

/// `(step, k)` of a save directory name.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("step-")?;
    let (step, k) = rest.split_once('.').unwrap_or((rest, "0"));
    Some((step.parse().ok()?, k.parse().ok()?))
}

fn sorted(map: HashMap<String, Tensor>) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::checkpoint(path, e.to_string()))?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::checkpoint(path, "file missing"));
    }
    candle_core::safetensors::load(path, device).map_err(|e| Error::checkpoint(path, e.to_string()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Make a rename or a new entry in `dir` durable (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::Init;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fr-train-ckpt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn model(v: f64) -> VarMap {
        let vm = VarMap::new();
        vm.get(
            (2, 3),
            "fc.weight",
            Init::Const(v),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        vm.get(
            3,
            "bn.running_mean",
            Init::Const(v + 1.0),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        vm
    }

    fn value(vm: &VarMap, name: &str) -> Vec<f32> {
        let data = vm.data().lock().unwrap();
        data[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn state(step: u64) -> TrainState {
        TrainState {
            epoch: 1,
            step,
            skipped_steps: 2,
            seed: 42,
            total_steps: 100,
            lr: 0.05,
            schedule: Some(LrSchedule::default()),
            optimizer: Some(OptimizerConfig::default()),
            metrics: [("loss".to_string(), vec![(0, 3.5), (step, 1.25)])].into(),
            optimizer_state: vec![(
                "fc.weight.momentum_buffer".into(),
                Tensor::full(0.5f32, (2, 3), &Device::Cpu).unwrap(),
            )],
            head_state: vec![("ema".into(), Tensor::new(&[7.0f32], &Device::Cpu).unwrap())],
            ..Default::default()
        }
    }

    #[test]
    fn round_trip() {
        let dir = tmpdir("rt");
        let saved = save_checkpoint(&dir, &model(2.0), &state(10)).unwrap();
        assert!(saved.ends_with("step-00000010"));
        let vm = model(0.0);
        let st = load_checkpoint(&dir, &vm).unwrap();
        assert_eq!(value(&vm, "fc.weight"), vec![2.0; 6]);
        assert_eq!(value(&vm, "bn.running_mean"), vec![3.0; 3]);
        assert_eq!(
            (st.epoch, st.step, st.skipped_steps, st.seed),
            (1, 10, 2, 42)
        );
        assert_eq!(st.schedule, Some(LrSchedule::default()));
        assert_eq!(st.metrics["loss"], vec![(0, 3.5), (10, 1.25)]);
        assert_eq!(st.optimizer_state[0].0, "fc.weight.momentum_buffer");
        assert_eq!(st.head_state[0].1.to_vec1::<f32>().unwrap(), vec![7.0]);
        // A save directory loads directly too.
        assert_eq!(load_checkpoint(&saved, &model(0.0)).unwrap().step, 10);
        // Without a card from the caller, the card holds the position and the last metrics.
        let card = st.model_card.expect("config.json written");
        assert_eq!((card.step, card.epoch), (Some(10), Some(1)));
        assert_eq!(card.metrics["loss"], 1.25);
        assert_eq!(card.backbone, None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn model_card_is_written_with_the_save() {
        use fr_backbone::{BackboneConfig, IResNetConfig};
        let dir = tmpdir("card");
        let mut st = state(3);
        st.model_card = Some(
            ModelCard::new(BackboneConfig::Iresnet(IResNetConfig::r18()))
                .with_head("arcface", None, Some(10))
                .with_training_set("synthetic", Some(10), Some(40)),
        );
        st.metrics.insert("acc".into(), vec![(1, 0.25), (3, 0.75)]);
        let saved = save_checkpoint(&dir, &model(1.0), &st).unwrap();
        let card = ModelCard::read(saved.join(MODEL_CARD_FILE))
            .unwrap()
            .unwrap();
        assert_eq!(card.embedding_size, Some(512));
        assert_eq!(card.head.as_ref().unwrap().name, "arcface");
        assert_eq!(card.training_set.as_ref().unwrap().images, Some(40));
        assert_eq!((card.step, card.metrics["loss"]), (Some(3), 1.25));
        assert_eq!(card.metrics["acc"], 0.75);
        // No staging leftovers: the card went in with the rest, atomically.
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        assert_eq!(
            load_checkpoint(&dir, &model(0.0)).unwrap().model_card,
            Some(card)
        );
        // A malformed card fails the load, naming it.
        fs::write(
            saved.join(MODEL_CARD_FILE),
            b"{\"format\": \"fr-model-card\", \"step\": -1}",
        )
        .unwrap();
        let err = load_checkpoint(&dir, &model(0.0)).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn interrupted_save_leaves_previous_checkpoint_loadable() {
        let dir = tmpdir("crash");
        save_checkpoint(&dir, &model(2.0), &state(10)).unwrap();
        // A crash while staging the next save, and one after its rename but before `latest`
        // switched, and a half-written pointer temp file.
        let stage = dir.join(".step-00000020.tmp");
        fs::create_dir_all(&stage).unwrap();
        fs::write(stage.join(MODEL_FILE), b"garbage").unwrap();
        let renamed = dir.join("step-00000020");
        fs::create_dir_all(&renamed).unwrap();
        fs::write(renamed.join(MODEL_FILE), b"\x10\x00garbage").unwrap();
        fs::write(dir.join(".latest.tmp"), b"step-000").unwrap();
        let vm = model(0.0);
        assert_eq!(load_checkpoint(&dir, &vm).unwrap().step, 10);
        assert_eq!(value(&vm, "fc.weight"), vec![2.0; 6]);
        // The next save goes through, beside the debris.
        let saved = save_checkpoint(&dir, &model(5.0), &state(20)).unwrap();
        assert!(saved.ends_with("step-00000020.1"));
        assert_eq!(load_checkpoint(&dir, &vm).unwrap().step, 20);
        assert_eq!(value(&vm, "fc.weight"), vec![5.0; 6]);
        let removed = prune_checkpoints(&dir, 1).unwrap();
        assert_eq!(removed.len(), 2);
        assert_eq!(load_checkpoint(&dir, &vm).unwrap().step, 20);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_file_and_key() {
        let dir = tmpdir("err");
        save_checkpoint(&dir, &model(2.0), &state(1)).unwrap();
        let bigger = model(0.0);
        bigger
            .get(4, "fc.bias", Init::Const(0.0), DType::F32, &Device::Cpu)
            .unwrap();
        let err = load_checkpoint(&dir, &bigger).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("fc.bias"),
            "{err}"
        );
        // Nothing was modified by the failed load.
        assert_eq!(value(&bigger, "fc.weight"), vec![0.0; 6]);

        let other = VarMap::new();
        other
            .get(
                (3, 2),
                "fc.weight",
                Init::Const(0.0),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let err = load_checkpoint(&dir, &other).unwrap_err().to_string();
        assert!(err.contains("shape") && err.contains("fc.weight"), "{err}");

        let latest = latest_checkpoint(&dir).unwrap().unwrap();
        fs::write(latest.join(STATE_FILE), b"{ not json").unwrap();
        let err = load_checkpoint(&dir, &model(0.0)).unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
        let empty = tmpdir("empty");
        assert!(load_checkpoint(&empty, &model(0.0)).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn flip_byte(path: &Path, at: usize) {
        let mut bytes = fs::read(path).unwrap();
        let at = at.min(bytes.len() - 1);
        bytes[at] ^= 0x01;
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn damaged_latest_is_refused_and_the_previous_save_is_used() {
        let dir = tmpdir("damaged");
        save_checkpoint(&dir, &model(2.0), &state(10)).unwrap();
        let newest = save_checkpoint(&dir, &model(5.0), &state(20)).unwrap();
        let sums = fs::read_to_string(newest.join(CHECKSUMS_FILE)).unwrap();
        assert_eq!(sums.lines().count(), CHECKED_FILES.len(), "{sums}");
        for file in CHECKED_FILES {
            assert!(sums.contains(&format!("  {file}\n")), "{sums}");
        }
        assert_eq!(verify_checkpoint(&newest).unwrap(), FORMAT_VERSION);

        // One flipped bit in the weights of the newest save (a value, not the header: it
        // would still parse).
        let model_path = newest.join(MODEL_FILE);
        let len = fs::metadata(&model_path).unwrap().len() as usize;
        flip_byte(&model_path, len - 3);
        let err = verify_checkpoint(&newest).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("damaged"),
            "{err}"
        );
        // Loading that save directly is refused, naming the file; nothing is modified.
        let vm = model(0.0);
        let err = load_checkpoint(&newest, &vm).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        assert_eq!(value(&vm, "fc.weight"), vec![0.0; 6]);
        // The run directory falls back to the previous save.
        assert_eq!(
            newest_good_checkpoint(&dir).unwrap().unwrap(),
            dir.join("step-00000010")
        );
        assert_eq!(load_checkpoint(&dir, &vm).unwrap().step, 10);
        assert_eq!(value(&vm, "fc.weight"), vec![2.0; 6]);

        // A missing file, a damaged checksum list, a removed checksum list: each refused.
        fs::write(&model_path, b"").unwrap();
        fs::remove_file(newest.join(HEAD_FILE)).unwrap();
        let err = verify_checkpoint(&newest).unwrap_err().to_string();
        assert!(
            err.contains("head.safetensors") && err.contains("missing"),
            "{err}"
        );
        fs::write(newest.join(CHECKSUMS_FILE), "0123  state.json\n").unwrap();
        let err = verify_checkpoint(&newest).unwrap_err().to_string();
        assert!(
            err.contains(CHECKSUMS_FILE) && err.contains("line 1"),
            "{err}"
        );
        fs::remove_file(newest.join(CHECKSUMS_FILE)).unwrap();
        let err = verify_checkpoint(&newest).unwrap_err().to_string();
        assert!(
            err.contains(CHECKSUMS_FILE) && err.contains("missing"),
            "{err}"
        );

        // Every save damaged: the error is the newest one's.
        flip_byte(&dir.join("step-00000010").join(STATE_FILE), 5);
        let err = load_checkpoint(&dir, &vm).unwrap_err().to_string();
        assert!(
            err.contains("step-00000020") && err.contains(CHECKSUMS_FILE),
            "{err}"
        );
        // A damaged `latest` pointer: every save is a candidate, none verifies.
        fs::write(dir.join(LATEST_FILE), "../elsewhere\n").unwrap();
        assert!(load_checkpoint(&dir, &vm).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn format_version_1_is_read_and_newer_versions_are_refused() {
        let dir = tmpdir("v1");
        let saved = save_checkpoint(&dir, &model(2.0), &state(10)).unwrap();
        // A version-1 save: no checksums.
        fs::remove_file(saved.join(CHECKSUMS_FILE)).unwrap();
        let state_path = saved.join(STATE_FILE);
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
        json["format_version"] = 1.into();
        fs::write(&state_path, serde_json::to_vec(&json).unwrap()).unwrap();
        let vm = model(0.0);
        assert_eq!(load_checkpoint(&dir, &vm).unwrap().step, 10);
        assert_eq!(value(&vm, "fc.weight"), vec![2.0; 6]);
        // A version from the future.
        json["format_version"] = 99.into();
        fs::write(&state_path, serde_json::to_vec(&json).unwrap()).unwrap();
        let err = load_checkpoint(&saved, &vm).unwrap_err().to_string();
        assert!(
            err.contains("state.json")
                && err.contains("format_version 99")
                && err.contains("newer"),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn save_hook_sees_the_staged_and_the_renamed_save() {
        use std::sync::Mutex;
        static SEEN: Mutex<Vec<(SavePoint, PathBuf, bool)>> = Mutex::new(Vec::new());
        fn hook(point: SavePoint, path: &Path) {
            // At both points `latest` has not switched yet.
            let latest = fs::read_to_string(path.parent().unwrap().join(LATEST_FILE)).ok();
            let committed = latest.is_some_and(|l| path.ends_with(l.trim()));
            SEEN.lock()
                .unwrap()
                .push((point, path.to_path_buf(), committed));
        }
        let dir = tmpdir("hook");
        set_save_hook(Some(hook));
        let saved = save_checkpoint(&dir, &model(1.0), &state(4));
        set_save_hook(None);
        let saved = saved.unwrap();
        // Saves of tests running in parallel may pass by the hook too.
        let seen: Vec<_> = SEEN
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p, _)| p.starts_with(&dir))
            .cloned()
            .collect();
        assert_eq!(
            seen,
            vec![
                (SavePoint::Staged, dir.join(".step-00000004.tmp"), false),
                (SavePoint::Renamed, saved, false),
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_dir_check_refuses_what_cannot_be_written() {
        let dir = tmpdir("outdir");
        // Created with its parents, probed, left clean.
        let nested = dir.join("a").join("b");
        check_output_dir(&nested).unwrap();
        assert_eq!(fs::read_dir(&nested).unwrap().count(), 0);
        // A path through a regular file cannot be created, whoever runs the test.
        fs::write(dir.join("file"), b"x").unwrap();
        let err = check_output_dir(&dir.join("file").join("run"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("output directory") && err.contains("cannot create it"),
            "{err}"
        );
        // A full disk: the probe write fails with the reason (Linux's always-full device).
        let full = Path::new("/dev/full");
        if full.exists() {
            let f = fs::OpenOptions::new().write(true).open(full).unwrap();
            let err = write_probe(f, &dir).unwrap_err().to_string();
            assert!(err.contains("disk full"), "{err}");
        } else {
            eprintln!("no /dev/full here: the full-disk case is not exercised");
        }
        // A read-only directory; privileged users (root) write there anyway, so the check is
        // made only when the permission bits are enforced for this user.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let ro = dir.join("read-only");
            fs::create_dir_all(&ro).unwrap();
            fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
            let enforced = fs::write(ro.join("try"), b"x").is_err();
            if enforced {
                let err = check_output_dir(&ro).unwrap_err().to_string();
                assert!(err.contains("read-only"), "{err}");
            } else {
                eprintln!(
                    "running with privileges that ignore permissions: read-only case skipped"
                );
                assert!(check_output_dir(&ro).is_ok());
            }
            fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
