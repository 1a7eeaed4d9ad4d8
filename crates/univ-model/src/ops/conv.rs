//! 3-D convolutions: stride 1 with any kernel and padding (the implicit GEMM of
//! `cpu::correlate` on the CPU, `conv2d` over depth taps elsewhere), the convolution of
//! a channel concatenation that is never materialised, kernel = stride patch projections, and a
//! per-channel bias with a parallel gradient.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor};

use crate::cpu::bias::{add_bias_slice, channel_sums};
use crate::cpu::correlate::{ConvWeights, correlate, correlate_concat_sample, pack_weights};
use crate::cpu::weight_grad::{weight_grad, weight_grad_with};
#[cfg(feature = "cuda")]
use crate::cuda::conv::{Pass, run as cudnn_conv};
#[cfg(feature = "cuda")]
use crate::cuda::geometry::Geometry;
use crate::error::{Error, Result};
use crate::ops::{ExecPath, dims5, storage_f32, to_f32_vec, with_f32_slices};

/// The CPU body of the correlation ops: `(input, weight)` → output. With `transposed`, the
/// weight is used flipped with its in/out channels swapped (the input gradient).
fn correlate_op(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    pad: [usize; 3],
    transposed: bool,
    bias: Option<&[f32]>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let xs = dims5(l1, "conv3d input")?;
    let ws = dims5(l2, "conv3d weight")?;
    let x = storage_f32(s1, l1, "conv3d input")?;
    let w = storage_f32(s2, l2, "conv3d weight")?;
    let k = [ws[2], ws[3], ws[4]];
    let out_channels = if transposed { ws[1] } else { ws[0] };
    let (out, shape) = if transposed {
        let wp = pack_weights(w, ws[0], ws[1], k.iter().product(), true);
        correlate(x, xs, ConvWeights::Packed(&wp), out_channels, k, pad, bias)
    } else {
        correlate(x, xs, ConvWeights::Raw(w), out_channels, k, pad, bias)
    };
    Ok((CpuStorage::F32(out), Shape::from(shape.to_vec())))
}

/// The stride-1 3-D correlation as a candle custom op on `(input, weight)`.
#[derive(Debug, Clone, Copy)]
struct Conv3dS1 {
    pad: [usize; 3],
}

impl CustomOp2 for Conv3dS1 {
    fn name(&self) -> &'static str {
        "univ-conv3d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        correlate_op(s1, l1, s2, l2, self.pad, false, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let g = Geometry {
            x: dims5(l1, "conv3d input")?,
            w: dims5(l2, "conv3d weight")?,
            pad: self.pad,
        };
        cudnn_conv(Pass::Forward, &g, (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = conv_grads(x, w, grad, self.pad)?;
        Ok((Some(gx), Some(gw)))
    }
}

/// Input and weight gradients of a stride-1 correlation.
fn conv_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    pad: [usize; 3],
) -> candle_core::Result<(Tensor, Tensor)> {
    let (_, _, kd, kh, kw) = w.dims5()?;
    let back_pad = [kd - 1 - pad[0], kh - 1 - pad[1], kw - 1 - pad[2]];
    let grad = grad.contiguous()?;
    // Input gradient: correlation of the output gradient with the flipped, transposed kernel.
    let gx = grad.apply_op2_no_bwd(&w.contiguous()?, &Conv3dInputGrad { pad: back_pad })?;
    let gw = x.contiguous()?.apply_op2_no_bwd(
        &grad,
        &Conv3dWeightGrad {
            pad,
            k: [kd, kh, kw],
        },
    )?;
    Ok((gx, gw))
}

/// Gradient of a per-channel bias: the output gradient summed over all but the channel axis
/// (rows summed in parallel, in f64, then per channel in row order).
pub(crate) fn bias_grad(grad: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let dims = grad.dims();
    let (n, c) = (dims[0], dims[1]);
    let sums = with_f32_slices(&[grad], |g| channel_sums(g[0], n, c))?;
    Tensor::from_vec(sums, bias.shape(), bias.device())
}

/// A per-channel bias added to `(N, C, ...)` with a parallel backward pass (candle's
/// broadcast backward reduces on one thread).
#[derive(Debug, Clone, Copy)]
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "univ-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = storage_f32(s1, l1, "bias add input")?;
        let b = storage_f32(s2, l2, "bias")?;
        let d = l1.dims();
        let mut out = x.to_vec();
        add_bias_slice(&mut out, d[0], d[1], b);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(bias_grad(grad, b)?)))
    }
}

