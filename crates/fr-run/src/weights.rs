//! `cargo xtask weights`: pretrained weights on the command line.
//!
//! - `weights convert <in.pth> <out.safetensors>`: read a PyTorch checkpoint natively (or a
//!   safetensors file), rename its keys to insightface's (DDP `module.`, CVLface `model.net.`,
//!   AdaFace IR names; see `fr_backbone::keymap`) and write safetensors. `--input-size N` also
//!   writes a model card (`config.json`) beside the output with the architecture read from the
//!   shapes, so that the folder can be uploaded to the Hub and loaded by repository id.
//! - `weights info <file | folder | hf://owner/name>`: format, tensor count, parameters, the
//!   key layout, the IResNet the shapes describe, and the model card; `--keys` lists every
//!   tensor.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::{bail, Context, Result};
use candle_core::Tensor;
use fr_backbone::hub::HubOptions;
use fr_backbone::pretrained::{LoadOptions, Pretrained, Source};
use fr_backbone::{
    read_weights, BackboneConfig, ColourOrder, KeyMap, ModelCard, WeightsFormat, MODEL_CARD_FILE,
};

/// Options of `weights convert`.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// The input: `.pth` / `.pt` / `.bin` / `.ckpt` (PyTorch zip checkpoint) or `.safetensors`.
    pub input: PathBuf,
    /// The output `.safetensors` file.
    pub output: PathBuf,
    /// Keep the keys as they are (no prefix stripping or renaming).
    pub keep_names: bool,
    /// Also write a model card (`config.json`) beside the output, for this input size in
    /// pixels (the weights do not record it: 112 for insightface's models).
    pub input_size: Option<usize>,
    /// With `--input-size`: the model takes BGR input (AdaFace and CVLface IR models).
    pub bgr: bool,
}

/// Options of `weights info`.
#[derive(Debug, Clone, Default)]
pub struct WeightsInfoOptions {
    /// A weights file, a checkpoint folder, or `hf://owner/name[@revision][/file]`.
    pub source: String,
    /// List every tensor (name, shape, dtype).
    pub keys: bool,
    /// Hub sources: use the local cache only (also `HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

fn parameters(tensors: &HashMap<String, Tensor>) -> usize {
    tensors
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(_, t)| t.elem_count())
        .sum()
}

/// Converts `args.input` to `args.output`; returns the summary printed.
///
/// # Errors
/// Unreadable input, an output that is not `.safetensors` or cannot be written, or
/// `--input-size` on weights whose shapes are not an IResNet's.
pub fn convert(args: &ConvertOptions) -> Result<String> {
    if args.output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!(
            "{}: the output must be a .safetensors file",
            args.output.display()
        );
    }
    let format = WeightsFormat::of(&args.input)?;
    let options = LoadOptions {
        key_map: args.keep_names.then(KeyMap::insightface),
        ..LoadOptions::default()
    };
    let pretrained = if args.keep_names {
        None
    } else {
        Some(Pretrained::from_path(&args.input, &options)?)
    };
    let tensors = match &pretrained {
        Some(p) => p.tensors.clone(),
        None => read_weights(&args.input)?,
    };
    if tensors.is_empty() {
        bail!("{}: no tensors", args.input.display());
    }
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = args.output.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.output)
        .with_context(|| format!("renaming to {}", args.output.display()))?;

    let mut out = format!(
        "{} ({format:?}) → {}: {} tensors, {} parameters",
        args.input.display(),
        args.output.display(),
        tensors.len(),
        parameters(&tensors)
    );
    if let Some(p) = &pretrained {
        write!(out, "\nkeys: {}", p.key_map.describe())?;
        if !p.dropped.is_empty() {
            write!(
                out,
                "; {} outside the prefix dropped ({})",
                p.dropped.len(),
                summarise(&p.dropped)
            )?;
        }
        if !p.synthesized.is_empty() {
            write!(out, "; added {}", p.synthesized.join(", "))?;
        }
    }
    if let Some(size) = args.input_size {
        let Some(inferred) = fr_backbone::infer_iresnet_config(&tensors) else {
            bail!(
                "--input-size: the shapes in {} are not an IResNet's (under insightface names); \
no model card written",
                args.input.display()
            );
        };
        if size.div_ceil(16) != inferred.final_size {
            bail!(
                "--input-size {size}: the weights' last feature map is {f}×{f}, which needs an \
input size S with ⌈S/16⌉ = {f} (e.g. {})",
                16 * inferred.final_size,
                f = inferred.final_size
            );
        }
        let mut card = ModelCard::new(BackboneConfig::Iresnet(
            inferred.config.with_input_size(size),
        ));
        card.weights_file = args
            .output
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if args.bgr {
            card.colour_order = ColourOrder::Bgr;
        }
        let card_path = args
            .output
            .parent()
            .unwrap_or(Path::new("."))
            .join(MODEL_CARD_FILE);
        if card_path.exists() && ModelCard::read(&card_path).ok().flatten().is_none() {
            bail!(
                "{} exists and is not an fr model card: not overwritten",
                card_path.display()
            );
        }
        crate::report::write_atomic(&card_path, &card.to_json())?;
        write!(out, "\nmodel card: {}", card_path.display())?;
    }
    Ok(out)
}

