//! `x · Wᵀ`, the product of a `Linear` layer: in bf16 on the CPU when a bf16 kernel is active
//! (see [`crate::runtime::set_precision`]) and the layer is at least 16 wide on both sides,
//! else candle's f32 matmul. The bf16 forward has an f32 backward (the gradients of the f32
//! product), so training keeps f32 gradients.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::cpu::bf16::{self, Bf16Kernel, Runner};
use crate::ops::{ExecPath, storage_f32};

/// `x (T×C) · w (O×C)ᵀ` → `(T×O)`.
///
/// # Errors
/// Shape or device errors from candle.
pub fn linear_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (_, c) = x.dims2()?;
    let (o, _) = w.dims2()?;
    match bf16::active_bf16_kernel() {
        Some(kernel) if ExecPath::of_all(&[x, w]).is_cpu() && bf16::applies(c, o) => x
            .contiguous()?
            .apply_op2(&w.contiguous()?, LinearBf16 { kernel }),
        _ => x.matmul(&w.t()?),
    }
}

/// The bf16 product as a candle custom op on `(x, w)`.
#[derive(Debug, Clone, Copy)]
struct LinearBf16 {
    kernel: Bf16Kernel,
}

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "univ-linear-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (&[t, c], &[o, c2]) = (l1.dims(), l2.dims()) else {
            candle_core::bail!(
                "linear: expected 2-D operands, got {:?} and {:?}",
                l1.dims(),
                l2.dims()
            )
        };
        if c != c2 {
            candle_core::bail!("linear: {c} input features against a weight of {c2}");
        }
        let x = storage_f32(s1, l1, "linear input")?;
        let w = storage_f32(s2, l2, "linear weight")?;
        let runner = Runner::Kernel(self.kernel);
        let out = if crate::cpu::channels_last::uses_cl(runner) {
            crate::cpu::channels_last::linear(runner, x, t, c, w, o)
        } else {
            bf16::linear(runner, x, t, c, w, o)
        };
        Ok((CpuStorage::F32(out), Shape::from((t, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gx = grad.matmul(w)?;
        let gw = grad.t()?.matmul(x)?;
        Ok((Some(gx), Some(gw)))
    }
}
