//! Activations on tensors, and the residual add + activation written in place at inference.

use candle_core::Tensor;

use crate::cpu::elementwise::{Act, add_act_in_place};
use crate::error::Result;
use crate::ops::{ExecPath, with_f32_slices};

impl Act {
    /// Applies the activation to a tensor with candle operations (differentiable).
    ///
    /// # Errors
    /// Tensor errors.
    pub fn apply_tensor(self, x: Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::Identity => x,
            Act::Relu => x.relu()?,
            Act::LeakyRelu(s) => x.maximum(&(&x * f64::from(s))?)?,
        })
    }
}

/// `LeakyReLU(negative_slope)`: `max(x, slope·x)` for slopes in `[0, 1]`.
///
/// # Errors
/// Never for valid tensors.
pub fn leaky_relu(x: &Tensor, negative_slope: f64) -> Result<Tensor> {
    Ok(x.maximum(&(x * negative_slope)?)?)
}

/// `ReLU`.
///
/// # Errors
/// Never for valid tensors.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.relu()?)
}

/// The exact (erf) GELU, PyTorch's `nn.GELU()`.
///
/// # Errors
/// Never for valid tensors.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if ExecPath::of_all(&[x]) != ExecPath::CpuInference {
        return Ok(x.gelu_erf()?);
    }
    // At inference on the CPU: the vectorised, parallel kernel into a new buffer (within
    // 3e-7·max(1, |x|) of candle's scalar erf).
    let mut out = vec![0f32; x.elem_count()];
    with_f32_slices(&[x], |xs| {
        crate::cpu::elementwise::gelu_into(xs[0], &mut out)
    })?;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

/// `x ← act(x + r)`, element by element, as a candle in-place operation.
struct AddActInPlace(Act);

impl candle_core::InplaceOp2 for AddActInPlace {
    fn name(&self) -> &'static str {
        "add-act-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (Some((a1, e1)), Some((a2, e2))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add-act: not contiguous")
        };
        let (candle_core::CpuStorage::F32(x), candle_core::CpuStorage::F32(r)) = (s1, s2) else {
            candle_core::bail!("add-act: expected f32 CPU storage")
        };
        add_act_in_place(&mut x[a1..e1], &r[a2..e2], self.0);
        Ok(())
    }
}

/// `act(x + r)`, written over `x` at inference on the CPU when `x` is ours alone (a tensor the
/// caller has just produced and shares with no one); otherwise composed.
///
/// # Errors
/// Shape mismatches or tensor errors.
pub(crate) fn add_act_owned(x: Tensor, r: &Tensor, act: Act) -> Result<Tensor> {
    if ExecPath::of_all(&[&x, r]) == ExecPath::CpuInference
        && x.is_contiguous()
        && x.shape() == r.shape()
    {
        let r = r.contiguous()?;
        x.inplace_op2(&r, &AddActInPlace(act))?;
        return Ok(x);
    }
    act.apply_tensor((x + r)?)
}
