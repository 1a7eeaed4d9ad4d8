//! 3-D layers with gradients: convolutions, normalisations, pooling and activations.
//!
//! Every function takes and returns candle tensors in PyTorch's `(N, C, D, H, W)` layout; each
//! has a backward pass (checked by finite differences in the tests) so training can use them.

pub mod conv;
pub mod fused;
pub mod norm;
pub mod pool;
pub(crate) mod train_ops;

pub use conv::{Conv3d, ConvTranspose3d, conv_transpose3d_k_eq_s, conv3d, conv3d_patchify};
pub use fused::{Act, NormKind};
pub use norm::{
    GroupNorm, LayerNorm, batch_norm_batch_stats, group_norm, instance_norm, layer_norm, norm_act,
};
pub use pool::{adaptive_avg_pool3d_1, max_pool3d_2};

use candle_core::Tensor;

use crate::error::Result;

/// `LeakyReLU(negative_slope)`: `max(x, slope·x)` for slopes in `[0, 1]`.
///
/// # Errors
/// Never for valid tensors.
pub fn leaky_relu(x: &Tensor, negative_slope: f64) -> Result<Tensor> {
    Ok(x.maximum(&(x * negative_slope)?)?)
}

/// `ReLU`.
///
/// # Errors
/// Never for valid tensors.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.relu()?)
}

/// The exact (erf) GELU, PyTorch's `nn.GELU()`.
///
/// # Errors
/// Never for valid tensors.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// PyTorch's `Linear` over the last axis of a tensor of any rank (leading axes are flattened
/// into one batch axis for a single matmul).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` `(out, in)` and, when `bias`, `bias` `(out)`, with PyTorch's default
    /// initialisation hints.
    ///
    /// # Errors
    /// Missing tensors or wrong shapes.
    pub fn load(
        vb: candle_nn::VarBuilder,
        input: usize,
        output: usize,
        bias: bool,
    ) -> Result<Self> {
        let bound = 1.0 / (input as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Linear {
            weight: vb.get_with_hints((output, input), "weight", init)?,
            bias: if bias {
                Some(vb.get_with_hints(output, "bias", init)?)
            } else {
                None
            },
        })
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let input = *dims.last().expect("rank >= 1");
        let rows = x.elem_count() / input.max(1);
        let y = x.reshape((rows, input))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        y.reshape(out)
    }
}
