//! 3-D convolutions: `Conv3d` (any kernel, stride 1, or kernel = stride), and
//! `ConvTranspose3d` with kernel = stride (the 2×2×2 up-sampling of UNETR and the U-Net).
//!
//! On the CPU, a stride-1 convolution is an *implicit GEMM*: the input is zero-padded once, and
//! for each kernel tap the product `W_tap (O×C) · X_shifted (C×positions)` reads the shifted input
//! in place (no im2col copy), accumulating into a cache-sized block of the output. Blocks run in
//! parallel on rayon; each product uses the `gemm` crate's micro-kernels (AVX-512 when the CPU has
//! it). The backward pass is the same kernel on the flipped, transposed weights (input gradient)
//! and a tap-wise `G · X_shiftedᵀ` product (weight gradient). On other devices the convolution is
//! composed from candle's `conv2d` over depth taps, with candle's own gradients.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Module, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Number of output positions per block of the implicit GEMM (times the output channels, this
/// is the block of output kept in cache while the taps accumulate).
fn block_len(out_channels: usize) -> usize {
    let target = (96 * 1024) / out_channels.max(1);
    target.clamp(512, 8192).next_multiple_of(64)
}

pub(crate) fn dims5(l: &Layout, what: &str) -> candle_core::Result<[usize; 5]> {
    match l.dims() {
        &[a, b, c, d, e] => Ok([a, b, c, d, e]),
        other => candle_core::bail!("{what}: expected a 5-D tensor, got shape {other:?}"),
    }
}

/// Runs `f` on the f32 CPU data of `t` (made contiguous first; no copy when it already is).
pub(crate) fn read_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => candle_core::bail!("expected a contiguous f32 CPU tensor"),
    }
}

pub(crate) fn contiguous_f32<'a>(
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

/// Zero-pads one sample to `(C, D+2p, H+2p, W+2p)`; `channel(ci)` gives channel `ci`'s
/// `D·H·W` voxels (so that several tensors can be padded as if concatenated).
fn pad_sample<'a>(
    channel: impl Fn(usize) -> &'a [f32] + Sync,
    c: usize,
    dhw: [usize; 3],
    pad: [usize; 3],
) -> (Vec<f32>, [usize; 3]) {
    let [d, h, w] = dhw;
    let p = [d + 2 * pad[0], h + 2 * pad[1], w + 2 * pad[2]];
    let vp = p[0] * p[1] * p[2];
    // Every element is written once below (borders zeroed, interior copied), so the buffer
    // starts uninitialised instead of being zero-filled and then overwritten.
    let mut out: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(c * vp);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { out.set_len(c * vp) };
    let zero = std::mem::MaybeUninit::new(0f32);
    out.par_chunks_mut(vp).enumerate().for_each(|(ci, dst)| {
        let src = channel(ci);
        for z in 0..p[0] {
            let plane = &mut dst[z * p[1] * p[2]..(z + 1) * p[1] * p[2]];
            if z < pad[0] || z >= pad[0] + d {
                plane.fill(zero);
                continue;
            }
            for y in 0..p[1] {
                let row = &mut plane[y * p[2]..(y + 1) * p[2]];
                if y < pad[1] || y >= pad[1] + h {
                    row.fill(zero);
                    continue;
                }
                row[..pad[2]].fill(zero);
                row[pad[2] + w..].fill(zero);
                let s = ((z - pad[0]) * h + y - pad[1]) * w;
                for (o, v) in row[pad[2]..pad[2] + w].iter_mut().zip(&src[s..s + w]) {
                    o.write(*v);
                }
            }
        }
    });
    // SAFETY: every element was written above; `MaybeUninit<f32>` and `f32` share a layout.
    let out = unsafe {
        let mut out = std::mem::ManuallyDrop::new(out);
        Vec::from_raw_parts(out.as_mut_ptr().cast::<f32>(), out.len(), out.capacity())
    };
    (out, p)
}

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

