//! The stride-1 3-D correlation in bf16: the implicit GEMM of [`crate::cpu::correlate`] with
//! both operands rounded to bfloat16 (8 bits of mantissa) and products summed in f32, on the
//! bf16 dot-product instructions of recent x86 cores.
//!
//! Both kernels read the same two layouts. The weights of one tap are a row-major
//! `(O', C')` bf16 matrix (`O'` and `C'` the channel counts rounded up to 32, padded with
//! zeros). The zero-padded input is stored as *pairs*: `(C'/2, planes, H+2p, W+2p)` 32-bit
//! words whose low half is channel `2r` and high half channel `2r+1` at the same voxel (the
//! "VNNI" layout both instructions expect for their second operand), so the input shifted by
//! a tap offset is again a plain strided matrix read in place.
//!
//! - [`Bf16Kernel::Amx`]: AMX tiles (`TDPBF16PS`). A 32×32 block of output (output channels ×
//!   positions) lives in four accumulator tiles across all taps and channels; each step loads
//!   two 16×32 weight tiles and two 16×16-pair input tiles (rows 16 channel pairs apart,
//!   straight from the padded input) and issues four tile products. Linux hands out the tile
//!   state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); when refused the kernel is
//!   unavailable. The intrinsics are unstable in Rust, so the instructions are `asm!`. In this
//!   layout it runs the 1×1×1 products (the transposed convolution's taps, `Linear` layers);
//!   the 3×3×3 convolutions run on AMX in the channels-last layout of
//!   [`crate::cpu::channels_last`], whose input tiles are contiguous (1.3–3.3× faster on the U-Net's layer shapes, measured on
//!   an AMX Xeon).
//! - [`Bf16Kernel::Avx512Bf16`]: `VDPBF16PS` on 512-bit vectors, 8 output channels × 32
//!   positions per micro-kernel, the weight pair broadcast, for the 1×1×1 products; the
//!   3×3×3 convolutions and `Linear` layers run it in the channels-last layout too (12
//!   positions × 32 output channels, the input pair broadcast). It is chosen by itself only
//!   where a probe finds `VDPBF16PS` twice as productive as the f32 FMA (AMD Zen 4), see
//!   [`best_bf16_kernel`].
//! - [`Bf16Kernel::Reference`]: the same arithmetic in portable code (slow; it checks the
//!   others and lets any machine reproduce bf16 results).
//!
//! The kernels' loop structure is written once, generic over the instructions (a trait for
//! vectors, one for tiles), and each has an exact software model of its instructions, so the
//! packing, the strides and the blocking are tested on any CPU; only the one-line instruction
//! wrappers need the hardware.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;

use crate::cpu::correlate::{Geometry, block_len, scatter_block};
use crate::error::{Error, Result};

/// The arithmetic precision of the CPU convolutions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 throughout (the default; within the parity tolerances of the official code).
    #[default]
    F32,
    /// Convolutions (also the transposed ones) between layers of at least 16 channels, and the
    /// Swin UNETR's linear layers (attention qkv and projection, MLP, patch merging), with
    /// bf16 operands and f32
    /// accumulation; everything else (the first and last layers, the attention scores and
    /// softmax, norms, activations, the text-driven head, the logits) in f32.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::Config(format!(
                "unknown precision {other:?} (expected f32 or bf16)"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// A bf16 convolution kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX-BF16 tiles (Intel Sapphire Rapids and later).
    Amx,
    /// AVX512-BF16 vectors (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later).
    Avx512Bf16,
    /// Portable code with the same arithmetic: any CPU, slower than f32.
    Reference,
}

impl Bf16Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Bf16Kernel; 3] = [
        Bf16Kernel::Amx,
        Bf16Kernel::Avx512Bf16,
        Bf16Kernel::Reference,
    ];

    /// The kernel's name, as `UNIV_BF16_KERNEL` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "amx",
            Bf16Kernel::Avx512Bf16 => "avx512bf16",
            Bf16Kernel::Reference => "reference",
        }
    }

    /// Parses a name given by [`Bf16Kernel::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s.to_ascii_lowercase())
    }

    /// Whether this machine can run the kernel: the CPU has the instructions and, for AMX,
    /// the operating system granted the tile state to this process; `Err` says why not.
    pub fn check(self) -> std::result::Result<(), String> {
        match self {
            Bf16Kernel::Reference => Ok(()),
            Bf16Kernel::Avx512Bf16 => {
                if has_avx512bf16() {
                    Ok(())
                } else {
                    Err("the CPU lacks AVX512-BF16 (VDPBF16PS)".into())
                }
            }
            Bf16Kernel::Amx => amx_state().clone(),
        }
    }

    fn code(self) -> u8 {
        match self {
            Bf16Kernel::Amx => 1,
            Bf16Kernel::Avx512Bf16 => 2,
            Bf16Kernel::Reference => 3,
        }
    }
}

impl std::fmt::Display for Bf16Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn has_avx512bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22) and Linux
/// granted this process the tile data state; asked once.
fn amx_state() -> &'static std::result::Result<(), String> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // SAFETY: CPUID is always available on x86-64 (the call is safe in newer Rust).
            #[allow(unused_unsafe)]
            let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
            if leaf7.edx & (1 << 24) == 0 || leaf7.edx & (1 << 22) == 0 {
                return Err("the CPU lacks AMX-BF16 (TDPBF16PS)".into());
            }
            /// `arch_prctl` option asking for permission to use an extended state component.
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            /// The XSAVE state component of the AMX tile data.
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            if rc != 0 {
                return Err(format!(
                    "the CPU has AMX but Linux refused this process the tile state \
                     (arch_prctl ARCH_REQ_XCOMP_PERM: {}; Linux 5.16 or later is needed)",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(())
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            Err("AMX is used on x86-64 Linux only".into())
        }
    })
}

