//! Key maps: the public state-dict layouts of IResNet-family checkpoints, renamed to
//! insightface's names (the names [`crate::IResNet`] uses).
//!
//! | layout | seen in | keys | map |
//! |---|---|---|---|
//! | insightface | arcface_torch `backbone.pth`, fr checkpoints | `conv1.weight`, `layer1.0.bn1.weight`, …, `fc.weight`, `features.running_var` | none |
//! | insightface under a prefix | `module.` (saved from DistributedDataParallel), `model.net.` (CVLface `iresnet_insightface` on the Hub), `backbone.`, … | `<prefix>conv1.weight`, … | the prefix is stripped; keys outside it (a head's, say) are dropped |
//! | AdaFace IR | AdaFace `.ckpt` (`state_dict`, prefix `model.`), CVLface `iresnet` IR-18/50/101 on the Hub (prefix `model.net.`) | `input_layer.0.weight`, `body.N.res_layer.K.*`, `body.N.shortcut_layer.K.*`, `output_layer.{0,3,4}.*` | renamed block by block (below) |
//!
//! [`KeyMap::detect`] finds the layout and the prefix from the keys alone: the shortest prefix
//! `p` such that `p + conv1.weight`, `p + prelu.weight` and `p + fc.weight` exist (insightface)
//! or `p + input_layer.0.weight` and `p + output_layer.3.weight` exist (AdaFace IR).
//!
//! AdaFace's IR (`BasicBlockIR`, Kim et al., "AdaFace", CVPR 2022; reference code
//! `CVLface/.../models/iresnet/model.py`) is insightface's IResNet with other names:
//! `input_layer.{0,1,2}` → `conv1`, `bn1`, `prelu`; `body.N.res_layer.{0..5}` → `bn1`, `conv1`,
//! `bn2`, `prelu`, `conv2`, `bn3` of `layerS.J`; `body.N.shortcut_layer.{0,1}` → `downsample.{0,1}`;
//! `output_layer.0` → `bn2`, `.3` → `fc`, `.4` → `features`. A stage starts at `body.0` and at
//! every unit with a convolutional shortcut (channels change there in every published model).
//! Two differences are bridged exactly:
//! - a stage's first unit with as many input as output channels (`body.0` of IR-18/50/101)
//!   has a `MaxPool2d(1, 2)` shortcut, i.e. `x[:, :, ::2, ::2]`; it becomes an identity 1×1
//!   convolution of stride 2 and an identity BatchNorm (running variance `1 − ε`);
//! - `output_layer.4` is a BatchNorm1d without affine parameters: `features.weight` = 1 and
//!   `features.bias` = 0 are added.
//!
//! Not supported (their keys are reported as unexpected): IR-SE (`se_block`) and the bottleneck
//! IR-152/200 of AdaFace, and any non-IResNet architecture (ViT, Swin, MobileFaceNet).
//! AdaFace's models take BGR input: [`crate::ModelCard::colour_order`] says so where known.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::iresnet::IResNetConfig;
use crate::layers::BN_EPS;

/// The naming scheme of a state dict (after its prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyLayout {
    /// insightface's iresnet `state_dict()` names: used unchanged.
    Insightface,
    /// AdaFace / CVLface `IR_*` names (`input_layer`, `body`, `output_layer`): renamed.
    AdafaceIr,
}

/// Where a checkpoint's backbone keys are and how to rename them to insightface's names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMap {
    /// Prefix of the backbone keys (`""`, `"module."`, `"model.net."`, …), stripped; keys
    /// without it are dropped.
    pub prefix: String,
    /// The naming scheme after the prefix.
    pub layout: KeyLayout,
}

impl Default for KeyMap {
    fn default() -> Self {
        Self::insightface()
    }
}

/// A state dict renamed by [`KeyMap::apply`].
#[derive(Debug, Clone)]
pub struct Mapped {
    /// Tensors under insightface's names (plus any key the map did not recognise, unchanged,
    /// so that building reports it as unexpected).
    pub tensors: HashMap<String, Tensor>,
    /// Keys outside the prefix, dropped (sorted).
    pub dropped: Vec<String>,
    /// Keys added by the map (identity shortcuts, affine-free BatchNorm), sorted.
    pub synthesized: Vec<String>,
}

impl KeyMap {
    /// insightface names at the top level: the identity map.
    pub fn insightface() -> Self {
        Self::new("", KeyLayout::Insightface)
    }

    /// `layout` under `prefix` (include the trailing dot: `"module."`).
    pub fn new(prefix: impl Into<String>, layout: KeyLayout) -> Self {
        Self {
            prefix: prefix.into(),
            layout,
        }
    }

