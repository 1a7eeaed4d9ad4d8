//! Tensor operations on candle tensors, each choosing its execution path once, through
//! [`ExecPath`]: the CPU kernels of `crate::cpu` at inference, the same kernels inside candle
//! custom operations with their own backward passes for training on the CPU, and compositions
//! of candle operations elsewhere (any device, candle's autograd).
//!
//! Every operation takes and returns tensors in PyTorch's `(N, C, D, H, W)` layout.

pub mod conv;
pub mod conv_transpose;
pub mod elementwise;
pub mod head;
pub mod linear;
pub mod norm;
pub mod pool;

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};

pub use crate::cpu::elementwise::Act;
pub use crate::cpu::norm::NormKind;
pub use conv::{conv3d, conv3d_composed, conv3d_concat, conv3d_patchify};
pub use conv_transpose::conv_transpose3d_k_eq_s;
pub use elementwise::{gelu, leaky_relu, relu};
pub use head::{dynamic_head, dynamic_head_composed};
pub use linear::linear_matmul;
pub use norm::{batch_norm_batch_stats, group_norm, instance_norm, layer_norm, norm_act};
pub use pool::{adaptive_avg_pool3d_1, max_pool3d_2};

/// How an operation runs on a set of tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecPath {
    /// Every tensor is `f32` on the CPU and none is tracked by autograd: the fused CPU kernels,
    /// without keeping anything for a backward pass.
    CpuInference,
    /// Every tensor is `f32` on the CPU and one at least is tracked: the CPU kernels as candle
    /// custom operations with their own (recomputing) backward passes.
    CpuTraining,
    /// Anything else (another device or dtype): candle operations, candle's autograd.
    Composed,
}

impl ExecPath {
    /// The path for these tensors (`None` entries, such as an absent bias, are skipped).
    pub fn of(ts: &[Option<&Tensor>]) -> Self {
        let ts = || ts.iter().flatten();
        if !ts().all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32) {
            ExecPath::Composed
        } else if ts().any(|t| t.track_op()) {
            ExecPath::CpuTraining
        } else {
            ExecPath::CpuInference
        }
    }

    /// [`of`](Self::of) for tensors that are all present.
    pub fn of_all(ts: &[&Tensor]) -> Self {
        let opt: Vec<Option<&Tensor>> = ts.iter().map(|t| Some(*t)).collect();
        Self::of(&opt)
    }

    /// `true` for the two CPU paths (the custom operations apply).
    pub fn is_cpu(self) -> bool {
        !matches!(self, ExecPath::Composed)
    }
}

/// Runs `f` on the `f32` CPU data of `ts`, borrowed in place: each tensor is made contiguous
/// first (no copy when it already is) and read guards are held while `f` runs.
///
/// # Errors
/// A tensor that is not `f32` on the CPU.
pub fn with_f32_slices<R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> R,
) -> candle_core::Result<R> {
    let owned: Vec<Tensor> = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut datas: Vec<&[f32]> = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("expected a contiguous tensor")
        };
        match &**storage {
            Storage::Cpu(CpuStorage::F32(v)) => datas.push(&v[a..b]),
            _ => candle_core::bail!("expected an f32 CPU tensor"),
        }
    }
    Ok(f(&datas))
}

/// The values of a tensor as a flat `Vec<f32>` (a copy, converted from any dtype).
///
/// # Errors
/// Tensor errors.
pub fn to_f32_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// The `f32` data of a contiguous CPU storage, as a custom operation's `cpu_fwd` receives it
/// (`what` names the operand in the error).
///
/// # Errors
/// Another dtype, or a non-contiguous layout.
pub fn storage_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{what}: only f32 is supported on the CPU"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// The five dimensions of a layout.
pub(crate) fn dims5(l: &Layout, what: &str) -> candle_core::Result<[usize; 5]> {
    match l.dims() {
        &[a, b, c, d, e] => Ok([a, b, c, d, e]),
        other => candle_core::bail!("{what}: expected a 5-D tensor, got shape {other:?}"),
    }
}
