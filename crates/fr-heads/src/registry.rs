//! Build any head from a tagged config: `{"type": "arcface", "scale": 64, ...}` (JSON) or
//! `type = "arcface"` (TOML).
//!
//! Adding a head is one new file plus one line in the `heads!` list below.

use serde::{Deserialize, Serialize};

use crate::{
    adaface, arcface, center, cosface, curricularface, epl, gbcosface, km, lh2face, lsoftmax,
    magface, normface, partial_fc, simplex, softmax, sphereface, subcenter, triplet, uniface,
    unitsface,
};
use crate::{Head, Result};

/// Declares [`HeadConfig`], its names and [`build_head`] from one list of
/// `Variant = "name" => module::Head(module::Config)` lines.
macro_rules! heads {
    ($($(#[$doc:meta])* $variant:ident = $name:literal => $head:path, $cfg:path;)*) => {
        /// The configuration of any head, tagged by `type` (the head's registry name).
        /// Unknown keys are rejected.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
        pub enum HeadConfig {
            $($(#[$doc])* #[serde(rename = $name)] $variant($cfg),)*
        }

        impl HeadConfig {
            /// Every registry name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// The registry name of this config's head (its `type`).
            pub fn name(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => $name,)*
                }
            }

            /// The config of head `name` with its paper defaults, `None` for an unknown name.
            pub fn default_for(name: &str) -> Option<Self> {
                match name {
                    $($name => Some(Self::$variant(<$cfg>::default())),)*
                    _ => None,
                }
            }

            /// Check the hyperparameters without building anything.
            ///
            /// # Errors
            /// [`crate::Error::Config`] naming the offending key.
            pub fn validate(&self) -> Result<()> {
                match self {
                    $(Self::$variant(c) => c.validate(),)*
                }
            }
        }

        /// Build the head `cfg` describes for `embedding_size`-d embeddings and `num_classes`
        /// classes. Its parameters (class centres `weight` `(C, D)`, and `bias` / `scale` where
        /// the head has them) are created through `vb`, so the caller's `VarMap` owns them.
        ///
        /// # Errors
        /// [`crate::Error::Config`] for invalid hyperparameters or sizes, candle errors.
        pub fn build_head(
            cfg: &HeadConfig,
            embedding_size: usize,
            num_classes: usize,
            vb: candle_nn::VarBuilder,
        ) -> Result<Box<dyn Head>> {
            Ok(match cfg {
                $(HeadConfig::$variant(c) => {
                    Box::new(<$head>::new(c, embedding_size, num_classes, vb)?)
                })*
            })
        }
    };
}

heads! {
    /// Linear classifier + cross-entropy.
    Softmax = "softmax" => softmax::Softmax, softmax::SoftmaxConfig;
    /// Scaled cosine softmax.
    NormFace = "normface" => normface::NormFace, normface::NormFaceConfig;
    /// Additive cosine margin (CosFace / AM-Softmax).
    CosFace = "cosface" => cosface::CosFace, cosface::CosFaceConfig;
    /// Additive angular margin and combined margin (ArcFace).
    ArcFace = "arcface" => arcface::ArcFace, arcface::ArcFaceConfig;
    /// ArcFace target + curriculum-weighted hard negatives (CurricularFace).
    CurricularFace = "curricularface" => curricularface::CurricularFace, curricularface::CurricularFaceConfig;
    /// Quality-adaptive margin from the feature norm, EMA norm statistics (AdaFace).
    AdaFace = "adaface" => adaface::AdaFace, adaface::AdaFaceConfig;
    /// Norm-adaptive angular margin + magnitude regulariser (MagFace).
    MagFace = "magface" => magface::MagFace, magface::MagFaceConfig;
    /// ArcFace over the best of K sub-centres per class (sub-center ArcFace).
    SubCenterArcFace = "subcenter_arcface" => subcenter::SubCenterArcFace, subcenter::SubCenterArcFaceConfig;
    /// Multiplicative angular margin on un-normalised logits, λ-annealed (L-Softmax).
    LSoftmax = "lsoftmax" => lsoftmax::LSoftmax, lsoftmax::LSoftmaxConfig;
    /// Multiplicative angular margin, unit weights, λ-annealed (SphereFace / A-Softmax).
    SphereFace = "sphereface" => sphereface::SphereFace, sphereface::SphereFaceConfig;
    /// CosFace as two softplus terms around a global virtual positive cosine (GB-CosFace).
    GbCosFace = "gbcosface" => gbcosface::GbCosFace, gbcosface::GbCosFaceConfig;
    /// Empirical prototype bank rows stacked under a CosFace / ArcFace classifier (EPL).
    Epl = "epl" => epl::Epl, epl::EplConfig;
    /// Softmax cross-entropy re-weighted by (γp + 1)^(−2) (Knot Magnify).
    Km = "km" => km::Km, km::KmConfig;
    /// Center loss (Wen et al.) on top of a KM or softmax classifier ("KM + center").
    Center = "center" => center::Center, center::CenterConfig;
    /// vMF similarity + uncertainty-aware margin + proxy losses (LH2Face).
    Lh2Face = "lh2face" => lh2face::Lh2Face, lh2face::Lh2FaceConfig;
    /// Any margin head over a per-step sample of the class centres (Partial FC).
    PartialFc = "partial_fc" => partial_fc::PartialFc, partial_fc::PartialFcConfig;
    /// Unified-threshold BCE with a learnable bias (UniFace UCE).
    UniFace = "uniface" => uniface::UniFace, uniface::UniFaceConfig;
    /// Uniform-classification BCE, unified or per-class bias (arXiv 2403.07289).
    UniformBce = "uniform_bce" => uniface::UniformBce, uniface::UniformBceConfig;
    /// Sample-to-sample USS over a per-class memory + CosFace (UniTSFace).
    UniTsFace = "unitsface" => unitsface::UniTsFace, unitsface::UniTsFaceConfig;
    /// Fixed regular-simplex centres + squared-error pull (Deep Simplex Classifier).
    Simplex = "simplex" => simplex::Simplex, simplex::SimplexConfig;
    /// Angular softmax + batch-hard triplet (joint re-id objective).
    TripletJoint = "triplet_joint" => triplet::TripletJoint, triplet::TripletJointConfig;
}

impl HeadConfig {
    /// The margin softmax ([`crate::margin::MarginSoftmax`]: scale, target-logit margin,
    /// cosine clamp, loss cap) of a head whose logits are the scaled cosines with a margin on
    /// the target only: ArcFace, CosFace, and Partial FC over one of them. This is what the
    /// model-parallel Partial FC ([`crate::sharded`]) takes.
    ///
    /// # Errors
    /// [`crate::Error::Config`] naming `type` for a head without such a margin.
    pub fn margin_softmax(&self) -> Result<crate::margin::MarginSoftmax> {
        match self {
            HeadConfig::ArcFace(c) => Ok(c.margin_softmax()),
            HeadConfig::CosFace(c) => Ok(c.margin_softmax()),
            HeadConfig::PartialFc(c) => c.margin_softmax(),
            other => Err(crate::Error::config(
                "type",
                format!(
                    "head `{}` has no target-logit margin (arcface, cosface and partial_fc over \
                     them have one)",
                    other.name()
                ),
            )),
        }
    }
}

impl Default for HeadConfig {
    /// ArcFace with the paper's defaults.
    fn default() -> Self {
        Self::ArcFace(arcface::ArcFaceConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn every_head_builds_and_names_itself() -> Result<()> {
        let configs: Vec<HeadConfig> = HeadConfig::NAMES
            .iter()
            .map(|n| HeadConfig::default_for(n).unwrap())
            .collect();
        assert!(HeadConfig::default_for("no_such_head").is_none());
        for cfg in configs {
            let vm = VarMap::new();
            let head = build_head(
                &cfg,
                8,
                4,
                VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
            )?;
            assert_eq!(head.name(), cfg.name());
            if cfg.name() == "simplex" {
                continue; // fixed centres, no `weight`
            }
            let w = vm.data().lock().unwrap()["weight"].as_tensor().clone();
            // (C, D), or (C·K, D) for sub-center heads.
            assert!(
                w.dims()[1] == 8 && w.dims()[0].is_multiple_of(4),
                "{:?}",
                w.dims()
            );
        }
        Ok(())
    }

    #[test]
    fn serde_round_trip_uses_the_registry_name() {
        let cfg = HeadConfig::CosFace(cosface::CosFaceConfig::am_softmax());
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.starts_with(r#"{"type":"cosface""#), "{json}");
        let back: HeadConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        let partial: HeadConfig =
            serde_json::from_str(r#"{"type": "arcface", "margin": 0.3}"#).unwrap();
        let HeadConfig::ArcFace(a) = partial else {
            panic!("not arcface")
        };
        assert_eq!((a.margin, a.scale), (0.3, 64.0));
    }
}
