//! 3-D layers with gradients: convolutions, normalisations, pooling and activations.
//!
//! Every function takes and returns candle tensors in PyTorch's `(N, C, D, H, W)` layout; each
//! has a backward pass (checked by finite differences in the tests) so training can use them.

pub mod conv;
pub mod norm;
pub mod pool;

pub use conv::{Conv3d, ConvTranspose3d, conv_transpose3d_k_eq_s, conv3d, conv3d_patchify};
pub use norm::{
    GroupNorm, LayerNorm, batch_norm_batch_stats, group_norm, instance_norm, layer_norm,
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
