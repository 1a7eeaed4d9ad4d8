//! Normalisation + per-channel affine + activation over a contiguous `(N, C, M)` buffer, in
//! one pass, and its gradient. Statistics are accumulated in `f64` in one pass per row (moments about the
//! row's first value, combined exactly per group); the variance is the biased one, as PyTorch's.

use rayon::prelude::*;

use crate::cpu::elementwise::Act;

/// Which statistics a normalisation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// Per channel over the batch and all voxels (batch statistics).
    Batch,
    /// Per (sample, channel) over the voxels.
    Instance,
    /// Per (sample, group of channels) over their voxels.
    Group(usize),
}

/// Statistics of a normalisation over a contiguous `(N, C, M)` buffer: the group of each
/// `(sample, channel)` row, and per group the mean and `1/sqrt(var + eps)` (f64, two passes).
pub(crate) struct NormStats {
    pub(crate) c: usize,
    pub(crate) m: usize,
    pub(crate) kind: NormKind,
    pub(crate) mean: Vec<f64>,
    pub(crate) inv: Vec<f64>,
    pub(crate) count: Vec<usize>,
}

impl NormStats {
    #[inline]
    pub(crate) fn group_of(&self, row: usize) -> usize {
        let (s, ch) = (row / self.c, row % self.c);
        match self.kind {
            NormKind::Batch => ch,
            NormKind::Instance => row,
            NormKind::Group(g) => s * g + ch / (self.c / g),
        }
    }

    /// `(scale, shift)` that normalise row `row` and apply the channel's affine `w`, `b`.
    #[inline]
    fn row_affine(&self, row: usize, w: Option<&[f32]>, b: Option<&[f32]>) -> (f32, f32) {
        let g = self.group_of(row);
        let ch = row % self.c;
        let scale = self.inv[g] * w.map_or(1.0, |w| f64::from(w[ch]));
        let shift = b.map_or(0.0, |b| f64::from(b[ch])) - self.mean[g] * scale;
        (scale as f32, shift as f32)
    }

    pub(crate) fn compute(data: &[f32], n: usize, c: usize, kind: NormKind, eps: f64) -> Self {
        let m = data.len() / (n * c).max(1);
        let ngroups = match kind {
            NormKind::Batch => c,
            NormKind::Instance => n * c,
            NormKind::Group(g) => n * g,
        };
        let mut st = NormStats {
            c,
            m,
            kind,
            mean: vec![0.0; ngroups],
            inv: vec![0.0; ngroups],
            count: vec![0; ngroups],
        };
        // One pass per row: moments about the row's first value (which keeps the f64 sums
        // free of cancellation), then combined per group about the group mean.
        let moments: Vec<(f64, f64)> = data
            .par_chunks(m.max(1))
            .map(|r| {
                let k = r.first().map_or(0.0, |v| f64::from(*v));
                let (s1, s2) = row_moments(r, k);
                (
                    k + s1 / r.len().max(1) as f64,
                    s2 - s1 * s1 / r.len().max(1) as f64,
                )
            })
            .collect();
        // Each row as (mean, sum of squared deviations); groups combine them exactly.
        let mut gsum = vec![0f64; ngroups];
        for (row, (mean, _)) in moments.iter().enumerate() {
            let g = st.group_of(row);
            gsum[g] += mean * m as f64;
            st.count[g] += m;
        }
        for g in 0..ngroups {
            st.mean[g] = gsum[g] / st.count[g].max(1) as f64;
        }
        let mut gsq = vec![0f64; ngroups];
        for (row, (mean, ss)) in moments.iter().enumerate() {
            let g = st.group_of(row);
            gsq[g] += ss + m as f64 * (mean - st.mean[g]).powi(2);
        }
        for g in 0..ngroups {
            st.inv[g] = 1.0 / (gsq[g].max(0.0) / st.count[g].max(1) as f64 + eps).sqrt();
        }
        st
    }
}