/// Stride-1 correlation of one padded sample: `out[o, z, y, x] = Σ_c Σ_t w[t][o][c] ·
/// xp[c, z+kd, y+kh, x+kw]`, with `wp` packed as `(taps, O, C)`.
fn correlate_sample(
    xp: &[f32],
    c: usize,
    p: [usize; 3],
    wp: &[f32],
    o: usize,
    k: [usize; 3],
    out: &mut [f32],
) {
    let vp = p[0] * p[1] * p[2];
    let od = [p[0] + 1 - k[0], p[1] + 1 - k[1], p[2] + 1 - k[2]];
    let plane = p[1] * p[2];
    let span = (od[0] - 1) * plane + (od[1] - 1) * p[2] + od[2];
    let taps: Vec<usize> = (0..k[0])
        .flat_map(|a| (0..k[1]).flat_map(move |b| (0..k[2]).map(move |cc| (a, b, cc))))
        .map(|(a, b, cc)| a * plane + b * p[2] + cc)
        .collect();
    let blen = block_len(o);
    let nblocks = span.div_ceil(blen);
    let n_out = od[0] * od[1] * od[2];
    assert_eq!(out.len(), o * n_out);
    let dst = OutPtr(out.as_mut_ptr());
    (0..nblocks).into_par_iter().for_each_init(
        || vec![0f32; o * blen],
        |buf, bi| {
            let q0 = bi * blen;
            let len = blen.min(span - q0);
            for (t, off) in taps.iter().enumerate() {
                // SAFETY: `q0 + off + len - 1 + (c-1)·vp < c·vp` because `span` ends at the
                // last valid output position and every tap offset keeps it inside the padded
                // volume.
                unsafe {
                    gemm::gemm(
                        o,
                        len,
                        c,
                        buf.as_mut_ptr(),
                        1,
                        len as isize,
                        t > 0,
                        wp.as_ptr().add(t * o * c),
                        1,
                        c as isize,
                        xp.as_ptr().add(q0 + off),
                        1,
                        vp as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            // Scatter the valid positions of this block: runs of whole output rows.
            let mut q = q0;
            while q < q0 + len {
                let z = q / plane;
                let y = (q % plane) / p[2];
                let x = q % p[2];
                let run_end = (q - x + p[2]).min(q0 + len);
                if z < od[0] && y < od[1] && x < od[2] {
                    let n = (run_end - q).min(od[2] - x);
                    let base = (z * od[1] + y) * od[2] + x;
                    for oc in 0..o {
                        // SAFETY: (oc, z, y, x..x+n) is written by this block only.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                buf.as_ptr().add(oc * len + (q - q0)),
                                dst.get().add(oc * n_out + base),
                                n,
                            );
                        }
                    }
                }
                q = run_end;
            }
        },
    );
}

/// Packs `(O, C, kd, kh, kw)` weights as `(taps, O, C)`, optionally flipping the taps and
/// swapping O and C (for the input gradient).
fn pack_weights(w: &[f32], o: usize, c: usize, taps: usize, flip_transpose: bool) -> Vec<f32> {
    let mut out = vec![0f32; taps * o * c];
    for oi in 0..o {
        for ci in 0..c {
            for t in 0..taps {
                let v = w[(oi * c + ci) * taps + t];
                if flip_transpose {
                    // New layout: (taps, C as outputs, O as inputs), tap reversed.
                    out[((taps - 1 - t) * c + ci) * o + oi] = v;
                } else {
                    out[(t * o + oi) * c + ci] = v;
                }
            }
        }
    }
    out
}

/// CPU forward of a stride-1 correlation over a batch.
fn correlate(
    x: &[f32],
    xs: [usize; 5],
    wp: &[f32],
    o: usize,
    k: [usize; 3],
    pad: [usize; 3],
) -> (Vec<f32>, [usize; 5]) {
    let [n, c, d, h, w] = xs;
    let od = [
        d + 2 * pad[0] + 1 - k[0],
        h + 2 * pad[1] + 1 - k[1],
        w + 2 * pad[2] + 1 - k[2],
    ];
    let per_out = o * od[0] * od[1] * od[2];
    let per_in = c * d * h * w;
    let mut out = vec![0f32; n * per_out];
    for b in 0..n {
        let sample = &x[b * per_in..(b + 1) * per_in];
        let dhw = d * h * w;
        let (xp, p) = pad_sample(|ci| &sample[ci * dhw..(ci + 1) * dhw], c, [d, h, w], pad);
        correlate_sample(
            &xp,
            c,
            p,
            wp,
            o,
            k,
            &mut out[b * per_out..(b + 1) * per_out],
        );
    }
    (out, [n, o, od[0], od[1], od[2]])
}

/// Weight gradient of a stride-1 correlation: `gw[o, c, t] = Σ_n Σ_pos g[n, o, pos] ·
/// xp[n, c, pos + t]`.
fn weight_grad(
    x: &[f32],
    xs: [usize; 5],
    g: &[f32],
    o: usize,
    k: [usize; 3],
    pad: [usize; 3],
) -> Vec<f32> {
    let [_, c, d, h, w] = xs;
    let per_in = c * d * h * w;
    let dhw = d * h * w;
    weight_grad_with(
        |b, ci| &x[b * per_in + ci * dhw..b * per_in + (ci + 1) * dhw],
        xs,
        g,
        o,
        k,
        pad,
    )
}

/// [`weight_grad`] reading channel `ci` of sample `b` through `channel(b, ci)` (so that the
/// input may be a concatenation that is never materialised).
fn weight_grad_with<'a>(
    channel: impl Fn(usize, usize) -> &'a [f32] + Sync,
    xs: [usize; 5],
    g: &[f32],
    o: usize,
    k: [usize; 3],
    pad: [usize; 3],
) -> Vec<f32> {
    let [n, c, d, h, w] = xs;
    let taps = k[0] * k[1] * k[2];
    let od = [
        d + 2 * pad[0] + 1 - k[0],
        h + 2 * pad[1] + 1 - k[1],
        w + 2 * pad[2] + 1 - k[2],
    ];
    let n_out = od[0] * od[1] * od[2];
    let mut total = vec![0f32; taps * o * c];
    for b in 0..n {
        let (xp, p) = pad_sample(|ci| channel(b, ci), c, [d, h, w], pad);
        let vp = p[0] * p[1] * p[2];
        let plane = p[1] * p[2];
        let span = (od[0] - 1) * plane + (od[1] - 1) * p[2] + od[2];
        // The output gradient laid out on padded positions (zeros where no output exists).
        let mut gp = vec![0f32; o * span];
        let gb = &g[b * o * n_out..(b + 1) * o * n_out];
        gp.par_chunks_mut(span).enumerate().for_each(|(oc, dst)| {
            for z in 0..od[0] {
                for y in 0..od[1] {
                    let s = (oc * od[0] * od[1] + z * od[1] + y) * od[2];
                    let q = z * plane + y * p[2];
                    dst[q..q + od[2]].copy_from_slice(&gb[s..s + od[2]]);
                }
            }
        });
        let offs: Vec<usize> = (0..k[0])
            .flat_map(|a| (0..k[1]).flat_map(move |bb| (0..k[2]).map(move |cc| (a, bb, cc))))
            .map(|(a, bb, cc)| a * plane + bb * p[2] + cc)
            .collect();
        let nchunks = rayon::current_num_threads().max(1);
        let clen = span.div_ceil(nchunks);
        let partials: Vec<Vec<f32>> = (0..nchunks)
            .into_par_iter()
            .filter(|i| i * clen < span)
            .map(|i| {
                let q0 = i * clen;
                let len = clen.min(span - q0);
                let mut acc = vec![0f32; taps * o * c];
                for (t, off) in offs.iter().enumerate() {
                    // SAFETY: as in `correlate_sample`, every read stays in the padded volume.
                    unsafe {
                        gemm::gemm(
                            o,
                            c,
                            len,
                            acc.as_mut_ptr().add(t * o * c),
                            1,
                            c as isize,
                            false,
                            gp.as_ptr().add(q0),
                            1,
                            span as isize,
                            xp.as_ptr().add(q0 + off),
                            vp as isize,
                            1,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
                acc
            })
            .collect();
        for part in partials {
            for (a, v) in total.iter_mut().zip(part) {
                *a += v;
            }
        }
    }
    // (taps, O, C) -> (O, C, taps)
    let mut out = vec![0f32; taps * o * c];
    for t in 0..taps {
        for oi in 0..o {
            for ci in 0..c {
                out[(oi * c + ci) * taps + t] = total[(t * o + oi) * c + ci];
            }
        }
    }
    out
}

/// The CPU body of the correlation ops: `(input, weight)` → output. With `transposed`, the
/// weight is used flipped with its in/out channels swapped (the input gradient).
fn correlate_op(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    pad: [usize; 3],
    transposed: bool,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let xs = dims5(l1, "conv3d input")?;
    let ws = dims5(l2, "conv3d weight")?;
    let x = contiguous_f32(s1, l1, "conv3d input")?;
    let w = contiguous_f32(s2, l2, "conv3d weight")?;
    let k = [ws[2], ws[3], ws[4]];
    let wp = pack_weights(w, ws[0], ws[1], k.iter().product(), transposed);
    let out_channels = if transposed { ws[1] } else { ws[0] };
    let (out, shape) = correlate(x, xs, &wp, out_channels, k, pad);
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
        correlate_op(s1, l1, s2, l2, self.pad, false)
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

/// Adds a per-channel bias to a contiguous `(N, C, ...)` buffer.
fn add_bias_slice(out: &mut [f32], n: usize, c: usize, bias: &[f32]) {
    let m = out.len() / (n * c).max(1);
    out.par_chunks_mut(m.max(1))
        .enumerate()
        .for_each(|(row, r)| r.iter_mut().for_each(|v| *v += bias[row % c]));
}

/// Gradient of a per-channel bias: the output gradient summed over all but the channel axis
/// (rows summed in parallel, in f64, then per channel in row order).
fn bias_grad(grad: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let dims = grad.dims();
    let (n, c) = (dims[0], dims[1]);
    let sums = read_f32(grad, |g| {
        let m = g.len() / (n * c).max(1);
        let rows: Vec<f64> = g
            .par_chunks(m.max(1))
            .map(|r| r.iter().map(|v| f64::from(*v)).sum())
            .collect();
        let mut out = vec![0f64; c];
        for (row, s) in rows.iter().enumerate() {
            out[row % c] += s;
        }
        out.iter().map(|v| *v as f32).collect::<Vec<f32>>()
    })?;
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
        let x = contiguous_f32(s1, l1, "bias add input")?;
        let b = contiguous_f32(s2, l2, "bias")?;
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
        let (st, shape) = correlate_op(s1, l1, s2, l2, self.pad, false)?;
        let b = contiguous_f32(s3, l3, "conv3d bias")?;
        let CpuStorage::F32(mut out) = st else {
            candle_core::bail!("conv3d: f32 output expected")
        };
        let d = shape.dims();
        add_bias_slice(&mut out, d[0], d[1], b);
        Ok((CpuStorage::F32(out), shape))
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
        let a = contiguous_f32(s1, l1, "conv3d concat input")?;
        let b = contiguous_f32(s2, l2, "conv3d concat input")?;
        let w = contiguous_f32(s3, l3, "conv3d weight")?;
        let (o, c) = (ws[0], ca + cb);
        let k = [ws[2], ws[3], ws[4]];
        let wp = pack_weights(w, o, c, k.iter().product(), false);
        let od = [
            d + 2 * self.pad[0] + 1 - k[0],
            h + 2 * self.pad[1] + 1 - k[1],
            wd + 2 * self.pad[2] + 1 - k[2],
        ];
        let dhw = d * h * wd;
        let per_out = o * od[0] * od[1] * od[2];
        let mut out = vec![0f32; n * per_out];
        for s in 0..n {
            let (sa, sb) = (
                &a[s * ca * dhw..(s + 1) * ca * dhw],
                &b[s * cb * dhw..(s + 1) * cb * dhw],
            );
            let channel = |ci: usize| -> &[f32] {
                if ci < ca {
                    &sa[ci * dhw..(ci + 1) * dhw]
                } else {
                    &sb[(ci - ca) * dhw..(ci - ca + 1) * dhw]
                }
            };
            let (xp, p) = pad_sample(channel, c, [d, h, wd], self.pad);
            correlate_sample(
                &xp,
                c,
                p,
                &wp,
                o,
                k,
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
        let gw = read_f32(a, |av| {
            read_f32(b, |bv| {
                read_f32(&grad, |gv| {
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
                })
            })
        })???;
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
        correlate_op(s1, l1, s2, l2, self.pad, true)
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
        let x = contiguous_f32(s1, l1, "conv3d input")?;
        let g = contiguous_f32(s2, l2, "conv3d grad")?;
        let out = weight_grad(x, xs, g, gs[1], self.k, self.pad);
        Ok((
            CpuStorage::F32(out),
            Shape::from(vec![gs[1], xs[1], self.k[0], self.k[1], self.k[2]]),
        ))
    }
}

/// Stride-1 3-D convolution (cross-correlation, as PyTorch) with zero padding `pad` on both
/// sides of each axis, without bias.
///
/// # Shapes
/// `x`: `(N, C, D, H, W)`, `w`: `(O, C, kd, kh, kw)` → `(N, O, D+2p−kd+1, …)`.
///
/// # Errors
/// Shape mismatches, a padding of `k` or more, or a non-f32 CPU tensor.
pub fn conv3d(x: &Tensor, w: &Tensor, pad: [usize; 3]) -> Result<Tensor> {
    check_conv3d(x, w, pad)?;
    match x.device() {
        Device::Cpu => {
            let x = x.to_dtype(DType::F32)?.contiguous()?;
            let w = w.to_dtype(DType::F32)?.contiguous()?;
            Ok(x.apply_op2(&w, Conv3dS1 { pad })?)
        }
        _ => conv3d_composed(x, w, pad),
    }
}

/// The shape checks of [`conv3d`].
fn check_conv3d(x: &Tensor, w: &Tensor, pad: [usize; 3]) -> Result<()> {
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
/// materialising the concatenation on the CPU at inference (the inputs are padded straight
/// into the convolution's buffer); elsewhere, and for batches or tracked tensors, the inputs
/// are concatenated and [`conv3d`] is used.
///
/// # Errors
/// As [`conv3d`].
pub fn conv3d_concat(inputs: &[&Tensor], w: &Tensor, pad: [usize; 3]) -> Result<Tensor> {
    let fast = inputs.len() > 1
        && crate::layers::fused::fusable(&[Some(w)])
        && inputs.iter().all(|t| {
            crate::layers::fused::fusable(&[Some(*t)]) && t.rank() == 5 && t.dim(0).ok() == Some(1)
        });
    if !fast {
        if inputs.len() == 2
            && crate::layers::fused::cpu_f32(&[Some(inputs[0]), Some(inputs[1]), Some(w)])
        {
            let (ca, cb) = (inputs[0].dim(1)?, inputs[1].dim(1)?);
            let (_, wc, _, _, _) = w.dims5()?;
            if wc != ca + cb {
                return Err(Error::shape(
                    "conv3d_concat",
                    format!("{} input channels, weight expects {wc}", ca + cb),
                ));
            }
            return Ok(inputs[0].contiguous()?.apply_op3(
                &inputs[1].contiguous()?,
                &w.contiguous()?,
                Conv3dConcat2 { pad },
            )?);
        }
        let cat = Tensor::cat(inputs, 1)?;
        return conv3d(&cat, w, pad);
    }
    let (_, _, d, h, wd) = inputs[0].dims5()?;
    let mut chans = Vec::new();
    let contiguous: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    // Borrow the inputs' storage (no copies): read guards held while the padding is made.
    let guards: Vec<_> = contiguous.iter().map(|t| t.storage_and_layout()).collect();
    let mut datas: Vec<&[f32]> = Vec::new();
    for (t, (storage, layout)) in contiguous.iter().zip(&guards) {
        let (_, c, td, th, tw) = t.dims5()?;
        if [td, th, tw] != [d, h, wd] {
            return Err(Error::shape(
                "conv3d_concat",
                format!("inputs {:?} and {:?}", inputs[0].dims(), t.dims()),
            ));
        }
        chans.push(c);
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::shape("conv3d_concat", "not contiguous"))?;
        match &**storage {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => datas.push(&v[a..b]),
            _ => return Err(Error::shape("conv3d_concat", "expected f32 CPU tensors")),
        }
    }
    let c: usize = chans.iter().sum();
    let (o, wc, kd, kh, kw) = w.dims5()?;
    if wc != c {
        return Err(Error::shape(
            "conv3d_concat",
            format!("{c} input channels, weight expects {wc}"),
        ));
    }
    let k = [kd, kh, kw];
    let wv = w.flatten_all()?.to_vec1::<f32>()?;
    let wp = pack_weights(&wv, o, c, kd * kh * kw, false);
    let dhw = d * h * wd;
    let channel = |ci: usize| -> &[f32] {
        let mut ci = ci;
        for (t, cn) in chans.iter().enumerate() {
            if ci < *cn {
                return &datas[t][ci * dhw..(ci + 1) * dhw];
            }
            ci -= cn;
        }
        unreachable!("channel index within the total")
    };
    let (xp, p) = pad_sample(channel, c, [d, h, wd], pad);
    drop(datas);
    drop(guards);
    let od = [p[0] + 1 - kd, p[1] + 1 - kh, p[2] + 1 - kw];
    let mut out = vec![0f32; o * od.iter().product::<usize>()];
    correlate_sample(&xp, c, p, &wp, o, k, &mut out);
    drop(xp);
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
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    let wv = w.flatten_all()?.to_vec1::<f32>()?;
    let bv = bias
        .map(|b| b.flatten_all().and_then(|b| b.to_vec1::<f32>()))
        .transpose()?;
    let out = conv_transpose_slices(&xv, [n, ci, d, h, wd], &wv, co, [kd, kh, kw], bv.as_deref());
    Ok(Tensor::from_vec(
        out,
        (n, co, d * kd, h * kh, wd * kw),
        x.device(),
    )?)
}

/// The body of [`conv_transpose_cpu`] on buffers.
fn conv_transpose_slices(
    xv: &[f32],
    xs: [usize; 5],
    wv: &[f32],
    co: usize,
    k: [usize; 3],
    bv: Option<&[f32]>,
) -> Vec<f32> {
    let [n, ci, d, h, wd] = xs;
    let [kd, kh, kw] = k;
    let taps = kd * kh * kw;
    // Pack as (taps, Co, Ci).
    let mut wp = vec![0f32; taps * co * ci];
    for i in 0..ci {
        for o in 0..co {
            for t in 0..taps {
                wp[(t * co + o) * ci + i] = wv[(i * co + o) * taps + t];
            }
        }
    }
    let v_in = d * h * wd;
    let (d2, h2, w2) = (d * kd, h * kh, wd * kw);
    let v_out = d2 * h2 * w2;
    let mut out = vec![0f32; n * co * v_out];
    let blen = block_len(co).min(v_in.max(1));
    for b in 0..n {
        let xs = &xv[b * ci * v_in..(b + 1) * ci * v_in];
        let dst = OutPtr(out[b * co * v_out..].as_mut_ptr());
        (0..v_in.div_ceil(blen)).into_par_iter().for_each_init(
            || vec![0f32; co * blen],
            |buf, bi| {
                let q0 = bi * blen;
                let len = blen.min(v_in - q0);
                for t in 0..taps {
                    // SAFETY: reads stay inside `xs` (rows of length v_in, columns q0..q0+len).
                    unsafe {
                        gemm::gemm(
                            co,
                            len,
                            ci,
                            buf.as_mut_ptr(),
                            1,
                            len as isize,
                            false,
                            wp.as_ptr().add(t * co * ci),
                            1,
                            ci as isize,
                            xs.as_ptr().add(q0),
                            1,
                            v_in as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    let (a, bb, c) = (t / (kh * kw), (t / kw) % kh, t % kw);
                    for o in 0..co {
                        let bias_o = bv.map_or(0.0, |v| v[o]);
                        for r in 0..len {
                            let q = q0 + r;
                            let (z, y, xx) = (q / (h * wd), (q / wd) % h, q % wd);
                            let oi = ((o * d2 + kd * z + a) * h2 + kh * y + bb) * w2 + kw * xx + c;
                            // SAFETY: (o, position, tap) maps to a unique output element.
                            unsafe { *dst.get().add(oi) = buf[o * len + r] + bias_o };
                        }
                    }
                }
            },
        );
    }
    out
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
        let x = contiguous_f32(s1, l1, "conv_transpose3d input")?;
        let w = contiguous_f32(s2, l2, "conv_transpose3d weight")?;
        let b = contiguous_f32(s3, l3, "conv_transpose3d bias")?;
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

/// Keeps every `s`-th voxel along each spatial axis, starting at 0 (differentiable).
fn subsample(y: &Tensor, s: usize) -> Result<Tensor> {
    let mut y = y.clone();
    for axis in 2..5 {
        let n = y.dim(axis)?;
        let idx: Vec<u32> = (0..n).step_by(s).map(|i| i as u32).collect();
        let idx = Tensor::from_vec(idx, n.div_ceil(s), y.device())?;
        y = y.index_select(&idx, axis)?;
    }
    Ok(y)
}

fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        None => Ok(y),
        Some(b)
            if y.rank() >= 2
                && crate::layers::fused::cpu_f32(&[Some(&y), Some(b)])
                && b.elem_count() == y.dim(1)? =>
        {
            Ok(y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)?)
        }
        Some(b) => Ok(y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1, 1))?)?),
    }
}

/// PyTorch's `Conv3d` for the configurations the Universal Model uses: stride 1 with any
/// kernel and padding, or stride = kernel without padding.
#[derive(Debug, Clone)]
pub struct Conv3d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl Conv3d {
    /// A convolution from its weight `(O, C, k, k, k)` and optional bias `(O)`.
    ///
    /// Stride 1 runs the implicit-GEMM kernel; a stride equal to the kernel without padding
    /// is a patch projection (one matmul); any other stride computes the stride-1 result and
    /// keeps every `stride`-th voxel (exact, but it spends `stride³` times the work).
    ///
    /// # Errors
    /// [`Error::Shape`] for a stride of 0 or a padding not below the kernel.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let (_, _, kd, kh, kw) = weight.dims5()?;
        let patch = stride == kd && stride == kh && stride == kw && padding == 0;
        if stride == 0 || (!patch && padding >= kd.min(kh).min(kw)) {
            return Err(Error::shape(
                "Conv3d",
                format!(
                    "stride {stride} with kernel {:?} and padding {padding} is not supported",
                    [kd, kh, kw]
                ),
            ));
        }
        Ok(Conv3d {
            weight,
            bias,
            padding,
            stride,
        })
    }

    /// Loads `weight` (and `bias` when `bias` is set) from a var builder, with kernel `k`.
    ///
    /// # Errors
    /// Missing tensors or wrong shapes.
    pub fn load(
        vb: candle_nn::VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        padding: usize,
        stride: usize,
        bias: bool,
    ) -> Result<Self> {
        let bound = 1.0 / ((cin * k * k * k) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((cout, cin, k, k, k), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", init)?)
        } else {
            None
        };
        Self::new(weight, bias, padding, stride)
    }

    /// The weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Multiply-accumulate count for an input of spatial size `dhw` (per sample).
    pub fn macs(&self, dhw: [usize; 3]) -> u64 {
        let (o, c, kd, kh, kw) = self.weight.dims5().unwrap_or((0, 0, 0, 0, 0));
        let out: usize = dhw.iter().map(|s| s / self.stride).product();
        (o * c * kd * kh * kw * out) as u64
    }
}

impl Conv3d {
    /// The convolution of the channel-wise concatenation of `inputs` (stride 1), without
    /// materialising it at inference (see [`conv3d_concat`]).
    ///
    /// # Errors
    /// Shape mismatches, or a stride other than 1.
    pub fn forward_concat(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        if self.stride != 1 {
            return Err(Error::shape("Conv3d", "forward_concat needs stride 1"));
        }
        add_bias(
            conv3d_concat(inputs, &self.weight, [self.padding; 3])?,
            self.bias.as_ref(),
        )
    }
}

impl Module for Conv3d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, kd, kh, kw) = self.weight.dims5()?;
        let s = self.stride;
        if s == 1
            && let Some(b) = &self.bias
            && crate::layers::fused::cpu_f32(&[Some(x), Some(&self.weight), Some(b)])
        {
            // Convolution and bias in one operation.
            check_conv3d(x, &self.weight, [self.padding; 3]).map_err(candle_core::Error::wrap)?;
            return x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &b.contiguous()?,
                Conv3dS1Bias {
                    pad: [self.padding; 3],
                },
            );
        }
        let y = if s == 1 {
            conv3d(x, &self.weight, [self.padding; 3])
        } else if s == kd && s == kh && s == kw && self.padding == 0 {
            conv3d_patchify(x, &self.weight)
        } else {
            conv3d(x, &self.weight, [self.padding; 3]).and_then(|y| subsample(&y, s))
        };
        let y = y.map_err(candle_core::Error::wrap)?;
        add_bias(y, self.bias.as_ref()).map_err(candle_core::Error::wrap)
    }
}

