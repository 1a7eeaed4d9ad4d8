//! Differentiable fused CPU operations for training: normalisation + affine + activation, and
//! the dynamic head. Their forward passes are the inference kernels; their backward passes
//! recompute what they need from the inputs instead of keeping intermediate tensors, so a
//! training step holds one tensor per operation instead of eight (norms) or
//! `K × 8 × voxels` hidden activations (head).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::layers::conv::{OutPtr, contiguous_f32, read_f32};
use crate::layers::fused::{Act, NormKind, NormStats, f32_vec, head_sample, norm_act_slice};

/// Normalisation + per-channel affine + activation with a recomputing backward pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NormActOp {
    pub(crate) kind: NormKind,
    pub(crate) eps: f64,
    pub(crate) act: Act,
}

impl CustomOp3 for NormActOp {
    fn name(&self) -> &'static str {
        "norm-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "norm-act")?;
        let w = contiguous_f32(s2, l2, "norm-act weight")?;
        let b = contiguous_f32(s3, l3, "norm-act bias")?;
        let dims = l1.dims();
        let (n, c) = (dims[0], dims[1]);
        let out = norm_act_slice(x, n, c, self.kind, Some(w), Some(b), self.eps, self.act);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let wv = f32_vec(w).map_err(candle_core::Error::wrap)?;
        // Read the saved tensors in place (no copies).
        let (dx, dw, db) = read_f32(x, |xv| {
            read_f32(res, |yv| {
                read_f32(grad, |gv| self.backward(xv, yv, gv, &wv, n, c))
            })
        })???;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, dims, dev)?),
            Some(Tensor::from_vec(
                dw.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                w.shape(),
                dev,
            )?),
            Some(Tensor::from_vec(
                db.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                w.shape(),
                dev,
            )?),
        ))
    }
}

impl NormActOp {
    /// `(dx, dweight, dbias)` from the input, the output and the output gradient.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        xv: &[f32],
        yv: &[f32],
        gv: &[f32],
        wv: &[f32],
        n: usize,
        c: usize,
    ) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
        let st = NormStats::compute(xv, n, c, self.kind, self.eps);
        let m = st.m.max(1);
        let act = self.act;
        // dz = dy · act'(z), read from the output's sign.
        let dz = |y: f32, g: f32| -> f32 {
            match act {
                Act::Identity => g,
                Act::Relu => {
                    if y > 0.0 {
                        g
                    } else {
                        0.0
                    }
                }
                Act::LeakyRelu(s) => {
                    if y >= 0.0 {
                        g
                    } else {
                        g * s
                    }
                }
            }
        };
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
}

/// The dynamic head with a recomputing backward pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadOp;

const CHUNK: usize = 1024;

impl CustomOp2 for HeadOp {
    fn name(&self) -> &'static str {
        "dynamic-head"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let f = contiguous_f32(s1, l1, "dynamic head features")?;
        let p = contiguous_f32(s2, l2, "dynamic head params")?;
        let d = l1.dims();
        let (b, v) = (d[0], d[2] * d[3] * d[4]);
        let k = l2.dims()[1];
        let mut out = vec![0f32; b * k * v];
        for i in 0..b {
            head_sample(
                &f[i * 8 * v..(i + 1) * 8 * v],
                v,
                &p[i * k * 153..(i + 1) * k * 153],
                k,
                &mut out[i * k * v..(i + 1) * k * v],
            );
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from(vec![b, k, d[2], d[3], d[4]]),
        ))
    }

    fn bwd(
        &self,
        features: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dims = features.dims().to_vec();
        let (b, v) = (dims[0], dims[2] * dims[3] * dims[4]);
        let k = params.dims()[1];
        let p = f32_vec(params).map_err(candle_core::Error::wrap)?;
        let (df, dp) = read_f32(features, |f| {
            read_f32(grad, |g| head_backward(f, &p, g, b, k, v))
        })??;
        let dev = features.device();
        Ok((
            Some(Tensor::from_vec(df, dims, dev)?),
            Some(Tensor::from_vec(
                dp.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                params.shape(),
                dev,
            )?),
        ))
    }
}

