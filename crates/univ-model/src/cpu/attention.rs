//! The middle of Swin window attention in one pass: `softmax(scores + bias + mask)` over the
//! last axis, in place. Done with candle operations this is three passes over the
//! `(windows, heads, N, N)` scores (two broadcast additions, then softmax with a scalar `exp`)
//! and was the largest single cost of a Swin UNETR window after the convolutions.
//!
//! `exp` here is a polynomial that the compiler vectorises (relative error below 2e-7, i.e.
//! within about 2 ulp of the correctly rounded value).

use rayon::prelude::*;

/// `e^x` for f32 by range reduction `x = k·ln2 + r` (|r| ≤ ln2/2, ln2 split in two parts) and a
/// degree-6 polynomial for `e^r`; inputs below −87.3 give 0 (as the softmax needs), above 88
/// saturate at 88. `k` is rounded with the 1.5·2²³ trick and `2^k` made from its bits, so that
/// every step is a vector instruction.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    /// 1.5·2²³: adding it rounds to an integer (ties to even) held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let under = x < -87.3;
    let x = x.clamp(-87.3, 88.0);
    let t = x * LOG2E + MAGIC;
    let k = t - MAGIC;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Taylor coefficients 1/n! up to n = 6 (the remainder is below 2e-8 on |r| ≤ 0.347).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let k_bits = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
    if under { 0.0 } else { p * scale }
}

/// Softmax of one row after adding `bias` and (optionally) `mask` to it.
#[inline(always)]
fn row_softmax(row: &mut [f32], bias: &[f32], mask: Option<&[f32]>) {
    match mask {
        Some(m) => {
            for ((v, b), m) in row.iter_mut().zip(bias).zip(m) {
                *v += b + m;
            }
        }
        None => {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
    // Eight lanes of partial maxima and sums, so that the loops vectorise (a single float
    // accumulator would fix the order of the additions).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    for v in row.iter_mut() {
        *v = exp_approx(*v - max);
    }
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            lanes[i] += c[i];
        }
    }
    let sum = chunks.remainder().iter().chain(&lanes).sum::<f32>();
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// The rows of one `(window, head)` matrix.
#[inline(always)]
fn matrix_softmax(s: &mut [f32], n: usize, bias: &[f32], mask: Option<&[f32]>) {
    for (i, row) in s.chunks_mut(n).enumerate() {
        let b = &bias[i * n..(i + 1) * n];
        row_softmax(row, b, mask.map(|m| &m[i * n..(i + 1) * n]));
    }
}

/// `scores ← softmax(scores + bias + mask)` over the last axis. `scores` is `(BW, heads, N, N)`,
/// `bias` `(heads, N, N)`, `mask` `(nW, N, N)` for windows `b` of the batch taking row
/// `b mod nW` (batch-major, as Swin's window partition orders them).
#[cfg(test)]
pub(crate) fn bias_mask_softmax(
    scores: &mut [f32],
    heads: usize,
    n: usize,
    bias: &[f32],
    mask: Option<(&[f32], usize)>,
) {
    let nn = n * n;
    assert!(scores.len().is_multiple_of(heads * nn) && bias.len() == heads * nn);
    if let Some((m, nw)) = mask {
        assert_eq!(m.len(), nw * nn);
    }
    let kernel = matrix_kernel();
    scores.par_chunks_mut(nn).enumerate().for_each(|(i, s)| {
        let (b, h) = (i / heads, i % heads);
        let m = mask.map(|(m, nw)| &m[(b % nw) * nn..(b % nw + 1) * nn]);
        kernel(s, n, &bias[h * nn..(h + 1) * nn], m);
    });
}

type MatrixKernel = fn(&mut [f32], usize, &[f32], Option<&[f32]>);

/// [`matrix_softmax`] compiled for AVX2+FMA where the CPU has them (the loops vectorise).
fn matrix_kernel() -> MatrixKernel {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        fn matrix_avx512(s: &mut [f32], n: usize, bias: &[f32], mask: Option<&[f32]>) {
            matrix_softmax(s, n, bias, mask)
        }
        fn checked512(s: &mut [f32], n: usize, bias: &[f32], mask: Option<&[f32]>) {
            // SAFETY: AVX-512F was detected before this function was chosen.
            unsafe { matrix_avx512(s, n, bias, mask) }
        }
        return checked512;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        fn matrix_avx2(s: &mut [f32], n: usize, bias: &[f32], mask: Option<&[f32]>) {
            matrix_softmax(s, n, bias, mask)
        }
        fn checked(s: &mut [f32], n: usize, bias: &[f32], mask: Option<&[f32]>) {
            // SAFETY: only chosen when the CPU has AVX2 and FMA.
            unsafe { matrix_avx2(s, n, bias, mask) }
        }
        return checked;
    }
    fn portable(s: &mut [f32], n: usize, bias: &[f32], mask: Option<&[f32]>) {
        matrix_softmax(s, n, bias, mask)
    }
    portable
}

