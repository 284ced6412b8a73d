//! `cargo xtask info <backbone | config.toml>`: parameters, operations, input and embedding
//! size of a backbone, counted from its configuration (conventions in
//! `fr_backbone::complexity`: MACs as insightface's arcface_torch `flops.py` reports them).
//!
//! ```text
//! cargo xtask info r100
//! cargo xtask info mbf --set embedding_size=128
//! cargo xtask info configs/lh2face.toml          # a preset's [backbone] table
//! ```

use std::path::Path;

use crate::{bail, Context, Result};
use fr_backbone::{parameter_shapes, BackboneConfig, Complexity, NAMED_BACKBONES};
use serde::Serialize;

/// Options of `cargo xtask info`.
#[derive(Debug, Default)]
pub struct InfoOptions {
    /// A short name (`r50`, `mbf`, …; an unknown name lists them) or a TOML file: a preset
    /// (its `[backbone]` table is used) or a backbone table alone (`type = "iresnet"`, …).
    pub backbone: String,
    /// Override a key of the backbone table, `key=value` (e.g. `embedding_size=128`).
    pub sets: Vec<String>,
    /// Print JSON instead of text.
    pub json: bool,
}

/// What `info` reports about one backbone.
#[derive(Debug, Clone, Serialize)]
pub struct BackboneInfo {
    /// The configuration (serde tag `type` plus its fields).
    pub config: BackboneConfig,
    /// Input `(C, H, W)` of one image, pixels.
    pub input: (usize, usize, usize),
    /// Embedding dimension `D`.
    pub embedding_size: usize,
    /// Counts computed from the configuration.
    pub complexity: Complexity,
    /// Learnable parameters found by building the module (must equal `complexity.params`).
    pub walked_params: u64,
    /// Number of state-dict tensors (parameters and BatchNorm running statistics).
    pub state_dict_tensors: usize,
}

/// Resolves `args.backbone` (name or file) with the overrides into a configuration.
///
/// # Errors
/// An unknown name that is not a readable file, a TOML error, or a key the config rejects.
pub fn resolve(args: &InfoOptions) -> Result<BackboneConfig> {
    let (tree, origin) = if let Some(cfg) = BackboneConfig::named(&args.backbone) {
        let tree = toml::Value::try_from(&cfg).context("serialising the named configuration")?;
        (tree, format!("`{}`", args.backbone))
    } else if Path::new(&args.backbone).is_file() {
        let mut root = crate::config_file::read_tree(Path::new(&args.backbone), 0)?;
        let tree = match root.as_table_mut().and_then(|t| t.remove("backbone")) {
            Some(backbone) => backbone,
            None => root,
        };
        (tree, args.backbone.clone())
    } else {
        let names: Vec<&str> = NAMED_BACKBONES.iter().map(|(n, _)| *n).collect();
        bail!(
            "unknown backbone `{}`: neither a name ({}) nor a config file",
            args.backbone,
            names.join(", ")
        );
    };
    crate::config_file::finish(tree, &args.sets, &origin)
}

/// Counts everything `info` reports for `cfg`.
///
/// # Errors
/// An invalid configuration, or a module walk that disagrees with the analytic count (a bug).
pub fn describe(cfg: &BackboneConfig) -> Result<BackboneInfo> {
    let complexity = cfg.complexity()?;
    let shapes = parameter_shapes(cfg)?;
    let walked_params = shapes
        .iter()
        .filter(|p| p.is_parameter())
        .map(|p| p.numel())
        .sum();
    if walked_params != complexity.params {
        bail!(
            "parameter count from the configuration ({}) differs from the built module ({walked_params})",
            complexity.params
        );
    }
    let (h, w) = cfg.input_shape();
    Ok(BackboneInfo {
        config: cfg.clone(),
        input: (3, h, w),
        embedding_size: cfg.embedding_size(),
        complexity,
        walked_params,
        state_dict_tensors: shapes.len(),
    })
}

