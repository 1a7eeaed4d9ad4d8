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

/// The 26-connected components of a mask as runs: maximal stretches of set voxels along the
/// first axis, each with its component's final label (1, 2, … in order of the component's
/// first voxel in memory order, as cc3d numbers them).
struct Components {
    /// `(first voxel's linear index, length)` of each run, in memory order.
    runs: Vec<(usize, usize)>,
    /// The label of each run.
    labels: Vec<u32>,
    /// Voxel count per label (`sizes[0]`: the background).
    sizes: Vec<usize>,
    /// The grid's first-axis length.
    nx: usize,
    /// Voxels in the grid.
    n: usize,
}

impl Components {
    /// Labels the runs of `mask`: runs are found row by row, and each run is joined to the
    /// runs of the four rows before it that it touches (the row below in its plane, three in
    /// the plane below), where touching means first-axis ranges at most one voxel apart.
    fn new(mask: &[bool], shape: [usize; 3]) -> Self {
        let [nx, ny, nz] = shape;
        let n = nx * ny * nz;
        assert_eq!(mask.len(), n, "mask and shape disagree");
        let mut runs: Vec<(usize, usize)> = Vec::new();
        // Runs of row `y + ny·z` are `runs[row_start[r]..row_start[r + 1]]`.
        let mut row_start = Vec::with_capacity(ny * nz + 1);
        for row in 0..ny * nz {
            row_start.push(runs.len());
            let line = &mask[row * nx..(row + 1) * nx];
            let mut x = 0;
            while x < nx {
                match line[x..].iter().position(|v| *v) {
                    None => break,
                    Some(off) => x += off,
                }
                let len = line[x..].iter().position(|v| !*v).unwrap_or(nx - x);
                runs.push((row * nx + x, len));
                x += len;
            }
        }
        row_start.push(runs.len());
        fn find(p: &mut [u32], mut a: u32) -> u32 {
            while p[a as usize] != a {
                p[a as usize] = p[p[a as usize] as usize];
                a = p[a as usize];
            }
            a
        }
        // Union-find over runs, the smaller run index becoming the root.
        let mut parent: Vec<u32> = (0..runs.len() as u32).collect();
        for z in 0..nz {
            for y in 0..ny {
                let row = y + ny * z;
                let mut neighbours = [usize::MAX; 4];
                if y > 0 {
                    neighbours[0] = row - 1;
                }
                if z > 0 {
                    let below = row - ny;
                    neighbours[1] = below;
                    if y > 0 {
                        neighbours[2] = below - 1;
                    }
                    if y + 1 < ny {
                        neighbours[3] = below + 1;
                    }
                }
                for nb in neighbours.into_iter().filter(|r| *r != usize::MAX) {
                    let (mut i, end_i) = (row_start[row], row_start[row + 1]);
                    let (mut j, end_j) = (row_start[nb], row_start[nb + 1]);
                    // Two sorted lists of runs: join each overlapping pair (ranges widened by
                    // one voxel on each side for the diagonal neighbours).
                    while i < end_i && j < end_j {
                        let (a0, al) = runs[i];
                        let (b0, bl) = runs[j];
                        let (a0, a1) = (a0 - row * nx, a0 - row * nx + al);
                        let (b0, b1) = (b0 - nb * nx, b0 - nb * nx + bl);
                        if b0 <= a1 && a0 <= b1 {
                            let (ra, rb) =
                                (find(&mut parent, i as u32), find(&mut parent, j as u32));
                            if ra != rb {
                                let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
                                parent[hi as usize] = lo;
                            }
                        }
                        if a1 < b1 {
                            i += 1;
                        } else {
                            j += 1;
                        }
                    }
                }
            }
        }
        // Runs are in memory order, so a component's first run holds its first voxel.
        let mut remap = vec![0u32; runs.len()];
        let mut labels = Vec::with_capacity(runs.len());
        let mut sizes = vec![0usize];
        for (i, (_, len)) in runs.iter().enumerate() {
            let r = find(&mut parent, i as u32) as usize;
            if remap[r] == 0 {
                sizes.push(0);
                remap[r] = (sizes.len() - 1) as u32;
            }
            labels.push(remap[r]);
            sizes[remap[r] as usize] += len;
        }
        sizes[0] = n - sizes.iter().skip(1).sum::<usize>();
        Components {
            runs,
            labels,
            sizes,
            nx,
            n,
        }
    }

    /// One label per voxel (0: background).
    fn label_map(&self) -> Vec<u32> {
        let mut out = vec![0u32; self.n];
        for ((start, len), l) in self.runs.iter().zip(&self.labels) {
            out[*start..start + len].fill(*l);
        }
        out
    }

    /// The mask of the voxels whose label is in `keep`.
    fn mask_of(&self, keep: &[u32]) -> Vec<bool> {
        let mut out = vec![false; self.n];
        for ((start, len), l) in self.runs.iter().zip(&self.labels) {
            if keep.contains(l) {
                out[*start..start + len].fill(true);
            }
        }
        out
    }

