//! Loading a preset TOML with `--set key.path=value` overrides, then typing it.
//!
//! A preset is a diff against a base: `extends = "base.toml"` (a path relative to the file)
//! loads the base first and merges the file's tables into it key by key, so a paper preset
//! only names its methods, heads and whatever it changes.
//!
//! Overrides edit the TOML tree before deserialisation, so a misspelt key is rejected by the
//! typed config (`deny_unknown_fields`) with its full dotted path, exactly like a bad key in
//! the file itself.

use std::path::{Path, PathBuf};

use crate::{bail, err, Context, Result};
use serde::de::DeserializeOwned;
use toml::Value;

/// Read `path`, apply `sets` (`a.b.c=value`, value parsed as TOML, else taken as a string) and
/// deserialise into `T`.
///
/// # Errors
/// Unreadable file, TOML syntax, a malformed override, or a key/value the config rejects; each
/// message names the file or the key.
pub fn load<T: DeserializeOwned>(path: &Path, sets: &[String]) -> Result<T> {
    let root = read_tree(path, 0)?;
    finish(root, sets, &path.display().to_string())
}

/// Apply `sets` to an already-read tree and deserialise it into `T`; `origin` names the source
/// in error messages.
///
/// # Errors
/// A malformed override or a key/value the config rejects.
pub fn finish<T: DeserializeOwned>(mut root: Value, sets: &[String], origin: &str) -> Result<T> {
    for set in sets {
        apply_set(&mut root, set)?;
    }
    let typed = T::deserialize(root).map_err(|e| {
        if sets.is_empty() {
            err!("config {origin}: {e}")
        } else {
            err!("config {origin} with --set {}: {e}", sets.join(" --set "))
        }
    })?;
    Ok(typed)
}

/// Longest `extends` chain followed before giving up (a cycle, most likely).
const MAX_EXTENDS_DEPTH: usize = 8;

/// Read a TOML file and resolve its `extends` chain into one tree (a base missing beside the
/// file is taken from the built-in presets, [`crate::presets`]).
///
/// # Errors
/// Unreadable file, TOML syntax, a bad or too deep `extends`; the message names the file.
pub fn read_tree(path: &Path, depth: usize) -> Result<Value> {
    read_source(&ConfigSource::File(path.to_path_buf()), depth)
}

/// Read one config source and resolve its `extends` chain: a file's base is a path relative to
/// the file (else a built-in file of that name), a built-in preset's base is built in.
///
/// # Errors
/// As [`read_tree`].
pub fn read_source(src: &ConfigSource, depth: usize) -> Result<Value> {
    let text = src.text()?;
    let mut root: Value = toml::from_str(&text).with_context(|| format!("parsing config {src}"))?;
    let Some(table) = root.as_table_mut() else {
        bail!("config {src}: not a TOML table");
    };
    let Some(base) = table.remove("extends") else {
        return Ok(root);
    };
    let Some(base) = base.as_str() else {
        bail!("config {src}: `extends` must be a file name string");
    };
    if depth >= MAX_EXTENDS_DEPTH {
        bail!("config {src}: `extends` chain deeper than {MAX_EXTENDS_DEPTH} (a cycle?)");
    }
    let base_src = match src {
        ConfigSource::File(path) => {
            let beside = path.parent().unwrap_or(Path::new(".")).join(base);
            match crate::presets::builtin_file(base) {
                Some(b) if !beside.exists() => b,
                _ => ConfigSource::File(beside),
            }
        }
        ConfigSource::Builtin { .. } => crate::presets::builtin_file(base)
            .with_context(|| format!("config {src}: no built-in base `{base}`"))?,
    };
    let mut merged = read_source(&base_src, depth + 1)
        .with_context(|| format!("config {src}: its `extends` base"))?;
    merge(&mut merged, root);
    Ok(merged)
}

/// Where a config's text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A TOML file on disk.
    File(PathBuf),
    /// A preset built into fr (the repository's `configs/<file>` at build time).
    Builtin {
        /// File name, e.g. `lh2face.toml`.
        file: &'static str,
        /// Its TOML text.
        text: &'static str,
    },
}

