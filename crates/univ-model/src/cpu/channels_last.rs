//! The bf16 convolution (AMX and AVX512-BF16) in a channels-last pair layout.
//!
//! [`crate::cpu::bf16`]'s kernels read the input as planes of channel pairs, so one tile of
//! input is 16 pair rows that lie a whole padded volume apart and, for two of every three
//! taps, straddle two cache lines each. Here the input is blocked channels-last instead:
//! for each block of 32 channels, every padded position holds its 16 pairs in one 64-byte
//! line ([`pad_pairs_cl`]). A tile of input is then 16 consecutive positions, 1 KB read
//! front to back, and the next tap along x reads the same lines shifted by one, so the input
//! a block of positions needs over all taps stays in L1 while every block of output channels
//! uses it. The tiles' roles swap accordingly: input positions are the rows of the `A`
//! operand, the weights (packed as 16 pairs × 16 output channels, [`pack_weights_cl`]) the
//! `B` operand, and the accumulators hold positions × output channels, transposed back to
//! channel-first planes when they are written out ([`correlate_sample`]).
//!
//! The AVX512-BF16 kernel ([`Bf16Kernel::Avx512Bf16`](super::bf16::Bf16Kernel)) reads the
//! same layout: one input pair broadcast from a position's line against the 16 output
//! channels of a weight-tile row, 12 positions × 32 output channels in 24 vector accumulators
//! (8 × 48 where the channel count asks), `VDPBF16PS` after a broadcast that never straddles
//! a line, unlike the plane layout's unaligned vector loads.

use rayon::prelude::*;

pub(crate) mod winograd;

use super::bf16::{Runner, TileConfig, Tiles, to_bf16_bits};
use crate::cpu::OutPtr;
use crate::cpu::correlate::Geometry;

/// Channels per block of the layout (16 pairs: one 64-byte tile row).
const CB: usize = 32;

/// Positions past the end of the blocked input that the kernel may read (the last, partial
/// block of 32 positions beyond the last valid output; their results are dropped).
const SLACK_POS: usize = 64;

/// One cache line of words.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// A buffer of words that starts on a cache line (the kernel's tile rows are 64-byte lines:
/// unaligned, every row would straddle two).
#[derive(Default)]
pub(crate) struct Lines {
    /// Every line ever grown into (initialised: zeros at first).
    buf: Vec<Line>,
    /// The lines in use.
    len: usize,
}

impl Lines {
    /// `n` words in use (`n` a multiple of 16). A buffer too small is replaced by zeros (not
    /// copied); otherwise the words keep whatever they held, so callers that need zeros
    /// write them (every caller here writes every word it reads, but for [`pack_with`]'s
    /// fresh buffer).
    fn resize(&mut self, n: usize) {
        debug_assert!(n.is_multiple_of(16));
        let lines = n / 16;
        if lines > self.buf.len() {
            self.buf = Vec::new();
            self.buf.resize(lines, Line([0; 16]));
        }
        self.len = lines;
    }

    /// The words.
    pub(crate) fn words(&self) -> &[u32] {
        let lines = &self.buf[..self.len];
        // SAFETY: `Line` is 16 `u32` without padding (`repr(C)`, 64 bytes).
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 16) }
    }

    /// The words, mutably.
    fn words_mut(&mut self) -> &mut [u32] {
        let lines = &mut self.buf[..self.len];
        // SAFETY: as in `words`.
        unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 16) }
    }

    /// The words as `f32` (the kernel's accumulators), mutably.
    fn floats_mut(&mut self) -> &mut [f32] {
        let lines = &mut self.buf[..self.len];
        // SAFETY: as in `words`; every bit pattern is a valid `f32`.
        unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 16) }
    }

    /// The input buffer left by the last convolution (or a new one): reusing it spares
    /// clearing (and on a fresh allocation, faulting in) a buffer of up to a slab's size for
    /// every convolution.
    pub(crate) fn take_spare() -> Lines {
        SPARE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default()
    }

    /// Keeps `self` for [`Lines::take_spare`] if it is the largest buffer seen since the
    /// spare was last taken (one is kept: at inference one convolution runs at a time).
    pub(crate) fn give_back(self) {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        if spare.as_ref().is_none_or(|s| s.buf.len() < self.buf.len()) {
            *spare = Some(self);
        }
    }
}

/// See [`Lines::take_spare`].
static SPARE: std::sync::Mutex<Option<Lines>> = std::sync::Mutex::new(None);

/// Blocks of 32 channels per chunk of the kernel's reduction. Within a chunk, output channels
/// outside positions: one block of 32 output channels' weights for a chunk (27 taps × 4 KB)
/// stay in L2 while every position of the block uses them, and the input lines one block of
/// 32 positions reads over the taps (9 × 34 lines per channel block) in L1. Measured on one
/// thread of an AMX Xeon (1.0–1.3 TFLOP/s on the U-Net's shapes): 2 is best or within 5 %
/// of best everywhere; positions outside output channels is as fast at 64 channels and 1.5×
/// slower at 512.
const KC_BLOCKS: usize = 2;

/// Weights packed for [`correlate_sample`]: for each block of 32 output channels, each tap,
/// each block of 32 input channels, two 16 × 16 tiles (16 pairs × 16 output channels each).
pub(crate) struct ClWeights {
    data: Lines,
    taps: usize,
    o: usize,
    o_pad: usize,
    ncb: usize,
    /// The real input channels (the last block's pairs past them are zeros).
    c: usize,
}

impl ClWeights {
    /// Channel pairs of block `cb` that hold real channels (16 but in a last, partial block).
    #[inline(always)]
    fn pairs_in(&self, cb: usize) -> usize {
        (self.c - cb * CB).div_ceil(2).min(16)
    }
}

impl ClWeights {
    /// The input channel count rounded up to 32 (what [`pad_pairs_cl`] needs).
    pub(crate) fn c_pad(&self) -> usize {
        self.ncb * CB
    }
}

/// Packs weights given as `(taps, O, C)` f32 (the layout of
/// [`crate::cpu::correlate::pack_weights`]).
pub(crate) fn pack_weights_cl(wp: &[f32], taps: usize, o: usize, c: usize) -> ClWeights {
    assert_eq!(wp.len(), taps * o * c);
    pack_with(taps, o, c, |oi, ci, t| wp[(t * o + oi) * c + ci])
}

