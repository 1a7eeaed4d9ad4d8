//! `Conv3d`: PyTorch's 3-D convolution for the configurations the Universal Model uses.

use candle_core::{Module, Tensor};

use crate::error::{Error, Result};
use crate::ops::conv::add_bias;
use crate::ops::conv::{conv3d, conv3d_bias, conv3d_concat_bias, conv3d_patchify, subsample};

/// Settings of a [`Conv3d`] besides its channels and kernel; [`Default`] is PyTorch's
/// (padding 0, stride 1, with a bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3dConfig {
    /// Zero padding on both sides of each axis.
    pub padding: usize,
    /// Stride along each axis.
    pub stride: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl Default for Conv3dConfig {
    fn default() -> Self {
        Conv3dConfig {
            padding: 0,
            stride: 1,
            bias: true,
        }
    }
}

/// PyTorch's `Conv3d`: stride 1 with any kernel and padding (the implicit-GEMM kernel on the
/// CPU), a stride equal to the kernel without padding (a patch projection, one matmul), or any
/// other stride (the stride-1 result with every `stride`-th voxel kept: exact, but `stride³`
/// times the work).
///
/// Keys: `weight` `(O, C, k, k, k)`, `bias` `(O)`.
///
/// # Shapes
/// `(N, C, D, H, W)` → `(N, O, D', H', W')` with `D' = (D + 2·padding − k) / stride + 1`.
#[derive(Debug, Clone)]
pub struct Conv3d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv3dConfig,
}

impl Conv3d {
    /// A convolution from its weight `(O, C, kd, kh, kw)` and optional bias `(O)`; `cfg.bias`
    /// is taken from whether a bias is given.
    ///
    /// # Errors
    /// [`Error::Shape`] for a stride of 0 or a padding not below the kernel.
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv3dConfig) -> Result<Self> {
        let (_, _, kd, kh, kw) = weight.dims5()?;
        let Conv3dConfig {
            padding, stride, ..
        } = cfg;
        let patch = stride == kd && stride == kh && stride == kw && padding == 0;
        if stride == 0 || (!patch && padding >= kd.min(kh).min(kw)) {
            return Err(Error::shape(
                "Conv3d",
                format!(
                    "stride {stride} with kernel {:?} and padding {padding} is not supported",
                    [kd, kh, kw]
                ),
            ));
        }
        let cfg = Conv3dConfig {
            bias: bias.is_some(),
            ..cfg
        };
        Ok(Conv3d { weight, bias, cfg })
    }

    /// Loads `weight` (and `bias` when `cfg.bias`) of a `cin → cout` convolution with a cubic
    /// kernel of side `kernel`, with PyTorch's default initialisation hints.
    ///
    /// # Errors
    /// Missing tensors or wrong shapes.
    pub fn load(
        vb: candle_nn::VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        cfg: Conv3dConfig,
    ) -> Result<Self> {
        let k = kernel;
        let bound = 1.0 / ((cin * k * k * k) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((cout, cin, k, k, k), "weight", init)?;
        let bias = if cfg.bias {
            Some(vb.get_with_hints(cout, "bias", init)?)
        } else {
            None
        };
        Self::new(weight, bias, cfg)
    }

    /// The weight `(O, C, kd, kh, kw)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `(O)`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> Conv3dConfig {
        self.cfg
    }

    /// Multiply-accumulate count for an input of spatial size `dhw` (per sample).
    pub fn macs(&self, dhw: [usize; 3]) -> u64 {
        let (o, c, kd, kh, kw) = self.weight.dims5().unwrap_or((0, 0, 0, 0, 0));
        let out: usize = dhw.iter().map(|s| s / self.cfg.stride).product();
        (o * c * kd * kh * kw * out) as u64
    }

    /// The convolution of the channel-wise concatenation of `inputs` (stride 1), without
    /// materialising it on the CPU (see [`crate::ops::conv3d_concat`]).
    ///
    /// # Errors
    /// Shape mismatches, or a stride other than 1.
    pub fn forward_concat(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        if self.cfg.stride != 1 {
            return Err(Error::shape("Conv3d", "forward_concat needs stride 1"));
        }
        conv3d_concat_bias(
            inputs,
            &self.weight,
            self.bias.as_ref(),
            [self.cfg.padding; 3],
        )
    }

    /// The forward pass with this crate's error type.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, kd, kh, kw) = self.weight.dims5()?;
        let Conv3dConfig {
            padding, stride, ..
        } = self.cfg;
        let pad = [padding; 3];
        if stride == 1 {
            return conv3d_bias(x, &self.weight, self.bias.as_ref(), pad);
        }
        let y = if stride == kd && stride == kh && stride == kw && padding == 0 {
            conv3d_patchify(x, &self.weight)?
        } else {
            subsample(&conv3d(x, &self.weight, pad)?, stride)?
        };
        add_bias(y, self.bias.as_ref())
    }
}

impl Module for Conv3d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(x).map_err(candle_core::Error::wrap)
    }
}