/// The bf16 kernel that `--precision bf16` uses on this machine, if one runs faster than the
/// f32 convolutions: AMX where the CPU has it and Linux grants it; else AVX512-BF16 where
/// one `VDPBF16PS` costs no more than one f32 FMA ([`avx512bf16_speedup`] at least 1.5).
/// That holds on AMD Zen 4 (an EPYC with AVX512-BF16 ran the U-Net window 1.4× faster in bf16 than in f32) but
/// not on Intel cores, whose one `VDPBF16PS` port does the work of their two FMA ports (a
/// 2-core AMX Xeon took 11.4 s in bf16 on the vector kernel against 4.9 s in f32, whose
/// Winograd transform beats it there).
pub fn best_bf16_kernel() -> Option<Bf16Kernel> {
    if Bf16Kernel::Amx.check().is_ok() {
        return Some(Bf16Kernel::Amx);
    }
    avx512bf16_pays().then_some(Bf16Kernel::Avx512Bf16)
}

/// The measured ratio of `VDPBF16PS` to f32 FMA throughput on 512-bit registers (products
/// per second, two per bf16 lane), probed once (about 2 ms); `None` without AVX512-BF16.
pub fn avx512bf16_speedup() -> Option<f64> {
    static RATIO: OnceLock<Option<f64>> = OnceLock::new();
    *RATIO.get_or_init(|| {
        if Bf16Kernel::Avx512Bf16.check().is_err() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked above).
            Some(unsafe { avx512::throughput_ratio() })
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    })
}

/// Whether the AVX512-BF16 kernel pays here: [`avx512bf16_speedup`] at least 1.5 (about 2 on
/// Zen 4, about 1 on Intel cores).
fn avx512bf16_pays() -> bool {
    avx512bf16_speedup().is_some_and(|r| r >= 1.5)
}

/// Why [`best_bf16_kernel`] found nothing here (for the warning that bf16 runs as f32).
pub fn bf16_fallback_reason() -> String {
    let amx = Bf16Kernel::Amx.check().err().unwrap_or_default();
    if let Some(r) = avx512bf16_speedup() {
        format!(
            "{amx}; the CPU has AVX512-BF16, but one VDPBF16PS does only {r:.1}× the work \
             of one f32 FMA here, so that kernel is slower than f32 \
             (UNIV_BF16_KERNEL=avx512bf16 forces it)"
        )
    } else {
        format!("{amx} and AVX512-BF16")
    }
}

/// 0: f32; otherwise [`Bf16Kernel::code`].
static ACTIVE: AtomicU8 = AtomicU8::new(0);

/// Makes the CPU convolutions use `kernel` (bf16), or f32 with `None`. Process-wide; fails
/// (and changes nothing) when this machine cannot run the kernel.
pub fn set_bf16_kernel(kernel: Option<Bf16Kernel>) -> Result<()> {
    if let Some(k) = kernel {
        k.check()
            .map_err(|why| Error::Config(format!("bf16 kernel {k}: {why}")))?;
    }
    ACTIVE.store(kernel.map_or(0, Bf16Kernel::code), Ordering::Relaxed);
    Ok(())
}

/// The bf16 kernel the CPU convolutions use now (`None`: f32).
pub fn active_bf16_kernel() -> Option<Bf16Kernel> {
    match ACTIVE.load(Ordering::Relaxed) {
        1 => Some(Bf16Kernel::Amx),
        2 => Some(Bf16Kernel::Avx512Bf16),
        3 => Some(Bf16Kernel::Reference),
        _ => None,
    }
}

/// Sets the precision of the CPU convolutions (process-wide) and returns the bf16 kernel now
/// in use. For [`Precision::Bf16`] that is the kernel named by the environment variable
/// `UNIV_BF16_KERNEL` (`amx`, `avx512bf16` or `reference`; an error if this machine cannot
/// run it), else [`best_bf16_kernel`]. When that finds none (no AMX) the
/// result is `Ok(None)` and the convolutions stay f32: callers should say so (the command line
/// prints a warning with [`bf16_fallback_reason`]), since the other kernels would be slower.
pub fn set_precision(precision: Precision) -> Result<Option<Bf16Kernel>> {
    let kernel = match precision {
        Precision::F32 => None,
        Precision::Bf16 => match std::env::var("UNIV_BF16_KERNEL") {
            Ok(name) if !name.is_empty() => {
                Some(Bf16Kernel::from_name(&name).ok_or_else(|| {
                    Error::Config(format!(
                        "UNIV_BF16_KERNEL={name:?}: expected amx, avx512bf16 or reference"
                    ))
                })?)
            }
            _ => best_bf16_kernel(),
        },
    };
    set_bf16_kernel(kernel)?;
    Ok(kernel)
}

/// Whether a correlation between `c` input and `o` output channels runs in bf16 (when a bf16
/// kernel is active): not the first layer (1 channel) nor the narrow output layers, where
/// padding to 32 channels would waste most of the work and f32 keeps the logits exact.
pub(crate) fn applies(c: usize, o: usize) -> bool {
    c >= 16 && o >= 16
}

/// Rounds to the nearest bfloat16, ties to even (as `VCVTNEPS2BF16` does); subnormals become
/// zero as the dot-product instructions would read them, NaN stays NaN.
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    (rounded >> 16) as u16
}

/// Weights of a correlation packed for the bf16 kernels: `(taps, O', C'/2)` pairs, `O'` and
/// `C'` rounded up to multiples of 32 with zeros.
pub(crate) struct Bf16Weights {
    data: Vec<u32>,
    taps: usize,
    o: usize,
    o_pad: usize,
    c_pad: usize,
}

impl Bf16Weights {
    /// The input channel count rounded up to 32 (what [`pad_pairs`] needs).
    pub(crate) fn c_pad(&self) -> usize {
        self.c_pad
    }

    /// The output channel count rounded up to 32.
    pub(crate) fn o_pad(&self) -> usize {
        self.o_pad
    }
}

/// Packs weights given as `(taps, O, C)` f32 (the layout of
/// [`crate::cpu::correlate::pack_weights`]).
pub(crate) fn pack_weights(wp: &[f32], taps: usize, o: usize, c: usize) -> Bf16Weights {
    assert_eq!(wp.len(), taps * o * c);
    let (o_pad, c_pad) = (o.next_multiple_of(32), c.next_multiple_of(32));
    let pairs = c_pad / 2;
    let mut data = vec![0u32; taps * o_pad * pairs];
    for t in 0..taps {
        for oi in 0..o {
            let src = &wp[(t * o + oi) * c..][..c];
            let dst = &mut data[(t * o_pad + oi) * pairs..][..pairs];
            for (ci, v) in src.iter().enumerate() {
                dst[ci / 2] |= u32::from(to_bf16(*v)) << (16 * (ci % 2));
            }
        }
    }
    Bf16Weights {
        data,
        taps,
        o,
        o_pad,
        c_pad,
    }
}

