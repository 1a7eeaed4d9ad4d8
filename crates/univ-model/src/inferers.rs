//! Sliding-window inference with MONAI 0.9.0's semantics (the official inference: `sliding_window_inference` with a 96³ window, overlap 0.5 and Gaussian blending), in bounded memory.
//!
//! Windows of `roi` voxels are placed as MONAI places them (interval `int(roi·(1−overlap))`,
//! the last window moved back to end at the border, sides smaller than the window zero-padded
//! symmetrically), visited with the last axis fastest, one window per network call (the U-Net's
//! batch statistics and the head's pooled vector depend on that). Logits are blended with a
//! Gaussian importance map (σ = 0.125·roi, centred at `roi/2`, normalised to 1, clamped below at
//! 1e-3) or uniformly.
//!
//! Memory: the blend is accumulated only over a slab of `roi` planes along the first axis, the
//! slowest one in visiting order. When the windows move on along that axis, the planes they
//! left are final: they are handed to a sink and their memory is reused. Peak memory is
//! `K × roi × Y × Z` values, not `K × X × Y × Z`.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// How window predictions are weighted where windows overlap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BlendMode {
    /// Equal weights.
    Constant,
    /// A Gaussian of σ = `sigma_scale` × roi per axis.
    Gaussian {
        /// σ as a fraction of the window side (0.125 in the official code).
        sigma_scale: f64,
    },
}

/// Sliding-window settings; [`Default`] gives the official ones (96³, overlap 0.5, Gaussian).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindowOptions {
    /// Window size.
    pub roi: [usize; 3],
    /// Fraction of overlap between neighbouring windows, in `[0, 1)`.
    pub overlap: f64,
    /// Blending.
    pub mode: BlendMode,
    /// Windows per network call (1 in the official code; with batch-statistics BatchNorm a
    /// larger batch changes the results, exactly as in MONAI).
    pub sw_batch_size: usize,
    /// Most windows one volume may take ([`DEFAULT_MAX_WINDOWS`]); more is an error before
    /// any window runs (an overlap near 1 asks for tens of thousands).
    pub max_windows: usize,
    /// Limits on the blend's buffers (a slab of the padded volume per class).
    pub limits: univ_io::Limits,
    /// Where [`crate::segment()`] blends: `None` (the default) on the model's device when that
    /// is not the CPU ([`sliding_window_inference_on_device`]) and in host memory otherwise
    /// ([`sliding_window_inference`]); `Some(true)` or `Some(false)` chooses.
    pub blend_on_device: Option<bool>,
}

/// Default of [`SlidingWindowOptions::max_windows`]: about 8 hours of a full-size U-Net on
/// two CPU cores, and 36 times what a 1.5 mm abdominal CT takes at the official overlap.
pub const DEFAULT_MAX_WINDOWS: usize = 4096;

impl Default for SlidingWindowOptions {
    fn default() -> Self {
        SlidingWindowOptions {
            roi: [96; 3],
            overlap: 0.5,
            mode: BlendMode::Gaussian { sigma_scale: 0.125 },
            sw_batch_size: 1,
            max_windows: DEFAULT_MAX_WINDOWS,
            limits: univ_io::Limits::default(),
            blend_on_device: None,
        }
    }
}

/// The importance map, `roi` voxels in C order (last axis fastest).
pub fn importance_map(roi: [usize; 3], mode: BlendMode) -> Vec<f32> {
    let n: usize = roi.iter().product();
    match mode {
        BlendMode::Constant => vec![1.0; n],
        BlendMode::Gaussian { sigma_scale } => {
            // MONAI 0.9.0: a delta at roi/2 filtered by the erf-discretised Gaussian, divided by
            // its maximum, clamped below at 1e-3: w = max(1e-3, Π g(i − c) / g(0)).
            let axis = |len: usize| -> Vec<f64> {
                let sigma = sigma_scale * len as f64;
                let s = sigma * std::f64::consts::SQRT_2;
                let g = |x: f64| 0.5 * (libm::erf((x + 0.5) / s) - libm::erf((x - 0.5) / s));
                let c = (len / 2) as f64;
                let g0 = g(0.0);
                (0..len).map(|i| g(i as f64 - c) / g0).collect()
            };
            let (a, b, c) = (axis(roi[0]), axis(roi[1]), axis(roi[2]));
            let mut out = Vec::with_capacity(n);
            for x in &a {
                for y in &b {
                    for z in &c {
                        out.push(((x * y * z) as f32).max(1e-3));
                    }
                }
            }
            out
        }
    }
}

