//! The dynamic head evaluated voxel by voxel (8→8→8→1 with ReLUs, one parameter row of 153
//! numbers per class) without materialising its hidden layers, and its gradient, which
//! recomputes them.

use rayon::prelude::*;

use crate::cpu::OutPtr;

const CHUNK: usize = 1024;

/// Logits of the dynamic head for one sample: `features` `(8, V)`, `params` `(K, 153)` →
/// `(K, V)`.
pub(crate) fn head_sample(f: &[f32], v: usize, p: &[f32], k: usize, out: &mut [f32]) {
    // Parallel over voxel chunks; each chunk computes every class.
    let nchunks = v.div_ceil(CHUNK);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..nchunks).into_par_iter().for_each(|ci| {
        let v0 = ci * CHUNK;
        let len = CHUNK.min(v - v0);
        let mut feats = [[0f32; CHUNK]; 8];
        for (c, row) in feats.iter_mut().enumerate() {
            row[..len].copy_from_slice(&f[c * v + v0..c * v + v0 + len]);
        }
        let mut dst = vec![0f32; len];
        for cls in 0..k {
            let pk = &p[cls * 153..(cls + 1) * 153];
            head_chunk(&feats, len, pk, &mut dst);
            // SAFETY: chunks cover disjoint voxel ranges of each class row.
            unsafe {
                std::ptr::copy_nonoverlapping(dst.as_ptr(), ptr.get().add(cls * v + v0), len);
            }
        }
    });
}

#[inline(always)]
fn head_chunk_generic(feats: &[[f32; 1024]; 8], len: usize, p: &[f32], dst: &mut [f32]) {
    let (w1, w2, w3) = (&p[0..64], &p[64..128], &p[128..136]);
    let (b1, b2, b3) = (&p[136..144], &p[144..152], p[152]);
    const L: usize = 16;
    let mut i = 0;
    while i < len {
        let n = L.min(len - i);
        let mut x = [[0f32; L]; 8];
        for c in 0..8 {
            x[c][..n].copy_from_slice(&feats[c][i..i + n]);
        }
        let mut h1 = [[0f32; L]; 8];
        for j in 0..8 {
            let mut acc = [b1[j]; L];
            for c in 0..8 {
                let wv = w1[8 * j + c];
                for l in 0..L {
                    acc[l] += wv * x[c][l];
                }
            }
            for l in 0..L {
                h1[j][l] = acc[l].max(0.0);
            }
        }
        let mut o = [b3; L];
        for j in 0..8 {
            let mut acc = [b2[j]; L];
            for c in 0..8 {
                let wv = w2[8 * j + c];
                for l in 0..L {
                    acc[l] += wv * h1[c][l];
                }
            }
            let wv = w3[j];
            for l in 0..L {
                o[l] += wv * acc[l].max(0.0);
            }
        }
        dst[i..i + n].copy_from_slice(&o[..n]);
        i += n;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn head_chunk_avx512(feats: &[[f32; 1024]; 8], len: usize, p: &[f32], dst: &mut [f32]) {
    head_chunk_generic(feats, len, p, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_chunk_avx2(feats: &[[f32; 1024]; 8], len: usize, p: &[f32], dst: &mut [f32]) {
    head_chunk_generic(feats, len, p, dst)
}

fn head_chunk(feats: &[[f32; 1024]; 8], len: usize, p: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the enabled features.
            return unsafe { head_chunk_avx512(feats, len, p, dst) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { head_chunk_avx2(feats, len, p, dst) };
        }
    }
    head_chunk_generic(feats, len, p, dst)
}

/// Gradients of the dynamic head: `(d features, d params)`.
pub(crate) fn head_backward(
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

/// The dynamic head over a batch: `f` `(B, 8, V)`, `p` `(B, K, 153)` → `(B, K, V)`.
pub(crate) fn head_batch(f: &[f32], p: &[f32], b: usize, k: usize, v: usize) -> Vec<f32> {
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
    out
}
