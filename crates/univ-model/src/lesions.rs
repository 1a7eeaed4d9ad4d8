//! Lesions of the tumour and cyst classes: each 26-connected component of a lesion class's mask,
//! with its size, extent, position, host organ and mean probability.

use univ_io::geometry;

use crate::postprocess::label_components;
use crate::segment::{ClassResult, Segmentation};

/// One lesion (a 26-connected component of a lesion class's mask on the input grid).
#[derive(Debug, Clone, PartialEq)]
pub struct Lesion {
    /// Voxels in the lesion.
    pub voxels: usize,
    /// Its volume in mL.
    pub volume_ml: f64,
    /// The longest distance between two of its voxel centres, in mm (over at most 2000 evenly
    /// spaced voxels: exact for lesions of up to 2000 voxels).
    pub longest_diameter_mm: f64,
    /// The mean position of its voxel centres, in world (RAS) mm.
    pub centroid_mm: [f64; 3],
    /// The computed organ class that overlaps it most (the first in output order on ties), if
    /// any overlaps it.
    pub host_organ: Option<usize>,
    /// The mean sigmoid probability over its voxels, when the segmentation kept them.
    pub mean_probability: Option<f64>,
}

/// Voxels evaluated at most for a lesion's longest diameter.
const DIAMETER_SAMPLES: usize = 2000;

/// The lesions of one class of `seg`, in order of their first voxel (Fortran order). Empty for
/// a class that is not a lesion class.
pub fn lesions(seg: &Segmentation, class: &ClassResult) -> Vec<Lesion> {
    if !class.info.is_lesion() {
        return Vec::new();
    }
    let grid = &seg.label_map;
    let vml = seg.voxel_volume_ml();
    // Streamed per lesion: labels, one flat list of voxel indices grouped by lesion, and a few
    // numbers per lesion; no per-voxel coordinates are kept.
    let (labels, sizes) = label_components(&class.mask.to_bools(), grid.shape());
    let nl = sizes.len();
    let mut start = vec![0usize; nl + 1];
    for l in 1..nl {
        start[l + 1] = start[l] + sizes[l];
    }
    let mut flat = vec![0usize; start[nl]];
    let mut fill = start.clone();
    let mut sum_ijk = vec![[0f64; 3]; nl];
    // Probability sums per lesion, from the probabilities at the mask's voxels (given in the
    // same order as the voxels).
    let probs = class.lesion_probabilities.as_deref();
    let mut prob_sums = probs.map(|_| vec![0f64; nl]);
    for (j, v) in class.mask.voxels().enumerate() {
        let l = labels[v] as usize;
        flat[fill[l]] = v;
        fill[l] += 1;
        let ijk = grid.unravel(v);
        for a in 0..3 {
            sum_ijk[l][a] += ijk[a] as f64;
        }
        if let (Some(s), Some(p)) = (prob_sums.as_mut(), probs) {
            s[l] += f64::from(p[j]);
        }
    }
    // Host organ: the computed organ overlapping the lesion most.
    let mut host = vec![(0usize, 0usize); nl];
    let mut overlap = vec![0usize; nl];
    for organ in seg.classes.iter().filter(|c| !c.info.is_lesion()) {
        overlap.fill(0);
        for v in organ.mask.voxels() {
            overlap[labels[v] as usize] += 1;
        }
        for l in 1..nl {
            if overlap[l] > host[l].1 {
                host[l] = (organ.info.id, overlap[l]);
            }
        }
    }
    drop(labels);
    let world = |v: usize| geometry::apply(grid.affine(), grid.unravel(v).map(|c| c as f64));
    (1..nl)
        .map(|lab| {
            let voxels = &flat[start[lab]..start[lab + 1]];
            let n = voxels.len() as f64;
            let step = voxels.len().div_ceil(DIAMETER_SAMPLES).max(1);
            let pts: Vec<[f64; 3]> = voxels.iter().step_by(step).map(|v| world(*v)).collect();
            let mut diam = 0f64;
            for a in 0..pts.len() {
                for b in a + 1..pts.len() {
                    let d = (0..3)
                        .map(|k| (pts[a][k] - pts[b][k]).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    diam = diam.max(d);
                }
            }
            Lesion {
                voxels: voxels.len(),
                volume_ml: n * vml,
                longest_diameter_mm: diam,
                centroid_mm: geometry::apply(grid.affine(), sum_ijk[lab].map(|s| s / n)),
                host_organ: (host[lab].0 > 0).then_some(host[lab].0),
                mean_probability: prob_sums.as_ref().map(|s| s[lab] / n / 255.0),
            }
        })
        .collect()
}