    /// The layout and prefix of a state dict, from its keys (see the module docs); `None` when
    /// neither an insightface nor an AdaFace IR stem is found.
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let keys: BTreeSet<&str> = keys.into_iter().collect();
        let mut best: Option<Self> = None;
        let mut consider = |prefix: &str, layout| {
            if best.as_ref().is_none_or(|b| prefix.len() < b.prefix.len()) {
                best = Some(Self::new(prefix, layout));
            }
        };
        let valid = |p: &str| p.is_empty() || p.ends_with('.');
        for k in &keys {
            if let Some(p) = k.strip_suffix("conv1.weight") {
                if valid(p)
                    && keys.contains(format!("{p}prelu.weight").as_str())
                    && keys.contains(format!("{p}fc.weight").as_str())
                {
                    consider(p, KeyLayout::Insightface);
                }
            }
            if let Some(p) = k.strip_suffix("input_layer.0.weight") {
                if valid(p) && keys.contains(format!("{p}output_layer.3.weight").as_str()) {
                    consider(p, KeyLayout::AdafaceIr);
                }
            }
        }
        best
    }

    /// A one-line description, e.g. ``AdaFace IR names under `model.net.` ``.
    pub fn describe(&self) -> String {
        let layout = match self.layout {
            KeyLayout::Insightface => "insightface iresnet names",
            KeyLayout::AdafaceIr => "AdaFace IR names",
        };
        if self.prefix.is_empty() {
            layout.to_string()
        } else {
            format!("{layout} under `{}`", self.prefix)
        }
    }

    /// Renames `tensors` to insightface's names.
    ///
    /// # Errors
    /// A tensor operation failing while an identity shortcut is made.
    pub fn apply(&self, tensors: HashMap<String, Tensor>) -> Result<Mapped> {
        let mut kept = HashMap::with_capacity(tensors.len());
        let mut dropped = Vec::new();
        for (k, t) in tensors {
            match k.strip_prefix(self.prefix.as_str()) {
                Some(rest) => {
                    kept.insert(rest.to_string(), t);
                }
                None => dropped.push(k),
            }
        }
        dropped.sort();
        let (tensors, mut synthesized) = match self.layout {
            KeyLayout::Insightface => (kept, Vec::new()),
            KeyLayout::AdafaceIr => adaface_to_insightface(kept)?,
        };
        synthesized.sort();
        Ok(Mapped {
            tensors,
            dropped,
            synthesized,
        })
    }
}

