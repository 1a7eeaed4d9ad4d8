//! Stride-1 3-D convolutions and both of their gradients through cuDNN's N-d convolution
//! (`cudnnConvolutionForward`, `…BackwardData`, `…BackwardFilter` on 5-D descriptors), in f32,
//! bf16 or f16 with f32 accumulation.
//!
//! f32 runs with `CUDNN_FMA_MATH`: true f32 products, never TF32, so that f32 results stay
//! within the parity tolerances of the official code (cuDNN's default math on Ampere and later
//! GPUs, like PyTorch's default for convolutions, rounds the operands to TF32's 10-bit
//! mantissa). bf16 and f16 use the tensor cores.
//!
//! cuDNN 9 (`libcudnn.so.9`) is linked dynamically: the loader finds it on the GPU machine
//! (PyTorch's `nvidia-cudnn-cu13` wheel carries one).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor, sys,
};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::{CudaDType, DeviceId};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, WithDType};

use super::geometry::Geometry;

/// Which of the three convolution passes to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pass {
    /// `(input, weight)` → output.
    Forward,
    /// `(output gradient, weight)` → input gradient.
    BackwardData,
    /// `(input, output gradient)` → weight gradient.
    BackwardFilter,
}

impl Pass {
    /// The dimensions of what this pass writes.
    fn out_dims(self, g: &Geometry) -> [usize; 5] {
        match self {
            Pass::Forward => g.y(),
            Pass::BackwardData => g.x,
            Pass::BackwardFilter => g.w,
        }
    }
}

thread_local! {
    /// cuDNN handles, one per device and thread (a handle is neither `Send` nor `Sync`).
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

fn cudnn_err(
    what: &str,
) -> impl Fn(candle_core::cuda::cudarc::cudnn::CudnnError) -> candle_core::Error + '_ {
    move |e| candle_core::Error::Cuda(format!("cuDNN {what}: {e:?}").into())
}

fn handle(dev: &CudaDevice) -> candle_core::Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream()).map_err(cudnn_err(
            "could not start (libcudnn.so.9 must be on the library path)",
        ))?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

fn dims_i32(d: [usize; 5]) -> candle_core::Result<[i32; 5]> {
    let mut out = [0i32; 5];
    for (o, &v) in out.iter_mut().zip(&d) {
        *o = i32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!("conv3d: dimension {v} is too large for cuDNN"))
        })?;
    }
    Ok(out)
}

fn contiguous_strides(d: [i32; 5]) -> [i32; 5] {
    let mut s = [1i32; 5];
    for a in (0..4).rev() {
        s[a] = s[a + 1] * d[a + 1];
    }
    s
}

/// The descriptors of one convolution with elements `T` and f32 accumulation.
struct Descriptors<T> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
}

