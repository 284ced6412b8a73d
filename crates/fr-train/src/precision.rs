//! Mixed-precision training: the backbone in bf16 (or f16 with a dynamic loss scaler), the
//! head, its softmax and the loss in f32, and f32 master weights for the optimiser.
//!
//! insightface arcface_torch (`train_v2.py`) runs the backbone under `torch.autocast` and scales
//! the loss with `torch.cuda.amp.GradScaler(growth_interval=100)`; its IResNet leaves the
//! autocast region before `fc` (`self.fc(x.float())`), so the embeddings, the Partial FC
//! classifier and the loss are f32. candle has no autocast: here the backbone's *variables*
//! are stored in the half type (the caller builds it with a `VarBuilder` of
//! [`Precision::backbone_dtype`]), and the [`Trainer`](crate::Trainer) keeps an f32 master copy
//! of each ([`MasterWeights`]). One step with [`Precision::Bf16`] or [`Precision::F16`]:
//!
//! ```text
//! images ─cast→ bf16/f16 ─backbone→ embeddings ─cast→ f32 ─head→ softmax, loss (f32)
//! backward of loss·S → half gradients ─cast→ f32, ·1/S → keyed by the f32 masters
//!   → clip → SGD / AdamW on the masters → model variables = masters cast to bf16/f16
//! ```
//!
//! `S` is the [`LossScaler`]'s scale (1 without one). Differences from PyTorch autocast:
//! every backbone layer runs in the half type, `fc` and the final BatchNorm included (its
//! statistics and normalisation are computed in f32 by fr-kernels, and its running statistics
//! are f32 variables, as under autocast); only the trainable variables have f32 masters.
//!
//! ```
//! use candle_core::{DType, Device};
//! use fr_train::{Precision, SeededVarMap};
//!
//! let precision: Precision = "bf16".parse()?;
//! let params = SeededVarMap::new(7);
//! // The backbone in bf16, the head in f32, both in the same VarMap.
//! let backbone_vb = params.var_builder(precision.backbone_dtype(), &Device::Cpu);
//! let head_vb = params.var_builder(DType::F32, &Device::Cpu).pp("head");
//! let fc = candle_nn::linear(8, 4, backbone_vb.pp("fc"))?;
//! assert_eq!(fc.weight().dtype(), DType::BF16);
//! # let _ = head_vb;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The floating-point type a backbone trains in; heads, softmax and losses are always f32.
/// `"f32"`, `"bf16"` or `"f16"` in a config file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (no master copies, no loss scaling).
    #[default]
    F32,
    /// bfloat16 backbone (8-bit exponent like f32: no loss scaling needed).
    Bf16,
    /// IEEE half backbone (5-bit exponent, largest value 65504): with a dynamic loss scaler by
    /// default.
    F16,
}

impl Precision {
    /// The config names, in declaration order.
    pub const NAMES: [&'static str; 3] = ["f32", "bf16", "f16"];

    /// The dtype of the backbone's variables and activations: F32, BF16 or F16.
    pub fn backbone_dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// Whether the backbone runs in a half type (master weights and casts are needed).
    pub fn is_mixed(self) -> bool {
        self != Self::F32
    }

    /// The config name: `f32`, `bf16` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;

    /// `f32`, `bf16` or `f16`, in any case.
    ///
    /// # Errors
    /// [`Error::Config`] (`precision`) listing the accepted names.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            _ => Err(Error::config(
                "precision",
                format!("unknown precision {s:?}; expected one of f32, bf16, f16"),
            )),
        }
    }
}

