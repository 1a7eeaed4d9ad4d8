//! Training patches as the official pipeline draws them (the random transforms at the end of
//! the official `dataset/dataloader.py` training list): random zoom
//! (MSD datasets), crops centred by foreground/background (2 : 1) or by label class
//! (1 : 1 : 5 for the tumour datasets), a random quarter turn in the first two axes, and a
//! random intensity shift. All randomness comes from the [`Rng`] given.

use crate::data::case::PreparedCase;
use crate::data::presets::CropRule;
use crate::rng::Rng;

/// Patch sampling settings; [`Default`] gives the official ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PatchOptions {
    /// Patch size.
    pub roi: [usize; 3],
    /// Patches per case.
    pub num_samples: usize,
    /// Weights of foreground and background centres (`RandCropByPosNegLabeld` pos, neg).
    pub pos_neg: [f64; 2],
    /// Weights of background, organ and tumour centres (`RandCropByLabelClassesd` ratios).
    pub class_ratios: [f64; 3],
    /// Probability of a quarter turn (k ∈ {1, 2, 3}) in the plane of the first two axes.
    pub rot90_prob: f64,
    /// Probability of an intensity shift.
    pub shift_prob: f64,
    /// Maximum absolute intensity shift.
    pub shift_offset: f64,
    /// Probability of a random zoom (datasets whose rules allow it).
    pub zoom_prob: f64,
    /// Zoom factor range.
    pub zoom_range: [f64; 2],
}

impl Default for PatchOptions {
    fn default() -> Self {
        PatchOptions {
            roi: [96; 3],
            num_samples: 2,
            pos_neg: [2.0, 1.0],
            class_ratios: [1.0, 1.0, 5.0],
            rot90_prob: 0.1,
            shift_prob: 0.2,
            shift_offset: 0.1,
            zoom_prob: 0.3,
            zoom_range: [1.3, 1.5],
        }
    }
}

/// One patch: image and per-voxel organ/lesion classes, C order, `roi` voxels.
#[derive(Debug, Clone)]
pub struct Patch {
    /// Intensities.
    pub image: Vec<f32>,
    /// Organ class per voxel.
    pub organ: Vec<u8>,
    /// Tumour class per voxel.
    pub lesion: Vec<u8>,
    /// Where the patch starts in the case (before any turn).
    pub start: [usize; 3],
}

struct View<'a> {
    shape: [usize; 3],
    image: &'a [f32],
    organ: &'a [u8],
    lesion: &'a [u8],
}

/// 1-D `area` interpolation weights (adaptive average pooling from `n_in` to `n_out` bins)
/// for output indices `range`: per output, the input span `[start, end)`.
fn area_spans(n_in: usize, n_out: usize) -> Vec<(usize, usize)> {
    (0..n_out)
        .map(|i| {
            let s = (i * n_in) / n_out;
            let e = ((i + 1) * n_in).div_ceil(n_out);
            (s, e.max(s + 1).min(n_in))
        })
        .collect()
}

/// Zooms a whole case by `z` (> 1) and crops the centre back to its size, like MONAI's
/// `RandZoomd(keep_size=True)` with `area` for the image and `nearest` for labels: the zoomed
/// size is `floor(n·z)` per axis and the crop starts at `floor((zoomed − n) / 2)`.
fn zoom_keep_size(v: &View<'_>, z: f64) -> (Vec<f32>, Vec<u8>, Vec<u8>) {
    let s = v.shape;
    let zs = s.map(|n| ((n as f64 * z).floor() as usize).max(n));
    let off = [0, 1, 2].map(|a| (zs[a] - s[a]) / 2);
    // Per axis: for each kept output index, the nearest source and the area span.
    let nearest: Vec<Vec<usize>> = (0..3)
        .map(|a| {
            (0..s[a])
                .map(|i| (((i + off[a]) as f64) * (s[a] as f64 / zs[a] as f64)).floor() as usize)
                .map(|j| j.min(s[a] - 1))
                .collect()
        })
        .collect();
    let spans: Vec<Vec<(usize, usize)>> = (0..3)
        .map(|a| {
            let all = area_spans(s[a], zs[a]);
            (0..s[a]).map(|i| all[i + off[a]]).collect()
        })
        .collect();
    let n = s[0] * s[1] * s[2];
    let mut image = vec![0f32; n];
    let mut organ = vec![0u8; n];
    let mut lesion = vec![0u8; n];
    let idx = |x: usize, y: usize, zz: usize| (x * s[1] + y) * s[2] + zz;
    for x in 0..s[0] {
        for y in 0..s[1] {
            for zz in 0..s[2] {
                let o = idx(x, y, zz);
                let src = idx(nearest[0][x], nearest[1][y], nearest[2][zz]);
                organ[o] = v.organ[src];
                lesion[o] = v.lesion[src];
                let (x0, x1) = spans[0][x];
                let (y0, y1) = spans[1][y];
                let (z0, z1) = spans[2][zz];
                let mut acc = 0f32;
                for a in x0..x1 {
                    for b in y0..y1 {
                        for c in z0..z1 {
                            acc += v.image[idx(a, b, c)];
                        }
                    }
                }
                image[o] = acc / ((x1 - x0) * (y1 - y0) * (z1 - z0)) as f32;
            }
        }
    }
    (image, organ, lesion)
}