/// A stride-1 correlation and its bias as one operation, so that training keeps one tensor
/// (the output) instead of two.
#[derive(Debug, Clone, Copy)]
struct Conv3dS1Bias {
    pad: [usize; 3],
}

impl CustomOp3 for Conv3dS1Bias {
    fn name(&self) -> &'static str {
        "univ-conv3d-bias"
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
        let b = storage_f32(s3, l3, "conv3d bias")?;
        correlate_op(s1, l1, s2, l2, self.pad, false, Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = conv_grads(x, w, grad, self.pad)?;
        Ok((Some(gx), Some(gw), Some(bias_grad(grad, b)?)))
    }
}

/// A stride-1 correlation of the channel concatenation of two tensors, without
/// materialising the concatenation in the forward pass.
#[derive(Debug, Clone, Copy)]
struct Conv3dConcat2 {
    pad: [usize; 3],
}

impl CustomOp3 for Conv3dConcat2 {
    fn name(&self) -> &'static str {
        "univ-conv3d-concat"
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
        let [n, ca, d, h, wd] = dims5(l1, "conv3d concat input")?;
        let [nb, cb, db, hb, wb] = dims5(l2, "conv3d concat input")?;
        let ws = dims5(l3, "conv3d weight")?;
        if nb != n || [db, hb, wb] != [d, h, wd] || ws[1] != ca + cb {
            candle_core::bail!(
                "conv3d concat: inputs {:?} and {:?}, weight {ws:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let a = storage_f32(s1, l1, "conv3d concat input")?;
        let b = storage_f32(s2, l2, "conv3d concat input")?;
        let w = storage_f32(s3, l3, "conv3d weight")?;
        let o = ws[0];
        let k = [ws[2], ws[3], ws[4]];
        let od = [
            d + 2 * self.pad[0] + 1 - k[0],
            h + 2 * self.pad[1] + 1 - k[1],
            wd + 2 * self.pad[2] + 1 - k[2],
        ];
        let dhw = d * h * wd;
        let per_out = o * od[0] * od[1] * od[2];
        let mut out = vec![0f32; n * per_out];
        for s in 0..n {
            correlate_concat_sample(
                &[
                    (&a[s * ca * dhw..(s + 1) * ca * dhw], ca),
                    (&b[s * cb * dhw..(s + 1) * cb * dhw], cb),
                ],
                [d, h, wd],
                self.pad,
                ConvWeights::Raw(w),
                o,
                k,
                None,
                &mut out[s * per_out..(s + 1) * per_out],
            );
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from(vec![n, o, od[0], od[1], od[2]]),
        ))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, _, kd, kh, kw) = w.dims5()?;
        let pad = self.pad;
        let back_pad = [kd - 1 - pad[0], kh - 1 - pad[1], kw - 1 - pad[2]];
        let grad = grad.contiguous()?;
        let gx = grad.apply_op2_no_bwd(&w.contiguous()?, &Conv3dInputGrad { pad: back_pad })?;
        let [n, ca, d, h, wd] = a.dims5().map(|(n, c, d, h, w)| [n, c, d, h, w])?;
        let cb = b.dim(1)?;
        let o = w.dim(0)?;
        let dhw = d * h * wd;
        let gw = with_f32_slices(&[a, b, &grad], |s| {
            let (av, bv, gv) = (s[0], s[1], s[2]);
            weight_grad_with(
                |s, ci| {
                    if ci < ca {
                        &av[(s * ca + ci) * dhw..(s * ca + ci + 1) * dhw]
                    } else {
                        let cj = ci - ca;
                        &bv[(s * cb + cj) * dhw..(s * cb + cj + 1) * dhw]
                    }
                },
                [n, ca + cb, d, h, wd],
                gv,
                o,
                [kd, kh, kw],
                pad,
            )
        })?;
        let gw = Tensor::from_vec(gw, w.shape(), w.device())?;
        // Views of the one input-gradient tensor, no copies.
        Ok((
            Some(gx.narrow(1, 0, ca)?),
            Some(gx.narrow(1, ca, cb)?),
            Some(gw),
        ))
    }
}

#[derive(Debug, Clone, Copy)]
struct Conv3dInputGrad {
    pad: [usize; 3],
}

