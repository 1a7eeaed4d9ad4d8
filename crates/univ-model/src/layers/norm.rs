//! Normalisation modules with parameters: `LayerNorm` and `GroupNorm`.

use candle_core::{Module, Tensor};

use crate::error::{Error, Result};
use crate::ops::norm::norm_act_owned;
use crate::ops::{Act, NormKind, layer_norm, norm_act};

/// Settings of a [`LayerNorm`] or [`GroupNorm`]; [`Default`] is PyTorch's (eps 1e-5, with
/// affine parameters).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormConfig {
    /// Added to the variance.
    pub eps: f64,
    /// Whether the layer has per-channel `weight` and `bias`.
    pub affine: bool,
}

impl Default for NormConfig {
    fn default() -> Self {
        NormConfig {
            eps: 1e-5,
            affine: true,
        }
    }
}

/// Loads the affine parameters of a normalisation over `dim` channels, when `cfg.affine`.
fn affine(
    vb: &candle_nn::VarBuilder,
    dim: usize,
    cfg: NormConfig,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if !cfg.affine {
        return Ok((None, None));
    }
    Ok((
        Some(vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?),
        Some(vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?),
    ))
}

/// PyTorch's `LayerNorm` over the last axis, differentiable.
///
/// Keys (with affine parameters): `weight`, `bias` `(dim)`.
///
/// # Shapes
/// `(..., dim)` → same.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// Loads a layer norm over `dim` values (its parameters when `cfg.affine`).
    ///
    /// # Errors
    /// Missing tensors or wrong shapes.
    pub fn load(vb: candle_nn::VarBuilder, dim: usize, cfg: NormConfig) -> Result<Self> {
        let (weight, bias) = affine(&vb, dim, cfg)?;
        Ok(LayerNorm {
            weight,
            bias,
            eps: cfg.eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)
            .map_err(candle_core::Error::wrap)
    }
}

/// PyTorch's `GroupNorm(groups, channels)`.
///
/// Keys (with affine parameters): `weight`, `bias` `(channels)`.
///
/// # Shapes
/// `(N, channels, ...)` → same.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads a group norm of `channels` channels in `groups` groups.
    ///
    /// # Errors
    /// Missing tensors, wrong shapes, or `channels` not divisible by `groups`.
    pub fn load(
        vb: candle_nn::VarBuilder,
        groups: usize,
        channels: usize,
        cfg: NormConfig,
    ) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::Config(format!(
                "GroupNorm: {channels} channels in {groups} groups"
            )));
        }
        let (weight, bias) = affine(&vb, channels, cfg)?;
        Ok(GroupNorm {
            weight,
            bias,
            groups,
            eps: cfg.eps,
        })
    }

    /// The normalisation followed by an activation (fused on the CPU at inference).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        norm_act(
            x,
            NormKind::Group(self.groups),
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
            act,
        )
    }

    /// [`forward_act`](Self::forward_act) on a tensor the caller owns alone (one it has just
    /// produced and shares with no one): at inference it is normalised in place.
    pub(crate) fn forward_act_owned(&self, x: Tensor, act: Act) -> Result<Tensor> {
        norm_act_owned(
            x,
            NormKind::Group(self.groups),
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
            act,
        )
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(x, Act::Identity)
            .map_err(candle_core::Error::wrap)
    }
}