/// Words past the end of a pair slab that the kernels may read (positions of the last,
/// partial block of 32 beyond the last valid output position; their results are dropped).
const SLACK: usize = 64;

/// [`to_bf16`] without branches (the select compiles to vector blends), for the packing loops.
#[inline(always)]
pub(crate) fn to_bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let r = if b & 0x7f80_0000 == 0 {
        (b >> 16) & 0x8000
    } else {
        rounded
    };
    if b & 0x7fff_ffff > 0x7f80_0000 {
        (b >> 16) | 0x40
    } else {
        r
    }
}

/// One padded plane of pairs: `lo` and `hi` are the `H·W` voxels of the pair's two channels
/// (`None`: a zero channel), `out` the `(H+2p, W+2p)` words.
#[inline(always)]
fn pair_plane_body(
    out: &mut [u32],
    lo: Option<&[f32]>,
    hi: Option<&[f32]>,
    hw: [usize; 2],
    pad: [usize; 2],
) {
    let [h, w] = hw;
    let p2 = w + 2 * pad[1];
    for (y, row) in out.chunks_exact_mut(p2).enumerate() {
        if y < pad[0] || y >= pad[0] + h {
            row.fill(0);
            continue;
        }
        row[..pad[1]].fill(0);
        row[pad[1] + w..].fill(0);
        let s = (y - pad[0]) * w;
        let mid = &mut row[pad[1]..pad[1] + w];
        match (lo, hi) {
            (Some(lo), Some(hi)) => {
                for ((d, l), h) in mid.iter_mut().zip(&lo[s..s + w]).zip(&hi[s..s + w]) {
                    *d = to_bf16_bits(*l) | (to_bf16_bits(*h) << 16);
                }
            }
            (Some(lo), None) => {
                for (d, l) in mid.iter_mut().zip(&lo[s..s + w]) {
                    *d = to_bf16_bits(*l);
                }
            }
            _ => mid.fill(0),
        }
    }
}

/// [`pair_plane_body`] compiled for the best vector instructions of the CPU.
fn pair_plane(
    out: &mut [u32],
    lo: Option<&[f32]>,
    hi: Option<&[f32]>,
    hw: [usize; 2],
    pad: [usize; 2],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw")]
        fn avx512(
            o: &mut [u32],
            l: Option<&[f32]>,
            h: Option<&[f32]>,
            s: [usize; 2],
            p: [usize; 2],
        ) {
            pair_plane_body(o, l, h, s, p)
        }
        #[target_feature(enable = "avx2")]
        fn avx2(o: &mut [u32], l: Option<&[f32]>, h: Option<&[f32]>, s: [usize; 2], p: [usize; 2]) {
            pair_plane_body(o, l, h, s, p)
        }
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU has the features.
            return unsafe { avx512(out, lo, hi, hw, pad) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature.
            return unsafe { avx2(out, lo, hi, hw, pad) };
        }
    }
    pair_plane_body(out, lo, hi, hw, pad)
}

/// Writes the zero-padded planes `pz0..pz0+np` (padded depth coordinates) of `c` channels as
/// bf16 pairs `(C'/2, np, H+2p, W+2p)` (plus [`SLACK`] zero words) into `dst`, `C'` being
/// `c_pad`: the pair layout of the kernels made straight from the source planes (`plane(ci,
/// z)`, as [`crate::cpu::correlate::pad_planes`] takes them). Every word is written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pad_pairs<'a>(
    plane: impl Fn(usize, usize) -> &'a [f32] + Sync,
    c: usize,
    dhw: [usize; 3],
    pad: [usize; 3],
    pz0: usize,
    np: usize,
    c_pad: usize,
    dst: &mut Vec<u32>,
) {
    let [d, h, w] = dhw;
    let pl = (h + 2 * pad[1]) * (w + 2 * pad[2]);
    let n = c_pad / 2 * np * pl;
    // Every word below `n` is written below: only grow (no clearing pass).
    dst.resize(n + SLACK, 0);
    dst[n..].fill(0);
    dst[..n]
        .par_chunks_mut(pl)
        .enumerate()
        .for_each(|(i, out)| {
            let (r, pz) = (i / np, pz0 + i % np);
            if pz < pad[0] || pz >= pad[0] + d {
                out.fill(0);
                return;
            }
            let z = pz - pad[0];
            let lo = (2 * r < c).then(|| plane(2 * r, z));
            let hi = (2 * r + 1 < c).then(|| plane(2 * r + 1, z));
            pair_plane(out, lo, hi, [h, w], [pad[1], pad[2]]);
        });
}

/// Converts a padded f32 slab `(C, vp)` to pairs `(C'/2, vp)` (plus [`SLACK`] zero words) in
/// `dst`, `C'` being `c_pad` (tests: the kernels read what [`pad_pairs`] makes).
#[cfg(test)]
pub(crate) fn pair_slab(xp: &[f32], c: usize, vp: usize, c_pad: usize, dst: &mut Vec<u32>) {
    pad_pairs(
        |ci, _| &xp[ci * vp..(ci + 1) * vp],
        c,
        [1, 1, vp],
        [0, 0, 0],
        0,
        1,
        c_pad,
        dst,
    );
}

/// One block of the implicit GEMM: for positions `q0..q0+len_pad` of the padded grid, every
/// padded output channel, summed over all taps and channels, written to `buf` `(O', len_pad)`.
struct Block<'a> {
    x: &'a [u32],
    vp: usize,
    q0: usize,
    len_pad: usize,
    taps: &'a [usize],
    w: &'a Bf16Weights,
}

impl Block<'_> {
    fn check(&self, buf: &[f32]) {
        let pairs = self.w.c_pad / 2;
        let max_off = self.taps.iter().copied().max().unwrap_or(0);
        assert!(self.len_pad.is_multiple_of(32) && self.taps.len() == self.w.taps);
        assert!((pairs - 1) * self.vp + self.q0 + max_off + self.len_pad <= self.x.len());
        assert!(buf.len() >= self.w.o_pad * self.len_pad);
    }
}