/// The text report.
pub fn render(name: &str, info: &BackboneInfo) -> String {
    let c = &info.complexity;
    let g = |n: u64| n as f64 / 1e9;
    let kind = serde_json::to_value(&info.config)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_default();
    format!(
        "{name} ({kind})\n\
         \x20 input       {}x{}x{} (C x H x W, pixels)\n\
         \x20 embedding   {}\n\
         \x20 parameters  {} ({:.2} M; {} state-dict tensors)\n\
         \x20 MACs        {:.3} G (conv and fc {:.3} G + BN/PReLU/bias/pool {:.3} G; ptflops convention, FLOPs = 2 x MACs = {:.3} G)\n",
        info.input.0,
        info.input.1,
        info.input.2,
        info.embedding_size,
        c.params,
        c.params as f64 / 1e6,
        info.state_dict_tensors,
        g(c.ptflops_macs()),
        g(c.macs),
        g(c.elementwise),
        2.0 * g(c.ptflops_macs()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fr info ARGV...`: the backbone, then `--set KEY=VALUE` pairs.
    fn info_of(argv: &[&str]) -> Result<BackboneInfo> {
        let sets = argv[1..]
            .chunks(2)
            .map(|kv| {
                assert_eq!(kv[0], "--set");
                kv[1].to_string()
            })
            .collect();
        let args = InfoOptions {
            backbone: argv[0].to_string(),
            sets,
            json: false,
        };
        describe(&resolve(&args)?)
    }

    #[test]
    fn info_r50_and_r100_match_the_published_counts() {
        let r50 = info_of(&["r50"]).unwrap();
        assert_eq!(r50.input, (3, 112, 112));
        assert_eq!(r50.embedding_size, 512);
        assert_eq!(r50.walked_params, r50.complexity.params);
        assert_eq!((r50.complexity.params as f64 / 1e5).round() / 10.0, 43.6);
        assert_eq!(
            (r50.complexity.ptflops_macs() as f64 / 1e8).round() / 10.0,
            6.3
        );
        let r100 = info_of(&["r100"]).unwrap();
        assert_eq!((r100.complexity.params as f64 / 1e5).round() / 10.0, 65.2);
        assert_eq!(
            (r100.complexity.ptflops_macs() as f64 / 1e8).round() / 10.0,
            12.1
        );
        // The other registered families: non-square input, arcface_torch's 0.45 G mbf.
        let sphere = info_of(&["sphere20"]).unwrap();
        assert_eq!(sphere.input, (3, 112, 96));
        let mbf = info_of(&["mbf"]).unwrap();
        assert_eq!(
            (mbf.complexity.ptflops_macs() as f64 / 1e7).round() / 100.0,
            0.45
        );
        let text = render("r100", &r100);
        assert!(text.contains("65.16 M"), "{text}");
        assert!(text.contains("3x112x112"), "{text}");
    }

    #[test]
    fn info_overrides_and_config_files() {
        // A 128-d r50 loses (512 - 128) · (512·7·7 + 1) fc weights and 3 · 384 BN/bias values.
        let r50 = info_of(&["r50"]).unwrap();
        let small = info_of(&["r50", "--set", "embedding_size=128"]).unwrap();
        assert_eq!(small.embedding_size, 128);
        assert_eq!(
            r50.complexity.params - small.complexity.params,
            384 * (512 * 49 + 1) + 2 * 384
        );
        // A preset file: its [backbone] table.
        let preset = crate::workspace_root().join("configs/lh2face.toml");
        let from_file = info_of(&[preset.to_str().unwrap()]).unwrap();
        let want: crate::config::Preset = crate::config_file::load(&preset, &[]).unwrap();
        assert_eq!(from_file.config, want.backbone);
        // Errors name the problem.
        let err = info_of(&["r51"]).unwrap_err().to_string();
        assert!(err.contains("r50") && err.contains("r51"), "{err}");
        let err = info_of(&["r50", "--set", "layerz=[1,1,1,1]"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("layerz"), "{err}");
    }
}