/// Packs weights given as stored, `(O, C, taps)` f32.
pub(crate) fn pack_raw_weights_cl(w: &[f32], taps: usize, o: usize, c: usize) -> ClWeights {
    assert_eq!(w.len(), taps * o * c);
    pack_with(taps, o, c, |oi, ci, t| w[(oi * c + ci) * taps + t])
}

/// The packing of [`ClWeights`] from `weight(oi, ci, t)`, one task per block of 32 output
/// channels (each block's tiles are contiguous).
fn pack_with(
    taps: usize,
    o: usize,
    c: usize,
    weight: impl Fn(usize, usize, usize) -> f32 + Sync,
) -> ClWeights {
    let (o_pad, ncb) = (o.next_multiple_of(32), c.div_ceil(CB));
    let mut lines = Lines::default();
    let per_block = taps * ncb * 2 * 256;
    lines.resize(o_pad / 32 * per_block);
    lines
        .words_mut()
        .par_chunks_mut(per_block)
        .enumerate()
        .for_each(|(ob, block)| {
            for oi in 32 * ob..(32 * ob + 32).min(o) {
                let (half, n) = ((oi % 32) / 16, oi % 16);
                for ci in 0..c {
                    let (cb, k) = (ci / CB, (ci % CB) / 2);
                    for t in 0..taps {
                        let tile = (t * ncb + cb) * 2 + half;
                        block[tile * 256 + k * 16 + n] |=
                            to_bf16_bits(weight(oi, ci, t)) << (16 * (ci % 2));
                    }
                }
            }
        });
    ClWeights {
        data: lines,
        taps,
        o,
        o_pad,
        ncb,
        c,
    }
}

/// One padded plane of one channel block: `chans` are the block's 32 source planes of `H·W`
/// voxels (`None`: a zero channel), `out` the `(H+2p)·(W+2p)` positions × 16 pairs.
#[inline(always)]
fn plane_body(out: &mut [u32], chans: &[Option<&[f32]>; CB], hw: [usize; 2], pad: [usize; 2]) {
    let w = hw[1];
    padded_rows(out, hw, pad, |mid, s| {
        for x0 in (0..w).step_by(16) {
            let n = 16.min(w - x0);
            // 16 positions × 16 pairs, made pair by pair (contiguous along x), then
            // transposed to positions × pairs.
            let mut tile = [[0u32; 16]; 16];
            for (k, words) in tile.iter_mut().enumerate() {
                let lo = chans[2 * k].map(|p| &p[s + x0..s + x0 + n]);
                let hi = chans[2 * k + 1].map(|p| &p[s + x0..s + x0 + n]);
                match (lo, hi) {
                    (Some(lo), Some(hi)) => {
                        for ((d, l), h) in words.iter_mut().zip(lo).zip(hi) {
                            *d = to_bf16_bits(*l) | (to_bf16_bits(*h) << 16);
                        }
                    }
                    (Some(lo), None) => {
                        for (d, l) in words.iter_mut().zip(lo) {
                            *d = to_bf16_bits(*l);
                        }
                    }
                    _ => {}
                }
            }
            for (i, pos) in mid[x0 * 16..(x0 + n) * 16].chunks_exact_mut(16).enumerate() {
                for (k, d) in pos.iter_mut().enumerate() {
                    *d = tile[k][i];
                }
            }
        }
    });
}

/// The rows of one padded plane of one channel block (`(H+2p)·(W+2p)` positions × 16 words):
/// padding rows and columns zeroed, `mid(words, s)` for the `W·16` words of each image row,
/// `s` being the row's first voxel in the source planes.
#[inline(always)]
fn padded_rows(
    out: &mut [u32],
    [h, w]: [usize; 2],
    pad: [usize; 2],
    mut mid: impl FnMut(&mut [u32], usize),
) {
    let p2 = w + 2 * pad[1];
    for (y, row) in out.chunks_exact_mut(p2 * 16).enumerate() {
        if y < pad[0] || y >= pad[0] + h {
            row.fill(0);
            continue;
        }
        row[..pad[1] * 16].fill(0);
        row[(pad[1] + w) * 16..].fill(0);
        mid(&mut row[pad[1] * 16..(pad[1] + w) * 16], (y - pad[0]) * w);
    }
}