/// The vector instructions of the AVX512-BF16 kernel.
trait Lanes {
    /// 16 f32 accumulators.
    type Acc: Copy;
    /// 16 pairs of bf16.
    type Pairs: Copy;
    unsafe fn zero() -> Self::Acc;
    /// Loads 16 pairs (unaligned).
    unsafe fn load(p: *const u32) -> Self::Pairs;
    /// `acc[i] += lo(a)·lo(b[i]) + hi(a)·hi(b[i])`, `a` broadcast to every lane.
    unsafe fn dot(acc: Self::Acc, a: u32, b: Self::Pairs) -> Self::Acc;
    unsafe fn store(p: *mut f32, acc: Self::Acc);
}

/// The low and high bf16 of a pair, as f32.
#[inline(always)]
fn halves(v: u32) -> (f32, f32) {
    (f32::from_bits(v << 16), f32::from_bits(v & 0xffff_0000))
}

/// The two products of one pair added as `TDPBF16PS` defines it, low halves first (each
/// product of two bf16 is exact in f32, so only the additions round).
#[cfg(test)]
fn dot_pair(acc: f32, a: u32, b: u32) -> f32 {
    let ((al, ah), (bl, bh)) = (halves(a), halves(b));
    (acc + al * bl) + ah * bh
}

/// The same as `VDPBF16PS` defines it: high halves first.
#[inline(always)]
fn dot_pair_high_first(acc: f32, a: u32, b: u32) -> f32 {
    let ((al, ah), (bl, bh)) = (halves(a), halves(b));
    (acc + ah * bh) + al * bl
}

/// The software model of [`Lanes`] (the reference kernel).
struct SoftLanes;

