//! Loading a preset TOML with `--set key.path=value` overrides, then typing it.
//!
//! Overrides edit the TOML tree before deserialisation, so a misspelt key is rejected by the
//! typed config (`deny_unknown_fields`) with its full dotted path, exactly like a bad key in
//! the file itself.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use toml::Value;

/// Read `path`, apply `sets` (`a.b.c=value`, value parsed as TOML, else taken as a string) and
/// deserialise into `T`.
///
/// # Errors
/// Unreadable file, TOML syntax, a malformed override, or a key/value the config rejects; each
/// message names the file or the key.
pub fn load<T: DeserializeOwned>(path: &Path, sets: &[String]) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let mut root: Value =
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
    for set in sets {
        apply_set(&mut root, set)?;
    }
    let typed = T::deserialize(root).map_err(|e| {
        if sets.is_empty() {
            anyhow!("config {}: {e}", path.display())
        } else {
            anyhow!(
                "config {} with --set {}: {e}",
                path.display(),
                sets.join(" --set ")
            )
        }
    })?;
    Ok(typed)
}

/// Apply one `key.path=value` override to a TOML tree, creating tables on the way.
///
/// # Errors
/// A missing `=`, an empty key, or a path through a non-table value.
pub fn apply_set(root: &mut Value, set: &str) -> Result<()> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {set:?}: expected key.path=value"))?;
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
            .ok_or_else(|| anyhow!("--set {key}: `{}` is not a table", parts[..i].join(".")))?;
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
