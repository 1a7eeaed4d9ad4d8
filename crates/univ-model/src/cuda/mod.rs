//! Kernels for NVIDIA GPUs (the `cuda` feature): the bodies of the custom operations of
//! [`crate::ops`] when their tensors live on a CUDA device, as `crate::cpu` holds their CPU
//! bodies. Everything else that runs on a GPU is composed from candle's own CUDA operations.

#[cfg(feature = "cuda")]
pub(crate) mod conv;
pub(crate) mod geometry;
#[cfg(feature = "cuda")]
pub(crate) mod memory;
