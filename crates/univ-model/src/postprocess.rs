//! The official organ post-processing (`utils.organ_post_process` of the official repository),
//! as rules that take their classes as parameters (as MONAI's `KeepLargestConnectedComponent`
//! takes its labels): largest 26-connected component per organ, the lung union and its
//! left/right split, the portal vein cut below the pancreas, and tumours kept inside the
//! closed and dilated organ. [`PostprocessOptions::official`] gives the official rules for
//! the universal classes.
//!
//! Masks are `bool` volumes in the preprocessed (RAS, 1.5 mm) frame, first axis fastest: index
//! `x + X·(y + Y·z)`, axis 0 towards patient Right, axis 2 towards Superior.

use univ_io::ClassMask;

use crate::classes::{ClassKind, ClassTable, UNIVERSAL_COUNT};

/// A tumour kept only inside its organ: voxels outside the organ mask (its `components`
/// largest 26-connected components), closed and then dilated with a 5×5×5 box, are removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TumourInOrgan {
    /// The tumour class.
    pub tumour: usize,
    /// The organ classes whose union is the organ mask.
    pub organs: Vec<usize>,
    /// How many components of the organ mask are kept (2 for the kidneys, 1 for the liver).
    pub components: usize,
}

/// The vein cut: vein voxels on slices below the lowest slice of the reference class are
/// removed (the official code cuts the portal and splenic vein below the pancreas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VeinCut {
    /// The vein class.
    pub vein: usize,
    /// The class whose lowest slice bounds it (after its own rule).
    pub below: usize,
}

/// Which rules to apply, with their classes; [`Default`] is [`PostprocessOptions::official`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostprocessOptions {
    /// Classes kept as their largest 26-connected component.
    pub largest_component: Vec<usize>,
    /// `(right, left)`: the union of both lungs split into its two largest components, the
    /// one with the smaller mean first-axis index (towards the patient's left) being left.
    pub lung_split: Option<(usize, usize)>,
    /// The vein cut.
    pub vein_cut: Option<VeinCut>,
    /// Tumours kept inside their organ.
    pub tumour_in_organ: Vec<TumourInOrgan>,
}

impl Default for PostprocessOptions {
    fn default() -> Self {
        Self::official()
    }
}

impl PostprocessOptions {
    /// The official rules for the universal classes: the largest component of every organ
    /// but the portal vein (10), the hepatic vessel (15) and the lungs (16, 17), which are
    /// split from their union instead; the portal vein cut below the pancreas (11); kidney
    /// tumours (26) inside the two largest kidney components (2, 3), liver tumours (27)
    /// inside the liver (6). Other tumours and the cyst are kept as thresholded.
    pub fn official() -> Self {
        let table = ClassTable::universal();
        let (lungs, vein, vessel) = ((16, 17), 10, 15);
        PostprocessOptions {
            largest_component: table
                .ids_of(ClassKind::Organ)
                .into_iter()
                .filter(|c| ![vein, vessel, lungs.0, lungs.1].contains(c))
                .collect(),
            lung_split: Some(lungs),
            vein_cut: Some(VeinCut { vein, below: 11 }),
            tumour_in_organ: vec![
                TumourInOrgan {
                    tumour: 26,
                    organs: vec![2, 3],
                    components: 2,
                },
                TumourInOrgan {
                    tumour: 27,
                    organs: vec![6],
                    components: 1,
                },
            ],
        }
    }

    /// No rule: masks are copied as thresholded.
    pub fn none() -> Self {
        PostprocessOptions {
            largest_component: Vec::new(),
            lung_split: None,
            vein_cut: None,
            tumour_in_organ: Vec::new(),
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
    let mut out: Vec<Vec<bool>> = (0..pred.len().max(UNIVERSAL_COUNT))
        .map(|_| Vec::new())
        .collect();
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
    let mut out: Vec<ClassMask> = vec![ClassMask::empty(shape); pred.len().max(UNIVERSAL_COUNT)];
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
    let plane = shape[0] * shape[1];
    let empty = || vec![false; n];
    let mut notes = Vec::new();
    // A class's own rule: its largest component, or the mask as it is.
    let own = |c: usize| -> Vec<bool> {
        if opts.largest_component.contains(&c) {
            keep_largest(&get(c), shape, 1)
        } else {
            get(c)
        }
    };
    for &organ in organ_list {
        if let Some((right, left)) = opts.lung_split {
            if organ == right {
                let union: Vec<bool> = get(right)
                    .iter()
                    .zip(get(left))
                    .map(|(a, b)| *a || b)
                    .collect();
                let (labels, sizes) = label_components(&union, shape);
                let two = top_k(&sizes, 2);
                if two.len() < 2 {
                    notes.push(format!(
                        "fewer than two lung components: both lungs (classes {right} and \
                         {left}) are empty (official behaviour)"
                    ));
                    put(right - 1, empty());
                    put(left - 1, empty());
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
                    let (l, r) = if mean_x(two[0]) < mean_x(two[1]) {
                        (two[0], two[1])
                    } else {
                        (two[1], two[0])
                    };
                    put(left - 1, labels.iter().map(|v| *v == l).collect());
                    put(right - 1, labels.iter().map(|v| *v == r).collect());
                }
                continue;
            }
            if organ == left {
                continue;
            }
        }
        if let Some(cut) = opts.vein_cut.filter(|v| v.below == organ) {
            let reference = own(organ);
            if organ_list.contains(&cut.vein) {
                let mut vein = get(cut.vein);
                let zmin = (0..n).filter(|i| reference[*i]).map(|i| i / plane).min();
                match zmin {
                    Some(z0) => {
                        for (i, v) in vein.iter_mut().enumerate() {
                            if i / plane < z0 {
                                *v = false;
                            }
                        }
                    }
                    None => notes.push(format!(
                        "class {organ} is empty: class {} was not cut below it",
                        cut.vein
                    )),
                }
                put(cut.vein - 1, vein);
            }
            put(organ - 1, reference);
            continue;
        }
        if let Some(rule) = opts.tumour_in_organ.iter().find(|r| r.tumour == organ) {
            let mut organ_mask = empty();
            for c in &rule.organs {
                for (a, b) in organ_mask.iter_mut().zip(get(*c)) {
                    *a |= b;
                }
            }
            let organ_mask = keep_largest(&organ_mask, shape, rule.components);
            let closed = box_filter(&box_filter(&organ_mask, shape, 2, true), shape, 2, false);
            let region = box_filter(&closed, shape, 2, true);
            let tumour = get(organ)
                .iter()
                .zip(region)
                .map(|(t, r)| *t && r)
                .collect();
            put(organ - 1, tumour);
            continue;
        }
        if (1..=k.max(UNIVERSAL_COUNT)).contains(&organ) {
            put(organ - 1, own(organ));
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
