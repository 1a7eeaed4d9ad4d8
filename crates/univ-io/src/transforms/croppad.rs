//! Crop and pad transforms.

use crate::error::{Error, Result};
use crate::geometry::{self, Affine};
use crate::parallel::for_each_slab;
use crate::volume::{Volume, Voxel};

/// A box of voxels: `start` inclusive, `end` exclusive, per axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CropBox {
    /// First voxel of the box.
    pub start: [usize; 3],
    /// One past the last voxel of the box.
    pub end: [usize; 3],
}

impl CropBox {
    /// The box's shape.
    pub fn shape(&self) -> [usize; 3] {
        [
            self.end[0] - self.start[0],
            self.end[1] - self.start[1],
            self.end[2] - self.start[2],
        ]
    }

    /// `true` when the box holds no voxel.
    pub fn is_empty(&self) -> bool {
        (0..3).any(|a| self.end[a] <= self.start[a])
    }
}

/// Translates an affine so that voxel `offset` (possibly negative) becomes voxel 0.
fn shifted_affine(a: &Affine, offset: [f64; 3]) -> Affine {
    let mut t = geometry::IDENTITY;
    for r in 0..3 {
        t[r][3] = offset[r];
    }
    geometry::matmul(a, &t)
}

/// Copies the box `b` out of a volume; the affine's origin moves to the box's first voxel
/// (MONAI 1.x semantics; 0.9.0 kept the old affine in its metadata, a known quirk that does
/// not change voxels).
///
/// # Errors
/// [`Error::InvalidParameter`] when the box is empty or leaves the volume.
pub fn crop<T: Voxel>(vol: &Volume<T>, b: &CropBox) -> Result<Volume<T>> {
    let s = vol.shape();
    if b.is_empty() || (0..3).any(|a| b.end[a] > s[a]) {
        return Err(Error::param(
            "box",
            format!("{b:?} is empty or outside shape {s:?}"),
        ));
    }
    let os = b.shape();
    let src = vol.data();
    let mut out = vec![T::default(); os.iter().product()];
    for_each_slab(&mut out, os[0] * os[1], |z, slab| {
        for y in 0..os[1] {
            let from = vol.index([b.start[0], b.start[1] + y, b.start[2] + z]);
            slab[y * os[0]..(y + 1) * os[0]].copy_from_slice(&src[from..from + os[0]]);
        }
    });
    let affine = shifted_affine(vol.affine(), b.start.map(|v| v as f64));
    Ok(Volume::from_parts(
        out,
        os,
        affine,
        None,
        vol.source().map(Into::into),
    ))
}

/// Places a volume inside a larger one of `out_shape`, its first voxel at `before`, filling
/// the rest with `value`; the affine is shifted so that world positions are unchanged. This
/// undoes [`crop`] (with `before = box.start` and the pre-crop shape).
///
/// # Errors
/// [`Error::InvalidParameter`] when the volume does not fit.
pub fn pad<T: Voxel>(
    vol: &Volume<T>,
    before: [usize; 3],
    out_shape: [usize; 3],
    value: T,
) -> Result<Volume<T>> {
    let s = vol.shape();
    if (0..3).any(|a| before[a] + s[a] > out_shape[a]) {
        return Err(Error::param(
            "pad",
            format!("shape {s:?} at {before:?} does not fit in {out_shape:?}"),
        ));
    }
    let mut out = vec![value; out_shape.iter().product()];
    let src = vol.data();
    for_each_slab(&mut out, out_shape[0] * out_shape[1], |z, slab| {
        if z < before[2] || z >= before[2] + s[2] {
            return;
        }
        for y in 0..s[1] {
            let dst = before[0] + out_shape[0] * (before[1] + y);
            let from = vol.index([0, y, z - before[2]]);
            slab[dst..dst + s[0]].copy_from_slice(&src[from..from + s[0]]);
        }
    });
    let affine = shifted_affine(vol.affine(), before.map(|v| -(v as f64)));
    Ok(Volume::from_parts(
        out,
        out_shape,
        affine,
        None,
        vol.source().map(Into::into),
    ))
}

/// MONAI's `CropForeground(select_fn=x > threshold, margin)`: the bounding box of the voxels
/// above `threshold` (0 for the Universal Model: HU above the window's lower end), grown by
/// `margin` and clipped to the volume.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CropForeground {
    /// Voxels strictly above this value are foreground.
    pub threshold: f32,
    /// Voxels added on each side.
    pub margin: usize,
}

impl Default for CropForeground {
    fn default() -> Self {
        CropForeground {
            threshold: 0.0,
            margin: 0,
        }
    }
}

