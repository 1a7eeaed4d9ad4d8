//! The stride-1 3-D correlation as an *implicit GEMM*: the input is zero-padded a block of
//! planes at a time, and for each kernel tap the product `W_tap (O×C) · X_shifted
//! (C×positions)` reads the shifted input in place (no im2col copy), accumulating into a
//! cache-sized block of the output. Blocks run in parallel on rayon; each product uses the
//! `gemm` crate's micro-kernels (AVX-512 when the CPU has it). The input gradient is the same
//! kernel on flipped, transposed weights ([`pack_weights`] with `flip_transpose`).

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::cpu::{OutPtr, assume_init_slice, assume_init_vec, matmul, tap_offsets, uninit_vec};

/// Number of output positions per block of the implicit GEMM (times the output channels, this
/// is the block of output kept in cache while the taps accumulate).
pub(crate) fn block_len(out_channels: usize) -> usize {
    let target = (96 * 1024) / out_channels.max(1);
    target.clamp(512, 8192).next_multiple_of(64)
}

/// Default of [`set_slab_bytes`]: the padded copy of a whole full-resolution U-Net decoder
/// input would be 0.7 GB.
pub const DEFAULT_SLAB_BYTES: usize = 96 << 20;

static SLAB_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_SLAB_BYTES);

/// Sets how many bytes of zero-padded input a CPU convolution builds at once (per sample; at
/// least the planes one output plane needs). The input is padded and convolved block of
/// planes by block of planes, so this bounds the convolution's extra memory; results do not
/// depend on it. Process-wide; the default is [`DEFAULT_SLAB_BYTES`].
pub fn set_slab_bytes(bytes: usize) {
    SLAB_BYTES.store(bytes, Ordering::Relaxed);
}

/// Writes the zero-padded planes `pz0..pz0+np` (in padded depth coordinates) of `c` channels
/// into `dst` `(C, np, H+2p, W+2p)`; `plane(ci, z)` gives the `H·W` voxels of plane `z` of
/// channel `ci` (so that several tensors, or planes computed on the fly, can be padded as if
/// they were one concatenated tensor). Every element of `dst` is written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pad_planes<'a>(
    plane: impl Fn(usize, usize) -> &'a [f32] + Sync,
    c: usize,
    dhw: [usize; 3],
    pad: [usize; 3],
    pz0: usize,
    np: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    let [d, h, w] = dhw;
    let (p1, p2) = (h + 2 * pad[1], w + 2 * pad[2]);
    let slab = np * p1 * p2;
    assert_eq!(dst.len(), c * slab);
    let zero = MaybeUninit::new(0f32);
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

/// Where [`pad_into`] writes the zero-padded planes: f32 `(C, np, H+2p, W+2p)` as
/// [`pad_planes`] does, or the bf16 channel pairs of [`crate::cpu::bf16`] straight from the
/// source (no f32 copy).
pub(crate) enum PadDst<'a> {
    /// f32 planes, every element written.
    F32(&'a mut [MaybeUninit<f32>]),
    /// bf16 pairs `(C'/2, np, H+2p, W+2p)` plus the kernels' slack, `C'` = `c_pad`; resized
    /// and every word written.
    Pairs {
        /// The pair buffer (reused between slabs).
        dst: &'a mut Vec<u32>,
        /// The channel count rounded up to 32.
        c_pad: usize,
    },
    /// bf16 pairs blocked channels-last `(C'/32, np, H+2p, W+2p, 16)` for the AMX kernel
    /// ([`crate::cpu::channels_last::pad_pairs_cl`]); resized and every word written.
    PairsCl {
        /// The pair buffer (reused between slabs).
        dst: &'a mut crate::cpu::channels_last::Lines,
        /// The channel count rounded up to 32.
        c_pad: usize,
    },
}

