//! The official organ post-processing (spec §7.3, `utils.organ_post_process`), rule by rule
//! switchable: largest 26-connected component per organ, the lung union and left/right split,
//! the portal vein cut below the pancreas, and kidney and liver tumours kept inside the closed
//! and dilated organ.
//!
//! Masks are `bool` volumes in the preprocessed (RAS, 1.5 mm) frame, first axis fastest: index
//! `x + X·(y + Y·z)`, axis 0 towards patient Right, axis 2 towards Superior.

use univ_io::ClassMask;

/// Which rules to apply; [`Default`] applies them all, as the official code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostprocessOptions {
    /// Keep only the largest 26-connected component of each organ.
    pub largest_component: bool,
    /// Split the union of both lungs into its two largest components, left and right by the
    /// mean first-axis index.
    pub lung_split: bool,
    /// Remove portal/splenic vein voxels below the lowest pancreas slice.
    pub portal_vein_cut: bool,
    /// Keep kidney and liver tumour voxels only inside the closed, dilated organ.
    pub tumour_in_organ: bool,
}

impl Default for PostprocessOptions {
    fn default() -> Self {
        PostprocessOptions {
            largest_component: true,
            lung_split: true,
            portal_vein_cut: true,
            tumour_in_organ: true,
        }
    }
}

impl PostprocessOptions {
    /// No rule: masks are copied as thresholded.
    pub fn none() -> Self {
        PostprocessOptions {
            largest_component: false,
            lung_split: false,
            portal_vein_cut: false,
            tumour_in_organ: false,
        }
    }
}

/// Connected components with 26-connectivity, labelled 1, 2, … in order of their first voxel
/// in memory order (as cc3d numbers them); returns the labels and each label's voxel count
/// (`sizes[0]` is the background count, unused).
pub fn label_components(mask: &[bool], shape: [usize; 3]) -> (Vec<u32>, Vec<usize>) {
    let [nx, ny, nz] = shape;
    let mut parent: Vec<u32> = vec![0];
    let mut labels = vec![0u32; mask.len()];
    fn find(p: &mut [u32], mut a: u32) -> u32 {
        while p[a as usize] != a {
            p[a as usize] = p[p[a as usize] as usize];
            a = p[a as usize];
        }
        a
    }
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let i = x + nx * (y + ny * z);
                if !mask[i] {
                    continue;
                }
                let mut lab = 0u32;
                // The 13 neighbours already visited.
                for dz in -1i32..=0 {
                    for dy in -1i32..=1 {
                        for dx in -1i32..=1 {
                            if dz == 0 && (dy > 0 || (dy == 0 && dx >= 0)) {
                                continue;
                            }
                            let (xx, yy, zz) = (x as i32 + dx, y as i32 + dy, z as i32 + dz);
                            if xx < 0 || yy < 0 || zz < 0 || xx >= nx as i32 || yy >= ny as i32 {
                                continue;
                            }
                            let j = xx as usize + nx * (yy as usize + ny * zz as usize);
                            let l = labels[j];
                            if l == 0 {
                                continue;
                            }
                            if lab == 0 {
                                lab = find(&mut parent, l);
                            } else {
                                let (a, b) = (find(&mut parent, lab), find(&mut parent, l));
                                if a != b {
                                    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                                    parent[hi as usize] = lo;
                                    lab = lo;
                                }
                            }
                        }
                    }
                }
                if lab == 0 {
                    lab = parent.len() as u32;
                    parent.push(lab);
                }
                labels[i] = lab;
            }
        }
    }
    // Final labels: roots renumbered in order of first appearance.
    let mut remap = vec![0u32; parent.len()];
    let mut next = 0u32;
    let mut sizes = vec![0usize];
    for l in labels.iter_mut() {
        if *l == 0 {
            continue;
        }
        let r = find(&mut parent, *l) as usize;
        if remap[r] == 0 {
            next += 1;
            remap[r] = next;
            sizes.push(0);
        }
        *l = remap[r];
        sizes[*l as usize] += 1;
    }
    sizes[0] = mask.len() - sizes.iter().skip(1).sum::<usize>();
    (labels, sizes)
}

/// Labels of the `k` largest components, largest first (ties: lower label first).
fn top_k(sizes: &[usize], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (1..sizes.len() as u32).collect();
    order.sort_by(|a, b| sizes[*b as usize].cmp(&sizes[*a as usize]));
    order.truncate(k);
    order
}

/// Keeps the `k` largest 26-connected components of a mask.
pub fn keep_largest(mask: &[bool], shape: [usize; 3], k: usize) -> Vec<bool> {
    let (labels, sizes) = label_components(mask, shape);
    let keep = top_k(&sizes, k);
    labels.iter().map(|l| *l != 0 && keep.contains(l)).collect()
}

