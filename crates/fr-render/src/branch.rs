//! [`ReconstructionBranch`]: the five networks and the renderer, from images to every map of
//! the photo-geometric autoencoder.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::config::RenderConfig;
use crate::loss::ReconstructionOutput;
use crate::nets::{softplus, Encoder, EncoderDecoder};
use crate::renderer::Renderer;
use crate::{Error, Result};

/// The reconstruction branch (Unsup3D's photo-geometric autoencoder). Parameters, under the
/// `VarBuilder` it is built with: `depth_net.*`, `albedo_net.*`, `confidence_net.*`
/// ([`EncoderDecoder`]s with 1, 3 and 2 outputs), `light_net.*`, `view_net.*` ([`Encoder`]s
/// with 4 and 6 outputs). BatchNorm running statistics are variables whose names contain
/// `running_`; keep them out of the optimiser.
#[derive(Debug, Clone)]
pub struct ReconstructionBranch {
    cfg: RenderConfig,
    renderer: Renderer,
    depth_net: EncoderDecoder,
    albedo_net: EncoderDecoder,
    confidence_net: EncoderDecoder,
    light_net: Encoder,
    view_net: Encoder,
}

impl ReconstructionBranch {
    /// Build the networks from `vb` (creating their variables in a `VarMap`-backed builder)
    /// for a validated `cfg`.
    ///
    /// # Errors
    /// [`Error::Config`] from [`RenderConfig::validate`]; variable creation failures.
    pub fn new(cfg: &RenderConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let s = cfg.image_size;
        Ok(Self {
            cfg: cfg.clone(),
            renderer: Renderer::from_config(cfg)?,
            depth_net: EncoderDecoder::new(vb.pp("depth_net"), s, cfg.depth_width, cfg.zdim, 1)?,
            albedo_net: EncoderDecoder::new(vb.pp("albedo_net"), s, cfg.albedo_width, cfg.zdim, 3)?,
            confidence_net: EncoderDecoder::new(
                vb.pp("confidence_net"),
                s,
                cfg.confidence_width,
                cfg.zdim,
                2,
            )?,
            light_net: Encoder::new(vb.pp("light_net"), s, cfg.encoder_width, cfg.zdim, 4)?,
            view_net: Encoder::new(vb.pp("view_net"), s, cfg.encoder_width, cfg.zdim, 6)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RenderConfig {
        &self.cfg
    }

    /// The renderer.
    pub fn renderer(&self) -> &Renderer {
        &self.renderer
    }

    /// Run the branch on `images` `(B, 3, S, S)` (f32 or f64) **in [0, 1]** — not the
    /// recognition normalisation: for a batch normalised as `(x/255 − 0.5)/0.5`, pass
    /// `x·0.5 + 0.5` resized to `S`. The networks see `2·images − 1` (as Unsup3D). `train`
    /// selects batch statistics in BatchNorm (and updates the running ones).
    ///
    /// Canonical depth = rescale(tanh(raw − mean(raw))) to `[min_depth, max_depth]` (the
    /// per-image mean is removed before the tanh, as Unsup3D); albedo = (tanh + 1)/2;
    /// confidences = softplus; light = (ambient, diffuse rescaled to their ranges, dx, dy in
    /// (−1, 1)); view = tanh × (max rotations in radians, max translations).
    ///
    /// # Errors
    /// [`Error::Shape`] for images of another shape or dtype.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<ReconstructionOutput> {
        let s = self.cfg.image_size;
        let dims = images.dims();
        if dims.len() != 4
            || dims[0] == 0
            || dims[1..] != [3, s, s]
            || !matches!(images.dtype(), DType::F32 | DType::F64)
        {
            return Err(Error::shape(
                "images",
                format!("(B, 3, {s}, {s}) f32 or f64 in [0, 1]"),
                images,
            ));
        }
        let b = dims[0];
        let x = images.affine(2.0, -1.0)?;
        let (lo, hi) = (self.cfg.min_depth, self.cfg.max_depth);

        let raw = self.depth_net.forward_t(&x, train)?.squeeze(1)?;
        let mean = raw.flatten_from(1)?.mean_keepdim(1)?.unsqueeze(2)?;
        let canonical_depth = raw
            .broadcast_sub(&mean)?
            .tanh()?
            .affine((hi - lo) / 2.0, (hi + lo) / 2.0)?;
        let canonical_albedo = self
            .albedo_net
            .forward_t(&x, train)?
            .tanh()?
            .affine(0.5, 0.5)?;
        let conf = softplus(&self.confidence_net.forward_t(&x, train)?)?;

        let l = self.light_net.forward(&x)?;
        let rescale = |col: usize, r: [f64; 2]| -> Result<Tensor> {
            Ok(l.narrow(1, col, 1)?
                .affine((r[1] - r[0]) / 2.0, (r[1] + r[0]) / 2.0)?)
        };
        let light = Tensor::cat(
            &[
                rescale(0, self.cfg.ambient_range)?,
                rescale(1, self.cfg.diffuse_range)?,
                l.narrow(1, 2, 2)?,
            ],
            1,
        )?;
        let r = self.cfg.max_rotation_deg;
        let t = self.cfg.max_translation;
        let scale = [
            r[0].to_radians(),
            r[1].to_radians(),
            r[2].to_radians(),
            t[0],
            t[1],
            t[2],
        ];
        let scale = Tensor::new(&scale, images.device())?
            .to_dtype(images.dtype())?
            .reshape((1, 6))?;
        let view = self.view_net.forward(&x)?.broadcast_mul(&scale)?;

        let (a, f) =
            self.renderer
                .render_symmetric(&canonical_depth, &canonical_albedo, &light, &view)?;
        debug_assert_eq!(a.reconstruction.dim(0)?, b);
        Ok(ReconstructionOutput {
            canonical_depth,
            canonical_albedo,
            canonical_normal: a.shading.normal,
            shading: a.shading.shading,
            canonical_image: a.canonical_image,
            canonical_image_flip: f.canonical_image,
            view_depth: a.warp.depth,
            view_grid: a.warp.grid,
            reconstruction: a.reconstruction,
            reconstruction_flip: f.reconstruction,
            mask: a.warp.mask,
            confidence: conf.narrow(1, 0, 1)?,
            confidence_flip: conf.narrow(1, 1, 1)?,
            light,
            view,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use candle_nn::VarMap;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn small() -> RenderConfig {
        RenderConfig {
            image_size: 32,
            depth_width: 4,
            albedo_width: 4,
            confidence_width: 2,
            encoder_width: 4,
            zdim: 16,
            ..RenderConfig::default()
        }
    }

    /// Overwrite every variable from a ChaCha8 generator, in name order: weights uniform in
    /// ±1/√fan_in, BatchNorm and PReLU at their usual constants.
    fn seed_vars(varmap: &VarMap, seed: u64) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let n = var.elem_count();
            let fill = |c: f64| vec![c; n];
            let v: Vec<f64> = if name.ends_with("running_var") || name.ends_with("bn.weight") {
                fill(1.0)
            } else if name.ends_with("running_mean") || name.ends_with("bn.bias") {
                fill(0.0)
            } else if name.ends_with("prelu.weight") {
                fill(0.25)
            } else {
                let fan_in = if var.rank() > 1 { n / var.dim(0)? } else { n };
                let a = 1.0 / (fan_in as f64).sqrt();
                (0..n).map(|_| rng.random_range(-a..a)).collect()
            };
            let t = Tensor::from_vec(v, var.shape(), var.device())?.to_dtype(var.dtype())?;
            var.set(&t)?;
        }
        Ok(())
    }

    fn build(
        cfg: &RenderConfig,
        seed: u64,
        dtype: DType,
    ) -> Result<(VarMap, ReconstructionBranch)> {
        let varmap = VarMap::new();
        let branch =
            ReconstructionBranch::new(cfg, VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu))?;
        seed_vars(&varmap, seed)?;
        Ok((varmap, branch))
    }

    fn images(b: usize, s: usize, seed: u64, dtype: DType) -> Result<Tensor> {
        Ok(crate::testutil::rand_tensor(&[b, 3, s, s], seed)?.to_dtype(dtype)?)
    }

    fn range(t: &Tensor) -> Result<(f64, f64)> {
        let t = t.to_dtype(DType::F64)?;
        Ok((t.min_all()?.to_scalar()?, t.max_all()?.to_scalar()?))
    }

    #[test]
    fn output_shapes_and_ranges() -> Result<()> {
        let cfg = small();
        let (_, branch) = build(&cfg, 1, DType::F32)?;
        let out = branch.forward(&images(3, 32, 2, DType::F32)?, true)?;
        for (t, dims) in [
            (&out.canonical_depth, vec![3, 32, 32]),
            (&out.view_depth, vec![3, 32, 32]),
            (&out.canonical_albedo, vec![3, 3, 32, 32]),
            (&out.canonical_normal, vec![3, 3, 32, 32]),
            (&out.canonical_image, vec![3, 3, 32, 32]),
            (&out.canonical_image_flip, vec![3, 3, 32, 32]),
            (&out.reconstruction, vec![3, 3, 32, 32]),
            (&out.reconstruction_flip, vec![3, 3, 32, 32]),
            (&out.shading, vec![3, 1, 32, 32]),
            (&out.mask, vec![3, 1, 32, 32]),
            (&out.confidence, vec![3, 1, 32, 32]),
            (&out.confidence_flip, vec![3, 1, 32, 32]),
            (&out.light, vec![3, 4]),
            (&out.view, vec![3, 6]),
        ] {
            assert_eq!(t.dims(), dims.as_slice());
            let (lo, hi) = range(t)?;
            assert!(lo.is_finite() && hi.is_finite());
        }
        let (lo, hi) = range(&out.canonical_depth)?;
        assert!(lo >= 0.9 - 1e-6 && hi <= 1.1 + 1e-6, "depth {lo} {hi}");
        let (lo, hi) = range(&out.canonical_albedo)?;
        assert!(lo >= 0.0 && hi <= 1.0, "albedo {lo} {hi}");
        assert!(range(&out.confidence)?.0 > 0.0 && range(&out.confidence_flip)?.0 > 0.0);
        let light: Vec<Vec<f32>> = out.light.to_vec2()?;
        let view: Vec<Vec<f32>> = out.view.to_vec2()?;
        let max_view = [
            20f32.to_radians(),
            60f32.to_radians(),
            20f32.to_radians(),
            0.1,
            0.1,
            0.1,
        ];
        for (l, v) in light.iter().zip(&view) {
            assert!((0.0..=1.0).contains(&l[0]) && (0.0..=1.0).contains(&l[1]));
            assert!(l[2].abs() <= 1.0 && l[3].abs() <= 1.0);
            for (x, m) in v.iter().zip(max_view) {
                assert!(x.abs() <= m * (1.0 + 1e-6), "{v:?}");
            }
        }
        let (lo, hi) = range(&out.mask)?;
        assert!(lo >= 0.0 && hi == 1.0);
        let loss = out.loss(&images(3, 32, 2, DType::F32)?, &cfg)?;
        let total = loss.total.to_scalar::<f32>()?;
        let want = loss.l1.to_scalar::<f32>()?
            + 0.5 * loss.l1_flip.to_scalar::<f32>()?
            + loss.frame.to_scalar::<f32>()?
            + loss.front.to_scalar::<f32>()?;
        assert!((total - want).abs() < 1e-5 && total.is_finite());
        // Wrong inputs are rejected with the tensor's name.
        let bad = branch.forward(&images(1, 16, 3, DType::F32)?, true);
        assert!(matches!(bad, Err(Error::Shape { ref what, .. }) if what == "images"));
        Ok(())
    }

    #[test]
    fn backward_reaches_every_parameter_with_finite_gradients() -> Result<()> {
        let cfg = small();
        let (varmap, branch) = build(&cfg, 3, DType::F32)?;
        let x = images(2, 32, 4, DType::F32)?;
        let out = branch.forward(&x, true)?;
        let grads = out.loss(&x, &cfg)?.total.backward()?;
        let data = varmap.data().lock().unwrap();
        let mut checked = 0;
        for (name, var) in data.iter().filter(|(n, _)| !n.contains("running_")) {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            assert!(g.iter().all(|v| v.is_finite()), "{name}");
            assert!(g.iter().any(|&v| v != 0.0), "{name}: all-zero gradient");
            checked += 1;
        }
        // 3 × (9 blocks × {conv, bn weight, bn bias, prelu} + bottleneck 2 + out 2) + 2 × 6 convs × 2.
        assert_eq!(checked, 3 * (9 * 4 + 4) + 2 * 12);
        Ok(())
    }

    #[test]
    fn same_seed_same_outputs() -> Result<()> {
        let cfg = small();
        let x = images(2, 32, 5, DType::F32)?;
        let run = |seed: u64| -> Result<Vec<f32>> {
            let (_, branch) = build(&cfg, seed, DType::F32)?;
            let out = branch.forward(&x, false)?;
            let mut v: Vec<f32> = out.reconstruction.flatten_all()?.to_vec1()?;
            v.extend(out.canonical_depth.flatten_all()?.to_vec1::<f32>()?);
            v.extend(out.view.flatten_all()?.to_vec1::<f32>()?);
            Ok(v)
        };
        let (a, b, c) = (run(7)?, run(7)?, run(8)?);
        assert_eq!(a, b);
        assert_ne!(a, c);
        Ok(())
    }

    #[test]
    fn f64_branch_runs() -> Result<()> {
        let cfg = small();
        let (_, branch) = build(&cfg, 9, DType::F64)?;
        let x = images(2, 32, 6, DType::F64)?;
        let out = branch.forward(&x, true)?;
        let l = out.loss(&x, &cfg)?.total;
        assert_eq!(l.dtype(), DType::F64);
        assert!(l.to_scalar::<f64>()?.is_finite());
        let v = Var::from_tensor(&x)?;
        let g = branch
            .forward(v.as_tensor(), true)?
            .canonical_image
            .sum_all()?
            .backward()?;
        assert!(g.get(&v).is_some());
        Ok(())
    }

    /// Timing of one forward + backward of L_reco at batch 64, 64×64, default widths.
    /// Run with `cargo test -p fr-render --release -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed_batch_64() -> Result<()> {
        fr_kernels::tune_cpu_runtime();
        let cfg = RenderConfig::default();
        let (varmap, branch) = build(&cfg, 1, DType::F32)?;
        let n_params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        let x = images(64, 64, 2, DType::F32)?;
        let mut times = Vec::new();
        for _ in 0..4 {
            let t0 = std::time::Instant::now();
            let out = branch.forward(&x, true)?;
            let t1 = t0.elapsed();
            let grads = out.loss(&x, &cfg)?.total.backward()?;
            let t2 = t0.elapsed();
            drop(grads);
            times.push((t1.as_secs_f64(), t2.as_secs_f64()));
        }
        eprintln!("parameters {n_params}; (forward, forward+backward) seconds: {times:?}");
        Ok(())
    }
}

#[cfg(test)]
mod profile {
    use std::time::Instant;

    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    use super::*;

