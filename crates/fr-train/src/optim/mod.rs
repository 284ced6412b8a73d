//! Optimisers with PyTorch semantics: SGD (momentum, dampening, Nesterov, weight decay) and
//! AdamW, plus the serde [`OptimizerConfig`] that picks one.
//!
//! Both implement [`candle_nn::Optimizer`] (parameters then get the names `param.{i}`) and have
//! a name-aware constructor `new_named(Vec<(String, Var)>, config)`: names key the optimiser
//! state for checkpoints and decide which parameters are weight-decayed ([`WeightDecayOn`]).
//! All state tensors are detached: no step ever extends the autograd graph.

mod adamw;
mod sgd;

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

pub use adamw::{AdamW, AdamWConfig};
pub use sgd::{Sgd, SgdConfig};

use crate::{Error, Result};

/// Which parameters weight decay applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightDecayOn {
    /// Every parameter (PyTorch's and insightface arcface_torch's default).
    #[default]
    All,
    /// Only weight matrices and kernels: parameters of rank ≥ 2 whose name does not end in
    /// `bias`. Exempts biases, BatchNorm γ/β (`bn*.weight`, `features.weight`) and PReLU slopes,
    /// which are all 1-D — the rule is decided by shape first, so it needs no per-model list.
    WeightsOnly,
}

impl WeightDecayOn {
    /// Whether a parameter named `name` with `rank` dimensions is decayed.
    pub fn applies(self, name: &str, rank: usize) -> bool {
        match self {
            Self::All => true,
            Self::WeightsOnly => rank >= 2 && !name.ends_with("bias"),
        }
    }
}

/// Which optimiser to build, with its hyper-parameters; `{"type": "sgd", ...}` or
/// `{"type": "adamw", ...}` in a config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum OptimizerConfig {
    /// SGD with momentum (arcface_torch: lr 0.1, momentum 0.9, wd 5e-4).
    #[serde(rename = "sgd")]
    Sgd(SgdConfig),
    /// AdamW (PyTorch defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 0.01).
    #[serde(rename = "adamw")]
    AdamW(AdamWConfig),
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::Sgd(SgdConfig::default())
    }
}

impl OptimizerConfig {
    /// The base learning rate (the schedule scales it).
    pub fn lr(&self) -> f64 {
        match self {
            Self::Sgd(c) => c.lr,
            Self::AdamW(c) => c.lr,
        }
    }

    /// Check every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Sgd(c) => c.validate(),
            Self::AdamW(c) => c.validate(),
        }
    }

    /// Build the optimiser over named parameters.
    ///
    /// # Errors
    /// An invalid config.
    pub fn build(&self, params: Vec<(String, Var)>) -> Result<AnyOptimizer> {
        Ok(match self {
            Self::Sgd(c) => AnyOptimizer::Sgd(Sgd::new_named(params, c.clone())?),
            Self::AdamW(c) => AnyOptimizer::AdamW(AdamW::new_named(params, c.clone())?),
        })
    }
}

/// One of the optimisers, as built from an [`OptimizerConfig`].
#[derive(Debug)]
pub enum AnyOptimizer {
    /// SGD.
    Sgd(Sgd),
    /// AdamW.
    AdamW(AdamW),
}

impl AnyOptimizer {
    /// Update every parameter that has a gradient in `grads`.
    ///
    /// # Errors
    /// Candle errors (dtype or shape mismatches).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match self {
            Self::Sgd(o) => o.step_grads(grads),
            Self::AdamW(o) => o.step_grads(grads),
        }
        .map_err(Error::from)
    }

    /// Current learning rate.
    pub fn learning_rate(&self) -> f64 {
        match self {
            Self::Sgd(o) => candle_nn::Optimizer::learning_rate(o),
            Self::AdamW(o) => candle_nn::Optimizer::learning_rate(o),
        }
    }

    /// Set the learning rate for the next step.
    pub fn set_learning_rate(&mut self, lr: f64) {
        match self {
            Self::Sgd(o) => candle_nn::Optimizer::set_learning_rate(o, lr),
            Self::AdamW(o) => candle_nn::Optimizer::set_learning_rate(o, lr),
        }
    }

    /// Optimiser state by `"{param}.{buffer}"` (detached tensors), for checkpoints.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Self::Sgd(o) => Ok(o.state()),
            Self::AdamW(o) => o.state(),
        }
    }

    /// Restore what [`AnyOptimizer::state`] returned.
    ///
    /// # Errors
    /// [`Error::Config`] for a key that names no parameter or buffer, or a shape mismatch.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        match self {
            Self::Sgd(o) => o.load_state(state),
            Self::AdamW(o) => o.load_state(state),
        }
    }
}

/// A parameter with its name and whether it is weight-decayed.
#[derive(Debug)]
pub(crate) struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
}

/// Named parameters from unnamed ones, for the `candle_nn::Optimizer` constructors.
pub(crate) fn unnamed(vars: Vec<Var>) -> Vec<(String, Var)> {
    vars.into_iter()
        .enumerate()
        .map(|(i, v)| (format!("param.{i}"), v))
        .collect()
}

/// Parameters with their decay flag; rejects duplicate names and non-float dtypes.
pub(crate) fn make_params(params: Vec<(String, Var)>, on: WeightDecayOn) -> Result<Vec<Param>> {
    let mut seen = std::collections::BTreeSet::new();
    params
        .into_iter()
        .map(|(name, var)| {
            if !var.dtype().is_float() {
                return Err(Error::config(
                    name,
                    format!("cannot optimise a {:?} parameter", var.dtype()),
                ));
            }
            if !seen.insert(name.clone()) {
                return Err(Error::config(name, "parameter given twice"));
            }
            let decay = on.applies(&name, var.rank());
            Ok(Param { name, var, decay })
        })
        .collect()
}

/// Split a state key `"{param}.{buffer}"` on one of `buffers`, returning the parameter index.
pub(crate) fn state_key<'a>(
    params: &[Param],
    key: &str,
    buffers: &'a [&'a str],
) -> Result<(usize, &'a str)> {
    for buffer in buffers {
        if let Some(name) = key
            .strip_suffix(buffer)
            .and_then(|rest| rest.strip_suffix('.'))
        {
            if let Some(i) = params.iter().position(|p| p.name == name) {
                return Ok((i, buffer));
            }
        }
    }
    Err(Error::config(
        key,
        "optimiser state names no parameter of this optimiser",
    ))
}

/// `t` on the parameter's device and dtype, with its shape checked.
pub(crate) fn fit(param: &Param, key: &str, t: &Tensor) -> Result<Tensor> {
    if t.dims() != param.var.dims() {
        return Err(Error::config(
            key,
            format!(
                "shape {:?} does not match parameter {:?}",
                t.dims(),
                param.var.dims()
            ),
        ));
    }
    Ok(t.to_device(param.var.device())?
        .to_dtype(param.var.dtype())?
        .detach())
}
