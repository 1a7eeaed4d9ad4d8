//! Compact binary masks: one bit per voxel of the mask's bounding box.
//!
//! A segmentation holds one mask per class. As plain bytes on a clinical CT's grid (512 × 512 ×
//! 300 voxels) 32 classes would take 2.5 GB; as bits over each class's bounding box they take a
//! few megabytes, so memory no longer grows with classes × volume.

/// A binary mask on a grid of `shape` voxels in Fortran order (x fastest, as
/// [`crate::Volume`]), stored as bits over its bounding box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassMask {
    shape: [usize; 3],
    lo: [usize; 3],
    size: [usize; 3],
    bits: Vec<u64>,
    count: usize,
}

impl ClassMask {
    /// An empty mask on a grid of `shape` voxels.
    pub fn empty(shape: [usize; 3]) -> Self {
        ClassMask {
            shape,
            lo: [0; 3],
            size: [0; 3],
            bits: Vec::new(),
            count: 0,
        }
    }

    /// The mask of the voxels where `on(v)` holds, `v` being the linear index (Fortran order)
    /// of a grid of `shape` voxels.
    pub fn from_fn(shape: [usize; 3], on: impl Fn(usize) -> bool) -> Self {
        let nx = shape[0];
        ClassMask::from_rows(
            shape,
            |start| {
                let first = (0..nx).find(|x| on(start + x))?;
                let last = (first..nx).rev().find(|x| on(start + x)).unwrap_or(first);
                Some((first, last))
            },
            &on,
        )
    }

    /// The mask of the non-zero voxels of `data` (Fortran order, `shape` voxels).
    ///
    /// # Panics
    /// When `data` does not hold `shape` voxels.
    pub fn from_u8(data: &[u8], shape: [usize; 3]) -> Self {
        ClassMask::from_slice(data, 0, shape)
    }

    /// The mask of the `true` voxels of `data` (Fortran order, `shape` voxels).
    ///
    /// # Panics
    /// When `data` does not hold `shape` voxels.
    pub fn from_bools(data: &[bool], shape: [usize; 3]) -> Self {
        ClassMask::from_slice(data, false, shape)
    }

