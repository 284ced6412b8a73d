//! Seeded parameter initialisation.
//!
//! candle's CPU device cannot be seeded, so a model built on a plain `VarMap` gets different
//! weights every run. [`seeded_var_builder`] creates the same `Var`s, with each layer's own
//! initialiser, from a ChaCha stream: the same seed gives the same weights.

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A [`VarBuilder`] that creates missing parameters in `varmap` from a generator seeded with
/// `seed` (drawn in construction order), and returns existing ones unchanged.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

struct SeededVarMap {
    varmap: VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl SeededVarMap {
    fn sample(&self, shape: &Shape, init: Init) -> Vec<f64> {
        let n = shape.elem_count();
        let mut rng = self.rng.lock().expect("rng lock poisoned");
        let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(rng);
                    mean + std * z
                })
                .collect()
        };
        let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f64> {
            (0..n)
                .map(|_| lo + (up - lo) * rng.random::<f64>())
                .collect()
        };
        match init {
            Init::Const(c) => vec![c; n],
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = fan.for_shape(shape).max(1);
                let std = non_linearity.gain() / (fan as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(var) = self.varmap.data().lock().expect("VarMap lock").get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "parameter `{name}` exists with shape {:?}, requested {s:?}",
                    var.shape()
                )
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.sample(&s, init);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.varmap
            .data()
            .lock()
            .expect("VarMap lock")
            .insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        match self.varmap.data().lock().expect("VarMap lock").get(name) {
            Some(var) => Ok(var.as_tensor().clone()),
            None => candle_core::bail!("parameter `{name}` does not exist yet"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("VarMap lock")
            .contains_key(name)
    }
}