impl Lanes for SoftLanes {
    type Acc = [f32; 16];
    type Pairs = [u32; 16];
    #[inline(always)]
    unsafe fn zero() -> [f32; 16] {
        [0.0; 16]
    }
    #[inline(always)]
    unsafe fn load(p: *const u32) -> [u32; 16] {
        // SAFETY: the caller guarantees 16 readable words.
        unsafe { p.cast::<[u32; 16]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn dot(mut acc: [f32; 16], a: u32, b: [u32; 16]) -> [f32; 16] {
        for i in 0..16 {
            acc[i] = dot_pair_high_first(acc[i], a, b[i]);
        }
        acc
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, acc: [f32; 16]) {
        // SAFETY: the caller guarantees 16 writable floats.
        unsafe { p.cast::<[f32; 16]>().write_unaligned(acc) }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::Lanes`] on AVX-512 registers.
    pub(super) struct Avx512Lanes;

    impl super::Lanes for Avx512Lanes {
        type Acc = __m512;
        type Pairs = __m512i;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            // SAFETY: only called from functions compiled with AVX-512 enabled.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn load(p: *const u32) -> __m512i {
            // SAFETY: as above; the caller guarantees 64 readable bytes.
            unsafe { _mm512_loadu_si512(p.cast()) }
        }
        #[inline(always)]
        unsafe fn dot(acc: __m512, a: u32, b: __m512i) -> __m512 {
            // SAFETY: as above (AVX512-BF16 enabled too); the casts only reinterpret bits.
            unsafe {
                let a = _mm512_set1_epi32(a as i32);
                _mm512_dpbf16_ps(
                    acc,
                    std::mem::transmute::<__m512i, __m512bh>(a),
                    std::mem::transmute::<__m512i, __m512bh>(b),
                )
            }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, acc: __m512) {
            // SAFETY: as above; the caller guarantees 64 writable bytes.
            unsafe { _mm512_storeu_ps(p, acc) }
        }
    }

    /// Products per second of `VDPBF16PS` (32 per instruction) over those of
    /// `VFMADD231PS` (16), both on 12 independent 512-bit accumulators: the best of seven
    /// interleaved rounds of each (about 0.5 ms a round), so that a round slowed by another
    /// process on the core does not decide.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn throughput_ratio() -> f64 {
        const ITERS: usize = 40_000;
        let time = |f: &dyn Fn() -> f32| {
            let t = std::time::Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64()
        };
        let fma = || {
            let mut acc = [_mm512_setzero_ps(); 12];
            let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            for _ in 0..ITERS {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, a, b);
                }
            }
            acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
        };
        // SAFETY: the features are enabled here; the casts only reinterpret bits.
        let dot = || unsafe {
            let mut acc = [_mm512_setzero_ps(); 12];
            let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f80_3f80));
            let b = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3380_3380));
            for _ in 0..ITERS {
                for x in acc.iter_mut() {
                    *x = _mm512_dpbf16_ps(*x, a, b);
                }
            }
            acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
        };
        let (mut t_fma, mut t_dot) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..7 {
            t_fma = t_fma.min(time(&fma));
            t_dot = t_dot.min(time(&dot));
        }
        2.0 * t_fma / t_dot
    }

    /// The AVX512-BF16 kernel.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16; `block` must pass [`super::Block::check`].
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn run(block: &super::Block<'_>, buf: *mut f32) {
        // SAFETY: forwarded.
        unsafe { super::run_lanes::<Avx512Lanes>(block, buf) }
    }
}

/// Output channels per micro-kernel of the vector kernels.
const MR: usize = 8;

/// The vector kernels: `MR` output channels × 32 positions per micro-kernel, accumulated in
/// registers over every tap and channel pair.
///
/// # Safety
/// `block` must pass [`Block::check`] against `buf`'s `O'·len_pad` elements.
#[inline(always)]
unsafe fn run_lanes<L: Lanes>(block: &Block<'_>, buf: *mut f32) {
    let w = block.w;
    let pairs = w.c_pad / 2;
    let (x, vp) = (block.x.as_ptr(), block.vp);
    for ob in (0..w.o_pad).step_by(MR) {
        for nb in (0..block.len_pad).step_by(32) {
            // SAFETY: every index stays inside the extents checked by `Block::check`.
            unsafe {
                let mut acc = [[L::zero(); 2]; MR];
                for (t, off) in block.taps.iter().enumerate() {
                    let a = w.data.as_ptr().add((t * w.o_pad + ob) * pairs);
                    let b = x.add(block.q0 + off + nb);
                    for kp in 0..pairs {
                        let b0 = L::load(b.add(kp * vp));
                        let b1 = L::load(b.add(kp * vp + 16));
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let av = *a.add(r * pairs + kp);
                            acc[0] = L::dot(acc[0], av, b0);
                            acc[1] = L::dot(acc[1], av, b1);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let dst = buf.add((ob + r) * block.len_pad + nb);
                    L::store(dst, acc[0]);
                    L::store(dst.add(16), acc[1]);
                }
            }
        }
    }
}

/// The reference kernel, compiled for AVX2+FMA when the CPU has them (it then vectorises).
fn run_reference(block: &Block<'_>, buf: &mut [f32]) {
    block.check(buf);
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run_avx2(block: &Block<'_>, buf: *mut f32) {
            // SAFETY: forwarded.
            unsafe { run_lanes::<SoftLanes>(block, buf) }
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features are present; the block was checked.
            unsafe { run_avx2(block, buf.as_mut_ptr()) };
            return;
        }
    }
    // SAFETY: the block was checked.
    unsafe { run_lanes::<SoftLanes>(block, buf.as_mut_ptr()) }
}

/// The AMX tile configuration (`LDTILECFG`'s 64-byte operand, palette 1).
#[repr(C, align(64))]
pub(crate) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Eight tiles of 16 rows × 64 bytes.
    pub(crate) fn full() -> Self {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        cfg
    }
}

/// The tile instructions of the AMX kernel. Tiles 0–3 accumulate, 4–5 hold weights, 6–7
/// input pairs.
pub(crate) trait Tiles {
    unsafe fn config(&mut self, cfg: &TileConfig);
    unsafe fn zero(&mut self, t: usize);
    /// Loads tile `t` (an accumulator to resume, or an operand): row `r` from `p + r·stride`
    /// (bytes).
    unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize);
    /// `TDPBF16PS c, a, b`.
    unsafe fn dot(&mut self, c: usize, a: usize, b: usize);
    /// Stores tile `t`: row `r` to `p + r·stride` (bytes).
    unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize);
    unsafe fn release(&mut self);
}

/// The software model of [`Tiles`], following the instructions' definitions (tests only:
/// it checks the AMX kernel's logic on machines without AMX).
#[cfg(test)]
pub(crate) struct SoftTiles {
    data: [[u8; 1024]; 8],
    rows: [usize; 8],
    colsb: [usize; 8],
}

#[cfg(test)]
impl SoftTiles {
    fn new() -> Self {
        SoftTiles {
            data: [[0; 1024]; 8],
            rows: [0; 8],
            colsb: [0; 8],
        }
    }
    fn word(&self, t: usize, r: usize, i: usize) -> u32 {
        let b = &self.data[t][r * 64 + 4 * i..][..4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

#[cfg(test)]
impl Tiles for SoftTiles {
    unsafe fn config(&mut self, cfg: &TileConfig) {
        assert_eq!(cfg.palette, 1);
        for t in 0..8 {
            self.rows[t] = cfg.rows[t] as usize;
            self.colsb[t] = cfg.colsb[t] as usize;
            assert!(self.rows[t] <= 16 && self.colsb[t] <= 64);
        }
        self.data = [[0; 1024]; 8];
    }
    unsafe fn zero(&mut self, t: usize) {
        self.data[t] = [0; 1024];
    }
    unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize) {
        for r in 0..self.rows[t] {
            let n = self.colsb[t];
            // SAFETY: the caller guarantees the rows are readable.
            let src = unsafe { std::slice::from_raw_parts(p.add(r * stride), n) };
            self.data[t][r * 64..r * 64 + n].copy_from_slice(src);
        }
    }
    unsafe fn dot(&mut self, c: usize, a: usize, b: usize) {
        let (m, n, k) = (self.rows[c], self.colsb[c] / 4, self.colsb[a] / 4);
        assert!(self.rows[a] == m && self.rows[b] == k && self.colsb[b] / 4 == n);
        for i in 0..m {
            for kk in 0..k {
                let av = self.word(a, i, kk);
                for j in 0..n {
                    let acc = f32::from_bits(self.word(c, i, j));
                    let v = dot_pair(acc, av, self.word(b, kk, j));
                    self.data[c][i * 64 + 4 * j..][..4].copy_from_slice(&v.to_bits().to_le_bytes());
                }
            }
        }
    }
    unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize) {
        for r in 0..self.rows[t] {
            let n = self.colsb[t];
            // SAFETY: the caller guarantees the rows are writable.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.add(r * stride), n) };
            dst.copy_from_slice(&self.data[t][r * 64..r * 64 + n]);
        }
    }
    unsafe fn release(&mut self) {
        self.rows = [0; 8];
        self.colsb = [0; 8];
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    /// [`super::Tiles`] on the AMX unit (the state is per thread; every block configures it
    /// and releases it).
    pub(crate) struct HwTiles;

    impl super::Tiles for HwTiles {
        #[inline(always)]
        unsafe fn config(&mut self, cfg: &super::TileConfig) {
            // SAFETY: `cfg` is a valid palette-1 configuration; the process has the tile
            // permission (checked before this kernel is chosen).
            unsafe { asm!("ldtilecfg [{}]", in(reg) cfg, options(nostack, readonly)) }
        }
        #[inline(always)]
        unsafe fn zero(&mut self, t: usize) {
            // SAFETY: tiles are configured.
            unsafe {
                match t {
                    0 => asm!("tilezero tmm0", options(nostack, nomem)),
                    1 => asm!("tilezero tmm1", options(nostack, nomem)),
                    2 => asm!("tilezero tmm2", options(nostack, nomem)),
                    3 => asm!("tilezero tmm3", options(nostack, nomem)),
                    _ => unreachable!("accumulator tiles are 0-3"),
                }
            }
        }
        #[inline(always)]
        unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize) {
            // SAFETY: the caller guarantees the rows are readable.
            unsafe {
                match t {
                    0 => {
                        asm!("tileloadd tmm0, [{} + {}*1]", in(reg) p, in(reg) stride, options(nostack, readonly))
                    }
                    1 => {
                        asm!("tileloadd tmm1, [{} + {}*1]", in(reg) p, in(reg) stride, options(nostack, readonly))
                    }
                    2 => {
                        asm!("tileloadd tmm2, [{} + {}*1]", in(reg) p, in(reg) stride, options(nostack, readonly))
                    }
                    3 => {
                        asm!("tileloadd tmm3, [{} + {}*1]", in(reg) p, in(reg) stride, options(nostack, readonly))
                    }
                    4 => {
                        asm!("tileloadd tmm4, [{} + {}*1]", in(reg) p, in(reg) stride, options(nostack, readonly))
                    }
                    5 => {
                        asm!("tileloadd tmm5, [{} + {}*1]", in(reg) p, in(reg) stride, options(nostack, readonly))
                    }
                    6 => {
                        asm!("tileloadd tmm6, [{} + {}*1]", in(reg) p, in(reg) stride, options(nostack, readonly))
                    }
                    7 => {
                        asm!("tileloadd tmm7, [{} + {}*1]", in(reg) p, in(reg) stride, options(nostack, readonly))
                    }
                    _ => unreachable!("there are 8 tiles"),
                }
            }
        }
        #[inline(always)]
        unsafe fn dot(&mut self, c: usize, a: usize, b: usize) {
            // SAFETY: tiles are configured and loaded.
            unsafe {
                match (c, a, b) {
                    (0, 4, 6) => asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem)),
                    (1, 4, 7) => asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem)),
                    (2, 5, 6) => asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem)),
                    (3, 5, 7) => asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem)),
                    _ => unreachable!("the kernel's four tile products"),
                }
            }
        }
        #[inline(always)]
        unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize) {
            // SAFETY: the caller guarantees the rows are writable.
            unsafe {
                match t {
                    0 => {
                        asm!("tilestored [{} + {}*1], tmm0", in(reg) p, in(reg) stride, options(nostack))
                    }
                    1 => {
                        asm!("tilestored [{} + {}*1], tmm1", in(reg) p, in(reg) stride, options(nostack))
                    }
                    2 => {
                        asm!("tilestored [{} + {}*1], tmm2", in(reg) p, in(reg) stride, options(nostack))
                    }
                    3 => {
                        asm!("tilestored [{} + {}*1], tmm3", in(reg) p, in(reg) stride, options(nostack))
                    }
                    _ => unreachable!("accumulator tiles are 0-3"),
                }
            }
        }
        #[inline(always)]
        unsafe fn release(&mut self) {
            // SAFETY: releasing is always valid once configured.
            unsafe { asm!("tilerelease", options(nostack, nomem)) }
        }
    }
}