/// [`pad_planes`] into either kind of [`PadDst`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn pad_into<'a>(
    plane: impl Fn(usize, usize) -> &'a [f32] + Sync,
    c: usize,
    dhw: [usize; 3],
    pad: [usize; 3],
    pz0: usize,
    np: usize,
    dst: PadDst<'_>,
) {
    match dst {
        PadDst::F32(dst) => pad_planes(plane, c, dhw, pad, pz0, np, dst),
        PadDst::Pairs { dst, c_pad } => {
            crate::cpu::bf16::pad_pairs(plane, c, dhw, pad, pz0, np, c_pad, dst)
        }
        PadDst::PairsCl { dst, c_pad } => {
            crate::cpu::channels_last::pad_pairs_cl(plane, c, dhw, pad, pz0, np, c_pad, dst)
        }
    }
}

/// Zero-pads one whole sample to `(C, D+2p, H+2p, W+2p)`; `channel(ci)` gives channel `ci`'s
/// `D·H·W` voxels.
pub(crate) fn pad_sample<'a>(
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
    // SAFETY: `pad_planes` wrote every element.
    let out = unsafe { assume_init_vec(out) };
    (out, p)
}

/// The geometry of a stride-1 correlation of a padded block `p` with kernel `k`, read as an
/// implicit GEMM over the flat padded grid.
pub(crate) struct Geometry {
    /// Voxels of the padded block.
    pub(crate) vp: usize,
    /// The output grid.
    pub(crate) od: [usize; 3],
    /// Flat padded positions from the first to the last valid output position.
    pub(crate) span: usize,
    /// The flat offset of every kernel tap.
    pub(crate) taps: Vec<usize>,
    /// Output voxels.
    pub(crate) n_out: usize,
}

impl Geometry {
    pub(crate) fn new(p: [usize; 3], k: [usize; 3]) -> Self {
        let od = [p[0] + 1 - k[0], p[1] + 1 - k[1], p[2] + 1 - k[2]];
        Geometry {
            vp: p[0] * p[1] * p[2],
            od,
            span: (od[0] - 1) * p[1] * p[2] + (od[1] - 1) * p[2] + od[2],
            taps: tap_offsets(k, p),
            n_out: od[0] * od[1] * od[2],
        }
    }
}

/// Stride-1 correlation of one padded block of planes: `out[o, z, y, x] = b[o] + Σ_c Σ_t
/// w[t][o][c] · xp[c, z+kd, y+kh, x+kw]`, with `wp` packed as `(taps, O, C)`. Output channel
/// `o` starts at `out[o · cstride]` (the block may be a run of planes of a larger output).
#[allow(clippy::too_many_arguments)]
pub(crate) fn correlate_sample(
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
    let Geometry {
        vp,
        od,
        span,
        taps,
        n_out,
    } = Geometry::new(p, k);
    let blen = block_len(o);
    let nblocks = span.div_ceil(blen);
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
                    matmul(
                        [o, len, c],
                        buf.as_mut_ptr(),
                        [len, 1],
                        t > 0,
                        wp.as_ptr().add(t * o * c),
                        [c, 1],
                        xp.as_ptr().add(q0 + off),
                        [vp, 1],
                    );
                }
            }
            // SAFETY: blocks cover disjoint output positions, all inside `out` (checked).
            unsafe { scatter_block(buf, len, q0, len, p, od, o, bias, dst, cstride) };
        },
    );
}