/// Renames AdaFace IR keys (prefix already stripped); returns the tensors and the added keys.
fn adaface_to_insightface(
    tensors: HashMap<String, Tensor>,
) -> Result<(HashMap<String, Tensor>, Vec<String>)> {
    // Units and whether each has a convolutional shortcut.
    let mut units: BTreeMap<usize, bool> = BTreeMap::new();
    for k in tensors.keys() {
        if let Some((n, rest)) = k
            .strip_prefix("body.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, rest)| Some((n.parse::<usize>().ok()?, rest)))
        {
            let conv = rest == "shortcut_layer.0.weight";
            *units.entry(n).or_default() |= conv;
        }
    }
    // (stage 1-based, index in stage) of each unit.
    let mut place: HashMap<usize, (usize, usize)> = HashMap::new();
    let (mut stage, mut start) = (0, 0);
    for (i, (&n, &conv_shortcut)) in units.iter().enumerate() {
        if i == 0 || conv_shortcut {
            stage += 1;
            start = i;
        }
        place.insert(n, (stage, i - start));
    }
    const RES: [&str; 6] = ["bn1", "conv1", "bn2", "prelu", "conv2", "bn3"];
    let rename = |k: &str| -> Option<String> {
        if let Some(rest) = k.strip_prefix("input_layer.") {
            let (i, leaf) = rest.split_once('.')?;
            let name = ["conv1", "bn1", "prelu"].get(i.parse::<usize>().ok()?)?;
            return Some(format!("{name}.{leaf}"));
        }
        if let Some(rest) = k.strip_prefix("output_layer.") {
            let (i, leaf) = rest.split_once('.')?;
            let name = match i {
                "0" => "bn2",
                "3" => "fc",
                "4" => "features",
                _ => return None,
            };
            return Some(format!("{name}.{leaf}"));
        }
        let rest = k.strip_prefix("body.")?;
        let (n, rest) = rest.split_once('.')?;
        let (stage, j) = *place.get(&n.parse::<usize>().ok()?)?;
        let block = format!("layer{stage}.{j}");
        if let Some(rest) = rest.strip_prefix("res_layer.") {
            let (i, leaf) = rest.split_once('.')?;
            let name = RES.get(i.parse::<usize>().ok()?)?;
            return Some(format!("{block}.{name}.{leaf}"));
        }
        if let Some(rest) = rest.strip_prefix("shortcut_layer.") {
            let (i, leaf) = rest.split_once('.')?;
            if i == "0" || i == "1" {
                return Some(format!("{block}.downsample.{i}.{leaf}"));
            }
        }
        None
    };
    let mut out = HashMap::with_capacity(tensors.len() + 8);
    for (k, t) in tensors {
        // Unrecognised keys (IR-SE's `se_block`, …) stay as they are: reported as unexpected.
        out.insert(rename(&k).unwrap_or(k), t);
    }
    let mut added = Vec::new();
    // Stage starts without a convolutional shortcut: MaxPool2d(1, 2) as identity conv + BN.
    for (&n, &(stage, j)) in &place {
        if j != 0 || units[&n] {
            continue;
        }
        let conv1 = format!("layer{stage}.0.conv1.weight");
        let Some(w) = out.get(&conv1) else { continue };
        let c = w.dim(0)?;
        let (dtype, dev) = (w.dtype(), w.device().clone());
        let ds = format!("layer{stage}.0.downsample");
        let eye = Tensor::eye(c, dtype, &dev)?.reshape((c, c, 1, 1))?;
        let var = Tensor::full(1.0 - BN_EPS, c, &dev)?.to_dtype(dtype)?;
        for (name, t) in [
            (format!("{ds}.0.weight"), eye),
            (format!("{ds}.1.weight"), Tensor::ones(c, dtype, &dev)?),
            (format!("{ds}.1.bias"), Tensor::zeros(c, dtype, &dev)?),
            (
                format!("{ds}.1.running_mean"),
                Tensor::zeros(c, dtype, &dev)?,
            ),
            (format!("{ds}.1.running_var"), var),
        ] {
            added.push(name.clone());
            out.insert(name, t);
        }
    }
    // BatchNorm1d(affine = False) → features with weight 1, bias 0.
    if let Some(mean) = out.get("features.running_mean") {
        let (d, dtype, dev) = (mean.dim(0)?, mean.dtype(), mean.device().clone());
        for (name, value) in [("features.weight", 1.0), ("features.bias", 0.0)] {
            if !out.contains_key(name) {
                let t = Tensor::full(value, d, &dev)?.to_dtype(dtype)?;
                out.insert(name.to_string(), t);
                added.push(name.to_string());
            }
        }
    }
    Ok((out, added))
}

/// The IResNet architecture a state dict under insightface's names describes (see
/// [`infer_iresnet_config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct InferredIResNet {
    /// Layers, widths and embedding size from the shapes; `input_size` = 16 · `final_size`.
    pub config: IResNetConfig,
    /// Side of the last feature map (`fc` input = `widths[3] · final_size²`).
    pub final_size: usize,
}

/// Infers an [`IResNetConfig`] from a state dict under insightface's names: block counts from
/// the `layerS.J.conv1.weight` keys, widths from their shapes, the embedding size from
/// `fc.weight` `(D, widths[3]·F²)`. The input size is not stored in the weights: every `S`
/// with `⌈S/16⌉ = F` fits; `16·F` is returned (112 for insightface's `F = 7`, but 64 where the
/// model was trained at 56). `None` when a key is missing or a shape does not fit.
pub fn infer_iresnet_config(tensors: &HashMap<String, Tensor>) -> Option<InferredIResNet> {
    let mut layers = [0usize; 4];
    let mut widths = [0usize; 4];
    for (s, (n, w)) in layers.iter_mut().zip(widths.iter_mut()).enumerate() {
        let prefix = format!("layer{}.", s + 1);
        *n = tensors
            .keys()
            .filter_map(|k| {
                let rest = k.strip_prefix(prefix.as_str())?;
                let (j, leaf) = rest.split_once('.')?;
                (leaf == "conv1.weight").then(|| j.parse::<usize>().ok())?
            })
            .max()?
            + 1;
        *w = tensors
            .get(&format!("layer{}.0.conv1.weight", s + 1))?
            .dim(0)
            .ok()?;
    }
    let stem = tensors.get("conv1.weight")?.dim(0).ok()?;
    if stem != widths[0] {
        return None;
    }
    let (embedding_size, fc_in) = tensors.get("fc.weight")?.dims2().ok()?;
    if fc_in % widths[3] != 0 {
        return None;
    }
    let area = fc_in / widths[3];
    let final_size = (area as f64).sqrt().round() as usize;
    if final_size * final_size != area || final_size == 0 {
        return None;
    }
    let config = IResNetConfig {
        layers,
        widths,
        embedding_size,
        input_size: 16 * final_size,
        ..IResNetConfig::default()
    };
    Some(InferredIResNet { config, final_size })
}