fn descriptors<T: CudnnDataType>(
    cudnn: &Arc<Cudnn>,
    g: &Geometry,
    dtype: DType,
) -> candle_core::Result<Descriptors<T>> {
    let e = cudnn_err("descriptor");
    let pad = g.pad.map(|p| p as i32);
    let mut conv = cudnn
        .create_convnd::<f32>(
            &pad,
            &[1, 1, 1],
            &[1, 1, 1],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(&e)?;
    let math = if dtype == DType::F32 {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    };
    conv.set_math_type(math).map_err(&e)?;
    let xd = dims_i32(g.x)?;
    let yd = dims_i32(g.y())?;
    let x = cudnn
        .create_nd_tensor::<T>(&xd, &contiguous_strides(xd))
        .map_err(&e)?;
    let y = cudnn
        .create_nd_tensor::<T>(&yd, &contiguous_strides(yd))
        .map_err(&e)?;
    let w = cudnn
        .create_nd_filter::<T>(sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, &dims_i32(g.w)?)
        .map_err(&e)?;
    Ok(Descriptors { conv, x, w, y })
}

/// The elements of a contiguous operand, from its layout's offset.
fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: expected a contiguous tensor")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

fn run_typed<T>(
    pass: Pass,
    g: &Geometry,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    dtype: DType,
) -> candle_core::Result<CudaStorage>
where
    T: CudnnDataType + CudaDType + DeviceRepr + ValidAsZeroBits + WithDType,
{
    let dev = s1.device.clone();
    let cudnn = handle(&dev)?;
    let d = descriptors::<T>(&cudnn, g, dtype)?;
    let a = view::<T>(s1, l1, "conv3d")?;
    let b = view::<T>(s2, l2, "conv3d")?;
    let one = (T::from_f64(1.0), T::from_f64(0.0));
    let out_dims = pass.out_dims(g);
    let mut out: CudaSlice<T> = dev.alloc_zeros::<T>(out_dims.iter().product())?;
    let e = cudnn_err(match pass {
        Pass::Forward => "convolution forward",
        Pass::BackwardData => "convolution backward data",
        Pass::BackwardFilter => "convolution backward filter",
    });
    match pass {
        Pass::Forward => {
            let op = ConvForward {
                conv: &d.conv,
                x: &d.x,
                w: &d.w,
                y: &d.y,
            };
            let algo = op.pick_algorithm().map_err(&e)?;
            let mut ws = dev.alloc_zeros::<u8>(op.get_workspace_size(algo).map_err(&e)?)?;
            // SAFETY: the descriptors describe `a` (input), `b` (weight) and `out` exactly.
            unsafe { op.launch(algo, Some(&mut ws), one, &a, &b, &mut out) }.map_err(&e)?;
        }
        Pass::BackwardData => {
            let op = ConvBackwardData {
                conv: &d.conv,
                dx: &d.x,
                w: &d.w,
                dy: &d.y,
            };
            let algo = op.pick_algorithm().map_err(&e)?;
            let mut ws = dev.alloc_zeros::<u8>(op.get_workspace_size(algo).map_err(&e)?)?;
            // SAFETY: `a` is the output gradient, `b` the weight, `out` the input gradient.
            unsafe { op.launch(algo, Some(&mut ws), one, &mut out, &b, &a) }.map_err(&e)?;
        }
        Pass::BackwardFilter => {
            let op = ConvBackwardFilter {
                conv: &d.conv,
                x: &d.x,
                dw: &d.w,
                dy: &d.y,
            };
            let algo = op.pick_algorithm().map_err(&e)?;
            let mut ws = dev.alloc_zeros::<u8>(op.get_workspace_size(algo).map_err(&e)?)?;
            // SAFETY: `a` is the input, `b` the output gradient, `out` the weight gradient.
            unsafe { op.launch(algo, Some(&mut ws), one, &a, &mut out, &b) }.map_err(&e)?;
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Runs one convolution pass on two CUDA operands of the same dtype (f32, bf16 or f16): for
/// [`Pass::Forward`] `(input, weight)`, for [`Pass::BackwardData`] `(output gradient,
/// weight)`, for [`Pass::BackwardFilter`] `(input, output gradient)`. Returns the result and
/// its shape.
pub(crate) fn run(
    pass: Pass,
    g: &Geometry,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dtype = a.0.dtype();
    if b.0.dtype() != dtype {
        candle_core::bail!(
            "conv3d: operands of different dtypes ({dtype:?} and {:?})",
            b.0.dtype()
        );
    }
    let out = match dtype {
        DType::F32 => run_typed::<f32>(pass, g, a, b, dtype)?,
        DType::BF16 => run_typed::<half::bf16>(pass, g, a, b, dtype)?,
        DType::F16 => run_typed::<half::f16>(pass, g, a, b, dtype)?,
        other => candle_core::bail!("conv3d on CUDA: {other:?} is not supported (f32, bf16, f16)"),
    };
    let dims = pass.out_dims(g);
    Ok((out, Shape::from(dims.to_vec())))
}
