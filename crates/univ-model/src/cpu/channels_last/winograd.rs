//! The stride-1 3×3×3 correlation in bf16 by Winograd's F(2×2×2, 3×3×3) on the channels-last
//! kernels: 64 products per (input, output) channel pair and 2×2×2 tile of output instead of
//! the direct method's 216, so 3.4× fewer `VDPBF16PS` for the same output.
//!
//! The transforms are those of [`crate::cpu::winograd`] (interpolation points 0, ±1, ∞): the
//! filters' `U = G g Gᵀ` is made in f32 from the f32 weights and rounded to bf16 once; the
//! input's `V = Bᵀ d B` (sums and differences only) is made in f32 from the bf16 input lines
//! that the direct kernel reads too ([`super::pad_pairs_cl`]) and rounded to bf16; the 64
//! products `M_ξ = V_ξ · U_ξ` over the channels, one per transform point ξ, are the direct
//! kernel's 1-tap product ([`super::run_block`], positions = tiles); the output transform
//! `Aᵀ M A` (sums and differences) runs in f32. The rounding of `V` and `U` adds error to the
//! direct bf16 kernel's (the sums carry a few input values each): measured on the networks,
//! see the README.
//!
//! Work goes by blocks of 32–192 consecutive tiles (fewer where the channels are many): the
//! input transform writes the block's 64 `V_ξ` (`ξ`-major, then channel blocks, then tiles:
//! each `V_ξ` is the layout the kernel reads, tiles as positions), then for each pair of
//! `(z, y)` points the four products along x go to the block's buffers, where the x part
//! of the output transform folds them into two and the rest adds them into the 8 output
//! voxels of each tile (`Y`, position-major); the output rows are then transposed into the
//! channel-first output as the direct kernel's are ([`super::scatter_run`]).
//!
//! Inside a 32-channel block the transform writes the even channels' 16 bf16 values, then
//! the odd ones' (one `VCVTNEPS2BF16` each), so a line's pairs are not the direct layout's
//! `(2k, 2k+1)`; the weights are packed in the same order ([`slot_channel`]).

use rayon::prelude::*;

use super::{Block, CB, ClWeights, Lines, Runner, SLACK_POS, run_block, to_bf16_bits};
use crate::cpu::OutPtr;
use crate::cpu::correlate::ConvWeights;

/// Transform points per tile (4 × 4 × 4).
const XI: usize = 64;

/// `Aᵀ` of F(2, 3): output `d` of a tile takes `A[d][i] · M_i` along each axis.
const A: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];

/// The fewest multiply-adds (of the direct method) for which a layer takes this path.
///
/// Every layer run by Winograd adds about twice the direct bf16 kernel's rounding error to its
/// output (the transformed operands are sums of several inputs and weights, rounded to bf16),
/// whatever its size, while the time it saves grows with its products. So only the largest
/// layers take it: in the 96³ U-Net window the four of 7·10¹⁰–2.9·10¹¹ multiply-adds (192→64
/// and 64→64 at 96³, 384→128 at 48³, 768→256 at 24³; three quarters of the window's products),
/// and the seven smaller ones stay direct. Measured on an AMD Zen 4 over four weight draws
/// (see the README), this takes the U-Net's largest bf16 logit error from 0.10–0.18 to
/// 0.08–0.15, below OpenVINO bf16's in each draw, with the window still 0.68× OpenVINO's.
pub(crate) const MIN_MACS: u64 = 50_000_000_000;

/// Whether a stride-1 correlation with kernel `k`, `c` input and `o` output channels and an
/// output grid `od` takes this path on `kernel`: 3×3×3 kernels between layers of at least 32
/// channels on grids of at least 512 tiles, with at least [`MIN_MACS`] multiply-adds, on the
/// AVX512-BF16 kernel (on AMX, whose products are several times faster, the transforms'
/// share is larger and the trade is not measured: it stays direct).
pub(crate) fn applies(
    kernel: crate::cpu::bf16::Bf16Kernel,
    k: [usize; 3],
    c: usize,
    o: usize,
    od: [usize; 3],
) -> bool {
    let tiles = od.iter().map(|d| d.div_ceil(2)).product::<usize>();
    let macs = (27 * c * o) as u64 * od.iter().map(|&d| d as u64).product::<u64>();
    kernel == crate::cpu::bf16::Bf16Kernel::Avx512Bf16
        && k == [3, 3, 3]
        && c >= 32
        && o >= 32
        && tiles >= 512
        && macs >= MIN_MACS
        && crate::cpu::winograd::winograd_enabled()
}

