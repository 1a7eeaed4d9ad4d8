//! Fused CPU kernels for inference: normalisation + affine + activation in one pass, and the
//! dynamic head evaluated voxel by voxel without materialising its hidden layers.
//!
//! They are used when every input lives on the CPU as `f32` and none is tracked by autograd;
//! otherwise the callers fall back to the composed, differentiable versions. Statistics are
//! accumulated in `f64` with a two-pass (mean, then squared deviations) scheme.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::layers::conv::OutPtr;

/// Which statistics a normalisation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// Per channel over the batch and all voxels (batch statistics).
    Batch,
    /// Per (sample, channel) over the voxels.
    Instance,
    /// Per (sample, group of channels) over their voxels.
    Group(usize),
}

/// The activation applied after the normalisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    /// None.
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `max(x, slope·x)`.
    LeakyRelu(f32),
}

impl Act {
    #[inline(always)]
    pub(crate) fn apply(self, v: f32) -> f32 {
        match self {
            Act::Identity => v,
            Act::Relu => v.max(0.0),
            Act::LeakyRelu(s) => {
                if v >= 0.0 {
                    v
                } else {
                    v * s
                }
            }
        }
    }

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

/// `true` when the fused CPU kernels may run on these tensors.
pub(crate) fn fusable(ts: &[Option<&Tensor>]) -> bool {
    ts.iter()
        .flatten()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && !t.track_op())
}

/// `true` when the tensors are f32 on the CPU (the trainable fused operations apply).
pub(crate) fn cpu_f32(ts: &[Option<&Tensor>]) -> bool {
    ts.iter()
        .flatten()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

pub(crate) fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Statistics of a normalisation over a contiguous `(N, C, M)` buffer: the group of each
/// `(sample, channel)` row, and per group the mean and `1/sqrt(var + eps)` (f64, two passes).
pub(crate) struct NormStats {
    pub(crate) c: usize,
    pub(crate) m: usize,
    pub(crate) kind: NormKind,
    pub(crate) mean: Vec<f64>,
    pub(crate) inv: Vec<f64>,
    pub(crate) count: Vec<usize>,
}

impl NormStats {
    #[inline]
    pub(crate) fn group_of(&self, row: usize) -> usize {
        let (s, ch) = (row / self.c, row % self.c);
        match self.kind {
            NormKind::Batch => ch,
            NormKind::Instance => row,
            NormKind::Group(g) => s * g + ch / (self.c / g),
        }
    }

    /// `(scale, shift)` that normalise row `row` and apply the channel's affine `w`, `b`.
    #[inline]
    fn row_affine(&self, row: usize, w: Option<&[f32]>, b: Option<&[f32]>) -> (f32, f32) {
        let g = self.group_of(row);
        let ch = row % self.c;
        let scale = self.inv[g] * w.map_or(1.0, |w| f64::from(w[ch]));
        let shift = b.map_or(0.0, |b| f64::from(b[ch])) - self.mean[g] * scale;
        (scale as f32, shift as f32)
    }

    pub(crate) fn compute(data: &[f32], n: usize, c: usize, kind: NormKind, eps: f64) -> Self {
        let m = data.len() / (n * c).max(1);
        let ngroups = match kind {
            NormKind::Batch => c,
            NormKind::Instance => n * c,
            NormKind::Group(g) => n * g,
        };
        let mut st = NormStats {
            c,
            m,
            kind,
            mean: vec![0.0; ngroups],
            inv: vec![0.0; ngroups],
            count: vec![0; ngroups],
        };
        let sums: Vec<f64> = data
            .par_chunks(m.max(1))
            .map(|r| r.iter().map(|v| f64::from(*v)).sum())
            .collect();
        let mut gsum = vec![0f64; ngroups];
        for (row, s) in sums.iter().enumerate() {
            let g = st.group_of(row);
            gsum[g] += s;
            st.count[g] += m;
        }
        for g in 0..ngroups {
            st.mean[g] = gsum[g] / st.count[g].max(1) as f64;
        }
        let sq: Vec<f64> = data
            .par_chunks(m.max(1))
            .enumerate()
            .map(|(row, r)| {
                let mu = st.mean[st.group_of(row)];
                r.iter().map(|v| (f64::from(*v) - mu).powi(2)).sum()
            })
            .collect();
        let mut gsq = vec![0f64; ngroups];
        for (row, s) in sq.iter().enumerate() {
            gsq[st.group_of(row)] += s;
        }
        for g in 0..ngroups {
            st.inv[g] = 1.0 / (gsq[g] / st.count[g].max(1) as f64 + eps).sqrt();
        }
        st
    }
}

/// Normalisation + per-channel affine + activation of a contiguous `(N, C, M)` buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_act_slice(
    data: &[f32],
    n: usize,
    c: usize,
    kind: NormKind,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f64,
    act: Act,
) -> Vec<f32> {
    let st = NormStats::compute(data, n, c, kind, eps);
    let m = st.m.max(1);
    let mut out = vec![0f32; data.len()];
    out.par_chunks_mut(m)
        .zip(data.par_chunks(m))
        .enumerate()
        .for_each(|(row, (o, r))| {
            let (scale, shift) = st.row_affine(row, w, b);
            for (ov, v) in o.iter_mut().zip(r) {
                *ov = act.apply(v * scale + shift);
            }
        });
    out
}

