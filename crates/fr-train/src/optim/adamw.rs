//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), as
//! `torch.optim.AdamW` without amsgrad:
//!
//! ```text
//! t ← t + 1
//! p ← p·(1 − lr·wd)                          (where weight decay applies)
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! p ← p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)
//! ```

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{fit, make_params, state_key, unnamed, Param, WeightDecayOn};
use crate::{Error, Result};

/// AdamW hyper-parameters; defaults are PyTorch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment, β1.
    pub beta1: f64,
    /// Decay of the second moment, β2.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Which parameters are decayed.
    pub weight_decay_on: WeightDecayOn,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            weight_decay_on: WeightDecayOn::All,
        }
    }
}

impl AdamWConfig {
    /// Check every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key.
    pub fn validate(&self) -> Result<()> {
        let check = |key: &str, v: f64, ok: bool, what: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(Error::config(key, format!("must be {what}, got {v}")))
            }
        };
        check("lr", self.lr, self.lr >= 0.0, "≥ 0")?;
        check(
            "beta1",
            self.beta1,
            (0.0..1.0).contains(&self.beta1),
            "in [0, 1)",
        )?;
        check(
            "beta2",
            self.beta2,
            (0.0..1.0).contains(&self.beta2),
            "in [0, 1)",
        )?;
        check("eps", self.eps, self.eps > 0.0, "> 0")?;
        check(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            "≥ 0",
        )
    }
}

/// Moments of one parameter.
#[derive(Debug, Clone)]
struct Moments {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over named parameters. State per parameter: `"{name}.exp_avg"`,
/// `"{name}.exp_avg_sq"` and `"{name}.step"` (an f64 scalar), as in PyTorch's state dict.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    moments: Vec<Option<Moments>>,
    config: AdamWConfig,
}

const BUFFERS: &[&str] = &["exp_avg_sq", "exp_avg", "step"];

impl AdamW {
    /// AdamW over `params`; names must be unique.
    ///
    /// # Errors
    /// An invalid config, a duplicate name or a non-float parameter.
    pub fn new_named(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let params = make_params(params, config.weight_decay_on)?;
        let moments = vec![None; params.len()];
        Ok(Self {
            params,
            moments,
            config,
        })
    }

