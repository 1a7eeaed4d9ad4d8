//! The stride-1 3×3×3 correlation by Winograd's minimal filtering, F(2×2×2, 3×3×3): each 4×4×4
//! tile of the padded input gives a 2×2×2 tile of output with 64 multiplications per
//! (input, output) channel pair instead of the direct method's 216, at the price of a linear
//! transform of input tiles, filters and output tiles. With the interpolation points 0, ±1 and
//! ∞ the transforms only add, subtract and halve, so rounding stays within a few ulps of the
//! direct sum (the parity tolerances are orders of magnitude wider).
//!
//! Work is done by blocks of tile rows: the input transform writes `V[ξ][c][tile]` for the 64
//! transform points ξ, 64 GEMMs `M_ξ = U_ξ (O×C) · V_ξ (C×tiles)` use the `gemm` crate's
//! micro-kernels, and the output transform turns `M` back into voxels. Along a tile row the
//! transforms are vector operations over whole rows of the input, so they cost a few percent
//! of the products.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::cpu::{OutPtr, matmul};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the Winograd paths of 3×3×3 convolutions (f32, and bf16 on AVX512-BF16) on or off
/// (on by default; process-wide), for benchmarks and parity tests that compare them with the
/// direct implicit GEMM.
pub fn set_winograd(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether [`set_winograd`] left the Winograd paths on (they are on unless turned off).
pub fn winograd_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether a stride-1 correlation with kernel `k`, `c` input and `o` output channels and an
/// output grid `od` takes the Winograd path: 3×3×3 kernels between layers wide enough for the
/// transforms to pay off, on grids of at least 512 tiles (16³ voxels). On smaller grids the
/// blocks are too few and too narrow for the products (on a 2-core AMD EPYC, 512→512 channels
/// on 12³ took 0.41 s against the direct kernel's 0.29 s; 256→256 on 24³ 0.35 s against 0.48 s).
pub(crate) fn applies(k: [usize; 3], c: usize, o: usize, od: [usize; 3]) -> bool {
    let tiles = od.iter().map(|d| d.div_ceil(2)).product::<usize>();
    k == [3, 3, 3] && c >= 16 && o >= 16 && tiles >= 512 && ENABLED.load(Ordering::Relaxed)
}

/// `G` of F(2, 3): the filter transform (4 × 3).
const G: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// Transforms weights packed as `(27 taps, O, C)` (taps z-major, then y, then x) into
/// `U` `(64, O, C)`: `U[ξ] = (G ⊗ G ⊗ G) g` for every channel pair.
pub(crate) fn transform_weights(wp: &[f32], o: usize, c: usize) -> Vec<f32> {
    let oc = o * c;
    assert_eq!(wp.len(), 27 * oc);
    let mut u = vec![0f32; 64 * oc];
    u.par_chunks_mut(oc).enumerate().for_each(|(xi, dst)| {
        let (xa, xb, xc) = (xi / 16, (xi / 4) % 4, xi % 4);
        for a in 0..3 {
            for b in 0..3 {
                for cc in 0..3 {
                    let f = G[xa][a] * G[xb][b] * G[xc][cc];
                    if f == 0.0 {
                        continue;
                    }
                    let tap = &wp[((a * 3 + b) * 3 + cc) * oc..][..oc];
                    for (d, s) in dst.iter_mut().zip(tap) {
                        *d += f * s;
                    }
                }
            }
        }
    });
    u
}

/// `Bᵀ` of F(2, 3) applied to four rows: `out[i] = Bᵀ (r0, r1, r2, r3)` element-wise.
#[inline]
fn input_rows(r: [&[f32]; 4], out: [&mut [f32]; 4]) {
    let [o0, o1, o2, o3] = out;
    let n = o0.len();
    let (r0, r1, r2, r3) = (&r[0][..n], &r[1][..n], &r[2][..n], &r[3][..n]);
    for i in 0..n {
        o0[i] = r0[i] - r2[i];
        o1[i] = r1[i] + r2[i];
        o2[i] = r2[i] - r1[i];
        o3[i] = r1[i] - r3[i];
    }
}

/// `Aᵀ` of F(2, 3) applied to four rows: `(r0 + r1 + r2, r1 − r2 − r3)` element-wise.
#[inline]
fn output_rows(r: [&[f32]; 4], o0: &mut [f32], o1: &mut [f32]) {
    let n = o0.len();
    let (r0, r1, r2, r3) = (&r[0][..n], &r[1][..n], &r[2][..n], &r[3][..n]);
    let o1 = &mut o1[..n];
    for i in 0..n {
        o0[i] = r0[i] + r1[i] + r2[i];
        o1[i] = r1[i] - r2[i] - r3[i];
    }
}

/// Scratch of one block.
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    rows: Vec<f32>,
    zero: Vec<f32>,
}

