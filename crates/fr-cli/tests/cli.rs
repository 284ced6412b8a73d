//! The `fr` binary as a user meets it: the built-in presets from any folder, help, and the
//! command line's defaults equal to the library's.

use std::process::Command;

use clap::Parser;

/// `fr` run from an empty folder (no `configs/`): the built-in presets only.
fn fr_elsewhere(args: &[&str]) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("fr-cli-elsewhere-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Command::new(env!("CARGO_BIN_EXE_fr"))
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("running fr")
}

#[test]
fn reproduce_list_works_outside_the_repository() {
    let out = fr_elsewhere(&["reproduce", "--list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for preset in ["lh2face", "arcface", "quantface", "sface"] {
        assert!(
            text.contains(&format!("| {preset} |")),
            "{preset} missing:\n{text}"
        );
    }
    let bad = fr_elsewhere(&["reproduce", "lh2fcae"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("no preset lh2fcae") && err.contains("lh2face"),
        "{err}"
    );
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "reproduce",
        "eval",
        "train",
        "study",
        "pack",
        "weights",
        "info",
    ] {
        let out = fr_elsewhere(&[sub, "--help"]);
        assert!(out.status.success(), "fr {sub} --help failed");
        assert!(!out.stdout.is_empty());
    }
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: fr_cli::Command,
}

fn parse(argv: &[&str]) -> fr_cli::Command {
    Cli::try_parse_from(std::iter::once("fr").chain(argv.iter().copied()))
        .unwrap()
        .command
}

/// What the command line leaves unset is what the library's `Default` says.
#[test]
fn command_line_defaults_are_the_library_defaults() {
    let fr_cli::Command::Train(a) = parse(&["train", "arcface"]) else {
        panic!("train")
    };
    let expected = fr_run::train::TrainOptions {
        preset: "arcface".into(),
        ..Default::default()
    };
    assert_eq!(
        format!("{:?}", fr_run::train::TrainOptions::from(a)),
        format!("{expected:?}")
    );

    let fr_cli::Command::Pack(a) = parse(&["pack", "--from", "a", "--out", "b"]) else {
        panic!("pack")
    };
    let expected = fr_run::pack::PackOptions {
        from: "a".into(),
        out: "b".into(),
        ..Default::default()
    };
    assert_eq!(
        format!("{:?}", fr_run::pack::PackOptions::from(a)),
        format!("{expected:?}")
    );

    let fr_cli::Command::Eval(a) = parse(&["eval", "--config", "c", "--checkpoint", "k"]) else {
        panic!("eval")
    };
    let expected = fr_run::evaluate::EvalOptions {
        config: "c".into(),
        checkpoint: "k".into(),
        ..Default::default()
    };
    assert_eq!(
        format!("{:?}", fr_run::evaluate::EvalOptions::from(a)),
        format!("{expected:?}")
    );

    let fr_cli::Command::Study(a) =
        parse(&["study", "backbone-size", "--head", "a,b", "--head", "c"])
    else {
        panic!("study")
    };
    let expected = fr_run::study::StudyOptions {
        study: Some("backbone-size".into()),
        heads: vec!["a".into(), "b".into(), "c".into()],
        ..Default::default()
    };
    assert_eq!(
        format!("{:?}", fr_run::study::StudyOptions::from(a)),
        format!("{expected:?}")
    );
    let fr_cli::Command::Study(a) = parse(&["study"]) else {
        panic!("study")
    };
    assert_eq!(
        format!("{:?}", fr_run::study::StudyOptions::from(a)),
        format!("{:?}", fr_run::study::StudyOptions::default())
    );
}