/// [`plane_body`] with AVX-512 where the CPU has it (the same words: the rounding is the same
/// integer arithmetic, the transpose only moves them).
fn plane(out: &mut [u32], chans: &[Option<&[f32]>; CB], hw: [usize; 2], pad: [usize; 2]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            // SAFETY: the CPU has the features.
            return unsafe { avx512::plane_native(out, chans, hw, pad) };
        }
        // SAFETY: the CPU has the feature.
        return unsafe { avx512::plane(out, chans, hw, pad) };
    }
    plane_body(out, chans, hw, pad)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::CB;
    use std::arch::x86_64::*;

    /// `to_bf16_bits` on 16 lanes.
    #[inline(always)]
    unsafe fn bf16_bits(x: __m512i) -> __m512i {
        // SAFETY: only called from functions compiled with AVX-512F.
        unsafe {
            let high = _mm512_srli_epi32::<16>(x);
            let lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
            let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb);
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(x, bias));
            // Zero exponent (zeros and subnormals): the signed zero.
            let tiny = _mm512_testn_epi32_mask(x, _mm512_set1_epi32(0x7f80_0000));
            let sign = _mm512_and_si512(high, _mm512_set1_epi32(0x8000));
            let r = _mm512_mask_mov_epi32(rounded, tiny, sign);
            // NaN: truncated and made quiet.
            let abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7fff_ffff));
            let nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
            let quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
            _mm512_mask_mov_epi32(r, nan, quiet)
        }
    }

    /// [`super::scatter_run`] 16 positions × 16 channels at a time, transposed in registers
    /// (the same sums: only moved, then the bias added).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; as [`super::scatter_run`], with `o <= o_pad`, `o_pad` a
    /// multiple of 16 and `rows` holding `n·o_pad` floats.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scatter_run(
        rows: &[f32],
        o_pad: usize,
        n: usize,
        o: usize,
        bias: Option<&[f32]>,
        dst: *mut f32,
        cstride: usize,
    ) {
        assert!(rows.len() >= n * o_pad && o <= o_pad && o_pad.is_multiple_of(16));
        for i0 in (0..n).step_by(16) {
            let m = 16.min(n - i0);
            let mask: __mmask16 = if m == 16 { !0 } else { (1u16 << m) - 1 };
            for oc0 in (0..o).step_by(16) {
                // SAFETY: rows `i0..i0+m` hold channels `oc0..oc0+16` (`oc0 + 16 <= o_pad`);
                // the stores write channels below `o`, positions `i0..i0+m` (the caller's).
                unsafe {
                    let r: [__m512i; 16] = std::array::from_fn(|j| {
                        if j < m {
                            _mm512_loadu_si512(rows.as_ptr().add((i0 + j) * o_pad + oc0).cast())
                        } else {
                            _mm512_setzero_si512()
                        }
                    });
                    let t = transpose(r);
                    for (k, v) in t.iter().enumerate().take(o - oc0) {
                        let b = _mm512_set1_ps(bias.map_or(0.0, |b| b[oc0 + k]));
                        let v = _mm512_add_ps(_mm512_castsi512_ps(*v), b);
                        _mm512_mask_storeu_ps(dst.add((oc0 + k) * cstride + i0), mask, v);
                    }
                }
            }
        }
    }

    /// [`super::line_body`] with `VCVTNE2PS2BF16` (the same words, as in [`plane_native`]).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16; `line` must hold 16 words, `row` at most
    /// 32 floats.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn line_native(line: &mut [u32], row: &[f32]) {
        assert!(line.len() == 16 && row.len() <= 32);
        let n = row.len();
        let mask = |m: usize| -> __mmask16 { if m >= 16 { !0 } else { (1u16 << m) - 1 } };
        // SAFETY: the masked loads read the row's `n` floats only; the store writes `line`.
        unsafe {
            let lo = _mm512_maskz_loadu_ps(mask(n), row.as_ptr());
            let hi = _mm512_maskz_loadu_ps(mask(n.saturating_sub(16)), row.as_ptr().add(16.min(n)));
            let v = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                line.as_mut_ptr().cast(),
                std::mem::transmute::<__m512bh, __m512i>(v),
            );
        }
    }

    /// Transposes 16 rows of 16 words (`r[k][i]`) into `out[i][k]`.
    #[inline(always)]
    unsafe fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
        // SAFETY: only called from functions compiled with AVX-512F.
        unsafe {
            // Within each 128-bit lane L: a[2j] holds (r2j, r2j+1) at positions 4L, 4L+1,
            // a[2j+1] at 4L+2, 4L+3.
            let a: [__m512i; 16] = std::array::from_fn(|i| {
                let (x, y) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 {
                    _mm512_unpacklo_epi32(x, y)
                } else {
                    _mm512_unpackhi_epi32(x, y)
                }
            });
            // b[4j+m], lane L: rows 4j..4j+3 at position 4L+m.
            let b: [__m512i; 16] = std::array::from_fn(|i| {
                let (j, m) = (i / 4, i % 4);
                let (x, y) = (a[4 * j + m / 2], a[4 * j + 2 + m / 2]);
                if m % 2 == 0 {
                    _mm512_unpacklo_epi64(x, y)
                } else {
                    _mm512_unpackhi_epi64(x, y)
                }
            });
            let mut out = [_mm512_setzero_si512(); 16];
            for m in 0..4 {
                let (b0, b1, b2, b3) = (b[m], b[4 + m], b[8 + m], b[12 + m]);
                let c0 = _mm512_shuffle_i32x4::<0x44>(b0, b1);
                let c1 = _mm512_shuffle_i32x4::<0xee>(b0, b1);
                let c2 = _mm512_shuffle_i32x4::<0x44>(b2, b3);
                let c3 = _mm512_shuffle_i32x4::<0xee>(b2, b3);
                out[m] = _mm512_shuffle_i32x4::<0x88>(c0, c2);
                out[4 + m] = _mm512_shuffle_i32x4::<0xdd>(c0, c2);
                out[8 + m] = _mm512_shuffle_i32x4::<0x88>(c1, c3);
                out[12 + m] = _mm512_shuffle_i32x4::<0xdd>(c1, c3);
            }
            out
        }
    }

    /// [`super::plane_body`] on AVX-512: 16 positions of a row at a time, each pair's 16
    /// words made in one register and the 16 × 16 block transposed in registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane(
        out: &mut [u32],
        chans: &[Option<&[f32]>; CB],
        hw: [usize; 2],
        pad: [usize; 2],
    ) {
        // SAFETY: forwarded.
        unsafe { plane_with::<false>(out, chans, hw, pad) }
    }

    /// [`plane`] rounding with `VCVTNEPS2BF16` (the same words: it rounds to nearest even,
    /// flushes subnormals to signed zeros and quiets NaNs as `to_bf16_bits` does).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn plane_native(
        out: &mut [u32],
        chans: &[Option<&[f32]>; CB],
        hw: [usize; 2],
        pad: [usize; 2],
    ) {
        // SAFETY: forwarded.
        unsafe { plane_with::<true>(out, chans, hw, pad) }
    }

    /// The body of [`plane`] and [`plane_native`].
    ///
    /// # Safety
    /// Inlined only into those two (whose features it uses).
    #[inline(always)]
    unsafe fn plane_with<const NATIVE: bool>(
        out: &mut [u32],
        chans: &[Option<&[f32]>; CB],
        hw: [usize; 2],
        pad: [usize; 2],
    ) {
        let w = hw[1];
        super::padded_rows(out, hw, pad, |mid, s| {
            for x0 in (0..w).step_by(16) {
                let n = 16.min(w - x0);
                let mask: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
                // SAFETY: masked loads read the `n` voxels of the row only (`s + x0 + n <= h·w`
                // for every plane); the stores write positions `x0..x0+n` of `mid`.
                unsafe {
                    let load = |ci: usize| match chans[ci] {
                        Some(p) => {
                            let v = &p[s + x0..s + x0 + n];
                            if NATIVE {
                                let x = _mm512_maskz_loadu_ps(mask, v.as_ptr());
                                _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                                    _mm512_cvtneps_pbh(x),
                                ))
                            } else {
                                bf16_bits(_mm512_maskz_loadu_epi32(mask, v.as_ptr().cast()))
                            }
                        }
                        None => _mm512_setzero_si512(),
                    };
                    let r: [__m512i; 16] = std::array::from_fn(|k| {
                        _mm512_or_si512(load(2 * k), _mm512_slli_epi32::<16>(load(2 * k + 1)))
                    });
                    let t = transpose(r);
                    let dst = mid[x0 * 16..(x0 + n) * 16].as_mut_ptr();
                    for (i, v) in t.iter().take(n).enumerate() {
                        _mm512_storeu_si512(dst.add(16 * i).cast(), *v);
                    }
                }
            }
        });
    }
}

