//! Segmentation metrics with MONAI's definitions (as the paper evaluates): Dice (standard, the official
//! variant with +1 in the denominator, and MONAI's `compute_dice`), surface Dice (NSD) at a
//! tolerance in mm, and the (95th percentile) Hausdorff distance.
//!
//! Masks are `bool` slices over a grid of `shape` voxels, first axis fastest, with `spacing` in
//! mm per axis. Surfaces are MONAI's edges: voxels of the mask with a 6-neighbour outside it
//! (the volume's outside counts as background).

/// Voxel counts of a prediction against a reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
    /// Voxels of the prediction.
    pub pred: usize,
    /// Voxels of the reference.
    pub gt: usize,
    /// Voxels in both.
    pub tp: usize,
}

/// Counts the overlap of two masks.
pub fn overlap(pred: &[bool], gt: &[bool]) -> Overlap {
    let mut o = Overlap {
        pred: 0,
        gt: 0,
        tp: 0,
    };
    for (p, g) in pred.iter().zip(gt) {
        o.pred += usize::from(*p);
        o.gt += usize::from(*g);
        o.tp += usize::from(*p && *g);
    }
    o
}

impl Overlap {
    /// MONAI's `compute_dice`: `2·tp / (|P| + |G|)`, NaN when the reference is empty
    /// (`ignore_empty=True`).
    pub fn dice_monai(&self) -> f64 {
        if self.gt == 0 {
            f64::NAN
        } else {
            2.0 * self.tp as f64 / (self.pred + self.gt) as f64
        }
    }

    /// `2·tp / (|P| + |G|)`, 0 when both masks are empty.
    pub fn dice(&self) -> f64 {
        let d = self.pred + self.gt;
        if d == 0 {
            0.0
        } else {
            2.0 * self.tp as f64 / d as f64
        }
    }

    /// The official code's `2·tp / (|P| + |G| + 1)`.
    pub fn dice_official(&self) -> f64 {
        2.0 * self.tp as f64 / (self.pred + self.gt + 1) as f64
    }
}

/// MONAI's edges: mask voxels with a 6-neighbour outside the mask or the volume.
pub fn edges(mask: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let [nx, ny, nz] = shape;
    let mut out = vec![false; mask.len()];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let i = x + nx * (y + ny * z);
                if !mask[i] {
                    continue;
                }
                let inside = x > 0
                    && x + 1 < nx
                    && y > 0
                    && y + 1 < ny
                    && z > 0
                    && z + 1 < nz
                    && mask[i - 1]
                    && mask[i + 1]
                    && mask[i - nx]
                    && mask[i + nx]
                    && mask[i - nx * ny]
                    && mask[i + nx * ny];
                out[i] = !inside;
            }
        }
    }
    out
}

/// Exact Euclidean distance (mm) from every voxel to the nearest voxel of `features`
/// (Felzenszwalb–Huttenlocher separable transform with anisotropic spacing); infinite when
/// there is no feature.
pub fn distance_transform(features: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut d: Vec<f64> = features
        .iter()
        .map(|f| if *f { 0.0 } else { f64::INFINITY })
        .collect();
    let mut f = Vec::new();
    let mut out = Vec::new();
    let mut v = Vec::new();
    let mut zb = Vec::new();
    for ax in 0..3 {
        let (starts, st, n) = univ_model::postprocess::grid_lines(shape, ax);
        let w2 = spacing[ax] * spacing[ax];
        for start in starts {
            f.clear();
            f.extend((0..n).map(|i| d[start + i * st]));
            lower_envelope(&f, w2, &mut out, &mut v, &mut zb);
            for i in 0..n {
                d[start + i * st] = out[i];
            }
        }
    }
    d.iter().map(|x| x.sqrt()).collect()
}

/// 1-D squared distance transform: `out[p] = min_q w2·(p − q)² + f[q]`.
fn lower_envelope(f: &[f64], w2: f64, out: &mut Vec<f64>, v: &mut Vec<usize>, z: &mut Vec<f64>) {
    let n = f.len();
    out.clear();
    out.resize(n, f64::INFINITY);
    v.clear();
    z.clear();
    for q in 0..n {
        if f[q].is_infinite() {
            continue;
        }
        loop {
            match v.last() {
                None => {
                    v.push(q);
                    z.push(f64::NEG_INFINITY);
                    break;
                }
                Some(&p) => {
                    let s = ((f[q] + w2 * (q * q) as f64) - (f[p] + w2 * (p * p) as f64))
                        / (2.0 * w2 * (q as f64 - p as f64));
                    if s <= *z.last().expect("same length as v") {
                        v.pop();
                        z.pop();
                    } else {
                        v.push(q);
                        z.push(s);
                        break;
                    }
                }
            }
        }
    }
    if v.is_empty() {
        return;
    }
    let mut k = 0;
    for (p, o) in out.iter_mut().enumerate() {
        while k + 1 < v.len() && z[k + 1] < p as f64 {
            k += 1;
        }
        let q = v[k];
        *o = w2 * ((p as f64 - q as f64).powi(2)) + f[q];
    }
}