/// Picks a random voxel index among those with `pred` true, by counting then drawing.
fn random_voxel(n: usize, rng: &mut Rng, pred: impl Fn(usize) -> bool) -> Option<usize> {
    let count = (0..n).filter(|i| pred(*i)).count();
    if count == 0 {
        return None;
    }
    let mut k = rng.below(count);
    for i in 0..n {
        if pred(i) {
            if k == 0 {
                return Some(i);
            }
            k -= 1;
        }
    }
    None
}

/// For each label id, whether it is a lesion class (a tumour or the cyst) of the universal
/// class table; ids beyond it (classes added by extension) count as organs here.
fn lesion_ids() -> [bool; 256] {
    let mut out = [false; 256];
    for c in univ_model::ClassTable::universal().iter() {
        if c.is_lesion() && c.id < 256 {
            out[c.id] = true;
        }
    }
    out
}

/// Chooses a patch centre by the crop rule and returns the patch start.
fn choose_start(v: &View<'_>, crop: CropRule, opts: &PatchOptions, rng: &mut Rng) -> [usize; 3] {
    let s = v.shape;
    let n = s[0] * s[1] * s[2];
    let fg = |i: usize| v.organ[i] != 0 || v.lesion[i] != 0;
    let bg = |i: usize| !fg(i) && v.image[i] > 0.0;
    let centre = match crop {
        CropRule::PosNeg => {
            let p_fg = opts.pos_neg[0] / (opts.pos_neg[0] + opts.pos_neg[1]);
            let want_fg = rng.uniform() < p_fg;
            let first = if want_fg {
                random_voxel(n, rng, fg)
            } else {
                random_voxel(n, rng, bg)
            };
            first.or_else(|| {
                if want_fg {
                    random_voxel(n, rng, bg)
                } else {
                    random_voxel(n, rng, fg)
                }
            })
        }
        CropRule::LabelClasses => {
            let lesion_id = lesion_ids();
            let tumour = |i: usize| v.lesion[i] != 0 || lesion_id[usize::from(v.organ[i])];
            let organ = |i: usize| fg(i) && !tumour(i);
            let present = [(0..n).any(bg), (0..n).any(organ), (0..n).any(tumour)];
            let w: Vec<f64> = (0..3)
                .map(|c| {
                    if present[c] {
                        opts.class_ratios[c]
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            if total <= 0.0 {
                None
            } else {
                let mut r = rng.uniform() * total;
                let mut class = 2;
                for (c, wc) in w.iter().enumerate() {
                    if r < *wc {
                        class = c;
                        break;
                    }
                    r -= wc;
                }
                match class {
                    0 => random_voxel(n, rng, bg),
                    1 => random_voxel(n, rng, |i| organ(i) && v.image[i] > 0.0)
                        .or_else(|| random_voxel(n, rng, organ)),
                    _ => random_voxel(n, rng, |i| tumour(i) && v.image[i] > 0.0)
                        .or_else(|| random_voxel(n, rng, tumour)),
                }
            }
        }
    };
    let c = centre.map(|i| [i / (s[1] * s[2]), (i / s[2]) % s[1], i % s[2]]);
    let c = c.unwrap_or([s[0] / 2, s[1] / 2, s[2] / 2]);
    // Clamp so the patch fits: valid centres are [roi/2, size - roi + roi/2].
    [0, 1, 2].map(|a| {
        let half = opts.roi[a] / 2;
        let lo = half;
        let hi = s[a] - opts.roi[a] + half;
        c[a].clamp(lo, hi) - half
    })
}

fn crop<T: Copy>(data: &[T], shape: [usize; 3], start: [usize; 3], roi: [usize; 3]) -> Vec<T> {
    let mut out = Vec::with_capacity(roi[0] * roi[1] * roi[2]);
    for x in 0..roi[0] {
        for y in 0..roi[1] {
            let base = ((start[0] + x) * shape[1] + start[1] + y) * shape[2] + start[2];
            out.extend_from_slice(&data[base..base + roi[2]]);
        }
    }
    out
}

/// `torch.rot90(x, k, dims=(0, 1))` on a C-order `roi` block (first two axes equal).
fn rot90<T: Copy + Default>(data: &[T], roi: [usize; 3], k: usize) -> Vec<T> {
    let n = roi[0];
    let nz = roi[2];
    let mut cur = data.to_vec();
    for _ in 0..k {
        let mut out = vec![T::default(); cur.len()];
        // One quarter turn: out[i][j] = in[j][n-1-i].
        for i in 0..n {
            for j in 0..n {
                let src = (j * n + (n - 1 - i)) * nz;
                let dst = (i * n + j) * nz;
                out[dst..dst + nz].copy_from_slice(&cur[src..src + nz]);
            }
        }
        cur = out;
    }
    cur
}

/// Draws `opts.num_samples` patches from a case.
///
/// # Panics
/// If the case is smaller than the patch (cases are padded when prepared).
pub fn sample_patches(
    case: &PreparedCase,
    crop_rule: CropRule,
    zoom: bool,
    opts: &PatchOptions,
    rng: &mut Rng,
) -> Vec<Patch> {
    assert!(
        (0..3).all(|a| case.shape[a] >= opts.roi[a]),
        "case {} ({:?}) is smaller than the patch {:?}",
        case.id,
        case.shape,
        opts.roi
    );
    let zoomed = (zoom && rng.chance(opts.zoom_prob)).then(|| {
        let z = rng.range(opts.zoom_range[0], opts.zoom_range[1]);
        let v = View {
            shape: case.shape,
            image: &case.image,
            organ: &case.organ,
            lesion: &case.lesion,
        };
        zoom_keep_size(&v, z)
    });
    let v = match &zoomed {
        Some((i, o, l)) => View {
            shape: case.shape,
            image: i,
            organ: o,
            lesion: l,
        },
        None => View {
            shape: case.shape,
            image: &case.image,
            organ: &case.organ,
            lesion: &case.lesion,
        },
    };
    let mut out = Vec::with_capacity(opts.num_samples);
    for _ in 0..opts.num_samples {
        let start = choose_start(&v, crop_rule, opts, rng);
        let mut p = Patch {
            image: crop(v.image, v.shape, start, opts.roi),
            organ: crop(v.organ, v.shape, start, opts.roi),
            lesion: crop(v.lesion, v.shape, start, opts.roi),
            start,
        };
        if opts.roi[0] == opts.roi[1] && rng.chance(opts.rot90_prob) {
            let k = rng.below(3) + 1;
            p.image = rot90(&p.image, opts.roi, k);
            p.organ = rot90(&p.organ, opts.roi, k);
            p.lesion = rot90(&p.lesion, opts.roi, k);
        }
        if rng.chance(opts.shift_prob) {
            let off = rng.range(-opts.shift_offset, opts.shift_offset) as f32;
            p.image.iter_mut().for_each(|v| *v += off);
        }
        out.push(p);
    }
    out
}

/// Fills the target of one patch: `(K, roi)` values, 1/0 for the supervised classes and 255
/// elsewhere (as the official post-label files store unlabelled channels).
pub fn fill_target(p: &Patch, supervised: &[usize], k: usize, out: &mut [f32]) {
    let v = p.organ.len();
    assert_eq!(out.len(), k * v, "target buffer size");
    for c in 0..k {
        let dst = &mut out[c * v..(c + 1) * v];
        let class = c + 1;
        if !supervised.contains(&class) {
            dst.fill(255.0);
            continue;
        }
        let cl = class as u8;
        for i in 0..v {
            dst[i] = if p.organ[i] == cl || p.lesion[i] == cl {
                1.0
            } else {
                0.0
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rot90_matches_torch_convention() {
        // 2x2x1: [[a, b], [c, d]] turned once gives [[b, d], [a, c]].
        let x = [1, 2, 3, 4];
        assert_eq!(rot90(&x, [2, 2, 1], 1), vec![2, 4, 1, 3]);
        assert_eq!(rot90(&x, [2, 2, 1], 4), x.to_vec());
    }

    #[test]
    fn area_spans_cover_the_input() {
        let s = area_spans(4, 6);
        assert_eq!(s.first(), Some(&(0, 1)));
        assert_eq!(s.last(), Some(&(3, 4)));
        assert_eq!(area_spans(3, 3), vec![(0, 1), (1, 2), (2, 3)]);
    }
}

#[cfg(test)]
mod zoom_tests {
    use super::*;

    #[test]
    fn zoom_keeps_the_size_and_magnifies_the_centre() {
        // A 4³ volume whose value is its first index; zoom 2 → the central half, each input
        // plane repeated twice: planes 1, 1, 2, 2.
        let n = 4;
        let image: Vec<f32> = (0..n * n * n).map(|i| (i / (n * n)) as f32).collect();
        let organ: Vec<u8> = (0..n * n * n).map(|i| (i / (n * n)) as u8).collect();
        let v = View {
            shape: [n, n, n],
            image: &image,
            organ: &organ,
            lesion: &organ,
        };
        let (img, org, _) = zoom_keep_size(&v, 2.0);
        assert_eq!(img.len(), n * n * n);
        let plane = |a: &[f32], x: usize| a[x * n * n];
        assert_eq!(
            (0..n).map(|x| plane(&img, x)).collect::<Vec<_>>(),
            vec![1.0, 1.0, 2.0, 2.0]
        );
        assert_eq!(
            (0..n).map(|x| org[x * n * n]).collect::<Vec<_>>(),
            vec![1, 1, 2, 2]
        );
    }
}