/// Window attention for inference, fused per (window, head): `softmax(q·kᵀ·scale + bias
/// [+ mask])·v`, each task computing its `N × N` scores in a buffer of its own (never the
/// whole `(windows, heads, N, N)` tensor) and writing its head's columns of the merged output.
///
/// `qkv` is the qkv linear's output `(BW, N, 3, heads, hd)`; `bias` is `(heads, N, N)`; `mask`
/// `(nW, N, N)` with window `b` using row `b mod nW`. Returns `(BW, N, heads·hd)`. `q` is
/// scaled before the product, as the reference does.
pub(crate) fn window_attention(
    qkv: &[f32],
    [bw, n, heads, hd]: [usize; 4],
    scale: f32,
    bias: &[f32],
    mask: Option<(&[f32], usize)>,
) -> Vec<f32> {
    let (c, nn) = (heads * hd, n * n);
    assert!(qkv.len() == bw * n * 3 * c && bias.len() == heads * nn);
    if let Some((m, nw)) = mask {
        assert_eq!(m.len(), nw * nn);
    }
    let mut out = vec![0f32; bw * n * c];
    let dst = crate::cpu::OutPtr(out.as_mut_ptr());
    let kernel = matrix_kernel();
    (0..bw * heads).into_par_iter().for_each_init(
        || (vec![0f32; nn], vec![0f32; n * hd]),
        |(scores, q), i| {
            let (b, h) = (i / heads, i % heads);
            let base = b * n * 3 * c + h * hd;
            for (t, row) in q.chunks_exact_mut(hd).enumerate() {
                let src = &qkv[base + t * 3 * c..][..hd];
                for (d, v) in row.iter_mut().zip(src) {
                    *d = v * scale;
                }
            }
            // SAFETY: `q` is n × hd; k and v rows are hd-long at a stride of 3c inside `qkv`
            // (checked length); the output rows of window b, columns h·hd.., are this task's.
            unsafe {
                crate::cpu::matmul(
                    [n, n, hd],
                    scores.as_mut_ptr(),
                    [n, 1],
                    false,
                    q.as_ptr(),
                    [hd, 1],
                    qkv.as_ptr().add(base + c),
                    [1, 3 * c],
                );
            }
            let m = mask.map(|(m, nw)| &m[(b % nw) * nn..(b % nw + 1) * nn]);
            kernel(scores, n, &bias[h * nn..(h + 1) * nn], m);
            // SAFETY: as above.
            unsafe {
                crate::cpu::matmul(
                    [n, hd, n],
                    dst.get().add(b * n * c + h * hd),
                    [c, 1],
                    false,
                    scores.as_ptr(),
                    [n, 1],
                    qkv.as_ptr().add(base + 2 * c),
                    [3 * c, 1],
                );
            }
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_underflows_to_zero() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_approx(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_approx(-100.0), 0.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
    }

    #[test]
    fn fused_window_attention_matches_the_unfused_steps() {
        let (bw, n, heads, hd, nw) = (4, 9, 3, 5, 2);
        let c = heads * hd;
        let val = |i: usize, s: f32| (i as f32 * 0.61 + s).sin();
        let qkv: Vec<f32> = (0..bw * n * 3 * c).map(|i| val(i, 0.2)).collect();
        let bias: Vec<f32> = (0..heads * n * n).map(|i| val(i, 0.9) * 0.5).collect();
        let mask: Vec<f32> = (0..nw * n * n)
            .map(|i| if i % 5 == 0 { -100.0 } else { 0.0 })
            .collect();
        let scale = (hd as f32).powf(-0.5);
        for with_mask in [false, true] {
            let m = with_mask.then_some((&mask[..], nw));
            let got = window_attention(&qkv, [bw, n, heads, hd], scale, &bias, m);
            let at = |b: usize, t: usize, which: usize, h: usize, d: usize| {
                qkv[(b * n + t) * 3 * c + which * c + h * hd + d]
            };
            for b in 0..bw {
                for h in 0..heads {
                    for i in 0..n {
                        let mut row: Vec<f64> = (0..n)
                            .map(|j| {
                                let s: f64 = (0..hd)
                                    .map(|d| {
                                        f64::from(at(b, i, 0, h, d) * scale)
                                            * f64::from(at(b, j, 1, h, d))
                                    })
                                    .sum();
                                let mut v = s + f64::from(bias[(h * n + i) * n + j]);
                                if with_mask {
                                    v += f64::from(mask[((b % nw) * n + i) * n + j]);
                                }
                                v
                            })
                            .collect();
                        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        row.iter_mut().for_each(|v| *v = (*v - max).exp());
                        let sum: f64 = row.iter().sum();
                        for d in 0..hd {
                            let want: f64 = (0..n)
                                .map(|j| row[j] / sum * f64::from(at(b, j, 2, h, d)))
                                .sum();
                            let g = f64::from(got[(b * n + i) * c + h * hd + d]);
                            assert!(
                                (g - want).abs() < 1e-5,
                                "b{b} h{h} i{i} d{d}: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fused_softmax_matches_the_three_passes() {
        let (bw, heads, n, nw) = (4, 3, 10, 2);
        let nn = n * n;
        let val = |i: usize, s: f32| (i as f32 * 0.37 + s).sin() * 6.0;
        let scores: Vec<f32> = (0..bw * heads * nn).map(|i| val(i, 0.1)).collect();
        let bias: Vec<f32> = (0..heads * nn).map(|i| val(i, 1.3) * 0.3).collect();
        let mask: Vec<f32> = (0..nw * nn)
            .map(|i| if i % 7 == 0 { -100.0 } else { 0.0 })
            .collect();
        for with_mask in [false, true] {
            let mut got = scores.clone();
            bias_mask_softmax(
                &mut got,
                heads,
                n,
                &bias,
                with_mask.then_some((&mask[..], nw)),
            );
            for b in 0..bw {
                for h in 0..heads {
                    for i in 0..n {
                        let row: Vec<f64> = (0..n)
                            .map(|j| {
                                let mut v = scores[((b * heads + h) * n + i) * n + j] as f64
                                    + bias[(h * n + i) * n + j] as f64;
                                if with_mask {
                                    v += mask[((b % nw) * n + i) * n + j] as f64;
                                }
                                v
                            })
                            .collect();
                        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
                        for j in 0..n {
                            let want = (row[j] - max).exp() / sum;
                            let g = got[((b * heads + h) * n + i) * n + j] as f64;
                            assert!((g - want).abs() < 1e-6, "{b} {h} {i} {j}: {g} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