/// Writes the zero-padded planes `pz0..pz0+np` (padded depth coordinates) of `c` channels in
/// the blocked channels-last pair layout `(C'/32, np, H+2p, W+2p, 16)` (plus [`SLACK_POS`]
/// zero positions) into `dst`, `C'` being `c_pad`, straight from the source planes
/// (`plane(ci, z)`, as [`crate::cpu::correlate::pad_planes`] takes them). Every word is
/// written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pad_pairs_cl<'a>(
    plane_of: impl Fn(usize, usize) -> &'a [f32] + Sync,
    c: usize,
    dhw: [usize; 3],
    pad: [usize; 3],
    pz0: usize,
    np: usize,
    c_pad: usize,
    dst: &mut Lines,
) {
    let [d, h, w] = dhw;
    let pl = (h + 2 * pad[1]) * (w + 2 * pad[2]);
    let n = c_pad / CB * np * pl * 16;
    // Every word below `n` is written below: only grow (no clearing pass).
    dst.resize(n + SLACK_POS * 16);
    let dst = dst.words_mut();
    dst[n..].fill(0);
    dst[..n]
        .par_chunks_mut(pl * 16)
        .enumerate()
        .for_each(|(i, out)| {
            let (cb, pz) = (i / np, pz0 + i % np);
            if pz < pad[0] || pz >= pad[0] + d {
                out.fill(0);
                return;
            }
            let z = pz - pad[0];
            let chans: [Option<&[f32]>; CB] =
                std::array::from_fn(|j| (cb * CB + j < c).then(|| plane_of(cb * CB + j, z)));
            plane(out, &chans, [h, w], [pad[1], pad[2]]);
        });
}

/// One block of the implicit GEMM: positions `q0..q0+len_pad` of the padded grid, every
/// padded output channel, summed over all taps and channels, written to `buf`
/// `(len_pad, O')` (position-major).
struct Block<'a> {
    x: &'a [u32],
    vp: usize,
    q0: usize,
    len_pad: usize,
    taps: &'a [usize],
    w: &'a ClWeights,
    /// For each 32 positions of the block, which are wanted (bit `i`: position `32j + i`):
    /// the kernels skip micro-blocks of only padding positions, whose results nobody reads
    /// (the rows and planes past the output's extent: a twelfth of the work at 24³).
    valid: Vec<u32>,
    /// Channel blocks per chunk of the AVX512-BF16 kernel's reduction ([`KC_BLOCKS`] for
    /// the 27-tap correlation; every block for a 1-tap product, whose accumulators would
    /// otherwise go to memory and back after every 32 pairs). The AMX kernel keeps
    /// [`KC_BLOCKS`].
    kc_blocks: usize,
}

/// [`Block::valid`] for positions `q0..q0+len_pad` of the padded grid `p` whose outputs
/// are those with coordinates below `od`.
fn valid_bits(q0: usize, len_pad: usize, p: [usize; 3], od: [usize; 3]) -> Vec<u32> {
    let mut bits = vec![0u32; len_pad / 32];
    crate::cpu::correlate::output_runs(q0, len_pad, p, od, |r, n, _| {
        for i in r..r + n {
            bits[i / 32] |= 1 << (i % 32);
        }
    });
    bits
}

impl Block<'_> {
    /// Whether any of positions `nb..nb+n` (inside one group of 32) is wanted.
    #[inline(always)]
    fn wanted(&self, nb: usize, n: usize) -> bool {
        let mask = if n == 32 {
            !0
        } else {
            ((1u32 << n) - 1) << (nb % 32)
        };
        self.valid[nb / 32] & mask != 0
    }

    fn check(&self, buf: &[f32]) {
        let max_off = self.taps.iter().copied().max().unwrap_or(0);
        assert!(self.len_pad.is_multiple_of(32) && self.taps.len() == self.w.taps);
        assert!(
            ((self.w.ncb - 1) * self.vp + self.q0 + max_off + self.len_pad) * 16 <= self.x.len()
        );
        assert!(buf.len() >= self.w.o_pad * self.len_pad);
        assert!(self.valid.len() == self.len_pad / 32);
    }
}

/// The kernel: 32 positions × 32 output channels in tiles 0–3 (`[c0 c1; c2 c3]`, positions
/// `nb..nb+16` in `c0 c1`), over every tap and channel block: input positions `nb..nb+16`
/// and `nb+16..nb+32` in tiles 4 and 5, the two weight tiles of output channels `ob..ob+16`
/// and `ob+16..ob+32` in tiles 6 and 7.
///
/// # Safety
/// `block` must pass [`Block::check`] against `buf`'s `O'·len_pad` elements; `tiles` must be
/// runnable (for the hardware: AMX granted to the process).
unsafe fn run_tiles<T: Tiles>(tiles: &mut T, block: &Block<'_>, buf: *mut f32) {
    let w = block.w;
    let ncb = w.ncb;
    let cfg = TileConfig::full();
    // SAFETY: forwarded; every micro-block lies inside the checked extents.
    unsafe {
        tiles.config(&cfg);
        for kc0 in (0..ncb).step_by(KC_BLOCKS) {
            let kc = kc0..(kc0 + KC_BLOCKS).min(ncb);
            for ob in 0..w.o_pad / 32 {
                for nb in (0..block.len_pad).step_by(32) {
                    if block.wanted(nb, 32) {
                        micro(tiles, block, buf, kc.clone(), nb, ob);
                    }
                }
            }
        }
        tiles.release();
    }
}

