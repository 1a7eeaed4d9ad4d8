//! `MaxPool3d(2)` with PyTorch's tie rule: the first maximum of each 2×2×2 window in scan
//! order z, y, x (a NaN wins), and its gradient.

use rayon::prelude::*;

/// For each output voxel, the input index of the first maximum of its 2×2×2 window (scan order
/// z, y, x as PyTorch), and the maximum.
pub(crate) fn argmax_windows(x: &[f32], s: [usize; 5]) -> (Vec<f32>, Vec<usize>) {
    let [n, c, d, h, w] = s;
    let (od, oh, ow) = (d / 2, h / 2, w / 2);
    let per = od * oh * ow;
    let parts: Vec<(Vec<f32>, Vec<usize>)> = (0..n * c)
        .into_par_iter()
        .map(|nc| {
            let mut vals = Vec::with_capacity(per);
            let mut idx = Vec::with_capacity(per);
            let base = nc * d * h * w;
            for z in 0..od {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut best = f32::NEG_INFINITY;
                        let mut bi = base + ((2 * z) * h + 2 * y) * w + 2 * xx;
                        let mut first = true;
                        for dz in 0..2 {
                            for dy in 0..2 {
                                for dx in 0..2 {
                                    let i =
                                        base + ((2 * z + dz) * h + 2 * y + dy) * w + 2 * xx + dx;
                                    let v = x[i];
                                    if first || v > best || v.is_nan() {
                                        best = v;
                                        bi = i;
                                        first = false;
                                    }
                                }
                            }
                        }
                        vals.push(best);
                        idx.push(bi);
                    }
                }
            }
            (vals, idx)
        })
        .collect();
    let mut vals = Vec::with_capacity(n * c * per);
    let mut idx = Vec::with_capacity(n * c * per);
    for (v, i) in parts {
        vals.extend(v);
        idx.extend(i);
    }
    (vals, idx)
}

/// The maxima of [`argmax_windows`] alone (the forward pass at inference): the same values,
/// in the same scan order (so the same one of `0.0` and `-0.0` wins), without the indices.
pub(crate) fn max_windows(x: &[f32], s: [usize; 5]) -> Vec<f32> {
    let [n, c, d, h, w] = s;
    let (od, oh, ow) = (d / 2, h / 2, w / 2);
    let mut out = vec![0f32; n * c * od * oh * ow];
    if out.is_empty() {
        return out;
    }
    #[inline(always)]
    fn take(best: f32, v: f32) -> f32 {
        if v > best || v.is_nan() { v } else { best }
    }
    out.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(i, plane)| {
            let (nc, z) = (i / od, i % od);
            let base = nc * d * h * w;
            for (y, orow) in plane.chunks_exact_mut(ow).enumerate() {
                let row = |dz: usize, dy: usize| {
                    let s = base + ((2 * z + dz) * h + 2 * y + dy) * w;
                    &x[s..s + 2 * ow]
                };
                let (r00, r01, r10, r11) = (row(0, 0), row(0, 1), row(1, 0), row(1, 1));
                for (xx, o) in orow.iter_mut().enumerate() {
                    let mut b = r00[2 * xx];
                    for v in [
                        r00[2 * xx + 1],
                        r01[2 * xx],
                        r01[2 * xx + 1],
                        r10[2 * xx],
                        r10[2 * xx + 1],
                        r11[2 * xx],
                        r11[2 * xx + 1],
                    ] {
                        b = take(b, v);
                    }
                    *o = b;
                }
            }
        });
    out
}

/// The gradient of `MaxPool3d(2)`: each output gradient goes to the first maximum of its
/// window.
pub(crate) fn max_pool2_grad(x: &[f32], s: [usize; 5], g: &[f32]) -> Vec<f32> {
    let (_, idx) = argmax_windows(x, s);
    let mut out = vec![0f32; s.iter().product()];
    for (i, gi) in idx.iter().zip(g) {
        out[*i] += gi;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maxima_alone_match_the_argmax_pass_with_ties_zeros_and_nans() {
        let s = [1, 3, 6, 4, 10];
        let n: usize = s.iter().product();
        let x: Vec<f32> = (0..n)
            .map(|i| match (i * 7919) % 13 {
                0 => 0.0,
                1 => -0.0,
                2 if i % 5 == 0 => f32::NAN,
                k => (k as f32 - 6.0) * 0.5,
            })
            .collect();
        let (want, _) = argmax_windows(&x, s);
        let got = max_windows(&x, s);
        assert_eq!(want.len(), got.len());
        for (a, b) in want.iter().zip(&got) {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{a} vs {b}"
            );
        }
    }
}
