//! CPU kernels on plain slices: no candle tensors, no autograd, one concern per file.
//!
//! Layouts are PyTorch's, contiguous, `f32`: `(N, C, D, H, W)` with `W` fastest. The custom
//! operations of [`crate::ops`] call these kernels on the storage of their tensors; nothing
//! here knows about devices or gradients. Work is spread over rayon's pool.

pub(crate) mod attention;
pub(crate) mod bf16;
pub(crate) mod bias;
pub(crate) mod channels_last;
pub(crate) mod conv_transpose;
pub(crate) mod correlate;
pub(crate) mod elementwise;
pub(crate) mod head;
pub(crate) mod norm;
pub(crate) mod pool;
pub(crate) mod weight_grad;
pub(crate) mod winograd;

use std::mem::MaybeUninit;

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every task writes a disjoint set of output elements.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// An uninitialised `f32` buffer of `n` elements (every element is written before it is read).
pub(crate) fn uninit_vec(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { v.set_len(n) };
    v
}

/// Reinterprets a fully written buffer as `f32`s.
///
/// # Safety
/// Every element of `v` must have been written.
pub(crate) unsafe fn assume_init_slice(v: &[MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: the caller guarantees initialisation; the layouts are identical.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<f32>(), v.len()) }
}

/// Turns a fully written buffer into a `Vec<f32>` without copying.
///
/// # Safety
/// Every element of `v` must have been written.
pub(crate) unsafe fn assume_init_vec(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: the caller guarantees initialisation; `MaybeUninit<f32>` and `f32` share a
    // layout, so pointer, length and capacity carry over.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// `dst (m×n) = lhs (m×k) · rhs (k×n)`, or `+=` when `accumulate`, on the calling thread with
/// the `gemm` crate's micro-kernels. Each matrix is given by its pointer and its
/// `[row stride, column stride]` in elements.
///
/// # Safety
/// Every element the strides reach, `m×k` of `lhs`, `k×n` of `rhs` and `m×n` of `dst`, must be
/// valid (and `dst`'s not aliased by the inputs).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    [dst_rs, dst_cs]: [usize; 2],
    accumulate: bool,
    lhs: *const f32,
    [lhs_rs, lhs_cs]: [usize; 2],
    rhs: *const f32,
    [rhs_rs, rhs_cs]: [usize; 2],
) {
    // SAFETY: the caller guarantees the extents; `gemm` computes
    // dst = alpha·dst (read only when `accumulate`) + beta·lhs·rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The offsets of the taps of a `k` kernel in a padded volume whose planes are `p[1] × p[2]`.
pub(crate) fn tap_offsets(k: [usize; 3], p: [usize; 3]) -> Vec<usize> {
    let plane = p[1] * p[2];
    (0..k[0])
        .flat_map(|a| (0..k[1]).flat_map(move |b| (0..k[2]).map(move |c| (a, b, c))))
        .map(|(a, b, c)| a * plane + b * p[2] + c)
        .collect()
}
