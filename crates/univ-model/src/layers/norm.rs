//! Normalisation layers, written from elementary candle operations so that every one has a
//! gradient (candle's fused `LayerNorm` silently drops the input gradient; candle issue #2977).
//! Statistics use the biased variance, as PyTorch does.

use candle_core::{D, Module, Tensor};

use crate::error::{Error, Result};

/// Normalises `x` viewed as `(rows, m)` along its last axis: `(x − mean) / √(var + eps)`.
fn normalize_rows(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(centered.broadcast_div(&(var + eps)?.sqrt()?)?)
}

fn channel_affine(y: Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>) -> Result<Tensor> {
    let rank = y.rank();
    let c = y.dim(1)?;
    let mut shape = vec![1usize; rank];
    shape[1] = c;
    let mut y = y;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.reshape(shape.clone())?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape(shape)?)?;
    }
    Ok(y)
}

/// `InstanceNorm3d(affine=False, track_running_stats=False)`: each (sample, channel) is
/// normalised over its voxels.
///
/// # Shapes
/// `(N, C, D, H, W)` → same.
///
/// # Errors
/// Tensors of rank below 3.
pub fn instance_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 3 {
        return Err(Error::shape(
            "instance_norm",
            format!("rank-{} input", dims.len()),
        ));
    }
    let rows = dims[0] * dims[1];
    let y = normalize_rows(&x.reshape((rows, x.elem_count() / rows))?, eps)?;
    Ok(y.reshape(dims)?)
}

/// `GroupNorm(groups, C)` with optional per-channel affine parameters.
///
/// # Shapes
/// `(N, C, ...)` → same; `C` divisible by `groups`.
///
/// # Errors
/// `C` not divisible by `groups`.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    if groups == 0 || c % groups != 0 {
        return Err(Error::shape(
            "group_norm",
            format!("{c} channels in {groups} groups"),
        ));
    }
    let y = normalize_rows(
        &x.reshape((n * groups, x.elem_count() / (n * groups)))?,
        eps,
    )?;
    channel_affine(y.reshape(dims)?, weight, bias)
}

/// Batch normalisation with the statistics of the current batch (per channel over the batch
/// and all voxels), as the official U-Net's `ContBatchNorm3d` does even at inference.
///
/// # Shapes
/// `(N, C, ...)` → same.
///
/// # Errors
/// Rank below 2.
pub fn batch_norm_batch_stats(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 {
        return Err(Error::shape(
            "batch_norm",
            format!("rank-{} input", dims.len()),
        ));
    }
    let (n, c) = (dims[0], dims[1]);
    let m = x.elem_count() / (n * c);
    let x3 = x.reshape((n, c, m))?;
    let mean = x3.mean_keepdim(2)?.mean_keepdim(0)?;
    let centered = x3.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?;
    let y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    channel_affine(y.reshape(dims)?, weight, bias)
}

/// Layer normalisation over the last axis with optional affine parameters.
///
/// # Errors
/// Shape mismatches of the parameters.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let mut y = normalize_rows(x, eps)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// A `LayerNorm` module (affine, or not), differentiable.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of size `dim`.
    ///
    /// # Errors
    /// Missing tensors or wrong shapes.
    pub fn load(vb: candle_nn::VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: Some(vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?),
            bias: Some(vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?),
            eps,
        })
    }

    /// A layer norm without parameters.
    pub fn plain(eps: f64) -> Self {
        LayerNorm {
            weight: None,
            bias: None,
            eps,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)
            .map_err(candle_core::Error::wrap)
    }
}

/// A `GroupNorm` module with affine parameters.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` of size `channels`.
    ///
    /// # Errors
    /// Missing tensors, wrong shapes, or `channels` not divisible by `groups`.
    pub fn load(
        vb: candle_nn::VarBuilder,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::Config(format!(
                "GroupNorm: {channels} channels in {groups} groups"
            )));
        }
        Ok(GroupNorm {
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?,
            groups,
            eps,
        })
    }
}

impl GroupNorm {
    /// The normalisation followed by an activation (fused on the CPU at inference).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn forward_act(&self, x: &Tensor, act: crate::layers::fused::Act) -> Result<Tensor> {
        norm_act(
            x,
            crate::layers::fused::NormKind::Group(self.groups),
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            act,
        )
    }
}

impl GroupNorm {
    /// [`forward_act`](Self::forward_act) on a tensor the caller owns alone (see
    /// [`norm_act_owned`]).
    pub(crate) fn forward_act_owned(
        &self,
        x: Tensor,
        act: crate::layers::fused::Act,
    ) -> Result<Tensor> {
        norm_act_owned(
            x,
            crate::layers::fused::NormKind::Group(self.groups),
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            act,
        )
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(x, crate::layers::fused::Act::Identity)
            .map_err(candle_core::Error::wrap)
    }
}

/// [`norm_act`] on a tensor the caller owns alone (one it has just produced and shares with
/// no one): at inference on the CPU the result is written over it instead of into a new tensor.
/// Never pass a clone of a tensor still used elsewhere.
///
/// # Errors
/// As [`norm_act`].
pub(crate) fn norm_act_owned(
    x: Tensor,
    kind: crate::layers::fused::NormKind,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: crate::layers::fused::Act,
) -> Result<Tensor> {
    use crate::layers::fused::{NormKind, fusable, norm_act_cpu_owned};
    let groups_ok = match kind {
        NormKind::Group(g) => g > 0 && x.rank() >= 2 && x.dim(1)?.is_multiple_of(g),
        _ => true,
    };
    if groups_ok && fusable(&[Some(&x), weight, bias]) {
        return norm_act_cpu_owned(x, kind, weight, bias, eps, act);
    }
    norm_act(&x, kind, weight, bias, eps, act)
}

/// Normalisation, per-channel affine and activation in one call: the fused CPU kernel when no
/// input needs a gradient, else the composed, differentiable operations.
///
/// # Shapes
/// `(N, C, ...)` → same.
///
/// # Errors
/// Invalid group counts or tensor errors.
pub fn norm_act(
    x: &Tensor,
    kind: crate::layers::fused::NormKind,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: crate::layers::fused::Act,
) -> Result<Tensor> {
    use crate::layers::fused::{NormKind, fusable, norm_act_cpu};
    if let NormKind::Group(g) = kind {
        let c = x.dim(1)?;
        if g == 0 || c % g != 0 {
            return Err(Error::shape(
                "group_norm",
                format!("{c} channels in {g} groups"),
            ));
        }
    }
    if fusable(&[Some(x), weight, bias]) {
        return norm_act_cpu(x, kind, weight, bias, eps, act);
    }
    if crate::layers::fused::cpu_f32(&[Some(x), weight, bias]) {
        // Training on the CPU: one fused operation whose backward recomputes its statistics.
        let c = x.dim(1)?;
        let w = match weight {
            Some(w) => w.clone(),
            None => Tensor::ones(c, x.dtype(), x.device())?,
        };
        let b = match bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(c, x.dtype(), x.device())?,
        };
        let op = crate::layers::train_ops::NormActOp { kind, eps, act };
        return Ok(x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, op)?);
    }
    let y = match kind {
        NormKind::Batch => batch_norm_batch_stats(x, weight, bias, eps)?,
        NormKind::Instance => channel_affine(instance_norm(x, eps)?, weight, bias)?,
        NormKind::Group(g) => group_norm(x, g, weight, bias, eps)?,
    };
    act.apply_tensor(y)
}