/// Window start positions along one (padded) axis of `size` voxels, as MONAI's
/// `dense_patch_slices`: starts `0, i, 2i, …` with `i = int(roi·(1−overlap))`, each moved back
/// so that it ends inside the axis, duplicates removed.
pub fn window_starts(size: usize, roi: usize, overlap: f64) -> Vec<usize> {
    let interval = if roi == size {
        roi
    } else {
        ((roi as f64 * (1.0 - overlap)) as usize).max(1)
    };
    let count = size.div_ceil(interval);
    let mut out: Vec<usize> = Vec::new();
    for i in 0..count {
        let s = (i * interval).min(size.saturating_sub(roi));
        if out.last() != Some(&s) {
            out.push(s);
        }
    }
    out
}

/// Where the windows of a volume go: MONAI's grid on the zero-padded volume, and the slab of
/// planes the blend keeps.
struct Plan {
    roi: [usize; 3],
    /// The volume's sides, each raised to the window's.
    padded: [usize; 3],
    /// Zero planes before the volume on each axis (the padding is symmetric, the odd one after).
    before: [usize; 3],
    /// Window starts in the padded volume, the last axis fastest.
    windows: Vec<[usize; 3]>,
    /// Planes along the first axis that one batch of windows spans.
    slab: usize,
}

impl Plan {
    /// Checks the options and the limits and places the windows.
    fn new(dims: [usize; 3], opts: &SlidingWindowOptions) -> Result<Self> {
        let roi = opts.roi;
        if !(0.0..1.0).contains(&opts.overlap) || roi.contains(&0) || opts.sw_batch_size == 0 {
            return Err(Error::Config(format!(
                "roi {roi:?}, overlap {} and batch {} are invalid",
                opts.overlap, opts.sw_batch_size
            )));
        }
        if dims.contains(&0) {
            return Err(Error::shape(
                "sliding window",
                format!("an empty volume of dims {dims:?}"),
            ));
        }
        let padded = [0, 1, 2].map(|a| dims[a].max(roi[a]));
        let before = [0, 1, 2].map(|a| (padded[a] - dims[a]) / 2);
        let starts: Vec<Vec<usize>> = (0..3)
            .map(|a| window_starts(padded[a], roi[a], opts.overlap))
            .collect();
        let mut windows = Vec::new();
        for &sx in &starts[0] {
            for &sy in &starts[1] {
                for &sz in &starts[2] {
                    windows.push([sx, sy, sz]);
                }
            }
        }
        let total = windows.len();
        if total > opts.max_windows {
            return Err(Error::Limit(format!(
                "{total} windows of {roi:?} at overlap {} for a {dims:?} volume exceed the limit \
                 of {} (SlidingWindowOptions::max_windows, `--max-windows` on the command line): \
                 lower the overlap or raise the limit",
                opts.overlap, opts.max_windows
            )));
        }
        // The slab spans the windows of one batch along the first axis.
        let slab = roi[0]
            + windows
                .chunks(opts.sw_batch_size)
                .map(|b| b[b.len() - 1][0] - b[0][0])
                .max()
                .unwrap_or(0);
        opts.limits.check_grid(
            "the blend's slab of weights",
            [slab, padded[1], padded[2]],
            4,
        )?;
        opts.limits.check_grid(
            "the batch of windows",
            [roi[0] * opts.sw_batch_size, roi[1], roi[2]],
            4,
        )?;
        Ok(Plan {
            roi,
            padded,
            before,
            windows,
            slab,
        })
    }
}

