//! The paper presets: the TOML files of the repository's `configs/`, built into the library
//! (so an installed `fr` and a program depending on this crate have them), optionally
//! overlaid by a folder on disk whose files take precedence.
//!
//! ```no_run
//! let presets = fr_run::Presets::builtin();
//! let arcface = presets.load("arcface", &["train.epochs=1".to_string()])?;
//! assert_eq!(arcface.methods[0], "arcface");
//! # Ok::<(), fr_run::Error>(())
//! ```

use std::path::{Path, PathBuf};

use toml::Value;

use crate::config_file::{self, ConfigSource};
use crate::{bail, Preset, Result};

/// Every `configs/*.toml` of the repository at build time: (file name, text).
const BUILTIN: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/presets.rs"));

/// The built-in config file `file` (e.g. `_base.toml`), if there is one.
pub fn builtin_file(file: &str) -> Option<ConfigSource> {
    BUILTIN
        .iter()
        .find(|(f, _)| *f == file)
        .map(|&(file, text)| ConfigSource::Builtin { file, text })
}

/// A catalogue of presets: a folder's `<name>.toml` files first, then the built-in ones.
/// Names starting with `_` (`_base`) are shared bases, not presets.
#[derive(Debug, Clone, Default)]
pub struct Presets {
    dir: Option<PathBuf>,
}

impl Presets {
    /// The presets built into fr.
    pub fn builtin() -> Self {
        Self { dir: None }
    }

    /// The presets of `dir` (e.g. a checkout's `configs/`), then the built-in ones for names
    /// the folder does not have.
    pub fn with_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: Some(dir.into()),
        }
    }

    /// Where the config file `file` (`arcface.toml`, `_base.toml`) comes from, if anywhere.
    pub fn source(&self, file: &str) -> Option<ConfigSource> {
        if let Some(dir) = &self.dir {
            let path = dir.join(file);
            if path.is_file() {
                return Some(ConfigSource::File(path));
            }
        }
        builtin_file(file)
    }

    /// Whether `name` is a preset (not a `_` base).
    pub fn contains(&self, name: &str) -> bool {
        !name.starts_with('_') && self.source(&format!("{name}.toml")).is_some()
    }

    /// The preset names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = BUILTIN
            .iter()
            .map(|(f, _)| f.to_string())
            .chain(self.dir.iter().flat_map(|d| {
                std::fs::read_dir(d)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
            }))
            .filter_map(|f| f.strip_suffix(".toml").map(str::to_string))
            .filter(|stem| !stem.starts_with('_'))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The config tree of preset `name` (or `_base`), `extends` resolved.
    ///
    /// # Errors
    /// An unknown name (the message lists the presets), or a config that does not read.
    pub fn tree(&self, name: &str) -> Result<(Value, ConfigSource)> {
        let Some(src) = self.source(&format!("{name}.toml")) else {
            bail!("no preset {name} (presets: {})", self.names().join(", "));
        };
        Ok((config_file::read_source(&src, 0)?, src))
    }

    /// Preset `name` with `sets` (`key.path=value`) applied, typed (not yet
    /// [validated](Preset::validate)).
    ///
    /// # Errors
    /// As [`Presets::tree`]; a malformed override or a key the config rejects, named.
    pub fn load(&self, name: &str, sets: &[String]) -> Result<Preset> {
        let (tree, src) = self.tree(name)?;
        config_file::finish(tree, sets, &src.to_string())
    }

    /// The head named `name`: a preset of this catalogue contributes its paper's head (its
    /// first method) as the preset configures it; any other name is a registry head with its
    /// paper defaults; `None` when it is neither.
    ///
    /// # Errors
    /// A preset that does not load.
    pub fn head(&self, name: &str) -> Result<Option<fr_heads::HeadConfig>> {
        if self.contains(name) {
            let p = self.load(name, &[])?;
            return Ok(Some(p.heads[&p.methods[0]].clone()));
        }
        Ok(fr_heads::HeadConfig::default_for(name))
    }

    /// A preset given as a file path (anything with a `/` or ending in `.toml` that exists) or
    /// as a name of this catalogue, with `sets` applied.
    ///
    /// # Errors
    /// As [`Presets::load`], or an unreadable file.
    pub fn load_any(&self, name_or_path: &str, sets: &[String]) -> Result<Preset> {
        let path = Path::new(name_or_path);
        if path.is_file() {
            return config_file::load(path, sets);
        }
        self.load(name_or_path, sets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_preset_loads_and_validates() {
        let presets = Presets::builtin();
        let names = presets.names();
        assert!(names.contains(&"lh2face".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with('_')));
        for name in &names {
            let p = presets.load(name, &[]).unwrap();
            p.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(&p.name, name, "a preset's name is its file name");
        }
    }

    #[test]
    fn a_folder_overrides_the_builtin_file_and_unknown_names_are_listed() {
        let dir = std::env::temp_dir().join(format!("fr-presets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = builtin_file("arcface.toml").unwrap().text().unwrap();
        let edited = text.replacen("name = \"arcface\"", "name = \"arcface\"\nseed = 7", 1);
        std::fs::write(dir.join("arcface.toml"), edited).unwrap();
        let presets = Presets::with_dir(&dir);
        // The folder's file extends `_base.toml`, which only the built-in presets have.
        let p = presets.load("arcface", &[]).unwrap();
        assert_eq!(p.seed, 7);
        assert_eq!(Presets::builtin().load("arcface", &[]).unwrap().seed, 42);
        let err = presets.load("arcfcae", &[]).unwrap_err().to_string();
        assert!(
            err.contains("no preset arcfcae") && err.contains("lh2face"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
