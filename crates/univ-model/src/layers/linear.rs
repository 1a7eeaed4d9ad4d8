//! `Linear` over the last axis of a tensor of any rank.

use candle_core::{Module, Tensor};

use crate::error::Result;

/// Settings of a [`Linear`] besides its sizes; [`Default`] has a bias, as PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearConfig {
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig { bias: true }
    }
}

/// PyTorch's `Linear` over the last axis (leading axes are flattened into one batch axis for a
/// single matmul; in bf16 when the CPU convolutions are, see [`crate::ops::linear_matmul`]).
///
/// Keys: `weight` `(out, in)`, `bias` `(out)`.
///
/// # Shapes
/// `(..., in)` → `(..., out)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` `(output, input)` and, when `cfg.bias`, `bias` `(output)`, with PyTorch's
    /// default initialisation hints.
    ///
    /// # Errors
    /// Missing tensors or wrong shapes.
    pub fn load(
        vb: candle_nn::VarBuilder,
        input: usize,
        output: usize,
        cfg: LinearConfig,
    ) -> Result<Self> {
        let bound = 1.0 / (input as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Linear {
            weight: vb.get_with_hints((output, input), "weight", init)?,
            bias: if cfg.bias {
                Some(vb.get_with_hints(output, "bias", init)?)
            } else {
                None
            },
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some(&input) = dims.last() else {
            candle_core::bail!("Linear: a rank-0 input")
        };
        let rows = x.elem_count() / input.max(1);
        let y = crate::ops::linear_matmul(&x.reshape((rows, input))?, &self.weight)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out)
    }
}