    /// The mean first-axis index of the voxels of label `lab`.
    fn mean_x(&self, lab: u32) -> f64 {
        let (mut s, mut c) = (0f64, 0f64);
        for ((start, len), l) in self.runs.iter().zip(&self.labels) {
            if *l == lab {
                let (x0, len) = ((start % self.nx) as f64, *len as f64);
                s += len * x0 + len * (len - 1.0) / 2.0;
                c += len;
            }
        }
        s / c
    }
}

/// Connected components with 26-connectivity, labelled 1, 2, … in order of their first voxel
/// in memory order (as cc3d numbers them); returns the labels and each label's voxel count
/// (`sizes[0]` is the background count, unused).
pub fn label_components(mask: &[bool], shape: [usize; 3]) -> (Vec<u32>, Vec<usize>) {
    let c = Components::new(mask, shape);
    (c.label_map(), c.sizes)
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
    let c = Components::new(mask, shape);
    c.mask_of(&top_k(&c.sizes, k))
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
                let c = Components::new(&union, shape);
                let two = top_k(&c.sizes, 2);
                if two.len() < 2 {
                    notes.push(format!(
                        "fewer than two lung components: both lungs (classes {right} and \
                         {left}) are empty (official behaviour)"
                    ));
                    put(right - 1, empty());
                    put(left - 1, empty());
                } else {
                    let (l, r) = if c.mean_x(two[0]) < c.mean_x(two[1]) {
                        (two[0], two[1])
                    } else {
                        (two[1], two[0])
                    };
                    put(left - 1, c.mask_of(&[l]));
                    put(right - 1, c.mask_of(&[r]));
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

    /// Flood-fill labelling, voxel by voxel, in memory order: the definition the run-based
    /// labelling must reproduce.
    fn flood_labels(mask: &[bool], shape: [usize; 3]) -> (Vec<u32>, Vec<usize>) {
        let [nx, ny, nz] = shape;
        let mut labels = vec![0u32; mask.len()];
        let mut sizes = vec![0usize];
        for seed in 0..mask.len() {
            if !mask[seed] || labels[seed] != 0 {
                continue;
            }
            sizes.push(0);
            let lab = (sizes.len() - 1) as u32;
            labels[seed] = lab;
            let mut stack = vec![seed];
            while let Some(v) = stack.pop() {
                sizes[lab as usize] += 1;
                let (x, y, z) = (v % nx, (v / nx) % ny, v / (nx * ny));
                for dz in -1i64..=1 {
                    for dy in -1i64..=1 {
                        for dx in -1i64..=1 {
                            let (xx, yy, zz) = (x as i64 + dx, y as i64 + dy, z as i64 + dz);
                            if xx < 0 || yy < 0 || zz < 0 {
                                continue;
                            }
                            let (xx, yy, zz) = (xx as usize, yy as usize, zz as usize);
                            if xx >= nx || yy >= ny || zz >= nz {
                                continue;
                            }
                            let j = xx + nx * (yy + ny * zz);
                            if mask[j] && labels[j] == 0 {
                                labels[j] = lab;
                                stack.push(j);
                            }
                        }
                    }
                }
            }
        }
        sizes[0] = mask.len() - sizes.iter().skip(1).sum::<usize>();
        (labels, sizes)
    }

    #[test]
    fn run_labelling_matches_flood_fill() {
        // A small linear congruential generator: masks of several densities and shapes
        // (single-voxel axes included), so runs meet in every diagonal arrangement.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as f64 / (1u64 << 31) as f64
        };
        let shapes = [
            [1, 1, 1],
            [7, 1, 1],
            [1, 9, 1],
            [1, 1, 8],
            [13, 11, 9],
            [32, 5, 17],
        ];
        for shape in shapes {
            for density in [0.05, 0.2, 0.35, 0.5, 0.8] {
                let n: usize = shape.iter().product();
                let mask: Vec<bool> = (0..n).map(|_| next() < density).collect();
                let got = label_components(&mask, shape);
                let want = flood_labels(&mask, shape);
                assert_eq!(got, want, "shape {shape:?}, density {density}");
                let c = Components::new(&mask, shape);
                for k in 1..4 {
                    let keep = top_k(&want.1, k);
                    let kept: Vec<bool> = want.0.iter().map(|l| keep.contains(l)).collect();
                    assert_eq!(keep_largest(&mask, shape, k), kept);
                }
                for lab in 1..want.1.len() as u32 {
                    let (mut s, mut cnt) = (0f64, 0f64);
                    for (i, l) in want.0.iter().enumerate() {
                        if *l == lab {
                            s += (i % shape[0]) as f64;
                            cnt += 1.0;
                        }
                    }
                    assert_eq!(c.mean_x(lab), s / cnt);
                }
            }
        }
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