/// The 1-D lines of a grid along `axis` (first axis fastest in memory): for each line, the
/// index of its first voxel; consecutive voxels of a line are `stride` apart, `len` of them.
/// Returns `(starts, stride, len)`.
pub fn grid_lines(shape: [usize; 3], axis: usize) -> (Vec<usize>, usize, usize) {
    let strides = [1, shape[0], shape[0] * shape[1]];
    let (a, b) = match axis {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let mut starts = Vec::with_capacity(shape[a] * shape[b]);
    for j in 0..shape[b] {
        for i in 0..shape[a] {
            starts.push(i * strides[a] + j * strides[b]);
        }
    }
    (starts, strides[axis], shape[axis])
}

/// Binary dilation (`grow = true`) or erosion with a `(2r+1)³` box, voxels outside the volume
/// counting as 0 (scipy's `border_value=0`), as three separable 1-D passes.
fn box_filter(mask: &[bool], shape: [usize; 3], r: usize, grow: bool) -> Vec<bool> {
    let mut cur = mask.to_vec();
    for ax in 0..3 {
        let (starts, st, n) = grid_lines(shape, ax);
        let mut next = vec![false; cur.len()];
        for start in starts {
            for i in 0..n {
                let lo = i as isize - r as isize;
                let hi = i + r;
                let v = if grow {
                    (lo.max(0) as usize..=hi.min(n - 1)).any(|j| cur[start + j * st])
                } else {
                    lo >= 0 && hi < n && (lo as usize..=hi).all(|j| cur[start + j * st])
                };
                next[start + i * st] = v;
            }
        }
        cur = next;
    }
    cur
}

/// The official post-processing of thresholded masks.
///
/// `pred[c]` is the mask of class `c + 1` (an empty `Vec` for a class that was not computed);
/// `organ_list` lists the classes to produce, in processing order (1..=32 for a whole-body
/// prediction). Classes not in the list come back empty.
///
/// Returns the processed masks and notes on what could not be applied (an empty pancreas, a
/// single lung component).
pub fn organ_post_process(
    pred: &[Vec<bool>],
    shape: [usize; 3],
    organ_list: &[usize],
    opts: &PostprocessOptions,
) -> (Vec<Vec<bool>>, Vec<String>) {
    let n: usize = shape.iter().product();
    let get = |c: usize| -> Vec<bool> {
        match pred.get(c - 1) {
            Some(m) if m.len() == n => m.clone(),
            _ => vec![false; n],
        }
    };
    let mut out: Vec<Vec<bool>> = (0..pred.len().max(32)).map(|_| Vec::new()).collect();
    let notes = post_process_with(get, pred.len(), shape, organ_list, opts, |i, m| out[i] = m);
    for m in out.iter_mut() {
        if m.is_empty() {
            *m = vec![false; n];
        }
    }
    (out, notes)
}

/// [`organ_post_process`] on compact masks: `pred[c]` is the mask of class `c + 1` (an empty
/// mask for a class that was not computed). Only a few full-grid arrays exist at any time,
/// however many classes there are.
pub fn organ_post_process_masks(
    pred: &[ClassMask],
    shape: [usize; 3],
    organ_list: &[usize],
    opts: &PostprocessOptions,
) -> (Vec<ClassMask>, Vec<String>) {
    let n: usize = shape.iter().product();
    let get = |c: usize| -> Vec<bool> {
        match pred.get(c - 1) {
            Some(m) if m.shape() == shape => m.to_bools(),
            _ => vec![false; n],
        }
    };
    let mut out: Vec<ClassMask> = vec![ClassMask::empty(shape); pred.len().max(32)];
    let notes = post_process_with(get, pred.len(), shape, organ_list, opts, |i, m| {
        out[i] = ClassMask::from_bools(&m, shape)
    });
    (out, notes)
}

/// The rules of [`organ_post_process`]: `get(c)` gives the raw mask of class `c`, `put(i, m)`
/// receives the processed mask of class `i + 1`; `k` is the number of raw classes.
fn post_process_with(
    get: impl Fn(usize) -> Vec<bool>,
    k: usize,
    shape: [usize; 3],
    organ_list: &[usize],
    opts: &PostprocessOptions,
    mut put: impl FnMut(usize, Vec<bool>),
) -> Vec<String> {
    let n: usize = shape.iter().product();
    let empty = || vec![false; n];
    let mut notes = Vec::new();
    for &organ in organ_list {
        match organ {
            11 => {
                let pancreas = if opts.largest_component {
                    keep_largest(&get(11), shape, 1)
                } else {
                    get(11)
                };
                if organ_list.contains(&10) {
                    let mut vein = get(10);
                    if opts.portal_vein_cut {
                        let zmin = (0..n)
                            .filter(|i| pancreas[*i])
                            .map(|i| i / (shape[0] * shape[1]))
                            .min();
                        match zmin {
                            Some(z0) => {
                                for (i, v) in vein.iter_mut().enumerate() {
                                    if i / (shape[0] * shape[1]) < z0 {
                                        *v = false;
                                    }
                                }
                            }
                            None => {
                                notes.push("pancreas is empty: the portal vein was not cut".into())
                            }
                        }
                    }
                    put(9, vein);
                }
                put(10, pancreas);
            }
            16 if opts.lung_split => {
                let union: Vec<bool> = get(16).iter().zip(get(17)).map(|(a, b)| *a || b).collect();
                let (labels, sizes) = label_components(&union, shape);
                let two = top_k(&sizes, 2);
                if two.len() < 2 {
                    notes.push(
                        "fewer than two lung components: both lungs are empty (official behaviour)"
                            .into(),
                    );
                    put(15, empty());
                    put(16, empty());
                } else {
                    let mean_x = |lab: u32| {
                        let (mut s, mut c) = (0f64, 0f64);
                        for (i, l) in labels.iter().enumerate() {
                            if *l == lab {
                                s += (i % shape[0]) as f64;
                                c += 1.0;
                            }
                        }
                        s / c
                    };
                    let (left, right) = if mean_x(two[0]) < mean_x(two[1]) {
                        (two[0], two[1])
                    } else {
                        (two[1], two[0])
                    };
                    put(16, labels.iter().map(|l| *l == left).collect());
                    put(15, labels.iter().map(|l| *l == right).collect());
                }
            }
            16 => put(15, get(16)),
            17 if opts.lung_split => {}
            17 => put(16, get(17)),
            1..=9 | 12 | 13 | 14 | 18..=25 => {
                let m = if opts.largest_component {
                    keep_largest(&get(organ), shape, 1)
                } else {
                    get(organ)
                };
                put(organ - 1, m);
            }
            26 | 27 if opts.tumour_in_organ => {
                let (organs, k): (&[usize], usize) =
                    if organ == 26 { (&[2, 3], 2) } else { (&[6], 1) };
                let mut organ_mask = empty();
                for c in organs {
                    for (a, b) in organ_mask.iter_mut().zip(get(*c)) {
                        *a |= b;
                    }
                }
                let organ_mask = keep_largest(&organ_mask, shape, k);
                let closed = box_filter(&box_filter(&organ_mask, shape, 2, true), shape, 2, false);
                let region = box_filter(&closed, shape, 2, true);
                let tumour = get(organ)
                    .iter()
                    .zip(region)
                    .map(|(t, r)| *t && r)
                    .collect();
                put(organ - 1, tumour);
            }
            c if (1..=k.max(32)).contains(&c) => put(c - 1, get(c)),
            _ => {}
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonal_neighbours_are_connected() {
        let shape = [3, 3, 3];
        let mut m = vec![false; 27];
        m[0] = true; // (0,0,0)
        m[26] = true; // (2,2,2): not touching
        m[13] = true; // (1,1,1): touches both by a corner
        let (labels, sizes) = label_components(&m, shape);
        assert_eq!(sizes.len(), 2);
        assert_eq!(sizes[1], 3);
        assert!(labels.iter().all(|l| *l <= 1));
        m[13] = false;
        let (_, sizes) = label_components(&m, shape);
        assert_eq!(sizes.len(), 3);
    }

    #[test]
    fn closing_and_dilation_treat_the_outside_as_zero() {
        // A full 7×5×5 block eroded by a 5³ box keeps only the voxels at least 2 from every
        // face: x in 2..=4 at (y, z) = (2, 2).
        let shape = [7, 5, 5];
        let e = box_filter(&[true; 175], shape, 2, false);
        let kept: Vec<usize> = (0..175).filter(|i| e[*i]).collect();
        assert_eq!(
            kept,
            vec![
                2 + 7 * (2 + 5 * 2),
                3 + 7 * (2 + 5 * 2),
                4 + 7 * (2 + 5 * 2)
            ]
        );
        // A single voxel dilates to a 5³ box clipped at the border.
        let mut one = vec![false; 175];
        one[7 * (2 + 5 * 2)] = true; // (0, 2, 2)
        let d = box_filter(&one, shape, 2, true);
        assert_eq!(d.iter().filter(|v| **v).count(), 3 * 5 * 5);
    }
}