impl CustomOp2 for Conv3dInputGrad {
    fn name(&self) -> &'static str {
        "univ-conv3d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        correlate_op(s1, l1, s2, l2, self.pad, true, None)
    }

    /// cuDNN's backward-data pass on `(output gradient, weight)`.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let g = Geometry::of_input_grad(
            dims5(l1, "conv3d grad")?,
            dims5(l2, "conv3d weight")?,
            self.pad,
        );
        cudnn_conv(Pass::BackwardData, &g, (s1, l1), (s2, l2))
    }
}

#[derive(Debug, Clone, Copy)]
struct Conv3dWeightGrad {
    pad: [usize; 3],
    k: [usize; 3],
}

impl CustomOp2 for Conv3dWeightGrad {
    fn name(&self) -> &'static str {
        "univ-conv3d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = dims5(l1, "conv3d input")?;
        let gs = dims5(l2, "conv3d grad")?;
        let x = storage_f32(s1, l1, "conv3d input")?;
        let g = storage_f32(s2, l2, "conv3d grad")?;
        let out = weight_grad(x, xs, g, gs[1], self.k, self.pad);
        Ok((
            CpuStorage::F32(out),
            Shape::from(vec![gs[1], xs[1], self.k[0], self.k[1], self.k[2]]),
        ))
    }

    /// cuDNN's backward-filter pass on `(input, output gradient)`.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let xs = dims5(l1, "conv3d input")?;
        let gs = dims5(l2, "conv3d grad")?;
        let g = Geometry {
            x: xs,
            w: [gs[1], xs[1], self.k[0], self.k[1], self.k[2]],
            pad: self.pad,
        };
        cudnn_conv(Pass::BackwardFilter, &g, (s1, l1), (s2, l2))
    }
}

/// Stride-1 3-D convolution (cross-correlation, as PyTorch) with zero padding `pad` on both
/// sides of each axis, without bias. On a CUDA device it runs through cuDNN with operands in
/// [`runtime::gpu_conv_dtype`](crate::runtime::gpu_conv_dtype) (f32 by default; bf16 or f16
/// with f32 accumulation) and returns the input's dtype; its gradients are cuDNN's too.
///
/// # Shapes
/// `x`: `(N, C, D, H, W)`, `w`: `(O, C, kd, kh, kw)` → `(N, O, D+2p−kd+1, …)`.
///
/// # Errors
/// Shape mismatches, or a padding of `k` or more.
pub fn conv3d(x: &Tensor, w: &Tensor, pad: [usize; 3]) -> Result<Tensor> {
    check_conv3d(x, w, pad)?;
    if x.device().is_cuda() {
        let dtype = crate::runtime::gpu_conv_dtype();
        let xc = x.to_dtype(dtype)?.contiguous()?;
        let wc = w.to_dtype(dtype)?.contiguous()?;
        return Ok(xc.apply_op2(&wc, Conv3dS1 { pad })?.to_dtype(x.dtype())?);
    }
    // On the CPU every dtype runs through the f32 kernel.
    let (x, w) = match x.device() {
        Device::Cpu => (x.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?),
        _ => (x.clone(), w.clone()),
    };
    match ExecPath::of_all(&[&x, &w]) {
        ExecPath::Composed => conv3d_composed(&x, &w, pad),
        _ => Ok(x
            .contiguous()?
            .apply_op2(&w.contiguous()?, Conv3dS1 { pad })?),
    }
}

/// [`conv3d`] followed by a per-channel bias: on the CPU one operation (the bias is added as
/// the output is written, and training keeps one tensor instead of two).
///
/// # Shapes
/// As [`conv3d`], `bias`: `(O)`.
///
/// # Errors
/// As [`conv3d`].
pub fn conv3d_bias(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    pad: [usize; 3],
) -> Result<Tensor> {
    match bias {
        Some(b) if ExecPath::of_all(&[x, w, b]).is_cpu() => {
            check_conv3d(x, w, pad)?;
            Ok(x.contiguous()?.apply_op3(
                &w.contiguous()?,
                &b.contiguous()?,
                Conv3dS1Bias { pad },
            )?)
        }
        _ => add_bias(conv3d(x, w, pad)?, bias),
    }
}