impl ConfigSource {
    /// The TOML text.
    ///
    /// # Errors
    /// An unreadable file, named.
    pub fn text(&self) -> Result<std::borrow::Cow<'static, str>> {
        match self {
            ConfigSource::File(path) => Ok(std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?
                .into()),
            ConfigSource::Builtin { text, .. } => Ok((*text).into()),
        }
    }
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::Builtin { file, .. } => write!(f, "configs/{file} (built in)"),
        }
    }
}

/// Merge `over` into `base`: tables merge key by key, any other value replaces.
pub fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Table(b), Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Apply one `key.path=value` override to a TOML tree, creating tables on the way.
///
/// # Errors
/// A missing `=`, an empty key, or a path through a non-table value.
pub fn apply_set(root: &mut Value, set: &str) -> Result<()> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| err!("--set {set:?}: expected key.path=value"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        bail!("--set {set:?}: empty key");
    }
    let value = parse_value(raw.trim());
    let mut node = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let table = node
            .as_table_mut()
            .ok_or_else(|| err!("--set {key}: `{}` is not a table", parts[..i].join(".")))?;
        if i + 1 == parts.len() {
            table.insert((*part).to_string(), value);
            return Ok(());
        }
        node = table
            .entry((*part).to_string())
            .or_insert_with(|| Value::Table(Default::default()));
    }
    unreachable!("the loop returns at the last key part")
}

fn parse_value(raw: &str) -> Value {
    // Parse as the right-hand side of a TOML assignment; fall back to a bare string.
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_overrides_nested_values_with_types() {
        let mut v: Value = toml::from_str("[train]\nepochs = 3\n").unwrap();
        apply_set(&mut v, "train.epochs=5").unwrap();
        apply_set(&mut v, "train.lr=0.05").unwrap();
        apply_set(&mut v, "heads.arcface.type=arc_face").unwrap();
        apply_set(&mut v, "eval.far=[1e-3, 1e-4]").unwrap();
        assert_eq!(v["train"]["epochs"].as_integer(), Some(5));
        assert_eq!(v["train"]["lr"].as_float(), Some(0.05));
        assert_eq!(v["heads"]["arcface"]["type"].as_str(), Some("arc_face"));
        assert_eq!(v["eval"]["far"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn extends_merges_tables_and_replaces_values() {
        let dir = std::env::temp_dir().join(format!("fr-extends-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("base.toml"),
            "seed = 1\n[train]\nepochs = 3\nbatch_size = 64\n[heads.a]\ntype = \"arcface\"\nscale = 32.0\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("child.toml"),
            "extends = \"base.toml\"\n[train]\nepochs = 5\n[heads.a]\nmargin = 0.4\n",
        )
        .unwrap();
        let v: Value = load(&dir.join("child.toml"), &["seed=7".into()]).unwrap();
        assert_eq!(v["seed"].as_integer(), Some(7));
        assert_eq!(v["train"]["epochs"].as_integer(), Some(5));
        assert_eq!(v["train"]["batch_size"].as_integer(), Some(64));
        assert_eq!(v["heads"]["a"]["scale"].as_float(), Some(32.0));
        assert_eq!(v["heads"]["a"]["margin"].as_float(), Some(0.4));
        assert!(v.get("extends").is_none());
        std::fs::write(dir.join("loop.toml"), "extends = \"loop.toml\"\n").unwrap();
        let err = load::<Value>(&dir.join("loop.toml"), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("deeper"), "{err:#}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn malformed_sets_are_rejected() {
        let mut v: Value = toml::from_str("a = 1\n").unwrap();
        assert!(apply_set(&mut v, "novalue").is_err());
        assert!(apply_set(&mut v, "a..b=1").is_err());
        assert!(apply_set(&mut v, "a.b=1")
            .unwrap_err()
            .to_string()
            .contains("not a table"));
    }
}
