//! The transposed convolution with kernel = stride (no overlap between taps): for each tap,
//! `Y = W_tapᵀ · X` over blocks of input positions, scattered straight into the interleaved
//! output.

use rayon::prelude::*;

use crate::cpu::correlate::block_len;
use crate::cpu::{OutPtr, matmul};

/// The body of [`conv_transpose_cpu`] on buffers.
pub(crate) fn conv_transpose_slices(
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
pub(crate) fn pack_transpose_weights(wv: &[f32], ci: usize, co: usize, k: [usize; 3]) -> Vec<f32> {
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
pub(crate) fn conv_transpose_planes(
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
    let v_in = d * h * wd;
    let (d2, h2, w2) = (zs.len() * kd, h * kh, wd * kw);
    assert_eq!(out.len(), co * d2 * h2 * w2);
    let (q_lo, q_hi) = (zs.start * h * wd, zs.end * h * wd);
    let blen = block_len(co).min((q_hi - q_lo).max(1));
    let dst = OutPtr(out.as_mut_ptr());
    // bf16: the input planes as channel pairs once, each tap's weights packed for the kernel.
    let bf16 = crate::cpu::bf16::active_bf16_kernel()
        .filter(|_| crate::cpu::bf16::applies(ci, co))
        .map(|kernel| {
            let hw = h * wd;
            let mut pairs = Vec::new();
            let w: Vec<_> = (0..kd * kh * kw)
                .map(|t| crate::cpu::bf16::pack_weights(&wp[t * co * ci..][..co * ci], 1, co, ci))
                .collect();
            crate::cpu::bf16::pad_pairs(
                |c, z| &xs[c * v_in + (zs.start + z) * hw..][..hw],
                ci,
                [zs.len(), h, wd],
                [0; 3],
                0,
                zs.len(),
                w[0].c_pad(),
                &mut pairs,
            );
            (kernel, pairs, w)
        });
    let o_rows = bf16.as_ref().map_or(co, |(_, _, w)| w[0].o_pad());
    (0..(q_hi - q_lo).div_ceil(blen))
        .into_par_iter()
        .for_each_init(
            || vec![0f32; kw * o_rows * blen.next_multiple_of(32)],
            |buf, bi| {
                let q0 = q_lo + bi * blen;
                let len = blen.min(q_hi - q0);
                // The `kw` taps of one (kd, kh) offset together, so that each output row is
                // written contiguously (their outputs interleave along x).
                for ab in 0..kd * kh {
                    let (a, bb) = (ab / kh, ab % kh);
                    // Tap `c`'s outputs: channel `o` at `buf[(c·o_rows + o)·stride ..]`.
                    let mut stride = len;
                    for c in 0..kw {
                        let t = ab * kw + c;
                        let part = &mut buf[c * o_rows * blen.next_multiple_of(32)..];
                        if let Some((kernel, pairs, w)) = &bf16 {
                            stride = crate::cpu::bf16::product_block(
                                *kernel,
                                pairs,
                                q_hi - q_lo,
                                q0 - q_lo,
                                len,
                                &w[t],
                                part,
                            );
                            continue;
                        }
                        // SAFETY: reads stay inside `xs` (rows of length v_in, columns
                        // q0..q0+len); tap `c` writes its own `co·len` part of `buf`.
                        unsafe {
                            matmul(
                                [co, len, ci],
                                part.as_mut_ptr(),
                                [len, 1],
                                false,
                                wp.as_ptr().add(t * co * ci),
                                [ci, 1],
                                xs.as_ptr().add(q0),
                                [v_in, 1],
                            );
                        }
                    }
                    let tap = |c: usize, o: usize, r: usize| {
                        c * o_rows * blen.next_multiple_of(32) + o * stride + r
                    };
                    // Runs of positions along one input row.
                    let mut r = 0;
                    while r < len {
                        let q = q0 + r;
                        let x0 = q % wd;
                        let run = (wd - x0).min(len - r);
                        let (z, y) = ((q / wd) / h - zs.start, (q / wd) % h);
                        for o in 0..co {
                            let bias_o = bv.map_or(0.0, |v| v[o]);
                            let base = ((o * d2 + kd * z + a) * h2 + kh * y + bb) * w2 + kw * x0;
                            // SAFETY: these `kw·run` output elements belong to this block's
                            // positions and this (kd, kh) offset only.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(dst.get().add(base), kw * run)
                            };
                            if kw == 2 {
                                let (s0, s1) =
                                    (&buf[tap(0, o, r)..][..run], &buf[tap(1, o, r)..][..run]);
                                interleave_pairs(dst, s0, s1, bias_o);
                            } else {
                                for (i, d) in dst.chunks_exact_mut(kw).enumerate() {
                                    for (c, dv) in d.iter_mut().enumerate() {
                                        *dv = buf[tap(c, o, r + i)] + bias_o;
                                    }
                                }
                            }
                        }
                        r += run;
                    }
                }
            },
        );
}

/// `dst[2i] = s0[i] + bias`, `dst[2i+1] = s1[i] + bias` (the two taps along x of one output
/// row), on AVX-512 where the CPU has it.
fn interleave_pairs(dst: &mut [f32], s0: &[f32], s1: &[f32], bias: f32) {
    assert!(dst.len() == 2 * s0.len() && s0.len() == s1.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the feature; the lengths were checked.
        return unsafe { avx512::interleave_pairs(dst, s0, s1, bias) };
    }
    interleave_body(dst, s0, s1, bias);
}

#[inline(always)]
fn interleave_body(dst: &mut [f32], s0: &[f32], s1: &[f32], bias: f32) {
    for ((d, v0), v1) in dst.chunks_exact_mut(2).zip(s0).zip(s1) {
        d[0] = v0 + bias;
        d[1] = v1 + bias;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::interleave_body`] 16 pairs at a time (the same additions).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `dst` holds `2·s0.len()` floats, `s1` as many as `s0`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn interleave_pairs(dst: &mut [f32], s0: &[f32], s1: &[f32], bias: f32) {
        let n = s0.len();
        let body = n - n % 16;
        // SAFETY: every load reads `s0`/`s1` below `body`, every store `dst` below `2·body`.
        unsafe {
            let b = _mm512_set1_ps(bias);
            let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let hi =
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            for i in (0..body).step_by(16) {
                let a = _mm512_add_ps(_mm512_loadu_ps(s0.as_ptr().add(i)), b);
                let c = _mm512_add_ps(_mm512_loadu_ps(s1.as_ptr().add(i)), b);
                let d = dst.as_mut_ptr().add(2 * i);
                _mm512_storeu_ps(d, _mm512_permutex2var_ps(a, lo, c));
                _mm512_storeu_ps(d.add(16), _mm512_permutex2var_ps(a, hi, c));
            }
        }
        super::interleave_body(&mut dst[2 * body..], &s0[body..], &s1[body..], bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector interleave against the portable one, every tail length.
    #[test]
    fn interleave_matches_the_portable_one() {
        for n in [0, 1, 15, 16, 17, 33, 96] {
            let s0: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let s1: Vec<f32> = (0..n).map(|i| -(i as f32) * 0.25 + 1.0).collect();
            let (mut a, mut b) = (vec![f32::NAN; 2 * n], vec![0f32; 2 * n]);
            interleave_body(&mut a, &s0, &s1, 0.75);
            interleave_pairs(&mut b, &s0, &s1, 0.75);
            assert_eq!(a, b, "{n} pairs");
        }
    }
}
