//! Normalisations: instance, group, batch (with the current batch's statistics, as the
//! official U-Net) and layer norm, each optionally followed by a per-channel affine and an
//! activation. [`norm_act`] picks the fused CPU kernel at inference, a custom operation with a
//! recomputing backward pass for training on the CPU, and candle operations elsewhere (built
//! from elementary operations so that every input gets a gradient: candle's fused `LayerNorm`
//! drops the input gradient, <https://github.com/huggingface/candle/issues/2977>). Statistics use the biased variance, as
//! PyTorch does.

use candle_core::{CpuStorage, CustomOp3, D, Layout, Shape, Tensor};

use crate::cpu::elementwise::Act;
use crate::cpu::norm::{NormKind, norm_act_backward, norm_act_in_place, norm_act_slice};
use crate::error::{Error, Result};
use crate::ops::{ExecPath, storage_f32, to_f32_vec, with_f32_slices};

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

/// [`norm_act`] on a tensor the caller owns alone (one it has just produced and shares with
/// no one): at inference on the CPU the result is written over it instead of into a new tensor.
/// Never pass a clone of a tensor still used elsewhere.
///
/// # Errors
/// As [`norm_act`].
pub(crate) fn norm_act_owned(
    x: Tensor,
    kind: NormKind,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Act,
) -> Result<Tensor> {
    let groups_ok = match kind {
        NormKind::Group(g) => g > 0 && x.rank() >= 2 && x.dim(1)?.is_multiple_of(g),
        _ => true,
    };
    if groups_ok && ExecPath::of(&[Some(&x), weight, bias]) == ExecPath::CpuInference {
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
    kind: NormKind,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Act,
) -> Result<Tensor> {
    if let NormKind::Group(g) = kind {
        let c = x.dim(1)?;
        if g == 0 || c % g != 0 {
            return Err(Error::shape(
                "group_norm",
                format!("{c} channels in {g} groups"),
            ));
        }
    }
    let path = ExecPath::of(&[Some(x), weight, bias]);
    if path == ExecPath::CpuInference {
        return norm_act_cpu(x, kind, weight, bias, eps, act);
    }
    if path == ExecPath::CpuTraining {
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
        let op = NormActOp { kind, eps, act };
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

/// The in-place form of the fused normalisation, as a candle operation.
struct NormActInPlace {
    kind: NormKind,
    w: Option<Vec<f32>>,
    b: Option<Vec<f32>>,
    eps: f64,
    act: Act,
}

impl candle_core::InplaceOp1 for NormActInPlace {
    fn name(&self) -> &'static str {
        "norm-act-in-place"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let dims = layout.dims();
        let (n, c) = (dims[0], dims[1]);
        let (a, e) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("norm: not contiguous".into()))?;
        let candle_core::CpuStorage::F32(v) = storage else {
            candle_core::bail!("norm: expected f32 CPU storage")
        };
        norm_act_in_place(
            &mut v[a..e],
            n,
            c,
            self.kind,
            self.w.as_deref(),
            self.b.as_deref(),
            self.eps,
            self.act,
        );
        Ok(())
    }
}

/// The fused normalisation written over `x`, which the caller owns alone (a tensor it has just
/// produced and shares with no one): saves a full-size tensor per layer at inference.
fn norm_act_cpu_owned(
    x: Tensor,
    kind: NormKind,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Act,
) -> Result<Tensor> {
    if !x.is_contiguous() || x.rank() < 2 {
        return norm_act_cpu(&x, kind, weight, bias, eps, act);
    }
    let op = NormActInPlace {
        kind,
        w: weight.map(to_f32_vec).transpose()?,
        b: bias.map(to_f32_vec).transpose()?,
        eps,
        act,
    };
    x.inplace_op1(&op)?;
    Ok(x)
}

/// Normalisation (+ per-channel affine) + activation in one pass over a contiguous
/// `(N, C, ...)` f32 CPU tensor.
fn norm_act_cpu(
    x: &Tensor,
    kind: NormKind,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Act,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let x = x.contiguous()?;
    let w = weight.map(to_f32_vec).transpose()?;
    let b = bias.map(to_f32_vec).transpose()?;
    let out = with_f32_slices(&[&x], |d| {
        norm_act_slice(d[0], n, c, kind, w.as_deref(), b.as_deref(), eps, act)
    })?;
    Ok(Tensor::from_vec(out, dims, x.device())?)
}

/// Normalisation + per-channel affine + activation with a recomputing backward pass.
#[derive(Debug, Clone, Copy)]
struct NormActOp {
    kind: NormKind,
    eps: f64,
    act: Act,
}

impl CustomOp3 for NormActOp {
    fn name(&self) -> &'static str {
        "norm-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = storage_f32(s1, l1, "norm-act")?;
        let w = storage_f32(s2, l2, "norm-act weight")?;
        let b = storage_f32(s3, l3, "norm-act bias")?;
        let dims = l1.dims();
        let (n, c) = (dims[0], dims[1]);
        let out = norm_act_slice(x, n, c, self.kind, Some(w), Some(b), self.eps, self.act);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let wv = to_f32_vec(w).map_err(candle_core::Error::wrap)?;
        // Read the saved tensors in place (no copies).
        let (dx, dw, db) = with_f32_slices(&[x, res, grad], |s| {
            norm_act_backward(s[0], s[1], s[2], &wv, n, c, self.kind, self.eps, self.act)
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, dims, dev)?),
            Some(Tensor::from_vec(
                dw.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                w.shape(),
                dev,
            )?),
            Some(Tensor::from_vec(
                db.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                w.shape(),
                dev,
            )?),
        ))
    }
}
