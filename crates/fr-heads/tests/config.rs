//! Head configs from JSON and TOML: defaults, unknown keys and types rejected, invalid values
//! reported with their key.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use fr_heads::arcface::{Fallback, MarginMode};
use fr_heads::{build_head, Error, HeadConfig};

#[test]
fn unknown_key_is_rejected_and_named() {
    let err = serde_json::from_str::<HeadConfig>(r#"{"type": "arcface", "scael": 64.0}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("scael"), "{err}");
    let err = toml::from_str::<HeadConfig>("type = \"cosface\"\nmargin = 0.4\nsacle = 30\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("sacle"), "{err}");
}

#[test]
fn unknown_head_type_is_rejected() {
    let err = serde_json::from_str::<HeadConfig>(r#"{"type": "arc_face"}"#).unwrap_err();
    assert!(err.to_string().contains("arc_face"), "{err}");
    assert!(serde_json::from_str::<HeadConfig>(r#"{"scale": 64.0}"#).is_err());
}

#[test]
fn toml_preset_with_integers_and_enums() {
    let cfg: HeadConfig = toml::from_str(
        "type = \"arcface\"\nscale = 64\nmargin_mode = \"straight_through\"\nfallback = \"none\"\n",
    )
    .unwrap();
    let HeadConfig::ArcFace(a) = cfg else {
        panic!("{cfg:?}")
    };
    assert_eq!(a.scale, 64.0);
    assert_eq!(a.margin, 0.5);
    assert_eq!(a.margin_mode, MarginMode::StraightThrough);
    assert_eq!(a.fallback, Fallback::None);
    let cfg: HeadConfig = toml::from_str("type = \"lh2face\"\nnorm_ema = 0.01\n").unwrap();
    let HeadConfig::Lh2Face(l) = cfg else {
        panic!("{cfg:?}")
    };
    assert_eq!(
        (l.norm_ema, l.vmf_dim, l.margin_coef),
        (Some(0.01), 256, 0.35)
    );
}

#[test]
fn invalid_values_name_their_key() {
    for (json, key) in [
        (r#"{"type": "cosface", "scale": -1.0}"#, "scale"),
        (r#"{"type": "cosface", "margin": 1.5}"#, "margin"),
        (r#"{"type": "arcface", "m1": 0.0}"#, "m1"),
        (r#"{"type": "normface", "scale_floor": 0.0}"#, "scale_floor"),
        (r#"{"type": "lh2face", "vmf_dim": 1}"#, "vmf_dim"),
        (r#"{"type": "lh2face", "proxy_alpha": 0.0}"#, "proxy_alpha"),
    ] {
        let cfg: HeadConfig = serde_json::from_str(json).unwrap();
        assert!(matches!(cfg.validate(), Err(Error::Config { key: ref k, .. }) if k == key));
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        match build_head(&cfg, 8, 4, vb) {
            Err(Error::Config { key: k, .. }) => assert_eq!(k, key),
            Err(e) => panic!("{json}: unexpected error {e}"),
            Ok(_) => panic!("{json}: accepted"),
        }
    }
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    assert!(matches!(
        build_head(&HeadConfig::default(), 8, 0, vb),
        Err(Error::Config { key, .. }) if key == "num_classes"
    ));
}
