//! Crash-safe checkpoints: weights, optimiser buffers, head state and loop position.
//!
//! A checkpoint directory holds one sub-directory per save and a `latest` pointer:
//!
//! ```text
//! <dir>/latest                      the name of the newest complete save, e.g. "step-00001200"
//! <dir>/step-00001200/model.safetensors      every VarMap variable (BN running stats, centres)
//! <dir>/step-00001200/optimizer.safetensors  optimiser state by "{param}.{buffer}"
//! <dir>/step-00001200/head.safetensors       the head's non-trainable state
//! <dir>/step-00001200/state.json             epoch, step, schedule, seed, metrics
//! <dir>/step-00001200/config.json            the model card (fr_backbone::ModelCard)
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

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use fr_backbone::ModelCard;
use serde::{Deserialize, Serialize};

use crate::optim::OptimizerConfig;
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

const FORMAT_VERSION: u32 = 1;

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

/// Save `varmap` and `state` as a new checkpoint under `dir` (created if needed); returns the
/// directory of this save.
///
/// # Errors
/// [`Error::Io`] naming the file that could not be written; candle errors serialising tensors.
pub fn save_checkpoint(dir: &Path, varmap: &VarMap, state: &TrainState) -> Result<PathBuf> {
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
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
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
    sync_dir(&stage)?;

    let target = dir.join(&name);
    fs::rename(&stage, &target).map_err(|e| Error::io(&target, e))?;
    sync_dir(dir)?;
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

/// Load a checkpoint into the existing variables of `varmap` and return the loop state
/// (optimiser and head tensors on the variables' device). `dir` is either a run directory
/// (its `latest` save is loaded) or one save's directory.
///
/// Every variable of `varmap` must be in the checkpoint with the same shape, and the
/// checkpoint must hold no other weights; nothing is modified unless all of them fit.
///
/// # Errors
/// [`Error::Checkpoint`] naming the file and the key that is missing or does not fit;
/// [`Error::Io`] for unreadable files.
pub fn load_checkpoint(dir: &Path, varmap: &VarMap) -> Result<TrainState> {
    let save = if dir.join(STATE_FILE).is_file() {
        dir.to_path_buf()
    } else {
        latest_checkpoint(dir)?.ok_or_else(|| {
            Error::checkpoint(dir.join(LATEST_FILE), "no checkpoint in this directory")
        })?
    };
    let state_path = save.join(STATE_FILE);
    let bytes = fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let file: StateFile = serde_json::from_slice(&bytes)
        .map_err(|e| Error::checkpoint(&state_path, e.to_string()))?;
    if file.format_version != FORMAT_VERSION {
        return Err(Error::checkpoint(
            &state_path,
            format!(
                "format_version {} is not {FORMAT_VERSION}",
                file.format_version
            ),
        ));
    }
    let mut state = file.state;

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
    let mut updates = Vec::with_capacity(data.len());
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
        updates.push((var, t.to_dtype(var.dtype())?));
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
    let mut saves: Vec<((u64, u64), PathBuf)> = Vec::new();
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
}
