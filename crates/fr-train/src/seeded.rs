//! Deterministic parameter initialisation.
//!
//! candle's CPU random generator cannot be seeded (`Device::Cpu.set_seed` fails and
//! `Init::Randn` draws from the thread RNG), so a model built through a plain `VarMap` gets
//! different weights on every run. [`SeededVarMap`] is a `VarBuilder` backend that creates each
//! missing variable from its `Init` hint with a ChaCha8 generator seeded by
//! `(seed, FNV-1a hash of the variable's full name)`: a variable's initial value depends only
//! on the seed, its name, shape, dtype and hint, never on the order in which a model creates
//! its layers. The variables land in an ordinary [`VarMap`], which the optimiser and the
//! checkpoints use as usual.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A [`VarMap`] whose missing variables are initialised from a seed and their name.
#[derive(Clone)]
pub struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    /// An empty map whose variables will be drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with_varmap(VarMap::new(), seed)
    }

    /// Seeded creation on top of an existing map: variables already in `varmap` are returned
    /// unchanged, missing ones are created from `seed`.
    pub fn with_varmap(varmap: VarMap, seed: u64) -> Self {
        Self { varmap, seed }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The underlying map (shared: it holds the same variables).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// A `VarBuilder` that creates variables in this map, in `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The initial value of variable `name` of `shape` under `init`, as this map would create
    /// it (without inserting it).
    ///
    /// # Errors
    /// Tensor construction failures.
    pub fn init_value(
        &self,
        shape: &Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let values: Vec<f64> = match init {
            Init::Const(c) => vec![c; n],
            Init::Randn { mean, stdev } => {
                let mut rng = self.rng(name);
                (0..n)
                    .map(|_| mean + stdev * rng.sample::<f64, _>(StandardNormal))
                    .collect()
            }
            Init::Uniform { lo, up } => {
                let mut rng = self.rng(name);
                (0..n)
                    .map(|_| lo + (up - lo) * rng.random::<f64>())
                    .collect()
            }
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                // Same formula as candle's `Init::var`: std = gain / sqrt(fan).
                let fan = fan.for_shape(shape);
                let std = non_linearity.gain() / (fan as f64).sqrt();
                let mut rng = self.rng(name);
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n)
                            .map(|_| -bound + 2.0 * bound * rng.random::<f64>())
                            .collect()
                    }
                    NormalOrUniform::Normal => (0..n)
                        .map(|_| std * rng.sample::<f64, _>(StandardNormal))
                        .collect(),
                }
            }
        };
        Tensor::from_vec(values, shape.clone(), device)?.to_dtype(dtype)
    }

    fn rng(&self, name: &str) -> ChaCha8Rng {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        key[8..16].copy_from_slice(&fnv1a64(name.as_bytes()).to_le_bytes());
        key[16..24].copy_from_slice(&(name.len() as u64).to_le_bytes());
        ChaCha8Rng::from_seed(key)
    }
}

/// 64-bit FNV-1a: a hash that, unlike `std`'s `DefaultHasher`, is fixed across Rust releases.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let var = Var::from_tensor(&self.init_value(&s, name, h, dtype, dev)?)?;
        let tensor = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("`get_unchecked` needs a shape to create `{name}`: use `get`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::init::DEFAULT_KAIMING_NORMAL;

    fn values(map: &SeededVarMap, name: &str) -> Vec<f32> {
        let data = map.varmap().data().lock().unwrap();
        data[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn build(map: &SeededVarMap, order: &[&str]) {
        let vb = map.var_builder(DType::F32, &Device::Cpu);
        for name in order {
            let vb = vb.pp(*name);
            vb.get_with_hints((4, 3), "weight", DEFAULT_KAIMING_NORMAL)
                .unwrap();
            vb.get_with_hints(4, "bias", Init::Uniform { lo: -0.1, up: 0.1 })
                .unwrap();
            vb.get_with_hints(
                (2, 6),
                "centres",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.01,
                },
            )
            .unwrap();
            vb.get_with_hints(4, "gamma", Init::Const(0.25)).unwrap();
        }
    }

    #[test]
    fn same_seed_same_values_independent_of_order() {
        let a = SeededVarMap::new(7);
        let b = SeededVarMap::new(7);
        build(&a, &["fc1", "fc2"]);
        build(&b, &["fc2", "fc1"]);
        for name in [
            "fc1.weight",
            "fc2.weight",
            "fc1.bias",
            "fc2.centres",
            "fc1.gamma",
        ] {
            assert_eq!(values(&a, name), values(&b, name), "{name}");
        }
        assert_eq!(values(&a, "fc1.gamma"), vec![0.25; 4]);
    }

    #[test]
    fn names_and_seeds_give_different_values() {
        let a = SeededVarMap::new(7);
        let c = SeededVarMap::new(8);
        build(&a, &["fc1", "fc2"]);
        build(&c, &["fc1"]);
        assert_ne!(values(&a, "fc1.weight"), values(&a, "fc2.weight"));
        assert_ne!(values(&a, "fc1.weight"), values(&c, "fc1.weight"));
    }

    #[test]
    fn existing_vars_are_returned_unchanged() {
        let map = SeededVarMap::new(1);
        let vb = map.var_builder(DType::F32, &Device::Cpu);
        let w = vb.get_with_hints(3, "w", Init::Const(1.0)).unwrap();
        let again = vb.get_with_hints(3, "w", Init::Const(5.0)).unwrap();
        assert_eq!(again.to_vec1::<f32>().unwrap(), vec![1.0; 3]);
        assert_eq!(w.id(), again.id());
        assert!(vb.get_with_hints(4, "w", Init::Const(1.0)).is_err());
        assert!(map.contains_tensor("w"));
    }

    #[test]
    fn distributions_have_the_right_moments() {
        let map = SeededVarMap::new(3);
        let n = 20_000usize;
        let std_of = |t: Tensor| {
            let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
            (m, var.sqrt(), v)
        };
        // Kaiming normal, fan-in 100, ReLU gain: std = sqrt(2/100).
        let k = map
            .init_value(
                &Shape::from((n / 100, 100)),
                "k",
                DEFAULT_KAIMING_NORMAL,
                DType::F64,
                &Device::Cpu,
            )
            .unwrap();
        let (m, s, _) = std_of(k);
        assert!(
            m.abs() < 0.005 && (s - 0.02f64.sqrt()).abs() < 0.005,
            "{m} {s}"
        );
        let u = map
            .init_value(
                &Shape::from(n),
                "u",
                Init::Uniform { lo: 2.0, up: 3.0 },
                DType::F64,
                &Device::Cpu,
            )
            .unwrap();
        let (m, _, v) = std_of(u);
        assert!((m - 2.5).abs() < 0.01);
        assert!(v.iter().all(|x| (2.0..3.0).contains(x)));
    }
}
