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

/// Default of [`set_slab_bytes`]: the padded copy of a whole full-resolution U-Net decoder
/// input would be 0.7 GB.
pub const DEFAULT_SLAB_BYTES: usize = 96 << 20;

static SLAB_BYTES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_SLAB_BYTES);

/// Sets how many bytes of zero-padded input a CPU convolution builds at once (per sample; at
/// least the planes one output plane needs). The input is padded and convolved block of
/// planes by block of planes, so this bounds the convolution's extra memory; results do not
/// depend on it. Process-wide; the default is [`DEFAULT_SLAB_BYTES`].
pub fn set_slab_bytes(bytes: usize) {
    SLAB_BYTES.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// An uninitialised `f32` buffer of `n` elements (every element is written before it is read).
fn uninit_vec(n: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { v.set_len(n) };
    v
}

/// Reinterprets a fully written buffer as `f32`s.
///
/// # Safety
/// Every element of `v` must have been written.
unsafe fn assume_init_slice(v: &[std::mem::MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: the caller guarantees initialisation; the layouts are identical.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<f32>(), v.len()) }
}

/// Writes the zero-padded planes `pz0..pz0+np` (in padded depth coordinates) of `c` channels
/// into `dst` `(C, np, H+2p, W+2p)`; `plane(ci, z)` gives the `H·W` voxels of plane `z` of
/// channel `ci` (so that several tensors, or planes computed on the fly, can be padded as if
/// they were one concatenated tensor). Every element of `dst` is written.
#[allow(clippy::too_many_arguments)]
fn pad_planes<'a>(
    plane: impl Fn(usize, usize) -> &'a [f32] + Sync,
    c: usize,
    dhw: [usize; 3],
    pad: [usize; 3],
    pz0: usize,
    np: usize,
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    let [d, h, w] = dhw;
    let (p1, p2) = (h + 2 * pad[1], w + 2 * pad[2]);
    let slab = np * p1 * p2;
    assert_eq!(dst.len(), c * slab);
    let zero = std::mem::MaybeUninit::new(0f32);
    dst.par_chunks_mut(p1 * p2)
        .enumerate()
        .for_each(|(i, out)| {
            let (ci, pz) = (i / np, pz0 + i % np);
            if pz < pad[0] || pz >= pad[0] + d {
                out.fill(zero);
                return;
            }
            let src = plane(ci, pz - pad[0]);
            for y in 0..p1 {
                let row = &mut out[y * p2..(y + 1) * p2];
                if y < pad[1] || y >= pad[1] + h {
                    row.fill(zero);
                    continue;
                }
                row[..pad[2]].fill(zero);
                row[pad[2] + w..].fill(zero);
                let s = (y - pad[1]) * w;
                for (o, v) in row[pad[2]..pad[2] + w].iter_mut().zip(&src[s..s + w]) {
                    o.write(*v);
                }
            }
        });
}