/// The AMX kernel: 32 output channels × 32 positions in tiles 0–3 (`[c0 c1; c2 c3]`), over
/// every tap and every 16 channel pairs: weights rows `ob..ob+16` and `ob+16..ob+32` in tiles
/// 4 and 5, input positions `nb..nb+16` and `nb+16..nb+32` in tiles 6 and 7.
///
/// # Safety
/// `block` must pass [`Block::check`] against `buf`'s `O'·len_pad` elements; `tiles` must be
/// runnable (for the hardware: AMX granted to the process).
unsafe fn run_tiles<T: Tiles>(tiles: &mut T, block: &Block<'_>, buf: *mut f32) {
    let w = block.w;
    let pairs = w.c_pad / 2;
    let (a_stride, b_stride, c_stride) = (pairs * 4, block.vp * 4, block.len_pad * 4);
    let cfg = TileConfig::full();
    // SAFETY: every address stays inside the extents checked by `Block::check`: weight rows
    // below `O'`, pair rows below `C'/2`, positions below `q0 + max_off + len_pad`.
    unsafe {
        tiles.config(&cfg);
        // Channel pairs a chunk of `AMX_KC` at a time (partial sums kept in `buf`), positions
        // outside the output channels: the input rows one block of 32 positions reads over
        // all taps of a chunk (≈ 9 × 3 cache lines × 16 rows) stay in L1 while every block of
        // output channels uses them.
        for kc0 in (0..pairs).step_by(AMX_KC) {
            let kc1 = (kc0 + AMX_KC).min(pairs);
            for nb in (0..block.len_pad).step_by(32) {
                let b = block.x.as_ptr().add(block.q0 + nb);
                if nb + 32 < block.len_pad {
                    // The next block's rows, while this one computes.
                    for off in block.taps.iter().step_by(3) {
                        for kb in kc0..kc1 {
                            let row = b.add(off + kb * block.vp + 32);
                            prefetch(row.cast());
                            prefetch(row.add(16).cast());
                            prefetch(row.add(32).cast());
                        }
                    }
                }
                for ob in (0..w.o_pad).step_by(32) {
                    let c = buf.add(ob * block.len_pad + nb).cast::<u8>();
                    let cs = [
                        c,
                        c.add(64),
                        c.add(16 * c_stride),
                        c.add(16 * c_stride + 64),
                    ];
                    for (t, cp) in cs.iter().enumerate() {
                        if kc0 == 0 {
                            tiles.zero(t);
                        } else {
                            tiles.load(t, *cp, c_stride);
                        }
                    }
                    for (t, off) in block.taps.iter().enumerate() {
                        let a = w.data.as_ptr().add((t * w.o_pad + ob) * pairs);
                        let b = b.add(*off);
                        for kb in (kc0..kc1).step_by(16) {
                            // Each load just before the first product that reads it (tiles
                            // are not renamed: a load waits for the last reader of its tile).
                            tiles.load(6, b.add(kb * block.vp).cast(), b_stride);
                            tiles.load(4, a.add(kb).cast(), a_stride);
                            tiles.dot(0, 4, 6);
                            tiles.load(7, b.add(kb * block.vp + 16).cast(), b_stride);
                            tiles.dot(1, 4, 7);
                            tiles.load(5, a.add(16 * pairs + kb).cast(), a_stride);
                            tiles.dot(2, 5, 6);
                            tiles.dot(3, 5, 7);
                        }
                    }
                    for (t, cp) in cs.iter().enumerate() {
                        tiles.store(t, *cp, c_stride);
                    }
                }
            }
        }
        tiles.release();
    }
}

/// Channel pairs per chunk of the AMX kernel (measured on the full-size U-Net: 9 % less kernel
/// time than no chunking, the same as 32; 16 is slower, the accumulators' reloads dominating).
const AMX_KC: usize = 64;