/// PyTorch's `ConvTranspose3d(cin, cout, k, stride=k)`.
#[derive(Debug, Clone)]
pub struct ConvTranspose3d {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl ConvTranspose3d {
    /// Loads `weight` `(cin, cout, k, k, k)` and optional `bias`.
    ///
    /// # Errors
    /// Missing tensors or wrong shapes.
    pub fn load(
        vb: candle_nn::VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        bias: bool,
    ) -> Result<Self> {
        let bound = 1.0 / ((cout * k * k * k) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((cin, cout, k, k, k), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", init)?)
        } else {
            None
        };
        Ok(ConvTranspose3d { weight, bias })
    }
}

impl Module for ConvTranspose3d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if crate::layers::fused::fusable(&[Some(x), Some(&self.weight), self.bias.as_ref()]) {
            return conv_transpose_cpu(x, &self.weight, self.bias.as_ref())
                .map_err(candle_core::Error::wrap);
        }
        if let Some(b) = &self.bias
            && crate::layers::fused::cpu_f32(&[Some(x), Some(&self.weight), Some(b)])
        {
            let (_, ci, _, _, _) = x.dims5()?;
            let (wci, _, kd, kh, kw) = self.weight.dims5()?;
            if ci != wci || kd * kh * kw == 0 {
                candle_core::bail!(
                    "conv_transpose3d: input has {ci} channels, weight expects {wci}"
                );
            }
            return x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &b.contiguous()?,
                ConvTransposeKS,
            );
        }
        let y = conv_transpose3d_k_eq_s(x, &self.weight).map_err(candle_core::Error::wrap)?;
        add_bias(y, self.bias.as_ref()).map_err(candle_core::Error::wrap)
    }
}