impl CropForeground {
    /// The foreground box, `None` when no voxel is above the threshold.
    pub fn compute_box(&self, vol: &Volume<f32>) -> Option<CropBox> {
        let s = vol.shape();
        let mut lo = [usize::MAX; 3];
        let mut hi = [0usize; 3];
        let mut any = false;
        let data = vol.data();
        for z in 0..s[2] {
            for y in 0..s[1] {
                let row = &data[s[0] * (y + s[1] * z)..s[0] * (y + 1 + s[1] * z)];
                let first = row.iter().position(|v| *v > self.threshold);
                if let Some(x0) = first {
                    let x1 = row.iter().rposition(|v| *v > self.threshold).unwrap_or(x0);
                    any = true;
                    lo[0] = lo[0].min(x0);
                    hi[0] = hi[0].max(x1);
                    lo[1] = lo[1].min(y);
                    hi[1] = hi[1].max(y);
                    lo[2] = lo[2].min(z);
                    hi[2] = hi[2].max(z);
                }
            }
        }
        any.then(|| CropBox {
            start: [0, 1, 2].map(|a| lo[a].saturating_sub(self.margin)),
            end: [0, 1, 2].map(|a| (hi[a] + 1 + self.margin).min(s[a])),
        })
    }

    /// Crops a volume to its foreground box.
    ///
    /// # Errors
    /// [`Error::EmptyForeground`] when no voxel is above the threshold.
    pub fn apply(&self, vol: &Volume<f32>) -> Result<(Volume<f32>, CropBox)> {
        let b = self
            .compute_box(vol)
            .ok_or_else(|| Error::EmptyForeground { path: vol.name() })?;
        Ok((crop(vol, &b)?, b))
    }
}

/// MONAI's `SpatialPad(spatial_size, method="symmetric", mode="constant")`: pads each side
/// shorter than `spatial_size` with zeros, `floor(diff / 2)` before and the rest after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpatialPad {
    /// Minimum size of each side (96³ for the Universal Model's training crops).
    pub spatial_size: [usize; 3],
}

impl SpatialPad {
    /// Voxels added before each axis and the padded shape.
    pub fn plan(&self, shape: [usize; 3]) -> ([usize; 3], [usize; 3]) {
        let out = [0, 1, 2].map(|a| shape[a].max(self.spatial_size[a]));
        let before = [0, 1, 2].map(|a| (out[a] - shape[a]) / 2);
        (before, out)
    }

    /// Pads a volume; returns it with the voxels added before each axis.
    ///
    /// # Errors
    /// Never in practice (the plan always fits).
    pub fn apply<T: Voxel>(&self, vol: &Volume<T>) -> Result<(Volume<T>, [usize; 3])> {
        let (before, out) = self.plan(vol.shape());
        if out == vol.shape() {
            return Ok((vol.clone(), before));
        }
        Ok((pad(vol, before, out, T::default())?, before))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_then_pad_restores_inside_the_box() {
        let a = geometry::IDENTITY;
        let mut v = Volume::filled(0f32, [6, 5, 4], a).unwrap();
        for (ijk, val) in [([1, 2, 1], 3.0), ([4, 3, 2], 1.0)] {
            let i = v.index(ijk);
            v.data_mut()[i] = val;
        }
        let (c, b) = CropForeground::default().apply(&v).unwrap();
        assert_eq!(
            b,
            CropBox {
                start: [1, 2, 1],
                end: [5, 4, 3]
            }
        );
        assert_eq!(c.shape(), [4, 2, 2]);
        assert_eq!(c.affine()[0][3], 1.0);
        let back = pad(&c, b.start, v.shape(), 0.0).unwrap();
        assert_eq!(back.data(), v.data());
        assert_eq!(back.affine(), v.affine());

        let m = CropForeground {
            threshold: 0.0,
            margin: 2,
        }
        .compute_box(&v)
        .unwrap();
        assert_eq!(
            m,
            CropBox {
                start: [0, 0, 0],
                end: [6, 5, 4]
            }
        );

        let empty = Volume::filled(0f32, [3, 3, 3], a).unwrap();
        assert!(matches!(
            CropForeground::default().apply(&empty),
            Err(Error::EmptyForeground { .. })
        ));
    }

    #[test]
    fn symmetric_pad() {
        let v = Volume::filled(1u8, [3, 100, 4], geometry::IDENTITY).unwrap();
        let (p, before) = SpatialPad {
            spatial_size: [8, 96, 5],
        }
        .apply(&v)
        .unwrap();
        assert_eq!(before, [2, 0, 0]);
        assert_eq!(p.shape(), [8, 100, 5]);
        assert_eq!(p.get([1, 0, 0]), 0);
        assert_eq!(p.get([2, 0, 0]), 1);
        assert_eq!(p.get([4, 99, 3]), 1);
        assert_eq!(p.get([5, 0, 0]), 0);
        assert_eq!(p.affine()[0][3], -2.0);
    }
}
