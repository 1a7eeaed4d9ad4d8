//! The weight gradient of a stride-1 correlation: for each tap, `G · X_shiftedᵀ` over chunks
//! of padded positions, in parallel, summed in chunk order (deterministic).

use rayon::prelude::*;

use crate::cpu::correlate::pad_sample;
use crate::cpu::{matmul, tap_offsets};

/// Weight gradient of a stride-1 correlation: `gw[o, c, t] = Σ_n Σ_pos g[n, o, pos] ·
/// xp[n, c, pos + t]`.
pub(crate) fn weight_grad(
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
pub(crate) fn weight_grad_with<'a>(
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
        let offs = tap_offsets(k, p);
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
                        matmul(
                            [o, c, len],
                            acc.as_mut_ptr().add(t * o * c),
                            [c, 1],
                            false,
                            gp.as_ptr().add(q0),
                            [span, 1],
                            xp.as_ptr().add(q0 + off),
                            [1, vp],
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
