//! `ConvTranspose3d` with kernel = stride: the 2×2×2 up-sampling of the U-Net and UNETR.

use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::ops::conv_transpose::conv_transpose3d;

/// Settings of a [`ConvTranspose3d`] besides its channels and kernel (the stride equals the
/// kernel); [`Default`] has a bias, as PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTranspose3dConfig {
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl Default for ConvTranspose3dConfig {
    fn default() -> Self {
        ConvTranspose3dConfig { bias: true }
    }
}

/// PyTorch's `ConvTranspose3d(cin, cout, k, stride=k)`.
///
/// Keys: `weight` `(Ci, Co, k, k, k)` (PyTorch's layout), `bias` `(Co)`.
///
/// # Shapes
/// `(N, Ci, D, H, W)` → `(N, Co, kD, kH, kW)`.
#[derive(Debug, Clone)]
pub struct ConvTranspose3d {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl ConvTranspose3d {
    /// Loads `weight` `(cin, cout, k, k, k)` and, when `cfg.bias`, `bias`.
    ///
    /// # Errors
    /// Missing tensors or wrong shapes.
    pub fn load(
        vb: candle_nn::VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        cfg: ConvTranspose3dConfig,
    ) -> Result<Self> {
        let k = kernel;
        let bound = 1.0 / ((cout * k * k * k) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((cin, cout, k, k, k), "weight", init)?;
        let bias = if cfg.bias {
            Some(vb.get_with_hints(cout, "bias", init)?)
        } else {
            None
        };
        Ok(ConvTranspose3d { weight, bias })
    }

    /// The weight `(Ci, Co, kd, kh, kw)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `(Co)`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for ConvTranspose3d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        conv_transpose3d(x, &self.weight, self.bias.as_ref()).map_err(candle_core::Error::wrap)
    }
}