/// [`norm_act_slice`] overwriting its input.
#[allow(clippy::too_many_arguments)]
fn norm_act_in_place(
    data: &mut [f32],
    n: usize,
    c: usize,
    kind: NormKind,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f64,
    act: Act,
) {
    let st = NormStats::compute(data, n, c, kind, eps);
    data.par_chunks_mut(st.m.max(1))
        .enumerate()
        .for_each(|(row, r)| {
            let (scale, shift) = st.row_affine(row, w, b);
            for v in r.iter_mut() {
                *v = act.apply(*v * scale + shift);
            }
        });
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
pub(crate) fn norm_act_cpu_owned(
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
        w: weight.map(f32_vec).transpose()?,
        b: bias.map(f32_vec).transpose()?,
        eps,
        act,
    };
    x.inplace_op1(&op)?;
    Ok(x)
}

/// Normalisation (+ per-channel affine) + activation in one pass over a contiguous
/// `(N, C, ...)` f32 CPU tensor.
pub(crate) fn norm_act_cpu(
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
    let w = weight.map(f32_vec).transpose()?;
    let b = bias.map(f32_vec).transpose()?;
    let out = {
        let (storage, layout) = x.storage_and_layout();
        let data = match &*storage {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v,
            _ => return Err(Error::shape("norm", "expected f32 CPU storage")),
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::shape("norm", "not contiguous"))?;
        norm_act_slice(
            &data[start..end],
            n,
            c,
            kind,
            w.as_deref(),
            b.as_deref(),
            eps,
            act,
        )
    };
    Ok(Tensor::from_vec(out, dims, x.device())?)
}

/// Logits of the dynamic head for one sample: `features` `(8, V)`, `params` `(K, 153)` →
/// `(K, V)`.
pub(crate) fn head_sample(f: &[f32], v: usize, p: &[f32], k: usize, out: &mut [f32]) {
    const CHUNK: usize = 1024;
    // Parallel over voxel chunks; each chunk computes every class.
    let nchunks = v.div_ceil(CHUNK);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..nchunks).into_par_iter().for_each(|ci| {
        let v0 = ci * CHUNK;
        let len = CHUNK.min(v - v0);
        let mut feats = [[0f32; CHUNK]; 8];
        for (c, row) in feats.iter_mut().enumerate() {
            row[..len].copy_from_slice(&f[c * v + v0..c * v + v0 + len]);
        }
        let mut dst = vec![0f32; len];
        for cls in 0..k {
            let pk = &p[cls * 153..(cls + 1) * 153];
            head_chunk(&feats, len, pk, &mut dst);
            // SAFETY: chunks cover disjoint voxel ranges of each class row.
            unsafe {
                std::ptr::copy_nonoverlapping(dst.as_ptr(), ptr.get().add(cls * v + v0), len);
            }
        }
    });
}