/// Runs `predictor` over windows of a volume laid out `(X, Y, Z)` in C order (Z fastest; the
/// network's `(D, H, W)`), blends the logits, and hands finished planes to `sink` as
/// `sink(x0, planes)` with `planes` = `(K, n, Y, Z)` C-order logits of planes `x0..x0+n`
/// (in order, each plane exactly once).
///
/// `predictor` maps `(B, 1, rx, ry, rz)` windows (B = `sw_batch_size`, fewer at the end) to
/// `(B, K, rx, ry, rz)` logits; consecutive windows are batched as MONAI batches them.
/// `progress` is called after each batch with (windows done, total).
///
/// # Errors
/// Invalid options, a predictor error, or predictor outputs of the wrong shape.
pub fn sliding_window_inference(
    input: &[f32],
    dims: [usize; 3],
    opts: &SlidingWindowOptions,
    device: &Device,
    mut predictor: impl FnMut(&Tensor) -> Result<Tensor>,
    mut sink: impl FnMut(usize, &[f32]) -> Result<()>,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    let plan = Plan::new(dims, opts)?;
    if input.len() != dims.iter().product::<usize>() {
        return Err(Error::shape(
            "sliding window",
            format!("{} voxels for dims {dims:?}", input.len()),
        ));
    }
    let Plan {
        roi,
        padded,
        before,
        ref windows,
        slab,
    } = plan;
    let total = windows.len();
    let batches: Vec<&[[usize; 3]]> = windows.chunks(opts.sw_batch_size).collect();
    let weights = importance_map(roi, opts.mode);
    let (py, pz) = (padded[1], padded[2]);
    let plane = py * pz;
    let mut num: Vec<f32> = Vec::new(); // (K, slab, PY, PZ), allocated once K is known
    let mut den = vec![0f32; slab * plane];
    let mut k = 0usize;
    let mut s0 = 0usize; // padded x of the slab's first plane
    let wlen: usize = roi.iter().product();
    let mut patch = vec![0f32; wlen * opts.sw_batch_size];
    let mut done = 0;

    // Hands planes [s0, upto) of the slab to the sink (those inside the unpadded volume) and
    // shifts the slab so that it starts at `upto`.
    let mut flush = |num: &mut Vec<f32>,
                     den: &mut Vec<f32>,
                     s0: &mut usize,
                     upto: usize,
                     k: usize|
     -> Result<()> {
        let n = upto - *s0;
        if n == 0 {
            return Ok(());
        }
        let lo = (*s0).max(before[0]);
        let hi = upto.min(before[0] + dims[0]);
        // A few planes per call, so that the hand-over buffer stays small.
        const PLANES_PER_CALL: usize = 8;
        let mut out = Vec::new();
        for lo in (lo..hi).step_by(PLANES_PER_CALL) {
            if k == 0 {
                break;
            }
            let m = PLANES_PER_CALL.min(hi - lo);
            out.resize(k * m * dims[1] * dims[2], 0.0);
            let (num, den, s0) = (&*num, &*den, *s0);
            out.par_chunks_mut(m * dims[1] * dims[2])
                .enumerate()
                .for_each(|(c, oc)| {
                    for (i, px) in (lo..lo + m).enumerate() {
                        let sx = px - s0;
                        for y in 0..dims[1] {
                            let row = (c * slab + sx) * plane + (y + before[1]) * pz + before[2];
                            let drow = sx * plane + (y + before[1]) * pz + before[2];
                            let o = (i * dims[1] + y) * dims[2];
                            for z in 0..dims[2] {
                                oc[o + z] = num[row + z] / den[drow + z];
                            }
                        }
                    }
                });
            sink(lo - before[0], &out)?;
        }
        // Shift the slab by n planes and clear the freed tail.
        let keep = slab.saturating_sub(n);
        for c in 0..k {
            let base = c * slab * plane;
            num.copy_within(base + n.min(slab) * plane..base + slab * plane, base);
            num[base + keep * plane..base + slab * plane].fill(0.0);
        }
        den.copy_within(n.min(slab) * plane..slab * plane, 0);
        den[keep * plane..].fill(0.0);
        *s0 = upto;
        Ok(())
    };

    for batch in batches {
        flush(&mut num, &mut den, &mut s0, batch[0][0], k)?;
        // Gather the windows (zeros outside the volume).
        for (j, &[sx, sy, sz]) in batch.iter().enumerate() {
            let win = &mut patch[j * wlen..(j + 1) * wlen];
            for x in 0..roi[0] {
                let ox = (sx + x) as isize - before[0] as isize;
                for y in 0..roi[1] {
                    let oy = (sy + y) as isize - before[1] as isize;
                    let dst = &mut win[(x * roi[1] + y) * roi[2]..(x * roi[1] + y + 1) * roi[2]];
                    if ox < 0 || ox >= dims[0] as isize || oy < 0 || oy >= dims[1] as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let srow = (ox as usize * dims[1] + oy as usize) * dims[2];
                    for (z, d) in dst.iter_mut().enumerate() {
                        let oz = (sz + z) as isize - before[2] as isize;
                        *d = if oz < 0 || oz >= dims[2] as isize {
                            0.0
                        } else {
                            input[srow + oz as usize]
                        };
                    }
                }
            }
        }
        let nb = batch.len();
        let x = Tensor::from_slice(&patch[..nb * wlen], (nb, 1, roi[0], roi[1], roi[2]), device)?;
        let y = predictor(&x)?;
        let first;
        (k, first) = window_channels(&y, nb, roi, k, &opts.limits, [slab, py, pz])?;
        if first {
            num = vec![0f32; k * slab * plane];
        }
        let logits = crate::ops::to_f32_vec(&y)?;
        if let Some(e) = non_finite(&logits, done, total, k, wlen) {
            return Err(e);
        }
        for (j, &[sx, sy, sz]) in batch.iter().enumerate() {
            let lj = &logits[j * k * wlen..(j + 1) * k * wlen];
            // Classes in parallel: each owns its part of the slab.
            num.par_chunks_mut(slab * plane)
                .zip(lj.par_chunks(wlen))
                .for_each(|(nc, lc)| {
                    for x in 0..roi[0] {
                        for yy in 0..roi[1] {
                            let src = (x * roi[1] + yy) * roi[2];
                            let dst = ((sx + x - s0) * py + sy + yy) * pz + sz;
                            for z in 0..roi[2] {
                                nc[dst + z] += weights[src + z] * lc[src + z];
                            }
                        }
                    }
                });
            for x in 0..roi[0] {
                for yy in 0..roi[1] {
                    let w = (x * roi[1] + yy) * roi[2];
                    let dst = ((sx + x - s0) * py + sy + yy) * pz + sz;
                    for z in 0..roi[2] {
                        den[dst + z] += weights[w + z];
                    }
                }
            }
        }
        done += nb;
        progress(done, total);
    }
    // The last windows end at the padded border: everything left is final.
    flush(&mut num, &mut den, &mut s0, padded[0], k)
}