/// Zero-pads one whole sample to `(C, D+2p, H+2p, W+2p)`; `channel(ci)` gives channel `ci`'s
/// `D·H·W` voxels.
fn pad_sample<'a>(
    channel: impl Fn(usize) -> &'a [f32] + Sync,
    c: usize,
    dhw: [usize; 3],
    pad: [usize; 3],
) -> (Vec<f32>, [usize; 3]) {
    let [d, h, w] = dhw;
    let p = [d + 2 * pad[0], h + 2 * pad[1], w + 2 * pad[2]];
    let mut out = uninit_vec(c * p[0] * p[1] * p[2]);
    let hw = h * w;
    pad_planes(
        |ci, z| &channel(ci)[z * hw..(z + 1) * hw],
        c,
        dhw,
        pad,
        0,
        p[0],
        &mut out,
    );
    // SAFETY: `pad_planes` wrote every element; `MaybeUninit<f32>` and `f32` share a layout.
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

/// Stride-1 correlation of one padded block of planes: `out[o, z, y, x] = b[o] + Σ_c Σ_t
/// w[t][o][c] · xp[c, z+kd, y+kh, x+kw]`, with `wp` packed as `(taps, O, C)`. Output channel
/// `o` starts at `out[o · cstride]` (the block may be a run of planes of a larger output).
#[allow(clippy::too_many_arguments)]
fn correlate_sample(
    xp: &[f32],
    c: usize,
    p: [usize; 3],
    wp: &[f32],
    o: usize,
    k: [usize; 3],
    bias: Option<&[f32]>,
    out: &mut [f32],
    cstride: usize,
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
    assert!(xp.len() == c * vp && cstride >= n_out && out.len() >= (o - 1) * cstride + n_out);
    let dst = OutPtr(out.as_mut_ptr());
    (0..nblocks).into_par_iter().for_each_init(
        || vec![0f32; o * blen],
        |buf, bi| {
            let q0 = bi * blen;
            let len = blen.min(span - q0);
            for (t, off) in taps.iter().enumerate() {
                // SAFETY: `q0 + off + len - 1 + (c-1)·vp < c·vp` because `span` ends at the
                // last valid output position and every tap offset keeps it inside the padded
                // block.
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
                        let src = &buf[oc * len + (q - q0)..][..n];
                        // SAFETY: (oc, z, y, x..x+n) is written by this block only, and lies
                        // inside `out` (checked above).
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(dst.get().add(oc * cstride + base), n)
                        };
                        match bias {
                            Some(b) => {
                                let bo = b[oc];
                                for (d, s) in dst.iter_mut().zip(src) {
                                    *d = s + bo;
                                }
                            }
                            None => dst.copy_from_slice(src),
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

/// A stride-1 correlation of one sample whose zero-padded input is made a few planes at a
/// time: `fill(pz0, np, dst)` writes padded planes `pz0..pz0+np` of all `c` channels (see
/// [`pad_planes`]) and the output planes they determine are computed before the next block,
/// so at most about [`set_slab_bytes`] of padded input exist at once. `out` is `(O, D', H', W')`.
#[allow(clippy::too_many_arguments)]
fn correlate_chunked(
    c: usize,
    dhw: [usize; 3],
    pad: [usize; 3],
    wp: &[f32],
    o: usize,
    k: [usize; 3],
    bias: Option<&[f32]>,
    out: &mut [f32],
    mut fill: impl FnMut(usize, usize, &mut [std::mem::MaybeUninit<f32>]),
) {
    let p = [
        dhw[0] + 2 * pad[0],
        dhw[1] + 2 * pad[1],
        dhw[2] + 2 * pad[2],
    ];
    let od = [p[0] + 1 - k[0], p[1] + 1 - k[1], p[2] + 1 - k[2]];
    let (plane_out, n_out) = (od[1] * od[2], od[0] * od[1] * od[2]);
    let per_plane = (c * p[1] * p[2] * 4).max(1);
    let budget = SLAB_BYTES.load(std::sync::atomic::Ordering::Relaxed);
    let planes = (budget / per_plane).max(k[0] + 1);
    let step = (planes + 1 - k[0]).clamp(1, od[0]);
    let mut slab = uninit_vec(c * (step + k[0] - 1) * p[1] * p[2]);
    for oz0 in (0..od[0]).step_by(step) {
        let t = step.min(od[0] - oz0);
        let np = t + k[0] - 1;
        let buf = &mut slab[..c * np * p[1] * p[2]];
        fill(oz0, np, buf);
        // SAFETY: `fill` writes every element of its buffer.
        let xp = unsafe { assume_init_slice(buf) };
        correlate_sample(
            xp,
            c,
            [np, p[1], p[2]],
            wp,
            o,
            k,
            bias,
            &mut out[oz0 * plane_out..],
            n_out,
        );
    }
}

/// CPU forward of a stride-1 correlation (plus an optional bias) over a batch.
fn correlate(
    x: &[f32],
    xs: [usize; 5],
    wp: &[f32],
    o: usize,
    k: [usize; 3],
    pad: [usize; 3],
    bias: Option<&[f32]>,
) -> (Vec<f32>, [usize; 5]) {
    let [n, c, d, h, w] = xs;
    let od = [
        d + 2 * pad[0] + 1 - k[0],
        h + 2 * pad[1] + 1 - k[1],
        w + 2 * pad[2] + 1 - k[2],
    ];
    let per_out = o * od[0] * od[1] * od[2];
    let per_in = c * d * h * w;
    let (dhw, hw) = (d * h * w, h * w);
    let mut out = vec![0f32; n * per_out];
    for b in 0..n {
        let sample = &x[b * per_in..(b + 1) * per_in];
        correlate_chunked(
            c,
            [d, h, w],
            pad,
            wp,
            o,
            k,
            bias,
            &mut out[b * per_out..(b + 1) * per_out],
            |pz0, np, dst| {
                pad_planes(
                    |ci, z| &sample[ci * dhw + z * hw..ci * dhw + (z + 1) * hw],
                    c,
                    [d, h, w],
                    pad,
                    pz0,
                    np,
                    dst,
                )
            },
        );
    }
    (out, [n, o, od[0], od[1], od[2]])
}

/// [`correlate_chunked`] of one sample over the channel-wise concatenation of `srcs`
/// (each `(data, channels)`, `data` being `(C_i, D, H, W)`), never materialised.
#[allow(clippy::too_many_arguments)]
fn correlate_concat_sample(
    srcs: &[(&[f32], usize)],
    dhw: [usize; 3],
    pad: [usize; 3],
    wp: &[f32],
    o: usize,
    k: [usize; 3],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let c: usize = srcs.iter().map(|s| s.1).sum();
    let (vol, hw) = (dhw[0] * dhw[1] * dhw[2], dhw[1] * dhw[2]);
    let plane = |ci: usize, z: usize| -> &[f32] {
        let mut ci = ci;
        for (data, cn) in srcs {
            if ci < *cn {
                return &data[ci * vol + z * hw..ci * vol + (z + 1) * hw];
            }
            ci -= cn;
        }
        unreachable!("channel index within the total")
    };
    correlate_chunked(c, dhw, pad, wp, o, k, bias, out, |pz0, np, dst| {
        pad_planes(plane, c, dhw, pad, pz0, np, dst)
    });
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
    bias: Option<&[f32]>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let xs = dims5(l1, "conv3d input")?;
    let ws = dims5(l2, "conv3d weight")?;
    let x = contiguous_f32(s1, l1, "conv3d input")?;
    let w = contiguous_f32(s2, l2, "conv3d weight")?;
    let k = [ws[2], ws[3], ws[4]];
    let wp = pack_weights(w, ws[0], ws[1], k.iter().product(), transposed);
    let out_channels = if transposed { ws[1] } else { ws[0] };
    let (out, shape) = correlate(x, xs, &wp, out_channels, k, pad, bias);
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
        let b = contiguous_f32(s3, l3, "conv3d bias")?;
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
            correlate_concat_sample(
                &[
                    (&a[s * ca * dhw..(s + 1) * ca * dhw], ca),
                    (&b[s * cb * dhw..(s + 1) * cb * dhw], cb),
                ],
                [d, h, wd],
                self.pad,
                &wp,
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
        correlate_op(s1, l1, s2, l2, self.pad, true, None)
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
fn conv3d_concat_bias(
    inputs: &[&Tensor],
    w: &Tensor,
    bias: Option<&Tensor>,
    pad: [usize; 3],
) -> Result<Tensor> {
    let fast = inputs.len() > 1
        && crate::layers::fused::fusable(&[Some(w), bias])
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
    let wv = w.flatten_all()?.to_vec1::<f32>()?;
    let wp = pack_weights(&wv, o, c, kd * kh * kw, false);
    let bv = bias
        .map(|b| b.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    let od = [
        d + 2 * pad[0] + 1 - kd,
        h + 2 * pad[1] + 1 - kh,
        wd + 2 * pad[2] + 1 - kw,
    ];
    let mut out = vec![0f32; o * od.iter().product::<usize>()];
    with_f32_slices(&contiguous, |datas| {
        let srcs: Vec<(&[f32], usize)> = datas
            .iter()
            .zip(&contiguous)
            .map(|(v, t)| (*v, t.dim(1).unwrap_or(0)))
            .collect();
        correlate_concat_sample(
            &srcs,
            [d, h, wd],
            pad,
            &wp,
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

/// Runs `f` on the f32 CPU data of contiguous tensors, borrowed in place (read guards held
/// while `f` runs; no copies).
fn with_f32_slices<R>(ts: &[Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut datas: Vec<&[f32]> = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::shape("conv3d", "expected contiguous tensors"))?;
        match &**storage {
            candle_core::Storage::Cpu(CpuStorage::F32(v)) => datas.push(&v[a..b]),
            _ => return Err(Error::shape("conv3d", "expected f32 CPU tensors")),
        }
    }
    Ok(f(&datas))
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
    let wp = pack_transpose_weights(wv, ci, co, k);
    let v_in = d * h * wd;
    let v_out = v_in * k[0] * k[1] * k[2];
    let mut out = vec![0f32; n * co * v_out];
    for b in 0..n {
        conv_transpose_planes(
            &xv[b * ci * v_in..(b + 1) * ci * v_in],
            [ci, d, h, wd],
            &wp,
            co,
            k,
            bv,
            0..d,
            &mut out[b * co * v_out..(b + 1) * co * v_out],
        );
    }
    out
}

/// Packs `(Ci, Co, kd, kh, kw)` transposed-convolution weights as `(taps, Co, Ci)`.
fn pack_transpose_weights(wv: &[f32], ci: usize, co: usize, k: [usize; 3]) -> Vec<f32> {
    let taps = k[0] * k[1] * k[2];
    let mut wp = vec![0f32; taps * co * ci];
    for i in 0..ci {
        for o in 0..co {
            for t in 0..taps {
                wp[(t * co + o) * ci + i] = wv[(i * co + o) * taps + t];
            }
        }
    }
    wp
}

/// The transposed convolution (kernel = stride) of input planes `zs` of one sample `xs`
/// `(Ci, D, H, W)`: writes output planes `zs.start·kd .. zs.end·kd` into `out`
/// `(Co, len(zs)·kd, H·kh, W·kw)`, every element once. `wp` is packed by
/// [`pack_transpose_weights`].
#[allow(clippy::too_many_arguments)]
fn conv_transpose_planes(
    xs: &[f32],
    dims: [usize; 4],
    wp: &[f32],
    co: usize,
    k: [usize; 3],
    bv: Option<&[f32]>,
    zs: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let [ci, d, h, wd] = dims;
    let [kd, kh, kw] = k;
    let taps = kd * kh * kw;
    let v_in = d * h * wd;
    let (d2, h2, w2) = (zs.len() * kd, h * kh, wd * kw);
    assert_eq!(out.len(), co * d2 * h2 * w2);
    let (q_lo, q_hi) = (zs.start * h * wd, zs.end * h * wd);
    let blen = block_len(co).min((q_hi - q_lo).max(1));
    let dst = OutPtr(out.as_mut_ptr());
    (0..(q_hi - q_lo).div_ceil(blen))
        .into_par_iter()
        .for_each_init(
            || vec![0f32; co * blen],
            |buf, bi| {
                let q0 = q_lo + bi * blen;
                let len = blen.min(q_hi - q0);
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
                            let (z, y, xx) = (q / (h * wd) - zs.start, (q / wd) % h, q % wd);
                            let oi = ((o * d2 + kd * z + a) * h2 + kh * y + bb) * w2 + kw * xx + c;
                            // SAFETY: (o, position, tap) maps to a unique output element.
                            unsafe { *dst.get().add(oi) = buf[o * len + r] + bias_o };
                        }
                    }
                }
            },
        );
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
        conv3d_concat_bias(inputs, &self.weight, self.bias.as_ref(), [self.padding; 3])
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

impl ConvTranspose3d {
    /// `conv([self(x) ‖ skip])` (stride-1 `conv` over the channel-wise concatenation of the
    /// up-sampled `x` and `skip`) for one sample at inference on the CPU, without materialising
    /// the up-sampled map: its planes are computed a few at a time, as the convolution's padded
    /// input needs them. `None` when the fused path does not apply (tracked tensors, another
    /// device, a batch, a strided `conv`); the caller then composes the two operations.
    ///
    /// # Errors
    /// Shape mismatches between `x`, `skip` and the two weights.
    pub fn forward_into_concat_conv(
        &self,
        x: &Tensor,
        skip: &Tensor,
        conv: &Conv3d,
    ) -> Result<Option<Tensor>> {
        use crate::layers::fused::fusable;
        if conv.stride != 1
            || !fusable(&[Some(x), Some(skip), Some(&self.weight), self.bias.as_ref()])
            || !fusable(&[Some(&conv.weight), conv.bias.as_ref()])
            || x.rank() != 5
            || skip.rank() != 5
            || x.dim(0)? != 1
            || skip.dim(0)? != 1
        {
            return Ok(None);
        }
        let (_, ci, d, h, wd) = x.dims5()?;
        let (wci, co, kd, kh, kw) = self.weight.dims5()?;
        let (_, cs, sd, sh, sw) = skip.dims5()?;
        let (o, cc, ckd, ckh, ckw) = conv.weight.dims5()?;
        let up = [d * kd, h * kh, wd * kw];
        if wci != ci || up != [sd, sh, sw] || cc != co + cs {
            return Err(Error::shape(
                "up-convolution + convolution",
                format!(
                    "input {:?} with weight {:?}, skip {:?}, convolution weight {:?}",
                    x.dims(),
                    self.weight.dims(),
                    skip.dims(),
                    conv.weight.dims()
                ),
            ));
        }
        let pad = [conv.padding; 3];
        check_conv3d(&skip.narrow(1, 0, 1)?, &conv.weight.narrow(1, 0, 1)?, pad)?;
        let wt = pack_transpose_weights(&f32_of(&self.weight)?, ci, co, [kd, kh, kw]);
        let bt = self.bias.as_ref().map(f32_of).transpose()?;
        let k = [ckd, ckh, ckw];
        let wp = pack_weights(&f32_of(&conv.weight)?, o, cc, k.iter().product(), false);
        let bc = conv.bias.as_ref().map(f32_of).transpose()?;
        let od = [
            up[0] + 2 * pad[0] + 1 - k[0],
            up[1] + 2 * pad[1] + 1 - k[1],
            up[2] + 2 * pad[2] + 1 - k[2],
        ];
        let mut out = vec![0f32; o * od.iter().product::<usize>()];
        let (x, skip) = (x.contiguous()?, skip.contiguous()?);
        let (hw, vol) = (up[1] * up[2], up[0] * up[1] * up[2]);
        with_f32_slices(&[x, skip], |datas| {
            let (xv, sv) = (datas[0], datas[1]);
            // Up-sampled planes of the current block, reused from block to block.
            let mut planes: Vec<f32> = Vec::new();
            correlate_chunked(
                cc,
                up,
                pad,
                &wp,
                o,
                k,
                bc.as_deref(),
                &mut out,
                |pz0, np, dst| {
                    let zlo = pz0.saturating_sub(pad[0]).min(up[0]);
                    let zhi = (pz0 + np).saturating_sub(pad[0]).min(up[0]);
                    let (iz0, iz1) = (zlo / kd, zhi.div_ceil(kd));
                    let nloc = (iz1 - iz0) * kd;
                    planes.resize(co * nloc * hw, 0.0);
                    if iz1 > iz0 {
                        conv_transpose_planes(
                            xv,
                            [ci, d, h, wd],
                            &wt,
                            co,
                            [kd, kh, kw],
                            bt.as_deref(),
                            iz0..iz1,
                            &mut planes,
                        );
                    }
                    let planes = &planes;
                    pad_planes(
                        |c, z| {
                            if c < co {
                                let zl = z - iz0 * kd;
                                &planes[(c * nloc + zl) * hw..(c * nloc + zl + 1) * hw]
                            } else {
                                let c = c - co;
                                &sv[c * vol + z * hw..c * vol + (z + 1) * hw]
                            }
                        },
                        cc,
                        up,
                        pad,
                        pz0,
                        np,
                        dst,
                    )
                },
            );
        })?;
        Ok(Some(Tensor::from_vec(
            out,
            (1, o, od[0], od[1], od[2]),
            &Device::Cpu,
        )?))
    }
}

/// The values of a tensor as a flat `Vec<f32>`.
fn f32_of(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}
