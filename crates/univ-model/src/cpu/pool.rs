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
