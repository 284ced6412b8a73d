//! fr's workflows as a library: what `fr reproduce`, `fr train`, `fr eval` and `fr study` do,
//! callable from your own program.
//!
//! The data flow, stage by stage (see `docs/architecture.md`):
//!
//! | stage | module | entry point |
//! |---|---|---|
//! | run configuration (a preset: `extends`, `key=value` overrides, validation naming the key) | [`config`], [`config_file`] | [`Preset::load`] |
//! | training one method (data parallel over processes too) | [`train`] | [`train::run`] |
//! | evaluation of a checkpoint: `.bin` sets, pairs folders, IJB-B/C 1:1 and 1:N, uniform accuracy | [`evaluate`] | [`evaluate::run`] |
//! | reports: markdown tables, JSON, ROC / DET plots | [`report`] | [`report::markdown_table`] |
//! | paper reproductions (train every method of a preset, evaluate, report) | [`reproduce`] | [`reproduce::run`] |
//! | the survey's studies (backbone size, data distribution) | [`study`] | [`study::run`] |
//! | packing image folders into RecordIO, converting weights, describing backbones | [`pack`], [`weights`], [`info`] | |
//!
//! Every function returns [`Result`] with an [`Error`] that names the file, key, rank or step
//! that failed.

pub mod config;
pub mod config_file;
pub mod embed;
mod error;
pub mod evaluate;
pub mod fit;
pub mod info;
pub mod model;
pub mod pack;
pub mod presets;
mod progress;
pub mod report;
pub mod reproduce;
pub mod study;
pub mod train;
pub mod weights;

pub use config::Preset;
pub use error::{Context, Error, Result};
pub use presets::Presets;

/// The workspace root, for tests that read `configs/`.
#[cfg(test)]
pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
