//! Parameter and operation counts of a backbone, computed analytically from its configuration.
//!
//! Conventions (those of insightface's `arcface_torch/flops.py`, which runs `ptflops` and prints
//! its MAC count as "GFLOPs"):
//! - `params`: elements of the learnable parameters, PyTorch's `model.parameters()` —
//!   BatchNorm running statistics are buffers and are not counted; insightface's fixed
//!   `features.weight` is a parameter and is counted.
//! - `macs`: multiply-accumulates of the convolutions and fully connected layers for one image.
//! - `elementwise`: the per-element operations `ptflops` adds on top: BatchNorm 2 per output
//!   element (affine), PReLU 1, a bias 1 per output element, pooling 1 per input element.
//!   Residual additions and concatenations are free, as in `ptflops`' module hooks.
//!
//! `macs + elementwise` ([`Complexity::ptflops_macs`]) is the figure arcface_torch publishes:
//! IResNet-50 6.3 G and IResNet-100 12.1 G at 112×112. Papers that report FLOPs as twice the
//! MACs (PocketNet lists IResNet-100 at 24.2 G) use the same count doubled.

use serde::{Deserialize, Serialize};

/// Size and cost of one forward pass of one image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complexity {
    /// Learnable parameters (elements).
    pub params: u64,
    /// Multiply-accumulates of convolutions and fully connected layers.
    pub macs: u64,
    /// Per-element operations of BatchNorm, PReLU, biases and pooling (ptflops' convention).
    pub elementwise: u64,
}

impl Complexity {
    /// `macs + elementwise`: the count `ptflops` reports (arcface_torch's "GFLOPs").
    pub fn ptflops_macs(&self) -> u64 {
        self.macs + self.elementwise
    }

    /// Adds another part's counts (a branch of a block).
    pub fn add(&mut self, other: Complexity) {
        self.params += other.params;
        self.macs += other.macs;
        self.elementwise += other.elementwise;
    }
}

/// Walks a network layer by layer, tracking the feature-map shape `(C, H, W)` of one image and
/// accumulating a [`Complexity`]. Each backbone's `complexity()` mirrors its constructor with it.
#[derive(Debug, Clone)]
pub struct Counter {
    c: usize,
    h: usize,
    w: usize,
    total: Complexity,
}

/// Output side of a convolution or pooling window (PyTorch's formula, dilation 1).
fn out_side(side: usize, k: usize, stride: usize, padding: usize) -> usize {
    (side + 2 * padding).saturating_sub(k) / stride.max(1) + 1
}

impl Counter {
    /// Starts at an input of `c` channels and `h × w` pixels, with nothing counted.
    pub fn new(c: usize, h: usize, w: usize) -> Self {
        Self {
            c,
            h,
            w,
            total: Complexity::default(),
        }
    }

    /// A counter at the same shape with nothing counted: a side branch, merged back with
    /// [`Counter::merge`].
    pub fn branch(&self) -> Self {
        Self::new(self.c, self.h, self.w)
    }

    /// Adds a branch's counts (its shape is not taken over).
    pub fn merge(&mut self, branch: &Counter) -> &mut Self {
        self.total.add(branch.total);
        self
    }

    /// The current feature-map shape `(C, H, W)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.c, self.h, self.w)
    }

    /// Sets the current shape (after a concatenation of branches, say).
    pub fn set_shape(&mut self, c: usize, h: usize, w: usize) -> &mut Self {
        (self.c, self.h, self.w) = (c, h, w);
        self
    }

    /// What has been counted so far.
    pub fn total(&self) -> Complexity {
        self.total
    }

    fn numel(&self) -> u64 {
        (self.c * self.h * self.w) as u64
    }

    /// A `k × k` convolution to `out_c` channels (square kernel, stride and padding).
    pub fn conv(
        &mut self,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        bias: bool,
    ) -> &mut Self {
        let cin_g = (self.c / groups.max(1)) as u64;
        let (h, w) = (
            out_side(self.h, k, stride, padding),
            out_side(self.w, k, stride, padding),
        );
        let out = (out_c * h * w) as u64;
        self.total.params += out_c as u64 * cin_g * (k * k) as u64;
        self.total.macs += out * cin_g * (k * k) as u64;
        if bias {
            self.total.params += out_c as u64;
            self.total.elementwise += out;
        }
        (self.c, self.h, self.w) = (out_c, h, w);
        self
    }

    /// An affine BatchNorm over the current channels.
    pub fn bn(&mut self) -> &mut Self {
        self.total.params += 2 * self.c as u64;
        self.total.elementwise += 2 * self.numel();
        self
    }

    /// A PReLU with one slope per channel.
    pub fn prelu(&mut self) -> &mut Self {
        self.total.params += self.c as u64;
        self.total.elementwise += self.numel();
        self
    }

    /// A `k × k` max or average pooling window (no parameters).
    pub fn pool(&mut self, k: usize, stride: usize, padding: usize) -> &mut Self {
        self.total.elementwise += self.numel();
        self.h = out_side(self.h, k, stride, padding);
        self.w = out_side(self.w, k, stride, padding);
        self
    }

    /// Flattens the feature map and applies a fully connected layer to `out` features; the
    /// shape becomes `(out, 1, 1)`.
    pub fn linear(&mut self, out: usize, bias: bool) -> &mut Self {
        let inp = self.numel();
        self.total.params += inp * out as u64;
        self.total.macs += inp * out as u64;
        if bias {
            self.total.params += out as u64;
            self.total.elementwise += out as u64;
        }
        (self.c, self.h, self.w) = (out, 1, 1);
        self
    }
}