/// The channels of a batch of window logits, checked against the batch, the window and the
/// channels of the batches before (`k`, 0 before the first), and whether this is the first
/// batch; for the first, the blend's slab of logits (`slab`: its x extent, and the padded y
/// and z) is checked against `limits` before the caller allocates it.
fn window_channels(
    y: &Tensor,
    nb: usize,
    roi: [usize; 3],
    k: usize,
    limits: &univ_io::Limits,
    slab: [usize; 3],
) -> Result<(usize, bool)> {
    let (b, kk, a1, a2, a3) = y.dims5()?;
    if b != nb || [a1, a2, a3] != roi {
        return Err(Error::shape(
            "sliding window",
            format!("predictor returned {:?} for {nb} windows", y.dims()),
        ));
    }
    if k != 0 && kk != k {
        return Err(Error::shape(
            "sliding window",
            format!("{kk} channels after {k}"),
        ));
    }
    if k == 0 {
        limits.check_grid(
            "the blend's slab of logits",
            [kk.saturating_mul(slab[0]), slab[1], slab[2]],
            4,
        )?;
    }
    Ok((kk, k == 0))
}

/// The error for the first non-finite value of a batch of window logits, if any (`done`
/// windows before this batch, `wlen` voxels a window).
fn non_finite(logits: &[f32], done: usize, total: usize, k: usize, wlen: usize) -> Option<Error> {
    let i = logits.iter().position(|v| !v.is_finite())?;
    Some(Error::NonFinite(format!(
        "the network returned a non-finite logit ({}) in window {} of {total} (class {} of {k}): \
         the weights or the input are damaged",
        logits[i],
        done + i / (k * wlen) + 1,
        (i / wlen) % k + 1
    )))
}