/// The dtype of most parameters of a state dict (`F32` when empty), for reports.
pub fn dominant_dtype(tensors: &HashMap<String, Tensor>) -> DType {
    let mut counts: BTreeMap<String, (usize, DType)> = BTreeMap::new();
    for t in tensors.values() {
        let e = counts
            .entry(format!("{:?}", t.dtype()))
            .or_insert((0, t.dtype()));
        e.0 += t.elem_count();
    }
    counts
        .into_values()
        .max_by_key(|(n, _)| *n)
        .map_or(DType::F32, |(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn dict(keys: &[&str]) -> HashMap<String, Tensor> {
        keys.iter()
            .map(|k| {
                (
                    k.to_string(),
                    Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn detects_prefix_and_layout() {
        let insight = [
            "conv1.weight",
            "prelu.weight",
            "layer1.0.conv1.weight",
            "layer1.0.prelu.weight",
            "fc.weight",
        ];
        let keys = |p: &str| {
            insight
                .iter()
                .map(|k| format!("{p}{k}"))
                .collect::<Vec<_>>()
        };
        for p in ["", "module.", "model.net.", "backbone."] {
            let k = keys(p);
            let map = KeyMap::detect(k.iter().map(String::as_str)).unwrap();
            assert_eq!(map, KeyMap::new(p, KeyLayout::Insightface), "{p}");
        }
        let ada = [
            "model.net.input_layer.0.weight",
            "model.net.output_layer.3.weight",
            "head.kernel",
        ];
        assert_eq!(
            KeyMap::detect(ada.iter().copied()),
            Some(KeyMap::new("model.net.", KeyLayout::AdafaceIr))
        );
        assert_eq!(KeyMap::detect(["a.weight", "b.bias"]), None);
        // `xconv1.weight` is not a stem under prefix `x`.
        assert_eq!(
            KeyMap::detect(["xconv1.weight", "xprelu.weight", "xfc.weight"]),
            None
        );
    }

    #[test]
    fn prefix_is_stripped_and_other_keys_dropped() {
        let map = KeyMap::new("module.", KeyLayout::Insightface);
        let out = map
            .apply(dict(&[
                "module.conv1.weight",
                "module.fc.bias",
                "head.weight",
            ]))
            .unwrap();
        let mut keys: Vec<_> = out.tensors.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["conv1.weight", "fc.bias"]);
        assert_eq!(out.dropped, ["head.weight"]);
        assert!(out.synthesized.is_empty());
    }

    #[test]
    fn adaface_names_map_block_by_block() {
        let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let mut d: HashMap<String, Tensor> = HashMap::new();
        d.insert("input_layer.0.weight".into(), t(&[4, 3, 3, 3]));
        d.insert("input_layer.2.weight".into(), t(&[4]));
        // Stage 1: two units, the first with a max-pool shortcut; stage 2: one unit.
        d.insert("body.0.res_layer.1.weight".into(), t(&[4, 4, 3, 3]));
        d.insert("body.1.res_layer.3.weight".into(), t(&[4]));
        d.insert("body.2.shortcut_layer.0.weight".into(), t(&[8, 4, 1, 1]));
        d.insert("body.2.shortcut_layer.1.running_var".into(), t(&[8]));
        d.insert("body.2.res_layer.5.bias".into(), t(&[8]));
        d.insert("body.2.res_layer.6.fc1.weight".into(), t(&[1]));
        d.insert("output_layer.0.weight".into(), t(&[8]));
        d.insert("output_layer.3.weight".into(), t(&[2, 8]));
        d.insert("output_layer.4.running_mean".into(), t(&[2]));
        let out = KeyMap::new("", KeyLayout::AdafaceIr).apply(d).unwrap();
        let keys: BTreeSet<&str> = out.tensors.keys().map(String::as_str).collect();
        for k in [
            "conv1.weight",
            "prelu.weight",
            "layer1.0.conv1.weight",
            "layer1.1.prelu.weight",
            "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_var",
            "layer2.0.bn3.bias",
            "bn2.weight",
            "fc.weight",
            "features.running_mean",
            "features.weight",
            "features.bias",
            "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.running_var",
            // Unknown (IR-SE) keys pass through, to be reported as unexpected.
            "body.2.res_layer.6.fc1.weight",
        ] {
            assert!(keys.contains(k), "{k} missing from {keys:?}");
        }
        assert!(!keys.contains("layer2.0.downsample.1.weight"));
        assert_eq!(out.synthesized.len(), 5 + 2);
        // The identity shortcut is an identity.
        let eye = out.tensors["layer1.0.downsample.0.weight"]
            .reshape((4, 4))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in eye.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert_eq!(*v, if i == j { 1.0 } else { 0.0 });
            }
        }
        let var = out.tensors["layer1.0.downsample.1.running_var"]
            .to_vec1::<f32>()
            .unwrap();
        assert!(var.iter().all(|v| (v + BN_EPS as f32 - 1.0).abs() < 1e-7));
    }
}