/// `(Σ (x − k), Σ (x − k)²)` over `r`: f32 partial sums over runs of [`RUN`] values in
/// independent lanes (they vectorise: AVX-512 or AVX2 when the CPU has them), added in f64.
fn row_moments(r: &[f32], k: f64) -> (f64, f64) {
    /// Values per f32 partial sum (keeps its rounding error near 1e-6 relative).
    const RUN: usize = 1024;
    #[inline(always)]
    fn body(r: &[f32], k: f64) -> (f64, f64) {
        const L: usize = 32;
        let kf = k as f32;
        let (mut s1, mut s2) = (0f64, 0f64);
        for run in r.chunks(RUN) {
            let (mut a, mut b) = ([0f32; L], [0f32; L]);
            let mut chunks = run.chunks_exact(L);
            for ch in &mut chunks {
                for i in 0..L {
                    let d = ch[i] - kf;
                    a[i] += d;
                    b[i] += d * d;
                }
            }
            s1 += f64::from(a.iter().sum::<f32>());
            s2 += f64::from(b.iter().sum::<f32>());
            for v in chunks.remainder() {
                let d = f64::from(*v - kf);
                s1 += d;
                s2 += d * d;
            }
        }
        (s1, s2)
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(r: &[f32], k: f64) -> (f64, f64) {
            body(r, k)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(r: &[f32], k: f64) -> (f64, f64) {
            body(r, k)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { avx512(r, k) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2(r, k) };
        }
    }
    body(r, k)
}

/// `v ← act(v·scale + shift)` over `r`, vectorised for the CPU's best instructions.
fn affine_act_in_place(r: &mut [f32], scale: f32, shift: f32, act: Act) {
    #[inline(always)]
    fn body(r: &mut [f32], scale: f32, shift: f32, act: Act) {
        match act {
            Act::Relu => r
                .iter_mut()
                .for_each(|v| *v = (*v * scale + shift).max(0.0)),
            Act::Identity => r.iter_mut().for_each(|v| *v = *v * scale + shift),
            Act::LeakyRelu(s) => r.iter_mut().for_each(|v| {
                let y = *v * scale + shift;
                *v = if y >= 0.0 { y } else { y * s };
            }),
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(r: &mut [f32], scale: f32, shift: f32, act: Act) {
            body(r, scale, shift, act)
        }
        #[target_feature(enable = "avx2")]
        fn avx2(r: &mut [f32], scale: f32, shift: f32, act: Act) {
            body(r, scale, shift, act)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { avx512(r, scale, shift, act) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2(r, scale, shift, act) };
        }
    }
    body(r, scale, shift, act)
}

/// Normalisation + per-channel affine + activation of a contiguous `(N, C, M)` buffer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_act_slice(
    data: &[f32],
    n: usize,
    c: usize,
    kind: NormKind,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f64,
    act: Act,
) -> Vec<f32> {
    let st = NormStats::compute(data, n, c, kind, eps);
    let m = st.m.max(1);
    let mut out = vec![0f32; data.len()];
    out.par_chunks_mut(m)
        .zip(data.par_chunks(m))
        .enumerate()
        .for_each(|(row, (o, r))| {
            let (scale, shift) = st.row_affine(row, w, b);
            o.copy_from_slice(r);
            affine_act_in_place(o, scale, shift, act);
        });
    out
}

/// [`norm_act_slice`] overwriting its input.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_act_in_place(
    data: &mut [f32],
    n: usize,
    c: usize,
    kind: NormKind,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f64,
    act: Act,
) {
    let timer = crate::runtime::stage("norm/stats");
    let st = NormStats::compute(data, n, c, kind, eps);
    drop(timer);
    let _timer = crate::runtime::stage("norm/apply");
    data.par_chunks_mut(st.m.max(1))
        .enumerate()
        .for_each(|(row, r)| {
            let (scale, shift) = st.row_affine(row, w, b);
            affine_act_in_place(r, scale, shift, act);
        });
}

/// Gradients of [`norm_act_slice`]: `(dx, dweight, dbias)` from the input `xv`, the output
/// `yv` and the output gradient `gv`; the statistics are recomputed from the input.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_act_backward(
    xv: &[f32],
    yv: &[f32],
    gv: &[f32],
    wv: &[f32],
    n: usize,
    c: usize,
    kind: NormKind,
    eps: f64,
    act: Act,
) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let st = NormStats::compute(xv, n, c, kind, eps);
    let m = st.m.max(1);
    // dz = dy · act'(z), read from the output's sign.
    let dz = |y: f32, g: f32| act.grad_from_output(y, g);
    // Per row: Σ dz, Σ dz·x̂ (for the affine), then the group sums for dx.
    let rows: Vec<(f64, f64)> = xv
        .par_chunks(m)
        .zip(yv.par_chunks(m))
        .zip(gv.par_chunks(m))
        .enumerate()
        .map(|(row, ((xr, yr), gr))| {
            let g = st.group_of(row);
            let (mu, inv) = (st.mean[g], st.inv[g]);
            let mut s1 = 0f64;
            let mut s2 = 0f64;
            for i in 0..xr.len() {
                let d = f64::from(dz(yr[i], gr[i]));
                s1 += d;
                s2 += d * (f64::from(xr[i]) - mu) * inv;
            }
            (s1, s2)
        })
        .collect();
    let mut dw = vec![0f64; c];
    let mut db = vec![0f64; c];
    let ng = st.mean.len();
    let mut g1 = vec![0f64; ng]; // Σ dx̂ per group
    let mut g2 = vec![0f64; ng]; // Σ dx̂·x̂ per group
    for (row, (s1, s2)) in rows.iter().enumerate() {
        let ch = row % c;
        db[ch] += s1;
        dw[ch] += s2;
        let g = st.group_of(row);
        g1[g] += s1 * f64::from(wv[ch]);
        g2[g] += s2 * f64::from(wv[ch]);
    }
    let mut dx = vec![0f32; xv.len()];
    dx.par_chunks_mut(m)
        .zip(xv.par_chunks(m))
        .zip(yv.par_chunks(m).zip(gv.par_chunks(m)))
        .enumerate()
        .for_each(|(row, ((o, xr), (yr, gr)))| {
            let g = st.group_of(row);
            let ch = row % c;
            let (mu, inv) = (st.mean[g], st.inv[g]);
            let cnt = st.count[g] as f64;
            let (m1, m2) = (g1[g] / cnt, g2[g] / cnt);
            let gamma = f64::from(wv[ch]);
            for i in 0..o.len() {
                let xh = (f64::from(xr[i]) - mu) * inv;
                let dxh = f64::from(dz(yr[i], gr[i])) * gamma;
                o[i] = (inv * (dxh - m1 - xh * m2)) as f32;
            }
        });
    (dx, dw, db)
}
