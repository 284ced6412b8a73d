//! fr-train: the training loop of fr — optimisers with PyTorch semantics (SGD with momentum,
//! Nesterov and weight decay; AdamW), learning-rate schedules, global gradient-norm clipping,
//! seeded (order-independent) parameter initialisation, crash-safe checksummed checkpoints
//! (with a write check of the output directory before a run) and a
//! [`Trainer`] that runs one step of backbone → head (+ an optional [`AuxiliaryLoss`]) → clip →
//! update; [`Distillation`] adds embedding distillation from a frozen teacher (fixed, or
//! PocketNet's multi-step schedule over per-epoch teacher checkpoints) as that auxiliary loss;
//! [`invert`] generates images from a frozen backbone's embeddings (ArcFace
//! inversion with DeepInversion's BatchNorm-statistics prior); [`Precision`] trains the
//! backbone in bf16 or f16 with f32 master weights and a dynamic loss scaler;
//! [`DataParallel`] all-reduces the gradients of one rank per process in buckets (DDP).
//!
//! Using the pieces alone, on any candle model:
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Module, Optimizer};
//! use fr_train::{LrSchedule, SeededVarMap, Sgd, SgdConfig};
//!
//! let params = SeededVarMap::new(42); // same seed → same initial weights
//! let fc = candle_nn::linear(4, 1, params.var_builder(DType::F32, &Device::Cpu).pp("fc"))?;
//! let mut sgd = Sgd::new(params.varmap().all_vars(), SgdConfig::default())?;
//! let schedule = LrSchedule::default(); // arcface_torch: linear decay to 0
//! let x = Tensor::ones((8, 4), DType::F32, &Device::Cpu)?;
//! for step in 0..10 {
//!     sgd.set_learning_rate(schedule.lr_at(0.1, step, 10));
//!     let loss = fc.forward(&x)?.sqr()?.mean_all()?;
//!     sgd.backward_step(&loss)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod auxiliary;
pub mod checkpoint;
pub mod clip;
pub mod data_parallel;
pub mod distill;
pub mod error;
pub mod inversion;
pub mod optim;
pub mod precision;
pub mod schedule;
pub mod seeded;
pub mod trainer;

pub use auxiliary::{AuxiliaryBatch, AuxiliaryLoss, AuxiliaryOutput};
pub use checkpoint::{
    check_output_dir, latest_checkpoint, load_checkpoint, load_checkpoint_with,
    newest_good_checkpoint, prune_checkpoints, save_checkpoint, save_checkpoint_with,
    verify_checkpoint, TrainState,
};
pub use clip::{all_finite, clip_grad_norm, grad_norm, scale_grads};
pub use data_parallel::{
    DataParallel, DataParallelConfig, GradCompression, GradReduction, ReduceStats,
};
pub use distill::{Distillation, Teacher, TeacherSchedule};
pub use error::{Error, Result};
pub use inversion::{
    invert, save_png_grid, InversionConfig, InversionResult, InversionStep, GRID_GAP,
};
pub use optim::{AdamW, AdamWConfig, AnyOptimizer, OptimizerConfig, Sgd, SgdConfig, WeightDecayOn};
pub use precision::{LossScaler, LossScalerConfig, LossScalerState, MasterWeights, Precision};
pub use schedule::LrSchedule;
pub use seeded::SeededVarMap;
pub use trainer::{not_running_stat, StepOutcome, Trainer, TrainerConfig};