/// [`sliding_window_inference`] with everything on the input's device: the volume, the
/// windows, the Gaussian blend and the slab of logits stay there (a GPU's memory), and `sink`
/// receives the finished planes as a `(K, n, Y, Z)` tensor on that device (`sink(x0, planes)`,
/// planes `x0..x0+n`, in order, each once), so that only what the caller makes of them (masks,
/// probabilities) crosses to the host.
///
/// `input` is the `(X, Y, Z)` volume (Z fastest, the network's `(D, H, W)`). The arithmetic is
/// the host version's, operation for operation (on the CPU the two give the same bits); device
/// memory is the padded volume, the slab (`K × slab × Y × Z` values, as on the host) and one
/// batch of windows with its logits, plus transient copies of one window's share of the slab.
///
/// # Errors
/// As [`sliding_window_inference`].
pub fn sliding_window_inference_on_device(
    input: &Tensor,
    opts: &SlidingWindowOptions,
    mut predictor: impl FnMut(&Tensor) -> Result<Tensor>,
    mut sink: impl FnMut(usize, &Tensor) -> Result<()>,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    let (dx, dy, dz) = input.dims3()?;
    let dims = [dx, dy, dz];
    let plan = Plan::new(dims, opts)?;
    let Plan {
        roi,
        padded,
        before,
        ref windows,
        slab,
    } = plan;
    let device = input.device();
    let total = windows.len();
    let wlen: usize = roi.iter().product();
    let mut vol = input.to_dtype(candle_core::DType::F32)?;
    for a in 0..3 {
        vol = vol.pad_with_zeros(a, before[a], padded[a] - dims[a] - before[a])?;
    }
    let (py, pz) = (padded[1], padded[2]);
    let weights = Tensor::from_vec(
        importance_map(roi, opts.mode),
        (1, roi[0], roi[1], roi[2]),
        device,
    )?;
    // The weights of one window over whole planes, by its (y, z) start.
    let spread = |t: &Tensor, sy: usize, sz: usize| -> Result<Tensor> {
        Ok(t.pad_with_zeros(2, sy, py - sy - roi[1])?
            .pad_with_zeros(3, sz, pz - sz - roi[2])?)
    };
    let mut num: Option<Tensor> = None; // (K, slab, PY, PZ), made once K is known
    let mut den = Tensor::zeros((1, slab, py, pz), candle_core::DType::F32, device)?;
    let mut k = 0usize;
    let mut s0 = 0usize;
    let mut done = 0;

    // Hands planes [s0, upto) to the sink (those inside the volume) and moves the slab on.
    let mut flush =
        |num: &mut Option<Tensor>, den: &mut Tensor, s0: &mut usize, upto: usize| -> Result<()> {
            let n = upto - *s0;
            let Some(nm) = num.as_mut() else {
                *s0 = upto;
                return Ok(());
            };
            if n == 0 {
                return Ok(());
            }
            let lo = (*s0).max(before[0]);
            let hi = upto.min(before[0] + dims[0]);
            const PLANES_PER_CALL: usize = 8;
            for lo in (lo..hi).step_by(PLANES_PER_CALL) {
                let m = PLANES_PER_CALL.min(hi - lo);
                let crop = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.narrow(1, lo - *s0, m)?
                        .narrow(2, before[1], dims[1])?
                        .narrow(3, before[2], dims[2])?)
                };
                let planes = crop(nm)?.broadcast_div(&crop(den)?)?.contiguous()?;
                sink(lo - before[0], &planes)?;
            }
            let keep = slab.saturating_sub(n);
            let shift = |t: &Tensor| -> Result<Tensor> {
                let c = t.dim(0)?;
                let zeros = Tensor::zeros(
                    (c, slab - keep, py, pz),
                    candle_core::DType::F32,
                    t.device(),
                )?;
                Ok(if keep == 0 {
                    zeros
                } else {
                    Tensor::cat(&[&t.narrow(1, slab - keep, keep)?, &zeros], 1)?
                })
            };
            *nm = shift(nm)?;
            *den = shift(den)?;
            *s0 = upto;
            Ok(())
        };

    for batch in windows.chunks(opts.sw_batch_size) {
        flush(&mut num, &mut den, &mut s0, batch[0][0])?;
        let wins: Vec<Tensor> = batch
            .iter()
            .map(|&[sx, sy, sz]| {
                vol.narrow(0, sx, roi[0])?
                    .narrow(1, sy, roi[1])?
                    .narrow(2, sz, roi[2])
            })
            .collect::<candle_core::Result<_>>()?;
        let nb = batch.len();
        let x = Tensor::stack(&wins, 0)?.unsqueeze(1)?;
        let y = predictor(&x)?;
        let first;
        (k, first) = window_channels(&y, nb, roi, k, &opts.limits, [slab, py, pz])?;
        if first {
            num = Some(Tensor::zeros(
                (k, slab, py, pz),
                candle_core::DType::F32,
                device,
            )?);
        }
        let y = y.to_dtype(candle_core::DType::F32)?;
        // x − x is 0 for every finite x and NaN otherwise: one number tells.
        let probe = y.sub(&y)?.sum_all()?.to_scalar::<f32>()?;
        if !probe.is_finite() {
            let logits = crate::ops::to_f32_vec(&y)?;
            return Err(
                non_finite(&logits, done, total, k, wlen).unwrap_or_else(|| {
                    Error::NonFinite(format!(
                        "a non-finite sum of logits in windows {} to {}",
                        done + 1,
                        done + nb
                    ))
                }),
            );
        }
        let nm = num.as_mut().expect("made above");
        for (j, &[sx, sy, sz]) in batch.iter().enumerate() {
            let at = sx - s0;
            let add = spread(&y.get(j)?.broadcast_mul(&weights)?, sy, sz)?;
            let sum = (nm.narrow(1, at, roi[0])? + add)?.contiguous()?;
            nm.slice_set(&sum, 1, at)?;
            let dsum = (den.narrow(1, at, roi[0])? + spread(&weights, sy, sz)?)?.contiguous()?;
            den.slice_set(&dsum, 1, at)?;
        }
        done += nb;
        progress(done, total);
    }
    flush(&mut num, &mut den, &mut s0, padded[0])
}

