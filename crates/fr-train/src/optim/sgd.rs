//! SGD with momentum, dampening, Nesterov momentum and L2 weight decay, as `torch.optim.SGD`:
//!
//! ```text
//! g ← g + wd·p                      (where weight decay applies)
//! buf ← g                           (first step)
//! buf ← μ·buf + (1 − dampening)·g   (later steps)
//! g ← g + μ·buf  (Nesterov)  or  g ← buf
//! p ← p − lr·g
//! ```

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{fit, make_params, state_key, unnamed, Param, WeightDecayOn};
use crate::{Error, Result};

/// SGD hyper-parameters; defaults are arcface_torch's (lr 0.1 for 8 GPUs, momentum 0.9,
/// wd 5e-4 on every parameter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum μ; 0 disables the buffer.
    pub momentum: f64,
    /// Dampening of the gradient added to the momentum buffer.
    pub dampening: f64,
    /// Nesterov momentum (needs μ > 0 and no dampening, as in PyTorch).
    pub nesterov: bool,
    /// L2 weight decay, added to the gradient.
    pub weight_decay: f64,
    /// Which parameters are decayed.
    pub weight_decay_on: WeightDecayOn,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 5e-4,
            weight_decay_on: WeightDecayOn::All,
        }
    }
}

impl SgdConfig {
    /// Check every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key.
    pub fn validate(&self) -> Result<()> {
        let finite_nonneg = |key: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::config(
                    key,
                    format!("must be finite and ≥ 0, got {v}"),
                ))
            }
        };
        finite_nonneg("lr", self.lr)?;
        finite_nonneg("momentum", self.momentum)?;
        finite_nonneg("dampening", self.dampening)?;
        finite_nonneg("weight_decay", self.weight_decay)?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::config(
                "nesterov",
                "Nesterov momentum requires momentum > 0 and dampening 0",
            ));
        }
        Ok(())
    }
}

/// SGD over named parameters. State: one momentum buffer per parameter
/// (`"{name}.momentum_buffer"`), created at its first update.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<Param>,
    buffers: Vec<Option<Tensor>>,
    config: SgdConfig,
}

const BUFFERS: &[&str] = &["momentum_buffer"];

impl Sgd {
    /// SGD over `params`; names must be unique.
    ///
    /// # Errors
    /// An invalid config, a duplicate name or a non-float parameter.
    pub fn new_named(params: Vec<(String, Var)>, config: SgdConfig) -> Result<Self> {
        config.validate()?;
        let params = make_params(params, config.weight_decay_on)?;
        let buffers = vec![None; params.len()];
        Ok(Self {
            params,
            buffers,
            config,
        })
    }

    /// The configuration (with the current learning rate).
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// Parameter names, in the order given.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// Whether parameter `name` is weight-decayed (`None` for an unknown name).
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.params.iter().find(|p| p.name == name).map(|p| p.decay)
    }

    /// Momentum buffers by `"{name}.momentum_buffer"`, for parameters updated at least once.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.buffers)
            .filter_map(|(p, b)| {
                b.as_ref()
                    .map(|b| (format!("{}.momentum_buffer", p.name), b.clone()))
            })
            .collect()
    }

    /// Restore buffers saved by [`Sgd::state`]; parameters without a key start afresh.
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown key or a shape mismatch.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        for (key, t) in state {
            let (i, _) = state_key(&self.params, key, BUFFERS)?;
            self.buffers[i] = Some(fit(&self.params[i], key, t)?);
        }
        Ok(())
    }

    pub(crate) fn step_grads(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let c = &self.config;
        for (param, buffer) in self.params.iter().zip(self.buffers.iter_mut()) {
            let Some(grad) = grads.get(param.var.as_tensor()) else {
                continue;
            };
            let p = param.var.as_tensor().detach();
            let mut g = grad.detach();
            if param.decay && c.weight_decay != 0.0 {
                g = (g + p.affine(c.weight_decay, 0.0)?)?;
            }
            if c.momentum != 0.0 {
                let buf = match buffer.take() {
                    // A copy: the buffer must not alias the gradient store's tensor.
                    None => g.copy()?,
                    Some(b) => (b.affine(c.momentum, 0.0)? + g.affine(1.0 - c.dampening, 0.0)?)?,
                }
                .detach();
                g = if c.nesterov {
                    (g + buf.affine(c.momentum, 0.0)?)?
                } else {
                    buf.clone()
                };
                *buffer = Some(buf);
            }
            param.var.set(&(p - g.affine(c.lr, 0.0)?)?)?;
        }
        Ok(())
    }
}