/// Dynamic loss scaling with the semantics of `torch.cuda.amp.GradScaler`: the backward pass
/// runs on `loss · scale` so that small f16 gradients do not flush to zero; a step whose
/// unscaled gradients are not all finite is skipped and the scale multiplied by
/// `backoff_factor`; after `growth_interval` good steps in a row it is multiplied by
/// `growth_factor`. Defaults are GradScaler's, with arcface_torch's `growth_interval=100`
/// (PyTorch's default is 2000).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossScalerConfig {
    /// `true` / `false` forces the scaler on / off; absent (`None`): on for
    /// [`Precision::F16`], off for bf16 and f32 (bf16 has f32's exponent range).
    pub enabled: Option<bool>,
    /// Scale of the first step: 65536 (2¹⁶). At most `f32::MAX` (the loss is f32).
    pub init_scale: f64,
    /// Factor applied after `growth_interval` good steps in a row: 2.
    pub growth_factor: f64,
    /// Factor applied after a step with non-finite gradients: 0.5.
    pub backoff_factor: f64,
    /// Good steps in a row before the scale grows: 100 (arcface_torch).
    pub growth_interval: u64,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 100,
        }
    }
}

impl LossScalerConfig {
    /// Whether the scaler runs when the backbone trains in `precision`.
    pub fn enabled_for(&self, precision: Precision) -> bool {
        self.enabled.unwrap_or(precision == Precision::F16)
    }