    /// Where the time of one branch step goes, batch 64 at 64×64 (default widths), on a smooth
    /// depth map. Run with `cargo test -p fr-render --release profile -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn profile_parts() -> Result<()> {
        fr_kernels::tune_cpu_runtime();
        let dev = Device::Cpu;
        let cfg = RenderConfig::default();
        let varmap = VarMap::new();
        let br =
            ReconstructionBranch::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
        let x = Tensor::rand(0f32, 1., (64, 3, 64, 64), &dev)?;
        let line = Tensor::arange(0u32, 64, &dev)?
            .to_dtype(DType::F32)?
            .affine(0.1, -3.2)?;
        let smooth = line
            .sin()?
            .reshape((1, 1, 64))?
            .broadcast_mul(&line.cos()?.reshape((1, 64, 1))?)?
            .affine(0.05, 1.0)?
            .broadcast_as((64, 64, 64))?
            .contiguous()?;
        let depth = Var::from_tensor(&smooth)?;
        let albedo = Var::from_tensor(&Tensor::rand(0f32, 1., (64, 3, 64, 64), &dev)?)?;
        let light = Tensor::new(&[[0.3f32, 0.6, 0.2, 0.1]], &dev)?
            .broadcast_as((64, 4))?
            .contiguous()?;
        let view = Tensor::new(&[[0.1f32, 0.5, 0.05, 0.01, 0.02, 0.03]], &dev)?
            .broadcast_as((64, 6))?
            .contiguous()?;
        for _ in 0..2 {
            let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
                let t = Instant::now();
                f()?;
                Ok(t.elapsed().as_secs_f64())
            };
            let ed = |net: &EncoderDecoder| -> Result<f64> {
                time(&mut || {
                    net.forward_t(&x, true)?.sum_all()?.backward()?;
                    Ok(())
                })
            };
            let (t_depth, t_albedo, t_conf) = (
                ed(&br.depth_net)?,
                ed(&br.albedo_net)?,
                ed(&br.confidence_net)?,
            );
            let t_enc = time(&mut || {
                br.light_net
                    .forward(&x)?
                    .sum_all()?
                    .add(&br.view_net.forward(&x)?.sum_all()?)?
                    .backward()?;
                Ok(())
            })?;
            let host: Vec<f64> = smooth.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            let host_view: Vec<f64> = view.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            let t_solve = time(&mut || {
                br.renderer.solve(&host, &host_view, 64, 1e-8);
                Ok(())
            })?;
            let t_render = time(&mut || {
                let (a, f) = br.renderer.render_symmetric(
                    depth.as_tensor(),
                    albedo.as_tensor(),
                    &light,
                    &view,
                )?;
                a.reconstruction
                    .sum_all()?
                    .add(&f.reconstruction.sum_all()?)?
                    .backward()?;
                Ok(())
            })?;
            eprintln!(
                "forward+backward seconds: depth_net {t_depth:.3}, albedo_net {t_albedo:.3}, confidence_net {t_conf:.3}, \
                 light+view nets {t_enc:.3}, renderer (both branches) {t_render:.3} of which the host depth search \
                 of one branch {t_solve:.3}"
            );
        }
        Ok(())
    }
}
