//! Per-channel bias: adding it, and its gradient.

use rayon::prelude::*;

/// Adds a per-channel bias to a contiguous `(N, C, ...)` buffer.
pub(crate) fn add_bias_slice(out: &mut [f32], n: usize, c: usize, bias: &[f32]) {
    let m = out.len() / (n * c).max(1);
    out.par_chunks_mut(m.max(1))
        .enumerate()
        .for_each(|(row, r)| r.iter_mut().for_each(|v| *v += bias[row % c]));
}

/// Per-channel sums of a contiguous `(N, C, ...)` buffer: rows summed in parallel in `f64`,
/// then per channel in row order (the gradient of a per-channel bias).
pub(crate) fn channel_sums(g: &[f32], n: usize, c: usize) -> Vec<f32> {
    let m = g.len() / (n * c).max(1);
    let rows: Vec<f64> = g
        .par_chunks(m.max(1))
        .map(|r| r.iter().map(|v| f64::from(*v)).sum())
        .collect();
    let mut out = vec![0f64; c];
    for (row, s) in rows.iter().enumerate() {
        out[row % c] += s;
    }
    out.iter().map(|v| *v as f32).collect()
}