/// Distances from each edge voxel of `a` to the edges of `b`, as MONAI's
/// `get_surface_distance(a, b)` gives them (infinite entries when `b` has no edge).
fn directed(a_edges: &[bool], b_edges: &[bool], b_dist: Option<&[f64]>) -> Vec<f64> {
    let a_any = a_edges.iter().any(|x| *x);
    match b_dist {
        // No reference surface: infinity for each voxel of `a`.
        None => a_edges
            .iter()
            .filter(|x| **x)
            .map(|_| f64::INFINITY)
            .collect(),
        // MONAI's quirk: an empty `a` yields one infinity per edge voxel of `b`.
        Some(_) if !a_any => b_edges
            .iter()
            .filter(|x| **x)
            .map(|_| f64::INFINITY)
            .collect(),
        Some(d) => a_edges
            .iter()
            .zip(d)
            .filter(|(e, _)| **e)
            .map(|(_, d)| *d)
            .collect(),
    }
}

/// Surface distances in both directions (prediction → reference, reference → prediction).
pub fn surface_distances(
    pred: &[bool],
    gt: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
) -> (Vec<f64>, Vec<f64>) {
    let ep = edges(pred, shape);
    let eg = edges(gt, shape);
    let dg = eg
        .iter()
        .any(|x| *x)
        .then(|| distance_transform(&eg, shape, spacing));
    let dp = ep
        .iter()
        .any(|x| *x)
        .then(|| distance_transform(&ep, shape, spacing));
    (
        directed(&ep, &eg, dg.as_deref()),
        directed(&eg, &ep, dp.as_deref()),
    )
}

/// MONAI's `compute_surface_dice` (NSD) at `tolerance` mm: the fraction of both surfaces
/// within the tolerance of the other; NaN when both masks are empty.
pub fn surface_dice(
    pred: &[bool],
    gt: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
    tolerance: f64,
) -> f64 {
    let (a, b) = surface_distances(pred, gt, shape, spacing);
    let total = a.len() + b.len();
    if total == 0 {
        return f64::NAN;
    }
    let ok = a.iter().chain(&b).filter(|d| **d <= tolerance).count();
    ok as f64 / total as f64
}

/// A percentile with linear interpolation as `torch.quantile` computes it (NaN where infinite
/// values are interpolated); `None` gives the maximum. NaN for no values.
fn percentile(values: &[f64], p: Option<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let Some(p) = p else {
        return values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    };
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = (v.len() - 1) as f64 * p / 100.0;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let w = pos - lo as f64;
    let (s, e) = (v[lo], v[hi]);
    if w < 0.5 {
        s + w * (e - s)
    } else {
        e - (e - s) * (1.0 - w)
    }
}

/// MONAI's `compute_hausdorff_distance` (symmetric): the larger of the two directed
/// `percentile`s of surface distances (`None`: the maximum), in mm.
pub fn hausdorff(
    pred: &[bool],
    gt: &[bool],
    shape: [usize; 3],
    spacing: [f64; 3],
    pct: Option<f64>,
) -> f64 {
    let (a, b) = surface_distances(pred, gt, shape, spacing);
    let (x, y) = (percentile(&a, pct), percentile(&b, pct));
    if x.is_nan() || y.is_nan() {
        f64::NAN
    } else {
        x.max(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_transform_is_exact_on_a_small_grid() {
        let shape = [5, 4, 3];
        let mut f = vec![false; 60];
        f[0] = true;
        f[59] = true;
        let d = distance_transform(&f, shape, [1.0, 2.0, 3.0]);
        for z in 0..3 {
            for y in 0..4 {
                for x in 0..5 {
                    let a =
                        ((x as f64).powi(2) + (2.0 * y as f64).powi(2) + (3.0 * z as f64).powi(2))
                            .sqrt();
                    let b = ((4.0 - x as f64).powi(2)
                        + (2.0 * (3 - y) as f64).powi(2)
                        + (3.0 * (2 - z) as f64).powi(2))
                    .sqrt();
                    assert!((d[x + 5 * (y + 4 * z)] - a.min(b)).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn percentile_matches_torch_quantile() {
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], Some(50.0)), 2.5);
        assert!((percentile(&[0.0, 10.0], Some(95.0)) - 9.5).abs() < 1e-12);
        assert!(percentile(&[f64::INFINITY], Some(95.0)).is_nan());
        assert_eq!(percentile(&[f64::INFINITY], None), f64::INFINITY);
        assert!(percentile(&[], None).is_nan());
    }
}
