//! Parameter and MAC counts against the published figures and against a walk of the built
//! modules.

use fr_backbone::{parameter_shapes, BackboneConfig, NAMED_BACKBONES};

/// Learnable parameters of the built module (its `VarBuilder` requests, running statistics
/// left out).
fn walked_params(cfg: &BackboneConfig) -> u64 {
    parameter_shapes(cfg)
        .unwrap()
        .iter()
        .filter(|p| p.is_parameter())
        .map(|p| p.numel())
        .sum()
}

fn assert_close(what: &str, got: f64, published: f64, tol: f64) {
    let rel = (got - published).abs() / published;
    assert!(
        rel <= tol,
        "{what}: {got:.4} vs published {published} ({:.2}% off, tolerance {:.2}%)",
        rel * 100.0,
        tol * 100.0
    );
}

#[test]
fn iresnet_counts_match_arcface_torch() {
    // arcface_torch (flops.py, ptflops at 112x112): r18 2.6, r50 6.3, r100 12.1, r200 23.5
    // GFLOPs (MACs); PyTorch parameter counts 24.0M, 43.6M, 65.2M, 118.8M at 512-d.
    for (name, mparams, gmacs) in [
        ("r18", 24.0, 2.6),
        ("r50", 43.6, 6.3),
        ("r100", 65.2, 12.1),
        ("r200", 118.8, 23.5),
    ] {
        let c = BackboneConfig::named(name).unwrap().complexity().unwrap();
        // Published to one decimal: half a unit of the last digit.
        assert!(
            (c.params as f64 / 1e6 - mparams).abs() <= 0.05,
            "{name}: {} params vs {mparams}M",
            c.params
        );
        assert!(
            (c.ptflops_macs() as f64 / 1e9 - gmacs).abs() <= 0.05,
            "{name}: {} MACs vs {gmacs}G",
            c.ptflops_macs()
        );
    }
    // The exact figures, as ptflops prints them (43.59 M / 65.16 M).
    let r50 = BackboneConfig::named("r50").unwrap().complexity().unwrap();
    assert_close("r50 params", r50.params as f64 / 1e6, 43.59, 5e-4);
    let r100 = BackboneConfig::named("r100").unwrap().complexity().unwrap();
    assert_close("r100 params", r100.params as f64 / 1e6, 65.16, 5e-4);
}

#[test]
fn analytic_params_equal_the_built_modules() {
    for (name, _) in NAMED_BACKBONES {
        let cfg = BackboneConfig::named(name).unwrap();
        assert_eq!(
            cfg.complexity().unwrap().params,
            walked_params(&cfg),
            "{name}: analytic count differs from the module"
        );
    }
}

#[test]
fn invalid_configs_are_rejected_by_the_counter() {
    let cfg: BackboneConfig = toml::from_str("type = \"iresnet\"\nlayers = [0, 1, 1, 1]").unwrap();
    let err = cfg.complexity().unwrap_err().to_string();
    assert!(err.contains("layers"), "{err}");
}