/// `a, b, c` or, for many keys, their first components with counts.
fn summarise(keys: &[String]) -> String {
    if keys.len() <= 8 {
        return keys.join(", ");
    }
    let mut groups: std::collections::BTreeMap<&str, usize> = Default::default();
    for k in keys {
        *groups.entry(k.split('.').next().unwrap_or(k)).or_default() += 1;
    }
    groups
        .iter()
        .map(|(g, n)| format!("{g}.* ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The description `weights info` prints.
///
/// # Errors
/// An unreadable source, or a Hub failure.
pub fn info(args: &WeightsInfoOptions) -> Result<String> {
    let source = Source::parse(&args.source)?;
    let options = LoadOptions {
        hub: HubOptions {
            offline: args.offline,
            ..HubOptions::default()
        },
        ..LoadOptions::default()
    };
    let p = Pretrained::load(&source, &options)?;
    let mut out = String::new();
    writeln!(out, "source: {}", p.origin)?;
    let format = WeightsFormat::of(&p.weights_file)?;
    writeln!(
        out,
        "weights: {} ({format:?}), {} tensors, {} parameters, mostly {:?}",
        p.weights_file.display(),
        p.tensors.len(),
        parameters(&p.tensors),
        fr_backbone::keymap::dominant_dtype(&p.tensors)
    )?;
    write!(out, "keys: {}", p.key_map.describe())?;
    if !p.dropped.is_empty() {
        write!(
            out,
            "; {} outside the prefix ignored ({})",
            p.dropped.len(),
            summarise(&p.dropped)
        )?;
    }
    if !p.synthesized.is_empty() {
        write!(out, "; added {}", p.synthesized.join(", "))?;
    }
    out.push('\n');
    match p.inferred() {
        Some(i) => writeln!(
            out,
            "architecture (from the shapes): IResNet layers {:?}, widths {:?}, embedding {}, \
last feature map {f}×{f} (input size S with ⌈S/16⌉ = {f}: {} for insightface's models)",
            i.config.layers,
            i.config.widths,
            i.config.embedding_size,
            i.config.input_size,
            f = i.final_size
        )?,
        None => writeln!(
            out,
            "architecture: not an IResNet under insightface names (no fr backbone loads it)"
        )?,
    }
    writeln!(
        out,
        "input: {}, normalisation (p/255 − mean)/std with mean {:?}, std {:?}",
        match p.colour_order {
            ColourOrder::Rgb => "RGB",
            ColourOrder::Bgr => "BGR",
        },
        p.normalisation.mean,
        p.normalisation.std
    )?;
    match &p.card {
        Some(card) => {
            writeln!(out, "model card ({MODEL_CARD_FILE}):")?;
            out.push_str(String::from_utf8_lossy(&card.to_json()).trim_end());
            out.push('\n');
        }
        None => writeln!(out, "model card: none")?,
    }
    if args.keys {
        let mut keys: Vec<(&String, &Tensor)> = p.tensors.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        for (k, t) in keys {
            writeln!(out, "  {k} {:?} {:?}", t.dims(), t.dtype())?;
        }
    }
    Ok(out.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        crate::workspace_root()
            .join("crates/fr-backbone/tests/data")
            .join(name)
    }

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fr-weights-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn weights_convert_pth_to_safetensors_with_a_card() {
        let dir = temp("convert");
        let out = dir.join("model.safetensors");
        let args = ConvertOptions {
            input: fixture("iresnet_tiny_nested.pth"),
            output: out.clone(),
            keep_names: false,
            input_size: Some(112),
            bgr: false,
        };
        let summary = convert(&args).unwrap();
        assert!(summary.contains("133 tensors"), "{summary}");
        // The same tensors as the reference safetensors file, value for value.
        let got = fr_backbone::read_safetensors(&out).unwrap();
        let want = fr_backbone::read_safetensors(fixture("iresnet_tiny.safetensors")).unwrap();
        assert_eq!(got.len(), want.len());
        for (k, t) in &want {
            assert_eq!(values(&got[k]), values(t), "{k}");
        }
        // The card makes the folder loadable as it is (an upload to the Hub would be too).
        let card = ModelCard::read(dir.join(MODEL_CARD_FILE)).unwrap().unwrap();
        let Some(BackboneConfig::Iresnet(c)) = card.backbone.clone() else {
            panic!("the card names an IResNet")
        };
        assert_eq!(
            (c.layers, c.widths, c.embedding_size, c.input_size),
            ([1, 2, 1, 1], [8, 16, 16, 32], 16, 112)
        );
        let p = Pretrained::from_path(&dir, &LoadOptions::default()).unwrap();
        assert_eq!(p.card, Some(card));
        // An input size the weights cannot have is refused.
        let bad = ConvertOptions {
            input_size: Some(56),
            ..args.clone()
        };
        let err = convert(&bad).unwrap_err().to_string();
        assert!(err.contains("7×7"), "{err}");
        // Not a safetensors output.
        let err = convert(&ConvertOptions {
            output: dir.join("x.pth"),
            ..args
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains(".safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn weights_info_describes_the_architecture() {
        let text = info(&WeightsInfoOptions {
            source: fixture("iresnet_tiny.pth").display().to_string(),
            keys: true,
            offline: true,
        })
        .unwrap();
        for needle in [
            "(Pth), 133 tensors",
            "keys: insightface iresnet names",
            "layers [1, 2, 1, 1], widths [8, 16, 16, 32], embedding 16, last feature map 7×7",
            "model card: none",
            "  layer2.1.prelu.weight [16] F32",
        ] {
            assert!(text.contains(needle), "{needle} not in:\n{text}");
        }
        let err = info(&WeightsInfoOptions {
            source: "hf://fr-test/surely-not-cached-anywhere".into(),
            keys: false,
            offline: true,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("fr-test/surely-not-cached-anywhere"), "{err}");
    }
}
