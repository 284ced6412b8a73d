//! `cargo xtask`: fr's orchestrator.
//!
//! - `cargo xtask reproduce lh2face` — train LH2Face and its baselines with one seed, backbone
//!   and budget, evaluate them side by side and write `target/reproduce/lh2face/`.

mod config_file;
mod report;

fn main() {}