/// The shape checks of [`conv3d`].
pub(crate) fn check_conv3d(x: &Tensor, w: &Tensor, pad: [usize; 3]) -> Result<()> {
    let (_, c, d, h, wd) = x.dims5()?;
    let (_, wc, kd, kh, kw) = w.dims5()?;
    if c != wc {
        return Err(Error::shape(
            "conv3d",
            format!("input has {c} channels, weight expects {wc}"),
        ));
    }
    let k = [kd, kh, kw];
    for a in 0..3 {
        if pad[a] >= k[a] {
            return Err(Error::shape(
                "conv3d",
                format!("padding {pad:?} must be below the kernel {k:?}"),
            ));
        }
    }
    if d + 2 * pad[0] < kd || h + 2 * pad[1] < kh || wd + 2 * pad[2] < kw {
        return Err(Error::shape(
            "conv3d",
            format!("input {:?} is smaller than the kernel {k:?}", [d, h, wd]),
        ));
    }
    Ok(())
}

/// A stride-1 convolution of the channel-wise concatenation of `inputs`, without
/// materialising the concatenation on the CPU (the inputs are padded a few planes at a time
/// straight into the convolution's buffer); off the CPU the inputs are concatenated and
/// [`conv3d`] is used.
///
/// # Errors
/// As [`conv3d`].
pub fn conv3d_concat(inputs: &[&Tensor], w: &Tensor, pad: [usize; 3]) -> Result<Tensor> {
    conv3d_concat_bias(inputs, w, None, pad)
}

/// [`conv3d_concat`] followed by a per-channel bias (added in the same pass at inference).
///
/// # Errors
/// As [`conv3d`].
pub fn conv3d_concat_bias(
    inputs: &[&Tensor],
    w: &Tensor,
    bias: Option<&Tensor>,
    pad: [usize; 3],
) -> Result<Tensor> {
    let mut all: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
    all.extend([Some(w), bias]);
    let path = ExecPath::of(&all);
    let fast = path == ExecPath::CpuInference
        && inputs.len() > 1
        && inputs
            .iter()
            .all(|t| t.rank() == 5 && t.dim(0).ok() == Some(1));
    if !fast {
        if inputs.len() == 2 && path.is_cpu() {
            let (ca, cb) = (inputs[0].dim(1)?, inputs[1].dim(1)?);
            let (_, wc, _, _, _) = w.dims5()?;
            if wc != ca + cb {
                return Err(Error::shape(
                    "conv3d_concat",
                    format!("{} input channels, weight expects {wc}", ca + cb),
                ));
            }
            let y = inputs[0].contiguous()?.apply_op3(
                &inputs[1].contiguous()?,
                &w.contiguous()?,
                Conv3dConcat2 { pad },
            )?;
            return add_bias(y, bias);
        }
        let cat = Tensor::cat(inputs, 1)?;
        return add_bias(conv3d(&cat, w, pad)?, bias);
    }
    let (_, _, d, h, wd) = inputs[0].dims5()?;
    let contiguous: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    for t in &contiguous {
        let (_, _, td, th, tw) = t.dims5()?;
        if [td, th, tw] != [d, h, wd] {
            return Err(Error::shape(
                "conv3d_concat",
                format!("inputs {:?} and {:?}", inputs[0].dims(), t.dims()),
            ));
        }
    }
    let c: usize = contiguous
        .iter()
        .map(|t| t.dim(1))
        .sum::<candle_core::Result<_>>()?;
    let (o, wc, kd, kh, kw) = w.dims5()?;
    if wc != c {
        return Err(Error::shape(
            "conv3d_concat",
            format!("{c} input channels, weight expects {wc}"),
        ));
    }
    check_conv3d(&contiguous[0].narrow(1, 0, 1)?, &w.narrow(1, 0, 1)?, pad)?;
    let wv = to_f32_vec(w)?;
    let bv = bias.map(to_f32_vec).transpose()?;
    let od = [
        d + 2 * pad[0] + 1 - kd,
        h + 2 * pad[1] + 1 - kh,
        wd + 2 * pad[2] + 1 - kw,
    ];
    let mut out = vec![0f32; o * od.iter().product::<usize>()];
    let refs: Vec<&Tensor> = contiguous.iter().collect();
    with_f32_slices(&refs, |datas| {
        let srcs: Vec<(&[f32], usize)> = datas
            .iter()
            .zip(&contiguous)
            .map(|(v, t)| (*v, t.dim(1).unwrap_or(0)))
            .collect();
        correlate_concat_sample(
            &srcs,
            [d, h, wd],
            pad,
            ConvWeights::Raw(&wv),
            o,
            [kd, kh, kw],
            bv.as_deref(),
            &mut out,
        );
    })?;
    Ok(Tensor::from_vec(
        out,
        (1, o, od[0], od[1], od[2]),
        inputs[0].device(),
    )?)
}