impl candle_nn::Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, config: SgdConfig) -> candle_core::Result<Self> {
        Self::new_named(unnamed(vars), config).map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_grads(grads)
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use candle_nn::Optimizer;

    /// Loss = Σ c_i·p_i, so the gradient is the constant `c` whatever `p` is.
    fn linear_grads(p: &Var, c: &[f64]) -> GradStore {
        let c = Tensor::new(c, &Device::Cpu).unwrap();
        (p.as_tensor() * c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    fn values(p: &Var) -> Vec<f64> {
        p.as_tensor().to_vec1().unwrap()
    }

    fn assert_close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    fn cfg(momentum: f64, nesterov: bool, wd: f64) -> SgdConfig {
        SgdConfig {
            lr: 0.1,
            momentum,
            dampening: 0.0,
            nesterov,
            weight_decay: wd,
            weight_decay_on: WeightDecayOn::All,
        }
    }

    #[test]
    fn momentum_matches_pytorch() {
        let p = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let mut opt = Sgd::new(vec![p.clone()], cfg(0.9, false, 0.0)).unwrap();
        let g = [0.5, 1.0];
        // step 1: buf = g = (0.5, 1); p = (1 - 0.05, -2 - 0.1)
        opt.step(&linear_grads(&p, &g)).unwrap();
        assert_close(&values(&p), &[0.95, -2.1]);
        // step 2: buf = 0.9·buf + g = (0.95, 1.9); p -= 0.1·buf
        opt.step(&linear_grads(&p, &g)).unwrap();
        assert_close(&values(&p), &[0.855, -2.29]);
        // step 3: buf = (1.355, 2.71)
        opt.step(&linear_grads(&p, &g)).unwrap();
        assert_close(&values(&p), &[0.7195, -2.561]);
        let state = opt.state();
        assert_eq!(state[0].0, "param.0.momentum_buffer");
        assert_close(&state[0].1.to_vec1::<f64>().unwrap(), &[1.355, 2.71]);
    }

    #[test]
    fn nesterov_matches_pytorch() {
        let p = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let mut opt = Sgd::new(vec![p.clone()], cfg(0.9, true, 0.0)).unwrap();
        let g = [0.5, 1.0];
        // step 1: buf = g; update g + 0.9·buf = 1.9·g = (0.95, 1.9)
        opt.step(&linear_grads(&p, &g)).unwrap();
        assert_close(&values(&p), &[0.905, -2.19]);
        // step 2: buf = 1.9·g = (0.95, 1.9); update g + 0.9·buf = (1.355, 2.71)
        opt.step(&linear_grads(&p, &g)).unwrap();
        assert_close(&values(&p), &[0.7695, -2.461]);
    }

    #[test]
    fn weight_decay_matches_pytorch() {
        let p = Var::new(&[1.0f64, -2.0, 0.0], &Device::Cpu).unwrap();
        let mut opt = Sgd::new(vec![p.clone()], cfg(0.9, false, 0.1)).unwrap();
        let g = [0.5, 1.0, 0.0];
        // step 1: g' = g + 0.1·p = (0.6, 0.8, 0); buf = g'; p = (0.94, -2.08, 0)
        opt.step(&linear_grads(&p, &g)).unwrap();
        assert_close(&values(&p), &[0.94, -2.08, 0.0]);
        // step 2: g' = (0.594, 0.792, 0); buf = 0.9·(0.6, 0.8) + g' = (1.134, 1.512, 0)
        opt.step(&linear_grads(&p, &g)).unwrap();
        assert_close(&values(&p), &[0.8266, -2.2312, 0.0]);
    }

    #[test]
    fn plain_sgd_and_dampening() {
        let p = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let mut opt = Sgd::new(vec![p.clone()], cfg(0.0, false, 0.0)).unwrap();
        opt.step(&linear_grads(&p, &[0.5, 1.0])).unwrap();
        assert_close(&values(&p), &[0.95, -2.1]);
        assert!(opt.state().is_empty());

        let q = Var::new(&[1.0f64], &Device::Cpu).unwrap();
        let mut c = cfg(0.9, false, 0.0);
        c.dampening = 0.5;
        let mut opt = Sgd::new(vec![q.clone()], c).unwrap();
        // step 1 buf = g = 1 (no dampening on the first step); step 2 buf = 0.9 + 0.5 = 1.4
        opt.step(&linear_grads(&q, &[1.0])).unwrap();
        opt.step(&linear_grads(&q, &[1.0])).unwrap();
        assert_close(&values(&q), &[1.0 - 0.1 - 0.14]);
    }

    #[test]
    fn weights_only_decay_skips_biases_and_1d_params() {
        let dev = Device::Cpu;
        let w = Var::new(&[[1.0f64, 2.0]], &dev).unwrap();
        let b = Var::new(&[1.0f64], &dev).unwrap();
        let bn = Var::new(&[1.0f64, 1.0], &dev).unwrap();
        let mut c = cfg(0.0, false, 0.5);
        c.weight_decay_on = WeightDecayOn::WeightsOnly;
        let mut opt = Sgd::new_named(
            vec![
                ("fc.weight".into(), w.clone()),
                ("fc.bias".into(), b.clone()),
                ("bn1.weight".into(), bn.clone()),
            ],
            c,
        )
        .unwrap();
        assert_eq!(opt.decays("fc.weight"), Some(true));
        assert_eq!(opt.decays("fc.bias"), Some(false));
        assert_eq!(opt.decays("bn1.weight"), Some(false));
        // Zero loss gradient: only weight decay moves parameters.
        let zero = |v: &Var| {
            let z = v.as_tensor().zeros_like().unwrap();
            (v.as_tensor() * z).unwrap().sum_all().unwrap()
        };
        let loss = ((zero(&w) + zero(&b)).unwrap() + zero(&bn)).unwrap();
        opt.backward_step(&loss).unwrap();
        assert_close(
            &w.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            &[0.95, 1.9],
        );
        assert_close(&values(&b), &[1.0]);
        assert_close(&values(&bn), &[1.0, 1.0]);
    }

    #[test]
    fn state_round_trip_and_validation() {
        let p = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let mut a = Sgd::new(vec![p.clone()], cfg(0.9, false, 0.0)).unwrap();
        a.step(&linear_grads(&p, &[0.5, 1.0])).unwrap();
        let state: BTreeMap<_, _> = a.state().into_iter().collect();
        let q = Var::new(&[0.95f64, -2.1], &Device::Cpu).unwrap();
        let mut b = Sgd::new(vec![q.clone()], cfg(0.9, false, 0.0)).unwrap();
        b.load_state(&state).unwrap();
        a.step(&linear_grads(&p, &[0.5, 1.0])).unwrap();
        b.step(&linear_grads(&q, &[0.5, 1.0])).unwrap();
        assert_eq!(values(&p), values(&q));

        let bad: BTreeMap<_, _> = [(
            "nope.momentum_buffer".to_string(),
            state.values().next().unwrap().clone(),
        )]
        .into();
        assert!(
            matches!(b.load_state(&bad), Err(Error::Config { key, .. }) if key == "nope.momentum_buffer")
        );
        let err = Sgd::new_named(vec![], cfg(0.0, true, 0.0)).unwrap_err();
        assert!(matches!(err, Error::Config { key, .. } if key == "nesterov"));
    }
}
