//! The Hub environment variables. One test in its own binary: it sets process-wide variables,
//! which must not race with other tests.

use fr_backbone::hub::HubOptions;
use fr_backbone::{Error, LoadOptions, Pretrained, Source};

#[test]
fn hub_environment_variables_are_honoured() {
    for var in [
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
    ] {
        std::env::remove_var(var);
    }
    std::env::set_var("HOME", "/home/someone");
    let default = HubOptions::default();
    assert!(!default.is_offline());
    assert_eq!(
        default.resolved_cache_dir(),
        std::path::Path::new("/home/someone/.cache/huggingface/hub")
    );
    std::env::set_var("XDG_CACHE_HOME", "/xdg");
    assert_eq!(
        default.resolved_cache_dir(),
        std::path::Path::new("/xdg/huggingface/hub")
    );
    std::env::set_var("HF_HOME", "/hf-home");
    assert_eq!(
        default.resolved_cache_dir(),
        std::path::Path::new("/hf-home/hub")
    );
    let dir = std::env::temp_dir().join(format!("fr-backbone-hub-env-{}", std::process::id()));
    std::env::set_var("HF_HUB_CACHE", &dir);
    assert_eq!(default.resolved_cache_dir(), dir);
    let explicit = HubOptions {
        cache_dir: Some("/explicit".into()),
        ..HubOptions::default()
    };
    assert_eq!(
        explicit.resolved_cache_dir(),
        std::path::Path::new("/explicit")
    );

    // HF_HUB_OFFLINE=1 without the option: nothing is downloaded, the error says where the
    // file was looked for.
    for on in ["1", "true", "ON", "yes"] {
        std::env::set_var("HF_HUB_OFFLINE", on);
        assert!(default.is_offline(), "{on}");
    }
    std::env::set_var("HF_HUB_OFFLINE", "0");
    assert!(!default.is_offline());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = Pretrained::load(
        &Source::parse("hf://fr-test/absent").unwrap(),
        &LoadOptions::default(),
    )
    .err()
    .unwrap();
    match &err {
        Error::HubFileMissing {
            repo,
            looked_in,
            offline,
            ..
        } => {
            assert_eq!(repo, "fr-test/absent");
            assert!(*offline);
            assert!(looked_in.starts_with(&dir), "{}", looked_in.display());
        }
        other => panic!("expected HubFileMissing, got {other:?}"),
    }
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
}
