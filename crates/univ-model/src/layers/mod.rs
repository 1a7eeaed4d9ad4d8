//! Layers: modules that own their parameters, load them from a var builder under PyTorch's key
//! names, and run through [`crate::ops`]. Each takes its settings as a config struct with
//! public fields and a [`Default`] (PyTorch's defaults), as candle's `Conv2dConfig`.

pub mod conv;
pub mod conv_transpose;
pub mod linear;
pub mod norm;

pub use conv::{Conv3d, Conv3dConfig};
pub use conv_transpose::{ConvTranspose3d, ConvTranspose3dConfig};
pub use linear::{Linear, LinearConfig};
pub use norm::{GroupNorm, LayerNorm, NormConfig};