/// One micro-block of [`run_tiles`]: positions `nb..nb+32`, output channels
/// `32·ob..32·ob+32`, channel blocks `kc` (accumulators zeroed at the first block, else
/// resumed from `buf`).
///
/// # Safety
/// As [`run_tiles`], with `nb < len_pad`, `ob < O'/32`, `kc` inside `0..C'/32`.
#[inline(always)]
unsafe fn micro<T: Tiles>(
    tiles: &mut T,
    block: &Block<'_>,
    buf: *mut f32,
    kc: std::ops::Range<usize>,
    nb: usize,
    ob: usize,
) {
    let w = block.w;
    let (taps, ncb) = (block.taps.len(), w.ncb);
    let c_stride = w.o_pad * 4;
    // SAFETY: every address stays inside the extents checked by `Block::check`: weight tiles
    // of blocks below `O'/32`, channel blocks below `C'/32`, positions below `q0 + max_off +
    // len_pad`.
    unsafe {
        let x = block.x.as_ptr().add((block.q0 + nb) * 16);
        let c = buf.add(nb * w.o_pad + ob * 32).cast::<u8>();
        let cs = [
            c,
            c.add(64),
            c.add(16 * c_stride),
            c.add(16 * c_stride + 64),
        ];
        for (t, cp) in cs.iter().enumerate() {
            if kc.start == 0 {
                tiles.zero(t);
            } else {
                tiles.load(t, *cp, c_stride);
            }
        }
        for (t, off) in block.taps.iter().enumerate() {
            let wt = w.data.words().as_ptr().add(((ob * taps + t) * ncb) * 512);
            let xt = x.add(off * 16);
            for cb in kc.clone() {
                let a = xt.add(cb * block.vp * 16);
                let b = wt.add(cb * 512);
                // Each load just before the first product that reads it (tiles are not
                // renamed: a load waits for the last reader of its tile).
                tiles.load(4, a.cast(), 64);
                tiles.load(6, b.cast(), 64);
                tiles.dot(0, 4, 6);
                tiles.load(7, b.add(256).cast(), 64);
                tiles.dot(1, 4, 7);
                tiles.load(5, a.add(256).cast(), 64);
                tiles.dot(2, 5, 6);
                tiles.dot(3, 5, 7);
            }
        }
        for (t, cp) in cs.iter().enumerate() {
            tiles.store(t, *cp, c_stride);
        }
    }
}

/// The AVX512-BF16 kernel on the channels-last layout.
#[cfg(target_arch = "x86_64")]
mod vector {
    use super::Block;
    use std::arch::x86_64::*;

    /// `acc + lo(a)·lo(b) + hi(a)·hi(b)` lane by lane, `a` one pair broadcast from memory.
    #[inline(always)]
    unsafe fn dot(acc: __m512, a: *const u32, b: __m512i) -> __m512 {
        // SAFETY: only called from `run` (AVX-512F and AVX512-BF16 enabled) with `a`
        // readable; the casts only reinterpret bits.
        unsafe {
            let a = _mm512_set1_epi32(a.read() as i32);
            _mm512_dpbf16_ps(
                acc,
                std::mem::transmute::<__m512i, __m512bh>(a),
                std::mem::transmute::<__m512i, __m512bh>(b),
            )
        }
    }