/// The voxels of a volume in the network's layout: `(X, Y, Z)` in C order (Z fastest), as
/// MONAI hands a NIfTI array to the network.
pub fn volume_to_network_layout(vol: &univ_io::Volume<f32>) -> Vec<f32> {
    let [nx, ny, nz] = vol.shape();
    let src = vol.data();
    let mut out = vec![0f32; src.len()];
    for x in 0..nx {
        for y in 0..ny {
            let o = (x * ny + y) * nz;
            for z in 0..nz {
                out[o + z] = src[x + nx * (y + ny * z)];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grid_matches_monai() {
        // 241 × 191 (× 59, padded to 96) is the grid of fixtures/sliding_window, where MONAI
        // 0.9.0 ran 5 × 3 × 1 = 15 windows; the starts follow its `dense_patch_slices`
        // (interval int(96 · 0.5) = 48, the last start moved back to end at the border).
        assert_eq!(window_starts(241, 96, 0.5), vec![0, 48, 96, 144, 145]);
        assert_eq!(window_starts(191, 96, 0.5), vec![0, 48, 95]);
        assert_eq!(window_starts(96, 96, 0.5), vec![0]);
        assert_eq!(window_starts(100, 96, 0.25), vec![0, 4]);
    }

    #[test]
    fn gaussian_map_values() {
        // Expected values computed independently in float64 (Python's math.erf) from MONAI
        // 0.9.0's definition: per axis g(i − 48) / g(0) with g(x) = ½(erf((x + ½)/(σ√2)) −
        // erf((x − ½)/(σ√2))), σ = 0.125 · 96, the product clamped below at 1e-3. That gives
        // 0.135491939 at (24, 48, 48) and a sum of 27665.405 (ours sums f32 products).
        let m = importance_map([96; 3], BlendMode::Gaussian { sigma_scale: 0.125 });
        let at = |x: usize, y: usize, z: usize| m[(x * 96 + y) * 96 + z];
        assert!((at(48, 48, 48) - 1.0).abs() < 1e-7);
        assert!((at(0, 48, 48) - 1e-3).abs() < 1e-9);
        assert!((at(24, 48, 48) - 0.135_492_2).abs() < 2e-6);
        let sum: f64 = m.iter().map(|v| f64::from(*v)).sum();
        assert!((sum - 27665.407).abs() < 0.1, "{sum}");
    }

    #[test]
    fn any_blend_of_an_identity_predictor_returns_the_input() {
        // A predictor that echoes its window gives the input back whatever the weights.
        let dims = [5, 7, 3];
        let input: Vec<f32> = (0..105).map(|i| i as f32).collect();
        for mode in [
            BlendMode::Constant,
            BlendMode::Gaussian { sigma_scale: 0.125 },
        ] {
            for batch in [1, 3] {
                let opts = SlidingWindowOptions {
                    roi: [4, 4, 4],
                    overlap: 0.5,
                    mode,
                    sw_batch_size: batch,
                    ..Default::default()
                };
                let got = stitch(&input, dims, &opts, |x| Ok(x.clone()));
                for (a, b) in got.iter().zip(&input) {
                    assert!((a - b).abs() < 1e-4, "{mode:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn constant_blend_averages_the_windows_covering_each_voxel() {
        // Each window predicts its own number everywhere; with equal weights a voxel gets the
        // mean of the numbers of the windows covering it. Along one axis of 6 voxels with
        // windows of 4 at overlap 0.5 the interval is 2 and the starts 0, 2, 4, the last moved
        // back to end at the border and so merged with the second (MONAI's
        // `dense_patch_slices`): voxels 0–1 see window 0, voxels 2–3 both, voxels 4–5 window 1.
        let dims = [1, 1, 6];
        let input = vec![0f32; 6];
        let opts = SlidingWindowOptions {
            roi: [1, 1, 4],
            overlap: 0.5,
            mode: BlendMode::Constant,
            sw_batch_size: 1,
            ..Default::default()
        };
        let mut n = 0f32;
        let got = stitch(&input, dims, &opts, |x| {
            n += 1.0;
            Ok((x.ones_like()? * f64::from(10.0 * n))?)
        });
        assert_eq!(got, vec![10.0, 10.0, 15.0, 15.0, 20.0, 20.0]);
        // The Gaussian weights the same windows unequally where they overlap.
        let gauss = SlidingWindowOptions {
            mode: BlendMode::Gaussian { sigma_scale: 0.125 },
            ..opts
        };
        let mut n = 0f32;
        let got = stitch(&input, dims, &gauss, |x| {
            n += 1.0;
            Ok((x.ones_like()? * f64::from(10.0 * n))?)
        });
        assert_ne!(got[2], 15.0);
    }

    #[test]
    fn too_many_windows_and_non_finite_logits_are_errors() {
        let dims = [6, 6, 6];
        let input = vec![0f32; 216];
        let opts = SlidingWindowOptions {
            roi: [2, 2, 2],
            overlap: 0.5,
            max_windows: 100,
            ..Default::default()
        };
        // 5 × 5 × 5 = 125 windows: refused before the predictor runs.
        let mut calls = 0;
        let e = sliding_window_inference(
            &input,
            dims,
            &opts,
            &Device::Cpu,
            |x| {
                calls += 1;
                Ok(x.clone())
            },
            |_, _| Ok(()),
            |_, _| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("125 windows"), "{e}");
        assert!(e.to_string().contains("--max-windows"), "{e}");
        assert_eq!(calls, 0);
        let opts = SlidingWindowOptions {
            max_windows: 1000,
            ..opts
        };
        let e = sliding_window_inference(
            &input,
            dims,
            &opts,
            &Device::Cpu,
            |x| Ok((x.ones_like()? * f64::NAN)?),
            |_, _| Ok(()),
            |_, _| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("non-finite logit"), "{e}");
    }

    #[test]
    fn the_device_blend_gives_the_host_blend_bit_for_bit() {
        // Two channels that depend on the window's content and on its rank, so that a window
        // placed or weighted differently shows; sides below, at and above the window's.
        for (dims, batch) in [
            ([9, 7, 11], 1),
            ([9, 7, 11], 3),
            ([3, 12, 5], 2),
            ([4, 4, 4], 1),
        ] {
            let n: usize = dims.iter().product();
            let input: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32).sin()).collect();
            let opts = SlidingWindowOptions {
                roi: [4, 5, 4],
                overlap: 0.5,
                sw_batch_size: batch,
                ..Default::default()
            };
            let predictor = || {
                let mut rank = 0f64;
                move |x: &Tensor| -> Result<Tensor> {
                    rank += 1.0;
                    let a = (x * 2.0)?.affine(1.0, rank)?;
                    let b = x.sqr()?.affine(-0.5, 0.25 * rank)?;
                    Ok(Tensor::cat(&[&a, &b], 1)?)
                }
            };
            let mut host: Vec<(usize, Vec<f32>)> = Vec::new();
            sliding_window_inference(
                &input,
                dims,
                &opts,
                &Device::Cpu,
                predictor(),
                |x0, p| {
                    host.push((x0, p.to_vec()));
                    Ok(())
                },
                |_, _| {},
            )
            .unwrap();
            let vol =
                Tensor::from_slice(&input, (dims[0], dims[1], dims[2]), &Device::Cpu).unwrap();
            let mut dev: Vec<(usize, Vec<f32>)> = Vec::new();
            let mut seen = 0;
            sliding_window_inference_on_device(
                &vol,
                &opts,
                predictor(),
                |x0, p| {
                    assert_eq!(p.dims()[0], 2);
                    dev.push((x0, crate::ops::to_f32_vec(p)?));
                    Ok(())
                },
                |d, _| seen = d,
            )
            .unwrap();
            assert!(seen > 0);
            assert_eq!(host.len(), dev.len(), "{dims:?}");
            for ((hx, hp), (dx, dp)) in host.iter().zip(&dev) {
                assert_eq!(hx, dx);
                assert_eq!(hp, dp, "{dims:?} batch {batch} planes from {hx}");
            }
        }
        // Non-finite logits are caught on the device path too.
        let vol = Tensor::zeros((6, 6, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
        let opts = SlidingWindowOptions {
            roi: [4, 4, 4],
            ..Default::default()
        };
        let e = sliding_window_inference_on_device(
            &vol,
            &opts,
            |x| Ok((x.ones_like()? * f64::INFINITY)?),
            |_, _| Ok(()),
            |_, _| {},
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("non-finite logit (inf) in window 1"),
            "{e}"
        );
    }

    /// Runs the sliding window and gathers the planes the sink receives into one volume.
    fn stitch(
        input: &[f32],
        dims: [usize; 3],
        opts: &SlidingWindowOptions,
        predictor: impl FnMut(&Tensor) -> Result<Tensor>,
    ) -> Vec<f32> {
        let plane = dims[1] * dims[2];
        let mut got = vec![f32::NAN; input.len()];
        let mut next = 0;
        sliding_window_inference(
            input,
            dims,
            opts,
            &Device::Cpu,
            predictor,
            |x0, planes| {
                assert_eq!(x0, next);
                let n = planes.len() / plane;
                got[x0 * plane..(x0 + n) * plane].copy_from_slice(planes);
                next += n;
                Ok(())
            },
            |_, _| {},
        )
        .unwrap();
        assert_eq!(next, dims[0]);
        got
    }
}