/// The transformed weights: one 1-tap [`ClWeights`] per transform point.
pub(crate) struct WinoWeights {
    u: Vec<ClWeights>,
    o: usize,
    o_pad: usize,
    ncb: usize,
}

impl WinoWeights {
    /// The input channel count rounded up to 32 (what [`super::pad_pairs_cl`] needs).
    pub(crate) fn c_pad(&self) -> usize {
        self.ncb * CB
    }
}

/// The channel that slot `s` of a transformed line holds (slots `2k`, `2k + 1` are word `k`):
/// within each block of 32, slots 0–15 hold the even channels, 16–31 the odd ones.
#[inline]
fn slot_channel(s: usize) -> usize {
    let j = s % CB;
    s - j + if j < 16 { 2 * j } else { 2 * (j - 16) + 1 }
}

/// `U = (G ⊗ G ⊗ G) g` of one 3 × 3 × 3 filter (`g[(a·3 + b)·3 + c]`, `a` along z), axis by
/// axis; `U[ξ]` ordered as [`input_transform`]'s points.
#[inline(always)]
fn filter_transform(g: &[f32; 27]) -> [f32; XI] {
    let gt = |r: [f32; 3]| {
        [
            r[0],
            0.5 * (r[0] + r[1] + r[2]),
            0.5 * (r[0] - r[1] + r[2]),
            r[2],
        ]
    };
    // Along x: h[(a·3 + b)·4 + xc].
    let mut h = [0f32; 36];
    for ab in 0..9 {
        h[ab * 4..ab * 4 + 4].copy_from_slice(&gt([g[ab * 3], g[ab * 3 + 1], g[ab * 3 + 2]]));
    }
    // Along y: q[(a·4 + xb)·4 + xc].
    let mut q = [0f32; 48];
    for a in 0..3 {
        for xc in 0..4 {
            let r = gt(std::array::from_fn(|b| h[(a * 3 + b) * 4 + xc]));
            for (xb, v) in r.into_iter().enumerate() {
                q[(a * 4 + xb) * 4 + xc] = v;
            }
        }
    }
    // Along z.
    let mut u = [0f32; XI];
    for bc in 0..16 {
        let r = gt(std::array::from_fn(|a| q[a * 16 + bc]));
        for (xa, v) in r.into_iter().enumerate() {
            u[xa * 16 + bc] = v;
        }
    }
    u
}

/// Transforms and packs a 3×3×3 correlation's weights (as [`ConvWeights`] gives them): one
/// task per block of 32 output channels, writing that block of all 64 points' layouts.
pub(crate) fn pack_weights(weights: ConvWeights<'_>, o: usize, c: usize) -> WinoWeights {
    let weight = |oi: usize, ci: usize, t: usize| match weights {
        ConvWeights::Raw(w) => w[(oi * c + ci) * 27 + t],
        ConvWeights::Packed(wp) => wp[(t * o + oi) * c + ci],
    };
    let (c_pad, o_pad) = (c.next_multiple_of(CB), o.next_multiple_of(32));
    let ncb = c_pad / CB;
    let per_block = ncb * 2 * 256;
    let mut u: Vec<ClWeights> = (0..XI)
        .map(|_| {
            let mut data = Lines::default();
            data.resize(o_pad / 32 * per_block);
            ClWeights {
                data,
                taps: 1,
                o,
                o_pad,
                ncb,
                // Every pair of a block runs: the slot order spreads a partial block's
                // channels over all of them.
                c: c_pad,
            }
        })
        .collect();
    let mut blocks: Vec<Vec<&mut [u32]>> = (0..o_pad / 32).map(|_| Vec::new()).collect();
    for w in u.iter_mut() {
        for (ob, chunk) in w.data.words_mut().chunks_mut(per_block).enumerate() {
            blocks[ob].push(chunk);
        }
    }
    blocks
        .into_par_iter()
        .enumerate()
        .for_each(|(ob, mut dst)| {
            for oi in 32 * ob..(32 * ob + 32).min(o) {
                let (half, n) = ((oi % 32) / 16, oi % 16);
                for ci in 0..c {
                    let g: [f32; 27] = std::array::from_fn(|t| weight(oi, ci, t));
                    let u = filter_transform(&g);
                    // The slot of channel `ci` (the inverse of `slot_channel`).
                    let j = ci % CB;
                    let slot = if j.is_multiple_of(2) {
                        j / 2
                    } else {
                        16 + j / 2
                    };
                    debug_assert_eq!(slot_channel(ci - j + slot), ci);
                    let idx = ((ci / CB) * 2 + half) * 256 + (slot / 2) * 16 + n;
                    let shift = 16 * (slot % 2);
                    for (d, v) in dst.iter_mut().zip(u) {
                        d[idx] |= to_bf16_bits(v) << shift;
                    }
                }
            }
        });
    WinoWeights { u, o, o_pad, ncb }
}