#[inline(always)]
fn head_chunk_generic(feats: &[[f32; 1024]; 8], len: usize, p: &[f32], dst: &mut [f32]) {
    let (w1, w2, w3) = (&p[0..64], &p[64..128], &p[128..136]);
    let (b1, b2, b3) = (&p[136..144], &p[144..152], p[152]);
    const L: usize = 16;
    let mut i = 0;
    while i < len {
        let n = L.min(len - i);
        let mut x = [[0f32; L]; 8];
        for c in 0..8 {
            x[c][..n].copy_from_slice(&feats[c][i..i + n]);
        }
        let mut h1 = [[0f32; L]; 8];
        for j in 0..8 {
            let mut acc = [b1[j]; L];
            for c in 0..8 {
                let wv = w1[8 * j + c];
                for l in 0..L {
                    acc[l] += wv * x[c][l];
                }
            }
            for l in 0..L {
                h1[j][l] = acc[l].max(0.0);
            }
        }
        let mut o = [b3; L];
        for j in 0..8 {
            let mut acc = [b2[j]; L];
            for c in 0..8 {
                let wv = w2[8 * j + c];
                for l in 0..L {
                    acc[l] += wv * h1[c][l];
                }
            }
            let wv = w3[j];
            for l in 0..L {
                o[l] += wv * acc[l].max(0.0);
            }
        }
        dst[i..i + n].copy_from_slice(&o[..n]);
        i += n;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn head_chunk_avx512(feats: &[[f32; 1024]; 8], len: usize, p: &[f32], dst: &mut [f32]) {
    head_chunk_generic(feats, len, p, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_chunk_avx2(feats: &[[f32; 1024]; 8], len: usize, p: &[f32], dst: &mut [f32]) {
    head_chunk_generic(feats, len, p, dst)
}

fn head_chunk(feats: &[[f32; 1024]; 8], len: usize, p: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the enabled features.
            return unsafe { head_chunk_avx512(feats, len, p, dst) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { head_chunk_avx2(feats, len, p, dst) };
        }
    }
    head_chunk_generic(feats, len, p, dst)
}

/// The dynamic head on the CPU without intermediate tensors: `features` `(B, 8, D, H, W)`,
/// `params` `(B, K, 153)` → `(B, K, D, H, W)`.
pub(crate) fn dynamic_head_cpu(features: &Tensor, params: &Tensor) -> Result<Tensor> {
    let (b, _, d, h, w) = features.dims5()?;
    let (_, k, _) = params.dims3()?;
    let v = d * h * w;
    let f = f32_vec(features)?;
    let p = f32_vec(params)?;
    let mut out = vec![0f32; b * k * v];
    for i in 0..b {
        head_sample(
            &f[i * 8 * v..(i + 1) * 8 * v],
            v,
            &p[i * k * 153..(i + 1) * k * 153],
            k,
            &mut out[i * k * v..(i + 1) * k * v],
        );
    }
    Ok(Tensor::from_vec(out, (b, k, d, h, w), features.device())?)
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
        let act = self.0;
        x[a1..e1]
            .par_chunks_mut(1 << 16)
            .zip(r[a2..e2].par_chunks(1 << 16))
            .for_each(|(xs, rs)| {
                for (v, r) in xs.iter_mut().zip(rs) {
                    *v = act.apply(*v + r);
                }
            });
        Ok(())
    }
}

/// `act(x + r)`, written over `x` at inference on the CPU when `x` is ours alone (a tensor the
/// caller has just produced and shares with no one); otherwise composed.
///
/// # Errors
/// Shape mismatches or tensor errors.
pub(crate) fn add_act_owned(x: Tensor, r: &Tensor, act: Act) -> Result<Tensor> {
    if fusable(&[Some(&x), Some(r)]) && x.is_contiguous() && x.shape() == r.shape() {
        let r = r.contiguous()?;
        x.inplace_op2(&r, &AddActInPlace(act))?;
        return Ok(x);
    }
    act.apply_tensor((x + r)?)
}
