//! The transposed convolution with kernel = stride and no padding (PyTorch's
//! `ConvTranspose3d(cin, cout, k, stride=k)`, the 2×2×2 up-sampling of the U-Net and UNETR).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::cpu::conv_transpose::conv_transpose_slices;
use crate::error::{Error, Result};
use crate::ops::conv::{add_bias, bias_grad};
use crate::ops::{ExecPath, dims5, storage_f32, to_f32_vec};

/// The transposed convolution (kernel = stride) with an optional per-channel bias, on the path
/// [`ExecPath`] chooses: one pass of the CPU kernel at inference, a custom operation with its
/// own backward pass for training on the CPU (with a bias), candle operations otherwise.
///
/// # Shapes
/// `x`: `(N, Ci, D, H, W)`, `w`: `(Ci, Co, k, k, k)` (PyTorch layout), `bias`: `(Co)` →
/// `(N, Co, kD, kH, kW)`.
///
/// # Errors
/// Shape mismatches.
pub fn conv_transpose3d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (_, ci, _, _, _) = x.dims5()?;
    let (wci, _, kd, kh, kw) = w.dims5()?;
    if ci != wci || kd * kh * kw == 0 {
        return Err(Error::shape(
            "conv_transpose3d",
            format!("input has {ci} channels, weight expects {wci}"),
        ));
    }
    match (ExecPath::of(&[Some(x), Some(w), bias]), bias) {
        (ExecPath::CpuInference, _) => conv_transpose_cpu(x, w, bias),
        (ExecPath::CpuTraining, Some(b)) => {
            Ok(x.contiguous()?
                .apply_op3(&w.contiguous()?, &b.contiguous()?, ConvTransposeKS)?)
        }
        _ => add_bias(conv_transpose3d_k_eq_s(x, w)?, bias),
    }
}

/// Transposed convolution with kernel = stride = `k` and no padding (PyTorch's
/// `ConvTranspose3d(cin, cout, k, stride=k)`), as one matmul and a reshape (differentiable,
/// any device).
///
/// # Shapes
/// `x`: `(N, Ci, D, H, W)`, `w`: `(Ci, Co, k, k, k)` (PyTorch layout) → `(N, Co, kD, kH, kW)`.
///
/// # Errors
/// Shape mismatches.
pub fn conv_transpose3d_k_eq_s(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, ci, d, h, wd) = x.dims5()?;
    let (wci, co, kd, kh, kw) = w.dims5()?;
    if ci != wci {
        return Err(Error::shape(
            "conv_transpose3d",
            format!("input has {ci} channels, weight expects {wci}"),
        ));
    }
    let xm = x
        .reshape((n, ci, d * h * wd))?
        .transpose(1, 2)?
        .contiguous()?; // (N, DHW, Ci)
    let wm = w.reshape((ci, co * kd * kh * kw))?;
    let y = xm.broadcast_matmul(&wm)?; // (N, DHW, Co·k³)
    let y = y
        .reshape(vec![n, d, h, wd, co, kd, kh, kw])?
        .permute(vec![0, 4, 1, 5, 2, 6, 3, 7])?
        .contiguous()?;
    Ok(y.reshape((n, co, d * kd, h * kh, wd * kw))?)
}

/// The transposed convolution with kernel = stride on the CPU, with the bias, in one pass:
/// for each tap, `Y = W_tapᵀ · X` over blocks of input positions, scattered straight into the
/// interleaved output.
fn conv_transpose_cpu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, ci, d, h, wd) = x.dims5()?;
    let (_, co, kd, kh, kw) = w.dims5()?;
    let xv = to_f32_vec(x)?;
    let wv = to_f32_vec(w)?;
    let bv = bias.map(to_f32_vec).transpose()?;
    let out = conv_transpose_slices(&xv, [n, ci, d, h, wd], &wv, co, [kd, kh, kw], bv.as_deref());
    Ok(Tensor::from_vec(
        out,
        (n, co, d * kd, h * kh, wd * kw),
        x.device(),
    )?)
}

/// The transposed convolution with kernel = stride and its bias as one differentiable
/// operation on `(x, w, b)`; the backward pass regroups the output gradient by tap and uses
/// two matrix products.
#[derive(Debug, Clone, Copy)]
struct ConvTransposeKS;

impl CustomOp3 for ConvTransposeKS {
    fn name(&self) -> &'static str {
        "univ-conv-transpose"
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
        let xs = dims5(l1, "conv_transpose3d input")?;
        let ws = dims5(l2, "conv_transpose3d weight")?;
        let x = storage_f32(s1, l1, "conv_transpose3d input")?;
        let w = storage_f32(s2, l2, "conv_transpose3d weight")?;
        let b = storage_f32(s3, l3, "conv_transpose3d bias")?;
        let k = [ws[2], ws[3], ws[4]];
        let out = conv_transpose_slices(x, xs, w, ws[1], k, Some(b));
        let shape = vec![xs[0], ws[1], xs[2] * k[0], xs[3] * k[1], xs[4] * k[2]];
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, ci, d, h, wd) = x.dims5()?;
        let (_, co, kd, kh, kw) = w.dims5()?;
        let (x, w) = (x.detach(), w.detach());
        // (N, Co, D·kd, H·kh, W·kw) → (N, D·H·W, Co·k³): each input voxel's taps side by side.
        let g = grad
            .detach()
            .reshape(vec![n, co, d, kd, h, kh, wd, kw])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .contiguous()?
            .reshape((n, d * h * wd, co * kd * kh * kw))?;
        let wm = w.reshape((ci, co * kd * kh * kw))?;
        let gx = g
            .broadcast_matmul(&wm.t()?.contiguous()?)? // (N, DHW, Ci)
            .transpose(1, 2)?
            .contiguous()?
            .reshape(x.shape())?;
        let xm = x.reshape((n, ci, d * h * wd))?.contiguous()?;
        let gw = xm.matmul(&g)?.sum(0)?.reshape(w.shape())?;
        Ok((Some(gx), Some(gw), Some(bias_grad(grad, b)?)))
    }
}
