//! The reconstruction networks: encoder–decoders for canonical depth, albedo and confidence,
//! encoders for light and view.
//!
//! Shapes follow Unsup3D's `EDDeconv`, `ConfNet` and `Encoder` (`unsup3d/networks.py` of
//! github.com/elliottwu/unsup3d) at a fraction of their width, with two substitutions for
//! candle 0.11's CPU autograd: the decoders upsample by nearest-neighbour repetition (a reshape
//! of a broadcast, whose backward is a sum) followed by a 3×3 convolution instead of transposed
//! convolutions, and normalise with BatchNorm + PReLU (fr-kernels' fused layers) instead of
//! GroupNorm + LeakyReLU. An encoder–decoder on an `S`×`S` image (S a power of two ≥ 16):
//! four 4×4 stride-2 convolutions (widths `w, 2w, 4w, 8w`), an `S/16` valid convolution to a
//! `zdim` bottleneck `(B, zdim, 1, 1)`, then five ×2/×4 upsampling stages back to `S`×`S`
//! (widths `8w, 4w, 2w, w, w`) and a 3×3 output convolution. The light and view encoders are
//! the same encoder without normalisation, ReLU, and a 1×1 output convolution.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use fr_kernels::nn::{BatchNorm, Conv2d, Kernels, PReLU};
use fr_kernels::ConvParams;

use crate::Result;

const BN_EPS: f64 = 1e-5;

fn conv(
    vb: &VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bias: bool,
) -> Result<Conv2d> {
    let weight = vb.get_with_hints(
        (cout, cin, k, k),
        "weight",
        candle_nn::init::DEFAULT_KAIMING_NORMAL,
    )?;
    let bias = if bias {
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        Some(vb.get_with_hints(
            cout,
            "bias",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?)
    } else {
        None
    };
    let params = ConvParams {
        stride,
        padding,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, bias, params, Kernels::Auto))
}

/// Convolution (no bias) → BatchNorm → PReLU; parameters `conv.weight`, `bn.{weight, bias,
/// running_mean, running_var}`, `prelu.weight`.
#[derive(Debug, Clone)]
struct ConvBnPrelu {
    conv: Conv2d,
    bn: BatchNorm,
    prelu: PReLU,
}

impl ConvBnPrelu {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: conv(&vb.pp("conv"), cin, cout, k, stride, padding, false)?,
            bn: BatchNorm::load(cout, BN_EPS, vb.pp("bn"), Kernels::Auto)?,
            prelu: PReLU::load(cout, vb.pp("prelu"), Kernels::Auto)?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self
            .bn
            .forward_prelu_t(&self.conv.forward(x)?, &self.prelu, train)?)
    }
}

/// Nearest-neighbour upsampling of `(B, C, H, W)` by an integer `factor`.
///
/// # Errors
/// Candle errors for a tensor that is not rank 4.
pub fn upsample_nearest(x: &Tensor, factor: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, factor, w, factor))?
        .reshape((b, c, h * factor, w * factor))?)
}

/// An encoder–decoder from `(B, 3, S, S)` to `(B, cout, S, S)` raw (pre-activation) maps.
/// Parameters: `enc.{0..3}.*`, `enc.4.{weight, bias}` (bottleneck), `dec.{0..4}.*`,
/// `out.{weight, bias}`.
#[derive(Debug, Clone)]
pub struct EncoderDecoder {
    enc: Vec<ConvBnPrelu>,
    bottleneck: Conv2d,
    dec: Vec<ConvBnPrelu>,
    out: Conv2d,
    first_up: usize,
}

