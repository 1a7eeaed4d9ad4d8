//! Pooling: `MaxPool3d(2)` with PyTorch's gradient (to the first maximum of each window) and
//! `AdaptiveAvgPool3d(1)`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use crate::cpu::pool::{max_pool2_grad, max_windows};
use crate::error::{Error, Result};
use crate::ops::{ExecPath, dims5, storage_f32};

struct MaxPool2;

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "univ-max-pool3d-2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims5(l, "max_pool3d")?;
        let vals = max_windows(storage_f32(s, l, "max_pool3d")?, d);
        Ok((
            CpuStorage::F32(vals),
            Shape::from(vec![d[0], d[1], d[2] / 2, d[3] / 2, d[4] / 2]),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &MaxPool2Grad)?,
        ))
    }
}

struct MaxPool2Grad;

impl CustomOp2 for MaxPool2Grad {
    fn name(&self) -> &'static str {
        "univ-max-pool3d-2-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = dims5(l1, "max_pool3d")?;
        let x = storage_f32(s1, l1, "max_pool3d")?;
        let g = storage_f32(s2, l2, "max_pool3d")?;
        let out = max_pool2_grad(x, d, g);
        Ok((CpuStorage::F32(out), Shape::from(d.to_vec())))
    }
}

/// `MaxPool3d(kernel_size=2, stride=2)`; odd trailing voxels are dropped, as in PyTorch.
///
/// # Shapes
/// `(N, C, D, H, W)` → `(N, C, D/2, H/2, W/2)`.
///
/// # Errors
/// Non-5-D input or a side below 2.
pub fn max_pool3d_2(x: &Tensor) -> Result<Tensor> {
    let (n, c, d, h, w) = x.dims5()?;
    if d < 2 || h < 2 || w < 2 {
        return Err(Error::shape(
            "max_pool3d",
            format!("input {:?} is too small", x.dims()),
        ));
    }
    let x = if d % 2 + h % 2 + w % 2 > 0 {
        x.narrow(2, 0, d / 2 * 2)?
            .narrow(3, 0, h / 2 * 2)?
            .narrow(4, 0, w / 2 * 2)?
    } else {
        x.clone()
    };
    match ExecPath::of_all(&[&x]) {
        ExecPath::CpuInference | ExecPath::CpuTraining => {
            Ok(x.contiguous()?.apply_op1(MaxPool2)?)
        }
        ExecPath::Composed => Ok(x
            .reshape(vec![n, c, d / 2, 2, h / 2, 2, w / 2, 2])?
            .max(7)?
            .max(5)?
            .max(3)?),
    }
}

/// `AdaptiveAvgPool3d(1)`: the mean over all voxels, keeping singleton spatial axes.
///
/// # Shapes
/// `(N, C, D, H, W)` → `(N, C, 1, 1, 1)`.
///
/// # Errors
/// Non-5-D input.
pub fn adaptive_avg_pool3d_1(x: &Tensor) -> Result<Tensor> {
    let (n, c, _, _, _) = x.dims5()?;
    Ok(x.reshape((n, c, ()))?
        .mean_keepdim(2)?
        .unsqueeze(3)?
        .unsqueeze(4)?)
}