/// One tensor a backbone asks its `VarBuilder` for: state-dict key and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterShape {
    /// State-dict key, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Shape, e.g. `[64, 64, 3, 3]`.
    pub shape: Vec<usize>,
}

impl ParameterShape {
    /// Whether PyTorch counts it in `model.parameters()` (BatchNorm running statistics are
    /// buffers).
    pub fn is_parameter(&self) -> bool {
        let last = self.name.rsplit('.').next().unwrap_or(&self.name);
        !matches!(last, "running_mean" | "running_var" | "num_batches_tracked")
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64
    }
}

/// A `VarBuilder` backend that records every request and hands out a zero broadcast to the
/// requested shape (no storage allocated).
struct ShapeRecorder(std::sync::Mutex<Vec<ParameterShape>>);

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: candle_core::DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("shape recorder poisoned".into()))?
            .push(ParameterShape {
                name: name.to_string(),
                shape: s.dims().to_vec(),
            });
        candle_core::Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _: candle_core::DType,
        _: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::bail!("`{name}` requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Builds the backbone `cfg` describes on a recording backend and returns every tensor it
/// asks for (state-dict keys and shapes, in construction order) without allocating weights:
/// the module walk that cross-checks [`crate::BackboneConfig::complexity`]'s parameter count
/// and lists the names a checkpoint must have.
///
/// # Errors
/// An invalid configuration, or a construction failure.
pub fn parameter_shapes(cfg: &crate::BackboneConfig) -> crate::Result<Vec<ParameterShape>> {
    let recorder = std::sync::Arc::new(ShapeRecorder(Default::default()));
    struct Shared(std::sync::Arc<ShapeRecorder>);
    impl candle_nn::var_builder::SimpleBackend for Shared {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: candle_core::DType,
            dev: &candle_core::Device,
        ) -> candle_core::Result<candle_core::Tensor> {
            self.0.get(s, name, h, dtype, dev)
        }
        fn get_unchecked(
            &self,
            name: &str,
            dtype: candle_core::DType,
            dev: &candle_core::Device,
        ) -> candle_core::Result<candle_core::Tensor> {
            self.0.get_unchecked(name, dtype, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_tensor(name)
        }
    }
    let vb = candle_nn::VarBuilder::from_backend(
        Box::new(Shared(recorder.clone())),
        candle_core::DType::F32,
        candle_core::Device::Cpu,
    );
    drop(crate::build_backbone(cfg, vb)?);
    let shapes = recorder
        .0
        .lock()
        .map_err(|_| candle_core::Error::Msg("shape recorder poisoned".into()))?
        .clone();
    Ok(shapes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_counts_follow_pytorch_shapes() {
        // 3x3/2 pad 1 on 112x112: 56x56 out; 64·3·9 weights.
        let mut c = Counter::new(3, 112, 112);
        c.conv(64, 3, 2, 1, 1, false);
        assert_eq!(c.shape(), (64, 56, 56));
        assert_eq!(c.total().params, 64 * 27);
        assert_eq!(c.total().macs, 64 * 56 * 56 * 27);
        // Depthwise 7x7 valid on 7x7: one output per channel, 49 taps each.
        let mut d = Counter::new(512, 7, 7);
        d.conv(512, 7, 1, 0, 512, false).bn();
        assert_eq!(d.shape(), (512, 1, 1));
        assert_eq!(d.total().params, 512 * 49 + 1024);
        assert_eq!(d.total().macs, 512 * 49);
        assert_eq!(d.total().elementwise, 1024);
        // Non-square input (SphereFace's 112x96).
        let mut s = Counter::new(3, 112, 96);
        s.conv(64, 3, 2, 1, 1, true);
        assert_eq!(s.shape(), (64, 56, 48));
        assert_eq!(s.total().elementwise, 64 * 56 * 48);
    }

    #[test]
    fn branches_add_counts_not_shapes() {
        let mut main = Counter::new(8, 10, 10);
        let mut side = main.branch();
        side.conv(16, 1, 2, 0, 1, false);
        main.conv(16, 3, 2, 1, 1, false).merge(&side);
        assert_eq!(main.shape(), (16, 5, 5));
        assert_eq!(main.total().params, 16 * 8 * 9 + 16 * 8);
    }
}