/// Asks for the cache line at `p` (a hint: never faults).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint and never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Whether the process may use AMX tiles (the kernel is chosen only then).
pub(crate) fn amx_granted() -> bool {
    amx_state().is_ok()
}

/// The hardware tiles (the caller checks [`amx_granted`]).
#[cfg(target_arch = "x86_64")]
pub(crate) fn hw_tiles() -> amx::HwTiles {
    amx::HwTiles
}

/// The software model of the tiles.
#[cfg(test)]
pub(crate) fn soft_tiles() -> SoftTiles {
    SoftTiles::new()
}

/// Which implementation runs a block: a kernel, or (in tests) the software model of the AMX
/// kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Runner {
    Kernel(Bf16Kernel),
    #[cfg(test)]
    SoftAmx,
}

fn run_block(runner: Runner, block: &Block<'_>, buf: &mut [f32]) {
    block.check(buf);
    match runner {
        Runner::Kernel(Bf16Kernel::Reference) => run_reference(block, buf),
        #[cfg(target_arch = "x86_64")]
        Runner::Kernel(Bf16Kernel::Avx512Bf16) => {
            assert!(
                has_avx512bf16(),
                "the AVX512-BF16 kernel needs the instructions"
            );
            // SAFETY: the instructions are present and the block was checked.
            unsafe { avx512::run(block, buf.as_mut_ptr()) }
        }
        #[cfg(target_arch = "x86_64")]
        Runner::Kernel(Bf16Kernel::Amx) => {
            assert!(amx_state().is_ok(), "the AMX kernel needs AMX granted");
            // SAFETY: AMX is granted and the block was checked.
            unsafe { run_tiles(&mut amx::HwTiles, block, buf.as_mut_ptr()) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Runner::Kernel(k) => unreachable!("{k} is x86-64 only and never available here"),
        #[cfg(test)]
        // SAFETY: the block was checked; the model runs anywhere.
        Runner::SoftAmx => unsafe { run_tiles(&mut SoftTiles::new(), block, buf.as_mut_ptr()) },
    }
}

/// One 1×1×1 product in bf16: `buf (O', len_pad) = W · X[:, q0..q0+len]` for pairs `x`
/// (`(C'/2, vp)` plus [`SLACK`], as [`pad_pairs`] makes them) and weights packed with one tap;
/// returns `len_pad` (`len` rounded up to 32: the row stride of `buf`, which must hold
/// `O'·len_pad` floats; columns past `len` are garbage).
pub(crate) fn product_block(
    kernel: Bf16Kernel,
    x: &[u32],
    vp: usize,
    q0: usize,
    len: usize,
    w: &Bf16Weights,
    buf: &mut [f32],
) -> usize {
    assert_eq!(w.taps, 1);
    let block = Block {
        x,
        vp,
        q0,
        len_pad: len.next_multiple_of(32),
        taps: &[0],
        w,
    };
    run_block(Runner::Kernel(kernel), &block, buf);
    block.len_pad
}

/// The bf16 counterpart of [`crate::cpu::correlate::correlate_sample`]: `xp` is the padded
/// block of planes as pairs ([`pad_pairs`]), `p` its padded extent.
#[allow(clippy::too_many_arguments)]
pub(crate) fn correlate_sample(
    runner: Runner,
    xp: &[u32],
    p: [usize; 3],
    w: &Bf16Weights,
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
    let blen = block_len(w.o_pad).next_multiple_of(32);
    let o = w.o;
    assert!(xp.len() == w.c_pad / 2 * vp + SLACK);
    assert!(cstride >= n_out && out.len() >= (o - 1) * cstride + n_out);
    let dst = crate::cpu::OutPtr(out.as_mut_ptr());
    crate::cpu::channels_last::par_position_blocks(span, blen, w.o_pad * blen, |buf, q0, len| {
        let block = Block {
            x: xp,
            vp,
            q0,
            len_pad: len.next_multiple_of(32),
            taps: &taps,
            w,
        };
        run_block(runner, &block, buf);
        // SAFETY: blocks cover disjoint output positions, all inside `out` (checked).
        unsafe { scatter_block(buf, block.len_pad, q0, len, p, od, o, bias, dst, cstride) };
    });
}

/// Tokens per tile of the transposes of [`linear`].
const TILE: usize = 64;

/// `x (T×C) · wᵀ` for `w (O×C)` (a `Linear` layer without its bias) in bf16: the 1×1×1
/// correlation of a `1×1×T` grid with `C` channels, so `x` is transposed into pairs (`C'/2 × T`)
/// and the `(O × T)` result back, both a tile of tokens at a time.
pub(crate) fn linear(
    runner: Runner,
    x: &[f32],
    t: usize,
    c: usize,
    w: &[f32],
    o: usize,
) -> Vec<f32> {
    assert!(x.len() == t * c && w.len() == o * c);
    let packed = pack_weights(w, 1, o, c);
    let pairs = packed.c_pad / 2;
    let mut xp = vec![0u32; pairs * t + SLACK];
    let dst = SharedU32(xp.as_mut_ptr());
    x.par_chunks(TILE * c).enumerate().for_each(|(ti, rows)| {
        let t0 = ti * TILE;
        for (i, row) in rows.chunks(c).enumerate() {
            for r in 0..c.div_ceil(2) {
                let lo = u32::from(to_bf16(row[2 * r]));
                let hi = row.get(2 * r + 1).map_or(0, |v| u32::from(to_bf16(*v)));
                // SAFETY: (r, t0 + i) lies inside `xp` and belongs to this tile only.
                unsafe { *dst.get().add(r * t + t0 + i) = lo | (hi << 16) };
            }
        }
    });
    let mut ot = vec![0f32; o * t];
    correlate_sample(runner, &xp, [1, 1, t], &packed, [1, 1, 1], None, &mut ot, t);
    let mut out = vec![0f32; t * o];
    out.par_chunks_mut(TILE * o)
        .enumerate()
        .for_each(|(ti, rows)| {
            let t0 = ti * TILE;
            let n = rows.len() / o;
            for oc in 0..o {
                let src = &ot[oc * t + t0..][..n];
                for (i, v) in src.iter().enumerate() {
                    rows[i * o + oc] = *v;
                }
            }
        });
    out
}

/// A raw `u32` pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedU32(*mut u32);
// SAFETY: every task writes a disjoint set of elements.
unsafe impl Send for SharedU32 {}
unsafe impl Sync for SharedU32 {}
impl SharedU32 {
    fn get(self) -> *mut u32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::correlate::{pack_weights as pack_f32, pad_sample};

    #[test]
    fn rounding_is_to_nearest_even_and_flushes_subnormals() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (upwards).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(1.0 + 1.5 / 256.0), 0x3f81);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert_eq!(to_bf16(1e-40), 0);
        assert_eq!(to_bf16(-1e-40), 0x8000);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(to_bf16(f32::MAX), 0x7f80);
        assert!(f32::from_bits(u32::from(to_bf16(f32::NAN)) << 16).is_nan());
        for x in [
            1.0,
            1.0 + 1.0 / 256.0,
            -2.5,
            1e-40,
            -1e-40,
            f32::MAX,
            3.3e38,
            -7.25e-3,
        ] {
            assert_eq!(to_bf16_bits(x), u32::from(to_bf16(x)), "{x}");
        }
        assert!(f32::from_bits(to_bf16_bits(f32::NAN) << 16).is_nan());
    }

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
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

    fn round(v: &[f32]) -> Vec<f32> {
        v.iter()
            .map(|x| f32::from_bits(u32::from(to_bf16(*x)) << 16))
            .collect()
    }

    /// Runs one sample through `runner` and through the f32 kernel on bf16-rounded operands
    /// and on the original ones; returns (max error against the rounded f32 result relative
    /// to its largest magnitude, the same against the unrounded one).
    fn compare(runner: Runner, c: usize, o: usize, dhw: [usize; 3]) -> (f32, f32) {
        let (k, pad) = ([3, 3, 3], [1, 1, 1]);
        let x = rand_vec(c * dhw.iter().product::<usize>(), 7);
        let w = rand_vec(o * c * 27, 11);
        let bias = rand_vec(o, 13);
        let n_out = dhw.iter().product::<usize>();
        let f32_out = |x: &[f32], w: &[f32]| {
            let wp = pack_f32(w, o, c, 27, false);
            let vol = dhw.iter().product::<usize>();
            let (xp, p) = pad_sample(|ci| &x[ci * vol..(ci + 1) * vol], c, dhw, pad);
            let mut out = vec![0f32; o * n_out];
            crate::cpu::correlate::correlate_sample(
                &xp,
                c,
                p,
                &wp,
                o,
                k,
                Some(&bias),
                &mut out,
                n_out,
            );
            out
        };
        let exact = f32_out(&round(&x), &round(&w));
        let plain = f32_out(&x, &w);
        let vol = dhw.iter().product::<usize>();
        let (xp, p) = pad_sample(|ci| &x[ci * vol..(ci + 1) * vol], c, dhw, pad);
        let packed = pack_weights(&pack_f32(&w, o, c, 27, false), 27, o, c);
        let mut pairs = Vec::new();
        pair_slab(&xp, c, p.iter().product(), packed.c_pad, &mut pairs);
        let mut out = vec![f32::NAN; o * n_out];
        correlate_sample(runner, &pairs, p, &packed, k, Some(&bias), &mut out, n_out);
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = |r: &[f32]| {
            out.iter()
                .zip(r)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale
        };
        assert!(
            out.iter().all(|v| v.is_finite()),
            "{runner:?}: every output written"
        );
        (err(&exact), err(&plain))
    }

    fn check(runner: Runner) {
        // Channel counts that are and are not multiples of 32; a grid whose blocks end
        // inside a row; an odd number of channels (a half-empty pair).
        for (c, o, dhw) in [
            (32, 32, [6, 7, 9]),
            (48, 40, [5, 9, 11]),
            (17, 64, [4, 6, 5]),
            // Several blocks per sample.
            (32, 32, [10, 20, 24]),
        ] {
            let (exact, plain) = compare(runner, c, o, dhw);
            eprintln!(
                "{runner:?} c={c} o={o} {dhw:?}: {exact:.2e} vs rounded f32, {plain:.2e} vs f32"
            );
            // Against f32 on the same rounded operands only the summation order differs.
            assert!(
                exact < 1e-5,
                "{runner:?} c={c} o={o}: {exact} against rounded f32"
            );
            // Against f32 itself: bf16's relative precision is 2^-9 per operand.
            assert!(plain < 2e-2, "{runner:?} c={c} o={o}: {plain} against f32");
        }
    }

    #[test]
    fn reference_kernel_matches_f32_on_rounded_operands() {
        check(Runner::Kernel(Bf16Kernel::Reference));
    }

    #[test]
    fn amx_kernel_logic_matches_f32_on_the_tile_model() {
        check(Runner::SoftAmx);
    }

    /// The hardware kernels: run where the CPU has them, skipped (with the reason) elsewhere.
    #[test]
    fn hardware_kernels_match_f32_where_present() {
        for k in [Bf16Kernel::Avx512Bf16, Bf16Kernel::Amx] {
            match k.check() {
                Ok(()) => check(Runner::Kernel(k)),
                Err(why) => eprintln!("skipping the {k} kernel: {why}"),
            }
        }
    }

    #[test]
    fn linear_matches_f32_on_rounded_operands() {
        let (t, c, o) = (300, 48, 144);
        let x = rand_vec(t * c, 3);
        let w = rand_vec(o * c, 5);
        let (xr, wr) = (round(&x), round(&w));
        let mut want = vec![0f32; t * o];
        for i in 0..t {
            for j in 0..o {
                want[i * o + j] = (0..c).map(|k| xr[i * c + k] * wr[j * c + k]).sum();
            }
        }
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut runners = vec![Runner::Kernel(Bf16Kernel::Reference), Runner::SoftAmx];
        runners.extend(
            [Bf16Kernel::Avx512Bf16, Bf16Kernel::Amx]
                .into_iter()
                .filter(|k| k.check().is_ok())
                .map(Runner::Kernel),
        );
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
    fn precision_and_kernel_names_parse() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("F32".parse::<Precision>().unwrap(), Precision::F32);
        assert!("f16".parse::<Precision>().is_err());
        for k in Bf16Kernel::ALL {
            assert_eq!(Bf16Kernel::from_name(k.name()), Some(k));
        }
        assert!(Bf16Kernel::Reference.check().is_ok());
    }
}