    /// The configuration (with the current learning rate).
    pub fn config(&self) -> &AdamWConfig {
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

    /// Moments and step counts by `"{name}.{exp_avg|exp_avg_sq|step}"`.
    ///
    /// # Errors
    /// Candle errors building the step scalars.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (p, m) in self.params.iter().zip(&self.moments) {
            let Some(m) = m else { continue };
            out.push((format!("{}.exp_avg", p.name), m.exp_avg.clone()));
            out.push((format!("{}.exp_avg_sq", p.name), m.exp_avg_sq.clone()));
            let step = Tensor::new(m.step as f64, p.var.device())?;
            out.push((format!("{}.step", p.name), step));
        }
        Ok(out)
    }

    /// Restore what [`AdamW::state`] returned; a parameter needs all three keys or none.
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown key, a missing companion key or a shape mismatch.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let mut parts: BTreeMap<usize, [Option<Tensor>; 3]> = BTreeMap::new();
        for (key, t) in state {
            let (i, buffer) = state_key(&self.params, key, BUFFERS)?;
            let slot = BUFFERS.iter().position(|b| *b == buffer).unwrap_or(0);
            let t = if buffer == "step" {
                t.to_dtype(DType::F64)?
            } else {
                fit(&self.params[i], key, t)?
            };
            parts.entry(i).or_default()[slot] = Some(t);
        }
        for (i, [sq, avg, step]) in parts {
            let name = &self.params[i].name;
            let (Some(exp_avg_sq), Some(exp_avg), Some(step)) = (sq, avg, step) else {
                return Err(Error::config(
                    name.clone(),
                    "AdamW state needs exp_avg, exp_avg_sq and step together",
                ));
            };
            let step = step.flatten_all()?.to_vec1::<f64>()?;
            let step = match step.as_slice() {
                [s] if *s >= 0.0 && s.fract() == 0.0 => *s as u64,
                _ => {
                    return Err(Error::config(
                        format!("{name}.step"),
                        "must be one non-negative integer",
                    ))
                }
            };
            self.moments[i] = Some(Moments {
                step,
                exp_avg,
                exp_avg_sq,
            });
        }
        Ok(())
    }

    pub(crate) fn step_grads(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let c = &self.config;
        for (param, moments) in self.params.iter().zip(self.moments.iter_mut()) {
            let Some(grad) = grads.get(param.var.as_tensor()) else {
                continue;
            };
            let g = grad.detach();
            let mut p = param.var.as_tensor().detach();
            let m = match moments.take() {
                Some(m) => m,
                None => Moments {
                    step: 0,
                    exp_avg: p.zeros_like()?,
                    exp_avg_sq: p.zeros_like()?,
                },
            };
            let step = m.step + 1;
            if param.decay && c.weight_decay != 0.0 {
                p = p.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
            }
            let exp_avg = (m.exp_avg.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
            let exp_avg_sq =
                (m.exp_avg_sq.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let bias1 = 1.0 - c.beta1.powf(step as f64);
            let bias2 = 1.0 - c.beta2.powf(step as f64);
            let denom = exp_avg_sq.sqrt()?.affine(1.0 / bias2.sqrt(), c.eps)?;
            let update = (exp_avg.affine(c.lr / bias1, 0.0)? / denom)?;
            param.var.set(&(p - update)?)?;
            *moments = Some(Moments {
                step,
                exp_avg: exp_avg.detach(),
                exp_avg_sq: exp_avg_sq.detach(),
            });
        }
        Ok(())
    }
}

impl candle_nn::Optimizer for AdamW {
    type Config = AdamWConfig;

    fn new(vars: Vec<Var>, config: AdamWConfig) -> candle_core::Result<Self> {
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
    use candle_core::Device;
    use candle_nn::Optimizer;

    fn linear_grads(p: &Var, c: &[f64]) -> GradStore {
        let c = Tensor::new(c, &Device::Cpu).unwrap();
        (p.as_tensor() * c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    /// Reference AdamW on scalars, written from the formula.
    fn reference(p0: f64, grads: &[f64], c: &AdamWConfig) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            p *= 1.0 - c.lr * c.weight_decay;
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let denom = v.sqrt() / (1.0 - c.beta2.powi(t)).sqrt() + c.eps;
            p -= c.lr / (1.0 - c.beta1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // With bias correction, step 1 moves each coordinate by lr·g/(|g| + eps·…) ≈ lr·sign(g).
        let p = Var::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap();
        let c = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![p.clone()], c).unwrap();
        opt.step(&linear_grads(&p, &[0.5, -3.0, 2.0])).unwrap();
        let v: Vec<f64> = p.as_tensor().to_vec1().unwrap();
        let want = [0.9, -1.9, 0.4];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn several_steps_match_the_formula_with_decoupled_decay() {
        let c = AdamWConfig {
            lr: 0.05,
            weight_decay: 0.1,
            ..Default::default()
        };
        let p = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new_named(vec![("w".into(), p.clone())], c.clone()).unwrap();
        let g = [[0.5, -1.0], [0.2, 0.3], [-0.4, 1.5]];
        for gi in &g {
            opt.step(&linear_grads(&p, gi)).unwrap();
        }
        let got: Vec<f64> = p.as_tensor().to_vec1().unwrap();
        let want0 = reference(1.0, &[0.5, 0.2, -0.4], &c);
        let want1 = reference(-2.0, &[-1.0, 0.3, 1.5], &c);
        assert!((got[0] - want0).abs() < 1e-12 && (got[1] - want1).abs() < 1e-12);
        // Hand-checked first step of coordinate 0: p = 1·(1 − 0.005) − 0.05 = 0.945 (± eps).
        assert!((reference(1.0, &[0.5], &c) - 0.945).abs() < 1e-8);

        // State round trip: a fresh optimiser continues identically.
        let state: BTreeMap<_, _> = opt.state().unwrap().into_iter().collect();
        assert_eq!(state.len(), 3);
        let q = Var::new(got.as_slice(), &Device::Cpu).unwrap();
        let mut opt2 = AdamW::new_named(vec![("w".into(), q.clone())], c).unwrap();
        opt2.load_state(&state).unwrap();
        opt.step(&linear_grads(&p, &[0.1, 0.1])).unwrap();
        opt2.step(&linear_grads(&q, &[0.1, 0.1])).unwrap();
        assert_eq!(
            p.as_tensor().to_vec1::<f64>().unwrap(),
            q.as_tensor().to_vec1::<f64>().unwrap()
        );
        let mut partial = state.clone();
        partial.remove("w.step");
        assert!(opt2.load_state(&partial).is_err());
    }

    #[test]
    fn rejects_bad_betas() {
        let c = AdamWConfig {
            beta2: 1.0,
            ..Default::default()
        };
        assert!(
            matches!(AdamW::new_named(vec![], c), Err(Error::Config { key, .. }) if key == "beta2")
        );
    }
}