    /// Check every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key as in a trainer config (`loss_scaler.init_scale`,
    /// `loss_scaler.growth_factor`, `loss_scaler.backoff_factor`,
    /// `loss_scaler.growth_interval`) and its allowed range.
    pub fn validate(&self) -> Result<()> {
        let max = f64::from(f32::MAX);
        if !(self.init_scale.is_finite() && self.init_scale > 0.0 && self.init_scale <= max) {
            return Err(Error::config(
                "loss_scaler.init_scale",
                format!(
                    "must be > 0 and at most {max:e} (f32's largest), got {}",
                    self.init_scale
                ),
            ));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return Err(Error::config(
                "loss_scaler.growth_factor",
                format!("must be finite and > 1, got {}", self.growth_factor),
            ));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(Error::config(
                "loss_scaler.backoff_factor",
                format!("must be in (0, 1), got {}", self.backoff_factor),
            ));
        }
        if self.growth_interval == 0 {
            return Err(Error::config(
                "loss_scaler.growth_interval",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Where a [`LossScaler`] is; saved in checkpoints (`loss_scaler` in `state.json`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScalerState {
    /// The scale the next backward pass multiplies the loss by.
    pub scale: f64,
    /// Good steps in a row since the last growth or overflow (GradScaler's growth tracker).
    pub good_steps: u64,
    /// Steps skipped for an overflow so far.
    #[serde(default)]
    pub overflows: u64,
}

/// The scaler's smallest scale that still absorbs an overflow (f32's smallest normal value):
/// below it an overflow is no longer the scale's doing, and the [`Trainer`](crate::Trainer)
/// counts it towards `max_consecutive_skips` like any non-finite gradient.
pub const MIN_LOSS_SCALE: f64 = f32::MIN_POSITIVE as f64;

/// A dynamic loss scaler ([`LossScalerConfig`]) and its [`LossScalerState`].
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    config: LossScalerConfig,
    state: LossScalerState,
}

impl LossScaler {
    /// A scaler at `config.init_scale` (call [`LossScalerConfig::validate`] first).
    pub fn new(config: LossScalerConfig) -> Self {
        let state = LossScalerState {
            scale: config.init_scale,
            good_steps: 0,
            overflows: 0,
        };
        Self { config, state }
    }

    /// The scale of the next backward pass.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// The configuration.
    pub fn config(&self) -> &LossScalerConfig {
        &self.config
    }

    /// The state, for checkpoints.
    pub fn state(&self) -> LossScalerState {
        self.state
    }

    /// Restore what [`LossScaler::state`] returned.
    ///
    /// # Errors
    /// [`Error::Config`] (`loss_scaler.scale`) for a scale that is not finite and > 0.
    pub fn load_state(&mut self, state: LossScalerState) -> Result<()> {
        if !(state.scale.is_finite() && state.scale > 0.0) {
            return Err(Error::config(
                "loss_scaler.scale",
                format!("saved scale must be finite and > 0, got {}", state.scale),
            ));
        }
        self.state = state;
        Ok(())
    }

    /// Whether an overflow at the current scale is the scale's doing (the scale is at least
    /// [`MIN_LOSS_SCALE`]): the step is then skipped without counting towards divergence.
    pub fn absorbs_overflow(&self) -> bool {
        self.state.scale >= MIN_LOSS_SCALE
    }

    /// `GradScaler.update` after a step: an overflow multiplies the scale by `backoff_factor`
    /// and resets the good-step count; a good step counts, and the `growth_interval`-th in a
    /// row multiplies the scale by `growth_factor` (unless that would pass `f32::MAX`) and
    /// resets the count.
    pub fn update(&mut self, overflow: bool) {
        let s = &mut self.state;
        if overflow {
            s.scale *= self.config.backoff_factor;
            s.good_steps = 0;
            s.overflows += 1;
            return;
        }
        s.good_steps += 1;
        if s.good_steps >= self.config.growth_interval {
            let grown = s.scale * self.config.growth_factor;
            if grown <= f64::from(f32::MAX) {
                s.scale = grown;
            }
            s.good_steps = 0;
        }
    }
}

/// One trainable variable and, when it is not f32, its f32 master copy.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    model: Var,
    master: Option<Var>,
}

/// f32 master copies of a model's half-precision trainable variables. The optimiser updates
/// the masters (f32 variables are their own masters); after each step the model variables are
/// set to the masters rounded to their dtype, so updates smaller than a half-precision ulp
/// accumulate in the master instead of being lost.
#[derive(Debug, Clone)]
pub struct MasterWeights {
    entries: Vec<Entry>,
}

impl MasterWeights {
    /// Masters for the non-f32 floating-point variables of `params` (name, model variable),
    /// initialised to their current values.
    ///
    /// # Errors
    /// Candle errors (allocation).
    pub fn new(params: &[(String, Var)]) -> Result<Self> {
        let entries = params
            .iter()
            .map(|(name, var)| {
                let master = if var.dtype().is_float() && var.dtype() != DType::F32 {
                    Some(Var::from_tensor(&var.as_tensor().to_dtype(DType::F32)?)?)
                } else {
                    None
                };
                Ok(Entry {
                    name: name.clone(),
                    model: var.clone(),
                    master,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { entries })
    }

    /// The variables the optimiser updates, by name, in the order given to
    /// [`MasterWeights::new`]: each master, or the model variable itself when it is f32.
    pub fn optimised(&self) -> Vec<(String, Var)> {
        self.entries
            .iter()
            .map(|e| {
                (
                    e.name.clone(),
                    e.master.as_ref().unwrap_or(&e.model).clone(),
                )
            })
            .collect()
    }

    /// The f32 masters by name (only of the variables that have one).
    pub fn masters(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries
            .iter()
            .filter_map(|e| e.master.as_ref().map(|m| (e.name.as_str(), m)))
    }

    /// The master of variable `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.masters().find(|(n, _)| *n == name).map(|(_, m)| m)
    }

    /// The gradients of the model variables in `grads`, cast to f32 and multiplied by
    /// `unscale` (`1/scale` of a [`LossScaler`]; 1 leaves them as they are), in a fresh store
    /// keyed by the optimised variables ([`MasterWeights::optimised`]). Variables without a
    /// gradient are left out.
    ///
    /// # Errors
    /// Candle errors.
    pub fn master_grads(&self, grads: &GradStore, unscale: f64) -> Result<GradStore> {
        let mut out = GradStore::default();
        for e in &self.entries {
            let Some(g) = grads.get(e.model.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let g = if unscale == 1.0 {
                g
            } else {
                g.affine(unscale, 0.0)?
            };
            let key = e.master.as_ref().unwrap_or(&e.model);
            out.insert(key.as_tensor(), g.detach());
        }
        Ok(out)
    }

    /// Set every model variable that has a master to the master cast to its dtype.
    ///
    /// # Errors
    /// Candle errors.
    pub fn sync_model(&self) -> Result<()> {
        for e in &self.entries {
            if let Some(m) = &e.master {
                e.model.set(&m.as_tensor().to_dtype(e.model.dtype())?)?;
            }
        }
        Ok(())
    }

    /// The weights a checkpoint of `varmap` holds in mixed precision: the master of every
    /// variable that has one, and every other non-f32 floating-point variable (BatchNorm
    /// running statistics, fixed scales) widened to f32 (exactly). f32 variables are not
    /// listed (they are saved as they are).
    ///
    /// # Errors
    /// A poisoned VarMap lock ([`Error::Config`]), candle errors.
    pub fn checkpoint_weights(&self, varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| Error::config("varmap", "VarMap lock poisoned"))?;
        let mut weights = HashMap::new();
        for (name, var) in data.iter() {
            let t = match self.get(name) {
                Some(m) => m.as_tensor().detach(),
                None if var.dtype().is_float() && var.dtype() != DType::F32 => {
                    var.as_tensor().to_dtype(DType::F32)?.detach()
                }
                None => continue,
            };
            weights.insert(name.clone(), t);
        }
        Ok(weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn scaler_backs_off_and_grows_like_grad_scaler() {
        let mut s = LossScaler::new(LossScalerConfig {
            init_scale: 1024.0,
            growth_interval: 3,
            ..LossScalerConfig::default()
        });
        s.update(false);
        s.update(false);
        assert_eq!((s.scale(), s.state().good_steps), (1024.0, 2));
        // An overflow resets the count.
        s.update(true);
        assert_eq!((s.scale(), s.state().good_steps), (512.0, 0));
        for _ in 0..3 {
            s.update(false);
        }
        assert_eq!((s.scale(), s.state().good_steps), (1024.0, 0));
        assert_eq!(s.state().overflows, 1);
        // Never past f32::MAX.
        let mut big = LossScaler::new(LossScalerConfig {
            init_scale: f64::from(f32::MAX),
            growth_interval: 1,
            ..LossScalerConfig::default()
        });
        big.update(false);
        assert_eq!(big.scale(), f64::from(f32::MAX));
        assert!(big.absorbs_overflow());
        big.load_state(LossScalerState {
            scale: MIN_LOSS_SCALE / 2.0,
            good_steps: 0,
            overflows: 0,
        })
        .unwrap();
        assert!(!big.absorbs_overflow());
    }

    #[test]
    fn masters_only_for_half_variables() {
        let dev = Device::Cpu;
        let half = Var::from_tensor(
            &Tensor::new(&[1.0f32, 2.5], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let full = Var::new(&[3.0f32], &dev).unwrap();
        let m =
            MasterWeights::new(&[("a".into(), half.clone()), ("b".into(), full.clone())]).unwrap();
        assert_eq!(m.masters().map(|(n, _)| n).collect::<Vec<_>>(), ["a"]);
        let opt = m.optimised();
        assert_eq!(opt[0].1.dtype(), DType::F32);
        assert_eq!(opt[1].1.as_tensor().id(), full.as_tensor().id());
        // Gradients: cast, unscaled, keyed by the master.
        let loss = (half
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            + full.as_tensor().sum_all().unwrap())
        .unwrap()
        .affine(8.0, 0.0)
        .unwrap();
        let grads = m.master_grads(&loss.backward().unwrap(), 0.125).unwrap();
        let ga: Vec<f32> = grads.get(opt[0].1.as_tensor()).unwrap().to_vec1().unwrap();
        let gb: Vec<f32> = grads.get(full.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!((ga, gb), (vec![1.0, 1.0], vec![1.0]));
        // An update of the master reaches the model, rounded.
        opt[0]
            .1
            .set(&Tensor::new(&[1.001f32, -4.0], &dev).unwrap())
            .unwrap();
        m.sync_model().unwrap();
        let v: Vec<f32> = half
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v, vec![1.0, -4.0]);
    }

    #[test]
    fn precision_names_round_trip() {
        for name in Precision::NAMES {
            let p: Precision = name.parse().unwrap();
            assert_eq!(p.to_string(), name);
        }
        assert_eq!("BF16".parse::<Precision>().unwrap(), Precision::Bf16);
        let err = "fp8".parse::<Precision>().unwrap_err().to_string();
        assert!(err.contains("precision") && err.contains("fp8"), "{err}");
    }
}