    /// The mask of the voxels of `data` that are not `zero`, each row's extent found by
    /// slice scans.
    fn from_slice<T: Copy + PartialEq>(data: &[T], zero: T, shape: [usize; 3]) -> Self {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "mask size");
        let nx = shape[0];
        ClassMask::from_rows(
            shape,
            |start| {
                let line = &data[start..start + nx];
                let first = line.iter().position(|v| *v != zero)?;
                Some((first, line.iter().rposition(|v| *v != zero)?))
            },
            |v| data[v] != zero,
        )
    }

    /// The mask from `extent(row start)`, the first and last set voxel of each first-axis
    /// row (`None` for an empty row), and `on(v)` for the voxels inside the bounding box.
    fn from_rows(
        shape: [usize; 3],
        extent: impl Fn(usize) -> Option<(usize, usize)>,
        on: impl Fn(usize) -> bool,
    ) -> Self {
        let [nx, ny, nz] = shape;
        let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
        for z in 0..nz {
            for y in 0..ny {
                if let Some((first, last)) = extent(nx * (y + ny * z)) {
                    lo = [lo[0].min(first), lo[1].min(y), lo[2].min(z)];
                    hi = [hi[0].max(last), hi[1].max(y), hi[2].max(z)];
                }
            }
        }
        if lo[0] == usize::MAX {
            return ClassMask::empty(shape);
        }
        let size = [0, 1, 2].map(|a| hi[a] + 1 - lo[a]);
        let mut bits = vec![0u64; (size[0] * size[1] * size[2]).div_ceil(64)];
        let mut count = 0;
        for z in 0..size[2] {
            for y in 0..size[1] {
                let row = nx * (lo[1] + y + ny * (lo[2] + z)) + lo[0];
                let brow = size[0] * (y + size[1] * z);
                for x in 0..size[0] {
                    if on(row + x) {
                        let b = brow + x;
                        bits[b / 64] |= 1 << (b % 64);
                        count += 1;
                    }
                }
            }
        }
        ClassMask {
            shape,
            lo,
            size,
            bits,
            count,
        }
    }

    /// The grid's shape.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Number of voxels in the mask.
    pub fn count(&self) -> usize {
        self.count
    }

    /// `true` when no voxel is in the mask.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The bounding box as inclusive `(min, max)` voxel indices, `None` when empty.
    pub fn bbox(&self) -> Option<([usize; 3], [usize; 3])> {
        (self.count > 0).then(|| (self.lo, [0, 1, 2].map(|a| self.lo[a] + self.size[a] - 1)))
    }

    /// Whether the voxel of linear index `v` (Fortran order) is in the mask.
    #[inline]
    pub fn contains(&self, v: usize) -> bool {
        if self.count == 0 {
            return false;
        }
        let [nx, ny, _] = self.shape;
        let (x, y, z) = (v % nx, (v / nx) % ny, v / (nx * ny));
        let rel = [x, y, z].map(|c| c as isize);
        let mut local = [0usize; 3];
        for a in 0..3 {
            let r = rel[a] - self.lo[a] as isize;
            if r < 0 || r >= self.size[a] as isize {
                return false;
            }
            local[a] = r as usize;
        }
        let b = local[0] + self.size[0] * (local[1] + self.size[1] * local[2]);
        self.bits[b / 64] >> (b % 64) & 1 == 1
    }

    /// The linear indices (Fortran order) of the mask's voxels, ascending.
    pub fn voxels(&self) -> impl Iterator<Item = usize> + '_ {
        let [nx, ny, _] = self.shape;
        let [sx, sy, sz] = self.size;
        (0..sz).flat_map(move |z| {
            (0..sy).flat_map(move |y| {
                let row = nx * (self.lo[1] + y + ny * (self.lo[2] + z)) + self.lo[0];
                let brow = sx * (y + sy * z);
                (0..sx).filter_map(move |x| {
                    let b = brow + x;
                    (self.bits[b / 64] >> (b % 64) & 1 == 1).then_some(row + x)
                })
            })
        })
    }

    /// The mask as one `bool` per voxel of the grid.
    pub fn to_bools(&self) -> Vec<bool> {
        let mut out = vec![false; self.shape.iter().product()];
        self.fill(&mut out, true);
        out
    }

    /// The mask as one byte (0 or 1) per voxel of the grid.
    pub fn to_u8(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.shape.iter().product()];
        self.fill(&mut out, 1);
        out
    }

    /// Sets the mask's voxels of `out` (a grid, zeroed) to `one`, row by row of the box.
    fn fill<T: Copy>(&self, out: &mut [T], one: T) {
        let [nx, ny, _] = self.shape;
        let [sx, sy, sz] = self.size;
        for z in 0..sz {
            for y in 0..sy {
                let row = nx * (self.lo[1] + y + ny * (self.lo[2] + z)) + self.lo[0];
                let brow = sx * (y + sy * z);
                for (x, o) in out[row..row + sx].iter_mut().enumerate() {
                    let b = brow + x;
                    if self.bits[b / 64] >> (b % 64) & 1 == 1 {
                        *o = one;
                    }
                }
            }
        }
    }

    /// Bytes this mask occupies (its bits).
    pub fn heap_bytes(&self) -> usize {
        self.bits.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_scans_agree_with_the_voxel_definition() {
        // Sparse and dense masks with empty rows, one-voxel rows and voxels on every face.
        let shape = [9, 7, 5];
        let n = 9 * 7 * 5;
        let patterns: [&dyn Fn(usize) -> bool; 4] = [
            &|v| (v * 37 + 11) % 29 == 0,
            &|v| (v * 13) % 7 < 4 && v % 9 != 0,
            &|v| v == 0 || v == n - 1,
            &|v| v % 9 == 8 && (v / 63) % 2 == 1,
        ];
        for on in patterns {
            let data: Vec<bool> = (0..n).map(on).collect();
            let m = ClassMask::from_fn(shape, on);
            assert_eq!(ClassMask::from_bools(&data, shape), m);
            let u: Vec<u8> = data.iter().map(|b| u8::from(*b)).collect();
            assert_eq!(ClassMask::from_u8(&u, shape), m);
            assert_eq!(m.to_bools(), data);
            assert_eq!(m.to_u8(), u);
            let want: Vec<usize> = (0..n).filter(|v| data[*v]).collect();
            assert_eq!(m.voxels().collect::<Vec<_>>(), want);
            let c = |v: usize| [v % 9, (v / 9) % 7, v / 63];
            let lo = [0, 1, 2].map(|a| want.iter().map(|v| c(*v)[a]).min().unwrap());
            let hi = [0, 1, 2].map(|a| want.iter().map(|v| c(*v)[a]).max().unwrap());
            assert_eq!(m.bbox(), Some((lo, hi)));
        }
    }

    #[test]
    fn round_trips_and_queries() {
        let shape = [5, 4, 3];
        let n = 60;
        let data: Vec<bool> = (0..n).map(|v| v % 7 == 3 && v > 10).collect();
        let m = ClassMask::from_bools(&data, shape);
        assert_eq!(m.to_bools(), data);
        assert_eq!(m.count(), data.iter().filter(|b| **b).count());
        let want: Vec<usize> = (0..n).filter(|v| data[*v]).collect();
        assert_eq!(m.voxels().collect::<Vec<_>>(), want);
        for v in 0..n {
            assert_eq!(m.contains(v), data[v], "{v}");
        }
        let (lo, hi) = m.bbox().unwrap();
        for v in &want {
            let c = [v % 5, (v / 5) % 4, v / 20];
            assert!((0..3).all(|a| lo[a] <= c[a] && c[a] <= hi[a]));
        }
        let u: Vec<u8> = data.iter().map(|b| u8::from(*b)).collect();
        assert_eq!(ClassMask::from_u8(&u, shape), m);
        assert_eq!(m.to_u8(), u);
        let e = ClassMask::from_bools(&[false; 60], shape);
        assert!(e.is_empty() && e.bbox().is_none() && e.voxels().next().is_none());
        assert!(!e.contains(7));
        assert_eq!(e, ClassMask::empty(shape));
        // One voxel in a corner: a one-bit box.
        let one = ClassMask::from_fn(shape, |v| v == n - 1);
        assert_eq!(one.bbox(), Some(([4, 3, 2], [4, 3, 2])));
        assert_eq!(one.heap_bytes(), 8);
    }
}