impl EncoderDecoder {
    /// A network of base width `width` and bottleneck `zdim` for `size`×`size` RGB images.
    ///
    /// # Errors
    /// Variable creation failures.
    pub fn new(
        vb: VarBuilder,
        size: usize,
        width: usize,
        zdim: usize,
        cout: usize,
    ) -> Result<Self> {
        let w = width;
        let widths = [3, w, 2 * w, 4 * w, 8 * w];
        let enc = (0..4)
            .map(|i| ConvBnPrelu::new(vb.pp(format!("enc.{i}")), widths[i], widths[i + 1], 4, 2, 1))
            .collect::<Result<Vec<_>>>()?;
        let bottleneck = conv(&vb.pp("enc.4"), 8 * w, zdim, size / 16, 1, 0, true)?;
        let dec_widths = [zdim, 8 * w, 4 * w, 2 * w, w, w];
        let dec = (0..5)
            .map(|i| {
                ConvBnPrelu::new(
                    vb.pp(format!("dec.{i}")),
                    dec_widths[i],
                    dec_widths[i + 1],
                    3,
                    1,
                    1,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let out = conv(&vb.pp("out"), w, cout, 3, 1, 1, true)?;
        Ok(Self {
            enc,
            bottleneck,
            dec,
            out,
            first_up: size / 16,
        })
    }

    /// Raw output maps `(B, cout, S, S)` of images `(B, 3, S, S)`; `train` selects batch
    /// statistics (and updates the running ones) in BatchNorm.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.enc {
            h = layer.forward_t(&h, train)?;
        }
        h = self.bottleneck.forward(&h)?.relu()?;
        for (i, layer) in self.dec.iter().enumerate() {
            h = upsample_nearest(&h, if i == 0 { self.first_up } else { 2 })?;
            h = layer.forward_t(&h, train)?;
        }
        Ok(self.out.forward(&h)?)
    }
}

/// An encoder from `(B, 3, S, S)` to `(B, cout)` values in (−1, 1) (tanh). Parameters
/// `conv{0..5}.{weight, bias}`.
#[derive(Debug, Clone)]
pub struct Encoder {
    convs: Vec<Conv2d>,
}

impl Encoder {
    /// An encoder of base width `width` and hidden size `zdim` for `size`×`size` RGB images.
    ///
    /// # Errors
    /// Variable creation failures.
    pub fn new(
        vb: VarBuilder,
        size: usize,
        width: usize,
        zdim: usize,
        cout: usize,
    ) -> Result<Self> {
        let w = width;
        let widths = [3, w, 2 * w, 4 * w, 8 * w];
        let mut convs = (0..4)
            .map(|i| {
                conv(
                    &vb.pp(format!("conv{i}")),
                    widths[i],
                    widths[i + 1],
                    4,
                    2,
                    1,
                    true,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        convs.push(conv(&vb.pp("conv4"), 8 * w, zdim, size / 16, 1, 0, true)?);
        convs.push(conv(&vb.pp("conv5"), zdim, cout, 1, 1, 0, true)?);
        Ok(Self { convs })
    }

    /// `(B, cout)` in (−1, 1) for images `(B, 3, S, S)`.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.convs.len() - 1;
        for (i, c) in self.convs.iter().enumerate() {
            h = c.forward(&h)?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h.flatten_from(1)?.tanh()?)
    }
}

/// Numerically stable softplus `ln(1 + eˣ)` = `max(x, 0) + ln(1 + e^{−|x|})`.
///
/// # Errors
/// Candle errors.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok(x.relu()?
        .add(&x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use super::*;
    use crate::testutil::{fd_check, rand_tensor};

    #[test]
    fn upsample_repeats_pixels_with_correct_gradient() -> Result<()> {
        let x = rand_tensor(&[2, 3, 2, 3], 1)?;
        let y = upsample_nearest(&x, 2)?;
        assert_eq!(y.dims(), &[2, 3, 4, 6]);
        let y: Vec<Vec<f64>> = y.get(1)?.get(2)?.to_vec2()?;
        let x2: Vec<Vec<f64>> = x.get(1)?.get(2)?.to_vec2()?;
        assert_eq!(y[3][5], x2[1][2]);
        assert_eq!(y[2][4], x2[1][2]);
        let w = rand_tensor(&[2, 3, 4, 6], 2)?;
        assert!(fd_check(&x, |x| Ok(upsample_nearest(x, 2)?.mul(&w)?.sum_all()?))? < 1e-8);
        Ok(())
    }

    #[test]
    fn softplus_is_stable_and_has_correct_gradient() -> Result<()> {
        let x = Tensor::new(&[-800.0f64, -3.0, 0.0, 2.0, 800.0], &Device::Cpu)?;
        let y: Vec<f64> = softplus(&x)?.to_vec1()?;
        assert_eq!(y[0], 0.0);
        assert!((y[1] - (1.0 + (-3f64).exp()).ln()).abs() < 1e-15);
        assert!((y[2] - 2f64.ln()).abs() < 1e-15);
        assert_eq!(y[4], 800.0);
        let x = Tensor::new(&[-3.0f64, -0.5, 0.7, 2.0], &Device::Cpu)?;
        assert!(fd_check(&x, |x| Ok(softplus(x)?.sum_all()?))? < 1e-8);
        Ok(())
    }

    #[test]
    fn shapes_and_parameter_names() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let ed = EncoderDecoder::new(vb.pp("depth_net"), 32, 4, 16, 1)?;
        let enc = Encoder::new(vb.pp("view_net"), 32, 4, 16, 6)?;
        let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu)?;
        assert_eq!(ed.forward_t(&x, true)?.dims(), &[2, 1, 32, 32]);
        assert_eq!(enc.forward(&x)?.dims(), &[2, 6]);
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        for want in [
            "depth_net.enc.0.conv.weight",
            "depth_net.enc.3.bn.running_var",
            "depth_net.enc.4.weight",
            "depth_net.dec.4.prelu.weight",
            "depth_net.out.bias",
            "view_net.conv5.weight",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        Ok(())
    }
}