/// Writes the valid positions of one block of an implicit GEMM (positions `q0..q0+len` of the
/// padded grid `p`; output channel `oc` at `buf[oc·buf_stride..]`) to the output `(O, od)`
/// whose channel `oc` starts at `dst + oc·cstride`, adding the bias: runs of whole output rows.
///
/// # Safety
/// The block's output positions must be written by no other thread, and lie (for `o`
/// channels) inside the output `dst` points to.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn scatter_block(
    buf: &[f32],
    buf_stride: usize,
    q0: usize,
    len: usize,
    p: [usize; 3],
    od: [usize; 3],
    o: usize,
    bias: Option<&[f32]>,
    dst: OutPtr,
    cstride: usize,
) {
    output_runs(q0, len, p, od, |r, n, base| {
        for oc in 0..o {
            let src = &buf[oc * buf_stride + r..][..n];
            // SAFETY: (oc, base..base+n) is this block's (the caller guarantees it lies
            // inside the output and that no other thread writes it).
            let dst =
                unsafe { std::slice::from_raw_parts_mut(dst.get().add(oc * cstride + base), n) };
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
    });
}

/// The runs of valid output positions among positions `q0..q0+len` of the padded grid `p`
/// (output grid `od`): `run(r, n, base)` for `n` positions starting `r` after `q0`, which are
/// output voxels `base..base+n` (flat, one output row at most).
#[inline(always)]
pub(crate) fn output_runs(
    q0: usize,
    len: usize,
    p: [usize; 3],
    od: [usize; 3],
    mut run: impl FnMut(usize, usize, usize),
) {
    let plane = p[1] * p[2];
    let mut q = q0;
    while q < q0 + len {
        let z = q / plane;
        let y = (q % plane) / p[2];
        let x = q % p[2];
        let run_end = (q - x + p[2]).min(q0 + len);
        if z < od[0] && y < od[1] && x < od[2] {
            let n = (run_end - q).min(od[2] - x);
            run(q - q0, n, (z * od[1] + y) * od[2] + x);
        }
        q = run_end;
    }
}

/// Packs `(O, C, kd, kh, kw)` weights as `(taps, O, C)`, optionally flipping the taps and
/// swapping O and C (for the input gradient). One task per tap (each writes its own
/// contiguous `(O, C)` block).
pub(crate) fn pack_weights(
    w: &[f32],
    o: usize,
    c: usize,
    taps: usize,
    flip_transpose: bool,
) -> Vec<f32> {
    assert_eq!(w.len(), o * c * taps);
    let mut out = vec![0f32; taps * o * c];
    out.par_chunks_mut(o * c)
        .enumerate()
        .for_each(|(t, block)| {
            if flip_transpose {
                // New layout: (taps, C as outputs, O as inputs), tap reversed.
                let src_t = taps - 1 - t;
                for ci in 0..c {
                    for oi in 0..o {
                        block[ci * o + oi] = w[(oi * c + ci) * taps + src_t];
                    }
                }
            } else {
                for (i, v) in block.iter_mut().enumerate() {
                    *v = w[i * taps + t];
                }
            }
        });
    out
}

/// The weights of a stride-1 correlation as [`correlate_chunked`] takes them: packed for the
/// f32 kernel, or as stored (`(O, C, kd, kh, kw)`), packed there for whichever kernel runs
/// (the AMX kernel's layout is made straight from them).
#[derive(Clone, Copy)]
pub(crate) enum ConvWeights<'a> {
    /// `(taps, O, C)`, as [`pack_weights`] makes them.
    Packed(&'a [f32]),
    /// `(O, C, taps)`, the checkpoint's layout.
    Raw(&'a [f32]),
}

impl<'a> ConvWeights<'a> {
    /// The `(taps, O, C)` packing (borrowed when already packed).
    fn packed(self, o: usize, c: usize, taps: usize) -> std::borrow::Cow<'a, [f32]> {
        match self {
            ConvWeights::Packed(wp) => std::borrow::Cow::Borrowed(wp),
            ConvWeights::Raw(w) => std::borrow::Cow::Owned(pack_weights(w, o, c, taps, false)),
        }
    }
}

/// A stride-1 correlation of one sample whose zero-padded input is made a few planes at a
/// time: `fill(pz0, np, dst)` writes padded planes `pz0..pz0+np` of all `c` channels (see
/// [`pad_into`]) and the output planes they determine are computed before the next block,
/// so at most about [`set_slab_bytes`] of padded input exist at once. `out` is `(O, D', H', W')`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn correlate_chunked(
    c: usize,
    dhw: [usize; 3],
    pad: [usize; 3],
    weights: ConvWeights<'_>,
    o: usize,
    k: [usize; 3],
    bias: Option<&[f32]>,
    out: &mut [f32],
    mut fill: impl FnMut(usize, usize, PadDst<'_>),
) {
    let p = [
        dhw[0] + 2 * pad[0],
        dhw[1] + 2 * pad[1],
        dhw[2] + 2 * pad[2],
    ];
    let od = [p[0] + 1 - k[0], p[1] + 1 - k[1], p[2] + 1 - k[2]];
    let (plane_out, n_out) = (od[1] * od[2], od[0] * od[1] * od[2]);
    let per_plane = (c * p[1] * p[2] * 4).max(1);
    let budget = SLAB_BYTES.load(Ordering::Relaxed);
    let planes = (budget / per_plane).max(k[0] + 1);
    let mut step = (planes + 1 - k[0]).clamp(1, od[0]);
    let mut slab = Vec::new();
    // The bf16 kernel's packed weights, or Winograd's transformed ones, made once for all
    // slabs.
    let taps = k[0] * k[1] * k[2];
    let timer = crate::runtime::stage("conv/pack weights");
    let active = crate::cpu::bf16::active_bf16_kernel().filter(|_| crate::cpu::bf16::applies(c, o));
    let mut bf16 = active.map(|kernel| Bf16Conv::new(kernel, weights, k, o, c, od));
    // The f32 packing, unless a bf16 kernel runs.
    let wp = match bf16 {
        Some(_) => std::borrow::Cow::Borrowed(&[][..]),
        None => weights.packed(o, c, taps),
    };
    let wp = &wp[..];
    let winograd = (bf16.is_none() && crate::cpu::winograd::applies(k, c, o, od))
        .then(|| crate::cpu::winograd::transform_weights(wp, o, c));
    drop(timer);
    if matches!(bf16, Some(Bf16Conv::Winograd { .. })) && step > 1 {
        // Whole tiles of 2 planes in every slab but the last.
        step -= step % 2;
    }
    for oz0 in (0..od[0]).step_by(step) {
        let t = step.min(od[0] - oz0);
        let np = t + k[0] - 1;
        let dst = &mut out[oz0 * plane_out..];
        if let Some(b) = &mut bf16 {
            let timer = crate::runtime::stage("conv/fill bf16 pairs");
            fill(oz0, np, b.pad_dst());
            drop(timer);
            let _timer = crate::runtime::stage("conv/bf16 gemm");
            b.correlate([np, p[1], p[2]], k, bias, dst, n_out);
            continue;
        }
        if slab.is_empty() {
            slab = uninit_vec(c * (step + k[0] - 1) * p[1] * p[2]);
        }
        let buf = &mut slab[..c * np * p[1] * p[2]];
        let timer = crate::runtime::stage("conv/fill");
        fill(oz0, np, PadDst::F32(buf));
        drop(timer);
        // SAFETY: `fill` writes every element of its buffer.
        let xp = unsafe { assume_init_slice(buf) };
        let _timer = crate::runtime::stage(if winograd.is_some() {
            "conv/f32 winograd"
        } else {
            "conv/f32 gemm"
        });
        match &winograd {
            Some(u) => crate::cpu::winograd::correlate_sample(
                xp,
                c,
                [np, p[1], p[2]],
                u,
                o,
                bias,
                dst,
                n_out,
            ),
            None => correlate_sample(xp, c, [np, p[1], p[2]], wp, o, k, bias, dst, n_out),
        }
    }
}

/// A convolution's bf16 weights and input buffer, in the layout its kernel reads: channel
/// pairs in planes ([`crate::cpu::bf16`]) or, for AMX, blocked channels-last
/// ([`crate::cpu::channels_last`]).
enum Bf16Conv {
    Planes {
        kernel: crate::cpu::bf16::Bf16Kernel,
        w: crate::cpu::bf16::Bf16Weights,
        pairs: Vec<u32>,
    },
    ChannelsLast {
        kernel: crate::cpu::bf16::Bf16Kernel,
        w: crate::cpu::channels_last::ClWeights,
        lines: crate::cpu::channels_last::Lines,
    },
    /// Winograd F(2,3) on the channels-last kernel (same input layout).
    Winograd {
        kernel: crate::cpu::bf16::Bf16Kernel,
        w: crate::cpu::channels_last::winograd::WinoWeights,
        lines: crate::cpu::channels_last::Lines,
    },
}

impl Drop for Bf16Conv {
    fn drop(&mut self) {
        if let Bf16Conv::ChannelsLast { lines, .. } | Bf16Conv::Winograd { lines, .. } = self {
            std::mem::take(lines).give_back();
        }
    }
}

impl Bf16Conv {
    /// Packs `weights` for `kernel`.
    fn new(
        kernel: crate::cpu::bf16::Bf16Kernel,
        weights: ConvWeights<'_>,
        k: [usize; 3],
        o: usize,
        c: usize,
        od: [usize; 3],
    ) -> Self {
        use crate::cpu::channels_last;
        let taps = k[0] * k[1] * k[2];
        if channels_last::winograd::applies(kernel, k, c, o, od) {
            return Bf16Conv::Winograd {
                kernel,
                w: channels_last::winograd::pack_weights(weights, o, c),
                lines: channels_last::Lines::take_spare(),
            };
        }
        if channels_last::uses_cl(crate::cpu::bf16::Runner::Kernel(kernel)) {
            let w = match weights {
                ConvWeights::Raw(w) => channels_last::pack_raw_weights_cl(w, taps, o, c),
                ConvWeights::Packed(wp) => channels_last::pack_weights_cl(wp, taps, o, c),
            };
            Bf16Conv::ChannelsLast {
                kernel,
                w,
                lines: channels_last::Lines::take_spare(),
            }
        } else {
            let w = crate::cpu::bf16::pack_weights(&weights.packed(o, c, taps), taps, o, c);
            Bf16Conv::Planes {
                kernel,
                w,
                pairs: Vec::new(),
            }
        }
    }

    /// Where the padded input of the next slab goes.
    fn pad_dst(&mut self) -> PadDst<'_> {
        match self {
            Bf16Conv::Planes { w, pairs, .. } => PadDst::Pairs {
                dst: pairs,
                c_pad: w.c_pad(),
            },
            Bf16Conv::ChannelsLast { w, lines, .. } => PadDst::PairsCl {
                dst: lines,
                c_pad: w.c_pad(),
            },
            Bf16Conv::Winograd { w, lines, .. } => PadDst::PairsCl {
                dst: lines,
                c_pad: w.c_pad(),
            },
        }
    }

    /// The correlation of the slab last padded (`np` its padded extent).
    fn correlate(
        &self,
        np: [usize; 3],
        k: [usize; 3],
        bias: Option<&[f32]>,
        dst: &mut [f32],
        cstride: usize,
    ) {
        use crate::cpu::bf16::Runner;
        match self {
            Bf16Conv::Planes { kernel, w, pairs } => crate::cpu::bf16::correlate_sample(
                Runner::Kernel(*kernel),
                pairs,
                np,
                w,
                k,
                bias,
                dst,
                cstride,
            ),
            Bf16Conv::ChannelsLast { kernel, w, lines } => {
                crate::cpu::channels_last::correlate_sample(
                    Runner::Kernel(*kernel),
                    lines.words(),
                    np,
                    w,
                    k,
                    bias,
                    dst,
                    cstride,
                )
            }
            Bf16Conv::Winograd { kernel, w, lines } => {
                crate::cpu::channels_last::winograd::correlate_sample(
                    Runner::Kernel(*kernel),
                    lines.words(),
                    np,
                    w,
                    bias,
                    dst,
                    cstride,
                )
            }
        }
    }
}

/// CPU forward of a stride-1 correlation (plus an optional bias) over a batch.
pub(crate) fn correlate(
    x: &[f32],
    xs: [usize; 5],
    weights: ConvWeights<'_>,
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
            weights,
            o,
            k,
            bias,
            &mut out[b * per_out..(b + 1) * per_out],
            |pz0, np, dst| {
                pad_into(
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
pub(crate) fn correlate_concat_sample(
    srcs: &[(&[f32], usize)],
    dhw: [usize; 3],
    pad: [usize; 3],
    weights: ConvWeights<'_>,
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
    correlate_chunked(c, dhw, pad, weights, o, k, bias, out, |pz0, np, dst| {
        pad_into(plane, c, dhw, pad, pz0, np, dst)
    });
}