/// Row `a` of `Bᵀ` of F(2, 3) as `d[i] + sign · d[j]`: `(i, j, sign)`.
const BT: [(usize, usize, f32); 4] = [(0, 2, -1.0), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0)];

/// The tile rows that the points `(a, b, ·)` read: `(z, y)` offsets within the tile for
/// `r = zi·2 + yi`, `zi` and `yi` picking the two terms of rows `a` and `b` of `Bᵀ`.
fn rows_ab(a: usize, b: usize) -> [(usize, usize); 4] {
    let (za, ya) = ([BT[a].0, BT[a].1], [BT[b].0, BT[b].1]);
    std::array::from_fn(|r| (za[r / 2], ya[r % 2]))
}

/// The input transform of one tile and channel block for the four points `(a, b, 0..4)` in
/// portable code: `rows` are the 4 lines from the tile's first x of the rows [`rows_ab`]
/// names; point `(a, b, c)`'s line goes to `out[c · stride..][..16]`. Each value is
/// `V = Σ ± d` over 8 inputs, summed in f32 as z, then y, then x (the order the vector code
/// uses: the same words).
fn transform_ab(rows: &[&[u32]; 4], ab: [usize; 2], out: &mut [u32], stride: usize) {
    let (sa, sb) = (BT[ab[0]].2, BT[ab[1]].2);
    for h in 0..2 {
        for j in 0..16 {
            let d = |r: usize, x: usize| {
                let w = rows[r][x * 16 + j];
                f32::from_bits(if h == 0 { w << 16 } else { w & 0xffff_0000 })
            };
            let sx: [f32; 4] = std::array::from_fn(|x| {
                let t0 = d(0, x) + sa * d(2, x);
                let t1 = d(1, x) + sa * d(3, x);
                t0 + sb * t1
            });
            let v = [sx[0] - sx[2], sx[1] + sx[2], sx[2] - sx[1], sx[1] - sx[3]];
            // Slot h·16 + j: word (h·16 + j) / 2, half j % 2.
            let (word, shift) = (h * 8 + j / 2, 16 * (j % 2));
            for (c, v) in v.iter().enumerate() {
                let dst = &mut out[c * stride + word];
                let bits = to_bf16_bits(*v) << shift;
                *dst = if shift == 0 { bits } else { *dst | bits };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::BT;
    use std::arch::x86_64::*;

    /// [`super::transform_ab`] on 16-lane vectors, rounding with `VCVTNE2PS2BF16` (the same
    /// words; `x + s·y` with `s = ±1` is one rounding, as the sum or difference is).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16; every `rows[i]` must point at 64 readable
    /// words, `out + c·stride` at 16 writable ones for `c < 4`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn transform_ab(
        rows: &[*const u32; 4],
        ab: [usize; 2],
        out: *mut u32,
        stride: usize,
    ) {
        // SAFETY: the loads read the 4 lines of each row, the stores one line per point.
        unsafe {
            let (sa, sb) = (_mm512_set1_ps(BT[ab[0]].2), _mm512_set1_ps(BT[ab[1]].2));
            let odd = _mm512_set1_epi32(0xffff_0000u32 as i32);
            let mut v = [[_mm512_setzero_ps(); 4]; 2];
            for x in 0..4 {
                let w: [__m512i; 4] =
                    std::array::from_fn(|r| _mm512_loadu_si512(rows[r].add(x * 16).cast()));
                for (h, v) in v.iter_mut().enumerate() {
                    let d = w.map(|w| {
                        _mm512_castsi512_ps(if h == 0 {
                            _mm512_slli_epi32::<16>(w)
                        } else {
                            _mm512_and_si512(w, odd)
                        })
                    });
                    let t0 = _mm512_fmadd_ps(sa, d[2], d[0]);
                    let t1 = _mm512_fmadd_ps(sa, d[3], d[1]);
                    v[x] = _mm512_fmadd_ps(sb, t1, t0);
                }
            }
            for (c, (e, o)) in bt(v[0]).into_iter().zip(bt(v[1])).enumerate() {
                let bf = _mm512_cvtne2ps_pbh(o, e);
                _mm512_storeu_si512(
                    out.add(c * stride).cast(),
                    std::mem::transmute::<__m512bh, __m512i>(bf),
                );
            }
        }
    }

    /// `Bᵀ` of F(2, 3) on four vectors.
    #[inline(always)]
    unsafe fn bt(d: [__m512; 4]) -> [__m512; 4] {
        // SAFETY: only called from functions compiled with AVX-512F.
        unsafe {
            [
                _mm512_sub_ps(d[0], d[2]),
                _mm512_add_ps(d[1], d[2]),
                _mm512_sub_ps(d[2], d[1]),
                _mm512_sub_ps(d[1], d[3]),
            ]
        }
    }

    /// [`super::accumulate`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate(
        m: &[f32],
        y: &mut [f32],
        strides: [usize; 2],
        nb: usize,
        o_pad: usize,
        ab: [usize; 2],
    ) {
        super::accumulate(m, y, strides, nb, o_pad, ab)
    }
}

/// Folds the four products `m` (points `(a, b, 0..4)`, each `T` position-major rows of `O'`
/// from `c · strides[0]`) into the block's output voxels `y` (row `tile·2 + dx` of `O'` from
/// `(dz·2 + dy) · strides[1]`): the x part of `Aᵀ M A` here, the z and y parts by the signs
/// `A[dz][a] · A[dy][b]`.
#[inline(always)]
fn accumulate(
    m: &[f32],
    y: &mut [f32],
    strides: [usize; 2],
    nb: usize,
    o_pad: usize,
    ab: [usize; 2],
) {
    let [a, b] = ab;
    let [ms, ys] = strides;
    for i in 0..nb {
        let row = |c: usize| &m[c * ms + i * o_pad..][..o_pad];
        let (m0, m1, m2, m3) = (row(0), row(1), row(2), row(3));
        for dz in 0..2 {
            for dy in 0..2 {
                let s = A[dz][a] * A[dy][b];
                if s == 0.0 {
                    continue;
                }
                let base = (dz * 2 + dy) * ys + i * 2 * o_pad;
                let (y0, y1) = y[base..base + 2 * o_pad].split_at_mut(o_pad);
                for k in 0..o_pad {
                    y0[k] += s * (m0[k] + m1[k] + m2[k]);
                    y1[k] += s * (m1[k] - m2[k] - m3[k]);
                }
            }
        }
    }
}

/// Tiles per block: up to 192 (the weights of a point are read once per block), fewer where
/// the block's output buffer (8 voxels × `O'` floats per tile) would pass 1 MB, a multiple of
/// 32 (the kernel's position blocks), and at least four blocks per thread where the grid
/// allows.
fn block_tiles(o_pad: usize, tiles: usize) -> usize {
    let by_cache = ((1 << 20) / (32 * o_pad)).clamp(32, 192);
    let by_balance = tiles / (4 * rayon::current_num_threads().max(1));
    by_cache.min(by_balance).max(32) / 32 * 32
}

/// Per-thread buffers of one block.
struct Scratch {
    v: Lines,
    m: Lines,
    y: Vec<f32>,
    zero: Vec<u32>,
}

/// The stride-1 3×3×3 correlation of one padded block of planes: `xp` in the layout of
/// [`super::pad_pairs_cl`] (with its slack), `p` its padded extent; output channel `o`
/// starts at `out[o · cstride]` (planes of `(p0−2, p1−2, p2−2)`, plus the bias).
///
/// For each block of tiles and each `(a, b)` of the 16 point pairs: the input transform of
/// the four points `(a, b, 0..4)` (the block's `V` for them: 4 × channel blocks × tiles
/// lines), their four products, and the fold of those into the tiles' output voxels; then
/// the voxels are written out. Only a quarter of `V` exists at a time, so it stays in L2.
#[allow(clippy::too_many_arguments)]
pub(crate) fn correlate_sample(
    runner: Runner,
    xp: &[u32],
    p: [usize; 3],
    w: &WinoWeights,
    bias: Option<&[f32]>,
    out: &mut [f32],
    cstride: usize,
) {
    let od = [p[0] - 2, p[1] - 2, p[2] - 2];
    let nt = [od[0].div_ceil(2), od[1].div_ceil(2), od[2].div_ceil(2)];
    let tiles = nt[0] * nt[1] * nt[2];
    let vp = p[0] * p[1] * p[2];
    let n_out = od[0] * od[1] * od[2];
    let (ncb, o, o_pad) = (w.ncb, w.o, w.o_pad);
    assert!(xp.len() == ncb * vp * 16 + SLACK_POS * 16);
    assert!(cstride >= n_out && out.len() >= (o - 1) * cstride + n_out);
    let t = block_tiles(o_pad, tiles);
    // One line more than a point's data, so that the lines the transform writes for a tile
    // (and the rows the products read) do not share one set of the L1 cache (a stride of a
    // multiple of 4 KB would).
    let xi_stride = (ncb * t + 1) * 16;
    let m_stride = t * o_pad + 16;
    let y_stride = 2 * t * o_pad + 16;
    #[cfg(target_arch = "x86_64")]
    let (vector, vector_add) = (
        super::super::bf16::Bf16Kernel::Avx512Bf16.check().is_ok(),
        std::arch::is_x86_feature_detected!("avx512f"),
    );
    let dst = OutPtr(out.as_mut_ptr());
    (0..tiles.div_ceil(t)).into_par_iter().for_each_init(
        || {
            let (mut v, mut m) = (Lines::default(), Lines::default());
            v.resize(4 * xi_stride);
            m.resize(4 * m_stride);
            Scratch {
                v,
                m,
                y: vec![0f32; 4 * y_stride],
                zero: vec![0u32; 64],
            }
        },
        |s, bi| {
            let t0 = bi * t;
            let nb = t.min(tiles - t0);
            let coords = |i: usize| {
                let q = t0 + i;
                (q / (nt[1] * nt[2]), (q / nt[2]) % nt[1], q % nt[2])
            };
            let valid: Vec<u32> = (0..t / 32)
                .map(|j| match nb.saturating_sub(32 * j) {
                    n @ 0..32 => (1u32 << n) - 1,
                    _ => !0,
                })
                .collect();
            s.y.fill(0.0);
            for a in 0..4 {
                for b in 0..4 {
                    let timer = crate::runtime::stage("conv/winograd input [thread s]");
                    let offs = rows_ab(a, b);
                    let v = s.v.words_mut();
                    // Channel blocks outermost: 4 input rows and 4 output lines stream at
                    // a time (the prefetchers follow them; all blocks at once would be 24
                    // streams and more).
                    for cb in 0..ncb {
                        for i in 0..nb {
                            let (tz, ty, tx) = coords(i);
                            // Rows past the padded extent (odd output extents) read zeros;
                            // a row's fourth line past its end reads the next row's first
                            // (or the slack), which only the dropped output x uses.
                            let rows: [&[u32]; 4] = offs.map(|(dz, dy)| {
                                let (z, y) = (2 * tz + dz, 2 * ty + dy);
                                if z < p[0] && y < p[1] {
                                    &xp[(((cb * p[0] + z) * p[1] + y) * p[2] + 2 * tx) * 16..][..64]
                                } else {
                                    &s.zero[..]
                                }
                            });
                            let out = &mut v[(cb * t + i) * 16..];
                            #[cfg(target_arch = "x86_64")]
                            if vector {
                                let ptrs = rows.map(|r| r.as_ptr());
                                // SAFETY: the CPU has the features; each row holds 64 words;
                                // `out` reaches line 3·(ncb·T + 1) + cb·T + i of `V`.
                                unsafe {
                                    avx512::transform_ab(&ptrs, [a, b], out.as_mut_ptr(), xi_stride)
                                };
                                continue;
                            }
                            transform_ab(&rows, [a, b], out, xi_stride);
                        }
                    }
                    drop(timer);
                    let timer = crate::runtime::stage("conv/winograd gemm [thread s]");
                    let v = s.v.words();
                    for c in 0..4 {
                        let block = Block {
                            x: &v[c * xi_stride..],
                            vp: t,
                            q0: 0,
                            len_pad: t,
                            taps: &[0],
                            w: &w.u[(a * 4 + b) * 4 + c],
                            valid: valid.clone(),
                            kc_blocks: ncb,
                        };
                        run_block(
                            runner,
                            &block,
                            &mut s.m.floats_mut()[c * m_stride..][..t * o_pad],
                        );
                    }
                    drop(timer);
                    let _timer = crate::runtime::stage("conv/winograd output [thread s]");
                    let m = &s.m.floats_mut()[..4 * m_stride];
                    let strides = [m_stride, y_stride];
                    #[cfg(target_arch = "x86_64")]
                    if vector_add {
                        // SAFETY: the CPU has AVX-512F.
                        unsafe { avx512::accumulate(m, &mut s.y, strides, nb, o_pad, [a, b]) };
                        continue;
                    }
                    accumulate(m, &mut s.y, strides, nb, o_pad, [a, b]);
                }
            }
            // The block's output rows: for each (dz, dy), runs of tiles along one tile row.
            let _timer = crate::runtime::stage("conv/winograd scatter [thread s]");
            for dzy in 0..4 {
                let (dz, dy) = (dzy / 2, dzy % 2);
                let mut i0 = 0;
                while i0 < nb {
                    let (tz, ty, tx0) = coords(i0);
                    let run = (nb - i0).min(nt[2] - tx0);
                    let (z, y) = (2 * tz + dz, 2 * ty + dy);
                    if z < od[0] && y < od[1] {
                        let n = (2 * run).min(od[2] - 2 * tx0);
                        let rows = &s.y[dzy * y_stride + i0 * 2 * o_pad..][..n * o_pad];
                        let base = (z * od[1] + y) * od[2] + 2 * tx0;
                        // SAFETY: each output voxel belongs to one tile, each tile to one
                        // block; the row lies inside `out` (checked above).
                        unsafe {
                            super::scatter_rows(
                                rows,
                                o_pad,
                                n,
                                o,
                                bias,
                                dst.get().add(base),
                                cstride,
                            )
                        };
                    }
                    i0 += run;
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::bf16::Bf16Kernel;

    #[test]
    fn slots_cover_each_channel_of_a_block_once() {
        let mut seen = [false; 2 * CB];
        for s in 0..2 * CB {
            let ci = slot_channel(s);
            assert!(ci / CB == s / CB && !seen[ci], "slot {s} -> {ci}");
            seen[ci] = true;
        }
    }

    /// Winograd in bf16 against the f32 direct correlation, beside the direct bf16 kernel on
    /// the same input: odd and even grids, channel counts that are not multiples of 32 (the
    /// slot order's zeros), one block and several blocks of tiles, with a bias.
    fn check(runner: Runner) {
        use crate::cpu::channels_last::tests::{direct_on_lines, rand_vec, rel_err};
        use crate::cpu::correlate::{self, pack_weights as pack_f32, pad_sample};
        for (c, o, dhw) in [
            (32, 32, [6, 6, 6]),
            (48, 40, [5, 9, 11]),
            (64, 48, [7, 4, 13]),
            (96, 32, [10, 12, 9]),
            (40, 80, [3, 3, 3]),
        ] {
            let (k, pad) = ([3, 3, 3], [1, 1, 1]);
            let vol: usize = dhw.iter().product();
            let hw = dhw[1] * dhw[2];
            // A smooth field plus noise, as feature maps are.
            let noise = rand_vec(c * vol, 21);
            let x: Vec<f32> = (0..c * vol)
                .map(|i| {
                    let (ci, q) = (i / vol, i % vol);
                    let (z, y, xx) = (q / hw, (q / dhw[2]) % dhw[1], q % dhw[2]);
                    ((z + 2 * y + 3 * xx + ci) as f32 * 0.3).sin() + 0.3 * noise[i]
                })
                .collect();
            let w = rand_vec(o * c * 27, 23);
            let bias = rand_vec(o, 25);
            let wp = pack_f32(&w, o, c, 27, false);
            let (xp, p) = pad_sample(|ci| &x[ci * vol..(ci + 1) * vol], c, dhw, pad);
            let mut want = vec![f32::NAN; o * vol];
            correlate::correlate_sample(&xp, c, p, &wp, o, k, Some(&bias), &mut want, vol);
            let cl = super::super::pack_weights_cl(&wp, 27, o, c);
            let wino = pack_weights(ConvWeights::Packed(&wp), o, c);
            assert_eq!(cl.c_pad(), wino.c_pad());
            let (xcl, direct) = direct_on_lines(runner, &x, dhw, p, &cl, o, &bias);
            let mut got = vec![f32::NAN; o * vol];
            correlate_sample(runner, xcl.words(), p, &wino, Some(&bias), &mut got, vol);
            assert!(got.iter().all(|v| v.is_finite()), "{runner:?}: all written");
            let (e_wino, e_direct) = (rel_err(&got, &want), rel_err(&direct, &want));
            eprintln!(
                "{runner:?} c={c} o={o} {dhw:?}: Winograd {e_wino:.2e}, direct {e_direct:.2e} \
                 of the output scale against f32"
            );
            assert!(
                e_wino < 1.5e-2 && e_wino < 4.0 * e_direct.max(1e-3),
                "{runner:?} c={c} o={o} {dhw:?}: Winograd {e_wino}, direct {e_direct}"
            );
        }
    }

    #[test]
    fn winograd_logic_matches_f32_on_the_tile_model() {
        check(Runner::SoftAmx);
    }

    /// Runs where the CPU has AVX512-BF16, skipped (with the reason) elsewhere.
    #[test]
    fn winograd_avx512bf16_matches_f32_where_present() {
        match Bf16Kernel::Avx512Bf16.check() {
            Ok(()) => check(Runner::Kernel(Bf16Kernel::Avx512Bf16)),
            Err(why) => eprintln!("skipping the AVX512-BF16 Winograd: {why}"),
        }
    }

    /// In the 96³ U-Net window exactly the four largest 3×3×3 layers take the path, on the
    /// AVX512-BF16 kernel only (no test turns the process-wide switch off).
    #[test]
    fn only_the_largest_unet_layers_take_winograd() {
        // (input channels, output channels, grid side) of the U-Net's 3×3×3 convolutions.
        let layers = [
            (1, 32, 96),
            (32, 64, 96),
            (64, 64, 48),
            (64, 128, 48),
            (128, 128, 24),
            (128, 256, 24),
            (256, 256, 12),
            (256, 512, 12),
            (768, 256, 24),
            (256, 256, 24),
            (384, 128, 48),
            (128, 128, 48),
            (192, 64, 96),
            (64, 64, 96),
        ];
        let taking = |kernel| -> Vec<(usize, usize, usize)> {
            layers
                .into_iter()
                .filter(|&(c, o, d)| applies(kernel, [3, 3, 3], c, o, [d; 3]))
                .collect()
        };
        assert_eq!(
            taking(Bf16Kernel::Avx512Bf16),
            [(768, 256, 24), (384, 128, 48), (192, 64, 96), (64, 64, 96)]
        );
        assert!(taking(Bf16Kernel::Amx).is_empty());
        assert!(!applies(
            Bf16Kernel::Avx512Bf16,
            [1, 3, 3],
            192,
            64,
            [96; 3]
        ));
    }

    /// The AVX-512 input transform writes the same words as the portable one, for every
    /// pair of points.
    #[test]
    fn vector_transform_matches_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        {
            if Bf16Kernel::Avx512Bf16.check().is_err() {
                eprintln!("skipping: no AVX512-BF16 here");
                return;
            }
            let words: Vec<Vec<u32>> = (0..4u64)
                .map(|r| {
                    let lo = super::super::tests::rand_vec(64, 40 + r);
                    let hi = super::super::tests::rand_vec(64, 80 + r);
                    lo.iter()
                        .zip(&hi)
                        .map(|(l, h)| to_bf16_bits(*l) | to_bf16_bits(*h) << 16)
                        .collect()
                })
                .collect();
            let rows: [&[u32]; 4] = std::array::from_fn(|i| words[i].as_slice());
            let stride = 48;
            for ab in 0..16 {
                let ab = [ab / 4, ab % 4];
                let (mut x, mut y) = (vec![7u32; 4 * stride], vec![9u32; 4 * stride]);
                transform_ab(&rows, ab, &mut x, stride);
                // SAFETY: the CPU has the features; 64 words per row, 16 per point.
                unsafe {
                    avx512::transform_ab(&rows.map(|r| r.as_ptr()), ab, y.as_mut_ptr(), stride)
                };
                for c in 0..4 {
                    assert_eq!(
                        x[c * stride..][..16],
                        y[c * stride..][..16],
                        "points {ab:?} {c}"
                    );
                }
            }
        }
    }
}
