//! Learning-rate schedules, evaluated per optimiser step.
//!
//! Every schedule starts with an optional linear warm-up of `warmup_steps` steps: step `s`
//! (0-based) gets `base·max(s, 1)/warmup` while `s ≤ warmup` — the closed form of insightface
//! arcface_torch's `PolynomialLRWarmup`, except that step 0 gets `base/warmup` instead of 0.
//! After warm-up, with `u = (s − warmup)/(total − warmup)` clamped to [0, 1]:
//!
//! | `type` | learning rate |
//! |---|---|
//! | `poly` | `base·(1 − u)^power` (arcface_torch: power 1, i.e. linear decay to 0 at `total`) |
//! | `step` | `base·gamma^k`, `k` = number of milestones ≤ `s` (milestones in steps) |
//! | `cosine` | `min_lr + (base − min_lr)·(1 + cos πu)/2` |
//! | `constant` | `base` |
//!
//! Configs count in steps; convert epochs with [`LrSchedule::step_at_epochs`] or by
//! multiplying by the steps per epoch.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A learning-rate schedule; `{"type": "poly", "power": 1.0, "warmup_steps": 0}` in a config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// Polynomial decay to 0 at the last step (arcface_torch `PolynomialLRWarmup`).
    Poly {
        /// Exponent; 1 is linear.
        #[serde(default = "one")]
        power: f64,
        /// Linear warm-up length.
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Multiply by `gamma` at each milestone (SphereFace: ×0.1 at 16K and 24K iterations).
    Step {
        /// Steps at which the rate drops, ascending.
        milestones: Vec<u64>,
        /// Factor per milestone.
        #[serde(default = "tenth")]
        gamma: f64,
        /// Linear warm-up length.
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Cosine annealing from the base rate to `min_lr` at the last step.
    Cosine {
        /// Final learning rate.
        #[serde(default)]
        min_lr: f64,
        /// Linear warm-up length.
        #[serde(default)]
        warmup_steps: u64,
    },
    /// The base rate throughout (after warm-up).
    Constant {
        /// Linear warm-up length.
        #[serde(default)]
        warmup_steps: u64,
    },
}

fn one() -> f64 {
    1.0
}

fn tenth() -> f64 {
    0.1
}

impl Default for LrSchedule {
    /// arcface_torch: linear decay, no warm-up.
    fn default() -> Self {
        Self::Poly {
            power: 1.0,
            warmup_steps: 0,
        }
    }
}

impl LrSchedule {
    /// A step schedule whose milestones and warm-up are given in epochs.
    pub fn step_at_epochs(
        epochs: &[u64],
        gamma: f64,
        warmup_epochs: u64,
        steps_per_epoch: u64,
    ) -> Self {
        Self::Step {
            milestones: epochs.iter().map(|e| e * steps_per_epoch).collect(),
            gamma,
            warmup_steps: warmup_epochs * steps_per_epoch,
        }
    }

    /// Length of the linear warm-up.
    pub fn warmup_steps(&self) -> u64 {
        match self {
            Self::Poly { warmup_steps, .. }
            | Self::Step { warmup_steps, .. }
            | Self::Cosine { warmup_steps, .. }
            | Self::Constant { warmup_steps } => *warmup_steps,
        }
    }

    /// Check every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Poly { power, .. } if !(power.is_finite() && *power > 0.0) => {
                Err(Error::config("power", format!("must be > 0, got {power}")))
            }
            Self::Step { gamma, .. } if !(gamma.is_finite() && *gamma > 0.0) => {
                Err(Error::config("gamma", format!("must be > 0, got {gamma}")))
            }
            Self::Step { milestones, .. } if milestones.windows(2).any(|w| w[0] > w[1]) => {
                Err(Error::config(
                    "milestones",
                    format!("must be ascending, got {milestones:?}"),
                ))
            }
            Self::Cosine { min_lr, .. } if !(min_lr.is_finite() && *min_lr >= 0.0) => Err(
                Error::config("min_lr", format!("must be ≥ 0, got {min_lr}")),
            ),
            _ => Ok(()),
        }
    }

    /// The learning rate of step `step` (0-based) of `total_steps`.
    pub fn lr_at(&self, base_lr: f64, step: u64, total_steps: u64) -> f64 {
        let warmup = self.warmup_steps();
        if warmup > 0 && step <= warmup {
            return base_lr * step.max(1) as f64 / warmup as f64;
        }
        let u = if total_steps > warmup {
            (step.saturating_sub(warmup) as f64 / (total_steps - warmup) as f64).min(1.0)
        } else {
            1.0
        };
        match self {
            Self::Poly { power, .. } => base_lr * (1.0 - u).powf(*power),
            Self::Step {
                milestones, gamma, ..
            } => {
                let k = milestones.iter().filter(|&&m| m <= step).count();
                base_lr * gamma.powi(k as i32)
            }
            Self::Cosine { min_lr, .. } => {
                min_lr + (base_lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * u).cos())
            }
            Self::Constant { .. } => base_lr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn poly_is_arcface_torch_linear_decay() {
        let s = LrSchedule::default();
        close(s.lr_at(0.1, 0, 100), 0.1);
        close(s.lr_at(0.1, 25, 100), 0.075);
        close(s.lr_at(0.1, 99, 100), 0.001);
        close(s.lr_at(0.1, 100, 100), 0.0);
        close(s.lr_at(0.1, 150, 100), 0.0);
        let sq = LrSchedule::Poly {
            power: 2.0,
            warmup_steps: 10,
        };
        // Warm-up: base·s/10, step 0 as step 1.
        close(sq.lr_at(0.1, 0, 110), 0.01);
        close(sq.lr_at(0.1, 5, 110), 0.05);
        close(sq.lr_at(0.1, 10, 110), 0.1);
        // Decay: (1 − (60 − 10)/100)² = 0.25.
        close(sq.lr_at(0.1, 60, 110), 0.025);
    }

    #[test]
    fn step_cosine_constant() {
        let s = LrSchedule::Step {
            milestones: vec![16_000, 24_000],
            gamma: 0.1,
            warmup_steps: 0,
        };
        close(s.lr_at(0.1, 15_999, 28_000), 0.1);
        close(s.lr_at(0.1, 16_000, 28_000), 0.01);
        close(s.lr_at(0.1, 27_999, 28_000), 0.001);
        assert_eq!(
            LrSchedule::step_at_epochs(&[8, 12], 0.1, 1, 100),
            LrSchedule::Step {
                milestones: vec![800, 1200],
                gamma: 0.1,
                warmup_steps: 100
            }
        );
        let c = LrSchedule::Cosine {
            min_lr: 0.001,
            warmup_steps: 0,
        };
        close(c.lr_at(0.1, 0, 100), 0.1);
        close(c.lr_at(0.1, 50, 100), 0.0505);
        close(c.lr_at(0.1, 100, 100), 0.001);
        let k = LrSchedule::Constant { warmup_steps: 4 };
        close(k.lr_at(0.2, 2, 10), 0.1);
        close(k.lr_at(0.2, 7, 10), 0.2);
    }

    #[test]
    fn serde_and_validation() {
        let s: LrSchedule = serde_json::from_str(r#"{"type": "poly"}"#).unwrap();
        assert_eq!(s, LrSchedule::default());
        let s: LrSchedule =
            serde_json::from_str(r#"{"type": "step", "milestones": [3, 5], "warmup_steps": 1}"#)
                .unwrap();
        assert!(matches!(s, LrSchedule::Step { gamma, .. } if gamma == 0.1));
        assert!(serde_json::from_str::<LrSchedule>(r#"{"type": "poly", "pwer": 2}"#).is_err());
        let bad = LrSchedule::Step {
            milestones: vec![5, 3],
            gamma: 0.1,
            warmup_steps: 0,
        };
        assert!(matches!(bad.validate(), Err(Error::Config { key, .. }) if key == "milestones"));
    }
}