/// The same convolution composed from candle's `conv2d` over depth taps: works on every device
/// and is differentiable through candle; used off the CPU and as a test reference.
///
/// # Errors
/// As [`conv3d`].
pub fn conv3d_composed(x: &Tensor, w: &Tensor, pad: [usize; 3]) -> Result<Tensor> {
    let (n, c, d, h, wd) = x.dims5()?;
    let (o, _, kd, kh, kw) = w.dims5()?;
    if kh != kw || pad[1] != pad[2] {
        return Err(Error::shape(
            "conv3d",
            "the composed path needs kh == kw and equal H/W padding",
        ));
    }
    let xp = x.pad_with_zeros(2, pad[0], pad[0])?;
    let od = d + 2 * pad[0] + 1 - kd;
    let mut acc: Option<Tensor> = None;
    for t in 0..kd {
        let slab = xp
            .narrow(2, t, od)?
            .permute((0, 2, 1, 3, 4))?
            .reshape((n * od, c, h, wd))?;
        let wt = w.narrow(2, t, 1)?.squeeze(2)?.contiguous()?;
        let y = slab.conv2d(&wt, pad[1], 1, 1, 1)?;
        acc = Some(match acc {
            None => y,
            Some(a) => (a + y)?,
        });
    }
    let y = acc.expect("kernel depth is at least 1");
    let (_, _, oh, ow) = y.dims4()?;
    Ok(y.reshape((n, od, o, oh, ow))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()?)
}

/// A convolution whose kernel equals its stride and has no padding (Swin's patch embedding):
/// non-overlapping patches, computed as a reshape and one matmul (differentiable, any device).
///
/// # Shapes
/// `x`: `(N, C, D, H, W)` with each side divisible by the kernel, `w`: `(O, C, kd, kh, kw)` →
/// `(N, O, D/kd, H/kh, W/kw)`.
///
/// # Errors
/// Shape mismatches.
pub fn conv3d_patchify(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, c, d, h, wd) = x.dims5()?;
    let (o, wc, kd, kh, kw) = w.dims5()?;
    if c != wc || d % kd != 0 || h % kh != 0 || wd % kw != 0 {
        return Err(Error::shape(
            "conv3d_patchify",
            format!("input {:?} with weight {:?}", x.dims(), w.dims()),
        ));
    }
    let (pd, ph, pw) = (d / kd, h / kh, wd / kw);
    let patches = x
        .reshape(vec![n, c, pd, kd, ph, kh, pw, kw])?
        .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
        .contiguous()?
        .reshape((n, pd * ph * pw, c * kd * kh * kw))?;
    let wm = w.reshape((o, c * kd * kh * kw))?.t()?;
    let y = patches.broadcast_matmul(&wm)?; // (N, P, O)
    Ok(y.reshape((n, pd, ph, pw, o))?
        .permute((0, 4, 1, 2, 3))?
        .contiguous()?)
}

/// Keeps every `s`-th voxel along each spatial axis, starting at 0 (differentiable).
pub(crate) fn subsample(y: &Tensor, s: usize) -> Result<Tensor> {
    let mut y = y.clone();
    for axis in 2..5 {
        let n = y.dim(axis)?;
        let idx: Vec<u32> = (0..n).step_by(s).map(|i| i as u32).collect();
        let idx = Tensor::from_vec(idx, n.div_ceil(s), y.device())?;
        y = y.index_select(&idx, axis)?;
    }
    Ok(y)
}

/// `y + bias` per channel (axis 1), with a parallel gradient on the CPU.
///
/// # Errors
/// Shape mismatches.
pub fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        None => Ok(y),
        Some(b)
            if y.rank() >= 2
                && ExecPath::of_all(&[&y, b]).is_cpu()
                && b.elem_count() == y.dim(1)? =>
        {
            Ok(y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)?)
        }
        Some(b) => Ok(y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1, 1))?)?),
    }
}