    /// Every micro-block of `block`: channel chunks of [`Block::kc_blocks`] blocks outermost (as the
    /// AMX kernel), then groups of output channels, then a few positions at a time, the
    /// accumulators in registers over every tap and the chunk's channels. Output channels go
    /// 16 at a time ("halves" of the weights' 32-channel blocks), two per group (12 positions
    /// × 2 = 24 accumulators), but where their count is odd the last three form one group
    /// (8 positions × 3: a 48-channel layer loads 3 weight vectors and 8 inputs per 24
    /// products, not 2 + 12 per 24 and 1 + 12 per 12) and a single one runs alone (16 × 1).
    /// Unlike the AMX tiles, the vectors need not run over zeros: a last input block only
    /// runs its real pairs (a 48-channel layer does 48 × 48 products per tap, not 64 × 64).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16; `block` must pass [`Block::check`]
    /// against `buf`'s `O'·len_pad` floats.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn run(block: &Block<'_>, buf: *mut f32) {
        let w = block.w;
        let halves = w.o.div_ceil(16);
        let pairs_end = if halves % 2 == 1 && halves >= 3 {
            halves - 3
        } else {
            halves - halves % 2
        };
        // SAFETY: every micro-block lies inside the extents checked by `Block::check`
        // (`len_pad` is a multiple of 32, cut as 12 + 12 + 8, 8 × 4 or 16 × 2; every half
        // below `O'/16`).
        unsafe {
            let step = block.kc_blocks.max(1);
            for kc0 in (0..w.ncb).step_by(step) {
                let kc = kc0..(kc0 + step).min(w.ncb);
                for g in (0..pairs_end).step_by(2) {
                    for nb in (0..block.len_pad).step_by(32) {
                        micro_if::<12, 2>(block, buf, &kc, nb, g);
                        micro_if::<12, 2>(block, buf, &kc, nb + 12, g);
                        micro_if::<8, 2>(block, buf, &kc, nb + 24, g);
                    }
                }
                match halves - pairs_end {
                    3 => {
                        for nb in (0..block.len_pad).step_by(8) {
                            micro_if::<8, 3>(block, buf, &kc, nb, pairs_end);
                        }
                    }
                    1 => {
                        for nb in (0..block.len_pad).step_by(16) {
                            micro_if::<16, 1>(block, buf, &kc, nb, pairs_end);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// [`micro`] where any of its positions is wanted.
    ///
    /// # Safety
    /// As [`micro`].
    #[inline(always)]
    unsafe fn micro_if<const N: usize, const H: usize>(
        block: &Block<'_>,
        buf: *mut f32,
        kc: &std::ops::Range<usize>,
        nb: usize,
        g: usize,
    ) {
        if block.wanted(nb, N) {
            // SAFETY: forwarded.
            unsafe { micro::<N, H>(block, buf, kc.clone(), nb, g) }
        }
    }

    /// Positions `nb..nb+N` × output channels `16·g..16·(g+H)` over the channel blocks `kc`
    /// and every tap, the accumulators held in registers and resumed from `buf`
    /// (position-major, `O'` floats per position) after the first chunk.
    ///
    /// # Safety
    /// As [`run`], with `nb + N <= len_pad`, `g + H <= O'/16`, `kc` inside `0..C'/32`.
    #[inline(always)]
    unsafe fn micro<const N: usize, const H: usize>(
        block: &Block<'_>,
        buf: *mut f32,
        kc: std::ops::Range<usize>,
        nb: usize,
        g: usize,
    ) {
        let w = block.w;
        let (taps, ncb, o_pad) = (block.taps.len(), w.ncb, w.o_pad);
        // Half `g + h` is half `(g + h) % 2` of output block `(g + h) / 2`.
        let half_off: [usize; H] = std::array::from_fn(|h| {
            let (ob, hh) = ((g + h) / 2, (g + h) % 2);
            ob * taps * ncb * 512 + hh * 256
        });
        // SAFETY: every address stays inside the extents checked by `Block::check`
        // (positions below `q0 + max_off + len_pad`, channel blocks below `C'/32`, weight
        // blocks below `O'/32`).
        unsafe {
            let x = block.x.as_ptr().add((block.q0 + nb) * 16);
            let wdata = w.data.words().as_ptr();
            let c = buf.add(nb * o_pad + g * 16);
            let mut acc = [[_mm512_setzero_ps(); H]; N];
            if kc.start > 0 {
                for (p, acc) in acc.iter_mut().enumerate() {
                    for (h, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm512_load_ps(c.add(p * o_pad + 16 * h));
                    }
                }
            }
            for (t, off) in block.taps.iter().enumerate() {
                let xt = x.add(off * 16);
                for cb in kc.clone() {
                    let a = xt.add(cb * block.vp * 16);
                    let b = wdata.add((t * ncb + cb) * 512);
                    for k in 0..w.pairs_in(cb) {
                        let wv: [__m512i; H] = std::array::from_fn(|h| {
                            _mm512_load_si512(b.add(half_off[h] + k * 16).cast())
                        });
                        for (p, acc) in acc.iter_mut().enumerate() {
                            let ap = a.add(p * 16 + k);
                            for (acc, wv) in acc.iter_mut().zip(&wv) {
                                *acc = dot(*acc, ap, *wv);
                            }
                        }
                    }
                }
            }
            for (p, acc) in acc.iter().enumerate() {
                for (h, acc) in acc.iter().enumerate() {
                    _mm512_store_ps(c.add(p * o_pad + 16 * h), *acc);
                }
            }
        }
    }
}

fn run_block(runner: Runner, block: &Block<'_>, buf: &mut [f32]) {
    block.check(buf);
    match runner {
        #[cfg(target_arch = "x86_64")]
        Runner::Kernel(super::bf16::Bf16Kernel::Avx512Bf16) => {
            assert!(
                super::bf16::Bf16Kernel::Avx512Bf16.check().is_ok(),
                "the AVX512-BF16 kernel needs AVX-512F and AVX512-BF16"
            );
            // SAFETY: the CPU has the features and the block was checked.
            unsafe { vector::run(block, buf.as_mut_ptr()) }
        }
        #[cfg(target_arch = "x86_64")]
        Runner::Kernel(super::bf16::Bf16Kernel::Amx) => {
            assert!(
                super::bf16::amx_granted(),
                "the AMX kernel needs AMX granted"
            );
            // SAFETY: AMX is granted and the block was checked.
            unsafe { run_tiles(&mut super::bf16::hw_tiles(), block, buf.as_mut_ptr()) }
        }
        #[cfg(test)]
        // SAFETY: the block was checked; the model runs anywhere.
        Runner::SoftAmx => unsafe {
            run_tiles(&mut super::bf16::soft_tiles(), block, buf.as_mut_ptr())
        },
        other => unreachable!("the channels-last layout has no {other:?} kernel"),
    }
}

/// Whether `runner` reads the channels-last layout of this module.
pub(crate) fn uses_cl(runner: Runner) -> bool {
    match runner {
        Runner::Kernel(k) => matches!(
            k,
            super::bf16::Bf16Kernel::Amx | super::bf16::Bf16Kernel::Avx512Bf16
        ),
        #[cfg(test)]
        Runner::SoftAmx => true,
    }
}

/// The stride-1 correlation of one padded block of planes in bf16 on a channels-last kernel
/// (AMX or AVX512-BF16): `xp` is the block in the layout of [`pad_pairs_cl`], `p` its padded
/// extent; output channel `o` starts at `out[o · cstride]` (plus the bias).
#[allow(clippy::too_many_arguments)]
pub(crate) fn correlate_sample(
    runner: Runner,
    xp: &[u32],
    p: [usize; 3],
    w: &ClWeights,
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
    let blen = crate::cpu::correlate::block_len(w.o_pad).next_multiple_of(32);
    let o = w.o;
    assert!(xp.len() == w.ncb * vp * 16 + SLACK_POS * 16);
    assert!(cstride >= n_out && out.len() >= (o - 1) * cstride + n_out);
    let dst = OutPtr(out.as_mut_ptr());
    par_position_blocks(span, blen, w.o_pad * blen, |buf, q0, len| {
        let block = Block {
            x: xp,
            vp,
            q0,
            len_pad: len.next_multiple_of(32),
            taps: &taps,
            w,
            valid: valid_bits(q0, len.next_multiple_of(32), p, od),
            kc_blocks: KC_BLOCKS,
        };
        run_block(runner, &block, buf);
        // SAFETY: blocks cover disjoint output positions, all inside `out` (checked).
        unsafe { scatter(buf, w.o_pad, q0, len, p, od, o, bias, dst, cstride) };
    });
}

/// Runs `f(buf, q0, len)` for the blocks `q0..q0+len` of `blen` positions that cover
/// `0..span`, in parallel, each task with a cache-line-aligned buffer of `buf_len` floats
/// (reused from block to block).
pub(crate) fn par_position_blocks(
    span: usize,
    blen: usize,
    buf_len: usize,
    f: impl Fn(&mut [f32], usize, usize) + Sync + Send,
) {
    (0..span.div_ceil(blen)).into_par_iter().for_each_init(
        || {
            let mut buf = Lines::default();
            buf.resize(buf_len.next_multiple_of(16));
            buf
        },
        |buf, bi| {
            let q0 = bi * blen;
            f(buf.floats_mut(), q0, blen.min(span - q0));
        },
    );
}

/// `x (T×C) · wᵀ` for `w (O×C)` (a `Linear` layer without its bias) in bf16 on a channels-last
/// kernel: tokens are positions, and both the input (each token's channels, 32 at a time, one
/// line per token) and the kernel's position-major accumulators are already rows of the
/// token-major layout, so nothing is transposed.
pub(crate) fn linear(
    runner: Runner,
    x: &[f32],
    t: usize,
    c: usize,
    w: &[f32],
    o: usize,
) -> Vec<f32> {
    assert!(x.len() == t * c && w.len() == o * c);
    let packed = pack_raw_weights_cl(w, 1, o, c);
    let ncb = packed.ncb;
    let mut xp = Lines::default();
    xp.resize((ncb * t + SLACK_POS) * 16);
    {
        let words = xp.words_mut();
        let (body, slack) = words.split_at_mut(ncb * t * 16);
        slack.fill(0);
        #[cfg(target_arch = "x86_64")]
        let native = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        body.par_chunks_mut(t * 16)
            .enumerate()
            .for_each(|(cb, dst)| {
                for (ti, line) in dst.chunks_exact_mut(16).enumerate() {
                    // A token's 32 channels of the block, as bf16 in order, are its 16 pairs.
                    let row = &x[ti * c..][..c][cb * CB..];
                    let row = &row[..row.len().min(CB)];
                    #[cfg(target_arch = "x86_64")]
                    if native {
                        // SAFETY: the CPU has the features.
                        unsafe { avx512::line_native(line, row) };
                        continue;
                    }
                    line_body(line, row);
                }
            });
    }
    let blen = crate::cpu::correlate::block_len(packed.o_pad).next_multiple_of(32);
    let mut out = vec![0f32; t * o];
    let words = xp.words();
    out.par_chunks_mut(blen * o).enumerate().for_each_init(
        || {
            let mut buf = Lines::default();
            buf.resize(packed.o_pad * blen);
            buf
        },
        |buf, (bi, rows)| {
            let len = rows.len() / o;
            let block = Block {
                x: words,
                vp: t,
                q0: bi * blen,
                len_pad: len.next_multiple_of(32),
                taps: &[0],
                w: &packed,
                valid: (0..len.div_ceil(32))
                    .map(|j| match len - 32 * j {
                        n @ 0..32 => (1u32 << n) - 1,
                        _ => !0,
                    })
                    .collect(),
                kc_blocks: ncb,
            };
            let buf = buf.floats_mut();
            run_block(runner, &block, buf);
            for (i, row) in rows.chunks_exact_mut(o).enumerate() {
                row.copy_from_slice(&buf[i * packed.o_pad..][..o]);
            }
        },
    );
    out
}

/// One line of pairs from up to 32 consecutive channels (zeros past them).
#[inline(always)]
fn line_body(line: &mut [u32], row: &[f32]) {
    for (k, word) in line.iter_mut().enumerate() {
        let lo = row.get(2 * k).map_or(0, |v| to_bf16_bits(*v));
        let hi = row.get(2 * k + 1).map_or(0, |v| to_bf16_bits(*v));
        *word = lo | (hi << 16);
    }
}

/// Writes the valid positions of one position-major block (`buf[(q - q0)·o_pad + oc]`) to
/// the channel-first output whose channel `oc` starts at `dst + oc·cstride`, adding the
/// bias: runs of whole output rows, transposed 16 positions at a time.
///
/// # Safety
/// The block's output positions must be written by no other thread, and lie (for `o`
/// channels) inside the output `dst` points to.
#[allow(clippy::too_many_arguments)]
unsafe fn scatter(
    buf: &[f32],
    o_pad: usize,
    q0: usize,
    len: usize,
    p: [usize; 3],
    od: [usize; 3],
    o: usize,
    bias: Option<&[f32]>,
    dst: OutPtr,
    cstride: usize,
) {
    crate::cpu::correlate::output_runs(q0, len, p, od, |r, n, base| {
        let rows = &buf[r * o_pad..][..n * o_pad];
        // SAFETY: the run's outputs are the caller's to write.
        unsafe { scatter_rows(rows, o_pad, n, o, bias, dst.get().add(base), cstride) };
    });
}

/// One run of output positions (`rows`, `o_pad` floats each) to output channels `0..o` at
/// `dst + oc·cstride`, plus the bias: [`scatter_run`] on AVX-512 where the CPU has it.
///
/// # Safety
/// As [`scatter_run`].
#[allow(clippy::too_many_arguments)]
unsafe fn scatter_rows(
    rows: &[f32],
    o_pad: usize,
    n: usize,
    o: usize,
    bias: Option<&[f32]>,
    dst: *mut f32,
    cstride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the rest is the caller's.
        unsafe { avx512::scatter_run(rows, o_pad, n, o, bias, dst, cstride) };
        return;
    }
    // SAFETY: forwarded.
    unsafe { scatter_run(rows, o_pad, n, o, bias, dst, cstride) };
}

/// One run of [`scatter`]: `n` positions (`rows`, `o_pad` floats each) to output channels
/// `0..o` at `dst + oc·cstride`.
///
/// # Safety
/// `dst + oc·cstride + i` must be writable (by this thread alone) for `oc < o`, `i < n`.
#[inline(always)]
unsafe fn scatter_run(
    rows: &[f32],
    o_pad: usize,
    n: usize,
    o: usize,
    bias: Option<&[f32]>,
    dst: *mut f32,
    cstride: usize,
) {
    for oc in 0..o {
        let bo = bias.map_or(0.0, |b| b[oc]);
        // SAFETY: forwarded from the caller.
        let d = unsafe { std::slice::from_raw_parts_mut(dst.add(oc * cstride), n) };
        for (i, v) in d.iter_mut().enumerate() {
            *v = rows[i * o_pad + oc] + bo;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::bf16::{self, Bf16Kernel};
    use crate::cpu::correlate::{pack_weights as pack_f32, pad_sample};

    pub(super) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The channels-last lines of the channel-first sample `x` on `dhw` (its channels as
    /// many as `x` holds), padded by one on each side to `p`, and the direct 3×3×3 kernel's
    /// output on them with `cl` (`o` outputs) and `bias`.
    pub(super) fn direct_on_lines(
        runner: Runner,
        x: &[f32],
        dhw: [usize; 3],
        p: [usize; 3],
        cl: &ClWeights,
        o: usize,
        bias: &[f32],
    ) -> (Lines, Vec<f32>) {
        let (vol, hw) = (dhw.iter().product::<usize>(), dhw[1] * dhw[2]);
        let mut xcl = Lines::default();
        pad_pairs_cl(
            |ci, z| &x[ci * vol + z * hw..][..hw],
            x.len() / vol,
            dhw,
            [1, 1, 1],
            0,
            p[0],
            cl.c_pad(),
            &mut xcl,
        );
        let mut out = vec![f32::NAN; o * vol];
        correlate_sample(
            runner,
            xcl.words(),
            p,
            cl,
            [3; 3],
            Some(bias),
            &mut out,
            vol,
        );
        (xcl, out)
    }

    /// The largest difference between `got` and `want`, over the largest |`want`|.
    pub(super) fn rel_err(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale
    }

    /// The channels-last kernel (`runner`) against the plane-layout reference kernel on the
    /// same bf16 operands (itself tested against f32): only the order of the f32 sums
    /// differs. The input is padded here by the layout's own padding (the f32 sample's
    /// planes with `pad`), the reference's by [`pad_sample`].
    fn check(runner: Runner) {
        for (c, o, dhw) in [
            (32, 32, [6, 7, 9]),
            (48, 40, [5, 9, 11]),
            (17, 64, [4, 6, 5]),
            (96, 32, [3, 5, 7]),
            // One half block of outputs, a partial last block of inputs.
            (40, 16, [4, 5, 6]),
            // Three halves of outputs in one group (the Swin UNETR's 48 channels).
            (48, 48, [5, 6, 7]),
            (80, 80, [3, 4, 5]),
            // Several blocks per sample, rows of more than 16 positions.
            (32, 32, [10, 20, 24]),
        ] {
            let (k, pad) = ([3, 3, 3], [1, 1, 1]);
            let vol: usize = dhw.iter().product();
            let x = rand_vec(c * vol, 7);
            let w = rand_vec(o * c * 27, 11);
            let bias = rand_vec(o, 13);
            let wp = pack_f32(&w, o, c, 27, false);
            let (xp, p) = pad_sample(|ci| &x[ci * vol..(ci + 1) * vol], c, dhw, pad);
            let packed = bf16::pack_weights(&wp, 27, o, c);
            let mut pairs = Vec::new();
            bf16::pad_pairs(
                |ci, _| &xp[ci * xp.len() / c..(ci + 1) * xp.len() / c],
                c,
                [1, 1, p.iter().product()],
                [0; 3],
                0,
                1,
                packed.c_pad(),
                &mut pairs,
            );
            let mut want = vec![f32::NAN; o * vol];
            bf16::correlate_sample(
                Runner::Kernel(Bf16Kernel::Reference),
                &pairs,
                p,
                &packed,
                k,
                Some(&bias),
                &mut want,
                vol,
            );
            let cl = pack_weights_cl(&wp, 27, o, c);
            let (_, got) = direct_on_lines(runner, &x, dhw, p, &cl, o, &bias);
            let err = rel_err(&got, &want);
            assert!(got.iter().all(|v| v.is_finite()), "{runner:?}: all written");
            eprintln!("{runner:?} c={c} o={o} {dhw:?}: {err:.2e} against the reference kernel");
            assert!(err < 1e-5, "{runner:?} c={c} o={o} {dhw:?}: {err}");
        }
    }

    /// The AVX-512 fill makes the same words as the portable one (row tails of every
    /// length, absent channels, zeros, subnormals, NaN, infinities).
    #[test]
    fn vector_fill_matches_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::arch::is_x86_feature_detected!("avx512f") {
                eprintln!("skipping: no AVX-512F here");
                return;
            }
            for (h, w) in [(3, 1), (2, 16), (4, 21), (3, 37)] {
                let mut planes: Vec<Vec<f32>> =
                    (0..CB as u64).map(|c| rand_vec(h * w, 100 + c)).collect();
                planes[3][0] = f32::NAN;
                planes[4][1 % (h * w)] = 1e-40;
                planes[5][0] = -1e-40;
                planes[6][0] = f32::INFINITY;
                planes[7][0] = -0.0;
                planes[8][0] = f32::MAX;
                for present in [CB, 17, 1] {
                    let chans: [Option<&[f32]>; CB] =
                        std::array::from_fn(|j| (j < present).then(|| planes[j].as_slice()));
                    let pad = [1, 2];
                    let n = (h + 2 * pad[0]) * (w + 2 * pad[1]) * 16;
                    let (mut a, mut b) = (vec![7u32; n], vec![9u32; n]);
                    plane_body(&mut a, &chans, [h, w], pad);
                    // SAFETY: the CPU has AVX-512F (checked above).
                    unsafe { avx512::plane(&mut b, &chans, [h, w], pad) };
                    assert_eq!(a, b, "{h}x{w}, {present} channels");
                    if std::arch::is_x86_feature_detected!("avx512bf16") {
                        let mut c = vec![5u32; n];
                        // SAFETY: the CPU has AVX-512F and AVX512-BF16.
                        unsafe { avx512::plane_native(&mut c, &chans, [h, w], pad) };
                        assert_eq!(a, c, "VCVTNEPS2BF16: {h}x{w}, {present} channels");
                    } else {
                        eprintln!("skipping the VCVTNEPS2BF16 fill: no AVX512-BF16 here");
                    }
                }
            }
        }
    }

    /// The `VCVTNE2PS2BF16` line makes the same words as the portable one.
    #[test]
    fn vector_line_matches_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        {
            if Bf16Kernel::Avx512Bf16.check().is_err() {
                eprintln!("skipping: no AVX512-BF16 here");
                return;
            }
            let mut row = rand_vec(32, 17);
            row[1] = f32::NAN;
            row[2] = 1e-40;
            row[3] = -1e-40;
            row[4] = f32::NEG_INFINITY;
            row[5] = -0.0;
            row[20] = f32::MAX;
            for n in [32, 31, 17, 16, 15, 1, 0] {
                let (mut a, mut b) = (vec![7u32; 16], vec![9u32; 16]);
                line_body(&mut a, &row[..n]);
                // SAFETY: the CPU has the features (checked above).
                unsafe { avx512::line_native(&mut b, &row[..n]) };
                assert_eq!(a, b, "{n} channels");
            }
        }
    }

    /// The token-major product against the plane-layout reference (same bf16 operands).
    #[test]
    fn linear_matches_the_reference() {
        let (t, c, o) = (300, 48, 144);
        let x = rand_vec(t * c, 3);
        let w = rand_vec(o * c, 5);
        let want = bf16::linear(Runner::Kernel(Bf16Kernel::Reference), &x, t, c, &w, o);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut runners = vec![Runner::SoftAmx];
        for k in [Bf16Kernel::Amx, Bf16Kernel::Avx512Bf16] {
            if k.check().is_ok() {
                runners.push(Runner::Kernel(k));
            }
        }
        for runner in runners {
            let got = linear(runner, &x, t, c, &w, o);
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5 * scale, "{runner:?}: {err} (scale {scale})");
        }
    }

    #[test]
    fn channels_last_amx_logic_matches_the_reference_on_the_tile_model() {
        check(Runner::SoftAmx);
    }

    /// The AVX512-BF16 kernel on this layout: runs where the CPU has it, skipped (with the
    /// reason) elsewhere.
    #[test]
    fn channels_last_avx512bf16_matches_the_reference_where_present() {
        match Bf16Kernel::Avx512Bf16.check() {
            Ok(()) => check(Runner::Kernel(Bf16Kernel::Avx512Bf16)),
            Err(why) => eprintln!("skipping the AVX512-BF16 kernel: {why}"),
        }
    }

    /// The hardware kernel: runs where the CPU has AMX, skipped (with the reason) elsewhere.
    #[test]
    fn channels_last_amx_matches_the_reference_where_present() {
        match Bf16Kernel::Amx.check() {
            Ok(()) => check(Runner::Kernel(Bf16Kernel::Amx)),
            Err(why) => eprintln!("skipping the AMX kernel: {why}"),
        }
    }
}