/// Stride-1 3×3×3 correlation of one padded block of planes `xp` `(C, p0, p1, p2)` with
/// transformed weights `u` `(64, O, C)` ([`transform_weights`]): the same contract as
/// [`correlate_sample`](crate::cpu::correlate::correlate_sample) (output channel `o` starts
/// at `out[o · cstride]`, planes of `(p0−2, p1−2, p2−2)`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn correlate_sample(
    xp: &[f32],
    c: usize,
    p: [usize; 3],
    u: &[f32],
    o: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    cstride: usize,
) {
    let od = [p[0] - 2, p[1] - 2, p[2] - 2];
    let (plane, vp) = (p[1] * p[2], p[0] * p[1] * p[2]);
    let n_out = od[0] * od[1] * od[2];
    assert!(xp.len() == c * vp && u.len() == 64 * o * c);
    assert!(cstride >= n_out && out.len() >= (o - 1) * cstride + n_out);
    // Tiles: `n` along x per row, rows indexed by (tz, ty).
    let n = od[2].div_ceil(2);
    let (tyn, tzn) = (od[1].div_ceil(2), od[0].div_ceil(2));
    let rows_total = tzn * tyn;
    // Rows per block: at least 96 tiles for the products, at most ~12 MB of scratch.
    let per_tile = 64 * (c + o) * 4;
    let max_tiles = ((12 << 20) / per_tile).max(n);
    let r_block = 96usize.div_ceil(n).min(max_tiles / n).clamp(1, rows_total);
    let nblocks = rows_total.div_ceil(r_block);
    // Length of a transformed row: 2n + 2 ≥ p2 (one more when od2 is odd, which reads zero).
    let len = 2 * n + 2;
    let dst = OutPtr(out.as_mut_ptr());
    (0..nblocks).into_par_iter().for_each_init(
        || Scratch {
            v: vec![0f32; 64 * c * r_block * n],
            m: vec![0f32; 64 * o * r_block * n],
            rows: vec![0f32; 32 * len],
            zero: vec![0f32; len],
        },
        |s, bi| {
            let row0 = bi * r_block;
            let nr = r_block.min(rows_total - row0);
            let tb = nr * n;
            let Scratch { v, m, rows, zero } = s;
            // Input transform: V[ξ][ci][r·n + tx].
            for r in 0..nr {
                let (tz, ty) = ((row0 + r) / tyn, (row0 + r) % tyn);
                for ci in 0..c {
                    let chan = &xp[ci * vp..(ci + 1) * vp];
                    let row = |zz: usize, yy: usize| -> &[f32] {
                        let (z, y) = (2 * tz + zz, 2 * ty + yy);
                        if z < p[0] && y < p[1] {
                            &chan[z * plane + y * p[2]..][..p[2]]
                        } else {
                            &zero[..p[2]]
                        }
                    };
                    let (t, sr) = rows.split_at_mut(16 * len);
                    // Along z, for each of the 4 input rows in y: t[a][yy].
                    for yy in 0..4 {
                        let (t0, rest) = t[yy * 4 * len..].split_at_mut(len);
                        let (t1, rest) = rest.split_at_mut(len);
                        let (t2, t3) = rest.split_at_mut(len);
                        input_rows(
                            [row(0, yy), row(1, yy), row(2, yy), row(3, yy)],
                            [
                                &mut t0[..p[2]],
                                &mut t1[..p[2]],
                                &mut t2[..p[2]],
                                &mut t3[..p[2]],
                            ],
                        );
                    }
                    // Along y: s[a][b] from t[a][0..4]; the row tail past p2 is zero.
                    for a in 0..4 {
                        let tr = |yy: usize| &t[(yy * 4 + a) * len..][..p[2]];
                        let (s0, rest) = sr[a * 4 * len..].split_at_mut(len);
                        let (s1, rest) = rest.split_at_mut(len);
                        let (s2, rest) = rest.split_at_mut(len);
                        let s3 = &mut rest[..len];
                        input_rows(
                            [tr(0), tr(1), tr(2), tr(3)],
                            [
                                &mut s0[..p[2]],
                                &mut s1[..p[2]],
                                &mut s2[..p[2]],
                                &mut s3[..p[2]],
                            ],
                        );
                        for sx in [s0, s1, s2, s3] {
                            sx[p[2]..].fill(0.0);
                        }
                    }
                    // Along x, tile by tile, into V.
                    for ab in 0..16 {
                        let sx = &sr[ab * len..][..len];
                        let base = ab * 4;
                        let col = ci * tb + r * n;
                        let (v0, v1, v2, v3) = {
                            let stride = c * tb;
                            let (head, tail) = v.split_at_mut((base + 1) * stride);
                            let v0 = &mut head[base * stride + col..][..n];
                            let (v1s, tail) = tail.split_at_mut(stride);
                            let (v2s, v3s) = tail.split_at_mut(stride);
                            (
                                v0,
                                &mut v1s[col..][..n],
                                &mut v2s[col..][..n],
                                &mut v3s[col..][..n],
                            )
                        };
                        for tx in 0..n {
                            let (e0, o0, e1, o1) =
                                (sx[2 * tx], sx[2 * tx + 1], sx[2 * tx + 2], sx[2 * tx + 3]);
                            v0[tx] = e0 - e1;
                            v1[tx] = o0 + e1;
                            v2[tx] = e1 - o0;
                            v3[tx] = o0 - o1;
                        }
                    }
                }
            }
            // The 64 products M_ξ (O × tb) = U_ξ (O × C) · V_ξ (C × tb).
            for xi in 0..64 {
                // SAFETY: U_ξ is O×C with row stride C; V_ξ is C×tb with row stride tb (its
                // rows hold `tb` of the block's `r_block·n` columns); M_ξ is O×tb.
                unsafe {
                    matmul(
                        [o, tb, c],
                        m.as_mut_ptr().add(xi * o * tb),
                        [tb, 1],
                        false,
                        u.as_ptr().add(xi * o * c),
                        [c, 1],
                        v.as_ptr().add(xi * c * tb),
                        [tb, 1],
                    );
                }
            }
            // Output transform, one output channel and tile row at a time. t1 holds the 32
            // rows (dz, b, cc) after z, at (dz·16 + b·4 + cc)·n; t2 the 16 rows (dz, dy, cc)
            // after y, at ((dz·2 + dy)·4 + cc)·n.
            let (t1, t2) = rows.split_at_mut(32 * n);
            for oc in 0..o {
                let bo = bias.map_or(0.0, |b| b[oc]);
                for r in 0..nr {
                    let (tz, ty) = ((row0 + r) / tyn, (row0 + r) % tyn);
                    let mrow = |xi: usize| &m[(xi * o + oc) * tb + r * n..][..n];
                    let (z0, z1) = t1.split_at_mut(16 * n);
                    for bc in 0..16 {
                        output_rows(
                            [mrow(bc), mrow(16 + bc), mrow(32 + bc), mrow(48 + bc)],
                            &mut z0[bc * n..][..n],
                            &mut z1[bc * n..][..n],
                        );
                    }
                    let t1r = |k: usize| &t1[k * n..][..n];
                    for dz in 0..2 {
                        let (y0, y1) = t2[dz * 8 * n..].split_at_mut(4 * n);
                        for cc in 0..4 {
                            let k = dz * 16 + cc;
                            output_rows(
                                [t1r(k), t1r(k + 4), t1r(k + 8), t1r(k + 12)],
                                &mut y0[cc * n..][..n],
                                &mut y1[cc * n..][..n],
                            );
                        }
                    }
                    // Along x, tile by tile, straight into the output rows.
                    for dz in 0..2 {
                        let z = 2 * tz + dz;
                        if z >= od[0] {
                            continue;
                        }
                        for dy in 0..2 {
                            let y = 2 * ty + dy;
                            if y >= od[1] {
                                continue;
                            }
                            let t2r = |cc: usize| &t2[((dz * 2 + dy) * 4 + cc) * n..][..n];
                            let (a0, a1, a2, a3) = (t2r(0), t2r(1), t2r(2), t2r(3));
                            let base = oc * cstride + (z * od[1] + y) * od[2];
                            // SAFETY: output row (oc, z, y) belongs to this block's tile row
                            // only, and lies inside `out` (checked above).
                            let orow = unsafe {
                                std::slice::from_raw_parts_mut(dst.get().add(base), od[2])
                            };
                            let pairs = od[2] / 2;
                            for tx in 0..pairs {
                                orow[2 * tx] = a0[tx] + a1[tx] + a2[tx] + bo;
                                orow[2 * tx + 1] = a1[tx] - a2[tx] - a3[tx] + bo;
                            }
                            if od[2] % 2 == 1 {
                                orow[2 * pairs] = a0[pairs] + a1[pairs] + a2[pairs] + bo;
                            }
                        }
                    }
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::correlate;

    /// A small deterministic pseudo-random sequence in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn winograd_matches_the_direct_correlation_on_odd_and_even_grids() {
        for (seed, (c, o, p)) in [
            (16, 16, [6, 6, 6]),
            (17, 20, [7, 5, 9]),
            (24, 16, [3, 4, 3]),
            (32, 33, [10, 3, 12]),
        ]
        .into_iter()
        .enumerate()
        {
            let xp = noise(c * p[0] * p[1] * p[2], seed as u64);
            let w = noise(o * c * 27, 100 + seed as u64);
            let bias = noise(o, 200 + seed as u64);
            let wp = correlate::pack_weights(&w, o, c, 27, false);
            let n_out = (p[0] - 2) * (p[1] - 2) * (p[2] - 2);
            let mut direct = vec![0f32; o * n_out];
            correlate::correlate_sample(
                &xp,
                c,
                p,
                &wp,
                o,
                [3, 3, 3],
                Some(&bias),
                &mut direct,
                n_out,
            );
            let u = transform_weights(&wp, o, c);
            let mut wino = vec![f32::NAN; o * n_out];
            correlate_sample(&xp, c, p, &u, o, Some(&bias), &mut wino, n_out);
            let scale = direct.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = direct
                .iter()
                .zip(&wino)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 2e-6 * scale.max(1.0) * (c as f32).sqrt(),
                "c {c} o {o} p {p:?}: worst difference {worst} (scale {scale})"
            );
        }
    }
}