/// Gradients of the dynamic head: `(d features, d params)`.
fn head_backward(
    f: &[f32],
    p: &[f32],
    g: &[f32],
    b: usize,
    k: usize,
    v: usize,
) -> (Vec<f32>, Vec<f64>) {
    {
        let mut df = vec![0f32; f.len()];
        let mut dp = vec![0f64; p.len()];
        for s in 0..b {
            let fs = &f[s * 8 * v..(s + 1) * 8 * v];
            let ps = &p[s * k * 153..(s + 1) * k * 153];
            let gs = &g[s * k * v..(s + 1) * k * v];
            let dfs = OutPtr(df[s * 8 * v..].as_mut_ptr());
            let nchunks = v.div_ceil(CHUNK);
            // Parameter gradients per chunk, summed in chunk order (deterministic).
            let partial: Vec<Vec<f64>> = (0..nchunks)
                .into_par_iter()
                .map(|ci| {
                    let v0 = ci * CHUNK;
                    let len = CHUNK.min(v - v0);
                    let mut acc = vec![0f64; k * 153];
                    let mut dfc = vec![[0f32; 8]; len];
                    for cls in 0..k {
                        let pk = &ps[cls * 153..(cls + 1) * 153];
                        let (w1, w2, w3) = (&pk[0..64], &pk[64..128], &pk[128..136]);
                        let (b1, b2) = (&pk[136..144], &pk[144..152]);
                        let a = &mut acc[cls * 153..(cls + 1) * 153];
                        let grow = &gs[cls * v + v0..cls * v + v0 + len];
                        for (l, go) in grow.iter().enumerate() {
                            let go = *go;
                            if go == 0.0 {
                                continue;
                            }
                            let mut x = [0f32; 8];
                            for c in 0..8 {
                                x[c] = fs[c * v + v0 + l];
                            }
                            let mut h1 = [0f32; 8];
                            for j in 0..8 {
                                let mut z = b1[j];
                                for c in 0..8 {
                                    z += w1[8 * j + c] * x[c];
                                }
                                h1[j] = z.max(0.0);
                            }
                            let mut h2 = [0f32; 8];
                            for j in 0..8 {
                                let mut z = b2[j];
                                for c in 0..8 {
                                    z += w2[8 * j + c] * h1[c];
                                }
                                h2[j] = z.max(0.0);
                            }
                            // Output layer.
                            let mut gh2 = [0f32; 8];
                            for j in 0..8 {
                                a[128 + j] += f64::from(go * h2[j]);
                                gh2[j] = if h2[j] > 0.0 { go * w3[j] } else { 0.0 };
                            }
                            a[152] += f64::from(go);
                            // Second layer.
                            let mut gh1 = [0f32; 8];
                            for j in 0..8 {
                                let gj = gh2[j];
                                if gj == 0.0 {
                                    continue;
                                }
                                a[144 + j] += f64::from(gj);
                                for c in 0..8 {
                                    a[64 + 8 * j + c] += f64::from(gj * h1[c]);
                                    gh1[c] += gj * w2[8 * j + c];
                                }
                            }
                            // First layer.
                            for j in 0..8 {
                                let gj = if h1[j] > 0.0 { gh1[j] } else { 0.0 };
                                if gj == 0.0 {
                                    continue;
                                }
                                a[136 + j] += f64::from(gj);
                                for c in 0..8 {
                                    a[8 * j + c] += f64::from(gj * x[c]);
                                    dfc[l][c] += gj * w1[8 * j + c];
                                }
                            }
                        }
                    }
                    for (l, row) in dfc.iter().enumerate() {
                        for c in 0..8 {
                            // SAFETY: chunks write disjoint voxels of each feature channel.
                            unsafe { *dfs.get().add(c * v + v0 + l) = row[c] };
                        }
                    }
                    acc
                })
                .collect();
            let dst = &mut dp[s * k * 153..(s + 1) * k * 153];
            for part in partial {
                for (d, v) in dst.iter_mut().zip(part) {
                    *d += v;
                }
            }
        }
        (df, dp)
    }
}
